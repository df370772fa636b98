//! The repository's store suite, run on every storage backend (local filesystem and the
//! loopback S3 server), plus property tests: any bytes round-trip through every
//! compression × encryption mode, storing data twice adds nothing, and a flipped byte
//! anywhere in a pack is detected rather than returned as data.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use repo::archive::{archive_stream, archive_tree, ArchiveOptions, Include};
use repo::chunker::ChunkerParams;
use repo::compression::Compression;
use repo::crypto::Encryption;
use repo::keys::KdfParams;
use repo::restore::{
    restore_file_last, restore_tree, restore_tree_delta, write_content, DeltaCheck, RestoreOptions,
    SyncMethod,
};
use repo::saver::BlobSaver;
use repo::snapshot::{Snapshot, Tree};
use repo::storage::{DynStorage, LocalStorage, PutOutcome, S3Config, S3Storage};
use repo::verify::{verify, VerifyOptions};
use repo::{Id, InitOptions, RepoError, Repository};

const PASSPHRASE: &str = "store suite passphrase";

/// Argon2id at its minimum: the suite tests the store, not the key derivation.
const FAST_KDF: KdfParams = KdfParams {
    memory_kib: 8,
    iterations: 1,
    parallelism: 1,
};

fn options(encryption: Encryption, compression: Compression) -> InitOptions {
    InitOptions {
        encryption,
        compression,
        // Small chunks and packs, so that small inputs still make several of each.
        chunker: ChunkerParams {
            fixed_size: 16 * 1024,
            cdc_min: 4 * 1024,
            cdc_avg: 16 * 1024,
            cdc_max: 64 * 1024,
        },
        pack_size: 256 * 1024,
        kdf: FAST_KDF,
    }
}

/// Deterministic bytes that compress somewhat, like database pages.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&(x % 1000).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Stores `data` as a stream snapshot; returns the stream's blob list and the save stats.
fn store(repo: &Repository, data: &[u8]) -> (Vec<Id>, repo::saver::SaveStats) {
    let saver = BlobSaver::new(repo);
    let started = chrono::Utc::now();
    let archived =
        archive_stream(&saver, data, "stream", &ArchiveOptions::default()).expect("archive_stream");
    let tree = Tree::load(repo, &archived.tree).expect("load tree");
    let stats = archived.summary.save;
    Snapshot {
        root: archived.root,
        ..Snapshot::new(
            "stream",
            started,
            chrono::Utc::now(),
            archived.tree,
            archived.summary,
        )
    }
    .save(repo)
    .expect("save snapshot");
    (tree.nodes[0].content.clone(), stats)
}

fn read_back(repo: &Repository, content: &[Id]) -> repo::Result<Vec<u8>> {
    let mut out = Vec::new();
    write_content(repo, content, &mut out)?;
    Ok(out)
}

fn pack_keys(storage: &DynStorage) -> Vec<String> {
    storage
        .list("data/")
        .expect("list packs")
        .into_iter()
        .map(|m| m.key)
        .collect()
}

/// Replaces `key` with `data`: objects are immutable, so delete and create again.
fn overwrite(storage: &DynStorage, key: &str, data: &[u8]) {
    storage.delete(key).expect("delete");
    assert_eq!(
        storage
            .put_if_absent(key, bytes::Bytes::copy_from_slice(data))
            .expect("put"),
        PutOutcome::Created
    );
}

// ---------------------------------------------------------------------------------------------
// The store suite
// ---------------------------------------------------------------------------------------------

fn suite_round_trip_and_dedup(storage: DynStorage) {
    let repo = Repository::init(
        storage.clone(),
        &options(Encryption::Xchacha20Poly1305, Compression::Zstd(3)),
        Some(PASSPHRASE),
    )
    .expect("init");
    let data = payload(7, 3 << 20);
    let (tree, first) = store(&repo, &data);
    assert!(first.blobs_new > 10, "{first:?}");
    let packs = pack_keys(&storage);
    assert!(packs.len() > 1, "{packs:?}");

    // A fresh process: open with the passphrase, read everything back.
    let reopened = Repository::open(storage.clone(), Some(PASSPHRASE)).expect("open");
    assert!(read_back(&reopened, &tree).expect("read back") == data);

    // The same data again: nothing new, no new pack.
    let (again, second) = store(&reopened, &data);
    assert_eq!(again, tree);
    assert_eq!(second.blobs_new, 0, "{second:?}");
    assert_eq!(pack_keys(&storage), packs);

    // A small change in the middle stores a few chunks, not the whole stream.
    let mut changed = data.clone();
    changed[1 << 20] ^= 0x55;
    let (changed_tree, third) = store(&reopened, &changed);
    assert!(third.blobs_new >= 1 && third.blobs_new <= 4, "{third:?}");
    assert!(read_back(&reopened, &changed_tree).expect("read back") == changed);

    // The wrong passphrase is refused with a clear error.
    let err = Repository::open(storage.clone(), Some("not it")).expect_err("wrong passphrase");
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
    // So is a second init.
    let err = Repository::init(
        storage,
        &options(Encryption::Xchacha20Poly1305, Compression::Zstd(3)),
        Some(PASSPHRASE),
    )
    .expect_err("second init");
    assert!(matches!(err, RepoError::AlreadyInitialized(_)), "{err}");
}

fn suite_tree_round_trip(storage: DynStorage) {
    use std::os::unix::fs::PermissionsExt;
    let repo = Repository::init(
        storage,
        &options(Encryption::Aes256Gcm, Compression::Lz4),
        Some(PASSPHRASE),
    )
    .expect("init");
    let source = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(source.path().join("base/1")).expect("mkdir");
    for i in 0..20u64 {
        std::fs::write(
            source.path().join(format!("base/1/{}", 16384 + i)),
            payload(i, (i as usize * 37_000) % 200_000),
        )
        .expect("write");
    }
    // Large enough to be restored with direct I/O: several whole blocks, then a last
    // one padded to the alignment and cut back to the file's size.
    let large = payload(99, (40 << 20) + 1);
    std::fs::write(source.path().join("base/1/16500"), &large).expect("write");
    std::fs::write(source.path().join("PG_VERSION"), "15\n").expect("write");
    // Modes and mtimes unlike a new file's, on a file restored whole and on the large
    // one, restored in parts: each gets its own back once written.
    let written_at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    for (name, mode) in [("base/1/16384", 0o640), ("base/1/16500", 0o600)] {
        let path = source.path().join(name);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(written_at))
            .expect("set mtime");
    }
    let saver = BlobSaver::new(&repo);
    let archived =
        archive_tree(&saver, source.path(), &ArchiveOptions::default()).expect("archive_tree");
    let target = tempfile::tempdir().expect("tempdir");
    let restored = target.path().join("restored");
    restore_whole(&repo, &archived.tree, &restored).expect("restore_tree");
    for name in ["base/1/16384", "base/1/16385", "base/1/16500", "PG_VERSION"] {
        let (original, copy) = (
            std::fs::metadata(source.path().join(name)).expect("stat"),
            std::fs::metadata(restored.join(name)).expect("stat"),
        );
        assert_eq!(
            copy.permissions().mode(),
            original.permissions().mode(),
            "{name}"
        );
        assert_eq!(copy.modified().ok(), original.modified().ok(), "{name}");
    }
    for i in 0..20u64 {
        let name = format!("base/1/{}", 16384 + i);
        assert!(
            std::fs::read(restored.join(&name)).expect("read")
                == payload(i, (i as usize * 37_000) % 200_000),
            "{name}"
        );
    }
    assert!(
        std::fs::read(restored.join("base/1/16500")).expect("read") == large,
        "the large file differs after restore"
    );
    assert_eq!(
        std::fs::read_to_string(restored.join("PG_VERSION")).expect("read"),
        "15\n"
    );
}

