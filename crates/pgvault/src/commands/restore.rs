//! `restore`: a backup back into a data directory, with recovery settings that replay
//! WAL through `archive-get` to the chosen target.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use chrono::{DateTime, LocalResult, NaiveDateTime, Utc};
use pg::backup::is_system_database;
use pg::pgdata::{database_dir, database_dirs_in_tablespace, Postmaster};
use pg::recovery::{
    configuration, parse_extra_setting, rewrite_auto_conf, with_extra_settings, xid_assigned_since,
    RecoveryOptions, Target, TargetAction,
};
use pg::wal::{Lsn, WalFileName};
use pg::walrecords::{newest_backup_before_restore_point, BackupRange};
use repo::lock::RepoLock;
use repo::restore::{
    apply_root_metadata, restore_file_last, restore_tree, restore_tree_delta, shortage_of_room,
    tree_bytes, DeltaCheck, DeltaStats, OwnerMap, Progress, RestoreOptions,
};
use repo::snapshot::{find_path, Node, Snapshot, Tree};
use repo::{Id, Repository};
use serde_json::json;

use super::archive::{fetch_file, fsync_dir, write_atomically};
use super::backup::{
    backup_named, control_file_problem, list_backups, BackupMeta, Database, Owner,
};
use super::catalog::{hold_name, HoldRecord, Reach, WalArchive};
use super::config_files;
use super::setup::command_prefix;
use crate::cli::{DeltaMode, RestoreArgs};
use crate::context::Context;
use crate::output::{bytes, note, print_json, progress_bar};
use crate::retention::parse_duration;

/// PostgreSQL's timestamp input, as far as recovery_target_time needs it: an ISO date
/// and time with a zone — an offset (`+01`, `+01:00`, `Z`), `UTC`/`GMT`, or a time zone
/// name (`Europe/Berlin`) in which the local time must be unambiguous.
pub fn parse_target_time(text: &str) -> Result<DateTime<Utc>> {
    let trimmed = text.trim();
    // Only the date's separator: zone names have capital Ts too.
    let normalized = match trimmed.get(10..11) {
        Some("T") => format!("{} {}", &trimmed[..10], &trimmed[11..]),
        _ => trimmed.to_string(),
    };
    let with_offset = match normalized.strip_suffix('Z') {
        Some(utc) => format!("{utc}+00"),
        None => normalized.clone(),
    };
    for format in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f %:z",
    ] {
        if let Ok(time) = DateTime::parse_from_str(&with_offset, format) {
            return Ok(time.with_timezone(&Utc));
        }
    }
    const LOCAL: &str = "%Y-%m-%d %H:%M:%S%.f";
    const EXAMPLE: &str =
        "write it like \"2026-11-25 01:30:00+00\" or \"2026-11-25 02:30:00 Europe/Berlin\"";
    if NaiveDateTime::parse_from_str(&normalized, LOCAL).is_ok() {
        bail!(
            "--target-time {text:?} has no time zone, and the server would read it in its own: {EXAMPLE}"
        );
    }
    let Some((local, zone)) = normalized.rsplit_once(' ') else {
        bail!("--target-time {text:?} is not a date and time: {EXAMPLE}");
    };
    let Ok(local) = NaiveDateTime::parse_from_str(local.trim_end(), LOCAL) else {
        bail!("--target-time {text:?} is not a date and time: {EXAMPLE}");
    };
    let zone: chrono_tz::Tz = match zone {
        z if z.eq_ignore_ascii_case("utc") || z.eq_ignore_ascii_case("gmt") => chrono_tz::UTC,
        z => z.parse().map_err(|_| {
            anyhow!("--target-time {text:?}: unknown time zone {z:?}: give an offset or a name like Europe/Berlin")
        })?,
    };
    match local.and_local_timezone(zone) {
        LocalResult::Single(time) => Ok(time.with_timezone(&Utc)),
        LocalResult::Ambiguous(earlier, later) => bail!(
            "--target-time {text:?} happens twice in {zone} (the clocks go back): give the offset, \"{}\" or \"{}\"",
            earlier.format("%Y-%m-%d %H:%M:%S%:z"),
            later.format("%Y-%m-%d %H:%M:%S%:z")
        ),
        LocalResult::None => bail!(
            "--target-time {text:?} does not exist in {zone} (the clocks go forward then): give another time or an offset"
        ),
    }
}

