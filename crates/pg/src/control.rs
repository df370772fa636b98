//! The start of `global/pg_control`, laid out alike from PostgreSQL 12 to 18: which
//! cluster a data directory belongs to, whether it runs as a primary or a standby, and
//! where its last checkpoint's redo starts. (The rest of the file changes between
//! versions and is not read, except for its checksum.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pgdata::CONTROL_FILE;
use crate::wal::Lsn;

/// `pg_control_version` of each major this layout is known for (12, 13–16, 17, 18), with
/// where its CRC-32C of the bytes before it lies: `offsetof(ControlFileData, crc)` on
/// 64-bit builds (18 added `default_char_signedness` before it).
const KNOWN_VERSIONS: [(u32, usize); 4] = [(1201, 288), (1300, 288), (1700, 288), (1800, 292)];

/// A server rewrites its control file in place, so a read can meet a write half done;
/// as PostgreSQL's own tools do, a read whose checksum is wrong is tried again a few
/// times before the file is called corrupt.
pub(crate) const READ_ATTEMPTS: u32 = 10;
pub(crate) const BETWEEN_ATTEMPTS: Duration = Duration::from_millis(10);

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
    #[error("{path}: the control file's checksum is wrong in {attempts} reads: it is corrupt on disk, and a server started on it would refuse to run; if the server is running, a CHECKPOINT rewrites it from memory, so run one and try again")]
    BadChecksum { path: PathBuf, attempts: u32 },
}

impl ControlFile {
    /// The control file of the data directory `pgdata`.
    pub fn read(pgdata: &Path) -> Result<ControlFile, ControlError> {
        Ok(read_checked(pgdata)?.1)
    }

    /// Parses the bytes of a control file (in this machine's byte order, as the server
    /// writes it), which must pass their checksum.
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
        let Some(&(_, crc_at)) = KNOWN_VERSIONS.iter().find(|(known, _)| *known == version) else {
            return Err(ControlError::UnknownVersion {
                path: PathBuf::new(),
                version,
            });
        };
        let crc = u32_at(crc_at).ok_or_else(too_short)?;
        if crc32c::crc32c(&bytes[..crc_at]) != crc {
            return Err(ControlError::BadChecksum {
                path: PathBuf::new(),
                attempts: 1,
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

/// The bytes of the control file of `pgdata`, once they pass their checksum, and what
/// they say. They are what a backup must store: a server cannot start on a control file
/// whose checksum is wrong.
pub fn read_checked(pgdata: &Path) -> Result<(Vec<u8>, ControlFile), ControlError> {
    let path = pgdata.join(CONTROL_FILE);
    read_checked_with(|| std::fs::read(&path), BETWEEN_ATTEMPTS).map_err(|e| match e {
        ControlError::Io { source, .. } => ControlError::Io { path, source },
        ControlError::TooShort { len, .. } => ControlError::TooShort { path, len },
        ControlError::UnknownVersion { version, .. } => {
            ControlError::UnknownVersion { path, version }
        }
        ControlError::BadChecksum { attempts, .. } => ControlError::BadChecksum { path, attempts },
    })
}

fn read_checked_with(
    mut read: impl FnMut() -> std::io::Result<Vec<u8>>,
    pause: Duration,
) -> Result<(Vec<u8>, ControlFile), ControlError> {
    let mut attempt = 1;
    loop {
        let bytes = read().map_err(|source| ControlError::Io {
            path: PathBuf::new(),
            source,
        })?;
        match ControlFile::parse(&bytes) {
            Ok(control) => return Ok((bytes, control)),
            Err(ControlError::BadChecksum { .. }) if attempt < READ_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(pause);
            }
            Err(ControlError::BadChecksum { path, .. }) => {
                return Err(ControlError::BadChecksum {
                    path,
                    attempts: attempt,
                })
            }
            Err(other) => return Err(other),
        }
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
        with_checksum(bytes)
    }

    fn with_checksum(mut bytes: Vec<u8>) -> Vec<u8> {
        let version = u32::from_ne_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let crc_at = KNOWN_VERSIONS
            .iter()
            .find(|(known, _)| *known == version)
            .map_or(288, |(_, at)| *at);
        let crc = crc32c::crc32c(&bytes[..crc_at]);
        bytes[crc_at..crc_at + 4].copy_from_slice(&crc.to_ne_bytes());
        bytes
    }

    #[test]
    fn identifier_and_redo_are_read_from_known_versions() {
        for (version, _) in KNOWN_VERSIONS {
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

    #[test]
    fn a_wrong_checksum_is_read_again_then_refused() {
        let good = control_bytes(7, 1800, 0x9000028);
        let mut torn = good.clone();
        torn[260] ^= 0xff;
        let err = ControlFile::parse(&torn).expect_err("torn");
        assert!(matches!(err, ControlError::BadChecksum { .. }), "{err}");
        // A field the checksum covers, not only the nonce: the state.
        let mut stale = control_bytes(7, 1300, 0x9000028);
        stale[STATE_AT] = 6;
        assert!(
            ControlFile::parse(&stale).is_err(),
            "state outside the checksum"
        );

        // Two reads meet a write half done, the third the whole file.
        let mut reads = 0;
        let (bytes, control) = read_checked_with(
            || {
                reads += 1;
                Ok(if reads < 3 {
                    torn.clone()
                } else {
                    good.clone()
                })
            },
            Duration::ZERO,
        )
        .expect("read again");
        assert_eq!((reads, bytes, control.version), (3, good, 1800));

        let mut reads = 0;
        let err = read_checked_with(
            || {
                reads += 1;
                Ok(torn.clone())
            },
            Duration::ZERO,
        )
        .expect_err("corrupt");
        assert_eq!(reads, READ_ATTEMPTS);
        assert!(err.to_string().contains("wrong in 10 reads"), "{err}");
        assert!(err.to_string().contains("CHECKPOINT"), "{err}");
    }
}
