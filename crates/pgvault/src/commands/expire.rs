//! `pgvault expire`: retention. Removes the backups no rule keeps (see
//! [`crate::retention`]), then the WAL no retained backup needs, then runs gc.
//!
//! Safe against a concurrent backup and archive-push: only snapshots that existed when
//! the plan was made can be removed, WAL is removed only below the start of the oldest
//! retained backup (anything a newer backup or the archiver writes is above it), and gc
//! takes the exclusive lock, so it waits its turn (or is postponed) while a backup is
//! writing packs. History files are never removed: they are tiny and every later
//! timeline needs them.
//!
//! `pgvault cluster remove NAME`: everything of a retired cluster, registration last, so
//! that an interrupted run is finished by running it again.

use anyhow::{bail, Context as _, Result};
use chrono::Utc;
use chrono_tz::Tz;
use repo::lock::LockKind;
use repo::repository::ObjectKind;
use repo::{Id, RepoError, Repository};
use serde_json::json;

use super::catalog::{holds, pin_name, BackupState, ClusterState, Hold, HoldRecord};
use crate::cli::{ClusterRemoveArgs, ExpireArgs};
use crate::context::Context;
use crate::output::{bytes, print_json};
use crate::retention::{describe_duration, parse_duration, plan, Candidate, Policy};

fn policy(ctx: &Context, args: &ExpireArgs) -> Result<Policy> {
    let config = ctx.cluster_section.retention.clone().unwrap_or_default();
    let window = match args
        .recovery_window
        .as_ref()
        .or(config.recovery_window.as_ref())
    {
        Some(text) => {
            Some(parse_duration(text).map_err(|e| anyhow::anyhow!("--recovery-window: {e}"))?)
        }
        None => None,
    };
    let zone_name = args
        .time_zone
        .clone()
        .or(config.time_zone)
        .unwrap_or_else(|| "UTC".into());
    let zone: Tz = zone_name.parse().map_err(|_| {
        anyhow::anyhow!(
            "--time-zone {zone_name:?} is not a time zone name: use an IANA name such as UTC or Europe/Berlin"
        )
    })?;
    let zero = |rule: &str, n: Option<u32>| -> Result<Option<u32>> {
        if n == Some(0) {
            bail!("retention {rule} = 0 in the config would expire every backup: use at least 1, or remove the setting");
        }
        Ok(n)
    };
    let policy = Policy {
        keep_last: zero("keep-last", args.keep_last.or(config.keep_last))?,
        keep_daily: zero("keep-daily", args.keep_daily.or(config.keep_daily))?,
        keep_weekly: zero("keep-weekly", args.keep_weekly.or(config.keep_weekly))?,
        keep_monthly: zero("keep-monthly", args.keep_monthly.or(config.keep_monthly))?,
        recovery_window: window,
        zone,
    };
    if policy.is_empty() {
        bail!(
            "no retention policy for cluster {:?}: pass --keep-last, --keep-daily/weekly/monthly or --recovery-window, or set them in [clusters.{}.retention]",
            ctx.cluster,
            ctx.cluster
        );
    }
    Ok(policy)
}

