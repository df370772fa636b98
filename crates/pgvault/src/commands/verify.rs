//! `pgvault verify`: proves that backups can be restored. Authenticates every pack the
//! snapshots need (`repo::verify`), every archived WAL file, checks each backup's WAL
//! range and timeline history, optionally re-checks page checksums from the stored data
//! (`--pages`), and reports per backup: restorable or not, and why.
//!
//! Incremental: packs and WAL files proven good are recorded in the repository
//! (`verified/<time>`, named files), and later runs only check that they still exist
//! (one LIST) instead of reading them again — unless `--full`. Objects are immutable
//! and content-addressed, so a recorded proof stays valid until storage itself rots,
//! which is what a periodic `--full` is for.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use chrono::Utc;
use pg::page::{check_page, PageCheck, PAGE_SIZE};
use pg::pgdata::RelationFile;
use pg::wal::Lsn;
use repo::snapshot::{NodeKind, Snapshot, Tree};
use repo::verify::{verify, VerifyOptions};
use repo::{Id, Repository};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::backup::stored_control_file_problem;
use super::catalog::{cluster_names, ClusterState};
use crate::cli::VerifyArgs;
use crate::context::Context;
use crate::output::{bytes, print_json};

/// One run's proofs.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Proof {
    time: chrono::DateTime<Utc>,
    packs: Vec<String>,
    /// Named files (WAL) that were read and authenticated.
    files: Vec<String>,
}

fn load_proofs(repo: &Repository) -> Result<(HashSet<Id>, HashSet<String>)> {
    let mut packs = HashSet::new();
    let mut files = HashSet::new();
    for meta in repo.list_files("verified/")? {
        let Some(file) = repo.find_file(&meta.key)? else {
            continue;
        };
        let proof: Proof = match serde_json::from_slice(&file.data) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("ignoring unreadable verify record {}: {e}", meta.key);
                continue;
            }
        };
        packs.extend(proof.packs.iter().filter_map(|h| h.parse::<Id>().ok()));
        files.extend(proof.files);
    }
    Ok((packs, files))
}

#[derive(Debug, Serialize)]
struct BackupVerdict {
    cluster: String,
    id: Id,
    restorable: bool,
    problems: Vec<String>,
    pages_checked: u64,
}

