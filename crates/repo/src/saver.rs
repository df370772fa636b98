//! The write side of the pipeline: dedup check → compress → encrypt → pack → upload →
//! index. Thread-safe: many workers call [`BlobSaver::store`] at once.
//!
//! Blobs become visible to other processes only when the index object naming their pack
//! is written, which happens after the pack is durable. An interrupted run leaves packs
//! no index names; `gc` removes them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::index::{BlobLocation, IndexFile};
use crate::pack::{BlobType, FinishedPack, PackBuilder};
use crate::parallel::{lock, FirstError};
use crate::repository::{pack_key, Repository, StoredBlobs};

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
    /// New blobs stored as a delta against the blob they replace (counted in `blobs_new`).
    #[serde(default)]
    pub blobs_delta: u64,
}

#[derive(Default)]
struct Counters {
    blobs_new: AtomicU64,
    bytes_new: AtomicU64,
    bytes_stored: AtomicU64,
    blobs_reused: AtomicU64,
    bytes_reused: AtomicU64,
    packs_written: AtomicU64,
    blobs_delta: AtomicU64,
}

/// Store a changed blob as a delta only when at most this fraction of its bytes differ
/// from its base: beyond that the XOR is about as dense as the data and compresses no
/// better, while reading it back costs a second blob.
const DELTA_MAX_DIFFERING: usize = 8;

/// A new data chunk, and the chunk it replaces in the previous version of its file.
#[derive(Debug)]
pub struct ChangedChunk {
    pub id: Id,
    pub data: Vec<u8>,
    pub previous: Option<Id>,
}