pub fn expire(ctx: &Context, args: &ExpireArgs) -> Result<()> {
    let policy = policy(ctx, args)?;
    let repo = ctx.open()?;
    let lock = ctx.lock(&repo, LockKind::Shared)?;
    let state = ClusterState::load(&repo, &ctx.cluster)?.with_context(|| {
        format!(
            "cluster {:?} is not set up in repository {}",
            ctx.cluster,
            repo.location()
        )
    })?;
    let candidates: Vec<Candidate> = state
        .backups
        .iter()
        .map(|b| Candidate {
            time: b.meta.stop_time,
            pinned: b.pinned,
        })
        .collect();
    let now = Utc::now();
    let mut reasons = plan(&candidates, &policy, now);
    for (backup, reasons) in state.backups.iter().zip(&mut reasons) {
        if let Some(until) = backup.held_until {
            reasons.push(describe_hold(&repo, &state.holds, backup, until));
        }
    }
    // Ended holds, and holds on backups no longer there, hold nothing.
    let present: Vec<String> = state.backups.iter().map(|b| b.id.to_hex()).collect();
    let ended_holds: Vec<&Hold> = (state.holds.iter())
        .filter(|h| h.until <= now || !present.contains(&h.backup))
        .collect();
    let (kept, expired): (Vec<(&BackupState, &Vec<String>)>, Vec<_>) = state
        .backups
        .iter()
        .zip(&reasons)
        .partition(|(_, r)| !r.is_empty());
    // Dumps follow the same policy, on their own: a dump is kept by the rules as if
    // only dumps existed (pins apply to both).
    let dumps = super::dump::list_dumps(&repo, &ctx.cluster)?;
    let pins = super::catalog::pinned(&repo, &ctx.cluster)?;
    let dump_candidates: Vec<Candidate> = dumps
        .iter()
        .map(|(id, _, m)| Candidate {
            time: m.stop_time,
            pinned: pins.contains(&id.to_hex()),
        })
        .collect();
    let dump_reasons = plan(&dump_candidates, &policy, now);
    let expired_dumps: Vec<_> = dumps
        .iter()
        .zip(&dump_reasons)
        .filter(|(_, r)| r.is_empty())
        .map(|((id, _, m), _)| (*id, m.stop_time))
        .collect();

    // WAL below the oldest retained backup's start is needed by nobody. With no backup
    // left at all, keep the WAL: it may be all an operator has.
    let wal_floor = kept
        .iter()
        .map(|(b, _)| Ok(b.meta.start_lsn()?.segno(state.wal.segment_size)))
        .collect::<Result<Vec<u64>>>()?
        .into_iter()
        .min();
    let wal_doomed: Vec<_> = match wal_floor {
        Some(floor) => state
            .wal
            .files
            .iter()
            .filter(|f| !f.name.is_history())
            .filter(|f| {
                f.name
                    .segno(state.wal.segment_size)
                    .is_some_and(|s| s < floor)
            })
            .collect(),
        None => Vec::new(),
    };
    let wal_bytes: u64 = wal_doomed.iter().map(|f| f.size).sum();

    let report = json!({
        "cluster": ctx.cluster,
        "dry_run": args.dry_run,
        "policy": {
            "keep_last": policy.keep_last, "keep_daily": policy.keep_daily,
            "keep_weekly": policy.keep_weekly, "keep_monthly": policy.keep_monthly,
            "recovery_window": policy.recovery_window.map(describe_duration),
            "time_zone": policy.zone.name(),
        },
        "kept": kept.iter().map(|(b, r)| json!({"id": b.id, "stop_time": b.meta.stop_time, "reasons": r})).collect::<Vec<_>>(),
        "expired": expired.iter().map(|(b, _)| json!({"id": b.id, "stop_time": b.meta.stop_time,
            "reason": "no retention rule keeps it"})).collect::<Vec<_>>(),
        "holds_ended": ended_holds.len(),
        "dumps_kept": dumps.len() - expired_dumps.len(),
        "dumps_expired": expired_dumps.iter().map(|(id, t)| json!({"id": id, "time": t})).collect::<Vec<_>>(),
        "wal_expired": {
            "files": wal_doomed.len(),
            "bytes": wal_bytes,
            "first": wal_doomed.first().map(|f| f.name.to_string()),
            "last": wal_doomed.last().map(|f| f.name.to_string()),
            "reason": "before the start of the oldest retained backup",
        },
    });
    if !ctx.json() {
        for (b, r) in &kept {
            println!(
                "keep    {}  {}  {}",
                b.id.short(),
                b.meta.stop_time.format("%Y-%m-%d %H:%M:%S UTC"),
                r.join("; ")
            );
        }
        for (b, _) in &expired {
            println!(
                "{} {}  {}  no retention rule keeps it",
                if args.dry_run {
                    "would expire"
                } else {
                    "expire "
                },
                b.id.short(),
                b.meta.stop_time.format("%Y-%m-%d %H:%M:%S UTC"),
            );
        }
        for (id, time) in &expired_dumps {
            println!(
                "{} dump {}  {}  no retention rule keeps it",
                if args.dry_run {
                    "would expire"
                } else {
                    "expire "
                },
                id.short(),
                time.format("%Y-%m-%d %H:%M:%S UTC"),
            );
        }
        if let (Some(first), Some(last)) = (wal_doomed.first(), wal_doomed.last()) {
            println!(
                "{} WAL {} … {} ({} files, {}): before the oldest retained backup",
                if args.dry_run {
                    "would expire"
                } else {
                    "expire "
                },
                first.name,
                last.name,
                wal_doomed.len(),
                bytes(wal_bytes)
            );
        }
    }
    if args.dry_run {
        if ctx.json() {
            print_json(&report)?;
        }
        return Ok(());
    }
    // A restore that chose one of these backups since the plan was made holds it now.
    let doomed: Vec<String> = expired.iter().map(|(b, _)| b.id.to_hex()).collect();
    let checked = Utc::now();
    if let Some(hold) = (holds(&repo, &ctx.cluster)?.into_iter())
        .find(|h| h.until > checked && doomed.contains(&h.backup))
    {
        bail!(
            "backup {} began to be restored while expire planned (a restore's hold appeared): nothing was removed; run expire again",
            &hold.backup[..12]
        );
    }
    for id in expired
        .iter()
        .map(|(b, _)| b.id)
        .chain(expired_dumps.iter().map(|(id, _)| *id))
    {
        lock.ensure_held()?;
        repo.storage()
            .delete(&format!("{}/{}", ObjectKind::Snapshot.dir(), id))?;
    }
    let deleted_wal = repo_delete_all(&repo, wal_doomed.iter().map(|f| f.key.as_str()), ctx.jobs)?;
    repo_delete_all(&repo, ended_holds.iter().map(|h| h.name.as_str()), ctx.jobs)?;
    drop(lock);

    let gc = if args.no_gc || (expired.is_empty() && expired_dumps.is_empty()) {
        json!(null)
    } else {
        gc_after_removal(ctx, &repo)?
    };
    if ctx.json() {
        let mut report = report;
        report["gc"] = gc;
        report["wal_expired"]["deleted"] = json!(deleted_wal);
        return print_json(&report);
    }
    if let Some(freed) = gc["bytes_freed"].as_u64() {
        println!("gc: freed about {}", bytes(freed));
    }
    Ok(())
}

