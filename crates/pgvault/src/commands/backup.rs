//! `backup`: a physical backup through the non-exclusive backup API.
//!
//! One session holds the backup open: start → store PGDATA and every tablespace (files
//! unchanged since the previous backup reuse its content lists without being read;
//! changed files store only changed chunks; data pages are checksum-verified on the way)
//! → stop → wait until the stop segment is in the repository → publish the snapshot.
//! A backup is a snapshot of kind `backup` whose tree holds `pgdata/` and
//! `tablespaces/<oid>/`, and whose metadata ([`BackupMeta`]) holds what restore needs.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use pg::conn::{ArchiverStatus, ClusterInfo, ConnError, ConnectOptions, Connection};
use pg::control::{read_checked, ControlError, ControlFile, DbState};
use pg::page::{check_page, PageCheck, PAGE_SIZE};
use pg::pgdata::{decide, has_init_fork, Decision, Exclusion, RelationFile, CONTROL_FILE};
use pg::summary::ChangedBlocks;
use pg::wal::{Lsn, WalFileName};
use repo::archive::{archive_tree, ArchiveOptions, Archived, Include, ReadRate};
use repo::pack::BlobType;
use repo::restore::write_content;
use repo::saver::BlobSaver;
use repo::snapshot::{find_path, Node, Snapshot, Summary, Tree};
use repo::{Id, Repository};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::archive::{load_identity, parse_duration, parse_size, wal_name};
use super::config_files::{self, ConfigRecord};
use super::setup::connect;
use crate::cli::{BackupAction, BackupArgs};
use crate::context::Context;
use crate::output::{bytes, note, print_json, progress_bar};

pub const BACKUP_KIND: &str = "backup";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tablespace {
    pub oid: u32,
    #[serde(default)]
    pub name: String,
    pub location: String,
}

/// A database of the backed-up cluster (its files are under `base/<oid>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Database {
    pub oid: u32,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CorruptPage {
    /// Relative to the data directory, or `pg_tblspc/<oid>/…` for tablespaces.
    pub file: String,
    pub block: u32,
}

/// What a backup snapshot records beyond its tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupMeta {
    pub cluster: String,
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u64,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_wal: String,
    pub stop_wal: String,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub backup_label: String,
    pub tablespace_map: String,
    pub tablespaces: Vec<Tablespace>,
    pub data_checksums: bool,
    pub corrupted_pages: Vec<CorruptPage>,
    /// Taken from a standby (its files), with the WAL its primary archived.
    #[serde(default)]
    pub from_standby: bool,
    /// PostgreSQL 17+: blocks the server's WAL summaries listed as modified since the
    /// previous backup started, when they were used to read only those.
    #[serde(default)]
    pub wal_summary_blocks: Option<u64>,
    /// The xmax of a snapshot taken just after the backup stopped (epoch-qualified): a
    /// transaction from this id on commits after the backup's end, so restores to a
    /// transaction id choose a backup by it. Absent in older backups.
    #[serde(default)]
    pub next_xid: Option<u64>,
    /// The databases when the backup started, for restores of some of them. Absent in
    /// older backups.
    #[serde(default)]
    pub databases: Option<Vec<Database>>,
    /// Who owned the data directory, so that a restore on another host, as root, gives
    /// the files to the user of that name there. Absent in older backups.
    #[serde(default)]
    pub owner: Option<Owner>,
    /// What the operator left out (`--exclude`, `backup-exclude`), as given.
    #[serde(default)]
    pub excluded: Vec<String>,
    /// Configuration files the server read from outside its data directory, stored under
    /// `config/` in the tree. Absent in older backups.
    #[serde(default)]
    pub config_files: Vec<ConfigRecord>,
}

/// The owner of a data directory: ids, and names where this host's user database had them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub user: Option<String>,
    pub group: Option<String>,
}

impl Owner {
    pub fn of(meta: &fs::Metadata) -> Owner {
        let (uid, gid) = (meta.uid(), meta.gid());
        let user = nix::unistd::User::from_uid(uid.into()).ok().flatten();
        let group = nix::unistd::Group::from_gid(gid.into()).ok().flatten();
        Owner {
            uid,
            gid,
            user: user.map(|user| user.name),
            group: group.map(|group| group.name),
        }
    }
}

impl BackupMeta {
    pub fn start_lsn(&self) -> Result<Lsn> {
        Lsn::parse(&self.start_lsn).context("backup metadata has a malformed start LSN")
    }

    pub fn stop_lsn(&self) -> Result<Lsn> {
        Lsn::parse(&self.stop_lsn).context("backup metadata has a malformed stop LSN")
    }
}

/// All backups of `cluster`, oldest first.
pub fn list_backups(repo: &Repository, cluster: &str) -> Result<Vec<(Id, Snapshot, BackupMeta)>> {
    let mut out = Vec::new();
    for (id, snapshot) in Snapshot::load_all(repo)? {
        if snapshot.kind != BACKUP_KIND {
            continue;
        }
        let meta: BackupMeta = serde_json::from_value(snapshot.meta.clone())
            .with_context(|| format!("backup {id} has malformed metadata"))?;
        if meta.cluster == cluster {
            out.push((id, snapshot, meta));
        }
    }
    Ok(out)
}

