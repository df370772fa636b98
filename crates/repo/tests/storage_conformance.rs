//! One conformance suite for every `Storage` backend.
//!
//! The `conformance_*` functions state the contract of `repo::storage::Storage`; the
//! `backend_tests!` macro runs each of them against `LocalStorage` (in a temporary directory),
//! `S3Storage` (against a moto server this binary starts, one prefix per test) and
//! `AzblobStorage` (against Azurite). Without those servers the tests print a skip reason,
//! except under `CI=true` where they fail.

use bytes::Bytes;
use repo::storage::{
    parse_sftp_url, retry, AzblobConfig, AzblobStorage, GcsConfig, GcsStorage, LocalStorage,
    PutOutcome, RetryPolicy, RetryingStorage, S3Config, S3Storage, SftpConfig, SftpStorage,
    Storage, StorageError,
};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------------

/// Deterministic, non-repeating-looking bytes.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn expect_ok<T>(what: &str, r: Result<T, StorageError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

fn conformance_put_if_absent(s: &dyn Storage) {
    let key = "objects/first";
    let original = payload(1, 1000);
    assert_eq!(
        expect_ok(
            "first put",
            s.put_if_absent(key, Bytes::copy_from_slice(&original))
        ),
        PutOutcome::Created
    );
    let other = payload(2, 1234);
    assert_eq!(
        expect_ok(
            "second put",
            s.put_if_absent(key, Bytes::copy_from_slice(&other))
        ),
        PutOutcome::AlreadyExists
    );
    assert_eq!(
        expect_ok("get", s.get(key)),
        original,
        "second put changed the object"
    );
    assert_eq!(expect_ok("size", s.size(key)), Some(1000));

    // Empty objects are objects too.
    assert_eq!(
        expect_ok(
            "empty put",
            s.put_if_absent("objects/empty", Bytes::from_static(b""))
        ),
        PutOutcome::Created
    );
    assert_eq!(
        expect_ok("empty get", s.get("objects/empty")),
        Vec::<u8>::new()
    );
    assert_eq!(expect_ok("empty size", s.size("objects/empty")), Some(0));
    assert_eq!(
        expect_ok(
            "empty put again",
            s.put_if_absent("objects/empty", Bytes::from_static(b"x"))
        ),
        PutOutcome::AlreadyExists
    );
}

fn conformance_get_and_range(s: &dyn Storage) {
    let key = "ranges/obj";
    let data = payload(3, 1000);
    expect_ok("put", s.put_if_absent(key, Bytes::copy_from_slice(&data)));
    assert_eq!(expect_ok("get", s.get(key)), data);
    assert_eq!(
        expect_ok("range head", s.get_range(key, 0, 10)),
        &data[..10]
    );
    assert_eq!(
        expect_ok("range mid", s.get_range(key, 123, 456)),
        &data[123..579]
    );
    assert_eq!(
        expect_ok("range tail", s.get_range(key, 990, 10)),
        &data[990..]
    );
    assert_eq!(expect_ok("range all", s.get_range(key, 0, 1000)), data);
    assert_eq!(
        expect_ok("range empty", s.get_range(key, 500, 0)),
        Vec::<u8>::new()
    );
    for (offset, len) in [(995, 10), (1000, 1), (2000, 5), (0, 1001), (u64::MAX, 2)] {
        match s.get_range(key, offset, len) {
            Ok(bytes) => panic!(
                "range {offset}+{len} beyond the end of a 1000-byte object returned {} bytes",
                bytes.len()
            ),
            Err(e) => assert!(
                !e.is_retryable(),
                "range {offset}+{len}: retryable error {e}"
            ),
        }
    }
    match s.get_range("ranges/missing", 0, 1) {
        Err(e) => assert!(e.is_not_found(), "range of a missing object: {e}"),
        Ok(_) => panic!("range of a missing object succeeded"),
    }
    // A read-ahead hint is only a hint: out of range, missing or invalid, it changes
    // nothing and the reads that follow see the same bytes.
    for (key, offset, len) in [
        (key, 0, 1000),
        (key, 990, 500),
        (key, u64::MAX, 2),
        (key, 500, 0),
        ("ranges/missing", 0, 1),
        ("../escape", 0, 1),
    ] {
        s.read_ahead(key, offset, len);
    }
    assert_eq!(
        expect_ok("range after read-ahead", s.get_range(key, 123, 456)),
        &data[123..579]
    );
    assert!(expect_ok("size of missing", s.size("ranges/missing")).is_none());
}

