//! Named files: whole files stored under a caller-chosen name in `files/`, one object
//! each, for data that is written once, read by name and never deduplicated usefully
//! (WAL segments, history files, registrations). One PUT to store, one GET to fetch.
//!
//! ```text
//! object    = seal(plaintext)
//! plaintext = "PVF1" name_len:u16le name content_id:[32] compressed
//! ```
//! `content_id` is the keyed BLAKE3 of the file's bytes (as for blobs) and `compressed`
//! is [`Compression::compress`] output (tag byte + data). The name inside the sealed
//! plaintext binds the content to its key, so swapping two objects in storage is
//! detected even though each one authenticates.

use crate::compression::{decompress, ReadAt, FRAME_LEN};
use crate::crypto::PieceHasher;
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::repository::Repository;
use crate::storage::{ObjectMeta, PutOutcome};

const FILE_MAGIC: &[u8; 4] = b"PVF1";
const FILES_DIR: &str = "files/";

/// What storing a named file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    Created {
        content_id: Id,
        stored_bytes: u64,
    },
    /// The name exists with the same content: nothing written (an idempotent retry).
    AlreadyStored {
        content_id: Id,
    },
    /// The name exists with different content: nothing written.
    Conflict {
        existing: Id,
        new: Id,
    },
}

/// A named file read back and authenticated.
#[derive(Debug, Clone)]
pub struct StoredFile {
    pub content_id: Id,
    pub data: Vec<u8>,
}

fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn object_key(name: &str) -> String {
    format!("{FILES_DIR}{name}")
}

impl Repository {
    /// Stores `data` under `name` unless the name exists; never replaces an object.
    pub fn store_file(&self, name: &str, data: &[u8]) -> Result<StoreOutcome> {
        let name_len = u16::try_from(name.len())
            .map_err(|_| RepoError::Invalid(format!("file name too long: {name}")))?;
        // Hashing runs beside the compressor's threads rather than before them.
        let (content_id, compressed) = std::thread::scope(|scope| {
            let compressing =
                scope.spawn(|| self.compression().compress_on(data, self.file_threads()));
            let content_id = self.crypto().blob_id(data);
            (content_id, joined(compressing))
        });
        self.store_compressed(name, name_len, content_id, &compressed)
    }

    /// [`Repository::store_file`] for `len` bytes read from `source` in pieces, so a
    /// large file is never held in memory whole. The source must not change meanwhile
    /// (PostgreSQL guarantees that for a WAL file being archived); if it did, the stored
    /// object would fail its checksum when read — never silently restore other bytes.
    pub fn store_file_from(&self, name: &str, len: u64, source: &ReadAt) -> Result<StoreOutcome> {
        let name_len = u16::try_from(name.len())
            .map_err(|_| RepoError::Invalid(format!("file name too long: {name}")))?;
        // Each thread hashes the frames it reads for the compressor.
        let hasher = PieceHasher::new(self.crypto(), len, FRAME_LEN);
        let compressed = self
            .compression()
            .compress_from(len, self.file_threads(), source, &|offset, piece| {
                hasher.add(offset, piece)
            })
            .map_err(|e| RepoError::io(name, e))?;
        let content_id = hasher
            .finish()
            .ok_or_else(|| RepoError::Invalid(format!("{name}: a part was never read")))?;
        self.store_compressed(name, name_len, content_id, &compressed)
    }

    fn store_compressed(
        &self,
        name: &str,
        name_len: u16,
        content_id: Id,
        compressed: &[u8],
    ) -> Result<StoreOutcome> {
        let mut plain = Vec::with_capacity(4 + 2 + name.len() + 32 + compressed.len());
        plain.extend_from_slice(FILE_MAGIC);
        plain.extend_from_slice(&name_len.to_le_bytes());
        plain.extend_from_slice(name.as_bytes());
        plain.extend_from_slice(&content_id.0);
        plain.extend_from_slice(compressed);
        let sealed = self.crypto().seal(&plain);
        drop(plain);
        let stored_bytes = sealed.len() as u64;
        match self
            .storage()
            .put_if_absent(&object_key(name), sealed.into())?
        {
            PutOutcome::Created => Ok(StoreOutcome::Created {
                content_id,
                stored_bytes,
            }),
            PutOutcome::AlreadyExists => {
                let existing = self.load_file(name)?.content_id;
                if existing == content_id {
                    Ok(StoreOutcome::AlreadyStored { content_id })
                } else {
                    Ok(StoreOutcome::Conflict {
                        existing,
                        new: content_id,
                    })
                }
            }
        }
    }

