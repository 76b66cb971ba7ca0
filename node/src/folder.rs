//! The folder actor: one thread per folder that owns its scanner, its document and its
//! share of the store, and turns scans into committed local changes.
//!
//! Commands arrive on a channel ([`FolderHandle`]): scan requests from the API, file
//! events from the watcher, shutdown. File events only mark paths dirty
//! ([`crate::dirty`]): a finished change (a closed file, a rename, a delete) is rescanned
//! after a few milliseconds, one still being written after a quiet time (`debounce_ms`),
//! each at most [`crate::dirty::MAX_DEBOUNCE_FACTOR`] debounce periods after its first
//! event. Too many dirty paths, or a watcher overflow, fall back to a full scan, as does
//! the periodic full rescan.
//!
//! Every batch of changes becomes one document change and one store transaction
//! ([`crate::store::Store::commit_scan_batch`]), so a crash loses at most the batch in
//! flight, and the rescan after restart redoes exactly that.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weft_protocol::change_signature::{self, ChangeSignatureError, SignedChange};
use weft_protocol::document::{self, Content, Entry, EntryKind, FolderDocument};
use weft_protocol::sync_parts::{self, SyncAssembly};
use weft_protocol::wire::{ChangeSignatures, MAX_SIGNED_CHANGES, Message};
use weft_protocol::{DeviceId, DeviceKey, FolderId, RelPath, Signature};

use crate::dirty::{Change, DirtyPaths, Due};
use crate::engine::{
    self, Action, FolderMode, LocalEntry, PathView, Remote, SyncedEntry, publish_entry, remote_of,
    tombstone,
};
use crate::events::{Event, EventBus};
use crate::net::NetHandle;
use crate::scan::{Problem, ScanProgress, Scanner, Scope, now_ns};
use crate::store::{FolderRecord, LocalChange, Store, StoreError};

/// Changes per store transaction during a scan (also committed every [`BATCH_INTERVAL`]).
pub const BATCH_CHANGES: usize = 2_000;
/// Longest wait before a pending batch is committed and offered to peers.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(250);
/// A scan's first batch is committed (and offered to peers) after this already: a
/// peer waiting for a new folder starts fetching its first (small) files sooner.
pub const FIRST_BATCH_INTERVAL: Duration = Duration::from_millis(50);
/// Files downloading at once per folder: enough to hide round trips with many small
/// files, few enough to bound memory, streams and open temp files.
pub const MAX_DOWNLOADS: usize = 32;
/// Files up to this size download in groups (one task, shared requests, one blocking
/// call per answer for the whole group).
pub const GROUP_FILE_MAX: u64 = 256 * 1024;
/// Files per download group.
pub const GROUP_FILES: usize = 16;
/// Bytes per download group.
pub const GROUP_BYTES: u64 = 2 * 1024 * 1024;
/// Finished downloads put into place together, in one store transaction.
pub const FINALIZE_BATCH: usize = 256;
/// Longest a finished download waits for others to be put into place with it: a store
/// commit (an fsync) per file would make the actor the bottleneck of many small files.
pub const FINALIZE_DELAY: Duration = Duration::from_millis(50);

/// A download waiting for a slot.
struct QueuedDownload {
    path: RelPath,
    entry: Entry,
    expected: Option<LocalEntry>,
    restore: Option<mpsc::Sender<Result<String, String>>>,
}

/// A finished (or failed) download.
#[derive(Debug)]
pub struct FetchedItem {
    /// The path.
    path: RelPath,
    /// The version downloaded.
    entry: Entry,
    /// What the disk held when the download was planned.
    expected: Option<LocalEntry>,
    /// The temp file, or why the download failed.
    result: Result<crate::fetch::Fetched, String>,
    /// A restore: the version is wanted even though the document has a newer one.
    restore: Option<mpsc::Sender<Result<String, String>>>,
}

/// How often failed downloads are tried again (also whenever a peer connects).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Earliest a racy file (see the `scan` module doc) is hashed again after the scan that
/// found it racy: well past the transfers that scan started (at 1 s, the second hash of
/// a just-edited 256 MiB file competed with the peer's rebuild of it in the delta
/// benchmark), and soon enough for a write that only its bytes show.
pub const RACY_RECHECK_AFTER: Duration = Duration::from_secs(5);

/// How long after it was found a racy file is hashed again: once its `window` (the
/// timestamp granularity) has passed, at the earliest after [`RACY_RECHECK_AFTER`], and
/// no sooner than the scan that found it `took` (a file written without pause then
/// costs at most one more hash per scan).
pub fn racy_recheck_delay(window: Duration, took: Duration) -> Duration {
    window.max(RACY_RECHECK_AFTER).max(took)
}
/// Problems kept in the status (the most recent scan's first ones).
pub const MAX_PROBLEMS_SHOWN: usize = 100;
/// Sync messages with unsigned or forged changes a device may send without one
/// accepted change in between before it is disconnected (its document sync is looping
/// without progress).
pub const MAX_REFUSALS: u32 = 3;
/// Change signatures held for one device's next sync message.
pub const MAX_PENDING_SIGNATURES: usize = 1 << 20;

/// Settings a folder actor needs from the node config.
#[derive(Clone, Debug)]
pub struct FolderSettings {
    /// Quiet time after file events before rescanning.
    pub debounce: Duration,
    /// Interval between full rescans.
    pub full_rescan_interval: Duration,
    /// Watch the filesystem.
    pub watch: bool,
    /// Where replaced and deleted versions are kept (`None`: not kept).
    pub versions: Option<crate::versions::VersionStore>,
    /// How long kept versions stay.
    pub version_retention: Duration,
    /// Age since its last change at which a temp file counts as abandoned.
    pub temp_file_expiry: Duration,
}

/// What the folder is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FolderState {
    /// Nothing to do.
    Idle,
    /// A scan is running.
    Scanning,
    /// Transferring with peers (the sync issue).
    Syncing,
    /// The folder root cannot be read.
    Error,
}

/// A folder's status, as `weft status --json` shows it (a documented contract).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderStatus {
    /// Folder ID.
    pub id: String,
    /// Label.
    pub label: String,
    /// Path on this device.
    pub path: String,
    /// Current state.
    pub state: FolderState,
    /// Regular files in the local tree.
    pub files: u64,
    /// Directories in the local tree.
    pub directories: u64,
    /// Symlinks in the local tree.
    pub symlinks: u64,
    /// Total bytes of the files.
    pub bytes: u64,
    /// Files this device still needs from peers.
    pub need_files: u64,
    /// Bytes this device still needs from peers.
    pub need_bytes: u64,
    /// Completed scans since start.
    pub scans: u64,
    /// When the last scan finished (ms since the Unix epoch), 0 if none yet.
    pub last_scan_ms: u64,
    /// Paths the last scans could not handle.
    pub problems: Vec<Problem>,
    /// Scan progress while scanning.
    pub progress: Option<ScanProgressView>,
    /// Local changes not published because this device may only view the folder
    /// (at most [`MAX_PROBLEMS_SHOWN`] listed).
    #[serde(default)]
    pub local_only: Vec<String>,
}

/// A snapshot of scan progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanProgressView {
    /// Files hashed so far.
    pub files_hashed: u64,
    /// Files to hash.
    pub files_to_hash: u64,
    /// Bytes hashed so far.
    pub bytes_hashed: u64,
    /// Bytes to hash.
    pub bytes_to_hash: u64,
}

impl ScanProgressView {
    fn of(progress: &ScanProgress) -> Self {
        Self {
            files_hashed: progress.files_hashed.load(Ordering::Relaxed),
            files_to_hash: progress.files_to_hash.load(Ordering::Relaxed),
            bytes_hashed: progress.bytes_hashed.load(Ordering::Relaxed),
            bytes_to_hash: progress.bytes_to_hash.load(Ordering::Relaxed),
        }
    }
}

/// The result of a requested scan.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScanResult {
    /// Entries seen on disk.
    pub seen: u64,
    /// Changes recorded.
    pub changes: u64,
    /// Paths that could not be scanned.
    pub problems: Vec<Problem>,
}

/// One version of a file, as `weft versions` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Index in the path's history, oldest first.
    pub index: usize,
    /// Modification time, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// Size in bytes.
    pub size: u64,
    /// The device that wrote it.
    pub author: String,
    /// A deletion.
    pub deleted: bool,
    /// Its manifest hash (files).
    pub manifest: Option<String>,
}

/// A message to a folder actor.
#[derive(Debug)]
pub enum FolderCommand {
    /// Scan now; the result goes to `reply` if given.
    Scan {
        /// What to scan.
        scope: Scope,
        /// Where to send the result.
        reply: Option<mpsc::Sender<ScanResult>>,
    },
    /// The watcher saw these absolute paths change; `change` says whether the event
    /// marks the change as complete.
    FileEvents {
        /// Absolute paths.
        paths: Vec<PathBuf>,
        /// Settled or still open.
        change: Change,
    },
    /// The watcher lost events; rescan everything.
    WatcherOverflow,
    /// A device that shares this folder connected.
    PeerConnected(DeviceId),
    /// A device that shares this folder disconnected.
    PeerDisconnected(DeviceId),
    /// An automerge sync message from a device that shares this folder (or the final
    /// piece of one sent in parts).
    SyncMessage(DeviceId, Vec<u8>),
    /// A leading piece of a sync message too large for one frame.
    SyncMessagePart(DeviceId, Vec<u8>),
    /// Authors' signatures of the changes in the device's next sync message.
    ChangeSignatures(DeviceId, Vec<SignedChange>),
    /// A download task (one large file or a group of small ones) finished.
    Fetched(Vec<FetchedItem>),
    /// The folder's record changed (shared with another device, say).
    UpdateRecord(FolderRecord),
    /// List the versions of a path.
    Versions {
        /// The path.
        path: RelPath,
        /// Where to send them.
        reply: mpsc::Sender<Vec<VersionInfo>>,
    },
    /// Restore a version of a path (as a new version).
    Restore {
        /// The path whose history to use.
        path: RelPath,
        /// Index in the version list (default: the newest version that differs from
        /// the current content).
        version: Option<usize>,
        /// Write it here instead of over the path.
        to: Option<RelPath>,
        /// The outcome.
        reply: mpsc::Sender<Result<String, String>>,
    },
    /// Stop after the current operation.
    Shutdown,
}

/// The shared, readable state of a folder actor.
#[derive(Debug)]
pub struct FolderShared {
    /// The status shown by the API.
    pub status: Mutex<FolderStatus>,
    /// Live scan counters.
    pub progress: ScanProgress,
}