fn target_of(args: &RestoreArgs) -> Result<Target> {
    Ok(if let Some(t) = &args.target_time {
        // In the one form every PostgreSQL version parses (it rejects e.g. "T…Z").
        let time = parse_target_time(t)?;
        Target::Time(time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
    } else if let Some(l) = &args.target_lsn {
        Lsn::parse(l)?;
        Target::Lsn(l.clone())
    } else if let Some(x) = &args.target_xid {
        if x.parse::<u64>().is_err() {
            bail!("--target-xid {x:?} is not a transaction id (a number)");
        }
        Target::Xid(x.clone())
    } else if let Some(n) = &args.target_name {
        Target::Name(n.clone())
    } else if args.target.is_some() {
        Target::Immediate
    } else {
        Target::End
    })
}

/// The backup to restore: the one asked for, else the newest one that ends before the
/// target (for time, LSN, transaction id and restore point targets), else the newest.
fn choose_backup(
    repo: &Repository,
    ctx: &Context,
    args: &RestoreArgs,
    target: &Target,
) -> Result<(Id, Snapshot, BackupMeta)> {
    let timeline_choice = TimelineChoice::of(args)?;
    let backups = list_backups(repo, &ctx.cluster)?;
    if backups.is_empty() {
        bail!(
            "cluster {:?} has no backups in {}: run `pgvault backup` first",
            ctx.cluster,
            repo.location()
        );
    }
    // One listing of the archive serves the restore-point search and the WAL checks.
    let archive = WalArchive::load(repo, &ctx.cluster, backups[0].2.wal_segment_size)?;
    if let TimelineChoice::Number(number) = timeline_choice {
        if number > 1 && !archive.histories.contains_key(&number) {
            bail!(
                "--target-timeline {number}: the repository has no history of timeline {number} ({}); `pgvault info` lists the timelines it holds",
                WalFileName::history(number)
            );
        }
    }
    let candidates = candidate_backups(repo, ctx, args, target, &archive, backups)?;
    if candidates.is_empty() {
        let hint = match target {
            Target::Xid(_) => {
                "; if the transaction began before a backup ended but committed after, name that backup with --backup"
            }
            _ => "",
        };
        bail!(
            "no backup of cluster {:?} ends before the target {target}: choose a later target{hint}",
            ctx.cluster
        );
    }
    // The newest candidate whose WAL the repository holds: a backup missing some cannot
    // reach consistency, and recovery would fail only once the server runs.
    let mut unrestorable = Vec::new();
    // Backups the followed timeline did not branch from after they ended.
    let mut off_history = Vec::new();
    for (id, snapshot, meta) in candidates.into_iter().rev() {
        let follow = timeline_choice.followed(&archive, meta.timeline);
        let stop = meta.stop_lsn()?;
        if !archive.descends(meta.timeline, stop, follow) {
            off_history.push((id, meta.timeline, follow));
            continue;
        }
        let reach = archive.reach(meta.timeline, meta.start_lsn()?, stop, Some(follow));
        if !reach.restorable() {
            unrestorable.push((id, reach.missing));
            continue;
        }
        if !unrestorable.is_empty() {
            tracing::warn!(
                "restoring the older backup {}: WAL of the newer {} is missing from the repository",
                id.short(),
                missing_wal(&unrestorable)
            );
        }
        if !off_history.is_empty() {
            tracing::warn!(
                "restoring the older backup {}: recovery follows timeline {follow}, which does not descend from the newer {}; to restore one of those, name it with --backup and pass --target-timeline current",
                id.short(),
                on_timelines(&off_history)
            );
        }
        check_target_reach(&archive, &reach, target, args.standby)?;
        warn_of_histories_left_behind(&archive, &meta, target, follow, timeline_choice)?;
        return Ok((id, snapshot, meta));
    }
    if unrestorable.is_empty() {
        if let [(id, timeline, follow)] = off_history.as_slice() {
            let latest = match timeline_choice {
                TimelineChoice::Latest => " (the latest in the repository)",
                _ => "",
            };
            bail!(
                "backup {} on timeline {timeline} cannot recover along timeline {follow}{latest}: timeline {follow} did not branch from timeline {timeline} after the backup ended, and PostgreSQL would refuse to start (requested timeline {follow} is not a child of this server's history); pass --target-timeline current to stay on timeline {timeline}, or choose another backup",
                id.short()
            );
        }
        if !off_history.is_empty() {
            bail!(
                "no backup of cluster {:?} for this target lies in the history of the timeline recovery follows: {}; pass --target-timeline current to stay on a backup's own timeline, or another --target-timeline",
                ctx.cluster,
                on_timelines(&off_history)
            );
        }
    }
    if let [(id, missing)] = unrestorable.as_slice() {
        bail!(
            "backup {} cannot be restored from {}: its WAL {} is missing; `pgvault verify` names what else is damaged",
            id.short(),
            repo.location(),
            missing.join(", ")
        );
    }
    bail!(
        "no backup of cluster {:?} for this target can be restored from {}: WAL is missing for {}; `pgvault verify` names what else is damaged",
        ctx.cluster,
        repo.location(),
        missing_wal(&unrestorable)
    )
}

/// Recovery to the latest timeline silently leaves behind WAL that an ancestor timeline
/// has past the point where the latest one branched off: when a promoted copy archived
/// into this repository, that is the source's own WAL after the copy was made.
fn warn_of_histories_left_behind(
    archive: &WalArchive,
    meta: &BackupMeta,
    target: &Target,
    follow: u32,
    timeline_choice: TimelineChoice,
) -> Result<()> {
    let to_latest = matches!(timeline_choice, TimelineChoice::Latest);
    if !to_latest || matches!(target, Target::Immediate) {
        return Ok(());
    }
    for left in archive.left_behind(meta.timeline, meta.stop_lsn()?, follow) {
        let archived = (left.archived)
            .map(|t| format!(", archived {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
            .unwrap_or_default();
        let (earlier, left_at, last) = (left.timeline, left.left_at, &left.last_segment);
        tracing::warn!(
            "recovery follows timeline {follow}, the latest in the archive, which left timeline {earlier} at {left_at}; timeline {earlier} has WAL archived past that point (up to {last}{archived}) that this restore does not replay: another server's history, a restored copy promoted while archiving here or the old primary after a failover; to follow timeline {earlier} instead, pass --target-timeline {earlier}"
        );
    }
    Ok(())
}

/// `--hold`: how long expire keeps the restored backup; `None` for 0.
fn hold_duration(text: &str) -> Result<Option<chrono::Duration>> {
    if text.trim() == "0" {
        return Ok(None);
    }
    let duration = parse_duration(text).map_err(|e| anyhow::anyhow!("--hold: {e}, or 0"))?;
    Ok(Some(duration))
}

/// Writes a hold on backup `id` for `hold` from now (see [`super::catalog::Hold`]), so
/// that an expire while this restore runs or the restored server recovers does not take
/// the WAL it fetches. A repository this user may not write (a recovery host's read-only
/// credentials) gets a warning instead.
fn hold_backup(
    ctx: &Context,
    repo: &Repository,
    id: &Id,
    pgdata: &Path,
    hold: chrono::Duration,
) -> Option<DateTime<Utc>> {
    let created = Utc::now();
    let until = created + hold;
    let record = HoldRecord {
        host: repo::hostname(),
        restored_into: pgdata.display().to_string(),
        created,
        until,
    };
    let stored = serde_json::to_vec(&record)
        .map_err(anyhow::Error::from)
        .and_then(|data| {
            let name = hold_name(&ctx.cluster, id, until);
            Ok(repo.store_file(&name, &data)?)
        });
    match stored {
        Ok(_) => Some(until),
        Err(e) => {
            tracing::warn!(
                "cannot hold backup {} against expire while the restored server recovers ({e:#}): an expire meanwhile may remove the WAL its recovery fetches; `pgvault backup pin {}` keeps it",
                id.short(),
                id.short()
            );
            None
        }
    }
}

/// `--target-timeline`, read as PostgreSQL reads `recovery_target_timeline`.
#[derive(Clone, Copy)]
enum TimelineChoice {
    Latest,
    Current,
    Number(u32),
}

impl TimelineChoice {
    fn of(args: &RestoreArgs) -> Result<TimelineChoice> {
        Ok(match args.target_timeline.as_deref() {
            None | Some("latest") => TimelineChoice::Latest,
            Some("current") => TimelineChoice::Current,
            Some(text) => match text.parse() {
                Ok(number) if number > 0 => TimelineChoice::Number(number),
                _ => {
                    bail!("--target-timeline {text:?} is not latest, current or a timeline number")
                }
            },
        })
    }

    /// The timeline recovery of a backup on `timeline` follows.
    fn followed(self, archive: &WalArchive, timeline: u32) -> u32 {
        match self {
            TimelineChoice::Latest => archive.latest_timeline(timeline),
            TimelineChoice::Current => timeline,
            TimelineChoice::Number(number) => number,
        }
    }
}

/// "id (timeline 2), id (timeline 2)" for backups off the history recovery follows.
fn on_timelines(backups: &[(Id, u32, u32)]) -> String {
    let described: Vec<String> = backups
        .iter()
        .map(|(id, timeline, _)| format!("{} (timeline {timeline})", id.short()))
        .collect();
    described.join(", ")
}

/// "id (missing a, b); id (missing c)" for backups whose WAL is missing.
fn missing_wal(backups: &[(Id, Vec<String>)]) -> String {
    let described: Vec<String> = backups
        .iter()
        .map(|(id, missing)| format!("{} (missing {})", id.short(), missing.join(", ")))
        .collect();
    described.join("; ")
}

/// The backups a restore may start from, oldest first: the one asked for with
/// `--backup`, the one before a restore point, or those ending before the target.
fn candidate_backups(
    repo: &Repository,
    ctx: &Context,
    args: &RestoreArgs,
    target: &Target,
    archive: &WalArchive,
    backups: Vec<(Id, Snapshot, BackupMeta)>,
) -> Result<Vec<(Id, Snapshot, BackupMeta)>> {
    if let Some(spec) = args.backup.as_deref().filter(|s| *s != "latest") {
        let ids: Vec<Id> = backups.iter().map(|(id, _, _)| *id).collect();
        let index = backup_named(&ids, spec, &ctx.cluster)?;
        return Ok(backups.into_iter().skip(index).take(1).collect());
    }
    Ok(match target {
        Target::Time(text) => {
            let time = parse_target_time(text)?;
            backups
                .into_iter()
                .filter(|(_, _, meta)| meta.stop_time < time)
                .collect()
        }
        Target::Lsn(text) => {
            let lsn = Lsn::parse(text)?;
            let mut usable = Vec::new();
            for backup in backups {
                if backup.2.stop_lsn()? <= lsn {
                    usable.push(backup);
                }
            }
            usable
        }
        Target::Xid(text) => {
            let xid: u64 = text
                .parse()
                .with_context(|| format!("--target-xid {text:?} is not a transaction id"))?;
            // A transaction commits after a backup's end when it had not ended just after
            // the backup stopped; backups from before this was recorded are assumed usable.
            backups
                .into_iter()
                .filter(|(_, _, meta)| {
                    meta.next_xid
                        .is_none_or(|next| xid_assigned_since(xid, next))
                })
                .collect()
        }
        Target::Name(name) => {
            let chosen = backup_before_restore_point(repo, &ctx.cluster, archive, backups, name)?
                .with_context(|| {
                    format!(
                        "no restore point named {name:?} that a backup of cluster {:?} can recover to (one in the archived WAL after the backup's end, none between its start and end): check the name, or name a backup with --backup",
                        ctx.cluster
                    )
                })?;
            vec![chosen]
        }
        _ => backups,
    })
}

/// Whether replay from a backup can get to `target` with the WAL archived so far. Past a
/// gap an LSN target is out of reach (an error); past the end of the archive, or a time
/// target past a gap (the times are the archive's clock, not the server's), it is reached
/// only if the WAL arrives before recovery gets there (a warning): otherwise PostgreSQL
/// 13+ refuses to start, and 12 ends recovery at the end of the archive. Recovery to the
/// end of the archive ends at a gap without a word from the server (a warning).
fn check_target_reach(
    archive: &WalArchive,
    reach: &Reach,
    target: &Target,
    standby: bool,
) -> Result<()> {
    let Some(last) = &reach.last_segment else {
        return Ok(());
    };
    let segment_size = archive.segment_size;
    let Some(last_segno) = last.segno(segment_size) else {
        return Ok(());
    };
    let after_gap = (archive.segments.get(&last.timeline()))
        .is_some_and(|present| present.range(last_segno + 1..).next().is_some());
    let next = WalFileName::segment(last.timeline(), last_segno + 1, segment_size);
    let end = Lsn((last_segno + 1) * segment_size);
    let stops = if after_gap {
        format!(
            "replay stops after {last}: {next} is missing from the repository (see `pgvault info`)"
        )
    } else {
        format!("the archive ends with {last}")
    };
    let unless = "recovery will end before the target, and PostgreSQL 13+ then refuses to start, unless that WAL is archived before recovery gets there";
    match target {
        Target::Lsn(text) if Lsn::parse(text)? >= end => {
            if after_gap {
                bail!("--target-lsn {text} is out of reach: {stops}");
            }
            tracing::warn!("--target-lsn {text} is past {end}, where {stops}: {unless}");
        }
        // A standby waits at the gap for the primary to stream what is missing.
        Target::End if after_gap && !standby => tracing::warn!(
            "recovery to the end of the archived WAL will end early: {stops}; the WAL archived after that gap is not replayed, and the server ends recovery and opens there (archive the missing WAL first if a server still has it)"
        ),
        Target::Time(text) => {
            let time = parse_target_time(text)?;
            if let Some(until) = reach.until.filter(|until| *until < time) {
                tracing::warn!(
                    "--target-time {text} is after {} (when {last} was archived), and {stops}: {unless}",
                    until.format("%Y-%m-%d %H:%M:%S%.3f+00")
                );
            }
        }
        _ => {}
    }
    Ok(())
}

/// For a restore point target: the newest backup with a restore point of that name in the
/// archived WAL after its end and none between its start and end.
fn backup_before_restore_point(
    repo: &Repository,
    cluster: &str,
    archive: &WalArchive,
    mut backups: Vec<(Id, Snapshot, BackupMeta)>,
    name: &str,
) -> Result<Option<(Id, Snapshot, BackupMeta)>> {
    let Some(segment_size) = backups.last().map(|(_, _, meta)| meta.wal_segment_size) else {
        return Ok(None);
    };
    let ends = backups
        .iter()
        .map(|(_, _, meta)| {
            Ok(BackupRange {
                start: meta.start_lsn()?,
                stop: meta.stop_lsn()?,
                timeline: meta.timeline,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let segments: Vec<WalFileName> = archive.files.iter().map(|f| f.name.clone()).collect();
    let chosen = newest_backup_before_restore_point(&ends, &segments, segment_size, name, |wal| {
        fetch_file(repo, cluster, wal)
    })?;
    Ok(chosen.map(|index| backups.swap_remove(index)))
}

/// An exclusive lock on the data directory restored into, for as long as the file lives:
/// two restores into one directory (a scheduled delta restore overlapping one run by
/// hand) would mix their files.
fn lock_target(pgdata: &Path) -> Result<fs::File> {
    let dir =
        fs::File::open(pgdata).with_context(|| format!("cannot open {}", pgdata.display()))?;
    match dir.try_lock() {
        Ok(()) => Ok(dir),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another pgvault process is restoring into {}: wait for it to end, or restore elsewhere",
            pgdata.display()
        ),
        // A filesystem without locks (NFS without a lock daemon) is no reason to refuse.
        Err(fs::TryLockError::Error(e)) => {
            tracing::warn!(
                "cannot lock {} ({e}): a second restore into it would not be refused",
                pgdata.display()
            );
            Ok(dir)
        }
    }
}

/// Refuses to write a tablespace into a directory that a server running on this host
/// uses as a tablespace: a restore on the source's host without `--tablespace-map`
/// points at the source's own, which `--force` would empty and `--delta` rewrite.
fn refuse_live_tablespaces(tablespaces: &[(u32, PathBuf)]) -> Result<()> {
    let targets: Vec<(u32, PathBuf)> = (tablespaces.iter())
        .filter_map(|(oid, dir)| Some((*oid, fs::canonicalize(dir).ok()?)))
        .collect();
    if targets.is_empty() {
        return Ok(());
    }
    for server in pg::pgdata::running_servers() {
        for (oid, dir) in &targets {
            if (server.tablespaces.iter())
                .any(|used| used.starts_with(dir) || dir.starts_with(used))
            {
                bail!(
                    "tablespace {oid} would be restored into {}, a tablespace of the PostgreSQL server running in {} (pid {}): map it elsewhere with --tablespace-map {oid}=DIR or --tablespace-map-all DIR",
                    dir.display(),
                    server.data_directory.display(),
                    server.pid
                );
            }
        }
    }
    Ok(())
}

/// Refuses a data directory that a server may be using: one whose `postmaster.pid` names
/// a live server, and also one whose `postmaster.pid` cannot be checked from here (a
/// server in a container or on another host looks the same as a crash's leftover).
fn refuse_if_in_use(pgdata: &Path) -> Result<()> {
    if !pgdata.is_dir() {
        return Ok(());
    }
    let pid_file = pgdata.join("postmaster.pid");
    match pg::pgdata::postmaster(pgdata)
        .with_context(|| format!("cannot read {}", pid_file.display()))?
    {
        Postmaster::Absent => Ok(()),
        Postmaster::Running(pid) => bail!(
            "a PostgreSQL server (pid {pid}) is running in {}: stop it before restoring",
            pgdata.display()
        ),
        Postmaster::Unverified(pid) => {
            let named = pid.map_or("no pid".to_string(), |pid| format!("pid {pid}"));
            bail!(
                "{} names {named}, which is no PostgreSQL process on this host: a crash left it, or a server in a container or on another host uses {}; if no server does, delete the file and run again",
                pid_file.display(),
                pgdata.display()
            )
        }
    }
}

/// Run as root, the ids that the data directory owner's user and group names have on this
/// host, in place of the recorded ones where they differ (another host numbered them
/// otherwise); PostgreSQL refuses a data directory not owned by the user running it. Run
/// as anyone else, the restored files are that user's, and nothing is mapped.
fn owner_map(owner: Option<&Owner>) -> Result<OwnerMap> {
    match owner {
        Some(owner) if nix::unistd::geteuid().is_root() => local_ids(owner),
        _ => Ok(OwnerMap::default()),
    }
}

fn local_ids(owner: &Owner) -> Result<OwnerMap> {
    let missing = |what: &str, name: &str| {
        anyhow!(
            "the backup's files belong to {what} {name}, which does not exist on this host: create it, or run the restore as the user that will run PostgreSQL"
        )
    };
    let mut map = OwnerMap::default();
    if let Some(name) = &owner.user {
        let user = nix::unistd::User::from_name(name)
            .with_context(|| format!("cannot look up user {name}"))?
            .ok_or_else(|| missing("user", name))?;
        map.uid = Some((owner.uid, user.uid.as_raw())).filter(|(from, to)| from != to);
    }
    if let Some(name) = &owner.group {
        let group = nix::unistd::Group::from_name(name)
            .with_context(|| format!("cannot look up group {name}"))?
            .ok_or_else(|| missing("group", name))?;
        map.gid = Some((owner.gid, group.gid.as_raw())).filter(|(from, to)| from != to);
    }
    Ok(map)
}

/// Removes the control file of the data directory about to be overwritten, before
/// anything else is changed: an interrupted restore then leaves a directory that cannot
/// be started, rather than one that starts on a mix of old and new files.
fn make_unstartable(pgdata: &Path) -> Result<()> {
    let control = pgdata.join(pg::pgdata::CONTROL_FILE);
    match fs::remove_file(&control) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", control.display())),
    }
    let global = control.parent().unwrap_or(pgdata);
    fsync_dir(global).with_context(|| format!("cannot sync {}", global.display()))
}

/// A tablespace to restore: its directory, its node in the backup's tree and that node's
/// tree.
struct TablespaceNode<'t> {
    oid: u32,
    dir: &'t Path,
    node: Node,
    tree: Id,
    /// The directories of left-out databases in it, restored as holes.
    holes: Vec<PathBuf>,
}

/// Each tablespace to restore, with its directory, its node in the backup's tree and the
/// directories of the `left_out` databases in it.
fn tablespace_nodes<'t>(
    repo: &Repository,
    top: &Tree,
    tablespaces: &'t [(u32, PathBuf)],
    left_out: &[&Database],
) -> Result<Vec<TablespaceNode<'t>>> {
    if tablespaces.is_empty() {
        return Ok(Vec::new());
    }
    let tree = top
        .find("tablespaces")
        .and_then(|n| n.subtree)
        .context("backup lists tablespaces but stores none")?;
    let stored = Tree::load(repo, &tree)?;
    (tablespaces.iter())
        .map(|(oid, dir)| {
            let node = (stored.find(&oid.to_string()).cloned())
                .with_context(|| format!("backup has no data for tablespace {oid}"))?;
            let tree =
                (node.subtree).with_context(|| format!("tablespace {oid} is not a directory"))?;
            let mut holes = Vec::new();
            if !left_out.is_empty() {
                let entries = Tree::load(repo, &tree)?;
                let names = || entries.nodes.iter().map(|node| node.name.as_str());
                holes = (left_out.iter())
                    .flat_map(|database| database_dirs_in_tablespace(database.oid, names()))
                    .collect();
            }
            Ok(TablespaceNode {
                oid: *oid,
                dir: dir.as_path(),
                node,
                tree,
                holes,
            })
        })
        .collect()
}

/// The databases a restore leaves out (`--db-include`, `--db-exclude`), checked against
/// the backup's list before anything is written.
fn left_out_databases<'m>(
    args: &RestoreArgs,
    id: &Id,
    meta: &'m BackupMeta,
) -> Result<Vec<&'m Database>> {
    if args.db_include.is_empty() && args.db_exclude.is_empty() {
        return Ok(Vec::new());
    }
    let Some(databases) = &meta.databases else {
        bail!(
            "backup {} does not list its databases (an older pgvault took it): restore it whole, or restore some databases from a newer backup",
            id.short()
        );
    };
    let named = (args.db_include.iter().map(|name| ("--db-include", name)))
        .chain(args.db_exclude.iter().map(|name| ("--db-exclude", name)));
    for (option, name) in named {
        let Some(database) = databases.iter().find(|d| &d.name == name) else {
            let mut all: Vec<&str> = databases.iter().map(|d| d.name.as_str()).collect();
            all.sort_unstable();
            bail!(
                "{option} {name:?}: backup {} has no such database (it has {})",
                id.short(),
                all.join(", ")
            );
        };
        if option == "--db-exclude" && is_system_database(database.oid) {
            bail!(
                "--db-exclude {name:?}: initdb created it and the server needs it, so it is always restored"
            );
        }
    }
    Ok(databases
        .iter()
        .filter(|d| !is_system_database(d.oid))
        .filter(|d| {
            args.db_exclude.contains(&d.name)
                || (!args.db_include.is_empty() && !args.db_include.contains(&d.name))
        })
        .collect())
}

