//! Snapshots and trees: how a file tree or a stream is named in terms of blobs.
//!
//! A snapshot points at a root tree blob. A tree blob is the JSON list of one
//! directory's entries; a subdirectory is the id of its own tree blob. Unchanged
//! directories therefore produce identical tree blobs, so the metadata of a large,
//! mostly unchanged tree is deduplicated like its data (restic's design).
//! A stream (e.g. a dump) is a tree with a single file node.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::compression::StreamCompressor;
use crate::error::Result;
use crate::id::Id;
use crate::pack::BlobType;
use crate::repository::{BlobReader, ObjectKind, Repository};
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
    /// A directory entry that stands for no directory of its own (owned by root, mode
    /// 0700, no mtime), grouping `subtree` in a snapshot's tree.
    pub fn synthetic_dir(name: &str, subtree: Id) -> Node {
        Node {
            name: name.to_string(),
            kind: NodeKind::Dir,
            mode: 0o40700,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: 0,
            content: Vec::new(),
            subtree: Some(subtree),
            target: None,
        }
    }

    /// Whether a file of this node's size and mtime can be taken to have its content
    /// without being read, the node being from a snapshot started at `snapshot_time`: its
    /// mtime must be more than a second before that start, since a write in the same
    /// clock tick as the snapshot's read may have left the mtime as it was.
    pub fn same_file_by_size_and_time(
        &self,
        size: u64,
        mtime_ns: i64,
        snapshot_time: DateTime<Utc>,
    ) -> bool {
        let settled_before = snapshot_time
            .timestamp_nanos_opt()
            .unwrap_or(i64::MIN)
            .saturating_sub(1_000_000_000);
        self.kind == NodeKind::File
            && self.size == size
            && self.mtime_ns == mtime_ns
            && mtime_ns < settled_before
    }

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

/// The node at `path` (relative, e.g. `global/pg_control`) under the tree `root`.
pub fn find_path(repo: &Repository, root: &Id, path: &Path) -> Result<Option<Node>> {
    let mut tree = *root;
    let mut parts = path.iter().peekable();
    while let Some(part) = parts.next() {
        let Some(node) = Tree::load(repo, &tree)?
            .find(&part.to_string_lossy())
            .cloned()
        else {
            return Ok(None);
        };
        if parts.peek().is_none() {
            return Ok(Some(node));
        }
        match node.subtree {
            Some(subtree) => tree = subtree,
            None => return Ok(None),
        }
    }
    Ok(None)
}

impl Tree {
    /// A tree of `nodes`, sorted by name as [`Tree::find`] and [`TreeCursor`] expect (for
    /// names that are numbers, such as OIDs of different lengths, not their numeric order).
    pub fn sorted(mut nodes: Vec<Node>) -> Tree {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Tree { nodes }
    }

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

/// Tree JSON a [`TreeWriter`] holds before it compresses the rest as it comes.
const TREE_STREAM_AFTER: usize = 1 << 20;

/// Builds a tree blob node by node, keeping the JSON rather than the nodes; past
/// [`TREE_STREAM_AFTER`] bytes (about 7,000 entries) it hashes and compresses the JSON as
/// it comes, so a directory of 200,000 relation files costs its compressed tree, not its
/// whole encoding. The bytes are those `serde_json` writes for [`Tree`], so unchanged
/// directories still give identical blobs.
pub struct TreeWriter<'r> {
    repo: &'r Repository,
    json: Vec<u8>,
    empty: bool,
    streamed: Option<StreamedTree>,
}

struct StreamedTree {
    hasher: blake3::Hasher,
    compressor: StreamCompressor,
    len: usize,
}

impl<'r> TreeWriter<'r> {
    pub fn new(repo: &'r Repository) -> TreeWriter<'r> {
        TreeWriter {
            repo,
            json: br#"{"nodes":["#.to_vec(),
            empty: true,
            streamed: None,
        }
    }

    /// Appends a node; nodes must come sorted by name.
    pub fn push(&mut self, node: &Node) -> Result<()> {
        if !self.empty {
            self.json.push(b',');
        }
        serde_json::to_writer(&mut self.json, node)
            .map_err(|e| crate::RepoError::Invalid(e.to_string()))?;
        self.empty = false;
        if self.json.len() >= TREE_STREAM_AFTER {
            let streamed = match &mut self.streamed {
                Some(streamed) => streamed,
                None => self.streamed.insert(StreamedTree::new(self.repo)?),
            };
            streamed.absorb(&self.json)?;
            self.json.clear();
        }
        Ok(())
    }

    pub fn save(mut self, saver: &BlobSaver<'_>) -> Result<Id> {
        self.json.extend_from_slice(b"]}");
        match self.streamed {
            None => saver.save(BlobType::Tree, &self.json),
            Some(mut streamed) => {
                streamed.absorb(&self.json)?;
                streamed.save(saver)
            }
        }
    }
}

impl StreamedTree {
    fn new(repo: &Repository) -> Result<StreamedTree> {
        Ok(StreamedTree {
            hasher: repo.crypto().blob_hasher(),
            compressor: repo.compression().stream().map_err(compressing_failed)?,
            len: 0,
        })
    }