fn conformance_list(s: &dyn Storage) {
    let objects = [
        ("data/ab/abc1", 11usize),
        ("data/ab/abc2", 12),
        ("data/cd/cde3", 13),
        ("data/top", 14),
        ("dat", 15),
        ("index/snap/1", 16),
    ];
    for (i, (key, len)) in objects.iter().enumerate() {
        expect_ok(
            key,
            s.put_if_absent(key, Bytes::from(payload(10 + i as u64, *len))),
        );
    }
    let listed = |prefix: &str| -> BTreeMap<String, u64> {
        expect_ok(&format!("list {prefix:?}"), s.list(prefix))
            .into_iter()
            .map(|m| (m.key, m.size))
            .collect()
    };
    let expected = |keys: &[&str]| -> BTreeMap<String, u64> {
        objects
            .iter()
            .filter(|(k, _)| keys.contains(k))
            .map(|(k, l)| (k.to_string(), *l as u64))
            .collect()
    };

    // Everything, with sizes, and nothing else (no directories, no temporary files).
    let all: Vec<&str> = objects.iter().map(|(k, _)| *k).collect();
    assert_eq!(listed(""), expected(&all));
    assert_eq!(
        listed("data/"),
        expected(&["data/ab/abc1", "data/ab/abc2", "data/cd/cde3", "data/top"])
    );
    assert_eq!(
        listed("data/ab/"),
        expected(&["data/ab/abc1", "data/ab/abc2"])
    );
    // Prefixes need not end at a `/`.
    assert_eq!(
        listed("data/a"),
        expected(&["data/ab/abc1", "data/ab/abc2"])
    );
    assert_eq!(listed("data/ab/abc1"), expected(&["data/ab/abc1"]));
    assert_eq!(
        listed("dat"),
        expected(&[
            "dat",
            "data/ab/abc1",
            "data/ab/abc2",
            "data/cd/cde3",
            "data/top"
        ])
    );
    assert_eq!(listed("index/"), expected(&["index/snap/1"]));
    assert!(listed("nothing/").is_empty());
    assert!(listed("data/zz").is_empty());

    // Deleted objects disappear from listings.
    expect_ok("delete", s.delete("data/cd/cde3"));
    assert_eq!(listed("data/c"), BTreeMap::new());
}

fn conformance_size(s: &dyn Storage) {
    expect_ok(
        "put",
        s.put_if_absent("sizes/a", Bytes::from(payload(4, 4321))),
    );
    assert_eq!(expect_ok("size", s.size("sizes/a")), Some(4321));
    assert_eq!(expect_ok("size missing", s.size("sizes/b")), None);
    // Not checked here: `size` of a key that is only a "directory" (`sizes`). S3 answers
    // None; LocalStorage currently returns the directory's own size (e.g. Some(4096)).
}

fn conformance_delete(s: &dyn Storage) {
    let key = "del/obj";
    expect_ok(
        "put",
        s.put_if_absent(key, Bytes::from_static(b"to be deleted")),
    );
    expect_ok("delete", s.delete(key));
    assert_eq!(expect_ok("size after delete", s.size(key)), None);
    match s.get(key) {
        Err(e) => assert!(e.is_not_found(), "get after delete: {e}"),
        Ok(_) => panic!("get after delete succeeded"),
    }
    expect_ok("delete again", s.delete(key));
    expect_ok("delete never existing", s.delete("del/never"));
    // The key is free again.
    assert_eq!(
        expect_ok(
            "put after delete",
            s.put_if_absent(key, Bytes::from_static(b"new"))
        ),
        PutOutcome::Created
    );
    assert_eq!(expect_ok("get new", s.get(key)), b"new");
}

fn conformance_not_found(s: &dyn Storage) {
    match s.get("missing/object") {
        Err(e) => {
            assert!(e.is_not_found(), "expected NotFound, got {e}");
            assert!(!e.is_retryable());
            assert!(
                e.to_string().contains("missing/object"),
                "message lacks the key: {e}"
            );
        }
        Ok(_) => panic!("get of a missing object succeeded"),
    }
}

fn conformance_large_object(s: &dyn Storage) {
    let key = "large/forty-mib";
    let data = payload(5, 40 * 1024 * 1024 + 123);
    assert_eq!(
        expect_ok("put", s.put_if_absent(key, Bytes::copy_from_slice(&data))),
        PutOutcome::Created
    );
    assert_eq!(expect_ok("size", s.size(key)), Some(data.len() as u64));
    let back = expect_ok("get", s.get(key));
    assert!(back == data, "large object changed in a round trip");
    let mid = 17 * 1024 * 1024 + 7;
    assert_eq!(
        expect_ok("range", s.get_range(key, mid as u64, 1 << 20)),
        &data[mid..mid + (1 << 20)]
    );
    assert_eq!(
        expect_ok(
            "second put",
            s.put_if_absent(key, Bytes::from(payload(6, 20 * 1024 * 1024)))
        ),
        PutOutcome::AlreadyExists
    );
    assert!(
        expect_ok("get again", s.get(key)) == data,
        "second large put changed the object"
    );
    assert_eq!(
        expect_ok("list", s.list("large/")).len(),
        1,
        "large upload left extra objects"
    );
}

