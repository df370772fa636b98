//! Verification: prove every snapshot can be restored.
//!
//! Reads every referenced pack (or a random subset), checks it against its name, parses
//! its header, compares it with the index, authenticates and hashes every blob in it.
//! Each problem names the object and the snapshots it affects.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::Result;
use crate::id::Id;
use crate::pack::parse_pack;
use crate::repository::{pack_key, Repository, StoredBlobs};
use crate::snapshot::{walk_trees, Snapshot};

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Only these snapshots (all when empty).
    pub snapshots: Vec<Id>,
    /// Read pack contents (else only structure: snapshots, trees, index coverage).
    pub read_data: bool,
    /// Percentage (0 < p <= 100) of referenced packs to read.
    pub subset_percent: f64,
    pub jobs: usize,
    /// Packs proven good by an earlier run: only checked to exist (a LIST), not read.
    pub skip_packs: HashSet<Id>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            snapshots: Vec::new(),
            read_data: true,
            subset_percent: 100.0,
            jobs: 2,
            skip_packs: HashSet::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub object: String,
    pub detail: String,
    /// Snapshots that cannot be restored because of it.
    pub snapshots: Vec<Id>,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub snapshots: usize,
    pub packs_total: usize,
    pub packs_read: usize,
    pub blobs_checked: u64,
    pub bytes_read: u64,
    /// Packs not read because an earlier run proved them (still checked to exist).
    pub packs_skipped: usize,
    /// Packs read and found good in this run.
    #[serde(skip)]
    pub good_packs: Vec<Id>,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub fn verify(repo: &Repository, options: &VerifyOptions) -> Result<VerifyReport> {
    if repo.has_object_cache() {
        return Err(crate::RepoError::Invalid(
            "verify proves what storage holds: open the repository without the object cache".into(),
        ));
    }
    let mut report = VerifyReport::default();
    if let Err(e) = repo.load_index() {
        report.problems.push(Problem {
            object: "index".into(),
            detail: e.to_string(),
            snapshots: Vec::new(),
        });
        return Ok(report);
    }
    let wanted: HashSet<Id> = options.snapshots.iter().copied().collect();
    let mut snapshot_ids = Vec::new();
    for id in repo.list_objects(crate::repository::ObjectKind::Snapshot)? {
        if !wanted.is_empty() && !wanted.contains(&id) {
            continue;
        }
        snapshot_ids.push(id);
    }
    // Which snapshots need each pack.
    let mut pack_users: HashMap<Id, HashSet<Id>> = HashMap::new();
    for snap_id in &snapshot_ids {
        report.snapshots += 1;
        let snapshot = match Snapshot::load(repo, snap_id) {
            Ok(s) => s,
            Err(e) => {
                report.problems.push(Problem {
                    object: format!("snapshots/{snap_id}"),
                    detail: e.to_string(),
                    snapshots: vec![*snap_id],
                });
                continue;
            }
        };
        let mut blobs = vec![snapshot.tree];
        let walked = walk_trees(repo, &snapshot.tree, &mut |id, tree| {
            blobs.push(*id);
            for node in &tree.nodes {
                blobs.extend(node.content.iter().copied());
            }
            Ok(())
        });
        if let Err(e) = walked {
            report.problems.push(Problem {
                object: format!("tree of snapshot {}", snap_id.short()),
                detail: e.to_string(),
                snapshots: vec![*snap_id],
            });
        }
        let index = repo.index();
        let mut missing = 0usize;
        for blob in blobs {
            match index.get(&blob) {
                Some(loc) => {
                    pack_users.entry(loc.pack).or_default().insert(*snap_id);
                    // A delta is read through its base, so the snapshot needs that too.
                    if let Some(base) = loc.base.and_then(|base| index.get(&base)) {
                        pack_users.entry(base.pack).or_default().insert(*snap_id);
                    }
                }
                None => missing += 1,
            }
        }
        if missing > 0 {
            report.problems.push(Problem {
                object: format!("snapshot {}", snap_id.short()),
                detail: format!("{missing} blob(s) it references are in no index"),
                snapshots: vec![*snap_id],
            });
        }
    }
    let mut packs: Vec<Id> = pack_users.keys().copied().collect();
    packs.sort();
    report.packs_total = packs.len();
    // One LIST finds deleted packs without reading anything.
    let present: HashSet<String> = repo
        .storage()
        .list("data/")?
        .into_iter()
        .map(|m| m.key)
        .collect();
    packs.retain(|pack| {
        if present.contains(&pack_key(pack)) {
            return true;
        }
        let mut snapshots: Vec<Id> = pack_users
            .get(pack)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        snapshots.sort();
        report.problems.push(Problem {
            object: pack_key(pack),
            detail: "missing from storage".into(),
            snapshots,
        });
        false
    });
    if !options.read_data {
        return Ok(report);
    }
    let before = packs.len();
    packs.retain(|p| !options.skip_packs.contains(p));
    report.packs_skipped = before - packs.len();
    if options.subset_percent < 100.0 {
        let take = ((packs.len() as f64 * options.subset_percent / 100.0).ceil() as usize).max(1);
        // A random subset, so that repeated runs cover the whole repository over time.
        let mut keyed: Vec<(Id, Id)> = packs
            .into_iter()
            .map(|p| {
                let mut seed = [0u8; 32];
                crate::crypto::fill_random(&mut seed);
                (Id(seed), p)
            })
            .collect();
        keyed.sort();
        packs = keyed.into_iter().take(take).map(|(_, p)| p).collect();
    }
    let results = crate::parallel::map(packs, options.jobs.max(1), |pack| {
        Ok::<_, crate::RepoError>((pack, check_pack(repo, &pack)))
    })?;
    for (pack, outcome) in results {
        report.packs_read += 1;
        match outcome {
            Ok((blobs, bytes)) => {
                report.blobs_checked += blobs;
                report.bytes_read += bytes;
                report.good_packs.push(pack);
            }
            Err(detail) => {
                let mut snapshots: Vec<Id> = pack_users
                    .get(&pack)
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect();
                snapshots.sort();
                report.problems.push(Problem {
                    object: pack_key(&pack),
                    detail,
                    snapshots,
                });
            }
        }
    }
    Ok(report)
}