/// Which of a cluster's backups (`ids`, oldest first) `spec` names: `latest`, or a unique
/// prefix of an id. Returns its index.
pub fn backup_named(ids: &[Id], spec: &str, cluster: &str) -> Result<usize> {
    if spec == "latest" {
        return (ids.len().checked_sub(1))
            .with_context(|| format!("cluster {cluster:?} has no backups: run `pgvault backup`"));
    }
    let wanted = spec.to_lowercase();
    let matching: Vec<usize> = (0..ids.len())
        .filter(|&i| ids[i].to_hex().starts_with(&wanted))
        .collect();
    match matching[..] {
        [index] => Ok(index),
        [] => bail!("no backup of cluster {cluster:?} has an id starting with {spec:?}"),
        _ => bail!(
            "{} backups match {spec:?}: give more digits of the id",
            matching.len()
        ),
    }
}

/// Checks the pages of each chunk of relation files read during the backup.
struct PageVerifier {
    root: PathBuf,
    /// Prefix for reported file names (`""` for PGDATA, `pg_tblspc/<oid>/`).
    report_prefix: String,
    backup_start: Lsn,
    corrupt: Mutex<Vec<CorruptPage>>,
}

impl PageVerifier {
    fn inspect(&self, relative: &Path, offset: u64, data: &[u8]) {
        let Some(relation) = RelationFile::parse(relative) else {
            return;
        };
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let Ok(page) = <&[u8; PAGE_SIZE]>::try_from(page) else {
                continue;
            };
            let page_offset = offset + (i * PAGE_SIZE) as u64;
            let block = relation.block_at(page_offset);
            if !matches!(
                check_page(page, block, self.backup_start),
                PageCheck::Mismatch { .. }
            ) {
                continue;
            }
            // The server may have been writing this page as we read it: read it again.
            if self.reread_is_valid(relative, page_offset, block) {
                continue;
            }
            let file = format!("{}{}", self.report_prefix, relative.display());
            tracing::warn!("checksum mismatch in {file}, block {block}");
            self.corrupt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(CorruptPage { file, block });
        }
    }

    fn reread_is_valid(&self, relative: &Path, offset: u64, block: u32) -> bool {
        let mut page = [0u8; PAGE_SIZE];
        let read = fs::File::open(self.root.join(relative))
            .and_then(|f| f.read_exact_at(&mut page, offset));
        match read {
            // Gone or truncated since: dropped or truncated relations are normal.
            Err(_) => true,
            Ok(()) => !matches!(
                check_page(&page, block, self.backup_start),
                PageCheck::Mismatch { .. }
            ),
        }
    }
}

/// Archive options for one root (PGDATA or a tablespace directory): `base` (jobs,
/// parent, read_all) plus the server's exclusion rules and the operator's (`exclusions`,
/// for PGDATA), page verification and the blocks known to have changed.
fn options_for(
    base: ArchiveOptions,
    root: &Path,
    major: u32,
    tablespace: Option<u32>,
    exclusions: &Arc<[Exclusion]>,
    verifier: Option<Arc<PageVerifier>>,
    changed: Option<Arc<ChangedBlocks>>,
) -> ArchiveOptions {
    let exclusions = exclusions.clone();
    let root_for_filter = root.to_path_buf();
    let version_prefix = format!("PG_{major}_");
    let filter = move |relative: &Path, meta: &fs::Metadata| {
        // A tablespace directory may hold other server versions' directories (after
        // pg_upgrade): only this version's belongs to the backup.
        if tablespace.is_some() && relative.components().count() == 1 {
            let name = relative.to_string_lossy();
            if !name.starts_with(&version_prefix) {
                return Include::No;
            }
        }
        let excluded = exclusions.iter().find_map(|e| e.decide(relative));
        let unlogged = |main: &Path| has_init_fork(&root_for_filter, main);
        match excluded
            .filter(|_| tablespace.is_none())
            .unwrap_or_else(|| decide(relative, meta.is_dir(), &unlogged))
        {
            Decision::Include => Include::Yes,
            Decision::Exclude => Include::No,
            Decision::DirectoryOnly => Include::DirectoryOnly,
        }
    };
    ArchiveOptions {
        filter: Some(Arc::new(filter)),
        inspector: verifier.map(|v| {
            Arc::new(move |relative: &Path, offset: u64, data: &[u8]| {
                v.inspect(relative, offset, data)
            }) as repo::archive::Inspector
        }),
        changed_ranges: changed.map(|blocks| {
            Arc::new(move |relative: &Path| blocks.changed_ranges(tablespace, relative))
                as repo::archive::ChangedRanges
        }),
        ..base
    }
}

/// Tablespaces located inside the data directory, left out of its walk: each is backed
/// up once, as the tablespace it is.
fn tablespaces_inside(pgdata: &Path, tablespaces: &[Tablespace]) -> Vec<Exclusion> {
    (tablespaces.iter())
        .filter_map(|t| {
            let location = fs::canonicalize(&t.location).ok()?;
            let relative = location.strip_prefix(pgdata).ok()?;
            tracing::info!(
                "tablespace {} is inside the data directory ({}): backed up as the tablespace",
                t.name,
                t.location
            );
            Some(Exclusion::tablespace_inside(relative))
        })
        .collect()
}