fn race_policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        first_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
    }
}

/// Writers race on one key: exactly one wins, the others see AlreadyExists, and the object
/// holds one complete payload.
fn race(s: &dyn Storage, key: &str, writers: usize, len: usize) {
    let payloads: Vec<Vec<u8>> = (0..writers).map(|i| payload(100 + i as u64, len)).collect();
    let barrier = Barrier::new(writers);
    let outcomes: Vec<PutOutcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = payloads
            .iter()
            .map(|data| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    // As in production (`open_storage` wraps backends in `RetryingStorage`):
                    // moto answers 500 now and then to racing large PUTs.
                    retry(race_policy(), key, || {
                        s.put_if_absent(key, Bytes::copy_from_slice(data))
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => expect_ok("racing put", r),
                Err(_) => panic!("racing writer panicked"),
            })
            .collect()
    });
    let created = outcomes
        .iter()
        .filter(|o| **o == PutOutcome::Created)
        .count();
    assert_eq!(
        created, 1,
        "outcomes of {writers} racing writers: {outcomes:?}"
    );
    let stored = expect_ok("get", s.get(key));
    assert!(
        payloads.contains(&stored),
        "stored object ({} bytes) is none of the writers' payloads",
        stored.len()
    );
}

fn conformance_concurrent_put(s: &dyn Storage) {
    for round in 0..3 {
        race(s, &format!("race/small-{round}"), 8, 64 * 1024 + round);
    }
}

fn conformance_concurrent_large_put(s: &dyn Storage) {
    race(s, "race/large", 4, 20 * 1024 * 1024);
}

fn conformance_invalid_keys(s: &dyn Storage) {
    for key in [
        "",
        "/abs",
        "trailing/",
        "a//b",
        "../escape",
        "a/../b",
        "a/./b",
        "back\\slash",
    ] {
        let results = [
            s.put_if_absent(key, Bytes::from_static(b"x")).err(),
            s.get(key).err(),
            s.get_range(key, 0, 1).err(),
            s.size(key).err(),
            s.delete(key).err(),
        ];
        for (op, err) in ["put", "get", "get_range", "size", "delete"]
            .iter()
            .zip(results)
        {
            match err {
                Some(e) => assert!(!e.is_retryable(), "{op} {key:?}: retryable {e}"),
                None => panic!("{op} accepted invalid key {key:?}"),
            }
        }
    }
    // Nothing was written anywhere.
    assert!(expect_ok("list", s.list("")).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

type Guard = Box<dyn Any>;

fn local_backend() -> Option<(Box<dyn Storage>, Guard)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = LocalStorage::new(dir.path().join("repo"));
    Some((Box::new(storage), Box::new(dir)))
}

/// The local backend as it runs on mounts without hard links (CIFS, some NFS).
fn local_without_links_backend() -> Option<(Box<dyn Storage>, Guard)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = LocalStorage::without_hard_links(dir.path().join("repo"));
    Some((Box::new(storage), Box::new(dir)))
}

const BUCKET: &str = "pgvault-conformance";

fn s3_config(moto: &testkit::s3::Moto, bucket: &str, prefix: &str) -> S3Config {
    S3Config {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint: Some(moto.endpoint()),
        region: Some("us-east-1".to_string()),
        path_style: true,
        access_key_id: Some("testing".to_string()),
        secret_access_key: Some("testing".to_string()),
        request_timeout: None,
    }
}

/// The moto server with the shared bucket created.
fn moto_with_bucket() -> Option<&'static testkit::s3::Moto> {
    static BUCKET_READY: OnceLock<Result<(), String>> = OnceLock::new();
    let moto = testkit::s3::moto()?;
    if let Err(e) = BUCKET_READY.get_or_init(|| moto.create_bucket(BUCKET)) {
        panic!("{e}");
    }
    Some(moto)
}

fn s3_backend() -> Option<(Box<dyn Storage>, Guard)> {
    let moto = moto_with_bucket()?;
    let prefix = format!("conformance/{}", testkit::unique("t"));
    let storage = expect_ok(
        "S3Storage::new",
        S3Storage::new(s3_config(moto, BUCKET, &prefix)),
    );
    Some((Box::new(storage), Box::new(())))
}

