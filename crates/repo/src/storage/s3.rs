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
//! # Runtime
//!
//! The [`Storage`] trait is synchronous and is called from many threads at once. All
//! `S3Storage` values share one process-wide multi-thread tokio runtime (2 workers), driven
//! with `Runtime::block_on` from the calling thread; several threads may block on it at the
//! same time. One shared runtime (rather than one per storage) matters because OpenDAL's HTTP
//! client and its connection pool are process-global: connections created on a runtime that
//! was later dropped would fail on the next request. Calls made from inside an async context
//! are moved to a short-lived helper thread instead of panicking.
//!
//! # Retries and timeouts
//!
//! This backend does not retry: wrap it in [`super::RetryingStorage`], which retries
//! [`StorageError::Transient`] failures. Each call has a deadline (`request_timeout`, 30 s by
//! default, plus one second per MiB sent for writes), so an unreachable endpoint fails
//! instead of hanging.
//!
//! # TLS
//!
//! The workspace builds OpenDAL with `default-features = false`, so its HTTP client has no
//! TLS support: `https://` endpoints fail until OpenDAL's `reqwest/rustls-tls` (its default
//! feature set) is enabled. Errors on `https://` endpoints say so.

use super::{check_key, ObjectMeta, PutOutcome, Storage, StorageError, StorageResult};
use opendal::{Buffer, ErrorKind, Operator};
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::runtime::Runtime;

/// S3's limit for a single `PutObject` request.
const MAX_SINGLE_PUT: usize = 5 * 1024 * 1024 * 1024;
/// Default deadline of one storage call (writes get more time per byte sent).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Writes get one extra second per this many bytes on top of the base deadline.
const WRITE_BYTES_PER_SECOND: usize = 1024 * 1024;

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

pub struct S3Storage {
    bucket: String,
    prefix: String,
    /// Endpoint as used in messages (the configured one, or AWS's regional default).
    endpoint: String,
    timeout: Duration,
    op: Operator,
    runtime: &'static Runtime,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn shared_runtime() -> Result<&'static Runtime, String> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("pgvault-s3")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the S3 I/O runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl S3Storage {
    pub fn new(config: S3Config) -> StorageResult<S3Storage> {
        let prefix = config.prefix.trim_matches('/').to_string();
        let bucket = config.bucket.clone();
        let config_error = |detail: String| StorageError::Permanent {
            location: format!("s3://{bucket}/{prefix}"),
            key: String::new(),
            detail,
        };
        if bucket.is_empty() {
            return Err(config_error("missing S3 bucket name".to_string()));
        }
        if !prefix.is_empty() && check_key("", &prefix).is_err() {
            return Err(config_error(format!(
                "invalid S3 prefix {:?}",
                config.prefix
            )));
        }
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
        let op = Operator::new(builder)
            .map_err(|e| config_error(format!("invalid S3 configuration for {endpoint}: {e}")))?
            .finish();
        let runtime = shared_runtime().map_err(config_error)?;

        Ok(S3Storage {
            bucket,
            prefix,
            endpoint,
            timeout: config.request_timeout.unwrap_or(DEFAULT_TIMEOUT),
            op,
            runtime,
        })
    }

    /// Runs `fut` to completion on the shared runtime within `deadline`.
    fn run<T, F>(&self, what: &str, key: &str, deadline: Duration, fut: F) -> StorageResult<T>
    where
        F: Future<Output = opendal::Result<T>> + Send,
        T: Send,
    {
        let timed = async move { tokio::time::timeout(deadline, fut).await };
        let outcome = if tokio::runtime::Handle::try_current().is_ok() {
            // `block_on` panics inside an async context: block a helper thread instead.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| self.runtime.block_on(timed))
                    .join()
                    .map_err(|_| self.permanent(key, format!("{what}: S3 I/O thread panicked")))
            })?
        } else {
            self.runtime.block_on(timed)
        };
        match outcome {
            Ok(result) => result.map_err(|e| self.map_err(what, key, e)),
            Err(_elapsed) => Err(StorageError::Transient {
                location: self.location(),
                key: key.to_string(),
                detail: format!(
                    "{what}: no answer from {} within {deadline:?}",
                    self.endpoint
                ),
            }),
        }
    }

    fn permanent(&self, key: &str, detail: String) -> StorageError {
        StorageError::Permanent {
            location: self.location(),
            key: key.to_string(),
            detail,
        }
    }

    fn map_err(&self, what: &str, key: &str, err: opendal::Error) -> StorageError {
        let location = self.location();
        let key = key.to_string();
        let text = err.to_string();
        match err.kind() {
            ErrorKind::NotFound => StorageError::NotFound { location, key },
            ErrorKind::PermissionDenied => StorageError::PermissionDenied {
                location,
                key,
                detail: format!("{what} at {}: {text}", self.endpoint),
            },
            ErrorKind::ConfigInvalid if text.contains("NoSuchBucket") => StorageError::Permanent {
                location,
                key,
                detail: format!(
                    "bucket {} does not exist at {} ({what} failed: {text})",
                    self.bucket, self.endpoint
                ),
            },
            // Another conditional write on the same key is in flight (HTTP 409): retrying
            // then settles to Created or AlreadyExists.
            _ if err.is_temporary()
                || err.kind() == ErrorKind::RateLimited
                || text.contains("ConditionalRequestConflict") =>
            {
                StorageError::Transient {
                    location,
                    key,
                    detail: format!("{what} at {}: {text}", self.endpoint),
                }
            }
            _ => {
                let hint = if self.endpoint.starts_with("https://") {
                    " (note: this build has no TLS support in its S3 client; https endpoints \
                     need OpenDAL's rustls feature)"
                } else {
                    ""
                };
                StorageError::Permanent {
                    location,
                    key,
                    detail: format!(
                        "{what} on bucket {} at {}: {text}{hint}",
                        self.bucket, self.endpoint
                    ),
                }
            }
        }
    }

    fn check(&self, key: &str) -> StorageResult<()> {
        check_key(&self.location(), key)
    }
}