/// The data roots of a backup: (name in the backup tree, directory, prefix for
/// reports, tablespace OID or `None` for the data directory).
fn backup_roots(
    pgdata: &Path,
    tablespaces: &[Tablespace],
) -> Vec<(String, PathBuf, String, Option<u32>)> {
    std::iter::once((
        "pgdata".to_string(),
        pgdata.to_path_buf(),
        String::new(),
        None,
    ))
    .chain(tablespaces.iter().map(|t| {
        (
            format!("tablespaces/{}", t.oid),
            PathBuf::from(&t.location),
            format!("pg_tblspc/{}/", t.oid),
            Some(t.oid),
        )
    }))
    .collect()
}

/// The parent of root `name` in a previous backup's tree, for reusing unchanged files.
fn parent_of(
    repo: &Repository,
    previous: Option<(Id, DateTime<Utc>)>,
    name: &str,
) -> Result<Option<(Id, DateTime<Utc>)>> {
    let Some((tree, time)) = previous else {
        return Ok(None);
    };
    Ok(find_path(repo, &tree, Path::new(name))?
        .and_then(|node| node.subtree)
        .map(|id| (id, time)))
}

/// [`control_file_problem`] of the backup whose snapshot tree is `top`, which must hold
/// the file.
pub fn stored_control_file_problem(repo: &Repository, top: &Id) -> Result<Option<String>> {
    let pgdata = Tree::load(repo, top)?
        .find("pgdata")
        .and_then(|node| node.subtree)
        .context("backup has no pgdata tree")?;
    match find_path(repo, &pgdata, Path::new(CONTROL_FILE))? {
        Some(control) => control_file_problem(repo, &control),
        None => Ok(Some(format!("it has no {CONTROL_FILE}"))),
    }
}

/// Why the stored `global/pg_control` node `control` would keep a server from starting,
/// if it would: a checksum that is wrong (a copy torn by the server rewriting the file
/// while it was read, which pgvault did not check before it read the file whole).
pub fn control_file_problem(repo: &Repository, control: &Node) -> Result<Option<String>> {
    let mut bytes = Vec::new();
    write_content(repo, &control.content, &mut bytes)?;
    Ok(match ControlFile::parse(&bytes) {
        Err(ControlError::BadChecksum { .. }) => Some(format!(
            "its {CONTROL_FILE} fails its checksum (read while the server rewrote it), and a server would not start on it"
        )),
        _ => None,
    })
}

/// `backup --dry-run`: what the next backup would read, and roughly store judging by
/// the previous backup's ratio of stored to read bytes.
fn estimate(
    ctx: &Context,
    repo: &Repository,
    pgdata: &Path,
    tablespaces: &[Tablespace],
    major: u32,
    exclusions: &Arc<[Exclusion]>,
    read_all: bool,
) -> Result<()> {
    let previous = list_backups(repo, &ctx.cluster)?.pop();
    let previous_tree = previous.as_ref().map(|(_, s, _)| (s.tree, s.time));
    let mut total = repo::archive::Estimate::default();
    for (name, root, _, tablespace) in backup_roots(pgdata, tablespaces) {
        let base = ArchiveOptions {
            jobs: ctx.jobs,
            parent: parent_of(repo, previous_tree, &name)?,
            read_all,
            ..ArchiveOptions::default()
        };
        let options = options_for(base, &root, major, tablespace, exclusions, None, None);
        let part = repo::archive::estimate_tree(repo, &root, &options)
            .with_context(|| format!("walking {}", root.display()))?;
        total.files += part.files;
        total.bytes += part.bytes;
        total.files_to_read += part.files_to_read;
        total.bytes_to_read += part.bytes_to_read;
    }
    let ratio = previous.as_ref().map(|(_, s, _)| {
        let read = s.summary.bytes.saturating_sub(s.summary.bytes_unchanged);
        s.summary.save.bytes_stored as f64 / read.max(1) as f64
    });
    let stored_estimate = ratio.map(|r| (total.bytes_to_read as f64 * r) as u64);
    if ctx.json() {
        return print_json(&json!({
            "previous": previous.as_ref().map(|(id, _, _)| id),
            "files": total.files,
            "size_bytes": total.bytes,
            "files_to_read": total.files_to_read,
            "read_bytes": total.bytes_to_read,
            "stored_bytes_estimate": stored_estimate,
        }));
    }
    println!(
        "next backup of cluster {}: {} in {} files; would read {} files ({}){}",
        ctx.cluster,
        bytes(total.bytes),
        total.files,
        total.files_to_read,
        bytes(total.bytes_to_read),
        match (stored_estimate, &previous) {
            (Some(stored), Some((id, _, _))) => format!(
                " and store about {} (ratio of backup {})",
                bytes(stored),
                id.short()
            ),
            _ => " (no previous backup: everything is read)".to_string(),
        }
    );
    Ok(())
}

fn add(total: &mut Summary, part: &Summary) {
    total.files += part.files;
    total.dirs += part.dirs;
    total.bytes += part.bytes;
    total.bytes_unchanged += part.bytes_unchanged;
}

