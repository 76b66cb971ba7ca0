//! Downloading one file version into a temp file beside its destination.
//!
//! The temp file (`.weft.tmp.<id>`, never scanned) is named from the path and the
//! manifest, so a download interrupted by a crash finds its own temp file again: blocks
//! already in it that verify against the manifest are kept (resume), the others come
//! from a local file that has the same block (dedup, renames, copies: never fetched)
//! or from connected peers, in batches, several in flight, each block verified by its
//! BLAKE3 hash before it is written. A block that fails verification counts against
//! the peer that sent it and is asked of another.
//!
//! The result is a complete, fsynced temp file with the version's mode and mtime. The
//! folder actor then checks that the destination is still what it expects and renames
//! the temp file over it (DESIGN.md, "Applying changes safely").

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use weft_protocol::document::{Content, Entry};
use weft_protocol::path::TEMP_PREFIX;
use weft_protocol::{BlockHash, DeviceId, FolderId, Manifest, RelPath};

use crate::net::NetHandle;
use crate::store::Store;
use crate::temp_file::TempFile;

/// Blocks per request: a few MiB per round trip with the default chunk size.
pub const BATCH_BLOCKS: usize = 8;
/// Requests in flight per file.
pub const BATCHES_IN_FLIGHT: usize = 4;
/// Times a block is asked for (from different peers where possible) before giving up.
pub const BLOCK_ATTEMPTS: usize = 3;
/// Failed requests (not missing blocks) a download survives.
pub const MAX_REQUEST_FAILURES: usize = 50;
/// Bytes written to a download between two early write-backs (see [`fetch_file`]).
pub const EARLY_SYNC_BYTES: u64 = 32 * 1024 * 1024;
/// Pause before a failed request is sent again, times the failures so far.
pub const REQUEST_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// What a download needs from the node.
#[derive(Clone)]
pub struct FetchContext {
    /// The network.
    pub net: NetHandle,
    /// The store (block index, manifests).
    pub store: Arc<Store>,
    /// The folder.
    pub folder: FolderId,
    /// The folder's root on disk.
    pub root: PathBuf,
    /// Connected devices that share the folder.
    pub peers: Vec<DeviceId>,
    /// Blocks of kept old versions.
    pub versions: Option<crate::versions::VersionStore>,
}

/// A finished download.
#[derive(Debug)]
pub struct Fetched {
    /// The complete temp file.
    pub temp: PathBuf,
    /// The manifest it holds.
    pub manifest: Manifest,
    /// Bytes that came over the network.
    pub bytes_fetched: u64,
}

/// The temp file of a download: deterministic, so a restart resumes it.
pub fn temp_path(root: &Path, path: &RelPath, manifest: &Manifest) -> PathBuf {
    let mut hasher = blake3::Hasher::new();
    hasher.update(path.as_str().as_bytes());
    hasher.update(manifest.hash().as_bytes());
    let id = hasher.finalize().to_hex();
    let dir = match path.parent() {
        Some(parent) => root.join(parent.as_str()),
        None => root.to_path_buf(),
    };
    dir.join(format!("{TEMP_PREFIX}{}", &id[..24]))
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> String {
    format!("{what} {}: {error}", path.display())
}

/// Gets the manifest of an entry: inline, stored, or from a peer.
async fn manifest_of(context: &FetchContext, entry: &Entry) -> Result<Manifest, String> {
    match &entry.content {
        Content::Inline(manifest) => Ok(manifest.clone()),
        Content::Manifest(hash) => {
            if let Ok(Some(manifest)) = context.store.manifest(hash) {
                return Ok(manifest);
            }
            // Each peer is asked; a failed request (not an answer "missing") is asked
            // again after a growing pause, like block requests.
            let mut failures = 0usize;
            let mut peers: std::collections::VecDeque<DeviceId> =
                context.peers.iter().copied().collect();
            while let Some(peer) = peers.pop_front() {
                match context
                    .net
                    .fetch_manifest(&peer, &context.folder, *hash)
                    .await
                {
                    Ok(Some(manifest)) => return Ok(manifest),
                    Ok(None) => {}
                    Err(error) => {
                        failures += 1;
                        tracing::debug!(%error, "manifest request failed; asking again");
                        if failures <= MAX_REQUEST_FAILURES {
                            tokio::time::sleep(REQUEST_RETRY_PAUSE * failures.min(20) as u32).await;
                            peers.push_back(peer);
                        }
                    }
                }
            }
            Err(format!("no connected device has manifest {hash}"))
        }
        _ => Err("entry has no file content".into()),
    }
}

/// Reads `len` bytes at `offset` of `path` and returns them if they hash to `hash`.
fn read_verified(path: &Path, offset: u64, len: u32, hash: &BlockHash) -> Option<Vec<u8>> {
    let file = File::open(path).ok()?;
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, offset).ok()?;
    (BlockHash::of(&data) == *hash).then_some(data)
}

