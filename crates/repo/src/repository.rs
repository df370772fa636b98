//! A repository: storage + config + keys + index, and the operations on objects.
//!
//! Object layout (all keys relative to the repository root):
//! ```text
//! config              JSON, plaintext: format version, encryption, chunking, pack size
//! keys/<id>           key files (master key wrapped per passphrase)
//! data/<hh>/<id>      packs of blobs (<hh> = first two hex digits)
//! index/<id>          which blobs each pack holds
//! snapshots/<id>      snapshot descriptions (JSON, compressed, sealed)
//! files/<name>        named files (see `files`): WAL segments, registrations
//! locks/<id>          lock objects
//! ```
//! Every object except `config`, `files/` and `locks/` is named by the BLAKE3 of its bytes;
//! no object is ever rewritten.

use std::io::{self, Read};
use std::sync::{RwLock, RwLockReadGuard};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::cache::ObjectCache;
use crate::chunker::ChunkerParams;
use crate::compression::{decompress, decompress_into, Compression};
use crate::crypto::{Crypto, Encryption, MasterKey};
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::index::{BlobLocation, Index, IndexFile};
use crate::keys::{KdfParams, KeyError, KeyFile};
use crate::storage::{DynStorage, PutOutcome, StorageError};

/// Version 2 added data blobs stored as deltas (see `pack`); version 1 repositories are
/// read and written as before, without deltas, so older pgvault keeps reading them.
pub const FORMAT_VERSION: u32 = 2;
const OLDEST_FORMAT_VERSION: u32 = 1;
pub const DEFAULT_PACK_SIZE: u32 = 16 * 1024 * 1024;
/// Largest single ranged read when coalescing the stored bytes of several blobs.
pub const MAX_COALESCED_READ: u64 = 8 * 1024 * 1024;
/// Blobs of one pack this close are fetched in one read, gap included: a request to
/// object storage costs more than reading that much more.
const MAX_GAP: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepoConfig {
    pub version: u32,
    pub id: Id,
    pub created: DateTime<Utc>,
    pub encryption: Encryption,
    pub compression: String,
    pub chunker: ChunkerParams,
    pub pack_size: u32,
    /// Only for unencrypted repositories, where there is no key file to hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub encryption: Encryption,
    pub compression: Compression,
    pub chunker: ChunkerParams,
    pub pack_size: u32,
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            encryption: Encryption::Xchacha20Poly1305,
            compression: Compression::default(),
            chunker: ChunkerParams::default(),
            pack_size: DEFAULT_PACK_SIZE,
            kdf: KdfParams::default(),
        }
    }
}

/// Kinds of sealed JSON objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Snapshot,
}

impl ObjectKind {
    pub fn dir(&self) -> &'static str {
        match self {
            ObjectKind::Snapshot => "snapshots",
        }
    }
}

pub fn pack_key(id: &Id) -> String {
    let hex = id.to_hex();
    format!("data/{}/{}", &hex[..2], hex)
}

pub fn index_key(id: &Id) -> String {
    format!("index/{id}")
}

/// Key of the object that decides whether a repository exists.
const CONFIG_KEY: &str = "config";

pub struct Repository {
    storage: DynStorage,
    config: RepoConfig,
    crypto: Crypto,
    key_id: Option<Id>,
    compression: Compression,
    /// Threads that compress one large named file (a WAL segment) as parallel frames.
    file_threads: usize,
    index: RwLock<Index>,
    index_loaded: RwLock<bool>,
    /// Local copies of snapshot and index objects (see `cache`), for remote storage.
    object_cache: Option<ObjectCache>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repository({})", self.storage.location())
    }
}

