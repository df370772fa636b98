//! Generic snapshots of a directory tree or a stream. The PostgreSQL commands (backup,
//! dump) build on the same calls with their own metadata.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Context as _, Result};
use chrono::Utc;
use repo::archive::{archive_stream, archive_tree, ArchiveOptions, Archived};
use repo::lock::LockKind;
use repo::repository::ObjectKind;
use repo::restore::{apply_root_metadata, restore_tree, write_content, RestoreOptions, SyncMethod};
use repo::saver::BlobSaver;
use repo::snapshot::{NodeKind, Snapshot, Tree};
use serde_json::json;

use crate::cli::{SnapshotCommand, SnapshotCreateArgs, SnapshotRestoreArgs};
use crate::context::Context;
use crate::output::{bytes, note, print_json};

pub fn run(ctx: &Context, command: &SnapshotCommand) -> Result<()> {
    match command {
        SnapshotCommand::Create(args) => create(ctx, args),
        SnapshotCommand::List => list(ctx),
        SnapshotCommand::Show { id } => show(ctx, id),
        SnapshotCommand::Restore(args) => restore(ctx, args),
        SnapshotCommand::Forget { ids } => forget(ctx, ids),
    }
}

fn parse_tags(raw: &[String]) -> Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|t| match t.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--tag {t:?}: write tags as KEY=VALUE"),
        })
        .collect()
}

fn create(ctx: &Context, args: &SnapshotCreateArgs) -> Result<()> {
    let tags = parse_tags(&args.tags)?;
    let repo = ctx.open()?;
    let lock = ctx.lock(&repo, LockKind::Shared)?;
    let started = Utc::now();
    let saver = BlobSaver::new(&repo);
    let (kind, paths, archived, parent): (&str, Vec<String>, Archived, _) = if args.stdin {
        let name = args.name.clone().unwrap_or_default();
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            bail!("--name {name:?}: give a plain file name for the stdin data");
        }
        let options = ArchiveOptions {
            jobs: ctx.jobs,
            ..ArchiveOptions::default()
        };
        let archived = archive_stream(&saver, std::io::stdin().lock(), &name, &options)?;
        ("stream", vec![name], archived, None)
    } else {
        let dir = args
            .path
            .as_ref()
            .context("--path or --stdin is required")?;
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot open directory {}", dir.display()))?;
        let path_text = dir.display().to_string();
        let parent = Snapshot::load_all(&repo)?
            .into_iter()
            .rev()
            .find(|(_, s)| s.kind == "tree" && s.paths == [path_text.clone()]);
        let options = ArchiveOptions {
            jobs: ctx.jobs,
            parent: parent.as_ref().map(|(_, s)| (s.tree, s.time)),
            read_all: args.read_all,
            ..ArchiveOptions::default()
        };
        let archived = archive_tree(&saver, &dir, &options)?;
        ("tree", vec![path_text], archived, parent.map(|(id, _)| id))
    };
    let snapshot = Snapshot {
        label: args.label.clone(),
        paths,
        root: archived.root,
        parent,
        tags,
        ..Snapshot::new(kind, started, Utc::now(), archived.tree, archived.summary)
    };
    lock.ensure_held()?;
    let id = snapshot.save(&repo)?;
    let s = &snapshot.summary;
    if ctx.json() {
        return print_json(&json!({
            "id": id,
            "tree": snapshot.tree,
            "parent": snapshot.parent,
            "files": s.files,
            "dirs": s.dirs,
            "size_bytes": s.bytes,
            "unchanged_bytes": s.bytes_unchanged,
            "new_bytes": s.save.bytes_new,
            "stored_bytes": s.save.bytes_stored,
            "new_blobs": s.save.blobs_new,
            "reused_blobs": s.save.blobs_reused,
            "packs_written": s.save.packs_written,
            "delta_blobs": s.save.blobs_delta,
            "duration_ms": s.duration_ms,
        }));
    }
    note!(
        ctx,
        "stored {} files, {} in {:.1}s: {} new data, {} written after compression{}",
        s.files,
        bytes(s.bytes),
        s.duration_ms as f64 / 1000.0,
        bytes(s.save.bytes_new),
        bytes(s.save.bytes_stored),
        if s.bytes_unchanged > 0 {
            format!(", {} unchanged since the parent", bytes(s.bytes_unchanged))
        } else {
            String::new()
        }
    );
    println!("{id}");
    Ok(())
}

