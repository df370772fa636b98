//! WAL archiving end to end: a real PostgreSQL archives through `pgvault archive-push`,
//! and a second server recovers purely through `pgvault archive-get` — on a local
//! repository and on the loopback S3 server. Plus the faults: wrong cluster, damaged and
//! missing segments, conflicting content, unreachable storage, kill -9, races, a deleted
//! spool.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::pg::{Cluster, ClusterOptions};

mod common;
use common::*;

/// Every archived segment in pg_wal comes back bit-identical through archive-get.
fn compare_archived_segments(setup: &Setup, cluster: &Cluster) -> usize {
    let status = cluster.pgdata().join("pg_wal/archive_status");
    let mut compared = 0;
    for entry in fs::read_dir(&status).expect("archive_status") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(segment) = name.strip_suffix(".done") else {
            continue;
        };
        let source = cluster.pgdata().join("pg_wal").join(segment);
        let Ok(original) = fs::read(&source) else {
            continue; // recycled since
        };
        let fetched = setup.path(&format!("fetched-{segment}"));
        setup.ok(&["archive-get", segment, &fetched.display().to_string()]);
        assert!(
            fs::read(&fetched).expect("fetched") == original,
            "{segment} differs"
        );
        compared += 1;
    }
    compared
}

fn end_to_end(setup: &Setup, asynchronous: bool) {
    let Some(mut primary) = archiving_cluster() else {
        return;
    };
    setup.write_config(asynchronous);
    setup.setup_cluster(&primary);
    let command = primary.psql("SHOW archive_command");
    assert!(command.contains("--config"), "{command}");
    let check = setup.ok(&["check", "--pg-conn", &primary.conninfo()]);
    assert!(check.contains("WAL archiving works"), "{check}");

    // A base backup without WAL, so that recovery must use restore_command.
    let backup = primary.dir().join("base");
    let out = primary.run_as_postgres(
        &primary.bin().tool("pg_basebackup"),
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port().to_string(),
            "-U",
            "postgres",
            "-D",
            &backup.display().to_string(),
            "-X",
            "none",
            "-c",
            "fast",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let last = make_wal(&primary, 6);
    let expected =
        primary.psql("SELECT sum(abalance)::text || '/' || count(*) FROM pgbench_accounts");
    let history_rows = primary.psql("SELECT count(*) FROM pgbench_history");
    // The last transaction must be in an archived segment.
    let last = {
        let after = primary.psql("SELECT pg_walfile_name(pg_switch_wal())");
        if after > last {
            after
        } else {
            last
        }
    };
    wait_archived(&primary, &last);
    let compared = compare_archived_segments(setup, &primary);
    assert!(compared >= 5, "only {compared} segments compared");

    // A missing segment: exit 1 and nothing on stderr, so PostgreSQL falls back quietly.
    let out = setup.run(&["archive-get", "00000001000000FF000000FE", "/tmp/never"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Recovery purely from the archive.
    let restore_command = primary
        .psql("SHOW archive_command")
        .replace("archive-push %p", "archive-get %f \"%p\"");
    let mut replica = Cluster::from_backup(
        &primary,
        &backup,
        &[
            ("restore_command", restore_command.as_str()),
            ("recovery_target_action", "promote"),
            ("archive_mode", "off"),
        ],
    )
    .expect("replica");
    let deadline = Instant::now() + Duration::from_secs(120);
    while replica.psql("SELECT pg_is_in_recovery()") == "t" {
        assert!(Instant::now() < deadline, "recovery did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        replica.psql("SELECT sum(abalance)::text || '/' || count(*) FROM pgbench_accounts"),
        expected
    );
    assert_eq!(
        replica.psql("SELECT count(*) FROM pgbench_history"),
        history_rows
    );
    // The promotion started timeline 2: its history file and segments are kept apart from
    // timeline 1's and served back as archived.
    let history = replica.pgdata().join("pg_wal/00000002.history");
    let tl2_segment = replica.psql("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(tl2_segment.starts_with("00000002"), "{tl2_segment}");
    for file in [history, replica.pgdata().join("pg_wal").join(&tl2_segment)] {
        setup.ok(&["archive-push", &file.display().to_string()]);
        let name = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let fetched = setup.path(&format!("fetched-{name}"));
        setup.ok(&["archive-get", &name, &fetched.display().to_string()]);
        assert!(fs::read(&fetched).expect("fetched") == fs::read(&file).expect("source"));
    }
    // Timeline 1's segment of the same number is a different file.
    let tl1_twin = format!("00000001{}", &tl2_segment[8..]);
    let out = setup.run(&["archive-get", &tl1_twin, "/tmp/never"]);
    assert!(
        out.status.code() == Some(1) || out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if setup.is_local() {
        let timelines: Vec<String> = fs::read_dir(setup.path("repo/files/wal/main"))
            .expect("wal dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            timelines.contains(&"00000001".to_string())
                && timelines.contains(&"00000002".to_string()),
            "{timelines:?}"
        );
    }
    // Recovery asked for segment after segment: the prefetcher was engaged.
    assert!(prefetch_dirs(setup).iter().any(|d| d.join("want").exists()));
    replica.stop();
    primary.stop();
}

#[test]
fn archive_and_recover_through_a_local_repository() {
    end_to_end(&Setup::local(), false);
}

#[test]
fn archive_and_recover_asynchronously() {
    end_to_end(&Setup::local(), true);
}

#[test]
fn archive_and_recover_through_s3() {
    let Some(setup) = Setup::s3() else {
        eprintln!("SKIP archive_and_recover_through_s3: no moto server");
        return;
    };
    end_to_end(&setup, false);
}

/// A finished segment copied out of a running cluster, with its name.
/// The prefetch directories of `setup`'s spool for cluster main (one per repository).
fn prefetch_dirs(setup: &Setup) -> Vec<PathBuf> {
    (fs::read_dir(setup.path("spool/main/archive-in")).into_iter())
        .flatten()
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.is_dir())
        .collect()
}

/// Two databases, both cluster "main", each with a repository of its own, whose configs
/// name one spool path (as two with the default path do): their WAL has the same names.
fn two_of_one_name(asynchronous: bool) -> Option<(Setup, Cluster, Setup, Cluster)> {
    let first = Setup::local();
    let second = Setup::local();
    let (a, b) = (archiving_cluster()?, archiving_cluster()?);
    first.write_config(asynchronous);
    second.write_config(asynchronous);
    let config = fs::read_to_string(second.path("pgvault.toml")).expect("config");
    let spool = |s: &Setup| s.path("spool").display().to_string();
    fs::write(
        second.path("pgvault.toml"),
        config.replace(&spool(&second), &spool(&first)),
    )
    .expect("config");
    first.setup_cluster(&a);
    second.setup_cluster(&b);
    Some((first, a, second, b))
}

/// `segment` fetched from `setup`'s repository carries `cluster`'s system identifier.
fn assert_archived_by(setup: &Setup, segment: &str, cluster: &Cluster) {
    let fetched = setup.path("fetched");
    let _ = fs::remove_file(&fetched);
    setup.ok(&["archive-get", segment, &fetched.display().to_string()]);
    let data = fs::read(&fetched).expect("fetched segment");
    let system_id = u64::from_le_bytes(data[24..32].try_into().expect("long page header"));
    let expected = cluster.psql("SELECT system_identifier FROM pg_control_system()");
    assert_eq!(
        system_id.to_string(),
        expected,
        "{segment} of another database"
    );
}

#[test]
fn two_servers_of_one_name_push_asynchronously_through_one_spool() {
    let Some((first, a, second, b)) = two_of_one_name(true) else {
        return;
    };
    // The first server's worker is busy when the second one's pushes start.
    let a_first = make_wal(&a, 1);
    wait_archived(&a, &a_first);
    let (a_last, b_last) = std::thread::scope(|s| {
        let busy = s.spawn(|| make_wal(&a, 4));
        let b_last = make_wal(&b, 2);
        (busy.join().expect("first workload"), b_last)
    });
    wait_archived(&a, &a_last);
    wait_archived(&b, &b_last);
    // Each push was answered by a worker of its own server: none timed out.
    for cluster in [&a, &b] {
        let failed = cluster.psql("SELECT failed_count FROM pg_stat_archiver");
        assert_eq!(failed, "0", "{}", cluster.log_tail());
    }
    let common = a_last.min(b_last);
    assert_archived_by(&first, &common, &a);
    assert_archived_by(&second, &common, &b);
}

#[test]
fn prefetched_segments_of_another_repository_are_never_served() {
    let Some((first, a, second, b)) = two_of_one_name(false) else {
        return;
    };
    let a_last = make_wal(&a, 3);
    let b_last = make_wal(&b, 3);
    wait_archived(&a, &a_last);
    wait_archived(&b, &b_last);
    let last = a_last.min(b_last);
    let number = u32::from_str_radix(&last[16..], 16).expect("segment number");
    let before = format!("{}{:08X}", &last[..16], number - 1);

    // Recovery from the first repository asks for `before`; its worker prefetches `last`.
    first.ok(&[
        "archive-get",
        &before,
        &first.path("before").display().to_string(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(walk(&first.path("spool/main/archive-in")).iter()).any(|p| p.ends_with(&last)) {
        assert!(Instant::now() < deadline, "{last} was not prefetched");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Recovery from the second repository asks for `last`: it gets its own database's.
    assert_archived_by(&second, &last, &b);
    assert_eq!(
        prefetch_dirs(&first).len(),
        2,
        "one directory per repository"
    );

    // A prefetch directory deleted under its running worker stays deleted: the worker
    // ends rather than making it again.
    let spool = first.path("spool/main");
    fs::remove_dir_all(&spool).expect("rm spool");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !spool.exists(),
        "the prefetch worker made {} again",
        spool.display()
    );
}

fn sample_segment(cluster: &Cluster) -> (String, Vec<u8>) {
    let name = make_wal(cluster, 1);
    let data = fs::read(cluster.pgdata().join("pg_wal").join(&name)).expect("segment");
    (name, data)
}

#[test]
fn bad_segments_and_wrong_clusters_are_refused() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    let (name, data) = sample_segment(&cluster);
    let work = setup.path("work");
    fs::create_dir_all(&work).expect("mkdir");

    // Truncated.
    let truncated = work.join(&name);
    fs::write(&truncated, &data[..data.len() / 2]).expect("write");
    let err = setup.fails(&["archive-push", &truncated.display().to_string()]);
    assert!(err.contains(&name) && err.contains("bytes"), "{err}");

    // Missing.
    let err = setup.fails(&[
        "archive-push",
        &work.join("000000010000000000000099").display().to_string(),
    ]);
    assert!(err.contains("cannot read"), "{err}");

    // Not a WAL file name.
    fs::write(work.join("notes.txt"), "x").expect("write");
    let err = setup.fails(&[
        "archive-push",
        &work.join("notes.txt").display().to_string(),
    ]);
    assert!(err.contains("not a WAL"), "{err}");

    // A segment of another cluster: different system identifier.
    let Some(other) = archiving_cluster() else {
        return;
    };
    let (other_name, other_data) = sample_segment(&other);
    let foreign = work.join(&other_name);
    fs::write(&foreign, &other_data).expect("write");
    let err = setup.fails(&["archive-push", &foreign.display().to_string()]);
    assert!(err.contains("system identifier"), "{err}");

    // The same segment twice is fine; different content under its name fails loudly.
    let good = work.join(&name);
    fs::write(&good, &data).expect("write");
    setup.ok(&["archive-push", &good.display().to_string()]);
    setup.ok(&["archive-push", &good.display().to_string()]);
    let mut altered = data.clone();
    let last = altered.len() - 100;
    altered[last] ^= 0xff;
    fs::write(&good, &altered).expect("write");
    let err = setup.fails(&["archive-push", &good.display().to_string()]);
    assert!(
        err.contains("different content") && err.matches("checksum").count() >= 2,
        "{err}"
    );

    // A second cluster cannot register under the same name.
    let err = setup.fails(&["setup", "--pg-conn", &other.conninfo()]);
    assert!(err.contains("system identifier"), "{err}");
}

#[test]
fn kill_9_and_concurrent_pushes_leave_one_good_copy() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    let work = setup.path("work");
    fs::create_dir_all(&work).expect("mkdir");
    let mut segments = Vec::new();
    for _ in 0..4 {
        let (name, data) = sample_segment(&cluster);
        fs::write(work.join(&name), &data).expect("write");
        segments.push((name, data));
    }
    // kill -9 at different moments, then retry.
    for (i, (name, data)) in segments.iter().enumerate() {
        let path = work.join(name).display().to_string();
        let mut child = setup.cmd(&["archive-push", &path]).spawn().expect("spawn");
        std::thread::sleep(Duration::from_millis(5 + 15 * i as u64));
        let _ = child.kill();
        let _ = child.wait();
        setup.ok(&["archive-push", &path]);
        let fetched = setup.path(&format!("got-{name}"));
        setup.ok(&["archive-get", name, &fetched.display().to_string()]);
        assert!(
            fs::read(&fetched).expect("read") == *data,
            "{name} differs after kill -9"
        );
    }
    // Two pushes of one segment at once both succeed.
    let (name, data) = sample_segment(&cluster);
    let path = work.join(&name);
    fs::write(&path, &data).expect("write");
    let path = path.display().to_string();
    let children: Vec<_> = (0..2)
        .map(|_| {
            setup
                .cmd(&["archive-push", &path])
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stored: Vec<_> = walk(&setup.path("repo/files/wal"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == name))
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn unreachable_repository_fails_fast_and_acknowledges_nothing() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    let (name, data) = sample_segment(&cluster);
    let work = setup.path("work");
    fs::create_dir_all(&work).expect("mkdir");
    fs::write(work.join(&name), &data).expect("write");
    let started = Instant::now();
    let out = setup
        .cmd(&["archive-push", &work.join(&name).display().to_string()])
        .args(["--repo", "s3://nowhere/x"])
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", testkit::free_port()),
        )
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("storage endpoint is reachable"), "{stderr}");
}

#[test]
fn async_push_survives_a_deleted_spool() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.write_config(true);
    setup.setup_cluster(&cluster);
    let first = make_wal(&cluster, 2);
    wait_archived(&cluster, &first);
    fs::remove_dir_all(setup.path("spool/main")).expect("rm spool");
    let later = make_wal(&cluster, 3);
    wait_archived(&cluster, &later);
    assert!(compare_archived_segments(&setup, &cluster) >= 4);
}

/// `setup --apply` and `check` on every supported major version: the archiver of each
/// really pushes through pgvault, which validates each version's page magic.
#[test]
fn every_supported_major_version_archives() {
    for &major in testkit::pg::MAJORS {
        let setup = Setup::local();
        let options = ClusterOptions {
            major,
            settings: vec![
                ("wal_level".into(), "replica".into()),
                ("archive_mode".into(), "on".into()),
            ],
            ..ClusterOptions::default()
        };
        let cluster = match Cluster::start(options) {
            Ok(cluster) => cluster,
            Err(reason) => {
                testkit::pg::skip_or_panic(&reason);
                continue;
            }
        };
        let out = setup.ok(&["setup", "--apply", "--pg-conn", &cluster.conninfo()]);
        assert!(out.contains(&format!("PostgreSQL {major}.")), "{out}");
        setup.give_to_postgres();
        let check = setup.ok(&["check", "--pg-conn", &cluster.conninfo()]);
        assert!(
            check.contains("WAL archiving works"),
            "PostgreSQL {major}: {check}"
        );
        let (name, data) = sample_segment(&cluster);
        wait_archived(&cluster, &name);
        let fetched = setup.path("fetched");
        setup.ok(&["archive-get", &name, &fetched.display().to_string()]);
        assert!(
            fs::read(&fetched).expect("fetched") == data,
            "PostgreSQL {major}: {name} differs"
        );
    }
}

/// Makes the repository unwritable for the archiver (which runs as `postgres`), or
/// writable again.
fn repository_writable(setup: &Setup, writable: bool) {
    let mode = if writable { "u+w" } else { "a-w" };
    let status = Command::new("chmod")
        .args(["-R", mode])
        .arg(setup.path("repo"))
        .status()
        .expect("chmod");
    assert!(status.success());
}

/// Switches WAL (with a little activity first) until the archiver reports `segment`.
fn nudge_until_archived(cluster: &Cluster, segment: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let archived = cluster.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
        if archived.as_str() >= segment {
            return true;
        }
        cluster.psql("CREATE TABLE IF NOT EXISTS nudge(x int); INSERT INTO nudge VALUES (1)");
        cluster.psql("SELECT pg_switch_wal()");
        std::thread::sleep(Duration::from_millis(500));
    }
    false
}

/// Async archiving against a repository that stops accepting writes: by default the
/// segments keep failing (PostgreSQL keeps them in pg_wal) and nothing is acknowledged;
/// with archive-push-queue-max they are dropped with errors once more than that waits.
#[test]
fn async_push_keeps_failing_or_drops_beyond_the_queue_max() {
    for queue_max in [None, Some("40MiB")] {
        let setup = Setup::local();
        let Some(cluster) = archiving_cluster() else {
            return;
        };
        let extra = queue_max
            .map(|max| format!("archive-push-queue-max = \"{max}\"\n"))
            .unwrap_or_default();
        setup.write_config_with(true, &extra);
        setup.setup_cluster(&cluster);
        let first = make_wal(&cluster, 1);
        wait_archived(&cluster, &first);

        repository_writable(&setup, false);
        let blocked = make_wal(&cluster, 4);
        let reached = nudge_until_archived(&cluster, &blocked, Duration::from_secs(40));
        let log = (walk(&setup.path("spool/main/archive-out")).iter())
            .find(|p| p.ends_with("worker.log"))
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default();
        match queue_max {
            None => {
                assert!(
                    !reached,
                    "{blocked} acknowledged although the repository refused it"
                );
                let failed: u64 = cluster
                    .psql("SELECT failed_count FROM pg_stat_archiver")
                    .parse()
                    .expect("failed_count");
                assert!(failed > 0, "the archiver saw no failure");
                assert!(!log.contains("dropped"), "{log}");
                assert!(
                    cluster.pgdata().join("pg_wal").join(&blocked).exists(),
                    "{blocked} left pg_wal unarchived"
                );
            }
            Some(_) => {
                assert!(reached, "{blocked} was not dropped; worker log:\n{log}");
                assert!(log.contains("archive-push-queue-max"), "{log}");
                let out = setup.run(&["archive-get", &blocked, "/tmp/never"]);
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "{blocked} should not be archived"
                );
            }
        }

        // Writable again: archiving resumes without intervention.
        repository_writable(&setup, true);
        let later = make_wal(&cluster, 1);
        assert!(
            nudge_until_archived(&cluster, &later, Duration::from_secs(90)),
            "archiving did not resume; pg_stat_archiver: {}",
            cluster.psql("SELECT * FROM pg_stat_archiver")
        );
        let fetched = setup.path("later");
        setup.ok(&["archive-get", &later, &fetched.display().to_string()]);
        if queue_max.is_none() {
            // Nothing was dropped: the blocked segment arrived too.
            setup.ok(&["archive-get", &blocked, &fetched.display().to_string()]);
        }
    }
}

/// `setup` and `check` name what is wrong: no server, archiving not configured,
/// archive_mode off, a cluster that was never set up.
#[test]
fn setup_and_check_name_what_is_wrong() {
    let setup = Setup::local();
    let nowhere = format!(
        "host=127.0.0.1 port={} user=postgres connect_timeout=3",
        testkit::free_port()
    );
    let err = setup.fails(&["setup", "--pg-conn", &nowhere]);
    assert!(
        err.contains("cannot connect to PostgreSQL at host=127.0.0.1"),
        "{err}"
    );
    let err = setup.fails(&["setup", "--pg-conn", "hots=x"]);
    assert!(err.contains("unknown keyword \"hots\""), "{err}");

    let options = ClusterOptions {
        settings: vec![("archive_mode".into(), "off".into())],
        ..ClusterOptions::default()
    };
    let cluster = match Cluster::start(options) {
        Ok(cluster) => cluster,
        Err(reason) => {
            testkit::pg::skip_or_panic(&reason);
            return;
        }
    };
    let err = setup.fails(&["check", "--pg-conn", &cluster.conninfo()]);
    assert!(
        err.contains("not set up") && err.contains("pgvault setup"),
        "{err}"
    );
    // Without --apply, setup registers and prints, but changes nothing.
    let out = setup.ok(&["setup", "--pg-conn", &cluster.conninfo()]);
    assert!(
        out.contains("archive_command = '") && out.contains("archive-push %p"),
        "{out}"
    );
    assert!(out.contains("archive_mode is off"), "{out}");
    // A relative path on the command line becomes absolute in the archive_command, which
    // PostgreSQL runs in its data directory.
    let out = setup
        .cmd(&[
            "--passphrase-file",
            "passphrase",
            "setup",
            "--pg-conn",
            &cluster.conninfo(),
        ])
        .current_dir(setup.path(""))
        .output()
        .expect("run setup");
    let printed = String::from_utf8_lossy(&out.stdout);
    let absolute = format!("--passphrase-file {}", setup.path("passphrase").display());
    assert!(printed.contains(&absolute), "{printed}");
    let err = setup.fails(&["check", "--pg-conn", &cluster.conninfo()]);
    assert!(err.contains("archive_mode is off"), "{err}");
    // --apply sets archive_mode and says a restart is needed; check then wants it.
    let out = setup.ok(&["setup", "--apply", "--pg-conn", &cluster.conninfo()]);
    assert!(out.contains("restart PostgreSQL"), "{out}");
    assert_eq!(
        cluster.psql(
            "SELECT setting FROM pg_file_settings WHERE name = 'archive_mode' AND sourcefile LIKE '%postgresql.auto.conf'"
        ),
        "on"
    );
}

/// An archive_command that succeeds but pushes to another repository (a copied
/// archive_command, another config file) is named as such by `check` and `backup`, which
/// would otherwise say only that the archiver is not failing.
#[test]
fn an_archive_command_that_pushes_elsewhere_is_named() {
    let (here, elsewhere) = (Setup::local(), Setup::local());
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    elsewhere.setup_cluster(&cluster);
    here.ok(&["setup", "--pg-conn", &cluster.conninfo()]);
    let err = here.fails(&["check", "--pg-conn", &cluster.conninfo(), "--timeout", "3s"]);
    assert!(
        err.contains("did not arrive within 3s")
            && err.contains("archive_command sends WAL somewhere else"),
        "{err}"
    );
    let pgdata = cluster.pgdata().display().to_string();
    let err = here.fails(&[
        "backup",
        "--fast",
        "--pg-conn",
        &cluster.conninfo(),
        "--pgdata",
        &pgdata,
        "--wal-timeout",
        "3s",
    ]);
    assert!(
        err.contains("did not reach the repository within 3s")
            && err.contains("was not recorded")
            && err.contains("archive_command sends WAL somewhere else"),
        "{err}"
    );
}

/// Each pgvault process ends the SSH connection it opened: archive_command runs one
/// process per segment, and a connection left behind each time would pile up ssh
/// processes here and sessions on the backup server.
#[test]
fn sftp_connections_end_with_their_process() {
    let Some(setup) = Setup::sftp() else {
        return;
    };
    setup.ok(&["info"]);
    let key = setup.path("sftp_key").display().to_string();
    let gone = testkit::wait_until(Duration::from_secs(30), || {
        processes_naming(&key).is_empty()
    });
    assert!(
        gone,
        "ssh processes left behind: {:?}",
        processes_naming(&key)
    );
}
