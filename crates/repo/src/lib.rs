//! The repository layer of pgvault: a deduplicating, compressed, encrypted,
//! content-addressed blob store over a small [`storage::Storage`] trait.
//! It knows nothing about PostgreSQL.
//!
//! Write path: [`archive`] walks/chunks → [`saver::BlobSaver`] dedups, compresses,
//! encrypts, packs, uploads and indexes → a [`snapshot::Snapshot`] names the result.
//! Read path: [`restore`] resolves blobs through the [`index::Index`] and reads packs with
//! coalesced ranged reads. [`gc`] and [`verify`] keep it healthy; [`lock`] keeps
//! concurrent processes apart.

pub mod archive;
mod cache;
pub mod chunker;
pub mod compression;
pub mod copy;
pub mod crypto;
pub mod delta;
mod direct;
mod error;
mod files;
pub mod gc;
pub mod id;
pub mod index;
pub mod keys;
mod listing;
pub mod lock;
pub mod pack;
pub mod parallel;
pub mod repository;
pub mod restore;
pub mod saver;
pub mod snapshot;
pub mod storage;
pub mod verify;

pub use error::{RepoError, Result};
pub use files::{StoreOutcome, StoredFile};
pub use id::Id;
pub use repository::{InitOptions, Repository};

use std::sync::Arc;
use storage::{
    AzblobConfig, AzblobStorage, DynStorage, GcsConfig, GcsStorage, LocalStorage, Location,
    RetryPolicy, RetryingStorage, S3Config, S3Storage, SftpConfig, SftpStorage,
};

/// This machine's name, as recorded in snapshots, locks and key files.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Settings of the object-store backends beyond what the location URL says.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    pub s3: S3Config,
    pub azblob: AzblobConfig,
    pub gcs: GcsConfig,
    /// Key and known_hosts files for SFTP (the URL gives user, host, port and path).
    pub sftp: SftpConfig,
}

/// Opens the storage backend for a location, wrapped with retries for transient errors.
pub fn open_storage(location: &Location, options: &BackendOptions) -> Result<DynStorage> {
    Ok(match location {
        Location::Local(path) => Arc::new(LocalStorage::new(path.clone())),
        Location::S3 { bucket, prefix } => {
            let config = S3Config {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                ..options.s3.clone()
            };
            Arc::new(RetryingStorage::new(
                S3Storage::new(config)?,
                RetryPolicy::default(),
            ))
        }
        Location::Sftp(from_url) => {
            let config = SftpConfig {
                user: from_url.user.clone(),
                host: from_url.host.clone(),
                port: from_url.port,
                path: from_url.path.clone(),
                ..options.sftp.clone()
            };
            Arc::new(RetryingStorage::new(
                SftpStorage::new(config)?,
                RetryPolicy::default(),
            ))
        }
        Location::Gcs { bucket, prefix } => {
            let config = GcsConfig {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                ..options.gcs.clone()
            };
            Arc::new(RetryingStorage::new(
                GcsStorage::new(config)?,
                RetryPolicy::default(),
            ))
        }
        Location::Azblob { container, prefix } => {
            let config = AzblobConfig {
                container: container.clone(),
                prefix: prefix.clone(),
                ..options.azblob.clone()
            };
            Arc::new(RetryingStorage::new(
                AzblobStorage::new(config)?,
                RetryPolicy::default(),
            ))
        }
    })
}
