//! Storage: raw, immutable objects addressed by `/`-separated keys.
//!
//! The trait is deliberately small so that every backend (local filesystem, S3, …)
//! writes little code and passes one conformance suite (`tests/storage_conformance.rs`).
//! Encryption, compression and content addressing live above it, in
//! [`crate::repository`]; a backend never sees plaintext.
//!
//! Guarantees every backend gives:
//! - `put_if_absent` either publishes the whole payload under `key` or publishes nothing;
//!   it never replaces an existing object (so buckets with Object Lock / WORM work).
//! - After `put_if_absent` returns `Created`, the object is durable.
//! - `list` returns every published object under a prefix, never half-written ones.
//! - `delete` of an absent object succeeds (deletes are idempotent).

mod azblob;
mod gcs;
mod local;
mod object;
mod retry;
mod s3;
mod sftp;

pub use azblob::{AzblobConfig, AzblobStorage};
pub use gcs::{GcsConfig, GcsStorage};
pub use local::LocalStorage;
pub use object::ObjectStore;
pub use retry::{retry, RetryPolicy, RetryingStorage};
pub use s3::{S3Config, S3Storage};
pub use sftp::{parse_sftp_url, SftpConfig, SftpStorage};

/// Implements [`Storage`] for a newtype around another storage by delegation.
macro_rules! delegate_storage {
    ($outer:ty) => {
        impl Storage for $outer {
            fn location(&self) -> String {
                self.0.location()
            }
            fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> StorageResult<PutOutcome> {
                self.0.put_if_absent(key, data)
            }
            fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
                self.0.get(key)
            }
            fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
                self.0.get_range(key, offset, len)
            }
            fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
                self.0.list(prefix)
            }
            fn size(&self, key: &str) -> StorageResult<Option<u64>> {
                self.0.size(key)
            }
            fn delete(&self, key: &str) -> StorageResult<()> {
                self.0.delete(key)
            }
            fn read_ahead(&self, key: &str, offset: u64, len: u64) {
                self.0.read_ahead(key, offset, len)
            }
            fn is_remote(&self) -> bool {
                self.0.is_remote()
            }
        }
    };
}
pub(crate) use delegate_storage;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// What `put_if_absent` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and now holds the payload, durably.
    Created,
    /// An object with this key already existed; it was left untouched.
    AlreadyExists,
}

/// An object found by `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the object was written, where the backend reports it in listings.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// Why a storage operation failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} not found in {location}")]
    NotFound { location: String, key: String },
    #[error("permission denied on {key} in {location}: {detail}")]
    PermissionDenied {
        location: String,
        key: String,
        detail: String,
    },
    #[error("no space left in {location} while writing {key}")]
    NoSpace { location: String, key: String },
    /// A failure that may go away by itself: timeouts, 5xx, connection resets.
    #[error("temporary failure on {key} in {location}: {detail}")]
    Transient {
        location: String,
        key: String,
        detail: String,
    },
    /// Anything else that retrying will not fix (bad configuration, missing bucket, …).
    #[error("{location}: {key}: {detail}")]
    Permanent {
        location: String,
        key: String,
        detail: String,
    },
}

impl StorageError {
    /// A call to `peer` that did not finish within its deadline: worth retrying.
    pub(crate) fn no_answer(
        location: String,
        key: &str,
        what: &str,
        peer: &str,
        deadline: std::time::Duration,
    ) -> StorageError {
        StorageError::Transient {
            location,
            key: key.to_string(),
            detail: format!("{what}: no answer from {peer} within {deadline:?}"),
        }
    }

    /// True when the same call may succeed if repeated later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Transient { .. })
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

/// The backend contract. Keys are relative, `/`-separated, without `.` or `..` parts.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Human-readable location used in messages (e.g. `s3://bucket/prefix`).
    fn location(&self) -> String;

    /// Publishes `data` under `key` unless an object already exists there. The bytes are
    /// taken by value (a `Vec<u8>` converts without a copy) so that an object store can
    /// send them, and a retry send them again, without copying a 16 MiB pack or segment.
    fn put_if_absent(&self, key: &str, data: Bytes) -> StorageResult<PutOutcome>;

    /// Reads a whole object.
    fn get(&self, key: &str) -> StorageResult<Vec<u8>>;

