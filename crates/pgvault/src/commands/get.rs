//! `archive-get`: PostgreSQL's `restore_command`, with prefetching.
//!
//! Recovery asks for one segment at a time and waits for each. When it asks for a
//! segment, a background worker fetches the next `archive-get-prefetch` segments in
//! parallel into the spool, so the following requests are answered from local disk.

use std::fs;
use std::path::Path;

use anyhow::{Context as _, Result};
use pg::wal::WalFileName;

use super::archive::{
    fetch_file, load_identity, spawn_worker, write_atomically, Spool, WorkerLock,
};
use crate::cli::ArchiveGetArgs;
use crate::context::Context;

const DEFAULT_PREFETCH: u32 = 16;

/// Exit status for "the archive does not have this file": PostgreSQL then falls back to
/// streaming or ends recovery. Other failures exit 1 as well but print an error.
pub enum Fetched {
    Written,
    Missing,
}

fn prefetch_count(ctx: &Context) -> u32 {
    ctx.cluster_section
        .archive_get_prefetch
        .unwrap_or(DEFAULT_PREFETCH)
}

pub fn archive_get(ctx: &Context, args: &ArchiveGetArgs) -> Result<Fetched> {
    let wal = WalFileName::parse(&args.wal_name).with_context(|| {
        format!(
            "{:?} is not a WAL segment, .partial, .backup or .history file name",
            args.wal_name
        )
    })?;
    let spool = Spool::new(ctx);
    let prefetch = prefetch_count(ctx);
    // Prefetching only speeds recovery up: when the spool is unusable (full disk, made
    // by another user), say so and fetch directly instead of failing recovery.
    let mut prefetching = prefetch > 0 && wal.is_segment();
    if prefetching {
        match take_prefetched(&spool, &wal, &args.destination) {
            Ok(Some(found)) => {
                start_prefetch(ctx, &spool, &wal);
                return Ok(found);
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!("prefetching disabled for this call: {error:#}");
                prefetching = false;
            }
        }
    }
    let Some(data) = fetch_from_any(ctx, &wal)? else {
        return Ok(Fetched::Missing);
    };
    write_atomically(&args.destination, &data, false)?;
    if prefetching {
        start_prefetch(ctx, &spool, &wal);
    }
    Ok(Fetched::Written)
}