pub fn backup(ctx: &Context, args: &BackupArgs) -> Result<()> {
    match &args.action {
        Some(BackupAction::Show { id }) => return super::info::show_backup(ctx, id),
        Some(BackupAction::Pin { id }) => return super::expire::pin(ctx, id, true),
        Some(BackupAction::Unpin { id }) => return super::expire::pin(ctx, id, false),
        None => {}
    }
    let wal_timeout = parse_duration(&args.wal_timeout, "--wal-timeout")?;
    let configured =
        (ctx.cluster_section.backup_exclude.iter()).map(|text| ("backup-exclude", text));
    let exclusions: Arc<[Exclusion]> = (configured
        .chain(args.exclude.iter().map(|text| ("--exclude", text))))
    .map(|(source, text)| Exclusion::parse(text).map_err(|e| anyhow::anyhow!("{source}: {e}")))
    .collect::<Result<_>>()?;
    let max_rate = match (&args.max_rate, &ctx.cluster_section.backup_max_rate) {
        (Some(text), _) => Some(("--max-rate", parse_size(text, "--max-rate")?)),
        (None, Some(text)) => Some(("backup-max-rate", parse_size(text, "backup-max-rate")?)),
        (None, None) => None,
    };
    if let Some((source, rate)) = max_rate.filter(|(_, rate)| *rate < 1 << 20) {
        bail!("{source} {rate} bytes per second is below the least allowed, 1MiB: a backup that slow would hold the server's backup open for hours");
    }
    let read_rate = max_rate.map(|(_, rate)| Arc::new(ReadRate::new(rate)));
    let started_at = Instant::now();
    let (mut conn, info) = connect(ctx)?;
    pg::backup::keep_session_open(&mut conn)?;
    let repo = ctx.open()?;
    let identity = load_identity(&repo, &ctx.cluster)?;
    if identity.system_identifier != info.system_identifier.to_string() {
        bail!(
            "this server (system identifier {}) is not cluster {:?} of repository {} ({}): check --pg-conn and --cluster{}",
            info.system_identifier,
            ctx.cluster,
            repo.location(),
            identity.system_identifier,
            identity.upgrade_hint(info.server_version_num)
        );
    }
    let from_standby = info.in_recovery;
    if args.from_standby && !from_standby {
        bail!("--from-standby: the server at --pg-conn is a primary (not in recovery); point --pg-conn at a standby or drop --from-standby");
    }
    let mut primary = match &args.primary_conn {
        Some(_) if !from_standby => bail!(
            "--primary-conn is for backups from a standby, but the server at --pg-conn is itself the primary; drop --primary-conn"
        ),
        Some(conninfo) => Some(connect_primary(conninfo, &info)?),
        None => None,
    };
    // The primary archives the WAL; a standby's settings are normally a copy of its.
    let archiver = primary.as_ref().map_or(&info, |(_, info)| info);
    if archiver.archive_mode == "off" || !archiver.archive_command.contains("archive-push") {
        bail!(
            "WAL archiving to pgvault is not configured (archive_mode {}, archive_command {:?}): a backup needs its WAL; run `pgvault setup --apply` and `pgvault check`",
            archiver.archive_mode,
            archiver.archive_command
        );
    }
    let pgdata = match &ctx.pgdata {
        Some(dir) => dir.clone(),
        None => PathBuf::from(&info.data_directory),
    };
    let pgdata = fs::canonicalize(&pgdata).with_context(|| {
        format!(
            "cannot open the data directory {} (run pgvault on the database host, or pass --pgdata)",
            pgdata.display()
        )
    })?;
    if !pgdata.join("PG_VERSION").is_file() {
        bail!(
            "{} is not a PostgreSQL data directory (no PG_VERSION)",
            pgdata.display()
        );
    }
    check_cluster_of(&pgdata, &info)?;
    let major = info.major();
    let tablespaces_before = pg::backup::tablespaces(&mut conn)?;
    let tablespaces: Vec<Tablespace> = (tablespaces_before.iter())
        .map(|t| Tablespace {
            oid: t.oid,
            name: t.name.clone(),
            location: t.location.clone(),
        })
        .collect();
    let walk_exclusions: Arc<[Exclusion]> = (exclusions.iter().cloned())
        .chain(tablespaces_inside(&pgdata, &tablespaces))
        .collect();
    if args.dry_run {
        let read_all = args.checksum_all;
        return estimate(
            ctx,
            &repo,
            &pgdata,
            &tablespaces,
            major,
            &walk_exclusions,
            read_all,
        );
    }
    // Before the backup starts: a database created during it is restored whole.
    let layout_before = pg::backup::Layout {
        databases: pg::backup::databases(&mut conn)?,
        tablespaces: tablespaces_before,
    };
    let databases: Vec<Database> = (layout_before.databases.iter())
        .map(|d| Database {
            oid: d.oid,
            name: d.name.clone(),
        })
        .collect();
    let owner = Owner::of(
        &fs::metadata(&pgdata).with_context(|| format!("cannot read {}", pgdata.display()))?,
    );
    let config = config_files::take(&info, &pgdata);
    let lock = ctx.lock_scope(&repo, &format!("a backup of cluster {}", ctx.cluster))?;
    let previous = list_backups(&repo, &ctx.cluster)?.pop();
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| format!("pgvault backup {}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ")));

    let start_time = Utc::now();
    if !args.fast {
        say_checkpoint_wait(ctx, &mut conn, from_standby);
    }
    let start = pg::backup::start(&mut conn, major, &label, args.fast, info.wal_segment_size)?;
    tracing::info!(
        "backup started at {} on timeline {}",
        start.lsn,
        start.timeline
    );

    let changed = match (&previous, args.checksum_all) {
        (Some((_, _, previous)), false) => summarized_changes(&mut conn, major, previous, &start),
        _ => None,
    };
    // The databases' size is close to what the walk will see, and costs one query.
    let bar = conn
        .query_one_value("SELECT sum(pg_database_size(oid))::text FROM pg_database")
        .ok()
        .flatten()
        .and_then(|total| total.parse().ok())
        .and_then(|total| progress_bar(ctx, total, "backup"));
    let progress = bar.clone().map(|bar| {
        Arc::new(move |bytes: u64| {
            let done = bar.position() + bytes;
            if bar.length().is_some_and(|total| done > total) {
                bar.set_length(done);
            }
            bar.set_position(done);
        }) as repo::archive::Progress
    });
    let saver = BlobSaver::new(&repo);
    let mut summary = Summary::default();
    let mut corrupted = Vec::new();
    let previous_tree = previous.as_ref().map(|(_, s, _)| (s.tree, s.time));
    let stored = (|| -> Result<Vec<Node>> {
        check_live(&pgdata, start.lsn, from_standby)?;
        let mut top = Vec::new();
        let mut tablespace_nodes = Vec::new();
        for (name, root, report_prefix, tablespace) in backup_roots(&pgdata, &tablespaces) {
            let verifier = info.data_checksums.then(|| {
                Arc::new(PageVerifier {
                    root: root.clone(),
                    report_prefix,
                    backup_start: start.lsn,
                    corrupt: Mutex::new(Vec::new()),
                })
            });
            let base = ArchiveOptions {
                jobs: ctx.jobs,
                parent: parent_of(&repo, previous_tree, &name)?,
                read_all: args.checksum_all,
                progress: progress.clone(),
                read_rate: read_rate.clone(),
                ..ArchiveOptions::default()
            };
            let options = options_for(
                base,
                &root,
                major,
                tablespace,
                &walk_exclusions,
                verifier.clone(),
                changed.clone(),
            );
            let Archived {
                root: node,
                summary: part,
                ..
            } = archive_tree(&saver, &root, &options).map_err(|e| match &e {
                repo::RepoError::Io { error, .. }
                    if error.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    anyhow::anyhow!(
                        "backing up {}: {e}; run pgvault as the user that owns the data directory, or make the file readable to it",
                        root.display()
                    )
                }
                // The error itself stays in the chain, for the advice given on it.
                _ => anyhow::Error::new(e).context(format!("backing up {}", root.display())),
            })?;
            add(&mut summary, &part);
            if let Some(verifier) = verifier {
                let mut found = std::mem::take(
                    &mut *verifier.corrupt.lock().unwrap_or_else(|e| e.into_inner()),
                );
                // Pieces of files are checked on several threads at once.
                found.sort_by(|a, b| (&a.file, a.block).cmp(&(&b.file, b.block)));
                corrupted.extend(found);
            }
            let mut node = node.context("archived tree has no root")?;
            match name.strip_prefix("tablespaces/") {
                Some(oid) => {
                    node.name = oid.to_string();
                    tablespace_nodes.push(node);
                }
                None => {
                    node.name = name;
                    top.push(node);
                }
            }
        }
        if let Some(pgdata_node) = top.first_mut() {
            store_control_file_last(&saver, &pgdata, pgdata_node)?;
        }
        let tablespaces_tree = Tree::sorted(tablespace_nodes).save(&saver)?;
        top.push(Node::synthetic_dir("tablespaces", tablespaces_tree));
        if !config.is_empty() {
            top.push(config_files::store(&saver, &config)?);
        }
        Ok(top)
    })();
    // Always end the backup on the server, also when storing failed.
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Listed before the stop: a change committed later is past the backup's WAL, or (a
    // move) began removing the old directory after the walk.
    let layout_after = stored.is_ok().then(|| pg::backup::layout(&mut conn));
    let stop = pg::backup::stop(&mut conn, major, start.timeline, info.wal_segment_size);
    // The first call after the session ended carries the server's reason.
    let (layout_after, stop) = match layout_after {
        Some(Err(ended @ ConnError::SessionEnded { .. })) => (None, Err(ended)),
        listed => (listed, stop),
    };
    let top = stored?;
    let stop = stop.map_err(|e| match e {
        ConnError::SessionEnded { .. } => anyhow::anyhow!(
            "{e}, and the backup with it before it could be stopped: PostgreSQL abandons a backup whose session ends; nothing was recorded; run the backup again"
        ),
        e => e.into(),
    })?;
    if let Some(change) = (layout_after.transpose()?)
        .map(|after| pg::backup::unrepairable_changes(&layout_before, &after))
        .and_then(|changes| changes.into_iter().next())
    {
        bail!("{change}; nothing was recorded; run the backup again");
    }
    // The server's clock, as the commit times that --target-time is compared with.
    let stop_time = DateTime::<Utc>::from(stop.latest_commit_bound);
    let mut wal_hint = "";
    if from_standby {
        // A standby does not end segments: its primary archives the last one when it is
        // full, unless asked to switch now.
        match primary.as_mut() {
            Some((conn, _)) => {
                pg::backup::switch_wal_past(conn, &stop.segment, info.wal_segment_size)
                    .context("switching WAL on the primary (--primary-conn)")?;
            }
            None => {
                wal_hint = "; from a standby, the primary archives that segment when it is full: pass --primary-conn to switch it at once, or set archive_timeout on the primary";
                tracing::info!("backup from a standby: waiting for the primary to archive {} (pass --primary-conn to switch WAL at once)", stop.segment);
            }
        }
    }
    tracing::info!(
        "backup stopped at {}; waiting for {}",
        stop.lsn,
        stop.segment
    );

    let tree = Tree::sorted(top).save(&saver)?;
    saver.flush()?;
    summary.save = saver.stats();
    // Where the segment is archived from, when pgvault can ask that server.
    let archiving_server = match primary.as_mut() {
        Some((conn, _)) => Some(conn),
        None if from_standby => None,
        None => Some(&mut conn),
    };
    wait_for_wal(
        &repo,
        &ctx.cluster,
        &stop.segment,
        wal_timeout,
        archiving_server,
        wal_hint,
    )?;

    let meta = BackupMeta {
        cluster: ctx.cluster.clone(),
        system_identifier: identity.system_identifier.clone(),
        pg_version: info.server_version_num,
        wal_segment_size: info.wal_segment_size,
        timeline: start.timeline,
        start_lsn: start.lsn.to_string(),
        stop_lsn: stop.lsn.to_string(),
        start_wal: start.segment.to_string(),
        stop_wal: stop.segment.to_string(),
        start_time,
        stop_time,
        backup_label: stop.backup_label,
        tablespace_map: stop.tablespace_map,
        tablespaces,
        data_checksums: info.data_checksums,
        corrupted_pages: corrupted,
        from_standby,
        wal_summary_blocks: changed.as_ref().map(|c| c.block_count() as u64),
        next_xid: Some(stop.next_xid),
        databases: Some(databases),
        owner: Some(owner),
        excluded: exclusions.iter().map(Exclusion::to_string).collect(),
        config_files: config.into_iter().map(|file| file.record).collect(),
    };
    summary.duration_ms = started_at.elapsed().as_millis() as u64;
    let snapshot = Snapshot {
        label: Some(label.clone()),
        paths: vec![pgdata.display().to_string()],
        parent: previous.as_ref().map(|(id, _, _)| *id),
        tags: ctx.cluster_tags(),
        meta: serde_json::to_value(&meta).context("encode backup metadata")?,
        ..Snapshot::new(BACKUP_KIND, start_time, Utc::now(), tree, summary)
    };
    lock.ensure_held()?;
    let id = snapshot.save(&repo)?;
    drop(lock);
    let copies = super::copy::replicate(ctx, &repo);
    report(ctx, &id, &meta, &summary, &label, copies)
}

