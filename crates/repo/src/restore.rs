//! Reading snapshots back: a tree into a directory, or a single-file tree to a writer.
//!
//! A file's blobs are read a window at a time: the stored bytes of the window's blobs and
//! of their delta bases are sorted by pack and offset and fetched with one ranged read
//! per stretch of a pack, so restoring from object storage costs few requests per pack,
//! not per chunk (a delta's base usually sits between its unchanged neighbours).
//!
//! Trees are read node by node and files restored in bounded batches, so memory does not
//! grow with the number of files (a data directory of 200,000 relation files).

use std::ffi::OsStr;
use std::fs::{self, File, FileType, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

use crate::direct::NewFile;
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::index::BlobLocation;
use crate::listing::Listing;
use crate::repository::Repository;
use crate::snapshot::{mtime_ns, Node, NodeKind, TreeCursor};

/// The most stored bytes one window of a file's blobs may need.
const MAX_WINDOW: u64 = crate::repository::MAX_COALESCED_READ;

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct RestoreStats {
    pub files: u64,
    pub dirs: u64,
    /// Of the files' content, without the holes.
    pub bytes: u64,
    /// Of `files`, those restored as holes ([`RestoreOptions::holes`]).
    pub holes: u64,
}

/// Writes the content of one file node to `out`, in order.
pub fn write_content(repo: &Repository, content: &[Id], out: &mut dyn Write) -> Result<u64> {
    write_blobs(repo, content, &mut Copying(out), Path::new("output"))
}

/// Where restored bytes go. A file written with direct I/O lends room in its block, so
/// that a blob is decompressed straight into it rather than copied there (the copy was
/// 7% of a restore's CPU).
trait Sink: Write {
    fn space(&mut self, _len: usize) -> Option<&mut [u8]> {
        None
    }

    fn commit(&mut self, _len: usize) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink for NewFile {
    fn space(&mut self, len: usize) -> Option<&mut [u8]> {
        NewFile::space(self, len)
    }

    fn commit(&mut self, len: usize) -> std::io::Result<()> {
        NewFile::commit(self, len)
    }
}

/// Any other writer: each blob is copied into it.
struct Copying<'w>(&'w mut dyn Write);

impl Write for Copying<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Sink for Copying<'_> {}

/// Writes the blobs of `content` in order to `out`, named `destination` in errors.
fn write_blobs(
    repo: &Repository,
    content: &[Id],
    out: &mut dyn Sink,
    destination: &Path,
) -> Result<u64> {
    repo.load_index()?;
    let mut written = 0u64;
    let mut i = 0;
    while i < content.len() {
        let window = next_window(repo, &content[i..])?;
        let fetched = repo.read_stored(window.iter().flat_map(|(_, location, base)| {
            std::iter::once(*location).chain(base.map(|(_, b)| b))
        }))?;
        for (id, location, base) in &window {
            let sealed = fetched.bytes(location)?;
            let base = fetched.base(base)?;
            let len = location.raw_length as usize;
            if let Some(space) = out.space(len) {
                repo.open_blob_into(id, sealed, &location.pack, base, space)?;
                out.commit(len).map_err(|e| RepoError::io(destination, e))?;
                written += len as u64;
                continue;
            }
            let plain = repo.open_blob(id, sealed, &location.pack, base)?;
            out.write_all(&plain)
                .map_err(|e| RepoError::io(destination, e))?;
            written += plain.len() as u64;
        }
        i += window.len();
    }
    Ok(written)
}

/// A blob, where it is stored, and its delta base with where that is stored.
type WindowBlob = (Id, BlobLocation, Option<(Id, BlobLocation)>);

/// The blobs from the start of `content` whose stored bytes, bases included, come to at
/// most [`MAX_WINDOW`] (always at least one blob).
fn next_window(repo: &Repository, content: &[Id]) -> Result<Vec<WindowBlob>> {
    let index = repo.index();
    let mut window = Vec::new();
    let mut stored = 0u64;
    for id in content {
        let location = index.get(id).ok_or(RepoError::MissingBlob(*id))?;
        let base = repo.base_of(location.base)?;
        let cost = u64::from(location.length) + base.map_or(0, |(_, b)| u64::from(b.length));
        if !window.is_empty() && stored + cost > MAX_WINDOW {
            break;
        }
        stored += cost;
        window.push((*id, location, base));
    }
    Ok(window)
}

struct PendingFile {
    path: PathBuf,
    node: Node,
    /// Restored as a hole of the node's size, its content not read.
    hole: bool,
}

/// A batch of files is restored (and fsynced) before the walk goes on once it holds this
/// many files, or this many chunks (8 MiB of ids, 32 GiB of 128 KiB chunks): large
/// enough that the threads rarely wait at a batch's end, small enough that memory does
/// not grow with the number of files.
const BATCH_FILES: usize = 4096;
const BATCH_CHUNKS: usize = 1 << 18;

#[derive(Default)]
struct Batch {
    files: Vec<PendingFile>,
    chunks: usize,
}

impl Batch {
    /// Adds a file; whether the batch is full.
    fn add(&mut self, file: PendingFile) -> bool {
        self.chunks += file.node.content.len();
        self.files.push(file);
        self.files.len() >= BATCH_FILES || self.chunks >= BATCH_CHUNKS
    }

    fn take(&mut self) -> Vec<PendingFile> {
        self.chunks = 0;
        std::mem::take(&mut self.files)
    }
}

/// Visits the directories of the tree `root` as restored under `target`, depth first,
/// each with a cursor over its nodes; `visit` returns the subdirectories (tree, path).
fn walk_dirs(
    repo: &Repository,
    root: &Id,
    target: &Path,
    mut visit: impl FnMut(&Path, &mut TreeCursor) -> Result<Vec<(Id, PathBuf)>>,
) -> Result<()> {
    let mut stack = vec![(*root, target.to_path_buf())];
    while let Some((tree, dir)) = stack.pop() {
        let mut cursor = TreeCursor::open(repo, &tree)?;
        let subdirs = visit(&dir, &mut cursor)?;
        cursor.finish()?;
        stack.extend(subdirs);
    }
    Ok(())
}

/// The bytes of the files under the tree `root`: what a restore of it writes.
pub fn tree_bytes(repo: &Repository, root: &Id) -> Result<u64> {
    let mut total = 0;
    walk_dirs(repo, root, Path::new(""), |dir, cursor| {
        let mut subdirs = Vec::new();
        while let Some(node) = cursor.next_node()? {
            match (node.kind, node.subtree) {
                (NodeKind::File, _) => total += node.size,
                (NodeKind::Dir, Some(subtree)) => subdirs.push((subtree, dir.join(&node.name))),
                _ => {}
            }
        }
        Ok(subdirs)
    })?;
    Ok(total)
}

/// A filesystem without room for what a restore would write onto it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    /// The first target directory on that filesystem.
    pub target: PathBuf,
    pub needed: u64,
    /// Free for unprivileged users.
    pub free: u64,
}