impl FolderShared {
    /// A consistent copy of the status, with live progress while scanning.
    pub fn snapshot(&self) -> FolderStatus {
        let mut status = match self.status.lock() {
            Ok(status) => status.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if status.state == FolderState::Scanning {
            status.progress = Some(ScanProgressView::of(&self.progress));
        }
        status
    }

    fn update(&self, change: impl FnOnce(&mut FolderStatus)) {
        match self.status.lock() {
            Ok(mut status) => change(&mut status),
            Err(poisoned) => change(&mut poisoned.into_inner()),
        }
    }
}

/// A running folder actor.
#[derive(Debug)]
pub struct FolderHandle {
    /// The folder.
    pub record: FolderRecord,
    /// Its status.
    pub shared: Arc<FolderShared>,
    sender: mpsc::Sender<FolderCommand>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FolderHandle {
    /// Sends a command; false if the actor has stopped.
    pub fn send(&self, command: FolderCommand) -> bool {
        self.sender.send(command).is_ok()
    }

    /// Stops the actor and waits for it.
    pub fn stop(mut self) {
        let _ = self.sender.send(FolderCommand::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Why a folder could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FolderError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The saved document is damaged.
    #[error("folder {folder}: {source}")]
    Document {
        /// The folder.
        folder: FolderId,
        /// What is wrong.
        source: document::DocumentError,
    },
    /// The actor thread could not start.
    #[error("cannot start the folder thread: {0}")]
    Thread(std::io::Error),
}

/// Starts the actor of `record`: loads its document and runs a first full scan.
pub fn start(
    record: FolderRecord,
    store: Arc<Store>,
    key: Arc<DeviceKey>,
    settings: FolderSettings,
    events: EventBus,
    network: Option<Network>,
) -> Result<FolderHandle, FolderError> {
    let device = key.device_id();
    let (snapshot, increments) = store.document(&record.id)?;
    let signatures = store
        .change_signatures(&record.id)?
        .into_iter()
        .map(|signed| (signed.hash, signed.signature))
        .collect();
    let actor = document::actor_id(&device, store.actor_suffix());
    let document = FolderDocument::load(&snapshot, increments.iter().map(Vec::as_slice), actor)
        .map_err(|source| FolderError::Document {
            folder: record.id.clone(),
            source,
        })?;
    let (scanner, ignore_problems) = Scanner::new(PathBuf::from(&record.path), record.params);
    let scanner = {
        let store = store.clone();
        scanner.with_manifests(Arc::new(move |hash| store.manifest(hash).ok().flatten()))
    };
    let shared = Arc::new(FolderShared {
        status: Mutex::new(FolderStatus {
            id: record.id.to_string(),
            label: record.label.clone(),
            path: record.path.clone(),
            state: FolderState::Scanning,
            files: 0,
            directories: 0,
            symlinks: 0,
            bytes: 0,
            need_files: 0,
            need_bytes: 0,
            scans: 0,
            last_scan_ms: 0,
            problems: ignore_problems,
            progress: None,
            local_only: Vec::new(),
        }),
        progress: ScanProgress::default(),
    });
    let (sender, receiver) = mpsc::channel();
    let watcher = if settings.watch {
        crate::watch::watch(&record.path, sender.clone())
    } else {
        None
    };
    let mut actor = FolderActor {
        scanner: Arc::new(scanner),
        recorder: Recorder {
            folder: record.id.clone(),
            store,
            document,
            device,
            key,
            signatures,
            events,
            shared: shared.clone(),
            mode: record.mode,
            needs_plan: BTreeSet::new(),
            published: false,
            commit_failed: false,
            unsaved: Vec::new(),
            reloaded: false,
            dirs: crate::dir_sync::PendingDirs::default(),
        },
        record: record.clone(),
        network,
        sender: sender.clone(),
        peers: HashMap::new(),
        assemblies: HashMap::new(),
        pending_signatures: HashMap::new(),
        refusals: HashMap::new(),
        in_flight: HashMap::new(),
        download_queue: Vec::new(),
        small_turn: false,
        downloads_running: 0,
        deferred: VecDeque::new(),
        finished: Vec::new(),
        finished_since: None,
        failed: BTreeSet::new(),
        blocked: BTreeMap::new(),
        racy: BTreeMap::new(),
        dirty: DirtyPaths::new(settings.debounce),
        settings,
        receiver,
        _watcher: watcher,
    };
    let thread = std::thread::Builder::new()
        .name(format!("folder-{}", record.id))
        .spawn(move || actor.run())
        .map_err(FolderError::Thread)?;
    Ok(FolderHandle {
        record,
        shared,
        sender,
        thread: Some(thread),
    })
}

/// What a folder actor needs to sync with peers: the network and a runtime for
/// downloads. Absent in tests of scanning alone.
#[derive(Clone, Debug)]
pub struct Network {
    /// The network handle.
    pub net: NetHandle,
    /// The runtime downloads run on.
    pub runtime: tokio::runtime::Handle,
}

struct FolderActor {
    /// Shared with the scan in progress only (see [`FolderActor::scan`]).
    scanner: Arc<Scanner>,
    recorder: Recorder,
    record: FolderRecord,
    network: Option<Network>,
    sender: mpsc::Sender<FolderCommand>,
    /// Automerge sync state per connected device sharing this folder.
    peers: HashMap<DeviceId, weft_protocol::document::SyncState>,
    /// Sync messages arriving in parts, per device.
    assemblies: HashMap<DeviceId, SyncAssembly>,
    /// Signatures a device sent for the changes of its next sync message.
    pending_signatures: HashMap<DeviceId, HashMap<[u8; 32], Signature>>,
    /// Sync messages refused since the device's last accepted change (see
    /// [`MAX_REFUSALS`]).
    refusals: HashMap<DeviceId, u32>,
    /// Downloads queued or running: path and bytes.
    in_flight: HashMap<RelPath, u64>,
    /// Downloads waiting for a slot (at most [`MAX_DOWNLOADS`] run at once); the
    /// largest starts first, so big files overlap with the many small ones.
    download_queue: Vec<QueuedDownload>,
    /// Whether the next download slot goes to a group of small files (see
    /// [`FolderActor::pump_downloads`]).
    small_turn: bool,
    /// Downloads running now.
    downloads_running: usize,
    /// Commands received while a batch of finished downloads was collected.
    deferred: VecDeque<FolderCommand>,
    /// Finished downloads waiting to be put into place, and since when.
    finished: Vec<FetchedItem>,
    finished_since: Option<Instant>,
    /// Paths whose download failed; planned again when peers change.
    failed: BTreeSet<RelPath>,
    /// Paths refused because a parent is a file or symlink on this device, by that
    /// parent. Planned again once it is a directory or gone, whatever made it so (a
    /// directory applied over it, the file moved aside as a conflict copy, the user
    /// deleting it): see [`FolderActor::unblocked`].
    blocked: engine::Blocked,
    /// Files a scan hashed within their timestamp granularity of their last write
    /// (racily clean, see the `scan` module doc), and when to hash them again whatever
    /// their metadata says. A scan that covers one once it is due hashes it again; it
    /// leaves the map once a hash finds it no longer racy. Their rows are marked in the store too
    /// (`racy` table), so that the first scan after a restart hashes them again.
    racy: BTreeMap<RelPath, Instant>,
    settings: FolderSettings,
    receiver: mpsc::Receiver<FolderCommand>,
    dirty: DirtyPaths,
    _watcher: Option<crate::watch::Watcher>,
}

impl FolderActor {
    fn run(&mut self) {
        // Files racily clean when the node stopped: the first scan hashes them again.
        match self.recorder.store.racy_paths(&self.record.id) {
            Ok(paths) => {
                let now = Instant::now();
                self.racy.extend(paths.into_iter().map(|path| (path, now)));
            }
            Err(error) => {
                tracing::warn!(folder = %self.record.id, %error, "cannot read racily clean marks");
            }
        }
        self.scan(Scope::Full);
        self.plan_all();
        self.after_changes();
        let mut next_full = Instant::now() + self.jittered_interval();
        let mut last_retry = Instant::now();
        loop {
            let mut deadline = self
                .dirty
                .deadline()
                .map_or(next_full, |d| d.min(next_full));
            if !self.failed.is_empty() {
                deadline = deadline.min(last_retry + RETRY_INTERVAL);
            }
            if let Some(since) = self.finished_since {
                deadline = deadline.min(since + FINALIZE_DELAY);
            }
            if let Some(due) = self.racy.values().min() {
                deadline = deadline.min(*due);
            }
            let timeout = deadline.saturating_duration_since(Instant::now());
            let next = match self.deferred.pop_front() {
                Some(command) => Ok(command),
                None => self.receiver.recv_timeout(timeout),
            };
            let next = match next {
                Ok(FolderCommand::Fetched(items)) => {
                    // The slot is free at once; putting files into place is batched.
                    self.downloads_running = self.downloads_running.saturating_sub(1);
                    self.finished.extend(items);
                    self.finished_since.get_or_insert_with(Instant::now);
                    self.pump_downloads();
                    Err(mpsc::RecvTimeoutError::Timeout)
                }
                other => other,
            };
            match next {
                Ok(FolderCommand::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(FolderCommand::Scan { scope, reply }) => {
                    let result = self.scan(scope);
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
                Ok(FolderCommand::FileEvents { paths, change }) => self.mark_dirty(paths, change),
                Ok(FolderCommand::WatcherOverflow) => self.dirty.mark_full(Instant::now()),
                Ok(FolderCommand::PeerConnected(device)) => {
                    self.peer_connected(device, Plan::Now);
                }
                Ok(FolderCommand::PeerDisconnected(device)) => self.peer_disconnected(device),
                Ok(FolderCommand::ChangeSignatures(device, signed)) => {
                    self.change_signatures(device, signed);
                }
                Ok(FolderCommand::SyncMessagePart(device, bytes)) => {
                    self.sync_message_part(device, &bytes);
                }
                Ok(FolderCommand::SyncMessage(device, bytes)) => {
                    self.sync_message(device, bytes, Plan::Now);
                }
                Ok(FolderCommand::Fetched(_)) => {}
                Ok(FolderCommand::Versions { path, reply }) => {
                    let _ = reply.send(self.versions(&path));
                }
                Ok(FolderCommand::Restore {
                    path,
                    version,
                    to,
                    reply,
                }) => self.restore(path, version, to, reply),
                Ok(FolderCommand::UpdateRecord(record)) => self.update_record(record),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            match self.dirty.take_due(now) {
                Some(Due::Full) => {
                    self.scan(Scope::Full);
                }
                Some(Due::Paths(paths)) => {
                    self.scan(Scope::Paths(collapse(paths)));
                }
                None => {}
            }
            let racy_due: BTreeSet<RelPath> = self
                .racy
                .iter()
                .filter(|(_, due)| **due <= now)
                .map(|(path, _)| path.clone())
                .collect();
            if !racy_due.is_empty() {
                self.scan(Scope::Paths(collapse(racy_due)));
            }
            if now >= next_full {
                self.scan(Scope::Full);
                self.plan_all();
                if let Some(versions) = &self.settings.versions {
                    let pruned = versions.prune(self.settings.version_retention);
                    if pruned > 0 {
                        tracing::info!(folder = %self.record.id, pruned, "old versions pruned");
                    }
                }
                next_full = Instant::now() + self.jittered_interval();
            }
            let finalize = self.finished.len() >= FINALIZE_BATCH
                || (!self.finished.is_empty() && self.downloads_running == 0)
                || self
                    .finished_since
                    .is_some_and(|since| since.elapsed() >= FINALIZE_DELAY);
            if finalize {
                self.finished_since = None;
                let batch = std::mem::take(&mut self.finished);
                self.finish_downloads(batch);
            }
            if !self.failed.is_empty() && last_retry.elapsed() >= RETRY_INTERVAL {
                last_retry = Instant::now();
                let failed: Vec<RelPath> = std::mem::take(&mut self.failed).into_iter().collect();
                self.plan_paths(failed);
            }
            self.after_changes();
        }
    }

    fn jittered_interval(&self) -> Duration {
        // +-10% so that many folders (and devices) do not rescan in lockstep.
        let mut random = [0u8; 2];
        let _ = getrandom::fill(&mut random);
        let factor = 0.9 + f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX) * 0.2;
        self.settings.full_rescan_interval.mul_f64(factor)
    }

    fn mark_dirty(&mut self, paths: Vec<PathBuf>, change: Change) {
        let now = Instant::now();
        for absolute in paths {
            match self.scanner.relative(&absolute) {
                Some(path) if !self.scanner.is_ignored(&path, false) => {
                    self.dirty.mark(path, change, now);
                }
                Some(_) => {}
                // The root itself (or an unusable name): only a full scan can tell.
                None if absolute == self.scanner.root() => self.dirty.mark_full(now),
                None => {}
            }
        }
    }

    fn scan(&mut self, scope: Scope) -> ScanResult {
        let started = Instant::now();
        // Only a scan in progress holds another reference, and none is in progress.
        let ignore_problems = Arc::get_mut(&mut self.scanner)
            .map(Scanner::refresh_ignore)
            .unwrap_or_default();
        let full = matches!(scope, Scope::Full);
        let folder = self.recorder.folder.to_string();
        self.recorder
            .shared
            .update(|s| s.state = FolderState::Scanning);
        self.recorder.events.publish(Event::ScanStarted {
            folder: folder.clone(),
            full,
        });
        let previous = match &scope {
            Scope::Full => self.recorder.store.local_tree(&self.recorder.folder),
            Scope::Paths(paths) => {
                let mut rows = std::collections::BTreeMap::new();
                let mut result = Ok(());
                for path in paths {
                    match self
                        .recorder
                        .store
                        .local_under(&self.recorder.folder, Some(path))
                    {
                        Ok(part) => rows.extend(part),
                        Err(error) => result = Err(error),
                    }
                }
                result.map(|()| rows)
            }
        };
        let previous = match previous {
            Ok(previous) => previous,
            Err(error) => {
                tracing::error!(folder, %error, "cannot read the local tree; scan skipped");
                self.recorder
                    .shared
                    .update(|s| s.state = FolderState::Error);
                return ScanResult {
                    seen: 0,
                    changes: 0,
                    problems: vec![Problem {
                        path: ".".into(),
                        error: error.to_string(),
                    }],
                };
            }
        };
        if full {
            self.recorder.recount(&previous);
        }
        // Racy files in scope that are due are hashed again: a write since the last hash
        // may have left their metadata as it was. One not due yet is left for its own
        // recheck: a rescan of a large file just after the one that found it racy (the
        // watcher's and a requested one) would hash it twice while peers fetch it.
        let now = Instant::now();
        let rehash: BTreeSet<RelPath> = self
            .racy
            .iter()
            .filter(|(path, due)| **due <= now && scope.covers(path))
            .map(|(path, _)| path.clone())
            .collect();
        self.recorder.commit_failed = false;
        let shared = self.recorder.shared.clone();
        let events = self.recorder.events.clone();
        let (stop_ticker, ticker_stopped) = mpsc::channel::<()>();
        let summary = std::thread::scope(|threads| {
            let shared = &shared;
            let events = &events;
            let folder = folder.clone();
            // Progress events every 250 ms while hashing; stops as soon as the scan ends.
            threads.spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    ticker_stopped.recv_timeout(Duration::from_millis(250))
                {
                    let view = ScanProgressView::of(&shared.progress);
                    if view.files_to_hash > 0 {
                        events.publish(Event::ScanProgress {
                            folder: folder.clone(),
                            files_hashed: view.files_hashed,
                            files_to_hash: view.files_to_hash,
                            bytes_hashed: view.bytes_hashed,
                            bytes_to_hash: view.bytes_to_hash,
                        });
                    }
                }
            });
            let mut batch = Vec::new();
            let mut racy_batch = Vec::new();
            let mut last_commit = Instant::now();
            let mut interval = FIRST_BATCH_INTERVAL;
            let scanner = Arc::clone(&self.scanner);
            let actor = &mut *self;
            let summary = scanner.scan(
                &scope,
                &previous,
                &rehash,
                &shared.progress,
                &mut |change, racy| {
                    if racy && let LocalChange::Upsert { path, .. } = &change {
                        racy_batch.push(path.clone());
                    }
                    batch.push(change);
                    // A peer's message is answered with everything hashed so far.
                    let command = actor.command_during_scan();
                    if batch.len() >= BATCH_CHANGES
                        || last_commit.elapsed() >= interval
                        || command.is_some()
                    {
                        actor.recorder.commit(
                            std::mem::take(&mut batch),
                            &previous,
                            &std::mem::take(&mut racy_batch),
                        );
                        last_commit = Instant::now();
                        interval = BATCH_INTERVAL;
                        // Offer each committed batch at once: peers start fetching while
                        // the rest of a long scan goes on.
                        if actor.recorder.published {
                            actor.recorder.published = false;
                            actor.broadcast();
                        }
                    }
                    if let Some(command) = command {
                        actor.exchange_during_scan(command);
                    }
                },
            );
            self.recorder.commit(batch, &previous, &racy_batch);
            drop(stop_ticker);
            summary
        });
        // Files hashed again leave the map, unless what the hash found could not be
        // committed: then they stay, due again later.
        let failed = self.recorder.commit_failed;
        for path in &rehash {
            if failed {
                self.racy
                    .insert(path.clone(), Instant::now() + RACY_RECHECK_AFTER);
            } else {
                self.racy.remove(path);
            }
        }
        // Marks of files hashed again and no longer racy go; a mark left by a failed
        // write only costs another hash.
        let settled: Vec<RelPath> = rehash
            .iter()
            .filter(|path| !summary.racy.iter().any(|(racy, _)| racy == *path))
            .cloned()
            .collect();
        if !failed
            && !settled.is_empty()
            && let Err(error) = self
                .recorder
                .store
                .clear_racy(&self.recorder.folder, &settled)
        {
            tracing::warn!(folder, %error, "cannot clear racily clean marks; they are hashed again");
        }
        // Hashed again once the window has passed ([`racy_recheck_delay`]).
        let took = started.elapsed();
        for (path, window) in &summary.racy {
            self.racy.insert(
                path.clone(),
                Instant::now() + racy_recheck_delay(*window, took),
            );
        }
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let finished_ms = u64::try_from(now_ns() / 1_000_000).unwrap_or(0);
        let mut summary = summary;
        summary.problems.extend(ignore_problems);
        remove_abandoned_temp_files(&summary.temp_files, self.settings.temp_file_expiry);
        let problems = summary.problems.clone();
        self.recorder.shared.update(|status| {
            status.state = FolderState::Idle;
            status.progress = None;
            status.scans += 1;
            status.last_scan_ms = finished_ms;
            if full {
                status.problems.clear();
            }
            for problem in &problems {
                if status.problems.len() < MAX_PROBLEMS_SHOWN && !status.problems.contains(problem)
                {
                    status.problems.push(problem.clone());
                }
            }
        });
        for problem in &summary.problems {
            tracing::warn!(folder, path = problem.path, "{}", problem.error);
        }
        tracing::info!(
            folder,
            full,
            seen = summary.seen,
            changes = summary.changes,
            problems = summary.problems.len(),
            millis,
            "scan finished"
        );
        self.recorder.events.publish(Event::ScanFinished {
            folder,
            seen: summary.seen,
            changes: summary.changes,
            problems: summary.problems.len() as u64,
            millis,
        });
        ScanResult {
            seen: summary.seen,
            changes: summary.changes,
            problems: summary.problems,
        }
    }
}

/// Longest chain of plan -> act -> rescan -> plan rounds after one trigger; real
/// convergence takes two or three, so more means a bug, logged rather than looped.
pub const MAX_PLAN_ROUNDS: usize = 8;

/// True if the disk at `absolute` holds what `expected` says (nothing, for `None`).
fn disk_matches(absolute: &std::path::Path, expected: Option<&LocalEntry>) -> bool {
    let actual = match std::fs::symlink_metadata(absolute) {
        Ok(metadata) => {
            let target = metadata
                .file_type()
                .is_symlink()
                .then(|| std::fs::read_link(absolute).ok())
                .flatten()
                .and_then(|t| t.into_os_string().into_string().ok());
            Some(crate::scan::entry_from_metadata(&metadata, target))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        // Unreadable: never act on what we cannot see.
        Err(_) => return false,
    };
    engine::disk_unchanged(actual.as_ref(), expected)
}

/// Sends `device` the next automerge sync message of the folder's document, if the
/// peer lacks anything.
fn send_sync_to(
    network: &Network,
    recorder: &mut Recorder,
    device: DeviceId,
    state: &mut weft_protocol::document::SyncState,
) {
    if let Some((message, changes)) = recorder.document.generate_sync_message_with_changes(state) {
        let signed = recorder.signatures_for(&changes);
        let signatures = signed.chunks(MAX_SIGNED_CHANGES).map(|chunk| {
            Message::ChangeSignatures(ChangeSignatures {
                folder: recorder.folder.clone(),
                changes: chunk.to_vec(),
            })
        });
        for frame in signatures.chain(sync_parts::frames(&recorder.folder, message)) {
            if let Err(error) = network.net.send(&device, frame) {
                tracing::debug!(folder = %recorder.folder, %error, "sync message not sent");
                return;
            }
        }
    }
}

/// Removes temp files nothing has changed for `expiry`: downloads of versions that
/// were superseded or deleted while they ran, or of a folder that was left.
///
/// Age counts from the file's last status change (ctime), not its mtime: a finished
/// download carries its version's mtime, which may be years old, while it waits to
/// be renamed into place; any write, chmod or mtime change moves the ctime to now,
/// and nothing can set it back. A download that is still running writes to its temp
/// file, so it is never that old; one resumed after longer starts over.
fn remove_abandoned_temp_files(temp_files: &[PathBuf], expiry: Duration) {
    use std::os::unix::fs::MetadataExt;
    let now_s = now_ns() / 1_000_000_000;
    let expiry_s = i64::try_from(expiry.as_secs()).unwrap_or(i64::MAX);
    for temp in temp_files {
        let old = std::fs::symlink_metadata(temp)
            .ok()
            .filter(|m| m.file_type().is_file())
            .is_some_and(|m| now_s.saturating_sub(m.ctime().max(m.mtime())) >= expiry_s);
        if old {
            match std::fs::remove_file(temp) {
                Ok(()) => tracing::info!(temp = %temp.display(), "removed an abandoned temp file"),
                Err(error) => {
                    tracing::debug!(temp = %temp.display(), %error, "cannot remove an abandoned temp file")
                }
            }
        }
    }
}

/// Removes the node's temp files directly inside `dir`: downloads abandoned there
/// (their version was superseded or deleted) would keep a deleted directory alive.
fn remove_temp_files(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| n.starts_with(weft_protocol::path::TEMP_PREFIX))
            && entry.file_type().is_ok_and(|t| t.is_file())
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// True if every existing ancestor of `path` inside `root` is a real directory
/// ([`crate::fetch::non_directory_parent`]).
fn parents_are_directories(root: &std::path::Path, path: &RelPath) -> bool {
    crate::fetch::non_directory_parent(root, &root.join(path.as_str())).is_none()
}

/// The nearest ancestor of `path` inside `root` that exists and is not a real
/// directory (a file, a symlink, or unreadable), as a path of the folder.
fn non_directory_parent(root: &std::path::Path, path: &RelPath) -> Option<RelPath> {
    let dir = crate::fetch::non_directory_parent(root, &root.join(path.as_str()))?;
    // Below `root` by construction; should it not read as a path of the folder, the
    // path is still refused, under the nearest parent.
    dir.strip_prefix(root)
        .ok()
        .and_then(|relative| relative.to_str())
        .and_then(|relative| RelPath::new(relative).ok())
        .or_else(|| path.parent())
}

/// When the paths a command touches are planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// At once.
    Now,
    /// After the scan in progress ([`FolderActor::exchange_during_scan`]).
    AfterScan,
}

impl FolderActor {
    fn root(&self) -> PathBuf {
        PathBuf::from(&self.record.path)
    }

    fn peer_connected(&mut self, device: DeviceId, plan: Plan) {
        if !self.record.devices.iter().any(|(d, _)| *d == device) {
            return;
        }
        self.peers
            .insert(device, weft_protocol::document::SyncState::new());
        self.send_sync(device);
        // Downloads that failed for want of a peer may succeed now.
        let failed: Vec<RelPath> = std::mem::take(&mut self.failed).into_iter().collect();
        self.plan(failed, plan);
    }

    /// Plans `paths` now, or after the scan in progress.
    fn plan(&mut self, paths: Vec<RelPath>, plan: Plan) {
        match plan {
            Plan::Now => self.plan_paths(paths),
            Plan::AfterScan => self.recorder.needs_plan.extend(paths),
        }
    }

    /// Between the batches of a scan: handles the peers' sync messages (and the
    /// commands that go with them: connections, signatures, the folder's record) in
    /// their order, so that a peer gets the batches committed so far at once rather
    /// than after the whole scan. The first other command waits for the end of the
    /// scan, and everything after it too, so no command overtakes another. The paths
    /// that received changes touch are planned after the scan: nothing is written to
    /// the folder while it is being scanned.
    fn exchange_during_scan(&mut self, first: FolderCommand) {
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                FolderCommand::PeerConnected(device) => {
                    self.peer_connected(device, Plan::AfterScan);
                }
                FolderCommand::PeerDisconnected(device) => self.peer_disconnected(device),
                FolderCommand::UpdateRecord(record) => self.update_record(record),
                FolderCommand::ChangeSignatures(device, signed) => {
                    self.change_signatures(device, signed);
                }
                FolderCommand::SyncMessagePart(device, bytes) => {
                    self.sync_message_part(device, &bytes);
                }
                FolderCommand::SyncMessage(device, bytes) => {
                    self.sync_message(device, bytes, Plan::AfterScan);
                }
                other => {
                    self.deferred.push_back(other);
                    return;
                }
            }
            next = self.command_during_scan();
        }
    }

    /// A command that arrived during a scan, if none waits for its end already (see
    /// [`Self::exchange_during_scan`]).
    fn command_during_scan(&mut self) -> Option<FolderCommand> {
        if self.deferred.is_empty() {
            self.receiver.try_recv().ok()
        } else {
            None
        }
    }

    /// The folder's record changed (shared with another device, say).
    fn update_record(&mut self, record: FolderRecord) {
        self.recorder.mode = record.mode;
        self.peers
            .retain(|device, _| record.devices.iter().any(|(d, _)| d == device));
        self.record = record;
    }

    fn peer_disconnected(&mut self, device: DeviceId) {
        self.peers.remove(&device);
        self.assemblies.remove(&device);
        self.pending_signatures.remove(&device);
    }

    fn send_sync(&mut self, device: DeviceId) {
        let Some(network) = &self.network else { return };
        let Some(state) = self.peers.get_mut(&device) else {
            return;
        };
        send_sync_to(network, &mut self.recorder, device, state);
    }

    fn broadcast(&mut self) {
        let peers: Vec<DeviceId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.send_sync(peer);
        }
    }