/// Refuses a data directory of another cluster than the server's (its control file's
/// system identifier), which a backup would read and list as good.
pub fn check_cluster_of(pgdata: &Path, info: &ClusterInfo) -> Result<()> {
    let control = ControlFile::read(pgdata)?;
    if control.system_identifier != info.system_identifier {
        bail!(
            "the data directory {} is another cluster's (system identifier {}), not that of the server at --pg-conn ({}): give that server's data directory with --pgdata",
            pgdata.display(),
            control.system_identifier,
            info.system_identifier
        );
    }
    Ok(())
}

/// Refuses a data directory that is not the one the server runs on, though of the same
/// cluster (a copy, a standby's elsewhere): its control file has not seen the checkpoint
/// (or restartpoint) the backup started from, which the server writes there before
/// answering the start call, or says it is a primary's where the server is a standby, or
/// the other way round.
fn check_live(pgdata: &Path, start: Lsn, in_recovery: bool) -> Result<()> {
    let control = ControlFile::read(pgdata)?;
    let (state, redo) = (control.state, control.checkpoint_redo);
    let expected = match in_recovery {
        true => DbState::InArchiveRecovery,
        false => DbState::InProduction,
    };
    if state != expected {
        bail!(
            "the data directory {} is not the one the server at --pg-conn runs on: that server is {}, but the directory's control file says \"{state}\"; give the server's own data directory with --pgdata",
            pgdata.display(),
            if in_recovery { "a standby" } else { "a primary" }
        );
    }
    if redo < start {
        bail!(
            "the data directory {} is not the one the server at --pg-conn runs on: its last checkpoint starts at {redo}, before the one this backup started from ({start}); a copy of it? give the server's own data directory with --pgdata",
            pgdata.display()
        );
    }
    Ok(())
}

