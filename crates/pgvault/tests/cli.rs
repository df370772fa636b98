//! End-to-end tests of the `pgvault` binary: happy paths and the bad-input contract
//! (one-line `error: …` on stderr, non-zero exit, nothing lost).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const PASSPHRASE: &str = "correct horse battery staple";

/// A scratch directory with a passphrase file and a repository location inside it.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("passphrase"), format!("{PASSPHRASE}\n")).expect("passphrase");
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn repo(&self) -> String {
        self.path("repo").display().to_string()
    }

    /// `pgvault` with a clean environment pointing at this scratch repository.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgvault"));
        for (key, _) in std::env::vars() {
            if key.starts_with("PGVAULT_") || key.starts_with("AWS_") || key.starts_with("AZURE_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PGVAULT_REPO", self.repo())
            .env("PGVAULT_PASSPHRASE_FILE", self.path("passphrase"))
            .env("PGVAULT_JOBS", "2")
            .env("PGVAULT_KEY_CACHE", self.path("key-cache"))
            .env("PGVAULT_OBJECT_CACHE", self.path("object-cache"))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run pgvault")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "pgvault {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&all)).expect("JSON output")
    }

    /// Runs a command that must fail; returns its single stderr line.
    fn fails(&self, args: &[&str]) -> String {
        fails(self.run(args), args)
    }

    fn init(&self) {
        self.ok(&["init"]);
    }

    fn snapshot_dir(&self, dir: &Path) -> String {
        let v = self.json(&["snapshot", "create", "--path", &dir.display().to_string()]);
        v["id"].as_str().expect("id").to_string()
    }

    fn packs(&self) -> Vec<PathBuf> {
        files_under(&self.path("repo/data"))
    }
}

fn fails(out: Output, what: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "pgvault {what:?} should have failed; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {stderr}");
    lines[0].to_string()
}

/// The published objects under `dir`: an object is written under a temporary dot-name
/// first, which a test waiting for the object must not take for it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let entry = entry.expect("dir entry");
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if !entry.file_name().to_string_lossy().starts_with('.') {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Text that compresses like real data: numbered rows with some variety.
fn realistic(rows: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    for i in 0..rows {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        writeln!(
            out,
            "{i}\taccount-{}\t{}\t2026-11-{:02} 12:{:02}:00\tsome filler text for row {i}",
            x % 100_000,
            (x >> 20) % 1_000_000,
            1 + (x >> 40) % 28,
            (x >> 50) % 60
        )
        .expect("write to vec");
    }
    out
}

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("base/1")).expect("mkdir");
    fs::create_dir_all(root.join("empty")).expect("mkdir");
    fs::write(root.join("base/1/16384"), realistic(60_000, 1)).expect("write");
    fs::write(root.join("base/1/16385"), realistic(2_000, 2)).expect("write");
    fs::write(root.join("PG_VERSION"), "15\n").expect("write");
    fs::write(root.join("empty-file"), "").expect("write");
    std::os::unix::fs::symlink("base/1/16384", root.join("link")).expect("symlink");
}