fn suite_damage_is_detected(storage: DynStorage) {
    let repo = Repository::init(
        storage.clone(),
        &options(Encryption::Xchacha20Poly1305, Compression::Zstd(1)),
        Some(PASSPHRASE),
    )
    .expect("init");
    let data = payload(11, 1 << 20);
    let (tree, _) = store(&repo, &data);
    let packs = pack_keys(&storage);
    // The pack holding the stream's middle blob.
    repo.load_index().expect("index");
    let middle_blob = tree[tree.len() / 2];
    let holding = repo.index().get(&middle_blob).expect("indexed").pack;
    let victim = &repo::repository::pack_key(&holding);
    let mut bytes = storage.get(victim).expect("get pack");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    overwrite(&storage, victim, &bytes);

    let repo = Repository::open(storage.clone(), Some(PASSPHRASE)).expect("open");
    let report = verify(&repo, &VerifyOptions::default()).expect("verify");
    assert!(!report.ok(), "verify missed a flipped byte in {victim}");
    let pack_id = victim.rsplit('/').next().expect("pack id");
    assert!(
        report.problems.iter().any(|p| p.object.contains(pack_id)),
        "{:?}",
        report.problems
    );
    assert!(report
        .problems
        .iter()
        .any(|p| !p.snapshots.is_empty() || p.object.contains(pack_id)));
    // Reading fails; it never returns different bytes.
    assert!(read_back(&repo, &tree).is_err());

    // A truncated pack likewise.
    let truncated = &packs[packs.len() - 1];
    let bytes = storage.get(truncated).expect("get pack");
    overwrite(&storage, truncated, &bytes[..bytes.len() - 10]);
    let repo = Repository::open(storage, Some(PASSPHRASE)).expect("open");
    let report = verify(&repo, &VerifyOptions::default()).expect("verify");
    let truncated_id = truncated.rsplit('/').next().expect("pack id");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.object.contains(truncated_id)),
        "{:?}",
        report.problems
    );
}

type Backend = fn() -> Option<(DynStorage, Box<dyn std::any::Any>)>;

fn local_backend() -> Option<(DynStorage, Box<dyn std::any::Any>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage: DynStorage = Arc::new(LocalStorage::new(dir.path().join("repo")));
    Some((storage, Box::new(dir)))
}

fn s3_backend() -> Option<(DynStorage, Box<dyn std::any::Any>)> {
    let moto = testkit::s3::moto()?;
    moto.create_bucket("pgvault-store").expect("bucket");
    let config = S3Config {
        bucket: "pgvault-store".into(),
        prefix: format!("store/{}", testkit::unique("suite")),
        endpoint: Some(moto.endpoint()),
        region: Some("us-east-1".into()),
        path_style: true,
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        request_timeout: None,
    };
    let storage: DynStorage = Arc::new(S3Storage::new(config).expect("S3Storage"));
    Some((storage, Box::new(())))
}

fn run(backend: Backend, suite: fn(DynStorage)) {
    if let Some((storage, _guard)) = backend() {
        suite(storage);
    }
}

#[test]
fn local_round_trip_and_dedup() {
    run(local_backend, suite_round_trip_and_dedup);
}

#[test]
fn s3_round_trip_and_dedup() {
    run(s3_backend, suite_round_trip_and_dedup);
}

#[test]
fn local_tree_round_trip() {
    run(local_backend, suite_tree_round_trip);
}

#[test]
fn s3_tree_round_trip() {
    run(s3_backend, suite_tree_round_trip);
}

#[test]
fn local_damage_is_detected() {
    run(local_backend, suite_damage_is_detected);
}

#[test]
fn s3_damage_is_detected() {
    run(s3_backend, suite_damage_is_detected);
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

fn modes() -> Vec<(Encryption, Compression)> {
    let mut out = Vec::new();
    for encryption in [
        Encryption::None,
        Encryption::Xchacha20Poly1305,
        Encryption::Aes256Gcm,
    ] {
        for compression in [
            Compression::None,
            Compression::Zstd(1),
            Compression::Lz4,
            Compression::Gzip(6),
        ] {
            out.push((encryption, compression));
        }
    }
    out
}

/// `restore_tree` on 2 threads, fsyncing.
fn restore_whole(
    repo: &Repository,
    tree: &Id,
    target: &std::path::Path,
) -> repo::Result<repo::restore::RestoreStats> {
    restore_tree(
        repo,
        tree,
        target,
        RestoreOptions::new(2, SyncMethod::Fsync),
    )
}

fn local_repo(
    encryption: Encryption,
    compression: Compression,
) -> (Repository, DynStorage, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage: DynStorage = Arc::new(LocalStorage::new(dir.path().join("repo")));
    let repo = Repository::init(
        storage.clone(),
        &options(encryption, compression),
        Some(PASSPHRASE),
    )
    .expect("init");
    (repo, storage, dir)
}

/// Data with long runs as well as noise, so that compression and chunk boundaries vary.
fn arbitrary_stream() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..20_000),
            (any::<u8>(), 0usize..50_000).prop_map(|(byte, n)| vec![byte; n]),
        ],
        0..8,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_round_trip_in_every_mode(data in arbitrary_stream()) {
        for (encryption, compression) in modes() {
            let (repo, storage, _dir) = local_repo(encryption, compression);
            let (tree, first) = store(&repo, &data);
            let reopened = Repository::open(storage, Some(PASSPHRASE)).expect("open");
            let back = read_back(&reopened, &tree).expect("read back");
            prop_assert!(back == data, "{encryption:?} {compression:?}: {} bytes in, {} out", data.len(), back.len());
            let (again, second) = store(&reopened, &data);
            prop_assert_eq!(again, tree);
            prop_assert_eq!(second.blobs_new, 0, "{:?} {:?}: {:?} then {:?}", encryption, compression, first, second);
        }
    }

    #[test]
    fn any_flipped_pack_byte_is_detected(
        seed in any::<u64>(),
        position in any::<prop::sample::Index>(),
        bit in 0u8..8,
        mode in 0usize..12,
    ) {
        let (encryption, compression) = modes()[mode];
        let (repo, storage, _dir) = local_repo(encryption, compression);
        let data = payload(seed, 100_000);
        let (tree, _) = store(&repo, &data);
        let packs = pack_keys(&storage);
        let victim = &packs[position.index(packs.len())];
        let mut bytes = storage.get(victim).expect("get");
        let at = position.index(bytes.len());
        bytes[at] ^= 1 << bit;
        overwrite(&storage, victim, &bytes);

        let repo = Repository::open(storage, Some(PASSPHRASE)).expect("open");
        let report = verify(&repo, &VerifyOptions::default()).expect("verify");
        prop_assert!(!report.ok(), "{encryption:?} {compression:?}: flip at {at} of {victim} undetected");
        match read_back(&repo, &tree) {
            Err(_) => {}
            Ok(back) => prop_assert!(back == data, "wrong data returned after a flip at {}", at),
        }
    }
}