/// PostgreSQL 17+ with `summarize_wal`: the blocks modified since `previous` started,
/// from the server's WAL summaries. `None` (read changed files whole) when summaries are
/// off, do not cover the range, or the timeline changed; never fails the backup.
fn summarized_changes(
    conn: &mut Connection,
    major: u32,
    previous: &BackupMeta,
    start: &pg::backup::BackupStart,
) -> Option<Arc<ChangedBlocks>> {
    let attempt = |conn: &mut Connection| -> Result<Option<ChangedBlocks>> {
        if !pg::summary::enabled(conn, major)? {
            return Ok(None);
        }
        if previous.timeline != start.timeline {
            tracing::info!(
                "the timeline changed since the previous backup: WAL summaries not used"
            );
            return Ok(None);
        }
        let from = Lsn::parse(&previous.start_lsn).context("previous backup's start LSN")?;
        if !pg::summary::wait_summarized(conn, start.lsn, Duration::from_secs(60))? {
            tracing::warn!(
                "the WAL summarizer has not reached the backup start {} within 60s: reading changed files whole",
                start.lsn
            );
            return Ok(None);
        }
        let changed = pg::summary::changed_blocks(conn, start.timeline, from, start.lsn)?;
        if changed.is_none() {
            tracing::info!(
                "the server's WAL summaries do not cover {from}..{}: reading changed files whole",
                start.lsn
            );
        }
        Ok(changed)
    };
    match attempt(conn) {
        Ok(Some(changed)) => {
            tracing::info!(
                "WAL summaries: {} blocks modified since the previous backup started",
                changed.block_count()
            );
            Some(Arc::new(changed))
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("reading WAL summaries failed ({e:#}): reading changed files whole");
            None
        }
    }
}