    fn shared_with(&self, device: &DeviceId) -> bool {
        let shared = self.record.devices.iter().any(|(d, _)| d == device);
        if !shared {
            tracing::warn!(folder = %self.record.id, device = %device, "sync message from a device this folder is not shared with; ignored");
        }
        shared
    }

    fn change_signatures(&mut self, device: DeviceId, signed: Vec<SignedChange>) {
        if !self.shared_with(&device) {
            return;
        }
        let pending = self.pending_signatures.entry(device).or_default();
        if pending.len().saturating_add(signed.len()) > MAX_PENDING_SIGNATURES {
            tracing::warn!(folder = %self.record.id, device = %device, "too many change signatures before a sync message; dropped");
            pending.clear();
            return;
        }
        pending.extend(signed.into_iter().map(|s| (s.hash, s.signature)));
    }

    /// Refuses a sync message whose changes are not all signed by their authors: the
    /// document goes back to what the store holds (nothing of the message was saved
    /// or acted on), every peer's sync starts over, and a device refused
    /// [`MAX_REFUSALS`] times without an accepted change in between is disconnected.
    fn refuse_sync_message(&mut self, device: DeviceId, error: &ChangeSignatureError) {
        tracing::warn!(folder = %self.record.id, device = %device, %error, "sync message refused: a change is not signed by its author; nothing of it was applied");
        self.recorder.reload_document();
        let refusals = self.refusals.entry(device).or_default();
        *refusals += 1;
        if *refusals >= MAX_REFUSALS {
            *refusals = 0;
            tracing::warn!(folder = %self.record.id, device = %device, "device keeps sending changes without valid signatures; disconnecting");
            if let Some(network) = &self.network {
                network.net.disconnect(&device);
            }
        }
    }