    /// Reads and authenticates the file `name`; `Ok(None)` when it does not exist.
    pub fn find_file(&self, name: &str) -> Result<Option<StoredFile>> {
        match self.load_file(name) {
            Ok(file) => Ok(Some(file)),
            Err(RepoError::Storage(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn load_file(&self, name: &str) -> Result<StoredFile> {
        let key = object_key(name);
        let sealed = self.storage().get(&key)?;
        let corrupt = |detail: String| self.corrupt(key.clone(), detail);
        let plain = self
            .crypto()
            .open(&sealed)
            .map_err(|e| corrupt(e.to_string()))?;
        drop(sealed);
        let rest = plain
            .strip_prefix(FILE_MAGIC)
            .ok_or_else(|| corrupt("bad file magic".into()))?;
        if rest.len() < 2 {
            return Err(corrupt("truncated header".into()));
        }
        let name_len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let rest = &rest[2..];
        if rest.len() < name_len + 32 {
            return Err(corrupt("truncated header".into()));
        }
        if &rest[..name_len] != name.as_bytes() {
            return Err(corrupt(format!(
                "holds the file {:?}, not {name:?} (objects were swapped or renamed)",
                String::from_utf8_lossy(&rest[..name_len])
            )));
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&rest[name_len..name_len + 32]);
        let content_id = Id(id);
        let data = decompress(&rest[name_len + 32..], 0).map_err(|e| corrupt(e.to_string()))?;
        if self.crypto().blob_id(&data) != content_id {
            return Err(corrupt("content does not match its checksum".into()));
        }
        Ok(StoredFile { content_id, data })
    }

    /// Whether `name` is stored, without reading it.
    pub fn has_file(&self, name: &str) -> Result<bool> {
        Ok(self.storage().size(&object_key(name))?.is_some())
    }

    /// Named files under `prefix` (a name prefix, e.g. `wal/main/00000001/`), sorted by name.
    pub fn list_files(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut found = self.storage().list(&object_key(prefix))?;
        for meta in &mut found {
            meta.key = meta.key[FILES_DIR.len()..].to_string();
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// Deletes a named file (retention only: objects are otherwise immutable).
    pub fn delete_file(&self, name: &str) -> Result<()> {
        Ok(self.storage().delete(&object_key(name))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Encryption;
    use crate::keys::KdfParams;
    use crate::storage::LocalStorage;
    use crate::InitOptions;
    use std::sync::Arc;

    fn repo(dir: &std::path::Path, encryption: Encryption) -> Repository {
        let options = InitOptions {
            encryption,
            kdf: KdfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            ..InitOptions::default()
        };
        Repository::init(
            Arc::new(LocalStorage::new(dir.to_path_buf())),
            &options,
            Some("pw"),
        )
        .expect("init")
    }

    #[test]
    fn store_is_idempotent_and_detects_conflicts() {
        for encryption in [Encryption::None, Encryption::Xchacha20Poly1305] {
            let dir = tempfile::tempdir().expect("tempdir");
            let repo = repo(dir.path(), encryption);
            let data = b"segment contents ".repeat(1000);
            let created = repo.store_file("wal/a/000001", &data).expect("store");
            let StoreOutcome::Created { content_id, .. } = created else {
                panic!("{created:?}");
            };
            assert_eq!(
                repo.store_file("wal/a/000001", &data).expect("again"),
                StoreOutcome::AlreadyStored { content_id }
            );
            let other = repo.store_file("wal/a/000001", b"other").expect("conflict");
            assert!(
                matches!(other, StoreOutcome::Conflict { existing, .. } if existing == content_id)
            );
            let back = repo
                .find_file("wal/a/000001")
                .expect("find")
                .expect("exists");
            assert_eq!(back.data, data);
            assert!(repo.find_file("wal/a/000002").expect("find").is_none());
            let listed = repo.list_files("wal/a/").expect("list");
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].key, "wal/a/000001");
        }
    }

    #[test]
    fn swapped_or_damaged_objects_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repo(dir.path(), Encryption::Xchacha20Poly1305);
        repo.store_file("x/one", b"first file").expect("store");
        repo.store_file("x/two", b"second file").expect("store");
        let one = dir.path().join("files/x/one");
        let two = dir.path().join("files/x/two");
        let two_bytes = std::fs::read(&two).expect("read");
        std::fs::remove_file(&one).expect("rm");
        std::fs::write(&one, &two_bytes).expect("swap");
        let err = repo.find_file("x/one").expect_err("swapped");
        assert!(err.to_string().contains("swapped"), "{err}");

        let mut damaged = two_bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        std::fs::remove_file(&two).expect("rm");
        std::fs::write(&two, &damaged).expect("damage");
        assert!(repo.find_file("x/two").is_err());
    }
}
