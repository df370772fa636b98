//! S3-compatible backend, built on OpenDAL's S3 service.
//!
//! # Create-if-absent
//!
//! Every object is published with one `PutObject` carrying `If-None-Match: *`, so the server
//! either stores the whole payload under a free key or answers 412 (mapped to
//! [`PutOutcome::AlreadyExists`]); an existing object is never replaced and a failed request
//! leaves nothing visible.
//!
//! Multipart uploads are deliberately **not** used. OpenDAL 0.54.1 accepts
//! `if_not_exists(true)` on a chunked (multipart) writer, but only sends the header on the
//! single-request path (`S3Core::insert_metadata_headers`, used by `PutObject`);
//! `s3_complete_multipart_upload` sends no `If-None-Match`, so a multipart upload would
//! silently overwrite. Adding the header ourselves would need a custom `HttpFetch`, whose
//! signature names `http::Request`, a crate this package does not depend on, and S3 has no
//! conditional copy that could publish a staged upload. The fallback is therefore a single
//! conditional `PutObject` for every size up to S3's single-request limit (5 GiB); larger
//! payloads are refused with a permanent error rather than written unconditionally. Objects
//! held in memory by callers are far below that limit.
//!
//!
//! Runtime, deadlines and error mapping are shared with the other object stores
//! ([`super::object`]); HTTPS endpoints use rustls with the webpki roots.

use super::object::{checked_prefix, config_error, env_nonempty, ObjectStore, Service};
use super::{ObjectMeta, PutOutcome, Storage, StorageResult};
use std::time::Duration;

const SERVICE: Service = Service {
    scheme: "s3",
    container_word: "bucket",
    missing_container: &["NoSuchBucket"],
    // S3's limit for a single PutObject request; see the module documentation.
    max_conditional_put: Some(5 * 1024 * 1024 * 1024),
};

/// Connection settings for an S3-compatible bucket.
///
/// `S3Config::default()` uses path-style addressing; everything unset comes from the
/// environment (see the field docs).
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket ("" for the bucket root), without slashes at the ends.
    pub prefix: String,
    /// e.g. `http://127.0.0.1:9000`; `None` uses `AWS_ENDPOINT_URL` or AWS's default.
    pub endpoint: Option<String>,
    /// `None` uses `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most non-AWS servers.
    /// `true` by default; `false` selects virtual-host style (`bucket.endpoint/key`).
    pub path_style: bool,
    /// `None` uses `AWS_ACCESS_KEY_ID` / the shared credentials file.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Deadline of one call; `None` means 30 s. Writes get one more second per MiB.
    pub request_timeout: Option<Duration>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            request_timeout: None,
        }
    }
}

impl S3Config {
    /// A path-style configuration for `bucket` under `prefix`, everything else from the
    /// environment.
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> S3Config {
        S3Config {
            bucket: bucket.into(),
            prefix: prefix.into(),
            ..S3Config::default()
        }
    }
}

/// An S3-compatible bucket under a prefix.
#[derive(Debug)]
pub struct S3Storage(ObjectStore);

impl S3Storage {
    pub fn new(config: S3Config) -> StorageResult<S3Storage> {
        let bucket = config.bucket.clone();
        let prefix = checked_prefix(&SERVICE, &bucket, &config.prefix)?;
        let config_error = |detail: String| config_error(SERVICE.scheme, &bucket, &prefix, detail);
        if config.access_key_id.is_some() != config.secret_access_key.is_some() {
            return Err(config_error(
                "access key id and secret access key must be given together".to_string(),
            ));
        }

        let region = config
            .region
            .clone()
            .filter(|r| !r.is_empty())
            .or_else(|| env_nonempty("AWS_REGION"))
            .or_else(|| env_nonempty("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_string());
        let configured_endpoint = config
            .endpoint
            .clone()
            .filter(|e| !e.is_empty())
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL"))
            .map(|e| e.trim_end_matches('/').to_string());
        let endpoint = configured_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));

        // Keeps OpenDAL's default config loading on: credentials not given here come from
        // AWS_* variables, the shared credentials/config files, web identity or IMDS.
        let mut builder = opendal::services::S3::default()
            .bucket(&bucket)
            .root(&format!("/{prefix}"))
            .region(&region);
        if let Some(ep) = &configured_endpoint {
            builder = builder.endpoint(ep);
        }
        if !config.path_style {
            builder = builder.enable_virtual_host_style();
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            builder = builder.access_key_id(id).secret_access_key(secret);
        }
        Ok(S3Storage(ObjectStore::new(
            SERVICE,
            bucket,
            prefix,
            endpoint,
            config.request_timeout,
            builder,
        )?))
    }
}

super::delegate_storage!(S3Storage);
