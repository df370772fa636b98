//! Peak memory of `pgvault snapshot create` must not grow with the input: a 4 GiB
//! stream and 100,000 small files stay under [`RSS_BOUND_MIB`] (docs/benchmarks.md).
//! Measured with `/usr/bin/time -f %M` (max RSS of the pgvault process). The repositories
//! are unencrypted because opening an encrypted one runs Argon2id with 64 MiB, which
//! would hide the pipeline's own peak.

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};

/// Documented bound for `--jobs 2` and 16 MiB packs: a pack being filled, one waiting for
/// an uploader and one per uploader (4 × 16 MiB), up to 2×jobs chunks of at most 4 MiB
/// queued, each worker's chunk with its compressed and sealed copies (3 × 4 MiB each),
/// the chunker's buffer, the index and the program itself: about 120 MiB at worst,
/// whatever the input size (measured: 88 MiB for the 4 GiB stream).
const RSS_BOUND_MIB: u64 = 128;

fn pgvault(repo: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "maxrss_kib=%M", env!("CARGO_BIN_EXE_pgvault")])
        .args(args)
        .env("PGVAULT_REPO", repo)
        .env("PGVAULT_PASSPHRASE", "memory test passphrase")
        .env("PGVAULT_JOBS", "2")
        .env_remove("PGVAULT_CONFIG")
        .env_remove("PGVAULT_COMPRESSION");
    cmd
}

fn max_rss_mib(stderr: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(stderr);
    let kib: u64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("maxrss_kib="))
        .next_back()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no max RSS in: {text}"));
    kib / 1024
}

/// Streams `total` bytes of compressible but never-repeating data into a snapshot.
fn store_stream(repo: &std::path::Path, total: u64) -> (u64, serde_json::Value) {
    let mut child = pgvault(
        repo,
        &[
            "snapshot", "create", "--stdin", "--name", "big", "--output", "json",
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn pgvault");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut block = Vec::with_capacity(1 << 20);
    for i in 0..(1 << 20) / 64 {
        writeln!(block, "{:063}", i * 7919 % 1_000_003).expect("format");
    }
    let mut counter = 0u64;
    let mut sent = 0u64;
    while sent < total {
        // A unique stamp every 4 KiB keeps every chunk new, so nothing is deduplicated away.
        for page in block.chunks_mut(4096) {
            counter += 1;
            page[..16].copy_from_slice(format!("{counter:016x}").as_bytes());
        }
        let n = (total - sent).min(block.len() as u64) as usize;
        stdin.write_all(&block[..n]).expect("feed pgvault");
        sent += n as u64;
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    (max_rss_mib(&out.stderr), json)
}

#[test]
fn memory_does_not_grow_with_stream_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    let init = pgvault(
        &repo,
        &["init", "--compression", "zstd:1", "--encryption", "none"],
    )
    .output()
    .expect("init");
    assert!(init.status.success());

    // 512 MiB already fills packs, so both runs are in the steady state.
    let (small_rss, small) = store_stream(&repo, 512 << 20);
    let (big_rss, big) = store_stream(&repo, 4 << 30);
    eprintln!("max RSS: 512 MiB stream {small_rss} MiB, 4 GiB stream {big_rss} MiB");
    assert_eq!(small["size_bytes"], 512u64 << 20);
    assert_eq!(big["size_bytes"], 4u64 << 30);
    // The stream's first 512 MiB repeat the small one's (same stamps); the rest is new and
    // cut into chunks of at most 4 MiB, so at least 3.5 GiB / 4 MiB = 896 new blobs.
    assert!(
        big["new_blobs"].as_u64().expect("new_blobs") >= 896,
        "{big}"
    );
    assert!(
        small_rss <= RSS_BOUND_MIB && big_rss <= RSS_BOUND_MIB,
        "peaks {small_rss} MiB (512 MiB stream) and {big_rss} MiB (4 GiB stream) exceed the bound {RSS_BOUND_MIB} MiB"
    );
}

#[test]
fn memory_is_bounded_for_many_small_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    let data = dir.path().join("data");
    for d in 0..100 {
        let sub = data.join(format!("dir{d:03}"));
        fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..1000 {
            fs::write(sub.join(format!("f{f:04}")), format!("file {d}/{f}\n")).expect("write");
        }
    }
    let init = pgvault(&repo, &["init", "--encryption", "none"])
        .output()
        .expect("init");
    assert!(init.status.success());
    let out = pgvault(
        &repo,
        &[
            "snapshot",
            "create",
            "--path",
            &data.display().to_string(),
            "--output",
            "json",
        ],
    )
    .output()
    .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["files"], 100_000);
    let rss = max_rss_mib(&out.stderr);
    eprintln!("max RSS for 100,000 small files: {rss} MiB");
    assert!(
        rss <= RSS_BOUND_MIB,
        "100,000 files peaked at {rss} MiB (bound {RSS_BOUND_MIB} MiB)"
    );
}
