//! Resolved settings (flag > environment > config file > default) and the
//! repository-opening steps every command shares.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use repo::compression::Compression;
use repo::lock::{LockKind, RepoLock};
use repo::storage::{DynStorage, Location, S3Config, StorageError};
use repo::{RepoError, Repository};

use crate::cli::{GlobalArgs, OutputFormat};
use crate::config::{read_secret_file, ClusterSection, ConfigFile, RepoSection};

/// Where the repository passphrase comes from, in precedence order.
#[derive(Debug, Clone)]
enum PassphraseSource {
    File(PathBuf),
    Env(String),
    None,
}

#[derive(Debug, Clone)]
pub struct Context {
    /// `--repo` as given (flag or `PGVAULT_REPO`), passed on to child processes.
    repo_flag: Option<String>,
    /// `--repo` names a `[repos.NAME]` table (passed on as it is), not a URL or path.
    repo_flag_is_name: bool,
    pub jobs: usize,
    pub output: OutputFormat,
    /// `--quiet`: errors only, no progress bars.
    pub quiet: bool,
    /// Compression for new data when the config overrides the repository default.
    pub compression: Option<Compression>,
    repo_section: RepoSection,
    /// Name of the first repository (`repo` for a `[repo]` table).
    pub repo_name: String,
    /// The other `[repos.NAME]` repositories, in order: written after the first one,
    /// read when the first one lacks the data.
    pub secondaries: Vec<(String, RepoSection)>,
    passphrase: PassphraseSource,
    /// The command line, recorded in lock objects so a blocked operator sees who holds it.
    pub command_line: String,
    /// The PostgreSQL cluster this run is about (`--cluster`, default `main`).
    pub cluster: String,
    pub cluster_section: ClusterSection,
    /// Every `[clusters.NAME]` of the config file, for commands about several clusters.
    pub clusters: std::collections::BTreeMap<String, ClusterSection>,
    /// How this process was configured, to start background workers the same way.
    pub config_path: Option<PathBuf>,
    pub passphrase_file: Option<PathBuf>,
    /// `--pg-conn` / config `pg-conn`; `None` leaves everything to the PG* variables.
    pub pg_conn: Option<String>,
    pub pgdata: Option<PathBuf>,
    /// Where PostgreSQL's client tools are (`--pg-bin`, `PGVAULT_PG_BIN`, config `pg-bin`).
    pub pg_bin: Option<PathBuf>,
}

