//! Local filesystem backend: the embedded default.
//!
//! Publishing protocol (crash-safe, never replaces): write `.tmp-<random>` in the target
//! directory, fsync it, hard-link it to the final name (fails if the name exists), fsync
//! the directory, unlink the temporary. A crash leaves at most a `.tmp-*` file, which
//! `list` ignores and `gc` removes.
//!
//! Mounts without hard links (CIFS without Unix extensions, some NFS servers, FAT) answer
//! the link with EPERM/EOPNOTSUPP/ENOSYS. From then on this storage publishes with a
//! claim instead: create `.claim-<name>` with `O_EXCL` (atomic on local filesystems,
//! NFSv3+ and SMB), check the name is still free, rename the temporary onto it, fsync,
//! remove the claim. Concurrent writers of one name wait for the claim; a claim older
//! than [`CLAIM_STALE`] with no object behind it was left by a crash and is taken over.

use super::{check_key, ObjectMeta, PutOutcome, Storage, StorageError, StorageResult};
use crate::direct::NewFile;
use bytes::Bytes;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const TEMP_PREFIX: &str = ".tmp-";
const CLAIM_PREFIX: &str = ".claim-";
/// A claim this old whose object does not exist was left by a crashed writer.
const CLAIM_STALE: Duration = Duration::from_secs(60);
/// How long a writer waits for another writer's claim on the same name.
const CLAIM_WAIT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
    /// Publish with claims instead of hard links (detected, or forced).
    claims: Arc<AtomicBool>,
}

impl LocalStorage {
    pub fn new(root: impl Into<PathBuf>) -> LocalStorage {
        LocalStorage {
            root: root.into(),
            claims: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Publishes with claims from the start, for mounts known to lack hard links.
    pub fn without_hard_links(root: impl Into<PathBuf>) -> LocalStorage {
        let storage = LocalStorage::new(root);
        storage.claims.store(true, Ordering::Relaxed);
        storage
    }

    /// Whether this storage publishes with claims (the mount lacks hard links).
    pub fn uses_claims(&self) -> bool {
        self.claims.load(Ordering::Relaxed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> StorageResult<PathBuf> {
        check_key(&self.location(), key)?;
        Ok(self.root.join(key))
    }

    fn map_err(&self, key: &str, err: io::Error) -> StorageError {
        let location = self.location();
        let key = key.to_string();
        match err.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound { location, key },
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                StorageError::PermissionDenied {
                    location,
                    key,
                    detail: err.to_string(),
                }
            }
            io::ErrorKind::StorageFull => StorageError::NoSpace { location, key },
            io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                StorageError::Transient {
                    location,
                    key,
                    detail: err.to_string(),
                }
            }
            _ => StorageError::Permanent {
                location,
                key,
                detail: err.to_string(),
            },
        }
    }

    /// Run as root in a repository whose top directory belongs to another user (the one
    /// who archives WAL, typically postgres), the user and group to give what this process
    /// creates: a root-owned directory would make that user's later writes into it fail,
    /// and root-owned objects its expire.
    fn owner_to_give(&self) -> Option<(u32, u32)> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        let top = fs::metadata(&self.root).ok()?;
        (top.uid() != 0).then(|| (top.uid(), top.gid()))
    }

