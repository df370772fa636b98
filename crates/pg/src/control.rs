//! The start of `global/pg_control`, laid out alike from PostgreSQL 12 to 18: which
//! cluster a data directory belongs to, and where its last checkpoint's redo starts.
//! (The rest of the file changes between versions and is not read.)

use std::path::{Path, PathBuf};

use crate::pgdata::CONTROL_FILE;
use crate::wal::Lsn;

/// `pg_control_version` of each major this layout is known for: 12, 13–16, 17, 18.
const KNOWN_VERSIONS: [u32; 4] = [1201, 1300, 1700, 1800];

const SYSTEM_IDENTIFIER_AT: usize = 0;
const VERSION_AT: usize = 8;
/// `checkPointCopy.redo`, after `state` (4 bytes), `time` (8, aligned) and `checkPoint`.
const REDO_AT: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlFile {
    pub system_identifier: u64,
    pub version: u32,
    /// Where replay from the last checkpoint (or restartpoint) would start.
    pub checkpoint_redo: Lsn,
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
        let too_short = || ControlError::TooShort {
            path: PathBuf::new(),
            len: bytes.len(),
        };
        let version = bytes
            .get(VERSION_AT..VERSION_AT + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            .ok_or_else(too_short)?;
        if !KNOWN_VERSIONS.contains(&version) {
            return Err(ControlError::UnknownVersion {
                path: PathBuf::new(),
                version,
            });
        }
        Ok(ControlFile {
            system_identifier: u64_at(SYSTEM_IDENTIFIER_AT).ok_or_else(too_short)?,
            version,
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
