//! The folder actor: one thread per folder that runs the folder core
//! ([`weft_core::Folder`]) over the real disk, store and network.
//!
//! The actor decides nothing itself. It turns what happens into calls of the core
//! (commands from the API, the watcher and the network arrive on a channel,
//! [`FolderHandle`]) and carries the core's effects out through its executor
//! ([`executor::NodeIo`]: `std::fs`, redb, libp2p, the scanner). What is left here is
//! timing: file events only mark paths dirty ([`crate::dirty`]): a finished change (a
//! closed file, a rename, a delete) is rescanned after a few milliseconds, one still
//! being written after a quiet time (`debounce_ms`), each at most
//! [`crate::dirty::MAX_DEBOUNCE_FACTOR`] debounce periods after its first event. Too
//! many dirty paths, or a watcher overflow, fall back to a full scan, as does the
//! periodic full rescan.

mod executor;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weft_core::folder::{Folder, Membership};
use weft_core::io::PeerInput;
use weft_protocol::change_signature::SignedChange;
use weft_protocol::document;
use weft_protocol::{DeviceId, DeviceKey, RelPath};

use crate::dirty::{Change, DirtyPaths, Due};
use crate::events::EventBus;
use crate::net::FrameBudget;
use crate::net::NetHandle;
use crate::scan::{Problem, ScanProgress, Scanner, Scope};
use crate::store::{FolderRecord, Store, StoreError};

pub use executor::DownloadedTemp;

/// Problems kept in the status (the most recent scan's first ones).
pub const MAX_PROBLEMS_SHOWN: usize = 100;
/// Devices listed as refused in a folder's status (a bound on what peers can fill).
pub const MAX_REFUSED_SHOWN: usize = 32;

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
    /// This device's role in the folder (`view`, `edit`, `admin`, `owner`), or `None`
    /// before the folder's access list has arrived or after this device was removed.
    #[serde(default)]
    pub role: Option<String>,
    /// Devices whose changes this device refused because their role did not allow
    /// them (a misbehaving or removed device), with the last reason.
    #[serde(default)]
    pub refused: Vec<RefusedDevice>,
}

/// A device whose changes were refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedDevice {
    /// The device.
    pub device: String,
    /// Why its last refused message was refused.
    pub reason: String,
    /// How many of its messages were refused.
    pub count: u64,
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
    SyncMessage(DeviceId, Vec<u8>, FrameBudget),
    /// A leading piece of a sync message too large for one frame.
    SyncMessagePart(DeviceId, Vec<u8>, FrameBudget),
    /// Authors' signatures of the changes in the device's next sync message.
    ChangeSignatures(DeviceId, Vec<SignedChange>, FrameBudget),
    /// A download task (one large file or a group of small ones) finished.
    Fetched(
        Vec<(
            u64,
            Result<weft_core::folder::Fetched<executor::DownloadedTemp>, String>,
        )>,
    ),
    /// The folder's record changed (shared with another device, say).
    UpdateRecord(FolderRecord),
    /// Set a device's role in the folder's access list (`None`: unshare).
    SetAccess {
        /// The device.
        device: DeviceId,
        /// Its new role.
        role: Option<weft_protocol::access::Role>,
        /// The outcome (the error says what to do).
        reply: mpsc::Sender<Result<String, String>>,
    },
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
    /// The folder's other members and their roles, as the folder last read its access
    /// list: what the network layer checks a device against.
    members: Mutex<Vec<(DeviceId, weft_protocol::access::Role)>>,
}

impl FolderShared {
    /// The role of `device` in the folder, if it is a member.
    pub fn role_of(&self, device: &DeviceId) -> Option<weft_protocol::access::Role> {
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members
            .iter()
            .find(|(d, _)| d == device)
            .map(|(_, role)| *role)
    }