/// Blocks still missing after the local part of a download: hash -> offsets.
type Missing = BTreeMap<BlockHash, Vec<u64>>;

/// Cores for local block copies (read once: the standard library reads cgroup files
/// on every call).
fn copy_workers() -> usize {
    static WORKERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WORKERS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4)
    })
}

/// The local part of a download: keep verified blocks already in the temp file, copy
/// blocks that exist in local files. Returns the open temp file and what is still
/// missing.
fn prepare_locally(
    context: &FetchContext,
    temp: &Path,
    manifest: &Manifest,
) -> Result<(TempFile, Missing), String> {
    if let Some(parent) = temp.parent() {
        fs::create_dir_all(parent).map_err(|e| io_error("creating", parent, e))?;
    }
    let existing_len = fs::metadata(temp).map(|m| m.len()).unwrap_or(0);
    let file = TempFile::open(temp, manifest.size()).map_err(|e| io_error("opening", temp, e))?;
    // Large files are copied on every core: verifying and moving a 256 MiB file's
    // blocks is the bulk of a small edit's time on the receiving side.
    let blocks: Vec<(u64, weft_protocol::BlockRef)> = manifest
        .blocks_with_offsets()
        .map(|(offset, block)| (offset, *block))
        .collect();
    let workers = copy_workers().min(blocks.len().div_ceil(64).max(1));
    let write_back = WriteBack::new(file.file());
    let share = blocks.len().div_ceil(workers).max(1);
    let parts: Vec<Result<Vec<(BlockHash, u64)>, String>> = if workers == 1 {
        // Most files: no thread for a few blocks.
        vec![copy_local_blocks(
            context,
            temp,
            &file,
            existing_len,
            &blocks,
            &write_back,
        )]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = blocks
                .chunks(share)
                .map(|part| {
                    let (file, write_back) = (&file, &write_back);
                    scope.spawn(move || {
                        copy_local_blocks(context, temp, file, existing_len, part, write_back)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|_| Err("a local copy worker failed".into()))
                })
                .collect()
        })
    };
    let mut missing = Missing::new();
    for part in parts {
        for (hash, offset) in part? {
            missing.entry(hash).or_default().push(offset);
        }
    }
    Ok((file, missing))
}

/// One worker's share of [`prepare_locally`]: keeps verified blocks already in the temp
/// file, copies blocks found in local files; returns the blocks still missing.
fn copy_local_blocks(
    context: &FetchContext,
    temp: &Path,
    file: &TempFile,
    existing_len: u64,
    blocks: &[(u64, weft_protocol::BlockRef)],
    write_back: &WriteBack,
) -> Result<Vec<(BlockHash, u64)>, String> {
    let mut missing = Vec::new();
    let mut buffer = Vec::new();
    for (offset, block) in blocks {
        let offset = *offset;
        // Resume: a block already in the temp file is kept if it verifies.
        if offset + u64::from(block.len) <= existing_len {
            buffer.resize(block.len as usize, 0);
            if file.file().read_exact_at(&mut buffer, offset).is_ok()
                && BlockHash::of(&buffer) == block.hash
            {
                continue;
            }
        }
        // Dedup: the block is in a local file.
        let local = context
            .store
            .block_locations(&block.hash)
            .unwrap_or_default()
            .into_iter()
            .filter(|location| location.folder == context.folder)
            .find_map(|location| {
                read_verified(
                    &context.root.join(location.path.as_str()),
                    location.offset,
                    block.len,
                    &block.hash,
                )
            })
            .or_else(|| context.versions.as_ref().and_then(|v| v.block(&block.hash)));
        match local {
            Some(data) => {
                file.write_cached_at(&data, offset)
                    .map_err(|e| io_error("writing", temp, e))?;
                write_back.wrote(data.len() as u64);
            }
            None => missing.push((block.hash, offset)),
        }
    }
    Ok(missing)
}

