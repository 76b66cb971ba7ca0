//! Content-defined chunking (FastCDC 2020) and the chunk + hash pipeline that turns a
//! byte stream into a [`Manifest`].
//!
//! Every device of a folder must cut the same bytes at the same places, or dedup and
//! delta sync fail; so the cut points depend only on the content and the folder's
//! [`ChunkParams`], never on how the stream was read. [`Chunker`] gets there by
//! always offering fastcdc a window of `max` bytes (or the whole rest of the stream at
//! its end): fastcdc never looks past `max` bytes from a chunk's start.
//!
//! Memory is bounded by the chunk parameters, whatever the stream length: a
//! [`Chunker`] holds one buffer of `4 * max` bytes; [`build_manifest`] holds at most
//! four buffers of `max +` [`segment_len`] bytes.
//!
//! Hashing is overlapped with chunking: [`build_manifest`] finds cut points on a
//! second thread while the calling thread reads and hashes, segment by segment, so on
//! two cores a chunk + hash pass runs at the speed of the slower half instead of the
//! sum (measured in `benches/chunking.rs`, figures in `docs/benchmarks.md`).
//!
//! Edge cases, by design: an empty stream has no chunks (the empty manifest); a
//! stream shorter than or equal to `min` is one chunk; the last chunk of a stream may be
//! shorter than `min`; no chunk is ever longer than `max`.

use std::io::{self, Read};
use std::sync::mpsc;

use fastcdc::v2020::{Normalization, select_masks};
use serde::{Deserialize, Serialize};

use crate::hash::BlockHash;
use crate::manifest::{BlockRef, MAX_BLOCK_LEN, MAX_MANIFEST_BLOCKS, Manifest, ManifestError};

/// Smallest `min` Weft accepts: below 4 KiB per-block overhead (index entries,
/// requests, manifest bytes) outweighs any dedup gain.
pub const MIN_CHUNK_MIN: u32 = 4 * 1024;

/// The chunk parameters of a folder, fixed when the folder is created.
///
/// Invariants: `MIN_CHUNK_MIN <= min < avg < max <= MAX_BLOCK_LEN`, `avg` a power of
/// two, all even (fastcdc's pairwise scan needs even bounds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawChunkParams", into = "RawChunkParams")]
pub struct ChunkParams {
    min: u32,
    avg: u32,
    max: u32,
}

#[derive(Serialize, Deserialize)]
struct RawChunkParams {
    min: u32,
    avg: u32,
    max: u32,
}

/// Why chunk parameters were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkParamsError {
    /// The sizes are not ordered `min < avg < max`.
    #[error("chunk sizes must satisfy min < avg < max (got {min}/{avg}/{max})")]
    Order {
        /// Given minimum.
        min: u32,
        /// Given average.
        avg: u32,
        /// Given maximum.
        max: u32,
    },
    /// `min` below [`MIN_CHUNK_MIN`] or `max` above [`MAX_BLOCK_LEN`].
    #[error("chunk sizes must be within {MIN_CHUNK_MIN}..={MAX_BLOCK_LEN} bytes")]
    Range,
    /// `avg` is not a power of two.
    #[error("the average chunk size must be a power of two (got {avg})")]
    AverageNotPowerOfTwo {
        /// Given average.
        avg: u32,
    },
    /// An odd size.
    #[error("chunk sizes must be even")]
    Odd,
}

impl ChunkParams {
    /// Weft's default: min 64 KiB, average 256 KiB, max 1 MiB (see DESIGN.md).
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 64 * 1024,
        avg: 256 * 1024,
        max: 1024 * 1024,
    };

    /// Validates a set of parameters.
    pub fn new(min: u32, avg: u32, max: u32) -> Result<Self, ChunkParamsError> {
        if !(min < avg && avg < max) {
            return Err(ChunkParamsError::Order { min, avg, max });
        }
        if min < MIN_CHUNK_MIN || max > MAX_BLOCK_LEN {
            return Err(ChunkParamsError::Range);
        }
        if !avg.is_power_of_two() {
            return Err(ChunkParamsError::AverageNotPowerOfTwo { avg });
        }
        if !min.is_multiple_of(2) || !max.is_multiple_of(2) {
            return Err(ChunkParamsError::Odd);
        }
        Ok(Self { min, avg, max })
    }

    /// Minimum chunk size (except the last chunk of a stream).
    pub fn min(&self) -> u32 {
        self.min
    }
    /// Target average chunk size.
    pub fn avg(&self) -> u32 {
        self.avg
    }
    /// Maximum chunk size.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Finds the length of the chunk at the start of `window`. `window` is the rest of
    /// the stream, or at least `max` bytes of it.
    fn cut(&self, masks: &Masks, window: &[u8]) -> usize {
        let (_, len) = fastcdc::v2020::cut(
            window,
            self.min as usize,
            self.avg as usize,
            self.max as usize,
            masks.small,
            masks.large,
            masks.small << 1,
            masks.large << 1,
        );
        len
    }

    fn masks(&self) -> Masks {
        let (small, large) = select_masks(self.avg as usize, Normalization::Level1);
        Masks { small, large }
    }
}