/// The bytes of the files under `dirs` (relative to the tree `root`).
fn bytes_under(repo: &Repository, root: &Id, dirs: &[PathBuf]) -> Result<u64> {
    let mut total = 0;
    for dir in dirs {
        if let Some(subtree) = find_path(repo, root, dir)?.and_then(|node| node.subtree) {
            total += tree_bytes(repo, &subtree)?;
        }
    }
    Ok(total)
}

/// Refuses a restore that would not fit on the filesystems it writes to, before it
/// writes anything (rather than failing with a full disk half-way). Holes take no room.
fn check_room(
    repo: &Repository,
    snapshot: &Snapshot,
    (pgdata, pgdata_tree, pgdata_holes): (&Path, &Id, &[PathBuf]),
    tablespaces: &[TablespaceNode],
) -> Result<()> {
    // The backup's size counts every root: the data directory's share is what its
    // tablespaces leave, without reading its (largest) tree.
    let mut needs = Vec::new();
    let mut in_tablespaces = 0;
    for tablespace in tablespaces {
        let bytes = tree_bytes(repo, &tablespace.tree)?;
        in_tablespaces += bytes;
        let holes = bytes_under(repo, &tablespace.tree, &tablespace.holes)?;
        needs.push((tablespace.dir, bytes.saturating_sub(holes)));
    }
    let holes = bytes_under(repo, pgdata_tree, pgdata_holes)?;
    needs.push((
        pgdata,
        (snapshot.summary.bytes.saturating_sub(in_tablespaces)).saturating_sub(holes),
    ));
    if let Some(short) = shortage_of_room(&needs)? {
        bail!(
            "the restore needs {} on the filesystem of {}, which has {} free: make room, or restore elsewhere (--pgdata, --tablespace-map)",
            bytes(short.needed),
            short.target.display(),
            bytes(short.free)
        );
    }
    Ok(())
}

