//! Garbage collection: plan, then execute (so `--dry-run` is the plan alone).
//!
//! Runs under the exclusive lock, so no writer is active: a pack that no index names was
//! left by an interrupted run and can go. Order of execution keeps the repository
//! consistent if interrupted at any point: (1) copy live blobs out of mostly-dead packs
//! into new packs, (2) write a new complete index, (3) delete the old index objects,
//! (4) delete the packs nothing references any more.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::Result;
use crate::id::Id;
use crate::index::IndexFile;
use crate::pack::{BlobType, PackEntry};
use crate::repository::{pack_key, Repository};
use crate::saver::BlobSaver;
use crate::snapshot::{walk_trees, Snapshot};

/// Repack a pack when less than this fraction of its bytes is still referenced.
pub const REPACK_BELOW_USED: f64 = 0.5;

#[derive(Debug, Default, Serialize)]
pub struct GcPlan {
    pub snapshots: usize,
    pub referenced_blobs: usize,
    /// Packs with no referenced blob, or that no index names: deleted.
    pub delete_packs: Vec<Id>,
    /// Packs whose live blobs are copied to new packs before deletion.
    pub repack_packs: Vec<Id>,
    pub bytes_freed_estimate: u64,
    pub bytes_repacked: u64,
    /// Index objects replaced by a single new one.
    pub index_files: usize,
    /// Blobs referenced by snapshots but found in no index (verify reports them too).
    pub missing_blobs: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct GcResult {
    pub plan: GcPlan,
    pub packs_deleted: usize,
    pub packs_written: u64,
    pub index_files_written: usize,
}

/// Every blob (tree and data) referenced by any snapshot, and the bases of those stored
/// as deltas (they are read to read the delta). Needs the index loaded.
pub fn referenced_blobs(repo: &Repository) -> Result<(usize, HashSet<Id>)> {
    let snapshots = Snapshot::load_all(repo)?;
    let mut used = HashSet::new();
    for (_, snapshot) in &snapshots {
        if used.contains(&snapshot.tree) {
            continue;
        }
        let mut visited_here = Vec::new();
        walk_trees(repo, &snapshot.tree, &mut |id, tree| {
            visited_here.push(*id);
            for node in &tree.nodes {
                used.extend(node.content.iter().copied());
            }
            Ok(())
        })?;
        used.extend(visited_here);
    }
    let index = repo.index();
    let bases: Vec<Id> = used
        .iter()
        .filter_map(|id| index.get(id).and_then(|loc| loc.base))
        .collect();
    used.extend(bases);
    Ok((snapshots.len(), used))
}

pub fn plan(repo: &Repository) -> Result<GcPlan> {
    repo.load_index()?;
    let (snapshots, used) = referenced_blobs(repo)?;
    let index = repo.index();
    let stored: HashMap<Id, u64> = repo
        .storage()
        .list("data/")?
        .into_iter()
        .filter_map(|m| {
            m.key
                .rsplit('/')
                .next()
                .and_then(|s| s.parse().ok())
                .map(|id| (id, m.size))
        })
        .collect();
    // Live bytes per pack: a blob counts only in the pack the index resolves it to.
    let mut live: HashMap<Id, u64> = HashMap::new();
    let mut total: HashMap<Id, u64> = HashMap::new();
    for (id, loc) in index.iter() {
        *total.entry(loc.pack).or_default() += loc.length as u64;
        if used.contains(&id) {
            *live.entry(loc.pack).or_default() += loc.length as u64;
        }
    }
    let mut plan = GcPlan {
        snapshots,
        referenced_blobs: used.len(),
        index_files: index.files.len(),
        missing_blobs: used.iter().filter(|id| !index.contains(id)).count(),
        ..GcPlan::default()
    };
    for (pack, size) in &stored {
        let live_bytes = live.get(pack).copied().unwrap_or(0);
        let total_bytes = total.get(pack).copied().unwrap_or(0);
        if live_bytes == 0 {
            plan.delete_packs.push(*pack);
            plan.bytes_freed_estimate += size;
        } else if (live_bytes as f64) < REPACK_BELOW_USED * total_bytes as f64 {
            plan.repack_packs.push(*pack);
            plan.bytes_repacked += live_bytes;
            plan.bytes_freed_estimate += size - live_bytes.min(*size);
        }
    }
    plan.delete_packs.sort();
    plan.repack_packs.sort();
    Ok(plan)
}

pub fn execute(repo: &Repository, plan: GcPlan, jobs: usize) -> Result<GcResult> {
    let (_, used) = referenced_blobs(repo)?;
    let doomed: HashSet<Id> = plan
        .delete_packs
        .iter()
        .chain(&plan.repack_packs)
        .copied()
        .collect();
    let mut result = GcResult::default();

    // (1) copy live blobs out of packs being repacked.
    let saver = BlobSaver::new(repo);
    let to_copy: Vec<(Id, Vec<(Id, BlobType)>)> = {
        let index = repo.index();
        let mut by_pack: HashMap<Id, Vec<(Id, BlobType)>> = HashMap::new();
        for (id, loc) in index.iter() {
            if used.contains(&id) && plan.repack_packs.contains(&loc.pack) {
                by_pack
                    .entry(loc.pack)
                    .or_default()
                    .push((id, loc.blob_type));
            }
        }
        by_pack.into_iter().collect()
    };
    crate::parallel::map(to_copy, jobs, |(_, blobs)| {
        for (id, blob_type) in blobs {
            let data = repo.load_blob(&id)?;
            saver.store(blob_type, id, &data)?;
        }
        Ok::<(), crate::RepoError>(())
    })?;
    saver.flush()?;
    result.packs_written = saver.stats().packs_written;

    // (2) one new index covering every pack that stays, read from the index objects
    // themselves: the in-memory index keeps only the first location of a blob, which
    // for a repacked blob is the doomed pack.
    let old_files = repo.list_index_files()?;
    let mut keep: HashMap<Id, Vec<PackEntry>> = HashMap::new();
    for file_id in &old_files {
        for (pack, entries) in repo.load_index_file(file_id)?.packs {
            if !doomed.contains(&pack) {
                keep.entry(pack).or_insert(entries);
            }
        }
    }
    let mut file = IndexFile {
        packs: keep.into_iter().collect(),
    };
    file.packs.sort_by_key(|(p, _)| *p);
    let new_index = repo.save_index_file(&file)?;
    result.index_files_written = 1;

    // (3) old index objects, (4) dead packs.
    for old in old_files.iter().filter(|f| **f != new_index) {
        repo.storage().delete(&format!("index/{old}"))?;
    }
    for pack in &doomed {
        repo.storage().delete(&pack_key(pack))?;
        result.packs_deleted += 1;
    }
    repo.reset_index();
    result.plan = plan;
    Ok(result)
}

#[derive(Debug, Default, Serialize)]
pub struct RebuildResult {
    pub packs: usize,
    pub blobs: usize,
    /// Packs whose header could not be read; they are left in place for inspection.
    pub unreadable_packs: Vec<String>,
    pub index_files_replaced: usize,
}

/// Recreates the index from the pack headers alone (run under the exclusive lock).
/// Unreadable packs are reported and left out; `verify` names the snapshots they hurt.
pub fn rebuild_index(repo: &Repository, jobs: usize) -> Result<RebuildResult> {
    let packs: Vec<(Id, u64)> = repo
        .storage()
        .list("data/")?
        .into_iter()
        .filter_map(|m| {
            let id = m.key.rsplit('/').next()?.parse::<Id>().ok()?;
            Some((id, m.size))
        })
        .collect();
    let headers = crate::parallel::map(packs, jobs, |(pack, size)| {
        Ok::<_, crate::RepoError>((pack, read_pack_header(repo, &pack, size)))
    })?;
    let mut result = RebuildResult::default();
    let mut file = IndexFile::default();
    for (pack, header) in headers {
        match header {
            Ok(entries) => {
                result.packs += 1;
                result.blobs += entries.len();
                file.packs.push((pack, entries));
            }
            Err(e) => result
                .unreadable_packs
                .push(format!("{}: {e}", pack_key(&pack))),
        }
    }
    file.packs.sort_by_key(|(p, _)| *p);
    result.unreadable_packs.sort();
    let old_files = repo.list_index_files()?;
    let new_index = repo.save_index_file(&file)?;
    for old in old_files.iter().filter(|f| **f != new_index) {
        repo.storage().delete(&format!("index/{old}"))?;
        result.index_files_replaced += 1;
    }
    repo.reset_index();
    Ok(result)
}

/// Reads a pack's header with two ranged reads (trailer, then sealed header).
fn read_pack_header(repo: &Repository, pack: &Id, size: u64) -> Result<Vec<PackEntry>> {
    let key = pack_key(pack);
    let corrupt = |detail: String| repo.corrupt(key.clone(), detail);
    let trailer_len = crate::pack::TRAILER_LEN as u64;
    if size < trailer_len {
        return Err(corrupt("shorter than a pack trailer".into()));
    }
    let trailer = repo
        .storage()
        .get_range(&key, size - trailer_len, trailer_len)?;
    let header_len =
        crate::pack::header_length(&trailer).map_err(|e| corrupt(e.to_string()))? as u64;
    let header_start = size
        .checked_sub(trailer_len + header_len)
        .ok_or_else(|| corrupt("header length exceeds the pack".into()))?;
    let sealed = repo.storage().get_range(&key, header_start, header_len)?;
    let entries =
        crate::pack::parse_header(repo.crypto(), &sealed).map_err(|e| corrupt(e.to_string()))?;
    if let Some(bad) = entries
        .iter()
        .find(|e| e.offset as u64 + e.length as u64 > header_start)
    {
        return Err(corrupt(format!(
            "blob {} extends past the blob area",
            bad.id.short()
        )));
    }
    Ok(entries)
}