/// Connects to the primary of the standby described by `standby`.
fn connect_primary(conninfo: &str, standby: &ClusterInfo) -> Result<(Connection, ClusterInfo)> {
    let options = ConnectOptions::resolve(Some(conninfo))
        .context("--primary-conn is not a valid connection string")?;
    let mut conn = Connection::connect(&options).context("connecting to --primary-conn")?;
    // It switches WAL and is asked about archiving once the files are read.
    pg::backup::keep_session_open(&mut conn)?;
    let info = ClusterInfo::read(&mut conn)?;
    if info.in_recovery {
        bail!("--primary-conn: that server is in recovery too; point it at the primary");
    }
    if info.system_identifier != standby.system_identifier {
        bail!(
            "--primary-conn: that server (system identifier {}) is not this standby's primary ({})",
            info.system_identifier,
            standby.system_identifier
        );
    }
    Ok((conn, info))
}

/// Says what a backup without `--fast` waits for before it starts, which can take
/// minutes with nothing else to show: the server's next checkpoint (a standby's
/// restartpoint), spread as the server spreads its own.
fn say_checkpoint_wait(ctx: &Context, conn: &mut Connection, from_standby: bool) {
    let sql = "SELECT current_setting('checkpoint_completion_target'), current_setting('checkpoint_timeout')";
    let spread = match conn.query_rows(sql).map(|rows| rows.into_iter().next()) {
        Ok(Some(row)) => match row.as_slice() {
            [Some(target), Some(timeout)] => format!(", spread over up to {target} × {timeout} (checkpoint_completion_target × checkpoint_timeout)"),
            _ => String::new(),
        },
        _ => String::new(),
    };
    let checkpoint = match from_standby {
        true => "the standby's next restartpoint",
        false => "the server's next checkpoint",
    };
    note!(
        ctx,
        "waiting for {checkpoint}{spread} before the backup starts; --fast asks for an immediate one"
    );
}

/// Stores `global/pg_control` again after every other file. Recovery of a backup taken
/// from a standby ends at the control file's minimum recovery point, which covers every
/// page flushed before it was read — so it must be read last (as pg_basebackup does),
/// and whole: the server may be rewriting it, and cannot start on a torn copy.
fn store_control_file_last(
    saver: &BlobSaver<'_>,
    pgdata: &Path,
    pgdata_node: &mut Node,
) -> Result<()> {
    let path = pgdata.join(CONTROL_FILE);
    let meta = fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?;
    let (data, _) = read_checked(pgdata)?;
    let content = saver.save(BlobType::Data, &data)?;
    let repo = saver.repository();
    let root_id = pgdata_node
        .subtree
        .context("backup tree has no data directory")?;
    let mut root = Tree::load(repo, &root_id)?;
    let global = root
        .nodes
        .iter_mut()
        .find(|n| n.name == "global")
        .context("backup has no global directory")?;
    let mut global_tree = Tree::load(repo, &global.subtree.context("global is not a directory")?)?;
    let control = global_tree
        .nodes
        .iter_mut()
        .find(|n| n.name == "pg_control")
        .context("backup has no global/pg_control")?;
    control.content = vec![content];
    control.size = data.len() as u64;
    control.mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    global.subtree = Some(global_tree.save(saver)?);
    pgdata_node.subtree = Some(root.save(saver)?);
    Ok(())
}