/// `--waldir DIR`: absolute, outside the data directory (`pgdata`, absolute), and empty
/// unless `--delta` or `--force` may empty it.
fn check_waldir(dir: &Path, pgdata: &Path, args: &RestoreArgs) -> Result<()> {
    if !dir.is_absolute() {
        bail!(
            "--waldir {}: give an absolute path (the server resolves the link from anywhere)",
            dir.display()
        );
    }
    if dir.starts_with(pgdata) {
        bail!(
            "--waldir {} is inside the data directory {}: give a directory on the other disk",
            dir.display(),
            pgdata.display()
        );
    }
    if !is_empty_or_missing(dir)? && args.delta.is_none() && !args.force {
        bail!(
            "--waldir {} is not empty: empty it, or pass --delta or --force to have its contents removed",
            dir.display()
        );
    }
    Ok(())
}

/// Where the `pg_wal` of an existing data directory links to (`initdb --waldir`): a restore
/// over it keeps that layout, as if given `--waldir` (whose checks and emptying apply),
/// rather than moving the WAL onto the data directory's disk.
fn linked_waldir(pgdata: &Path) -> Result<Option<PathBuf>> {
    let link = pgdata.join("pg_wal");
    match fs::read_link(&link) {
        // A relative link is relative to the data directory.
        Ok(target) => Ok(Some(std::path::absolute(pgdata.join(target))?)),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidInput) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", link.display())),
    }
}

