//! Repository administration: init, keys, verify, gc, unlock, rebuild-index.

use std::io::IsTerminal;

use anyhow::{bail, Context as _, Result};
use repo::compression::Compression;
use repo::crypto::Encryption;
use repo::keys::KdfParams;
use repo::lock::{list_locks, remove_locks, LockKind};
use repo::{gc, InitOptions, Repository};
use serde_json::json;

use crate::cli::{GcArgs, InitArgs, KeyCommand, UnlockArgs};
use crate::context::{read_new_passphrase, Context};
use crate::output::{bytes, print_json};

pub fn init(ctx: &Context, args: &InitArgs) -> Result<()> {
    let encryption = Encryption::parse(&args.encryption).map_err(|e| anyhow::anyhow!(e))?;
    let compression = match &args.compression {
        Some(text) => text
            .parse::<Compression>()
            .map_err(|e| anyhow::anyhow!(e))?,
        None => ctx.compression.unwrap_or_default(),
    };
    let storage = ctx.storage()?;
    let passphrase = match (encryption, ctx.configured_passphrase()?) {
        (Encryption::None, _) => None,
        (_, Some(p)) => Some(p),
        (_, None) if std::io::stdin().is_terminal() => Some(
            read_new_passphrase(None).context("the new repository needs a passphrase")?,
        ),
        (_, None) => bail!(
            "an encrypted repository needs a passphrase: give --passphrase-file FILE or PGVAULT_PASSPHRASE (or --encryption none)"
        ),
    };
    let mut options = InitOptions {
        encryption,
        compression,
        pack_size: args.pack_size << 20,
        ..InitOptions::default()
    };
    if let Some(kib) = args.fixed_chunk_size {
        options.chunker.fixed_size = kib.saturating_mul(1024);
    }
    let repo = Repository::init(storage, &options, passphrase.as_deref())?;
    let config = repo.config();
    if ctx.json() {
        print_json(&json!({
            "repository": repo.location(),
            "id": config.id,
            "version": config.version,
            "encryption": config.encryption.name(),
            "compression": config.compression,
            "pack_size": config.pack_size,
            "key": repo.key_id(),
        }))
    } else {
        println!(
            "created repository {} (format {}, encryption {}, compression {})",
            repo.location(),
            config.version,
            config.encryption.name(),
            config.compression
        );
        if encryption != Encryption::None {
            println!("keep the passphrase safe: without it the backups cannot be read");
        }
        Ok(())
    }
}

pub fn key(ctx: &Context, command: &KeyCommand) -> Result<()> {
    let repo = ctx.open()?;
    match command {
        KeyCommand::List => {
            let keys = repo.list_keys()?;
            if ctx.json() {
                let list: Vec<_> = keys
                    .iter()
                    .map(|(id, k)| {
                        json!({"id": id, "created": k.created, "hostname": k.hostname,
                               "username": k.username, "current": Some(*id) == repo.key_id()})
                    })
                    .collect();
                return print_json(&list);
            }
            if keys.is_empty() {
                println!(
                    "repository {} is not encrypted; it has no keys",
                    repo.location()
                );
            }
            for (id, k) in keys {
                let marker = if Some(id) == repo.key_id() { "*" } else { " " };
                println!(
                    "{marker} {}  {}  {}@{}",
                    id.short(),
                    k.created.format("%Y-%m-%d %H:%M:%S"),
                    k.username,
                    k.hostname
                );
            }
            Ok(())
        }
        KeyCommand::Add(args) => {
            let passphrase = read_new_passphrase(args.new_passphrase_file.as_deref())?;
            let id = repo.add_key(&passphrase, KdfParams::default())?;
            report(
                ctx,
                json!({"added": id}),
                &format!("added key {}", id.short()),
            )
        }
        KeyCommand::Passwd(args) => {
            let passphrase = read_new_passphrase(args.new_passphrase_file.as_deref())?;
            let old = repo
                .key_id()
                .context("this repository is not encrypted; it has no passphrase")?;
            // Add before remove: at no moment is the repository without a working key.
            let new = repo.add_key(&passphrase, KdfParams::default())?;
            repo.remove_key(&old)?;
            report(
                ctx,
                json!({"added": new, "removed": old}),
                &format!(
                    "passphrase changed (key {} replaced by {})",
                    old.short(),
                    new.short()
                ),
            )
        }
        KeyCommand::Remove { id } => {
            let keys = repo.list_keys()?;
            let wanted = id.to_ascii_lowercase();
            let matches: Vec<_> = keys
                .iter()
                .filter(|(k, _)| k.to_hex().starts_with(&wanted))
                .map(|(k, _)| *k)
                .collect();
            let target = match matches.as_slice() {
                [one] if !wanted.is_empty() => *one,
                [] | [_] => bail!(
                    "no key {id:?} in repository {}; `pgvault key list` shows the keys",
                    repo.location()
                ),
                _ => bail!("key id {id:?} is ambiguous; give more digits"),
            };
            if Some(target) == repo.key_id() {
                bail!("key {} is the one this command unlocked with; open with another passphrase to remove it, or use `pgvault key passwd`", target.short());
            }
            repo.remove_key(&target)?;
            report(
                ctx,
                json!({"removed": target}),
                &format!("removed key {}", target.short()),
            )
        }
    }
}

