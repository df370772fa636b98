//! Shared by the end-to-end test binaries: a repository with a config file that
//! PostgreSQL's archiver can use, and archiving PostgreSQL clusters.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::pg::{Cluster, ClusterOptions};

pub const PASSPHRASE: &str = "wal test passphrase";

/// A repository plus a config file with everything PostgreSQL's archiver needs to reach
/// it (the archiver does not see this process's environment).
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub repo_url: String,
    /// Lines of the `[repo]` section that reach the object store, if any.
    pub backend_config: String,
}

impl Drop for Setup {
    /// Ends the pgvault workers that outlive a test (the async push worker pushes what
    /// PostgreSQL left ready, the prefetch worker idles 10 s): writing into the directory
    /// while it was removed, they left it half removed under /tmp after each run.
    fn drop(&mut self) {
        let dir = self.dir.path().display().to_string();
        for (pid, _) in processes_naming(&dir) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        testkit::wait_until(Duration::from_secs(5), || processes_naming(&dir).is_empty());
    }
}

/// The running processes whose command line contains `needle`: pid and command line.
pub fn processes_naming(needle: &str) -> Vec<(u32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .filter(|(_, cmdline)| cmdline.contains(needle))
        .collect()
}

impl Setup {
    pub fn local() -> Setup {
        Setup::local_with(&[])
    }

    /// A local repository made by `init init_args...`.
    pub fn local_with(init_args: &[&str]) -> Setup {
        let dir = shared_tempdir();
        let repo_url = dir.path().join("repo").display().to_string();
        Setup::with_init(dir, repo_url, String::new(), init_args)
    }

    pub fn s3() -> Option<Setup> {
        let moto = testkit::s3::moto()?;
        moto.create_bucket("pgvault-wal").expect("bucket");
        let url = format!("s3://pgvault-wal/{}", testkit::unique("wal"));
        let dir = shared_tempdir();
        let secret = dir.path().join("s3-secret");
        fs::write(&secret, "test\n").expect("write");
        let config = format!(
            "s3-endpoint = \"{}\"\ns3-region = \"us-east-1\"\ns3-access-key-id = \"test\"\ns3-secret-access-key-file = \"{}\"\n",
            moto.endpoint(),
            secret.display()
        );
        Some(Setup::new(dir, url, config))
    }

    /// A repository in an Azurite container, reached with a connection string file.
    pub fn azblob() -> Option<Setup> {
        let azurite = testkit::azurite::azurite()?;
        azurite.create_container("pgvault-wal").expect("container");
        let url = format!("azblob://pgvault-wal/{}", testkit::unique("wal"));
        let dir = shared_tempdir();
        let secret = dir.path().join("azure");
        fs::write(&secret, format!("{}\n", azurite.connection_string())).expect("write");
        let config = format!("azure-connection-string-file = \"{}\"\n", secret.display());
        Some(Setup::new(dir, url, config))
    }

    /// A repository on the test SSH server's chrooted account, key and known_hosts files
    /// named in the config (copies the archiver, running as postgres, can read).
    pub fn sftp() -> Option<Setup> {
        let server = testkit::sftp::sshd()?;
        let dir = shared_tempdir();
        let key = dir.path().join("sftp_key");
        fs::copy(&server.key, &key).expect("copy key");
        let known_hosts = dir.path().join("known_hosts");
        fs::copy(&server.known_hosts, &known_hosts).expect("copy known_hosts");
        let config = format!(
            "sftp-key = \"{}\"\nsftp-known-hosts = \"{}\"\n",
            key.display(),
            known_hosts.display()
        );
        Some(Setup::new(dir, server.url(&testkit::unique("wal")), config))
    }

    pub fn is_local(&self) -> bool {
        self.backend_config.is_empty()
    }

    pub fn new(dir: tempfile::TempDir, repo_url: String, backend_config: String) -> Setup {
        Setup::with_init(dir, repo_url, backend_config, &[])
    }

    fn with_init(
        dir: tempfile::TempDir,
        repo_url: String,
        backend_config: String,
        init_args: &[&str],
    ) -> Setup {
        fs::write(dir.path().join("passphrase"), format!("{PASSPHRASE}\n")).expect("write");
        fs::create_dir_all(dir.path().join("spool")).expect("mkdir");
        let setup = Setup {
            dir,
            repo_url,
            backend_config,
        };
        setup.write_config(false);
        setup.ok(&[&["init"], init_args].concat());
        setup.give_to_postgres();
        setup
    }

    pub fn write_config(&self, asynchronous: bool) {
        self.write_config_with(asynchronous, "");
    }

