//! The folder core's executor in the node: its disk is the folder on `std::fs`, its
//! store the node's redb [`Store`], its peers the libp2p network and the [`fetch`]er,
//! its scanner the [`Scanner`], its clock the wall clock, its reports `tracing`, the
//! event bus and the status the API shows.
//!
//! Every method carries out what the core asks, or reports why it could not; none
//! decides whether to act. Each directory an operation changes is noted and synced
//! before the next store commit ([`crate::dir_sync`]).
//!
//! [`fetch`]: crate::fetch

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use weft_core::engine::LocalEntry;
use weft_core::folder::Fetched;
use weft_core::io::{
    Clock, Commit, Counts, Disk, DownloadRequest, IoError, Level, PeerInput, Peers, Report, Scan,
    Store as CoreStore,
};
use weft_core::scan::{LocalChange, ScanOutcome, ScanRequest};
use weft_protocol::change_signature::SignedChange;
use weft_protocol::document::Entry;
use weft_protocol::sync_parts;
use weft_protocol::wire::{ChangeSignatures, MAX_SIGNED_CHANGES, Message};
use weft_protocol::{DeviceId, Manifest, ManifestHash, RelPath};

use super::{
    FolderCommand, FolderShared, FolderState, MAX_PROBLEMS_SHOWN, Network, ScanProgressView,
    ScanResult,
};
use crate::events::{Event, EventBus};
use crate::scan::{Scanner, Scope, now_ns};
use crate::store::{FolderRecord, Store};

/// A finished download's temp file.
#[derive(Debug)]
pub struct DownloadedTemp {
    /// Its path.
    pub path: PathBuf,
    /// The download made directories (in this run or an earlier one): its parents up
    /// to the root are synced before the commit that records it.
    pub new_dirs: bool,
}

/// The node's executor of one folder's core.
pub(super) struct NodeIo {
    /// This device.
    pub(super) device: DeviceId,
    pub(super) record: FolderRecord,
    pub(super) root: PathBuf,
    pub(super) store: Arc<Store>,
    /// Shared with the scan in progress only (see [`NodeIo::scan`]).
    pub(super) scanner: Arc<Scanner>,
    pub(super) network: Option<Network>,
    pub(super) sender: mpsc::Sender<FolderCommand>,
    pub(super) receiver: mpsc::Receiver<FolderCommand>,
    /// Commands received during a scan that wait for its end.
    pub(super) deferred: VecDeque<FolderCommand>,
    pub(super) versions: Option<crate::versions::VersionStore>,
    pub(super) temp_file_expiry: Duration,
    pub(super) shared: Arc<FolderShared>,
    pub(super) events: EventBus,
    /// Directories changed since the last commit, synced before the next one.
    pub(super) dirs: crate::dir_sync::PendingDirs,
    /// Replies of restores in progress, by ticket.
    pub(super) restores: HashMap<u64, mpsc::Sender<Result<String, String>>>,
    pub(super) next_ticket: u64,
    /// What the last scan found, for the command that asked for it.
    pub(super) last_scan: Option<ScanResult>,
}

impl NodeIo {
    fn absolute(&self, path: &RelPath) -> PathBuf {
        self.root.join(path.as_str())
    }

    /// A ticket for a restore whose outcome goes to `reply`.
    pub(super) fn ticket(&mut self, reply: mpsc::Sender<Result<String, String>>) -> u64 {
        self.next_ticket += 1;
        self.restores.insert(self.next_ticket, reply);
        self.next_ticket
    }
}

fn store_error(error: crate::store::StoreError) -> IoError {
    IoError::new(error)
}

impl Clock for NodeIo {
    fn now_ns(&self) -> i64 {
        now_ns()
    }

    fn monotonic_ns(&self) -> i64 {
        i64::try_from(monotonic_start().elapsed().as_nanos()).unwrap_or(i64::MAX)
    }
}