pub fn verify_command(ctx: &Context, args: &VerifyArgs) -> Result<()> {
    let mut repo = ctx.open()?;
    // Proves what storage holds, not what this host copied from it.
    repo.set_object_cache(None);
    let _lock = ctx.read_lock(&repo)?;
    let selected = args
        .snapshots
        .iter()
        .map(|spec| Ok(Snapshot::resolve(&repo, spec)?))
        .collect::<Result<Vec<_>>>()?;
    let (proven_packs, proven_files) = if args.full {
        Default::default()
    } else {
        load_proofs(&repo)?
    };
    let options = VerifyOptions {
        snapshots: selected.clone(),
        read_data: !args.no_read_data,
        subset_percent: match &args.read_data_subset {
            Some(text) => super::admin::parse_percent(text)?,
            None => 100.0,
        },
        jobs: ctx.jobs,
        skip_packs: proven_packs,
    };
    let report = verify(&repo, &options)?;
    let mut proof = Proof {
        time: Utc::now(),
        packs: report.good_packs.iter().map(|p| p.to_hex()).collect(),
        files: Vec::new(),
    };

    let mut verdicts = Vec::new();
    let mut wal_problems: Vec<String> = Vec::new();
    let mut wal_read = 0u64;
    let mut wal_skipped = 0u64;
    for cluster in cluster_names(&repo)? {
        let Some(state) = ClusterState::load(&repo, &cluster)? else {
            continue;
        };
        for (tli, error) in &state.wal.unreadable_histories {
            wal_problems.push(format!(
                "cluster {cluster}: history file of timeline {tli}: {error}"
            ));
        }
        // Authenticate WAL files not proven before.
        let mut bad_wal: BTreeMap<String, String> = BTreeMap::new();
        if !args.no_read_data {
            let todo: Vec<_> = state
                .wal
                .files
                .iter()
                .filter(|f| !proven_files.contains(&f.key))
                .collect();
            wal_skipped += (state.wal.files.len() - todo.len()) as u64;
            let outcomes = repo::parallel::map(todo, ctx.jobs.max(1), |f| {
                Ok::<_, repo::RepoError>((f, repo.find_file(&f.key)))
            })?;
            for (file, outcome) in outcomes {
                match outcome {
                    Ok(Some(_)) => {
                        wal_read += file.size;
                        proof.files.push(file.key.clone());
                    }
                    Ok(None) => {
                        bad_wal.insert(file.name.to_string(), "vanished during verify".into());
                    }
                    Err(e) => {
                        bad_wal.insert(file.name.to_string(), e.to_string());
                    }
                }
            }
        }
        for (name, error) in &bad_wal {
            wal_problems.push(format!("cluster {cluster}: WAL {name}: {error}"));
        }
        for backup in &state.backups {
            if !selected.is_empty() && !selected.contains(&backup.id) {
                continue;
            }
            let mut problems = Vec::new();
            for p in &report.problems {
                if p.snapshots.contains(&backup.id) {
                    problems.push(format!("{}: {}", p.object, p.detail));
                }
            }
            for missing in &backup.reach.missing {
                problems.push(format!("WAL file {missing} is missing from the archive"));
            }
            let start = Lsn::parse(&backup.meta.start_lsn)?;
            let stop = backup.meta.stop_lsn()?;
            let segment_size = state.wal.segment_size;
            for (name, error) in &bad_wal {
                let needed = pg::wal::WalFileName::parse(name).ok().is_some_and(|n| {
                    n.timeline() == backup.meta.timeline
                        && n.segno(segment_size).is_some_and(|s| {
                            (start.segno(segment_size)..=stop.segno(segment_size)).contains(&s)
                        })
                });
                if needed {
                    problems.push(format!("WAL file {name} is damaged: {error}"));
                }
            }
            match stored_control_file_problem(&repo, &backup.snapshot.tree) {
                Ok(Some(problem)) => problems.push(problem),
                Ok(None) => {}
                // Unreadable objects are among the problems already.
                Err(e) => tracing::debug!("reading {}'s control file: {e:#}", backup.id.short()),
            }
            let mut pages_checked = 0;
            if args.pages && backup.meta.data_checksums {
                let (checked, bad) = check_backup_pages(&repo, &backup.snapshot, start)?;
                pages_checked = checked;
                let recorded: HashSet<(String, u32)> = backup
                    .meta
                    .corrupted_pages
                    .iter()
                    .map(|c| (c.file.clone(), c.block))
                    .collect();
                for (file, block) in bad {
                    // Pages the backup already reported as corrupt on the server are
                    // known; new ones mean the stored copy differs from what was read.
                    let known = recorded.contains(&(file.clone(), block));
                    problems.push(format!(
                        "page checksum mismatch in {file} block {block}{}",
                        if known {
                            " (already corrupt on the server at backup time)"
                        } else {
                            ""
                        }
                    ));
                }
            }
            verdicts.push(BackupVerdict {
                cluster: cluster.clone(),
                id: backup.id,
                restorable: problems.is_empty(),
                problems,
                pages_checked,
            });
        }
    }
    if !proof.packs.is_empty() || !proof.files.is_empty() {
        let name = format!(
            "verified/{}-{}",
            proof.time.format("%Y%m%dT%H%M%S%.6fZ"),
            std::process::id()
        );
        let data = serde_json::to_vec(&proof)?;
        if let Err(e) = repo.store_file(&name, &data) {
            tracing::warn!("could not record what this verify proved: {e}");
        }
    }

    let other_problems: Vec<String> = report
        .problems
        .iter()
        .filter(|p| p.snapshots.is_empty())
        .map(|p| format!("{}: {}", p.object, p.detail))
        .chain(wal_problems.iter().cloned())
        .collect();
    let failed = verdicts.iter().filter(|v| !v.restorable).count()
        + report.problems.len()
        + wal_problems.len();
    if ctx.json() {
        print_json(&json!({
            "ok": failed == 0,
            "snapshots": report.snapshots,
            "packs_total": report.packs_total,
            "packs_read": report.packs_read,
            "packs_skipped": report.packs_skipped,
            "bytes_read": report.bytes_read,
            "blobs_checked": report.blobs_checked,
            "wal_bytes_read": wal_read,
            "wal_files_skipped": wal_skipped,
            "backups": verdicts,
            "snapshot_problems": report.problems,
            "problems": other_problems,
        }))?;
    } else {
        println!(
            "checked {} snapshots: read {} of {} packs ({}), {} already proven; {} blobs authenticated; WAL: {} read, {} files already proven",
            report.snapshots,
            report.packs_read,
            report.packs_total,
            bytes(report.bytes_read),
            report.packs_skipped,
            report.blobs_checked,
            bytes(wal_read),
            wal_skipped
        );
        for v in &verdicts {
            let pages = if args.pages {
                format!(", {} pages checked", v.pages_checked)
            } else {
                String::new()
            };
            if v.restorable {
                println!("backup {} ({}): restorable{pages}", v.id.short(), v.cluster);
            } else {
                println!(
                    "backup {} ({}): NOT restorable{pages}: {}",
                    v.id.short(),
                    v.cluster,
                    v.problems.join("; ")
                );
            }
        }
        for problem in &report.problems {
            let affected: Vec<String> = problem.snapshots.iter().map(|s| s.short()).collect();
            println!(
                "PROBLEM {}: {} (snapshots affected: {})",
                problem.object,
                problem.detail,
                if affected.is_empty() {
                    "none".into()
                } else {
                    affected.join(", ")
                }
            );
        }
        for problem in &wal_problems {
            println!("PROBLEM {problem}");
        }
    }
    if failed > 0 {
        bail!(
            "verify found problems in repository {}; see the report above",
            repo.location()
        );
    }
    Ok(())
}

