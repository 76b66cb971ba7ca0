//! Downloading one file version into a temp file beside its destination.
//!
//! The temp file (`.weft.tmp.<id>`, never scanned) is named from the path and the
//! manifest, so a download interrupted by a crash finds its own temp file again: blocks
//! already in it that verify against the manifest are kept (resume), the others come
//! from a local file that has the same block (dedup, renames, copies: never fetched)
//! or from connected peers, in batches, several in flight, each block verified by its
//! BLAKE3 hash before it is written. A block that fails verification counts against
//! the peer that sent it and is asked of another. A large new download that is mostly
//! a local copy (an edit to a large file) has the blocks no local file has fetched
//! while the copy runs, rather than after it.
//!
//! Which peer is asked for which blocks, and what each answer means, is decided by the
//! folder core (`weft_core::transfer`), which the simulation runs too; this module
//! reads, verifies and writes. The result is a complete, fsynced temp file with the
//! version's mode and mtime. The folder core then checks that the destination is still
//! what it expects and has it renamed over it (DESIGN.md, "Applying changes safely").

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use weft_protocol::document::{Content, Entry};
use weft_protocol::{BlockHash, DeviceId, FolderId, Manifest, ManifestHash, RelPath};

use crate::net::NetHandle;
use crate::store::Store;
use crate::temp_file::TempFile;

pub use weft_core::transfer::{BATCH_BLOCKS, BATCHES_IN_FLIGHT, BLOCK_ATTEMPTS};
use weft_core::transfer::{BlockRequests, ManifestRequests, Received};

/// Bytes written to a download between two early write-backs (see [`fetch_files`]).
pub const EARLY_SYNC_BYTES: u64 = 32 * 1024 * 1024;

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
    /// Directories on the way to it were made for it, here or by an earlier run whose
    /// temp file this resumed: they are synced with its rename (`dir_sync`).
    pub new_dirs: bool,
}

/// The temp file of a download: deterministic, so a restart resumes it.
pub fn temp_path(root: &Path, path: &RelPath, manifest: &Manifest) -> PathBuf {
    root.join(weft_core::transfer::temp_name(path, manifest))
}

/// Why a download failed. Cloned onto every file of a group that one failure ends.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// A file operation on the temp file or its directory failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// To which file.
        path: PathBuf,
        /// The error.
        source: Arc<std::io::Error>,
    },
    /// The version's manifest is neither stored here nor held by a connected device.
    #[error("no connected device has manifest {0}")]
    NoManifest(ManifestHash),
    /// The entry is not a file with content.
    #[error("entry has no file content")]
    NoContent,
    /// The temp file would be outside the folder.
    #[error("refused: {} is outside the folder", .0.display())]
    OutsideFolder(PathBuf),
    /// A parent of the temp file is not a real directory.
    #[error("refused: {} is a symlink or file on this device, or cannot be read", .0.display())]
    NotADirectory(PathBuf),
    /// A blocking task of the download did not finish (the runtime is shutting down).
    #[error("{0} failed: {1}")]
    Task(&'static str, String),
    /// Block requests failed too often.
    #[error("block requests keep failing: {0}")]
    RequestsFailing(crate::net::NetError),
    /// No connected device has this block.
    #[error("block {0} is not available from any connected device")]
    Unavailable(BlockHash),
    /// The download has no temp file to finish.
    #[error("the download has no temp file")]
    NoTempFile,
    /// The download stopped before its end (its task ended early).
    #[error("the download stopped before its end")]
    Stopped,
    /// No peer is connected.
    #[error("no connected device to fetch blocks from")]
    NoPeers,
    /// The download was never run.
    #[error("the download did not run")]
    NotRun,
}

fn io_error(action: &'static str, path: &Path, error: std::io::Error) -> FetchError {
    FetchError::Io {
        action,
        path: path.to_path_buf(),
        source: Arc::new(error),
    }
}

