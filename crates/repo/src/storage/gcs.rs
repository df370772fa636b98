//! Google Cloud Storage backend, built on OpenDAL's gcs service (JSON API).
//!
//! # Create-if-absent
//!
//! Objects are uploaded with `ifGenerationMatch=0`: GCS stores the object only when no
//! live generation exists and answers 412 otherwise (mapped to
//! [`PutOutcome::AlreadyExists`]). A single upload request carries the whole object, so
//! an interrupted upload leaves nothing visible.
//!
//! # Credentials
//!
//! A service-account key file (config `gcs-credentials-file`, else
//! `GOOGLE_APPLICATION_CREDENTIALS`); without one, requests are anonymous, which only an
//! emulator or a public bucket accepts. The endpoint is `https://storage.googleapis.com`
//! unless `gcs-endpoint` (or `STORAGE_EMULATOR_HOST`, the variable Google's own client
//! libraries honour) names another.

use super::object::{checked_prefix, config_error, env_nonempty, ObjectStore, Service};
use super::{ObjectMeta, PutOutcome, Storage, StorageResult};
use std::path::PathBuf;
use std::time::Duration;

const SERVICE: Service = Service {
    scheme: "gcs",
    container_word: "bucket",
    missing_container: &["The specified bucket does not exist", "bucket not found"],
    max_conditional_put: None,
};

/// Connection settings for a GCS bucket.
#[derive(Debug, Clone, Default)]
pub struct GcsConfig {
    pub bucket: String,
    /// Object name prefix ("" for the bucket root), without slashes at the ends.
    pub prefix: String,
    /// e.g. `http://127.0.0.1:4443` for an emulator.
    pub endpoint: Option<String>,
    /// Service-account key (JSON).
    pub credentials_file: Option<PathBuf>,
    /// Deadline of one call; `None` means 30 s. Writes get one more second per MiB.
    pub request_timeout: Option<Duration>,
}

/// A GCS bucket under a prefix.
#[derive(Debug)]
pub struct GcsStorage(ObjectStore);

impl GcsStorage {
    pub fn new(config: GcsConfig) -> StorageResult<GcsStorage> {
        let bucket = config.bucket.clone();
        let prefix = checked_prefix(&SERVICE, &bucket, &config.prefix)?;
        let config_error = |detail: String| config_error(SERVICE.scheme, &bucket, &prefix, detail);
        let endpoint = config
            .endpoint
            .clone()
            .or_else(|| env_nonempty("STORAGE_EMULATOR_HOST"))
            .map(|e| {
                if e.contains("://") {
                    e
                } else {
                    format!("http://{e}")
                }
            })
            .unwrap_or_else(|| "https://storage.googleapis.com".to_string());
        let credentials = config
            .credentials_file
            .clone()
            .or_else(|| env_nonempty("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from));
        let mut builder = opendal::services::Gcs::default()
            .bucket(&bucket)
            .root(&format!("/{prefix}"))
            .endpoint(&endpoint)
            // Never reach for the metadata server or gcloud's files: credentials are
            // what the configuration says, nothing implicit.
            .disable_vm_metadata()
            .disable_config_load();
        match &credentials {
            Some(path) => {
                if !path.is_file() {
                    return Err(config_error(format!(
                        "GCS credentials file {} does not exist: set gcs-credentials-file or GOOGLE_APPLICATION_CREDENTIALS to a service-account key",
                        path.display()
                    )));
                }
                builder = builder.credential_path(&path.display().to_string());
            }
            None => builder = builder.allow_anonymous(),
        }
        Ok(GcsStorage(ObjectStore::new(
            SERVICE,
            bucket,
            prefix,
            endpoint,
            config.request_timeout,
            builder,
        )?))
    }
}

super::delegate_storage!(GcsStorage);