/// A snapshot copied into a repository with another key, compression and chunk size
/// reads back identically; copying again adds nothing; named files follow, and a name
/// the target already holds is left alone.
#[test]
fn copy_between_repositories_re_encrypts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open_local =
        |name: &str| -> DynStorage { Arc::new(LocalStorage::new(dir.path().join(name))) };
    let source = Repository::init(
        open_local("a"),
        &options(Encryption::Xchacha20Poly1305, Compression::Zstd(3)),
        Some(PASSPHRASE),
    )
    .expect("init a");
    let target = Repository::init(
        open_local("b"),
        &options(Encryption::Aes256Gcm, Compression::Lz4),
        Some("another passphrase"),
    )
    .expect("init b");
    let data = payload(11, 2 << 20);
    store(&source, &data);
    store(&source, &data[..1 << 20]);
    source
        .store_file("wal/main/one", b"first file")
        .expect("file");
    source
        .store_file("wal/main/two", b"second file")
        .expect("file");
    target
        .store_file("wal/main/two", b"other content")
        .expect("file");

    let already = repo::copy::copied_ids(&target).expect("ids");
    assert!(already.is_empty());
    let copier = repo::copy::SnapshotCopier::new(&source, &target, 2).expect("copier");
    let mut copied = Vec::new();
    for (id, _) in Snapshot::load_all(&source).expect("list") {
        copied.push((id, copier.copy(&id, None).expect("copy")));
    }
    let stats = copier.stats();
    // 3 MiB of snapshots, the second a prefix of the first: its data is read once.
    assert!(
        stats.blobs_new > 0 && stats.bytes_new < (3 << 20) * 3 / 4,
        "{stats:?}"
    );
    for (source_id, target_id) in &copied {
        let original = Snapshot::load(&source, source_id).expect("source");
        let copy = Snapshot::load(&target, target_id).expect("copy");
        assert_eq!(copy.tags["copied-from"], source_id.to_hex());
        assert_eq!(copy.summary, original.summary);
        let tree = Tree::load(&target, &copy.tree).expect("tree");
        let bytes = read_back(&target, &tree.nodes[0].content).expect("read copy");
        let source_tree = Tree::load(&source, &original.tree).expect("tree");
        assert_eq!(
            bytes,
            read_back(&source, &source_tree.nodes[0].content).expect("read")
        );
    }
    let ids = repo::copy::copied_ids(&target).expect("ids");
    assert!(copied.iter().all(|(s, _)| ids.contains(&s.to_hex())));

    let files = repo::copy::copy_files(&source, &target, "wal/main/", 2).expect("files");
    // Names the target has are left alone (not compared: copying is a LIST, not a read).
    assert_eq!((files.files, files.conflicts), (1, 0), "{files:?}");
    assert_eq!(
        target
            .find_file("wal/main/one")
            .expect("read")
            .map(|f| f.data),
        Some(b"first file".to_vec())
    );
    assert_eq!(
        target
            .find_file("wal/main/two")
            .expect("read")
            .map(|f| f.data),
        Some(b"other content".to_vec())
    );
    let again = repo::copy::copy_files(&source, &target, "wal/main/", 2).expect("files");
    assert_eq!(again.files, 0);
    // The copy is a complete repository of its own.
    let report = verify(&target, &VerifyOptions::default()).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn snapshots_and_indexes_are_read_from_local_copies_of_what_storage_lists() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().expect("tempdir");
    let counting = CountingStorage::new(&dir.path().join("repo"));
    let storage: DynStorage = counting.clone();
    let writer = Repository::init(
        storage.clone(),
        &options(Encryption::Xchacha20Poly1305, Compression::Zstd(3)),
        Some(PASSPHRASE),
    )
    .expect("init");
    for seed in 0..3 {
        store(&writer, &payload(seed, 256 << 10));
    }
    let cache = dir.path().join("cache");
    let open = |cached: bool| {
        let mut repo = Repository::open(storage.clone(), Some(PASSPHRASE)).expect("open");
        repo.set_object_cache(cached.then_some(cache.as_path()));
        repo
    };
    let gets = || counting.gets.load(Relaxed);
    // Snapshots and index objects fetched, as a command that chooses a backup does.
    let read_all = |repo: &Repository| {
        let before = gets();
        let snapshots = Snapshot::load_all(repo).expect("snapshots");
        repo.load_index().expect("index");
        (snapshots.len(), gets() - before)
    };
    let index_files = writer.list_index_files().expect("list").len();
    assert!(index_files >= 3, "{index_files}");

    // The first process with the cache fetches each object once, the next none.
    assert_eq!(read_all(&open(true)), (3, 3 + index_files));
    assert_eq!(read_all(&open(true)), (3, 0));
    assert_eq!(read_all(&open(false)), (3, 3 + index_files));

    // A damaged copy is fetched again, never used.
    let copies = cache.join(writer.config().id.to_hex());
    let index_copy = first_file_in(&copies.join("index"));
    std::fs::write(&index_copy, b"damaged").expect("damage copy");
    assert_eq!(read_all(&open(true)), (3, 1));
    assert_eq!(read_all(&open(true)), (3, 0));

    // A snapshot gone from storage (forgotten elsewhere) is not served from its copy,
    // even by its id, and its copy goes with the next listing.
    let (forgotten, _) = Snapshot::load_all(&writer).expect("snapshots")[0].clone();
    storage
        .delete(&format!("snapshots/{forgotten}"))
        .expect("forget");
    let reader = open(true);
    assert!(Snapshot::load(&reader, &forgotten).is_err());
    assert_eq!(read_all(&reader), (2, 0));
    assert!(!copies.join("snapshots").join(forgotten.to_hex()).exists());

    // verify reads storage itself.
    let err = verify(&reader, &VerifyOptions::default()).expect_err("cached verify");
    assert!(
        err.to_string().contains("without the object cache"),
        "{err}"
    );
}

fn first_file_in(dir: &Path) -> std::path::PathBuf {
    let mut names: Vec<_> = (std::fs::read_dir(dir).expect("read dir"))
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    names.remove(0)
}

/// Local storage that counts ranged reads, to see how many requests a restore makes.
#[derive(Debug)]
struct CountingStorage {
    inner: LocalStorage,
    ranged_reads: std::sync::atomic::AtomicUsize,
    gets: std::sync::atomic::AtomicUsize,
}

impl CountingStorage {
    fn new(root: &Path) -> Arc<CountingStorage> {
        Arc::new(CountingStorage {
            inner: LocalStorage::new(root),
            ranged_reads: Default::default(),
            gets: Default::default(),
        })
    }
}

impl repo::storage::Storage for CountingStorage {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put_if_absent(
        &self,
        key: &str,
        data: bytes::Bytes,
    ) -> repo::storage::StorageResult<PutOutcome> {
        self.inner.put_if_absent(key, data)
    }
    fn get(&self, key: &str) -> repo::storage::StorageResult<Vec<u8>> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> repo::storage::StorageResult<Vec<u8>> {
        self.ranged_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> repo::storage::StorageResult<Vec<repo::storage::ObjectMeta>> {
        self.inner.list(prefix)
    }
    fn size(&self, key: &str) -> repo::storage::StorageResult<Option<u64>> {
        self.inner.size(key)
    }
    fn delete(&self, key: &str) -> repo::storage::StorageResult<()> {
        self.inner.delete(key)
    }
}

/// Saves a tree snapshot the way the commands do, so `gc` sees its blobs.
fn save_tree_snapshot(
    repo: &Repository,
    archived: &repo::archive::Archived,
    time: chrono::DateTime<chrono::Utc>,
) -> Id {
    Snapshot {
        root: archived.root.clone(),
        ..Snapshot::new(
            "files",
            time,
            chrono::Utc::now(),
            archived.tree,
            archived.summary,
        )
    }
    .save(repo)
    .expect("save snapshot")
}

/// `archive_tree` of `source` with a saver of its own.
fn archive(
    repo: &Repository,
    source: &std::path::Path,
    options: &ArchiveOptions,
) -> repo::archive::Archived {
    archive_tree(&BlobSaver::new(repo), source, options).expect("archive_tree")
}

fn restored_file(repo: &Repository, tree: &Id, name: &str) -> Vec<u8> {
    let target = tempfile::tempdir().expect("tempdir");
    let restored = target.path().join("restored");
    restore_whole(repo, tree, &restored).expect("restore_tree");
    std::fs::read(restored.join(name)).expect("read restored")
}

/// A second backup of a file in which a few bytes of some chunks changed stores those
/// chunks as small deltas against the first backup's, a rewritten chunk whole; both
/// snapshots restore exactly, also after the first is forgotten and `gc` has run, and
/// `verify` reads every blob back. A version 1 repository stores no deltas.
#[test]
fn changed_chunks_are_stored_as_deltas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counting = CountingStorage::new(&dir.path().join("repo"));
    let storage: DynStorage = counting.clone();
    let repo = Repository::init(
        storage.clone(),
        &options(Encryption::Xchacha20Poly1305, Compression::Zstd(3)),
        Some(PASSPHRASE),
    )
    .expect("init");
    let source = tempfile::tempdir().expect("tempdir");
    let name = "base/1/16384";
    let file = source.path().join(name);
    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    let original = payload(5, 256 * 1024);
    std::fs::write(&file, &original).expect("write");
    let first_time = chrono::Utc::now();
    let first = archive(&repo, source.path(), &ArchiveOptions::default());
    let first_id = save_tree_snapshot(&repo, &first, first_time);