    fn sync_message_part(&mut self, device: DeviceId, bytes: &[u8]) {
        if !self.shared_with(&device) {
            return;
        }
        let assembly = self.assemblies.entry(device).or_default();
        if let Err(error) = assembly.push_part(bytes) {
            tracing::warn!(folder = %self.record.id, device = %device, %error, "sync message too large; dropped");
        }
    }

    fn sync_message(&mut self, device: DeviceId, bytes: Vec<u8>, plan: Plan) {
        if !self.shared_with(&device) {
            return;
        }
        let bytes = match self.assemblies.remove(&device) {
            Some(mut assembly) => assembly.finish(bytes),
            None => Ok(bytes),
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(folder = %self.record.id, device = %device, %error, "sync message too large; dropped");
                return;
            }
        };
        let before = self.recorder.document.heads();
        let state = self.peers.entry(device).or_default();
        if let Err(error) = self.recorder.document.receive_sync_message(state, &bytes) {
            tracing::warn!(folder = %self.record.id, device = %device, %error, "bad sync message; ignored");
            return;
        }
        // Every change the message added must be signed by its author before anything
        // is saved or acted on. Signatures stay pending until their change arrives
        // (automerge holds back a change whose dependencies are still missing).
        let added = if self.recorder.document.heads() == before {
            Vec::new()
        } else {
            self.recorder.document.changes_since(&before)
        };
        if !added.is_empty() {
            let pending = self.pending_signatures.remove(&device).unwrap_or_default();
            let known = &self.recorder.signatures;
            let checked = change_signature::verify(&self.record.id, &added, |hash| {
                pending.get(hash).or_else(|| known.get(hash)).copied()
            });
            match checked {
                Ok(signed) => {
                    // Progress: the device's refusals no longer count as a loop.
                    self.refusals.remove(&device);
                    self.recorder.keep_signatures(&signed);
                    let mut pending = pending;
                    for change in &signed {
                        pending.remove(&change.hash);
                    }
                    if !pending.is_empty() {
                        self.pending_signatures.insert(device, pending);
                    }
                }
                Err(error) => {
                    self.refuse_sync_message(device, &error);
                    return;
                }
            }
        }
        self.recorder.save_received();
        let changed = self.recorder.document.changed_paths(&before);
        if !changed.rejected.is_empty() {
            tracing::warn!(folder = %self.record.id, device = %device, keys = ?changed.rejected, "ignored entries whose paths are invalid (absolute, '..', reserved); nothing written for them");
        }
        let changed = changed.paths;
        // Answer this peer, and pass new changes on to the others (A-B-C chains): any
        // new change, even one that changes no visible value (a conflict resolved to a
        // value already shown), or the others never learn it.
        self.send_sync(device);
        if self.recorder.document.heads() != before {
            let others: Vec<DeviceId> = self
                .peers
                .keys()
                .copied()
                .filter(|d| *d != device)
                .collect();
            for other in others {
                self.send_sync(other);
            }
        }
        if !changed.is_empty() {
            self.plan(changed, plan);
        }
    }