    fn absorb(&mut self, json: &[u8]) -> Result<()> {
        self.hasher.update(json);
        self.compressor
            .write_all(json)
            .map_err(compressing_failed)?;
        self.len += json.len();
        Ok(())
    }

    fn save(self, saver: &BlobSaver<'_>) -> Result<Id> {
        let id = Id(*self.hasher.finalize().as_bytes());
        let compressed = self.compressor.finish().map_err(compressing_failed)?;
        saver.save_compressed(BlobType::Tree, id, self.len, &compressed)?;
        Ok(id)
    }
}

fn compressing_failed(e: std::io::Error) -> crate::RepoError {
    crate::RepoError::Invalid(format!("compressing a tree: {e}"))
}

/// The nodes of a stored tree, read in name order (all of them, or those a walk of the
/// same directory asks for): only the compressed blob and one node are held, so a
/// directory of 200,000 entries costs its compressed size.
pub struct TreeCursor {
    reader: std::io::BufReader<BlobReader>,
    next: Option<Node>,
    /// A node was read: a comma may come next.
    after_node: bool,
    ended: bool,
}

impl TreeCursor {
    pub fn open(repo: &Repository, id: &Id) -> Result<TreeCursor> {
        let mut reader = std::io::BufReader::new(repo.read_blob(id)?);
        let mut prefix = [0u8; 10];
        std::io::Read::read_exact(&mut reader, &mut prefix)
            .map_err(|e| reader.get_ref().corrupt(e))?;
        if &prefix != br#"{"nodes":["# {
            return Err(reader.get_ref().corrupt("not a tree"));
        }
        let mut cursor = TreeCursor {
            reader,
            next: None,
            after_node: false,
            ended: false,
        };
        cursor.next = cursor.read_node()?;
        Ok(cursor)
    }

    /// The node named `name`, if the tree has one; names must be asked in ascending
    /// order (nodes before `name` are passed over for good).
    pub fn find(&mut self, name: &str) -> Result<Option<Node>> {
        while let Some(node) = &self.next {
            match node.name.as_str().cmp(name) {
                std::cmp::Ordering::Less => self.next = self.read_node()?,
                std::cmp::Ordering::Equal => return self.next_node(),
                std::cmp::Ordering::Greater => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The next node, in name order.
    pub fn next_node(&mut self) -> Result<Option<Node>> {
        let node = self.next.take();
        if node.is_some() {
            self.next = self.read_node()?;
        }
        Ok(node)
    }

    /// Reads the rest and checks the tree against its id.
    pub fn finish(self) -> Result<()> {
        self.reader.into_inner().finish()
    }

    /// The next node of the JSON array, or `None` after its end.
    fn read_node(&mut self) -> Result<Option<Node>> {
        if self.ended {
            return Ok(None);
        }
        let mut object = Vec::new();
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        loop {
            let mut byte = [0u8];
            std::io::Read::read_exact(&mut self.reader, &mut byte)
                .map_err(|e| self.reader.get_ref().corrupt(e))?;
            let byte = byte[0];
            if depth == 0 {
                match byte {
                    b',' if self.after_node => self.after_node = false,
                    b'{' => {
                        depth = 1;
                        object.push(byte);
                    }
                    b']' => {
                        self.ended = true;
                        return Ok(None);
                    }
                    _ => {
                        let detail = format!("unexpected byte {:?} in a tree", byte as char);
                        return Err(self.reader.get_ref().corrupt(detail));
                    }
                }
                continue;
            }
            object.push(byte);
            if in_string {
                match (escaped, byte) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                self.after_node = true;
                return serde_json::from_slice(&object)
                    .map(Some)
                    .map_err(|e| self.reader.get_ref().corrupt(format!("a tree node: {e}")));
            }
        }
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
    /// A snapshot of `tree` taken on this host, with no label, paths, root, parent, tags
    /// or layer metadata yet.
    pub fn new(
        kind: &str,
        time: DateTime<Utc>,
        end_time: DateTime<Utc>,
        tree: Id,
        summary: Summary,
    ) -> Snapshot {
        Snapshot {
            version: SNAPSHOT_VERSION,
            kind: kind.to_string(),
            time,
            end_time,
            hostname: crate::hostname(),
            label: None,
            paths: Vec::new(),
            tree,
            root: None,
            parent: None,
            tags: BTreeMap::new(),
            summary,
            meta: serde_json::Value::Null,
        }
    }

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