/// Re-checks the page checksums of every relation file of a backup from the stored
/// data. Returns (pages checked, bad pages as (file, block)).
fn check_backup_pages(
    repo: &Repository,
    snapshot: &Snapshot,
    backup_start: Lsn,
) -> Result<(u64, Vec<(String, u32)>)> {
    let top = Tree::load(repo, &snapshot.tree)?;
    let mut checked = 0;
    let mut bad = Vec::new();
    let mut stack: Vec<(Id, PathBuf, String)> = Vec::new();
    for node in &top.nodes {
        let Some(sub) = node.subtree else { continue };
        if node.name == "pgdata" {
            stack.push((sub, PathBuf::new(), String::new()));
        } else if node.name == "tablespaces" {
            for ts in &Tree::load(repo, &sub)?.nodes {
                if let Some(ts_tree) = ts.subtree {
                    stack.push((ts_tree, PathBuf::new(), format!("pg_tblspc/{}/", ts.name)));
                }
            }
        }
    }
    while let Some((tree_id, dir, prefix)) = stack.pop() {
        for node in Tree::load(repo, &tree_id)?.nodes {
            let relative = dir.join(&node.name);
            match node.kind {
                NodeKind::Dir => {
                    if let Some(sub) = node.subtree {
                        stack.push((sub, relative, prefix.clone()));
                    }
                }
                NodeKind::File => {
                    let Some(relation) = RelationFile::parse(Path::new(&relative)) else {
                        continue;
                    };
                    let mut offset = 0u64;
                    for blob in &node.content {
                        let data = repo.load_blob(blob)?;
                        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
                            let Ok(page) = <&[u8; PAGE_SIZE]>::try_from(page) else {
                                continue;
                            };
                            let block = relation.block_at(offset + (i * PAGE_SIZE) as u64);
                            checked += 1;
                            if let PageCheck::Mismatch { .. } =
                                check_page(page, block, backup_start)
                            {
                                bad.push((format!("{prefix}{}", relative.display()), block));
                            }
                        }
                        offset += data.len() as u64;
                    }
                }
                NodeKind::Symlink => {}
            }
        }
    }
    Ok((checked, bad))
}