/// Waits until `segment` is in the repository. `archiving_server`, the server that
/// archives it, is asked what its archiver is doing: once after a few seconds (a
/// warning while the wait goes on) and at the timeout (in the error).
fn wait_for_wal(
    repo: &Repository,
    cluster: &str,
    segment: &WalFileName,
    timeout: Duration,
    mut archiving_server: Option<&mut Connection>,
    hint: &str,
) -> Result<()> {
    const WARN_AFTER: Duration = Duration::from_secs(10);
    let started = Instant::now();
    let name = wal_name(cluster, segment);
    let mut archiver = || match archiving_server.as_mut().map(|c| ArchiverStatus::read(c)) {
        Some(Ok(status)) => Some(status),
        Some(Err(e)) => {
            tracing::debug!("reading pg_stat_archiver: {e}");
            None
        }
        None => None,
    };
    let mut warned = false;
    // The archiver usually delivers the segment within tens of milliseconds: poll fast
    // at first, then back off so a slow archive does not flood the storage with checks.
    let mut pause = Duration::from_millis(10);
    loop {
        if repo.has_file(&name)? {
            return Ok(());
        }
        if started.elapsed() > timeout {
            let archiver =
                archiver().map(|status| format!("; {}", status.explain(&segment.to_string())));
            // It may have arrived while the archiver was asked.
            if repo.has_file(&name)? {
                return Ok(());
            }
            bail!(
                "the backup's last WAL segment {segment} did not reach the repository within {}: the backup is not usable without it and was not recorded{}; check archiving with `pgvault check`{hint}",
                humantime::format_duration(timeout),
                archiver.unwrap_or_default()
            );
        }
        if !warned && started.elapsed() > WARN_AFTER.min(timeout / 2) {
            warned = true;
            match archiver() {
                Some(status) if status.failing => tracing::warn!(
                    "waiting for {segment} to be archived (up to {}): {}",
                    humantime::format_duration(timeout),
                    status.explain(&segment.to_string())
                ),
                _ => tracing::info!(
                    "still waiting for {segment} to be archived (up to {})",
                    humantime::format_duration(timeout)
                ),
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

fn report(
    ctx: &Context,
    id: &Id,
    meta: &BackupMeta,
    summary: &Summary,
    label: &str,
    copies: Vec<serde_json::Value>,
) -> Result<()> {
    let seconds = (summary.duration_ms as f64 / 1000.0).max(0.001);
    let read = summary.bytes - summary.bytes_unchanged;
    if ctx.json() {
        return print_json(&json!({
            "id": id,
            "label": label,
            "cluster": meta.cluster,
            "start_lsn": meta.start_lsn,
            "stop_lsn": meta.stop_lsn,
            "timeline": meta.timeline,
            "start_time": meta.start_time,
            "stop_time": meta.stop_time,
            "size_bytes": summary.bytes,
            "read_bytes": read,
            "new_bytes": summary.save.bytes_new,
            "stored_bytes": summary.save.bytes_stored,
            "delta_blobs": summary.save.blobs_delta,
            "files": summary.files,
            "duration_ms": summary.duration_ms,
            "mb_per_second": read as f64 / 1e6 / seconds,
            "dedup_ratio": summary.bytes as f64 / summary.save.bytes_stored.max(1) as f64,
            "corrupted_pages": meta.corrupted_pages,
            "from_standby": meta.from_standby,
            "wal_summary_blocks": meta.wal_summary_blocks,
            "copies": copies,
        }));
    }
    println!("{id}");
    note!(ctx,
        "backup {} of cluster {}: {} in {} files, {} read, {} new stored; WAL {} … {} (timeline {}), {:.1}s",
        &id.to_hex()[..12],
        meta.cluster,
        bytes(summary.bytes),
        summary.files,
        bytes(read),
        bytes(summary.save.bytes_stored),
        meta.start_wal,
        meta.stop_wal,
        meta.timeline,
        seconds
    );
    for page in &meta.corrupted_pages {
        note!(
            ctx,
            "warning: checksum mismatch in {} block {}",
            page.file,
            page.block
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use repo::crypto::Encryption;
    use repo::keys::KdfParams;
    use repo::storage::LocalStorage;
    use repo::InitOptions;

    /// A backup tree holding `pgdata/global/pg_control` with `bytes`.
    fn backup_tree(saver: &BlobSaver<'_>, bytes: &[u8]) -> Id {
        let control = Node {
            name: "pg_control".into(),
            kind: repo::snapshot::NodeKind::File,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: bytes.len() as u64,
            content: vec![saver.save(BlobType::Data, bytes).expect("save")],
            subtree: None,
            target: None,
        };
        let mut id = Tree::sorted(vec![control]).save(saver).expect("save");
        for name in ["global", "pgdata"] {
            id = (Tree::sorted(vec![Node::synthetic_dir(name, id)]).save(saver)).expect("save");
        }
        id
    }

    #[test]
    fn a_stored_control_file_that_fails_its_checksum_is_a_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = InitOptions {
            encryption: Encryption::None,
            kdf: KdfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            ..InitOptions::default()
        };
        let storage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        let repo = Repository::init(storage, &options, None).expect("init");
        // The layout of PostgreSQL 13 to 16: version 1300, the checksum at byte 288.
        let mut bytes = vec![0u8; 8192];
        bytes[8..12].copy_from_slice(&1300u32.to_ne_bytes());
        let crc = crc32c::crc32c(&bytes[..288]);
        bytes[288..292].copy_from_slice(&crc.to_ne_bytes());
        let mut torn = bytes.clone();
        torn[100] ^= 1;
        let saver = BlobSaver::new(&repo);
        let whole = backup_tree(&saver, &bytes);
        let broken = backup_tree(&saver, &torn);
        saver.flush().expect("flush");
        assert_eq!(
            stored_control_file_problem(&repo, &whole).expect("read"),
            None
        );
        let problem = stored_control_file_problem(&repo, &broken).expect("read");
        assert!(
            problem
                .as_deref()
                .is_some_and(|p| p.contains("global/pg_control fails its checksum")),
            "{problem:?}"
        );
    }
}