impl Repository {
    /// Creates a new repository. With encryption, `passphrase` wraps a fresh master key.
    pub fn init(
        storage: DynStorage,
        options: &InitOptions,
        passphrase: Option<&str>,
    ) -> Result<Repository> {
        let location = storage.location();
        options.chunker.validate().map_err(RepoError::Invalid)?;
        if storage.size(CONFIG_KEY)?.is_some() {
            return Err(RepoError::AlreadyInitialized(location));
        }
        let master = MasterKey::generate();
        let mut key_id = None;
        let mut config = RepoConfig {
            version: FORMAT_VERSION,
            id: Id::random(),
            created: Utc::now(),
            encryption: options.encryption,
            compression: options.compression.to_string(),
            chunker: options.chunker,
            pack_size: options.pack_size,
            id_key: None,
        };
        if options.encryption == Encryption::None {
            config.id_key = Some(hex::encode(master.id_key));
        } else {
            let passphrase =
                passphrase.ok_or_else(|| RepoError::PassphraseRequired(location.clone()))?;
            if passphrase.is_empty() {
                return Err(RepoError::Invalid(
                    "the passphrase is empty; choose a non-empty one".into(),
                ));
            }
            key_id = Some(write_key_file(&storage, &master, passphrase, options.kdf)?);
        }
        let bytes =
            serde_json::to_vec_pretty(&config).map_err(|e| RepoError::Invalid(e.to_string()))?;
        if storage.put_if_absent(CONFIG_KEY, bytes.into())? == PutOutcome::AlreadyExists {
            if let Some(key) = key_id {
                storage.delete(&format!("keys/{key}"))?;
            }
            return Err(RepoError::AlreadyInitialized(location));
        }
        Ok(Repository::assemble(
            storage,
            config,
            master,
            key_id,
            options.compression,
        ))
    }

    /// Opens an existing repository, unlocking it with `passphrase` when encrypted.
    pub fn open(storage: DynStorage, passphrase: Option<&str>) -> Result<Repository> {
        Repository::open_with_key_cache(storage, passphrase, None)
    }