/// `wal` from the first repository that has it. Missing everywhere is `None`; an error
/// only when no repository could answer.
fn fetch_from_any(ctx: &Context, wal: &WalFileName) -> Result<Option<Vec<u8>>> {
    let mut first_error = None;
    let mut answered = false;
    for name in ctx.repo_names() {
        let found = ctx.open_named(&name).and_then(|repo| {
            let identity = load_identity(&repo, &ctx.cluster)?;
            fetch_file(&repo, &identity.name, wal)
        });
        match found {
            Ok(Some(data)) => return Ok(Some(data)),
            Ok(None) => answered = true,
            Err(e) if ctx.secondaries.is_empty() => return Err(e),
            Err(e) => {
                tracing::warn!("repository {name}: {e:#}");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if !answered => Err(e),
        _ => Ok(None),
    }
}

fn start_prefetch(ctx: &Context, spool: &Spool, wal: &WalFileName) {
    if let Err(error) = ensure_get_worker(ctx, spool, wal) {
        tracing::warn!("cannot prefetch the segments after {wal}: {error:#}");
    }
}

/// How long after its last request a prefetch directory of another repository is taken
/// for abandoned (its worker exits after 10 s idle).
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes what other repositories' prefetching left in the spool (once their workers
/// are done), and segments spooled by versions that kept one directory for all.
fn remove_others_prefetched(spool: &Spool, ours: &Path) -> Result<()> {
    let root = spool.all_incoming()?;
    for entry in fs::read_dir(&root)
        .with_context(|| format!("cannot list {}", root.display()))?
        .filter_map(|e| e.ok())
    {
        let path = entry.path();
        if path == ours {
            continue;
        }
        if path.is_dir() {
            // Its last request, or when it was made (a request may be on its way).
            let last_use = fs::metadata(path.join("want")).or_else(|_| fs::metadata(&path));
            let idle = (last_use.and_then(|m| m.modified()).ok())
                .and_then(|modified| modified.elapsed().ok())
                .is_none_or(|age| age > ABANDONED_AFTER);
            if idle {
                let _ = fs::remove_dir_all(&path);
            }
        } else if WalFileName::parse(&entry.file_name().to_string_lossy()).is_ok() {
            let _ = fs::remove_file(&path);
        }
    }
    Ok(())
}

/// Serves `wal` from the prefetch spool and drops prefetched files recovery has passed.
fn take_prefetched(
    spool: &Spool,
    wal: &WalFileName,
    destination: &Path,
) -> Result<Option<Fetched>> {
    let dir = spool.incoming()?;
    let wanted = wal.to_string();
    let mut found = None;
    for entry in fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == wanted {
            found = Some(entry.path());
        } else if let Ok(other) = WalFileName::parse(&name) {
            // Behind the request, or on another timeline: recovery will not ask again.
            if other.timeline() != wal.timeline() || name < wanted {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let Some(path) = found else {
        return Ok(None);
    };
    // Same file system: a rename is atomic. Otherwise copy through a temporary file.
    if fs::rename(&path, destination).is_err() {
        let data = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        write_atomically(destination, &data, false)?;
        let _ = fs::remove_file(&path);
    }
    Ok(Some(Fetched::Written))
}

fn ensure_get_worker(ctx: &Context, spool: &Spool, wal: &WalFileName) -> Result<()> {
    let dir = spool.incoming()?;
    if WorkerLock::try_acquire(&dir.join("worker.lock"))?.is_none() {
        // A worker runs; it reads `want` to learn how far recovery got.
        return write_atomically(&dir.join("want"), wal.to_string().as_bytes(), false);
    }
    write_atomically(&dir.join("want"), wal.to_string().as_bytes(), false)?;
    spawn_worker(ctx, &["archive-get-worker".into()], &dir.join("worker.log"))
}

/// Keeps the `archive-get-prefetch` segments after the last requested one in the spool.
pub fn get_worker(ctx: &Context) -> Result<()> {
    let spool = Spool::new(ctx);
    // Made once: a worker whose directory is deleted (the spool cleared, a test's
    // temporary directory removed) ends instead of creating it again.
    let dir = spool.incoming()?;
    let Some(_lock) = WorkerLock::try_acquire(&dir.join("worker.lock"))? else {
        return Ok(());
    };
    // Once per worker, not per requested segment: only disk space depends on it.
    if let Err(e) = remove_others_prefetched(&spool, &dir) {
        tracing::warn!("{e:#}");
    }
    let repo = ctx.open()?;
    let identity = load_identity(&repo, &ctx.cluster)?;
    let count = prefetch_count(ctx) as usize;
    let idle_exit = std::time::Duration::from_secs(10);
    let mut idle_since = std::time::Instant::now();
    let mut last_want = String::new();
    loop {
        let want = fs::read_to_string(dir.join("want")).unwrap_or_default();
        let Ok(current) = WalFileName::parse(want.trim()) else {
            return Ok(());
        };
        if want != last_want {
            idle_since = std::time::Instant::now();
            last_want = want;
        }
        if idle_since.elapsed() > idle_exit {
            return Ok(());
        }
        // The segments after the requested one that are not spooled yet.
        let mut next = Vec::new();
        let mut cursor = current;
        for _ in 0..count {
            let Some(following) = cursor.next_segment(identity.wal_segment_size) else {
                break;
            };
            if !dir.join(following.to_string()).exists() {
                next.push(following.clone());
            }
            cursor = following;
        }
        if next.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        let fetched = repo::parallel::map(next, ctx.jobs, |segment| {
            let data = fetch_file(&repo, &identity.name, &segment)?;
            if let Some(data) = &data {
                write_atomically(&dir.join(segment.to_string()), data, false)?;
            }
            Ok::<_, anyhow::Error>(data.is_some())
        })?;
        if fetched.iter().any(|present| !present) {
            // The archive ends here for now; look again after a pause.
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}