    /// Reads `len` bytes starting at `offset`. Reading past the end is an error.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>>;

    /// Lists every object whose key starts with `prefix` (recursively), in no set order.
    fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>>;

    /// Size of an object, or `None` when absent.
    fn size(&self, key: &str) -> StorageResult<Option<u64>>;

    /// Removes an object; removing an absent object succeeds.
    fn delete(&self, key: &str) -> StorageResult<()>;

    /// Says that `len` bytes at `offset` of `key` will be read soon, so that a backend
    /// which can fetch them in the background starts now. Only a hint: it reports
    /// nothing and may do nothing (the default).
    fn read_ahead(&self, _key: &str, _offset: u64, _len: u64) {}

    /// Whether every request is a round trip over a network (an object store, an SFTP
    /// server), so that keeping a local copy of what is read again saves time.
    fn is_remote(&self) -> bool {
        true
    }
}

pub type DynStorage = Arc<dyn Storage>;

/// Rejects keys that could escape the repository root or that backends disagree on.
pub(crate) fn check_key(location: &str, key: &str) -> StorageResult<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.ends_with('/')
        || key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        || key.contains('\\');
    if bad {
        return Err(StorageError::Permanent {
            location: location.to_string(),
            key: key.to_string(),
            detail: "invalid object key".to_string(),
        });
    }
    Ok(())
}

/// A repository location parsed from a `--repo` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
    Azblob { container: String, prefix: String },
    Gcs { bucket: String, prefix: String },
    Sftp(SftpConfig),
}

impl Location {
    /// Parses `/path`, `file:///path`, `s3://bucket/prefix`, `azblob://container/prefix`,
    /// `gcs://bucket/prefix` and `sftp://user@host[:port]/path`.
    pub fn parse(url: &str) -> Result<Location, String> {
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(format!(
                    "repository URL {url:?}: file:// URLs need an absolute path (file:///path)"
                ));
            }
            return Ok(Location::Local(rest.into()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "repository URL {url:?}: missing bucket name (s3://bucket/prefix)"
                ));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some(rest) = url.strip_prefix("sftp://") {
            return parse_sftp_url(rest)
                .map(Location::Sftp)
                .map_err(|e| format!("repository URL {url:?}: {e}"));
        }
        if let Some(rest) = url.strip_prefix("azblob://") {
            let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if container.is_empty() {
                return Err(format!(
                    "repository URL {url:?}: missing container name (azblob://container/prefix)"
                ));
            }
            return Ok(Location::Azblob {
                container: container.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some(rest) = url
            .strip_prefix("gcs://")
            .or_else(|| url.strip_prefix("gs://"))
        {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "repository URL {url:?}: missing bucket name (gcs://bucket/prefix)"
                ));
            }
            return Ok(Location::Gcs {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(format!(
                "repository URL {url:?}: scheme {scheme}:// is not supported (use a path, file://, s3://, azblob://, gcs:// or sftp://)"
            ));
        }
        if url.is_empty() {
            return Err("repository URL is empty: pass --repo or set PGVAULT_REPO".to_string());
        }
        let path = std::path::Path::new(url);
        if path.is_relative() {
            let cwd =
                std::env::current_dir().map_err(|e| format!("cannot resolve {url:?}: {e}"))?;
            return Ok(Location::Local(cwd.join(path)));
        }
        Ok(Location::Local(path.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            Location::parse("/srv/repo").ok(),
            Some(Location::Local("/srv/repo".into()))
        );
        assert_eq!(
            Location::parse("file:///srv/repo").ok(),
            Some(Location::Local("/srv/repo".into()))
        );
        assert_eq!(
            Location::parse("s3://bkt/a/b/").ok(),
            Some(Location::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into()
            })
        );
        assert!(Location::parse("s3:///x").is_err());
        assert!(Location::parse("ftp://x").is_err());
        assert!(Location::parse("file://relative").is_err());
    }

    #[test]
    fn rejects_escaping_keys() {
        for key in ["", "/a", "a/", "a//b", "../a", "a/./b", "a\\b"] {
            assert!(check_key("x", key).is_err(), "{key:?} accepted");
        }
        assert!(check_key("x", "data/ab/abcdef").is_ok());
    }
}