    /// Like [`open`](Self::open), but first tries a local cache of the unlocked master key
    /// in `key_cache` and fills it after a successful unlock. Argon2id costs a quarter
    /// second by design; commands run once per WAL segment cannot pay that each time.
    /// The cache is only as secret as the passphrase file next to it (see `KeyCache`).
    pub fn open_with_key_cache(
        storage: DynStorage,
        passphrase: Option<&str>,
        key_cache: Option<&std::path::Path>,
    ) -> Result<Repository> {
        let location = storage.location();
        let raw = match storage.get(CONFIG_KEY) {
            Ok(raw) => raw,
            Err(StorageError::NotFound { .. }) => return Err(RepoError::NotInitialized(location)),
            Err(e) => return Err(e.into()),
        };
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let corrupt = |detail: String| RepoError::Corrupt {
            location: location.clone(),
            object: CONFIG_KEY.into(),
            detail,
        };
        let version: VersionOnly =
            serde_json::from_slice(&raw).map_err(|e| corrupt(e.to_string()))?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version.version) {
            return Err(RepoError::UnsupportedVersion {
                location,
                found: version.version,
                supported: FORMAT_VERSION,
            });
        }
        let config: RepoConfig =
            serde_json::from_slice(&raw).map_err(|e| corrupt(e.to_string()))?;
        config.chunker.validate().map_err(corrupt)?;
        let compression: Compression = config.compression.parse().map_err(corrupt)?;
        let keys = storage.list("keys/")?;
        if config.encryption == Encryption::None {
            // A key file in an "unencrypted" repository means the config was tampered with.
            if !keys.is_empty() {
                return Err(corrupt("says unencrypted but key files exist".into()));
            }
            let hex_key = config
                .id_key
                .as_deref()
                .ok_or_else(|| corrupt("missing id-key".into()))?;
            let mut id_key = [0u8; 32];
            hex::decode_to_slice(hex_key, &mut id_key).map_err(|e| corrupt(e.to_string()))?;
            let master = MasterKey {
                data_key: [0; 32],
                id_key,
            };
            return Ok(Repository::assemble(
                storage,
                config,
                master,
                None,
                compression,
            ));
        }
        let passphrase =
            passphrase.ok_or_else(|| RepoError::PassphraseRequired(location.clone()))?;
        if keys.is_empty() {
            return Err(corrupt("encrypted but has no key files".into()));
        }
        let cache = key_cache.map(|dir| KeyCache::new(dir, &config.id, passphrase));
        if let Some((key_id, master)) = cache.as_ref().and_then(KeyCache::load) {
            // A removed key must stop working: only trust the cache while its key file exists.
            if keys.iter().any(|m| m.key == format!("keys/{key_id}")) {
                return Ok(Repository::assemble(
                    storage,
                    config,
                    master,
                    Some(key_id),
                    compression,
                ));
            }
            if let Some(cache) = &cache {
                cache.remove();
            }
        }
        for meta in keys {
            let Some(id) = meta
                .key
                .strip_prefix("keys/")
                .and_then(|s| s.parse::<Id>().ok())
            else {
                continue;
            };
            let key_file = read_key_file(&storage, &id)?;
            match key_file.unwrap_key(passphrase) {
                Ok(master) => {
                    if let Some(cache) = &cache {
                        cache.store(&id, &master);
                    }
                    return Ok(Repository::assemble(
                        storage,
                        config,
                        master,
                        Some(id),
                        compression,
                    ));
                }
                Err(KeyError::WrongPassphrase) => continue,
                Err(e) => {
                    return Err(RepoError::Corrupt {
                        location,
                        object: meta.key,
                        detail: e.to_string(),
                    })
                }
            }
        }
        Err(RepoError::WrongPassphrase(location))
    }

    fn assemble(
        storage: DynStorage,
        config: RepoConfig,
        master: MasterKey,
        key_id: Option<Id>,
        compression: Compression,
    ) -> Repository {
        Repository {
            crypto: Crypto::new(config.encryption, master),
            storage,
            config,
            key_id,
            compression,
            file_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            index: RwLock::new(Index::default()),
            index_loaded: RwLock::new(false),
            object_cache: None,
        }
    }

    /// Keeps local copies of snapshot and index objects under `root` (one directory per
    /// repository), so that commands fetch only those they have not seen; `None` reads
    /// everything from storage, as `verify` must to prove what storage holds.
    pub fn set_object_cache(&mut self, root: Option<&std::path::Path>) {
        self.object_cache = root.map(|root| ObjectCache::new(root, &self.config.id));
    }

    pub(crate) fn has_object_cache(&self) -> bool {
        self.object_cache.is_some()
    }

    pub fn storage(&self) -> &DynStorage {
        &self.storage
    }

    pub fn location(&self) -> String {
        self.storage.location()
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Overrides the compression used for new blobs (old blobs keep theirs).
    pub fn set_compression(&mut self, compression: Compression) {
        self.compression = compression;
    }

    /// How many threads compress one large named file: the CPU count, also when several
    /// files are stored at once (one waiting for its fsync leaves the CPUs to the others).
    pub fn file_threads(&self) -> usize {
        self.file_threads
    }

    /// Whether changed data blobs may be stored as deltas (format version 2 and later).
    pub fn stores_deltas(&self) -> bool {
        self.config.version >= 2
    }

    /// The key file this session unlocked with (`None` for unencrypted repositories).
    pub fn key_id(&self) -> Option<Id> {
        self.key_id
    }

    pub(crate) fn corrupt(&self, object: impl Into<String>, detail: impl ToString) -> RepoError {
        RepoError::Corrupt {
            location: self.location(),
            object: object.into(),
            detail: detail.to_string(),
        }
    }

    // ---- keys ----

    pub fn list_keys(&self) -> Result<Vec<(Id, KeyFile)>> {
        let mut out = Vec::new();
        for meta in self.storage.list("keys/")? {
            if let Some(id) = meta
                .key
                .strip_prefix("keys/")
                .and_then(|s| s.parse::<Id>().ok())
            {
                out.push((id, read_key_file(&self.storage, &id)?));
            }
        }
        out.sort_by_key(|(_, k)| k.created);
        Ok(out)
    }

    pub fn add_key(&self, passphrase: &str, kdf: KdfParams) -> Result<Id> {
        if self.config.encryption == Encryption::None {
            return Err(RepoError::Invalid(
                "this repository is not encrypted; it has no keys to add".into(),
            ));
        }
        if passphrase.is_empty() {
            return Err(RepoError::Invalid(
                "the new passphrase is empty; choose a non-empty one".into(),
            ));
        }
        write_key_file(&self.storage, self.crypto.master_key(), passphrase, kdf)
    }

    /// Removes a key file; refuses to remove the last one, which would lose the data.
    pub fn remove_key(&self, id: &Id) -> Result<()> {
        let keys = self.list_keys()?;
        if !keys.iter().any(|(k, _)| k == id) {
            return Err(RepoError::Invalid(format!(
                "no key {id} in repository {}; `pgvault key list` shows the keys",
                self.location()
            )));
        }
        if keys.len() == 1 {
            return Err(RepoError::Invalid(
                "refusing to remove the only key: the repository could never be opened again; add another key first".into(),
            ));
        }
        self.storage.delete(&format!("keys/{id}"))?;
        Ok(())
    }

    // ---- sealed JSON objects ----

    /// Serializes, compresses, seals and stores an object; returns its id.
    pub fn save_object<T: Serialize>(&self, kind: ObjectKind, value: &T) -> Result<Id> {
        let json = serde_json::to_vec(value).map_err(|e| RepoError::Invalid(e.to_string()))?;
        self.save_raw(kind.dir(), &json)
    }

    fn save_raw(&self, dir: &str, plaintext: &[u8]) -> Result<Id> {
        let sealed = self.crypto.seal(&Compression::Zstd(3).compress(plaintext));
        let id = Id::of_bytes(&sealed);
        let sealed = bytes::Bytes::from(sealed);
        self.storage
            .put_if_absent(&format!("{dir}/{id}"), sealed.clone())?;
        if let Some(cache) = &self.object_cache {
            cache.put(dir, &id, &sealed);
        }
        Ok(id)
    }

    fn load_raw(&self, dir: &str, id: &Id) -> Result<Vec<u8>> {
        let key = format!("{dir}/{id}");
        let cached = (self.object_cache.as_ref()).and_then(|cache| cache.get(dir, id));
        let sealed = match cached {
            Some(sealed) => sealed,
            None => {
                let sealed = self.storage.get(&key)?;
                if Id::of_bytes(&sealed) != *id {
                    return Err(self.corrupt(
                        key,
                        "content does not match its name (truncated or modified)",
                    ));
                }
                if let Some(cache) = &self.object_cache {
                    cache.put(dir, id, &sealed);
                }
                sealed
            }
        };
        let compressed = self
            .crypto
            .open(&sealed)
            .map_err(|e| self.corrupt(key.clone(), e))?;
        decompress(&compressed, 0).map_err(|e| self.corrupt(key, e))
    }

    pub fn load_object<T: DeserializeOwned>(&self, kind: ObjectKind, id: &Id) -> Result<T> {
        let raw = self.load_raw(kind.dir(), id)?;
        serde_json::from_slice(&raw).map_err(|e| self.corrupt(format!("{}/{id}", kind.dir()), e))
    }

    pub fn list_objects(&self, kind: ObjectKind) -> Result<Vec<Id>> {
        self.list_named(kind.dir())
    }

    /// The ids of the objects under `dir/`; local copies of others are dropped.
    fn list_named(&self, dir: &str) -> Result<Vec<Id>> {
        let prefix = format!("{dir}/");
        let ids: Vec<Id> = (self.storage.list(&prefix)?.into_iter())
            .filter_map(|m| m.key.strip_prefix(&prefix).and_then(|s| s.parse().ok()))
            .collect();
        if let Some(cache) = &self.object_cache {
            cache.retain(dir, &ids);
        }
        Ok(ids)
    }

    /// Resolves a full id or a unique prefix of at least 4 hex digits (or "latest" is
    /// handled by callers that know the object's time).
    pub fn resolve_prefix(&self, kind: ObjectKind, prefix: &str) -> Result<Id> {
        if let Ok(id) = prefix.parse::<Id>() {
            return Ok(id);
        }
        if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(RepoError::Invalid(format!(
                "{prefix:?} is not an id: give at least 4 hex digits of it"
            )));
        }
        let matches: Vec<Id> = self
            .list_objects(kind)?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&prefix.to_ascii_lowercase()))
            .collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(RepoError::Invalid(format!(
                "no {} with id {prefix} in {}",
                kind.dir().trim_end_matches('s'),
                self.location()
            ))),
            _ => Err(RepoError::Invalid(format!(
                "id prefix {prefix} is ambiguous ({} matches); give more digits",
                matches.len()
            ))),
        }
    }

    // ---- index ----

    pub fn save_index_file(&self, file: &IndexFile) -> Result<Id> {
        self.save_raw("index", &file.encode())
    }

    pub fn load_index_file(&self, id: &Id) -> Result<IndexFile> {
        let raw = self.load_raw("index", id)?;
        IndexFile::decode(&raw).map_err(|e| self.corrupt(index_key(id), e))
    }

    pub fn list_index_files(&self) -> Result<Vec<Id>> {
        self.list_named("index")
    }

    /// Reads every index object into memory (once per process).
    pub fn load_index(&self) -> Result<()> {
        if *self.index_loaded.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(());
        }
        let mut loaded = self.index_loaded.write().unwrap_or_else(|e| e.into_inner());
        if *loaded {
            return Ok(());
        }
        let ids = self.list_index_files()?;
        let files = crate::parallel::map(ids, 8, |id| self.load_index_file(&id).map(|f| (id, f)))?;
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for (id, file) in files {
            index.add_file(id, &file);
        }
        let orphans = index.drop_orphan_deltas();
        if orphans > 0 {
            tracing::debug!("{orphans} indexed deltas have no base any more; ignoring them");
        }
        *loaded = true;
        Ok(())
    }

    /// The in-memory index; call [`Repository::load_index`] first.
    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add_to_index(&self, file_id: Id, file: &IndexFile) {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        index.add_file(file_id, file);
    }

    /// Forgets the loaded index so the next `load_index` reads storage again.
    pub fn reset_index(&self) {
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = Index::default();
        *self.index_loaded.write().unwrap_or_else(|e| e.into_inner()) = false;
    }

    // ---- blobs ----

    /// Opens one stored blob: authenticates, decompresses, applies the delta `base` (its
    /// id and stored bytes) when it is stored as one, and checks the keyed hash of the
    /// result.
    pub fn open_blob(
        &self,
        id: &Id,
        sealed: &[u8],
        pack: &Id,
        base: Option<(&Id, &[u8])>,
    ) -> Result<Vec<u8>> {
        let object = || blob_object(id, pack);
        let mut plain = self
            .unseal_blob(sealed)
            .map_err(|e| self.corrupt(object(), e))?;
        self.complete_blob(id, &mut plain, pack, base)?;
        Ok(plain)
    }

    /// [`Repository::open_blob`] into `out`, whose length must be the blob's
    /// `raw_length`: a restore decompresses straight into its direct-I/O block.
    pub fn open_blob_into(
        &self,
        id: &Id,
        sealed: &[u8],
        pack: &Id,
        base: Option<(&Id, &[u8])>,
        out: &mut [u8],
    ) -> Result<()> {
        let object = || blob_object(id, pack);
        let compressed = self
            .crypto
            .open(sealed)
            .map_err(|e| self.corrupt(object(), e.to_string()))?;
        decompress_into(&compressed, out).map_err(|e| self.corrupt(object(), e.to_string()))?;
        self.complete_blob(id, out, pack, base)
    }

    /// Applies a delta blob's base to its opened bytes, then checks them against the id.
    fn complete_blob(
        &self,
        id: &Id,
        plain: &mut [u8],
        pack: &Id,
        base: Option<(&Id, &[u8])>,
    ) -> Result<()> {
        let object = || blob_object(id, pack);
        if let Some((base, sealed_base)) = base {
            // The base's own hash is not checked: a damaged base fails the check below.
            let base_plain = self.unseal_blob(sealed_base).map_err(|e| {
                self.corrupt(object(), format!("its delta base {}: {e}", base.short()))
            })?;
            crate::delta::apply(plain, &base_plain).map_err(|e| {
                self.corrupt(object(), format!("delta against {}: {e}", base.short()))
            })?;
        }
        if self.crypto.blob_id(plain) != *id {
            return Err(self.corrupt(object(), "content does not match its id"));
        }
        Ok(())
    }

    fn unseal_blob(&self, sealed: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let compressed = self.crypto.open(sealed).map_err(|e| e.to_string())?;
        decompress(&compressed, 0).map_err(|e| e.to_string())
    }

    /// Where a delta's base is stored; a base is always stored whole.
    pub fn base_location(&self, base: &Id) -> Result<BlobLocation> {
        let location = self
            .index()
            .get(base)
            .ok_or(RepoError::MissingBlob(*base))?;
        if location.base.is_some() {
            let object = blob_object(base, &location.pack);
            return Err(self.corrupt(object, "a delta base is itself a delta"));
        }
        Ok(location)
    }

    /// A delta's base, given the `base` field of its location: the base's id and where
    /// it is stored.
    pub fn base_of(&self, base: Option<Id>) -> Result<Option<(Id, BlobLocation)>> {
        base.map(|base| self.base_location(&base).map(|location| (base, location)))
            .transpose()
    }

    /// Reads the stored bytes of several blobs with as few ranged reads as the gaps
    /// between them allow (sorted by pack and offset, gaps up to 64 KiB read through).
    pub fn read_stored(
        &self,
        locations: impl Iterator<Item = BlobLocation>,
    ) -> Result<StoredBlobs> {
        let ranges = coalesce(locations)
            .into_iter()
            .map(|(pack, start, end)| {
                let bytes = self
                    .storage
                    .get_range(&pack_key(&pack), start, end - start)?;
                Ok((pack, start, bytes))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StoredBlobs { ranges })
    }

    /// Tells the storage that [`Repository::read_stored`] of these locations follows soon.
    pub fn read_ahead(&self, locations: impl Iterator<Item = BlobLocation>) {
        for (pack, start, end) in coalesce(locations) {
            self.storage
                .read_ahead(&pack_key(&pack), start, end - start);
        }
    }

    /// Reads one blob (and its delta base, in the same request when they are close).
    pub fn load_blob(&self, id: &Id) -> Result<Vec<u8>> {
        self.load_index()?;
        let location = self.index().get(id).ok_or(RepoError::MissingBlob(*id))?;
        let base = self.base_of(location.base)?;
        let stored = self.read_stored(std::iter::once(location).chain(base.map(|(_, l)| l)))?;
        self.open_blob(
            id,
            stored.bytes(&location)?,
            &location.pack,
            stored.base(&base)?,
        )
    }

    /// A blob's plaintext as a reader, for blobs too large to hold whole (the tree of a
    /// directory of many files): only its compressed bytes are in memory.
    /// [`BlobReader::finish`] checks the plaintext against the id.
    pub fn read_blob(&self, id: &Id) -> Result<BlobReader> {
        self.load_index()?;
        let location = self.index().get(id).ok_or(RepoError::MissingBlob(*id))?;
        let object = blob_object(id, &location.pack);
        let reader: Box<dyn Read + Send> = if location.base.is_some() {
            // Deltas are chunks of files, held whole anyway.
            Box::new(io::Cursor::new(self.load_blob(id)?))
        } else {
            let stored = self.read_stored(std::iter::once(location))?;
            let compressed = self
                .crypto
                .open(stored.bytes(&location)?)
                .map_err(|e| self.corrupt(object.clone(), e))?;
            crate::compression::decoder(compressed).map_err(|e| self.corrupt(object.clone(), e))?
        };
        Ok(BlobReader {
            reader,
            hasher: self.crypto.blob_hasher(),
            id: *id,
            location: self.location(),
            object,
        })
    }
}