    // Chunks are 16 KiB: two get a few changed bytes, one is rewritten.
    let mut changed = original.clone();
    changed[2 * 16384 + 100..2 * 16384 + 160].fill(0xAB);
    changed[9 * 16384 + 8000] ^= 0xFF;
    changed[12 * 16384..13 * 16384].copy_from_slice(&payload(77, 16384));
    std::fs::write(&file, &changed).expect("rewrite");
    let changed_options = |parent: &repo::archive::Archived, time| ArchiveOptions {
        parent: Some((parent.tree, time)),
        read_all: true,
        ..ArchiveOptions::default()
    };
    let second = archive(&repo, source.path(), &changed_options(&first, first_time));
    let stats = second.summary.save;
    assert_eq!(stats.blobs_delta, 2, "{stats:?}");
    let second_content = Tree::load(&repo, &second.tree)
        .and_then(|t| {
            let base = t.find("base").and_then(|n| n.subtree).expect("base dir");
            Tree::load(&repo, &base)
        })
        .and_then(|t| Tree::load(&repo, &t.find("1").and_then(|n| n.subtree).expect("dir 1")))
        .expect("trees")
        .find("16384")
        .expect("file node")
        .content
        .clone();
    repo.load_index().expect("index");
    for chunk in [2, 9] {
        let location = repo.index().get(&second_content[chunk]).expect("indexed");
        assert!(location.base.is_some(), "chunk {chunk} is not a delta");
        assert!(location.length < 300, "chunk {chunk}: {location:?}");
    }
    assert!(repo
        .index()
        .get(&second_content[12])
        .expect("indexed")
        .base
        .is_none());
    // The bases sit between their unchanged neighbours in the first backup's packs, so
    // reading the file costs a ranged read per pack, not one per delta and base.
    let packs: std::collections::HashSet<Id> = second_content
        .iter()
        .flat_map(|id| {
            let location = repo.index().get(id).expect("indexed");
            let base = location
                .base
                .map(|b| repo.index().get(&b).expect("base").pack);
            std::iter::once(location.pack).chain(base)
        })
        .collect();
    let reads_before = counting
        .ranged_reads
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(read_back(&repo, &second_content).expect("read"), changed);
    let reads = counting
        .ranged_reads
        .load(std::sync::atomic::Ordering::Relaxed)
        - reads_before;
    assert_eq!(
        reads,
        packs.len(),
        "{reads} reads for {} packs",
        packs.len()
    );
    let second_time = chrono::Utc::now();
    save_tree_snapshot(&repo, &second, second_time);
    assert_eq!(restored_file(&repo, &second.tree, name), changed);
    assert_eq!(restored_file(&repo, &first.tree, name), original);

    // Copied oldest first into a repository with another key, the deltas stay deltas.
    let target = Repository::init(
        Arc::new(LocalStorage::new(dir.path().join("copy"))),
        &options(Encryption::Aes256Gcm, Compression::Zstd(3)),
        Some("other passphrase"),
    )
    .expect("init copy");
    let mut snapshots = Snapshot::load_all(&repo).expect("snapshots");
    snapshots.sort_by_key(|(_, snapshot)| snapshot.time);
    let copier = repo::copy::SnapshotCopier::new(&repo, &target, 2).expect("copier");
    let copied: Vec<Id> = snapshots
        .iter()
        .map(|(id, _)| copier.copy(id, None).expect("copy"))
        .collect();
    assert_eq!(copier.stats().blobs_delta, 2, "{:?}", copier.stats());
    let copy = Snapshot::load(&target, &copied[1]).expect("copied snapshot");
    assert_eq!(restored_file(&target, &copy.tree, name), changed);

    // A third version changes the first delta's chunk again: its delta is against the
    // same whole chunk, never against the delta.
    let mut third_data = changed.clone();
    third_data[2 * 16384 + 5000] ^= 0x01;
    std::fs::write(&file, &third_data).expect("rewrite");
    let third = archive(&repo, source.path(), &changed_options(&second, second_time));
    assert_eq!(
        third.summary.save.blobs_delta, 1,
        "{:?}",
        third.summary.save
    );
    save_tree_snapshot(&repo, &third, chrono::Utc::now());

    // Forget the first snapshot: the bases of the deltas must survive gc.
    storage
        .delete(&format!("snapshots/{first_id}"))
        .expect("forget");
    let plan = repo::gc::plan(&repo).expect("plan");
    repo::gc::execute(&repo, plan, 2).expect("gc");
    let repo = Repository::open(storage.clone(), Some(PASSPHRASE)).expect("reopen");
    assert_eq!(restored_file(&repo, &second.tree, name), changed);
    assert_eq!(restored_file(&repo, &third.tree, name), third_data);
    let report = verify(
        &repo,
        &VerifyOptions {
            read_data: true,
            ..VerifyOptions::default()
        },
    )
    .expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
    assert!(
        report.snapshots == 2 && report.blobs_checked > 0,
        "{report:?}"
    );

    // Version 1 repositories keep their format: no deltas.
    let config = dir.path().join("repo/config");
    let text = std::fs::read_to_string(&config).expect("config");
    let old_version = text.replacen("\"version\": 2", "\"version\": 1", 1);
    assert_ne!(text, old_version, "config has no version 2 to rewrite");
    std::fs::write(&config, old_version).expect("write config");
    let repo = Repository::open(storage.clone(), Some(PASSPHRASE)).expect("open version 1");
    assert!(!repo.stores_deltas());
    third_data[9 * 16384 + 1] ^= 0x01;
    std::fs::write(&file, &third_data).expect("rewrite");
    let fourth = archive(
        &repo,
        source.path(),
        &changed_options(&third, chrono::Utc::now()),
    );
    assert_eq!(fourth.summary.save.blobs_delta, 0);
    assert!(fourth.summary.save.blobs_new > 0);
    assert_eq!(restored_file(&repo, &fourth.tree, name), third_data);

    // A damaged base makes its deltas unreadable, never wrong.
    let base = repo
        .index()
        .get(&second_content[2])
        .and_then(|l| l.base)
        .expect("delta base");
    let base_pack = repo::repository::pack_key(&repo.index().get(&base).expect("base").pack);
    let mut bytes = storage.get(&base_pack).expect("get");
    let at = repo.index().get(&base).expect("base").offset as usize + 40;
    bytes[at] ^= 0x10;
    overwrite(&storage, &base_pack, &bytes);
    assert!(read_back(&repo, &second_content[2..3]).is_err());
}

