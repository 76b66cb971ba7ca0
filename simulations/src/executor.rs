//! The folder core's executor in the simulation: its disk is the virtual [`Disk`]
//! (with faults: a roll decides whether an operation fails), its store the [`Store`]
//! (what the node's redb store holds: each commit is one transaction), its peers the
//! simulated network (messages in [`SimIo::outbox`], block transfers in
//! [`crate::transfer`]), its clock the simulation's.
//!
//! Every method carries out what the core asks or reports why it could not; none
//! decides whether to act. A device that hit its crash point refuses every operation,
//! so nothing after the crash reaches the disk or the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use weft_core::engine::{self, LocalEntry, SyncedEntry};
use weft_core::io::{
    self, Clock, Commit, Counts, DownloadRequest, IoError, Level, PeerInput, Peers, Report, Scan,
};
use weft_core::racy::is_racy;
use weft_core::scan::{LocalChange, ScanOutcome, ScanRequest};
use weft_protocol::change_signature::SignedChange;
use weft_protocol::document::Entry;
use weft_protocol::path::TEMP_PREFIX;
use weft_protocol::{BlockHash, BlockRef, DeviceId, DeviceKey, Manifest, ManifestHash, RelPath};

use crate::disk::{Disk, DiskError, Node, is_temp, parent};
use crate::message::Msg;
use crate::rng::Rng;
use crate::transfer::Transfers;

/// Block size of simulated files (fixed-size blocks keep files small and many-block).
pub const BLOCK: usize = 32;
/// Document increments after which the store's document is compacted: sooner than the
/// node (256), which keeps reloads after crashes cheap (the document is the same).
pub const COMPACT_AFTER: u64 = 32;

/// The manifest of `data` in fixed [`BLOCK`]-byte blocks.
pub fn manifest_of(data: &[u8]) -> Manifest {
    let blocks: Vec<BlockRef> = data
        .chunks(BLOCK)
        .map(|chunk| BlockRef {
            hash: BlockHash::of(chunk),
            len: chunk.len() as u32,
        })
        .collect();
    Manifest::from_blocks(blocks).unwrap_or_else(|_| Manifest::empty())
}

/// A deliberately broken executor, to show that the invariants catch real bugs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sabotage {
    /// The executor as it should be.
    #[default]
    None,
    /// Skip the pre-replace check (act on a disk that changed since the scan).
    NoPreReplaceCheck,
    /// Never keep replaced versions.
    NoVersionStore,
    /// Trust a racily clean file's metadata: never hash it again, nor check its bytes
    /// before replacing it.
    NoRacyCheck,
    /// Never sync a directory before a store commit: a power loss can undo a rename
    /// the store has recorded.
    NoDirSync,
    /// Take every received change without checking its author's role against the
    /// access list.
    NoAccessCheck,
}

/// What the node's redb store holds for the folder (survives crashes).
#[derive(Clone, Debug, Default)]
pub struct Store {
    /// The document as saved increments, in order (a compaction leaves one snapshot).
    pub increments: Vec<Vec<u8>>,
    /// The local tree: what the scanner last recorded.
    pub local: BTreeMap<RelPath, LocalEntry>,
    /// The synced tree.
    pub synced: BTreeMap<RelPath, SyncedEntry>,
    /// Manifests by hash.
    pub manifests: BTreeMap<ManifestHash, Manifest>,
    /// The version store: old contents by manifest hash.
    pub versions: BTreeMap<ManifestHash, Vec<u8>>,
    /// Document increments committed, ever (compaction does not reset it).
    pub commits: u64,
    /// Download progress: verified block indexes per temp file.
    pub progress: BTreeMap<String, BTreeSet<usize>>,
    /// Paths whose local rows are racily clean (the `racy` table).
    pub racy: BTreeSet<RelPath>,
    /// Signatures of document changes, by change hash.
    pub signatures: BTreeMap<[u8; 32], SignedChange>,
}

/// A finished download's temp file on the virtual disk.
#[derive(Clone, Debug)]
pub struct SimTemp(pub(crate) String);

