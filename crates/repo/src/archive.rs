//! Storing a directory tree or a stream.
//!
//! The calling thread walks the tree, reads and chunks files and hashes chunks (BLAKE3
//! is several times faster than compression); chunks that are new go in batches through
//! a bounded channel to `jobs` workers that compress, encrypt and pack them (changed
//! chunks as deltas against the parent's, reading a batch's bases together). Memory is
//! bounded by the channel depth × batch × chunk size plus the open packs, whatever the
//! input size.

use std::fs::{self, File};
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::chunker::Chunker;
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::listing::Listing;
use crate::parallel::FirstError;
use crate::repository::Repository;
use crate::saver::{BlobSaver, ChangedChunk};
use crate::snapshot::{mtime_ns, Node, NodeKind, Summary, Tree, TreeCursor, TreeWriter};

/// New chunks go to the workers in batches of this many (2 MiB of 128 KiB chunks), so a
/// worker reads the delta bases of a stretch of changed chunks together (few requests to
/// object storage rather than one per chunk).
const BATCH: usize = 16;

/// The mode of a directory stored for a dangling symlink given [`Include::DirectoryOnly`].
const EMPTY_DIR_MODE: u32 = 0o040700;

/// Whether to store a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    Yes,
    No,
    /// A directory stored empty: it exists after a restore, its contents are skipped.
    /// Given to a symlink, an empty directory is stored in its place (with the mode and
    /// owner of the directory it points to), not the link.
    DirectoryOnly,
}

/// Decides per entry, given its path relative to the archived root.
pub type Filter = Arc<dyn Fn(&Path, &fs::Metadata) -> Include + Send + Sync>;

/// Sees every chunk read from a file: path relative to the root, offset in the file, and
/// the bytes, e.g. to verify checksums on the way. Unchanged files are not read.
pub type Inspector = Arc<dyn Fn(&Path, u64, &[u8]) + Send + Sync>;

/// Told the size of each file once it is stored (read or reused), for progress bars.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// For a changed file (path relative to the root), the byte ranges known from outside to
/// hold every difference from the parent snapshot's copy (e.g. a database's own change
/// tracking); `None` when unknown. Fixed chunks outside the ranges reuse the parent's
/// chunks without being read.
pub type ChangedRanges = Arc<dyn Fn(&Path) -> Option<Vec<Range<u64>>> + Send + Sync>;

#[derive(Clone)]
pub struct ArchiveOptions {
    pub jobs: usize,
    /// Root tree of the previous snapshot of the same data, with that snapshot's start:
    /// unchanged files (same size and mtime, not modified within a second of that start)
    /// reuse its content list without being read.
    pub parent: Option<(Id, DateTime<Utc>)>,
    /// Read every file even when it looks unchanged.
    pub read_all: bool,
    pub filter: Option<Filter>,
    pub inspector: Option<Inspector>,
    pub changed_ranges: Option<ChangedRanges>,
    pub progress: Option<Progress>,
}

impl std::fmt::Debug for ArchiveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveOptions")
            .field("jobs", &self.jobs)
            .field("parent", &self.parent)
            .field("read_all", &self.read_all)
            .field("filter", &self.filter.is_some())
            .field("inspector", &self.inspector.is_some())
            .field("changed_ranges", &self.changed_ranges.is_some())
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        ArchiveOptions {
            jobs: 2,
            parent: None,
            read_all: false,
            filter: None,
            inspector: None,
            changed_ranges: None,
            progress: None,
        }
    }
}

/// Result of archiving: the root tree and what it cost.
#[derive(Debug, Clone)]
pub struct Archived {
    pub tree: Id,
    /// Owner, mode and mtime of the archived directory itself (trees only).
    pub root: Option<Node>,
    pub summary: Summary,
}

struct Walker<'a, 's> {
    saver: &'a BlobSaver<'s>,
    /// Batches of new chunks, each with the chunk it replaces in the parent's copy.
    tx: crossbeam_channel::Sender<Vec<ChangedChunk>>,
    pending: Vec<ChangedChunk>,
    failure: &'a FirstError<RepoError>,
    options: &'a ArchiveOptions,
    summary: Summary,
}

