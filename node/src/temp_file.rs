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
//! direct I/O use ordinary writes. That holds for local copies too (a small edit to a
//! large file copies almost all of it from the previous version): through the page
//! cache, B's rebuild of a 256 MiB file after a 10-byte insert took 0.36-0.85 s
//! (median 0.48) and 0.53-1.38 CPU-s (median 0.76) on the bench machine, with direct
//! writes 0.31-0.76 s (median 0.44) and 0.21-0.81 CPU-s (median 0.26). The source,
//! itself written directly, is then read from the disk (docs/benchmarks.md: 6b07067,
//! 2026-12-02).
//!
//! In direct mode the blocks of one answer that follow one another in the file are
//! written as one run: the run's whole [`SECTOR`]-aligned sectors are copied into one of
//! a few shared aligned buffers and written with `O_DIRECT` (each direct write waits for
//! the disk, so a few large ones beat many small ones); its first and last partial
//! sectors (which it shares with the blocks beside it) are written through the page
//! cache, where the kernel merges them. Linux keeps the two kinds of write coherent, the
//! final fsync makes both durable, and a process killed in the middle loses nothing it
//! wrote (an interrupted download resumes from the file).
//! Writes must not overlap (a file's blocks do not).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

/// Alignment of direct writes (file offset, length, memory): the largest logical block
/// size of common disks, a multiple of the usual 512.
pub const SECTOR: usize = 4096;
/// Files from this size on are written with direct I/O.
pub const DIRECT_MIN_SIZE: u64 = 1024 * 1024;
/// Largest direct write, and so the size of each aligned buffer. At 4 MiB the
/// [`DIRECT_BUFFERS`] buffers were 19 MiB of the receiver's 71 MiB peak heap in an
/// initial sync of the bench dataset (heaptrack before bb96046, 2026-12-05, AMD EPYC
/// host); 1 MiB writes keep the
/// disk as busy (the same sync time over eight alternating repetitions).
const DIRECT_PIECE: usize = 1024 * 1024;
/// Aligned buffers for direct writes that exist at once (a writer waits for a free
/// one): bounds their memory, and a few large writes at a time keep the disk busy.
const DIRECT_BUFFERS: usize = 4;

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
        self.write_blocks(&mut [(offset, data)])
    }

    /// Writes each `(offset, data)`, directly in direct mode: blocks that follow one
    /// another in the file are written as one run, so that the disk gets a few large
    /// writes rather than two small ones per block (each direct write waits for the
    /// disk; an answer's 8 blocks took 20 of them, 5-6 ms for 2.5 MiB, against ~1.5 ms
    /// as one). The blocks must not overlap one another or earlier writes; they are
    /// sorted by offset here.
    pub fn write_blocks(&self, blocks: &mut [(u64, &[u8])]) -> io::Result<()> {
        for (offset, data) in blocks.iter() {
            self.check_range(data, *offset)?;
        }
        blocks.sort_unstable_by_key(|(offset, _)| *offset);
        let mut rest: &[(u64, &[u8])] = blocks;
        while !rest.is_empty() {
            let mut len = 1;
            while let Some((offset, _)) = rest.get(len)
                && run_end(&rest[..len]) == *offset
            {
                len += 1;
            }
            let (run, after) = rest.split_at(len);
            self.write_run(run)?;
            rest = after;
        }
        Ok(())
    }

    /// Writes a run of contiguous blocks: its whole sectors directly (in direct mode),
    /// its partial first and last sectors through the page cache.
    fn write_run(&self, run: &[(u64, &[u8])]) -> io::Result<()> {
        let (start, end) = (run[0].0, run_end(run));
        let Some(direct) = self.direct.as_ref().filter(|_| self.is_direct()) else {
            return self.write_cached_range(run, start, end);
        };
        let sector = SECTOR as u64;
        let first_whole = start.div_ceil(sector) * sector;
        let end_whole = end / sector * sector;
        if first_whole >= end_whole {
            return self.write_cached_range(run, start, end);
        }
        self.write_cached_range(run, start, first_whole)?;
        self.write_direct(direct, run, first_whole, end_whole)?;
        self.write_cached_range(run, end_whole, end)
    }

    /// Writes the bytes of `run` between file offsets `from` and `to` through the page
    /// cache.
    fn write_cached_range(&self, run: &[(u64, &[u8])], from: u64, to: u64) -> io::Result<()> {
        for (offset, data) in slices(run, from, to) {
            self.file.write_all_at(data, offset)?;
        }
        Ok(())
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

    /// Writes the whole sectors of `run` between `from` and `to` (both aligned) through
    /// the aligned buffer, [`DIRECT_PIECE`] at a time; falls back to the ordinary
    /// handle for good if the filesystem refuses.
    fn write_direct(
        &self,
        direct: &File,
        run: &[(u64, &[u8])],
        from: u64,
        to: u64,
    ) -> io::Result<()> {
        let mut at = from;
        while at < to {
            let piece_end = to.min(at + DIRECT_PIECE as u64);
            let written = with_aligned((piece_end - at) as usize, |aligned| {
                let mut filled = 0;
                for (_, data) in slices(run, at, piece_end) {
                    aligned[filled..filled + data.len()].copy_from_slice(data);
                    filled += data.len();
                }
                direct.write_all_at(aligned, at)
            });
            match written {
                Some(Ok(())) => at = piece_end,
                Some(Err(error)) if error.raw_os_error() != Some(EINVAL) => return Err(error),
                // Refused (an alignment this filesystem does not accept) or no aligned
                // buffer: the rest goes through the page cache.
                _ => {
                    if !self.direct_refused.swap(true, Ordering::AcqRel) {
                        tracing::debug!(offset = %at, "direct write refused; writing through the page cache");
                    }
                    return self.write_cached_range(run, at, to);
                }
            }
        }
        Ok(())
    }
}