/// Replaces the restored (empty) `pg_wal` with a link to `dir`, which it creates if
/// missing and gives to the data directory's owner, as `initdb --waldir` lays it out.
fn link_waldir(pgdata: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let owner = fs::metadata(pgdata)?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create --waldir {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::chown(dir, Some(owner.uid()), Some(owner.gid())).with_context(|| {
        format!(
            "cannot give {} to the data directory's owner",
            dir.display()
        )
    })?;
    let link = pgdata.join("pg_wal");
    fs::remove_dir(&link)
        .with_context(|| format!("cannot replace {} by a link", link.display()))?;
    std::os::unix::fs::symlink(dir, &link)
        .with_context(|| format!("cannot link {} to {}", link.display(), dir.display()))?;
    std::os::unix::fs::lchown(&link, Some(owner.uid()), Some(owner.gid()))?;
    fsync_dir(dir)?;
    fsync_dir(dir.parent().unwrap_or(dir))?;
    fsync_dir(pgdata)
}

/// Empties `dir` (but keeps it), for --force.
fn clear_directory(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        }
        .with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

fn is_empty_or_missing(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        // Missing, or under a file: creating it will say which.
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => Ok(true),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

/// Writes a file the server will read, owned like the data directory.
fn write_server_file(pgdata: &Path, name: &str, data: &[u8]) -> Result<()> {
    let path = pgdata.join(name);
    write_atomically(&path, data, true)?;
    let meta = fs::metadata(pgdata)?;
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid())).with_context(|| {
        format!(
            "cannot give {} to the data directory's owner",
            path.display()
        )
    })
}

