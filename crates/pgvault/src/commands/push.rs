//! `archive-push`: PostgreSQL's `archive_command`, synchronous or async.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use pg::wal::WalFileName;
use serde_json::json;

use super::archive::{
    load_identity, push_file, spawn_worker, wait_for, write_atomically, Pushed, Spool, WorkerLock,
};
use crate::cli::ArchivePushArgs;
use crate::context::Context;
use crate::output::{bytes, print_json};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The worker exits after this long with nothing to push; the next push restarts it.
const WORKER_IDLE_EXIT: Duration = Duration::from_secs(10);

pub fn archive_push(ctx: &Context, args: &ArchivePushArgs) -> Result<()> {
    let path = absolute(&args.path)?;
    let asynchronous = args.r#async || ctx.cluster_section.archive_async.unwrap_or(false);
    // The worker only sees files PostgreSQL marked `.ready`; anything else (a manual
    // push, a copy outside pg_wal) is pushed right here.
    let marked_ready = ready_marker(&path).is_some_and(|marker| marker.exists());
    if asynchronous && !args.no_async && marked_ready {
        return push_async(ctx, &path);
    }
    let started = Instant::now();
    let repo = std::sync::Arc::new(ctx.open()?);
    let identity = load_identity(&repo, &ctx.cluster)?;
    let (wal, outcome) = push_file(&repo, &identity, &path)?;
    super::copy::push_to_secondaries(ctx, &repo, std::slice::from_ref(&wal));
    let elapsed = started.elapsed();
    if ctx.json() {
        return print_json(&json!({
            "file": wal.to_string(),
            "created": matches!(outcome, Pushed::Created { .. }),
            "stored_bytes": match outcome { Pushed::Created { stored_bytes } => stored_bytes, Pushed::AlreadyThere => 0 },
            "duration_ms": elapsed.as_millis() as u64,
        }));
    }
    match outcome {
        Pushed::Created { stored_bytes } => tracing::info!(
            "archived {wal} ({} stored) in {:.0?}",
            bytes(stored_bytes),
            elapsed
        ),
        Pushed::AlreadyThere => {
            tracing::warn!("{wal} was already archived with identical content; nothing to do")
        }
    }
    Ok(())
}

/// `pg_wal/archive_status/<name>.ready` for `pg_wal/<name>`.
fn ready_marker(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    Some(
        path.parent()?
            .join("archive_status")
            .join(format!("{name}.ready")),
    )
}

fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("cannot read the working directory")?
        .join(path))
}

fn archive_timeout(ctx: &Context) -> Result<Duration> {
    match &ctx.cluster_section.archive_timeout {
        Some(text) => super::archive::parse_duration(text, "archive-timeout"),
        None => Ok(DEFAULT_TIMEOUT),
    }
}

/// Answers PostgreSQL from the worker's status files, starting the worker if needed.
fn push_async(ctx: &Context, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} is not a WAL file path", path.display()))?
        .to_string();
    WalFileName::parse(&name).with_context(|| {
        format!(
            "{} is not a WAL segment, .partial, .backup or .history file",
            path.display()
        )
    })?;
    let pg_wal = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    let spool = Spool::new(ctx);
    let timeout = archive_timeout(ctx)?;
    let mut started_worker = false;
    let answer = wait_for(timeout, || {
        let out = match spool.outgoing(pg_wal) {
            Ok(out) => out,
            Err(e) => return Some(Err(e)),
        };
        let ok = out.join(format!("{name}.ok"));
        if let Ok(ok_meta) = fs::metadata(&ok) {
            let note = fs::read_to_string(&ok).unwrap_or_default();
            let _ = fs::remove_file(&ok);
            // An .ok older than the file answers an earlier incarnation of this name
            // (e.g. a cluster restored without a timeline switch): have it pushed again.
            let file_time = fs::metadata(path).and_then(|m| m.modified());
            if matches!((ok_meta.modified(), file_time), (Ok(a), Ok(b)) if a < b) {
                return None;
            }
            return Some(Ok(note));
        }
        let error = out.join(format!("{name}.error"));
        if let Ok(message) = fs::read_to_string(&error) {
            let _ = fs::remove_file(&error);
            return Some(Err(anyhow::anyhow!("{}", message.trim())));
        }
        if !started_worker {
            started_worker = true;
            if let Err(e) = ensure_push_worker(ctx, &spool, pg_wal) {
                return Some(Err(e));
            }
        }
        None
    });
    match answer {
        Some(Ok(note)) => {
            if !note.trim().is_empty() {
                tracing::warn!("{name}: {}", note.trim());
            }
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => bail!(
            "{name} was not archived within {}: the async worker is still trying (see {}); PostgreSQL will retry",
            humantime::format_duration(timeout),
            spool.outgoing(pg_wal)?.join("worker.log").display()
        ),
    }
}

fn ensure_push_worker(ctx: &Context, spool: &Spool, pg_wal: &Path) -> Result<()> {
    let out = spool.outgoing(pg_wal)?;
    // Probe: if we can take the lock, no worker runs. Release it before spawning.
    if WorkerLock::try_acquire(&out.join("worker.lock"))?.is_none() {
        return Ok(());
    }
    spawn_worker(
        ctx,
        &["archive-push-worker".into(), pg_wal.into()],
        &out.join("worker.log"),
    )
}

