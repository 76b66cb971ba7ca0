//! The temp file a download or local copy is written into: direct I/O for large files.
//!
//! A synced file's bytes are written once and made durable at once (DESIGN.md, "Applying
//! changes safely"); nobody reads them soon. Through the page cache every byte is first
//! copied by the kernel into freshly allocated cache pages, then written back by the
//! fsync. On this project's benchmark machines (VMs that hand freed memory back to the
//! host) that copy is most of the receiving node's CPU: `dd` of 800 MiB with `fsync`
//! took 1.5 s and 1.2 CPU-s buffered, 0.5 s and 0.1 CPU-s with `O_DIRECT`. Large temp
//! files are therefore opened with `O_DIRECT` (Linux) and their bytes go straight from
//! Weft's buffers to the disk; small files, other systems and filesystems that refuse
//! direct I/O use ordinary writes.
//!
//! In direct mode a write's whole [`SECTOR`]-aligned sectors are copied into the
//! thread's aligned buffer and written with `O_DIRECT`; its first and last partial
//! sectors (a block's edges, which it shares with the blocks beside it) are written
//! through the page cache, where the kernel merges them. Linux keeps the two kinds of
//! write coherent, the final fsync makes both durable, and a process killed in the
//! middle loses nothing it wrote (an interrupted download resumes from the file).
//! Writes must not overlap (a file's blocks do not).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Alignment of direct writes (file offset, length, memory): the largest logical block
/// size of common disks, a multiple of the usual 512.
pub const SECTOR: usize = 4096;
/// Files from this size on are written with direct I/O.
pub const DIRECT_MIN_SIZE: u64 = 1024 * 1024;
/// Largest direct write: bounds each blocking thread's aligned buffer.
const DIRECT_PIECE: usize = 256 * 1024;

/// An open temp file of a known final size.
pub struct TempFile {
    /// Ordinary handle: reads (resume checks), metadata, fsync, and every write that is
    /// not whole sectors in direct mode.
    file: File,
    /// `O_DIRECT` handle in direct mode.
    direct: Option<File>,
    /// Set once a direct write was refused (`EINVAL`): buffered from then on.
    direct_refused: AtomicBool,
    /// The file's final size.
    size: u64,
}

impl TempFile {
    /// Opens (creating) `path` for a file of `size` bytes and sizes it; keeps what it
    /// holds for the caller to verify.
    ///
    /// Until [`TempFile::truncate_to_final`], the file is one byte longer than the
    /// file it becomes: a download in progress never has the finished file's size, so
    /// nothing that compares sizes (a backup tool, a tree check) takes it for one.
    pub fn open(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() != size + 1 {
            file.set_len(size + 1)?;
        }
        let direct = if size >= DIRECT_MIN_SIZE {
            open_direct(path)
        } else {
            None
        };
        Ok(Self {
            file,
            direct,
            direct_refused: AtomicBool::new(false),
            size,
        })
    }

    /// The final size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Gives the file its final size, once everything is written.
    pub fn truncate_to_final(&self) -> io::Result<()> {
        self.file.set_len(self.size)
    }