const CONTAINER: &str = "conformance";

/// The Azurite server with the shared container created.
fn azurite_with_container() -> Option<&'static testkit::azurite::Azurite> {
    static CONTAINER_READY: OnceLock<Result<(), String>> = OnceLock::new();
    let azurite = testkit::azurite::azurite()?;
    if let Err(e) = CONTAINER_READY.get_or_init(|| azurite.create_container(CONTAINER)) {
        panic!("Azurite container: {e}");
    }
    Some(azurite)
}

fn azblob_config(
    azurite: &testkit::azurite::Azurite,
    container: &str,
    prefix: &str,
) -> AzblobConfig {
    AzblobConfig {
        container: container.to_string(),
        prefix: prefix.to_string(),
        connection_string: Some(azurite.connection_string()),
        ..AzblobConfig::default()
    }
}

fn azblob_backend() -> Option<(Box<dyn Storage>, Guard)> {
    let azurite = azurite_with_container()?;
    let prefix = format!("conformance/{}", testkit::unique("t"));
    let storage = expect_ok(
        "AzblobStorage::new",
        AzblobStorage::new(azblob_config(azurite, CONTAINER, &prefix)),
    );
    Some((Box::new(storage), Box::new(())))
}

const GCS_BUCKET: &str = "pgvault-conformance";

/// The GCS emulator with the shared bucket created.
fn gcs_with_bucket() -> Option<&'static testkit::gcs::FakeGcs> {
    static BUCKET_READY: OnceLock<Result<(), String>> = OnceLock::new();
    let server = testkit::gcs::fake_gcs()?;
    if let Err(e) = BUCKET_READY.get_or_init(|| server.create_bucket(GCS_BUCKET)) {
        panic!("GCS bucket: {e}");
    }
    Some(server)
}

fn gcs_config(server: &testkit::gcs::FakeGcs, bucket: &str, prefix: &str) -> GcsConfig {
    GcsConfig {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint: Some(server.endpoint()),
        ..GcsConfig::default()
    }
}

fn gcs_backend() -> Option<(Box<dyn Storage>, Guard)> {
    let server = gcs_with_bucket()?;
    let prefix = format!("conformance/{}", testkit::unique("t"));
    let storage = expect_ok(
        "GcsStorage::new",
        GcsStorage::new(gcs_config(server, GCS_BUCKET, &prefix)),
    );
    Some((Box::new(storage), Box::new(())))
}

#[test]
fn gcs_missing_bucket_is_a_clear_permanent_error() {
    let Some(server) = testkit::gcs::fake_gcs() else {
        return;
    };
    let bucket = testkit::unique("absent").to_lowercase();
    let storage = expect_ok("new", GcsStorage::new(gcs_config(server, &bucket, "repo")));
    let Some(err) = storage.put_if_absent("k", Bytes::from_static(b"v")).err() else {
        panic!("put into a missing bucket succeeded")
    };
    assert!(!err.is_retryable(), "retryable: {err}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("bucket {bucket} does not exist")),
        "unclear message: {message}"
    );
}

/// The GCS backend against fake-gcs-server: everything but create-if-absent. The
/// emulator ignores `ifGenerationMatch=0` on uploads (a second conditional upload of one
/// name answers 200), so the put-if-absent and racing-writer checks cannot run against
/// it; on GCS itself the condition is the service's documented behaviour, sent by
/// OpenDAL's gcs service for every write pgvault makes.
mod gcs {
    use super::*;

    fn with(check: fn(&dyn Storage)) {
        if let Some((storage, _guard)) = gcs_backend() {
            check(storage.as_ref());
        }
    }

    #[test]
    fn get_and_range() {
        with(conformance_get_and_range)
    }
    #[test]
    fn list() {
        with(conformance_list)
    }
    #[test]
    fn size() {
        with(conformance_size)
    }
    #[test]
    fn delete() {
        with(conformance_delete)
    }
    #[test]
    fn not_found() {
        with(conformance_not_found)
    }
    #[test]
    fn invalid_keys() {
        with(conformance_invalid_keys)
    }
    #[test]
    fn large_object_round_trip() {
        with(|s| {
            let data = payload(9, 24 << 20);
            assert_eq!(
                expect_ok(
                    "put",
                    s.put_if_absent("big/object", Bytes::copy_from_slice(&data))
                ),
                PutOutcome::Created
            );
            assert_eq!(
                expect_ok("size", s.size("big/object")),
                Some(data.len() as u64)
            );
            assert!(expect_ok("get", s.get("big/object")) == data);
            let range = expect_ok("range", s.get_range("big/object", 20 << 20, 1 << 20));
            assert!(range == data[20 << 20..21 << 20]);
        })
    }
}

