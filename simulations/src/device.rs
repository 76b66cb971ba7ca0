//! One simulated device: the folder core ([`weft_core::Folder`]), the same code the
//! node runs, over a virtual disk, store and network.
//!
//! Every decision is the core's. This module is only its executor: [`SimIo`]
//! implements the core's traits over the virtual [`Disk`] (with faults: a roll decides
//! whether an operation fails), the [`Store`] (what the node's redb store holds: each
//! [`weft_core::io::Store::commit`] is one transaction), the simulated network (sync
//! messages and block requests in [`Device::outbox`]), and the simulation's clock. Block
//! transfers (the node's `fetch`) are modelled here: local copies first, then peers,
//! each block verified, resumable through a temp file whose verified blocks are
//! committed.
//!
//! A crash ([`Device::crash`]) drops everything but the store and the disk; the core
//! is opened again from the store by [`Device::start`], as the node does after
//! `kill -9`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use weft_core::engine::{self, LocalEntry, Remote, SyncedEntry, remote_of};
use weft_core::folder::{Fetched, Folder, FolderSettings, Membership};
use weft_core::io::{
    self, Clock, Commit, Counts, DownloadRequest, IoError, Level, PeerInput, Peers, Report, Scan,
};
use weft_core::racy::is_racy;
use weft_core::scan::{LocalChange, ScanOutcome, ScanRequest, Scope};
use weft_protocol::change_signature::SignedChange;
use weft_protocol::document::{Content, Entry, FolderDocument};
use weft_protocol::path::TEMP_PREFIX;
use weft_protocol::{BlockHash, BlockRef, DeviceId, DeviceKey, Manifest, ManifestHash, RelPath};

use crate::disk::{Disk, DiskError, Node, is_temp, parent};
use crate::rng::Rng;

/// Block size of simulated files (fixed-size blocks keep files small and many-block).
pub const BLOCK: usize = 32;
/// Blocks asked for in one request: the node's own number.
pub const BATCH_BLOCKS: usize = weft_node::fetch::BATCH_BLOCKS;
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

/// Messages between devices. `DocSync` rides the ordered control stream; the others
/// are block-stream requests and answers.
#[derive(Clone, Debug)]
pub enum Msg {
    /// An automerge sync message and the signatures of the changes it carries.
    DocSync {
        /// The authors' signatures.
        signatures: Vec<SignedChange>,
        /// The sync message.
        message: Vec<u8>,
    },
    /// Asks for a manifest.
    ManifestRequest {
        /// Request ID.
        id: u64,
        /// The manifest wanted.
        hash: ManifestHash,
    },
    /// Answers a manifest request.
    ManifestResponse {
        /// Request ID.
        id: u64,
        /// The manifest, if the peer has it.
        manifest: Option<Manifest>,
    },
    /// Asks for blocks.
    BlockRequest {
        /// Request ID.
        id: u64,
        /// Blocks wanted.
        hashes: Vec<BlockHash>,
    },
    /// Answers a block request (`None`: missing).
    Blocks {
        /// Request ID.
        id: u64,
        /// The blocks.
        blocks: Vec<(BlockHash, Option<Vec<u8>>)>,
    },
}

impl Msg {
    /// Rides the ordered control stream.
    pub fn is_control(&self) -> bool {
        matches!(self, Msg::DocSync { .. })
    }

    /// A request that expects an answer (the world arms a timeout).
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Msg::ManifestRequest { id, .. } | Msg::BlockRequest { id, .. } => Some(*id),
            _ => None,
        }
    }
}

/// A finished download's temp file on the virtual disk.
#[derive(Clone, Debug)]
pub struct SimTemp(String);

/// One file's transfer in progress (the node's `fetch` of one file).
#[derive(Clone, Debug)]
struct Transfer {
    task: u64,
    path: RelPath,
    entry: Entry,
    manifest: Option<Manifest>,
    temp: Option<String>,
    have: Vec<bool>,
    pending: Option<(DeviceId, u64)>,
    tried: BTreeSet<DeviceId>,
}

type TaskResults = Vec<(u64, Result<Fetched<SimTemp>, String>)>;

