//! The TOML configuration file (see docs/cli.md). Keys are kebab-case and unknown keys
//! are an error, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Used when neither `--config` nor `PGVAULT_CONFIG` names a file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pgvault/pgvault.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub repo: Option<RepoSection>,
    #[serde(default)]
    pub repos: BTreeMap<String, RepoSection>,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterSection>,
    pub daemon: Option<DaemonSection>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RepoSection {
    pub url: Option<String>,
    pub passphrase_file: Option<PathBuf>,
    pub compression: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_path_style: Option<bool>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key_file: Option<PathBuf>,
    pub sftp_key: Option<PathBuf>,
    pub sftp_known_hosts: Option<PathBuf>,
    pub azure_connection_string_file: Option<PathBuf>,
    /// Service-account key of a gcs:// repository (else GOOGLE_APPLICATION_CREDENTIALS).
    pub gcs_credentials_file: Option<PathBuf>,
    /// Another GCS endpoint, e.g. an emulator (else STORAGE_EMULATOR_HOST).
    pub gcs_endpoint: Option<String>,
    /// When this is not the first of several repositories: how long archive-push waits
    /// for it before leaving the file for a later push to copy (default 10s).
    pub push_timeout: Option<String>,
}

/// Accepted now so that one config file serves every pgvault version; the PostgreSQL
/// commands read it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterSection {
    pub pgdata: Option<PathBuf>,
    pub pg_conn: Option<String>,
    pub pg_bin: Option<PathBuf>,
    /// archive-push returns once a background worker made the segment durable; the
    /// worker pushes every `.ready` segment in parallel.
    pub archive_async: Option<bool>,
    /// With async archiving: when more WAL than this waits (e.g. "4GiB") because the
    /// repository is unreachable, drop it with a warning instead of filling pg_wal.
    /// Unset: never drop (PostgreSQL keeps the WAL until it is archived).
    pub archive_push_queue_max: Option<String>,
    /// How long archive-push waits for the async worker, e.g. "60s".
    pub archive_timeout: Option<String>,
    /// Local directory for the async queue and prefetched WAL (default /var/spool/pgvault).
    pub spool_path: Option<PathBuf>,
    /// Segments archive-get fetches ahead during recovery (default 16; 0 disables).
    pub archive_get_prefetch: Option<u32>,
    /// Paths of the data directory every backup leaves out, as `backup --exclude`.
    #[serde(default)]
    pub backup_exclude: Vec<String>,
    /// How fast a backup may read the data directory, as `backup --max-rate`.
    pub backup_max_rate: Option<String>,
    #[serde(default)]
    pub schedule: BTreeMap<String, String>,
    pub retention: Option<RetentionSection>,
    pub dump: Option<DumpSection>,
}