    /// Plans every path the document, the local tree or the synced tree knows: after
    /// start (work left by a crash) and after each full scan (the periodic repair).
    fn plan_all(&mut self) {
        let mut paths: BTreeSet<RelPath> = BTreeSet::new();
        match self.recorder.store.local_tree(&self.record.id) {
            Ok(tree) => paths.extend(tree.into_keys()),
            Err(error) => {
                tracing::error!(folder = %self.record.id, %error, "reading the local tree failed")
            }
        }
        if let Ok(tree) = self.recorder.store.synced_tree(&self.record.id) {
            paths.extend(tree.into_keys());
        }
        paths.extend(
            self.recorder
                .document
                .entries()
                .filter_map(Result::ok)
                .map(|entry| entry.path),
        );
        self.plan_paths(paths.into_iter().collect());
    }

    /// After any command: offer new local changes to peers, plan what scans left over.
    fn after_changes(&mut self) {
        for _ in 0..MAX_PLAN_ROUNDS {
            if self.recorder.needs_plan.is_empty() {
                break;
            }
            let paths: Vec<RelPath> = std::mem::take(&mut self.recorder.needs_plan)
                .into_iter()
                .collect();
            self.plan_paths(paths);
        }
        if self.recorder.reloaded {
            // The document lost changes peers were told about: start their syncs over.
            self.recorder.reloaded = false;
            for state in self.peers.values_mut() {
                *state = weft_protocol::document::SyncState::new();
            }
            self.recorder.published = true;
        }
        if self.recorder.published {
            self.recorder.published = false;
            self.broadcast();
        }
        let need_bytes: u64 = self.in_flight.values().sum();
        let need_files = self.in_flight.len() as u64;
        self.recorder.shared.update(|status| {
            status.need_files = need_files;
            status.need_bytes = need_bytes;
            if status.state != FolderState::Scanning {
                status.state = if need_files > 0 {
                    FolderState::Syncing
                } else {
                    FolderState::Idle
                };
            }
        });
    }

    /// Remembers a file this device just wrote and records without hashing (a
    /// download put into place) as racily clean if its mtime is within its timestamp
    /// granularity of now: a user's write of the same size right after would keep the
    /// metadata recorded here (on FAT, a version written elsewhere in the last two
    /// seconds gets an mtime in the current two seconds).
    /// Returns whether it is racy (its row is then to be marked in the store).
    fn note_if_racy(&mut self, path: &RelPath, mtime_ns: i64) -> bool {
        let racy = crate::scan::is_racy(mtime_ns, now_ns());
        if racy {
            let delay = racy_recheck_delay(crate::scan::racy_window(mtime_ns), Duration::ZERO);
            self.racy.insert(path.clone(), Instant::now() + delay);
        }
        racy
    }

    /// Whether the file at `path` (`absolute`) holds other content than `expected`
    /// (what an action was planned against) in a way [`disk_matches`] cannot see: a
    /// write of the same size within the file's timestamp granularity leaves size,
    /// mtime and inode as they were (racily clean files, see the `scan` module doc).
    /// True if a scan since the plan recorded other content there (a racy file hashed
    /// again), or if the file is racy now and its bytes differ; it is then due at once,
    /// so that the rescan that follows records the write. Only racy files are hashed
    /// here; one that cannot be read counts as changed (the rescan says why).
    fn changed_unseen(
        &mut self,
        path: &RelPath,
        absolute: &std::path::Path,
        expected: Option<&LocalEntry>,
    ) -> bool {
        let Some(want) = expected
            .filter(|e| e.kind == EntryKind::File)
            .and_then(|e| e.manifest)
        else {
            return false;
        };
        let recorded = (self.recorder.store)
            .local(&self.record.id, path)
            .ok()
            .flatten()
            .and_then(|row| row.manifest);
        if recorded != Some(want) {
            return true;
        }
        if !self.racy.contains_key(path) {
            return false;
        }
        let Ok(file) = std::fs::File::open(absolute) else {
            return true;
        };
        let changed = weft_protocol::chunk::build_manifest(&file, &self.record.params, |_| {})
            .map_or(true, |manifest| manifest.hash() != want);
        if changed {
            self.racy.insert(path.clone(), Instant::now());
        }
        changed
    }

    /// Plans `paths` and carries the actions out; disk changes are rescanned, which
    /// records them and may plan again (bounded by [`MAX_PLAN_ROUNDS`]).
    fn plan_paths(&mut self, mut paths: Vec<RelPath>) {
        // Children before their parents: a directory is removed after its contents
        // (and files create their parent directories themselves).
        paths.extend(self.unblocked());
        paths.sort_unstable_by(|a, b| b.cmp(a));
        paths.dedup();
        let mut queue: VecDeque<RelPath> = paths.into_iter().collect();
        let mut rounds = 0;
        while !queue.is_empty() && rounds < MAX_PLAN_ROUNDS {
            rounds += 1;
            let mut rescan: BTreeSet<RelPath> = BTreeSet::new();
            let mut seen: BTreeSet<RelPath> = BTreeSet::new();
            while let Some(path) = queue.pop_front() {
                if self.in_flight.contains_key(&path) || !seen.insert(path.clone()) {
                    continue;
                }
                let local = match self.recorder.store.local(&self.record.id, &path) {
                    Ok(row) => row,
                    Err(error) => {
                        tracing::error!(folder = %self.record.id, %error, "reading the local tree failed");
                        continue;
                    }
                };
                let synced = self
                    .recorder
                    .store
                    .synced(&self.record.id, &path)
                    .ok()
                    .flatten();
                let view = PathView {
                    path: &path,
                    local: local.as_ref(),
                    synced: synced.as_ref(),
                    remote: remote_of(&self.recorder.document, &path),
                    remote_at: &|other| remote_of(&self.recorder.document, other),
                };
                let actions = engine::plan_path(&view, self.recorder.mode, &self.recorder.device);
                for action in actions {
                    self.execute(action, local.as_ref(), &mut rescan);
                }
            }
            if !rescan.is_empty() {
                self.scan(Scope::Paths(collapse(rescan)));
            }
            {
                let mut next: Vec<RelPath> = std::mem::take(&mut self.recorder.needs_plan)
                    .into_iter()
                    .collect();
                next.extend(self.unblocked());
                next.extend(queue.drain(..));
                next.sort_unstable_by(|a, b| b.cmp(a));
                next.dedup();
                queue.extend(next);
            }
        }
        if !queue.is_empty() {
            tracing::warn!(folder = %self.record.id, left = queue.len(), "planning did not settle; will retry on the next change");
            self.recorder.needs_plan.extend(queue);
        }
        // Started once everything is planned, so that small files go in groups.
        self.pump_downloads();
    }

    /// Takes the [`blocked`](FolderActor::blocked) paths whose blocking parent is now a
    /// directory or gone (one `lstat` per blocking parent), to be planned again. One
    /// still blocked by something further up is refused again under that.
    fn unblocked(&mut self) -> Vec<RelPath> {
        if self.blocked.is_empty() {
            return Vec::new();
        }
        let root = self.root();
        engine::take_unblocked(
            &mut self.blocked,
            |blocker| match std::fs::symlink_metadata(root.join(blocker.as_str())) {
                Ok(metadata) => metadata.is_dir(),
                Err(error) => error.kind() == std::io::ErrorKind::NotFound,
            },
        )
    }