/// The file offset just past a run of contiguous blocks.
fn run_end(run: &[(u64, &[u8])]) -> u64 {
    run.last()
        .map_or(0, |(offset, data)| offset + data.len() as u64)
}

/// The parts of a run's blocks between file offsets `from` and `to`, each with its
/// offset, in order.
fn slices<'a>(
    run: &'a [(u64, &'a [u8])],
    from: u64,
    to: u64,
) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
    run.iter().filter_map(move |&(offset, data)| {
        let start = from.max(offset);
        let end = to.min(offset + data.len() as u64);
        (start < end).then(|| {
            (
                start,
                &data[(start - offset) as usize..(end - offset) as usize],
            )
        })
    })
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

/// Runs `f` on a [`SECTOR`]-aligned buffer of `len` bytes (at most [`DIRECT_PIECE`];
/// one of the [`DIRECT_BUFFERS`] shared ones, waiting for one to be free), or returns
/// `None` if none can be had.
fn with_aligned<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    let pool = AlignedPool::get();
    let mut buffer = pool.take();
    if buffer.len() < len + SECTOR {
        buffer.resize(len + SECTOR, 0);
    }
    let start = buffer.as_ptr().align_offset(SECTOR);
    let result = start
        .checked_add(len)
        .and_then(|end| buffer.get_mut(start..end))
        .map(f);
    pool.give(buffer);
    result
}

/// The shared buffers of [`with_aligned`]: free ones, and how many exist.
struct AlignedPool {
    state: Mutex<(Vec<Vec<u8>>, usize)>,
    freed: Condvar,
}

impl AlignedPool {
    fn get() -> &'static Self {
        static POOL: OnceLock<AlignedPool> = OnceLock::new();
        POOL.get_or_init(|| Self {
            state: Mutex::new((Vec::new(), 0)),
            freed: Condvar::new(),
        })
    }

    /// A free buffer, a new one while fewer than [`DIRECT_BUFFERS`] exist, or the next
    /// one given back.
    fn take(&self) -> Vec<u8> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(buffer) = state.0.pop() {
                return buffer;
            }
            if state.1 < DIRECT_BUFFERS {
                state.1 += 1;
                return Vec::new();
            }
            state = self
                .freed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn give(&self, buffer: Vec<u8>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0.push(buffer);
        drop(state);
        self.freed.notify_one();
    }
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
    fn answers_of_contiguous_and_scattered_blocks_make_the_exact_file() {
        // Blocks written an answer at a time: runs of neighbours (merged into one direct
        // write), gaps, blocks smaller than a sector, answers in any order.
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 9 * 1024 * 1024 + 777;
        let data = content(len);
        let blocks = pieces(len);
        let path = dir.path().join("t");
        let temp = TempFile::open(&path, len as u64).expect("open");
        if !temp.is_direct() {
            eprintln!("no direct I/O on this filesystem: testing ordinary writes only");
        }
        // Answers of 8 blocks with every third block held back to a later answer,
        // last answer first, each answer's blocks shuffled.
        let (held, rest): (Vec<_>, Vec<_>) =
            blocks.iter().enumerate().partition(|(i, _)| i % 3 == 1);
        let mut answers: Vec<Vec<(usize, usize)>> = rest
            .chunks(8)
            .chain(held.chunks(8))
            .map(|answer| answer.iter().map(|(_, piece)| **piece).collect())
            .collect();
        answers.reverse();
        for (n, answer) in answers.iter_mut().enumerate() {
            let turn = n % answer.len().max(1);
            answer.rotate_left(turn);
            let mut writes: Vec<(u64, &[u8])> = answer
                .iter()
                .map(|&(offset, len)| (offset as u64, &data[offset..offset + len]))
                .collect();
            temp.write_blocks(&mut writes).expect("write");
        }
        temp.truncate_to_final().expect("truncate");
        temp.file().sync_all().expect("fsync");
        assert_eq!(std::fs::read(&path).expect("read back"), data);
        // A write past the end fails before anything of its answer is written.
        let temp = TempFile::open(&dir.path().join("u"), 10_000).expect("open");
        let ones = [1u8; 5000];
        assert!(
            temp.write_blocks(&mut [(0, &ones[..]), (6000, &ones[..])])
                .is_err()
        );
        assert!(
            std::fs::read(dir.path().join("u"))
                .expect("read")
                .iter()
                .all(|b| *b == 0)
        );
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