impl Storage for S3Storage {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> StorageResult<PutOutcome> {
        self.check(key)?;
        if data.len() > MAX_SINGLE_PUT {
            // See the module documentation: only a single PutObject is conditional.
            return Err(self.permanent(
                key,
                format!(
                    "object of {} bytes exceeds the 5 GiB a conditional single-request upload \
                     allows; refusing an upload that could overwrite",
                    data.len()
                ),
            ));
        }
        let deadline =
            self.timeout + Duration::from_secs((data.len() / WRITE_BYTES_PER_SECOND) as u64);
        let body = Buffer::from(data.to_vec());
        let fut = async {
            match self.op.write_with(key, body).if_not_exists(true).await {
                Ok(_) => Ok(PutOutcome::Created),
                Err(e) if e.kind() == ErrorKind::ConditionNotMatch => Ok(PutOutcome::AlreadyExists),
                Err(e) => Err(e),
            }
        };
        self.run("put", key, deadline, fut)
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.check(key)?;
        let fut = async { self.op.read(key).await.map(|b| b.to_vec()) };
        self.run("get", key, self.timeout, fut)
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        self.check(key)?;
        let Some(end) = offset.checked_add(len) else {
            return Err(self.permanent(key, format!("range {offset}+{len} overflows")));
        };
        let beyond_end = |size: u64| {
            self.permanent(
                key,
                format!("range {offset}+{len} beyond object size {size}: the object is truncated or not what was expected"),
            )
        };
        if len == 0 {
            // An empty HTTP range cannot be expressed; only check that the object is there.
            return match self.size(key)? {
                Some(size) if offset <= size => Ok(Vec::new()),
                Some(size) => Err(beyond_end(size)),
                None => Err(StorageError::NotFound {
                    location: self.location(),
                    key: key.to_string(),
                }),
            };
        }
        let fut = async {
            self.op
                .read_with(key)
                .range(offset..end)
                .await
                .map(|b| b.to_vec())
        };
        match self.run("get range", key, self.timeout, fut) {
            Ok(bytes) if bytes.len() as u64 == len => Ok(bytes),
            Ok(bytes) => Err(beyond_end(offset + bytes.len() as u64)),
            Err(err @ (StorageError::NotFound { .. } | StorageError::Transient { .. })) => Err(err),
            Err(err) => match self.size(key) {
                // S3 answers 416 (or a short body) for ranges past the end: say so plainly.
                Ok(Some(size)) if end > size => Err(beyond_end(size)),
                _ => Err(err),
            },
        }
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        let fut = async {
            let entries = self.op.list_with(prefix).recursive(true).await?;
            Ok(entries
                .into_iter()
                .filter(|e| e.metadata().is_file() && !e.path().ends_with('/'))
                .filter(|e| e.path().starts_with(prefix))
                .map(|e| ObjectMeta {
                    size: e.metadata().content_length(),
                    modified: e.metadata().last_modified(),
                    key: e.path().to_string(),
                })
                .collect())
        };
        self.run("list", prefix, self.timeout, fut)
    }

    fn size(&self, key: &str) -> StorageResult<Option<u64>> {
        self.check(key)?;
        let fut = async {
            match self.op.stat(key).await {
                Ok(meta) => Ok(Some(meta.content_length())),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        };
        self.run("stat", key, self.timeout, fut)
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        self.check(key)?;
        let fut = async {
            match self.op.delete(key).await {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                other => other,
            }
        };
        self.run("delete", key, self.timeout, fut)
    }
}