/// Why a hold keeps `backup`: whose restore, until when (the latest of its holds).
fn describe_hold(
    repo: &Repository,
    holds: &[Hold],
    backup: &BackupState,
    until: chrono::DateTime<Utc>,
) -> String {
    let until_text = until.format("%Y-%m-%d %H:%M:%S UTC");
    let hex = backup.id.to_hex();
    let record = (holds.iter())
        .find(|h| h.backup == hex && h.until == until)
        .and_then(|h| repo.find_file(&h.name).ok().flatten())
        .and_then(|file| serde_json::from_slice::<HoldRecord>(&file.data).ok());
    match record {
        Some(r) => format!(
            "held until {until_text} for the restore into {}:{} (its WAL is what that server's recovery fetches)",
            r.host, r.restored_into
        ),
        None => format!("held until {until_text} for a restore"),
    }
}

/// A cluster that archived or backed up more recently than this may still be in use:
/// removing it needs `--force`.
const RETIRED_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// `pgvault cluster remove NAME`.
pub fn remove_cluster(ctx: &Context, args: &ClusterRemoveArgs) -> Result<()> {
    let name = &args.name;
    let repo = ctx.open()?;
    let lock = ctx.lock(&repo, LockKind::Shared)?;
    let registered = super::archive::find_identity(&repo, name)?.is_some();
    let backups = super::backup::list_backups(&repo, name)?;
    let dumps = super::dump::list_dumps(&repo, name)?;
    let wal = repo.list_files(&format!("wal/{name}/"))?;
    let mut others = Vec::new();
    for prefix in ["pins", "holds", "jobs"] {
        others.extend(repo.list_files(&format!("{prefix}/{name}/"))?);
    }
    if !registered && backups.is_empty() && dumps.is_empty() && wal.is_empty() {
        bail!(
            "no cluster {name:?} in repository {}: `pgvault info` lists its clusters",
            repo.location()
        );
    }

    let now = Utc::now();
    let mut in_use = Vec::new();
    let last_push = wal.iter().filter_map(|f| f.modified).max();
    if let Some(time) = last_push.filter(|t| now - *t < RETIRED_AFTER) {
        in_use.push(format!(
            "it archived WAL at {}",
            time.format("%Y-%m-%d %H:%M UTC")
        ));
    }
    if let Some(time) = (backups.iter().map(|(_, _, m)| m.stop_time))
        .chain(dumps.iter().map(|(_, _, m)| m.stop_time))
        .max()
        .filter(|t| now - *t < RETIRED_AFTER)
    {
        in_use.push(format!(
            "its last backup or dump ended at {}",
            time.format("%Y-%m-%d %H:%M UTC")
        ));
    }
    let pins = super::catalog::pinned(&repo, name)?;
    if !pins.is_empty() {
        in_use.push(format!(
            "{} pinned backup(s) or dump(s) (`pgvault --cluster {name} backup unpin ID`)",
            pins.len()
        ));
    }
    if let Some(hold) = holds(&repo, name)?
        .iter()
        .filter(|h| h.until > now)
        .max_by_key(|h| h.until)
    {
        in_use.push(format!(
            "backup {} is held until {} for a restore that may still be recovering from it",
            &hold.backup[..12.min(hold.backup.len())],
            hold.until.format("%Y-%m-%d %H:%M UTC")
        ));
    }
    if !in_use.is_empty() && !args.force && !args.dry_run {
        bail!(
            "cluster {name:?} may still be in use: {}; nothing was removed. Stop its archiving first, or add --force",
            in_use.join("; ")
        );
    }
    let wal_bytes: u64 = wal.iter().map(|f| f.size).sum();
    let report = json!({
        "cluster": name,
        "dry_run": args.dry_run,
        "backups": backups.iter().map(|(id, _, _)| id).collect::<Vec<_>>(),
        "dumps": dumps.iter().map(|(id, _, _)| id).collect::<Vec<_>>(),
        "wal_files": wal.len(),
        "wal_bytes": wal_bytes,
        "other_files": others.len(),
        "registered": registered,
        "in_use": in_use,
    });
    if !ctx.json() {
        println!(
            "{} cluster {name} from {}: {} backup(s), {} dump(s), {} WAL files ({}), {} pin/hold/job file(s){}",
            if args.dry_run { "would remove" } else { "removing" },
            repo.location(),
            backups.len(),
            dumps.len(),
            wal.len(),
            bytes(wal_bytes),
            others.len(),
            if registered { ", its registration" } else { "" }
        );
        if args.dry_run {
            for reason in &in_use {
                println!("needs --force: {reason}");
            }
        }
    }
    if args.dry_run {
        if ctx.json() {
            print_json(&report)?;
        }
        return Ok(());
    }
    for id in (backups.iter().map(|(id, _, _)| id)).chain(dumps.iter().map(|(id, _, _)| id)) {
        lock.ensure_held()?;
        repo.storage()
            .delete(&format!("{}/{}", ObjectKind::Snapshot.dir(), id))?;
    }
    lock.ensure_held()?;
    repo_delete_all(
        &repo,
        wal.iter().chain(&others).map(|f| f.key.as_str()),
        ctx.jobs,
    )?;
    if registered {
        lock.ensure_held()?;
        super::archive::unregister(&repo, name)?;
    }
    drop(lock);
    let gc = if args.no_gc || (backups.is_empty() && dumps.is_empty()) {
        json!(null)
    } else {
        gc_after_removal(ctx, &repo)?
    };
    if ctx.json() {
        let mut report = report;
        report["gc"] = gc;
        return print_json(&report);
    }
    if let Some(freed) = gc["bytes_freed"].as_u64() {
        println!("gc: freed about {}", bytes(freed));
    }
    Ok(())
}

