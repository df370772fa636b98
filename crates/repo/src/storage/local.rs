//! Local filesystem backend: the embedded default.
//!
//! Publishing protocol (crash-safe, never replaces): write `.tmp-<random>` in the target
//! directory, fsync it, hard-link it to the final name (fails if the name exists), fsync
//! the directory, unlink the temporary. A crash leaves at most a `.tmp-*` file, which
//! `list` ignores and `gc` removes.

use super::{check_key, ObjectMeta, PutOutcome, Storage, StorageError, StorageResult};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub(crate) const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    pub fn new(root: impl Into<PathBuf>) -> LocalStorage {
        LocalStorage { root: root.into() }
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
            io::ErrorKind::PermissionDenied => StorageError::PermissionDenied {
                location,
                key,
                detail: err.to_string(),
            },
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

    fn write_new(&self, key: &str, path: &Path, data: &[u8]) -> StorageResult<PutOutcome> {
        let dir = path.parent().unwrap_or(&self.root);
        let mut created_dirs = false;
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(|e| self.map_err(key, e))?;
            created_dirs = true;
        }
        let tmp = dir.join(format!("{TEMP_PREFIX}{}", random_suffix()));
        let result = (|| -> io::Result<PutOutcome> {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            file.write_all(data)?;
            file.sync_all()?;
            drop(file);
            let outcome = match fs::hard_link(&tmp, path) {
                Ok(()) => PutOutcome::Created,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => PutOutcome::AlreadyExists,
                Err(e) => return Err(e),
            };
            fs::remove_file(&tmp)?;
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

    fn put_if_absent(&self, key: &str, data: &[u8]) -> StorageResult<PutOutcome> {
        let path = self.path(key)?;
        if path.exists() {
            return Ok(PutOutcome::AlreadyExists);
        }
        self.write_new(key, &path, data)
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        let path = self.path(key)?;
        fs::read(&path).map_err(|e| self.map_err(key, e))
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
                if name.starts_with(TEMP_PREFIX) {
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