/// The executor of one device's folder core over the virtual disk and network.
pub struct SimIo {
    /// Index in the world.
    pub index: usize,
    /// Device ID.
    pub id: DeviceId,
    /// Devices the folder is shared with (accepted).
    pub members: BTreeSet<DeviceId>,
    /// Whether this device publishes its local changes.
    pub mode: engine::FolderMode,
    /// The device that created the folder (device 0).
    pub founder: DeviceId,
    /// The folder's access list as this device last read it.
    pub access: weft_protocol::access::AccessList,
    /// Sync messages this device refused for a change its author's role did not allow.
    pub refused: u64,
    /// The folder on disk.
    pub disk: Disk,
    /// The durable store.
    pub store: Store,
    /// Running (not crashed).
    pub up: bool,
    /// Set by the world: crash right after the next download is renamed into place,
    /// before the store records it.
    pub crash_after_rename: bool,
    /// The armed crash point was hit.
    pub crashed: bool,
    /// A bug planted on purpose (tests of the checker).
    pub sabotage: Sabotage,
    /// Bad blocks received per peer.
    pub bad_blocks: BTreeMap<DeviceId, u64>,
    /// Messages to send.
    pub outbox: Vec<(DeviceId, Msg)>,
    /// Devices whose connections to close (the world cuts the link, which comes back a
    /// moment later).
    pub disconnects: Vec<DeviceId>,
    /// Notable events for the trace.
    pub log: Vec<String>,
    /// Paths the watcher reported since the last scan.
    pub dirty: BTreeSet<RelPath>,
    /// Connected members.
    pub(crate) connected: BTreeSet<DeviceId>,
    /// Block transfers in progress.
    pub(crate) transfers: Transfers,
    pub(crate) now: i64,
    rng: Rng,
    pub(crate) key: Arc<DeviceKey>,
    pub(crate) actor_suffix: [u8; 8],
}

/// Until the world names the founder: nobody's (a key no device has).
fn key_id_placeholder() -> DeviceId {
    DeviceKey::from_secret_bytes([0; 32]).device_id()
}

fn disk_error(error: DiskError) -> IoError {
    IoError::new(format!("{error:?}"))
}

fn crashed() -> IoError {
    IoError::new("the device crashed")
}

impl SimIo {
    /// The executor of device `index`, with an empty disk and store.
    pub fn new(index: usize, key: DeviceKey, actor_suffix: [u8; 8], rng: Rng) -> Self {
        Self {
            index,
            id: key.device_id(),
            key: Arc::new(key),
            actor_suffix,
            members: BTreeSet::new(),
            mode: engine::FolderMode::SendReceive,
            founder: key_id_placeholder(),
            access: Default::default(),
            refused: 0,
            disk: Disk::new((index as u64 + 1) << 40),
            store: Store::default(),
            up: false,
            crash_after_rename: false,
            crashed: false,
            sabotage: Sabotage::None,
            bad_blocks: BTreeMap::new(),
            outbox: Vec::new(),
            disconnects: Vec::new(),
            log: Vec::new(),
            dirty: BTreeSet::new(),
            connected: BTreeSet::new(),
            transfers: Transfers::default(),
            now: 0,
            rng,
        }
    }

    pub(crate) fn roll(&mut self) -> u64 {
        self.rng.below(100)
    }

    pub(crate) fn note(&mut self, text: String) {
        self.log.push(text);
    }

    pub(crate) fn non_directory_parent_of(&self, path: &RelPath) -> Option<RelPath> {
        let mut at = path.parent();
        while let Some(dir) = at {
            match self.disk.get(dir.as_str()) {
                Some(Node::Dir) | None => {}
                Some(_) => return Some(dir),
            }
            at = dir.parent();
        }
        None
    }
}

impl Clock for SimIo {
    fn now_ns(&self) -> i64 {
        self.now
    }

    fn monotonic_ns(&self) -> i64 {
        self.now
    }
}

impl io::Disk for SimIo {
    type Temp = SimTemp;

    fn lstat(&mut self, path: &RelPath) -> Result<Option<LocalEntry>, IoError> {
        Ok(self.disk.lstat(path.as_str()))
    }

    fn unchanged_since_plan(&mut self, path: &RelPath, expected: Option<&LocalEntry>) -> bool {
        if self.sabotage == Sabotage::NoPreReplaceCheck {
            return true;
        }
        engine::disk_unchanged(self.disk.lstat(path.as_str()).as_ref(), expected)
    }

