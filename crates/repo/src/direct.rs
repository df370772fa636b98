//! Writing new files with direct I/O: restored data files and repository packs are
//! written once and not read back soon, so copying them into the page cache only costs
//! CPU and makes the final fsync wait for the whole file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Files at least this large are written with direct I/O (`O_DIRECT`) in blocks of
/// [`DIRECT_BLOCK`]. Through the page cache, every byte is copied into fresh cache
/// pages and the final fsync then waits for all of it: on the machine of
/// docs/benchmarks.md, 1.2 GB took 4.6 s that way and 0.45 s with 4 MiB direct writes,
/// and the kernel's copy was 39% of a restore's CPU samples.
const DIRECT_MIN_SIZE: u64 = 1 << 20;
const DIRECT_BLOCK: usize = 4 << 20;
/// Direct I/O wants buffers, offsets and lengths aligned to the logical block size;
/// 4 KiB satisfies every common device.
const DIRECT_ALIGN: usize = 4096;

/// A file being written once, start to end (or one stretch of it, see [`NewFile::part`]):
/// large files through direct I/O where the filesystem allows it, the others through the
/// page cache.
pub(crate) enum NewFile {
    /// Positioned writes from `offset` on.
    Buffered {
        file: File,
        offset: u64,
    },
    Direct(DirectWriter),
}

impl NewFile {
    /// Creates the file, which must not exist, for `size` bytes.
    pub(crate) fn create(path: &Path, size: u64) -> std::io::Result<NewFile> {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        // No direct I/O on this filesystem (tmpfs, some FUSE): the refused open may have
        // created the file, so the buffered open must not insist on a new one.
        Self::open(path, 0, size >= DIRECT_MIN_SIZE, options, |options| {
            options.create_new(false).create(true).truncate(true);
        })
    }

    /// Opens an existing file to write `len` bytes from `offset` on, in place; several
    /// parts of one file may be written at once. Direct I/O only where the part starts
    /// on a 4 KiB boundary and ends on one or at the end of the file: a direct write pads
    /// the last block, and the file is then cut back to where the part ends.
    pub(crate) fn part(path: &Path, offset: u64, len: u64) -> std::io::Result<NewFile> {
        let align = DIRECT_ALIGN as u64;
        let direct = len >= DIRECT_MIN_SIZE
            && offset.is_multiple_of(align)
            && (len.is_multiple_of(align) || std::fs::metadata(path)?.len() == offset + len);
        let mut options = OpenOptions::new();
        options.write(true);
        Self::open(path, offset, direct, options, |_| {})
    }

    fn open(
        path: &Path,
        offset: u64,
        direct: bool,
        mut options: OpenOptions,
        buffered: impl FnOnce(&mut OpenOptions),
    ) -> std::io::Result<NewFile> {
        use std::os::unix::fs::OpenOptionsExt;
        if direct {
            let mut direct = options.clone();
            direct.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
            match direct.open(path) {
                Ok(file) => return Ok(NewFile::Direct(DirectWriter::new(file, offset))),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    buffered(&mut options)
                }
                Err(e) => return Err(e),
            }
        }
        let file = options.open(path)?;
        Ok(NewFile::Buffered { file, offset })
    }

    /// The next `len` bytes of the current direct-I/O block, to be filled in place and
    /// then [`NewFile::commit`]ted; `None` when writing through the page cache or when
    /// the block has less room left.
    pub(crate) fn space(&mut self, len: usize) -> Option<&mut [u8]> {
        match self {
            NewFile::Direct(writer) if DIRECT_BLOCK - writer.filled >= len => {
                let filled = writer.filled;
                Some(&mut writer.block.bytes()[filled..filled + len])
            }
            _ => None,
        }
    }

    /// Takes the `len` bytes filled in through [`NewFile::space`].
    pub(crate) fn commit(&mut self, len: usize) -> std::io::Result<()> {
        match self {
            NewFile::Direct(writer) => writer.advance(len),
            NewFile::Buffered { .. } => Err(std::io::Error::other(
                "commit without space: the file is not written with direct I/O",
            )),
        }
    }

    /// Writes what is still buffered; returns the file, to be fsynced.
    pub(crate) fn finish(self) -> std::io::Result<File> {
        match self {
            NewFile::Buffered { file, .. } => Ok(file),
            NewFile::Direct(writer) => writer.finish(),
        }
    }
}