impl Default for ChunkParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<RawChunkParams> for ChunkParams {
    type Error = ChunkParamsError;
    fn try_from(raw: RawChunkParams) -> Result<Self, Self::Error> {
        Self::new(raw.min, raw.avg, raw.max)
    }
}

impl From<ChunkParams> for RawChunkParams {
    fn from(params: ChunkParams) -> Self {
        Self {
            min: params.min,
            avg: params.avg,
            max: params.max,
        }
    }
}

struct Masks {
    small: u64,
    large: u64,
}

/// Why a stream could not be chunked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// Reading the stream failed.
    #[error("reading failed: {0}")]
    Io(#[from] io::Error),
    /// The stream is too large for one manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// A streaming content-defined chunker over any reader.
///
/// Yields each chunk's bytes in order; holds one buffer of `4 * max` bytes.
pub struct Chunker<R> {
    reader: R,
    params: ChunkParams,
    masks: Masks,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> Chunker<R> {
    /// A chunker over `reader` with the folder's parameters.
    pub fn new(reader: R, params: ChunkParams) -> Self {
        Self {
            reader,
            masks: params.masks(),
            buffer: vec![0u8; params.max as usize * 4],
            params,
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// The next chunk's bytes, or `None` at the end of the stream.
    pub fn next_chunk(&mut self) -> io::Result<Option<&[u8]>> {
        let max = self.params.max as usize;
        if self.end - self.start < max && !self.eof {
            // Compact: move the unconsumed tail (< max bytes) to the front and refill.
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let filled =
                crate::manifest::read_full(&mut self.reader, &mut self.buffer[self.end..])?;
            self.end += filled;
            self.eof = self.end < self.buffer.len();
        }
        if self.start == self.end {
            return Ok(None);
        }
        let len = self
            .params
            .cut(&self.masks, &self.buffer[self.start..self.end]);
        let chunk = &self.buffer[self.start..self.start + len];
        self.start += len;
        Ok(Some(chunk))
    }
}

/// Length of one pipeline segment for `params`: at least 4 MiB so that hand-offs
/// between threads are rare, and at least `4 * max` so that the tail carried into the
/// next segment (< max) is a small fraction of each segment.
pub fn segment_len(params: &ChunkParams) -> usize {
    (4 * 1024 * 1024).max(params.max as usize * 4)
}

/// A segment on its way from the reading thread to the cutting thread.
///
/// Layout of `buffer`: `[0, max)` is room for the previous segment's uncut tail, which
/// the cutter copies right-aligned against `max`; `[max, max + filled)` is new data.
struct ReadSegment {
    buffer: Vec<u8>,
    filled: usize,
    eof: bool,
}

/// A segment on its way back from the cutting thread, with its chunks.
struct CutSegment {
    buffer: Vec<u8>,
    /// `(start, len)` of each chunk inside `buffer`, in stream order.
    chunks: Vec<(usize, usize)>,
}

/// Chunks and hashes `reader` into a manifest. Calls `progress` with the bytes done.
///
/// Work is split over two threads so that neither waits for the other: the calling
/// thread reads segments and hashes chunks; a second thread finds the cut points.
/// Reading is a memory copy and BLAKE3 is about 2.5x faster than FastCDC here, so reading
/// plus hashing balances cutting (see `docs/benchmarks.md`). A stream that fits in one
/// segment is done on the calling thread alone: no thread is worth starting for it.
pub fn build_manifest<R: Read>(
    mut reader: R,
    params: &ChunkParams,
    mut progress: impl FnMut(u64),
) -> Result<Manifest, ChunkError> {
    let masks = params.masks();
    let segment_len = segment_len(params);
    let prefix = params.max as usize;
    // Read the first segment into a buffer that grows with the data: most files are
    // small, and zeroing a whole segment for each of them would cost more than hashing.
    let mut head = Vec::new();
    (&mut reader)
        .take(segment_len as u64)
        .read_to_end(&mut head)?;
    let filled = head.len();
    if filled < segment_len {
        let data = &head[..];
        let mut blocks = Vec::new();
        let mut start = 0;
        while start < data.len() {
            let len = params.cut(&masks, &data[start..]);
            blocks.push(BlockRef {
                hash: BlockHash::of(&data[start..start + len]),
                len: len as u32,
            });
            start += len;
        }
        progress(filled as u64);
        return Ok(Manifest::from_blocks(blocks)?);
    }

    let mut first = vec![0u8; prefix + segment_len];
    first[prefix..].copy_from_slice(&head);
    drop(head);
    let (to_cutter, cutter_inbox) = mpsc::sync_channel::<ReadSegment>(1);
    let (cutter_outbox, from_cutter) = mpsc::channel::<CutSegment>();
    std::thread::scope(|scope| {
        scope.spawn(move || cut_segments(params, &masks, cutter_inbox, cutter_outbox));
        let mut hasher = SegmentHasher::default();
        let first = ReadSegment {
            buffer: first,
            filled,
            eof: false,
        };
        let result = read_and_hash(
            &mut reader,
            prefix,
            segment_len,
            first,
            &to_cutter,
            &from_cutter,
            &mut hasher,
            &mut progress,
        );
        // Dropping the sender ends the cutter's loop; the scope joins it.
        drop(to_cutter);
        result?;
        Ok(Manifest::from_blocks(hasher.blocks)?)
    })
}

/// Chunks and hashes `reader` — a new version of a file whose manifest was
/// `previous` — into the manifest [`build_manifest`] would make, faster where the
/// data goes on as before.
///
/// After a chunk that is also in `previous`, the chunk that followed it there is
/// expected next: its bytes are hashed and compared instead of searched for cut
/// points (BLAKE3 is ~2.5x faster than FastCDC). An expected chunk is only taken where
/// FastCDC would cut it too:
/// - fastcdc decides a cut at length `L` from the bytes up to and including byte `L`
///   (the first byte of the next chunk), and only tests `L` if at least two bytes
///   follow; so a chunk ended by a content-defined cut is taken once the chunk after it
///   in `previous` (at least 2 bytes long) is found right behind it as well;
/// - a chunk of `max` bytes (no cut found) depends on its own bytes only;
/// - the previous version's last chunk may have been cut by the end of the stream, so
///   it is only taken where the new stream ends with it too.
///
/// Where the expectation fails, cut points are searched as usual until a chunk of
/// `previous` turns up again; after [`LIKE_GIVE_UP_CHUNKS`] `max`-size chunks' worth of
/// bytes without one, the rest goes to [`build_manifest`] (two threads). `previous` must come from these chunk parameters
/// for the result to be canonical; a chunk it has that fastcdc could not make (longer
/// than `max`, or shorter than `min` before the end) is never expected. Whatever
/// `previous` holds, every block of the result is hashed from the stream's bytes.
pub fn build_manifest_like<R: Read>(
    mut reader: R,
    params: &ChunkParams,
    previous: &Manifest,
    mut progress: impl FnMut(u64),
) -> Result<Manifest, ChunkError> {
    let masks = params.masks();
    let (min, max) = (params.min as usize, params.max as usize);
    let old = previous.blocks();
    let mut next_of: std::collections::HashMap<BlockHash, usize> =
        std::collections::HashMap::with_capacity(old.len());
    for (index, block) in old.iter().enumerate().rev() {
        // The first occurrence wins: iterated backwards, it is inserted last.
        next_of.insert(block.hash, index + 1);
    }
    // Room for an expected chunk and the one that confirms it (2 * max), read in
    // segments.
    let mut buffer = vec![0u8; segment_len(params) + 2 * max];
    let (mut start, mut end, mut eof) = (0usize, 0usize, false);
    let mut blocks: Vec<BlockRef> = Vec::new();
    // Stream offset of `start`.
    let mut done = 0u64;
    let mut since_hit = 0u64;
    // Index in `old` of the chunk expected next.
    let mut expected = Some(0usize);
    // An expected chunk already verified (as the confirmation of the one before it):
    // (index in `old`, stream offset).
    let mut verified: Option<(usize, u64)> = None;
    // Expected chunks hashed ahead, on two threads: (index in `old`, stream offset) ->
    // whether the bytes there are that chunk.
    let mut ahead: std::collections::HashMap<(usize, u64), bool> = std::collections::HashMap::new();
    // How many chunks to hash ahead: doubled after a run that held throughout, back to
    // the minimum after one that broke, so that hashing ahead never costs more than
    // twice the chunks it finds (a version whose old chunks come in short runs).
    let mut depth = AHEAD_MIN_CHUNKS;
    loop {
        if end - start < 2 * max && !eof {
            buffer.copy_within(start..end, 0);
            end -= start;
            start = 0;
            let filled = crate::manifest::read_full(&mut reader, &mut buffer[end..])?;
            end += filled;
            eof = end < buffer.len();
        }
        if start == end {
            break;
        }
        if since_hit >= LIKE_GIVE_UP_CHUNKS * max as u64 {
            // Little of the old version is left: the two-thread pipeline from here (a
            // chunk boundary, so its cuts are the ones a whole-stream pass makes).
            let rest = build_manifest((&buffer[start..end]).chain(reader), params, |bytes| {
                progress(done + bytes)
            })?;
            blocks.extend_from_slice(rest.blocks());
            return Ok(Manifest::from_blocks(blocks)?);
        }
        let window = &buffer[start..end];
        // The first expected chunk whose hash is not known yet: the expected one, or
        // the one after it if that was verified already (as a confirmation).
        let unknown = expected.filter(|&index| index < old.len()).map(|index| {
            if verified == Some((index, done)) {
                (index + 1, old[index].len as usize)
            } else {
                (index, 0)
            }
        });
        if let Some((index, at)) = unknown
            && index < old.len()
            && !ahead.contains_key(&(index, done + at as u64))
        {
            // A run of the previous version is expected here: hash the chunks that
            // would follow in the window at once, split over two threads (the
            // sequential checks below then look them up). A run that breaks wastes at
            // most as much hashing as the runs before it found.
            ahead = hash_expected_run(window, at, &old[index..], index, done, depth);
            depth = if !ahead.is_empty() && ahead.values().all(|&hashed| hashed) {
                (depth * 2).min(AHEAD_MAX_CHUNKS)
            } else {
                AHEAD_MIN_CHUNKS
            };
        }
        // Old chunk `index` is at `at` in the window (and is one fastcdc could make).
        let matches = |index: usize, at: usize| -> bool {
            let block = old[index];
            let len = block.len as usize;
            let possible = len <= max && (index + 1 == old.len() || len >= min);
            possible
                && match ahead.get(&(index, done + at as u64)) {
                    Some(&hashed) => hashed,
                    None => window
                        .get(at..at + len)
                        .is_some_and(|data| BlockHash::of(data) == block.hash),
                }
        };
        // ... and may end there: the old last chunk only at the end of the stream.
        let may_end = |index: usize, at: usize| -> bool {
            index + 1 < old.len() || (eof && at + old[index].len as usize == window.len())
        };
        let mut taken = None;
        if let Some(index) = expected.filter(|&index| index < old.len()) {
            let len = old[index].len as usize;
            let here = verified == Some((index, done)) || (may_end(index, 0) && matches(index, 0));
            if here {
                let confirmed = if len == max || index + 1 == old.len() {
                    true
                } else if old[index + 1].len >= 2 && matches(index + 1, len) {
                    verified = may_end(index + 1, len).then_some((index + 1, done + len as u64));
                    true
                } else {
                    false
                };
                if confirmed {
                    taken = Some((len, old[index].hash));
                    expected = Some(index + 1);
                    since_hit = 0;
                }
            }
        }
        let (len, hash) = match taken {
            Some(taken) => taken,
            None => {
                let len = params.cut(&masks, window);
                let hash = BlockHash::of(&window[..len]);
                expected = next_of.get(&hash).copied();
                since_hit += len as u64;
                (len, hash)
            }
        };
        blocks.push(BlockRef {
            hash,
            len: len as u32,
        });
        if blocks.len() > MAX_MANIFEST_BLOCKS {
            return Err(ManifestError::TooManyBlocks {
                blocks: blocks.len(),
            }
            .into());
        }
        start += len;
        done += len as u64;
        if blocks.len().is_multiple_of(64) {
            progress(done);
        }
    }
    progress(done);
    Ok(Manifest::from_blocks(blocks)?)
}

/// Fewest chunks [`hash_expected_run`] splits over two threads (fewer: a thread costs
/// more than it saves).
const AHEAD_MIN_CHUNKS: usize = 4;
/// Most chunks hashed ahead at once (bounded by the window anyway).
const AHEAD_MAX_CHUNKS: usize = 64;

/// For [`build_manifest_like`]: whether `window` (at stream offset `done`) holds the
/// chunks `run` (from index `first` of the previous manifest) one after the other from
/// `at` on, for as many of them as fit in the window, at most `depth`:
/// `(index, stream offset) -> matches`.
/// The hashing is split over this thread and one more; a run too short to be worth a
/// thread gives an empty map (the caller hashes as it goes).
fn hash_expected_run(
    window: &[u8],
    mut at: usize,
    run: &[BlockRef],
    first: usize,
    done: u64,
    depth: usize,
) -> std::collections::HashMap<(usize, u64), bool> {
    let mut ranges = Vec::new();
    for block in run.iter().take(depth) {
        let len = block.len as usize;
        if at + len > window.len() {
            break;
        }
        ranges.push((at, len));
        at += len;
    }
    if ranges.len() < AHEAD_MIN_CHUNKS {
        return std::collections::HashMap::new();
    }
    let hash = |&(at, len): &(usize, usize)| BlockHash::of(&window[at..at + len]);
    let half = ranges.len() / 2;
    let hashes: Vec<BlockHash> = std::thread::scope(|scope| {
        let second = std::thread::Builder::new()
            .name("weft-like-hash".into())
            .spawn_scoped(scope, || {
                ranges[half..].iter().map(hash).collect::<Vec<_>>()
            });
        let mut hashes: Vec<BlockHash> = ranges[..half].iter().map(hash).collect();
        match second.ok().map(|thread| thread.join()) {
            Some(Ok(rest)) => hashes.extend(rest),
            // No second thread (or it died): the rest here.
            _ => hashes.extend(ranges[half..].iter().map(hash)),
        }
        hashes
    });
    ranges
        .iter()
        .zip(hashes)
        .zip(run)
        .enumerate()
        .map(|(k, ((&(at, _), hash), block))| ((first + k, done + at as u64), hash == block.hash))
        .collect()
}

/// How much [`build_manifest_like`] chunks without finding a chunk of the previous
/// version (in `max`-size chunks: 32 MiB with the default parameters) before it hands
/// the rest of the stream to [`build_manifest`].
pub const LIKE_GIVE_UP_CHUNKS: u64 = 32;

/// Hashes the chunks of cut segments, in stream order.
#[derive(Default)]
struct SegmentHasher {
    blocks: Vec<BlockRef>,
    bytes: u64,
}

impl SegmentHasher {
    fn hash(&mut self, segment: &CutSegment) -> Result<(), ChunkError> {
        for &(start, len) in &segment.chunks {
            self.blocks.push(BlockRef {
                hash: BlockHash::of(&segment.buffer[start..start + len]),
                len: len as u32,
            });
            self.bytes += len as u64;
        }
        if self.blocks.len() > MAX_MANIFEST_BLOCKS {
            return Err(ManifestError::TooManyBlocks {
                blocks: self.blocks.len(),
            }
            .into());
        }
        Ok(())
    }
}

/// Buffers a [`build_manifest`] pipeline uses at most: one being read, one queued for
/// the cutter, one being cut, one being hashed.
const PIPELINE_BUFFERS: usize = 4;

/// The calling thread's half of [`build_manifest`]: reads segments, hands them to the
/// cutter, and hashes the segments it hands back.
#[allow(clippy::too_many_arguments)]
fn read_and_hash<R: Read>(
    reader: &mut R,
    prefix: usize,
    segment_len: usize,
    first: ReadSegment,
    to_cutter: &mpsc::SyncSender<ReadSegment>,
    from_cutter: &mpsc::Receiver<CutSegment>,
    hasher: &mut SegmentHasher,
    progress: &mut impl FnMut(u64),
) -> Result<(), ChunkError> {
    let cutter_gone = || ChunkError::Io(io::Error::other("chunking thread stopped"));
    to_cutter.send(first).map_err(|_| cutter_gone())?;
    let mut free: Vec<Vec<u8>> = Vec::new();
    let mut allocated = 1;
    let mut eof = false;
    while !eof {
        let mut buffer = match free.pop() {
            Some(buffer) => buffer,
            None if allocated < PIPELINE_BUFFERS => {
                allocated += 1;
                vec![0u8; prefix + segment_len]
            }
            None => {
                let segment = from_cutter.recv().map_err(|_| cutter_gone())?;
                hasher.hash(&segment)?;
                progress(hasher.bytes);
                segment.buffer
            }
        };
        let filled = crate::manifest::read_full(reader, &mut buffer[prefix..])?;
        eof = filled < segment_len;
        to_cutter
            .send(ReadSegment {
                buffer,
                filled,
                eof,
            })
            .map_err(|_| cutter_gone())?;
        while let Ok(segment) = from_cutter.try_recv() {
            hasher.hash(&segment)?;
            progress(hasher.bytes);
            free.push(segment.buffer);
        }
    }
    // The cutter sends one segment back for every segment it got, the last one after
    // it has seen `eof`; it hangs up after that.
    while let Ok(segment) = from_cutter.recv() {
        hasher.hash(&segment)?;
        progress(hasher.bytes);
    }
    Ok(())
}

/// The cutting thread of [`build_manifest`]: prepends the previous segment's uncut
/// tail to each segment, finds the cut points, and sends the segment back.
fn cut_segments(
    params: &ChunkParams,
    masks: &Masks,
    inbox: mpsc::Receiver<ReadSegment>,
    outbox: mpsc::Sender<CutSegment>,
) {
    let max = params.max as usize;
    let mut tail: Vec<u8> = Vec::with_capacity(max);
    for segment in inbox {
        let ReadSegment {
            mut buffer,
            filled,
            eof,
        } = segment;
        let mut position = max - tail.len();
        buffer[position..max].copy_from_slice(&tail);
        let end = max + filled;
        let mut chunks = Vec::with_capacity(filled / params.avg as usize + 4);
        while position < end && (eof || end - position >= max) {
            let len = params.cut(masks, &buffer[position..end]);
            chunks.push((position, len));
            position += len;
        }
        tail.clear();
        tail.extend_from_slice(&buffer[position..end]);
        if outbox.send(CutSegment { buffer, chunks }).is_err() || eof {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate state.
    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(&state.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Chunk lengths of `data` via the streaming chunker.
    fn chunk_lengths(data: &[u8], params: ChunkParams) -> Vec<usize> {
        let mut chunker = Chunker::new(data, params);
        let mut lengths = Vec::new();
        while let Some(chunk) = chunker.next_chunk().unwrap() {
            lengths.push(chunk.len());
        }
        lengths
    }

    /// A reader that returns at most `step` bytes per call, cycling through `steps`.
    struct Dribble<'a> {
        data: &'a [u8],
        steps: Vec<usize>,
        call: usize,
    }

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let step = self.steps[self.call % self.steps.len()].max(1);
            self.call += 1;
            let n = step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn small_params() -> ChunkParams {
        ChunkParams::new(4096, 16384, 65536).unwrap()
    }

    #[test]
    fn params_are_validated() {
        assert!(ChunkParams::new(64 * 1024, 256 * 1024, 1024 * 1024).is_ok());
        assert_eq!(
            ChunkParams::new(100, 200, 300),
            Err(ChunkParamsError::Range)
        );
        assert!(matches!(
            ChunkParams::new(8192, 4096, 65536),
            Err(ChunkParamsError::Order { .. })
        ));
        assert_eq!(
            ChunkParams::new(8192, 20000, 65536),
            Err(ChunkParamsError::AverageNotPowerOfTwo { avg: 20000 })
        );
        assert_eq!(
            ChunkParams::new(8193, 16384, 65536),
            Err(ChunkParamsError::Odd)
        );
        assert_eq!(
            ChunkParams::new(8192, 16384, 32 * 1024 * 1024),
            Err(ChunkParamsError::Range)
        );
        let bad = postcard::to_allocvec(&RawChunkParams {
            min: 1,
            avg: 2,
            max: 3,
        })
        .unwrap();
        assert!(postcard::from_bytes::<ChunkParams>(&bad).is_err());
    }

    #[test]
    fn empty_and_tiny_streams() {
        let params = ChunkParams::DEFAULT;
        assert!(chunk_lengths(&[], params).is_empty());
        assert_eq!(
            build_manifest(&[][..], &params, |_| {}).unwrap(),
            Manifest::empty()
        );
        let tiny = pseudo_random(1000, 3);
        assert_eq!(chunk_lengths(&tiny, params), vec![1000]);
        let at_min = pseudo_random(params.min() as usize, 3);
        assert_eq!(chunk_lengths(&at_min, params), vec![params.min() as usize]);
        let manifest = build_manifest(&tiny[..], &params, |_| {}).unwrap();
        assert_eq!(manifest.blocks().len(), 1);
        assert_eq!(manifest.blocks()[0].hash, BlockHash::of(&tiny));
    }

    #[test]
    fn max_is_never_exceeded_even_on_zeroes() {
        let params = small_params();
        let zeroes = vec![0u8; 1_000_000];
        let lengths = chunk_lengths(&zeroes, params);
        assert!(lengths.iter().all(|&l| l <= params.max() as usize));
        assert_eq!(lengths.iter().sum::<usize>(), zeroes.len());
        let random = pseudo_random(3_000_000, 9);
        let lengths = chunk_lengths(&random, params);
        assert!(lengths.iter().all(|&l| l <= params.max() as usize));
        // All chunks but the last respect min.
        let (_, body) = lengths.split_last().unwrap();
        assert!(body.iter().all(|&l| l >= params.min() as usize));
    }

    /// Bytes of `new` covered by chunks whose content also appears as a chunk of `old`.
    fn unchanged_bytes(old: &[u8], new: &[u8], params: ChunkParams) -> usize {
        let old_manifest = build_manifest(old, &params, |_| {}).unwrap();
        let known: std::collections::HashSet<_> =
            old_manifest.blocks().iter().map(|b| b.hash).collect();
        let new_manifest = build_manifest(new, &params, |_| {}).unwrap();
        new_manifest
            .blocks()
            .iter()
            .filter(|b| known.contains(&b.hash))
            .map(|b| b.len as usize)
            .sum()
    }

    #[test]
    fn insertion_at_front_keeps_97_percent_of_chunks() {
        let params = ChunkParams::DEFAULT;
        let original = pseudo_random(64 * 1024 * 1024, 42);
        let mut edited = b"0123456789".to_vec();
        edited.extend_from_slice(&original);
        let kept = unchanged_bytes(&original, &edited, params);
        let ratio = kept as f64 / edited.len() as f64;
        assert!(
            ratio >= 0.97,
            "only {ratio:.4} of bytes in unchanged chunks"
        );
    }

    #[test]
    fn overwrite_in_middle_changes_at_most_two_chunks() {
        let params = ChunkParams::DEFAULT;
        let original = pseudo_random(64 * 1024 * 1024, 7);
        let mut edited = original.clone();
        let middle = edited.len() / 2;
        edited[middle..middle + 4096].copy_from_slice(&pseudo_random(4096, 99));
        let old = build_manifest(&original[..], &params, |_| {}).unwrap();
        let new = build_manifest(&edited[..], &params, |_| {}).unwrap();
        let known: std::collections::HashSet<_> = old.blocks().iter().map(|b| b.hash).collect();
        let changed = new
            .blocks()
            .iter()
            .filter(|b| !known.contains(&b.hash))
            .count();
        assert!((1..=2).contains(&changed), "{changed} chunks changed");
    }

    #[test]
    fn pipeline_matches_sequential_chunker_and_verifies() {
        let params = small_params();
        // Several segments, with a tail that is not a multiple of anything.
        let data = pseudo_random(segment_len(&params) * 3 + 12_345, 5);
        let mut reported = 0;
        let manifest = build_manifest(&data[..], &params, |done| reported = done).unwrap();
        assert_eq!(reported, data.len() as u64);
        let lengths: Vec<usize> = manifest.blocks().iter().map(|b| b.len as usize).collect();
        assert_eq!(lengths, chunk_lengths(&data, params));
        crate::manifest::verify(&data[..], &manifest).unwrap();
        // Short, uneven reads across segment boundaries give the same manifest.
        let dribble = Dribble {
            data: &data,
            steps: vec![65_537, 3, 1_000_001, 4_096],
            call: 0,
        };
        assert_eq!(build_manifest(dribble, &params, |_| {}).unwrap(), manifest);
        // A stream of exactly one segment, and of one segment plus one byte.
        for len in [segment_len(&params), segment_len(&params) + 1] {
            let manifest = build_manifest(&data[..len], &params, |_| {}).unwrap();
            let lengths: Vec<usize> = manifest.blocks().iter().map(|b| b.len as usize).collect();
            assert_eq!(lengths, chunk_lengths(&data[..len], params));
        }
    }

    #[test]
    fn read_errors_are_returned_not_panicked() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::PermissionDenied, "denied"))
            }
        }
        assert!(matches!(
            build_manifest(Failing, &ChunkParams::DEFAULT, |_| {}),
            Err(ChunkError::Io(_))
        ));
        // Fails after the pipeline has started.
        let data = pseudo_random(segment_len(&small_params()) + 10, 1);
        let failing_later = (&data[..]).chain(Failing);
        assert!(matches!(
            build_manifest(failing_later, &small_params(), |_| {}),
            Err(ChunkError::Io(_))
        ));
    }

    /// `build_manifest_like(new, manifest of old)` against `build_manifest(new)`.
    fn assert_like_matches(old: &[u8], new: &[u8], params: ChunkParams) {
        let previous = build_manifest(old, &params, |_| {}).unwrap();
        let mut reported = 0;
        let like = build_manifest_like(new, &params, &previous, |done| reported = done).unwrap();
        assert_eq!(like, build_manifest(new, &params, |_| {}).unwrap());
        assert_eq!(reported, new.len() as u64);
    }

    #[test]
    fn a_manifest_built_like_the_previous_one_is_the_same_manifest() {
        let params = small_params();
        let old = pseudo_random(2_000_000, 3);
        let splice = |at: usize, remove: usize, insert: &[u8]| {
            let mut new = old[..at].to_vec();
            new.extend_from_slice(insert);
            new.extend_from_slice(&old[at + remove..]);
            new
        };
        // Unchanged; small edits at the front, the middle, the end; appends after a
        // last chunk cut by the end of the stream; truncations; a different file.
        assert_like_matches(&old, &old, params);
        assert_like_matches(&old, &splice(0, 0, b"ten bytes!"), params);
        assert_like_matches(&old, &splice(1_000_000, 4096, &[7u8; 4096]), params);
        assert_like_matches(&old, &splice(1_999_990, 10, b""), params);
        assert_like_matches(
            &old,
            &splice(2_000_000, 0, &pseudo_random(300_000, 4)),
            params,
        );
        assert_like_matches(&old, &splice(2_000_000, 0, b"x"), params);
        assert_like_matches(&old, &old[..1_500_000], params);
        assert_like_matches(&old, &old[..10], params);
        assert_like_matches(&old, b"", params);
        assert_like_matches(b"", &old, params);
        assert_like_matches(&old, &pseudo_random(2_000_000, 5), params);
        // Repeated chunks (zeroes cut at max) and a chunk that moved.
        let zeroes = vec![0u8; 700_000];
        let mut moved = zeroes.clone();
        moved.extend_from_slice(&old[..300_000]);
        assert_like_matches(&zeroes, &moved, params);
        let mut swapped = old[1_000_000..].to_vec();
        swapped.extend_from_slice(&old[..1_000_000]);
        assert_like_matches(&old, &swapped, params);
        // Past LIKE_GIVE_UP_CHUNKS max-size chunks of new data, the rest goes to the
        // two-thread pipeline from a chunk boundary.
        let mut grown = pseudo_random(40 * params.max() as usize, 6);
        grown.extend_from_slice(&old);
        assert_like_matches(&old, &grown, params);
    }

    /// fastcdc decides a cut from the byte after it: edits that start exactly at an old
    /// chunk boundary, and streams that end one byte past one, must still cut as a
    /// fresh chunking does.
    #[test]
    fn edits_at_chunk_boundaries_cut_as_a_fresh_chunking_does() {
        let params = small_params();
        let old = pseudo_random(600_000, 8);
        let previous = build_manifest(&old[..], &params, |_| {}).unwrap();
        let boundaries: Vec<usize> = previous
            .blocks_with_offsets()
            .map(|(offset, block)| offset as usize + block.len as usize)
            .collect();
        for &at in &boundaries[..boundaries.len() - 1] {
            for edit in [&b"!"[..], &b"an insert"[..]] {
                let mut inserted = old[..at].to_vec();
                inserted.extend_from_slice(edit);
                inserted.extend_from_slice(&old[at..]);
                assert_like_matches(&old, &inserted, params);
                let mut overwritten = old.clone();
                overwritten[at..at + edit.len()].copy_from_slice(edit);
                assert_like_matches(&old, &overwritten, params);
            }
            for extra in 1..3 {
                assert_like_matches(&old, &old[..at + extra], params);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn cut_points_do_not_depend_on_read_sizes(
            seed in any::<u64>(),
            len in 0usize..400_000,
            steps in proptest::collection::vec(1usize..70_000, 1..6),
        ) {
            let params = small_params();
            let data = pseudo_random(len, seed);
            let expected = chunk_lengths(&data, params);
            let mut chunker = Chunker::new(Dribble { data: &data, steps: steps.clone(), call: 0 }, params);
            let mut lengths = Vec::new();
            while let Some(chunk) = chunker.next_chunk().unwrap() {
                lengths.push(chunk.len());
            }
            prop_assert_eq!(&lengths, &expected);
            let manifest = build_manifest(Dribble { data: &data, steps, call: 0 }, &params, |_| {}).unwrap();
            let piped: Vec<usize> = manifest.blocks().iter().map(|b| b.len as usize).collect();
            prop_assert_eq!(piped, expected);
        }

        #[test]
        fn building_like_a_previous_version_changes_nothing(
            seed in any::<u64>(),
            len in 0usize..600_000,
            edits in proptest::collection::vec((any::<u32>(), 0usize..5_000, 0usize..5_000), 0..4),
        ) {
            let old = pseudo_random(len, seed);
            let mut new = old.clone();
            for (at, remove, insert) in edits {
                let at = at as usize % (new.len() + 1);
                let remove = remove.min(new.len() - at);
                let filler = pseudo_random(insert, seed ^ at as u64);
                new.splice(at..at + remove, filler);
            }
            let params = small_params();
            let previous = build_manifest(&old[..], &params, |_| {}).unwrap();
            let like = build_manifest_like(&new[..], &params, &previous, |_| {}).unwrap();
            prop_assert_eq!(like, build_manifest(&new[..], &params, |_| {}).unwrap());
        }
    }
}