pub struct BlobSaver<'r> {
    repo: &'r Repository,
    reserved: Mutex<HashSet<Id>>,
    data_pack: Mutex<PackBuilder>,
    tree_pack: Mutex<PackBuilder>,
    pending: Mutex<IndexFile>,
    counters: Counters,
    /// Full packs go to the uploaders of [`BlobSaver::uploading`] while it runs; without
    /// them, whoever fills a pack uploads it.
    uploads: Mutex<Option<crossbeam_channel::Sender<PackBuilder>>>,
    upload_failure: FirstError<RepoError>,
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
            uploads: Mutex::new(None),
            upload_failure: FirstError::new(),
        }
    }

    /// Runs `body` while `threads` threads upload the packs that fill up, so that the
    /// threads compressing go on while storage takes a pack in (a PUT to an object store
    /// waits on the network, not the CPU). A full pack waits for a free uploader, so at
    /// most `threads` more packs are held than without them.
    pub fn uploading<T>(&self, threads: usize, body: impl FnOnce() -> Result<T>) -> Result<T> {
        let (tx, rx) = crossbeam_channel::bounded::<PackBuilder>(0);
        let result = std::thread::scope(|scope| {
            for _ in 0..threads.max(1) {
                let rx = rx.clone();
                scope.spawn(move || {
                    for packer in rx {
                        if let Err(e) = self.upload(packer) {
                            self.upload_failure.record(e);
                            return;
                        }
                    }
                });
            }
            drop(rx);
            *lock(&self.uploads) = Some(tx);
            // Dropping the sender lets the uploaders finish (the scope waits for them),
            // also when `body` panics.
            let _close = CloseUploads(&self.uploads);
            body()
        });
        if let Some(e) = self.upload_failure.take() {
            return Err(e);
        }
        result
    }

    pub fn repository(&self) -> &'r Repository {
        self.repo
    }

    /// Hashes `data` and claims it. Returns the id and whether the caller must store it
    /// (false when it is stored already or another caller claimed it first).
    pub fn reserve(&self, data: &[u8]) -> (Id, bool) {
        let id = self.repo.crypto().blob_id(data);
        (id, self.claim(id, data.len()))
    }

    /// Like [`reserve`](Self::reserve) for a data chunk: a new one joins `batch`, with
    /// the chunk it replaces in the previous version of its file, for
    /// [`store_changed`](Self::store_changed). Returns its id.
    pub fn reserve_changed(
        &self,
        data: Vec<u8>,
        previous: Option<Id>,
        batch: &mut Vec<ChangedChunk>,
    ) -> Id {
        let (id, new) = self.reserve(&data);
        if new {
            batch.push(ChangedChunk { id, data, previous });
        }
        id
    }

    /// Whether `id` (of `len` plaintext bytes) is new and now ours to store.
    fn claim(&self, id: Id, len: usize) -> bool {
        let new = !self.repo.index().contains(&id) && lock(&self.reserved).insert(id);
        if !new {
            self.counters.blobs_reused.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_reused
                .fetch_add(len as u64, Ordering::Relaxed);
        }
        new
    }

    /// Stores a blob compressed as it was produced (see
    /// [`Compression::stream`](crate::compression::Compression::stream)), given its id
    /// and plaintext length, unless it is stored already.
    pub fn save_compressed(
        &self,
        blob_type: BlobType,
        id: Id,
        len: usize,
        compressed: &[u8],
    ) -> Result<()> {
        if self.claim(id, len) {
            self.pack(
                blob_type,
                id,
                len,
                self.repo.crypto().seal(compressed),
                None,
            )?;
        }
        Ok(())
    }

    /// Compresses, seals and packs a blob that [`reserve`](Self::reserve) said is new.
    pub fn store(&self, blob_type: BlobType, id: Id, data: &[u8]) -> Result<()> {
        self.add(blob_type, id, data, data, None)
    }

    /// Stores new data blobs (each [`reserve`](Self::reserve)d as new), each replacing
    /// `previous`, the blob at the same place in the previous version of its file: as a
    /// delta against the whole copy behind `previous` when few bytes differ (so deltas
    /// are never chained), else whole. The bases of a batch are read together, so a
    /// changed file costs few reads of older packs, not one request per chunk.
    pub fn store_changed(&self, chunks: &[ChangedChunk]) -> Result<()> {
        let bases: Vec<Option<(Id, BlobLocation)>> =
            chunks.iter().map(|chunk| self.delta_base(chunk)).collect();
        let stored = match self
            .repo
            .read_stored(bases.iter().flatten().map(|(_, location)| *location))
        {
            Ok(stored) => Some(stored),
            Err(e) => {
                // Storing the blobs whole is always correct; verify reports the damage.
                tracing::warn!("storing blobs whole: their delta bases are unreadable: {e}");
                None
            }
        };
        for (chunk, base) in chunks.iter().zip(&bases) {
            let delta = match (base, &stored) {
                (Some((base, location)), Some(stored)) => self
                    .delta_against(chunk, base, location, stored)
                    .map(|delta| (*base, delta)),
                _ => None,
            };
            match delta {
                Some((base, delta)) => {
                    self.counters.blobs_delta.fetch_add(1, Ordering::Relaxed);
                    self.add(BlobType::Data, chunk.id, &chunk.data, &delta, Some(base))?;
                }
                None => self.store(BlobType::Data, chunk.id, &chunk.data)?,
            }
        }
        Ok(())
    }

    /// The whole blob a chunk could be stored as a delta against, when deltas are allowed.
    fn delta_base(&self, chunk: &ChangedChunk) -> Option<(Id, BlobLocation)> {
        if !self.repo.stores_deltas() {
            return None;
        }
        let previous = chunk.previous?;
        let index = self.repo.index();
        let base = index.get(&previous)?.base.unwrap_or(previous);
        let location = index.get(&base)?;
        (location.blob_type == BlobType::Data
            && location.base.is_none()
            && location.raw_length as usize == chunk.data.len())
        .then_some((base, location))
    }

    /// The chunk's delta against `base`, when few enough bytes differ.
    fn delta_against(
        &self,
        chunk: &ChangedChunk,
        base: &Id,
        location: &BlobLocation,
        stored: &StoredBlobs,
    ) -> Option<Vec<u8>> {
        let opened = stored
            .bytes(location)
            .and_then(|sealed| self.repo.open_blob(base, sealed, &location.pack, None));
        let base_plain = match opened {
            Ok(plain) => plain,
            Err(e) => {
                tracing::warn!("storing a blob whole: its delta base is unreadable: {e}");
                return None;
            }
        };
        let data = &chunk.data;
        if crate::delta::differing_bytes(data, &base_plain) > data.len() / DELTA_MAX_DIFFERING {
            return None;
        }
        let mut delta = data.clone();
        crate::delta::apply(&mut delta, &base_plain).ok()?;
        Some(delta)
    }

    /// Packs `stored` (the blob itself, or its delta against `base`) under `id`.
    fn add(
        &self,
        blob_type: BlobType,
        id: Id,
        data: &[u8],
        stored: &[u8],
        base: Option<Id>,
    ) -> Result<()> {
        let sealed = self
            .repo
            .crypto()
            .seal(&self.repo.compression().compress(stored));
        self.pack(blob_type, id, data.len(), sealed, base)
    }

    /// Adds a sealed blob of `len` plaintext bytes to the open pack of its type, and
    /// uploads the pack when it is full.
    fn pack(
        &self,
        blob_type: BlobType,
        id: Id,
        len: usize,
        sealed: Vec<u8>,
        base: Option<Id>,
    ) -> Result<()> {
        self.counters.blobs_new.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_new
            .fetch_add(len as u64, Ordering::Relaxed);
        self.counters
            .bytes_stored
            .fetch_add(sealed.len() as u64, Ordering::Relaxed);
        let full = {
            let mut packer = lock(self.packer(blob_type));
            packer.add(blob_type, id, &sealed, len, base);
            if packer.len() >= self.repo.config().pack_size as usize {
                Some(std::mem::take(&mut *packer))
            } else {
                None
            }
        };
        if let Some(packer) = full {
            self.hand_over(packer)?;
        }
        Ok(())
    }

    /// Has a full pack uploaded: by an uploader when [`uploading`](Self::uploading) runs.
    fn hand_over(&self, packer: PackBuilder) -> Result<()> {
        let uploads = lock(&self.uploads).clone();
        let Some(uploads) = uploads else {
            return self.upload(packer);
        };
        // A failed upload stops its uploader; the error itself is returned by `uploading`.
        if self.upload_failure.is_set() || uploads.send(packer).is_err() {
            return Err(RepoError::Invalid(
                "a pack upload failed (reported when the uploads end)".into(),
            ));
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
        self.repo
            .storage()
            .put_if_absent(&pack_key(&id), bytes.into())?;
        self.counters.packs_written.fetch_add(1, Ordering::Relaxed);
        let batch = {
            let mut pending = lock(&self.pending);
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
            let packer = std::mem::take(&mut *lock(self.packer(blob_type)));
            self.upload(packer)?;
        }
        let rest = std::mem::take(&mut *lock(&self.pending));
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
            blobs_delta: c.blobs_delta.load(Ordering::Relaxed),
        }
    }
}

struct CloseUploads<'a>(&'a Mutex<Option<crossbeam_channel::Sender<PackBuilder>>>);

impl Drop for CloseUploads<'_> {
    fn drop(&mut self) {
        lock(self.0).take();
    }
}