/// `Include::DirectoryOnly` given to a symlink stores an empty directory in its place
/// (with the linked directory's mode), not the link nor what it points to.
#[test]
fn a_directory_only_symlink_is_stored_as_an_empty_directory() {
    use std::os::unix::fs::PermissionsExt;
    let (repo, _storage, dir) = local_repo(Encryption::Xchacha20Poly1305, Compression::Zstd(3));
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    std::fs::write(elsewhere.join("segment"), payload(41, 3000)).expect("write");
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let source = dir.path().join("source");
    std::fs::create_dir(&source).expect("mkdir");
    std::os::unix::fs::symlink(&elsewhere, source.join("wal")).expect("symlink");
    std::os::unix::fs::symlink(dir.path().join("gone"), source.join("dangling")).expect("symlink");
    std::os::unix::fs::symlink(&elsewhere, source.join("kept")).expect("symlink");
    let filter: repo::archive::Filter =
        Arc::new(
            |relative: &Path, _: &std::fs::Metadata| match relative.to_str() {
                Some("wal" | "dangling") => Include::DirectoryOnly,
                _ => Include::Yes,
            },
        );
    let archived = archive(
        &repo,
        &source,
        &ArchiveOptions {
            filter: Some(filter),
            ..ArchiveOptions::default()
        },
    );
    let target = dir.path().join("target");
    restore_whole(&repo, &archived.tree, &target).expect("restore");
    for (name, mode) in [("wal", 0o750), ("dangling", 0o700)] {
        let meta = std::fs::symlink_metadata(target.join(name)).expect("stat");
        assert!(meta.is_dir(), "{name} is not a directory: {meta:?}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{name}");
        assert_eq!(
            std::fs::read_dir(target.join(name)).expect("list").count(),
            0
        );
    }
    // Links without it stay links.
    assert_eq!(
        std::fs::read_link(target.join("kept")).expect("link"),
        elsewhere
    );
}

/// An owner map gives restored entries the local ids in place of the recorded ones, in a
/// restore and in a delta restore over a copy with the recorded ids; other owners are
/// kept. Needs root (to give files away), as restores that keep owners do.
#[test]
fn owner_maps_give_restored_entries_the_local_ids() {
    use repo::restore::OwnerMap;
    use std::os::unix::fs::{lchown, MetadataExt};
    let (repo, _storage, dir) = local_repo(Encryption::Xchacha20Poly1305, Compression::Zstd(3));
    let source = dir.path().join("source");
    std::fs::create_dir_all(source.join("sub")).expect("mkdir");
    std::fs::write(source.join("sub/file"), payload(44, 40_000)).expect("write");
    std::fs::write(source.join("root-owned"), b"kept").expect("write");
    std::os::unix::fs::symlink("sub/file", source.join("link")).expect("symlink");
    for name in ["", "sub", "sub/file", "link"] {
        lchown(source.join(name), Some(4242), Some(4343)).expect("chown (tests run as root)");
    }
    lchown(source.join("root-owned"), Some(0), Some(0)).expect("chown");
    let archived = archive(&repo, &source, &ArchiveOptions::default());
    let owners = OwnerMap {
        uid: Some((4242, 4444)),
        gid: Some((4343, 4545)),
    };
    let owned = |target: &Path| -> Vec<(&str, u32, u32)> {
        ["sub", "sub/file", "link", "root-owned"]
            .into_iter()
            .map(|name| {
                let meta = std::fs::symlink_metadata(target.join(name)).expect("stat");
                (name, meta.uid(), meta.gid())
            })
            .collect()
    };
    let mapped = vec![
        ("sub", 4444, 4545),
        ("sub/file", 4444, 4545),
        ("link", 4444, 4545),
        ("root-owned", 0, 0),
    ];
    let target = dir.path().join("target");
    let options = RestoreOptions {
        owners,
        ..RestoreOptions::new(2, SyncMethod::Fsync)
    };
    restore_tree(&repo, &archived.tree, &target, options).expect("restore");
    assert_eq!(owned(&target), mapped);

    // A copy with the recorded ids (the link is replaced: a delta restore keeps a link
    // that already points where it should, owner and all).
    let copy = dir.path().join("copy");
    restore_whole(&repo, &archived.tree, &copy).expect("restore");
    assert_eq!(owned(&copy)[0], ("sub", 4242, 4343));
    std::fs::remove_file(copy.join("link")).expect("rm");
    restore_tree_delta(&repo, &archived.tree, &copy, DeltaCheck::Content, options).expect("delta");
    assert_eq!(owned(&copy), mapped);
}

/// A file name or a symlink target that is not UTF-8 fails the archive with an error
/// naming it, rather than storing a lossy name that would restore as another path.
#[test]
fn names_and_link_targets_that_are_not_utf8_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    let (repo, _storage, dir) = local_repo(Encryption::Xchacha20Poly1305, Compression::Zstd(3));
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9");
    for (case, make) in [
        (
            "file name",
            Box::new(|source: &Path| std::fs::write(source.join(latin1), b"x"))
                as Box<dyn Fn(&Path) -> std::io::Result<()>>,
        ),
        (
            "symlink target",
            Box::new(|source: &Path| {
                std::os::unix::fs::symlink(Path::new("/tmp").join(latin1), source.join("link"))
            }),
        ),
    ] {
        let source = dir.path().join(case.replace(' ', "-"));
        std::fs::create_dir(&source).expect("mkdir");
        std::fs::write(source.join("kept"), payload(43, 100)).expect("write");
        make(&source).expect("make");
        let Err(error) = archive_tree(&BlobSaver::new(&repo), &source, &ArchiveOptions::default())
        else {
            panic!("{case}: a name that is not UTF-8 was archived");
        };
        let message = error.to_string();
        assert!(
            message.contains(case) && message.contains("caf\\xE9\" is not UTF-8"),
            "{case}: {message}"
        );
    }
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// A directory left alone is created, but a restore writes nothing into it and a delta
/// restore neither writes nor removes what is in it; the rest is restored as usual.
#[test]
fn a_directory_left_alone_keeps_what_another_restore_put_there() {
    let (repo, _storage, dir) = local_repo(Encryption::Xchacha20Poly1305, Compression::Zstd(3));
    let source = dir.path().join("source");
    std::fs::create_dir_all(source.join("inside/deeper")).expect("mkdir");
    std::fs::write(source.join("inside/deeper/file"), payload(51, 9000)).expect("write");
    std::fs::write(source.join("other"), payload(52, 9000)).expect("write");
    let archived = archive(&repo, &source, &ArchiveOptions::default());
    let left_alone = [std::path::PathBuf::from("inside")];
    let options = RestoreOptions {
        left_alone: &left_alone,
        ..RestoreOptions::new(2, SyncMethod::Fsync)
    };
    let target = dir.path().join("target");
    restore_tree(&repo, &archived.tree, &target, options).expect("restore");
    assert!(target.join("inside").is_dir());
    assert_eq!(names(&target.join("inside")), Vec::<String>::new());
    assert_eq!(
        std::fs::read(target.join("other")).expect("read"),
        payload(52, 9000)
    );

    std::fs::write(target.join("inside/put-by-another"), b"kept").expect("write");
    std::fs::write(target.join("extra"), b"removed").expect("write");
    std::fs::write(target.join("other"), b"rewritten").expect("write");
    restore_tree_delta(&repo, &archived.tree, &target, DeltaCheck::Content, options)
        .expect("delta");
    assert_eq!(names(&target.join("inside")), ["put-by-another"]);
    assert!(!target.join("extra").exists());
    assert_eq!(
        std::fs::read(target.join("other")).expect("read"),
        payload(52, 9000)
    );

    // Without it, the same delta restore makes the directory what the backup has.
    restore_tree_delta(
        &repo,
        &archived.tree,
        &target,
        DeltaCheck::Content,
        RestoreOptions::new(2, SyncMethod::Fsync),
    )
    .expect("delta");
    assert_eq!(names(&target.join("inside")), ["deeper"]);
}