/// pg_dump controls for `pgvault dump`: for every database, plus per database.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DumpSection {
    #[serde(default)]
    pub exclude_table: Vec<String>,
    #[serde(default)]
    pub exclude_schema: Vec<String>,
    /// Extra pg_dump arguments, e.g. ["--no-comments"].
    #[serde(default)]
    pub pg_dump_opt: Vec<String>,
    /// The same three settings for one database, added to the ones above.
    #[serde(default)]
    pub databases: BTreeMap<String, DumpSection>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionSection {
    pub keep_last: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub recovery_window: Option<String>,
    /// Zone of the daily/weekly/monthly buckets, e.g. "Europe/Berlin" (default UTC).
    pub time_zone: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DaemonSection {
    /// Address of /metrics and the dashboard (default 127.0.0.1:9187).
    pub listen: Option<String>,
    /// Bearer token clients must send; required when `listen` is not a loopback address.
    pub token_file: Option<PathBuf>,
    /// Random delay up to this long added to every scheduled run (default 0s).
    pub jitter: Option<String>,
    /// Run a job once at start when its last scheduled run was missed (default true).
    pub run_missed: Option<bool>,
    /// How long a shutdown waits for running jobs before killing them (default 5m).
    pub shutdown_timeout: Option<String>,
    /// How often the repository is read for metrics and the dashboard (default 60s).
    pub refresh_interval: Option<String>,
    /// A cluster is late when a run scheduled this long ago has not succeeded (default 1h).
    pub late_after: Option<String>,
    /// Job records kept per cluster and job kind (default 100).
    pub history_keep: Option<usize>,
}

impl ConfigFile {
    /// Loads `explicit` (which must exist), else the default path if present, else nothing.
    pub fn load(explicit: Option<&Path>) -> Result<ConfigFile> {
        let path = match explicit {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Ok(ConfigFile::default()),
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        ConfigFile::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<ConfigFile> {
        // toml's messages span several lines with a caret diagram; errors here must be one line.
        toml::from_str(text).map_err(|e| {
            let message = e.message().to_string();
            match e.span() {
                Some(span) => {
                    let line = 1 + text[..span.start.min(text.len())].matches('\n').count();
                    anyhow::anyhow!("line {line}: {message}")
                }
                None => anyhow::anyhow!(message),
            }
        })
    }

    /// The repositories, first (the one commands read from and write to first) to last:
    /// `[repo]` alone, or every `[repos.NAME]` in name order (repo1, repo2, …).
    pub fn repo_sections(&self) -> Result<Vec<(String, RepoSection)>> {
        match (&self.repo, self.repos.len()) {
            (Some(repo), 0) => Ok(vec![("repo".to_string(), repo.clone())]),
            (None, 0) => Ok(vec![("repo".to_string(), RepoSection::default())]),
            (None, _) => Ok(self
                .repos
                .iter()
                .map(|(name, section)| (name.clone(), section.clone()))
                .collect()),
            (Some(_), _) => bail!("config has both [repo] and [repos.*]; keep one of them"),
        }
    }
}

/// Reads a secret from a file: the first line, without its line ending.
pub fn read_secret_file(path: &Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} file {}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").to_string();
    if secret.is_empty() {
        bail!(
            "{what} file {} is empty; put the {what} on its first line",
            path.display()
        );
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = r#"
[repo]
url = "s3://backups/pg"
passphrase-file = "/etc/pgvault/passphrase"
compression = "zstd:3"
s3-endpoint = "https://s3.example.net"
s3-region = "eu-central-1"
s3-path-style = true
s3-access-key-id = "AKIA..."
s3-secret-access-key-file = "/etc/pgvault/s3-secret"
sftp-key = "/etc/pgvault/id_ed25519"
sftp-known-hosts = "/etc/pgvault/known_hosts"
azure-connection-string-file = "..."

[clusters.main]
pgdata = "/var/lib/postgresql/17/main"
pg-conn = "host=/var/run/postgresql user=postgres"
pg-bin = "/usr/lib/postgresql/17/bin"

[clusters.main.schedule]
backup = "0 2 * * *"
dump = "@every 1h"

[clusters.main.retention]
keep-last = 7
keep-daily = 14
recovery-window = "14d"

[daemon]
listen = "127.0.0.1:9187"
token-file = "/etc/pgvault/token"
"#;
        let config = ConfigFile::parse(text).expect("parses");
        let repo = config.repo_sections().expect("repos").remove(0).1;
        assert_eq!(repo.url.as_deref(), Some("s3://backups/pg"));
        assert_eq!(repo.s3_path_style, Some(true));
        assert_eq!(
            config.clusters["main"]
                .retention
                .as_ref()
                .and_then(|r| r.keep_last),
            Some(7)
        );
    }

    #[test]
    fn unknown_keys_are_errors_on_one_line() {
        let err = ConfigFile::parse("[repo]\nurl = \"/x\"\ncompresion = \"lz4\"\n")
            .expect_err("typo must fail");
        let message = format!("{err:#}");
        assert!(message.contains("line 3"), "{message}");
        assert!(message.contains("compresion"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }
}