/// Starts writing a large download or local copy back to disk while it runs (every
/// [`EARLY_SYNC_BYTES`], at most one write-back at a time, not awaited), so the final
/// fsync does not stall on the whole file (a small edit to a large file is a local copy
/// of almost all of it).
struct WriteBack {
    file: Option<Arc<File>>,
    unsynced: std::sync::atomic::AtomicU64,
    running: Arc<std::sync::atomic::AtomicBool>,
}

impl WriteBack {
    fn new(file: &File) -> Self {
        Self {
            file: file.try_clone().ok().map(Arc::new),
            unsynced: std::sync::atomic::AtomicU64::new(0),
            running: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    fn wrote(&self, bytes: u64) {
        use std::sync::atomic::Ordering;
        let unsynced = self.unsynced.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if unsynced < EARLY_SYNC_BYTES {
            return;
        }
        // Counted from here whether or not a write-back starts: one still running
        // covers these bytes, and back-to-back write-backs (each a disk cache flush)
        // would cost more than they save.
        self.unsynced.store(0, Ordering::Release);
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (Some(file), running) = (self.file.clone(), self.running.clone()) else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("weft-write-back".into())
            .spawn(move || {
                let _ = file.sync_data();
                running.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.running.store(false, Ordering::Release);
        }
    }
}

/// Downloads `entry` (a file version) of `path` into its temp file.
pub async fn fetch_file(
    context: FetchContext,
    path: RelPath,
    entry: Entry,
) -> Result<Fetched, String> {
    let manifest = manifest_of(&context, &entry).await?;
    let temp = temp_path(&context.root, &path, &manifest);
    let (file, missing) = {
        let context = context.clone();
        let temp = temp.clone();
        let manifest = manifest.clone();
        tokio::task::spawn_blocking(move || prepare_locally(&context, &temp, &manifest))
            .await
            .map_err(|e| e.to_string())??
    };
    let file = Arc::new(file);
    let lengths: HashMap<BlockHash, u32> =
        manifest.blocks().iter().map(|b| (b.hash, b.len)).collect();
    let mut bytes_fetched = 0u64;
    let mut finished = false;
    // Direct writes are on the disk already: nothing to write back.
    let write_back = (!file.is_direct()).then(|| WriteBack::new(file.file()));
    if !missing.is_empty() {
        if context.peers.is_empty() {
            return Err("no connected device to fetch blocks from".into());
        }
        let hashes: Vec<BlockHash> = missing.keys().copied().collect();
        let mut attempts: HashMap<BlockHash, usize> = HashMap::new();
        let mut queue: Vec<Vec<BlockHash>> =
            hashes.chunks(BATCH_BLOCKS).map(<[_]>::to_vec).collect();
        queue.reverse();
        let mut round = 0usize;
        let mut stream_failures = 0usize;
        let mut in_flight = futures::stream::FuturesUnordered::new();
        loop {
            while in_flight.len() < BATCHES_IN_FLIGHT {
                let Some(batch) = queue.pop() else { break };
                let peer = context.peers[round % context.peers.len()];
                round += 1;
                let net = context.net.clone();
                let folder = context.folder.clone();
                in_flight.push(async move {
                    let result = net.fetch_blocks(&peer, &folder, batch.clone()).await;
                    (peer, batch, result)
                });
            }
            let Some((peer, batch, result)) = in_flight.next().await else {
                break;
            };
            let mut retry = Vec::new();
            let mut writes = Vec::new();
            match result {
                Ok(blocks) => {
                    for (hash, data) in blocks {
                        match data {
                            Some(data)
                                if BlockHash::of(&data) == hash
                                    && lengths.get(&hash) == Some(&(data.len() as u32)) =>
                            {
                                bytes_fetched += data.len() as u64;
                                let offsets = missing.get(&hash).cloned().unwrap_or_default();
                                writes.push((data, offsets));
                            }
                            Some(_) => {
                                tracing::warn!(peer = %peer, %hash, "block failed verification; asking elsewhere");
                                context.net.penalise(&peer);
                                retry.push(hash);
                            }
                            None => retry.push(hash),
                        }
                    }
                }
                Err(error) => {
                    // A failed request (stream refused or reset under load) says
                    // nothing about the blocks: ask again after a growing pause, from
                    // the next peer, without counting it as the blocks' absence.
                    stream_failures += 1;
                    if stream_failures > MAX_REQUEST_FAILURES {
                        return Err(format!("block requests keep failing: {error}"));
                    }
                    tracing::debug!(peer = %peer, %error, "block request failed; asking again");
                    let pause = REQUEST_RETRY_PAUSE * stream_failures.min(20) as u32;
                    tokio::time::sleep(pause).await;
                    queue.push(batch);
                }
            }
            for hash in retry {
                let tries = attempts.entry(hash).or_insert(0);
                *tries += 1;
                if *tries >= BLOCK_ATTEMPTS.max(context.peers.len()) {
                    return Err(format!(
                        "block {hash} is not available from any connected device"
                    ));
                }
                queue.push(vec![hash]);
            }
            // The verified blocks of one answer are written in one blocking call, and
            // the last answer's call also finishes the file (one hand-off for a small
            // file's whole download).
            let last = queue.is_empty() && in_flight.is_empty();
            let written: u64 = writes
                .iter()
                .map(|(data, offsets)| data.len() as u64 * offsets.len() as u64)
                .sum();
            if !last {
                // Large downloads are written back while they run, so the disk works
                // beside the network and the final fsync does not stall on hundreds
                // of MiB.
                if let Some(write_back) = &write_back {
                    write_back.wrote(written);
                }
            }
            if !writes.is_empty() || last {
                let file = file.clone();
                let temp = temp.clone();
                let (mode, mtime_ns) = (entry.mode, entry.mtime_ns);
                tokio::task::spawn_blocking(move || {
                    for (data, offsets) in writes {
                        for offset in offsets {
                            file.write_at(&data, offset)
                                .map_err(|e| io_error("writing", &temp, e))?;
                        }
                    }
                    if last {
                        finish_temp(&file, &temp, mode, mtime_ns)?;
                    }
                    Ok::<(), String>(())
                })
                .await
                .map_err(|e| e.to_string())??;
                finished = last;
            }
        }
    }
    if !finished {
        let (mode, mtime_ns) = (entry.mode, entry.mtime_ns);
        let temp = temp.clone();
        tokio::task::spawn_blocking(move || finish_temp(&file, &temp, mode, mtime_ns))
            .await
            .map_err(|e| e.to_string())??;
    }
    Ok(Fetched {
        temp,
        manifest,
        bytes_fetched,
    })
}

/// Sets mode and mtime, then makes the temp file durable (data and metadata).
fn finish_temp(file: &TempFile, temp: &Path, mode: u32, mtime_ns: i64) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let file = file.file();
    let mode = if mode & 0o777 == 0 {
        0o644
    } else {
        mode & 0o7777
    };
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| io_error("chmod", temp, e))?;
    let mtime = if mtime_ns >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(mtime_ns as u64)
    } else {
        std::time::UNIX_EPOCH
    };
    file.set_modified(mtime)
        .map_err(|e| io_error("setting mtime of", temp, e))?;
    file.sync_all().map_err(|e| io_error("syncing", temp, e))
}
