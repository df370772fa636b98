//! WAL archiving: `archive-push` (PostgreSQL's `archive_command`) and `archive-get`
//! (`restore_command`), synchronous or with background workers.
//!
//! Repository layout (named files, see `repo::files`):
//! ```text
//! clusters/<cluster>                    registration: system identifier, version, segment size
//! wal/<cluster>/<TLI>/<file name>       segments, .partial, .backup and .history files
//! ```
//! Async push follows PostgreSQL's own bookkeeping: a worker pushes every segment that has
//! a `.ready` status file, in parallel, and leaves `<name>.ok` (durable in the repository)
//! or `<name>.error` in the spool; `archive-push` answers PostgreSQL from those, so success
//! is only ever reported for segments that are in the repository.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use pg::wal::{SegmentExpectation, WalFileName};
use repo::{Repository, StoreOutcome};
use serde::{Deserialize, Serialize};

use crate::context::Context;

/// What the repository knows about a cluster; written once by `setup`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterIdentity {
    pub name: String,
    /// As text: JSON numbers lose precision above 2^53.
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub wal_segment_size: u64,
    pub registered: DateTime<Utc>,
}

impl ClusterIdentity {
    pub fn system_identifier(&self) -> Result<u64> {
        self.system_identifier.parse().with_context(|| {
            format!(
                "cluster {} has a malformed system identifier in the repository",
                self.name
            )
        })
    }

    /// Appended to a refusal of a server of `server_version_num` that is not this
    /// cluster: when it is of a newer major version, it is most likely this cluster after
    /// pg_upgrade, which makes a new system, and what to do is not obvious.
    pub fn upgrade_hint(&self, server_version_num: u32) -> String {
        let (registered, server) = (self.pg_version_num / 10000, server_version_num / 10000);
        if server <= registered {
            return String::new();
        }
        let name = &self.name;
        let base = name.strip_suffix(&format!("-{registered}")).unwrap_or(name);
        format!(
            "; after a major upgrade (pg_upgrade from PostgreSQL {registered} to {server}) the server is a new system: register it under a new name with `pgvault --cluster {base}-{server} setup --apply` (which also sets its archive_command) and back it up; the backups of {name} stay restorable with --cluster {name}"
        )
    }

    fn expectation(&self) -> Result<SegmentExpectation> {
        Ok(SegmentExpectation {
            system_identifier: self.system_identifier()?,
            segment_size: self.wal_segment_size,
            server_major: self.pg_version_num / 10000,
        })
    }
}

fn registration_name(cluster: &str) -> String {
    format!("clusters/{cluster}")
}

pub fn wal_name(cluster: &str, file: &WalFileName) -> String {
    format!("wal/{cluster}/{:08X}/{file}", file.timeline())
}

/// Registers `identity`; refuses a different cluster under the same name.
pub fn register(repo: &Repository, identity: &ClusterIdentity) -> Result<bool> {
    if let Some(existing) = find_identity(repo, &identity.name)? {
        if existing.system_identifier != identity.system_identifier {
            bail!(
                "cluster {:?} in repository {} belongs to system identifier {}, but this server is {}: choose another --cluster name (or repository) for it{}",
                identity.name,
                repo.location(),
                existing.system_identifier,
                identity.system_identifier,
                existing.upgrade_hint(identity.pg_version_num)
            );
        }
        return Ok(false);
    }
    let json = serde_json::to_vec_pretty(identity).context("encode cluster registration")?;
    match repo.store_file(&registration_name(&identity.name), &json)? {
        StoreOutcome::Created { .. } | StoreOutcome::AlreadyStored { .. } => Ok(true),
        // Lost a race with another setup: judge by what is there now.
        StoreOutcome::Conflict { .. } => register(repo, identity),
    }
}

/// Removes the registration of `cluster` (`pgvault cluster remove`, once nothing else of
/// it is left).
pub fn unregister(repo: &Repository, cluster: &str) -> Result<()> {
    Ok(repo.delete_file(&registration_name(cluster))?)
}

