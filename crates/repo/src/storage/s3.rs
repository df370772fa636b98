//! S3-compatible backend (placeholder until the OpenDAL-backed implementation lands).

use super::{ObjectMeta, PutOutcome, Storage, StorageError, StorageResult};

/// Connection settings for an S3-compatible bucket.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket ("" for the bucket root), without slashes at the ends.
    pub prefix: String,
    /// e.g. `http://127.0.0.1:9000`; `None` uses `AWS_ENDPOINT_URL` or AWS's default.
    pub endpoint: Option<String>,
    /// `None` uses `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most non-AWS servers.
    pub path_style: bool,
    /// `None` uses `AWS_ACCESS_KEY_ID` / the shared credentials file.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

#[derive(Debug)]
pub struct S3Storage {
    config: S3Config,
}

impl S3Storage {
    pub fn new(config: S3Config) -> StorageResult<S3Storage> {
        Ok(S3Storage { config })
    }

    fn unsupported(&self, key: &str) -> StorageError {
        StorageError::Permanent {
            location: self.location(),
            key: key.to_string(),
            detail: "S3 backend not built yet".to_string(),
        }
    }
}

impl Storage for S3Storage {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.config.bucket, self.config.prefix)
    }
    fn put_if_absent(&self, key: &str, _data: &[u8]) -> StorageResult<PutOutcome> {
        Err(self.unsupported(key))
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        Err(self.unsupported(key))
    }
    fn get_range(&self, key: &str, _offset: u64, _len: u64) -> StorageResult<Vec<u8>> {
        Err(self.unsupported(key))
    }
    fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        Err(self.unsupported(prefix))
    }
    fn size(&self, key: &str) -> StorageResult<Option<u64>> {
        Err(self.unsupported(key))
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        Err(self.unsupported(key))
    }
}