/// Whether a restore fits, before it writes anything: `needs` are the bytes to be
/// written into each target directory (existing or not); those on one filesystem are
/// added up and compared with the space it has free for unprivileged users.
pub fn shortage_of_room(needs: &[(&Path, u64)]) -> Result<Option<Shortage>> {
    use std::os::unix::fs::MetadataExt;
    let mut filesystems: Vec<(u64, Shortage)> = Vec::new();
    for &(target, bytes) in needs {
        let existing = target
            .ancestors()
            .find(|dir| dir.exists())
            .unwrap_or(Path::new("/"));
        let device = fs::metadata(existing)
            .map_err(|e| RepoError::io(existing, e))?
            .dev();
        match filesystems.iter_mut().find(|(other, _)| *other == device) {
            Some((_, filesystem)) => filesystem.needed += bytes,
            None => {
                let stat = rustix::fs::statvfs(existing)
                    .map_err(|e| RepoError::io(existing, std::io::Error::from(e)))?;
                let free = stat.f_bavail.saturating_mul(stat.f_frsize);
                let target = target.to_path_buf();
                filesystems.push((
                    device,
                    Shortage {
                        target,
                        needed: bytes,
                        free,
                    },
                ));
            }
        }
    }
    Ok(filesystems
        .into_iter()
        .map(|(_, filesystem)| filesystem)
        .find(|filesystem| filesystem.needed > filesystem.free))
}

/// How a restore makes what it wrote durable before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMethod {
    /// fsync every file written and every directory (what PostgreSQL's tools do by
    /// default).
    Fsync,
    /// One `syncfs(2)` of the target's filesystem at the end, as PostgreSQL's
    /// `--sync-method=syncfs`: one journal commit instead of one per file (20,000 files of
    /// 8 KiB: 0.19 s against 4.7 s), but it also writes out whatever else is dirty on that
    /// filesystem, and before Linux 5.8 it did not report write errors.
    Syncfs,
}

impl std::str::FromStr for SyncMethod {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<SyncMethod, String> {
        match text {
            "fsync" => Ok(SyncMethod::Fsync),
            "syncfs" => Ok(SyncMethod::Syncfs),
            _ => Err(format!("unknown sync method {text:?}: use fsync or syncfs")),
        }
    }
}

impl SyncMethod {
    /// The last sync of a restore into `target`: the directory itself, or its whole
    /// filesystem.
    fn finish(self, target: &Path) -> Result<()> {
        match self {
            SyncMethod::Fsync => fsync_path(target),
            SyncMethod::Syncfs => File::open(target)
                .and_then(|dir| rustix::fs::syncfs(&dir).map_err(std::io::Error::from))
                .map_err(|e| RepoError::io(target, e)),
        }
    }
}

/// How a restore writes.
#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions<'a> {
    /// Threads writing (in a delta restore also comparing) files.
    pub jobs: usize,
    pub sync: SyncMethod,
    /// A file, relative to the target, that the restore neither writes nor touches, for
    /// the caller to write last with [`restore_file_last`]: one whose presence says that
    /// the restore is complete (a PostgreSQL data directory cannot start without its
    /// `global/pg_control`, so an interrupted restore cannot be started by mistake).
    pub held_back: Option<&'a Path>,
    /// Directories, relative to the target, whose files are restored as holes: files of
    /// their recorded size that read as zeros, take no disk space, and whose content is
    /// neither read from the repository nor compared (a database left out of a
    /// PostgreSQL restore, which recovery can still replay into and `DROP DATABASE`
    /// then removes).
    pub holes: &'a [PathBuf],
    /// Directories, relative to the target, that the restore creates but whose contents
    /// it neither writes nor removes: another restore fills them (a PostgreSQL tablespace
    /// located inside the data directory).
    pub left_alone: &'a [PathBuf],
    /// Owner ids given in place of the recorded ones (which are kept otherwise).
    pub owners: OwnerMap,
    /// Told the bytes of each file once it is restored (in a delta restore: checked).
    pub progress: Option<Progress<'a>>,
}