    fn content_hash(&mut self, path: &RelPath) -> Option<ManifestHash> {
        if self.sabotage == Sabotage::NoRacyCheck {
            return self.store.local.get(path).and_then(|row| row.manifest);
        }
        self.disk
            .read(path.as_str())
            .map(|data| manifest_of(data).hash())
    }

    fn non_directory_parent(&mut self, path: &RelPath) -> Option<RelPath> {
        self.non_directory_parent_of(path)
    }

    fn is_directory_or_gone(&mut self, path: &RelPath) -> bool {
        matches!(self.disk.get(path.as_str()), Some(Node::Dir) | None)
    }

    fn exists(&mut self, path: &RelPath) -> bool {
        self.disk.get(path.as_str()).is_some()
    }

    fn remove_temp_files(&mut self, dir: &RelPath) {
        if !self.crashed {
            self.disk.remove_temp_files(dir.as_str());
        }
    }

    fn remove_dir(&mut self, path: &RelPath) -> Result<(), IoError> {
        if self.crashed {
            return Err(crashed());
        }
        let roll = self.roll();
        self.disk
            .remove_dir(path.as_str(), roll, true)
            .map_err(disk_error)
    }

    fn remove_file(&mut self, path: &RelPath, _size: u64) -> Result<(), IoError> {
        if self.crashed {
            return Err(crashed());
        }
        let roll = self.roll();
        self.disk
            .remove_file(path.as_str(), roll, true)
            .map_err(disk_error)
    }

    fn discard_file(&mut self, path: &RelPath) {
        if !self.crashed {
            let roll = self.roll();
            let _ = self.disk.remove_file(path.as_str(), roll, true);
        }
    }

    fn create_dir(&mut self, path: &RelPath, _mode: u32) -> Result<(), IoError> {
        if self.crashed {
            return Err(crashed());
        }
        let roll = self.roll();
        self.disk
            .create_dir_all(path.as_str(), roll, true)
            .map_err(disk_error)
    }

    fn make_symlink(&mut self, path: &RelPath, target: &str) -> Result<(), IoError> {
        if self.crashed {
            return Err(crashed());
        }
        let temp = temp_beside(path, &format!("{}", self.now));
        let roll = self.roll();
        if let Some(dir) = parent(path.as_str()) {
            let _ = self.disk.create_dir_all(dir, roll, true);
        }
        let roll2 = self.roll();
        let made = self
            .disk
            .symlink(target, &temp, roll, true)
            .and_then(|()| self.disk.rename(&temp, path.as_str(), roll2, true));
        if made.is_err() {
            let _ = self.disk.remove_file(&temp, 100, true);
        }
        made.map_err(disk_error)
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<(), IoError> {
        if self.crashed {
            return Err(crashed());
        }
        let roll = self.roll();
        self.disk
            .rename(from.as_str(), to.as_str(), roll, true)
            .map_err(disk_error)
    }

    fn keep_version(
        &mut self,
        path: &RelPath,
        old: &Manifest,
        _new: Option<&Manifest>,
    ) -> Result<(), IoError> {
        if self.sabotage == Sabotage::NoVersionStore {
            return Ok(());
        }
        let hash = old.hash();
        let Some(data) = self.disk.read(path.as_str()) else {
            return Ok(());
        };
        if manifest_of(data).hash() != hash {
            return Ok(());
        }
        if self.disk.full || self.crashed {
            return Err(IoError::new("disk full"));
        }
        let data = data.to_vec();
        self.store.versions.insert(hash, data);
        Ok(())
    }

    fn put_into_place(
        &mut self,
        temp: &SimTemp,
        path: &RelPath,
        entry: &Entry,
        _replaces: Option<&LocalEntry>,
    ) -> Result<Option<LocalEntry>, IoError> {
        if self.crashed {
            return Err(crashed());
        }
        if let Some(dir) = parent(path.as_str()) {
            let roll = self.roll();
            let _ = self.disk.create_dir_all(dir, roll, true);
        }
        let mode = if entry.mode & 0o777 == 0 {
            0o644
        } else {
            entry.mode & 0o777
        };
        self.disk.set_times(&temp.0, mode, entry.mtime_ns);
        let roll = self.roll();
        self.disk
            .rename(&temp.0, path.as_str(), roll, true)
            .map_err(disk_error)?;
        self.store.progress.remove(&temp.0);
        if self.crash_after_rename {
            self.crashed = true;
            self.note(format!(
                "crash point: {path} renamed into place, not recorded"
            ));
            return Err(crashed());
        }
        Ok(self.disk.lstat(path.as_str()))
    }

    fn discard_temp(&mut self, temp: SimTemp) {
        if !self.crashed {
            let _ = self.disk.remove_file(&temp.0, 100, true);
            self.store.progress.remove(&temp.0);
        }
    }

    fn sync_dirs(&mut self) {
        if self.sabotage != Sabotage::NoDirSync && !self.crashed {
            self.disk.sync_dirs();
        }
    }
}

impl io::Store for SimIo {
    fn local(&self, path: &RelPath) -> Result<Option<LocalEntry>, IoError> {
        Ok(self.store.local.get(path).cloned())
    }