pub fn find_identity(repo: &Repository, cluster: &str) -> Result<Option<ClusterIdentity>> {
    match repo.find_file(&registration_name(cluster))? {
        Some(file) => Ok(Some(serde_json::from_slice(&file.data).with_context(
            || format!("cluster registration {cluster} in {}", repo.location()),
        )?)),
        None => Ok(None),
    }
}

pub fn load_identity(repo: &Repository, cluster: &str) -> Result<ClusterIdentity> {
    find_identity(repo, cluster)?.ok_or_else(|| {
        anyhow::anyhow!(
            "cluster {cluster:?} is not set up in repository {}: run `pgvault setup --cluster {cluster}` first",
            repo.location()
        )
    })
}

/// Result of pushing one file.
#[derive(Debug)]
pub enum Pushed {
    Created { stored_bytes: u64 },
    AlreadyThere,
}

/// Validates and stores one WAL file. Durable in the repository when it returns `Ok`.
pub fn push_file(
    repo: &Repository,
    identity: &ClusterIdentity,
    path: &Path,
) -> Result<(WalFileName, Pushed)> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} is not a WAL file path", path.display()))?;
    let wal = WalFileName::parse(file_name).with_context(|| {
        format!(
            "{} is not a WAL segment, .partial, .backup or .history file",
            path.display()
        )
    })?;
    let cannot_read = || format!("cannot read {}", path.display());
    let file = fs::File::open(path).with_context(cannot_read)?;
    let len = file.metadata().with_context(cannot_read)?.len();
    if wal.has_segment_header() {
        let mut head = vec![0u8; pg::wal::SEGMENT_HEAD_LEN.min(len as usize)];
        file.read_exact_at(&mut head, 0).with_context(cannot_read)?;
        pg::wal::validate_segment(&head, len, &identity.expectation()?, &wal).map_err(|e| {
            let hint = match &e {
                pg::wal::WalError::WrongMagic { found, .. } => pg::wal::major_for_magic(*found)
                    .map(|major| identity.upgrade_hint(major * 10000))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            anyhow::anyhow!("refusing {}: {e}{hint}", path.display())
        })?;
    }
    let name = wal_name(&identity.name, &wal);
    // Read in pieces by the compressing threads: PostgreSQL does not change a segment
    // while it is being archived.
    let source = |buf: &mut [u8], at: u64| {
        file.read_exact_at(buf, at)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", cannot_read())))
    };
    match repo.store_file_from(&name, len, &source)? {
        StoreOutcome::Created { stored_bytes, .. } => Ok((wal, Pushed::Created { stored_bytes })),
        StoreOutcome::AlreadyStored { .. } => Ok((wal, Pushed::AlreadyThere)),
        StoreOutcome::Conflict { existing, new } => bail!(
            "{wal} is already archived in {} with different content (repository checksum of the archived file {existing}, checksum of this file {new}); \
             two servers may be archiving to one --cluster, or the file is damaged: investigate before deleting anything",
            repo.location()
        ),
    }
}

/// Fetches one WAL file; `None` when the repository does not have it.
pub fn fetch_file(repo: &Repository, cluster: &str, wal: &WalFileName) -> Result<Option<Vec<u8>>> {
    Ok(repo
        .find_file(&wal_name(cluster, wal))?
        .map(|file| file.data))
}

// ---------------------------------------------------------------------------------
// Local files: spool, atomic writes.

/// Writes `data` to `path` through a temporary file and a rename, optionally fsynced
/// (file and directory) so it survives a crash.
pub fn write_atomically(path: &Path, data: &[u8], durable: bool) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".pgvault-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.write_all(data)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if durable {
        tmp.as_file()
            .sync_all()
            .with_context(|| format!("cannot fsync {}", path.display()))?;
    }
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot rename into {}", path.display()))?;
    if durable {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Makes the entries of `dir` (names created, renamed or removed) durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

/// The per-cluster spool directory with the async push queue and prefetched WAL.
///
/// Its path comes from the cluster name alone, and two servers on one host may share a
/// name (each with its own config and repository, as `main` by default): the queue and
/// the prefetched files are therefore kept apart per repository, cluster and server
/// (`archive-out/<tag>`, `archive-in/<tag>`), so that neither worker ever answers for,
/// or serves, the other's segments of the same names.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    /// The repository's location and the cluster name, the part of every tag.
    source: String,
}