    /// The config with `extra` lines added to the cluster section.
    pub fn write_config_with(&self, asynchronous: bool, extra: &str) {
        let mut text = format!(
            "[repo]\nurl = \"{}\"\npassphrase-file = \"{}\"\n",
            self.repo_url,
            self.path("passphrase").display()
        );
        text.push_str(&self.backend_config);
        text.push_str(&format!(
            "\n[clusters.main]\nspool-path = \"{}\"\narchive-async = {asynchronous}\narchive-timeout = \"20s\"\n{extra}",
            self.path("spool").display()
        ));
        fs::write(self.path("pgvault.toml"), text).expect("config");
        self.give_to_postgres();
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgvault"));
        for (key, _) in std::env::vars() {
            if key.starts_with("PGVAULT_") || key.starts_with("AWS_") || key.starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        // Local caches live with the test's files, not in the home directory.
        cmd.env("PGVAULT_KEY_CACHE", self.path("key-cache"))
            .env("PGVAULT_OBJECT_CACHE", self.path("object-cache"))
            .arg("--config")
            .arg(self.path("pgvault.toml"))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// pgvault with this setup's config, run as the OS user `postgres` (the tests run as
    /// root); the repository must be theirs ([`Setup::give_to_postgres`]).
    pub fn run_as_postgres(&self, args: &[&str]) -> Output {
        Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                env!("CARGO_BIN_EXE_pgvault"),
                "--config",
            ])
            .arg(self.path("pgvault.toml"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("runuser")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run pgvault")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "pgvault {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What a successful run printed on stderr (its notes and warnings).
    pub fn ok_stderr(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "pgvault {args:?}: {stderr}");
        stderr
    }

    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "pgvault {args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
        errors[0].to_string()
    }

    /// The archiver runs as `postgres`: it must read the passphrase and write the
    /// repository, key cache and spool.
    pub fn give_to_postgres(&self) {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(self.dir.path())
            .status()
            .expect("chown");
        assert!(status.success());
    }

    /// `setup --apply` against `cluster`, then `check`.
    pub fn setup_cluster(&self, cluster: &Cluster) {
        self.ok(&["setup", "--apply", "--pg-conn", &cluster.conninfo()]);
        self.give_to_postgres();
    }
}

/// A new temporary directory under /tmp, and the path of a data directory to be created
/// in it (a restore's or a standby's).
pub fn new_data_directory(prefix: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("tempdir");
    let pgdata = dir.path().join("data").display().to_string();
    (dir, pgdata)
}

/// A temporary directory the postgres user can traverse.
pub fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pgvault-wal-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

pub fn archiving_cluster() -> Option<Cluster> {
    archiving_cluster_of(15)
}

/// A server of `major` with data checksums, ready for `setup --apply` (archive_mode on,
/// nothing archived yet).
pub fn archiving_cluster_of(major: u32) -> Option<Cluster> {
    archiving_cluster_from(ClusterOptions {
        major,
        ..ClusterOptions::default()
    })
}

/// A server made as `options` say, with archive settings ready for `setup --apply`.
pub fn archiving_cluster_from(mut options: ClusterOptions) -> Option<Cluster> {
    options.settings.extend([
        ("wal_level".into(), "replica".into()),
        ("archive_mode".into(), "on".into()),
        ("archive_command".into(), "".into()),
    ]);
    match Cluster::start(options) {
        Ok(cluster) => Some(cluster),
        Err(reason) => {
            testkit::pg::skip_or_panic(&reason);
            None
        }
    }
}

/// Switches WAL `n` times with some pgbench work in between; returns the last switched file.
pub fn make_wal(cluster: &Cluster, n: usize) -> String {
    let pgbench = cluster.bin().tool("pgbench");
    let port = cluster.port().to_string();
    let out = cluster.run_as_postgres(
        &pgbench,
        &[
            "-q",
            "-i",
            "-s",
            "2",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "postgres",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut last = String::new();
    for _ in 0..n {
        let out = cluster.run_as_postgres(
            &pgbench,
            &[
                "-n",
                "-t",
                "200",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "postgres",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        last = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())");
    }
    last
}

/// Ends the current WAL segment and waits until the archiver has pushed it: everything
/// written so far is in the repository.
pub fn switch_and_wait_archived(cluster: &Cluster) {
    let last = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())");
    wait_archived(cluster, &last);
}

pub fn wait_archived(cluster: &Cluster, segment: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let archived = cluster.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
        if archived.as_str() >= segment {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{segment} not archived; pg_stat_archiver: {}",
            cluster.psql("SELECT * FROM pg_stat_archiver")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