/// A simulated device: the folder core and its executor.
pub struct Device {
    core: Option<Folder<SimTemp>>,
    io: SimIo,
}

/// The world reads and arranges the executor's state (disk, store, faults) directly.
impl Deref for Device {
    type Target = SimIo;

    fn deref(&self) -> &SimIo {
        &self.io
    }
}

impl DerefMut for Device {
    fn deref_mut(&mut self) -> &mut SimIo {
        &mut self.io
    }
}

/// The executor of one device's folder core over the virtual disk and network.
pub struct SimIo {
    /// Index in the world.
    pub index: usize,
    /// Device ID.
    pub id: DeviceId,
    key: Arc<DeviceKey>,
    actor_suffix: [u8; 8],
    /// Devices the folder is shared with (accepted).
    pub members: BTreeSet<DeviceId>,
    /// Whether this device publishes its local changes.
    pub mode: engine::FolderMode,
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
    /// Notable events for the trace.
    pub log: Vec<String>,
    /// Paths the watcher reported since the last scan.
    pub dirty: BTreeSet<RelPath>,
    /// Connected members.
    connected: BTreeSet<DeviceId>,
    /// Transfers by download ID.
    transfers: BTreeMap<u64, Transfer>,
    /// Download tasks (groups) not yet reported, with the results so far.
    tasks: BTreeMap<u64, (usize, TaskResults)>,
    next_task: u64,
    /// Tasks finished, to report to the core.
    completed: Vec<TaskResults>,
    next_request: u64,
    now: i64,
    rng: Rng,
}

fn disk_error(error: DiskError) -> IoError {
    IoError::new(format!("{error:?}"))
}

fn crashed() -> IoError {
    IoError::new("the device crashed")
}

impl Device {
    /// A device with an empty folder and store (not started).
    pub fn new(index: usize, key: DeviceKey, rng: &mut Rng) -> Self {
        let mut suffix = [0u8; 8];
        suffix.copy_from_slice(&rng.bytes(8));
        let id = key.device_id();
        Self {
            core: None,
            io: SimIo {
                index,
                id,
                key: Arc::new(key),
                actor_suffix: suffix,
                members: BTreeSet::new(),
                mode: engine::FolderMode::SendReceive,
                disk: Disk::new((index as u64 + 1) << 40),
                store: Store::default(),
                up: false,
                crash_after_rename: false,
                crashed: false,
                sabotage: Sabotage::None,
                bad_blocks: BTreeMap::new(),
                outbox: Vec::new(),
                log: Vec::new(),
                dirty: BTreeSet::new(),
                connected: BTreeSet::new(),
                transfers: BTreeMap::new(),
                tasks: BTreeMap::new(),
                next_task: 0,
                completed: Vec::new(),
                next_request: 0,
                now: 0,
                rng: rng.fork(),
            },
        }
    }

    /// The in-memory document (`None` while the device is down).
    pub fn document(&mut self) -> Option<&mut FolderDocument> {
        self.core.as_mut().map(Folder::document)
    }

    /// Runs `event` on the core, then reports finished download tasks to it (each as
    /// the node's actor would on its channel) until none is left. Nothing runs on a
    /// device that is down or hit its crash point.
    fn on_core(&mut self, now: i64, event: impl FnOnce(&mut Folder<SimTemp>, &mut SimIo)) {
        self.io.now = now;
        let Some(core) = self.core.as_mut() else {
            return;
        };
        if self.io.crashed {
            return;
        }
        event(core, &mut self.io);
        loop {
            let completed = std::mem::take(&mut self.io.completed);
            if completed.is_empty() || self.io.crashed {
                break;
            }
            for results in completed {
                core.fetched(&mut self.io, results);
                core.finish_downloads_now(&mut self.io);
            }
        }
        if !self.io.crashed {
            core.after_changes(&mut self.io);
        }
    }