/// A callback told how many more bytes are done, from any thread.
#[derive(Clone, Copy)]
pub struct Progress<'a>(pub &'a (dyn Fn(u64) + Sync));

impl std::fmt::Debug for Progress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// Owner ids to give restored entries in place of those recorded: a restore on another
/// host, where the same user and group have other ids. Each pair is (recorded, local).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerMap {
    pub uid: Option<(u32, u32)>,
    pub gid: Option<(u32, u32)>,
}

impl OwnerMap {
    /// `node` with its owner ids mapped.
    pub fn apply(&self, mut node: Node) -> Node {
        if let Some((_, local)) = self.uid.filter(|(recorded, _)| *recorded == node.uid) {
            node.uid = local;
        }
        if let Some((_, local)) = self.gid.filter(|(recorded, _)| *recorded == node.gid) {
            node.gid = local;
        }
        node
    }
}

impl RestoreOptions<'_> {
    pub fn new(jobs: usize, sync: SyncMethod) -> RestoreOptions<'static> {
        RestoreOptions {
            jobs,
            sync,
            held_back: None,
            holes: &[],
            left_alone: &[],
            owners: OwnerMap::default(),
            progress: None,
        }
    }

    fn report(&self, bytes: u64) {
        if let Some(Progress(progress)) = self.progress {
            progress(bytes);
        }
    }

    fn holds_back(&self, target: &Path, path: &Path) -> bool {
        self.held_back.is_some_and(|held| target.join(held) == path)
    }

    fn is_hole(&self, target: &Path, path: &Path) -> bool {
        let relative = path.strip_prefix(target).unwrap_or(path);
        self.holes.iter().any(|dir| relative.starts_with(dir))
    }

    /// The subtree to restore into the directory `path`: none when it is left alone.
    fn subtree_of(&self, target: &Path, path: &Path, node: &Node) -> Option<Id> {
        let relative = path.strip_prefix(target).unwrap_or(path);
        node.subtree
            .filter(|_| !self.left_alone.iter().any(|dir| relative == dir))
    }
}

/// Restores the tree `root` into `target`, which must be absent or an empty directory.
pub fn restore_tree(
    repo: &Repository,
    root: &Id,
    target: &Path,
    options: RestoreOptions<'_>,
) -> Result<RestoreStats> {
    let sync = options.sync;
    repo.load_index()?;
    match fs::read_dir(target) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(RepoError::Invalid(format!(
                    "target directory {} is not empty; choose an empty or new directory",
                    target.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(target).map_err(|e| RepoError::io(target, e))?;
        }
        Err(e) => return Err(RepoError::io(target, e)),
    }
    let mut stats = RestoreStats::default();
    let mut batch = Batch::default();
    let mut dirs = Vec::new();
    walk_dirs(repo, root, target, |dir, cursor| {
        let mut subdirs = Vec::new();
        while let Some(node) = cursor.next_node()? {
            let node = options.owners.apply(node);
            let path = dir.join(&node.name);
            match node.kind {
                NodeKind::Dir => {
                    fs::create_dir(&path).map_err(|e| RepoError::io(&path, e))?;
                    if let Some(sub) = options.subtree_of(target, &path, &node) {
                        subdirs.push((sub, path.clone()));
                    }
                    stats.dirs += 1;
                    dirs.push(PendingFile {
                        path,
                        node,
                        hole: false,
                    });
                }
                NodeKind::Symlink => {
                    let target = node.target.clone().unwrap_or_default();
                    symlink(&target, &path).map_err(|e| RepoError::io(&path, e))?;
                    set_symlink_owner(&path, &node);
                }
                NodeKind::File => {
                    let hole = options.is_hole(target, &path);
                    stats.files += 1;
                    stats.holes += u64::from(hole);
                    if !hole {
                        stats.bytes += node.size;
                    }
                    if options.holds_back(target, &path) {
                        continue;
                    }
                    if batch.add(PendingFile { path, node, hole }) {
                        restore_files(repo, &batch.take(), options)?;
                    }
                }
            }
        }
        Ok(subdirs)
    })?;
    restore_files(repo, &batch.take(), options)?;
    finish_dirs(dirs, target, sync)?;
    Ok(stats)
}

/// Gives the directories their metadata, deepest first and last of all (creating files
/// changes their mtimes), and syncs them and `target`: the last step of a restore.
fn finish_dirs(mut dirs: Vec<PendingFile>, target: &Path, sync: SyncMethod) -> Result<()> {
    dirs.reverse();
    for dir in &dirs {
        settle(&dir.path, &dir.node, sync)?;
    }
    sync.finish(target)
}

/// Writes new files in parallel, each settled ([`Finishers`]) once written.
fn restore_files(
    repo: &Repository,
    files: &[PendingFile],
    options: RestoreOptions<'_>,
) -> Result<()> {
    let RestoreOptions { jobs, sync, .. } = options;
    let work = plan_restore(repo, files)?;
    // Threads take the work in order; each, as it takes one, has the storage start on the
    // next `jobs` (a thread otherwise waited on the disk for every window it read).
    let read_through = AtomicUsize::new(0);
    let numbered: Vec<(usize, &Restore)> = work.iter().enumerate().collect();
    with_finishers(files, sync, |finishers| {
        // Created by `plan_restore`: nothing to write.
        for (number, _) in files.iter().enumerate().filter(|(_, file)| file.hole) {
            finishers.finish(number);
        }
        crate::parallel::map(numbered, jobs.max(1), |(position, item)| {
            finishers.check()?;
            let end = (position + 1 + jobs).min(work.len());
            let start = read_through.fetch_max(end, Ordering::Relaxed);
            for ahead in &work[start.max(position + 1).min(end)..end] {
                read_ahead(repo, files, ahead);
            }
            match item {
                Restore::File(number) => {
                    write_file(repo, &files[*number])?;
                    finishers.finish(*number);
                    options.report(files[*number].node.size);
                    Ok::<_, RepoError>(())
                }
                Restore::Part(number, chunks) => {
                    let written = restore_part(repo, &files[*number], chunks.clone())?;
                    options.report(written);
                    Ok(())
                }
            }
        })?;
        // A split file is written once all its parts are.
        for item in &work {
            if let Restore::Part(number, chunks) = item {
                if chunks.start == 0 {
                    finishers.finish(*number);
                }
            }
        }
        Ok(())
    })
}

/// Hands written files to threads that [`settle`] them (owner, mode, mtime, fsync) while
/// the writers go on with others: an fsync waits for the disk and the journal, and
/// concurrent fsyncs share the journal's commits. Settling each file on the thread that
/// wrote it kept a CPU idle for 0.33 s of a 1.3 s restore (1,000 files); a pass of its
/// own after all writes took longer than settling alongside them for many small files
/// (40,963 files, 410 MiB, four restores each: median 5.88 against 5.25 s) and was no
/// different beyond noise on pgbench's 978.
struct Finishers<'a> {
    queue: crossbeam_channel::Sender<usize>,
    failed: &'a AtomicBool,
}