    /// The folder's other members.
    pub fn members(&self) -> Vec<(DeviceId, weft_protocol::access::Role)> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_members(&self, members: Vec<(DeviceId, weft_protocol::access::Role)>) {
        *self.members.lock().unwrap_or_else(|p| p.into_inner()) = members;
    }

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
    /// The folder's record with its members as the folder last read them from its
    /// access list (the record kept here is the one the folder started with).
    pub fn current_record(&self) -> FolderRecord {
        let mut record = self.record.clone();
        record.devices = self.shared.members();
        let role = self.shared.snapshot().role;
        if let Some(role) = role.and_then(|r| r.parse::<weft_protocol::access::Role>().ok()) {
            record.mode = if role.can_edit() {
                crate::engine::FolderMode::SendReceive
            } else {
                crate::engine::FolderMode::ReceiveOnly
            };
        }
        record
    }

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
    /// The folder core could not open its document.
    #[error(transparent)]
    Open(#[from] weft_core::folder::OpenError),
    /// The actor thread could not start.
    #[error("cannot start the folder thread: {0}")]
    Thread(std::io::Error),
}

/// The core's view of who shares a folder record.
fn membership(record: &FolderRecord) -> Membership {
    Membership {
        mode: record.mode,
        devices: record.devices.iter().map(|(device, _)| *device).collect(),
    }
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
            role: None,
            refused: Vec::new(),
        }),
        progress: ScanProgress::default(),
        members: Mutex::new(record.devices.clone()),
    });
    let (sender, receiver) = mpsc::channel();
    let founder = record.founder.unwrap_or_else(|| key.device_id());
    let io = executor::NodeIo {
        device: key.device_id(),
        record: record.clone(),
        root: PathBuf::from(&record.path),
        store: store.clone(),
        scanner: Arc::new(scanner),
        network: network.clone(),
        sender: sender.clone(),
        receiver,
        deferred: VecDeque::new(),
        versions: settings.versions.clone(),
        temp_file_expiry: settings.temp_file_expiry,
        shared: shared.clone(),
        events,
        dirs: crate::dir_sync::PendingDirs::default(),
        restores: std::collections::HashMap::new(),
        next_ticket: 0,
        last_scan: None,
    };
    let core = Folder::open(
        weft_core::FolderSettings {
            id: record.id.clone(),
            key,
            actor_suffix: store.actor_suffix(),
            founder,
            membership: membership(&record),
            downloads: network.is_some(),
            compact_after: crate::store::DOC_INCREMENTS_BEFORE_COMPACTION,
        },
        &io,
    )?;
    let watcher = if settings.watch {
        let actor = sender.clone();
        crate::watch::watch(&record.path, move |event| {
            let command = match event {
                crate::watch::WatchEvent::Paths { paths, change } => {
                    FolderCommand::FileEvents { paths, change }
                }
                crate::watch::WatchEvent::Overflow => FolderCommand::WatcherOverflow,
            };
            let _ = actor.send(command);
        })
    } else {
        None
    };
    let mut actor = FolderActor {
        core,
        io,
        dirty: DirtyPaths::new(settings.debounce),
        settings,
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
    core: Folder<DownloadedTemp>,
    io: executor::NodeIo,
    settings: FolderSettings,
    dirty: DirtyPaths,
    _watcher: Option<crate::watch::Watcher>,
}

/// The core's deadline `at_ns` ([`weft_core::io::Clock::monotonic_ns`]) as an instant.
fn instant_of(at_ns: i64) -> Instant {
    executor::monotonic_start() + Duration::from_nanos(u64::try_from(at_ns).unwrap_or(0))
}