fn sftp_config(server: &testkit::sftp::SshServer, sub: &str) -> SftpConfig {
    let url = server.url(sub);
    let rest = url.strip_prefix("sftp://").unwrap_or(&url);
    SftpConfig {
        key_file: Some(server.key.clone()),
        known_hosts: Some(server.known_hosts.clone()),
        ..expect_ok_str_value(parse_sftp_url(rest))
    }
}

fn expect_ok_str_value<T>(r: Result<T, String>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

fn sftp_backend() -> Option<(Box<dyn Storage>, Guard)> {
    let server = testkit::sftp::sshd()?;
    let storage = expect_ok(
        "SftpStorage::new",
        SftpStorage::new(sftp_config(server, &testkit::unique("t"))),
    );
    Some((Box::new(storage), Box::new(())))
}

macro_rules! backend_tests {
    ($module:ident, $make:path) => {
        mod $module {
            use super::*;

            fn with(check: fn(&dyn Storage)) {
                if let Some((storage, _guard)) = $make() {
                    check(storage.as_ref());
                }
            }

            #[test]
            fn put_if_absent() {
                with(conformance_put_if_absent)
            }
            #[test]
            fn get_and_range() {
                with(conformance_get_and_range)
            }
            #[test]
            fn list() {
                with(conformance_list)
            }
            #[test]
            fn size() {
                with(conformance_size)
            }
            #[test]
            fn delete() {
                with(conformance_delete)
            }
            #[test]
            fn not_found() {
                with(conformance_not_found)
            }
            #[test]
            fn large_object() {
                with(conformance_large_object)
            }
            #[test]
            fn concurrent_put() {
                with(conformance_concurrent_put)
            }
            #[test]
            fn concurrent_large_put() {
                with(conformance_concurrent_large_put)
            }
            #[test]
            fn invalid_keys() {
                with(conformance_invalid_keys)
            }
        }
    };
}

backend_tests!(local, local_backend);
backend_tests!(local_without_hard_links, local_without_links_backend);
backend_tests!(s3, s3_backend);
backend_tests!(azblob, azblob_backend);
backend_tests!(sftp, sftp_backend);

/// An unknown host key is refused, never trusted on first use; a key the server does
/// not know is "permission denied"; both say what to do.
#[test]
fn sftp_refuses_unknown_host_keys_and_wrong_keys() {
    let Some(server) = testkit::sftp::sshd() else {
        return;
    };
    let empty = server.dir.join("empty_known_hosts");
    std::fs::write(&empty, "").expect("write");
    let unknown_host = SftpConfig {
        known_hosts: Some(empty),
        ..sftp_config(server, "never")
    };
    let storage = expect_ok("new", SftpStorage::new(unknown_host));
    match storage.put_if_absent("k", Bytes::from_static(b"v")) {
        Err(StorageError::Permanent { detail, .. }) => {
            assert!(detail.contains("host key"), "{detail}");
            assert!(detail.contains("ssh-keyscan"), "{detail}");
        }
        other => panic!("an unknown host key must be refused: {other:?}"),
    }
    let stranger = server.dir.join("stranger_ed25519");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    let wrong_key = SftpConfig {
        key_file: Some(stranger),
        ..sftp_config(server, "never")
    };
    let storage = expect_ok("new", SftpStorage::new(wrong_key));
    match storage.put_if_absent("k", Bytes::from_static(b"v")) {
        Err(StorageError::PermissionDenied { detail, .. }) => {
            assert!(detail.contains("refused the key"), "{detail}")
        }
        other => panic!("a wrong key must be permission denied: {other:?}"),
    }
    // Outside the account's own directory: the chroot's top is root's.
    let outside = SftpStorage::new(SftpConfig {
        path: "/".into(),
        ..sftp_config(server, "x")
    });
    let outside = expect_ok("new", outside);
    assert!(matches!(
        outside.put_if_absent("k", Bytes::from_static(b"v")),
        Err(StorageError::PermissionDenied { .. })
    ));
}

#[test]
fn azblob_missing_container_is_a_clear_permanent_error() {
    let Some(azurite) = testkit::azurite::azurite() else {
        return;
    };
    let container = testkit::unique("absent").to_lowercase();
    let storage = expect_ok(
        "new",
        AzblobStorage::new(azblob_config(azurite, &container, "repo")),
    );
    for (op, result) in [
        (
            "put",
            storage.put_if_absent("k", Bytes::from_static(b"v")).err(),
        ),
        ("list", storage.list("").err()),
    ] {
        let Some(err) = result else {
            panic!("{op} on a missing container succeeded")
        };
        assert!(!err.is_retryable(), "{op}: retryable: {err}");
        let message = err.to_string();
        assert!(
            message.contains(&format!("container {container} does not exist")),
            "{op}: unclear message: {message}"
        );
    }
}

#[test]
fn azblob_wrong_key_is_permission_denied() {
    let Some(azurite) = azurite_with_container() else {
        return;
    };
    let config = AzblobConfig {
        container: CONTAINER.to_string(),
        prefix: "wrong-key".to_string(),
        account_name: Some(testkit::azurite::ACCOUNT.to_string()),
        account_key: Some("d3Jvbmcga2V5".to_string()),
        endpoint: Some(azurite.endpoint()),
        ..AzblobConfig::default()
    };
    let storage = expect_ok("new", AzblobStorage::new(config));
    match storage.put_if_absent("k", Bytes::from_static(b"v")) {
        Err(StorageError::PermissionDenied { .. }) => {}
        other => panic!("a wrong account key must be permission denied, got {other:?}"),
    }
}

#[test]
fn local_list_skips_temporary_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = LocalStorage::new(dir.path());
    expect_ok(
        "put",
        storage.put_if_absent("data/ab/x", Bytes::from_static(b"x")),
    );
    std::fs::write(dir.path().join("data/ab/.tmp-leftover"), b"half").expect("write temp");
    let keys: Vec<String> = expect_ok("list", storage.list(""))
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, vec!["data/ab/x".to_string()]);
}