impl Finishers<'_> {
    /// Queues the written file of this number to be settled.
    fn finish(&self, number: usize) {
        // Fails only when every finisher stopped on an error, which `with_finishers`
        // returns.
        let _ = self.queue.send(number);
    }

    /// An error once a finisher failed, so that writers stop early; the finisher's own
    /// error is the one reported.
    fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(RepoError::Invalid(
                "stopped: a restored file could not be settled".into(),
            ));
        }
        Ok(())
    }
}

/// Runs `write` with [`Finishers`] for `files` on [`SYNC_THREADS`] threads; returns once
/// every file handed to them is settled, with the first error of either side.
fn with_finishers<T>(
    files: &[PendingFile],
    sync: SyncMethod,
    write: impl FnOnce(&Finishers<'_>) -> Result<T>,
) -> Result<T> {
    let (queue, to_finish) = crossbeam_channel::unbounded::<usize>();
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..SYNC_THREADS)
            .map(|_| {
                let (to_finish, failed) = (to_finish.clone(), &failed);
                scope.spawn(move || -> Result<()> {
                    for number in to_finish {
                        let file = &files[number];
                        settle(&file.path, &file.node, sync).inspect_err(|_| {
                            failed.store(true, Ordering::Relaxed);
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        drop(to_finish);
        let finishers = Finishers {
            queue,
            failed: &failed,
        };
        let written = write(&finishers);
        drop(finishers);
        threads.into_iter().try_for_each(|thread| {
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        written
    })
}

/// Files of more than this many chunks are restored in parts of this many, on all threads
/// at once, so that a 1 GiB relation segment is not left to one thread while the others
/// idle once the smaller files are done.
const RESTORE_PART: usize = 256;

/// One unit of a restore's parallel work, by index into its files.
enum Restore {
    File(usize),
    /// The file's chunks in this range, written at their offset.
    Part(usize, std::ops::Range<usize>),
}

/// Splits the restore into work, largest files in parts; creates the files it splits at
/// their full size (so that no part's writes extend the file, which would serialise them),
/// and the holes, which need no more work.
/// The parts of different files are interleaved by how far into their file they are, so
/// that all split files progress together: files differ in what a byte costs (pgbench's
/// accounts table compresses 38× and decompresses at 2.5 GB/s, its primary key 6× and
/// 0.65 GB/s), and in file order the table's parts kept the disk busy with the CPUs
/// half idle, then the index's the CPUs busy with the disk half idle (restore of the
/// pgbench data set, median of six: 1.85 → 1.71 s).
fn plan_restore(repo: &Repository, files: &[PendingFile]) -> Result<Vec<Restore>> {
    let fixed = repo.config().chunker.fixed_size;
    let mut work = Vec::with_capacity(files.len());
    for (number, file) in files.iter().enumerate() {
        if file.hole {
            create_hole(file)?;
            continue;
        }
        let chunks = file.node.content.len();
        let splittable = chunks > RESTORE_PART && file.node.in_fixed_chunks(u64::from(fixed));
        if !splittable {
            work.push(Restore::File(number));
            continue;
        }
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file.path)
            .and_then(|handle| handle.set_len(file.node.size))
            .map_err(|e| RepoError::io(&file.path, e))?;
        work.extend(
            (0..chunks)
                .step_by(RESTORE_PART)
                .map(|start| Restore::Part(number, start..(start + RESTORE_PART).min(chunks))),
        );
    }
    let progress = |item: &Restore| match item {
        Restore::File(_) => (0, 1),
        Restore::Part(number, chunks) => (chunks.start, files[*number].node.content.len()),
    };
    // Stable: whole files and first parts keep their order, and so do the parts of a file.
    work.sort_by(|a, b| {
        let ((a_done, a_all), (b_done, b_all)) = (progress(a), progress(b));
        (a_done as u128 * b_all as u128).cmp(&(b_done as u128 * a_all as u128))
    });
    Ok(work)
}

/// Creates a file of the node's size that reads as zeros, without writing any.
fn create_hole(file: &PendingFile) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&file.path)
        .and_then(|handle| handle.set_len(file.node.size))
        .map_err(|e| RepoError::io(&file.path, e))
}

/// Has the storage start reading the stored bytes of `item` (of a whole file, its first
/// part's worth). Blobs it cannot find are left to the restore itself to report.
fn read_ahead(repo: &Repository, files: &[PendingFile], item: &Restore) {
    let (number, chunks) = match item {
        Restore::File(number) => (*number, 0..files[*number].node.content.len()),
        Restore::Part(number, chunks) => (*number, chunks.clone()),
    };
    let content = &files[number].node.content[chunks];
    let index = repo.index();
    let locations = content.iter().take(RESTORE_PART).filter_map(|id| {
        let location = index.get(id)?;
        let base = repo.base_of(location.base).ok().flatten();
        Some(std::iter::once(location).chain(base.map(|(_, b)| b)))
    });
    repo.read_ahead(locations.flatten());
}

/// Writes the file's chunks in `chunks` in place, into an existing file (one created by
/// [`plan_restore`], or one a delta restore patches); returns the bytes written. The
/// caller fsyncs the file.
fn restore_part(
    repo: &Repository,
    file: &PendingFile,
    chunks: std::ops::Range<usize>,
) -> Result<u64> {
    let (offset, len) = span(repo, file, &chunks);
    let out = NewFile::part(&file.path, offset, len).map_err(|e| RepoError::io(&file.path, e))?;
    fill(repo, file, out, chunks, offset, len)
}

/// Where the file's chunks in `chunks` start, and how many bytes they hold.
fn span(repo: &Repository, file: &PendingFile, chunks: &std::ops::Range<usize>) -> (u64, u64) {
    if chunks.start == 0 && chunks.end == file.node.content.len() {
        // Not necessarily in fixed chunks.
        return (0, file.node.size);
    }
    let fixed = u64::from(repo.config().chunker.fixed_size);
    let offset = chunks.start as u64 * fixed;
    (
        offset,
        (chunks.end as u64 * fixed).min(file.node.size) - offset,
    )
}

/// Writes the file's chunks in `chunks` through `out`, which starts at `offset` where the
/// first of them belongs, and checks that they came to the `expected` length.
fn fill(
    repo: &Repository,
    file: &PendingFile,
    mut out: NewFile,
    chunks: std::ops::Range<usize>,
    offset: u64,
    expected: u64,
) -> Result<u64> {
    let path = &file.path;
    let written = write_blobs(repo, &file.node.content[chunks], &mut out, path)?;
    if written != expected {
        let detail = if offset == 0 && expected == file.node.size {
            format!("restored {written} bytes, snapshot says {expected}")
        } else {
            format!("restored {written} bytes at offset {offset}, snapshot says {expected}")
        };
        return Err(repo.corrupt(path.display().to_string(), detail));
    }
    out.finish().map_err(|e| RepoError::io(path, e))?;
    Ok(written)
}

/// Writes the file a restore held back ([`RestoreOptions::held_back`]) as `path`, once
/// everything else is durable: under a temporary name first, synced, then renamed into
/// place (replacing what is there) and its directory synced.
pub fn restore_file_last(
    repo: &Repository,
    node: &Node,
    path: &Path,
    sync: SyncMethod,
) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    if sync == SyncMethod::Syncfs {
        sync.finish(parent)?;
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".restoring");
    let file = PendingFile {
        path: PathBuf::from(temporary),
        node: node.clone(),
        hole: false,
    };
    match fs::remove_file(&file.path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(RepoError::io(&file.path, e))
        }
        _ => {}
    }
    write_file(repo, &file)?;
    settle(&file.path, &file.node, SyncMethod::Fsync)?;
    fs::rename(&file.path, path).map_err(|e| RepoError::io(path, e))?;
    fsync_path(parent)
}

/// Threads of [`Finishers`]: an fsync waits on the disk, not the CPU.
const SYNC_THREADS: usize = 8;

/// Creates and writes one whole file; [`settle`] follows.
fn write_file(repo: &Repository, file: &PendingFile) -> Result<()> {
    let out =
        NewFile::create(&file.path, file.node.size).map_err(|e| RepoError::io(&file.path, e))?;
    fill(
        repo,
        file,
        out,
        0..file.node.content.len(),
        0,
        file.node.size,
    )
    .map(|_| ())
}

/// What a delta restore did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct DeltaStats {
    /// Files whose content already matched (read and hashed, not written).
    pub files_kept: u64,
    /// Files replaced, or patched where only some chunks differed.
    pub files_written: u64,
    pub bytes_written: u64,
    /// Files replaced by holes ([`RestoreOptions::holes`]).
    pub holes: u64,
    /// Entries removed because the snapshot does not have them.
    pub removed: u64,
}

impl DeltaStats {
    /// Adds another tree's counts (pgdata plus its tablespaces).
    pub fn add(&mut self, other: &DeltaStats) {
        self.files_kept += other.files_kept;
        self.files_written += other.files_written;
        self.bytes_written += other.bytes_written;
        self.holes += other.holes;
        self.removed += other.removed;
    }
}

/// How a delta restore decides that an existing file already has its node's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaCheck {
    /// Hash the chunks of every file of the node's size, the way they were stored.
    Content,
    /// Take a file of the node's size and mtime as it is, without reading it, as the next
    /// backup would (see [`Node::same_file_by_size_and_time`]; the time is the
    /// snapshot's start); hash the others. A file changed with its mtime put back is not
    /// noticed.
    SizeAndTime(DateTime<Utc>),
}

