//! Snapshots and trees: how a file tree or a stream is named in terms of blobs.
//!
//! A snapshot points at a root tree blob. A tree blob is the JSON list of one
//! directory's entries; a subdirectory is the id of its own tree blob. Unchanged
//! directories therefore produce identical tree blobs, so the metadata of a large,
//! mostly unchanged tree is deduplicated like its data (restic's design).
//! A stream (e.g. a dump) is a tree with a single file node.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::id::Id;
use crate::pack::BlobType;
use crate::repository::{ObjectKind, Repository};
use crate::saver::{BlobSaver, SaveStats};

pub const SNAPSHOT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Node {
    /// Whether this is a file stored in whole fixed chunks of `fixed` bytes, so that its
    /// chunk N holds bytes N × `fixed` onwards (what delta backups and delta restores
    /// compare chunk by chunk).
    pub fn in_fixed_chunks(&self, fixed: u64) -> bool {
        self.kind == NodeKind::File && self.content.len() as u64 == self.size.div_ceil(fixed)
    }
}

/// A file's modification time as nodes record it: nanoseconds since 1970.
pub(crate) fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Sorted by name.
    pub nodes: Vec<Node>,
}

impl Tree {
    pub fn find(&self, name: &str) -> Option<&Node> {
        self.nodes
            .binary_search_by(|n| n.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }

    pub fn save(&self, saver: &BlobSaver<'_>) -> Result<Id> {
        let json =
            serde_json::to_vec(self).map_err(|e| crate::RepoError::Invalid(e.to_string()))?;
        saver.save(BlobType::Tree, &json)
    }

    pub fn load(repo: &Repository, id: &Id) -> Result<Tree> {
        let raw = repo.load_blob(id)?;
        serde_json::from_slice(&raw).map_err(|e| repo.corrupt(format!("tree {}", id.short()), e))
    }
}

/// Builds a tree blob node by node, keeping the JSON rather than the nodes: a directory
/// with 200,000 entries then costs its encoded size once, not twice. The bytes are those
/// `serde_json` writes for [`Tree`], so unchanged directories still give identical blobs.
pub struct TreeWriter {
    json: Vec<u8>,
    empty: bool,
}

impl Default for TreeWriter {
    fn default() -> Self {
        TreeWriter {
            json: br#"{"nodes":["#.to_vec(),
            empty: true,
        }
    }
}

impl TreeWriter {
    /// Appends a node; nodes must come sorted by name.
    pub fn push(&mut self, node: &Node) -> Result<()> {
        if !self.empty {
            self.json.push(b',');
        }
        serde_json::to_writer(&mut self.json, node)
            .map_err(|e| crate::RepoError::Invalid(e.to_string()))?;
        self.empty = false;
        Ok(())
    }

    pub fn save(mut self, saver: &BlobSaver<'_>) -> Result<Id> {
        self.json.extend_from_slice(b"]}");
        saver.save(BlobType::Tree, &self.json)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    /// Logical bytes the snapshot represents.
    pub bytes: u64,
    /// Bytes of files taken unchanged from the parent snapshot without reading them.
    pub bytes_unchanged: u64,
    #[serde(flatten)]
    pub save: SaveStats,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Snapshot {
    pub version: u32,
    /// What the snapshot holds: "files", "stream", or a kind of a higher layer.
    pub kind: String,
    pub time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    pub tree: Id,
    /// Metadata of the snapshotted directory itself (owner, mode, mtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<Node>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Id>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    pub summary: Summary,
    /// Free-form metadata of the layer that made the snapshot.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub meta: serde_json::Value,
}

impl Snapshot {
    pub fn save(&self, repo: &Repository) -> Result<Id> {
        repo.save_object(ObjectKind::Snapshot, self)
    }

    pub fn load(repo: &Repository, id: &Id) -> Result<Snapshot> {
        repo.load_object(ObjectKind::Snapshot, id)
            .map_err(|e| match e {
                crate::RepoError::Storage(s) if s.is_not_found() => crate::RepoError::Invalid(
                    format!("no snapshot with id {id} in {}", repo.location()),
                ),
                other => other,
            })
    }

    /// All snapshots, oldest first.
    pub fn load_all(repo: &Repository) -> Result<Vec<(Id, Snapshot)>> {
        let ids = repo.list_objects(ObjectKind::Snapshot)?;
        let mut all =
            crate::parallel::map(ids, 8, |id| Snapshot::load(repo, &id).map(|s| (id, s)))?;
        all.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(all)
    }

    /// Resolves "latest", a full id or a unique id prefix.
    pub fn resolve(repo: &Repository, spec: &str) -> Result<Id> {
        if spec == "latest" {
            return Snapshot::load_all(repo)?
                .last()
                .map(|(id, _)| *id)
                .ok_or_else(|| {
                    crate::RepoError::Invalid(format!("no snapshots in {}", repo.location()))
                });
        }
        repo.resolve_prefix(ObjectKind::Snapshot, spec)
    }
}

/// Visits every tree reachable from `root` (depth first), with its id.
pub fn walk_trees(
    repo: &Repository,
    root: &Id,
    visit: &mut dyn FnMut(&Id, &Tree) -> Result<()>,
) -> Result<()> {
    let mut stack = vec![*root];
    while let Some(id) = stack.pop() {
        let tree = Tree::load(repo, &id)?;
        visit(&id, &tree)?;
        stack.extend(tree.nodes.iter().filter_map(|n| n.subtree));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tree blobs written node by node must be the bytes of the whole `Tree`, or
    /// unchanged directories would stop deduplicating against older snapshots.
    #[test]
    fn tree_writer_writes_what_serde_writes() {
        let node = |name: &str, size: u64| Node {
            name: name.into(),
            kind: NodeKind::File,
            mode: 0o100600,
            uid: 26,
            gid: 26,
            mtime_ns: 1_700_000_000_123_456_789,
            size,
            content: if size > 0 {
                vec![Id([7; 32])]
            } else {
                Vec::new()
            },
            subtree: None,
            target: None,
        };
        for nodes in [
            vec![],
            vec![node("a", 0)],
            vec![node("a", 3), node("b\"q", 0)],
        ] {
            let mut writer = TreeWriter::default();
            for n in &nodes {
                writer.push(n).expect("push");
            }
            writer.json.extend_from_slice(b"]}");
            let whole = serde_json::to_vec(&Tree { nodes }).expect("encode");
            assert_eq!(writer.json, whole);
        }
    }
}