/// A held-back file is neither written nor touched by a restore or a delta restore, and
/// `restore_file_last` puts it in place (over what is there) with its metadata.
#[test]
fn a_held_back_file_is_written_last() {
    let (repo, _storage, dir) = local_repo(Encryption::Xchacha20Poly1305, Compression::Zstd(3));
    let source = dir.path().join("source");
    std::fs::create_dir_all(source.join("global")).expect("mkdir");
    let last = payload(31, 8192);
    std::fs::write(source.join("global").join("last"), &last).expect("write");
    std::fs::write(source.join("other"), payload(32, 20000)).expect("write");
    let archived = archive(&repo, &source, &ArchiveOptions::default());
    let held = Path::new("global/last");
    let options = RestoreOptions {
        held_back: Some(held),
        ..RestoreOptions::new(2, SyncMethod::Fsync)
    };
    let node = repo::snapshot::find_path(&repo, &archived.tree, held)
        .expect("find")
        .expect("a node");

    for sync in [SyncMethod::Fsync, SyncMethod::Syncfs] {
        let target = dir.path().join(format!("target-{sync:?}"));
        restore_tree(
            &repo,
            &archived.tree,
            &target,
            RestoreOptions { sync, ..options },
        )
        .expect("restore");
        assert!(target.join("other").is_file() && !target.join(held).exists());
        restore_file_last(&repo, &node, &target.join(held), sync).expect("last");
        assert!(std::fs::read(target.join(held)).expect("read") == last);
        let names: Vec<_> = std::fs::read_dir(target.join("global"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["last"], "nothing temporary is left");
        let (restored, original) = (
            std::fs::metadata(target.join(held)).expect("stat"),
            std::fs::metadata(source.join(held)).expect("stat"),
        );
        assert_eq!(restored.modified().ok(), original.modified().ok());
    }

    // A delta restore leaves a different copy of it alone, and repairs the rest.
    let target = dir.path().join("target-Fsync");
    std::fs::write(target.join(held), b"stale").expect("write");
    std::fs::write(target.join("other"), b"changed").expect("write");
    restore_tree_delta(&repo, &archived.tree, &target, DeltaCheck::Content, options)
        .expect("delta");
    assert_eq!(std::fs::read(target.join(held)).expect("read"), b"stale");
    assert!(std::fs::read(target.join("other")).expect("read") == payload(32, 20000));
    restore_file_last(&repo, &node, &target.join(held), SyncMethod::Fsync).expect("last");
    assert!(std::fs::read(target.join(held)).expect("read") == last);
}

/// A delta restore rewrites only the chunks that differ, in place; a file with another
/// hard link, or of another size, is replaced whole (the other name keeps its bytes).
#[test]
fn delta_restore_patches_only_differing_chunks() {
    let (repo, _storage, dir) = local_repo(Encryption::Xchacha20Poly1305, Compression::Zstd(3));
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).expect("mkdir");
    let large = payload(21, 64 * 16384 + 100);
    let small = payload(22, 5000);
    std::fs::write(source.join("large"), &large).expect("write");
    std::fs::write(source.join("small"), &small).expect("write");
    let archived = archive(&repo, &source, &ArchiveOptions::default());
    let target = dir.path().join("target");
    restore_whole(&repo, &archived.tree, &target).expect("restore");

    let flip = |name: &str, offsets: &[usize]| {
        let mut bytes = std::fs::read(target.join(name)).expect("read");
        for offset in offsets {
            bytes[*offset] ^= 0x01;
        }
        // In place, so that a hard link sees the change too.
        std::fs::OpenOptions::new()
            .write(true)
            .open(target.join(name))
            .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
            .expect("write in place");
    };
    let delta = |sync| {
        restore_tree_delta(
            &repo,
            &archived.tree,
            &target,
            DeltaCheck::Content,
            RestoreOptions::new(2, sync),
        )
        .expect("delta")
    };
    // A patched or replaced file gets the source's mtime back (writing changed it).
    let same_mtime = |name: &str| {
        let mtime = |dir: &std::path::Path| {
            std::fs::metadata(dir.join(name))
                .and_then(|meta| meta.modified())
                .expect("mtime")
        };
        assert_eq!(mtime(&target), mtime(&source), "{name}");
    };
    flip("large", &[5 * 16384 + 7, 40 * 16384, 64 * 16384 + 99]);
    // syncfs instead of per-file fsyncs changes nothing restored.
    let stats = delta(SyncMethod::Syncfs);
    assert_eq!(
        (stats.files_kept, stats.files_written, stats.bytes_written),
        (1, 1, 2 * 16384 + 100),
        "{stats:?}"
    );
    assert!(std::fs::read(target.join("large")).expect("read") == large);
    same_mtime("large");

    let other_name = dir.path().join("other-name");
    std::fs::hard_link(target.join("large"), &other_name).expect("link");
    flip("large", &[7 * 16384]);
    let stats = delta(SyncMethod::Fsync);
    assert_eq!(stats.bytes_written, large.len() as u64, "{stats:?}");
    assert!(std::fs::read(target.join("large")).expect("read") == large);
    assert!(std::fs::read(&other_name).expect("read") != large);

    std::fs::write(target.join("small"), &small[..4000]).expect("shorten");
    let stats = delta(SyncMethod::Syncfs);
    assert_eq!(
        (stats.files_written, stats.bytes_written),
        (1, 5000),
        "{stats:?}"
    );
    assert_eq!(std::fs::read(target.join("small")).expect("read"), small);
    same_mtime("small");
    let stats = delta(SyncMethod::Fsync);
    assert_eq!((stats.files_kept, stats.files_written), (2, 0), "{stats:?}");

    // A kept file gets its mode and mtime back; one whose metadata is right already is
    // not touched at all (its inode change time stays).
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = |name: &str| std::fs::metadata(target.join(name)).expect("stat");
    let (small_mode, small_mtime) = (
        meta("small").mode(),
        meta("small").modified().expect("mtime"),
    );
    std::fs::set_permissions(target.join("small"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    std::fs::File::options()
        .write(true)
        .open(target.join("small"))
        .and_then(|f| f.set_modified(std::time::SystemTime::UNIX_EPOCH))
        .expect("touch");
    let large_ctime = (meta("large").ctime(), meta("large").ctime_nsec());
    std::thread::sleep(std::time::Duration::from_millis(20));
    let stats = delta(SyncMethod::Fsync);
    assert_eq!((stats.files_kept, stats.files_written), (2, 0), "{stats:?}");
    assert_eq!(meta("small").mode(), small_mode);
    assert_eq!(meta("small").modified().expect("mtime"), small_mtime);
    assert_eq!(
        (meta("large").ctime(), meta("large").ctime_nsec()),
        large_ctime,
        "a delta restore rewrote the metadata of a file that already had it"
    );
}

/// Files under `RestoreOptions::holes` come back as holes: their size, mode and mtime,
/// zeros for content and no disk blocks. A delta restore turns whatever is there into such
/// a hole, and one without holes brings the content back.
#[test]
fn files_under_hole_directories_are_restored_as_holes() {
    use std::os::unix::fs::MetadataExt;
    let (repo, _storage, dir) = local_repo(Encryption::Xchacha20Poly1305, Compression::Zstd(3));
    let source = dir.path().join("source");
    std::fs::create_dir_all(source.join("skip/sub")).expect("mkdir");
    std::fs::create_dir_all(source.join("keep")).expect("mkdir");
    let kept = payload(41, 300_000);
    let skipped = payload(42, 1 << 20 | 100);
    std::fs::write(source.join("keep/a"), &kept).expect("write");
    std::fs::write(source.join("skip/b"), &skipped).expect("write");
    std::fs::write(source.join("skip/sub/c"), payload(43, 5000)).expect("write");
    std::fs::write(source.join("skipped-not"), payload(44, 5000)).expect("write");
    let archived = archive(&repo, &source, &ArchiveOptions::default());
    let holes = [std::path::PathBuf::from("skip")];
    let options = RestoreOptions {
        holes: &holes,
        ..RestoreOptions::new(2, SyncMethod::Fsync)
    };
    let target = dir.path().join("target");
    let is_hole_of = |name: &str| {
        let (restored, original) = (
            std::fs::metadata(target.join(name)).expect("stat"),
            std::fs::metadata(source.join(name)).expect("stat"),
        );
        let bytes = std::fs::read(target.join(name)).expect("read");
        assert_eq!(bytes.len() as u64, original.len(), "{name}");
        assert!(bytes.iter().all(|b| *b == 0), "{name} is not all zeros");
        assert_eq!(restored.blocks(), 0, "{name} takes disk space");
        assert_eq!(restored.modified().ok(), original.modified().ok(), "{name}");
        assert_eq!(restored.mode(), original.mode(), "{name}");
    };
    let stats = restore_tree(&repo, &archived.tree, &target, options).expect("restore");
    assert_eq!((stats.files, stats.holes), (4, 2), "{stats:?}");
    is_hole_of("skip/b");
    is_hole_of("skip/sub/c");
    assert!(std::fs::read(target.join("keep/a")).expect("read") == kept);
    assert_eq!(
        std::fs::read(target.join("skipped-not")).expect("read"),
        payload(44, 5000)
    );

    std::fs::write(target.join("skip/b"), &skipped).expect("write");
    std::fs::write(target.join("keep/a"), payload(45, 300_000)).expect("write");
    let stats = restore_tree_delta(&repo, &archived.tree, &target, DeltaCheck::Content, options)
        .expect("delta");
    assert_eq!(
        (stats.files_kept, stats.files_written, stats.holes),
        (1, 1, 2),
        "{stats:?}"
    );
    is_hole_of("skip/b");
    is_hole_of("skip/sub/c");
    assert!(std::fs::read(target.join("keep/a")).expect("read") == kept);

    let stats = restore_tree_delta(
        &repo,
        &archived.tree,
        &target,
        DeltaCheck::Content,
        RestoreOptions::new(2, SyncMethod::Fsync),
    )
    .expect("delta");
    assert_eq!((stats.files_written, stats.holes), (2, 0), "{stats:?}");
    assert!(std::fs::read(target.join("skip/b")).expect("read") == skipped);
}

/// `DeltaCheck::SizeAndTime` leaves files of the snapshot's size and mtime unread (even
/// one changed with its mtime put back, which `Content` finds), hashes the others, and
/// trusts no file whose mtime is within a second of the snapshot's start.
#[test]
fn delta_restore_by_size_and_time_reads_only_changed_looking_files() {
    let (repo, _storage, dir) = local_repo(Encryption::Xchacha20Poly1305, Compression::Zstd(3));
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).expect("mkdir");
    let originals: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| (format!("f{i}"), payload(30 + i, 3 * 16384 + 5)))
        .collect();
    for (name, bytes) in &originals {
        std::fs::write(source.join(name), bytes).expect("write");
    }
    let archived = archive(&repo, &source, &ArchiveOptions::default());
    let target = dir.path().join("target");
    restore_whole(&repo, &archived.tree, &target).expect("restore");
    // Changed with the same size, the mtime put back (f0) or not (f1).
    let change = |name: &str, keep_mtime: bool| {
        let path = target.join(name);
        let mtime = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime");
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[16384] ^= 0x01;
        std::fs::write(&path, &bytes).expect("write");
        if keep_mtime {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(mtime))
                .expect("set mtime");
        }
    };
    change("f0", true);
    change("f1", false);
    let delta_by_time = |snapshot_time| {
        restore_tree_delta(
            &repo,
            &archived.tree,
            &target,
            DeltaCheck::SizeAndTime(snapshot_time),
            RestoreOptions::new(2, SyncMethod::Fsync),
        )
        .expect("delta by time")
    };
    let stats = delta_by_time(chrono::Utc::now() + chrono::Duration::seconds(60));
    assert_eq!((stats.files_kept, stats.files_written), (2, 1), "{stats:?}");
    let content = |name: &str| std::fs::read(target.join(name)).expect("read");
    assert!(
        content("f0") != originals[0].1,
        "f0 looked unchanged and was not read"
    );
    assert!(content("f1") == originals[1].1);

    // Within a second of the snapshot's start, size and time prove nothing.
    let stats = delta_by_time(chrono::Utc::now());
    assert_eq!((stats.files_kept, stats.files_written), (2, 1), "{stats:?}");
    assert!(content("f0") == originals[0].1);
    for (name, bytes) in &originals {
        assert!(content(name) == *bytes, "{name}");
    }
}

