//! The scheduling daemon against real servers: second-granularity schedules run
//! backups and dumps, a stopped server's job fails and shows as failing (with its error)
//! in /metrics and on the dashboard, rendered by headless Chromium; shutdown releases
//! everything; a missed run runs at start; the bearer token is enforced.
//! And the replication helpers: a standby created from the repository streams from the
//! primary through its slot, and `replication status` reports it and its lag.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::pg::Cluster;

mod common;
use common::*;

/// A password in a conninfo: it must never appear in pages, metrics or logs.
const CONN_SECRET: &str = "pw-never-shown-7731";

fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the daemon");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// The value of the first sample whose line starts with `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_for_metrics(
    port: u16,
    token: Option<&str>,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.flush();
            let (status, body) = http_get(port, "/metrics", token);
            if status == 200 && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; metrics:\n{body}"
            );
        } else {
            assert!(Instant::now() < deadline, "daemon never listened on {port}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn start_daemon(setup: &Setup, log: &Path) -> Child {
    let log_file = fs::File::create(log).expect("log");
    setup
        .cmd(&["daemon"])
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start the daemon")
}

fn stop_daemon(mut daemon: Child, log: &Path) {
    let status = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = daemon.try_wait().expect("wait") {
            let text = fs::read_to_string(log).unwrap_or_default();
            assert!(status.success(), "daemon exit {status}: {text}");
            assert!(text.contains("daemon stopped"), "{text}");
            return;
        }
        assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn base_config(setup: &Setup) -> String {
    format!(
        "[repo]\nurl = \"{}\"\npassphrase-file = \"{}\"\n",
        setup.repo_url,
        setup.path("passphrase").display()
    )
}

fn find_chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Pixels of the PNG within a small distance of `rgb`.
fn count_pixels(png_path: &Path, rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        fs::File::open(png_path).expect("screenshot"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buffer = vec![0; reader.output_buffer_size().expect("png size")];
    let frame = reader.next_frame(&mut buffer).expect("png frame");
    let channels = frame.color_type.samples();
    buffer[..frame.buffer_size()]
        .chunks(channels)
        .filter(|p| {
            p.len() >= 3 && (0..3).all(|i| (i32::from(p[i]) - i32::from(rgb[i])).abs() <= 12)
        })
        .count()
}

/// Renders the dashboard in headless Chromium: the DOM after rendering, and a screenshot.
fn chromium_render(browser: &str, url: &str, dir: &Path) -> (String, std::path::PathBuf) {
    let screenshot = dir.join("dashboard.png");
    let profile = dir.join("chromium-profile");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,2400",
    ];
    let out = Command::new(browser)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        screenshot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = Command::new(browser)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("run chromium");
    (
        String::from_utf8_lossy(&dom.stdout).into_owned(),
        screenshot,
    )
}

#[test]
fn daemon_runs_schedules_and_reports_them() {
    let setup = Setup::local();
    let Some(alpha) = archiving_cluster() else {
        return;
    };
    let Some(mut beta) = archiving_cluster() else {
        return;
    };
    let browser = find_chromium();
    if browser.is_none() {
        testkit::pg::skip_or_panic("chromium is not installed (apt-get install chromium)");
    }
    let port = testkit::free_port();
    let spool = setup.path("spool").display().to_string();
    let beta_conn = format!("{} password={CONN_SECRET}", beta.conninfo());
    let config = format!(
        "{base}
[clusters.alpha]
pg-conn = \"{alpha_conn}\"
spool-path = \"{spool}\"
[clusters.alpha.schedule]
backup = \"*/4 * * * * *\"
dump = \"@every 3s\"
verify = \"@every 5s\"
expire = \"@every 7s\"
[clusters.alpha.retention]
keep-last = 2
[clusters.beta]
pg-conn = \"{beta_conn}\"
spool-path = \"{spool}\"
[clusters.beta.schedule]
backup = \"@every 2s\"
[daemon]
listen = \"127.0.0.1:{port}\"
refresh-interval = \"1s\"
",
        base = base_config(&setup),
        alpha_conn = alpha.conninfo(),
    );
    fs::write(setup.path("pgvault.toml"), &config).expect("config");
    setup.give_to_postgres();
    for (name, cluster) in [("alpha", &alpha), ("beta", &beta)] {
        setup.ok(&[
            "--cluster",
            name,
            "setup",
            "--apply",
            "--pg-conn",
            &cluster.conninfo(),
        ]);
    }
    setup.give_to_postgres();
    alpha.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    // beta's server goes away: its scheduled backups must fail, visibly.
    beta.stop();

    let log = setup.path("daemon.log");
    let daemon = start_daemon(&setup, &log);
    let metrics = wait_for_metrics(port, None, "alpha's backup and dump, beta failing", |m| {
        sample(m, "pgvault_job_last_ok{cluster=\"alpha\",job=\"backup\"}") == Some(1.0)
            && sample(m, "pgvault_job_last_ok{cluster=\"alpha\",job=\"dump\"}") == Some(1.0)
            && sample(m, "pgvault_job_last_ok{cluster=\"alpha\",job=\"verify\"}") == Some(1.0)
            && sample(m, "pgvault_job_last_ok{cluster=\"alpha\",job=\"expire\"}") == Some(1.0)
            && sample(m, "pgvault_job_last_ok{cluster=\"beta\",job=\"backup\"}") == Some(0.0)
            && sample(m, "pgvault_backups{cluster=\"alpha\"}").is_some_and(|n| n >= 1.0)
            && sample(m, "pgvault_dumps{cluster=\"alpha\"}").is_some_and(|n| n >= 1.0)
    });
    assert_eq!(
        sample(
            &metrics,
            "pgvault_cluster_status{cluster=\"beta\",status=\"failing\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "pgvault_cluster_status{cluster=\"alpha\",status=\"healthy\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let error_line = metrics
        .lines()
        .find(|l| l.starts_with("pgvault_job_last_error_info{cluster=\"beta\""))
        .unwrap_or_else(|| panic!("no error for beta: {metrics}"));
    assert!(
        error_line.contains(&beta.port().to_string()) || error_line.contains("connect"),
        "{error_line}"
    );
    for series in [
        "pgvault_recoverable_end_time_seconds{cluster=\"alpha\"}",
        "pgvault_wal_last_push_time_seconds{cluster=\"alpha\"}",
        "pgvault_wal_lag_bytes{cluster=\"alpha\"}",
        "pgvault_backup_last_age_seconds{cluster=\"alpha\"}",
        "pgvault_dump_last_age_seconds{cluster=\"alpha\"}",
        "pgvault_job_last_duration_seconds{cluster=\"alpha\",job=\"backup\"}",
        "pgvault_repository_dedup_ratio",
        "pgvault_corrupted_pages{cluster=\"alpha\"}",
    ] {
        assert!(
            sample(&metrics, series).is_some(),
            "{series} missing:\n{metrics}"
        );
    }
    let ratio = sample(&metrics, "pgvault_repository_dedup_ratio").unwrap_or(0.0);
    assert!(
        ratio > 1.0,
        "several backups of one cluster must deduplicate: {ratio}"
    );

    let (status, page) = http_get(port, "/", None);
    assert_eq!(status, 200);
    for needle in [
        "card-alpha",
        "card-beta",
        "status-failing",
        "status-healthy",
        "class=\"backup\"",
        "class=\"window\"",
    ] {
        assert!(page.contains(needle), "dashboard lacks {needle}");
    }
    for secret in [CONN_SECRET, PASSPHRASE] {
        assert!(
            !page.contains(secret) && !metrics.contains(secret),
            "secret leaked"
        );
    }
    if let Some(browser) = browser {
        let (dom, screenshot) = chromium_render(
            browser,
            &format!("http://127.0.0.1:{port}/"),
            setup.dir.path(),
        );
        assert!(
            dom.contains("id=\"card-alpha\"") && dom.contains("id=\"card-beta\""),
            "{dom}"
        );
        assert!(
            dom.contains("Job history") && dom.contains("WAL continuity"),
            "{dom}"
        );
        // The rendered page shows beta's red badge and alpha's green one.
        let red = count_pixels(&screenshot, [0xc6, 0x28, 0x28]);
        let green = count_pixels(&screenshot, [0x1b, 0x87, 0x3f]);
        assert!(
            red > 300,
            "failing badge not on the screenshot ({red} red pixels)"
        );
        assert!(
            green > 300,
            "healthy badge not on the screenshot ({green} green pixels)"
        );
    }

    stop_daemon(daemon, &log);
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains(CONN_SECRET),
        "secret in the log: {log_text}"
    );
    let locks = fs::read_dir(Path::new(&setup.repo_url).join("locks"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(locks, 0, "locks left behind after shutdown");

    // The history is in the repository: `info` shows it.
    let info: Value =
        serde_json::from_str(&setup.ok(&["--cluster", "alpha", "info", "--output", "json"]))
            .expect("info JSON");
    let cluster = |name: &str| {
        info["clusters"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in info: {info}"))
    };
    let alpha_jobs = cluster("alpha")["jobs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        alpha_jobs.iter().any(|j| j["kind"] == "backup"
            && j["outcome"] == "ok"
            && j["stored_bytes"].as_u64().is_some()),
        "{alpha_jobs:?}"
    );
    let beta_jobs = cluster("beta")["jobs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        beta_jobs.iter().all(|j| j["outcome"] == "failed" && j["error"].as_str().is_some_and(|e| !e.is_empty())),
        "{beta_jobs:?}"
    );
    assert!(!beta_jobs.is_empty());

    // Restarted after a scheduled run was missed, with a token: the run happens at
    // start, and only token holders see anything.
    let last_alpha_backup = alpha_jobs
        .iter()
        .filter(|j| j["kind"] == "backup")
        .filter_map(|j| j["started"].as_str())
        .max()
        .map(str::to_string)
        .expect("an alpha backup");
    fs::write(setup.path("token"), "daemon-token-1\n").expect("token");
    let config = format!(
        "{base}
[clusters.alpha]
pg-conn = \"{alpha_conn}\"
spool-path = \"{spool}\"
[clusters.alpha.schedule]
backup = \"@every 10s\"
[daemon]
listen = \"127.0.0.1:{port}\"
token-file = \"{token}\"
refresh-interval = \"1s\"
",
        base = base_config(&setup),
        alpha_conn = alpha.conninfo(),
        token = setup.path("token").display()
    );
    fs::write(setup.path("pgvault.toml"), &config).expect("config");
    setup.give_to_postgres();
    // Let one 10-second occurrence pass while no daemon runs.
    std::thread::sleep(Duration::from_secs(11));
    let daemon = start_daemon(&setup, &log);
    wait_for_metrics(port, Some("daemon-token-1"), "the missed backup", |m| {
        sample(
            m,
            "pgvault_job_runs_total{cluster=\"alpha\",job=\"backup\",outcome=\"ok\"}",
        )
        .is_some_and(|n| n >= 1.0)
    });
    assert_eq!(http_get(port, "/metrics", None).0, 401);
    assert_eq!(http_get(port, "/", Some("wrong")).0, 401);
    assert_eq!(http_get(port, "/", Some("daemon-token-1")).0, 200);
    stop_daemon(daemon, &log);
    let info: Value =
        serde_json::from_str(&setup.ok(&["--cluster", "alpha", "info", "--output", "json"]))
            .expect("info JSON");
    // The first backup after the restart is the catch-up run (a scheduled one may
    // follow it before the daemon stops).
    let first_after_restart = info["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "alpha"))
        .and_then(|c| {
            c["jobs"]
                .as_array()?
                .iter()
                .filter(|j| j["kind"] == "backup")
                .filter(|j| j["started"].as_str().unwrap_or("") > last_alpha_backup.as_str())
                .min_by_key(|j| j["started"].as_str().unwrap_or("").to_string())
                .cloned()
        })
        .expect("a backup after the restart");
    assert_eq!(
        first_after_restart["trigger"], "missed",
        "{first_after_restart}"
    );
}

#[test]
fn daemon_refuses_bad_configs() {
    let setup = Setup::local();
    let base = base_config(&setup);
    let cases = [
        (
            format!("{base}[clusters.main.schedule]\nbackup = \"@every 1h\"\n[daemon]\nlisten = \"0.0.0.0:9187\"\n"),
            "token-file",
        ),
        (
            format!("{base}[clusters.main.schedule]\nbackup = \"0 2 * *\"\n"),
            "[clusters.main.schedule] backup",
        ),
        (
            format!("{base}[clusters.main.schedule]\nreindex = \"@every 1h\"\n"),
            "unknown job",
        ),
        (format!("{base}[clusters.main]\n"), "schedules no jobs"),
    ];
    for (config, expected) in cases {
        fs::write(setup.path("pgvault.toml"), &config).expect("config");
        let error = setup.fails(&["daemon"]);
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

#[test]
fn standby_created_from_the_repository_streams_and_is_reported() {
    let setup = Setup::local();
    let Some(primary) = archiving_cluster_of(16) else {
        return;
    };
    setup.setup_cluster(&primary);
    primary.psql("CREATE TABLE marks (name text)");
    setup.ok(&["backup", "--fast", "--pg-conn", &primary.conninfo()]);
    let primary_conn = format!("host=127.0.0.1 port={} user=postgres", primary.port());

    let (dir, pgdata) = new_data_directory("pgvault-standby-");
    // Bad input first: nothing may be created.
    let error = setup.fails(&[
        "standby",
        "create",
        "--pgdata",
        &pgdata,
        "--primary-conn",
        &primary_conn,
        "--slot",
        "Bad-Name",
    ]);
    assert!(error.contains("slot name"), "{error}");
    let error = setup.fails(&[
        "--cluster",
        "other",
        "standby",
        "create",
        "--pgdata",
        &pgdata,
        "--primary-conn",
        &primary_conn,
    ]);
    assert!(error.contains("other"), "{error}");
    assert!(!Path::new(&pgdata).join("PG_VERSION").exists());

    setup.ok(&[
        "standby",
        "create",
        "--pgdata",
        &pgdata,
        "--primary-conn",
        &primary_conn,
        "--slot",
        "standby_one",
    ]);
    assert_eq!(
        primary.psql("SELECT slot_type FROM pg_replication_slots WHERE slot_name = 'standby_one'"),
        "physical"
    );
    let mut standby = Cluster::adopt(primary.bin().clone(), dir).expect("start the standby");
    primary.psql("INSERT INTO marks VALUES ('after the backup')");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = standby.psql("SELECT count(*) FROM marks");
        let status =
            standby.psql("SELECT coalesce((SELECT status FROM pg_stat_wal_receiver), 'none')");
        if seen == "1" && status == "streaming" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "standby not streaming ({status}, {seen}):\n{}",
            standby.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let report: Value = serde_json::from_str(&setup.ok(&[
        "replication",
        "status",
        "--pg-conn",
        &primary.conninfo(),
        "--output",
        "json",
        "--max-lag",
        "1GiB",
    ]))
    .expect("status JSON");
    assert_eq!(report["role"], "primary", "{report}");
    let standbys = report["standbys"].as_array().cloned().unwrap_or_default();
    assert!(
        standbys
            .iter()
            .any(|s| s["name"] == "standby_one" && s["state"] == "streaming"),
        "{report}"
    );
    let slots = report["slots"].as_array().cloned().unwrap_or_default();
    assert!(
        slots
            .iter()
            .any(|s| s["name"] == "standby_one" && s["active"] == true),
        "{report}"
    );
    let text = setup.ok(&["replication", "status", "--pg-conn", &standby.conninfo()]);
    assert!(text.contains("streaming"), "{text}");

    // The standby goes away; its slot holds WAL on the primary: past --max-lag.
    standby.stop();
    for _ in 0..3 {
        primary.psql("INSERT INTO marks SELECT 'wal ' || g FROM generate_series(1, 1000) g");
        primary.psql("SELECT pg_switch_wal()");
    }
    let error = setup.fails(&[
        "replication",
        "status",
        "--pg-conn",
        &primary.conninfo(),
        "--max-lag",
        "1MiB",
    ]);
    assert!(
        error.contains("slot standby_one") && error.contains("max-lag"),
        "{error}"
    );
}

/// A job that cannot finish (its WAL never reaches the repository) is killed once
/// `shutdown-timeout` passes, recorded as aborted, and leaves no repository lock.
#[test]
fn shutdown_aborts_a_stuck_job_cleanly() {
    let setup = Setup::local();
    let Some(cluster) = archiving_cluster() else {
        return;
    };
    setup.setup_cluster(&cluster);
    // Archiving breaks: a backup now waits for its last segment (wal-timeout 5m).
    cluster.psql("ALTER SYSTEM SET archive_command = 'false archive-push %p'");
    cluster.psql("SELECT pg_reload_conf()");
    let port = testkit::free_port();
    let config = format!(
        "{base}
[clusters.main]
pg-conn = \"{conn}\"
spool-path = \"{spool}\"
[clusters.main.schedule]
backup = \"@every 1s\"
[daemon]
listen = \"127.0.0.1:{port}\"
refresh-interval = \"1s\"
shutdown-timeout = \"2s\"
",
        base = base_config(&setup),
        conn = cluster.conninfo(),
        spool = setup.path("spool").display()
    );
    fs::write(setup.path("pgvault.toml"), &config).expect("config");
    setup.give_to_postgres();
    let log = setup.path("daemon.log");
    let daemon = start_daemon(&setup, &log);
    wait_for_metrics(port, None, "a running backup", |m| {
        sample(m, "pgvault_job_running{cluster=\"main\",job=\"backup\"}") == Some(1.0)
    });
    // The backup holds its repository lock while it waits for WAL.
    let locks_dir = Path::new(&setup.repo_url).join("locks");
    let lock_count = || testkit::published_objects(&locks_dir);
    let deadline = Instant::now() + Duration::from_secs(60);
    while lock_count() == 0 {
        assert!(Instant::now() < deadline, "the backup never took its lock");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let stopping = Instant::now();
    stop_daemon(daemon, &log);
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(lock_count(), 0, "the killed job's lock is still there");
    let info: Value = serde_json::from_str(&setup.ok(&["info", "--output", "json"])).expect("info");
    let jobs = info["clusters"][0]["jobs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        jobs.first().map(|j| j["outcome"].clone()),
        Some(Value::from("aborted")),
        "{jobs:?}"
    );
    assert_eq!(
        info["clusters"][0]["backups"].as_array().map(Vec::len),
        Some(0)
    );
}