/// See [`Repository::read_blob`].
pub struct BlobReader {
    reader: Box<dyn Read + Send>,
    hasher: blake3::Hasher,
    id: Id,
    location: String,
    object: String,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl BlobReader {
    /// Reads what is left and checks the whole plaintext against the blob's id.
    pub fn finish(mut self) -> Result<()> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| self.corrupt(e))?;
        if Id(*self.hasher.finalize().as_bytes()) != self.id {
            return Err(self.corrupt("its content does not match its id"));
        }
        Ok(())
    }

    /// The error for damage found while reading (decompression, id).
    pub fn corrupt(&self, detail: impl ToString) -> RepoError {
        RepoError::Corrupt {
            location: self.location.clone(),
            object: self.object.clone(),
            detail: detail.to_string(),
        }
    }
}

/// How messages name a stored blob.
fn blob_object(id: &Id, pack: &Id) -> String {
    format!("blob {} in pack {}", id.short(), pack_key(pack))
}

/// The pack ranges holding `locations`: sorted, with blobs of one pack that lie close
/// together read in one range, gap included.
fn coalesce(locations: impl Iterator<Item = BlobLocation>) -> Vec<(Id, u64, u64)> {
    let mut spans: Vec<(Id, u64, u64)> = locations
        .map(|l| {
            let start = u64::from(l.offset);
            (l.pack, start, start + u64::from(l.length))
        })
        .collect();
    spans.sort();
    let mut merged: Vec<(Id, u64, u64)> = Vec::new();
    for (pack, start, end) in spans {
        match merged.last_mut() {
            Some((last_pack, last_start, last_end))
                if *last_pack == pack
                    && start <= *last_end + MAX_GAP
                    && end.max(*last_end) - *last_start <= MAX_COALESCED_READ =>
            {
                *last_end = end.max(*last_end);
            }
            _ => merged.push((pack, start, end)),
        }
    }
    merged
}

