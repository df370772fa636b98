//! Copying between repositories: snapshots (their trees and data) and named files.
//!
//! Two repositories have different keys, so a blob's id in one says nothing about the
//! other: every blob is read and authenticated from the source, then stored in the
//! target like new data (deduplicated against what the target already has, compressed
//! and sealed with the target's settings). Re-encryption is therefore inherent.
//! A copied snapshot carries the tag [`COPIED_FROM_TAG`] with its source id, so copying
//! again skips it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use crate::error::Result;
use crate::id::Id;
use crate::repository::Repository;
use crate::saver::{BlobSaver, ChangedChunk, SaveStats};
use crate::snapshot::{Node, Snapshot, Tree};
use crate::StoreOutcome;

pub const COPIED_FROM_TAG: &str = "copied-from";

/// Source snapshot ids the target already holds (copied, or the same repository).
pub fn copied_ids(target: &Repository) -> Result<BTreeSet<String>> {
    Ok(Snapshot::load_all(target)?
        .into_iter()
        .flat_map(|(id, s)| {
            let mut ids = vec![id.to_hex()];
            ids.extend(s.tags.get(COPIED_FROM_TAG).cloned());
            ids
        })
        .collect())
}

/// Copies snapshots within one run, remembering source → target blob ids so data
/// shared by several snapshots is read once.
pub struct SnapshotCopier<'a> {
    source: &'a Repository,
    saver: BlobSaver<'a>,
    jobs: usize,
    mapped: Mutex<HashMap<Id, Id>>,
}

impl<'a> SnapshotCopier<'a> {
    pub fn new(source: &'a Repository, target: &'a Repository, jobs: usize) -> Result<Self> {
        source.load_index()?;
        target.load_index()?;
        Ok(SnapshotCopier {
            source,
            saver: BlobSaver::new(target),
            jobs: jobs.max(1),
            mapped: Mutex::new(HashMap::new()),
        })
    }

    /// Copies one snapshot; returns the target's id. `parent` (a target id) replaces the
    /// source's parent, which means nothing in the target.
    pub fn copy(&self, id: &Id, parent: Option<Id>) -> Result<Id> {
        let mut snapshot = Snapshot::load(self.source, id)?;
        snapshot.tree = self.copy_tree(&snapshot.tree)?;
        self.saver.flush()?;
        snapshot.parent = parent;
        snapshot
            .tags
            .insert(COPIED_FROM_TAG.to_string(), id.to_hex());
        snapshot.save(self.saver.repository())
    }

    pub fn stats(&self) -> SaveStats {
        self.saver.stats()
    }

    fn copy_tree(&self, id: &Id) -> Result<Id> {
        if let Some(done) = self.lookup(id) {
            return Ok(done);
        }
        let tree = Tree::load(self.source, id)?;
        let mut nodes = Vec::with_capacity(tree.nodes.len());
        for node in tree.nodes {
            nodes.push(self.copy_node(node)?);
        }
        let copied = Tree { nodes }.save(&self.saver)?;
        self.remember(*id, copied);
        Ok(copied)
    }

    fn copy_node(&self, mut node: Node) -> Result<Node> {
        if let Some(subtree) = node.subtree {
            node.subtree = Some(self.copy_tree(&subtree)?);
        }
        if !node.content.is_empty() {
            let content = std::mem::take(&mut node.content);
            node.content = crate::parallel::map(content, self.jobs, |blob| self.copy_blob(&blob))?;
        }
        Ok(node)
    }

    fn copy_blob(&self, id: &Id) -> Result<Id> {
        if let Some(done) = self.lookup(id) {
            return Ok(done);
        }
        let data = self.source.load_blob(id)?;
        let (copied, new) = self.saver.reserve(&data);
        if new {
            // A delta in the source stays a delta in the target when its base is there.
            let previous = self.target_base(id);
            self.saver.store_changed(&[ChangedChunk {
                id: copied,
                data,
                previous,
            }])?;
        }
        self.remember(*id, copied);
        Ok(copied)
    }

    /// The target's id of the base of source blob `id`, when `id` is a delta and the
    /// target holds its base (copied in this run, or by an earlier one).
    fn target_base(&self, id: &Id) -> Option<Id> {
        let base = self.source.index().get(id)?.base?;
        if let Some(copied) = self.lookup(&base) {
            return Some(copied);
        }
        let data = self.source.load_blob(&base).ok()?;
        let target = self.saver.repository();
        let copied = target.crypto().blob_id(&data);
        let present = target.index().contains(&copied);
        present.then(|| {
            self.remember(base, copied);
            copied
        })
    }

    fn lookup(&self, id: &Id) -> Option<Id> {
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
    }

    fn remember(&self, from: Id, to: Id) {
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(from, to);
    }
}

/// What copying named files did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FilesCopied {
    pub files: u64,
    pub bytes: u64,
    /// Present in the target with other content: left alone and counted.
    pub conflicts: u64,
}

/// Copies the named files under `prefix` whose names the target lacks (names it has are
/// not compared: one LIST per side decides).
pub fn copy_files(
    source: &Repository,
    target: &Repository,
    prefix: &str,
    jobs: usize,
) -> Result<FilesCopied> {
    let present: BTreeSet<String> = target
        .list_files(prefix)?
        .into_iter()
        .map(|m| m.key)
        .collect();
    let missing: Vec<String> = source
        .list_files(prefix)?
        .into_iter()
        .map(|m| m.key)
        .filter(|name| !present.contains(name))
        .collect();
    let outcomes = crate::parallel::map(missing, jobs.max(1), |name| {
        let Some(file) = source.find_file(&name)? else {
            // Removed from the source meanwhile (expire): nothing to copy.
            return Ok((0, 0));
        };
        copy_file_data(target, &name, &file.data)
    })?;
    let mut done = FilesCopied::default();
    for (copied, conflict) in outcomes {
        if conflict == 1 {
            done.conflicts += 1;
        } else if copied > 0 {
            done.files += 1;
            done.bytes += copied;
        }
    }
    Ok(done)
}

/// Stores one named file's content; (bytes stored, 1 if the target holds other content).
fn copy_file_data(target: &Repository, name: &str, data: &[u8]) -> Result<(u64, u64)> {
    Ok(match target.store_file(name, data)? {
        StoreOutcome::Created { stored_bytes, .. } => (stored_bytes.max(1), 0),
        StoreOutcome::AlreadyStored { .. } => (0, 0),
        StoreOutcome::Conflict { .. } => (0, 1),
    })
}

/// Copies one named file; `Ok(false)` when the source does not have it.
pub fn copy_file(source: &Repository, target: &Repository, name: &str) -> Result<bool> {
    let Some(file) = source.find_file(name)? else {
        return Ok(false);
    };
    let (_, conflict) = copy_file_data(target, name, &file.data)?;
    if conflict == 1 {
        return Err(crate::RepoError::Invalid(format!(
            "{name} exists in {} with other content; not replaced",
            target.location()
        )));
    }
    Ok(true)
}