/// Makes `target` equal to the tree `root`, rewriting only the chunks whose content
/// differs (judged by hashing the existing file's chunks into blob ids, the same way they
/// were stored, unless `check` trusts size and time; see [`Repair`] for when a whole file
/// is replaced instead) and removing what the snapshot does not have. Much faster than a
/// full restore when little changed; the result is the same.
pub fn restore_tree_delta(
    repo: &Repository,
    root: &Id,
    target: &Path,
    check: DeltaCheck,
    options: RestoreOptions<'_>,
) -> Result<DeltaStats> {
    let sync = options.sync;
    repo.load_index()?;
    fs::create_dir_all(target).map_err(|e| RepoError::io(target, e))?;
    let mut stats = DeltaStats::default();
    let mut batch = Batch::default();
    let mut dirs = Vec::new();
    walk_dirs(repo, root, target, |dir, cursor| {
        let listing = Listing::read(dir).map_err(|e| RepoError::io(dir, e))?;
        let mut present = listing.iter().peekable();
        let mut subdirs = Vec::new();
        while let Some(node) = cursor.next_node()? {
            let node = options.owners.apply(node);
            // Remove what the snapshot does not name, or names as another kind.
            let name = node.name.as_bytes();
            while let Some(entry) = present.next_if(|(other, _)| other.as_bytes() < name) {
                remove_entry(dir, entry, &mut stats)?;
            }
            let path = dir.join(&node.name);
            if let Some(entry) = present.next_if(|(other, _)| other.as_bytes() == name) {
                if !is_already(dir, entry, &node) && !options.holds_back(target, &path) {
                    remove_entry(dir, entry, &mut stats)?;
                }
            }
            match node.kind {
                NodeKind::Dir => {
                    if !path.is_dir() {
                        fs::create_dir(&path).map_err(|e| RepoError::io(&path, e))?;
                    }
                    if let Some(sub) = options.subtree_of(target, &path, &node) {
                        subdirs.push((sub, path.clone()));
                    }
                    dirs.push(PendingFile {
                        path,
                        node,
                        hole: false,
                    });
                }
                NodeKind::Symlink => {
                    if fs::symlink_metadata(&path).is_err() {
                        let target = node.target.clone().unwrap_or_default();
                        symlink(&target, &path).map_err(|e| RepoError::io(&path, e))?;
                        set_symlink_owner(&path, &node);
                    }
                }
                NodeKind::File if options.holds_back(target, &path) => {}
                NodeKind::File => {
                    let hole = options.is_hole(target, &path);
                    if batch.add(PendingFile { path, node, hole }) {
                        stats.add(&repair_files(repo, batch.take(), check, options)?);
                    }
                }
            }
        }
        for entry in present {
            remove_entry(dir, entry, &mut stats)?;
        }
        Ok(subdirs)
    })?;
    stats.add(&repair_files(repo, batch.take(), check, options)?);
    finish_dirs(dirs, target, sync)?;
    Ok(stats)
}