    fn local_under(
        &self,
        under: Option<&RelPath>,
    ) -> Result<BTreeMap<RelPath, LocalEntry>, IoError> {
        Ok(self
            .store
            .local
            .iter()
            .filter(|(path, _)| under.is_none_or(|under| path.starts_with(under)))
            .map(|(path, entry)| (path.clone(), entry.clone()))
            .collect())
    }

    fn synced(&self, path: &RelPath) -> Result<Option<SyncedEntry>, IoError> {
        Ok(self.store.synced.get(path).cloned())
    }

    fn synced_paths(&self) -> Result<Vec<RelPath>, IoError> {
        Ok(self.store.synced.keys().cloned().collect())
    }

    fn manifest(&self, hash: &ManifestHash) -> Option<Manifest> {
        self.store.manifests.get(hash).cloned()
    }

    fn document(&self) -> Result<(Vec<u8>, Vec<Vec<u8>>), IoError> {
        Ok((Vec::new(), self.store.increments.clone()))
    }

    fn change_signatures(&self) -> Result<Vec<SignedChange>, IoError> {
        Ok(self.store.signatures.values().copied().collect())
    }

    fn commit(&mut self, commit: Commit<'_>) -> Result<u64, IoError> {
        if self.crashed {
            return Err(crashed());
        }
        if self.disk.full {
            return Err(IoError::new("disk full"));
        }
        for change in commit.changes {
            match change {
                LocalChange::Upsert {
                    path,
                    entry,
                    manifest,
                } => {
                    if let Some(manifest) = manifest {
                        self.store
                            .manifests
                            .insert(manifest.hash(), manifest.clone());
                    }
                    self.store.local.insert(path.clone(), entry.clone());
                }
                LocalChange::Remove { path } => {
                    self.store.racy.remove(path);
                    self.store.local.remove(path);
                }
            }
        }
        self.store.racy.extend(commit.racy.iter().cloned());
        for (path, synced) in commit.synced {
            match synced {
                Some(synced) => {
                    self.store.synced.insert(path.clone(), synced.clone());
                }
                None => {
                    self.store.synced.remove(path);
                }
            }
        }
        if !commit.increment.is_empty() {
            self.store.increments.push(commit.increment.to_vec());
            self.store.commits += 1;
        }
        Ok(self.store.increments.len() as u64)
    }

    fn compact(&mut self, snapshot: &[u8]) -> Result<(), IoError> {
        if self.crashed {
            return Err(crashed());
        }
        self.store.increments = vec![snapshot.to_vec()];
        Ok(())
    }

    fn put_change_signatures(&mut self, signed: &[SignedChange]) -> Result<(), IoError> {
        if self.crashed {
            return Err(crashed());
        }
        self.store
            .signatures
            .extend(signed.iter().map(|s| (s.hash, *s)));
        Ok(())
    }

    fn racy_paths(&self) -> Result<Vec<RelPath>, IoError> {
        if self.sabotage == Sabotage::NoRacyCheck {
            return Ok(Vec::new());
        }
        Ok(self.store.racy.iter().cloned().collect())
    }

    fn clear_racy(&mut self, paths: &[RelPath]) -> Result<(), IoError> {
        if self.crashed {
            return Err(crashed());
        }
        for path in paths {
            self.store.racy.remove(path);
        }
        Ok(())
    }
}

impl Peers for SimIo {
    fn check_access(&self) -> bool {
        self.sabotage != Sabotage::NoAccessCheck
    }