    /// Starts (or restarts after a crash): opens the core from the store, which scans
    /// the whole folder and plans every known path.
    pub fn start(&mut self, now: i64) {
        self.io.now = now;
        self.io.up = true;
        self.io.crashed = false;
        let settings = FolderSettings {
            id: crate::world::folder_id(),
            key: self.io.key.clone(),
            actor_suffix: self.io.actor_suffix,
            membership: Membership {
                mode: self.io.mode,
                devices: self.io.members.iter().copied().collect(),
            },
            downloads: true,
            compact_after: COMPACT_AFTER,
        };
        match Folder::open(settings, &self.io) {
            Ok(core) => self.core = Some(core),
            Err(error) => {
                self.io.note(format!("cannot open the folder: {error}"));
                return;
            }
        }
        self.on_core(now, |core, io| core.start(io));
    }

    /// `kill -9`: everything not in the store or on disk is gone.
    pub fn crash(&mut self) {
        self.core = None;
        let io = &mut self.io;
        io.up = false;
        io.crashed = false;
        io.crash_after_rename = false;
        io.connected.clear();
        io.transfers.clear();
        io.tasks.clear();
        io.completed.clear();
        io.dirty.clear();
        io.outbox.clear();
    }

    /// Nothing left to do but wait for news.
    pub fn is_idle(&self) -> bool {
        self.core.as_ref().is_none_or(Folder::is_idle) && self.io.dirty.is_empty()
    }

    /// Idle but for failed downloads waiting for their retry.
    pub fn is_idle_but_failed(&self) -> bool {
        self.core.as_ref().is_none_or(Folder::is_idle_but_failed) && self.io.dirty.is_empty()
    }

    /// What each failed download wants now (the document's settled value).
    pub fn failed_wants(&mut self) -> Vec<Option<Entry>> {
        let Some(core) = self.core.as_mut() else {
            return Vec::new();
        };
        let failed = core.failed();
        failed
            .iter()
            .map(|path| engine::settled_value(&remote_of(core.document(), path)).cloned())
            .collect()
    }

    /// Paths being downloaded now.
    pub fn downloading(&self) -> Vec<RelPath> {
        self.core
            .as_ref()
            .map(Folder::downloading)
            .unwrap_or_default()
    }