/// gc after removing snapshots, for the JSON report; postponed (with a warning) rather
/// than failed while another process holds the repository.
fn gc_after_removal(ctx: &Context, repo: &Repository) -> Result<serde_json::Value> {
    match super::admin::run_gc(ctx, repo) {
        Ok(result) => Ok(json!({"packs_deleted": result.packs_deleted,
                                "bytes_freed": result.plan.bytes_freed_estimate})),
        Err(e)
            if matches!(
                e.downcast_ref::<RepoError>(),
                Some(RepoError::Locked { .. })
            ) =>
        {
            tracing::warn!("gc postponed, the repository is in use: {e:#}; run `pgvault gc` later");
            Ok(json!({"postponed": format!("{e:#}")}))
        }
        Err(e) => Err(e),
    }
}

/// Deletes named files in parallel; returns how many.
fn repo_delete_all<'a>(
    repo: &Repository,
    names: impl Iterator<Item = &'a str>,
    jobs: usize,
) -> Result<usize> {
    let names: Vec<String> = names.map(str::to_string).collect();
    let count = names.len();
    repo::parallel::map(names, jobs.max(1), |name| repo.delete_file(&name))?;
    Ok(count)
}

/// `pgvault backup pin|unpin ID`.
pub fn pin(ctx: &Context, spec: &str, pin: bool) -> Result<()> {
    let repo = ctx.open()?;
    let backups = super::backup::list_backups(&repo, &ctx.cluster)?;
    // Dumps can be pinned too: one namespace of snapshot ids.
    let dumps = super::dump::list_dumps(&repo, &ctx.cluster)?;
    let id = if spec == "latest" {
        backups.last().map(|(id, _, _)| *id)
    } else {
        let wanted = spec.to_lowercase();
        let matches: Vec<Id> = backups
            .iter()
            .map(|(id, _, _)| *id)
            .chain(dumps.iter().map(|(id, _, _)| *id))
            .filter(|id| id.to_hex().starts_with(&wanted))
            .collect();
        if matches.len() > 1 {
            bail!("backup id prefix {spec:?} is ambiguous: give more characters");
        }
        matches.first().copied()
    }
    .with_context(|| {
        format!(
            "no backup or dump {spec:?} of cluster {:?} in {}: see `pgvault info`",
            ctx.cluster,
            repo.location()
        )
    })?;
    let name = pin_name(&ctx.cluster, &id);
    // Unpinning says "expire may take it": restores' holds on it end too.
    let mut released = Vec::new();
    if pin {
        repo.store_file(&name, Utc::now().to_rfc3339().as_bytes())?;
    } else {
        repo.delete_file(&name)?;
        let hex = id.to_hex();
        released = (holds(&repo, &ctx.cluster)?.into_iter())
            .filter(|h| h.backup == hex)
            .collect();
        repo_delete_all(&repo, released.iter().map(|h| h.name.as_str()), ctx.jobs)?;
    }
    if ctx.json() {
        return print_json(&json!({"id": id, "pinned": pin, "holds_released": released.len()}));
    }
    let state = match (pin, released.len()) {
        (true, _) => "pinned: expire keeps it until `pgvault backup unpin`".to_string(),
        (false, 0) => "unpinned".to_string(),
        (false, n) => format!(
            "unpinned, and {n} restore hold{} on it released: expire may remove it",
            if n == 1 { "" } else { "s" }
        ),
    };
    println!("backup {} {state}", id.short());
    Ok(())
}