/// Stored (sealed) bytes of blobs, read by [`Repository::read_stored`].
pub struct StoredBlobs {
    /// (pack, offset of the first byte, bytes), sorted by pack and offset.
    ranges: Vec<(Id, u64, Vec<u8>)>,
}

impl StoredBlobs {
    /// A delta's base as [`Repository::open_blob`] takes it: its id and stored bytes.
    pub fn base<'s>(
        &'s self,
        base: &'s Option<(Id, BlobLocation)>,
    ) -> Result<Option<(&'s Id, &'s [u8])>> {
        base.as_ref()
            .map(|(id, location)| self.bytes(location).map(|bytes| (id, bytes)))
            .transpose()
    }

    /// The stored bytes of a blob that was asked for.
    pub fn bytes(&self, location: &BlobLocation) -> Result<&[u8]> {
        let offset = u64::from(location.offset);
        let end = offset + u64::from(location.length);
        let at = self
            .ranges
            .partition_point(|(pack, start, _)| (*pack, *start) <= (location.pack, offset));
        at.checked_sub(1)
            .map(|i| &self.ranges[i])
            .filter(|(pack, start, bytes)| {
                *pack == location.pack && end <= start + bytes.len() as u64
            })
            .map(|(_, start, bytes)| &bytes[(offset - start) as usize..(end - start) as usize])
            .ok_or_else(|| {
                RepoError::Invalid(format!(
                    "blob at {} offset {offset} was not read",
                    pack_key(&location.pack)
                ))
            })
    }
}