/// The start of the folder actors' monotonic clock ([`Clock::monotonic_ns`]).
pub(super) fn monotonic_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl Disk for NodeIo {
    type Temp = DownloadedTemp;

    fn lstat(&mut self, path: &RelPath) -> Result<Option<LocalEntry>, IoError> {
        let absolute = self.absolute(path);
        match std::fs::symlink_metadata(&absolute) {
            Ok(metadata) => {
                let target = metadata
                    .file_type()
                    .is_symlink()
                    .then(|| std::fs::read_link(&absolute).ok())
                    .flatten()
                    .and_then(|t| t.into_os_string().into_string().ok());
                Ok(Some(crate::scan::entry_from_metadata(&metadata, target)))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(IoError::new(error)),
        }
    }

    fn content_hash(&mut self, path: &RelPath) -> Option<ManifestHash> {
        let file = std::fs::File::open(self.absolute(path)).ok()?;
        weft_protocol::chunk::build_manifest(&file, &self.record.params, |_| {})
            .ok()
            .map(|manifest| manifest.hash())
    }

    fn non_directory_parent(&mut self, path: &RelPath) -> Option<RelPath> {
        let root = &self.root;
        let dir = crate::fetch::non_directory_parent(root, &root.join(path.as_str()))?;
        // Below `root` by construction; should it not read as a path of the folder, the
        // path is still refused, under the nearest parent.
        dir.strip_prefix(root)
            .ok()
            .and_then(|relative| relative.to_str())
            .and_then(|relative| RelPath::new(relative).ok())
            .or_else(|| path.parent())
    }

    fn is_directory_or_gone(&mut self, path: &RelPath) -> bool {
        match std::fs::symlink_metadata(self.absolute(path)) {
            Ok(metadata) => metadata.is_dir(),
            Err(error) => error.kind() == std::io::ErrorKind::NotFound,
        }
    }

    fn exists(&mut self, path: &RelPath) -> bool {
        std::fs::symlink_metadata(self.absolute(path)).is_ok()
    }

    fn remove_temp_files(&mut self, dir: &RelPath) {
        remove_temp_files(&self.absolute(dir));
    }

    fn remove_dir(&mut self, path: &RelPath) -> Result<(), IoError> {
        let absolute = self.absolute(path);
        self.dirs.changed_entry(&absolute);
        std::fs::remove_dir(&absolute).map_err(IoError::new)
    }

    fn remove_file(&mut self, path: &RelPath, size: u64) -> Result<(), IoError> {
        let absolute = self.absolute(path);
        self.dirs.changed_entry(&absolute);
        // A large file is freed off this thread (`release`).
        let held = crate::release::hold_if_large(&absolute, size);
        let removed = std::fs::remove_file(&absolute);
        if let Some(held) = held {
            crate::release::release_later(held);
        }
        removed.map_err(IoError::new)
    }

    fn discard_file(&mut self, path: &RelPath) {
        let _ = std::fs::remove_file(self.absolute(path));
    }

    fn create_dir(&mut self, path: &RelPath, mode: u32) -> Result<(), IoError> {
        let absolute = self.absolute(path);
        self.dirs.created_all(&self.root, &absolute);
        std::fs::create_dir_all(&absolute).map_err(IoError::new)?;
        if mode & 0o777 != 0 {
            use std::os::unix::fs::PermissionsExt;
            // Permission bits only: a peer's setuid, setgid and sticky bits never
            // reach the disk.
            let permissions = std::fs::Permissions::from_mode(mode & 0o777);
            if let Err(error) = std::fs::set_permissions(&absolute, permissions) {
                tracing::warn!(folder = %self.record.id, %path, %error, "cannot set the directory's mode");
            }
        }
        Ok(())
    }

    fn make_symlink(&mut self, path: &RelPath, target: &str) -> Result<(), IoError> {
        let absolute = self.absolute(path);
        let temp =
            absolute.with_file_name(format!("{}{}", weft_protocol::path::TEMP_PREFIX, now_ns()));
        if let Some(parent) = absolute.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        self.dirs.created_all(&self.root, &absolute);
        let made = std::os::unix::fs::symlink(target, &temp)
            .and_then(|()| std::fs::rename(&temp, &absolute));
        if made.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        made.map_err(IoError::new)
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<(), IoError> {
        let (from, to) = (self.absolute(from), self.absolute(to));
        self.dirs.changed_entry(&from);
        self.dirs.changed_entry(&to);
        std::fs::rename(&from, &to).map_err(IoError::new)
    }

    fn keep_version(
        &mut self,
        path: &RelPath,
        old: &Manifest,
        new: Option<&Manifest>,
    ) -> Result<(), IoError> {
        let Some(versions) = &self.versions else {
            return Ok(());
        };
        let still_present = new
            .map(|m| m.blocks().iter().map(|b| b.hash).collect())
            .unwrap_or_default();
        versions
            .keep_file(&self.absolute(path), old, &still_present)
            .map(|_| ())
            .map_err(IoError::new)
    }

    fn put_into_place(
        &mut self,
        temp: &DownloadedTemp,
        path: &RelPath,
        _entry: &Entry,
        replaces: Option<&LocalEntry>,
    ) -> Result<Option<LocalEntry>, IoError> {
        let absolute = self.absolute(path);
        if let Some(parent) = absolute.parent() {
            let missing = !parent.is_dir();
            if missing {
                let _ = std::fs::create_dir_all(parent);
            }
            // Directories made for the file here or by the download (`fetch`), in this
            // run or an earlier one: every parent up to the root is synced. (Syncing
            // them for every download cost ~0.4 s of a 3 s initial sync.)
            if missing || temp.new_dirs {
                self.dirs.created_all(&self.root, parent);
            }
        }
        // A large old version is freed off this thread (`release`).
        let held = replaces.and_then(|old| crate::release::hold_if_large(&absolute, old.size));
        let renamed = std::fs::rename(&temp.path, &absolute);
        if let Some(held) = held {
            crate::release::release_later(held);
        }
        // The temp file is in the same directory (`fetch::temp_path`).
        self.dirs.changed_entry(&absolute);
        renamed.map_err(IoError::new)?;
        Ok(std::fs::symlink_metadata(&absolute)
            .ok()
            .map(|metadata| crate::scan::entry_from_metadata(&metadata, None)))
    }

    fn discard_temp(&mut self, temp: DownloadedTemp) {
        let _ = std::fs::remove_file(&temp.path);
    }

    fn sync_dirs(&mut self) {
        self.dirs.sync();
    }
}

impl CoreStore for NodeIo {
    fn local(&self, path: &RelPath) -> Result<Option<LocalEntry>, IoError> {
        self.store.local(&self.record.id, path).map_err(store_error)
    }

    fn local_under(
        &self,
        under: Option<&RelPath>,
    ) -> Result<BTreeMap<RelPath, LocalEntry>, IoError> {
        self.store
            .local_under(&self.record.id, under)
            .map_err(store_error)
    }

    fn synced(&self, path: &RelPath) -> Result<Option<weft_core::engine::SyncedEntry>, IoError> {
        self.store
            .synced(&self.record.id, path)
            .map_err(store_error)
    }

    fn synced_paths(&self) -> Result<Vec<RelPath>, IoError> {
        self.store
            .synced_tree(&self.record.id)
            .map(|tree| tree.into_keys().collect())
            .map_err(store_error)
    }

    fn manifest(&self, hash: &ManifestHash) -> Option<Manifest> {
        self.store.manifest(hash).ok().flatten()
    }

    fn document(&self) -> Result<(Vec<u8>, Vec<Vec<u8>>), IoError> {
        self.store.document(&self.record.id).map_err(store_error)
    }

    fn change_signatures(&self) -> Result<Vec<SignedChange>, IoError> {
        self.store
            .change_signatures(&self.record.id)
            .map_err(store_error)
    }

    fn commit(&mut self, commit: Commit<'_>) -> Result<u64, IoError> {
        self.store
            .commit_scan_batch_with(
                &self.record.id,
                commit.changes,
                commit.synced,
                commit.increment,
                commit.racy,
            )
            .map_err(store_error)
    }

    fn compact(&mut self, snapshot: &[u8]) -> Result<(), IoError> {
        self.store
            .compact_document(&self.record.id, snapshot)
            .map_err(store_error)
    }

    fn put_change_signatures(&mut self, signed: &[SignedChange]) -> Result<(), IoError> {
        self.store
            .put_change_signatures(&self.record.id, signed)
            .map_err(store_error)
    }

    fn racy_paths(&self) -> Result<Vec<RelPath>, IoError> {
        self.store.racy_paths(&self.record.id).map_err(store_error)
    }

    fn clear_racy(&mut self, paths: &[RelPath]) -> Result<(), IoError> {
        self.store
            .clear_racy(&self.record.id, paths)
            .map_err(store_error)
    }
}

impl Peers for NodeIo {
    fn send_sync(
        &mut self,
        device: DeviceId,
        signatures: Vec<SignedChange>,
        message: Vec<u8>,
    ) -> bool {
        let Some(network) = &self.network else {
            return false;
        };
        let folder = &self.record.id;
        let signatures = signatures.chunks(MAX_SIGNED_CHANGES).map(|chunk| {
            Message::ChangeSignatures(ChangeSignatures {
                folder: folder.clone(),
                changes: chunk.to_vec(),
            })
        });
        for frame in signatures.chain(sync_parts::frames(folder, message)) {
            if let Err(error) = network.net.send(&device, frame) {
                tracing::debug!(%folder, %error, "sync message not sent");
                return false;
            }
        }
        true
    }

    fn disconnect(&mut self, device: DeviceId) {
        if let Some(network) = &self.network {
            network.net.disconnect(&device);
        }
    }

    fn is_connected(&self, device: &DeviceId) -> bool {
        self.network
            .as_ref()
            .is_some_and(|network| network.net.is_connected(device))
    }

    fn start_download(&mut self, group: Vec<DownloadRequest>, peers: Vec<DeviceId>) {
        let Some(network) = self.network.clone() else {
            return;
        };
        let context = crate::fetch::FetchContext {
            net: network.net.clone(),
            store: self.store.clone(),
            folder: self.record.id.clone(),
            root: self.root.clone(),
            peers,
            versions: self.versions.clone(),
        };
        let sender = self.sender.clone();
        network.runtime.spawn(async move {
            let ids: Vec<u64> = group.iter().map(|request| request.id).collect();
            let wanted = group
                .into_iter()
                .map(|request| (request.path, request.entry))
                .collect();
            let results = crate::fetch::fetch_files(context, wanted).await;
            let results = ids
                .into_iter()
                .zip(results)
                .map(|(id, result)| {
                    let result = result
                        .map_err(|error| error.to_string())
                        .map(|fetched| Fetched {
                            temp: DownloadedTemp {
                                path: fetched.temp,
                                new_dirs: fetched.new_dirs,
                            },
                            manifest: fetched.manifest,
                        });
                    (id, result)
                })
                .collect();
            let _ = sender.send(FolderCommand::Fetched(results));
        });
    }
}

impl Scan for NodeIo {
    fn scan(
        &mut self,
        request: ScanRequest<'_>,
        sink: &mut dyn FnMut(&mut Self, LocalChange, bool),
    ) -> ScanOutcome {
        let started = Instant::now();
        // Only a scan in progress holds another reference, and none is in progress.
        let ignore_problems = Arc::get_mut(&mut self.scanner)
            .map(Scanner::refresh_ignore)
            .unwrap_or_default();
        let full = matches!(request.scope, Scope::Full);
        let folder = self.record.id.to_string();
        self.shared.update(|s| s.state = FolderState::Scanning);
        self.events.publish(Event::ScanStarted {
            folder: folder.clone(),
            full,
        });
        let shared = self.shared.clone();
        let events = self.events.clone();
        let scanner = Arc::clone(&self.scanner);
        let (stop_ticker, ticker_stopped) = mpsc::channel::<()>();
        let summary = std::thread::scope(|threads| {
            let (shared, events, folder) = (&shared, &events, folder.clone());
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
            let summary = scanner.scan(
                request.scope,
                request.previous,
                request.rehash,
                &shared.progress,
                &mut |change, racy| sink(self, change, racy),
            );
            drop(stop_ticker);
            summary
        });
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let finished_ms = u64::try_from(now_ns() / 1_000_000).unwrap_or(0);
        let mut summary = summary;
        summary.problems.extend(ignore_problems);
        remove_abandoned_temp_files(&summary.temp_files, self.temp_file_expiry);
        let problems = summary.problems.clone();
        self.shared.update(|status| {
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
        self.events.publish(Event::ScanFinished {
            folder,
            seen: summary.seen,
            changes: summary.changes,
            problems: summary.problems.len() as u64,
            millis,
        });
        self.last_scan = Some(ScanResult {
            seen: summary.seen,
            changes: summary.changes,
            problems: summary.problems,
        });
        ScanOutcome { racy: summary.racy }
    }

    fn peer_input_during_scan(&mut self) -> Option<PeerInput> {
        if !self.deferred.is_empty() {
            return None;
        }
        let command = self.receiver.try_recv().ok()?;
        let input = match command {
            FolderCommand::PeerConnected(device) => PeerInput::Connected(device),
            FolderCommand::PeerDisconnected(device) => PeerInput::Disconnected(device),
            FolderCommand::ChangeSignatures(device, signed, _budget) => {
                PeerInput::Signatures(device, signed)
            }
            FolderCommand::SyncMessagePart(device, bytes, _budget) => {
                PeerInput::SyncPart(device, bytes)
            }
            FolderCommand::SyncMessage(device, bytes, _budget) => PeerInput::Sync(device, bytes),
            FolderCommand::UpdateRecord(record) => {
                let membership = super::membership(&record);
                self.record = record;
                PeerInput::Settings(membership)
            }
            // Sharing writes no file: it need not wait for the scan.
            FolderCommand::SetAccess {
                device,
                role,
                reply,
            } => PeerInput::Access {
                device,
                role,
                ticket: self.ticket(reply),
            },
            // Waits for the end of the scan, and so does everything after it, so that
            // no command overtakes another.
            other => {
                self.deferred.push_back(other);
                return None;
            }
        };
        Some(input)
    }
}

impl Report for NodeIo {
    fn access_changed(&mut self, list: &weft_protocol::access::AccessList) {
        let me = self.device;
        let role = list.role(&me);
        self.record.devices = list.members().filter(|(d, _)| *d != me).collect();
        self.record.mode = if role.is_some_and(weft_protocol::access::Role::can_edit) {
            crate::engine::FolderMode::SendReceive
        } else {
            crate::engine::FolderMode::ReceiveOnly
        };
        if let Err(error) = self.store.put_folder(&self.record) {
            tracing::error!(folder = %self.record.id, %error, "cannot record the folder's members");
        }
        self.shared.set_members(self.record.devices.clone());
        self.shared.update(|status| {
            status.role = role.map(|role| role.to_string());
        });
        tracing::info!(folder = %self.record.id, role = ?role, members = self.record.devices.len(), "access list changed");
    }

    fn refused(&mut self, device: DeviceId, error: &weft_protocol::access::AccessError) {
        tracing::warn!(folder = %self.record.id, %device, %error, "refused a change the device's role does not allow; it is flagged in `weft status`");
        let reason = error.to_string();
        self.shared.update(|status| {
            let id = device.to_string();
            let room = status.refused.len() < super::MAX_REFUSED_SHOWN;
            match status.refused.iter_mut().find(|r| r.device == id) {
                Some(known) => {
                    known.reason = reason;
                    known.count += 1;
                }
                None if room => {
                    status.refused.push(super::RefusedDevice {
                        device: id,
                        reason,
                        count: 1,
                    });
                }
                None => {}
            }
        });
    }

    fn log(&mut self, level: Level, message: std::fmt::Arguments<'_>) {
        let folder = &self.record.id;
        match level {
            Level::Debug => tracing::debug!(%folder, "{message}"),
            Level::Info => tracing::info!(%folder, "{message}"),
            Level::Warn => tracing::warn!(%folder, "{message}"),
            Level::Error => tracing::error!(%folder, "{message}"),
        }
    }

    fn local_change(&mut self, path: &RelPath, deleted: bool) {
        self.events.publish(Event::LocalChange {
            folder: self.record.id.to_string(),
            path: path.to_string(),
            action: if deleted {
                "deleted"
            } else {
                "created_or_modified"
            }
            .into(),
        });
    }

    fn counts(&mut self, counts: &Counts) {
        self.shared.update(|status| {
            status.files = counts.files;
            status.directories = counts.directories;
            status.symlinks = counts.symlinks;
            status.bytes = counts.bytes;
            status.need_files = counts.need_files;
            status.need_bytes = counts.need_bytes;
            status.local_only = counts.local_only.iter().map(RelPath::to_string).collect();
            if status.state != FolderState::Scanning {
                status.state = if counts.need_files > 0 {
                    FolderState::Syncing
                } else {
                    FolderState::Idle
                };
            }
        });
    }

    fn scan_failed(&mut self, error: &IoError) {
        self.shared.update(|s| s.state = FolderState::Error);
        self.last_scan = Some(ScanResult {
            seen: 0,
            changes: 0,
            problems: vec![super::Problem {
                path: ".".into(),
                error: format!("the folder's local tree cannot be read from the store: {error}"),
            }],
        });
    }

    fn restored(&mut self, ticket: u64, result: Result<String, String>) {
        if let Some(reply) = self.restores.remove(&ticket) {
            let _ = reply.send(result);
        }
    }

    fn access_set(&mut self, ticket: u64, result: Result<String, String>) {
        self.restored(ticket, result);
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
fn remove_temp_files(dir: &Path) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