/// Whether an existing entry is already the kind of thing `node` is (a symlink: to the
/// same target).
fn is_already(dir: &Path, (name, file_type): (&OsStr, FileType), node: &Node) -> bool {
    match node.kind {
        NodeKind::Dir => file_type.is_dir(),
        NodeKind::File => file_type.is_file(),
        NodeKind::Symlink => {
            file_type.is_symlink()
                && fs::read_link(dir.join(name))
                    .ok()
                    .map(|t| t.to_string_lossy().into_owned())
                    == node.target
        }
    }
}

fn remove_entry(
    dir: &Path,
    (name, file_type): (&OsStr, FileType),
    stats: &mut DeltaStats,
) -> Result<()> {
    let path = dir.join(name);
    if file_type.is_dir() {
        fs::remove_dir_all(&path)
    } else {
        fs::remove_file(&path)
    }
    .map_err(|e| RepoError::io(&path, e))?;
    stats.removed += 1;
    Ok(())
}

/// Makes existing files equal to their nodes: see [`Repair`].
fn repair_files(
    repo: &Repository,
    files: Vec<PendingFile>,
    check: DeltaCheck,
    options: RestoreOptions<'_>,
) -> Result<DeltaStats> {
    let RestoreOptions { jobs, sync, .. } = options;
    let mut stats = DeltaStats::default();
    let repairs = plan_repairs(repo, &files, jobs.max(1), check)?;
    let work: Vec<(usize, Repair)> = repairs.into_iter().enumerate().collect();
    let outcomes = with_finishers(&files, sync, |finishers| {
        crate::parallel::map(work, jobs.max(1), |(number, repair)| {
            finishers.check()?;
            let file = &files[number];
            let outcome = match repair {
                Repair::Nothing { metadata_differs } => {
                    if metadata_differs {
                        finishers.finish(number);
                    }
                    Outcome::Kept
                }
                Repair::Chunks(chunks) => {
                    let written = patch_chunks(repo, file, &chunks)?;
                    finishers.finish(number);
                    Outcome::Written(written)
                }
                Repair::Whole => {
                    let _ = fs::remove_file(&file.path);
                    write_file(repo, file)?;
                    finishers.finish(number);
                    Outcome::Written(file.node.size)
                }
                Repair::Hole => {
                    let _ = fs::remove_file(&file.path);
                    create_hole(file)?;
                    finishers.finish(number);
                    Outcome::Hole
                }
            };
            if !matches!(outcome, Outcome::Hole) {
                options.report(file.node.size);
            }
            Ok(outcome)
        })
    })?;
    for outcome in outcomes {
        match outcome {
            Outcome::Kept => stats.files_kept += 1,
            Outcome::Written(bytes) => {
                stats.files_written += 1;
                stats.bytes_written += bytes;
            }
            Outcome::Hole => stats.holes += 1,
        }
    }
    Ok(stats)
}