/// Gets the manifest of an entry: inline, stored, or from a peer.
async fn manifest_of(context: &FetchContext, entry: &Entry) -> Result<Manifest, FetchError> {
    match &entry.content {
        Content::Inline(manifest) => Ok(manifest.clone()),
        Content::Manifest(hash) => {
            if let Ok(Some(manifest)) = context.store.manifest(hash) {
                return Ok(manifest);
            }
            // Each peer is asked; a failed request (not an answer "missing") is asked
            // again after a growing pause, like block requests.
            let mut requests = ManifestRequests::new(&context.peers);
            while let Some(peer) = requests.next_peer() {
                let answer = match context
                    .net
                    .fetch_manifest(&peer, &context.folder, *hash)
                    .await
                {
                    Ok(Some(manifest)) => return Ok(manifest),
                    Ok(None) => Some(false),
                    Err(error) => {
                        tracing::debug!(%error, "manifest request failed; asking again");
                        None
                    }
                };
                if let Some(pause) = requests.answered(peer, answer) {
                    tokio::time::sleep(pause).await;
                }
            }
            Err(FetchError::NoManifest(*hash))
        }
        _ => Err(FetchError::NoContent),
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
/// Block index rows already looked up: hash -> its places in local files of the folder.
type Located = HashMap<BlockHash, Vec<crate::store::BlockLocation>>;

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
/// blocks that exist in local files. Returns the open temp file, what is still
/// missing, and whether directories may have been made for it ([`open_temp`]).
fn prepare_locally(
    context: &FetchContext,
    temp: &Path,
    manifest: &Manifest,
) -> Result<(TempFile, Missing, bool), FetchError> {
    let (file, existing_len, new_dirs) = open_temp(&context.root, temp, manifest)?;
    let missing = copy_locally(
        context,
        temp,
        &file,
        existing_len,
        manifest,
        &Missing::new(),
        &Located::new(),
    )?;
    Ok((file, missing, new_dirs))
}

/// The first ancestor of `path` (inside `root`, `root` itself excluded) that exists
/// and is not a real directory, or cannot be looked at; `None` if every existing one is
/// a directory. A symlink (or file) on the way would let a write or delete under `path`
/// land outside the folder.
pub fn non_directory_parent(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut parent = path.parent();
    while let Some(dir) = parent {
        if dir == root || !dir.starts_with(root) {
            return None;
        }
        match fs::symlink_metadata(dir) {
            Ok(metadata) if metadata.file_type().is_dir() => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            _ => return Some(dir.to_path_buf()),
        }
        parent = dir.parent();
    }
    None
}

/// Refuses a temp file outside the folder `root`, or whose directory inside it is
/// reached through a symlink or a file ([`non_directory_parent`]). The download was
/// planned when its parents were directories, but a change applied since (a remote
/// directory replaced by a symlink, say to `/etc`) may have made one a symlink: opening
/// the temp file, and making its missing directories, would then write outside the
/// folder.
fn check_parents(root: &Path, temp: &Path) -> Result<(), FetchError> {
    if !temp.starts_with(root) {
        return Err(FetchError::OutsideFolder(temp.to_path_buf()));
    }
    match non_directory_parent(root, temp) {
        Some(dir) => Err(FetchError::NotADirectory(dir)),
        None => Ok(()),
    }
}

/// Opens (creating its directory if need be) the temp file of a download inside the
/// folder `root` ([`check_parents`] first); returns it, the length it had (blocks of
/// an interrupted download are in it), and whether directories may have been made for
/// it: here, or by the earlier run that left the temp file.
fn open_temp(
    root: &Path,
    temp: &Path,
    manifest: &Manifest,
) -> Result<(TempFile, u64, bool), FetchError> {
    check_parents(root, temp)?;
    let mut new_dirs = false;
    if let Some(parent) = temp.parent() {
        // Usually there: a lookup, where `mkdir` would take the directory's lock
        // (which every file created in it takes too) to find it exists.
        if !parent.is_dir() {
            fs::create_dir_all(parent).map_err(|e| io_error("creating", parent, e))?;
            new_dirs = true;
        }
    }
    let existing = fs::metadata(temp).map(|m| m.len()).ok();
    let file = TempFile::open(temp, manifest.size()).map_err(|e| io_error("opening", temp, e))?;
    Ok((file, existing.unwrap_or(0), new_dirs || existing.is_some()))
}

/// The local part of a download into its open temp file: keeps verified blocks already
/// in it, copies blocks that exist in local files or kept versions; the blocks of
/// `elsewhere` (fetched meanwhile by the caller) are left alone, and those in `located`
/// are not looked up again. Returns what is still missing.
fn copy_locally(
    context: &FetchContext,
    temp: &Path,
    file: &TempFile,
    existing_len: u64,
    manifest: &Manifest,
    elsewhere: &Missing,
    located: &Located,
) -> Result<Missing, FetchError> {
    // Large files are copied on every core: verifying and moving a 256 MiB file's
    // blocks is the bulk of a small edit's time on the receiving side.
    let blocks: Vec<(u64, weft_protocol::BlockRef)> = manifest
        .blocks_with_offsets()
        .filter(|(_, block)| !elsewhere.contains_key(&block.hash))
        .map(|(offset, block)| (offset, *block))
        .collect();
    if blocks.is_empty() {
        return Ok(Missing::new());
    }
    let workers = copy_workers().min(blocks.len().div_ceil(64).max(1));
    let write_back = WriteBack::new(file);
    let share = blocks.len().div_ceil(workers).max(1);
    let parts: Vec<Result<Vec<(BlockHash, u64)>, FetchError>> = if workers == 1 {
        // Most files: no thread for a few blocks.
        vec![copy_local_blocks(
            context,
            temp,
            file,
            existing_len,
            &blocks,
            located,
            &write_back,
        )]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = blocks
                .chunks(share)
                .map(|part| {
                    let write_back = &write_back;
                    scope.spawn(move || {
                        copy_local_blocks(
                            context,
                            temp,
                            file,
                            existing_len,
                            part,
                            located,
                            write_back,
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle.join().unwrap_or_else(|_| {
                        Err(FetchError::Task(
                            "a local copy worker",
                            "it panicked".into(),
                        ))
                    })
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
    Ok(missing)
}

/// Most bytes read from a local file at once by [`copy_local_blocks`].
const LOCAL_RUN_MAX: u64 = 1024 * 1024;

/// Blocks that follow one another both in the download and in one local file: read
/// with one read, verified block by block.
struct LocalRun {
    /// The local file (relative to the folder root).
    path: RelPath,
    /// Where the run starts in the local file.
    from: u64,
    /// Its blocks: (offset in the download, block).
    blocks: Vec<(u64, weft_protocol::BlockRef)>,
    len: u64,
}

impl LocalRun {
    /// Whether `block`, at `offset` in the download and at `location` in a local file,
    /// continues this run.
    fn continues(&self, offset: u64, location: &crate::store::BlockLocation) -> bool {
        let Some((last_offset, last)) = self.blocks.last() else {
            return false;
        };
        location.path == self.path
            && location.offset == self.from + self.len
            && offset == last_offset + u64::from(last.len)
            && self.len + u64::from(location.len) <= LOCAL_RUN_MAX
    }
}

/// One worker's share of [`prepare_locally`]: keeps verified blocks already in the temp
/// file, copies blocks found in local files; returns the blocks still missing.
///
/// A block found in a local file usually has its neighbours there too, right after it
/// (an edited file's previous version, a renamed or copied file): such runs are read
/// with one read of up to [`LOCAL_RUN_MAX`] and written with one write, rather than a
/// file open, a read and a write per block.
fn copy_local_blocks(
    context: &FetchContext,
    temp: &Path,
    file: &TempFile,
    existing_len: u64,
    blocks: &[(u64, weft_protocol::BlockRef)],
    located: &Located,
    write_back: &WriteBack,
) -> Result<Vec<(BlockHash, u64)>, FetchError> {
    let mut missing = Vec::new();
    let mut buffer = Vec::new();
    // One read buffer for every run of this worker (zeroed once, not per run).
    let mut data = Vec::new();
    let mut run: Option<LocalRun> = None;
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
        let locations: Vec<crate::store::BlockLocation> = located
            .get(&block.hash)
            .cloned()
            .unwrap_or_else(|| {
                context
                    .store
                    .block_locations(&block.hash)
                    .unwrap_or_default()
            })
            .into_iter()
            .filter(|location| location.folder == context.folder && location.len == block.len)
            .collect();
        if let Some(current) = &mut run
            && let Some(location) = locations.iter().find(|l| current.continues(offset, l))
        {
            current.len += u64::from(location.len);
            current.blocks.push((offset, *block));
            continue;
        }
        if let Some(done) = run.take() {
            copy_run(
                context,
                temp,
                file,
                done,
                &mut data,
                write_back,
                &mut missing,
            )?;
        }
        run = locations.into_iter().next().map(|location| LocalRun {
            path: location.path,
            from: location.offset,
            blocks: vec![(offset, *block)],
            len: u64::from(location.len),
        });
        if run.is_none() {
            // No local file has it (looked up above): a kept version, or a peer.
            let place = (offset, *block);
            copy_block(
                context,
                temp,
                file,
                &place,
                Some(Vec::new()),
                write_back,
                &mut missing,
            )?;
        }
    }
    if let Some(done) = run.take() {
        copy_run(
            context,
            temp,
            file,
            done,
            &mut data,
            write_back,
            &mut missing,
        )?;
    }
    Ok(missing)
}

/// Copies a [`LocalRun`] into the temp file: one read, each block verified; a block
/// that does not verify (the local file changed) is looked for elsewhere
/// ([`copy_block`]).
///
/// The local file is opened for each run, as it was for each block before runs: with
/// one handle kept across runs (and so, likely, the kernel's sequential readahead on
/// it), the first edit after a sync, whose previous version was written with direct
/// I/O and is not in the page cache, took twice as long to rebuild (0.42-0.62 s
/// instead of 0.22-0.25 s for a 256 MiB file).
fn copy_run(
    context: &FetchContext,
    temp: &Path,
    file: &TempFile,
    run: LocalRun,
    buffer: &mut Vec<u8>,
    write_back: &WriteBack,
    missing: &mut Vec<(BlockHash, u64)>,
) -> Result<(), FetchError> {
    if buffer.len() < run.len as usize {
        buffer.resize(run.len as usize, 0);
    }
    let data = &mut buffer[..run.len as usize];
    let read = File::open(context.root.join(run.path.as_str()))
        .and_then(|source| source.read_exact_at(data, run.from))
        .is_ok();
    let mut at = 0usize;
    let mut verified: Vec<(u64, &[u8])> = Vec::with_capacity(run.blocks.len());
    for (offset, block) in &run.blocks {
        let len = block.len as usize;
        match data.get(at..at + len) {
            Some(bytes) if read && BlockHash::of(bytes) == block.hash => {
                verified.push((*offset, bytes));
            }
            _ => copy_block(
                context,
                temp,
                file,
                &(*offset, *block),
                None,
                write_back,
                missing,
            )?,
        }
        at += len;
    }
    if let (Some((start, _)), true) = (verified.first(), verified.len() == run.blocks.len()) {
        // The whole run verified: one write.
        file.write_at(data, *start)
            .map_err(|e| io_error("writing", temp, e))?;
    } else {
        for (offset, bytes) in &verified {
            file.write_at(bytes, *offset)
                .map_err(|e| io_error("writing", temp, e))?;
        }
    }
    write_back.wrote(verified.iter().map(|(_, bytes)| bytes.len() as u64).sum());
    Ok(())
}

/// Copies one block (at its offset in the download) into the temp file from any local
/// file (`locations`, looked up here if `None`) or kept version that has it, or adds it
/// to `missing`.
fn copy_block(
    context: &FetchContext,
    temp: &Path,
    file: &TempFile,
    &(offset, block): &(u64, weft_protocol::BlockRef),
    locations: Option<Vec<crate::store::BlockLocation>>,
    write_back: &WriteBack,
    missing: &mut Vec<(BlockHash, u64)>,
) -> Result<(), FetchError> {
    let locations = locations.unwrap_or_else(|| {
        context
            .store
            .block_locations(&block.hash)
            .unwrap_or_default()
    });
    let local = locations
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
            file.write_at(&data, offset)
                .map_err(|e| io_error("writing", temp, e))?;
            write_back.wrote(data.len() as u64);
        }
        None => missing.push((block.hash, offset)),
    }
    Ok(())
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
    /// For `file`; one written directly has nothing to write back and gets none.
    fn new(file: &TempFile) -> Self {
        Self {
            file: (!file.is_direct())
                .then(|| file.file().try_clone().ok().map(Arc::new))
                .flatten(),
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

/// One file of a download group.
struct Download {
    /// Its place in the caller's list.
    index: usize,
    temp: PathBuf,
    manifest: Manifest,
    mode: u32,
    mtime_ns: i64,
    /// The open temp file, once prepared (shared with a local copy that runs while
    /// blocks are fetched, [`fetch_overlapped`]).
    file: Option<Arc<TempFile>>,
    /// Distinct blocks still to come.
    waiting: usize,
    bytes_fetched: u64,
    /// Directories may have been made for it ([`open_temp`]).
    new_dirs: bool,
    /// Why this file failed, if it did.
    error: Option<FetchError>,
}

/// Downloads several file versions (`(path, entry)`) into their temp files, as one
/// group: their local parts in one blocking call, their missing blocks in shared
/// requests, each answer's blocks written (and the files it completes finished) in one
/// blocking call. Small files go in groups, so that the hand-offs between threads are
/// per group rather than per file; a large file is a group of one. Returns one result
/// per entry, in order; a file that fails does not fail the others.
pub async fn fetch_files(
    context: FetchContext,
    wanted: Vec<(RelPath, Entry)>,
) -> Vec<Result<Fetched, FetchError>> {
    let mut results: Vec<Option<Result<Fetched, FetchError>>> =
        wanted.iter().map(|_| None).collect();
    let mut downloads = Vec::with_capacity(wanted.len());
    for (index, (path, entry)) in wanted.iter().enumerate() {
        match manifest_of(&context, entry).await {
            Ok(manifest) => downloads.push(Download {
                index,
                temp: temp_path(&context.root, path, &manifest),
                manifest,
                mode: entry.mode,
                mtime_ns: entry.mtime_ns,
                file: None,
                waiting: 0,
                bytes_fetched: 0,
                new_dirs: false,
                error: None,
            }),
            Err(error) => results[index] = Some(Err(error)),
        }
    }
    // The local part of every file in one blocking call; a file with nothing to fetch
    // is finished there too. A large file that is mostly a local copy has the blocks
    // no local file has fetched while the copy runs.
    let started = std::time::Instant::now();
    let prepared = {
        let context = context.clone();
        tokio::task::spawn_blocking(move || {
            if let Some((elsewhere, located)) = plan_overlap(&context, &mut downloads) {
                return Prepared::Overlapped(downloads, elsewhere, located);
            }
            let missing: Vec<Missing> = downloads
                .iter_mut()
                .map(|download| prepare(&context, download))
                .collect();
            Prepared::Local(downloads, missing)
        })
        .await
    };
    let downloads = match prepared {
        Ok(Prepared::Local(downloads, missing)) => {
            fetch_missing(&context, downloads, missing).await
        }
        Ok(Prepared::Overlapped(downloads, elsewhere, located)) => {
            fetch_overlapped(&context, downloads, elsewhere, located).await
        }
        Err(error) => {
            tracing::warn!(%error, "a download's preparation failed");
            Vec::new()
        }
    };
    tracing::debug!(
        files = wanted.len(),
        total_ms = started.elapsed().as_millis(),
        fetched = downloads.iter().map(|d| d.bytes_fetched).sum::<u64>(),
        "download group done"
    );
    for download in downloads {
        results[download.index] = Some(match download.error {
            Some(error) => Err(error),
            None if download.waiting > 0 => Err(FetchError::Stopped),
            None => Ok(Fetched {
                temp: download.temp,
                manifest: download.manifest,
                bytes_fetched: download.bytes_fetched,
                new_dirs: download.new_dirs,
            }),
        });
    }
    results
        .into_iter()
        .map(|result| result.unwrap_or(Err(FetchError::NotRun)))
        .collect()
}

/// A download group after its local part.
enum Prepared {
    /// Local parts done; what each download still misses.
    Local(Vec<Download>, Vec<Missing>),
    /// One download whose temp file is open and whose blocks that no local file or
    /// kept version has are to be fetched while the local copy runs
    /// ([`fetch_overlapped`]).
    Overlapped(Vec<Download>, Missing, Located),
}

/// Smallest download whose local copy runs beside the fetching of its other blocks.
pub const OVERLAP_MIN_SIZE: u64 = EARLY_SYNC_BYTES;

/// For a group of one large, new download (no temp file yet) that has blocks in local
/// files and also blocks that none has: opens its temp file and returns those others
/// (by the block index and the version store: no file is read). `None` for any other
/// group, which is prepared as usual.
///
/// An edit to a large file is mostly a local copy of its previous version (0.15-0.7 s for
/// 256 MiB on the bench machines); its new blocks were asked for only once the copy was
/// done.
fn plan_overlap(context: &FetchContext, downloads: &mut [Download]) -> Option<(Missing, Located)> {
    let [download] = downloads else {
        return None;
    };
    if download.error.is_some()
        || download.manifest.size() < OVERLAP_MIN_SIZE
        || context.peers.is_empty()
        || fs::symlink_metadata(&download.temp).is_ok()
    {
        return None;
    }
    let mut elsewhere = Missing::new();
    let mut located = Located::new();
    for (offset, block) in download.manifest.blocks_with_offsets() {
        if let Some(offsets) = elsewhere.get_mut(&block.hash) {
            offsets.push(offset);
            continue;
        }
        if located.contains_key(&block.hash) {
            continue;
        }
        let locations: Vec<crate::store::BlockLocation> = context
            .store
            .block_locations(&block.hash)
            .unwrap_or_default()
            .into_iter()
            .filter(|location| location.folder == context.folder && location.len == block.len)
            .collect();
        let kept = || {
            context
                .versions
                .as_ref()
                .is_some_and(|versions| versions.contains(&block.hash))
        };
        if !locations.is_empty() || kept() {
            located.insert(block.hash, locations);
        } else {
            elsewhere.insert(block.hash, vec![offset]);
        }
    }
    if elsewhere.is_empty() || located.is_empty() {
        // All local, or a plain download (direct writes serve that better).
        return None;
    }
    let (file, _, new_dirs) = open_temp(&context.root, &download.temp, &download.manifest).ok()?;
    download.file = Some(Arc::new(file));
    download.new_dirs = new_dirs;
    // The blocks to fetch, plus the local copy as one more.
    download.waiting = elsewhere.len() + 1;
    Some((elsewhere, located))
}

/// Runs the local copy of a download planned by [`plan_overlap`] while its other
/// blocks (`elsewhere`) are fetched; then fetches whatever the copy could not verify,
/// and finishes the file.
async fn fetch_overlapped(
    context: &FetchContext,
    downloads: Vec<Download>,
    elsewhere: Missing,
    located: Located,
) -> Vec<Download> {
    let Some((file, temp, manifest)) = downloads.first().and_then(|download| {
        let file = download.file.clone()?;
        Some((file, download.temp.clone(), download.manifest.clone()))
    }) else {
        return downloads;
    };
    let local = {
        let (context, elsewhere) = (context.clone(), elsewhere.clone());
        tokio::task::spawn_blocking(move || {
            copy_locally(&context, &temp, &file, 0, &manifest, &elsewhere, &located)
        })
    };
    let (mut downloads, local) =
        tokio::join!(fetch_missing(context, downloads, vec![elsewhere]), local);
    let Some(download) = downloads.first_mut() else {
        return downloads;
    };
    // The local copy's share is in.
    download.waiting = download.waiting.saturating_sub(1);
    let missing = match local {
        Ok(Ok(missing)) => missing,
        Ok(Err(error)) => {
            download.error.get_or_insert(error);
            return downloads;
        }
        Err(error) => {
            download
                .error
                .get_or_insert_with(|| FetchError::Task("the local copy", error.to_string()));
            return downloads;
        }
    };
    if download.error.is_some() || download.waiting > 0 {
        return downloads;
    }
    if !missing.is_empty() {
        // Blocks that no longer verified in their local file.
        download.waiting = missing.len();
        return fetch_missing(context, downloads, vec![missing]).await;
    }
    // Everything is in: finish the file.
    let finished = {
        let (file, temp) = (download.file.clone(), download.temp.clone());
        let (mode, mtime_ns) = (download.mode, download.mtime_ns);
        tokio::task::spawn_blocking(move || match file {
            Some(file) => finish_temp(&file, &temp, mode, mtime_ns),
            None => Err(FetchError::NoTempFile),
        })
        .await
    };
    match finished {
        Ok(Ok(())) => {}
        Ok(Err(error)) => download.error = Some(error),
        Err(error) => {
            download.error = Some(FetchError::Task(
                "finishing the download",
                error.to_string(),
            ));
        }
    }
    downloads
}

/// The local part of one download ([`prepare_locally`]); finishes it if nothing is
/// missing. Returns what is missing.
fn prepare(context: &FetchContext, download: &mut Download) -> Missing {
    match prepare_locally(context, &download.temp, &download.manifest) {
        Ok((file, missing, new_dirs)) => {
            download.new_dirs = new_dirs;
            if missing.is_empty()
                && let Err(error) =
                    finish_temp(&file, &download.temp, download.mode, download.mtime_ns)
            {
                download.error = Some(error);
            }
            download.waiting = missing.len();
            download.file = Some(Arc::new(file));
            missing
        }
        Err(error) => {
            download.error = Some(error);
            Missing::new()
        }
    }
}

/// Where a block goes: (index of the download, offset), for every place.
type Places = Vec<(usize, u64)>;
/// Where each missing block goes.
type Targets = BTreeMap<BlockHash, Places>;

/// Fetches the blocks `missing` names (one map per download) from the connected peers
/// and writes them; finishes each download whose last block arrives. Errors are
/// recorded in the downloads.
async fn fetch_missing(
    context: &FetchContext,
    downloads: Vec<Download>,
    missing: Vec<Missing>,
) -> Vec<Download> {
    let mut targets = Targets::new();
    let mut lengths: HashMap<BlockHash, u32> = HashMap::new();
    // Requested in file order: the sender reads each file front to back.
    let mut order: Vec<BlockHash> = Vec::new();
    for (index, (download, blocks)) in downloads.iter().zip(&missing).enumerate() {
        if download.error.is_some() || blocks.is_empty() {
            continue;
        }
        let mut by_offset: Vec<(u64, BlockHash)> = blocks
            .iter()
            .filter_map(|(hash, offsets)| offsets.iter().min().map(|first| (*first, *hash)))
            .collect();
        by_offset.sort_unstable();
        for (_, hash) in by_offset {
            let places = targets.entry(hash).or_default();
            if places.is_empty() {
                order.push(hash);
            }
            let offsets = blocks.get(&hash).into_iter().flatten();
            places.extend(offsets.map(|offset| (index, *offset)));
        }
        for block in download.manifest.blocks() {
            lengths.insert(block.hash, block.len);
        }
    }
    let downloads = Arc::new(std::sync::Mutex::new(downloads));
    if !order.is_empty() {
        if context.peers.is_empty() {
            fail_all(&downloads, &targets, &FetchError::NoPeers);
        } else {
            request_blocks(context, &downloads, &mut targets, &lengths, order).await;
        }
    }
    let mut downloads = downloads
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::mem::take(&mut *downloads)
}

/// Marks every download still waiting for a block failed with `error`.
fn fail_all(downloads: &std::sync::Mutex<Vec<Download>>, targets: &Targets, error: &FetchError) {
    let mut downloads = downloads
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (index, _) in targets.values().flatten() {
        if let Some(download) = downloads.get_mut(*index) {
            download.error.get_or_insert_with(|| error.clone());
        }
    }
}

/// The request loop of [`fetch_missing`]: batches in flight, verification, retries.
async fn request_blocks(
    context: &FetchContext,
    downloads: &Arc<std::sync::Mutex<Vec<Download>>>,
    targets: &mut Targets,
    lengths: &HashMap<BlockHash, u32>,
    order: Vec<BlockHash>,
) {
    // Large buffered downloads are written back while they run, so the disk works
    // beside the network and the final fsync does not stall on hundreds of MiB.
    let write_backs: Vec<Option<WriteBack>> = {
        let downloads = downloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        downloads
            .iter()
            .map(|download| {
                download
                    .file
                    .as_ref()
                    .filter(|_| download.manifest.size() > EARLY_SYNC_BYTES)
                    .map(|file| WriteBack::new(file))
            })
            .collect()
    };
    // Which peer is asked for which blocks, and what an answer means, is the folder
    // core's (`weft_core::transfer`); this loop sends, verifies and writes.
    let mut requests = BlockRequests::new(&order, context.peers.clone());
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut writing = None;
    loop {
        while let Some(request) = requests.next_request() {
            let net = context.net.clone();
            let folder = context.folder.clone();
            in_flight.push(async move {
                let result = net
                    .fetch_blocks(&request.peer, &folder, request.hashes.clone())
                    .await;
                (request, result)
            });
        }
        let Some((request, result)) = in_flight.next().await else {
            break;
        };
        let peer = request.peer;
        let mut writes = Vec::new();
        let (answer, failure) = match result {
            Ok(blocks) => {
                let mut received = Vec::with_capacity(blocks.len());
                for (hash, data) in blocks {
                    let kind = match data {
                        Some(data)
                            if BlockHash::of(&data) == hash
                                && lengths.get(&hash) == Some(&(data.len() as u32)) =>
                        {
                            if let Some(places) = targets.remove(&hash) {
                                writes.push((data, places));
                            }
                            Received::Verified
                        }
                        Some(_) => {
                            tracing::warn!(peer = %peer, %hash, "block failed verification; asking elsewhere");
                            Received::Corrupt
                        }
                        None => Received::Missing,
                    };
                    received.push((hash, kind));
                }
                (Some(received), None)
            }
            Err(error) => {
                tracing::debug!(peer = %peer, %error, "block request failed; asking again");
                (None, Some(error))
            }
        };
        let outcome = requests.answered(request, answer);
        if outcome.penalise {
            context.net.penalise(&peer);
        }
        if outcome.give_up
            && let Some(error) = failure
        {
            fail_all(downloads, targets, &FetchError::RequestsFailing(error));
            break;
        }
        if let Some(pause) = outcome.pause {
            tokio::time::sleep(pause).await;
        }
        for hash in outcome.lost {
            // The files that need it fail; the others go on.
            if let Some(places) = targets.remove(&hash) {
                let lost = Targets::from([(hash, places)]);
                fail_all(downloads, &lost, &FetchError::Unavailable(hash));
            }
        }
        if writes.is_empty() {
            continue;
        }
        for (data, places) in &writes {
            for (index, _) in places {
                if let Some(Some(write_back)) = write_backs.get(*index) {
                    write_back.wrote(data.len() as u64);
                }
            }
        }
        // The verified blocks of one answer are written in one blocking call, which
        // also finishes the files they complete (one hand-off for a small file's whole
        // download). It runs while the next answers arrive; one at a time, so a file
        // is finished only after all its writes.
        await_write(writing.take()).await;
        let downloads = downloads.clone();
        writing = Some(tokio::task::spawn_blocking(move || {
            write_answer(&downloads, writes)
        }));
    }
    await_write(writing).await;
}

/// Waits for a block write of [`request_blocks`] (errors are in the downloads).
async fn await_write(write: Option<tokio::task::JoinHandle<()>>) {
    if let Some(write) = write
        && let Err(error) = write.await
    {
        tracing::warn!(%error, "a block write task failed");
    }
}

/// Writes one answer's verified blocks to every place that wants them and finishes the
/// downloads whose last block this was. Each download's blocks go in one call, so that
/// blocks next to each other in its file are written together.
fn write_answer(downloads: &std::sync::Mutex<Vec<Download>>, writes: Vec<(Vec<u8>, Places)>) {
    let mut downloads = downloads
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut completed = Vec::new();
    let mut blocks_of: BTreeMap<usize, Vec<(u64, &[u8])>> = BTreeMap::new();
    for (data, places) in &writes {
        let mut previous = None;
        for &(index, offset) in places {
            let Some(download) = downloads.get_mut(index) else {
                continue;
            };
            if previous != Some(index) {
                // One more distinct block of this download is in.
                download.waiting = download.waiting.saturating_sub(1);
                download.bytes_fetched += data.len() as u64;
                previous = Some(index);
                if download.waiting == 0 {
                    completed.push(index);
                }
            }
            blocks_of.entry(index).or_default().push((offset, data));
        }
    }
    for (index, mut blocks) in blocks_of {
        let Some(download) = downloads.get_mut(index) else {
            continue;
        };
        if download.error.is_some() {
            continue;
        }
        let Some(file) = &download.file else { continue };
        if let Err(error) = file.write_blocks(&mut blocks) {
            download.error = Some(io_error("writing", &download.temp, error));
        }
    }
    // Written: the buffers serve the next blocks received.
    for (data, _) in writes {
        crate::block_buffers::give(data);
    }
    for index in completed {
        let Some(download) = downloads.get_mut(index) else {
            continue;
        };
        if download.error.is_some() {
            continue;
        }
        if let Some(file) = &download.file
            && let Err(error) = finish_temp(file, &download.temp, download.mode, download.mtime_ns)
        {
            download.error = Some(error);
        }
    }
}

/// Gives the temp file its final size, mode and mtime, then makes it durable (data
/// and metadata).
fn finish_temp(file: &TempFile, temp: &Path, mode: u32, mtime_ns: i64) -> Result<(), FetchError> {
    use std::os::unix::fs::PermissionsExt;
    // A large file's data, and the metadata that maps it, go to the disk while it still
    // has its in-progress size: then the complete size shows (to anything that lists
    // the tree) only for the short final sync of the size, mode and mtime, not for the
    // long first one (15-20 ms for 256 MiB on the bench machine).
    if file.size() >= crate::temp_file::DIRECT_MIN_SIZE {
        file.file()
            .sync_data()
            .map_err(|e| io_error("syncing", temp, e))?;
    }
    file.truncate_to_final()
        .map_err(|e| io_error("truncating", temp, e))?;
    let file = file.file();
    // Permission bits only: a peer's setuid, setgid and sticky bits never reach the
    // disk.
    let mode = if mode & 0o777 == 0 {
        0o644
    } else {
        mode & 0o777
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

#[cfg(test)]
mod tests {
    use super::*;
    use weft_protocol::BlockRef;

    #[test]
    fn a_temp_file_is_never_opened_through_a_symlink_or_file_parent() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let manifest = Manifest::from_blocks(vec![BlockRef {
            hash: BlockHash::of(b"data"),
            len: 4,
        }])
        .expect("manifest");
        // x became a symlink to a directory outside the folder after the download of
        // x/y/file was planned.
        std::os::unix::fs::symlink(outside.path(), root.path().join("x")).expect("symlink");
        let temp = temp_path(root.path(), &RelPath::new("x/y/file").unwrap(), &manifest);
        let error = open_temp(root.path(), &temp, &manifest)
            .err()
            .expect("refused");
        assert!(matches!(error, FetchError::NotADirectory(_)), "{error}");
        let made: Vec<_> = std::fs::read_dir(outside.path()).expect("read").collect();
        assert!(made.is_empty(), "made outside the folder: {made:?}");
        // A file on the way is refused too.
        std::fs::write(root.path().join("f"), b"file").expect("write");
        let under_file = temp_path(root.path(), &RelPath::new("f/g/file").unwrap(), &manifest);
        assert!(open_temp(root.path(), &under_file, &manifest).is_err());
        // A real directory, with a missing one below it, is fine.
        std::fs::remove_file(root.path().join("x")).expect("remove symlink");
        std::fs::create_dir(root.path().join("x")).expect("mkdir");
        let (file, existing, new_dirs) = open_temp(root.path(), &temp, &manifest).expect("opened");
        drop(file);
        assert_eq!(existing, 0);
        assert!(new_dirs, "x/y was made");
        // Opened again: the temp file is there (an interrupted download), so its
        // directories may be from an earlier run.
        let (_, _, again) = open_temp(root.path(), &temp, &manifest).expect("reopened");
        assert!(again);
        assert!(temp.is_file(), "{}", temp.display());
    }
}
