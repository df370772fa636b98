//! The write side of the pipeline: dedup check → compress → encrypt → pack → upload →
//! index. Thread-safe: many workers call [`BlobSaver::store`] at once.
//!
//! Blobs become visible to other processes only when the index object naming their pack
//! is written, which happens after the pack is durable. An interrupted run leaves packs
//! no index names; `gc` removes them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::Result;
use crate::id::Id;
use crate::index::IndexFile;
use crate::pack::{BlobType, FinishedPack, PackBuilder};
use crate::repository::{pack_key, Repository};

/// Write an index object after this many packs, so an interrupted run keeps its progress.
const PACKS_PER_INDEX: usize = 64;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SaveStats {
    /// Blobs that were new to the repository and written.
    pub blobs_new: u64,
    /// Plaintext bytes of those new blobs.
    pub bytes_new: u64,
    /// Bytes those blobs occupy in storage (compressed, encrypted).
    pub bytes_stored: u64,
    /// Blobs that were already stored and only referenced.
    pub blobs_reused: u64,
    pub bytes_reused: u64,
    pub packs_written: u64,
}

#[derive(Default)]
struct Counters {
    blobs_new: AtomicU64,
    bytes_new: AtomicU64,
    bytes_stored: AtomicU64,
    blobs_reused: AtomicU64,
    bytes_reused: AtomicU64,
    packs_written: AtomicU64,
}

pub struct BlobSaver<'r> {
    repo: &'r Repository,
    reserved: Mutex<HashSet<Id>>,
    data_pack: Mutex<PackBuilder>,
    tree_pack: Mutex<PackBuilder>,
    pending: Mutex<IndexFile>,
    counters: Counters,
}

impl<'r> BlobSaver<'r> {
    /// The repository's index must be loaded, or nothing already stored is deduplicated.
    pub fn new(repo: &'r Repository) -> BlobSaver<'r> {
        BlobSaver {
            repo,
            reserved: Mutex::new(HashSet::new()),
            data_pack: Mutex::new(PackBuilder::default()),
            tree_pack: Mutex::new(PackBuilder::default()),
            pending: Mutex::new(IndexFile::default()),
            counters: Counters::default(),
        }
    }

    pub fn repository(&self) -> &'r Repository {
        self.repo
    }

    /// Hashes `data` and claims it. Returns the id and whether the caller must store it
    /// (false when it is stored already or another caller claimed it first).
    pub fn reserve(&self, data: &[u8]) -> (Id, bool) {
        let id = self.repo.crypto().blob_id(data);
        let new = !self.repo.index().contains(&id)
            && self
                .reserved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
        if !new {
            self.counters.blobs_reused.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_reused
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        (id, new)
    }

    /// Compresses, seals and packs a blob that [`reserve`](Self::reserve) said is new.
    pub fn store(&self, blob_type: BlobType, id: Id, data: &[u8]) -> Result<()> {
        let sealed = self
            .repo
            .crypto()
            .seal(&self.repo.compression().compress(data));
        self.counters.blobs_new.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_new
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.counters
            .bytes_stored
            .fetch_add(sealed.len() as u64, Ordering::Relaxed);
        let full = {
            let mut packer = self
                .packer(blob_type)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            packer.add(blob_type, id, &sealed, data.len());
            if packer.len() >= self.repo.config().pack_size as usize {
                Some(std::mem::take(&mut *packer))
            } else {
                None
            }
        };
        if let Some(packer) = full {
            self.upload(packer)?;
        }
        Ok(())
    }

    /// Reserve and store in one call; returns the blob id.
    pub fn save(&self, blob_type: BlobType, data: &[u8]) -> Result<Id> {
        let (id, new) = self.reserve(data);
        if new {
            self.store(blob_type, id, data)?;
        }
        Ok(id)
    }

    fn packer(&self, blob_type: BlobType) -> &Mutex<PackBuilder> {
        match blob_type {
            BlobType::Data => &self.data_pack,
            BlobType::Tree => &self.tree_pack,
        }
    }

    fn upload(&self, packer: PackBuilder) -> Result<()> {
        if packer.is_empty() {
            return Ok(());
        }
        let FinishedPack { id, bytes, entries } = packer.finish(self.repo.crypto());
        self.repo.storage().put_if_absent(&pack_key(&id), &bytes)?;
        self.counters.packs_written.fetch_add(1, Ordering::Relaxed);
        let batch = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.packs.push((id, entries));
            if pending.packs.len() >= PACKS_PER_INDEX {
                Some(std::mem::take(&mut *pending))
            } else {
                None
            }
        };
        if let Some(batch) = batch {
            self.write_index(batch)?;
        }
        Ok(())
    }

    fn write_index(&self, file: IndexFile) -> Result<()> {
        if file.packs.is_empty() {
            return Ok(());
        }
        let id = self.repo.save_index_file(&file)?;
        self.repo.add_to_index(id, &file);
        Ok(())
    }

    /// Uploads partly filled packs and writes the index for everything stored so far.
    /// Call it before writing any object (snapshot) that refers to the stored blobs.
    pub fn flush(&self) -> Result<()> {
        for blob_type in [BlobType::Data, BlobType::Tree] {
            let packer = std::mem::take(
                &mut *self
                    .packer(blob_type)
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            self.upload(packer)?;
        }
        let rest = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        self.write_index(rest)
    }

    pub fn stats(&self) -> SaveStats {
        let c = &self.counters;
        SaveStats {
            blobs_new: c.blobs_new.load(Ordering::Relaxed),
            bytes_new: c.bytes_new.load(Ordering::Relaxed),
            bytes_stored: c.bytes_stored.load(Ordering::Relaxed),
            blobs_reused: c.blobs_reused.load(Ordering::Relaxed),
            bytes_reused: c.bytes_reused.load(Ordering::Relaxed),
            packs_written: c.packs_written.load(Ordering::Relaxed),
        }
    }
}