    fn execute(
        &mut self,
        action: Action,
        local: Option<&LocalEntry>,
        rescan: &mut BTreeSet<RelPath>,
    ) {
        let root = self.root();
        let touches_disk = match &action {
            // A conflict copy goes beside its original: one check covers both.
            Action::Apply { path, .. }
            | Action::Remove { path, .. }
            | Action::MoveToConflictCopy { path, .. } => Some(path),
            _ => None,
        };
        if let Some(path) = touches_disk
            && let Some(blocker) = non_directory_parent(&root, path)
        {
            tracing::warn!(folder = %self.record.id, %path, %blocker, "refused: a parent of this path is a symlink or file on this device; planned again when it is a directory or gone");
            self.blocked
                .entry(blocker)
                .or_default()
                .insert(path.clone());
            return;
        }
        match action {
            Action::MarkSynced { path, entry, local } => {
                self.recorder
                    .shared
                    .update(|status| status.local_only.retain(|p| p != path.as_str()));
                let _ = self
                    .recorder
                    .commit_decisions(&[(path, Some(SyncedEntry { entry, local }))]);
            }
            Action::Publish { path } => self.publish(&path, local),
            Action::Resolve {
                path,
                winner,
                copies,
            } => {
                let mut ok = self.recorder.document.put(&path, &winner).is_ok();
                for (copy, entry) in &copies {
                    ok &= self.recorder.document.put(copy, entry).is_ok();
                }
                if ok && self.recorder.commit_decisions(&[]) {
                    tracing::info!(folder = %self.record.id, %path, copies = copies.len(), "conflict resolved");
                    // Planned again in the next round, now that the document agrees.
                    self.recorder.needs_plan.insert(path);
                    self.recorder
                        .needs_plan
                        .extend(copies.into_iter().map(|(copy, _)| copy));
                }
            }
            Action::Apply {
                path,
                entry,
                expected,
            } => {
                let absolute = root.join(path.as_str());
                if !disk_matches(&absolute, expected.as_ref())
                    || self.changed_unseen(&path, &absolute, expected.as_ref())
                {
                    rescan.insert(path);
                    return;
                }
                let mut expected = expected;
                if expected
                    .as_ref()
                    .is_some_and(|e| e.kind == EntryKind::Directory)
                    && entry.kind != EntryKind::Directory
                {
                    // A directory replaced by a file or symlink: only an empty one can
                    // go. One still holding files stays and is published again (an
                    // edit inside wins over the replacement).
                    remove_temp_files(&absolute);
                    self.recorder.dirs.changed_entry(&absolute);
                    if let Err(error) = std::fs::remove_dir(&absolute) {
                        tracing::info!(folder = %self.record.id, %path, %error, "directory kept: it still holds files");
                        if self.recorder.mode == FolderMode::SendReceive && local.is_some() {
                            self.keep_replacement_as_copy(&path, &entry);
                            self.publish(&path, local);
                        }
                        rescan.insert(path);
                        return;
                    }
                    expected = None;
                }
                match entry.kind {
                    EntryKind::Directory => {
                        if let Some(expected) = &expected
                            && expected.kind != EntryKind::Directory
                        {
                            // A file replaced by a directory: keep its content first.
                            if !self.keep_version(&absolute, expected, None) {
                                self.failed.insert(path);
                                return;
                            }
                            let _ = std::fs::remove_file(&absolute);
                        }
                        self.recorder.dirs.created_all(&root, &absolute);
                        let created = match std::fs::create_dir_all(&absolute) {
                            Ok(()) => true,
                            Err(error) => {
                                tracing::warn!(folder = %self.record.id, %path, %error, "cannot create directory");
                                false
                            }
                        };
                        if created && entry.mode & 0o777 != 0 {
                            use std::os::unix::fs::PermissionsExt;
                            let mode = std::fs::Permissions::from_mode(entry.mode & 0o7777);
                            if let Err(error) = std::fs::set_permissions(&absolute, mode) {
                                tracing::warn!(folder = %self.record.id, %path, %error, "cannot set the directory's mode");
                            }
                        }
                        rescan.insert(path);
                    }
                    EntryKind::Symlink => {
                        if let Content::Symlink(target) = &entry.content {
                            let temp = absolute.with_file_name(format!(
                                "{}{}",
                                weft_protocol::path::TEMP_PREFIX,
                                now_ns()
                            ));
                            if let Some(parent) = absolute.parent() {
                                let _ = std::fs::create_dir_all(parent);
                            }
                            self.recorder.dirs.created_all(&root, &absolute);
                            let made = std::os::unix::fs::symlink(target, &temp)
                                .and_then(|()| std::fs::rename(&temp, &absolute));
                            if let Err(error) = made {
                                let _ = std::fs::remove_file(&temp);
                                tracing::warn!(folder = %self.record.id, %path, %error, "cannot create symlink");
                            }
                        }
                        rescan.insert(path);
                    }
                    EntryKind::File => self.start_fetch(path, entry, expected),
                }
            }
            Action::Remove { path, expected, .. } => {
                let absolute = root.join(path.as_str());
                if !disk_matches(&absolute, Some(&expected))
                    || self.changed_unseen(&path, &absolute, Some(&expected))
                {
                    rescan.insert(path);
                    return;
                }
                if expected.kind == EntryKind::File
                    && !self.keep_version(&absolute, &expected, None)
                {
                    // Never destroy what could not be kept; try again later.
                    self.failed.insert(path);
                    return;
                }
                if expected.kind == EntryKind::Directory {
                    remove_temp_files(&absolute);
                }
                self.recorder.dirs.changed_entry(&absolute);
                let removed = match expected.kind {
                    EntryKind::Directory => std::fs::remove_dir(&absolute),
                    _ => {
                        let held = crate::release::hold_if_large(&absolute, expected.size);
                        let removed = std::fs::remove_file(&absolute);
                        if let Some(held) = held {
                            crate::release::release_later(held);
                        }
                        removed
                    }
                };
                match removed {
                    Ok(()) => {}
                    Err(error) if expected.kind == EntryKind::Directory => {
                        // Still holds files. If they are all tracked and going away too,
                        // try again after them; otherwise (a kept child: a local edit or
                        // a file the remote still has; or files that are not synced at
                        // all, like ignored ones) the directory stays and is published
                        // again: an edit wins over a delete, and a directory planned for
                        // removal forever would never settle.
                        let children = self
                            .recorder
                            .store
                            .local_under(&self.record.id, Some(&path))
                            .unwrap_or_default();
                        let children: Vec<&RelPath> =
                            children.keys().filter(|child| **child != path).collect();
                        let all_going = children.iter().all(|child| {
                            matches!(remote_of(&self.recorder.document, child), Remote::Value(ref e) if e.deleted)
                        });
                        if all_going && !children.is_empty() {
                            self.recorder.needs_plan.insert(path.clone());
                        } else {
                            tracing::info!(folder = %self.record.id, %path, %error, "directory kept: it still holds files");
                            if self.recorder.mode == FolderMode::SendReceive && local.is_some() {
                                self.publish(&path, local);
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(folder = %self.record.id, %path, %error, "cannot delete");
                    }
                }
                rescan.insert(path);
            }
            Action::MoveToConflictCopy { path, to, expected } => {
                let from = root.join(path.as_str());
                if !disk_matches(&from, Some(&expected)) {
                    rescan.insert(path);
                    return;
                }
                // The name is taken (an earlier version moved aside in the same
                // second): number this one.
                let planned = to.clone();
                let mut to = to;
                let mut n = 2;
                while std::fs::symlink_metadata(root.join(to.as_str())).is_ok() {
                    match engine::numbered_copy_path(&planned, n) {
                        Some(next) if n < engine::MAX_COPY_NUMBER => to = next,
                        _ => {
                            tracing::warn!(folder = %self.record.id, %path, "no free conflict-copy name");
                            return;
                        }
                    }
                    n += 1;
                }
                // Nothing is synced at `path` once its version is moved aside: forgotten
                // first (a crash between the two then only resolves again). Kept, the
                // old row made the empty path read as the user's delete of it, and a
                // later remote value with that same content (another device renaming the
                // copy back, say) as unchanged: the node published the delete
                // (simulation seed 200 under the stricter "nothing lost" check).
                if !self.recorder.commit_decisions(&[(path.clone(), None)]) {
                    return;
                }
                let target = root.join(to.as_str());
                self.recorder.dirs.changed_entry(&from);
                self.recorder.dirs.changed_entry(&target);
                match std::fs::rename(&from, &target) {
                    Ok(()) => {
                        tracing::info!(folder = %self.record.id, %path, copy = %to, "conflict: local version kept as a conflict copy");
                    }
                    Err(error) => {
                        tracing::warn!(folder = %self.record.id, %path, %error, "cannot make a conflict copy");
                    }
                }
                rescan.insert(path);
                rescan.insert(to);
            }
            Action::KeepLocal { path } => {
                self.recorder.shared.update(|status| {
                    if status.local_only.len() < MAX_PROBLEMS_SHOWN
                        && !status.local_only.iter().any(|p| p == path.as_str())
                    {
                        status.local_only.push(path.to_string());
                    }
                });
            }
        }
    }

    /// Puts `replacement`, the file or symlink that lost to the directory kept at
    /// `path`, into the document as a conflict copy ([`engine::replacement_copy_path`]);
    /// committed with the directory's publication that follows.
    fn keep_replacement_as_copy(&mut self, path: &RelPath, replacement: &Entry) {
        let document = &self.recorder.document;
        let copy =
            engine::replacement_copy_path(path, replacement, &|other| remote_of(document, other));
        match copy {
            Some(copy) if self.recorder.document.put(&copy, replacement).is_ok() => {
                tracing::info!(folder = %self.record.id, %path, %copy, "conflict: the file that replaced the directory is kept as a conflict copy");
                self.recorder.needs_plan.insert(copy);
            }
            _ => {
                tracing::warn!(folder = %self.record.id, %path, "no conflict-copy name for the file that replaced the directory; the directory wins alone")
            }
        }
    }

    /// Publishes what is on disk at `path` (a tombstone when nothing is) and records
    /// it as synced, in one transaction.
    fn publish(&mut self, path: &RelPath, local: Option<&LocalEntry>) {
        let entry = match local {
            Some(local) => {
                let manifest = local
                    .manifest
                    .and_then(|hash| self.recorder.store.manifest(&hash).ok().flatten());
                publish_entry(local, manifest.as_ref(), self.recorder.device)
            }
            None => match engine::live_value(&remote_of(&self.recorder.document, path)) {
                Some(current) => tombstone(current, now_ns(), self.recorder.device),
                None => return,
            },
        };
        if self.recorder.document.put(path, &entry).is_ok() {
            let _ = self.recorder.commit_decisions(&[(
                path.clone(),
                Some(SyncedEntry {
                    entry,
                    local: local.cloned(),
                }),
            )]);
        }
    }

    fn start_fetch(&mut self, path: RelPath, entry: Entry, expected: Option<LocalEntry>) {
        self.start_fetch_for(path, entry, expected, None);
    }

    fn start_fetch_for(
        &mut self,
        path: RelPath,
        entry: Entry,
        expected: Option<LocalEntry>,
        restore: Option<mpsc::Sender<Result<String, String>>>,
    ) {
        if self.network.is_none() {
            if let Some(reply) = restore {
                let _ = reply.send(Err("the node has no network".into()));
            }
            return;
        }
        self.in_flight.insert(path.clone(), entry.size);
        self.download_queue.push(QueuedDownload {
            path,
            entry,
            expected,
            restore,
        });
    }

    /// Starts queued downloads while there are free slots: the largest file and a
    /// group of small files (up to [`GROUP_FILES`], one task, one slot) in turn.
    fn pump_downloads(&mut self) {
        let Some(network) = self.network.clone() else {
            return;
        };
        while self.downloads_running < MAX_DOWNLOADS {
            // Turn about, the largest file and a group of small ones: large files are
            // the longest downloads, and small ones cost mostly file creation, which
            // runs beside a large transfer rather than after it.
            self.small_turn = !self.small_turn;
            let mut group = if self.small_turn {
                self.take_small_group()
            } else {
                Vec::new()
            };
            if group.is_empty() {
                let Some(largest) = self.take_largest_download() else {
                    break;
                };
                let groupable = largest.restore.is_none() && largest.entry.size <= GROUP_FILE_MAX;
                let room = GROUP_BYTES.saturating_sub(largest.entry.size);
                group.push(largest);
                if groupable {
                    group.extend(self.take_small_group_within(room, GROUP_FILES - 1));
                }
            }
            let peers: Vec<DeviceId> = self
                .peers
                .keys()
                .copied()
                .filter(|device| network.net.is_connected(device))
                .collect();
            let context = crate::fetch::FetchContext {
                net: network.net.clone(),
                store: self.recorder.store.clone(),
                folder: self.record.id.clone(),
                root: self.root(),
                peers,
                versions: self.settings.versions.clone(),
            };
            tracing::debug!(folder = %self.record.id, first = %group[0].path, files = group.len(), peers = context.peers.len(), "download starts");
            self.downloads_running += 1;
            let sender = self.sender.clone();
            network.runtime.spawn(async move {
                let wanted = group
                    .iter()
                    .map(|d| (d.path.clone(), d.entry.clone()))
                    .collect();
                let results = crate::fetch::fetch_files(context, wanted).await;
                let items = group
                    .into_iter()
                    .zip(results)
                    .map(|(download, result)| FetchedItem {
                        path: download.path,
                        entry: download.entry,
                        expected: download.expected,
                        result,
                        restore: download.restore,
                    })
                    .collect();
                let _ = sender.send(FolderCommand::Fetched(items));
            });
        }
    }

    /// Removes a group of small downloads (up to [`GROUP_FILES`], [`GROUP_BYTES`]) from
    /// the queue; empty if there is none.
    fn take_small_group(&mut self) -> Vec<QueuedDownload> {
        self.take_small_group_within(GROUP_BYTES, GROUP_FILES)
    }

    /// Removes up to `files` small downloads of at most `bytes` in all from the queue.
    fn take_small_group_within(&mut self, bytes: u64, files: usize) -> Vec<QueuedDownload> {
        let mut left = bytes;
        let mut chosen = Vec::new();
        for (index, download) in self.download_queue.iter().enumerate() {
            if chosen.len() == files {
                break;
            }
            let size = download.entry.size;
            if download.restore.is_none() && size <= GROUP_FILE_MAX && size <= left {
                left -= size;
                chosen.push(index);
            }
        }
        // Highest index first, so that each swap_remove moves an unchosen download.
        chosen
            .into_iter()
            .rev()
            .map(|index| self.download_queue.swap_remove(index))
            .collect()
    }

    /// Removes the largest queued download from the queue.
    fn take_largest_download(&mut self) -> Option<QueuedDownload> {
        let largest = self
            .download_queue
            .iter()
            .enumerate()
            .max_by_key(|(_, d)| d.entry.size)
            .map(|(index, _)| index)?;
        Some(self.download_queue.swap_remove(largest))
    }

    /// Puts finished downloads into place: each is checked against the disk, renamed
    /// over its path, and recorded (with the manifest it was verified against, so it is
    /// not hashed again); the whole batch is one store transaction.
    fn finish_downloads(&mut self, batch: Vec<FetchedItem>) {
        let started = Instant::now();
        let files = batch.len();
        let root = self.root();
        let mut changes = Vec::new();
        let mut previous = std::collections::BTreeMap::new();
        let mut racy = Vec::new();
        let mut replies = Vec::new();
        let mut replan = Vec::new();
        for item in batch {
            let FetchedItem {
                path,
                entry,
                expected,
                result,
                restore,
            } = item;
            self.in_flight.remove(&path);
            let fetched = match result {
                Ok(fetched) => fetched,
                Err(error) => {
                    match restore {
                        Some(reply) => {
                            let _ = reply
                                .send(Err(format!("cannot get that version's content: {error}")));
                        }
                        None => {
                            tracing::warn!(folder = %self.record.id, %path, %error, "download failed; will retry");
                            self.failed.insert(path);
                        }
                    }
                    continue;
                }
            };
            // The version may have been superseded while it downloaded.
            let still_wanted = restore.is_some()
                || engine::settled_value(&remote_of(&self.recorder.document, &path))
                    == Some(&entry);
            let absolute = root.join(path.as_str());
            if !still_wanted
                || !disk_matches(&absolute, expected.as_ref())
                || self.changed_unseen(&path, &absolute, expected.as_ref())
                || !parents_are_directories(&root, &path)
            {
                // Changed here or there meanwhile: decide again. The temp file is kept
                // for a retry of the same version, and removed otherwise.
                if !still_wanted || restore.is_some() {
                    let _ = std::fs::remove_file(&fetched.temp);
                }
                if let Some(reply) = restore {
                    let _ = reply.send(Err(format!("{path} changed while restoring; try again")));
                }
                replan.push(path);
                continue;
            }
            if let Some(parent) = absolute.parent() {
                let missing = !parent.is_dir();
                if missing {
                    let _ = std::fs::create_dir_all(parent);
                }
                // Directories made for the file here or by the download (`fetch`), in
                // this run or an earlier one: every parent up to the root is synced.
                // (Syncing them for every download cost ~0.4 s of a 3 s initial sync.)
                if missing || fetched.new_dirs {
                    self.recorder.dirs.created_all(&root, parent);
                }
            }
            if let Some(old) = &expected
                && !self.keep_version(&absolute, old, Some(&fetched.manifest))
            {
                // The old version could not be kept (disk full?): leave it in place
                // and retry; the verified temp file is resumed.
                if let Some(reply) = restore {
                    let _ = reply.send(Err(format!(
                        "{path}: the current version could not be kept in the version store; nothing replaced"
                    )));
                } else {
                    self.failed.insert(path);
                }
                continue;
            }
            // A large old version is freed off this thread (`release`).
            let held = expected
                .as_ref()
                .and_then(|old| crate::release::hold_if_large(&absolute, old.size));
            let renamed = std::fs::rename(&fetched.temp, &absolute);
            if let Some(held) = held {
                crate::release::release_later(held);
            }
            // The temp file is in the same directory (`fetch::temp_path`).
            self.recorder.dirs.changed_entry(&absolute);
            if let Err(error) = renamed {
                tracing::warn!(folder = %self.record.id, %path, %error, "cannot move the downloaded file into place");
                match restore {
                    Some(reply) => {
                        let _ = reply.send(Err(error.to_string()));
                    }
                    None => {
                        self.failed.insert(path);
                    }
                }
                continue;
            }
            match std::fs::symlink_metadata(&absolute) {
                Ok(metadata) => {
                    let mut local = crate::scan::entry_from_metadata(&metadata, None);
                    local.manifest = Some(fetched.manifest.hash());
                    if self.note_if_racy(&path, local.mtime_ns) {
                        racy.push(path.clone());
                    }
                    if let Some(old) = expected {
                        previous.insert(path.clone(), old);
                    }
                    changes.push(LocalChange::Upsert {
                        path: path.clone(),
                        entry: local,
                        manifest: Some(fetched.manifest),
                    });
                    if let Some(reply) = restore {
                        replies.push((reply, path.to_string()));
                    }
                }
                Err(_) => replan.push(path),
            }
        }
        let renamed_ms = started.elapsed().as_millis();
        if !changes.is_empty() {
            self.recorder.commit(changes, &previous, &racy);
        }
        tracing::debug!(folder = %self.record.id, files, renamed_ms, total_ms = started.elapsed().as_millis(), "downloads put into place");
        for (reply, path) in replies {
            let _ = reply.send(Ok(path));
        }
        if !replan.is_empty() {
            self.scan(Scope::Paths(collapse(replan.iter().cloned().collect())));
            self.plan_paths(replan);
        }
        self.pump_downloads();
    }

    /// Keeps the blocks of the local file about to be replaced (by `new`) or deleted.
    /// Returns false if the version should have been kept and could not be (the
    /// caller must then leave the file alone): no version history configured, or no
    /// manifest to keep by, counts as kept.
    fn keep_version(
        &self,
        absolute: &std::path::Path,
        old: &LocalEntry,
        new: Option<&weft_protocol::Manifest>,
    ) -> bool {
        let Some(versions) = &self.settings.versions else {
            return true;
        };
        if old.kind != EntryKind::File {
            return true;
        }
        let manifest = old
            .manifest
            .and_then(|hash| self.recorder.store.manifest(&hash).ok().flatten());
        if let Some(manifest) = manifest
            && let Err(error) = versions.keep_file(
                absolute,
                &manifest,
                &new.map(|m| m.blocks().iter().map(|b| b.hash).collect())
                    .unwrap_or_default(),
            )
        {
            tracing::warn!(folder = %self.record.id, path = %absolute.display(), %error, "could not keep the old version; the file is left in place and retried");
            return false;
        }
        true
    }

    fn versions(&mut self, path: &RelPath) -> Vec<VersionInfo> {
        let history = self.recorder.document.history();
        history
            .get(path.as_str())
            .map(|versions| {
                versions
                    .iter()
                    .enumerate()
                    .map(|(index, entry)| VersionInfo {
                        index,
                        mtime_ns: entry.mtime_ns,
                        size: entry.size,
                        author: entry.author.to_string(),
                        deleted: entry.deleted,
                        manifest: entry.content.manifest_hash().map(|h| h.to_hex()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn restore(
        &mut self,
        path: RelPath,
        version: Option<usize>,
        to: Option<RelPath>,
        reply: mpsc::Sender<Result<String, String>>,
    ) {
        let history = self.recorder.document.history();
        let Some(versions) = history.get(path.as_str()) else {
            let _ = reply.send(Err(format!("{path} has no history in this folder")));
            return;
        };
        let current = engine::settled_value(&remote_of(&self.recorder.document, &path)).cloned();
        let chosen = match version {
            Some(index) => versions.get(index).cloned(),
            None => versions
                .iter()
                .rev()
                .find(|v| !v.deleted && !engine::same_content(Some(v), current.as_ref()))
                .cloned(),
        };
        let Some(entry) = chosen else {
            let _ = reply.send(Err("no such version (`weft versions` lists them)".into()));
            return;
        };
        if entry.deleted || entry.kind != EntryKind::File {
            let _ = reply.send(Err("that version is a deletion or not a file".into()));
            return;
        }
        let target = to.unwrap_or(path);
        if !parents_are_directories(&self.root(), &target) {
            let _ = reply.send(Err(format!("a parent of {target} is not a directory")));
            return;
        }
        let expected = self
            .recorder
            .store
            .local(&self.record.id, &target)
            .ok()
            .flatten();
        // The restored file gets the time of the restore, so it is the newest version.
        let mut entry = entry;
        entry.mtime_ns = now_ns();
        self.start_fetch_for(target, entry, expected, Some(reply));
        self.pump_downloads();
    }
}

/// Keeps the outermost of nested dirty paths (`a` covers `a/b`).
fn collapse(paths: BTreeSet<RelPath>) -> Vec<RelPath> {
    let covered = |path: &RelPath| {
        let mut parent = path.parent();
        while let Some(dir) = parent {
            if paths.contains(&dir) {
                return true;
            }
            parent = dir.parent();
        }
        false
    };
    paths
        .iter()
        .filter(|path| !covered(path))
        .cloned()
        .collect()
}

/// Records scan changes: document entries plus store rows, one transaction a batch.
struct Recorder {
    folder: FolderId,
    store: Arc<Store>,
    document: FolderDocument,
    device: DeviceId,
    /// Signs this device's changes (lazily, when they are first sent).
    key: Arc<DeviceKey>,
    /// Authors' signatures of the document's changes, by change hash (verified, or
    /// made here); passed on with the changes.
    signatures: HashMap<[u8; 32], Signature>,
    events: EventBus,
    shared: Arc<FolderShared>,
    mode: FolderMode,
    /// Paths where the engine wants more than publishing (apply, conflict, ...).
    needs_plan: BTreeSet<RelPath>,
    /// The document gained local changes not yet offered to peers.
    published: bool,
    /// A scan batch failed to commit since this was last cleared (a scan's racy files
    /// then stay racy: what their second hash found is not in the store).
    commit_failed: bool,
    /// Received changes whose store commit failed: kept in memory and saved with the
    /// next commit (automerge's `save_incremental` hands each change out only once).
    unsaved: Vec<u8>,
    /// The document was reloaded from the store (dropping changes a failed commit did
    /// not store): peers' sync states no longer describe it and must start over.
    reloaded: bool,
    /// Directories this actor changed since the last commit, synced before the next
    /// one records what it did there (`dir_sync`).
    dirs: crate::dir_sync::PendingDirs,
}

impl Recorder {
    /// The signatures of `changes`, to send with them: kept ones, and this device's own
    /// changes signed now. A change of another device that came without a signature
    /// (kept from before signatures existed) is sent without; receivers refuse it.
    fn signatures_for(&mut self, changes: &[document::ChangeHash]) -> Vec<SignedChange> {
        let mut signed = Vec::with_capacity(changes.len());
        let mut made = Vec::new();
        for change in changes {
            if let Some(signature) = self.signatures.get(&change.0) {
                signed.push(SignedChange {
                    hash: change.0,
                    signature: *signature,
                });
                continue;
            }
            let author = self
                .document
                .change_actor(change)
                .and_then(|actor| document::actor_device(&actor));
            if author == Some(self.device) {
                let signature = SignedChange::sign(&self.key, &self.folder, change);
                self.signatures.insert(signature.hash, signature.signature);
                made.push(signature);
                signed.push(signature);
            } else {
                tracing::debug!(folder = %self.folder, %change, "change without a kept signature; sent unsigned");
            }
        }
        if let Err(error) = self.store.put_change_signatures(&self.folder, &made) {
            tracing::error!(folder = %self.folder, %error, "keeping change signatures failed");
        }
        signed
    }

    /// Keeps verified signatures of received changes, to pass them on.
    fn keep_signatures(&mut self, signed: &[SignedChange]) {
        let new: Vec<SignedChange> = signed
            .iter()
            .filter(|s| !self.signatures.contains_key(&s.hash))
            .copied()
            .collect();
        self.signatures
            .extend(new.iter().map(|s| (s.hash, s.signature)));
        if let Err(error) = self.store.put_change_signatures(&self.folder, &new) {
            tracing::error!(folder = %self.folder, %error, "keeping change signatures failed");
        }
    }

    /// Sets the status counts from a whole local tree.
    fn recount(&self, tree: &std::collections::BTreeMap<RelPath, LocalEntry>) {
        let (mut files, mut directories, mut symlinks, mut bytes) = (0, 0, 0, 0);
        for entry in tree.values() {
            match entry.kind {
                EntryKind::File => {
                    files += 1;
                    bytes += entry.size;
                }
                EntryKind::Directory => directories += 1,
                EntryKind::Symlink => symlinks += 1,
            }
        }
        self.shared.update(|s| {
            s.files = files;
            s.directories = directories;
            s.symlinks = symlinks;
            s.bytes = bytes;
        });
    }

    /// The document entry for a local change.
    fn entry_for(&self, change: &LocalChange, now: i64) -> Option<(RelPath, Entry)> {
        match change {
            LocalChange::Upsert {
                path,
                entry,
                manifest,
            } => Some((
                path.clone(),
                publish_entry(entry, manifest.as_ref(), self.device),
            )),
            LocalChange::Remove { path } => {
                let remote = remote_of(&self.document, path);
                let current = engine::live_value(&remote)?;
                Some((path.clone(), tombstone(current, now, self.device)))
            }
        }
    }

    /// Commits a batch; `racy` are its paths whose rows are racily clean. On failure
    /// the document is reloaded from the store so that it never holds changes the store
    /// does not (the next scan finds them again).
    fn commit(
        &mut self,
        batch: Vec<LocalChange>,
        previous: &std::collections::BTreeMap<RelPath, LocalEntry>,
        racy: &[RelPath],
    ) {
        if batch.is_empty() {
            return;
        }
        let now = now_ns();
        let mut recorded = Vec::new();
        let mut synced_updates = Vec::new();
        for change in &batch {
            let (path, local) = match change {
                LocalChange::Upsert { path, entry, .. } => (path, Some(entry)),
                LocalChange::Remove { path } => (path, None),
            };
            let synced = self.store.synced(&self.folder, path).ok().flatten();
            let view = PathView {
                path,
                local,
                synced: synced.as_ref(),
                remote: remote_of(&self.document, path),
                remote_at: &|other| remote_of(&self.document, other),
            };
            for action in engine::plan_path(&view, self.mode, &self.device) {
                match action {
                    Action::Publish { .. } => {
                        let Some((_, entry)) = self.entry_for(change, now) else {
                            continue;
                        };
                        if let Err(error) = self.document.put(path, &entry) {
                            tracing::error!(folder = %self.folder, %path, %error, "document write failed");
                            continue;
                        }
                        recorded.push((path.clone(), entry.deleted));
                        synced_updates.push((
                            path.clone(),
                            Some(SyncedEntry {
                                entry,
                                local: local.cloned(),
                            }),
                        ));
                    }
                    Action::MarkSynced { entry, local, .. } => {
                        synced_updates.push((path.clone(), Some(SyncedEntry { entry, local })));
                    }
                    _ => {
                        self.needs_plan.insert(path.clone());
                    }
                }
            }
        }
        self.document.commit(now / 1_000_000, "local changes");
        let increment = self.increment();
        self.dirs.sync();
        match self.store.commit_scan_batch_with(
            &self.folder,
            &batch,
            &synced_updates,
            &increment,
            racy,
        ) {
            Ok(increments) => {
                self.unsaved.clear();
                self.maybe_compact(increments);
            }
            Err(error) => {
                tracing::error!(folder = %self.folder, %error, "committing scan results failed; will rescan");
                self.commit_failed = true;
                self.reload_document();
                return;
            }
        }
        if !recorded.is_empty() {
            self.published = true;
        }
        self.adjust_counts(&batch, previous);
        for (path, deleted) in recorded {
            self.events.publish(Event::LocalChange {
                folder: self.folder.to_string(),
                path: path.to_string(),
                action: if deleted {
                    "deleted"
                } else {
                    "created_or_modified"
                }
                .into(),
            });
        }
    }

    fn adjust_counts(
        &self,
        batch: &[LocalChange],
        previous: &std::collections::BTreeMap<RelPath, LocalEntry>,
    ) {
        self.shared.update(|status| {
            let mut apply = |entry: &LocalEntry, sign: i64| {
                let (count, bytes) = match entry.kind {
                    EntryKind::File => (&mut status.files, entry.size),
                    EntryKind::Directory => (&mut status.directories, 0),
                    EntryKind::Symlink => (&mut status.symlinks, 0),
                };
                *count = count.saturating_add_signed(sign);
                status.bytes = status.bytes.saturating_add_signed(sign * bytes as i64);
            };
            for change in batch {
                match change {
                    LocalChange::Upsert { path, entry, .. } => {
                        if let Some(old) = previous.get(path) {
                            apply(old, -1);
                        }
                        apply(entry, 1);
                    }
                    LocalChange::Remove { path } => {
                        if let Some(old) = previous.get(path) {
                            apply(old, -1);
                        }
                    }
                }
            }
        });
    }

    fn maybe_compact(&mut self, increments: u64) {
        if increments >= crate::store::DOC_INCREMENTS_BEFORE_COMPACTION {
            let snapshot = self.document.save();
            if let Err(error) = self.store.compact_document(&self.folder, &snapshot) {
                tracing::warn!(folder = %self.folder, %error, "document compaction failed");
            }
        }
    }

    /// Commits document operations already made (publish, resolve) with synced updates.
    fn commit_decisions(&mut self, synced_updates: &[(RelPath, Option<SyncedEntry>)]) -> bool {
        self.document.commit(now_ns() / 1_000_000, "sync");
        let increment = self.increment();
        if !increment.is_empty() {
            self.published = true;
        }
        self.dirs.sync();
        match self
            .store
            .commit_scan_batch_with(&self.folder, &[], synced_updates, &increment, &[])
        {
            Ok(increments) => {
                self.unsaved.clear();
                self.maybe_compact(increments);
                true
            }
            Err(error) => {
                tracing::error!(folder = %self.folder, %error, "committing a sync decision failed");
                self.reload_document();
                false
            }
        }
    }

    /// The bytes the next commit stores: received changes a failed commit left
    /// unsaved, then everything new since the last call.
    fn increment(&mut self) -> Vec<u8> {
        let mut bytes = self.unsaved.clone();
        bytes.extend(self.document.save_incremental());
        bytes
    }

    /// Stores changes received from a peer; on failure they stay in memory and go
    /// with the next commit.
    fn save_received(&mut self) {
        let increment = self.increment();
        if increment.is_empty() {
            return;
        }
        match self
            .store
            .commit_scan_batch_with(&self.folder, &[], &[], &increment, &[])
        {
            Ok(increments) => {
                self.unsaved.clear();
                self.maybe_compact(increments);
            }
            Err(error) => {
                tracing::error!(folder = %self.folder, %error, "saving received changes failed; kept in memory for the next commit");
                self.unsaved = increment;
            }
        }
    }

    /// Drops changes that a failed commit did not store: the document becomes the
    /// store's (plus received changes not yet saved).
    fn reload_document(&mut self) {
        let actor = document::actor_id(&self.device, self.store.actor_suffix());
        self.reloaded = true;
        match self.store.document(&self.folder) {
            Ok((snapshot, increments)) => {
                let chunks = increments
                    .iter()
                    .map(Vec::as_slice)
                    .chain((!self.unsaved.is_empty()).then_some(self.unsaved.as_slice()));
                match FolderDocument::load(&snapshot, chunks, actor) {
                    Ok(document) => self.document = document,
                    Err(error) => {
                        tracing::error!(folder = %self.folder, %error, "reloading the document failed")
                    }
                }
            }
            Err(error) => {
                tracing::error!(folder = %self.folder, %error, "reloading the document failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_keeps_outermost_paths() {
        let paths: BTreeSet<RelPath> = ["a/b", "a", "a b", "c/d", "c/d/e", "c/e"]
            .iter()
            .map(|p| RelPath::new(p).unwrap())
            .collect();
        let kept: Vec<String> = collapse(paths).iter().map(|p| p.to_string()).collect();
        assert_eq!(kept, vec!["a", "a b", "c/d", "c/e"]);
    }

    #[test]
    fn a_finished_download_with_an_old_mtime_is_not_abandoned() {
        // A finished download carries its version's mtime (here two days old) while it
        // waits to be renamed into place; a scan must not take it for abandoned.
        let dir = tempfile::tempdir().unwrap();
        let temp = dir.path().join(".weft.tmp.0123456789abcdef01234567");
        std::fs::write(&temp, b"complete download").unwrap();
        let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
        std::fs::File::options()
            .write(true)
            .open(&temp)
            .unwrap()
            .set_modified(two_days_ago)
            .unwrap();
        remove_abandoned_temp_files(std::slice::from_ref(&temp), Duration::from_secs(3600));
        assert!(temp.exists(), "a temp file changed just now was removed");
        remove_abandoned_temp_files(std::slice::from_ref(&temp), Duration::ZERO);
        assert!(!temp.exists(), "an expired temp file was kept");
    }
}