/// What a delta restore does to a file that the snapshot has.
enum Repair {
    /// Its content is the snapshot's already; its mode, owner and mtime may not be.
    Nothing { metadata_differs: bool },
    /// Rewrite these chunks (by index, ascending) in place.
    Chunks(Vec<usize>),
    /// Replace the file: missing, another size, mostly different, or hard-linked (a
    /// write in place would also change the other name, e.g. after `pg_upgrade --link`).
    Whole,
    /// Replace the file by a hole ([`RestoreOptions::holes`]), whatever it holds: a hole
    /// costs less to make than its content would to compare.
    Hole,
}

/// What [`Repair`] did to one file.
enum Outcome {
    Kept,
    Written(u64),
    Hole,
}

/// Existing files are compared with the snapshot in pieces of this many chunks (128 MiB),
/// on all threads at once, so that a 1 GiB relation segment is not read by one thread
/// alone. Each piece starts a read stream whose read-ahead ramps up again: 32 MiB pieces
/// checked a cold 1.9 GB data directory in 1.10-1.20 s, 128 MiB pieces in 1.05-1.10 s
/// (medians of 5-7, alternating), 1 GiB pieces no faster.
const CHECK_PIECE: usize = 1024;

/// Reads in flight per job while comparing: the comparison waits on the disk, not on
/// hashing, and a thread that hashes what it read leaves the disk idle meanwhile. On a
/// cold 1.9 GB data directory with 2 jobs, 4 threads checked in 0.93-0.96 s against
/// 1.02-1.09 s with 2 (alternating runs), for the same CPU time; 6 were no faster.
const CHECK_THREADS_PER_JOB: usize = 2;

/// Whether an existing file already has the node's mode, owner and mtime: then a delta
/// restore leaves its inode alone (setting them anyway dirtied every inode of the data
/// directory, for the directory fsyncs to commit).
fn metadata_matches(meta: &fs::Metadata, node: &Node) -> bool {
    use std::os::unix::fs::MetadataExt;
    meta.mode() & 0o7777 == node.mode & 0o7777
        && meta.uid() == node.uid
        && meta.gid() == node.gid
        && mtime_ns(meta) == node.mtime_ns
}