fn list(ctx: &Context) -> Result<()> {
    let repo = ctx.open()?;
    let all = Snapshot::load_all(&repo)?;
    if ctx.json() {
        let list: Vec<_> = all
            .iter()
            .map(|(id, s)| {
                json!({"id": id, "kind": s.kind, "time": s.time, "end_time": s.end_time,
                       "hostname": s.hostname, "label": s.label, "paths": s.paths,
                       "tags": s.tags, "size_bytes": s.summary.bytes,
                       "stored_bytes": s.summary.save.bytes_stored})
            })
            .collect();
        return print_json(&list);
    }
    for (id, s) in &all {
        println!(
            "{}  {}  {:6}  {:>10}  {}{}",
            id.short(),
            s.time.format("%Y-%m-%d %H:%M:%S"),
            s.kind,
            bytes(s.summary.bytes),
            s.paths.join(" "),
            s.label
                .as_ref()
                .map(|l| format!("  [{l}]"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn show(ctx: &Context, spec: &str) -> Result<()> {
    let repo = ctx.open()?;
    let id = Snapshot::resolve(&repo, spec)?;
    let snapshot = Snapshot::load(&repo, &id)?;
    if ctx.json() {
        return print_json(&json!({"id": id, "snapshot": snapshot}));
    }
    println!("snapshot {id}");
    println!("kind      {}", snapshot.kind);
    println!("time      {} .. {}", snapshot.time, snapshot.end_time);
    println!("host      {}", snapshot.hostname);
    println!("paths     {}", snapshot.paths.join(" "));
    if let Some(label) = &snapshot.label {
        println!("label     {label}");
    }
    for (k, v) in &snapshot.tags {
        println!("tag       {k}={v}");
    }
    let s = &snapshot.summary;
    println!(
        "contents  {} files, {} dirs, {} ({} new, {} stored)",
        s.files,
        s.dirs,
        bytes(s.bytes),
        bytes(s.save.bytes_new),
        bytes(s.save.bytes_stored)
    );
    Ok(())
}

fn restore(ctx: &Context, args: &SnapshotRestoreArgs) -> Result<()> {
    let repo = ctx.open()?;
    let _lock = ctx.read_lock(&repo)?;
    let id = Snapshot::resolve(&repo, &args.id)?;
    let snapshot = Snapshot::load(&repo, &id)?;
    if args.stdout {
        let root = Tree::load(&repo, &snapshot.tree)?;
        let file = match root.nodes.as_slice() {
            [node] if node.kind == NodeKind::File => node,
            _ => bail!(
                "snapshot {} holds a directory tree; restore it with --target DIR",
                id.short()
            ),
        };
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
        let written = write_content(&repo, &file.content, &mut out)?;
        out.flush().context("cannot write to standard output")?;
        if written != file.size {
            bail!(
                "snapshot {} restored {written} bytes but recorded {}; the repository is damaged, run `pgvault verify`",
                id.short(),
                file.size
            );
        }
        return Ok(());
    }
    let target = args
        .target
        .as_ref()
        .context("--target or --stdout is required")?;
    let stats = restore_tree(
        &repo,
        &snapshot.tree,
        target,
        RestoreOptions::new(ctx.jobs, SyncMethod::Fsync),
    )?;
    if let Some(root) = &snapshot.root {
        apply_root_metadata(target, root)?;
    }
    if ctx.json() {
        return print_json(&json!({"id": id, "target": target, "files": stats.files,
                                  "dirs": stats.dirs, "size_bytes": stats.bytes}));
    }
    println!(
        "restored snapshot {} to {}: {} files, {} dirs, {}",
        id.short(),
        target.display(),
        stats.files,
        stats.dirs,
        bytes(stats.bytes)
    );
    Ok(())
}

fn forget(ctx: &Context, specs: &[String]) -> Result<()> {
    let repo = ctx.open()?;
    let _lock = ctx.lock(&repo, LockKind::Shared)?;
    let ids = specs
        .iter()
        .map(|spec| Ok(Snapshot::resolve(&repo, spec)?))
        .collect::<Result<Vec<_>>>()?;
    for id in &ids {
        repo.storage()
            .delete(&format!("{}/{id}", ObjectKind::Snapshot.dir()))?;
    }
    if ctx.json() {
        return print_json(&json!({"forgotten": ids}));
    }
    for id in &ids {
        println!("forgot snapshot {}", id.short());
    }
    println!("run `pgvault gc` to free the space");
    Ok(())
}
