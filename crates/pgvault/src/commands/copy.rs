//! Several repositories: `repo copy` brings a cluster's registration, WAL, backups, dumps
//! and pins from one repository into another (re-encrypting on the way), and the same
//! step runs after every backup and dump for each configured secondary repository, so
//! a far copy trails the near one by one job at most. archive-push writes secondaries
//! itself ([`push_to_secondaries`]), bounded by their `push-timeout`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use pg::wal::WalFileName;
use repo::copy::{copy_file, copy_files, SnapshotCopier, COPIED_FROM_TAG};
use repo::lock::LockKind;
use repo::snapshot::Snapshot;
use repo::{Id, Repository};
use serde_json::{json, Value};

use super::archive::wal_name;
use super::catalog::cluster_names;
use crate::cli::RepoCopyArgs;
use crate::context::Context;
use crate::output::{bytes, note, print_json};

/// What one cluster's copy did.
#[derive(Debug, Default, Clone)]
pub struct Synced {
    pub wal_files: u64,
    pub snapshots: Vec<(String, Id)>,
    pub pins: u64,
    pub stored_bytes: u64,
}

impl Synced {
    fn json(&self, cluster: &str) -> Value {
        json!({
            "cluster": cluster,
            "wal_files": self.wal_files,
            "snapshots": self.snapshots.iter().map(|(kind, id)| json!({"kind": kind, "id": id})).collect::<Vec<_>>(),
            "pins": self.pins,
            "stored_bytes": self.stored_bytes,
        })
    }
}

/// Copies everything of `cluster` that `target` lacks from `source`.
pub fn sync_cluster(
    ctx: &Context,
    source: &Repository,
    target: &Repository,
    cluster: &str,
) -> Result<Synced> {
    let registration = format!("clusters/{cluster}");
    let Some(theirs) = source.find_file(&registration)? else {
        bail!(
            "cluster {cluster:?} is not registered in {}: nothing to copy",
            source.location()
        );
    };
    match target.find_file(&registration)? {
        Some(ours) if ours.data != theirs.data => bail!(
            "{} has another cluster registered as {cluster:?} (different system identifier or settings): copy into another repository",
            target.location()
        ),
        Some(_) => {}
        None => {
            copy_file(source, target, &registration)?;
        }
    }
    sync_contents(ctx, source, target, cluster)
}

fn sync_contents(
    ctx: &Context,
    source: &Repository,
    target: &Repository,
    cluster: &str,
) -> Result<Synced> {
    // Readers of the source and writers of the target, like a backup: gc and expire wait.
    let _source_lock = ctx.read_lock(source)?;
    let target_lock = ctx.lock(target, LockKind::Shared)?;
    let mut synced = Synced::default();
    let wal = copy_files(source, target, &format!("wal/{cluster}/"), ctx.jobs)?;
    synced.wal_files = wal.files;
    synced.stored_bytes += wal.bytes;

    // Source id → target id for every snapshot the target already has.
    let mut in_target: BTreeMap<String, Id> = BTreeMap::new();
    for (id, snapshot) in Snapshot::load_all(target)? {
        if let Some(from) = snapshot.tags.get(COPIED_FROM_TAG) {
            in_target.insert(from.clone(), id);
        }
        in_target.insert(id.to_hex(), id);
    }
    let wanted: Vec<(Id, Snapshot)> = Snapshot::load_all(source)?
        .into_iter()
        .filter(|(_, s)| s.tags.get("cluster").map(String::as_str) == Some(cluster))
        .filter(|(id, s)| {
            !in_target.contains_key(&id.to_hex())
                && !s
                    .tags
                    .get(COPIED_FROM_TAG)
                    .is_some_and(|from| in_target.contains_key(from))
        })
        .collect();
    if !wanted.is_empty() {
        let copier = SnapshotCopier::new(source, target, ctx.jobs)?;
        for (id, snapshot) in wanted {
            let parent = snapshot
                .parent
                .and_then(|p| in_target.get(&p.to_hex()).copied());
            target_lock.ensure_held()?;
            let copied = copier.copy(&id, parent)?;
            in_target.insert(id.to_hex(), copied);
            synced.snapshots.push((snapshot.kind.clone(), copied));
        }
        synced.stored_bytes += copier.stats().bytes_stored;
    }

    // Pins name snapshot ids, which differ between repositories.
    let pin_prefix = format!("pins/{cluster}/");
    for meta in source.list_files(&pin_prefix)? {
        let Some(hex) = meta.key.strip_prefix(&pin_prefix) else {
            continue;
        };
        let Some(target_id) = in_target.get(hex) else {
            continue;
        };
        let name = super::catalog::pin_name(cluster, target_id);
        if !target.has_file(&name)? {
            if let Some(pin) = source.find_file(&meta.key)? {
                target.store_file(&name, &pin.data)?;
                synced.pins += 1;
            }
        }
    }
    Ok(synced)
}

pub fn repo_copy(ctx: &Context, args: &RepoCopyArgs) -> Result<()> {
    if args.from == args.to {
        bail!(
            "--from and --to are both {:?}: name two repositories",
            args.from
        );
    }
    let source = ctx.open_named(&args.from)?;
    let target = ctx.open_named(&args.to)?;
    let clusters = if args.all_clusters {
        cluster_names(&source)?
    } else {
        vec![ctx.cluster.clone()]
    };
    let mut reports = Vec::new();
    for cluster in &clusters {
        let synced = sync_cluster(ctx, &source, &target, cluster)
            .with_context(|| format!("copying cluster {cluster}"))?;
        if !ctx.json() {
            note!(ctx,
                "cluster {cluster}: {} WAL files, {} snapshots, {} pins copied from {} to {} ({} stored)",
                synced.wal_files,
                synced.snapshots.len(),
                synced.pins,
                source.location(),
                target.location(),
                bytes(synced.stored_bytes)
            );
        }
        reports.push(synced.json(cluster));
    }
    if ctx.json() {
        return print_json(&json!({
            "from": source.location(),
            "to": target.location(),
            "clusters": reports,
        }));
    }
    Ok(())
}