    /// Each known path's local, synced and document state, for traces.
    pub fn describe_rows(&mut self) -> Vec<String> {
        let short = |hash: Option<ManifestHash>| {
            hash.map_or("-".to_owned(), |h| h.to_hex()[..8].to_owned())
        };
        let describe = |entry: &Entry| {
            if entry.deleted {
                "deleted".to_owned()
            } else {
                format!("{:?} {}", entry.kind, short(entry.content.manifest_hash()))
            }
        };
        let store = &self.io.store;
        let Some(doc) = self.core.as_mut().map(Folder::document) else {
            return vec!["(down)".to_owned()];
        };
        let mut paths: BTreeSet<RelPath> = store.local.keys().cloned().collect();
        paths.extend(store.synced.keys().cloned());
        paths.extend(doc.entries().filter_map(Result::ok).map(|e| e.path));
        paths
            .iter()
            .map(|path| {
                let local = store.local.get(path).map_or("-".to_owned(), |l| {
                    format!("{:?} {}", l.kind, short(l.manifest))
                });
                let synced = store.synced.get(path).map_or("-".to_owned(), |s| {
                    format!(
                        "{} / {:?}",
                        describe(&s.entry),
                        s.local.as_ref().map(|l| short(l.manifest))
                    )
                });
                let remote = match remote_of(doc, path) {
                    Remote::Absent => "-".to_owned(),
                    Remote::Value(entry) => describe(&entry),
                    Remote::Conflict(values) => {
                        format!(
                            "conflict {:?}",
                            values.iter().map(describe).collect::<Vec<_>>()
                        )
                    }
                };
                // Every value automerge holds, with its writer (the engine may hide some).
                let written: Vec<String> = doc
                    .get_all_written(path)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(entry, writer)| {
                        format!(
                            "{} written by {}",
                            entry
                                .as_ref()
                                .map_or("undecodable".to_owned(), weft_core::folder::describe),
                            writer.map_or("?".to_owned(), |w| w.short())
                        )
                    })
                    .collect();
                format!(
                    "{path}: local {local}; synced {synced}; document {remote} [{}]",
                    written.join("; ")
                )
            })
            .collect()
    }

    // ---- events -------------------------------------------------------------------

    /// A connection to `peer` came up.
    pub fn peer_connected(&mut self, peer: DeviceId, now: i64) {
        if !self.io.members.contains(&peer) {
            return;
        }
        self.io.connected.insert(peer);
        self.on_core(now, |core, io| {
            core.peer_input(io, PeerInput::Connected(peer))
        });
    }

    /// The connection to `peer` went down: requests to it fail (the fetcher's stream
    /// error), and are asked elsewhere.
    pub fn peer_disconnected(&mut self, peer: DeviceId, now: i64) {
        self.io.connected.remove(&peer);
        self.on_core(now, |core, io| {
            core.peer_input(io, PeerInput::Disconnected(peer));
            let waiting: Vec<u64> = io
                .transfers
                .iter()
                .filter(|(_, t)| t.pending.is_some_and(|(p, _)| p == peer))
                .map(|(id, _)| *id)
                .collect();
            for id in waiting {
                if let Some(transfer) = io.transfers.get_mut(&id) {
                    transfer.pending = None;
                    transfer.tried.insert(peer);
                }
                io.advance(id);
            }
        });
    }

    /// The scan delay after a user's change expired: scan the dirty paths.
    pub fn scan_dirty(&mut self, now: i64) {
        let dirty = std::mem::take(&mut self.io.dirty);
        if dirty.is_empty() {
            return;
        }
        self.on_core(now, |core, io| core.scan(io, Scope::of(dirty)));
    }

    /// When a racily clean file is next due to be hashed again.
    pub fn next_recheck(&self) -> Option<i64> {
        self.core.as_ref().and_then(Folder::next_racy_due)
    }

    /// Hashes again the racily clean files that are due (the node's run loop).
    pub fn recheck(&mut self, now: i64) {
        self.on_core(now, |core, io| core.recheck_racy(io));
    }

    /// The periodic full scan: rescan everything and plan every path.
    pub fn full_scan(&mut self, now: i64) {
        self.io.dirty.clear();
        self.on_core(now, |core, io| core.full_scan(io));
    }

    /// The retry timer: plan failed downloads again.
    pub fn retry(&mut self, now: i64) {
        self.on_core(now, |core, io| core.retry(io));
    }

    /// A request to a peer got no answer in time.
    pub fn timeout(&mut self, request: u64, now: i64) {
        self.on_core(now, |_, io| {
            let waiting = io
                .transfers
                .iter()
                .find(|(_, t)| t.pending.is_some_and(|(_, r)| r == request))
                .map(|(id, _)| *id);
            if let Some(id) = waiting {
                if let Some(transfer) = io.transfers.get_mut(&id)
                    && let Some((peer, _)) = transfer.pending.take()
                {
                    transfer.tried.insert(peer);
                }
                io.advance(id);
            }
        });
    }

    /// A message from `from`.
    pub fn receive(&mut self, from: DeviceId, message: Msg, now: i64) {
        // Only accepted devices of the folder get folder traffic (net.rs / folder.rs).
        if !self.io.members.contains(&from) {
            self.io.note(format!(
                "refused {} from unaccepted device {}",
                kind_of(&message),
                from.short()
            ));
            return;
        }
        self.on_core(now, |core, io| match message {
            Msg::DocSync {
                signatures,
                message,
            } => {
                core.peer_input(io, PeerInput::Signatures(from, signatures));
                core.peer_input(io, PeerInput::Sync(from, message));
            }
            Msg::ManifestRequest { id, hash } => {
                let manifest = io.store.manifests.get(&hash).cloned();
                io.outbox
                    .push((from, Msg::ManifestResponse { id, manifest }));
            }
            Msg::BlockRequest { id, hashes } => {
                let blocks = hashes
                    .into_iter()
                    .map(|hash| {
                        let data = io.find_block(&hash);
                        (hash, data)
                    })
                    .collect();
                io.outbox.push((from, Msg::Blocks { id, blocks }));
            }
            Msg::ManifestResponse { id, manifest } => io.on_manifest(from, id, manifest),
            Msg::Blocks { id, blocks } => io.on_blocks(from, id, blocks),
        });
    }
}