fn report(ctx: &Context, value: serde_json::Value, text: &str) -> Result<()> {
    if ctx.json() {
        print_json(&value)
    } else {
        println!("{text}");
        Ok(())
    }
}

pub(crate) fn parse_percent(text: &str) -> Result<f64> {
    let number = text.trim().trim_end_matches('%');
    match number.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => bail!(
            "--read-data-subset {text:?}: give a percentage above 0 and at most 100, e.g. 10%"
        ),
    }
}

pub fn gc_command(ctx: &Context, args: &GcArgs) -> Result<()> {
    let repo = ctx.open()?;
    let _lock = ctx.lock(&repo, LockKind::Exclusive)?;
    let plan = gc::plan(&repo)?;
    if plan.missing_blobs > 0 {
        bail!(
            "{} referenced blobs are in no index; refusing to gc. Run `pgvault rebuild-index`, then `pgvault verify`",
            plan.missing_blobs
        );
    }
    if args.dry_run {
        if ctx.json() {
            return print_json(&plan);
        }
        println!(
            "would delete {} packs and repack {} ({} live bytes to copy), freeing about {}",
            plan.delete_packs.len(),
            plan.repack_packs.len(),
            bytes(plan.bytes_repacked),
            bytes(plan.bytes_freed_estimate)
        );
        return Ok(());
    }
    let result = gc::execute(&repo, plan, ctx.jobs)?;
    drop(_lock);
    if ctx.json() {
        return print_json(&result);
    }
    println!(
        "deleted {} packs, repacked {} into {} new packs, freed about {}",
        result.packs_deleted,
        result.plan.repack_packs.len(),
        result.packs_written,
        bytes(result.plan.bytes_freed_estimate)
    );
    Ok(())
}

/// gc under the exclusive lock, for commands that free space as their last step.
pub fn run_gc(ctx: &Context, repo: &Repository) -> Result<gc::GcResult> {
    let _lock = ctx.lock(repo, LockKind::Exclusive)?;
    let plan = gc::plan(repo)?;
    if plan.missing_blobs > 0 {
        bail!(
            "{} referenced blobs are in no index; gc skipped. Run `pgvault rebuild-index`, then `pgvault verify`",
            plan.missing_blobs
        );
    }
    Ok(gc::execute(repo, plan, ctx.jobs)?)
}

pub fn unlock(ctx: &Context, args: &UnlockArgs) -> Result<()> {
    // Does not open the repository: unlocking must work without the passphrase.
    let storage = ctx.storage()?;
    let removed = remove_locks(&storage, args.all)?;
    let remaining = list_locks(&storage)?;
    if ctx.json() {
        let remaining: Vec<_> = remaining
            .iter()
            .map(|(key, info)| json!({"key": key, "holder": info.as_ref().map(|i| i.describe())}))
            .collect();
        return print_json(&json!({"removed": removed, "remaining": remaining}));
    }
    println!("removed {} lock(s)", removed.len());
    for (_, info) in remaining.iter() {
        if let Some(info) = info {
            println!("still held (live): {}", info.describe());
        }
    }
    Ok(())
}

pub fn rebuild_index(ctx: &Context) -> Result<()> {
    let repo = ctx.open()?;
    let _lock = ctx.lock(&repo, LockKind::Exclusive)?;
    let result = gc::rebuild_index(&repo, ctx.jobs)?;
    if ctx.json() {
        print_json(&result)?;
    } else {
        println!(
            "indexed {} blobs in {} packs, replaced {} index objects",
            result.blobs, result.packs, result.index_files_replaced
        );
        for pack in &result.unreadable_packs {
            println!("UNREADABLE {pack}");
        }
    }
    if !result.unreadable_packs.is_empty() {
        bail!(
            "{} pack(s) could not be read and were left out of the index; run `pgvault verify` to see which snapshots they affect",
            result.unreadable_packs.len()
        );
    }
    Ok(())
}
