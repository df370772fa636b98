use crate::id::Id;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("no pgvault repository at {0}: run `pgvault init` first")]
    NotInitialized(String),
    #[error("a pgvault repository already exists at {0}; use it, or choose another --repo")]
    AlreadyInitialized(String),
    #[error("wrong passphrase for repository {0}")]
    WrongPassphrase(String),
    #[error("repository {0} is encrypted: give its passphrase with --passphrase-file or PGVAULT_PASSPHRASE")]
    PassphraseRequired(String),
    #[error("repository {location} has format version {found}, this pgvault reads version {supported}: upgrade pgvault")]
    UnsupportedVersion {
        location: String,
        found: u32,
        supported: u32,
    },
    #[error("{object} in {location} is corrupt: {detail}")]
    Corrupt {
        location: String,
        object: String,
        detail: String,
    },
    #[error(
        "blob {0} is not in any index: the repository lacks data it needs (run `pgvault verify`)"
    )]
    MissingBlob(Id),
    #[error("repository {location} is locked by {holder}; wait for it to finish, or if that process is gone run `pgvault unlock`")]
    Locked { location: String, holder: String },
    #[error("{scope} is already running, holding {holder}; wait for it to finish, or if that process is gone run `pgvault unlock`")]
    Busy { scope: String, holder: String },
    #[error("{0}")]
    Invalid(String),
    /// The I/O error is part of the message, not a source of its own: one-line error
    /// chains (`{:#}`) would print it twice.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

impl RepoError {
    pub fn io(path: impl AsRef<std::path::Path>, error: std::io::Error) -> RepoError {
        RepoError::Io {
            path: path.as_ref().display().to_string(),
            error,
        }
    }
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;