/// Decides each file's [`Repair`] by hashing its chunks the way they were stored (or, as
/// `check` allows, by its size and mtime).
fn plan_repairs(
    repo: &Repository,
    files: &[PendingFile],
    jobs: usize,
    check: DeltaCheck,
) -> Result<Vec<Repair>> {
    use std::os::unix::fs::MetadataExt;
    let fixed = u64::from(repo.config().chunker.fixed_size);
    let mut repairs = Vec::with_capacity(files.len());
    let mut linked = vec![false; files.len()];
    let mut pieces = Vec::new();
    for (number, file) in files.iter().enumerate() {
        if file.hole {
            repairs.push(Repair::Hole);
            continue;
        }
        let node = &file.node;
        let meta = match fs::metadata(&file.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                repairs.push(Repair::Whole);
                continue;
            }
            Err(e) => return Err(RepoError::io(&file.path, e)),
        };
        if let DeltaCheck::SizeAndTime(snapshot_time) = check {
            if meta.is_file()
                && node.same_file_by_size_and_time(meta.len(), mtime_ns(&meta), snapshot_time)
            {
                repairs.push(Repair::Nothing {
                    metadata_differs: !metadata_matches(&meta, node),
                });
                continue;
            }
        }
        // Only files in whole fixed chunks can be compared chunk by chunk.
        if !meta.is_file() || meta.len() != node.size || !node.in_fixed_chunks(fixed) {
            repairs.push(Repair::Whole);
            continue;
        }
        linked[number] = meta.nlink() > 1;
        repairs.push(Repair::Nothing {
            metadata_differs: !metadata_matches(&meta, node),
        });
        for start in (0..node.content.len()).step_by(CHECK_PIECE) {
            pieces.push((number, start..(start + CHECK_PIECE).min(node.content.len())));
        }
    }
    let readers = jobs * CHECK_THREADS_PER_JOB;
    let differing = crate::parallel::map(pieces, readers, |(number, chunks)| {
        let file = &files[number];
        differing_chunks(repo, file, fixed, chunks).map(|found| (number, found))
    })?;
    for (number, found) in differing {
        if found.is_empty() {
            continue;
        }
        match &mut repairs[number] {
            Repair::Nothing { .. } => repairs[number] = Repair::Chunks(found),
            Repair::Chunks(chunks) => chunks.extend(found),
            Repair::Whole | Repair::Hole => {}
        }
    }
    for (number, repair) in repairs.iter_mut().enumerate() {
        if let Repair::Chunks(chunks) = repair {
            // Most of it differs: the whole-file path writes faster (direct I/O).
            if linked[number] || chunks.len() * 2 > files[number].node.content.len() {
                *repair = Repair::Whole;
            }
        }
    }
    Ok(repairs)
}

/// Indexes of the chunks in `chunks` whose bytes in the existing file differ. (Read
/// through the page cache: direct reads were measured slower here, 1.15 s against
/// 1.0 s for a cold 1.5 GB cluster, and lose what is cached.)
fn differing_chunks(
    repo: &Repository,
    file: &PendingFile,
    fixed: u64,
    chunks: std::ops::Range<usize>,
) -> Result<Vec<usize>> {
    use std::os::unix::fs::FileExt;
    let path = &file.path;
    let handle = File::open(path).map_err(|e| RepoError::io(path, e))?;
    let mut buffer = vec![0u8; fixed as usize];
    let mut differing = Vec::new();
    for index in chunks {
        let offset = index as u64 * fixed;
        let len = fixed.min(file.node.size - offset) as usize;
        handle
            .read_exact_at(&mut buffer[..len], offset)
            .map_err(|e| RepoError::io(path, e))?;
        if repo.crypto().blob_id(&buffer[..len]) != file.node.content[index] {
            differing.push(index);
        }
    }
    Ok(differing)
}

/// Rewrites the given chunks of a file in place; returns the bytes written. The caller
/// syncs the file.
fn patch_chunks(repo: &Repository, file: &PendingFile, chunks: &[usize]) -> Result<u64> {
    let mut written = 0;
    let mut rest = chunks;
    while let Some(&first) = rest.first() {
        // A run of consecutive chunks is written as one part (coalesced reads).
        let run = rest
            .iter()
            .enumerate()
            .take_while(|(i, index)| **index == first + i)
            .count();
        written += restore_part(repo, file, first..first + run)?;
        rest = &rest[run..];
    }
    Ok(written)
}

/// Gives a restored directory the owner, mode and mtime its snapshot recorded for the
/// source directory (e.g. PostgreSQL insists on owning a 0700 data directory).
pub fn apply_root_metadata(target: &Path, root: &Node) -> Result<()> {
    settle(target, root, SyncMethod::Fsync)
}

/// Gives a restored file or directory the owner, mode and mtime of its node (after
/// writing, which changes the mtime), then syncs it under [`SyncMethod::Fsync`]: one
/// open for all of it, and the metadata is as durable as the data.
fn settle(path: &Path, node: &Node, sync: SyncMethod) -> Result<()> {
    let handle = File::open(path).map_err(|e| RepoError::io(path, e))?;
    if let Err(e) = std::os::unix::fs::fchown(&handle, Some(node.uid), Some(node.gid)) {
        tracing::debug!("cannot set owner of {}: {e}", path.display());
    }
    let mtime = if node.mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(node.mtime_ns as u64)
    } else {
        SystemTime::UNIX_EPOCH
    };
    handle
        .set_permissions(fs::Permissions::from_mode(node.mode & 0o7777))
        .and_then(|()| handle.set_modified(mtime))
        .and_then(|()| match sync {
            SyncMethod::Fsync => handle.sync_all(),
            SyncMethod::Syncfs => Ok(()),
        })
        .map_err(|e| RepoError::io(path, e))
}

/// Restores a symlink's ownership when running as root; otherwise it belongs to the
/// caller.
fn set_symlink_owner(path: &Path, node: &Node) {
    if let Err(e) = std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid)) {
        tracing::debug!("cannot set owner of {}: {e}", path.display());
    }
}

/// fsyncs a file or a directory.
fn fsync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|handle| handle.sync_all())
        .map_err(|e| RepoError::io(path, e))
}