impl Write for NewFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        match self {
            NewFile::Buffered { file, offset } => {
                let n = file.write_at(buf, *offset)?;
                *offset += n as u64;
                Ok(n)
            }
            NewFile::Direct(writer) => writer.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A buffer whose `bytes()` start on a direct-I/O boundary.
struct AlignedBlock {
    buffer: Vec<u8>,
    start: usize,
}

/// Blocks of finished writers, kept for the next ones: a fresh 4 MiB block costs a page
/// fault and the zeroing of every 4 KiB page, which was 6% of a restore's CPU.
static FREE_BLOCKS: std::sync::Mutex<Vec<AlignedBlock>> = std::sync::Mutex::new(Vec::new());
/// Enough for the writers of two threads (each holds up to six).
const MAX_FREE_BLOCKS: usize = 12;

impl AlignedBlock {
    /// A block from the free list, or a new one.
    fn take() -> AlignedBlock {
        let reused = FREE_BLOCKS.lock().ok().and_then(|mut free| free.pop());
        reused.unwrap_or_else(|| {
            let buffer = vec![0u8; DIRECT_BLOCK + DIRECT_ALIGN];
            let start = buffer.as_ptr().align_offset(DIRECT_ALIGN);
            AlignedBlock { buffer, start }
        })
    }

    /// Puts the block on the free list (or frees it when the list is full).
    fn release(self) {
        if self.buffer.is_empty() {
            return;
        }
        if let Ok(mut free) = FREE_BLOCKS.lock() {
            if free.len() < MAX_FREE_BLOCKS {
                free.push(self);
            }
        }
    }

    /// A placeholder that owns no memory.
    fn none() -> AlignedBlock {
        AlignedBlock {
            buffer: Vec::new(),
            start: 0,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.buffer[self.start..self.start + DIRECT_BLOCK]
    }
}

/// A full block, its length and its file offset, on its way to the writing thread.
type BlockWrite = (AlignedBlock, usize, u64);

/// Collects a file's bytes in aligned blocks and writes each full block with one direct
/// write on a thread of its own, so that filling the next block (decompressing, for a
/// restore) overlaps the device's write of this one: direct writes block until the
/// device has the data. The last block is padded to the alignment and the file cut back
/// to its size.
pub(crate) struct DirectWriter {
    block: AlignedBlock,
    filled: usize,
    /// File offset of the block's first byte.
    offset: u64,
    /// Dropped to tell the writing thread that no more blocks come.
    blocks: Option<crossbeam_channel::Sender<BlockWrite>>,
    /// Blocks the writing thread is done with.
    written: crossbeam_channel::Receiver<AlignedBlock>,
    writer: Option<std::thread::JoinHandle<std::io::Result<File>>>,
}

impl DirectWriter {
    fn new(file: File, offset: u64) -> DirectWriter {
        // Up to three full blocks wait while one is written and the next is filled (one
        // more may wait to be reused): a direct write's time varies, and without the
        // queue the filler waited on each (text restore, median of five: 1.83 s without,
        // 1.80 s with one, 1.68 s with three).
        let (blocks, to_write) = crossbeam_channel::bounded::<BlockWrite>(3);
        let (give_back, written) = crossbeam_channel::bounded(1);
        let writer = std::thread::spawn(move || {
            for (mut block, len, offset) in to_write {
                write_direct(&file, &block.bytes()[..len], offset)?;
                // Never waits: a block the filler has no room for (or that finished and
                // went) goes to the free list.
                if let Err(unwanted) = give_back.try_send(block) {
                    unwanted.into_inner().release();
                }
            }
            Ok(file)
        });
        DirectWriter {
            block: AlignedBlock::take(),
            filled: 0,
            offset,
            blocks: Some(blocks),
            written,
            writer: Some(writer),
        }
    }