/// Runs `body` with a pool of workers storing the chunks it sends.
fn with_workers<T>(
    saver: &BlobSaver<'_>,
    options: &ArchiveOptions,
    body: impl FnOnce(&mut Walker<'_, '_>) -> Result<T>,
) -> Result<(T, Summary)> {
    let started = Instant::now();
    saver.repository().load_index()?;
    let failure = FirstError::new();
    let jobs = options.jobs.max(1);
    let (tx, rx) = crossbeam_channel::bounded::<Vec<ChangedChunk>>(jobs * 2);
    let result = saver.uploading(jobs, || {
        std::thread::scope(|scope| {
            for _ in 0..jobs {
                let rx = rx.clone();
                let failure = &failure;
                scope.spawn(move || {
                    for batch in rx {
                        if let Err(e) = saver.store_changed(&batch) {
                            failure.record(e);
                            return;
                        }
                    }
                });
            }
            drop(rx);
            let mut walker = Walker {
                saver,
                tx,
                pending: Vec::with_capacity(BATCH),
                failure: &failure,
                options,
                summary: Summary::default(),
            };
            let out = body(&mut walker).and_then(|value| walker.send_pending().map(|()| value));
            let summary = walker.summary;
            drop(walker); // closes the channel so workers finish
            out.map(|v| (v, summary))
        })
    });
    // A failed upload is reported as itself, not as the worker it stopped.
    let (value, mut summary) = result?;
    if let Some(e) = failure.take() {
        return Err(e);
    }
    saver.flush()?;
    summary.save = saver.stats();
    summary.duration_ms = started.elapsed().as_millis() as u64;
    Ok((value, summary))
}