impl Spool {
    pub fn new(ctx: &Context) -> Spool {
        let base = std::env::var_os("PGVAULT_SPOOL_PATH")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| ctx.cluster_section.spool_path.clone())
            .unwrap_or_else(|| PathBuf::from("/var/spool/pgvault"));
        Spool {
            root: base.join(&ctx.cluster),
            source: format!("{:?}\n{}", ctx.location().ok(), ctx.cluster),
        }
    }

    /// Status files of the async push of the server whose WAL is in `pg_wal`
    /// (`<name>.ok`, `<name>.error`).
    pub fn outgoing(&self, pg_wal: &Path) -> Result<PathBuf> {
        self.tagged("archive-out", &pg_wal.display().to_string())
    }

    /// Segments prefetched from this repository, waiting for archive-get.
    pub fn incoming(&self) -> Result<PathBuf> {
        self.tagged("archive-in", "")
    }

    /// Where every repository's prefetched segments are, each in its directory.
    pub fn all_incoming(&self) -> Result<PathBuf> {
        self.dir("archive-in")
    }

    fn tagged(&self, name: &str, server: &str) -> Result<PathBuf> {
        let tag = repo::Id::of_bytes(format!("{}\n{server}", self.source).as_bytes()).to_hex();
        self.dir(&format!("{name}/{}", &tag[..16]))
    }

    /// Markers of WAL files the secondary repository `repo` (at `url`) still lacks, from
    /// this repository and cluster: `secondary/<repo>/<tag>`, because two servers of one
    /// cluster name may each have a secondary of that name.
    pub fn secondary_pending(&self, repo: &str, url: &str) -> Result<PathBuf> {
        let tag =
            repo::Id::of_bytes(format!("{}\nsecondary {url}", self.source).as_bytes()).to_hex();
        self.dir(&format!("secondary/{repo}/{}", &tag[..16]))
    }

    /// Creates the directory if needed: it may have been deleted under a running worker.
    fn dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create spool directory {}: set spool-path in the config (or PGVAULT_SPOOL_PATH) to a directory the PostgreSQL user can write",
                dir.display()
            )
        })?;
        Ok(dir)
    }
}

/// Holds an exclusive `flock` on a file for the life of the process, so at most one
/// worker of a kind runs per spool.
pub struct WorkerLock {
    _file: fs::File,
}

impl WorkerLock {
    pub fn try_acquire(path: &Path) -> Result<Option<WorkerLock>> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(WorkerLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

/// Starts `pgvault <args>` detached from PostgreSQL's process group, output to `log`.
pub fn spawn_worker(ctx: &Context, args: &[std::ffi::OsString], log: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the pgvault executable")?;
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open worker log {}", log.display()))?;
    std::process::Command::new(exe)
        .args(ctx.child_args())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .context("cannot start the background worker")?;
    Ok(())
}

pub fn parse_duration(text: &str, what: &str) -> Result<Duration> {
    humantime::parse_duration(text)
        .with_context(|| format!("{what} {text:?}: write a duration such as 60s or 5m"))
}

pub fn parse_size(text: &str, what: &str) -> Result<u64> {
    text.parse::<bytesize::ByteSize>()
        .map(|s| s.as_u64())
        .map_err(|e| anyhow::anyhow!("{what} {text:?}: {e}; write a size such as 4GiB"))
}

/// Sleeps in short steps until `done` returns `Some` or `timeout` passes.
///
/// The archiver waits on this for every segment, and a worker usually answers within a
/// few tens of milliseconds: polling every millisecond at first keeps that answer from
/// waiting out a long sleep; only a slow answer backs off to 50 ms steps.
pub fn wait_for<T>(timeout: Duration, mut done: impl FnMut() -> Option<T>) -> Option<T> {
    const EAGER: Duration = Duration::from_millis(250);
    let start = Instant::now();
    let mut step = Duration::from_millis(1);
    loop {
        if let Some(value) = done() {
            return Some(value);
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return None;
        }
        std::thread::sleep(step);
        if waited >= EAGER {
            step = (step * 2).min(Duration::from_millis(50));
        }
    }
}