// ---------------------------------------------------------------------------------------------
// S3-specific behaviour
// ---------------------------------------------------------------------------------------------

#[test]
fn s3_bucket_root_and_nested_prefix() {
    let Some(moto) = testkit::s3::moto() else {
        return;
    };
    let bucket = testkit::unique("root").to_lowercase();
    expect_ok_str(moto.create_bucket(&bucket));

    let root = expect_ok("root", S3Storage::new(s3_config(moto, &bucket, "")));
    let nested = expect_ok(
        "nested",
        S3Storage::new(s3_config(moto, &bucket, "some/prefix")),
    );
    assert_eq!(root.location(), format!("s3://{bucket}/"));
    assert_eq!(nested.location(), format!("s3://{bucket}/some/prefix"));

    assert_eq!(
        expect_ok(
            "root put",
            root.put_if_absent("top/a", Bytes::from_static(b"root"))
        ),
        PutOutcome::Created
    );
    assert_eq!(
        expect_ok(
            "nested put",
            nested.put_if_absent("data/b", Bytes::from_static(b"nested"))
        ),
        PutOutcome::Created
    );

    // The nested storage sees only its own keys, relative to its prefix.
    let nested_keys: Vec<String> = expect_ok("nested list", nested.list(""))
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(nested_keys, vec!["data/b".to_string()]);
    // The bucket root sees both, the nested one under the full key.
    let mut root_keys: Vec<String> = expect_ok("root list", root.list(""))
        .into_iter()
        .map(|m| m.key)
        .collect();
    root_keys.sort();
    assert_eq!(
        root_keys,
        vec!["some/prefix/data/b".to_string(), "top/a".to_string()]
    );
    assert_eq!(
        expect_ok("root get", root.get("some/prefix/data/b")),
        b"nested"
    );
    assert_eq!(
        expect_ok(
            "root put over nested",
            root.put_if_absent("some/prefix/data/b", Bytes::from_static(b"other"))
        ),
        PutOutcome::AlreadyExists
    );
    assert_eq!(expect_ok("nested get", nested.get("data/b")), b"nested");
    match nested.get("top/a") {
        Err(e) => assert!(e.is_not_found(), "{e}"),
        Ok(_) => panic!("nested storage reads outside its prefix"),
    }
    // Prefixes given with slashes at the ends mean the same.
    let slashed = expect_ok(
        "slashed",
        S3Storage::new(s3_config(moto, &bucket, "/some/prefix/")),
    );
    assert_eq!(expect_ok("slashed get", slashed.get("data/b")), b"nested");
}