/// Reads and checks one pack; returns (blobs checked, bytes read) or what is wrong.
fn check_pack(repo: &Repository, pack: &Id) -> Result<(u64, u64), String> {
    let bytes = repo
        .storage()
        .get(&pack_key(pack))
        .map_err(|e| e.to_string())?;
    if Id::of_bytes(&bytes) != *pack {
        return Err("content does not match its name (truncated or modified)".into());
    }
    let entries = parse_pack(repo.crypto(), &bytes).map_err(|e| e.to_string())?;
    let mut checked = 0;
    // The delta bases of this pack's blobs, read together at its first delta: one
    // request per stretch of an older pack rather than one per delta.
    let mut bases: Option<StoredBlobs> = None;
    for (number, entry) in entries.iter().enumerate() {
        let indexed = repo.index().get(&entry.id);
        if let Some(loc) = indexed {
            if loc.pack == *pack
                && (loc.offset != entry.offset
                    || loc.length != entry.length
                    || loc.base != entry.base)
            {
                return Err(format!(
                    "index disagrees with pack header for blob {}",
                    entry.id.short()
                ));
            }
        }
        let sealed = &bytes[entry.offset as usize..(entry.offset + entry.length) as usize];
        let base = repo.base_of(entry.base).map_err(|e| e.to_string())?;
        if base.is_some() && bases.is_none() {
            let locations = entries[number..]
                .iter()
                .filter_map(|later| repo.base_of(later.base).ok().flatten())
                .map(|(_, location)| location);
            bases = Some(repo.read_stored(locations).map_err(|e| e.to_string())?);
        }
        let sealed_base = match &bases {
            Some(stored) => stored.base(&base).map_err(|e| e.to_string())?,
            None => None,
        };
        let plain = repo
            .open_blob(&entry.id, sealed, pack, sealed_base)
            .map_err(|e| e.to_string())?;
        if plain.len() != entry.raw_length as usize {
            return Err(format!("blob {} has the wrong length", entry.id.short()));
        }
        checked += 1;
    }
    Ok((checked, bytes.len() as u64))
}
