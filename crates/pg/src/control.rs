//! The start of `global/pg_control`, laid out alike from PostgreSQL 12 to 18: which
//! cluster a data directory belongs to, whether it runs as a primary or a standby, and
//! where its last checkpoint's redo starts. (The rest of the file changes between
//! versions and is not read.)

use std::path::{Path, PathBuf};

use crate::pgdata::CONTROL_FILE;
use crate::wal::Lsn;

/// `pg_control_version` of each major this layout is known for: 12, 13–16, 17, 18.
const KNOWN_VERSIONS: [u32; 4] = [1201, 1300, 1700, 1800];

const SYSTEM_IDENTIFIER_AT: usize = 0;
const VERSION_AT: usize = 8;
const STATE_AT: usize = 16;
/// `checkPointCopy.redo`, after `state` (4 bytes), `time` (8, aligned) and `checkPoint`.
const REDO_AT: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlFile {
    pub system_identifier: u64,
    pub version: u32,
    pub state: DbState,
    /// Where replay from the last checkpoint (or restartpoint) would start.
    pub checkpoint_redo: Lsn,
}

/// `DBState`: what the server last recorded itself doing in this data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbState {
    Starting,
    ShutDown,
    ShutDownInRecovery,
    ShuttingDown,
    InCrashRecovery,
    /// A standby, or a restore recovering.
    InArchiveRecovery,
    /// A primary.
    InProduction,
    Unknown(u32),
}

impl DbState {
    fn from_raw(raw: u32) -> DbState {
        match raw {
            0 => DbState::Starting,
            1 => DbState::ShutDown,
            2 => DbState::ShutDownInRecovery,
            3 => DbState::ShuttingDown,
            4 => DbState::InCrashRecovery,
            5 => DbState::InArchiveRecovery,
            6 => DbState::InProduction,
            other => DbState::Unknown(other),
        }
    }
}

/// As `pg_controldata` says it.
impl std::fmt::Display for DbState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbState::Starting => f.write_str("starting up"),
            DbState::ShutDown => f.write_str("shut down"),
            DbState::ShutDownInRecovery => f.write_str("shut down in recovery"),
            DbState::ShuttingDown => f.write_str("shutting down"),
            DbState::InCrashRecovery => f.write_str("in crash recovery"),
            DbState::InArchiveRecovery => f.write_str("in archive recovery"),
            DbState::InProduction => f.write_str("in production"),
            DbState::Unknown(raw) => write!(f, "unknown state {raw}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {len} bytes, too short for a control file")]
    TooShort { path: PathBuf, len: usize },
    #[error("{path}: control file version {version}, which pgvault does not know (it knows PostgreSQL 12 to 18)")]
    UnknownVersion { path: PathBuf, version: u32 },
}

impl ControlFile {
    /// The control file of the data directory `pgdata`.
    pub fn read(pgdata: &Path) -> Result<ControlFile, ControlError> {
        let path = pgdata.join(CONTROL_FILE);
        let bytes = std::fs::read(&path).map_err(|source| ControlError::Io {
            path: path.clone(),
            source,
        })?;
        ControlFile::parse(&bytes).map_err(|e| match e {
            ControlError::TooShort { len, .. } => ControlError::TooShort { path, len },
            ControlError::UnknownVersion { version, .. } => {
                ControlError::UnknownVersion { path, version }
            }
            other => other,
        })
    }

    /// Parses the bytes of a control file (in this machine's byte order, as the server
    /// writes it).
    pub fn parse(bytes: &[u8]) -> Result<ControlFile, ControlError> {
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_ne_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
        };
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
        };
        let too_short = || ControlError::TooShort {
            path: PathBuf::new(),
            len: bytes.len(),
        };
        let version = u32_at(VERSION_AT).ok_or_else(too_short)?;
        if !KNOWN_VERSIONS.contains(&version) {
            return Err(ControlError::UnknownVersion {
                path: PathBuf::new(),
                version,
            });
        }
        Ok(ControlFile {
            system_identifier: u64_at(SYSTEM_IDENTIFIER_AT).ok_or_else(too_short)?,
            version,
            state: DbState::from_raw(u32_at(STATE_AT).ok_or_else(too_short)?),
            checkpoint_redo: Lsn(u64_at(REDO_AT).ok_or_else(too_short)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control_bytes(system_identifier: u64, version: u32, redo: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; 8192];
        bytes[0..8].copy_from_slice(&system_identifier.to_ne_bytes());
        bytes[8..12].copy_from_slice(&version.to_ne_bytes());
        bytes[16..20].copy_from_slice(&5u32.to_ne_bytes());
        bytes[32..40].copy_from_slice(&(redo + 0x38).to_ne_bytes());
        bytes[40..48].copy_from_slice(&redo.to_ne_bytes());
        bytes
    }

    #[test]
    fn identifier_and_redo_are_read_from_known_versions() {
        for version in KNOWN_VERSIONS {
            let parsed =
                ControlFile::parse(&control_bytes(7714734130969023097, version, 0x9000028))
                    .expect("known version");
            assert_eq!(parsed.system_identifier, 7714734130969023097);
            assert_eq!(parsed.checkpoint_redo.to_string(), "0/9000028");
            assert_eq!(parsed.version, version);
            assert_eq!(parsed.state, DbState::InArchiveRecovery);
        }
    }

    #[test]
    fn unknown_versions_and_short_files_are_refused() {
        let unknown = ControlFile::parse(&control_bytes(1, 1100, 1)).expect_err("11");
        assert!(unknown.to_string().contains("version 1100"), "{unknown}");
        let short = ControlFile::parse(&control_bytes(1, 1300, 1)[..40]).expect_err("short");
        assert!(short.to_string().contains("40 bytes"), "{short}");
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = ControlFile::read(dir.path()).expect_err("missing");
        assert!(
            missing.to_string().contains("global/pg_control"),
            "{missing}"
        );
    }
}