    /// Hands the current block to the writing thread and takes a free one.
    fn write_block(&mut self, len: usize) -> std::io::Result<()> {
        let next = match self.written.try_recv() {
            Ok(block) => block,
            Err(_) => AlignedBlock::take(),
        };
        let full = std::mem::replace(&mut self.block, next);
        let sent = self
            .blocks
            .as_ref()
            .is_some_and(|blocks| blocks.send((full, len, self.offset)).is_ok());
        if !sent {
            // The writing thread stopped on an error: joining it returns that error.
            return self.join().map(|_| ());
        }
        self.offset += len as u64;
        self.filled = 0;
        Ok(())
    }

    /// Counts `len` more bytes of the block as filled, writing it when full.
    fn advance(&mut self, len: usize) -> std::io::Result<()> {
        self.filled += len;
        if self.filled == DIRECT_BLOCK {
            self.write_block(DIRECT_BLOCK)?;
        }
        Ok(())
    }

    fn join(&mut self) -> std::io::Result<File> {
        drop(self.blocks.take());
        match self.writer.take() {
            Some(writer) => writer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => Err(std::io::Error::other("direct writer already finished")),
        }
    }

    fn finish(mut self) -> std::io::Result<File> {
        let tail = self.filled;
        let padded = tail.next_multiple_of(DIRECT_ALIGN);
        if tail > 0 {
            self.block.bytes()[tail..padded].fill(0);
            self.write_block(padded)?;
        }
        let file = self.join()?;
        if padded != tail {
            file.set_len(self.offset - (padded - tail) as u64)?;
        }
        Ok(file)
    }
}

/// One direct write. Where the filesystem took `O_DIRECT` at open but refuses it for a
/// write (some FUSE and network filesystems do), the file goes on through the page cache.
fn write_direct(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    match file.write_all_at(bytes, offset) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            let flags = rustix::fs::fcntl_getfl(file)?;
            rustix::fs::fcntl_setfl(file, flags - rustix::fs::OFlags::DIRECT)?;
            file.write_all_at(bytes, offset)
        }
        written => written,
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        // Abandoned (an error elsewhere): let the thread end; its error no longer matters.
        if self.writer.is_some() {
            let _ = self.join();
        }
        std::mem::replace(&mut self.block, AlignedBlock::none()).release();
        while let Ok(block) = self.written.try_recv() {
            block.release();
        }
    }
}

impl Write for DirectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(DIRECT_BLOCK - self.filled);
        let filled = self.filled;
        self.block.bytes()[filled..filled + n].copy_from_slice(&buf[..n]);
        self.advance(n)?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn a_refused_direct_write_goes_on_through_the_page_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("file");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&path)
            .expect("the test directory must allow O_DIRECT (not tmpfs)");
        // 100 bytes is no multiple of the block size: every filesystem with direct I/O
        // refuses it with EINVAL.
        let bytes = [7u8; 100];
        write_direct(&file, &bytes, 0).expect("write");
        let flags = rustix::fs::fcntl_getfl(&file).expect("getfl");
        assert!(
            !flags.contains(rustix::fs::OFlags::DIRECT),
            "O_DIRECT still set"
        );
        assert_eq!(std::fs::read(&path).expect("read"), bytes);
    }

    #[test]
    fn parts_written_at_once_make_the_whole_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("file");
        let block = DIRECT_BLOCK as u64;
        let size = 3 * block + 12_345;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create");
        std::thread::scope(|scope| {
            for start in (0..size).step_by(DIRECT_BLOCK * 2) {
                let (path, data) = (&path, &data);
                scope.spawn(move || {
                    let end = (start + 2 * block).min(size);
                    let mut part = NewFile::part(path, start, end - start).expect("part");
                    part.write_all(&data[start as usize..end as usize])
                        .expect("write");
                    part.finish().and_then(|f| f.sync_all()).expect("finish");
                });
            }
        });
        assert!(
            std::fs::read(&path).expect("read") == data,
            "content differs"
        );
    }
}