/// A directory of many entries: its tree is hashed and compressed as it is written (past
/// 1 MiB of JSON) and read back node by node as the next snapshot's parent. The blob is
/// the one the whole tree's encoding gives, names with JSON's special characters survive,
/// unchanged files are reused without being read, a changed one is stored, and the
/// second snapshot restores exactly.
#[test]
fn large_directories_stream_their_trees() {
    // zstd streams; lz4 keeps the plaintext as it comes (gzip's stream: compression.rs).
    for compression in [Compression::Zstd(3), Compression::Lz4] {
        let (repo, _storage, _dir) = local_repo(Encryption::Xchacha20Poly1305, compression);
        let source = tempfile::tempdir().expect("tempdir");
        let many = source.path().join("base/1");
        std::fs::create_dir_all(&many).expect("mkdir");
        for i in 0..12_000u32 {
            let content = if i % 1000 == 7 {
                payload(u64::from(i), 3000)
            } else {
                Vec::new()
            };
            std::fs::write(many.join(format!("{}", 100_000 + i)), content).expect("write");
        }
        for name in [
            "a\"quote",
            "back\\slash",
            "{brace}",
            "[bracket]",
            "comma,colon:",
        ] {
            std::fs::write(many.join(name), name).expect("write");
        }
        std::fs::create_dir(source.path().join("empty")).expect("mkdir");
        // Files modified within a second of a snapshot's start are read again.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let first_time = chrono::Utc::now();
        let first = archive(&repo, source.path(), &ArchiveOptions::default());
        let subtree = |tree: &Id, name: &str| {
            let tree = Tree::load(&repo, tree).expect("tree");
            tree.find(name).and_then(|n| n.subtree).expect("subtree")
        };
        let big_id = subtree(&subtree(&first.tree, "base"), "1");
        let big = Tree::load(&repo, &big_id).expect("large tree");
        assert_eq!(big.nodes.len(), 12_005, "{compression}");
        let encoded = serde_json::to_vec(&big).expect("encode");
        assert!(encoded.len() > 1 << 20, "{} bytes", encoded.len());
        assert_eq!(repo.crypto().blob_id(&encoded), big_id, "{compression}");
        // Small trees (held whole) are the same encoding.
        let base_id = subtree(&first.tree, "base");
        let base = serde_json::to_vec(&Tree::load(&repo, &base_id).expect("tree")).expect("json");
        assert_eq!(repo.crypto().blob_id(&base), base_id);
        let empty = repo.crypto().blob_id(br#"{"nodes":[]}"#);
        assert_eq!(subtree(&first.tree, "empty"), empty);

        std::fs::write(many.join("100005"), "changed").expect("write");
        let second = archive(
            &repo,
            source.path(),
            &ArchiveOptions {
                parent: Some((first.tree, first_time)),
                ..ArchiveOptions::default()
            },
        );
        assert_eq!(
            second.summary.bytes_unchanged, first.summary.bytes,
            "{compression}: every file but the changed one reused"
        );
        let target = tempfile::tempdir().expect("tempdir");
        let restored = target.path().join("restored");
        restore_whole(&repo, &second.tree, &restored).expect("restore_tree");
        let mut compared = 0;
        for entry in std::fs::read_dir(&many).expect("read_dir") {
            let name = entry.expect("entry").file_name();
            let want = std::fs::read(many.join(&name)).expect("read");
            let got = std::fs::read(restored.join("base/1").join(&name)).expect("read restored");
            assert!(want == got, "{compression}: {name:?} differs");
            compared += 1;
        }
        assert_eq!(compared, 12_005);
    }
}

/// Packs are uploaded by threads of their own: when storage refuses one, the archive
/// fails with storage's own error (not the worker it stopped), and nothing it stored is
/// indexed as if durable.
#[test]
fn a_refused_pack_upload_fails_the_archive_with_its_own_error() {
    let (repo, _storage, dir) = local_repo(Encryption::None, Compression::Zstd(1));
    let data_dir = dir.path().join("repo").join("data");
    std::fs::remove_dir_all(&data_dir).ok();
    std::fs::write(&data_dir, b"not a directory").expect("block data/");
    let options = ArchiveOptions {
        jobs: 2,
        ..ArchiveOptions::default()
    };
    // 4 MiB of varied data: several 256 KiB packs, so several uploads are refused.
    let input = payload(7, 4 << 20);
    let err = archive_stream(&BlobSaver::new(&repo), &input[..], "stream", &options)
        .expect_err("storing into a blocked data/ must fail");
    let message = err.to_string();
    assert!(
        message.contains("data/") && !message.contains("pack upload failed"),
        "{message}"
    );
    let indexed = std::fs::read_dir(dir.path().join("repo").join("index"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(indexed, 0, "an index names packs that were never stored");
}

/// A file larger than a piece (8 MiB) is read in pieces by several workers at once: its
/// content list keeps the file's order, and after a few bytes changed in each piece, each
/// changed chunk is stored as a delta against the chunk at its own place in the parent.
#[test]
fn a_file_read_in_pieces_keeps_its_order_and_its_deltas() {
    let (repo, _storage, _dir) = local_repo(Encryption::Xchacha20Poly1305, Compression::Zstd(1));
    let source = tempfile::tempdir().expect("tempdir");
    let path = source.path().join("big");
    // Chunks are 16 KiB, so 512 to a piece: three pieces, the last chunk short.
    let original = payload(11, (20 << 20) + 5000);
    std::fs::write(&path, &original).expect("write");
    let options = ArchiveOptions {
        jobs: 3,
        ..ArchiveOptions::default()
    };
    let first_time = chrono::Utc::now();
    let first = archive(&repo, source.path(), &options);
    let content_of = |archived: &repo::archive::Archived| {
        Tree::load(&repo, &archived.tree)
            .expect("tree")
            .find("big")
            .expect("big")
            .content
            .clone()
    };
    let first_content = content_of(&first);
    let in_order: Vec<Id> = original
        .chunks(16 << 10)
        .map(|chunk| repo.crypto().blob_id(chunk))
        .collect();
    assert_eq!(first_content, in_order);
    assert_eq!(restored_file(&repo, &first.tree, "big"), original);

    let touched = [3, 600, 1100];
    let mut changed = original.clone();
    for chunk in touched {
        changed[chunk * (16 << 10) + 10] ^= 0xFF;
    }
    std::fs::write(&path, &changed).expect("rewrite");
    let second = archive(
        &repo,
        source.path(),
        &ArchiveOptions {
            parent: Some((first.tree, first_time)),
            read_all: true,
            ..options
        },
    );
    assert_eq!(second.summary.save.blobs_delta, 3, "{:?}", second.summary);
    repo.load_index().expect("index");
    for (position, id) in content_of(&second).iter().enumerate() {
        let base = repo.index().get(id).expect("indexed").base;
        let expected = touched
            .contains(&position)
            .then_some(first_content[position]);
        assert_eq!(base, expected, "chunk {position}");
    }
    assert_eq!(restored_file(&repo, &second.tree, "big"), changed);
}

/// Files dropped or truncated while a backup runs are normal (DROP TABLE, TRUNCATE,
/// VACUUM): one removed after the directory was listed is left out, one truncated while
/// it is read is stored as far as it then goes, and the archive completes (WAL replay
/// brings both back to what they should be). "shrinks" is read in three pieces by two
/// workers, and cut while its first piece is read, after its second was read whole: the
/// second does not count, the file ends where the first piece came back short.
#[test]
fn files_removed_or_truncated_during_the_archive_are_normal() {
    let (repo, _storage, _dir) = local_repo(Encryption::None, Compression::Zstd(1));
    let source = tempfile::tempdir().expect("tempdir");
    let root = source.path().to_path_buf();
    // Chunks are 16 KiB, pieces 8 MiB.
    for (name, len) in [
        ("a", 32 << 10),
        ("dropped", 16 << 10),
        ("shrinks", 20 << 20),
    ] {
        std::fs::write(root.join(name), payload(len as u64, len)).expect("write");
    }
    let original = std::fs::read(root.join("shrinks")).expect("read");
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = |events: &std::sync::Mutex<Vec<&'static str>>,
                  event: std::io::Result<&'static str>| {
        events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event.expect("change the source"));
    };
    // The filter sees an entry after it was listed and before it is opened.
    let filter: repo::archive::Filter = {
        let root = root.clone();
        let events = events.clone();
        Arc::new(move |path, _meta| {
            if path == std::path::Path::new("dropped") {
                record(
                    &events,
                    std::fs::remove_file(root.join(path)).map(|()| "dropped"),
                );
            }
            repo::archive::Include::Yes
        })
    };
    let second_piece_read = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inspector: repo::archive::Inspector = {
        let root = root.clone();
        let events = events.clone();
        let second_piece_read = second_piece_read.clone();
        Arc::new(move |path, offset, _data| {
            if path != std::path::Path::new("shrinks") {
                return;
            }
            if offset == (16 << 20) - (16 << 10) {
                second_piece_read.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if offset == 0 {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while !second_piece_read.load(std::sync::atomic::Ordering::SeqCst)
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                if second_piece_read.load(std::sync::atomic::Ordering::SeqCst) {
                    record(&events, Ok("second piece read"));
                }
                let truncated = std::fs::OpenOptions::new()
                    .write(true)
                    .open(root.join("shrinks"))
                    .and_then(|file| file.set_len(20 << 10))
                    .map(|()| "truncated");
                record(&events, truncated);
            }
        })
    };
    let options = ArchiveOptions {
        filter: Some(filter),
        inspector: Some(inspector),
        ..ArchiveOptions::default()
    };
    let archived = archive(&repo, &root, &options);
    let mut events = events.lock().unwrap_or_else(|e| e.into_inner()).clone();
    events.sort();
    assert_eq!(events, ["dropped", "second piece read", "truncated"]);
    let tree = Tree::load(&repo, &archived.tree).expect("tree");
    let names: Vec<&str> = tree.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a", "shrinks"]);
    let shrinks = tree.find("shrinks").expect("shrinks");
    assert_eq!(shrinks.size, 20 << 10);
    assert_eq!(
        restored_file(&repo, &archived.tree, "shrinks"),
        original[..20 << 10]
    );
}