/// After a backup or dump in the first repository: the same cluster copied into every
/// secondary. A failing secondary is reported (warning and the returned list), never
/// the failure of the job whose data is safe in the first repository.
pub fn replicate(ctx: &Context, primary: &Repository) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, _) in &ctx.secondaries {
        let result = ctx
            .open_named(name)
            .and_then(|target| sync_cluster(ctx, primary, &target, &ctx.cluster));
        match result {
            Ok(synced) => {
                if !ctx.json() && !ctx.quiet {
                    note!(
                        ctx,
                        "repository {name}: {} WAL files and {} snapshots copied ({} stored)",
                        synced.wal_files,
                        synced.snapshots.len(),
                        bytes(synced.stored_bytes)
                    );
                }
                let mut report = synced.json(&ctx.cluster);
                report["repo"] = json!(name);
                out.push(report);
            }
            Err(e) => {
                let message = format!("{e:#}");
                tracing::warn!(
                    "repository {name} not updated: {message}; the next backup, dump or `pgvault repo copy --from {} --to {name}` copies what it lacks",
                    ctx.repo_name
                );
                out.push(json!({"repo": name, "error": message}));
            }
        }
    }
    out
}

/// archive-push's second half: `wals` are durable in the first repository; store them
/// in every secondary within its push-timeout, with the files earlier pushes left
/// behind. Failures are warnings plus a marker, so PostgreSQL is never held up by a far
/// repository beyond that bound.
pub fn push_to_secondaries(ctx: &Context, primary: &Arc<Repository>, wals: &[WalFileName]) {
    if wals.is_empty() {
        return;
    }
    for (name, section) in &ctx.secondaries {
        let url = section.url.as_deref().unwrap_or_default();
        let dir = match super::archive::Spool::new(ctx).secondary_pending(name, url) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::warn!("repository {name}: {e:#}");
                continue;
            }
        };
        // Earlier versions kept the markers directly in `secondary/<repo>`; they are
        // taken over once and then kept in `dir`.
        let legacy = dir.parent().map(wal_markers).unwrap_or_default();
        let mut names = wal_markers(&dir);
        names.extend(legacy.iter().cloned());
        names.extend(wals.iter().map(|w| w.to_string()));
        names.sort();
        names.dedup();
        let timeout = match ctx.push_timeout(name) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("{e:#}");
                Duration::from_secs(10)
            }
        };
        let outcome = copy_with_deadline(ctx, primary, name, &names, timeout);
        let failed: Vec<String> = match outcome {
            Ok(()) => Vec::new(),
            Err((done, e)) => {
                tracing::warn!(
                    "repository {name}: {e}; {} WAL file(s) wait for the next push or `pgvault repo copy`",
                    names.len() - done
                );
                names[done..].to_vec()
            }
        };
        for file in &names {
            let marker = dir.join(file);
            if failed.contains(file) {
                let _ = std::fs::write(&marker, b"");
            } else {
                let _ = std::fs::remove_file(&marker);
            }
        }
        if let Some(legacy_dir) = dir.parent() {
            for file in &legacy {
                let _ = std::fs::remove_file(legacy_dir.join(file));
            }
        }
    }
}

/// The WAL file names marked in `dir` (its subdirectories are not markers).
fn wal_markers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                e.file_type().ok()?.is_file().then_some(())?;
                e.file_name().into_string().ok()
            })
            .filter(|name| WalFileName::parse(name).is_ok())
            .collect()
        })
        .unwrap_or_default()
}

/// Copies `files` (WAL names) from the first repository to repository `name` in order,
/// on a thread of its own; on error or timeout, how many were done and why it stopped.
/// Past the timeout the thread is not waited for: archive-push answers and the process
/// ends with it — storage never shows a partial object.
fn copy_with_deadline(
    ctx: &Context,
    primary: &Arc<Repository>,
    name: &str,
    files: &[String],
    timeout: Duration,
) -> std::result::Result<(), (usize, String)> {
    let (sender, receiver) = std::sync::mpsc::channel();
    let ctx = ctx.clone();
    let primary = Arc::clone(primary);
    let name = name.to_string();
    let files = files.to_vec();
    std::thread::spawn(move || {
        let run = || -> std::result::Result<(), (usize, String)> {
            let target = ctx.open_named(&name).map_err(|e| (0, format!("{e:#}")))?;
            for (done, file) in files.iter().enumerate() {
                let wal = WalFileName::parse(file).map_err(|e| (done, e.to_string()))?;
                copy_file(&primary, &target, &wal_name(&ctx.cluster, &wal))
                    .map_err(|e| (done, format!("{e:#}")))?;
                let _ = sender.send(Ok(done + 1));
            }
            Ok(())
        };
        let _ = sender.send(run().map(|()| usize::MAX));
    });
    let deadline = std::time::Instant::now() + timeout;
    let mut done = 0;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match receiver.recv_timeout(left) {
            Ok(Ok(usize::MAX)) => return Ok(()),
            Ok(Ok(n)) => done = n,
            Ok(Err(stopped)) => return Err(stopped),
            Err(_) => {
                return Err((
                    done,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                ))
            }
        }
    }
}
