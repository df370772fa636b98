//! Two repositories at once: a local one and a far one on the loopback S3 server, with
//! its own passphrase. archive-push and backup write both; a far repository that is
//! down delays archiving by at most its push-timeout and catches up on a later push;
//! with the near one lost, restore and archive-get read from the far one; `repo copy`
//! seeds a third repository and is idempotent.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::pg::Cluster;

mod common;
use common::*;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn wal_files(setup: &Setup, repo: &str) -> u64 {
    let info = json(&setup.ok(&["--repo", repo, "info", "--output", "json"]));
    info["clusters"][0]["wal"]["files"].as_u64().unwrap_or(0)
}

fn backups(setup: &Setup, repo: &str) -> usize {
    let info = json(&setup.ok(&["--repo", repo, "info", "--output", "json"]));
    info["clusters"][0]["backups"]
        .as_array()
        .map_or(0, Vec::len)
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_repositories_near_and_far() {
    let setup = Setup::local();
    let Some(moto) = testkit::s3::moto() else {
        return;
    };
    moto.create_bucket("pgvault-far").expect("bucket");
    let far_url = format!("s3://pgvault-far/{}", testkit::unique("far"));
    fs::write(setup.path("s3-secret"), "test\n").expect("secret");
    fs::write(setup.path("far-passphrase"), "a different passphrase\n").expect("passphrase");
    let config = |endpoint: &str| {
        format!(
            "[repos.repo1]
url = \"{near}\"
passphrase-file = \"{pass}\"
[repos.repo2]
url = \"{far_url}\"
passphrase-file = \"{far_pass}\"
s3-endpoint = \"{endpoint}\"
s3-region = \"us-east-1\"
s3-access-key-id = \"test\"
s3-secret-access-key-file = \"{secret}\"
push-timeout = \"3s\"
[clusters.main]
spool-path = \"{spool}\"
archive-timeout = \"20s\"
",
            near = setup.repo_url,
            pass = setup.path("passphrase").display(),
            far_pass = setup.path("far-passphrase").display(),
            secret = setup.path("s3-secret").display(),
            spool = setup.path("spool").display(),
        )
    };
    fs::write(setup.path("pgvault.toml"), config(&moto.endpoint())).expect("config");
    setup.give_to_postgres();
    setup.ok(&["--repo", "repo2", "init"]);
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.ok(&["setup", "--apply", "--pg-conn", &cluster.conninfo()]);
    setup.give_to_postgres();
    // `setup` registered the cluster in the first repository; the far one gets it with
    // the first copy.
    let last = make_wal(&cluster, 2);
    wait_archived(&cluster, &last);
    let report = json(&setup.ok(&[
        "backup",
        "--fast",
        "--pg-conn",
        &cluster.conninfo(),
        "--output",
        "json",
    ]));
    let copies = report["copies"].as_array().cloned().unwrap_or_default();
    assert_eq!(copies.len(), 1, "{report}");
    assert_eq!(copies[0]["repo"], "repo2");
    assert_eq!(
        copies[0]["snapshots"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(backups(&setup, "repo2"), 1);
    switch_and_wait_archived(&cluster);
    let far_before = wal_files(&setup, "repo2");
    assert_eq!(wal_files(&setup, "repo1"), far_before);

    // The far repository goes away: archiving goes on, bounded by push-timeout.
    let dead = format!("http://127.0.0.1:{}", testkit::free_port());
    fs::write(setup.path("pgvault.toml"), config(&dead)).expect("config");
    setup.give_to_postgres();
    cluster.psql("CREATE TABLE marks AS SELECT 'while the far one was down' AS note");
    let started = Instant::now();
    let last = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())");
    wait_archived(&cluster, &last);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let markers = setup
        .path("spool")
        .join("main")
        .join("secondary")
        .join("repo2");
    let tagged: Vec<_> = fs::read_dir(&markers)
        .expect("markers of repo2")
        .filter_map(|e| Some(e.ok()?.path()))
        .collect();
    assert_eq!(
        tagged.len(),
        1,
        "one directory per source and secondary: {tagged:?}"
    );
    let pending = tagged[0].clone();
    let waiting = names_in(&pending);
    assert!(waiting.contains(&last), "{waiting:?}");
    assert!(wal_files(&setup, "repo1") > far_before);
    // A marker left where earlier versions kept them is taken over; one of another
    // server's secondary of the same name (another directory) is not touched.
    fs::rename(pending.join(&last), markers.join(&last)).expect("legacy marker");
    let foreign = markers.join("0123456789abcdef");
    fs::create_dir(&foreign).expect("foreign markers");
    fs::write(foreign.join(&last), b"").expect("foreign marker");

    // Back again: the next push brings the far one up to date.
    fs::write(setup.path("pgvault.toml"), config(&moto.endpoint())).expect("config");
    setup.give_to_postgres();
    cluster.psql("INSERT INTO marks VALUES ('after')");
    switch_and_wait_archived(&cluster);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !names_in(&pending).is_empty() || markers.join(&last).exists() {
        assert!(
            Instant::now() < deadline,
            "markers stay: far repository not caught up; server log:\n{}",
            cluster.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(wal_files(&setup, "repo1"), wal_files(&setup, "repo2"));
    assert_eq!(names_in(&foreign), vec![last.clone()]);
    let expected = cluster.psql("SELECT string_agg(note, ',' ORDER BY note) FROM marks");

    // A third repository seeded by `repo copy`, twice: the second copies nothing.
    let third = setup.path("third").display().to_string();
    setup.ok(&["--repo", &third, "init"]);
    let first = json(&setup.ok(&[
        "repo", "copy", "--from", "repo2", "--to", &third, "--output", "json",
    ]));
    assert_eq!(
        first["clusters"][0]["snapshots"].as_array().map(Vec::len),
        Some(1),
        "{first}"
    );
    assert!(
        first["clusters"][0]["wal_files"].as_u64().unwrap_or(0) > 3,
        "{first}"
    );
    let again = json(&setup.ok(&[
        "repo", "copy", "--from", "repo2", "--to", &third, "--output", "json",
    ]));
    assert_eq!(again["clusters"][0]["wal_files"], 0, "{again}");
    assert_eq!(
        again["clusters"][0]["snapshots"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );
    let error = setup.fails(&["repo", "copy", "--from", "repo2", "--to", "repo9"]);
    assert!(
        error.contains("repo9") && error.contains("repo1, repo2"),
        "{error}"
    );

    // The near repository is lost: restore and archive-get use the far one.
    fs::rename(&setup.repo_url, setup.path("lost")).expect("lose repo1");
    let (dir, pgdata) = new_data_directory("pgvault-far-restore-");
    setup.ok(&[
        "restore",
        "--pgdata",
        &pgdata,
        "--target-action",
        "promote",
        "--archive-mode",
        "off",
    ]);
    setup.give_to_postgres();
    let restored = Cluster::adopt(cluster.bin().clone(), dir).expect("start the restored server");
    restored.wait_promoted(Duration::from_secs(120));
    assert_eq!(
        restored.psql("SELECT string_agg(note, ',' ORDER BY note) FROM marks"),
        expected
    );

    // `--repo NAME` reaches the restored server's restore_command as that name, which
    // the config resolves (taken for a path, it would name a directory under PGDATA).
    let (_named_dir, named) = new_data_directory("pgvault-named-restore-");
    let warnings = setup.ok_stderr(&[
        "--repo",
        "repo2",
        "restore",
        "--pgdata",
        &named,
        "--archive-mode",
        "off",
        "--hold",
        "0",
    ]);
    let auto = fs::read_to_string(std::path::Path::new(&named).join("postgresql.auto.conf"))
        .expect("postgresql.auto.conf");
    let restore_command = (auto.lines())
        .find(|l| l.starts_with("restore_command"))
        .unwrap_or_default();
    assert!(
        restore_command.contains("--repo repo2 "),
        "{restore_command}"
    );
    assert!(!warnings.contains("restore_command fails"), "{warnings}");
}