/// The async worker: pushes every `.ready` segment of `pg_wal`, `--jobs` at a time.
pub fn push_worker(ctx: &Context, pg_wal: &Path) -> Result<()> {
    let spool = Spool::new(ctx);
    let Some(_lock) = WorkerLock::try_acquire(&spool.outgoing(pg_wal)?.join("worker.lock"))? else {
        return Ok(());
    };
    let queue_max = match &ctx.cluster_section.archive_push_queue_max {
        Some(text) => Some(super::archive::parse_size(text, "archive-push-queue-max")?),
        None => None,
    };
    // Every segment is compressed on every CPU although `--jobs` are pushed at once:
    // while one waits for its fsync, the others keep all CPUs busy.
    let repo = std::sync::Arc::new(ctx.open()?);
    let identity = load_identity(&repo, &ctx.cluster)?;
    tracing::info!("archive-push worker started for {}", pg_wal.display());
    let mut idle_since = Instant::now();
    let mut backoff = Duration::from_millis(500);
    loop {
        let out = spool.outgoing(pg_wal)?;
        let pending = ready_files(pg_wal, &out)?;
        if pending.is_empty() {
            remove_orphaned_status(pg_wal, &out);
            if idle_since.elapsed() > WORKER_IDLE_EXIT {
                tracing::info!("archive-push worker idle, exiting");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        idle_since = Instant::now();
        let batch: Vec<String> = pending.into_iter().take(ctx.jobs * 4).collect();
        // Each segment is answered as soon as it is durable (or failed): PostgreSQL
        // archives one file at a time and should not wait for the rest of the batch.
        let results = repo::parallel::map(batch, ctx.jobs, |name| {
            let (status, text, durable) = match push_file(&repo, &identity, &pg_wal.join(&name)) {
                Ok((wal, Pushed::Created { .. } | Pushed::AlreadyThere)) => {
                    ("ok", String::new(), Some(wal))
                }
                Err(e) => {
                    tracing::error!("{name}: {e:#}");
                    // The foreground push prints this text, where the error is gone.
                    let advice = crate::storage_advice(&e).unwrap_or_default();
                    ("error", format!("{e:#}{advice}"), None)
                }
            };
            // The status file only routes the answer; a lost .ok makes PostgreSQL push
            // again, which the repository answers as already archived.
            write_atomically(
                &out.join(format!("{name}.{status}")),
                text.as_bytes(),
                false,
            )?;
            Ok::<_, anyhow::Error>(durable)
        })?;
        let failed = results.iter().any(Option::is_none);
        let durable: Vec<WalFileName> = results.into_iter().flatten().collect();
        // After the answers: copies come from the first repository, not from pg_wal.
        super::copy::push_to_secondaries(ctx, &repo, &durable);
        if !failed {
            backoff = Duration::from_millis(500);
            continue;
        }
        // Only right after a failed attempt may archive-push-queue-max drop WAL: a
        // repository that is back is always tried first.
        if let Some(max) = queue_max {
            let pending = ready_files(pg_wal, &out)?;
            let waiting: u64 = pending
                .iter()
                .filter_map(|n| fs::metadata(pg_wal.join(n)).ok())
                .map(|m| m.len())
                .sum();
            if waiting > max {
                drop_queue(&out, &pending, waiting, max)?;
                continue;
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Segments PostgreSQL marked ready that have no `.ok` waiting yet, oldest first
/// (history files first, as PostgreSQL itself prefers them).
fn ready_files(pg_wal: &Path, out: &Path) -> Result<Vec<String>> {
    let status = pg_wal.join("archive_status");
    let entries = match fs::read_dir(&status) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", status.display())),
    };
    let acknowledged: BTreeSet<String> = fs::read_dir(out)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| n.strip_suffix(".ok").map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".ready").map(str::to_string))
        .filter(|n| !acknowledged.contains(n))
        .filter(|n| WalFileName::parse(n).is_ok())
        .collect();
    names.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    Ok(names)
}

/// pgBackRest's archive-push-queue-max behaviour: when the repository has been failing
/// and more WAL waits than allowed, acknowledge it unarchived so pg_wal cannot fill the
/// disk and stop the primary. Point-in-time recovery across the gap becomes impossible;
/// every dropped segment is logged.
fn drop_queue(out: &Path, pending: &[String], waiting: u64, max: u64) -> Result<()> {
    tracing::error!(
        "{} of WAL waits to be archived, more than archive-push-queue-max {}: dropping {} files; point-in-time recovery across them is lost, take a new backup once the repository is reachable",
        bytes(waiting),
        bytes(max),
        pending.len()
    );
    for name in pending {
        tracing::error!("dropped {name} without archiving it");
        let note = format!(
            "dropped without archiving: more than archive-push-queue-max ({}) waited",
            bytes(max)
        );
        write_atomically(&out.join(format!("{name}.ok")), note.as_bytes(), false)?;
    }
    Ok(())
}

/// Removes status files nobody will ask for: their segment is no longer `.ready`
/// (PostgreSQL got its answer, or archived it another way) and they are a minute old.
fn remove_orphaned_status(pg_wal: &Path, out: &Path) {
    let Ok(entries) = fs::read_dir(out) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        let Some(segment) = name
            .strip_suffix(".ok")
            .or_else(|| name.strip_suffix(".error"))
        else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60));
        let ready = pg_wal
            .join("archive_status")
            .join(format!("{segment}.ready"));
        if old && !ready.exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
}