fn write_key_file(
    storage: &DynStorage,
    master: &MasterKey,
    passphrase: &str,
    kdf: KdfParams,
) -> Result<Id> {
    let key_file =
        KeyFile::wrap(master, passphrase, kdf).map_err(|e| RepoError::Invalid(e.to_string()))?;
    let bytes =
        serde_json::to_vec_pretty(&key_file).map_err(|e| RepoError::Invalid(e.to_string()))?;
    let id = Id::of_bytes(&bytes);
    storage.put_if_absent(&format!("keys/{id}"), bytes.into())?;
    Ok(id)
}

fn read_key_file(storage: &DynStorage, id: &Id) -> Result<KeyFile> {
    let key = format!("keys/{id}");
    let bytes = storage.get(&key)?;
    let corrupt = |detail: String| RepoError::Corrupt {
        location: storage.location(),
        object: key.clone(),
        detail,
    };
    if Id::of_bytes(&bytes) != *id {
        return Err(corrupt("content does not match its name".into()));
    }
    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))
}

/// A local file holding the unlocked master key, sealed with a key derived (BLAKE3) from
/// the repository id and the passphrase, and named by another such derivation. Whoever
/// can read it can also read the passphrase file it stands in for; it only saves the
/// Argon2id cost. Failures to read or write it are never errors: it is an optimisation.
struct KeyCache {
    path: std::path::PathBuf,
    key: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct CachedKey {
    key_id: Id,
    master: MasterKey,
}

impl KeyCache {
    fn new(dir: &std::path::Path, repo_id: &Id, passphrase: &str) -> KeyCache {
        let mut material = repo_id.0.to_vec();
        material.extend_from_slice(passphrase.as_bytes());
        let name = blake3::derive_key("pgvault key cache name v1", &material);
        let key = blake3::derive_key("pgvault key cache key v1", &material);
        material.zeroize();
        KeyCache {
            path: dir.join(hex::encode(&name[..16])),
            key,
        }
    }

    fn load(&self) -> Option<(Id, MasterKey)> {
        let sealed = std::fs::read(&self.path).ok()?;
        let mut plain =
            crate::crypto::open_with(Encryption::Xchacha20Poly1305, &self.key, &sealed).ok()?;
        let cached: Option<CachedKey> = serde_json::from_slice(&plain).ok();
        plain.zeroize();
        cached.map(|c| (c.key_id, c.master))
    }

    fn store(&self, key_id: &Id, master: &MasterKey) {
        let result = (|| -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            let dir = self.path.parent().unwrap_or(std::path::Path::new("."));
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            let mut plain = serde_json::to_vec(&CachedKey {
                key_id: *key_id,
                master: master.clone(),
            })?;
            let sealed = crate::crypto::seal_with(Encryption::Xchacha20Poly1305, &self.key, &plain);
            plain.zeroize();
            let tmp = self
                .path
                .with_extension(format!("tmp-{}", std::process::id()));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&sealed)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = result {
            tracing::debug!("cannot write key cache {}: {e}", self.path.display());
        }
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for KeyCache {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}