/// `--tablespace-map OID_OR_NAME=DIR` and `--tablespace-map-all DIR` into oid →
/// directory. A tablespace that was inside the backed-up data directory (`source`) goes
/// to the same place inside the restored one, `pgdata` (absolute), unless mapped.
fn tablespace_locations(
    args: &RestoreArgs,
    meta: &BackupMeta,
    source: Option<&Path>,
    pgdata: &Path,
) -> Result<Vec<(u32, PathBuf)>> {
    let moved_along = |location: &Path| -> Option<PathBuf> {
        Some(pgdata.join(location.strip_prefix(source?).ok()?))
    };
    if let Some(all) = args
        .tablespace_map_all
        .as_deref()
        .filter(|d| !d.is_absolute())
    {
        bail!(
            "--tablespace-map-all {}: give an absolute directory (the server follows each tablespace's link from pg_tblspc)",
            all.display()
        );
    }
    let mut mapped: Vec<(u32, PathBuf)> = Vec::new();
    for mapping in &args.tablespace_map {
        let (key, dir) = mapping
            .split_once('=')
            .with_context(|| format!("--tablespace-map {mapping:?}: write OID=DIR"))?;
        if !Path::new(dir).is_absolute() {
            bail!("--tablespace-map {mapping:?}: give an absolute directory (the server follows the tablespace's link from pg_tblspc)");
        }
        let oid = meta
            .tablespaces
            .iter()
            .find(|t| t.name == key || t.oid.to_string() == key)
            .map(|t| t.oid)
            .with_context(|| {
                format!(
                    "--tablespace-map {mapping:?}: the backup has no tablespace {key:?} (it has {})",
                    meta.tablespaces
                        .iter()
                        .map(|t| format!("{} (oid {})", t.name, t.oid))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        mapped.push((oid, PathBuf::from(dir)));
    }
    (meta.tablespaces.iter())
        .map(|t| {
            // The last mapping of a tablespace wins.
            if let Some((_, dir)) = mapped.iter().rev().find(|(oid, _)| *oid == t.oid) {
                return Ok((t.oid, dir.clone()));
            }
            if let Some(all) = &args.tablespace_map_all {
                if !is_directory_name(&t.name) {
                    bail!(
                        "--tablespace-map-all: tablespace {:?} (oid {}) is not named like a directory: place it with --tablespace-map {}=DIR",
                        t.name,
                        t.oid,
                        t.oid
                    );
                }
                return Ok((t.oid, all.join(&t.name)));
            }
            let location = PathBuf::from(&t.location);
            Ok((t.oid, moved_along(&location).unwrap_or(location)))
        })
        .collect()
}

/// Runs the `restore_command` the restored server will run (fetching `segment` into
/// `pg_wal`, then removing it) as the data directory's owner, when the restore ran as
/// root and gave the files to another user: a config, passphrase file or repository
/// only root can read stops recovery at its first WAL file, with the reason in the
/// server's log only. `runuser` gives the owner its own groups, as the server has them.
/// The reason when it fails; `None` when it works or cannot be tried.
fn restore_command_problem(pgdata: &Path, restore_command: &str, segment: &str) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let owner = fs::metadata(pgdata).ok()?.uid();
    if owner == 0 {
        return None;
    }
    let user = nix::unistd::User::from_uid(owner.into()).ok().flatten()?;
    let probe = "pg_wal/pgvault-restore-command-check";
    let command = restore_command.replace("%f", segment).replace("%p", probe);
    let ran = std::process::Command::new("runuser")
        .args(["-u", &user.name, "--", "/bin/sh", "-c", &command])
        .current_dir(pgdata)
        .stdin(std::process::Stdio::null())
        .output();
    let _ = fs::remove_file(pgdata.join(probe));
    let out = match ran {
        Ok(out) => out,
        Err(e) => {
            tracing::debug!("cannot run runuser to try the restore_command: {e}");
            return None;
        }
    };
    if out.status.success() {
        return None;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message");
    Some(format!(
        "the restored server's restore_command fails when run as {name}, as the server will run it ({reason}): recovery would stop at its first WAL file; let {name} read what that names before starting the server",
        name = user.name
    ))
}

/// Whether `name` is one plain directory entry name: a quoted tablespace name may hold a
/// slash or be "..".
fn is_directory_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!((parts.next(), parts.next()),
        (Some(std::path::Component::Normal(part)), None) if part == name)
}

/// A repository with its read lock (see [`Context::read_lock`]), held from before the
/// backup is chosen until the restore has read it.
type LockedRepository = (Repository, Option<RepoLock>);

/// The first repository that opens and has a backup for the target (several are
/// configured when one may be lost).
fn open_with_backup(
    ctx: &Context,
    args: &RestoreArgs,
    target: &Target,
) -> Result<(LockedRepository, (Id, Snapshot, BackupMeta))> {
    let mut first_error = None;
    for name in ctx.repo_names() {
        let found = ctx.open_named(&name).and_then(|repo| {
            let lock = ctx.read_lock(&repo)?;
            let chosen = choose_backup(&repo, ctx, args, target)?;
            Ok(((repo, lock), chosen))
        });
        match found {
            Ok(found) => {
                if let Some(e) = &first_error {
                    tracing::warn!("restoring from repository {name}: the first one failed: {e:#}");
                }
                return Ok(found);
            }
            Err(e) if ctx.secondaries.is_empty() => return Err(e),
            Err(e) => {
                tracing::warn!("repository {name}: {e:#}");
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| anyhow::anyhow!("no repository configured")))
}

pub fn restore(ctx: &Context, args: &RestoreArgs) -> Result<()> {
    let started = Instant::now();
    let pgdata = ctx
        .pgdata
        .clone()
        .context("restore needs --pgdata DIR (or PGDATA, or pgdata in the cluster's config)")?;
    // Absolute: tablespace links and the directories created above it are named from it.
    let pgdata = std::path::absolute(&pgdata)
        .with_context(|| format!("--pgdata {}: cannot make it absolute", pgdata.display()))?;
    if pgdata.exists() && !pgdata.is_dir() {
        bail!(
            "--pgdata {} is not a directory: give the data directory's path",
            pgdata.display()
        );
    }
    refuse_if_in_use(&pgdata)?;
    // Held until the restore ends; a missing directory is locked once created, below.
    let target_lock = pgdata.is_dir().then(|| lock_target(&pgdata)).transpose()?;
    let overwrite = !is_empty_or_missing(&pgdata)?;
    if overwrite && !args.force && args.delta.is_none() {
        if fs::read_dir(&pgdata).is_ok_and(|entries| {
            let names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
            names == ["lost+found"]
        }) {
            bail!(
                "{} holds only lost+found: it is a mount point, which PostgreSQL advises against as a data directory (initdb refuses it); restore into a directory under it",
                pgdata.display()
            );
        }
        bail!(
            "{} is not empty: restore into an empty directory, or pass --delta (rewrite only what differs) or --force (delete its contents first)",
            pgdata.display()
        );
    }
    let target = target_of(args)?;
    let action = TargetAction::parse(&args.target_action).map_err(|e| anyhow::anyhow!(e))?;
    let hold = hold_duration(&args.hold)?;
    let extra_settings = (args.recovery_option.iter())
        .map(|text| {
            parse_extra_setting(text)
                .map_err(|e| anyhow::anyhow!("--recovery-option {text:?}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let ((repo, _lock), (id, snapshot, meta)) = open_with_backup(ctx, args, &target)?;
    let left_out = left_out_databases(args, &id, &meta)?;
    let owners = owner_map(meta.owner.as_ref())?;
    let source_pgdata = snapshot.paths.first().map(Path::new);
    let tablespaces = tablespace_locations(args, &meta, source_pgdata, &pgdata)?;
    // Created by the data directory's restore, which leaves their contents alone.
    let inside: Vec<PathBuf> = (tablespaces.iter())
        .filter_map(|(_, dir)| dir.strip_prefix(&pgdata).ok())
        .map(Path::to_path_buf)
        .collect();
    let is_inside = |dir: &Path| dir.starts_with(&pgdata);
    let kept_waldir = match (&args.waldir, overwrite) {
        (None, true) => linked_waldir(&pgdata)?,
        _ => None,
    };
    let waldir = args.waldir.as_deref().or(kept_waldir.as_deref());
    if let Some(dir) = waldir {
        let checked = check_waldir(dir, &pgdata, args);
        if kept_waldir.is_some() {
            checked.with_context(|| {
                format!(
                    "{}/pg_wal links to {}, which a restore over it keeps as --waldir",
                    pgdata.display(),
                    dir.display()
                )
            })?;
        } else {
            checked?;
        }
    }
    refuse_live_tablespaces(&tablespaces)?;
    let mut cleared = Vec::new();
    for (oid, dir) in tablespaces
        .iter()
        .filter(|(_, dir)| !(args.force && is_inside(dir)))
    {
        if !is_empty_or_missing(dir)? && args.delta.is_none() {
            if !args.force {
                bail!(
                    "tablespace {oid} would be restored into {}, which is not empty: empty it or map it elsewhere with --tablespace-map {oid}=DIR",
                    dir.display()
                );
            }
            cleared.push(dir.as_path());
        }
    }
    let top = Tree::load(&repo, &snapshot.tree)?;
    let pgdata_node = owners.apply(
        top.find("pgdata")
            .cloned()
            .context("backup has no pgdata tree")?,
    );
    let pgdata_tree = pgdata_node.subtree.context("pgdata is not a directory")?;
    let control_file = Path::new(pg::pgdata::CONTROL_FILE);
    let control = owners.apply(
        find_path(&repo, &pgdata_tree, control_file)?
            .with_context(|| format!("backup {} has no {}", id.short(), control_file.display()))?,
    );
    match control_file_problem(&repo, &control) {
        Ok(Some(problem)) => bail!(
            "backup {}: {problem}: restore another one (--backup ID)",
            id.short()
        ),
        Ok(None) => {}
        // Data that cannot be read fails the restore where it is needed, which says
        // what state it leaves the data directory in.
        Err(e) => tracing::debug!("reading the backup's control file: {e:#}"),
    }
    let tablespace_nodes = tablespace_nodes(&repo, &top, &tablespaces, &left_out)?;
    let config = match &args.config_to {
        Some(dir) => config_files::plan(&repo, &top, dir, args.force || args.delta.is_some())?,
        None => Vec::new(),
    };
    let pgdata_holes: Vec<PathBuf> = (left_out.iter())
        .map(|database| database_dir(database.oid))
        .collect();
    // --delta rewrites in place; --force frees what it deletes first.
    if args.delta.is_none() && !args.force {
        let pgdata_root = (pgdata.as_path(), &pgdata_tree, pgdata_holes.as_slice());
        check_room(&repo, &snapshot, pgdata_root, &tablespace_nodes)?;
    }
    // Nothing is changed before every check has passed. The hold comes first: an expire
    // run while this restore writes (it takes a shared lock, as the restore does) may
    // delete WAL too. A restore that fails leaves it for the one run again.
    let held_until = hold.and_then(|hold| hold_backup(ctx, &repo, &id, &pgdata, hold));
    if overwrite {
        make_unstartable(&pgdata)?;
        if args.force {
            clear_directory(&pgdata)?;
        }
    }
    for dir in cleared.into_iter().chain(waldir.filter(|dir| dir.exists())) {
        clear_directory(dir)?;
    }
    // Here rather than as the restore writes: a directory that cannot be created gets its
    // own error, not one saying a restore that wrote nothing is incomplete.
    let missing = std::iter::once(pgdata.as_path())
        .chain((tablespaces.iter().map(|(_, dir)| dir.as_path())).filter(|dir| !is_inside(dir)))
        .filter(|dir| !dir.exists());
    for dir in missing {
        let created: Vec<&Path> = dir.ancestors().take_while(|a| !a.exists()).collect();
        fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create {}: create it for the user that runs PostgreSQL, or restore as a user that can",
                dir.display()
            )
        })?;
        // The restore's syncs cover what is inside; the new names need their parents'.
        for parent in created.iter().filter_map(|a| a.parent()) {
            fsync_dir(parent).with_context(|| format!("cannot sync {}", parent.display()))?;
        }
    }
    let _target_lock = match target_lock {
        Some(lock) => lock,
        None => {
            let lock = lock_target(&pgdata)?;
            // Another restore may have created it first, written into it and ended.
            if !is_empty_or_missing(&pgdata)? {
                bail!(
                    "{} is no longer empty: another restore wrote into it meanwhile; this one restored nothing",
                    pgdata.display()
                );
            }
            lock
        }
    };

    let sync = args.sync_method;
    // Judged against the backup's start, as the next backup would judge them.
    let delta = args.delta.map(|mode| match mode {
        DeltaMode::Time => DeltaCheck::SizeAndTime(meta.start_time),
        DeltaMode::Checksum => DeltaCheck::Content,
    });
    let mut kept = DeltaStats::default();
    let mut holes = 0;
    let bar = progress_bar(
        ctx,
        0,
        if delta.is_some() {
            "delta restore"
        } else {
            "restore"
        },
    );
    if let Some(bar) = &bar {
        // The data directory's and every tablespace's files: known without reading trees.
        bar.set_length(snapshot.summary.bytes);
    }
    let advance = |bytes: u64| {
        if let Some(bar) = &bar {
            bar.inc(bytes);
        }
    };
    // Files and bytes written into `dir` from `tree`.
    let mut restore_into = |tree: &Id,
                            dir: &Path,
                            held_back,
                            hole_dirs: &[PathBuf],
                            left_alone: &[PathBuf]|
     -> repo::Result<(u64, u64)> {
        let options = RestoreOptions {
            held_back,
            holes: hole_dirs,
            left_alone,
            owners,
            progress: Some(Progress(&advance)),
            ..RestoreOptions::new(ctx.jobs, sync)
        };
        Ok(match delta {
            Some(check) => {
                let stats = restore_tree_delta(&repo, tree, dir, check, options)?;
                kept.add(&stats);
                holes += stats.holes;
                (stats.files_written, stats.bytes_written)
            }
            None => {
                let stats = restore_tree(&repo, tree, dir, options)?;
                holes += stats.holes;
                (stats.files - stats.holes, stats.bytes)
            }
        })
    };
    let incomplete = || {
        format!(
            "restoring into {}; the data directory is incomplete and cannot be started (it has no {}): run the restore again, with --delta to keep what was written",
            pgdata.display(),
            control_file.display()
        )
    };
    let (mut total_files, mut total_bytes) = restore_into(
        &pgdata_tree,
        &pgdata,
        Some(control_file),
        &pgdata_holes,
        &inside,
    )
    .with_context(incomplete)?;
    apply_root_metadata(&pgdata, &pgdata_node)?;
    if !tablespace_nodes.is_empty() {
        for TablespaceNode {
            oid,
            dir,
            node,
            tree,
            holes: hole_dirs,
        } in &tablespace_nodes
        {
            let (files, bytes) = restore_into(tree, dir, None, hole_dirs, &[])
                .with_context(|| format!("restoring tablespace {oid} into {}", dir.display()))
                .with_context(incomplete)?;
            apply_root_metadata(dir, &owners.apply(node.clone()))?;
            total_bytes += bytes;
            total_files += files;
            let link = pgdata.join("pg_tblspc").join(oid.to_string());
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(dir, &link)
                .with_context(|| format!("cannot link {} to {}", link.display(), dir.display()))?;
            let owner = fs::metadata(dir)?;
            std::os::unix::fs::lchown(&link, Some(owner.uid()), Some(owner.gid()))?;
        }
        // The links replaced the ones restored (and synced) with pg_tblspc.
        fsync_dir(&pgdata.join("pg_tblspc"))?;
    }

    if let Some(dir) = waldir {
        link_waldir(&pgdata, dir).with_context(incomplete)?;
    }
    write_server_file(&pgdata, "backup_label", meta.backup_label.as_bytes())?;
    let restore_command = format!("{} archive-get %f \"%p\"", command_prefix(ctx)?);
    let options = RecoveryOptions {
        restore_command: restore_command.clone(),
        target: target.clone(),
        exclusive: args.target_exclusive,
        timeline: args.target_timeline.clone(),
        action,
        standby: args.standby,
        primary_conninfo: args.primary_conn.clone(),
        primary_slot_name: args.primary_slot.clone(),
    };
    let (mut settings, signal) =
        configuration(meta.pg_version / 10000, &options).map_err(|e| anyhow::anyhow!(e))?;
    if args.archive_mode == "off" {
        settings.push(("archive_mode".into(), "off".into()));
    }
    let settings = with_extra_settings(settings, &extra_settings);
    let auto_conf = fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap_or_default();
    write_server_file(
        &pgdata,
        "postgresql.auto.conf",
        rewrite_auto_conf(&auto_conf, &settings).as_bytes(),
    )?;
    write_server_file(&pgdata, signal, b"")?;
    if let Some(dir) = &args.config_to {
        config_files::write(dir, &config, owners).with_context(incomplete)?;
    }
    // Last: until it is there the directory cannot be started, half restored.
    restore_file_last(&repo, &control, &pgdata.join(control_file), sync)
        .with_context(incomplete)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let own_restore_command = extra_settings
        .iter()
        .any(|(name, _)| name == "restore_command");
    if !own_restore_command {
        if let Some(problem) = restore_command_problem(&pgdata, &restore_command, &meta.start_wal) {
            note!(ctx, "warning: {problem}");
        }
    }

    let seconds = started.elapsed().as_secs_f64();
    let left_out_names: Vec<&str> = left_out.iter().map(|d| d.name.as_str()).collect();
    if ctx.json() {
        return print_json(&json!({
            "backup": id,
            "pgdata": pgdata,
            "target": target.to_string(),
            "signal": signal,
            "files": total_files,
            "size_bytes": total_bytes,
            "delta": delta.map(|_| json!({
                "files_kept": kept.files_kept,
                "files_rewritten": kept.files_written,
                "removed": kept.removed,
            })),
            "left_out_databases": left_out_names,
            "holes": holes,
            "waldir": waldir,
            "config_files": config.iter().map(|p| p.target()).collect::<Vec<_>>(),
            "held_until": held_until.map(|t| t.to_rfc3339()),
            "duration_ms": (seconds * 1000.0) as u64,
        }));
    }
    if delta.is_some() {
        note!(
            ctx,
            "delta: {} files already matched the backup, {} rewritten, {} entries removed",
            kept.files_kept,
            kept.files_written,
            kept.removed
        );
    }
    if let Some(dir) = &kept_waldir {
        note!(
            ctx,
            "pg_wal: kept as a link to {} (emptied), as it was; --waldir DIR moves it",
            dir.display()
        );
    }
    match &args.config_to {
        Some(dir) => {
            note!(
                ctx,
                "configuration: {} file{} of the backup written under {}",
                config.len(),
                if config.len() == 1 { "" } else { "s" },
                dir.display()
            );
            for (setting, value, now) in
                config_files::stale_places(&config, &meta.config_files, dir, &pgdata)
            {
                note!(ctx,
                    "warning: the restored configuration sets {setting} = '{value}', but this restore put it at {}: change it before starting a server with that configuration",
                    now.display()
                );
            }
            for (link, copy) in config_files::unlinked(&meta.config_files, &pgdata, Some(dir)) {
                note!(ctx,
                    "warning: {} is a link that does not lead to {}, where this restore wrote the file it led to: point it there before starting the server",
                    link.display(),
                    copy.display()
                );
            }
        }
        None if !meta.config_files.is_empty() => {
            let paths: Vec<&str> = meta.config_files.iter().map(|f| f.path.as_str()).collect();
            note!(ctx,
                "configuration: the backup also holds {} (outside the data directory), not restored: the server uses what is at those paths on this host; --config-to / puts the backup's back there, --config-to DIR under DIR",
                paths.join(", ")
            );
            for (link, copy) in config_files::unlinked(&meta.config_files, &pgdata, None) {
                note!(ctx,
                    "warning: {} is a link that leads to no file on this host; the backup holds the file it led to, {}: --config-to / puts it back there",
                    link.display(),
                    copy.display()
                );
            }
        }
        None => {}
    }
    if !left_out.is_empty() {
        note!(ctx,
            "left out: database{} {} ({holes} files restored as empty holes); once the server is up, DROP DATABASE {}: connecting to {} fails",
            if left_out.len() == 1 { "" } else { "s" },
            left_out_names.join(", "),
            if left_out.len() == 1 { "it" } else { "each" },
            if left_out.len() == 1 { "it" } else { "them" },
        );
    }
    if let Some(until) = held_until {
        note!(ctx,
            "expire keeps backup {} and its WAL until {} for this server's recovery (--hold); `pgvault backup unpin {}` ends that sooner",
            id.short(),
            until.format("%Y-%m-%d %H:%M:%S UTC"),
            id.short()
        );
    }
    note!(ctx,
        "restored backup {} ({} in {} files) into {} in {:.1}s; start the server to recover to {target} ({signal})",
        &id.to_hex()[..12],
        bytes(total_bytes),
        total_files,
        pgdata.display(),
        seconds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tablespace_names_that_are_not_directory_names() {
        for name in ["far", "ts 2", "Überall", ".hidden", "a..b"] {
            assert!(is_directory_name(name), "{name}");
        }
        for name in ["", ".", "..", "a/b", "/abs", "a/", "../up"] {
            assert!(!is_directory_name(name), "{name}");
        }
    }

    #[test]
    fn owners_are_mapped_by_name_to_this_hosts_ids() {
        let owner = |uid, gid, user: Option<&str>, group: Option<&str>| Owner {
            uid,
            gid,
            user: user.map(str::to_owned),
            group: group.map(str::to_owned),
        };
        // root is 0 on every host: numbered otherwise where the backup was taken.
        let map = local_ids(&owner(4242, 4343, Some("root"), Some("root"))).expect("map");
        assert_eq!((map.uid, map.gid), (Some((4242, 0)), Some((4343, 0))));
        let map = local_ids(&owner(0, 0, Some("root"), Some("root"))).expect("map");
        assert_eq!(map, OwnerMap::default());
        // No names recorded (that host's user database had none): ids kept.
        let map = local_ids(&owner(4242, 4343, None, None)).expect("map");
        assert_eq!(map, OwnerMap::default());
        for (user, group, says) in [
            ("no-such-user-pgvault", "root", "user no-such-user-pgvault"),
            (
                "root",
                "no-such-group-pgvault",
                "group no-such-group-pgvault",
            ),
        ] {
            let err = local_ids(&owner(4242, 4343, Some(user), Some(group)))
                .expect_err(says)
                .to_string();
            assert!(
                err.contains(&format!(
                    "belong to {says}, which does not exist on this host"
                )) && err.contains("run the restore as the user that will run PostgreSQL"),
                "{err}"
            );
        }
    }

    #[test]
    fn target_times_need_a_zone() {
        let a = parse_target_time("2026-11-25 01:30:00+00").expect("time");
        let b = parse_target_time("2026-11-25T02:30:00.5+01:00").expect("time");
        assert_eq!((b - a).num_milliseconds(), 500);
        for same in [
            "2026-11-25 01:30:00Z",
            "2026-11-25T01:30:00Z",
            "2026-11-25 01:30:00 +00:00",
            "2026-11-25 01:30:00 UTC",
            "2026-11-25 01:30:00 gmt",
            "2026-11-25 02:30:00 Europe/Berlin",
            " 2026-11-25T10:30:00 Asia/Tokyo ",
        ] {
            assert_eq!(parse_target_time(same).expect(same), a, "{same}");
        }
        // Summer time in Berlin is +02.
        let summer = parse_target_time("2026-07-01 02:30:00 Europe/Berlin").expect("summer");
        assert_eq!(summer.to_rfc3339(), "2026-07-01T00:30:00+00:00");
        for (bad, says) in [
            ("2026-11-25 01:30:00", "has no time zone"),
            ("2026-11-25T01:30:00", "has no time zone"),
            ("yesterday", "is not a date and time"),
            ("2026-13-25 01:30:00+00", "is not a date and time"),
            (
                "2026-11-25 01:30:00 Mars/Olympus",
                "unknown time zone \"Mars/Olympus\"",
            ),
            (
                "2026-10-25 02:30:00 Europe/Berlin",
                "happens twice in Europe/Berlin",
            ),
            (
                "2026-03-29 02:30:00 Europe/Berlin",
                "does not exist in Europe/Berlin",
            ),
        ] {
            let message = parse_target_time(bad).expect_err(bad).to_string();
            assert!(message.contains(says), "{bad}: {message}");
        }
        let message = parse_target_time("2026-10-25 02:30:00 Europe/Berlin")
            .expect_err("ambiguous")
            .to_string();
        assert!(
            message.contains("\"2026-10-25 02:30:00+02:00\" or \"2026-10-25 02:30:00+01:00\""),
            "{message}"
        );
    }
}