    fn write_new(&self, key: &str, path: &Path, data: &[u8]) -> StorageResult<PutOutcome> {
        let dir = path.parent().unwrap_or(&self.root);
        let owner = self.owner_to_give();
        // Best effort: where root may not chown (NFS with root_squash), what it creates
        // already belongs to the squashed user.
        let give = |path: &Path| {
            if let Some((uid, gid)) = owner {
                if let Err(e) = std::os::unix::fs::chown(path, Some(uid), Some(gid)) {
                    tracing::debug!("cannot give {} to {uid}:{gid}: {e}", path.display());
                }
            }
        };
        let mut created_dirs = false;
        if !dir.is_dir() {
            let missing: Vec<PathBuf> = (dir.ancestors())
                .take_while(|a| !a.exists())
                .map(Path::to_path_buf)
                .collect();
            fs::create_dir_all(dir).map_err(|e| self.map_err(key, e))?;
            for created in missing.iter().rev() {
                give(created);
            }
            created_dirs = true;
        }
        let tmp = dir.join(format!("{TEMP_PREFIX}{}", random_suffix()));
        let result = (|| -> io::Result<PutOutcome> {
            let mut file = NewFile::create(&tmp, data.len() as u64)?;
            give(&tmp);
            file.write_all(data)?;
            file.finish()?.sync_all()?;
            let outcome = if self.uses_claims() {
                publish_with_claim(&tmp, path)?
            } else {
                match fs::hard_link(&tmp, path) {
                    Ok(()) => PutOutcome::Created,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => PutOutcome::AlreadyExists,
                    Err(e) if links_unsupported(&e) => {
                        tracing::warn!(
                            "{} does not support hard links ({e}): publishing with exclusive claim files instead",
                            self.root.display()
                        );
                        self.claims.store(true, Ordering::Relaxed);
                        publish_with_claim(&tmp, path)?
                    }
                    Err(e) => return Err(e),
                }
            };
            match fs::remove_file(&tmp) {
                Ok(()) => {}
                // Renamed onto the final name by the claim protocol.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            sync_dir(dir)?;
            if created_dirs {
                // New directories must themselves be durable entries of their parents.
                let mut child = dir;
                while let Some(parent) = child.parent() {
                    sync_dir(parent)?;
                    if parent == self.root || !parent.starts_with(&self.root) {
                        break;
                    }
                    child = parent;
                }
            }
            Ok(outcome)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| self.map_err(key, e))
    }
}

/// The errors Linux gives for `link(2)` on filesystems without hard links.
fn links_unsupported(e: &io::Error) -> bool {
    const EPERM: i32 = 1;
    const ENOSYS: i32 = 38;
    const EOPNOTSUPP: i32 = 95;
    e.kind() == io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(EPERM | ENOSYS | EOPNOTSUPP))
}

/// Publishes `tmp` (written and fsynced) as `path` unless `path` exists, without hard
/// links: see the module documentation.
fn publish_with_claim(tmp: &Path, path: &Path) -> io::Result<PutOutcome> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let claim = dir.join(format!("{CLAIM_PREFIX}{name}"));
    let started = Instant::now();
    loop {
        match OpenOptions::new().write(true).create_new(true).open(&claim) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if path.exists() {
                    return Ok(PutOutcome::AlreadyExists);
                }
                let age = fs::metadata(&claim)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if age.is_some_and(|a| a > CLAIM_STALE) {
                    let _ = fs::remove_file(&claim);
                    continue;
                }
                if started.elapsed() > CLAIM_WAIT {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{} is being written by another process (claim {})",
                            path.display(),
                            claim.display()
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
    let published = if path.exists() {
        Ok(PutOutcome::AlreadyExists)
    } else {
        fs::rename(tmp, path).map(|()| PutOutcome::Created)
    };
    let synced = sync_dir(dir);
    let released = fs::remove_file(&claim);
    let outcome = published?;
    synced?;
    released?;
    Ok(outcome)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(crate) fn random_suffix() -> String {
    let mut bytes = [0u8; 12];
    // A failing system RNG is unrecoverable; fall back to time + pid for a unique name.
    if getrandom::getrandom(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        return format!("{}-{nanos}", std::process::id());
    }
    hex::encode(bytes)
}

impl Storage for LocalStorage {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn is_remote(&self) -> bool {
        false
    }

    fn put_if_absent(&self, key: &str, data: Bytes) -> StorageResult<PutOutcome> {
        let path = self.path(key)?;
        if path.exists() {
            return Ok(PutOutcome::AlreadyExists);
        }
        self.write_new(key, &path, &data)
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        let path = self.path(key)?;
        fs::read(&path).map_err(|e| self.map_err(key, e))
    }

    /// Starts the kernel reading the range into the page cache, so that a restore's next
    /// read finds it there instead of waiting on the disk.
    fn read_ahead(&self, key: &str, offset: u64, len: u64) {
        // A length of 0 would mean "to the end of the file" to the kernel.
        let (Ok(path), Some(len)) = (self.path(key), std::num::NonZeroU64::new(len)) else {
            return;
        };
        if let Ok(file) = File::open(path) {
            let _ = rustix::fs::fadvise(&file, offset, Some(len), rustix::fs::Advice::WillNeed);
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        let path = self.path(key)?;
        let read = || -> io::Result<Vec<u8>> {
            let mut file = File::open(&path)?;
            let size = file.metadata()?.len();
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("range {offset}+{len} beyond object size {size}: the object is truncated or not what was expected"),
                ));
            }
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = vec![0u8; len as usize];
            file.read_exact(&mut buf)?;
            Ok(buf)
        };
        read().map_err(|e| self.map_err(key, e))
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        // Walk the deepest directory the prefix names, then filter by the full prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path(dir_part)?
        };
        let mut out = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.map_err(prefix, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.map_err(prefix, e))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(TEMP_PREFIX) || name.starts_with(CLAIM_PREFIX) {
                    continue;
                }
                let file_type = entry.file_type().map_err(|e| self.map_err(prefix, e))?;
                if file_type.is_dir() {
                    stack.push(entry.path());
                    continue;
                }
                let Ok(rel) = entry
                    .path()
                    .strip_prefix(&self.root)
                    .map(|p| p.to_path_buf())
                else {
                    continue;
                };
                let key = rel
                    .to_string_lossy()
                    .replace(std::path::MAIN_SEPARATOR, "/");
                if key.starts_with(prefix) {
                    let meta = entry.metadata().map_err(|e| self.map_err(&key, e))?;
                    let modified = meta
                        .modified()
                        .ok()
                        .map(chrono::DateTime::<chrono::Utc>::from);
                    out.push(ObjectMeta {
                        key,
                        size: meta.len(),
                        modified,
                    });
                }
            }
        }
        Ok(out)
    }

    fn size(&self, key: &str) -> StorageResult<Option<u64>> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.map_err(key, e)),
        }
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    sync_dir(dir).map_err(|e| self.map_err(key, e))?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.map_err(key, e)),
        }
    }
}

