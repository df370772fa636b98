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

/// A file being written once, start to end: large files through direct I/O where the
/// filesystem allows it, the others through the page cache.
pub(crate) enum NewFile {
    Buffered(File),
    Direct(DirectWriter),
}

impl NewFile {
    pub(crate) fn create(path: &Path, size: u64) -> std::io::Result<NewFile> {
        use std::os::unix::fs::OpenOptionsExt;
        if size < DIRECT_MIN_SIZE {
            return OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map(NewFile::Buffered);
        }
        let direct = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path);
        match direct {
            Ok(file) => Ok(NewFile::Direct(DirectWriter::new(file))),
            // No direct I/O on this filesystem (tmpfs, some FUSE): it may have created
            // the file before refusing the flag, so this open must not insist on a new one.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .map(NewFile::Buffered)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes what is still buffered; returns the file, to be fsynced.
    pub(crate) fn finish(self) -> std::io::Result<File> {
        match self {
            NewFile::Buffered(file) => Ok(file),
            NewFile::Direct(writer) => writer.finish(),
        }
    }
}

impl Write for NewFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            NewFile::Buffered(file) => file.write(buf),
            NewFile::Direct(writer) => writer.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            NewFile::Buffered(file) => file.flush(),
            NewFile::Direct(_) => Ok(()),
        }
    }
}

/// Collects a file's bytes in an aligned block and writes each full block with one
/// direct write; the last block is padded to the alignment and the file cut back to
/// its size.
pub(crate) struct DirectWriter {
    file: File,
    buffer: Vec<u8>,
    /// Where the aligned block starts in `buffer`.
    start: usize,
    filled: usize,
    /// File offset of the block's first byte.
    offset: u64,
}

impl DirectWriter {
    fn new(file: File) -> DirectWriter {
        let buffer = vec![0u8; DIRECT_BLOCK + DIRECT_ALIGN];
        let start = buffer.as_ptr().align_offset(DIRECT_ALIGN);
        DirectWriter {
            file,
            buffer,
            start,
            filled: 0,
            offset: 0,
        }
    }

    fn write_block(&mut self, len: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let block = &self.buffer[self.start..self.start + len];
        self.file.write_all_at(block, self.offset)?;
        self.offset += len as u64;
        self.filled = 0;
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<File> {
        let tail = self.filled;
        if tail > 0 {
            let padded = tail.next_multiple_of(DIRECT_ALIGN);
            let block_end = self.start + padded;
            self.buffer[self.start + tail..block_end].fill(0);
            self.write_block(padded)?;
            if padded != tail {
                self.file.set_len(self.offset - (padded - tail) as u64)?;
            }
        }
        Ok(self.file)
    }
}

impl Write for DirectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(DIRECT_BLOCK - self.filled);
        let at = self.start + self.filled;
        self.buffer[at..at + n].copy_from_slice(&buf[..n]);
        self.filled += n;
        if self.filled == DIRECT_BLOCK {
            self.write_block(DIRECT_BLOCK)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