#[test]
fn s3_unreachable_endpoint_fails_fast() {
    let port = testkit::free_port(); // nothing listens there once the probe socket is closed
    let config = S3Config {
        bucket: "unreachable".to_string(),
        prefix: "p".to_string(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".to_string()),
        path_style: true,
        access_key_id: Some("testing".to_string()),
        secret_access_key: Some("testing".to_string()),
        request_timeout: Some(Duration::from_secs(10)),
    };
    let storage = expect_ok("new", S3Storage::new(config));
    let start = Instant::now();
    let err = match storage.put_if_absent("k", Bytes::from_static(b"v")) {
        Err(e) => e,
        Ok(outcome) => panic!("put to an unreachable endpoint returned {outcome:?}"),
    };
    assert!(
        err.is_retryable(),
        "connection failures are transient: {err}"
    );
    assert!(
        err.to_string().contains(&port.to_string()),
        "message lacks the endpoint: {err}"
    );
    assert!(storage.get("k").is_err());
    assert!(storage.list("").is_err());
    assert!(
        storage.size("k").is_err(),
        "an unreachable endpoint must not look like a missing object"
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );

    // With the retrying decorator the failure is still reported in bounded time.
    let retrying = RetryingStorage::new(
        storage,
        RetryPolicy {
            attempts: 3,
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
        },
    );
    let start = Instant::now();
    assert!(retrying.get("k").is_err());
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn s3_missing_bucket_is_a_clear_permanent_error() {
    let Some(moto) = testkit::s3::moto() else {
        return;
    };
    let bucket = testkit::unique("absent").to_lowercase();
    let storage = expect_ok("new", S3Storage::new(s3_config(moto, &bucket, "repo")));
    let put = storage.put_if_absent("k", Bytes::from_static(b"v"));
    let list = storage.list("");
    let get = storage.get("k");
    for (op, result) in [("put", put.err()), ("list", list.err()), ("get", get.err())] {
        let Some(err) = result else {
            panic!("{op} on a missing bucket succeeded")
        };
        assert!(
            !err.is_retryable(),
            "{op}: missing bucket reported as retryable: {err}"
        );
        assert!(
            !err.is_not_found(),
            "{op}: missing bucket reported as a missing object: {err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("bucket {bucket} does not exist")),
            "{op}: unclear message: {message}"
        );
        assert!(
            message.contains(&moto.endpoint()),
            "{op}: message lacks the endpoint: {message}"
        );
    }
}

#[test]
fn s3_config_errors_are_reported() {
    assert!(
        S3Storage::new(S3Config::default()).is_err(),
        "empty bucket accepted"
    );
    let half_credentials = S3Config {
        bucket: "b".to_string(),
        access_key_id: Some("id".to_string()),
        ..S3Config::default()
    };
    assert!(S3Storage::new(half_credentials).is_err());
    let bad_prefix = S3Config {
        bucket: "b".to_string(),
        prefix: "a/../b".to_string(),
        ..S3Config::default()
    };
    assert!(S3Storage::new(bad_prefix).is_err());
}

#[test]
fn s3_storage_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<S3Storage>();
    let Some((storage, _guard)) = s3_backend() else {
        return;
    };
    let storage: Arc<dyn Storage> = Arc::from(storage);
    std::thread::scope(|scope| {
        for t in 0..8 {
            let storage = Arc::clone(&storage);
            scope.spawn(move || {
                for i in 0..20 {
                    let key = format!("threads/{t}/{i}");
                    let data = payload(t * 1000 + i, 100 + i as usize);
                    assert_eq!(
                        expect_ok(
                            "put",
                            storage.put_if_absent(&key, Bytes::copy_from_slice(&data))
                        ),
                        PutOutcome::Created
                    );
                    assert_eq!(expect_ok("get", storage.get(&key)), data);
                }
            });
        }
    });
    assert_eq!(expect_ok("list", storage.list("threads/")).len(), 160);
}

#[test]
fn s3_works_from_inside_an_async_context() {
    let Some((storage, _guard)) = s3_backend() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        assert_eq!(
            expect_ok(
                "put",
                storage.put_if_absent("async/k", Bytes::from_static(b"v"))
            ),
            PutOutcome::Created
        );
        assert_eq!(expect_ok("get", storage.get("async/k")), b"v");
    });
}

fn expect_ok_str(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Interrupted uploads
// ---------------------------------------------------------------------------------------------

/// A TCP proxy to `target` on 127.0.0.1 that cuts every connection after the client has
/// sent `limit` bytes: a network drop in the middle of an upload.
fn cutting_proxy(target: u16, limit: usize) -> u16 {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (Ok(mut back_from), Ok(mut back_to)) = (server.try_clone(), client.try_clone())
            else {
                continue;
            };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
            });
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                let mut sent = 0;
                while let Ok(n) = client.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let take = n.min(limit - sent);
                    if server.write_all(&buf[..take]).is_err() {
                        break;
                    }
                    sent += take;
                    if sent >= limit {
                        let _ = server.shutdown(Shutdown::Both);
                        let _ = client.shutdown(Shutdown::Both);
                        break;
                    }
                }
            });
        }
    });
    port
}