#[cfg(test)]
mod claim_tests {
    use super::*;

    #[test]
    fn a_crashed_writers_claim_is_taken_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = LocalStorage::without_hard_links(dir.path());
        let claim = dir.path().join(format!("{CLAIM_PREFIX}wal"));
        let file = File::create(&claim).expect("claim");
        file.set_modified(std::time::SystemTime::now() - CLAIM_STALE * 2)
            .expect("age the claim");
        drop(file);
        assert_eq!(
            storage
                .put_if_absent("wal", Bytes::from_static(b"x"))
                .expect("put"),
            PutOutcome::Created
        );
        assert_eq!(storage.get("wal").expect("get"), b"x");
        assert!(!claim.exists(), "claim released");
        assert_eq!(
            storage
                .put_if_absent("wal", Bytes::from_static(b"y"))
                .expect("put"),
            PutOutcome::AlreadyExists
        );
        assert_eq!(storage.get("wal").expect("get"), b"x");
        // Claims and temporaries are never listed as objects.
        File::create(dir.path().join(format!("{CLAIM_PREFIX}other"))).expect("claim");
        let keys: Vec<String> = storage
            .list("")
            .expect("list")
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, vec!["wal".to_string()]);
    }

    #[test]
    fn link_errors_of_mounts_without_links_are_recognised() {
        assert!(links_unsupported(&io::Error::from_raw_os_error(1)));
        assert!(links_unsupported(&io::Error::from_raw_os_error(95)));
        assert!(!links_unsupported(&io::Error::from_raw_os_error(17)));
        assert!(!links_unsupported(&io::Error::from(
            io::ErrorKind::NotFound
        )));
    }
}