    fn send_sync(
        &mut self,
        device: DeviceId,
        signatures: Vec<SignedChange>,
        message: Vec<u8>,
    ) -> bool {
        self.outbox.push((
            device,
            Msg::DocSync {
                signatures,
                message,
            },
        ));
        true
    }

    fn disconnect(&mut self, device: DeviceId) {
        self.note(format!("disconnecting {}", device.short()));
        self.disconnects.push(device);
    }

    fn is_connected(&self, device: &DeviceId) -> bool {
        self.connected.contains(device)
    }

    fn start_download(&mut self, group: Vec<DownloadRequest>, peers: Vec<DeviceId>) {
        self.start_task(group, peers);
    }
}

impl Scan for SimIo {
    fn scan(
        &mut self,
        request: ScanRequest<'_>,
        sink: &mut dyn FnMut(&mut Self, LocalChange, bool),
    ) -> ScanOutcome {
        if self.crashed {
            return ScanOutcome::default();
        }
        let trust_metadata = self.sabotage == Sabotage::NoRacyCheck;
        let mut changes = Vec::new();
        let mut seen = BTreeSet::new();
        let mut outcome = ScanOutcome::default();
        for (text, node) in self.disk.nodes() {
            if is_temp(text) {
                continue;
            }
            let Ok(path) = RelPath::new(text) else {
                continue;
            };
            if !request.scope.covers(&path) {
                continue;
            }
            seen.insert(path.clone());
            let Some(mut entry) = self.disk.lstat(text) else {
                continue;
            };
            let previous = request.previous.get(&path);
            if let Some(old) = previous
                && engine::metadata_unchanged(old, &entry)
                && (trust_metadata || !request.rehash.contains(&path))
            {
                continue;
            }
            let manifest = match node {
                Node::File { data, .. } => {
                    let manifest = manifest_of(data);
                    entry.manifest = Some(manifest.hash());
                    Some(manifest)
                }
                _ => None,
            };
            let racy = !trust_metadata && manifest.is_some() && is_racy(entry.mtime_ns, self.now);
            if racy {
                outcome
                    .racy
                    .push((path.clone(), weft_core::racy::racy_window(entry.mtime_ns)));
            }
            // A racy file hashed again to the same content is no change.
            if previous == Some(&entry) {
                continue;
            }
            changes.push((
                LocalChange::Upsert {
                    path,
                    entry,
                    manifest,
                },
                racy,
            ));
        }
        for path in request.previous.keys() {
            if !seen.contains(path) {
                changes.push((LocalChange::Remove { path: path.clone() }, false));
            }
        }
        for (change, racy) in changes {
            sink(self, change, racy);
        }
        outcome
    }

    fn peer_input_during_scan(&mut self) -> Option<PeerInput> {
        None
    }
}

impl Report for SimIo {
    fn log(&mut self, _level: Level, message: std::fmt::Arguments<'_>) {
        self.log.push(message.to_string());
    }

    fn local_change(&mut self, path: &RelPath, deleted: bool) {
        let what = if deleted { "deletion" } else { "version" };
        self.note(format!("{path}: published the local {what}"));
    }

    fn counts(&mut self, _counts: &Counts) {}

    fn scan_failed(&mut self, error: &IoError) {
        self.note(format!("scan failed: {error}"));
    }

    fn restored(&mut self, ticket: u64, result: Result<String, String>) {
        self.note(format!("restore {ticket}: {result:?}"));
    }

    fn access_set(&mut self, _ticket: u64, _result: Result<String, String>) {}

    fn access_changed(&mut self, list: &weft_protocol::access::AccessList) {
        let roles: Vec<String> = list
            .members()
            .map(|(device, role)| format!("{}={role}", &device.to_string()[..4]))
            .collect();
        self.note(format!("access list: {}", roles.join(" ")));
        self.access = list.clone();
    }

    fn refused(&mut self, device: DeviceId, error: &weft_protocol::access::AccessError) {
        self.refused += 1;
        self.note(format!(
            "refused a change from {}: {error}",
            &device.to_string()[..4]
        ));
    }
}

fn temp_beside(path: &RelPath, name: &str) -> String {
    match parent(path.as_str()) {
        Some(dir) => format!("{dir}/{TEMP_PREFIX}{name}"),
        None => format!("{TEMP_PREFIX}{name}"),
    }
}