impl Context {
    pub fn new(global: &GlobalArgs) -> Result<Context> {
        let config = ConfigFile::load(global.config.as_deref())?;
        let mut sections = config.repo_sections()?;
        // `--repo NAME` picks one `[repos.NAME]` repository; `--repo URL` (or a path,
        // relative ones included, whatever their name) replaces the first one's URL.
        // Either way the command works with that one repository alone.
        let chosen = (global.repo.as_ref())
            .filter(|_| !config.repos.is_empty())
            .and_then(|r| sections.iter().position(|(name, _)| name == r));
        let (repo_name, mut section) = sections.remove(chosen.unwrap_or(0));
        if global.repo.is_some() {
            sections.clear();
        }
        if chosen.is_none() {
            if let Some(url) = &global.repo {
                section.url = Some(url.clone());
            }
        }
        let passphrase = if let Some(path) = &global.passphrase_file {
            PassphraseSource::File(path.clone())
        } else if let Some(value) = std::env::var("PGVAULT_PASSPHRASE")
            .ok()
            .filter(|v| !v.is_empty())
        {
            PassphraseSource::Env(value)
        } else if let Some(path) = &section.passphrase_file {
            PassphraseSource::File(path.clone())
        } else {
            PassphraseSource::None
        };
        let compression = match std::env::var("PGVAULT_COMPRESSION")
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| section.compression.clone())
        {
            Some(text) => Some(
                text.parse::<Compression>()
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            None => None,
        };
        let cluster = global.cluster.clone().unwrap_or_else(|| "main".to_string());
        if cluster.is_empty()
            || !cluster
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("cluster name {cluster:?}: use letters, digits, '-' and '_'");
        }
        let cluster_section = config.clusters.get(&cluster).cloned().unwrap_or_default();
        let jobs = match global.jobs {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };
        Ok(Context {
            repo_flag: global.repo.clone(),
            repo_flag_is_name: chosen.is_some(),
            jobs,
            output: global.output,
            quiet: global.quiet,
            compression,
            repo_section: section,
            repo_name,
            secondaries: sections,
            passphrase_file: match &passphrase {
                PassphraseSource::File(path) => Some(path.clone()),
                _ => None,
            },
            passphrase,
            command_line: std::env::args().collect::<Vec<_>>().join(" "),
            pgdata: global
                .pgdata
                .clone()
                .or_else(|| cluster_section.pgdata.clone()),
            pg_conn: global
                .pg_conn
                .clone()
                .or_else(|| cluster_section.pg_conn.clone()),
            pg_bin: global
                .pg_bin
                .clone()
                .or_else(|| cluster_section.pg_bin.clone()),
            cluster,
            cluster_section,
            clusters: config.clusters.clone(),
            config_path: global.config.clone().or_else(|| {
                std::path::Path::new(crate::config::DEFAULT_CONFIG_PATH)
                    .exists()
                    .then(|| PathBuf::from(crate::config::DEFAULT_CONFIG_PATH))
            }),
        })
    }

    /// The conninfo of `cluster`: this run's for its own cluster, else the config's.
    pub fn pg_conn_of(&self, cluster: &str) -> Option<String> {
        if cluster == self.cluster {
            return self.pg_conn.clone();
        }
        self.clusters.get(cluster)?.pg_conn.clone()
    }

    /// The tags that file a snapshot under this context's cluster.
    pub fn cluster_tags(&self) -> std::collections::BTreeMap<String, String> {
        [("cluster".to_string(), self.cluster.clone())].into()
    }

    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }

    pub fn location(&self) -> Result<Location> {
        let url = self.repo_section.url.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "no repository given: pass --repo URL, set PGVAULT_REPO, or set url in the [repo] section of the config file"
            )
        })?;
        Location::parse(url).map_err(|e| anyhow::anyhow!(e))
    }

    fn s3_config(s: &RepoSection) -> Result<S3Config> {
        let secret = match &s.s3_secret_access_key_file {
            Some(path) => Some(read_secret_file(path, "S3 secret access key")?),
            None => None,
        };
        if s.s3_access_key_id.is_some() != secret.is_some() {
            bail!("config sets only one of s3-access-key-id and s3-secret-access-key-file; set both, or neither to use AWS_* variables");
        }
        Ok(S3Config {
            endpoint: s.s3_endpoint.clone(),
            region: s.s3_region.clone(),
            path_style: s.s3_path_style.unwrap_or(true),
            access_key_id: s.s3_access_key_id.clone(),
            secret_access_key: secret,
            ..S3Config::default()
        })
    }

    pub fn storage(&self) -> Result<DynStorage> {
        Context::storage_of(self.location()?, &self.repo_section)
    }

    fn storage_of(location: Location, section: &RepoSection) -> Result<DynStorage> {
        let mut options = repo::BackendOptions::default();
        match location {
            Location::S3 { .. } => options.s3 = Context::s3_config(section)?,
            Location::Gcs { .. } => {
                options.gcs.credentials_file = section.gcs_credentials_file.clone();
                options.gcs.endpoint = section.gcs_endpoint.clone();
            }
            Location::Azblob { .. } => {
                if let Some(path) = &section.azure_connection_string_file {
                    options.azblob.connection_string =
                        Some(read_secret_file(path, "Azure connection string")?);
                }
            }
            Location::Sftp(_) => {
                let file = |configured: &Option<PathBuf>, variable: &str| {
                    configured
                        .clone()
                        .or_else(|| std::env::var_os(variable).map(PathBuf::from))
                };
                options.sftp.key_file = file(&section.sftp_key, "PGVAULT_SFTP_KEY");
                options.sftp.known_hosts =
                    file(&section.sftp_known_hosts, "PGVAULT_SFTP_KNOWN_HOSTS");
            }
            Location::Local(_) => {}
        }
        Ok(repo::open_storage(&location, &options)?)
    }

    /// The passphrase from file or environment, if one was configured.
    pub fn configured_passphrase(&self) -> Result<Option<String>> {
        match &self.passphrase {
            PassphraseSource::File(path) => read_secret_file(path, "passphrase").map(Some),
            PassphraseSource::Env(value) => Ok(Some(value.clone())),
            PassphraseSource::None => Ok(None),
        }
    }

    /// Opens the repository, prompting for the passphrase on a terminal if none is configured.
    pub fn open(&self) -> Result<Repository> {
        self.open_storage(self.storage()?, self.configured_passphrase()?)
    }

    /// The names of every configured repository, first one first.
    pub fn repo_names(&self) -> Vec<String> {
        std::iter::once(self.repo_name.clone())
            .chain(self.secondaries.iter().map(|(name, _)| name.clone()))
            .collect()
    }

    /// Opens a configured repository by name, or a repository URL (reached with the
    /// first repository's settings and passphrase).
    pub fn open_named(&self, name: &str) -> Result<Repository> {
        if name == self.repo_name {
            return self.open();
        }
        if let Some((_, section)) = self.secondaries.iter().find(|(n, _)| n == name) {
            let url = section
                .url
                .as_deref()
                .with_context(|| format!("[repos.{name}] has no url"))?;
            let location = Location::parse(url).map_err(|e| anyhow::anyhow!(e))?;
            let passphrase = match &section.passphrase_file {
                Some(path) => Some(read_secret_file(path, "passphrase")?),
                None => self.configured_passphrase()?,
            };
            return self
                .open_storage(Context::storage_of(location, section)?, passphrase)
                .with_context(|| format!("repository {name} ({url})"));
        }
        if name.contains('/') || name.contains(':') {
            let location = Location::parse(name).map_err(|e| anyhow::anyhow!(e))?;
            return self.open_storage(
                Context::storage_of(location, &self.repo_section)?,
                self.configured_passphrase()?,
            );
        }
        bail!(
            "no repository {name:?}: use one of {} (the [repos.NAME] tables of the config) or a URL",
            self.repo_names().join(", ")
        )
    }

    /// How long the first repository's writers wait for repository `name` (a secondary).
    pub fn push_timeout(&self, name: &str) -> Result<std::time::Duration> {
        let text = self
            .secondaries
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, s)| s.push_timeout.clone())
            .unwrap_or_else(|| "10s".to_string());
        crate::commands::archive::parse_duration(&text, &format!("[repos.{name}] push-timeout"))
    }

    fn open_storage(&self, storage: DynStorage, passphrase: Option<String>) -> Result<Repository> {
        let cache = cache_dir("PGVAULT_KEY_CACHE", "keys");
        let remote = storage.is_remote();
        let opened = Repository::open_with_key_cache(
            storage.clone(),
            passphrase.as_deref(),
            cache.as_deref(),
        );
        let mut repo = match opened {
            Err(RepoError::PassphraseRequired(_))
                if passphrase.is_none() && std::io::stdin().is_terminal() =>
            {
                let typed = rpassword::prompt_password(format!(
                    "passphrase for repository {}: ",
                    storage.location()
                ))
                .context("cannot read the passphrase from the terminal")?;
                Repository::open(storage, Some(&typed))?
            }
            other => other?,
        };
        if let Some(compression) = self.compression {
            repo.set_compression(compression);
        }
        if remote {
            repo.set_object_cache(cache_dir("PGVAULT_OBJECT_CACHE", "objects").as_deref());
        }
        Ok(repo)
    }

    /// Global options that make a child `pgvault` process see the same settings.
    pub fn child_args(&self) -> Vec<std::ffi::OsString> {
        self.child_args_for(&self.cluster)
    }

    /// [`Context::child_args`] for another cluster of the same configuration.
    pub fn child_args_for(&self, cluster: &str) -> Vec<std::ffi::OsString> {
        // Children may run elsewhere (PostgreSQL runs archive and restore commands in
        // its data directory), so the paths they get must not depend on this one's.
        let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.into());
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(config) = &self.config_path {
            args.push("--config".into());
            args.push(absolute(config).into());
        }
        if let Some(repo) = &self.repo_flag {
            args.push("--repo".into());
            args.push(match Location::parse(repo) {
                Ok(Location::Local(path)) if !self.repo_flag_is_name => path.into(),
                _ => repo.into(),
            });
        }
        if let Some(file) = &self.passphrase_file {
            args.push("--passphrase-file".into());
            args.push(absolute(file).into());
        }
        args.push("--cluster".into());
        args.push(cluster.into());
        args.push("--jobs".into());
        args.push(self.jobs.to_string().into());
        args
    }

    pub fn lock(&self, repo: &Repository, kind: LockKind) -> Result<RepoLock> {
        let acquired = RepoLock::acquire(repo.storage().clone(), kind, None, &self.command_line);
        lock_or_explain(acquired)
    }

    /// A shared lock for a command that only reads, so that no gc (`gc`, `expire`) removes
    /// or repacks what it reads meanwhile. A repository this user may only read (read-only
    /// credentials or mount, as a recovery host often has) takes no lock: the command reads
    /// without one, with a warning.
    pub fn read_lock(&self, repo: &Repository) -> Result<Option<RepoLock>> {
        match RepoLock::acquire(
            repo.storage().clone(),
            LockKind::Shared,
            None,
            &self.command_line,
        ) {
            Ok(lock) => Ok(Some(lock)),
            Err(e @ RepoError::Storage(StorageError::PermissionDenied { .. })) => {
                tracing::warn!(
                    "reading without a lock ({e}): a gc or expire run meanwhile could remove what this reads"
                );
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A shared lock that no other process may hold for `scope` at the same time.
    pub fn lock_scope(&self, repo: &Repository, scope: &str) -> Result<RepoLock> {
        let acquired = RepoLock::acquire(
            repo.storage().clone(),
            LockKind::Shared,
            Some(scope),
            &self.command_line,
        );
        lock_or_explain(acquired)
    }
}

/// A command that writes needs the lock; without write access the storage's own words
/// ("permission denied", "read-only file system") do not say what to do about it.
fn lock_or_explain(acquired: Result<RepoLock, RepoError>) -> Result<RepoLock> {
    match acquired {
        Ok(lock) => Ok(lock),
        Err(e @ RepoError::Storage(StorageError::PermissionDenied { .. })) => {
            Err(anyhow::Error::new(e).context(
                "this command writes to the repository but may not create its lock: run it as \
                 the repository's owner, or with credentials or a mount that allow writing",
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Where a local cache lives: `$VARIABLE` (`off` disables it), else
/// `$XDG_CACHE_HOME/pgvault/NAME`, else `~/.cache/pgvault/NAME`. Two of them: unlocked
/// keys for non-interactive runs (`PGVAULT_KEY_CACHE`, `keys`), and copies of a remote
/// repository's snapshot and index objects (`PGVAULT_OBJECT_CACHE`, `objects`).
fn cache_dir(variable: &str, name: &str) -> Option<PathBuf> {
    match std::env::var(variable) {
        Ok(v) if v == "off" || v == "0" || v == "false" => return None,
        Ok(v) if !v.is_empty() => return Some(PathBuf::from(v)),
        _ => {}
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("pgvault").join(name))
}

/// A new passphrase: from `file`, else typed twice on a terminal, else one line of stdin.
pub fn read_new_passphrase(file: Option<&std::path::Path>) -> Result<String> {
    if let Some(path) = file {
        return read_secret_file(path, "new passphrase");
    }
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("new passphrase: ")
            .context("cannot read the passphrase from the terminal")?;
        let second = rpassword::prompt_password("repeat new passphrase: ")
            .context("cannot read the passphrase from the terminal")?;
        if first != second {
            bail!("the two passphrases differ; nothing was changed");
        }
        if first.is_empty() {
            bail!("the passphrase is empty; nothing was changed");
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the new passphrase from standard input")?;
    let line = line.trim_end_matches(['\n', '\r']).to_string();
    if line.is_empty() {
        bail!("no new passphrase: give --new-passphrase-file FILE, type it on a terminal, or pipe one line to stdin");
    }
    Ok(line)
}