impl Walker<'_, '_> {
    fn check_failure(&self) -> Result<()> {
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stores chunks; `previous` lists the chunks they replace, by position, for deltas.
    fn store_chunks(
        &mut self,
        chunks: impl Iterator<Item = io::Result<Vec<u8>>>,
        path: &Path,
        previous: &[Id],
    ) -> Result<(Vec<Id>, u64)> {
        let mut ids = Vec::new();
        let mut size = 0u64;
        for (position, chunk) in chunks.enumerate() {
            let chunk = chunk.map_err(|e| RepoError::io(path, e))?;
            size += chunk.len() as u64;
            let (id, new) = self.saver.reserve(&chunk);
            if new {
                self.pending.push(ChangedChunk {
                    id,
                    data: chunk,
                    previous: previous.get(position).copied(),
                });
                if self.pending.len() >= BATCH {
                    self.send_pending()?;
                }
            }
            ids.push(id);
        }
        Ok((ids, size))
    }

    /// Hands the chunks collected so far to the workers.
    fn send_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.check_failure()?;
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(BATCH));
        if self.tx.send(batch).is_err() {
            self.check_failure()?;
            return Err(RepoError::Invalid("all storage workers stopped".into()));
        }
        Ok(())
    }

    /// Like `store_chunks`, showing each chunk to the inspector first.
    fn store_file_chunks(
        &mut self,
        chunks: impl Iterator<Item = io::Result<Vec<u8>>>,
        path: &Path,
        relative: &Path,
        first_offset: u64,
        previous: &[Id],
    ) -> Result<(Vec<Id>, u64)> {
        let Some(inspector) = self.options.inspector.clone() else {
            return self.store_chunks(chunks, path, previous);
        };
        let mut offset = first_offset;
        let inspected = chunks.inspect(move |chunk| {
            if let Ok(data) = chunk {
                inspector(relative, offset, data);
                offset += data.len() as u64;
            }
        });
        self.store_chunks(inspected, path, previous)
    }

    /// Stores a directory, reusing what `parent` (its copy in the previous snapshot)
    /// says is unchanged.
    fn archive_dir(
        &mut self,
        dir: &Path,
        relative: &Path,
        mut parent: Option<TreeCursor>,
    ) -> Result<Id> {
        // Nodes are written out as they come: with the compact listing, a directory of
        // 200,000 relation files costs a few MiB.
        let listing = Listing::read(dir).map_err(|e| RepoError::io(dir, e))?;
        let mut tree = TreeWriter::new(self.saver.repository());
        for (os_name, _) in listing.iter() {
            let path = dir.join(os_name);
            let name = os_name.to_str().map(str::to_owned).ok_or_else(|| {
                RepoError::Invalid(format!(
                    "{}: file name {os_name:?} is not UTF-8",
                    dir.display()
                ))
            })?;
            let meta = match fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                // Removed between listing and stat (e.g. a dropped table): not an error.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(RepoError::io(&path, e)),
            };
            let relative_path = relative.join(&name);
            let include = match &self.options.filter {
                Some(filter) => filter(&relative_path, &meta),
                None => Include::Yes,
            };
            if include == Include::No {
                continue;
            }
            let mut node = Node {
                name: name.clone(),
                kind: NodeKind::File,
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                mtime_ns: mtime_ns(&meta),
                size: 0,
                content: Vec::new(),
                subtree: None,
                target: None,
            };
            let previous = match &mut parent {
                Some(parent) => parent.find(&name)?,
                None => None,
            };
            let previous = previous.as_ref();
            let file_type = meta.file_type();
            if include == Include::DirectoryOnly && !file_type.is_dir() {
                let target = fs::metadata(&path).ok().filter(|m| m.is_dir());
                node.kind = NodeKind::Dir;
                node.subtree = Some(Tree::default().save(self.saver)?);
                node.mode = target.as_ref().map_or(EMPTY_DIR_MODE, |m| m.mode());
                if let Some(target) = target {
                    (node.uid, node.gid, node.mtime_ns) =
                        (target.uid(), target.gid(), mtime_ns(&target));
                }
                self.summary.dirs += 1;
            } else if file_type.is_dir() {
                node.kind = NodeKind::Dir;
                node.subtree = Some(if include == Include::DirectoryOnly {
                    Tree::default().save(self.saver)?
                } else {
                    let parent_subtree = match previous.and_then(|p| p.subtree) {
                        Some(id) => Some(TreeCursor::open(self.saver.repository(), &id)?),
                        None => None,
                    };
                    self.archive_dir(&path, &relative_path, parent_subtree)?
                });
                self.summary.dirs += 1;
            } else if file_type.is_symlink() {
                node.kind = NodeKind::Symlink;
                let target = fs::read_link(&path).map_err(|e| RepoError::io(&path, e))?;
                node.target = Some(target.to_string_lossy().into_owned());
            } else if file_type.is_file() {
                if let Some(prev) = previous.filter(|p| self.unchanged(p, &node, meta.len())) {
                    node.size = prev.size;
                    node.content = prev.content.clone();
                    self.summary.bytes_unchanged += node.size;
                } else if let Some((prev, ranges)) = self.patchable(previous, &relative_path) {
                    let file = match File::open(&path) {
                        Ok(f) => f,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(RepoError::io(&path, e)),
                    };
                    let (content, size, reused) =
                        self.patch_file(&file, meta.len(), prev, &ranges, &path, &relative_path)?;
                    node.content = content;
                    node.size = size;
                    self.summary.bytes_unchanged += reused;
                } else {
                    let file = match File::open(&path) {
                        Ok(f) => f,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(RepoError::io(&path, e)),
                    };
                    // Read no more than the size seen at stat time: data appended later
                    // belongs to the next snapshot (and to WAL, for PostgreSQL).
                    let chunker = Chunker::fixed(
                        file.take(meta.len()),
                        &self.saver.repository().config().chunker,
                    );
                    let replaced = self.fixed_content(previous);
                    let (content, size) =
                        self.store_file_chunks(chunker, &path, &relative_path, 0, replaced)?;
                    node.content = content;
                    node.size = size;
                }
                self.summary.files += 1;
                self.summary.bytes += node.size;
                if let Some(progress) = &self.options.progress {
                    progress(node.size);
                }
            } else {
                tracing::debug!("skipping special file {}", path.display());
                continue;
            }
            tree.push(&node)?;
        }
        if let Some(parent) = parent {
            parent.finish()?;
        }
        tree.save(self.saver)
    }

    /// The parent's content list of a file when it is in whole fixed chunks, so that its
    /// chunk N held the same bytes of the file as chunk N read now; else empty.
    fn fixed_content<'n>(&self, previous: Option<&'n Node>) -> &'n [Id] {
        let fixed = u64::from(self.saver.repository().config().chunker.fixed_size);
        match previous {
            Some(node) if node.in_fixed_chunks(fixed) => &node.content,
            _ => &[],
        }
    }

    /// The parent's copy of a changed file and the ranges that may differ from it, when
    /// the parent's content list is in whole fixed chunks that can be reused one by one.
    fn patchable<'n>(
        &self,
        previous: Option<&'n Node>,
        relative: &Path,
    ) -> Option<(&'n Node, Vec<Range<u64>>)> {
        let previous = previous?;
        let fixed = u64::from(self.saver.repository().config().chunker.fixed_size);
        if self.options.read_all
            || self.options.parent.is_none()
            || !previous.in_fixed_chunks(fixed)
        {
            return None;
        }
        let ranges = (self.options.changed_ranges.as_ref()?)(relative)?;
        Some((previous, ranges))
    }

    /// Stores a changed file chunk by chunk: a chunk that lies outside every changed
    /// range and is whole in both copies reuses the parent's chunk; the others are read.
    /// Returns the content list, the size, and the bytes reused.
    fn patch_file(
        &mut self,
        file: &File,
        size: u64,
        previous: &Node,
        changed: &[Range<u64>],
        path: &Path,
        relative: &Path,
    ) -> Result<(Vec<Id>, u64, u64)> {
        let fixed = u64::from(self.saver.repository().config().chunker.fixed_size);
        let mut content = Vec::new();
        let (mut stored, mut reused) = (0u64, 0u64);
        for index in 0..size.div_ceil(fixed) {
            let start = index * fixed;
            let end = (start + fixed).min(size);
            let previous_end = (start + fixed).min(previous.size);
            let untouched = !changed.iter().any(|r| r.start < end && start < r.end);
            if let (true, true, Some(id)) = (
                untouched,
                end == previous_end,
                previous.content.get(index as usize),
            ) {
                content.push(*id);
                stored += end - start;
                reused += end - start;
                continue;
            }
            let mut chunk = vec![0u8; (end - start) as usize];
            let read = read_at_most(file, &mut chunk, start).map_err(|e| RepoError::io(path, e))?;
            chunk.truncate(read);
            if chunk.is_empty() {
                break; // truncated since stat: the rest belongs to WAL replay
            }
            let replaced = previous.content.get(index as usize..=index as usize);
            let (ids, length) = self.store_file_chunks(
                std::iter::once(Ok(chunk)),
                path,
                relative,
                start,
                replaced.unwrap_or_default(),
            )?;
            content.extend(ids);
            stored += length;
            if (read as u64) < end - start {
                break;
            }
        }
        Ok((content, stored, reused))
    }

    fn unchanged(&self, previous: &Node, current: &Node, size: u64) -> bool {
        is_unchanged(self.options, previous, current.mtime_ns, size)
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns the count.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Whether a file can reuse `previous` without being read: see
/// [`Node::same_file_by_size_and_time`].
fn is_unchanged(options: &ArchiveOptions, previous: &Node, mtime_ns: i64, size: u64) -> bool {
    let Some((_, parent_time)) = options.parent else {
        return false;
    };
    !options.read_all && previous.same_file_by_size_and_time(size, mtime_ns, parent_time)
}

/// What [`archive_tree`] with the same options would read, without reading or writing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Estimate {
    pub files: u64,
    pub bytes: u64,
    pub files_to_read: u64,
    pub bytes_to_read: u64,
}