fn assert_same_tree(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .expect("diff");
    assert!(
        out.status.success(),
        "trees differ: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn tree_round_trip_and_incremental_reuse() {
    let s = Scratch::new();
    s.init();
    let data = s.path("data");
    make_tree(&data);
    let first = s.snapshot_dir(&data);
    s.ok(&[
        "snapshot",
        "restore",
        &first,
        "--target",
        &s.path("out").display().to_string(),
    ]);
    assert_same_tree(&data, &s.path("out"));

    // A second snapshot of unchanged data stores nothing new and no new pack.
    let packs_before = s.packs();
    let second = s.json(&["snapshot", "create", "--path", &data.display().to_string()]);
    assert_eq!(second["new_blobs"], 0, "{second}");
    assert_eq!(second["parent"].as_str(), Some(first.as_str()));
    assert_eq!(s.packs(), packs_before);

    let list = s.json(&["snapshot", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    s.ok(&["verify"]);
    // A local repository is read where it is: no copies of it.
    assert!(!s.path("object-cache").exists());
}

#[test]
fn stream_round_trip_through_stdin_and_stdout() {
    let s = Scratch::new();
    s.init();
    let input = realistic(50_000, 7);
    let mut child = s
        .cmd(&[
            "snapshot", "create", "--stdin", "--name", "dump.sql", "--output", "json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&input)
        .expect("feed stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(created["size_bytes"], input.len());
    assert!(created["stored_bytes"].as_u64().expect("stored") < input.len() as u64 / 2);
    let id = created["id"].as_str().expect("id");
    let restored = s.run(&["snapshot", "restore", id, "--stdout"]);
    assert!(restored.status.success());
    assert!(restored.stdout == input, "restored stream differs");
}

#[test]
fn every_encryption_and_compression_choice_works() {
    for (encryption, compression) in [
        ("xchacha20-poly1305", "zstd:1"),
        ("aes-256-gcm", "lz4"),
        ("none", "gzip:6"),
        ("aes-256-gcm", "none"),
    ] {
        let s = Scratch::new();
        let created = s.json(&[
            "init",
            "--encryption",
            encryption,
            "--compression",
            compression,
        ]);
        assert_eq!(created["encryption"], encryption);
        let data = s.path("data");
        make_tree(&data);
        let id = s.snapshot_dir(&data);
        s.ok(&[
            "snapshot",
            "restore",
            &id,
            "--target",
            &s.path("out").display().to_string(),
        ]);
        assert_same_tree(&data, &s.path("out"));
        if encryption != "none" {
            // Nothing readable leaks into storage.
            for pack in s.packs() {
                let bytes = fs::read(&pack).expect("read pack");
                assert!(
                    !bytes.windows(11).any(|w| w == b"filler text"),
                    "plaintext in {}",
                    pack.display()
                );
            }
        }
    }
}

#[test]
fn wrong_passphrase_is_refused_by_name() {
    let s = Scratch::new();
    s.init();
    fs::write(s.path("wrong"), "not it\n").expect("write");
    let err = s.fails(&[
        "snapshot",
        "list",
        "--passphrase-file",
        &s.path("wrong").display().to_string(),
    ]);
    assert_eq!(
        err,
        format!("error: wrong passphrase for repository {}", s.repo())
    );
}

#[test]
fn missing_repository_says_to_init() {
    let s = Scratch::new();
    let err = s.fails(&["snapshot", "list"]);
    assert!(err.contains("no pgvault repository at"), "{err}");
    assert!(err.contains("pgvault init"), "{err}");
    let err = s.fails(&["snapshot", "list", "--repo", ""]);
    assert!(err.contains("repository URL is empty"), "{err}");
}

#[test]
fn second_init_changes_nothing() {
    let s = Scratch::new();
    s.init();
    let config_before = fs::read(s.path("repo/config")).expect("config");
    let keys_before = files_under(&s.path("repo/keys"));
    let err = s.fails(&["init"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        fs::read(s.path("repo/config")).expect("config"),
        config_before
    );
    assert_eq!(files_under(&s.path("repo/keys")), keys_before);
}

#[test]
fn newer_format_version_is_refused() {
    let s = Scratch::new();
    s.init();
    let config = fs::read_to_string(s.path("repo/config")).expect("config");
    let mut value: serde_json::Value = serde_json::from_str(&config).expect("json config");
    value["version"] = 99.into();
    fs::remove_file(s.path("repo/config")).expect("rm");
    fs::write(s.path("repo/config"), value.to_string()).expect("write");
    let err = s.fails(&["snapshot", "list"]);
    assert!(err.contains("format version 99"), "{err}");
    assert!(err.contains("upgrade pgvault"), "{err}");
}

#[test]
fn encrypted_init_without_passphrase_is_refused() {
    let s = Scratch::new();
    let out = s
        .cmd(&["init"])
        .env_remove("PGVAULT_PASSPHRASE_FILE")
        .output()
        .expect("run");
    let err = fails(out, &["init"]);
    assert!(err.contains("needs a passphrase"), "{err}");
    assert!(!s.path("repo/config").exists());
}

/// Flips one byte in the middle of the largest pack.
fn damage_largest_pack(s: &Scratch, truncate: bool) -> String {
    let pack = s
        .packs()
        .into_iter()
        .max_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a pack");
    let mut bytes = fs::read(&pack).expect("read");
    // Objects are read-only hard links; replace the file as an attacker or bad disk would.
    fs::remove_file(&pack).expect("rm");
    if truncate {
        bytes.truncate(bytes.len() / 2);
    } else {
        let middle = bytes.len() / 3;
        bytes[middle] ^= 0x40;
    }
    fs::write(&pack, bytes).expect("write");
    let rel = pack
        .strip_prefix(s.path("repo"))
        .expect("inside repo")
        .display()
        .to_string();
    rel
}

#[test]
fn damaged_packs_are_named_with_the_snapshots_they_break() {
    for truncate in [false, true] {
        let s = Scratch::new();
        s.init();
        let data = s.path("data");
        make_tree(&data);
        let id = s.snapshot_dir(&data);
        let pack = damage_largest_pack(&s, truncate);
        let out = s.run(&["verify"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = fails(out, &["verify"]);
        assert!(err.contains("verify found"), "{err}");
        let problem = stdout
            .lines()
            .find(|l| l.starts_with("PROBLEM"))
            .unwrap_or_else(|| panic!("no PROBLEM line in {stdout}"));
        assert!(problem.contains(&pack), "{problem} should name {pack}");
        assert!(problem.contains(&id[..8]), "{problem} should name {id}");

        // Restoring fails instead of producing wrong data.
        let target = s.path("out");
        let err = s.fails(&[
            "snapshot",
            "restore",
            &id,
            "--target",
            &target.display().to_string(),
        ]);
        assert!(
            err.contains("corrupt") || err.contains("truncated"),
            "{err}"
        );
    }
}

#[test]
fn gc_frees_forgotten_data_and_keeps_the_rest() {
    let s = Scratch::new();
    s.init();
    let a = s.path("a");
    let b = s.path("b");
    fs::create_dir_all(&a).expect("mkdir");
    fs::create_dir_all(&b).expect("mkdir");
    fs::write(a.join("only-a"), realistic(40_000, 11)).expect("write");
    fs::write(b.join("only-b"), realistic(40_000, 12)).expect("write");
    fs::write(a.join("shared"), realistic(10_000, 13)).expect("write");
    fs::write(b.join("shared"), realistic(10_000, 13)).expect("write");
    let snap_a = s.snapshot_dir(&a);
    let snap_b = s.snapshot_dir(&b);
    let bytes_before: u64 = s
        .packs()
        .iter()
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();

    s.ok(&["snapshot", "forget", &snap_a]);
    let plan = s.json(&["gc", "--dry-run"]);
    let planned = plan["delete_packs"].as_array().map_or(0, Vec::len)
        + plan["repack_packs"].as_array().map_or(0, Vec::len);
    assert!(planned > 0, "gc plans nothing: {plan}");
    s.ok(&["gc"]);

    let bytes_after: u64 = s
        .packs()
        .iter()
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();
    assert!(
        bytes_after < bytes_before * 3 / 4,
        "gc kept {bytes_after} of {bytes_before} bytes"
    );
    s.ok(&["verify"]);
    s.ok(&[
        "snapshot",
        "restore",
        &snap_b,
        "--target",
        &s.path("out").display().to_string(),
    ]);
    assert_same_tree(&b, &s.path("out"));
    let err = s.fails(&["snapshot", "show", &snap_a]);
    assert!(err.contains("no snapshot"), "{err}");
}

#[test]
fn a_live_lock_blocks_gc_and_a_dead_one_does_not() {
    let s = Scratch::new();
    s.init();
    // A writer that holds its shared lock until its stdin closes.
    let mut writer = s
        .cmd(&["snapshot", "create", "--stdin", "--name", "slow"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn writer");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while files_under(&s.path("repo/locks")).is_empty() {
        assert!(std::time::Instant::now() < deadline, "writer never locked");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let err = s.fails(&["gc"]);
    assert!(err.contains("is locked by a shared lock"), "{err}");
    assert!(err.contains(&format!("pid {}", writer.id())), "{err}");
    assert!(err.contains("pgvault unlock"), "{err}");
    // `unlock` without --all leaves a live lock alone.
    s.ok(&["unlock"]);
    assert_eq!(files_under(&s.path("repo/locks")).len(), 1);

    drop(writer.stdin.take());
    let out = writer.wait_with_output().expect("writer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(files_under(&s.path("repo/locks")).is_empty());

    // A writer whose lock was removed under it (`unlock --all`) commits nothing.
    let mut writer = s
        .cmd(&["snapshot", "create", "--stdin", "--name", "orphan"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn writer");
    while files_under(&s.path("repo/locks")).is_empty() {
        assert!(std::time::Instant::now() < deadline, "writer never locked");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    s.ok(&["unlock", "--all"]);
    writer
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"some data")
        .expect("feed");
    let err = fails(
        writer.wait_with_output().expect("writer"),
        &["snapshot", "create"],
    );
    assert!(err.contains("lost the lock"), "{err}");
    assert_eq!(
        s.json(&["snapshot", "list"]).as_array().map(Vec::len),
        Some(1)
    );

    // A lock left by a process that no longer exists does not block anyone.
    let mut dead = Command::new("true").spawn().expect("spawn true");
    let dead_pid = dead.id();
    dead.wait().expect("wait");
    let lock = serde_json::json!({
        "kind": "exclusive",
        "hostname": gethostname(),
        "pid": dead_pid,
        "command": "pgvault gc",
        "created": "2026-01-01T00:00:00Z",
        "refreshed": chrono_now(),
    });
    fs::write(s.path("repo/locks/stale"), lock.to_string()).expect("write lock");
    s.ok(&["snapshot", "list"]);
    s.ok(&["gc"]);
}

fn gethostname() -> String {
    let out = Command::new("hostname").output().expect("hostname");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn chrono_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn keys_can_be_added_changed_and_removed_without_touching_data() {
    let s = Scratch::new();
    s.init();
    let data = s.path("data");
    make_tree(&data);
    let id = s.snapshot_dir(&data);
    let packs = s.packs();
    // Unattended runs (archive-push per segment) unlock once, then use the cached key.
    let cached = files_under(&s.path("key-cache"));
    assert_eq!(cached.len(), 1, "one cached key: {cached:?}");

    fs::write(s.path("second"), "second passphrase\n").expect("write");
    s.ok(&[
        "key",
        "add",
        "--new-passphrase-file",
        &s.path("second").display().to_string(),
    ]);
    let keys = s.json(&["key", "list"]);
    assert_eq!(keys.as_array().map(Vec::len), Some(2));

    // Change the first passphrase; the old one stops working, the data is untouched.
    fs::write(s.path("third"), "third passphrase\n").expect("write");
    s.ok(&[
        "key",
        "passwd",
        "--new-passphrase-file",
        &s.path("third").display().to_string(),
    ]);
    let err = s.fails(&["snapshot", "list"]);
    assert!(err.contains("wrong passphrase"), "{err}");
    let with = |file: &str, args: &[&str]| {
        let mut all = args.to_vec();
        let path = s.path(file).display().to_string();
        all.extend(["--passphrase-file", &path]);
        s.ok(&all)
    };
    assert!(with("third", &["snapshot", "list"]).contains(&id[..8]));
    assert_eq!(s.packs(), packs);

    // The key in use cannot be removed; another one can, but never the last.
    let keys = s.json(&[
        "key",
        "list",
        "--passphrase-file",
        &s.path("third").display().to_string(),
    ]);
    let current = keys
        .as_array()
        .expect("list")
        .iter()
        .find(|k| k["current"] == true)
        .expect("current key");
    let other = keys
        .as_array()
        .expect("list")
        .iter()
        .find(|k| k["current"] == false)
        .expect("other key");
    let current_id = current["id"].as_str().expect("id");
    let other_id = other["id"].as_str().expect("id");
    let out = s
        .cmd(&["key", "remove", current_id])
        .env("PGVAULT_PASSPHRASE_FILE", s.path("third"))
        .output()
        .expect("run");
    assert!(fails(out, &["key", "remove"]).contains("unlocked with"));
    with("third", &["key", "remove", &other_id[..8]]);
    let out = s
        .cmd(&["key", "remove", current_id])
        .env("PGVAULT_PASSPHRASE_FILE", s.path("second"))
        .output()
        .expect("run");
    assert!(fails(out, &["key", "remove"]).contains("wrong passphrase"));
    assert!(with("third", &["snapshot", "list"]).contains(&id[..8]));
}

#[test]
fn config_file_env_and_flags_follow_one_precedence() {
    let s = Scratch::new();
    let config = s.path("pgvault.toml");
    fs::write(
        &config,
        format!(
            "[repo]\nurl = \"{}\"\npassphrase-file = \"{}\"\ncompression = \"lz4\"\n",
            s.path("from-config").display(),
            s.path("passphrase").display()
        ),
    )
    .expect("config");
    let config_arg = config.display().to_string();
    let run = |extra_env: Option<&str>, flag: Option<&str>| {
        let mut cmd = s.cmd(&["init", "--output", "json", "--config", &config_arg]);
        cmd.env_remove("PGVAULT_REPO")
            .env_remove("PGVAULT_PASSPHRASE_FILE");
        if let Some(url) = extra_env {
            cmd.env("PGVAULT_REPO", url);
        }
        if let Some(url) = flag {
            cmd.args(["--repo", url]);
        }
        let out = cmd.output().expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let from_config = run(None, None);
    assert_eq!(
        from_config["repository"],
        s.path("from-config").display().to_string()
    );
    assert_eq!(from_config["compression"], "lz4");
    let env_url = s.path("from-env").display().to_string();
    assert_eq!(run(Some(&env_url), None)["repository"], env_url);
    let flag_url = s.path("from-flag").display().to_string();
    assert_eq!(run(Some(&env_url), Some(&flag_url))["repository"], flag_url);

    fs::write(&config, "[repo]\nurl = \"/x\"\ncompresion = \"lz4\"\n").expect("config");
    let err = s.fails(&["snapshot", "list", "--config", &config_arg]);
    assert!(
        err.contains("line 3") && err.contains("compresion"),
        "{err}"
    );
    let err = s.fails(&[
        "snapshot",
        "list",
        "--config",
        &s.path("absent.toml").display().to_string(),
    ]);
    assert!(err.contains("cannot read config file"), "{err}");
}

/// A relative `--repo` path is a path whatever its name, also without a config file (whose
/// implicit repository is named `repo`).
#[test]
fn a_relative_repository_path_named_like_a_repository_is_a_path() {
    let s = Scratch::new();
    fs::create_dir_all(s.path("work")).expect("mkdir");
    let out = s
        .cmd(&["--repo", "repo", "init"])
        .current_dir(s.path("work"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.path("work/repo/config").exists());
}

#[test]
fn bad_arguments_get_one_line_errors() {
    let s = Scratch::new();
    let err = s.fails(&["init", "--encryption", "rot13"]);
    assert!(err.contains("unknown encryption"), "{err}");
    let err = s.fails(&["init", "--compression", "zstd:99"]);
    assert!(err.contains("zstd"), "{err}");
    let err = s.fails(&["snapshot", "list", "--repo", "ftp://host/x"]);
    assert!(err.contains("not supported"), "{err}");
    s.init();
    let err = s.fails(&["verify", "--read-data-subset", "250%"]);
    assert!(err.contains("--read-data-subset"), "{err}");
    let err = s.fails(&["snapshot", "restore", "abcd", "--target", "/tmp/x"]);
    assert!(err.contains("no snapshot with id abcd"), "{err}");
    let err = s.fails(&[
        "snapshot",
        "create",
        "--path",
        &s.path("nope").display().to_string(),
    ]);
    assert!(err.contains("cannot open directory"), "{err}");
}

#[test]
fn restore_refuses_a_non_empty_target() {
    let s = Scratch::new();
    s.init();
    let data = s.path("data");
    make_tree(&data);
    let id = s.snapshot_dir(&data);
    let target = s.path("busy");
    fs::create_dir_all(&target).expect("mkdir");
    fs::write(target.join("keep-me"), "precious").expect("write");
    let err = s.fails(&[
        "snapshot",
        "restore",
        &id,
        "--target",
        &target.display().to_string(),
    ]);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(fs::read(target.join("keep-me")).expect("read"), b"precious");
}

/// Mounts a small tmpfs so that a write runs out of space for real.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Result<SmallDisk, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("disk");
        fs::create_dir(&path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk { path, _dir: dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[test]
fn a_full_disk_fails_cleanly_and_keeps_what_was_stored() {
    let disk = match SmallDisk::mount("8m") {
        Ok(disk) => disk,
        Err(reason) if testkit::in_ci() => {
            panic!("full-disk test needs tmpfs under CI=true: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIP a_full_disk_fails_cleanly: {reason}");
            return;
        }
    };
    let s = Scratch::new();
    let repo = disk.path.join("repo").display().to_string();
    let with_repo = |args: &[&str]| {
        let mut cmd = s.cmd(args);
        cmd.env("PGVAULT_REPO", &repo);
        cmd
    };
    assert!(with_repo(&["init"]).status().expect("init").success());
    let small = s.path("small");
    fs::create_dir_all(&small).expect("mkdir");
    fs::write(small.join("f"), realistic(5_000, 3)).expect("write");
    let out = with_repo(&["snapshot", "create", "--path", &small.display().to_string()])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // Incompressible data larger than the disk.
    let big = s.path("big");
    fs::create_dir_all(&big).expect("mkdir");
    let mut noise = vec![0u8; 24 << 20];
    let mut x = 0x9e3779b97f4a7c15u64;
    for chunk in noise.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    fs::write(big.join("noise"), noise).expect("write");
    let out = with_repo(&["snapshot", "create", "--path", &big.display().to_string()])
        .output()
        .expect("run");
    let err = fails(out, &["snapshot", "create"]);
    assert!(err.contains("space"), "{err}");

    // The earlier snapshot is intact and still the only one.
    let out = with_repo(&["snapshot", "list", "--output", "json"])
        .output()
        .expect("run");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["id"], first);
    let target = s.path("out");
    let out = with_repo(&[
        "snapshot",
        "restore",
        &first,
        "--target",
        &target.display().to_string(),
    ])
    .output()
    .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&small, &target);
}

#[test]
fn unreachable_storage_fails_after_retries_with_a_hint() {
    let s = Scratch::new();
    let port = testkit::free_port();
    let out = s
        .cmd(&["snapshot", "list", "--repo", "s3://bucket/prefix"])
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .expect("run");
    let err = fails(out, &["snapshot", "list"]);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("storage endpoint is reachable"), "{err}");
}

#[test]
fn s3_repository_round_trip() {
    let Some(moto) = testkit::s3::moto() else {
        eprintln!("SKIP s3_repository_round_trip: no moto server");
        return;
    };
    let bucket = "pgvault-cli";
    moto.create_bucket(bucket).expect("bucket");
    let s = Scratch::new();
    let url = format!("s3://{bucket}/{}", testkit::unique("cli"));
    round_trip(&s, |args| {
        let mut cmd = s.cmd(args);
        cmd.env("PGVAULT_REPO", &url)
            .env("AWS_ENDPOINT_URL", moto.endpoint())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1");
        cmd.output().expect("run")
    });
    // Snapshot and index objects were kept locally; the forgotten snapshot's copy went
    // with it (gc listed the snapshots after the forget).
    let copies: Vec<String> = files_under(&s.path("object-cache"))
        .iter()
        .map(|p| {
            p.strip_prefix(s.path("object-cache"))
                .expect("under")
                .display()
                .to_string()
        })
        .collect();
    assert!(copies.iter().any(|c| c.contains("/index/")), "{copies:?}");
    assert!(
        !copies.iter().any(|c| c.contains("/snapshots/")),
        "{copies:?}"
    );
}

/// An Azure Blob repository (Azurite), its connection string from a file named in the
/// config: init, snapshot, verify, restore, forget, gc — and a missing container named.
#[test]
fn azblob_repository_round_trip() {
    let Some(azurite) = testkit::azurite::azurite() else {
        return;
    };
    azurite.create_container("pgvault-cli").expect("container");
    let s = Scratch::new();
    fs::write(
        s.path("azure"),
        format!("{}\n", azurite.connection_string()),
    )
    .expect("write");
    let config = s.path("pgvault.toml");
    let write_config = |url: &str| {
        fs::write(
            &config,
            format!(
                "[repo]\nurl = \"{url}\"\nazure-connection-string-file = \"{}\"\n",
                s.path("azure").display()
            ),
        )
        .expect("config")
    };
    write_config(&format!("azblob://pgvault-cli/{}", testkit::unique("cli")));
    round_trip(&s, |args| run_with_config(&s, &config, args));

    write_config("azblob://no-such-container/x");
    let out = run_with_config(&s, &config, &["init"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("container no-such-container does not exist"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
}

fn run_with_config(s: &Scratch, config: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = s.cmd(args);
    cmd.env_remove("PGVAULT_REPO")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env("PGVAULT_CONFIG", config);
    cmd.output().expect("run")
}

/// init, snapshot, verify, restore (compared), forget, gc, verify, each through `run`.
fn round_trip(s: &Scratch, run: impl Fn(&[&str]) -> std::process::Output) {
    let ok = |args: &[&str]| {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["init"]);
    let data = s.path("data");
    make_tree(&data);
    let id = ok(&["snapshot", "create", "--path", &data.display().to_string()]);
    let id = id.trim();
    ok(&["verify"]);
    ok(&[
        "snapshot",
        "restore",
        id,
        "--target",
        &s.path("out").display().to_string(),
    ]);
    assert_same_tree(&data, &s.path("out"));
    ok(&["snapshot", "forget", id]);
    ok(&["gc"]);
    ok(&["verify"]);
}

/// A gcs:// repository on the loopback GCS emulator: the same round trip as the other
/// object stores.
#[test]
fn gcs_repository_round_trip() {
    let Some(server) = testkit::gcs::fake_gcs() else {
        return;
    };
    server.create_bucket("pgvault-cli").expect("bucket");
    let s = Scratch::new();
    let config = s.path("pgvault.toml");
    fs::write(
        &config,
        format!(
            "[repo]\nurl = \"gcs://pgvault-cli/{}\"\ngcs-endpoint = \"{}\"\n",
            testkit::unique("cli"),
            server.endpoint()
        ),
    )
    .expect("config");
    round_trip(&s, |args| run_with_config(&s, &config, args));
}

#[test]
fn help_lists_a_commands_own_options_before_the_global_ones() {
    let s = Scratch::new();
    let help = s.ok(&["restore", "--help"]);
    let own = help
        .find("--target-time")
        .expect("restore's own option listed");
    let heading = help
        .find("Global options:")
        .expect("a heading for the global options");
    let global = help
        .find("--passphrase-file")
        .expect("global option listed");
    assert!(
        own < heading && heading < global,
        "restore --help mixes its own options with the global ones:\n{help}"
    );
}

#[test]
fn a_bad_choice_is_one_error_line_naming_the_choices() {
    let s = Scratch::new();
    let out = s.run(&[
        "restore",
        "--pgdata",
        "/nonexistent",
        "--archive-mode",
        "maybe",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim().lines().collect::<Vec<_>>(),
        ["error: invalid value \"maybe\" for --archive-mode <ARCHIVE_MODE>: use preserve or off"],
        "{stderr}"
    );
}