impl FolderActor {
    fn run(&mut self) {
        self.core.start(&mut self.io);
        let mut next_full = Instant::now() + self.jittered_interval();
        loop {
            let mut deadline = self
                .dirty
                .deadline()
                .map_or(next_full, |d| d.min(next_full));
            if let Some(due) = self.core.next_deadline() {
                deadline = deadline.min(instant_of(due));
            }
            let timeout = deadline.saturating_duration_since(Instant::now());
            let next = match self.io.deferred.pop_front() {
                Some(command) => Ok(command),
                None => self.io.receiver.recv_timeout(timeout),
            };
            match next {
                Ok(FolderCommand::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(FolderCommand::Scan { scope, reply }) => {
                    self.io.last_scan = None;
                    self.core.scan(&mut self.io, scope);
                    let result = self.io.last_scan.take().unwrap_or_else(|| ScanResult {
                        seen: 0,
                        changes: 0,
                        problems: vec![Problem {
                            path: ".".into(),
                            error: "the folder's local tree cannot be read from the store; see the node's log".into(),
                        }],
                    });
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
                Ok(FolderCommand::FileEvents { paths, change }) => self.mark_dirty(paths, change),
                Ok(FolderCommand::WatcherOverflow) => self.dirty.mark_full(Instant::now()),
                Ok(FolderCommand::PeerConnected(device)) => {
                    self.core
                        .peer_input(&mut self.io, PeerInput::Connected(device));
                }
                Ok(FolderCommand::PeerDisconnected(device)) => {
                    self.core
                        .peer_input(&mut self.io, PeerInput::Disconnected(device));
                }
                Ok(FolderCommand::ChangeSignatures(device, signed, _budget)) => {
                    self.core
                        .peer_input(&mut self.io, PeerInput::Signatures(device, signed));
                }
                Ok(FolderCommand::SyncMessagePart(device, bytes, _budget)) => {
                    self.core
                        .peer_input(&mut self.io, PeerInput::SyncPart(device, bytes));
                }
                Ok(FolderCommand::SyncMessage(device, bytes, _budget)) => {
                    self.core
                        .peer_input(&mut self.io, PeerInput::Sync(device, bytes));
                }
                Ok(FolderCommand::Fetched(results)) => self.core.fetched(&mut self.io, results),
                Ok(FolderCommand::Versions { path, reply }) => {
                    let _ = reply.send(versions(self.core.history(&path)));
                }
                Ok(FolderCommand::Restore {
                    path,
                    version,
                    to,
                    reply,
                }) => {
                    let ticket = self.io.ticket(reply);
                    self.core.restore(&mut self.io, path, version, to, ticket);
                }
                Ok(FolderCommand::UpdateRecord(record)) => {
                    let membership = membership(&record);
                    self.io.record = record;
                    self.core.set_membership(membership);
                }
                Ok(FolderCommand::SetAccess {
                    device,
                    role,
                    reply,
                }) => {
                    let ticket = self.io.ticket(reply);
                    self.core.peer_input(
                        &mut self.io,
                        PeerInput::Access {
                            device,
                            role,
                            ticket,
                        },
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            match self.dirty.take_due(now) {
                Some(Due::Full) => self.core.scan(&mut self.io, Scope::Full),
                Some(Due::Paths(paths)) => self.core.scan(&mut self.io, Scope::of(paths)),
                None => {}
            }
            self.core.tick(&mut self.io);
            if now >= next_full {
                self.core.full_scan(&mut self.io);
                if let Some(versions) = &self.settings.versions {
                    let pruned = versions.prune(self.settings.version_retention);
                    if pruned > 0 {
                        tracing::info!(folder = %self.io.record.id, pruned, "old versions pruned");
                    }
                }
                next_full = Instant::now() + self.jittered_interval();
            }
            self.core.after_changes(&mut self.io);
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
        let scanner = &self.io.scanner;
        for absolute in paths {
            match scanner.relative(&absolute) {
                Some(path) if !scanner.is_ignored(&path, false) => {
                    self.dirty.mark(path, change, now);
                }
                Some(_) => {}
                // The root itself (or an unusable name): only a full scan can tell.
                None if absolute == scanner.root() => self.dirty.mark_full(now),
                None => {}
            }
        }
    }
}

/// The versions of a path as `weft versions` lists them.
fn versions(history: Vec<document::Entry>) -> Vec<VersionInfo> {
    history
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
}