pub fn estimate_tree(repo: &Repository, root: &Path, options: &ArchiveOptions) -> Result<Estimate> {
    let parent = match options.parent {
        Some((id, _)) => Some(TreeCursor::open(repo, &id)?),
        None => None,
    };
    let mut estimate = Estimate::default();
    estimate_dir(repo, options, root, Path::new(""), parent, &mut estimate)?;
    Ok(estimate)
}

/// Walks like [`Walker::archive_dir`], in name order, reading the parent's tree node by
/// node.
fn estimate_dir(
    repo: &Repository,
    options: &ArchiveOptions,
    dir: &Path,
    relative: &Path,
    mut parent: Option<TreeCursor>,
    estimate: &mut Estimate,
) -> Result<()> {
    let listing = match Listing::read(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(RepoError::io(dir, e)),
    };
    for (os_name, _) in listing.iter() {
        let name = os_name.to_string_lossy();
        let path = dir.join(os_name);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let relative_path = relative.join(&*name);
        let include = match &options.filter {
            Some(filter) => filter(&relative_path, &meta),
            None => Include::Yes,
        };
        let previous = match &mut parent {
            Some(parent) => parent.find(&name)?,
            None => None,
        };
        if include == Include::No {
            continue;
        }
        if meta.is_dir() {
            if include == Include::DirectoryOnly {
                continue;
            }
            let subtree = match previous.as_ref().and_then(|p| p.subtree) {
                Some(id) => Some(TreeCursor::open(repo, &id)?),
                None => None,
            };
            estimate_dir(repo, options, &path, &relative_path, subtree, estimate)?;
        } else if meta.is_file() {
            let mtime_ns = mtime_ns(&meta);
            estimate.files += 1;
            estimate.bytes += meta.len();
            if !previous.is_some_and(|p| is_unchanged(options, &p, mtime_ns, meta.len())) {
                estimate.files_to_read += 1;
                estimate.bytes_to_read += meta.len();
            }
        }
    }
    Ok(())
}

