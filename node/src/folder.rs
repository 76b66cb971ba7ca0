//! The folder actor: one thread per folder that owns its scanner, its document and its
//! share of the store, and turns scans into committed local changes.
//!
//! Commands arrive on a channel ([`FolderHandle`]): scan requests from the API, file
//! events from the watcher, shutdown. File events only mark paths dirty; after a quiet
//! time (`debounce_ms`, at most [`MAX_DEBOUNCE_FACTOR`] times that after the first event)
//! the dirty paths are rescanned. More than [`MAX_DIRTY_PATHS`] dirty paths, or a watcher
//! overflow, fall back to a full scan, as does the periodic full rescan.
//!
//! Every batch of changes becomes one document change and one store transaction
//! ([`crate::store::Store::commit_scan_batch`]), so a crash loses at most the batch in
//! flight, and the rescan after restart redoes exactly that.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use weft_protocol::document::{self, Content, Entry, EntryKind, FolderDocument};
use weft_protocol::{DeviceId, FolderId, RelPath};

use crate::events::{Event, EventBus};
use crate::scan::{Problem, ScanProgress, Scanner, Scope};
use crate::store::{FolderRecord, LocalChange, LocalEntry, Store, StoreError};

/// Dirty paths beyond which a full scan is cheaper than a scan of each path.
pub const MAX_DIRTY_PATHS: usize = 10_000;
/// A burst of events delays its scan by at most this many debounce periods.
pub const MAX_DEBOUNCE_FACTOR: u32 = 5;
/// Changes per store transaction during a scan (also committed at least every second).
pub const BATCH_CHANGES: usize = 2_000;
/// Longest wait before a pending batch is committed.
pub const BATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Problems kept in the status (the most recent scan's first ones).
pub const MAX_PROBLEMS_SHOWN: usize = 100;

/// Settings a folder actor needs from the node config.
#[derive(Clone, Debug)]
pub struct FolderSettings {
    /// Quiet time after file events before rescanning.
    pub debounce: Duration,
    /// Interval between full rescans.
    pub full_rescan_interval: Duration,
    /// Watch the filesystem.
    pub watch: bool,
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
    /// The watcher saw these absolute paths change.
    FileEvents(Vec<PathBuf>),
    /// The watcher lost events; rescan everything.
    WatcherOverflow,
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

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Starts the actor of `record`: loads its document and runs a first full scan.
pub fn start(
    record: FolderRecord,
    store: Arc<Store>,
    device: DeviceId,
    settings: FolderSettings,
    events: EventBus,
) -> Result<FolderHandle, FolderError> {
    let (snapshot, increments) = store.document(&record.id)?;
    let actor = document::actor_id(&device, store.actor_suffix());
    let document = FolderDocument::load(&snapshot, increments.iter().map(Vec::as_slice), actor)
        .map_err(|source| FolderError::Document {
            folder: record.id.clone(),
            source,
        })?;
    let (scanner, ignore_problems) = Scanner::new(PathBuf::from(&record.path), record.params);
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
        scanner,
        recorder: Recorder {
            folder: record.id.clone(),
            store,
            document,
            device,
            events,
            shared: shared.clone(),
        },
        settings,
        receiver,
        dirty: BTreeSet::new(),
        overflow: false,
        first_dirty: None,
        last_event: None,
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

struct FolderActor {
    scanner: Scanner,
    recorder: Recorder,
    settings: FolderSettings,
    receiver: mpsc::Receiver<FolderCommand>,
    dirty: BTreeSet<RelPath>,
    overflow: bool,
    first_dirty: Option<Instant>,
    last_event: Option<Instant>,
    _watcher: Option<crate::watch::Watcher>,
}

impl FolderActor {
    fn run(&mut self) {
        self.scan(Scope::Full);
        let mut next_full = Instant::now() + self.jittered_interval();
        loop {
            let deadline = self
                .dirty_deadline()
                .map_or(next_full, |d| d.min(next_full));
            let timeout = deadline.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(timeout) {
                Ok(FolderCommand::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(FolderCommand::Scan { scope, reply }) => {
                    let result = self.scan(scope);
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
                Ok(FolderCommand::FileEvents(paths)) => self.mark_dirty(paths),
                Ok(FolderCommand::WatcherOverflow) => {
                    self.overflow = true;
                    self.touch();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if self.dirty_deadline().is_some_and(|d| d <= now) {
                let scope = if self.overflow {
                    Scope::Full
                } else {
                    Scope::Paths(collapse(std::mem::take(&mut self.dirty)))
                };
                self.dirty.clear();
                self.overflow = false;
                self.first_dirty = None;
                self.last_event = None;
                self.scan(scope);
            }
            if now >= next_full {
                self.scan(Scope::Full);
                next_full = Instant::now() + self.jittered_interval();
            }
        }
    }

    fn jittered_interval(&self) -> Duration {
        // +-10% so that many folders (and devices) do not rescan in lockstep.
        let mut random = [0u8; 2];
        let _ = getrandom::fill(&mut random);
        let factor = 0.9 + f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX) * 0.2;
        self.settings.full_rescan_interval.mul_f64(factor)
    }

    fn touch(&mut self) {
        let now = Instant::now();
        self.first_dirty.get_or_insert(now);
        self.last_event = Some(now);
    }

    fn dirty_deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first_dirty?, self.last_event?);
        let quiet = last + self.settings.debounce;
        let cap = first + self.settings.debounce * MAX_DEBOUNCE_FACTOR;
        Some(quiet.min(cap))
    }

    fn mark_dirty(&mut self, paths: Vec<PathBuf>) {
        for absolute in paths {
            match self.scanner.relative(&absolute) {
                Some(path) if !self.scanner.is_ignored(&path, false) => {
                    self.dirty.insert(path);
                }
                Some(_) => {}
                // The root itself (or an unusable name): only a full scan can tell.
                None if absolute == self.scanner.root() => self.overflow = true,
                None => {}
            }
        }
        if self.dirty.len() > MAX_DIRTY_PATHS {
            self.overflow = true;
            self.dirty.clear();
        }
        if !self.dirty.is_empty() || self.overflow {
            self.touch();
        }
    }

    fn scan(&mut self, scope: Scope) -> ScanResult {
        let started = Instant::now();
        let ignore_problems = self.scanner.refresh_ignore();
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
            let mut last_commit = Instant::now();
            let recorder = &mut self.recorder;
            let summary = self
                .scanner
                .scan(&scope, &previous, &shared.progress, &mut |change| {
                    batch.push(change);
                    if batch.len() >= BATCH_CHANGES || last_commit.elapsed() >= BATCH_INTERVAL {
                        recorder.commit(std::mem::take(&mut batch), &previous);
                        last_commit = Instant::now();
                    }
                });
            self.recorder.commit(batch, &previous);
            drop(stop_ticker);
            summary
        });
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let finished_ms = u64::try_from(now_ns() / 1_000_000).unwrap_or(0);
        let mut summary = summary;
        summary.problems.extend(ignore_problems);
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
    events: EventBus,
    shared: Arc<FolderShared>,
}

impl Recorder {
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
            } => {
                let content = match (entry.kind, manifest, &entry.symlink_target) {
                    (EntryKind::File, Some(manifest), _) => Content::for_manifest(manifest),
                    (EntryKind::Symlink, _, Some(target)) => Content::Symlink(target.clone()),
                    _ => Content::None,
                };
                Some((
                    path.clone(),
                    Entry {
                        kind: entry.kind,
                        deleted: false,
                        size: entry.size,
                        mtime_ns: entry.mtime_ns,
                        mode: entry.mode,
                        content,
                        author: self.device,
                    },
                ))
            }
            LocalChange::Remove { path } => {
                let current = self.document.get(path).ok().flatten()?;
                if current.deleted {
                    return None;
                }
                Some((
                    path.clone(),
                    Entry {
                        kind: current.kind,
                        deleted: true,
                        size: 0,
                        mtime_ns: now,
                        mode: 0,
                        content: Content::None,
                        author: self.device,
                    },
                ))
            }
        }
    }

    /// Commits a batch. On failure the document is reloaded from the store so that it
    /// never holds changes the store does not (the next scan finds them again).
    fn commit(
        &mut self,
        batch: Vec<LocalChange>,
        previous: &std::collections::BTreeMap<RelPath, LocalEntry>,
    ) {
        if batch.is_empty() {
            return;
        }
        let now = now_ns();
        let mut recorded = Vec::new();
        for change in &batch {
            let Some((path, entry)) = self.entry_for(change, now) else {
                continue;
            };
            // Same as the document already says (metadata-only change): no new version.
            if self.document.get(&path).ok().flatten().as_ref() == Some(&entry) {
                continue;
            }
            if let Err(error) = self.document.put(&path, &entry) {
                tracing::error!(folder = %self.folder, %path, %error, "document write failed");
                continue;
            }
            recorded.push((path, entry.deleted));
        }
        self.document.commit(now / 1_000_000, "local changes");
        let increment = self.document.save_incremental();
        match self
            .store
            .commit_scan_batch(&self.folder, &batch, &increment)
        {
            Ok(increments) => {
                if increments >= crate::store::DOC_INCREMENTS_BEFORE_COMPACTION {
                    let snapshot = self.document.save();
                    if let Err(error) = self.store.compact_document(&self.folder, &snapshot) {
                        tracing::warn!(folder = %self.folder, %error, "document compaction failed");
                    }
                }
            }
            Err(error) => {
                tracing::error!(folder = %self.folder, %error, "committing scan results failed; will rescan");
                self.reload_document();
                return;
            }
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

    fn reload_document(&mut self) {
        let actor = document::actor_id(&self.device, self.store.actor_suffix());
        match self.store.document(&self.folder) {
            Ok((snapshot, increments)) => {
                match FolderDocument::load(&snapshot, increments.iter().map(Vec::as_slice), actor) {
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
}