    /// The ordinary handle (reads, metadata, fsync).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether large writes go to the disk directly (then a write-back of the page
    /// cache has little to do).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some() && !self.direct_refused.load(Ordering::Acquire)
    }

    /// Writes `data` at `offset`, directly in direct mode. Writes must not overlap one
    /// another.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(data, offset)?;
        let Some(direct) = self.direct.as_ref().filter(|_| self.is_direct()) else {
            return self.file.write_all_at(data, offset);
        };
        let (sector, end) = (SECTOR as u64, offset + data.len() as u64);
        let first_whole = offset.div_ceil(sector) * sector;
        let end_whole = end / sector * sector;
        if first_whole >= end_whole {
            return self.file.write_all_at(data, offset);
        }
        let head = (first_whole - offset) as usize;
        let whole = (end_whole - first_whole) as usize;
        self.file.write_all_at(&data[..head], offset)?;
        self.write_direct(direct, &data[head..head + whole], first_whole)?;
        self.file.write_all_at(&data[head + whole..], end_whole)
    }

    /// Writes `data` at `offset` through the page cache in any mode: for local copies,
    /// which run at memory speed from a cached source (a small edit to a large file
    /// copies almost all of it; synchronous direct writes made that 2-3 times slower).
    pub fn write_cached_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(data, offset)?;
        self.file.write_all_at(data, offset)
    }

    fn check_range(&self, data: &[u8], offset: u64) -> io::Result<()> {
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write beyond the end of the temp file",
            )),
        }
    }

    /// Writes whole sectors through the aligned buffer; falls back to the ordinary
    /// handle for good if the filesystem refuses.
    fn write_direct(&self, direct: &File, data: &[u8], offset: u64) -> io::Result<()> {
        for (n, piece) in data.chunks(DIRECT_PIECE).enumerate() {
            let at = offset + (n * DIRECT_PIECE) as u64;
            let written = with_aligned(piece.len(), |aligned| {
                aligned.copy_from_slice(piece);
                direct.write_all_at(aligned, at)
            });
            match written {
                Some(Ok(())) => {}
                Some(Err(error)) if error.raw_os_error() != Some(EINVAL) => return Err(error),
                // Refused (an alignment this filesystem does not accept) or no aligned
                // buffer: the rest goes through the page cache.
                _ => {
                    if !self.direct_refused.swap(true, Ordering::AcqRel) {
                        tracing::debug!(%offset, "direct write refused; writing through the page cache");
                    }
                    let done = n * DIRECT_PIECE;
                    return self.file.write_all_at(&data[done..], at);
                }
            }
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
const EINVAL: i32 = libc::EINVAL;
#[cfg(not(target_os = "linux"))]
const EINVAL: i32 = 22;

/// Opens `path` for direct writes, or `None` where that is not possible.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|error| tracing::debug!(%error, "no direct I/O; writing through the page cache"))
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// Runs `f` on a [`SECTOR`]-aligned buffer of `len` bytes (the thread's, reused), or
/// returns `None` if none can be had.
fn with_aligned<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    thread_local! {
        static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUFFER.with(|cell| {
        let mut buffer = cell.try_borrow_mut().ok()?;
        if buffer.len() < len + SECTOR {
            buffer.resize(len + SECTOR, 0);
        }
        let start = buffer.as_ptr().align_offset(SECTOR);
        let aligned = buffer.get_mut(start..start.checked_add(len)?)?;
        Some(f(aligned))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `content` into a temp file in the order `pieces` gives (offset, len) and
    /// reads it back.
    fn write_in_pieces(dir: &Path, content: &[u8], pieces: &[(usize, usize)]) -> Vec<u8> {
        let path = dir.join("t");
        let _ = std::fs::remove_file(&path);
        let temp = TempFile::open(&path, content.len() as u64).expect("open");
        if content.len() as u64 >= DIRECT_MIN_SIZE && !temp.is_direct() {
            eprintln!("no direct I/O on this filesystem: testing ordinary writes only");
        }
        for &(offset, len) in pieces {
            temp.write_at(&content[offset..offset + len], offset as u64)
                .expect("write");
        }
        temp.truncate_to_final().expect("truncate");
        temp.file().sync_all().expect("fsync");
        std::fs::read(&path).expect("read back")
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    /// Splits `0..len` into pieces of awkward sizes (within a sector, across one,
    /// exactly one, many).
    fn pieces(len: usize) -> Vec<(usize, usize)> {
        let sizes = [1usize, 4095, 4097, 70_000, 3, 300_001, 8192, 12_345];
        let (mut out, mut at, mut i) = (Vec::new(), 0usize, 0usize);
        while at < len {
            let take = sizes[i % sizes.len()].min(len - at);
            out.push((at, take));
            at += take;
            i += 1;
        }
        out
    }

    #[test]
    fn unaligned_pieces_in_any_order_make_the_exact_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        for len in [
            DIRECT_MIN_SIZE as usize + 1,
            3 * 1024 * 1024 + 4095,
            2_000_003,
        ] {
            let data = content(len);
            let mut order = pieces(len);
            assert_eq!(
                write_in_pieces(dir.path(), &data, &order),
                data,
                "in order, {len}"
            );
            order.reverse();
            assert_eq!(
                write_in_pieces(dir.path(), &data, &order),
                data,
                "reversed, {len}"
            );
            let (even, odd): (Vec<_>, Vec<_>) =
                order.iter().enumerate().partition(|(i, _)| i % 2 == 0);
            let interleaved: Vec<_> = even.into_iter().chain(odd).map(|(_, p)| *p).collect();
            assert_eq!(
                write_in_pieces(dir.path(), &data, &interleaved),
                data,
                "interleaved, {len}"
            );
        }
    }

    #[test]
    fn an_interrupted_file_keeps_what_was_written_and_resumes() {
        // A download killed in the middle: the handle goes away without an fsync; the
        // next one writes the rest into the same file.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t");
        let len = 2 * 1024 * 1024 + 100;
        let data = content(len);
        let pieces = pieces(len);
        let (first, rest): (Vec<_>, Vec<_>) =
            pieces.iter().enumerate().partition(|(i, _)| i % 3 == 0);
        {
            let temp = TempFile::open(&path, len as u64).expect("open");
            for (_, (offset, piece_len)) in &first {
                temp.write_at(&data[*offset..offset + piece_len], *offset as u64)
                    .expect("write");
            }
        }
        let on_disk = std::fs::read(&path).expect("read");
        for (_, (offset, piece_len)) in &first {
            assert_eq!(
                on_disk[*offset..offset + piece_len],
                data[*offset..offset + piece_len]
            );
        }
        let temp = TempFile::open(&path, len as u64).expect("reopen");
        for (_, (offset, piece_len)) in &rest {
            temp.write_at(&data[*offset..offset + piece_len], *offset as u64)
                .expect("write");
        }
        // Unfinished, it never has the final size.
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            len as u64 + 1
        );
        temp.truncate_to_final().expect("truncate");
        assert_eq!(std::fs::read(&path).expect("read"), data);
    }

    #[test]
    fn small_files_and_writes_past_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = content(10_000);
        assert_eq!(
            write_in_pieces(dir.path(), &data, &pieces(data.len())),
            data
        );
        let temp = TempFile::open(&dir.path().join("u"), 100).expect("open");
        assert!(temp.write_at(&[0u8; 10], 95).is_err());
    }
}