/// Stores the directory tree under `root` with fixed-size chunks.
pub fn archive_tree(
    saver: &BlobSaver<'_>,
    root: &Path,
    options: &ArchiveOptions,
) -> Result<Archived> {
    let meta = fs::metadata(root).map_err(|e| RepoError::io(root, e))?;
    if !meta.is_dir() {
        return Err(RepoError::Invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let parent = match options.parent {
        Some((id, _)) => Some(TreeCursor::open(saver.repository(), &id)?),
        None => None,
    };
    let (tree, summary) = with_workers(saver, options, |walker| {
        walker.summary.dirs += 1;
        walker.archive_dir(root, Path::new(""), parent)
    })?;
    let root_node = Node {
        name: String::new(),
        kind: NodeKind::Dir,
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: mtime_ns(&meta),
        size: 0,
        content: Vec::new(),
        subtree: Some(tree),
        target: None,
    };
    Ok(Archived {
        tree,
        root: Some(root_node),
        summary,
    })
}

/// Stores a byte stream with content-defined chunks as a tree with one file `name`.
pub fn archive_stream<R: Read>(
    saver: &BlobSaver<'_>,
    reader: R,
    name: &str,
    options: &ArchiveOptions,
) -> Result<Archived> {
    let (node, summary) = with_workers(saver, options, |walker| {
        let chunker = Chunker::content_defined(reader, &saver.repository().config().chunker);
        let (content, size) = walker.store_chunks(chunker, Path::new(name), &[])?;
        walker.summary.files = 1;
        walker.summary.bytes = size;
        Ok(Node {
            name: name.to_string(),
            kind: NodeKind::File,
            mode: 0o100600,
            uid: 0,
            gid: 0,
            // A stream has no modification time (the snapshot records when it was
            // taken); a fixed value keeps the tree of identical streams identical, so
            // storing the same stream again adds no blob at all.
            mtime_ns: 0,
            size,
            content,
            subtree: None,
            target: None,
        })
    })?;
    let tree = Tree { nodes: vec![node] }.save(saver)?;
    saver.flush()?;
    let mut summary = summary;
    summary.save = saver.stats();
    Ok(Archived {
        tree,
        root: None,
        summary,
    })
}