impl SimIo {
    fn roll(&mut self) -> u64 {
        self.rng.below(100)
    }

    fn note(&mut self, text: String) {
        self.log.push(text);
    }

    fn non_directory_parent_of(&self, path: &RelPath) -> Option<RelPath> {
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

    // ---- transfers (the node's fetch.rs) ------------------------------------------

    fn pick_peer(&mut self, tried: &BTreeSet<DeviceId>) -> Option<DeviceId> {
        let candidates: Vec<DeviceId> = self
            .connected
            .iter()
            .copied()
            .filter(|p| !tried.contains(p))
            .collect();
        self.rng.pick(&candidates).copied()
    }

    /// Ends transfer `id` with `result`; a task whose files have all ended is reported.
    fn end_transfer(&mut self, id: u64, result: Result<Fetched<SimTemp>, String>) {
        let Some(transfer) = self.transfers.remove(&id) else {
            return;
        };
        if let Err(why) = &result {
            self.note(format!(
                "download of {} failed: {why}; will retry",
                transfer.path
            ));
        }
        let Some((left, results)) = self.tasks.get_mut(&transfer.task) else {
            return;
        };
        results.push((id, result));
        *left = left.saturating_sub(1);
        if *left == 0
            && let Some((_, results)) = self.tasks.remove(&transfer.task)
        {
            self.completed.push(results);
        }
    }

    /// Moves a transfer forward: manifest, temp file, local copies, then peers.
    fn advance(&mut self, id: u64) {
        if self.crashed {
            return;
        }
        let Some(transfer) = self.transfers.get(&id).cloned() else {
            return;
        };
        if transfer.pending.is_some() {
            return;
        }
        let Some(manifest) = transfer.manifest.clone() else {
            let Content::Manifest(hash) = transfer.entry.content else {
                self.end_transfer(id, Err("entry without content".into()));
                return;
            };
            let Some(peer) = self.pick_peer(&transfer.tried) else {
                self.end_transfer(id, Err("no peer has the manifest".into()));
                return;
            };
            let request = self.request_id();
            self.outbox
                .push((peer, Msg::ManifestRequest { id: request, hash }));
            if let Some(t) = self.transfers.get_mut(&id) {
                t.pending = Some((peer, request));
            }
            return;
        };
        let temp = match &transfer.temp {
            Some(temp) => temp.clone(),
            None => match self.prepare_temp(id, &transfer.path, &manifest) {
                Ok(temp) => temp,
                Err(error) => {
                    self.end_transfer(id, Err(format!("temp file: {error:?}")));
                    return;
                }
            },
        };
        // Local copies first: any block some local file or version holds.
        let mut have = self
            .transfers
            .get(&id)
            .map(|t| t.have.clone())
            .unwrap_or_default();
        if have.len() != manifest.blocks().len() {
            have = vec![false; manifest.blocks().len()];
        }
        let mut wrote = Vec::new();
        for (index, (offset, block)) in manifest.blocks_with_offsets().enumerate() {
            if have[index] {
                continue;
            }
            if let Some(bytes) = self.find_block(&block.hash) {
                let roll = self.roll();
                if let Err(error) = self.disk.write_at(&temp, offset as usize, &bytes, roll) {
                    self.end_transfer(id, Err(format!("writing the temp file: {error:?}")));
                    return;
                }
                have[index] = true;
                wrote.push(index);
            }
        }
        self.record_progress(&temp, &wrote);
        if let Some(t) = self.transfers.get_mut(&id) {
            t.temp = Some(temp.clone());
            t.have = have.clone();
        }
        let missing: Vec<BlockHash> = {
            let mut hashes = Vec::new();
            for (index, block) in manifest.blocks().iter().enumerate() {
                if !have[index] && !hashes.contains(&block.hash) {
                    hashes.push(block.hash);
                }
                if hashes.len() == BATCH_BLOCKS {
                    break;
                }
            }
            hashes
        };
        if missing.is_empty() {
            self.end_transfer(
                id,
                Ok(Fetched {
                    temp: SimTemp(temp),
                    manifest,
                }),
            );
            return;
        }
        let Some(peer) = self.pick_peer(&transfer.tried) else {
            self.end_transfer(id, Err("no connected peer has the blocks".into()));
            return;
        };
        let request = self.request_id();
        self.outbox.push((
            peer,
            Msg::BlockRequest {
                id: request,
                hashes: missing,
            },
        ));
        if let Some(t) = self.transfers.get_mut(&id) {
            t.pending = Some((peer, request));
        }
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn record_progress(&mut self, temp: &str, blocks: &[usize]) {
        if blocks.is_empty() || self.disk.full {
            return;
        }
        self.store
            .progress
            .entry(temp.to_owned())
            .or_default()
            .extend(blocks.iter().copied());
    }

    /// The temp file for a version: deterministic, so a restarted node resumes it
    /// (only blocks recorded as verified and still matching are trusted).
    fn prepare_temp(
        &mut self,
        id: u64,
        path: &RelPath,
        manifest: &Manifest,
    ) -> Result<String, DiskError> {
        let mut key = blake3::Hasher::new();
        key.update(path.as_str().as_bytes());
        key.update(manifest.hash().as_bytes());
        let name = key.finalize().to_hex()[..16].to_owned();
        let temp = temp_beside(path, &name);
        // fetch::check_parents: a parent that became a symlink (or file) since the
        // download was planned would put the temp file outside the folder.
        if self.non_directory_parent_of(path).is_some() {
            return Err(DiskError::NotADirectory);
        }
        if let Some(dir) = parent(path.as_str()) {
            let roll = self.roll();
            self.disk.create_dir_all(dir, roll, true)?;
        }
        let mut have = vec![false; manifest.blocks().len()];
        match self.disk.read(&temp) {
            Some(data) if data.len() as u64 == manifest.size() => {
                let verified = self.store.progress.get(&temp).cloned().unwrap_or_default();
                for (index, (offset, block)) in manifest.blocks_with_offsets().enumerate() {
                    let offset = offset as usize;
                    let bytes = &data[offset..offset + block.len as usize];
                    if verified.contains(&index) && BlockHash::of(bytes) == block.hash {
                        have[index] = true;
                    }
                }
                let resumed = have.iter().filter(|h| **h).count();
                if resumed > 0 {
                    self.note(format!("resumed {path} with {resumed} verified blocks"));
                }
            }
            _ => {
                let roll = self.roll();
                let _ = self.disk.remove_file(&temp, 100, true);
                self.disk.write_file(
                    &temp,
                    vec![0; manifest.size() as usize],
                    0o600,
                    self.now,
                    roll,
                    true,
                )?;
                self.store.progress.remove(&temp);
            }
        }
        if let Some(t) = self.transfers.get_mut(&id) {
            t.have = have;
        }
        Ok(temp)
    }

    fn waiting_for(&self, from: DeviceId, request: u64) -> Option<u64> {
        self.transfers
            .iter()
            .find(|(_, t)| t.pending == Some((from, request)))
            .map(|(id, _)| *id)
    }

    fn on_manifest(&mut self, from: DeviceId, request: u64, manifest: Option<Manifest>) {
        let Some(id) = self.waiting_for(from, request) else {
            return;
        };
        let Some(transfer) = self.transfers.get_mut(&id) else {
            return;
        };
        transfer.pending = None;
        let wanted = transfer.entry.content.manifest_hash();
        match manifest {
            Some(manifest) if Some(manifest.hash()) == wanted => transfer.manifest = Some(manifest),
            Some(_) => {
                transfer.tried.insert(from);
                *self.bad_blocks.entry(from).or_default() += 1;
            }
            None => {
                transfer.tried.insert(from);
            }
        }
        self.advance(id);
    }

    fn on_blocks(
        &mut self,
        from: DeviceId,
        request: u64,
        blocks: Vec<(BlockHash, Option<Vec<u8>>)>,
    ) {
        // Answers to requests no longer pending (duplicates, late) are dropped.
        let Some(id) = self.waiting_for(from, request) else {
            return;
        };
        let Some(transfer) = self.transfers.get(&id).cloned() else {
            return;
        };
        let (Some(manifest), Some(temp)) = (transfer.manifest.clone(), transfer.temp.clone())
        else {
            return;
        };
        let mut have = transfer.have.clone();
        let mut useful = false;
        let mut bad = false;
        let mut wrote = Vec::new();
        for (hash, data) in blocks {
            let Some(data) = data else { continue };
            if BlockHash::of(&data) != hash {
                bad = true;
                continue;
            }
            for (index, (offset, block)) in manifest.blocks_with_offsets().enumerate() {
                if block.hash == hash && !have[index] {
                    let roll = self.roll();
                    if let Err(error) = self.disk.write_at(&temp, offset as usize, &data, roll) {
                        self.end_transfer(id, Err(format!("writing the temp file: {error:?}")));
                        return;
                    }
                    have[index] = true;
                    wrote.push(index);
                    useful = true;
                }
            }
        }
        self.record_progress(&temp, &wrote);
        if bad {
            *self.bad_blocks.entry(from).or_default() += 1;
            self.note(format!("bad block from {}; asking elsewhere", from.short()));
        }
        if let Some(t) = self.transfers.get_mut(&id) {
            t.pending = None;
            t.have = have;
            if bad || !useful {
                t.tried.insert(from);
            }
        }
        self.advance(id);
    }

    /// A block from any local file (checked against its hash) or the version store.
    pub fn find_block(&self, hash: &BlockHash) -> Option<Vec<u8>> {
        for (path, local) in &self.store.local {
            let Some(manifest) = local.manifest.and_then(|m| self.store.manifests.get(&m)) else {
                continue;
            };
            for (offset, block) in manifest.blocks_with_offsets() {
                if block.hash != *hash {
                    continue;
                }
                let data = self.disk.read(path.as_str())?;
                let (start, end) = (offset as usize, offset as usize + block.len as usize);
                if let Some(bytes) = data.get(start..end)
                    && BlockHash::of(bytes) == *hash
                {
                    return Some(bytes.to_vec());
                }
            }
        }
        for data in self.store.versions.values() {
            for chunk in data.chunks(BLOCK) {
                if BlockHash::of(chunk) == *hash {
                    return Some(chunk.to_vec());
                }
            }
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
            entry.mode & 0o7777
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

    fn sync_dirs(&mut self) {}
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
    }

    fn is_connected(&self, device: &DeviceId) -> bool {
        self.connected.contains(device)
    }

    fn start_download(&mut self, group: Vec<DownloadRequest>, _peers: Vec<DeviceId>) {
        self.next_task += 1;
        let task = self.next_task;
        self.tasks.insert(task, (group.len(), Vec::new()));
        let ids: Vec<u64> = group.iter().map(|request| request.id).collect();
        for request in group {
            let manifest = match &request.entry.content {
                Content::Inline(manifest) => Some(manifest.clone()),
                Content::Manifest(hash) => self.store.manifests.get(hash).cloned(),
                _ => None,
            };
            self.transfers.insert(
                request.id,
                Transfer {
                    task,
                    path: request.path,
                    entry: request.entry,
                    manifest,
                    temp: None,
                    have: Vec::new(),
                    pending: None,
                    tried: BTreeSet::new(),
                },
            );
        }
        for id in ids {
            self.advance(id);
        }
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

    fn local_change(&mut self, _path: &RelPath, _deleted: bool) {}

    fn counts(&mut self, _counts: &Counts) {}

    fn scan_failed(&mut self, error: &IoError) {
        self.note(format!("scan failed: {error}"));
    }

    fn restored(&mut self, ticket: u64, result: Result<String, String>) {
        self.note(format!("restore {ticket}: {result:?}"));
    }
}

fn temp_beside(path: &RelPath, name: &str) -> String {
    match parent(path.as_str()) {
        Some(dir) => format!("{dir}/{TEMP_PREFIX}{name}"),
        None => format!("{TEMP_PREFIX}{name}"),
    }
}

fn kind_of(message: &Msg) -> &'static str {
    match message {
        Msg::DocSync { .. } => "sync message",
        Msg::ManifestRequest { .. } => "manifest request",
        Msg::ManifestResponse { .. } => "manifest",
        Msg::BlockRequest { .. } => "block request",
        Msg::Blocks { .. } => "blocks",
    }
}
