//! Physical backup and point-in-time restore against real PostgreSQL servers: restores
//! to a time, an LSN, a transaction (also excluding it) and a restore point (also
//! pausing there) are started and judged by PostgreSQL's own tools (`pg_checksums
//! --check`, `pg_amcheck --heapallindexed`) and by comparing data with the source at the
//! target (before 14, which has neither pg_amcheck nor heap checks in amcheck:
//! `bt_index_check` with `heapallindexed` and a checksum-verifying read of every block).
//! On every major from 12 to 18. Plus backups taken under write load and DDL, corrupted
//! pages, unlogged tables, tablespaces, standbys, S3, SFTP, Azure, WAL segments of 1 and
//! 64 MiB, data checksums off (and enabled later), killed backups, memory with many
//! files, and the refusals.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use testkit::pg::{Cluster, ClusterOptions, PgBin};

mod common;
use common::*;

/// The state of the pgbench tables, for comparing a restore with the source.
fn state(cluster: &Cluster) -> String {
    cluster.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::text || '/' || \
         (SELECT count(*) FROM pgbench_history)::text || '/' || \
         (SELECT count(*) FROM marks)::text",
    )
}

fn pgbench(cluster: &Cluster, args: &[&str]) {
    let port = cluster.port().to_string();
    let mut all = vec!["-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
    all.extend_from_slice(args);
    all.push("postgres");
    let out = cluster.run_as_postgres(&cluster.bin().tool("pgbench"), &all);
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pgvault backup --fast` of the cluster with a JSON report, then `extra`.
/// 1 while a backup's session is past its start call: the files are being read.
const BACKUP_READING: &str = "SELECT count(*) FROM pg_stat_activity \
    WHERE application_name = 'pgvault' AND state = 'idle' AND (query LIKE '%pg_backup_start%' \
    OR query LIKE '%pg_start_backup%' OR query LIKE '%pg_database_size%')";

fn backup_args(cluster: &Cluster, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["backup", "--fast", "--output", "json", "--pg-conn"]
        .map(String::from)
        .to_vec();
    args.push(cluster.conninfo());
    args.push("--pgdata".into());
    args.push(cluster.pgdata().display().to_string());
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args
}

fn backup(setup: &Setup, cluster: &Cluster, extra: &[&str]) -> serde_json::Value {
    let args = backup_args(cluster, extra);
    let out = setup.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    serde_json::from_str(&out).expect("backup JSON")
}

/// `pgvault restore --pgdata <scratch dir> extra...`, which must fail: its error line.
fn restore_fails(setup: &Setup, dir: &str, extra: &[&str]) -> String {
    let pgdata = setup.path(dir).display().to_string();
    let mut args = vec!["restore", "--pgdata", &pgdata];
    args.extend_from_slice(extra);
    setup.fails(&args)
}

/// Restores into a fresh directory and starts the server there; waits for promotion.
fn restore_and_start(setup: &Setup, bin: &PgBin, extra: &[&str]) -> Cluster {
    let cluster = restore_with_action(setup, bin, "promote", extra);
    cluster.wait_promoted(Duration::from_secs(120));
    cluster
}

/// Backup `id` restored to its end and started, not archiving (a check copy must not
/// push a timeline of its own into the source's archive).
fn check_copy(setup: &Setup, bin: &PgBin, id: &str) -> Cluster {
    check_copy_with(setup, bin, id, &[])
}

/// [`check_copy`] with more restore options.
fn check_copy_with(setup: &Setup, bin: &PgBin, id: &str, extra: &[&str]) -> Cluster {
    let mut args = vec![
        "--backup",
        id,
        "--target",
        "immediate",
        "--archive-mode",
        "off",
    ];
    args.extend_from_slice(extra);
    restore_and_start(setup, bin, &args)
}

/// Restores into a fresh directory with `--target-action action` and starts the server.
fn restore_with_action(setup: &Setup, bin: &PgBin, action: &str, extra: &[&str]) -> Cluster {
    let (dir, pgdata) = new_data_directory("pgvault-restored-");
    // Earlier restores of this test promoted and archived new timelines into the same
    // repository: stay on the backup's timeline, as the targets are on it.
    let mut args = vec![
        "restore",
        "--pgdata",
        &pgdata,
        "--target-action",
        action,
        "--target-timeline",
        "current",
    ];
    args.extend_from_slice(extra);
    setup.ok(&args);
    assert!(Path::new(&pgdata).join("backup_label").exists());
    Cluster::adopt(bin.clone(), dir).expect("start the restored server")
}

/// PostgreSQL's own judges: amcheck of every database on the running server, then
/// pg_checksums on the stopped one.
fn judge(cluster: &mut Cluster) {
    if cluster.major() < 14 {
        judge_before_14(cluster);
        return;
    }
    amcheck(cluster);
    cluster.stop();
    check_checksums(cluster);
}

/// `pg_amcheck --heapallindexed` of every database on the running server (14+).
fn amcheck(cluster: &Cluster) {
    let port = cluster.port().to_string();
    let out = cluster.run_as_postgres(
        &cluster.bin().tool("pg_amcheck"),
        &[
            "--install-missing",
            "--heapallindexed",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "--all",
        ],
    );
    assert!(
        out.status.success(),
        "pg_amcheck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pg_checksums --check` of the stopped cluster.
fn check_checksums(cluster: &Cluster) {
    let pgdata = cluster.pgdata().display().to_string();
    let out = cluster.run_as_postgres(
        &cluster.bin().tool("pg_checksums"),
        &["--check", "-D", &pgdata],
    );
    assert!(
        out.status.success(),
        "pg_checksums: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Before 14 there is no pg_amcheck (nor heap verification in amcheck), and 12 has no
/// pg_checksums that reads its control file. So: every B-tree index checked against its
/// heap (`bt_index_check(…, heapallindexed)`), and every block of every permanent
/// relation read into the freshly started server's buffers (`pg_prewarm`), which
/// verifies each page's checksum as it reads it and fails the query on a mismatch; then
/// pg_checksums on 13.
fn judge_before_14(cluster: &mut Cluster) {
    let checked = cluster.psql(
        "CREATE EXTENSION IF NOT EXISTS amcheck; \
         SELECT count(bt_index_check(c.oid, true)) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam \
         WHERE a.amname = 'btree' AND c.relpersistence = 'p' AND i.indisvalid",
    );
    assert!(
        checked.parse::<u64>().expect("a count") > 10,
        "bt_index_check ran on {checked} indexes"
    );
    let read = cluster.psql(
        "CREATE EXTENSION IF NOT EXISTS pg_prewarm; \
         SELECT sum(pg_prewarm(oid, 'buffer')) FROM pg_class \
         WHERE relpersistence = 'p' AND relkind IN ('r', 'i', 't', 'm', 'S')",
    );
    assert!(
        read.parse::<u64>().expect("a block count") > 100,
        "pg_prewarm read {read} blocks"
    );
    cluster.stop();
    if cluster.major() == 13 {
        check_checksums(cluster);
    }
}

struct Marker {
    time: String,
    lsn: String,
    xid: String,
    name: String,
    state: String,
    /// The state before the marker's transaction, for a target that excludes it.
    state_before: String,
}

/// A committed transaction, then its time, LSN, xid, a restore point and the state.
fn marker(cluster: &Cluster, name: &str) -> Marker {
    let state_before = state(cluster);
    let xid = cluster.psql(&format!(
        "BEGIN; INSERT INTO marks VALUES ('{name}'); SELECT txid_current(); COMMIT;"
    ));
    let xid = xid
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    cluster.psql(&format!("SELECT pg_create_restore_point('{name}')"));
    let lsn = cluster.psql("SELECT pg_current_wal_lsn()");
    let time = cluster.psql("SELECT clock_timestamp()::text");
    let state = state(cluster);
    // Later commits must be clearly after the recorded time.
    std::thread::sleep(Duration::from_millis(1100));
    Marker {
        time,
        lsn,
        xid,
        name: name.to_string(),
        state,
        state_before,
    }
}

/// The cluster set up in the repository, with pgbench tables of `scale` and an empty
/// `marks` table.
fn with_pgbench(setup: &Setup, source: Option<Cluster>, scale: &str) -> Option<Cluster> {
    let source = source?;
    setup.setup_cluster(&source);
    pgbench(&source, &["-q", "-i", "-s", scale]);
    source.psql("CREATE TABLE marks (name text)");
    Some(source)
}

/// Backup, a workload with markers, a dropped table, then restores to each kind of target.
/// Returns the source, stopped (servers restored from it keep its socket directory).
fn point_in_time(setup: &Setup, source: Option<Cluster>, all_targets: bool) -> Option<Cluster> {
    let mut source = with_pgbench(setup, source, "2")?;
    let major = source.major();
    source.psql("CREATE UNLOGGED TABLE scratch AS SELECT generate_series(1, 1000) AS x");
    // Files last written more than a second before a backup starts can be reused by the
    // next one without reading them.
    std::thread::sleep(Duration::from_millis(1500));
    let first = backup(setup, &source, &["--label", "first"]);
    assert_eq!(first["corrupted_pages"], serde_json::json!([]), "{first}");
    assert!(first["stored_bytes"].as_u64().expect("stored") > 0);

    pgbench(&source, &["-n", "-t", "300"]);
    // A second backup reads only what changed and stores less than the first.
    let second = backup(setup, &source, &["--label", "second"]);
    assert!(
        second["read_bytes"].as_u64() < first["read_bytes"].as_u64(),
        "{first}\n{second}"
    );
    assert!(second["stored_bytes"].as_u64() < first["stored_bytes"].as_u64());
    // Chunks of pgbench_accounts with a few updated rows are stored as deltas, and the
    // restores below read through them.
    assert!(
        second["delta_blobs"].as_u64() > Some(0),
        "no delta in {second}"
    );

    pgbench(&source, &["-n", "-t", "300"]);
    let mark = marker(&source, "before-drop");
    pgbench(&source, &["-n", "-t", "300"]);
    source.psql("DROP TABLE pgbench_history");
    switch_and_wait_archived(&source);

    let targets: Vec<(Vec<&str>, &str)> = if all_targets {
        vec![
            (vec!["--target-time", &mark.time], &mark.state),
            (vec!["--target-lsn", &mark.lsn], &mark.state),
            (vec!["--target-xid", &mark.xid], &mark.state),
            (vec!["--target-name", &mark.name], &mark.state),
            // Recovery stops just before the marker's commit.
            (
                vec!["--target-xid", &mark.xid, "--target-exclusive"],
                &mark.state_before,
            ),
        ]
    } else {
        vec![(vec!["--target-name", &mark.name], &mark.state)]
    };
    for (args, expected) in targets {
        // A setting of one's own goes with the recovery settings (quoted as the server
        // reads it).
        let own_setting = ["--recovery-option", "cluster_name = it's restored"];
        let mut restored =
            restore_and_start(setup, source.bin(), &[&args[..], &own_setting].concat());
        assert_eq!(state(&restored), expected, "PostgreSQL {major}, {args:?}");
        assert_eq!(restored.psql("SHOW cluster_name"), "it's restored");
        assert_eq!(
            restored.psql("SELECT count(*) FROM scratch"),
            "0",
            "unlogged table present and empty"
        );
        judge(&mut restored);
    }
    if all_targets {
        // Paused at the target, the data is readable; resuming ends recovery.
        let mut paused =
            restore_with_action(setup, source.bin(), "pause", &["--target-name", &mark.name]);
        let reached = testkit::wait_until(Duration::from_secs(120), || {
            paused.psql("SELECT pg_get_wal_replay_pause_state()") == "paused"
        });
        assert!(
            reached,
            "recovery did not pause at the target; log:\n{}",
            paused.log_tail()
        );
        assert_eq!(paused.psql("SELECT pg_is_in_recovery()"), "t");
        assert_eq!(state(&paused), mark.state, "paused at {:?}", mark.name);
        paused.psql("SELECT pg_wal_replay_resume()");
        paused.wait_promoted(Duration::from_secs(120));
        judge(&mut paused);

        // With a backup taken after the marker, restores to its transaction id and to its
        // restore point must choose the backup before it: from the newer one, recovery
        // would never meet the target and would fail.
        backup(setup, &source, &["--label", "after-the-marker"]);
        for target in [["--target-xid", &mark.xid], ["--target-name", &mark.name]] {
            let mut restored = restore_and_start(setup, source.bin(), &target);
            assert_eq!(
                state(&restored),
                mark.state,
                "PostgreSQL {major}, {target:?}"
            );
            judge(&mut restored);
        }
        let err = restore_fails(setup, "no-such-point", &["--target-name", "no-such-point"]);
        assert!(
            err.contains("no restore point named \"no-such-point\"") && err.contains("--backup"),
            "{err}"
        );
    }
    source.stop();
    Some(source)
}

#[test]
fn point_in_time_restore_to_time_lsn_xid_and_name() {
    point_in_time(&Setup::local(), archiving_cluster_of(15), true);
}

#[test]
fn point_in_time_restore_on_every_other_major_version() {
    for &major in testkit::pg::MAJORS.iter().filter(|m| **m != 15) {
        point_in_time(&Setup::local(), archiving_cluster_of(major), false);
    }
}

#[test]
fn point_in_time_restore_through_s3() {
    let Some(setup) = Setup::s3() else {
        return;
    };
    point_in_time(&setup, archiving_cluster_of(15), false);
}

#[test]
fn point_in_time_restore_through_sftp() {
    let Some(setup) = Setup::sftp() else {
        return;
    };
    point_in_time(&setup, archiving_cluster_of(14), false);
}

#[test]
fn point_in_time_restore_through_azure_blob() {
    let Some(setup) = Setup::azblob() else {
        return;
    };
    point_in_time(&setup, archiving_cluster_of(16), false);
}

/// WAL segments of 1 MiB and 64 MiB instead of the default 16: every point-in-time
/// target, `info` and `verify` on the archive, and a restore whose recovery replays
/// across a place where names of the segment size and of 16 MiB part ways. The server's
/// WAL starts just before it (`pg_resetwal -l`): at 1 MiB, segment `…000000FF` is
/// followed by `…00000100` (at 16 MiB, by `…0000000100000000`); at 64 MiB, `…0000003F`
/// by `…0000000100000000`.
#[test]
fn wal_segments_of_other_sizes_back_up_and_restore() {
    for (segment_mb, first_segment, boundary) in [(1, 0xE0, "0/10000000"), (64, 0x3D, "1/0")] {
        let setup = Setup::local();
        let source = archiving_cluster_from(ClusterOptions {
            wal_segment_size_mb: Some(segment_mb),
            ..ClusterOptions::default()
        })
        .map(|mut cluster| {
            cluster.stop();
            let start = format!("0000000100000000{first_segment:08X}");
            let pgdata = cluster.pgdata().display().to_string();
            let out = cluster.run_as_postgres(
                &cluster.bin().tool("pg_resetwal"),
                &["-l", &start, "-D", &pgdata],
            );
            assert!(
                out.status.success(),
                "pg_resetwal -l {start}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            cluster.start_again().expect("start after pg_resetwal");
            cluster
        });
        let Some(source) = point_in_time(&setup, source, true) else {
            return;
        };

        let cluster = info(&setup);
        assert_eq!(
            cluster["wal_segment_size"],
            serde_json::json!(u64::from(segment_mb) << 20),
            "{cluster}"
        );
        assert_eq!(cluster["wal"]["gaps"], serde_json::json!([]), "{cluster}");
        let first = cluster["wal"]["first"].as_str().expect("first segment");
        let last = cluster["wal"]["last"].as_str().expect("last segment");
        assert_eq!(first, format!("0000000100000000{first_segment:08X}"));
        let hex = |part: &str| u64::from_str_radix(part, 16).expect("hex in a segment name");
        let (log, seg) = (hex(&last[8..16]), hex(&last[16..]));
        let crossed = if segment_mb == 1 {
            log == 0 && seg > 0xFF
        } else {
            log == 1
        };
        assert!(
            crossed,
            "{segment_mb} MiB: the archive ends at {last}, before the place names part ways"
        );
        let backups = cluster["backups"].as_array().expect("backups");
        for backup in backups {
            assert_eq!(backup["wal_complete"], true, "{backup}");
        }
        assert!(cluster["recoverable"]["from"].is_string(), "{cluster}");
        let (ok, report) = verify_json(&setup, &[]);
        assert!(ok, "verify of {segment_mb} MiB segments: {report}");

        // The first backup, started before the boundary, recovered to the marker after it.
        let oldest = backups
            .iter()
            .find(|b| b["label"] == "first")
            .unwrap_or_else(|| panic!("no backup labelled first in {cluster}"));
        let start_lsn = oldest["start_lsn"].as_str().expect("start_lsn");
        assert!(
            lsn_value(start_lsn) < lsn_value(boundary),
            "{segment_mb} MiB: the first backup starts at {start_lsn}, past {boundary}"
        );
        let id = oldest["id"].as_str().expect("id");
        let mut restored = restore_and_start(
            &setup,
            source.bin(),
            &["--backup", id, "--target-name", "before-drop"],
        );
        assert_eq!(restored.psql("SELECT count(*) FROM marks"), "1");
        assert_eq!(
            restored.psql("SELECT to_regclass('pgbench_history') IS NOT NULL"),
            "t",
            "recovery went past the marker"
        );
        let end = restored.psql("SELECT pg_current_wal_lsn()");
        assert!(
            lsn_value(&end) > lsn_value(boundary),
            "{segment_mb} MiB: recovery ended at {end}, before {boundary}"
        );
        judge(&mut restored);
    }
}

/// A cluster without data checksums, which are enabled later (`pg_checksums --enable`
/// on the stopped server, which rewrites every relation file outside WAL): backups of
/// it before report no corrupted pages (every page's checksum field is 0 there) and
/// record that checksums were off; the backup after takes every rewritten file and
/// checks its pages; each restores to its own marker with the checksum setting it had.
#[test]
fn data_checksums_off_and_enabled_later() {
    let setup = Setup::local();
    let options = ClusterOptions {
        major: 16,
        checksums: false,
        ..ClusterOptions::default()
    };
    let Some(mut source) = with_pgbench(&setup, archiving_cluster_from(options), "1") else {
        return;
    };
    std::thread::sleep(Duration::from_millis(1100));
    let off = backup(&setup, &source, &["--label", "off"]);
    assert_eq!(off["corrupted_pages"], serde_json::json!([]), "{off}");
    pgbench(&source, &["-n", "-t", "200"]);
    let before = marker(&source, "checksums-off");

    source.stop();
    let pgdata = source.pgdata().display().to_string();
    let out = source.run_as_postgres(
        &source.bin().tool("pg_checksums"),
        &["--enable", "-D", &pgdata],
    );
    assert!(
        out.status.success(),
        "pg_checksums --enable: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    source.start_again().expect("start with checksums on");
    pgbench(&source, &["-n", "-t", "200"]);
    let on = backup(&setup, &source, &["--label", "on"]);
    assert_eq!(on["corrupted_pages"], serde_json::json!([]), "{on}");
    // Every relation file was rewritten: none is reused from the backup before.
    assert!(
        on["read_bytes"].as_u64() >= off["read_bytes"].as_u64(),
        "{off}\n{on}"
    );
    pgbench(&source, &["-n", "-t", "200"]);
    let after = marker(&source, "checksums-on");
    switch_and_wait_archived(&source);

    for (backup, checksums) in [(&off, false), (&on, true)] {
        let id = backup["id"].as_str().expect("id");
        let shown = setup.ok(&["backup", "show", id, "--output", "json"]);
        let shown: serde_json::Value = serde_json::from_str(&shown).expect("backup show JSON");
        assert_eq!(shown["data_checksums"], checksums, "{shown}");
    }
    let (ok, report) = verify_json(&setup, &["--pages"]);
    assert!(ok, "{report}");
    assert_eq!(verdict(&report, &off["id"])["pages_checked"], 0, "{report}");
    assert!(
        verdict(&report, &on["id"])["pages_checked"].as_u64() > Some(100),
        "{report}"
    );

    let mut restored = restore_and_start(&setup, source.bin(), &["--target-name", &before.name]);
    assert_eq!(state(&restored), before.state);
    assert_eq!(restored.psql("SHOW data_checksums"), "off");
    // pg_amcheck only: pg_checksums --check refuses a cluster without checksums.
    amcheck(&restored);
    restored.stop();

    let mut restored = restore_and_start(&setup, source.bin(), &["--target-name", &after.name]);
    assert_eq!(state(&restored), after.state);
    assert_eq!(restored.psql("SHOW data_checksums"), "on");
    judge(&mut restored);
    source.stop();
}

/// A major version upgrade: pg_upgrade makes a new system of the same data. The upgraded
/// server, its configuration copied from the old one (as Debian's pg_upgradecluster
/// does), cannot archive into the old cluster name, and archive-push, setup and backup
/// say what to do; under a new name it archives and backs up, and both clusters'
/// backups restore with their own major's binaries.
#[test]
fn a_major_upgrade_goes_on_under_a_new_cluster_name() {
    let setup = Setup::local();
    let Some(mut old) = with_pgbench(&setup, archiving_cluster_of(16), "1") else {
        return;
    };
    let old_backup = backup(&setup, &old, &[]);
    let old_backup = old_backup["id"].as_str().expect("backup id");
    setup.ok(&["backup", "pin", old_backup]);
    let before = marker(&old, "before the upgrade");
    switch_and_wait_archived(&old);
    let archive_command = old.psql("SHOW archive_command");
    let options = ClusterOptions {
        major: 17,
        settings: [
            ("wal_level", "replica"),
            ("archive_mode", "on"),
            ("archive_command", archive_command.as_str()),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec(),
        ..ClusterOptions::default()
    };
    let new = match Cluster::upgraded(&mut old, options) {
        Ok(new) => new,
        Err(reason) => {
            testkit::pg::skip_or_panic(&reason);
            return;
        }
    };
    let what_to_do = "pgvault --cluster main-17 setup --apply";
    new.psql("SELECT pg_switch_wal()");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !new.log_tail().contains(what_to_do) {
        assert!(
            std::time::Instant::now() < deadline,
            "archive-push of the upgraded server did not say what to do:\n{}",
            new.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for args in [
        vec!["setup", "--pg-conn", &new.conninfo()],
        backup_args(&new, &[]).iter().map(String::as_str).collect(),
    ] {
        let error = setup.fails(&args);
        assert!(
            error.contains(what_to_do) && error.contains("PostgreSQL 16 to 17"),
            "{args:?}: {error}"
        );
    }
    // A server of the same version that is another system gets no upgrade advice.
    let Some(stranger) = archiving_cluster_of(16) else {
        return;
    };
    let error = setup.fails(&["setup", "--pg-conn", &stranger.conninfo()]);
    assert!(!error.contains("pg_upgrade"), "{error}");
    drop(stranger);

    setup.ok(&[
        "--cluster",
        "main-17",
        "setup",
        "--apply",
        "--pg-conn",
        &new.conninfo(),
    ]);
    setup.give_to_postgres();
    new.psql("INSERT INTO marks VALUES ('after the upgrade')");
    backup(&setup, &new, &["--cluster", "main-17"]);
    let after = marker(&new, "upgraded");
    switch_and_wait_archived(&new);

    let info: serde_json::Value =
        serde_json::from_str(&setup.ok(&["info", "--output", "json"])).expect("info JSON");
    let clusters = info["clusters"].as_array().expect("clusters");
    let versions: Vec<_> = clusters
        .iter()
        .map(|c| {
            (
                c["name"].clone(),
                c["pg_version"].as_u64().map(|v| v / 10000),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            (serde_json::json!("main"), Some(16)),
            (serde_json::json!("main-17"), Some(17))
        ],
        "{info}"
    );
    let mut restored = restore_and_start(&setup, old.bin(), &["--target-name", &before.name]);
    assert_eq!(state(&restored), before.state);
    judge(&mut restored);

    // The old cluster retired: recent WAL, its pin and the restore's hold each make
    // `cluster remove` ask for --force; a dry run removes nothing; then it goes, and the
    // new cluster (which shares its deduplicated data) is untouched.
    let error = setup.fails(&["cluster", "remove", "main"]);
    for reason in ["archived WAL", "pinned", "held until", "--force"] {
        assert!(error.contains(reason), "{reason}: {error}");
    }
    let plan: serde_json::Value = serde_json::from_str(&setup.ok(&[
        "cluster",
        "remove",
        "main",
        "--dry-run",
        "--output",
        "json",
    ]))
    .expect("plan JSON");
    assert_eq!(plan["backups"], serde_json::json!([old_backup]), "{plan}");
    assert!(plan["wal_files"].as_u64() > Some(3), "{plan}");
    assert_eq!(plan["in_use"].as_array().map(Vec::len), Some(4), "{plan}");
    let removed: serde_json::Value = serde_json::from_str(
        &setup.ok(&["cluster", "remove", "main", "--force", "--output", "json"]),
    )
    .expect("removal JSON");
    assert!(
        removed["gc"]["packs_deleted"].as_u64() > Some(0),
        "{removed}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&setup.ok(&["info", "--output", "json"])).expect("info JSON");
    let names: Vec<_> = (info["clusters"].as_array().expect("clusters").iter())
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(names, [serde_json::json!("main-17")], "{info}");
    let leftovers: Vec<_> = files_under(&setup.path("repo").join("files"))
        .into_iter()
        .filter(|path| path.split('/').any(|part| part == "main"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let error = setup.fails(&["cluster", "remove", "main"]);
    assert!(error.contains("no cluster \"main\""), "{error}");
    let (ok, report) = verify_json(&setup, &[]);
    assert!(ok, "{report}");

    let mut restored = restore_and_start(
        &setup,
        new.bin(),
        &["--cluster", "main-17", "--target-name", &after.name],
    );
    assert_eq!(state(&restored), after.state);
    judge(&mut restored);
}

/// Every file below `dir`, as paths.
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path.display().to_string());
        }
    }
    found
}

fn lsn_value(lsn: &str) -> u64 {
    let (hi, lo) = lsn.trim().split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).expect("hex") << 32) | u64::from_str_radix(lo, 16).expect("hex")
}

/// Restore points can share a name, and recovery stops at the first one it replays: one
/// created while a backup ran makes that backup unusable for the name (stopping before
/// the backup's end fails), even with another one after its end.
#[test]
fn restore_point_named_again_during_a_backup() {
    let setup = Setup::local();
    let Some(mut source) = with_pgbench(&setup, archiving_cluster(), "5") else {
        return;
    };
    backup(&setup, &source, &["--label", "before"]);
    let args = backup_args(&source, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (name, expected) = (1..=5)
        .find_map(|attempt| {
            let name = format!("deploy-{attempt}");
            let running = setup
                .cmd(&args)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start a backup");
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while source.psql(BACKUP_READING) != "1" && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            source.psql(&format!("INSERT INTO marks VALUES ('{name}')"));
            let point = source.psql(&format!("SELECT pg_create_restore_point('{name}')"));
            let expected = state(&source);
            let out = running.wait_with_output().expect("backup");
            assert!(out.status.success(), "backup failed");
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
            let start = lsn_value(report["start_lsn"].as_str().expect("start LSN"));
            let stop = lsn_value(report["stop_lsn"].as_str().expect("stop LSN"));
            (start < lsn_value(&point) && lsn_value(&point) <= stop).then_some((name, expected))
        })
        .expect("a restore point created while a backup ran");
    // The same name again after that backup's end.
    source.psql("INSERT INTO marks VALUES ('after')");
    source.psql(&format!("SELECT pg_create_restore_point('{name}')"));
    switch_and_wait_archived(&source);

    let mut restored = restore_and_start(&setup, source.bin(), &["--target-name", &name]);
    assert_eq!(state(&restored), expected);
    judge(&mut restored);
    source.stop();
}

/// Archiving that fails: `check` and a backup wait for their segment, then fail with one
/// line naming the archiver's failure, and no backup is listed; a second backup started
/// during that wait is refused, naming the first; mended, the next backup completes and
/// restores.
#[test]
fn a_backup_whose_wal_is_not_archived_names_the_archivers_failure() {
    let setup = Setup::local();
    let Some(mut cluster) = with_pgbench(&setup, archiving_cluster(), "1") else {
        return;
    };
    let working = cluster.psql("SHOW archive_command");
    // Still an archive-push command, so the backup's own set-up check passes.
    cluster.psql("ALTER SYSTEM SET archive_command = 'false archive-push %p'");
    cluster.psql("SELECT pg_reload_conf()");
    let conn = cluster.conninfo();
    let err = setup.fails(&["check", "--pg-conn", &conn, "--timeout", "3s"]);
    assert!(
        err.contains("did not arrive within 3s: the archiver is failing: it last failed on")
            && err.contains("server log"),
        "{err}"
    );
    // Long enough for the second backup below to start while the first waits, also on a
    // busy machine.
    let args = backup_args(&cluster, &["--wal-timeout", "8s"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let waiting = setup
        .cmd(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let locks = setup.path("repo/locks");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while testkit::published_objects(&locks) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup never locked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = setup.fails(&args);
    assert!(
        err.starts_with("error: a backup of cluster main is already running")
            && err.contains(&format!("(pid {} on ", waiting.id()))
            && err.contains("pgvault unlock"),
        "{err}"
    );
    let out = waiting.wait_with_output().expect("backup");
    assert!(!out.status.success(), "a backup without its WAL succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Half-way through the wait, a warning says why; then the one error line.
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 2
            && lines[0].contains("WARN")
            && lines[0].contains("the archiver is failing"),
        "{stderr}"
    );
    let error = lines[1];
    assert!(
        error.starts_with("error: the backup's last WAL segment")
            && error.contains("did not reach the repository within 8s")
            && error.contains("was not recorded; the archiver is failing: it last failed on"),
        "{stderr}"
    );
    assert_eq!(
        ids(&info(&setup)),
        Vec::<String>::new(),
        "a backup without WAL is listed"
    );

    cluster.psql(&format!(
        "ALTER SYSTEM SET archive_command = '{}'",
        working.replace('\'', "''")
    ));
    cluster.psql("SELECT pg_reload_conf()");
    let expected = state(&cluster);
    let report = backup(&setup, &cluster, &["--wal-timeout", "2m"]);
    assert_eq!(ids(&info(&setup)).len(), 1, "{report}");
    let mut restored = restore_and_start(&setup, cluster.bin(), &["--target", "immediate"]);
    assert_eq!(state(&restored), expected);
    judge(&mut restored);
    cluster.stop();
}

#[test]
fn corrupted_pages_are_reported_and_the_backup_completes() {
    let setup = Setup::local();
    let Some(mut cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    // One table larger than a chunk (read in pieces by the workers), one of a chunk
    // (read by the walking thread).
    cluster.psql(
        "CREATE TABLE victim AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 5000) g",
    );
    cluster.psql("CREATE TABLE small_victim AS SELECT g FROM generate_series(1, 1000) g");
    cluster.psql("CHECKPOINT");
    let file = cluster.psql("SELECT pg_relation_filepath('victim')");
    let small_file = cluster.psql("SELECT pg_relation_filepath('small_victim')");
    cluster.stop();
    // Somewhere in the tuples: the header stays plausible.
    for (file, block, larger_than_a_chunk) in [(&file, 2, true), (&small_file, 1, false)] {
        let path = cluster.pgdata().join(file);
        let mut data = fs::read(&path).expect("relation file");
        assert_eq!(data.len() > 128 << 10, larger_than_a_chunk, "{file}");
        data[block * 8192 + 4000] ^= 0xFF;
        fs::write(&path, &data).expect("write");
    }
    cluster.start_again().expect("restart");
    let report = backup(&setup, &cluster, &[]);
    let mut expected = [(file, 2), (small_file, 1)];
    expected.sort();
    let listed = serde_json::json!(expected
        .clone()
        .map(|(file, block)| serde_json::json!({"file": file, "block": block})));
    assert_eq!(report["corrupted_pages"], listed, "{report}");
    // `info` counts them and names the command that lists them, which does.
    let id = report["id"].as_str().expect("id");
    assert_eq!(info(&setup)["backups"][0]["corrupted_pages"], 2);
    let text = setup.ok(&["info"]);
    assert!(
        text.contains(&format!("bad pages: `pgvault backup show {}`", &id[..8])),
        "{text}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&setup.ok(&["backup", "show", &id[..8], "--output", "json"]))
            .expect("show JSON");
    assert_eq!(shown["corrupted_pages"], listed, "{shown}");
    assert_eq!(shown["id"], id, "{shown}");
    let text = setup.ok(&["backup", "show", "latest"]);
    for (file, block) in &expected {
        assert!(
            text.lines().any(|line| line.contains(file.as_str())
                && line.trim_end().ends_with(&block.to_string())),
            "{text}"
        );
    }
    assert!(text.contains("on; 2 corrupted page(s)"), "{text}");
    cluster.stop();
}

#[test]
fn restore_refuses_running_servers_and_non_empty_directories() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    let pgdata = cluster.pgdata().display().to_string();
    let err = setup.fails(&["restore", "--pgdata", &pgdata]);
    assert!(
        err.contains("is running") && err.contains("stop it"),
        "{err}"
    );
    let err = restore_fails(&setup, "nothing", &[]);
    assert!(
        err.contains("no backups") && err.contains("pgvault backup"),
        "{err}"
    );
    backup(&setup, &cluster, &[]);
    for (option, says) in [
        ("recovery_target_lsn=0/1", "--target-lsn"),
        ("recovery_min_apply_delay", "NAME=VALUE"),
        ("min apply delay=1", "not a setting name"),
    ] {
        let err = restore_fails(&setup, "own-setting", &["--recovery-option", option]);
        assert!(err.contains(says), "{option}: {err}");
        assert!(!setup.path("own-setting").exists(), "{option}");
    }
    // Another restore into the same directory holds its lock: refused, nothing written;
    // once it ends, the restore goes ahead.
    let busy = setup.path("busy");
    fs::create_dir_all(&busy).expect("mkdir");
    let busy_arg = busy.display().to_string();
    let other = fs::File::open(&busy).expect("open");
    other.try_lock().expect("lock");
    let err = setup.fails(&["restore", "--pgdata", &busy_arg]);
    assert!(
        err.contains(&format!(
            "another pgvault process is restoring into {busy_arg}: wait for it to end"
        )),
        "{err}"
    );
    assert_eq!(
        fs::read_dir(&busy).expect("list").count(),
        0,
        "written into"
    );
    drop(other);
    setup.ok(&["restore", "--pgdata", &busy_arg]);
    assert!(busy.join("global/pg_control").exists());

    let full = setup.path("full");
    fs::create_dir_all(&full).expect("mkdir");
    fs::write(full.join("keep.txt"), "precious").expect("write");
    let err = setup.fails(&["restore", "--pgdata", &full.display().to_string()]);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(full.join("keep.txt")).expect("kept"),
        "precious"
    );
    // A postmaster.pid naming no server here may be a server in a container or on another
    // host: neither --delta nor --force touches the directory.
    fs::write(full.join("postmaster.pid"), "99999999\n/elsewhere\n").expect("write");
    for mode in ["--delta", "--force"] {
        let err = setup.fails(&["restore", "--pgdata", &full.display().to_string(), mode]);
        assert!(
            err.contains("postmaster.pid names pid 99999999") && err.contains("delete the file"),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(full.join("keep.txt")).expect("kept"),
            "precious"
        );
    }
    // A file where the data directory should be, and a directory that cannot be created
    // (under that file): each named, and not called an incomplete restore.
    let err = restore_fails(&setup, "full/keep.txt", &[]);
    assert!(
        err.contains("keep.txt is not a directory: give the data directory's path"),
        "{err}"
    );
    let err = restore_fails(&setup, "full/keep.txt/data", &[]);
    assert!(
        err.contains("cannot create")
            && err.contains("keep.txt/data")
            && !err.contains("incomplete"),
        "{err}"
    );
    let err = restore_fails(&setup, "x", &["--target-time", "yesterday"]);
    assert!(
        err.contains("--target-time \"yesterday\" is not a date and time"),
        "{err}"
    );
    let err = restore_fails(&setup, "x", &["--target-time", "2026-11-25 01:30:00"]);
    assert!(err.contains("has no time zone"), "{err}");
    let err = restore_fails(&setup, "y", &["--target-time", "2000-01-01 00:00:00+00"]);
    assert!(err.contains("ends before the target"), "{err}");
    let err = restore_fails(&setup, "z", &["--target-xid", "3"]);
    assert!(
        err.contains("ends before the target transaction 3") && err.contains("--backup"),
        "{err}"
    );
    let mount_point = setup.path("mount-point");
    fs::create_dir_all(mount_point.join("lost+found")).expect("mkdir");
    let err = restore_fails(&setup, "mount-point", &[]);
    assert!(
        err.contains("holds only lost+found: it is a mount point")
            && err.contains("restore into a directory under it"),
        "{err}"
    );
    let err = restore_fails(&setup, "s", &["--sync-method", "sync"]);
    assert!(
        err.contains("--sync-method") && err.contains("syncfs"),
        "{err}"
    );
    assert!(!setup.path("s").exists());
}

/// Creates tablespace `name` in a new directory `dir` of the cluster's own directory.
fn create_tablespace(cluster: &Cluster, name: &str, dir: &str) {
    let location = cluster.dir().join(dir);
    fs::create_dir(&location).expect("mkdir");
    std::process::Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&location)
        .status()
        .expect("chown");
    cluster.psql(&format!(
        "CREATE TABLESPACE {name} LOCATION '{}'",
        location.display()
    ));
}

/// Two tablespaces (OIDs of different lengths) are backed up and restored to mapped
/// locations; a restore with `--standby --primary-conn` becomes a streaming replica of
/// the source.
#[test]
fn tablespaces_and_standby_restores() {
    let setup = Setup::local();
    let Some(mut source) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&source);
    create_tablespace(&source, "far", "tablespace");
    source.psql("CREATE TABLE remote TABLESPACE far AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g");
    // A second tablespace whose OID has one digit more: OIDs sort otherwise as numbers
    // than as names.
    source.stop();
    let out = source.run_as_postgres(
        &source.bin().tool("pg_resetwal"),
        &["-o", "100000", &source.pgdata().display().to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    source.start_again().expect("restart the source");
    create_tablespace(&source, "farther", "tablespace2");
    assert_eq!(
        source.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'farther'"),
        "100000"
    );
    source.psql(
        "CREATE TABLE remoter TABLESPACE farther AS SELECT g FROM generate_series(1, 3000) g",
    );
    source.psql("CREATE TABLE marks (name text)");
    let remote_state = "SELECT count(*) || '/' || sum(g) FROM remote UNION ALL SELECT count(*) || '/' || sum(g) FROM remoter";
    let expected = source.psql(remote_state);
    let report = backup(&setup, &source, &[]);
    assert_eq!(report["corrupted_pages"], serde_json::json!([]), "{report}");
    switch_and_wait_archived(&source);

    // The original location is in use by the source: map it, by name.
    let mapped = tempfile::Builder::new()
        .prefix("pgvault-ts-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mapping = format!("far={}", mapped.path().join("ts").display());
    // Unmapped, the tablespaces would be restored where the running source has them,
    // which --force would empty and --delta rewrite (found by hand: `restore --force`
    // emptied a running server's tablespace and it lost committed rows): refused.
    let live_files = || {
        use std::os::unix::fs::MetadataExt;
        (files_under(&source.dir().join("tablespace")).into_iter())
            .map(|file| (fs::metadata(&file).expect("stat").ino(), file))
            .collect::<Vec<_>>()
    };
    let before = live_files();
    assert!(!before.is_empty());
    for mode in [&[][..], &["--force"], &["--delta"]] {
        let err = restore_fails(&setup, "unmapped", mode);
        assert!(
            err.contains("a tablespace of the PostgreSQL server running in")
                && err.contains("map it elsewhere with --tablespace-map"),
            "{mode:?}: {err}"
        );
    }
    assert_eq!(live_files(), before, "the source's tablespace was touched");
    let err = restore_fails(&setup, "relative", &["--tablespace-map-all", "all"]);
    assert!(
        err.contains("--tablespace-map-all all: give an absolute directory"),
        "{err}"
    );
    // A check copy: it must not archive its own timeline into the source's archive. One
    // tablespace placed by name, the other under the directory for all.
    let all = mapped.path().join("all");
    let mut restored = restore_and_start(
        &setup,
        source.bin(),
        &[
            "--target",
            "immediate",
            "--tablespace-map",
            &mapping,
            "--tablespace-map-all",
            &all.display().to_string(),
            "--archive-mode",
            "off",
            "--sync-method",
            "syncfs",
        ],
    );
    assert_eq!(restored.psql("SHOW archive_mode"), "off");
    assert_eq!(restored.psql(remote_state), expected);
    let link_of = |name: &str| {
        let oid = restored.psql(&format!(
            "SELECT oid FROM pg_tablespace WHERE spcname = '{name}'"
        ));
        fs::read_link(restored.pgdata().join("pg_tblspc").join(oid)).expect("tablespace link")
    };
    assert_eq!(link_of("far"), mapped.path().join("ts"));
    assert_eq!(link_of("farther"), all.join("farther"));
    judge(&mut restored);

    // A standby seeded from the repository that streams from the source.
    let standby = streaming_standby(&setup, &source, &[("far", "ts"), ("farther", "ts2")]);

    // A backup taken from the standby, its last segment switched on the primary, is a
    // complete backup: restored, it holds what the standby had replayed.
    let primary_only = setup.fails(&["backup", "--from-standby", "--pg-conn", &source.conninfo()]);
    assert!(primary_only.contains("is a primary"), "{primary_only}");
    let id = backup_from_standby(&setup, &standby, &source);
    source.psql("INSERT INTO marks VALUES ('after the standby backup')");
    let elsewhere = format!("far={}", standby.dir().join("ts-restored").display());
    let elsewhere2 = format!("farther={}", standby.dir().join("ts2-restored").display());
    let mut restored = restore_and_start(
        &setup,
        source.bin(),
        &[
            "--backup",
            &id,
            "--target",
            "immediate",
            "--tablespace-map",
            &elsewhere,
            "--tablespace-map",
            &elsewhere2,
            "--archive-mode",
            "off",
        ],
    );
    assert_eq!(restored.psql("SELECT count(*) FROM marks"), "1");
    assert_eq!(restored.psql(remote_state), expected);
    judge(&mut restored);
    source.stop();
}

/// A standby restored from the repository with `--standby --primary-conn` (tablespaces
/// mapped under its own directory: name → subdirectory), started, and streaming from
/// `source` once a row inserted into `marks` there has reached it.
fn streaming_standby(setup: &Setup, source: &Cluster, tablespaces: &[(&str, &str)]) -> Cluster {
    let (dir, pgdata) = new_data_directory("pgvault-standby-");
    let primary = primary_conn(source);
    let mut args = vec![
        "restore".to_string(),
        "--pgdata".to_string(),
        pgdata.clone(),
        "--standby".to_string(),
        "--primary-conn".to_string(),
        primary,
    ];
    for (name, subdir) in tablespaces {
        args.push("--tablespace-map".to_string());
        args.push(format!("{name}={}", dir.path().join(subdir).display()));
    }
    setup.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(Path::new(&pgdata).join("standby.signal").exists());
    let standby = Cluster::adopt(source.bin().clone(), dir).expect("start the standby");
    let before = source.psql("SELECT count(*) FROM marks");
    source.psql("INSERT INTO marks VALUES ('after the backup')");
    let expected = source.psql("SELECT count(*) FROM marks");
    assert_ne!(before, expected);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status =
            standby.psql("SELECT coalesce((SELECT status FROM pg_stat_wal_receiver), 'none')");
        let seen = standby.psql("SELECT count(*) FROM marks");
        if status == "streaming" && seen == expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "standby not streaming (status {status}, marks {seen}):\n{}",
            standby.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    standby
}

fn primary_conn(source: &Cluster) -> String {
    format!("host=127.0.0.1 port={} user=postgres", source.port())
}

/// `backup --fast` of `standby`, its last segment switched on `primary`: the backup id.
fn backup_from_standby(setup: &Setup, standby: &Cluster, primary: &Cluster) -> String {
    let report: serde_json::Value = serde_json::from_str(&setup.ok(&[
        "backup",
        "--fast",
        "--pg-conn",
        &standby.conninfo(),
        "--pgdata",
        &standby.pgdata().display().to_string(),
        "--primary-conn",
        &primary_conn(primary),
        "--output",
        "json",
        "--wal-timeout",
        "60s",
    ]))
    .expect("backup JSON");
    assert_eq!(report["from_standby"], serde_json::json!(true), "{report}");
    report["id"].as_str().expect("backup id").to_string()
}

/// A role with only the privileges docs/cli.md lists ("PostgreSQL privileges") can check
/// archiving and back up, and the backup restores; without them the error names what the
/// server refused and points to that list. Run as the OS user postgres, a file it cannot
/// read fails the backup naming it.
#[test]
fn a_role_with_the_documented_privileges_backs_up() {
    use std::os::unix::fs::PermissionsExt;
    for major in [12, 15] {
        let setup = Setup::local();
        let Some(cluster) = archiving_cluster_of(major) else {
            continue;
        };
        setup.setup_cluster(&cluster);
        cluster.psql("CREATE ROLE pgvault LOGIN");
        let conn = cluster.conninfo().replace("user=postgres", "user=pgvault");
        let pgdata = cluster.pgdata().display().to_string();
        let args = ["backup", "--fast", "--pg-conn", &conn, "--pgdata", &pgdata];
        let err = setup.fails(&args);
        assert!(
            err.contains("user=pgvault")
                && err.contains("refused: ERROR:")
                && err.contains("pg_read_all_settings")
                && err.contains("docs/cli.md (\"PostgreSQL privileges\")")
                && !err.contains("SELECT"),
            "PostgreSQL {major}: {err}"
        );
        cluster.psql("GRANT pg_read_all_settings TO pgvault");
        let err = setup.fails(&args);
        let start = if major >= 15 {
            "pg_backup_start"
        } else {
            "pg_start_backup"
        };
        assert!(
            err.contains(&format!("permission denied for function {start}")),
            "PostgreSQL {major}: {err}"
        );
        cluster.psql(if major >= 15 {
            "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean), \
             pg_switch_wal(), pg_create_restore_point(text) TO pgvault"
        } else {
            "GRANT EXECUTE ON FUNCTION pg_start_backup(text, boolean, boolean), \
             pg_stop_backup(boolean, boolean), pg_switch_wal(), pg_create_restore_point(text) TO pgvault"
        });
        setup.ok(&["check", "--pg-conn", &conn]);
        cluster.psql("CREATE TABLE marks AS SELECT 'backed up by pgvault' AS mark");
        let id = setup.ok(&args);
        // Recorded for restores as root on another host, which give the files to the
        // user and group of these names there.
        let owner = &info(&setup)["backups"][0]["owner"];
        assert!(
            owner["user"] == "postgres" && owner["group"] == "postgres" && owner["uid"].is_u64(),
            "PostgreSQL {major}: {owner}"
        );
        let restored = check_copy(&setup, cluster.bin(), id.trim());
        assert_eq!(
            restored.psql("SELECT mark FROM marks"),
            "backed up by pgvault",
            "PostgreSQL {major}"
        );
        // Run as the OS user postgres, a backup that meets a file only root can read
        // fails naming it and what to do.
        let unreadable = cluster.pgdata().join("root-only.key");
        fs::write(&unreadable, "secret").expect("write");
        fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o600)).expect("chmod");
        setup.give_to_postgres();
        let out = setup.run_as_postgres(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("root-only.key: Permission denied")
                && err.contains("run pgvault as the user that owns the data directory"),
            "PostgreSQL {major}: {err}"
        );
        fs::remove_file(&unreadable).expect("remove");
    }
}

/// On a terminal, backup and restore draw a progress bar on stderr (in bytes, up to the
/// total); without one they do not. With `-q` stderr has nothing but errors, on a
/// terminal too: a backup prints its id on stdout and nothing else (cron mails nothing).
#[test]
fn progress_bars_only_on_a_terminal_and_quiet_means_quiet() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    let quoted = |args: &[String]| -> String {
        let mut line = format!(
            "'{}' --config '{}'",
            env!("CARGO_BIN_EXE_pgvault"),
            setup.path("pgvault.toml").display()
        );
        for arg in args {
            line.push_str(&format!(" '{}'", arg.replace('\'', "'\\''")));
        }
        line
    };
    // `script` runs the command on a pseudo-terminal and copies what it printed.
    let on_a_terminal = |args: &[String]| -> String {
        let out = std::process::Command::new("script")
            .args(["-qec", &quoted(args), "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("script (util-linux)");
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    let backup_text = [
        "backup".to_string(),
        "--fast".to_string(),
        "--pg-conn".to_string(),
        cluster.conninfo(),
        "--pgdata".to_string(),
        cluster.pgdata().display().to_string(),
    ];
    let text = on_a_terminal(&backup_text);
    assert!(
        text.lines()
            .any(|line| line.contains("backup [") && line.contains("MiB/")),
        "no backup progress bar: {text}"
    );
    switch_and_wait_archived(&cluster);
    let (_dir, pgdata) = new_data_directory("pgvault-progress-");
    let text = on_a_terminal(&[
        "restore".to_string(),
        "--pgdata".to_string(),
        pgdata.clone(),
    ]);
    assert!(
        text.lines()
            .any(|line| line.contains("restore [") && line.contains("MiB/")),
        "no restore progress bar: {text}"
    );
    let out = setup.run(&["restore", "--pgdata", &pgdata, "--delta"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("restore [") && stderr.contains("restored backup"),
        "{stderr}"
    );

    let quiet = |args: &[String]| [vec!["-q".to_string()], args.to_vec()].concat();
    let delta = ["restore", "--pgdata", &pgdata, "--delta"].map(String::from);
    let text = on_a_terminal(&quiet(&delta));
    assert_eq!(text.trim(), "", "restore -q on a terminal");
    // Without --fast: what the backup waits for is said first, unless -q.
    let spread: Vec<String> = (backup_text.iter())
        .filter(|arg| *arg != "--fast")
        .cloned()
        .collect();
    let out = setup.run(&spread.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && stderr.starts_with(
                "waiting for the server's next checkpoint, spread over up to 0.9 × 5min (checkpoint_completion_target × checkpoint_timeout) before the backup starts; --fast asks for an immediate one\n"
            ),
        "{stderr}"
    );
    let args = quiet(&spread);
    let out = setup.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr, "", "backup -q");
    assert_eq!(stdout.trim().len(), 64, "backup -q prints its id: {stdout}");
}

/// `--max-rate` holds a backup's reads to that many bytes per second: after the one
/// second's worth it may read at once, the rest takes its time (a lower bound, which a
/// slow machine cannot break). Rates that are too low or not sizes are refused, from the
/// command line and from the config.
#[test]
fn max_rate_holds_a_backups_reads() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    cluster.psql(
        "CREATE TABLE filler AS SELECT g, md5(g::text) AS t FROM generate_series(1, 100000) g",
    );
    const RATE: u64 = 8 << 20;
    let report = backup(&setup, &cluster, &["--max-rate", "8MiB"]);
    let read = report["read_bytes"].as_u64().expect("read_bytes");
    let took = report["duration_ms"].as_u64().expect("duration_ms") as f64 / 1000.0;
    let least = read.saturating_sub(RATE) as f64 / RATE as f64;
    assert!(read > 2 * RATE, "too little read to measure: {report}");
    assert!(
        took >= least,
        "read {read} bytes in {took} s, under {least} s: {report}"
    );
    for (args, says) in [
        (
            ["--max-rate", "100KB"],
            "--max-rate 100000 bytes per second is below the least allowed, 1MiB",
        ),
        (["--max-rate", "fast"], "--max-rate \"fast\""),
    ] {
        let err = setup.fails(
            &backup_args(&cluster, &args)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        assert!(err.contains(says), "{args:?}: {err}");
    }
    setup.write_config_with(false, "backup-max-rate = \"512KiB\"\n");
    let err = setup.fails(
        &backup_args(&cluster, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        err.contains("backup-max-rate 524288 bytes per second is below"),
        "{err}"
    );
    assert_eq!(ids(&info(&setup)).len(), 1, "a refused backup is listed");
}

/// A database moved to another tablespace while a backup reads (`ALTER DATABASE … SET
/// TABLESPACE`) can come back from that backup without some of its files: recovery
/// redoes the move by copying the old directory as the backup holds it, and the server
/// removes that directory once the move commits (found by hand: 3 of 12 backups taken
/// while databases moved restored such a database with files missing). A tablespace
/// created while it reads is created again by recovery at its original location, which
/// on the same host is the live server's (found by hand: the restored server wrote into
/// it). Either backup fails naming what changed and records nothing; the next one
/// restores whole.
#[test]
fn a_database_moved_or_a_tablespace_created_during_the_backup_fails_it() {
    let setup = Setup::local();
    let Some(source) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&source);
    create_tablespace(&source, "elsewhere", "elsewhere");
    source.psql("CREATE DATABASE mover");
    source.psql_db(
        "mover",
        "CREATE TABLE kept AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g",
    );
    let rows = "SELECT count(*) || '/' || sum(g) FROM kept";
    let expected = source.psql_db("mover", rows);

    let err = backup_failing_across(&setup, &source, || {
        source.psql("ALTER DATABASE mover SET TABLESPACE elsewhere");
    });
    assert!(
        err.contains(
            "database mover was moved from tablespace pg_default to elsewhere while the backup ran"
        ) && err.contains("run the backup again"),
        "{err}"
    );
    let err = backup_failing_across(&setup, &source, || {
        create_tablespace(&source, "newer", "newer");
    });
    let location = source.dir().join("newer");
    assert!(
        err.contains(&format!(
            "tablespace newer was created while the backup ran: recovery would create it again at {}",
            location.display()
        )) && err.contains("run the backup again"),
        "{err}"
    );
    assert_eq!(ids(&info(&setup)).len(), 0, "a failed backup is listed");

    source.psql("CREATE TABLE fresh TABLESPACE newer AS SELECT g FROM generate_series(1, 5000) g");
    let fresh = "SELECT count(*) || '/' || sum(g) FROM fresh";
    let expected_fresh = source.psql(fresh);
    let id = backup(&setup, &source, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    switch_and_wait_archived(&source);
    let mapped = tempfile::Builder::new()
        .prefix("pgvault-ts-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let all = mapped.path().display().to_string();
    let mut restored = check_copy_with(&setup, source.bin(), &id, &["--tablespace-map-all", &all]);
    assert_eq!(restored.psql_db("mover", rows), expected);
    assert_eq!(restored.psql(fresh), expected_fresh);
    judge(&mut restored);
}

/// Runs a backup slowed to about 6 s, does `change` while it reads the files, and
/// returns the error of the backup, which must fail.
fn backup_failing_across(setup: &Setup, source: &Cluster, change: impl FnOnce()) -> String {
    let args = backup_args(source, &["--max-rate", "4MiB"]);
    let running = setup
        .cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the backup");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while source.psql(BACKUP_READING) != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    change();
    let out = running.wait_with_output().expect("wait for the backup");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the backup succeeded: {err}");
    err
}

/// What the operator leaves out (`backup-exclude` in the config, `--exclude`) is not in
/// the backup: a directory named with a trailing `/` comes back empty, one without it
/// not at all, and the restored cluster starts. Exclusions of PostgreSQL's own files, or
/// outside the data directory, are refused before the backup starts.
#[test]
fn exclusions_leave_out_what_the_operator_names() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    setup.write_config_with(false, "backup-exclude = [\"log/\"]\n");
    let pgdata = cluster.pgdata();
    for (path, content) in [("log/server.log", "a log"), ("scratch/old.dump", "junk")] {
        fs::create_dir_all(pgdata.join(path).parent().expect("parent")).expect("mkdir");
        fs::write(pgdata.join(path), content).expect("write");
    }
    fs::write(pgdata.join("kept.txt"), "kept").expect("write");
    let args = backup_args(&cluster, &["--exclude", "scratch"]);
    for (bad, says) in [
        (
            "global",
            "--exclude: exclusion \"global\": global is PostgreSQL's own",
        ),
        (
            "/var/log",
            "--exclude: exclusion \"/var/log\": give a path inside the data directory",
        ),
    ] {
        let err = setup.fails(
            &backup_args(&cluster, &["--exclude", bad])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        assert!(err.contains(says), "{bad}: {err}");
    }
    assert!(ids(&info(&setup)).is_empty(), "a refused backup is listed");
    backup(&setup, &cluster, &["--exclude", "scratch"]);
    assert_eq!(
        info(&setup)["backups"][0]["excluded"],
        serde_json::json!(["log/", "scratch"]),
        "{args:?}"
    );
    cluster.psql("CREATE TABLE marks AS SELECT 'after exclusions' AS mark");
    switch_and_wait_archived(&cluster);
    let restored = restore_and_start(&setup, cluster.bin(), &[]);
    let copy = restored.pgdata();
    assert_eq!(
        fs::read_to_string(copy.join("kept.txt")).expect("kept"),
        "kept"
    );
    assert!(
        copy.join("log").is_dir() && names_in(&copy.join("log")).is_empty(),
        "{:?}",
        names_in(&copy.join("log"))
    );
    assert!(!copy.join("scratch").exists());
    assert_eq!(restored.psql("SELECT mark FROM marks"), "after exclusions");
    setup.write_config_with(false, "backup-exclude = [\"pg_xact\"]\n");
    let err = setup.fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("backup-exclude: exclusion \"pg_xact\": pg_xact is PostgreSQL's own"),
        "{err}"
    );
}

/// What the server's own rules leave out of a base backup (`basebackup.c`), planted in a
/// live data directory or made by the server, is not in the restored one, and the
/// directories the server needs are there and empty; the restored server starts.
#[test]
fn the_servers_own_exclusions_are_left_out() {
    let setup = Setup::local();
    let Some(source) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&source);
    source.psql(
        "CREATE UNLOGGED TABLE scratch AS SELECT generate_series(1, 1000) AS x; \
         CREATE TABLE kept AS SELECT 'kept' AS mark; \
         SELECT pg_create_physical_replication_slot('left_out', true)",
    );
    let database = source.psql("SELECT oid FROM pg_database WHERE datname = 'postgres'");
    let unlogged = source.psql("SELECT pg_relation_filepath('scratch')");
    let pgdata = source.pgdata();
    let planted = [
        "backup_manifest".to_string(),
        "backup_label.old".into(),
        "tablespace_map.old".into(),
        "postgresql.auto.conf.tmp".into(),
        "current_logfiles.tmp".into(),
        format!("base/{database}/pg_internal.init.4242"),
        format!("base/{database}/t3_999999"),
        format!("base/{database}/t3_999999_fsm"),
        "base/pgsql_tmp/pgsql_tmp4242.0".into(),
        "pg_notify/left-out".into(),
        "pg_serial/left-out".into(),
        "pg_snapshots/left-out".into(),
        "pg_subtrans/left-out".into(),
        "pg_dynshmem/left-out".into(),
        "pg_stat_tmp/left-out".into(),
    ];
    for path in &planted {
        let path = pgdata.join(path);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, "not for the backup").expect("plant");
    }
    give_to_postgres(&pgdata);
    assert!(pgdata.join("pg_replslot/left_out/state").is_file());
    assert!(pgdata.join(format!("{unlogged}_init")).is_file());
    backup(&setup, &source, &[]);
    switch_and_wait_archived(&source);

    let (dir, copy) = new_data_directory("pgvault-restored-");
    setup.ok(&[
        "restore",
        "--pgdata",
        &copy,
        "--target",
        "immediate",
        "--target-action",
        "promote",
        "--archive-mode",
        "off",
    ]);
    let copy = Path::new(&copy);
    let made_by_the_server = [
        "postmaster.pid".to_string(),
        "postmaster.opts".into(),
        format!("base/{database}/pg_internal.init"),
        "global/pg_internal.init".into(),
        unlogged.clone(),
    ];
    for path in planted.iter().chain(&made_by_the_server) {
        assert!(!copy.join(path).exists(), "{path} was restored");
    }
    assert!(pgdata
        .join(format!("base/{database}/pg_internal.init"))
        .exists());
    for empty in [
        "pg_wal",
        "pg_replslot",
        "pg_notify",
        "pg_serial",
        "pg_snapshots",
        "pg_subtrans",
        "pg_dynshmem",
        "pg_stat_tmp",
    ] {
        assert_eq!(
            names_in(&copy.join(empty)),
            Vec::<std::ffi::OsString>::new(),
            "{empty}"
        );
    }
    assert!(copy.join(format!("{unlogged}_init")).is_file());
    assert!(!copy.join("base/pgsql_tmp").exists());

    let restored = Cluster::adopt(source.bin().clone(), dir).expect("start the restored copy");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(restored.psql("SELECT mark FROM kept"), "kept");
    assert_eq!(restored.psql("SELECT count(*) FROM scratch"), "0");
    assert_eq!(
        restored.psql("SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
}

/// A role whose sessions time out after a second (`statement_timeout`,
/// `transaction_timeout`, `idle_session_timeout`) backs up anyway, though the start call
/// waits longer for a spread checkpoint and the files take longer to read. When the
/// server does end the backup's session, the backup fails saying so and is not listed.
#[test]
fn session_timeouts_do_not_end_a_backup() {
    let setup = Setup::local();
    let options = ClusterOptions {
        major: 17,
        settings: vec![
            ("checkpoint_timeout".into(), "30s".into()),
            ("checkpoint_completion_target".into(), "0.2".into()),
        ],
        ..ClusterOptions::default()
    };
    let Some(source) = with_pgbench(&setup, archiving_cluster_from(options), "2") else {
        return;
    };
    source.psql("CREATE ROLE operator SUPERUSER LOGIN");
    for setting in [
        "statement_timeout",
        "transaction_timeout",
        "idle_session_timeout",
    ] {
        source.psql(&format!("ALTER ROLE operator SET {setting} = '1s'"));
    }
    let conn = source.conninfo().replace("user=postgres", "user=operator");
    let pgdata = source.pgdata().display().to_string();
    let args = [
        "backup",
        "--pg-conn",
        &conn,
        "--pgdata",
        &pgdata,
        "--checksum-all",
        "--max-rate",
        "8MB",
    ];
    // Dirty buffers for the spread checkpoint to write.
    pgbench(&source, &["-n", "-t", "300"]);
    let started = std::time::Instant::now();
    let id = setup.ok(&args);
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "the backup took {:?}, not long enough to meet the timeouts",
        started.elapsed()
    );
    assert_eq!(ids(&info(&setup)), [id.trim().to_string()]);

    let (out, ended) = std::thread::scope(|scope| {
        let backup = scope.spawn(|| setup.run(&[&args[..], &["--fast"]].concat()));
        // Idle that long only while the files are read: the backup has started.
        let ended = testkit::wait_until(Duration::from_secs(60), || {
            source.psql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE usename = 'operator' AND state = 'idle' \
                 AND state_change < now() - interval '1.5 s'",
            ) == "1"
        });
        (backup.join().expect("backup thread"), ended)
    });
    assert!(ended, "no backup session to end");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("ended the session (FATAL: terminating connection")
            && err.contains("nothing was recorded; run the backup again"),
        "{err}"
    );
    assert_eq!(ids(&info(&setup)).len(), 1, "the failed backup is listed");
}

/// A restore run as root gives the files to the server's user and tries the restored
/// server's `restore_command` as that user: with a passphrase file only root can read,
/// recovery would stop at its first WAL file, and the restore warns naming it; with a
/// readable one it says nothing, leaves nothing behind, and the server recovers.
#[test]
fn a_restore_as_root_tries_the_restore_command_as_the_servers_user() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::local();
    let Some(source) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&source);
    source.psql("CREATE TABLE marks AS SELECT 'restored' AS mark");
    backup(&setup, &source, &[]);
    switch_and_wait_archived(&source);
    let restore = |pgdata: &str| {
        setup.ok_stderr(&[
            "restore",
            "--pgdata",
            pgdata,
            "--target",
            "immediate",
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ])
    };

    let passphrase = setup.path("passphrase");
    std::os::unix::fs::chown(&passphrase, Some(0), Some(0)).expect("chown");
    fs::set_permissions(&passphrase, fs::Permissions::from_mode(0o600)).expect("chmod");
    let (_unreadable, pgdata) = new_data_directory("pgvault-restored-");
    let warned = restore(&pgdata);
    assert!(
        warned.contains("the restored server's restore_command fails when run as postgres")
            && warned.contains(&format!("{}: Permission denied", passphrase.display())),
        "{warned}"
    );

    setup.give_to_postgres();
    let (dir, pgdata) = new_data_directory("pgvault-restored-");
    let quiet = restore(&pgdata);
    assert!(!quiet.contains("restore_command"), "{quiet}");
    assert_eq!(
        names_in(&Path::new(&pgdata).join("pg_wal")),
        Vec::<std::ffi::OsString>::new()
    );
    let restored = Cluster::adopt(source.bin().clone(), dir).expect("start the restored copy");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(restored.psql("SELECT mark FROM marks"), "restored");
}

/// A gc is refused while a restore runs: it would otherwise delete or repack packs that
/// the restore is about to read, and the restore would fail half-way. A repository that the
/// restoring user may only read (as on a recovery host) is restored from without a lock,
/// with a warning.
#[test]
fn a_running_restore_holds_off_gc_and_a_read_only_repository_still_restores() {
    let setup = Setup::local();
    let Some(source) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&source);
    source.psql("CREATE TABLE marks AS SELECT 'kept' AS mark");
    // Stored only by the first backup, in packs with pages the second one shares.
    source.psql(
        "CREATE TABLE gone AS SELECT md5(random()::text) || md5(random()::text) AS t \
         FROM generate_series(1, 200000)",
    );
    backup(&setup, &source, &[]);
    source.psql("DROP TABLE gone");
    backup(&setup, &source, &[]);
    switch_and_wait_archived(&source);
    setup.ok(&["expire", "--keep-last", "1", "--no-gc"]);
    let plan: serde_json::Value =
        serde_json::from_str(&setup.ok(&["gc", "--dry-run", "--output", "json"])).expect("JSON");
    let doomed = |key: &str| plan[key].as_array().map_or(0, Vec::len);
    assert!(
        doomed("delete_packs") + doomed("repack_packs") > 0,
        "{plan}"
    );

    let locks = setup.path("repo").join("locks");
    let (dir, pgdata) = new_data_directory("pgvault-restored-");
    let mut restore = setup
        .cmd(&[
            "restore",
            "--pgdata",
            &pgdata,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the restore");
    // Held still from the moment it has its lock, before it chooses the backup (a lock
    // is written under a temporary dot-name first).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while testkit::published_objects(&locks) == 0 {
        assert!(
            restore.try_wait().expect("wait").is_none(),
            "the restore ended without taking a lock"
        );
        assert!(std::time::Instant::now() < deadline, "no lock in 60 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &restore.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {name}");
    };
    signal("-STOP");
    let refused = setup.fails(&["gc"]);
    signal("-CONT");
    assert!(
        refused.contains("is locked by a shared lock of `")
            && refused.contains(&format!("restore --pgdata {pgdata} ")),
        "{refused}"
    );
    let finished = restore.wait_with_output().expect("restore");
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    let restored = Cluster::adopt(source.bin().clone(), dir).expect("start the restored copy");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(restored.psql("SELECT mark FROM marks"), "kept");
    drop(restored);
    setup.ok(&["gc"]);

    // The repository is root's and only readable by postgres, who restores from it.
    let (dir, pgdata) = new_data_directory("pgvault-restored-");
    let repo = setup.path("repo");
    for (tool, args, path) in [
        ("chown", ["-R", "root:root"], &repo),
        ("chmod", ["-R", "go-w,go+rX"], &repo),
        ("chown", ["-R", "postgres"], &dir.path().to_path_buf()),
    ] {
        let status = std::process::Command::new(tool)
            .args(args)
            .arg(path)
            .status()
            .expect(tool);
        assert!(status.success(), "{tool} {args:?}");
    }
    let out = setup.run_as_postgres(&[
        "restore",
        "--pgdata",
        &pgdata,
        "--target-action",
        "promote",
        "--archive-mode",
        "off",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("reading without a lock")
            && stderr.contains("Permission denied")
            && stderr.contains("cannot hold backup")
            && stderr.contains("`pgvault backup pin "),
        "{stderr}"
    );
    let restored = Cluster::adopt(source.bin().clone(), dir).expect("start the restored copy");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(restored.psql("SELECT mark FROM marks"), "kept");
    // A command that must write says what to do about it.
    let out = setup.run_as_postgres(&["gc"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("may not create its lock: run it as the repository's owner")
            && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
}

/// A backup run as root (a cron job) in a repository that belongs to postgres, who
/// archives WAL and expires, gives what it creates to postgres: a root-owned directory
/// would make postgres's later writes into it fail, and root-owned objects its expire.
#[test]
fn a_backup_run_as_root_leaves_the_repository_to_its_owner() {
    use std::os::unix::fs::MetadataExt;
    let setup = Setup::local();
    let Some(source) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&source);
    let postgres = fs::metadata(setup.path("repo")).expect("repo").uid();
    assert_ne!(postgres, 0);
    source.psql("CREATE TABLE marks AS SELECT 'kept' AS mark");
    backup(&setup, &source, &[]);
    fn owned_by_root(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            if meta.uid() == 0 {
                out.push(path.clone());
            }
            if meta.is_dir() {
                owned_by_root(&path, out);
            }
        }
    }
    let mut rooted = Vec::new();
    owned_by_root(&setup.path("repo"), &mut rooted);
    assert!(rooted.is_empty(), "left to root: {rooted:?}");

    // postgres takes the next backup and expires root's.
    let args = backup_args(&source, &[]);
    let out = setup.run_as_postgres(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = setup.run_as_postgres(&["expire", "--keep-last", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("WARN"), "{stderr}");
    let restored = check_copy(&setup, source.bin(), "latest");
    assert_eq!(restored.psql("SELECT mark FROM marks"), "kept");
}

/// A restored copy promoted while archiving into its source's repository adds a timeline
/// that a later restore to the latest timeline follows, leaving the source's own WAL from
/// after the copy behind, without a word from PostgreSQL. The restore warns and names the
/// `--target-timeline` that follows the source.
#[test]
fn a_restore_warns_when_the_latest_timeline_leaves_archived_wal_behind() {
    let setup = Setup::local();
    let Some(source) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&source);
    source.psql("CREATE TABLE marks AS SELECT 'backed up' AS mark");
    backup(&setup, &source, &[]);
    switch_and_wait_archived(&source);
    // Archiving as its source does, promoted at the backup's end onto timeline 2.
    let copy = restore_with_action(&setup, source.bin(), "promote", &["--target", "immediate"]);
    copy.wait_promoted(Duration::from_secs(120));
    let history = setup.path("repo/files/wal/main/00000002/00000002.history");
    // Its own work, in a segment it archives.
    copy.psql("CREATE TABLE copy_only AS SELECT 1 AS one");
    let segment = copy.psql("SELECT pg_walfile_name(pg_switch_wal())");
    let archived = setup.path(&format!("repo/files/wal/main/00000002/{segment}"));
    assert!(
        testkit::wait_until(Duration::from_secs(60), || history.exists()
            && archived.exists()),
        "the copy did not archive its timeline's history and {segment}"
    );
    drop(copy);
    source.psql("INSERT INTO marks VALUES ('after the copy')");
    switch_and_wait_archived(&source);
    let info: serde_json::Value =
        serde_json::from_str(&setup.ok(&["info", "--output", "json"])).expect("info JSON");
    let off = &info["clusters"][0]["wal"]["off_latest"];
    assert!(
        off.as_array().is_some_and(|off| off.len() == 1
            && off[0]["timeline"] == 1
            && off[0]["left_at"].is_string()),
        "{off}"
    );

    let restore = |extra: &[&str]| {
        let (stderr, restored) = restore_promoted(&setup, &source, extra);
        let marks = restored.psql("SELECT string_agg(mark, ',' ORDER BY mark) FROM marks");
        (stderr, marks)
    };
    let (warned, marks) = restore(&[]);
    assert!(
        warned.contains(
            "recovery follows timeline 2, the latest in the archive, which left timeline 1"
        ) && warned.contains("pass --target-timeline 1"),
        "{warned}"
    );
    assert_eq!(marks, "backed up");
    let (quiet, marks) = restore(&["--target-timeline", "1"]);
    assert!(!quiet.contains("recovery follows timeline"), "{quiet}");
    assert_eq!(marks, "after the copy,backed up");
}

/// Restores with `extra` into a new directory, not archiving, and starts the copy until
/// it is promoted; returns the restore's stderr and the copy.
fn restore_promoted(setup: &Setup, source: &Cluster, extra: &[&str]) -> (String, Cluster) {
    let (dir, pgdata) = new_data_directory("pgvault-restored-");
    let mut args = vec![
        "restore",
        "--pgdata",
        &pgdata,
        "--archive-mode",
        "off",
        "--target-action",
        "promote",
    ];
    args.extend_from_slice(extra);
    let stderr = setup.ok_stderr(&args);
    let restored = Cluster::adopt(source.bin().clone(), dir).expect("start the restored copy");
    restored.wait_promoted(Duration::from_secs(120));
    (stderr, restored)
}

/// Two copies promoted from the same backup, both archiving here, are sibling timelines
/// 2 and 3. Recovery to the latest timeline (3) from a backup taken on 2 would stop
/// PostgreSQL at startup ("requested timeline 3 is not a child of this server's
/// history"): the restore takes the newest backup timeline 3 descends from instead, and
/// refuses the backup on 2 unless told to stay on its timeline.
#[test]
fn a_restore_starts_from_a_backup_the_followed_timeline_descends_from() {
    let setup = Setup::local();
    let Some(source) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&source);
    source.psql("CREATE TABLE marks AS SELECT 'backed up' AS mark");
    let on_one = backup(&setup, &source, &[])["id"]
        .as_str()
        .expect("backup id")
        .to_string();
    switch_and_wait_archived(&source);
    let wal = setup.path("repo/files/wal/main");
    // A copy promoted onto timeline 2, archiving here, backed up.
    let copy = restore_with_action(&setup, source.bin(), "promote", &["--target", "immediate"]);
    copy.wait_promoted(Duration::from_secs(120));
    copy.psql("CREATE TABLE copy_only AS SELECT 1 AS one");
    let on_two = backup(&setup, &copy, &[])["id"]
        .as_str()
        .expect("backup id")
        .to_string();
    switch_and_wait_archived(&copy);
    drop(copy);
    source.psql("INSERT INTO marks VALUES ('after the copies')");
    switch_and_wait_archived(&source);
    // A second copy of the first backup, at the end of timeline 1, becomes timeline 3.
    let sibling = restore_with_action(&setup, source.bin(), "promote", &["--backup", &on_one]);
    sibling.wait_promoted(Duration::from_secs(120));
    let segment = sibling.psql("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(segment.starts_with("00000003"), "{segment}");
    assert!(
        testkit::wait_until(Duration::from_secs(60), || wal
            .join("00000003/00000003.history")
            .exists()
            && wal.join(format!("00000003/{segment}")).exists()),
        "timeline 3 did not archive its history and {segment}"
    );
    drop(sibling);
    // `info` names the WAL that recovery to the latest timeline leaves out.
    let info: serde_json::Value =
        serde_json::from_str(&setup.ok(&["info", "--output", "json"])).expect("info JSON");
    let wal = &info["clusters"][0]["wal"];
    assert_eq!(wal["latest_timeline"], 3, "{wal}");
    let off = wal["off_latest"].as_array().expect("off_latest");
    assert!(
        off.iter()
            .any(|o| o["timeline"] == 2 && o["left_at"].is_null()),
        "{wal}"
    );
    let text = setup.ok(&["info"]);
    assert!(
        text.contains("not replayed by a restore to the latest timeline (3): timeline 3 did not branch from it; --target-timeline 2 follows it"),
        "{text}"
    );

    let restore = |extra: &[&str]| restore_promoted(&setup, &source, extra);
    let (warned, restored) = restore(&[]);
    assert!(
        warned.contains(&format!("restoring the older backup {}", &on_one[..8]))
            && warned.contains(&format!("{} (timeline 2)", &on_two[..8])),
        "{warned}"
    );
    assert_eq!(
        restored.psql("SELECT string_agg(mark, ',' ORDER BY mark) FROM marks"),
        "after the copies,backed up"
    );
    drop(restored);
    let refused = restore_fails(&setup, "refused", &["--backup", &on_two]);
    assert!(
        refused.contains("on timeline 2 cannot recover along timeline 3 (the latest")
            && refused.contains("pass --target-timeline current"),
        "{refused}"
    );
    let (_, restored) = restore(&["--backup", &on_two, "--target-timeline", "current"]);
    assert_eq!(restored.psql("SELECT count(*) FROM copy_only"), "1");
    let refused = restore_fails(&setup, "refused", &["--target-timeline", "7"]);
    assert!(
        refused.contains(
            "--target-timeline 7: the repository has no history of timeline 7 (00000007.history)"
        ),
        "{refused}"
    );
    let refused = restore_fails(&setup, "refused", &["--target-timeline", "third"]);
    assert!(
        refused.contains("--target-timeline \"third\" is not latest, current or a timeline number"),
        "{refused}"
    );
}

/// Before 15 a standby's backup goes through `pg_start_backup`/`pg_stop_backup`, and on 12
/// its transaction horizon through `txid_current_snapshot()` (`pg_current_snapshot()` is
/// 13+).
#[test]
fn standby_backups_before_postgresql_15() {
    for major in [12, 14] {
        let setup = Setup::local();
        let Some(mut source) = with_pgbench(&setup, archiving_cluster_of(major), "1") else {
            continue;
        };
        backup(&setup, &source, &[]);
        switch_and_wait_archived(&source);
        let standby = streaming_standby(&setup, &source, &[]);
        let id = backup_from_standby(&setup, &standby, &source);
        let expected = state(&standby);
        source.psql("INSERT INTO marks VALUES ('after the standby backup')");
        let mut restored = check_copy(&setup, source.bin(), &id);
        assert_eq!(state(&restored), expected, "PostgreSQL {major}");
        judge(&mut restored);
        source.stop();
    }
}

/// A restore to the backup's end that does not archive into the source's repository.
const CHECK_COPY: [&str; 4] = ["--target", "immediate", "--archive-mode", "off"];

/// A pgbench cluster of `scale`, backed up, its WAL archived and stopped, and a copy
/// restored from that backup ([`CHECK_COPY`]) and started: the source, the copy, and the
/// state both hold.
fn backed_up_and_restored(setup: &Setup, scale: &str) -> Option<(Cluster, Cluster, String)> {
    let mut source = with_pgbench(setup, archiving_cluster(), scale)?;
    backup(setup, &source, &[]);
    let expected = state(&source);
    switch_and_wait_archived(&source);
    source.stop();
    let restored = restore_and_start(setup, source.bin(), &CHECK_COPY);
    assert_eq!(state(&restored), expected);
    Some((source, restored, expected))
}

/// A restored server that ran on, had files deleted, damaged and added, is brought back
/// to the backup by `restore --delta`, which rewrites only what differs (made durable by
/// one syncfs).
#[test]
fn delta_restore_rewrites_only_what_differs() {
    let setup = Setup::local();
    let Some((_source, mut restored, expected)) = backed_up_and_restored(&setup, "2") else {
        return;
    };
    let args = CHECK_COPY;
    pgbench(&restored, &["-n", "-t", "200"]);
    restored.psql("INSERT INTO marks VALUES ('diverged')");
    let accounts = restored.psql("SELECT pg_relation_filepath('pgbench_accounts')");
    let branches = restored.psql("SELECT pg_relation_filepath('pgbench_branches')");
    restored.stop();
    let pgdata = restored.pgdata();
    fs::remove_file(pgdata.join(&accounts)).expect("remove a relation file");
    let mut damaged = fs::read(pgdata.join(&branches)).expect("read");
    damaged[100] ^= 0xff;
    fs::write(pgdata.join(&branches), damaged).expect("damage a relation file");
    fs::write(pgdata.join("base").join("stray"), "not from the backup").expect("write");
    let files_in_backup = walk_files(&pgdata).len();

    let dir = pgdata.display().to_string();
    // A delta restore with `extra` options, promoting at the target: its JSON report, and
    // how many files it kept and rewrote.
    let delta_restore = |extra: &[&str]| {
        let mut delta = vec![
            "restore",
            "--pgdata",
            &dir,
            "--output",
            "json",
            "--target-action",
            "promote",
        ];
        delta.extend_from_slice(extra);
        delta.extend_from_slice(&args);
        let report: serde_json::Value =
            serde_json::from_str(&setup.ok(&delta)).expect("restore JSON");
        let kept = report["delta"]["files_kept"].as_u64().expect("kept");
        let rewritten = report["delta"]["files_rewritten"]
            .as_u64()
            .expect("rewritten");
        (report, kept, rewritten)
    };
    let (report, kept, rewritten) = delta_restore(&["--delta", "--sync-method", "syncfs"]);
    assert!(kept > 0 && rewritten > 0, "{report}");
    assert!(
        rewritten * 4 < kept && (rewritten as usize) < files_in_backup,
        "most files match and are not rewritten: {report}"
    );
    assert!(
        report["delta"]["removed"].as_u64().expect("removed") >= 1,
        "{report}"
    );
    assert!(!pgdata.join("base").join("stray").exists());

    let start_and_judge = |restored: &mut Cluster| {
        restored
            .start_again()
            .expect("start after the delta restore");
        restored.wait_promoted(Duration::from_secs(120));
        assert_eq!(state(restored), expected, "back at the backup");
        judge(restored);
    };
    start_and_judge(&mut restored);

    // By size and time: what the promoted server wrote has new mtimes and is rewritten;
    // the rest is not read.
    let (report, kept, rewritten) = delta_restore(&["--delta=time"]);
    assert!(
        kept > 0 && rewritten > 0 && rewritten * 4 < kept,
        "{report}"
    );
    start_and_judge(&mut restored);
    let err = restore_fails(&setup, "t", &["--delta=mtime"]);
    // The one error line names what to use instead.
    assert!(
        err.contains("--delta=time") && err.contains("mtime"),
        "{err}"
    );
}

/// The bytes files under `dir` hold, and the bytes of disk they take.
fn apparent_and_allocated(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    walk_files(dir)
        .iter()
        .fold((0, 0), |(apparent, allocated), file| {
            let meta = fs::metadata(file).expect("stat");
            (apparent + meta.len(), allocated + meta.blocks() * 512)
        })
}

/// `--db-include` restores the named database (and template0, template1, postgres); the
/// others come back as holes of their files' sizes, in the data directory and in a
/// tablespace, that recovery replays into (writes after the backup included) and that
/// DROP DATABASE removes. A delta restore with `--db-exclude` then brings a dropped
/// database back and leaves another as holes. Bad names are refused before anything is
/// written. On the oldest, the default and the newest major.
#[test]
fn some_databases_restored_and_the_others_left_as_holes() {
    for major in [12, 15, 18] {
        some_databases_restored(major);
    }
}

fn some_databases_restored(major: u32) {
    let setup = Setup::local();
    let Some(source) = archiving_cluster_of(major) else {
        return;
    };
    setup.setup_cluster(&source);
    create_tablespace(&source, "far", "tablespace");
    source.psql("CREATE DATABASE wanted");
    source.psql("CREATE DATABASE unwanted");
    source.psql("CREATE DATABASE faraway TABLESPACE far");
    let databases = ["wanted", "unwanted", "faraway"];
    for database in databases {
        source.psql_db(
            database,
            "CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g; \
             CREATE INDEX ON t (g)",
        );
    }
    backup(&setup, &source, &[]);
    let mut listed: Vec<String> =
        serde_json::from_value(info(&setup)["backups"][0]["databases"].clone())
            .expect("info lists the backup's databases");
    listed.sort();
    assert_eq!(
        listed,
        [
            "faraway",
            "postgres",
            "template0",
            "template1",
            "unwanted",
            "wanted"
        ]
    );
    // Writes after the backup, in every database, for recovery to replay through holes.
    for database in databases {
        source.psql_db(database, "UPDATE t SET h = 'after' WHERE g % 2000 = 0");
    }
    source.psql("SELECT pg_create_restore_point('after-updates')");
    let table_state = "SELECT count(*) || '/' || md5(string_agg(h, ',' ORDER BY g)) FROM t";
    let expected: Vec<String> = databases
        .iter()
        .map(|database| source.psql_db(database, table_state))
        .collect();
    let oid = |name: &str| {
        source.psql(&format!(
            "SELECT oid FROM pg_database WHERE datname = '{name}'"
        ))
    };
    let (unwanted_oid, faraway_oid) = (oid("unwanted"), oid("faraway"));
    switch_and_wait_archived(&source);

    for (extra, says) in [
        (
            &["--db-include", "nosuch"][..],
            "has no such database (it has faraway, postgres, template0, template1, unwanted, wanted)",
        ),
        (&["--db-exclude", "template1"][..], "always restored"),
        (&["--db-include", "wanted", "--standby"][..], "--standby"),
    ] {
        let error = restore_fails(&setup, "refused", extra);
        assert!(error.contains(says), "{extra:?}: {error}");
        assert!(!setup.path("refused").exists(), "{extra:?} wrote something");
    }

    let mapped = tempfile::Builder::new()
        .prefix("pgvault-ts-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mapping = format!("far={}", mapped.path().join("ts").display());
    let (dir, pgdata) = new_data_directory("pgvault-some-");
    let target = [
        "--target-name",
        "after-updates",
        "--target-action",
        "promote",
        "--target-timeline",
        "current",
        "--archive-mode",
        "off",
        "--tablespace-map",
        &mapping,
        "--output",
        "json",
    ];
    let mut args = vec!["restore", "--pgdata", &pgdata, "--db-include", "wanted"];
    args.extend_from_slice(&target);
    let report: serde_json::Value = serde_json::from_str(&setup.ok(&args)).expect("JSON");
    assert_eq!(
        report["left_out_databases"],
        serde_json::json!(["unwanted", "faraway"]),
        "{report}"
    );
    let unwanted_dir = Path::new(&pgdata).join("base").join(&unwanted_oid);
    let faraway_dir = fs::read_dir(mapped.path().join("ts"))
        .expect("tablespace")
        .flatten()
        .map(|entry| entry.path().join(&faraway_oid))
        .find(|path| path.is_dir())
        .expect("the database's directory in the tablespace");
    for dir in [&unwanted_dir, &faraway_dir] {
        let (apparent, allocated) = apparent_and_allocated(dir);
        assert!(
            apparent > 3 << 20 && allocated == 0,
            "{}: {apparent} bytes, {allocated} allocated",
            dir.display()
        );
    }
    let (apparent, allocated) = apparent_and_allocated(&Path::new(&pgdata).join("base"));
    assert!(allocated * 2 > apparent, "the wanted data is there");

    let mut restored = Cluster::adopt(source.bin().clone(), dir).expect("start");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(restored.psql_db("wanted", table_state), expected[0]);
    assert!(
        restored
            .try_psql_db("unwanted", "SELECT count(*) FROM t")
            .is_err(),
        "a left-out database was usable"
    );
    // Replay wrote the pages it has full images of (the UPDATE's scan set hint bits on
    // every page of t); the others, e.g. of catalogs, stay holes.
    let (apparent, allocated) = apparent_and_allocated(&unwanted_dir);
    assert!(
        allocated * 2 < apparent,
        "{apparent} bytes, {allocated} allocated"
    );
    restored.psql("DROP DATABASE unwanted");
    restored.psql("DROP DATABASE faraway");
    assert!(!unwanted_dir.exists() && !faraway_dir.exists());
    judge(&mut restored);

    // Over it: `unwanted` (dropped) comes back, `faraway` stays holes.
    let pgdata = restored.pgdata().display().to_string();
    let mut args = vec![
        "restore",
        "--pgdata",
        &pgdata,
        "--delta",
        "--db-exclude",
        "faraway",
    ];
    args.extend_from_slice(&target);
    let report: serde_json::Value = serde_json::from_str(&setup.ok(&args)).expect("JSON");
    assert_eq!(
        report["left_out_databases"],
        serde_json::json!(["faraway"]),
        "{report}"
    );
    assert_eq!(apparent_and_allocated(&faraway_dir).1, 0);
    restored
        .start_again()
        .expect("start after the delta restore");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(restored.psql_db("wanted", table_state), expected[0]);
    assert_eq!(restored.psql_db("unwanted", table_state), expected[1]);
    assert!(
        restored
            .try_psql_db("faraway", "SELECT count(*) FROM t")
            .is_err(),
        "a left-out database was usable"
    );
    restored.psql("DROP DATABASE faraway");
    judge(&mut restored);
}

/// A restore that fails half-way (here: on a damaged pack) leaves a data directory that
/// cannot be started, also when it was a delta restore over one that could: the control
/// file goes first and comes back last. Run again once the repository is mended, the
/// delta restore completes and the server starts on the backup's data.
#[test]
fn an_interrupted_restore_leaves_a_directory_that_cannot_start() {
    let setup = Setup::local();
    let Some((_source, mut restored, expected)) = backed_up_and_restored(&setup, "1") else {
        return;
    };
    let args = CHECK_COPY;
    pgbench(&restored, &["-n", "-t", "100"]);
    restored.stop();
    let control = restored.pgdata().join("global").join("pg_control");

    // The largest pack holds the data (trees have packs of their own): every blob in it
    // damaged.
    let pack = repo_files(&setup, "data").remove(0);
    let original = fs::read(&pack).expect("read pack");
    replace_object(&pack, |bytes| {
        for byte in bytes.iter_mut().step_by(512) {
            *byte ^= 0xff;
        }
    });
    let dir = restored.pgdata().display().to_string();
    let mut delta = vec![
        "restore",
        "--pgdata",
        &dir,
        "--delta",
        "--target-action",
        "promote",
    ];
    delta.extend_from_slice(&args);
    let err = setup.fails(&delta);
    assert!(
        err.contains("the data directory is incomplete and cannot be started")
            && err.contains("run the restore again"),
        "{err}"
    );
    assert!(
        !control.exists(),
        "the control file is back after a failed restore"
    );
    let started = restored.start_again();
    assert!(
        started
            .as_ref()
            .is_err_and(|log| log.contains("pg_control")),
        "a half-restored data directory: {started:?}"
    );
    let fresh = setup.path("fresh");
    let err = restore_fails(&setup, "fresh", &args);
    assert!(err.contains("incomplete and cannot be started"), "{err}");
    assert!(fresh.join("base").is_dir() && !fresh.join("global").join("pg_control").exists());

    replace_object(&pack, |bytes| *bytes = original);
    setup.ok(&delta);
    restored
        .start_again()
        .expect("start after the delta restore");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(state(&restored), expected);
    judge(&mut restored);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop: a small filesystem.
struct SmallFilesystem(tempfile::TempDir);

impl SmallFilesystem {
    fn mount(size: &str) -> Option<SmallFilesystem> {
        let dir = tempfile::Builder::new()
            .prefix("pgvault-small-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let options = format!("size={size},mode=0755");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(dir.path())
            .status();
        if !mounted.is_ok_and(|status| status.success()) {
            testkit::pg::skip_or_panic("cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(SmallFilesystem(dir))
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.path().join(name)
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// A restore that would not fit is refused before it writes anything, naming what it
/// needs and what is free; where it fits, on a filesystem not much larger, it completes.
#[test]
fn a_restore_that_cannot_fit_is_refused_before_writing() {
    let setup = Setup::local();
    let Some(mut source) = with_pgbench(&setup, archiving_cluster(), "1") else {
        return;
    };
    let report = backup(&setup, &source, &[]);
    switch_and_wait_archived(&source);
    source.stop();
    let size = report["size_bytes"].as_u64().expect("size");
    let Some(small) = SmallFilesystem::mount(&format!("{}k", size / 2048)) else {
        return;
    };
    let pgdata = small.path("data").display().to_string();
    let err = setup.fails(&["restore", "--pgdata", &pgdata, "--target", "immediate"]);
    assert!(
        err.contains("the restore needs")
            && err.contains("which has")
            && err.contains("free: make room"),
        "{err}"
    );
    assert!(!small.path("data").exists(), "a refused restore wrote");
    drop(small);
    let Some(roomy) = SmallFilesystem::mount(&format!("{}k", size / 1024 + 8192)) else {
        return;
    };
    let pgdata = roomy.path("data").display().to_string();
    setup.ok(&["restore", "--pgdata", &pgdata, "--target", "immediate"]);
    assert!(roomy.path("data/global/pg_control").exists());
}

fn names_in(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = (fs::read_dir(dir).expect("list").flatten())
        .map(|entry| entry.file_name())
        .collect();
    names.sort();
    names
}

/// A data directory with pg_wal on another disk (a symlink, as `initdb --waldir` lays it
/// out): the backup stores pg_wal as an empty directory, not the link, so a copy restored
/// on the same host recovers into a pg_wal of its own and never into the source's live
/// WAL. `--waldir` puts a restored pg_wal on a disk of its own again, also in a delta
/// restore, and a later delta restore keeps that link; bad `--waldir` values are refused
/// before anything is touched.
#[test]
fn a_symlinked_pg_wal_is_restored_as_a_directory_or_onto_waldir() {
    let setup = Setup::local();
    let Some(mut source) = archiving_cluster() else {
        return;
    };
    source.stop();
    let wal_disk = shared_tempdir();
    let source_wal = wal_disk.path().join("source-wal");
    fs::rename(source.pgdata().join("pg_wal"), &source_wal).expect("move pg_wal");
    std::os::unix::fs::symlink(&source_wal, source.pgdata().join("pg_wal")).expect("link");
    source.start_again().expect("start with pg_wal linked");
    let Some(mut source) = with_pgbench(&setup, Some(source), "1") else {
        return;
    };
    backup(&setup, &source, &[]);
    let expected = state(&source);
    switch_and_wait_archived(&source);

    let args = CHECK_COPY;
    let mut copy = restore_and_start(&setup, source.bin(), &args);
    let wal = copy.pgdata().join("pg_wal");
    assert!(
        fs::symlink_metadata(&wal).expect("stat").is_dir(),
        "pg_wal is not a directory"
    );
    assert_eq!(state(&copy), expected);
    assert!(wal.join("00000002.history").exists());
    assert!(
        !source_wal.join("00000002.history").exists(),
        "the copy wrote into the source's WAL"
    );
    copy.stop();

    let source_names = names_in(&source_wal);
    let pgdata = setup.path("refused").display().to_string();
    let inside = format!("{pgdata}/wal");
    let source_wal_text = source_wal.display().to_string();
    for (waldir, expected_error) in [
        ("relative/wal", "give an absolute path"),
        (inside.as_str(), "is inside the data directory"),
        (
            source_wal_text.as_str(),
            "is not empty: empty it, or pass --delta or --force",
        ),
    ] {
        let err = restore_fails(&setup, "refused", &["--waldir", waldir]);
        assert!(err.contains(expected_error), "{waldir}: {err}");
    }
    assert_eq!(
        names_in(&source_wal),
        source_names,
        "a refused --waldir was touched"
    );
    assert!(!setup.path("refused").exists());

    let copy_wal = wal_disk.path().join("copy-wal");
    let dir = copy.pgdata().display().to_string();
    let copy_wal_text = copy_wal.display().to_string();
    let mut delta = vec![
        "restore",
        "--pgdata",
        &dir,
        "--delta",
        "--target-action",
        "promote",
    ];
    delta.extend_from_slice(&["--waldir", &copy_wal_text]);
    delta.extend_from_slice(&args);
    setup.ok(&delta);
    assert_eq!(fs::read_link(&wal).expect("pg_wal is a link"), copy_wal);
    copy.start_again().expect("start with the new pg_wal");
    copy.wait_promoted(Duration::from_secs(120));
    assert_eq!(state(&copy), expected);
    assert!(
        copy_wal.join("00000002.history").exists(),
        "{:?}",
        names_in(&copy_wal)
    );
    judge(&mut copy);

    // A delta restore without --waldir over a data directory whose pg_wal is a link
    // keeps the link, emptying what it points to, rather than moving the WAL onto the
    // data directory's disk.
    copy.stop();
    fs::write(copy_wal.join("stale"), "old WAL").expect("write");
    let delta_again: Vec<&str> = delta
        .iter()
        .copied()
        .filter(|arg| *arg != "--waldir" && *arg != copy_wal_text)
        .collect();
    let out = setup.run(&delta_again);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "pg_wal: kept as a link to {copy_wal_text} (emptied)"
        )),
        "{err}"
    );
    assert_eq!(fs::read_link(&wal).expect("pg_wal is a link"), copy_wal);
    assert!(
        !copy_wal.join("stale").exists(),
        "{:?}",
        names_in(&copy_wal)
    );
    copy.start_again().expect("start with pg_wal kept");
    copy.wait_promoted(Duration::from_secs(120));
    assert_eq!(state(&copy), expected);
    source.stop();
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn info(setup: &Setup) -> serde_json::Value {
    let out = setup.ok(&["info", "--output", "json"]);
    let all: serde_json::Value = serde_json::from_str(&out).expect("info JSON");
    all["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "main").cloned())
        .unwrap_or_else(|| panic!("no cluster main in {all}"))
}

fn ids(cluster: &serde_json::Value) -> Vec<String> {
    cluster["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["id"].as_str().expect("id").to_string())
        .collect()
}

/// Three backups; pins and dry runs change nothing; a recovery window keeps the newest
/// backup before it and everything in it, and removes older backups and their WAL. The
/// oldest instant `info` then promises can be restored to; one earlier is refused.
#[test]
fn expire_keeps_the_recovery_window_restorable() {
    let setup = Setup::local();
    let Some(mut source) = with_pgbench(&setup, archiving_cluster(), "1") else {
        return;
    };
    let a = backup(&setup, &source, &["--label", "a"]);
    pgbench(&source, &["-n", "-t", "200"]);
    source.psql("SELECT pg_switch_wal()");
    std::thread::sleep(Duration::from_secs(2));
    let b = backup(&setup, &source, &["--label", "b"]);
    let state_at_b = state(&source);
    std::thread::sleep(Duration::from_secs(3));
    source.psql("INSERT INTO marks VALUES ('after b')");
    let c = backup(&setup, &source, &["--label", "c"]);
    source.psql("INSERT INTO marks VALUES ('after c')");
    switch_and_wait_archived(&source);

    let before = info(&setup);
    assert_eq!(
        ids(&before),
        [&a["id"], &b["id"], &c["id"]].map(|v| v.as_str().unwrap_or("").to_string())
    );
    assert!(
        before["backups"]
            .as_array()
            .expect("backups")
            .iter()
            .all(|b| b["wal_complete"] == true),
        "{before}"
    );
    assert_eq!(before["wal"]["gaps"], serde_json::json!([]));
    let text = setup.ok(&["info"]);
    assert!(
        text.contains("recoverable:") && text.contains("complete"),
        "{text}"
    );

    // Dry run and pins.
    setup.ok(&["backup", "pin", a["id"].as_str().expect("id")]);
    let dry: serde_json::Value = serde_json::from_str(&setup.ok(&[
        "expire",
        "--keep-last",
        "1",
        "--dry-run",
        "--output",
        "json",
    ]))
    .expect("JSON");
    assert_eq!(dry["expired"].as_array().map(Vec::len), Some(1), "{dry}");
    assert_eq!(dry["expired"][0]["id"], b["id"]);
    assert_eq!(ids(&info(&setup)).len(), 3, "a dry run changes nothing");
    setup.ok(&["backup", "unpin", a["id"].as_str().expect("id")]);
    let err = setup.fails(&["expire"]);
    assert!(err.contains("no retention policy"), "{err}");
    let err = setup.fails(&["expire", "--recovery-window", "fortnight"]);
    assert!(err.contains("--recovery-window"), "{err}");

    // A window that starts between b and c: b is its base, a goes.
    let b_stop = chrono::DateTime::parse_from_rfc3339(b["stop_time"].as_str().expect("stop_time"))
        .expect("time");
    let window = (chrono::Utc::now() - b_stop.with_timezone(&chrono::Utc)).num_seconds() - 1;
    let report: serde_json::Value = serde_json::from_str(&setup.ok(&[
        "expire",
        "--recovery-window",
        &format!("{window}s"),
        "--output",
        "json",
    ]))
    .expect("JSON");
    assert_eq!(
        report["expired"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(report["expired"][0]["id"], a["id"]);
    assert!(
        report["wal_expired"]["files"].as_u64() > Some(0),
        "{report}"
    );
    let after = info(&setup);
    assert_eq!(ids(&after).len(), 2);
    let first = after["wal"]["first"]
        .as_str()
        .expect("first WAL")
        .to_string();
    assert_eq!(
        first,
        segment_of(b["start_lsn"].as_str().expect("lsn")),
        "{after}"
    );
    setup.ok(&["verify"]);

    // The oldest promised instant works; one earlier does not.
    let from = after["recoverable"]["from"]
        .as_str()
        .expect("window")
        .to_string();
    source.stop();
    let mut restored = restore_and_start(&setup, source.bin(), &["--target-time", &from]);
    assert_eq!(state(&restored), state_at_b);
    judge(&mut restored);
    let earlier = (chrono::DateTime::parse_from_rfc3339(&from).expect("time")
        - chrono::Duration::seconds(1))
    .to_rfc3339();
    let err = restore_fails(&setup, "too-early", &["--target-time", &earlier]);
    assert!(err.contains("ends before the target"), "{err}");
}

/// A restore holds the backup it restored against expire (`--hold`, 24h by default): the
/// restored server fetches the WAL from that backup's start while it recovers, so an
/// expire meanwhile keeps the backup and that WAL, and the copy, started only after the
/// expire, still recovers to the end of the archive. `backup unpin` ends a hold early;
/// a hold past its time holds nothing and the next expire deletes it.
#[test]
fn a_restore_holds_its_backup_against_expire_while_the_copy_recovers() {
    let setup = Setup::local();
    let Some(source) = with_pgbench(&setup, archiving_cluster(), "1") else {
        return;
    };
    let old_backup = backup(&setup, &source, &[]);
    let old = old_backup["id"].as_str().expect("backup id").to_string();
    let old_start = segment_of(old_backup["start_lsn"].as_str().expect("start_lsn"));
    pgbench(&source, &["-n", "-t", "200"]);
    switch_and_wait_archived(&source);
    let newer = backup(&setup, &source, &[])["id"]
        .as_str()
        .expect("backup id")
        .to_string();
    source.psql("INSERT INTO marks VALUES ('after both')");
    switch_and_wait_archived(&source);
    let at_end = state(&source);

    let (dir, pgdata) = new_data_directory("pgvault-held-");
    let restore_json = |pgdata: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "restore",
            "--pgdata",
            pgdata,
            "--archive-mode",
            "off",
            "--target-action",
            "promote",
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&setup.ok(&args)).expect("restore JSON")
    };
    let restored = restore_json(&pgdata, &["--backup", &old]);
    assert!(restored["held_until"].is_string(), "{restored}");
    let expire = || -> serde_json::Value {
        serde_json::from_str(&setup.ok(&["expire", "--keep-last", "1", "--output", "json"]))
            .expect("expire JSON")
    };
    let report = expire();
    assert_eq!(report["expired"], serde_json::json!([]), "{report}");
    // Only the WAL from before it.
    assert!(
        report["wal_expired"]["last"]
            .as_str()
            .is_none_or(|last| *last < *old_start),
        "{report}"
    );
    let kept = report["kept"].as_array().expect("kept");
    assert!(
        kept.iter().any(|k| k["id"] == old.as_str()
            && k["reasons"][0]
                .as_str()
                .is_some_and(|r| r.starts_with("held until")
                    && r.contains(&format!(":{pgdata} (its WAL is what")))),
        "{report}"
    );
    let listed = info(&setup);
    let held: Vec<&serde_json::Value> = (listed["backups"].as_array().expect("backups").iter())
        .filter(|b| b["held_until"].is_string())
        .collect();
    assert!(held.len() == 1 && held[0]["id"] == old.as_str(), "{listed}");
    let copy = Cluster::adopt(source.bin().clone(), dir).expect("start the restored copy");
    copy.wait_promoted(Duration::from_secs(120));
    assert_eq!(state(&copy), at_end);
    drop(copy);

    let unpinned = setup.ok(&["backup", "unpin", &old]);
    assert!(
        unpinned.contains("unpinned, and 1 restore hold on it released"),
        "{unpinned}"
    );
    let report = expire();
    assert!(
        report["expired"]
            .as_array()
            .is_some_and(|e| e.len() == 1 && e[0]["id"] == old.as_str()),
        "{report}"
    );
    assert!(
        report["wal_expired"]["files"].as_u64() > Some(0),
        "{report}"
    );

    let holds = setup.path("repo/files/holds/main");
    let (_brief_dir, brief) = new_data_directory("pgvault-held-");
    let restored = restore_json(&brief, &["--backup", &newer, "--hold", "1s"]);
    assert!(restored["held_until"].is_string(), "{restored}");
    let (_none_dir, none) = new_data_directory("pgvault-held-");
    let restored = restore_json(&none, &["--hold", "0"]);
    assert!(restored["held_until"].is_null(), "{restored}");
    assert_eq!(testkit::published_objects(&holds), 1);
    let refused = restore_fails(&setup, "refused", &["--hold", "soon"]);
    assert!(
        refused.contains("--hold: cannot read duration \"soon\""),
        "{refused}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let report = expire();
    assert_eq!(report["holds_ended"], 1, "{report}");
    assert_eq!(testkit::published_objects(&holds), 0);
}

/// A backup whose WAL has gone from the repository is passed over for the newest one
/// that can be restored (with a warning naming both), and refused, naming the missing
/// file, when it is the one asked for. A target LSN past a gap in the archive is refused
/// before anything is written; one past the end of the archive gets a warning.
#[test]
fn restores_choose_backups_their_wal_can_reach() {
    let setup = Setup::local();
    let Some(mut source) = with_pgbench(&setup, archiving_cluster(), "1") else {
        return;
    };
    let first = backup(&setup, &source, &[]);
    let at_first = state(&source);
    pgbench(&source, &["-n", "-t", "100"]);
    let second = backup(&setup, &source, &[]);
    let mut segments = Vec::new();
    let mut lsn = String::new();
    for round in 0..3 {
        source.psql(&format!("INSERT INTO marks VALUES ('after {round}')"));
        lsn = source.psql("SELECT pg_current_wal_lsn()");
        segments.push(source.psql("SELECT pg_walfile_name(pg_switch_wal())"));
    }
    wait_archived(&source, &segments[2]);
    source.stop();
    let wal = setup.path("repo").join("files/wal/main/00000001");

    // A gap before the target's segment.
    let middle = wal.join(&segments[1]);
    let kept = fs::read(&middle).expect("read a segment");
    fs::remove_file(&middle).expect("remove a segment");
    let err = restore_fails(&setup, "past-gap", &["--target-lsn", &lsn]);
    assert!(
        err.contains(&format!(
            "--target-lsn {lsn} is out of reach: replay stops after {}",
            segments[0]
        )) && err.contains(&format!("{} is missing", segments[1])),
        "{err}"
    );
    assert!(!setup.path("past-gap").exists(), "a refused restore wrote");
    // To the end of the archive: a warning, and the server indeed opens at the gap.
    let (dir, pgdata) = new_data_directory("pgvault-restored-");
    let out = setup.run(&["restore", "--pgdata", &pgdata, "--archive-mode", "off"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("recovery to the end of the archived WAL will end early")
            && stderr.contains(&format!(
                "replay stops after {}: {} is missing",
                segments[0], segments[1]
            )),
        "{stderr}"
    );
    let restored = Cluster::adopt(source.bin().clone(), dir).expect("start");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(
        restored.psql(
            "SELECT string_agg(name, ',' ORDER BY name) FROM marks WHERE name LIKE 'after %'"
        ),
        "after 0"
    );
    drop(restored);
    fs::write(&middle, kept).expect("put the segment back");

    // Past the end of the archive: a warning, and the restore goes on.
    let past_end = setup.path("past-end").display().to_string();
    let out = setup.run(&["restore", "--pgdata", &past_end, "--target-lsn", "FF/0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("WARN")
            && stderr.contains(&format!("the archive ends with {}", segments[2]))
            && stderr.contains("refuses to start"),
        "{stderr}"
    );

    // The second backup's last segment gone: the first is restored instead.
    let second_id = second["id"].as_str().expect("id");
    fs::remove_file(wal.join(segment_of(second["stop_lsn"].as_str().expect("lsn"))))
        .expect("remove the second backup's last segment");
    let err = restore_fails(&setup, "asked-for", &["--backup", second_id]);
    assert!(
        err.contains(&format!("backup {} cannot be restored", &second_id[..8]))
            && err.contains("is missing"),
        "{err}"
    );
    let (dir, pgdata) = new_data_directory("pgvault-restored-");
    let out = setup.run(&[
        "restore",
        "--pgdata",
        &pgdata,
        "--target",
        "immediate",
        "--target-action",
        "promote",
        "--archive-mode",
        "off",
        "--output",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["backup"], first["id"], "{report}");
    let first_id = first["id"].as_str().expect("id");
    assert!(
        stderr.contains(&format!("restoring the older backup {}", &first_id[..8]))
            && stderr.contains(&second_id[..8]),
        "{stderr}"
    );
    let mut restored = Cluster::adopt(source.bin().clone(), dir).expect("start");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(state(&restored), at_first);
    judge(&mut restored);
}

fn segment_of(lsn: &str) -> String {
    let (hi, lo) = lsn.split_once('/').expect("an LSN");
    let value = (u64::from_str_radix(hi, 16).expect("hex") << 32)
        | u64::from_str_radix(lo, 16).expect("hex");
    let segno = value >> 24;
    format!("00000001{:08X}{:08X}", segno >> 8, segno & 0xFF)
}

fn verify_json(setup: &Setup, extra: &[&str]) -> (bool, serde_json::Value) {
    let mut args = vec!["verify", "--output", "json"];
    args.extend_from_slice(extra);
    let out = setup.run(&args);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify JSON: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

fn verdict(report: &serde_json::Value, id: &serde_json::Value) -> serde_json::Value {
    report["backups"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["id"] == *id).cloned())
        .unwrap_or_else(|| panic!("no verdict for {id} in {report}"))
}

/// Files of a local repository under `dir` (relative), largest first.
fn repo_files(setup: &Setup, dir: &str) -> Vec<std::path::PathBuf> {
    let mut files = walk_files(&setup.path("repo").join(dir));
    files.sort_by_key(|f| std::cmp::Reverse(fs::metadata(f).map(|m| m.len()).unwrap_or(0)));
    files
}

/// Replaces a read-only repository object, as a bad disk or an attacker would.
fn replace_object(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = fs::read(path).expect("read object");
    change(&mut bytes);
    fs::remove_file(path).expect("remove object");
    fs::write(path, bytes).expect("write object");
}

/// verify proves backups restorable, skips what it proved before, re-checks pages, and
/// names the backup each kind of damage breaks: a missing history file, a missing WAL
/// segment of a backup's range, a flipped byte in a pack (`--full`), a deleted pack.
#[test]
fn verify_names_what_breaks_each_backup() {
    let setup = Setup::local();
    let Some(mut source) = with_pgbench(&setup, archiving_cluster(), "1") else {
        return;
    };
    // Files modified within a second of a backup's start are read again by the next
    // one (their mtime cannot prove them unchanged); on a fast machine everything since
    // initdb is that recent, and the estimate below would rightly read it all.
    std::thread::sleep(Duration::from_millis(1100));
    let a = backup(&setup, &source, &["--label", "a"]);
    pgbench(&source, &["-n", "-t", "100"]);
    switch_and_wait_archived(&source);

    // The estimate of the next backup reads only changed files and writes nothing.
    let estimate = backup(&setup, &source, &["--dry-run"]);
    assert_eq!(estimate["previous"], a["id"], "{estimate}");
    assert!(
        estimate["files_to_read"].as_u64() < estimate["files"].as_u64()
            && estimate["read_bytes"].as_u64() < estimate["size_bytes"].as_u64()
            && estimate["stored_bytes_estimate"].as_u64().is_some(),
        "{estimate}"
    );
    assert_eq!(ids(&info(&setup)).len(), 1, "a dry run stores no backup");

    let (ok, first) = verify_json(&setup, &["--pages"]);
    assert!(ok, "{first}");
    assert_eq!(verdict(&first, &a["id"])["restorable"], true);
    assert!(
        verdict(&first, &a["id"])["pages_checked"].as_u64() > Some(100),
        "{first}"
    );
    assert!(first["packs_read"].as_u64() > Some(0), "{first}");
    let (ok, second) = verify_json(&setup, &[]);
    assert!(ok, "{second}");
    assert_eq!(
        second["packs_read"], 0,
        "proven packs are not read again: {second}"
    );
    assert!(second["packs_skipped"].as_u64() > Some(0), "{second}");
    assert!(second["wal_files_skipped"].as_u64() > Some(0), "{second}");
    let (ok, full) = verify_json(&setup, &["--full"]);
    assert!(ok && full["packs_read"] == first["packs_read"], "{full}");

    // A backup on timeline 2: restore, promote (it archives 00000002.history into the
    // same repository), back it up.
    source.stop();
    let restored = restore_and_start(&setup, source.bin(), &[]);
    let b = backup(&setup, &restored, &["--label", "on timeline 2"]);
    assert_eq!(b["timeline"], 2, "{b}");
    switch_and_wait_archived(&restored);
    let (ok, report) = verify_json(&setup, &[]);
    assert!(ok, "{report}");

    let history = setup
        .path("repo")
        .join("files/wal/main/00000002/00000002.history");
    fs::remove_file(&history).expect("remove the history file");
    let (ok, report) = verify_json(&setup, &[]);
    assert!(!ok);
    let broken = verdict(&report, &b["id"]);
    assert_eq!(broken["restorable"], false);
    assert!(
        broken["problems"].to_string().contains("00000002.history"),
        "{broken}"
    );
    assert_eq!(verdict(&report, &a["id"])["restorable"], true, "{report}");

    let start_segment = segment_of(a["start_lsn"].as_str().expect("lsn"));
    fs::remove_file(
        setup
            .path("repo")
            .join("files/wal/main/00000001")
            .join(&start_segment),
    )
    .expect("remove a segment of backup a");
    let (ok, report) = verify_json(&setup, &[]);
    assert!(!ok);
    let broken = verdict(&report, &a["id"]);
    assert!(
        broken["problems"].to_string().contains(&start_segment),
        "{broken}"
    );
    let text = String::from_utf8_lossy(&setup.run(&["verify"]).stdout).into_owned();
    assert!(
        text.contains("NOT restorable") && text.contains(&start_segment),
        "{text}"
    );

    // Packs: a flipped byte is found by --full (the incremental run trusts its proof);
    // a deleted pack is found by every run.
    let packs = repo_files(&setup, "data");
    replace_object(&packs[0], |bytes| {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
    });
    let (ok, report) = verify_json(&setup, &["--full"]);
    assert!(!ok);
    let damaged = packs[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        report["snapshot_problems"].to_string().contains(&damaged),
        "{report}"
    );
    fs::remove_file(&packs[1]).expect("delete a pack");
    let (ok, report) = verify_json(&setup, &[]);
    assert!(!ok);
    let deleted = packs[1]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    // Named as missing, or as not found when it held the trees verify walks first.
    let problems = report["snapshot_problems"].to_string();
    assert!(
        problems.contains(&deleted)
            && (problems.contains("missing") || problems.contains("not found")),
        "{report}"
    );
}

/// PostgreSQL 17 with `summarize_wal`: the second backup reads only the chunks holding
/// blocks the server's WAL summaries list as modified (plus truncated and new files),
/// reuses the rest, and restores to exactly the source.
#[test]
fn wal_summaries_limit_reads_to_modified_blocks() {
    let setup = Setup::local();
    let Some(mut source) = archiving_cluster_of(17) else {
        return;
    };
    source.psql("ALTER SYSTEM SET summarize_wal = on");
    source.psql("SELECT pg_reload_conf()");
    setup.setup_cluster(&source);
    pgbench(&source, &["-q", "-i", "-s", "10"]);
    source.psql("CREATE TABLE marks (name text)");
    source.psql("CREATE TABLE shrinking AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 100000) g");
    source.psql("CREATE TABLE emptied AS SELECT g AS id FROM generate_series(1, 50000) g");
    let first = backup(&setup, &source, &[]);
    assert_eq!(
        first["wal_summary_blocks"],
        serde_json::Value::Null,
        "{first}"
    );

    pgbench(&source, &["-n", "-t", "200"]);
    source.psql("DELETE FROM shrinking WHERE id > 1000");
    source.psql("VACUUM shrinking");
    source.psql("TRUNCATE emptied");
    source.psql("INSERT INTO emptied VALUES (1), (2)");
    source.psql("INSERT INTO marks VALUES ('between the backups')");
    let accounts: u64 = source
        .psql("SELECT pg_relation_size('pgbench_accounts')")
        .parse()
        .expect("size");
    let second = backup(&setup, &source, &[]);
    let blocks = second["wal_summary_blocks"].as_u64().unwrap_or(0);
    assert!(blocks > 0, "WAL summaries were not used: {second}");
    let read = second["read_bytes"].as_u64().expect("read bytes");
    assert!(
        read < accounts / 2,
        "read {read} bytes, pgbench_accounts alone is {accounts}: {second}"
    );
    let expected = format!(
        "{}|{}|{}",
        state(&source),
        source.psql("SELECT count(*) || '/' || sum(id) FROM shrinking"),
        source.psql("SELECT count(*) FROM emptied")
    );
    switch_and_wait_archived(&source);
    let id = second["id"].as_str().expect("id").to_string();
    let mut restored = check_copy(&setup, source.bin(), &id);
    let got = format!(
        "{}|{}|{}",
        state(&restored),
        restored.psql("SELECT count(*) || '/' || sum(id) FROM shrinking"),
        restored.psql("SELECT count(*) FROM emptied")
    );
    assert_eq!(got, expected);
    judge(&mut restored);
    source.stop();
}

/// `kill -9` in the middle of a backup: no backup is listed, and the next one stores
/// only what the killed one had not made durable and indexed (an index object every 64
/// packs), so an interrupted backup of a large cluster does not start over. The resumed
/// backup restores, starts and passes PostgreSQL's checks.
#[test]
fn a_killed_backup_is_resumed_by_the_next() {
    const PACK_MIB: u64 = 4;
    const PACKS_PER_INDEX: u64 = 64;
    let setup = Setup::local_with(&["--pack-size", &PACK_MIB.to_string()]);
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    cluster.psql("CREATE TABLE kept AS SELECT g FROM generate_series(1, 100000) g");
    // Random bytes neither compress nor deduplicate: stored bytes = bytes read. Any file
    // in the data directory is backed up, as the server's own base backup does.
    let blob = cluster.pgdata().join("pgvault_test_random");
    let size: u64 = 448 << 20;
    let mut random = fs::File::open("/dev/urandom").expect("urandom");
    let mut out = fs::File::create(&blob).expect("create");
    let copied = std::io::copy(&mut std::io::Read::take(&mut random, size), &mut out);
    assert_eq!(copied.expect("write random file"), size);
    drop(out);
    // Killed once it has written more packs than one index object lists, and well
    // before the last of the file's (about 112).
    let packs = || {
        let dirs = fs::read_dir(setup.path("repo").join("data"));
        dirs.map_or(0, |dirs| {
            (dirs.flatten())
                .map(|dir| testkit::published_objects(&dir.path()))
                .sum::<usize>()
        })
    };
    let kill_at = packs() + PACKS_PER_INDEX as usize + 16;
    let args = backup_args(&cluster, &["--jobs", "2"]);
    let mut child = setup
        .cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start backup");
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while packs() < kill_at {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the backup ended before it wrote {kill_at} packs"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "not {kill_at} packs in 300 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    assert_eq!(
        ids(&info(&setup)),
        Vec::<String>::new(),
        "a killed backup is listed"
    );

    let report = backup(&setup, &cluster, &["--jobs", "2"]);
    let new_bytes = report["new_bytes"].as_u64().expect("new_bytes");
    let kept = (PACKS_PER_INDEX * PACK_MIB) << 20;
    assert!(
        new_bytes + kept <= report["read_bytes"].as_u64().expect("read_bytes"),
        "the resumed backup stored {new_bytes} new bytes: {report}"
    );
    setup.ok(&["verify"]);
    let expected = fs::read(&blob).expect("read random file");
    let state = cluster.psql("SELECT sum(g) FROM kept");
    let mut restored = restore_and_start(&setup, cluster.bin(), &["--target", "immediate"]);
    assert_eq!(restored.psql("SELECT sum(g) FROM kept"), state);
    let restored_blob = restored.pgdata().join("pgvault_test_random");
    assert!(fs::read(&restored_blob).expect("restored random file") == expected);
    judge(&mut restored);
}

/// Peak memory and the number of relation files: for the first backup of a directory of
/// 200,000 (empty) relation files and for the next, which reads the first's tree of it as
/// its parent, and for the estimate (`--dry-run`) of that next backup; for a restore of
/// that backup and a delta restore over it. The names are held in one buffer and the
/// trees are streamed (compressed) in and out, so what remains is about 14 bytes of name
/// and span and the compressed tree per entry: about 10 MiB here (31 and 72 MiB when the
/// names and trees were held whole; the restore took 82 MiB more when it held every
/// file's node), bounded at 20 MiB.
#[test]
fn memory_is_flat_in_the_number_of_relation_files() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    // Peak RSS in MiB and stdout of a pgvault run.
    let measured = |args: &[&str]| {
        let mut cmd = std::process::Command::new("/usr/bin/time");
        let mut all = vec!["--jobs", "2"];
        all.extend_from_slice(args);
        let inner = setup.cmd(&all);
        cmd.args(["-f", "maxrss_kib=%M"])
            .arg(inner.get_program())
            .args(inner.get_args())
            .envs(inner.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
            .stdin(std::process::Stdio::null());
        for (key, value) in inner.get_envs() {
            if value.is_none() {
                cmd.env_remove(key);
            }
        }
        let out = cmd.output().expect("run pgvault");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {stderr}");
        let kib: u64 = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("maxrss_kib="))
            .next_back()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no max RSS in {stderr}"));
        (kib / 1024, out.stdout)
    };
    let pgdata = cluster.pgdata().display().to_string();
    let measured_backup = |extra: &[&str]| {
        let conninfo = cluster.conninfo();
        let args = [
            "backup",
            "--fast",
            "--pg-conn",
            &conninfo,
            "--pgdata",
            &pgdata,
            "--output",
            "json",
        ];
        let (mib, stdout) = measured(&[&args[..], extra].concat());
        let report: serde_json::Value = serde_json::from_slice(&stdout).expect("json");
        (mib, report)
    };
    // Peak RSS of a restore of `backup` into a new directory, then of a delta restore
    // over it.
    let measured_restores = |backup: &serde_json::Value| {
        let id = backup["id"].as_str().expect("backup id");
        let (_dir, target) = new_data_directory("pgvault-restored-");
        let restore = ["restore", "--backup", id, "--pgdata", &target];
        let (full, _) = measured(&restore);
        let (delta, _) = measured(&[&restore[..], &["--delta"]].concat());
        (full, delta)
    };
    measured_backup(&[]); // the key cache and the page cache are warm from here on
    let (baseline, first) = measured_backup(&[]);
    let (estimate_baseline, _) = measured_backup(&["--dry-run"]);
    let database = cluster.psql("SELECT oid FROM pg_database WHERE datname = 'postgres'");
    let dir = cluster.pgdata().join("base").join(&database);
    for i in 0..200_000u32 {
        fs::write(dir.join(format!("{}", 900_000_000 + i)), b"").expect("relation file");
    }
    let (many, report) = measured_backup(&[]);
    let (estimate_many, _) = measured_backup(&["--dry-run"]);
    let (again, _) = measured_backup(&[]);
    let (restore_baseline, delta_baseline) = measured_restores(&first);
    let (restore_many, delta_many) = measured_restores(&report);
    eprintln!(
        "backup max RSS: {baseline} MiB; with 200,000 more relation files {many} MiB, \
         and {again} MiB for the backup after (its estimate: {estimate_baseline} → \
         {estimate_many} MiB); restore {restore_baseline} → {restore_many} MiB, delta \
         restore {delta_baseline} → {delta_many} MiB"
    );
    assert_eq!(
        report["files"].as_u64().unwrap_or(0),
        first["files"].as_u64().unwrap_or(0) + 200_000,
        "{report}"
    );
    assert!(
        many.max(again) <= baseline + 20 && estimate_many <= estimate_baseline + 20,
        "200,000 relation files raised the peak from {baseline} MiB to {many} MiB, \
         {again} MiB in the backup after, {estimate_many} MiB (from {estimate_baseline}) \
         in its estimate"
    );
    assert!(
        restore_many <= restore_baseline + 20 && delta_many <= delta_baseline + 20,
        "200,000 relation files raised the restore's peak from {restore_baseline} MiB to \
         {restore_many} MiB, the delta restore's from {delta_baseline} MiB to {delta_many} MiB"
    );
}

/// The pgbench balances of accounts, tellers, branches and history: every pgbench
/// transaction adds the same delta to one row of each, so in any consistent state the
/// four sums are equal (all start at zero).
fn pgbench_balances(cluster: &Cluster) -> Vec<i64> {
    let sums = cluster.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || \
         (SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || \
         (SELECT sum(bbalance) FROM pgbench_branches) || ' ' || \
         (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
    );
    sums.split(' ')
        .map(|sum| sum.parse().expect("a sum"))
        .collect()
}

fn history_rows(cluster: &Cluster) -> u64 {
    let count = cluster.psql("SELECT count(*) FROM pgbench_history");
    count.parse().expect("a count")
}

/// The pgbench state and every `churn_*` table's rows, for comparing with the source.
fn state_with_churn(cluster: &Cluster) -> String {
    let tables = cluster.psql(
        "SELECT string_agg(relname, ' ' ORDER BY relname) FROM pg_class \
         WHERE relname LIKE 'churn\\_%' AND relkind = 'r'",
    );
    let mut all = state(cluster);
    for table in tables.split_whitespace() {
        all.push_str(&cluster.psql(&format!(
            "SELECT ' {table}:' || count(*) || '/' || coalesce(md5(string_agg(h, ',' ORDER BY g)), '') \
             FROM {table}"
        )));
    }
    all
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Tables created, filled, indexed, shrunk by VACUUM, truncated (a new file) and dropped,
/// one after another until `stop`: files appear, shrink and vanish under a backup.
fn churn(cluster: &Cluster, stop: &AtomicBool) -> u32 {
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        cluster.psql(&format!(
            "CREATE TABLE churn_{round} AS SELECT g, md5(g::text) AS h \
             FROM generate_series(1, 20000) g; CREATE INDEX ON churn_{round} (g)"
        ));
        if round > 1 {
            let previous = round - 1;
            cluster.psql(&format!("DELETE FROM churn_{previous} WHERE g > 500"));
            cluster.psql(&format!("VACUUM churn_{previous}"));
        }
        if round > 2 {
            let older = round - 2;
            cluster.psql(&format!(
                "TRUNCATE churn_{older}; INSERT INTO churn_{older} SELECT 1, 'kept'"
            ));
        }
        if round > 3 {
            cluster.psql(&format!("DROP TABLE churn_{}", round - 3));
        }
    }
    round
}

/// Hot backups as production takes them: pgbench clients and a loop of DDL (`churn`) run
/// through a first and a second backup, so pages are written while read and relation
/// files grow, shrink, vanish and appear. Each backup, restored to its own end, passes
/// PostgreSQL's checks and pgbench's invariant and holds what was committed before it
/// started; after the load, a delta restore over the first backup's copy to a restore
/// point equals the source.
fn backups_under_write_load(major: u32, summaries: bool) {
    let setup = Setup::local();
    let Some(source) = archiving_cluster_of(major) else {
        return;
    };
    if summaries {
        source.psql("ALTER SYSTEM SET summarize_wal = on");
        source.psql("SELECT pg_reload_conf()");
    }
    let Some(mut source) = with_pgbench(&setup, Some(source), "10") else {
        return;
    };
    let port = source.port().to_string();
    let mut load = std::process::Command::new(source.bin().tool("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args([
            "-n", "-c", "4", "-j", "2", "-R", "100", "-T", "600", "postgres",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pgbench");
    let stop = AtomicBool::new(false);
    let (reports, rounds) = std::thread::scope(|scope| {
        let churning = scope.spawn(|| churn(&source, &stop));
        // Also when a backup panics, or the scope would wait for the loop forever.
        let _stop = StopOnDrop(&stop);
        let mut reports = Vec::new();
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(1500));
            let committed = history_rows(&source);
            let report = backup(&setup, &source, &["--jobs", "2"]);
            reports.push((committed, report));
        }
        drop(_stop);
        (reports, churning.join().expect("the DDL loop"))
    });
    assert!(
        load.try_wait().expect("pgbench").is_none(),
        "pgbench ended before the backups did"
    );
    load.kill().expect("stop pgbench");
    load.wait().expect("reap pgbench");
    assert!(rounds > 3, "only {rounds} rounds of DDL");
    if summaries {
        let second = &reports[1].1;
        assert!(
            second["wal_summary_blocks"].as_u64() > Some(0),
            "WAL summaries were not used: {second}"
        );
    }

    source.psql("INSERT INTO marks VALUES ('after the load')");
    source.psql("SELECT pg_create_restore_point('after-the-load')");
    let expected = state_with_churn(&source);
    switch_and_wait_archived(&source);

    let mut copies = Vec::new();
    for (committed, report) in &reports {
        let id = report["id"].as_str().expect("id");
        let mut copy = check_copy(&setup, source.bin(), id);
        let balances = pgbench_balances(&copy);
        assert!(
            balances.windows(2).all(|pair| pair[0] == pair[1]),
            "pgbench's sums differ in backup {id}: {balances:?}"
        );
        let restored = history_rows(&copy);
        assert!(
            restored > *committed,
            "backup {id} holds {restored} pgbench transactions, {committed} had committed \
             before it started"
        );
        judge(&mut copy);
        copies.push(copy);
    }

    let mut copy = copies.swap_remove(0);
    let pgdata = copy.pgdata().display().to_string();
    setup.ok(&[
        "restore",
        "--pgdata",
        &pgdata,
        "--delta",
        "--target-name",
        "after-the-load",
        "--target-action",
        "promote",
        "--target-timeline",
        "current",
    ]);
    copy.start_again().expect("start after the delta restore");
    copy.wait_promoted(Duration::from_secs(120));
    assert_eq!(state_with_churn(&copy), expected);
    judge(&mut copy);
    source.stop();
}

#[test]
fn backups_under_write_load_restore_consistently() {
    backups_under_write_load(15, false);
}

#[test]
fn block_level_backups_under_write_load_restore_consistently() {
    backups_under_write_load(17, true);
}

/// `chown -R postgres:postgres` when run as root, as the server and archiver run.
fn give_to_postgres(path: &Path) {
    let status = std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {}", path.display());
}

/// The configuration laid out as Debian does it: `postgresql.conf`, `pg_hba.conf`,
/// `pg_ident.conf` and a `conf.d/` outside the data directory (on 17, `pg_hba.conf`
/// includes an `hba.d/` too). Backups take them; a restore puts them back only when
/// asked, under a directory or where they were, and refuses to replace different files
/// without `--force`.
#[test]
fn configuration_outside_the_data_directory_is_backed_up_and_restored_on_request() {
    for major in [15, 17] {
        configuration_outside_the_data_directory(major);
    }
}

fn configuration_outside_the_data_directory(major: u32) {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::local();
    let Some(mut cluster) = archiving_cluster_of(major) else {
        return;
    };
    setup.setup_cluster(&cluster);
    let inside_only = backup(&setup, &cluster, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    cluster.stop();
    let pgdata = cluster.pgdata();
    let etc = cluster.dir().join(format!("etc/postgresql/{major}/main"));
    fs::create_dir_all(etc.join("conf.d")).expect("mkdir");
    for name in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
        fs::rename(pgdata.join(name), etc.join(name)).expect("move out");
    }
    let mut conf = fs::read_to_string(etc.join("postgresql.conf")).expect("read");
    conf.push_str(&format!(
        "data_directory = '{}'\nhba_file = '{}'\nident_file = '{}'\ninclude_dir = 'conf.d'\n",
        pgdata.display(),
        etc.join("pg_hba.conf").display(),
        etc.join("pg_ident.conf").display()
    ));
    fs::write(etc.join("postgresql.conf"), conf).expect("write");
    fs::write(etc.join("conf.d/50-tuning.conf"), "work_mem = '7MB'\n").expect("write");
    // Debian's, for pg_ctlcluster.
    fs::write(etc.join("start.conf"), "auto\n").expect("write");
    // From 16 on pg_hba.conf can include files; the server refuses to start without them.
    let mut names = vec!["postgresql.conf", "conf.d/50-tuning.conf", "pg_hba.conf"];
    if major >= 16 {
        let mut hba = fs::read_to_string(etc.join("pg_hba.conf")).expect("read");
        hba.push_str("include_dir hba.d\n");
        fs::write(etc.join("pg_hba.conf"), hba).expect("write");
        fs::create_dir(etc.join("hba.d")).expect("mkdir");
        fs::write(etc.join("hba.d/10-local.conf"), "local all all trust\n").expect("write");
        names.push("hba.d/10-local.conf");
    }
    names.extend(["pg_ident.conf", "start.conf"]);
    give_to_postgres(&cluster.dir().join("etc"));
    let config_file = etc.join("postgresql.conf");
    cluster
        .start_with(&format!("-c config_file={}", config_file.display()))
        .expect("start with the configuration outside");
    assert_eq!(cluster.psql("SHOW work_mem"), "7MB");
    assert_eq!(
        cluster.psql("SHOW config_file"),
        config_file.display().to_string()
    );

    backup(&setup, &cluster, &[]);
    let shown: serde_json::Value =
        serde_json::from_str(&setup.ok(&["backup", "show", "latest", "--output", "json"]))
            .expect("show JSON");
    let path = |name: &str| etc.join(name).display().to_string();
    let settings = [
        ("postgresql.conf", "config_file"),
        ("pg_hba.conf", "hba_file"),
        ("pg_ident.conf", "ident_file"),
    ];
    let expected: Vec<serde_json::Value> = (names.iter())
        .map(
            |name| match settings.iter().find(|(file, _)| file == name) {
                Some((_, setting)) => serde_json::json!({"path": path(name), "setting": setting}),
                None => serde_json::json!({"path": path(name)}),
            },
        )
        .collect();
    assert_eq!(
        shown["config_files"],
        serde_json::Value::Array(expected),
        "PostgreSQL {major}"
    );
    cluster.psql("CREATE TABLE marks AS SELECT 'configured outside' AS mark");
    switch_and_wait_archived(&cluster);

    // Not asked for: not restored, and said so.
    let (_plain_dir, plain) = new_data_directory("pgvault-config-");
    let stderr = setup.ok_stderr(&[
        "restore",
        "--pgdata",
        &plain,
        "--target-timeline",
        "current",
    ]);
    assert!(
        stderr.contains(&format!(
            "configuration: the backup also holds {}",
            path("postgresql.conf")
        )),
        "{stderr}"
    );
    assert!(!Path::new(&plain).join("postgresql.conf").exists());

    // Under a directory of their own, then a server started with them.
    let (restored_dir, restored) = new_data_directory("pgvault-config-");
    let config_to = restored_dir.path().join("config");
    let config_to_arg = config_to.display().to_string();
    let restore_args = [
        "restore",
        "--pgdata",
        &restored,
        "--target-timeline",
        "current",
        "--target-action",
        "promote",
        "--archive-mode",
        "off",
        "--config-to",
        &config_to_arg,
    ];
    let stderr = setup.ok_stderr(&restore_args);
    let under = |name: &str| config_to.join(etc.join(name).strip_prefix("/").expect("absolute"));
    for name in &names {
        assert_eq!(
            fs::read(under(name)).expect("restored"),
            fs::read(etc.join(name)).expect("source"),
            "{name}"
        );
        let mode = |path: &Path| fs::metadata(path).expect("stat").permissions().mode();
        assert_eq!(mode(&under(name)), mode(&etc.join(name)), "{name}");
    }
    for (setting, now) in [
        ("data_directory", restored.clone()),
        ("hba_file", under("pg_hba.conf").display().to_string()),
        ("ident_file", under("pg_ident.conf").display().to_string()),
    ] {
        assert!(
            stderr.contains(&format!(
                "warning: the restored configuration sets {setting} = '"
            )) && stderr.contains(&format!("but this restore put it at {now}:")),
            "{setting}: {stderr}"
        );
    }
    let server_options = format!(
        "-c config_file={} -c data_directory={restored} -c hba_file={} -c ident_file={}",
        under("postgresql.conf").display(),
        under("pg_hba.conf").display(),
        under("pg_ident.conf").display()
    );
    let started = Cluster::adopt_with(cluster.bin().clone(), restored_dir, &server_options)
        .expect("start with the restored configuration");
    started.wait_promoted(Duration::from_secs(120));
    assert_eq!(started.psql("SHOW work_mem"), "7MB");
    assert_eq!(started.psql("SELECT mark FROM marks"), "configured outside");

    // A different file there is not replaced without --force, and nothing is written.
    fs::write(under("conf.d/50-tuning.conf"), "work_mem = '1MB'\n").expect("edit");
    let (_again_dir, again) = new_data_directory("pgvault-config-");
    let mut args = restore_args.to_vec();
    args[2] = &again;
    let err = setup.fails(&args);
    assert!(
        err.contains(&format!(
            "--config-to: {} is there with other content than the backup's",
            under("conf.d/50-tuning.conf").display()
        )),
        "{err}"
    );
    assert!(
        !Path::new(&again).exists(),
        "a refused restore wrote the data directory"
    );
    args.push("--force");
    setup.ok(&args);
    assert_eq!(
        fs::read_to_string(under("conf.d/50-tuning.conf")).expect("read"),
        "work_mem = '7MB'\n"
    );

    // Run as a user that cannot write there: refused before anything is written.
    let root_only = tempfile::Builder::new()
        .prefix("pgvault-root-only-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    fs::set_permissions(root_only.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let (postgres_dir, as_postgres) = new_data_directory("pgvault-config-");
    give_to_postgres(postgres_dir.path());
    setup.give_to_postgres();
    let denied_to = root_only.path().join("config").display().to_string();
    let out = setup.run_as_postgres(&[
        "restore",
        "--pgdata",
        &as_postgres,
        "--target-timeline",
        "current",
        "--config-to",
        &denied_to,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "--config-to: cannot write into {}: Permission denied",
                root_only.path().display()
            )),
        "{err}"
    );
    assert!(
        !Path::new(&as_postgres).exists(),
        "a refused restore wrote the data directory"
    );

    // `/`: back where they were.
    fs::remove_file(etc.join("conf.d/50-tuning.conf")).expect("remove");
    let (_home_dir, home) = new_data_directory("pgvault-config-");
    setup.ok(&[
        "restore",
        "--pgdata",
        &home,
        "--target-timeline",
        "current",
        "--config-to",
        "/",
    ]);
    assert_eq!(
        fs::read_to_string(etc.join("conf.d/50-tuning.conf")).expect("back"),
        "work_mem = '7MB'\n"
    );

    for (extra, says) in [
        (
            vec!["--config-to", "config"],
            "--config-to config: give an absolute directory",
        ),
        (
            vec!["--backup", &inside_only, "--config-to", "/tmp"],
            "--config-to: this backup took no configuration files from outside its data directory",
        ),
    ] {
        let err = restore_fails(&setup, "refused", &extra);
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}

/// `postgresql.conf` a link out of the data directory (as configuration management
/// often sets it up), and another file linked from its top: backups take the files the
/// links lead to, at those places, so that a restore on a host without them makes the
/// links whole with `--config-to /`, and says when they lead nowhere.
#[test]
fn files_linked_from_the_data_directory_are_backed_up_where_the_links_lead() {
    let setup = Setup::local();
    let Some(mut cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    cluster.stop();
    let pgdata = cluster.pgdata();
    let linked = cluster.dir().join("managed");
    fs::create_dir(&linked).expect("mkdir");
    let mut conf = fs::read_to_string(pgdata.join("postgresql.conf")).expect("read");
    conf.push_str("work_mem = '7MB'\n");
    fs::write(linked.join("postgresql.conf"), conf).expect("write");
    fs::remove_file(pgdata.join("postgresql.conf")).expect("remove");
    std::os::unix::fs::symlink(
        linked.join("postgresql.conf"),
        pgdata.join("postgresql.conf"),
    )
    .expect("link");
    fs::write(linked.join("notes.txt"), "kept beside the cluster\n").expect("write");
    std::os::unix::fs::symlink(linked.join("notes.txt"), pgdata.join("notes.txt")).expect("link");
    // A link to a file inside the data directory is in the backup already.
    std::os::unix::fs::symlink(pgdata.join("PG_VERSION"), pgdata.join("version.txt"))
        .expect("link");
    give_to_postgres(&linked);
    cluster.start_again().expect("start through the link");
    assert_eq!(cluster.psql("SHOW work_mem"), "7MB");

    backup(&setup, &cluster, &[]);
    let shown: serde_json::Value =
        serde_json::from_str(&setup.ok(&["backup", "show", "latest", "--output", "json"]))
            .expect("show JSON");
    let path = |name: &str| linked.join(name).display().to_string();
    assert_eq!(
        shown["config_files"],
        serde_json::json!([
            {"path": path("postgresql.conf"), "setting": "config_file", "linked_from": "postgresql.conf"},
            {"path": path("notes.txt"), "linked_from": "notes.txt"},
        ])
    );
    let text = setup.ok(&["backup", "show", "latest"]);
    assert!(
        text.contains(&format!(
            "{} (config_file, linked from postgresql.conf)",
            path("postgresql.conf")
        )),
        "{text}"
    );
    cluster.psql("CREATE TABLE marks AS SELECT 'linked' AS mark");
    switch_and_wait_archived(&cluster);

    // A host without the files: the links lead nowhere, and the restore says so.
    let kept = cluster.dir().join("managed.kept");
    fs::rename(&linked, &kept).expect("move away");
    let (_plain_dir, plain) = new_data_directory("pgvault-linked-");
    let stderr = setup.ok_stderr(&[
        "restore",
        "--pgdata",
        &plain,
        "--target-timeline",
        "current",
    ]);
    for name in ["postgresql.conf", "notes.txt"] {
        assert!(
            stderr.contains(&format!(
                "warning: {plain}/{name} is a link that leads to no file on this host; the backup holds the file it led to, {}: --config-to / puts it back there",
                path(name)
            )),
            "{name}: {stderr}"
        );
    }
    assert!(!stderr.contains("version.txt"), "{stderr}");

    // Under another directory: the links still lead to the old places.
    let (_elsewhere_dir, elsewhere) = new_data_directory("pgvault-linked-");
    let config_to = setup.path("config").display().to_string();
    let stderr = setup.ok_stderr(&[
        "restore",
        "--pgdata",
        &elsewhere,
        "--target-timeline",
        "current",
        "--config-to",
        &config_to,
    ]);
    assert!(
        stderr.contains(&format!(
            "warning: {elsewhere}/postgresql.conf is a link that does not lead to {config_to}{}, where this restore wrote the file it led to",
            path("postgresql.conf")
        )),
        "{stderr}"
    );

    // `/`: the files come back where the links lead, and the server starts through them.
    let (restored_dir, restored) = new_data_directory("pgvault-linked-");
    let stderr = setup.ok_stderr(&[
        "restore",
        "--pgdata",
        &restored,
        "--target-timeline",
        "current",
        "--target-action",
        "promote",
        "--archive-mode",
        "off",
        "--config-to",
        "/",
    ]);
    assert!(!stderr.contains("is a link that"), "{stderr}");
    for name in ["postgresql.conf", "notes.txt"] {
        assert_eq!(
            fs::read(linked.join(name)).expect("back"),
            fs::read(kept.join(name)).expect("kept"),
            "{name}"
        );
        assert_eq!(
            fs::read_link(Path::new(&restored).join(name)).expect("a link"),
            linked.join(name)
        );
    }
    let started = Cluster::adopt(cluster.bin().clone(), restored_dir).expect("start restored");
    started.wait_promoted(Duration::from_secs(120));
    assert_eq!(started.psql("SHOW work_mem"), "7MB");
    assert_eq!(started.psql("SELECT mark FROM marks"), "linked");
}

/// A tablespace inside the data directory (PostgreSQL warns, but allows it) is backed up
/// once, as the tablespace, and restored to the same place inside the restored data
/// directory; a delta restore leaves its files to the tablespace's own comparison.
#[test]
fn a_tablespace_inside_the_data_directory_moves_with_it() {
    use std::os::unix::fs::MetadataExt;
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    let pgdata = cluster.pgdata();
    let location = pgdata.join("ts_inside");
    fs::create_dir(&location).expect("mkdir");
    give_to_postgres(&location);
    cluster.psql(&format!(
        "CREATE TABLESPACE inside LOCATION '{}'",
        location.display()
    ));
    cluster.psql(
        "CREATE TABLE marks TABLESPACE inside AS \
         SELECT 'inside' AS mark, g FROM generate_series(1, 200000) g",
    );
    // Frozen, so that reading it in the copy leaves its pages as they are.
    cluster.psql("VACUUM FREEZE marks");
    cluster.psql("CHECKPOINT");
    let size = |path: &Path| fs::metadata(path).expect("stat").len();
    let in_tablespace: u64 = walk_files(&location).iter().map(|f| size(f)).sum();
    let outside: u64 = (walk_files(&pgdata).iter())
        .filter(|f| {
            !f.starts_with(pgdata.join("pg_wal")) && !f.starts_with(pgdata.join("pg_tblspc"))
        })
        .map(|f| size(f))
        .sum();
    let report = backup(&setup, &cluster, &[]);
    let backed_up = report["size_bytes"].as_u64().expect("size");
    // Once: about the data directory's files, not those plus the tablespace's again.
    assert!(
        backed_up.abs_diff(outside) < in_tablespace / 2,
        "backed up {backed_up} bytes; the data directory has {outside}, its tablespace {in_tablespace}"
    );
    switch_and_wait_archived(&cluster);

    let mut restored = check_copy(&setup, cluster.bin(), report["id"].as_str().expect("id"));
    let moved = restored.pgdata().join("ts_inside");
    assert_eq!(
        restored
            .psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'inside'"),
        moved.display().to_string()
    );
    assert_eq!(restored.psql("SELECT count(*) FROM marks"), "200000");
    let relation = restored.psql("SELECT pg_relation_filepath('marks')");
    judge(&mut restored);

    let relation_file = restored.pgdata().join(&relation);
    let inode = fs::metadata(&relation_file).expect("stat").ino();
    let dir = restored.pgdata().display().to_string();
    let mut args = vec![
        "restore",
        "--pgdata",
        &dir,
        "--delta",
        "--target-timeline",
        "current",
    ];
    args.extend(CHECK_COPY);
    setup.ok(&args);
    assert_eq!(
        fs::metadata(&relation_file).expect("stat").ino(),
        inode,
        "the delta restore replaced the tablespace's unchanged file"
    );
    restored
        .start_again()
        .expect("start after the delta restore");
    assert_eq!(restored.psql("SELECT count(*) FROM marks"), "200000");

    let err = restore_fails(
        &setup,
        "relative-map",
        &["--tablespace-map", "inside=relative"],
    );
    assert!(
        err.contains("--tablespace-map \"inside=relative\": give an absolute directory"),
        "{err}"
    );

    // A relative --pgdata: links and created directories are named absolutely.
    let (elsewhere, _) = new_data_directory("pgvault-relative-");
    let out = setup
        .cmd(&["restore", "--pgdata", "data", "--target", "immediate"])
        .current_dir(elsewhere.path())
        .output()
        .expect("run pgvault");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let oid = cluster.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'inside'");
    assert_eq!(
        fs::read_link(elsewhere.path().join("data/pg_tblspc").join(oid)).expect("link"),
        elsewhere.path().join("data/ts_inside")
    );
}

/// A filesystem mounted for one test, unmounted when it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A repository whose disk fills during a backup: the backup fails in one line naming
/// the place and what to do; once there is room the next backup runs and verifies.
#[test]
fn a_full_repository_disk_fails_the_backup_with_advice() {
    let dir = shared_tempdir();
    let repo = dir.path().join("repo");
    fs::create_dir(&repo).expect("mkdir");
    let mount = |options: &str| {
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&repo)
            .status()
            .expect("mount")
    };
    // Room for the repository's own files and WAL, not for a backup.
    assert!(
        mount("size=1M,mode=0777").success(),
        "mount a tmpfs (as root)"
    );
    let _mounted = Mounted(repo.clone());
    let setup = Setup::new(dir, repo.display().to_string(), String::new());
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    let err = setup.fails(
        &backup_args(&cluster, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        err.contains(&format!("no space left in {} while writing data/", repo.display()))
            && err.contains("(make room there, or let `pgvault expire` drop what the retention no longer needs and `pgvault gc` free its space, then run the command again)"),
        "{err}"
    );
    assert!(ids(&info(&setup)).is_empty(), "a failed backup is listed");
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=256M"])
        .arg(&repo)
        .status()
        .expect("remount");
    assert!(status.success());
    backup(&setup, &cluster, &[]);
    let (ok, report) = verify_json(&setup, &["--full"]);
    assert!(ok, "{report}");
}

/// `--pgdata` naming another cluster's data directory, or a copy of the server's own, is
/// refused: a backup of it would be listed and fail only when restored.
#[test]
fn a_backup_of_another_data_directory_is_refused() {
    let setup = Setup::local();
    let (Some(cluster), Some(other)) = (archiving_cluster(), archiving_cluster()) else {
        return;
    };
    setup.setup_cluster(&cluster);
    let conn = cluster.conninfo();
    let attempt = |pgdata: &Path| {
        let pgdata = pgdata.display().to_string();
        setup.fails(&["backup", "--fast", "--pg-conn", &conn, "--pgdata", &pgdata])
    };
    let err = attempt(&other.pgdata());
    let system_identifier = cluster.psql("SELECT system_identifier FROM pg_control_system()");
    assert!(
        err.contains("is another cluster's (system identifier")
            && err.contains(&format!(
                "not that of the server at --pg-conn ({system_identifier})"
            )),
        "{err}"
    );
    let other_pgdata = other.pgdata().display().to_string();
    let err = setup.fails(&["check", "--pg-conn", &conn, "--pgdata", &other_pgdata]);
    assert!(
        err.contains("backups read the data directory given by --pgdata")
            && err.contains("is another cluster's (system identifier"),
        "{err}"
    );
    let copy = setup.path("copy");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(cluster.pgdata())
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success());
    let err = attempt(&copy);
    assert!(
        err.contains(
            "is not the one the server at --pg-conn runs on: its last checkpoint starts at"
        ),
        "{err}"
    );
    // A control file whose checksum is wrong on disk (the server would not start on
    // it) is refused until the server rewrites it from memory. The server's own
    // pg_control_*() functions find it first.
    let control = cluster.pgdata().join("global/pg_control");
    let mut torn = fs::read(&control).expect("read pg_control");
    torn[260] ^= 0xff; // in the mock authentication nonce, which the checksum covers
    fs::write(&control, &torn).expect("write pg_control");
    let err = attempt(&cluster.pgdata());
    assert!(
        err.contains("cannot read its own control file in 10 tries")
            && err.contains("global/pg_control is corrupt on disk")
            && err.contains("run CHECKPOINT, which rewrites it from memory"),
        "{err}"
    );
    cluster.psql("CHECKPOINT");
    assert!(ids(&info(&setup)).is_empty(), "a refused backup is listed");
    // The backup ended on the server: the next one starts.
    cluster.psql("CREATE TABLE marks AS SELECT 'before the standby' AS mark");
    backup(&setup, &cluster, &[]);
    assert_eq!(ids(&info(&setup)).len(), 1);

    // A standby's backup API with its primary's files.
    let standby = streaming_standby(&setup, &cluster, &[]);
    let pgdata = cluster.pgdata().display().to_string();
    let err = setup.fails(&[
        "backup",
        "--fast",
        "--pg-conn",
        &standby.conninfo(),
        "--pgdata",
        &pgdata,
        "--primary-conn",
        &primary_conn(&cluster),
    ]);
    assert!(
        err.contains(
            "that server is a standby, but the directory's control file says \"in production\""
        ),
        "{err}"
    );
    assert_eq!(ids(&info(&setup)).len(), 1);
}