/// An 8 MiB upload through a connection that drops after 1 MiB fails, and the object is
/// not there — not in a listing, not by name — for a direct client; uploading it again
/// then works.
fn check_interrupted_upload(through_proxy: &dyn Storage, direct: &dyn Storage) {
    let data = payload(77, 8 << 20);
    let result = through_proxy.put_if_absent("cut/object", Bytes::copy_from_slice(&data));
    assert!(result.is_err(), "upload through a cut connection succeeded");
    assert_eq!(expect_ok("size", direct.size("cut/object")), None);
    assert!(expect_ok("list", direct.list("cut/")).is_empty());
    assert_eq!(
        expect_ok(
            "retry",
            direct.put_if_absent("cut/object", Bytes::copy_from_slice(&data))
        ),
        PutOutcome::Created
    );
    assert!(expect_ok("get", direct.get("cut/object")) == data);
}

const CUT_AFTER: usize = 1 << 20;

#[test]
fn s3_interrupted_upload_leaves_nothing() {
    let Some(moto) = moto_with_bucket() else {
        return;
    };
    let prefix = format!("cut/{}", testkit::unique("t"));
    let direct = expect_ok("direct", S3Storage::new(s3_config(moto, BUCKET, &prefix)));
    let proxied = S3Config {
        endpoint: Some(format!(
            "http://127.0.0.1:{}",
            cutting_proxy(moto.port, CUT_AFTER)
        )),
        request_timeout: Some(Duration::from_secs(10)),
        ..s3_config(moto, BUCKET, &prefix)
    };
    let through = expect_ok("proxied", S3Storage::new(proxied));
    check_interrupted_upload(&through, &direct);
}

#[test]
fn azblob_interrupted_upload_leaves_nothing() {
    let Some(azurite) = azurite_with_container() else {
        return;
    };
    let prefix = format!("cut/{}", testkit::unique("t"));
    let direct = expect_ok(
        "direct",
        AzblobStorage::new(azblob_config(azurite, CONTAINER, &prefix)),
    );
    let proxy = cutting_proxy(azurite.port, CUT_AFTER);
    let mut proxied = azblob_config(azurite, CONTAINER, &prefix);
    proxied.connection_string = proxied
        .connection_string
        .map(|c| c.replace(&format!(":{}/", azurite.port), &format!(":{proxy}/")));
    proxied.request_timeout = Some(Duration::from_secs(10));
    let through = expect_ok("proxied", AzblobStorage::new(proxied));
    check_interrupted_upload(&through, &direct);
}

#[test]
fn gcs_interrupted_upload_leaves_nothing() {
    let Some(server) = gcs_with_bucket() else {
        return;
    };
    let prefix = format!("cut/{}", testkit::unique("t"));
    let direct = expect_ok(
        "direct",
        GcsStorage::new(gcs_config(server, GCS_BUCKET, &prefix)),
    );
    let proxied = GcsConfig {
        endpoint: Some(format!(
            "http://127.0.0.1:{}",
            cutting_proxy(server.port, CUT_AFTER)
        )),
        request_timeout: Some(Duration::from_secs(10)),
        ..gcs_config(server, GCS_BUCKET, &prefix)
    };
    let through = expect_ok("proxied", GcsStorage::new(proxied));
    check_interrupted_upload(&through, &direct);
}

#[test]
fn sftp_interrupted_upload_leaves_nothing() {
    let Some(server) = testkit::sftp::sshd() else {
        return;
    };
    let sub = testkit::unique("cut");
    let direct = expect_ok("direct", SftpStorage::new(sftp_config(server, &sub)));
    // SSH to the proxy's port: the same host key, known under that port.
    let proxy = cutting_proxy(server.port, CUT_AFTER);
    let dir = tempfile::tempdir().expect("tempdir");
    let known_hosts = dir.path().join("known_hosts");
    let line = std::fs::read_to_string(&server.known_hosts).expect("known_hosts");
    std::fs::write(
        &known_hosts,
        line.replace(&format!("]:{} ", server.port), &format!("]:{proxy} ")),
    )
    .expect("write known_hosts");
    let proxied = SftpConfig {
        port: Some(proxy),
        known_hosts: Some(known_hosts),
        request_timeout: Some(Duration::from_secs(10)),
        ..sftp_config(server, &sub)
    };
    let through = expect_ok("proxied", SftpStorage::new(proxied));
    check_interrupted_upload(&through, &direct);
}
