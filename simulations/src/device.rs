//! One simulated device: the node's folder shell over a virtual disk and network.
//!
//! The decisions are the node's own code: [`weft_node::engine`] plans every path, the
//! real [`FolderDocument`] (automerge) holds the folder's metadata and syncs it with
//! automerge's sync protocol. Around them this module models what the node's folder
//! actor (`node/src/folder.rs`) and fetcher (`node/src/fetch.rs`) do with the disk and
//! the network, step for step and in the same order: scan and record (the recorder),
//! plan children before parents and carry actions out with the pre-replace check,
//! fetch blocks (local copies first, then peers, verified, resumable through a temp
//! file whose progress is committed), put finished files into place, keep replaced
//! versions. When the node's shell changes, this model changes with it.
//!
//! Durability: [`Store`] is what the node's redb store holds; each `commit` here is one
//! redb transaction there. A crash ([`Device::crash`]) drops everything else (the
//! in-memory document, peers, downloads, queues) and [`Device::start`] rebuilds from
//! the store and the disk, as the node does after `kill -9`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use weft_node::engine::{
    self, Action, FolderMode, LocalEntry, PathView, Remote, SyncedEntry, publish_entry, remote_of,
    tombstone,
};
use weft_node::folder::{MAX_PLAN_ROUNDS, RACY_RECHECK_AFTER, racy_recheck_delay};
use weft_node::scan;
use weft_node::store::LocalChange;
use weft_protocol::document::{self, Content, Entry, EntryKind, FolderDocument, SyncState};
use weft_protocol::path::TEMP_PREFIX;
use weft_protocol::{BlockHash, BlockRef, DeviceId, Manifest, ManifestHash, RelPath};

use crate::disk::{Disk, DiskError, Node, is_temp, parent};
use crate::rng::Rng;

/// Block size of simulated files (fixed-size blocks keep files small and many-block).
pub const BLOCK: usize = 32;
/// Blocks asked for in one request (the node asks for 32; files here are smaller).
pub const BATCH_BLOCKS: usize = 8;

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

/// A deliberately broken shell, to show that the invariants catch real bugs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sabotage {
    /// The shell as the node has it.
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
    /// The document as saved increments, in order.
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
}

/// Messages between devices. `DocSync` rides the ordered control stream; the others
/// are block-stream requests and answers.
#[derive(Clone, Debug)]
pub enum Msg {
    /// An automerge sync message.
    DocSync(Vec<u8>),
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
        matches!(self, Msg::DocSync(_))
    }

    /// A request that expects an answer (the world arms a timeout).
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Msg::ManifestRequest { id, .. } | Msg::BlockRequest { id, .. } => Some(*id),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Download {
    entry: Entry,
    expected: Option<LocalEntry>,
    manifest: Option<Manifest>,
    temp: Option<String>,
    have: Vec<bool>,
    pending: Option<(DeviceId, u64)>,
    tried: BTreeSet<DeviceId>,
}

/// A simulated device.
pub struct Device {
    /// Index in the world.
    pub index: usize,
    /// Device ID.
    pub id: DeviceId,
    actor_suffix: [u8; 8],
    /// Devices the folder is shared with (accepted).
    pub members: BTreeSet<DeviceId>,
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
    /// Notable shell events for the trace.
    pub log: Vec<String>,
    /// Paths the watcher reported since the last scan.
    pub dirty: BTreeSet<RelPath>,
    doc: FolderDocument,
    peers: BTreeMap<DeviceId, SyncState>,
    downloads: BTreeMap<RelPath, Download>,
    failed: BTreeSet<RelPath>,
    /// Paths refused because a parent is a file or symlink, by that parent: planned
    /// again once it is a directory or gone (the node's `FolderActor::blocked`).
    blocked: engine::Blocked,
    /// Racily clean files and when to hash them again (the node's `FolderActor::racy`;
    /// in memory, lost in a crash).
    racy: BTreeMap<RelPath, i64>,
    needs_plan: BTreeSet<RelPath>,
    published: bool,
    /// A commit failed since the scan began (the node's `Recorder::commit_failed`).
    commit_failed: bool,
    unsaved: Vec<u8>,
    reloaded: bool,
    next_request: u64,
    now: i64,
    rng: Rng,
}

/// A duration in the simulation's clock (ns).
fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

fn disk_path(path: &RelPath) -> &str {
    path.as_str()
}

impl Device {
    /// A device with an empty folder and store (not started).
    pub fn new(index: usize, id: DeviceId, rng: &mut Rng) -> Self {
        let mut suffix = [0u8; 8];
        suffix.copy_from_slice(&rng.bytes(8));
        let actor = document::actor_id(&id, suffix);
        Self {
            index,
            id,
            actor_suffix: suffix,
            members: BTreeSet::new(),
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
            doc: FolderDocument::new(actor),
            peers: BTreeMap::new(),
            downloads: BTreeMap::new(),
            failed: BTreeSet::new(),
            blocked: BTreeMap::new(),
            racy: BTreeMap::new(),
            needs_plan: BTreeSet::new(),
            published: false,
            commit_failed: false,
            unsaved: Vec::new(),
            reloaded: false,
            next_request: 0,
            now: 0,
            rng: rng.fork(),
        }
    }

    fn roll(&mut self) -> u64 {
        self.rng.below(100)
    }

    fn note(&mut self, text: String) {
        self.log.push(text);
    }

    /// The in-memory document.
    pub fn document(&mut self) -> &mut FolderDocument {
        &mut self.doc
    }

    /// Starts (or restarts after a crash): loads the document from the store, scans
    /// the whole folder, plans every known path (the node's `run` prologue).
    pub fn start(&mut self, now: i64) {
        self.now = now;
        self.up = true;
        self.crashed = false;
        self.reload_document();
        // Racily clean when it stopped: hashed again by the first scan.
        let marked: Vec<RelPath> = self.store.racy.iter().cloned().collect();
        self.racy.extend(marked.into_iter().map(|path| (path, now)));
        self.scan(None);
        self.plan_all();
        self.after_changes();
    }

    /// `kill -9`: everything not in the store or on disk is gone.
    pub fn crash(&mut self) {
        self.up = false;
        self.crashed = false;
        self.crash_after_rename = false;
        self.peers.clear();
        self.downloads.clear();
        self.failed.clear();
        self.blocked.clear();
        self.racy.clear();
        self.needs_plan.clear();
        self.dirty.clear();
        self.published = false;
        self.unsaved.clear();
        self.reloaded = false;
        self.outbox.clear();
        let actor = document::actor_id(&self.id, self.actor_suffix);
        self.doc = FolderDocument::new(actor);
    }

    fn reload_document(&mut self) {
        let actor = document::actor_id(&self.id, self.actor_suffix);
        self.reloaded = true;
        let chunks = self
            .store
            .increments
            .iter()
            .map(Vec::as_slice)
            .chain((!self.unsaved.is_empty()).then_some(self.unsaved.as_slice()));
        match FolderDocument::load(&[], chunks, actor) {
            Ok(doc) => self.doc = doc,
            Err(error) => self.note(format!("reloading the document failed: {error}")),
        }
    }

    /// Nothing left to do but wait for news.
    pub fn is_idle(&self) -> bool {
        self.downloads.is_empty()
            && self.failed.is_empty()
            && self.needs_plan.is_empty()
            && self.dirty.is_empty()
    }

    /// Idle but for failed downloads waiting for their retry.
    pub fn is_idle_but_failed(&self) -> bool {
        self.downloads.is_empty() && self.needs_plan.is_empty() && self.dirty.is_empty()
    }

    /// What each failed download wants now (the document's settled value).
    pub fn failed_wants(&mut self) -> Vec<Option<Entry>> {
        self.failed
            .iter()
            .map(|path| engine::settled_value(&remote_of(&self.doc, path)).cloned())
            .collect()
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
        let mut paths: BTreeSet<RelPath> = self.store.local.keys().cloned().collect();
        paths.extend(self.store.synced.keys().cloned());
        paths.extend(self.doc.entries().filter_map(Result::ok).map(|e| e.path));
        paths
            .iter()
            .map(|path| {
                let local = self.store.local.get(path).map_or("-".to_owned(), |l| {
                    format!("{:?} {}", l.kind, short(l.manifest))
                });
                let synced = self.store.synced.get(path).map_or("-".to_owned(), |s| {
                    format!(
                        "{} / {:?}",
                        describe(&s.entry),
                        s.local.as_ref().map(|l| short(l.manifest))
                    )
                });
                let remote = match remote_of(&self.doc, path) {
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
                let written: Vec<String> = self
                    .doc
                    .get_all_written(path)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(entry, writer)| {
                        format!(
                            "{} written by {}",
                            entry
                                .as_ref()
                                .map_or("undecodable".to_owned(), describe_entry),
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

    /// Paths being downloaded now.
    pub fn downloading(&self) -> Vec<RelPath> {
        self.downloads.keys().cloned().collect()
    }

    // ---- events -------------------------------------------------------------------

    /// A connection to `peer` came up.
    pub fn peer_connected(&mut self, peer: DeviceId, now: i64) {
        self.now = now;
        if !self.members.contains(&peer) {
            return;
        }
        self.peers.insert(peer, SyncState::new());
        self.send_sync(peer);
        let failed: Vec<RelPath> = std::mem::take(&mut self.failed).into_iter().collect();
        self.plan_paths(failed);
        self.after_changes();
    }

    /// The connection to `peer` went down: requests to it fail (the fetcher's stream
    /// error), and are asked elsewhere.
    pub fn peer_disconnected(&mut self, peer: DeviceId, now: i64) {
        self.now = now;
        self.peers.remove(&peer);
        let waiting: Vec<RelPath> = self
            .downloads
            .iter()
            .filter(|(_, d)| d.pending.is_some_and(|(p, _)| p == peer))
            .map(|(path, _)| path.clone())
            .collect();
        for path in waiting {
            if let Some(download) = self.downloads.get_mut(&path) {
                download.pending = None;
                download.tried.insert(peer);
            }
            self.advance(&path);
        }
        self.after_changes();
    }

    /// The scan delay after a user's change expired: scan the dirty paths.
    pub fn scan_dirty(&mut self, now: i64) {
        self.now = now;
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.is_empty() {
            return;
        }
        self.scan(Some(collapse(dirty)));
        self.after_changes();
    }

    /// When a racily clean file is next due to be hashed again.
    pub fn next_recheck(&self) -> Option<i64> {
        self.racy.values().min().copied()
    }

    /// Hashes again the racily clean files that are due (the node's run loop).
    pub fn recheck(&mut self, now: i64) {
        self.now = now;
        let due: BTreeSet<RelPath> = self
            .racy
            .iter()
            .filter(|(_, due)| **due <= now)
            .map(|(path, _)| path.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        self.scan(Some(collapse(due)));
        self.after_changes();
    }

    /// The periodic full scan: rescan everything and plan every path.
    pub fn full_scan(&mut self, now: i64) {
        self.now = now;
        self.dirty.clear();
        self.scan(None);
        self.plan_all();
        self.after_changes();
    }

    /// The retry timer: plan failed downloads again.
    pub fn retry(&mut self, now: i64) {
        self.now = now;
        let failed: Vec<RelPath> = std::mem::take(&mut self.failed).into_iter().collect();
        if !failed.is_empty() {
            self.plan_paths(failed);
            self.after_changes();
        }
    }

    /// A request to a peer got no answer in time.
    pub fn timeout(&mut self, id: u64, now: i64) {
        self.now = now;
        let waiting: Option<RelPath> = self
            .downloads
            .iter()
            .find(|(_, d)| d.pending.is_some_and(|(_, i)| i == id))
            .map(|(path, _)| path.clone());
        if let Some(path) = waiting {
            if let Some(download) = self.downloads.get_mut(&path)
                && let Some((peer, _)) = download.pending.take()
            {
                download.tried.insert(peer);
            }
            self.advance(&path);
            self.after_changes();
        }
    }

    /// A message from `from`.
    pub fn receive(&mut self, from: DeviceId, message: Msg, now: i64) {
        self.now = now;
        // Only accepted devices of the folder get folder traffic (net.rs / folder.rs).
        if !self.members.contains(&from) {
            self.note(format!(
                "refused {} from unaccepted device {}",
                kind_of(&message),
                from.short()
            ));
            return;
        }
        match message {
            Msg::DocSync(bytes) => self.sync_message(from, &bytes),
            Msg::ManifestRequest { id, hash } => {
                let manifest = self.store.manifests.get(&hash).cloned();
                self.outbox
                    .push((from, Msg::ManifestResponse { id, manifest }));
            }
            Msg::BlockRequest { id, hashes } => {
                let blocks = hashes
                    .into_iter()
                    .map(|hash| {
                        let data = self.find_block(&hash);
                        (hash, data)
                    })
                    .collect();
                self.outbox.push((from, Msg::Blocks { id, blocks }));
            }
            Msg::ManifestResponse { id, manifest } => self.on_manifest(from, id, manifest),
            Msg::Blocks { id, blocks } => self.on_blocks(from, id, blocks),
        }
        self.after_changes();
    }

    // ---- document sync (folder.rs: send_sync, sync_message) -------------------------

    fn send_sync(&mut self, peer: DeviceId) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Some(message) = self.doc.generate_sync_message(state) {
            self.outbox.push((peer, Msg::DocSync(message)));
        }
    }

    fn broadcast(&mut self) {
        let peers: Vec<DeviceId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.send_sync(peer);
        }
    }

    fn sync_message(&mut self, from: DeviceId, bytes: &[u8]) {
        let before = self.doc.heads();
        let state = self.peers.entry(from).or_default();
        if let Err(error) = self.doc.receive_sync_message(state, bytes) {
            self.note(format!("bad sync message from {}: {error}", from.short()));
            return;
        }
        let increment = self.increment();
        if !increment.is_empty() {
            if self.disk.full {
                self.note(
                    "saving received changes failed: disk full; kept for the next commit".into(),
                );
                self.unsaved = increment;
            } else {
                self.unsaved.clear();
                self.push_increment(increment);
            }
        }
        let changed = self.doc.changed_paths(&before);
        if !changed.rejected.is_empty() {
            self.note(format!("rejected invalid keys {:?}", changed.rejected));
        }
        self.send_sync(from);
        if self.doc.heads() != before {
            let others: Vec<DeviceId> = self.peers.keys().copied().filter(|d| *d != from).collect();
            for other in others {
                self.send_sync(other);
            }
        }
        if !changed.paths.is_empty() {
            self.plan_paths(changed.paths);
        }
    }

    // ---- scanning and recording (scan.rs, folder.rs Recorder) -----------------------

    /// Scans the whole folder (`None`) or the subtrees at `scope`, and records changes.
    fn scan(&mut self, scope: Option<Vec<RelPath>>) {
        let in_scope = |path: &RelPath| match &scope {
            None => true,
            Some(roots) => roots.iter().any(|root| path.starts_with(root)),
        };
        let mut changes = Vec::new();
        let mut seen = BTreeSet::new();
        // Racy files in scope that are due are hashed again whatever their metadata says.
        let rehash: BTreeSet<RelPath> = if self.sabotage == Sabotage::NoRacyCheck {
            BTreeSet::new()
        } else {
            let now = self.now;
            self.racy
                .iter()
                .filter(|(path, due)| **due <= now && in_scope(path))
                .map(|(path, _)| path.clone())
                .collect()
        };
        let mut racy = Vec::new();
        for (text, node) in self.disk.nodes() {
            if is_temp(text) {
                continue;
            }
            let Ok(path) = RelPath::new(text) else {
                continue;
            };
            if !in_scope(&path) {
                continue;
            }
            seen.insert(path.clone());
            let Some(mut entry) = self.disk.lstat(text) else {
                continue;
            };
            if let Some(old) = self.store.local.get(&path)
                && engine::metadata_unchanged(old, &entry)
                && !rehash.contains(&path)
            {
                continue;
            }
            let manifest = match node {
                Node::File { data, .. } => {
                    let manifest = manifest_of(data);
                    entry.manifest = Some(manifest.hash());
                    if self.sabotage != Sabotage::NoRacyCheck
                        && scan::is_racy(entry.mtime_ns, self.now)
                    {
                        racy.push((path.clone(), scan::racy_window(entry.mtime_ns)));
                    }
                    Some(manifest)
                }
                _ => None,
            };
            // A racy file hashed again to the same content is no change.
            if self.store.local.get(&path) == Some(&entry) {
                continue;
            }
            changes.push(LocalChange::Upsert {
                path,
                entry,
                manifest,
            });
        }
        for path in self.store.local.keys() {
            if in_scope(path) && !seen.contains(path) {
                changes.push(LocalChange::Remove { path: path.clone() });
            }
        }
        let marks: Vec<RelPath> = racy.iter().map(|(path, _)| path.clone()).collect();
        self.commit_failed = false;
        self.commit(changes, &marks);
        for path in &rehash {
            if self.commit_failed {
                // What the hash found is not in the store: due again later.
                self.racy
                    .insert(path.clone(), self.now + nanos(RACY_RECHECK_AFTER));
                continue;
            }
            self.racy.remove(path);
            if !marks.contains(path) {
                self.store.racy.remove(path);
            }
        }
        for (path, window) in racy {
            self.racy.insert(
                path,
                self.now + nanos(racy_recheck_delay(window, Duration::ZERO)),
            );
        }
    }

    /// Remembers a file put into place as racily clean if its mtime is within its
    /// timestamp granularity of now (the node's `FolderActor::note_if_racy`).
    fn note_if_racy(&mut self, path: &RelPath, mtime_ns: i64) -> bool {
        let racy = self.sabotage != Sabotage::NoRacyCheck && scan::is_racy(mtime_ns, self.now);
        if racy {
            let delay = racy_recheck_delay(scan::racy_window(mtime_ns), Duration::ZERO);
            self.racy.insert(path.clone(), self.now + nanos(delay));
        }
        racy
    }

    /// Whether the file at `path` holds other content than `expected` in a way the
    /// metadata cannot show (the node's `FolderActor::changed_unseen`).
    fn changed_unseen(&mut self, path: &RelPath, expected: Option<&LocalEntry>) -> bool {
        if self.sabotage == Sabotage::NoRacyCheck {
            return false;
        }
        let Some(want) = expected
            .filter(|e| e.kind == EntryKind::File)
            .and_then(|e| e.manifest)
        else {
            return false;
        };
        let recorded = self.store.local.get(path).and_then(|row| row.manifest);
        if recorded != Some(want) {
            return true;
        }
        if !self.racy.contains_key(path) {
            return false;
        }
        let changed = self
            .disk
            .read(disk_path(path))
            .is_none_or(|data| manifest_of(data).hash() != want);
        if changed {
            self.racy.insert(path.clone(), self.now);
        }
        changed
    }

    /// The document entry for a local change (Recorder::entry_for).
    fn entry_for(&self, change: &LocalChange) -> Option<Entry> {
        match change {
            LocalChange::Upsert {
                entry, manifest, ..
            } => Some(publish_entry(entry, manifest.as_ref(), self.id)),
            LocalChange::Remove { path } => {
                let remote = engine::remote_of(&self.doc, path);
                engine::live_value(&remote).map(|current| tombstone(current, self.now, self.id))
            }
        }
    }

    /// Records a batch of scan results in one transaction (Recorder::commit).
    fn commit(&mut self, batch: Vec<LocalChange>, racy: &[RelPath]) {
        if self.crashed {
            return;
        }
        if batch.is_empty() {
            return;
        }
        let mut synced_updates = Vec::new();
        let mut recorded = false;
        for change in &batch {
            let (path, local) = match change {
                LocalChange::Upsert { path, entry, .. } => (path, Some(entry)),
                LocalChange::Remove { path } => (path, None),
            };
            let view = PathView {
                path,
                local,
                synced: self.store.synced.get(path),
                remote: remote_of(&self.doc, path),
                remote_at: &|other| remote_of(&self.doc, other),
            };
            for action in engine::plan_path(&view, FolderMode::SendReceive, &self.id) {
                match action {
                    Action::Publish { .. } => {
                        let Some(entry) = self.entry_for(change) else {
                            continue;
                        };
                        if self.doc.put(path, &entry).is_err() {
                            continue;
                        }
                        recorded = true;
                        synced_updates.push((
                            path.clone(),
                            SyncedEntry {
                                entry,
                                local: local.cloned(),
                            },
                        ));
                    }
                    Action::MarkSynced { entry, local, .. } => {
                        synced_updates.push((path.clone(), SyncedEntry { entry, local }));
                    }
                    _ => {
                        self.needs_plan.insert(path.clone());
                    }
                }
            }
        }
        self.doc.commit(self.now / 1_000_000, "local changes");
        let increment = self.increment();
        if self.disk.full {
            self.note("committing scan results failed: disk full; will rescan".into());
            self.commit_failed = true;
            self.reload_document();
            return;
        }
        self.unsaved.clear();
        if !increment.is_empty() {
            self.push_increment(increment);
        }
        for change in batch {
            match change {
                LocalChange::Upsert {
                    path,
                    entry,
                    manifest,
                } => {
                    if let Some(manifest) = manifest {
                        self.store.manifests.insert(manifest.hash(), manifest);
                    }
                    self.store.local.insert(path, entry);
                }
                LocalChange::Remove { path } => {
                    self.store.racy.remove(&path);
                    self.store.local.remove(&path);
                }
            }
        }
        self.store.racy.extend(racy.iter().cloned());
        for (path, synced) in synced_updates {
            self.store.synced.insert(path, synced);
        }
        if recorded {
            self.published = true;
        }
    }

    /// Removes `path`'s synced row, committed like a decision.
    fn forget_synced(&mut self, path: &RelPath) -> bool {
        if !self.commit_decisions(Vec::new()) {
            return false;
        }
        self.store.synced.remove(path);
        true
    }

    /// Commits document decisions and synced rows (Recorder::commit_decisions).
    fn commit_decisions(&mut self, synced_updates: Vec<(RelPath, SyncedEntry)>) -> bool {
        if self.crashed {
            return false;
        }
        self.doc.commit(self.now / 1_000_000, "sync");
        let increment = self.increment();
        if !increment.is_empty() {
            self.published = true;
        }
        if self.disk.full {
            self.note("committing a sync decision failed: disk full".into());
            self.reload_document();
            return false;
        }
        self.unsaved.clear();
        if !increment.is_empty() {
            self.published = true;
            self.push_increment(increment);
        }
        for (path, synced) in synced_updates {
            self.store.synced.insert(path, synced);
        }
        true
    }

    // ---- planning (folder.rs: plan_all, after_changes, plan_paths, execute) ----------

    fn plan_all(&mut self) {
        let mut paths: BTreeSet<RelPath> = self.store.local.keys().cloned().collect();
        paths.extend(self.store.synced.keys().cloned());
        paths.extend(self.doc.entries().filter_map(Result::ok).map(|e| e.path));
        self.plan_paths(paths.into_iter().collect());
    }

    /// Appends a committed increment; compacts like the node's store does.
    fn push_increment(&mut self, increment: Vec<u8>) {
        self.store.increments.push(increment);
        self.store.commits += 1;
        // The node compacts after DOC_INCREMENTS_BEFORE_COMPACTION; sooner here keeps
        // reloads after crashes cheap (the result is the same document).
        if self.store.increments.len() >= 32 {
            self.store.increments = vec![self.doc.save()];
        }
    }

    fn increment(&mut self) -> Vec<u8> {
        let mut bytes = self.unsaved.clone();
        bytes.extend(self.doc.save_incremental());
        bytes
    }

    fn after_changes(&mut self) {
        if self.crashed {
            return;
        }
        for _ in 0..MAX_PLAN_ROUNDS {
            if self.needs_plan.is_empty() {
                break;
            }
            let paths: Vec<RelPath> = std::mem::take(&mut self.needs_plan).into_iter().collect();
            self.plan_paths(paths);
        }
        if self.reloaded {
            self.reloaded = false;
            for state in self.peers.values_mut() {
                *state = SyncState::new();
            }
            self.published = true;
        }
        if self.published {
            self.published = false;
            self.broadcast();
        }
    }

    fn plan_paths(&mut self, mut paths: Vec<RelPath>) {
        if self.crashed {
            return;
        }
        paths.extend(self.unblocked());
        paths.sort_unstable_by(|a, b| b.cmp(a));
        paths.dedup();
        let mut queue: std::collections::VecDeque<RelPath> = paths.into_iter().collect();
        let mut rounds = 0;
        while !queue.is_empty() && rounds < MAX_PLAN_ROUNDS {
            rounds += 1;
            let mut rescan: BTreeSet<RelPath> = BTreeSet::new();
            let mut seen: BTreeSet<RelPath> = BTreeSet::new();
            while let Some(path) = queue.pop_front() {
                if self.downloads.contains_key(&path) || !seen.insert(path.clone()) {
                    continue;
                }
                let local = self.store.local.get(&path).cloned();
                let synced = self.store.synced.get(&path).cloned();
                let view = PathView {
                    path: &path,
                    local: local.as_ref(),
                    synced: synced.as_ref(),
                    remote: remote_of(&self.doc, &path),
                    remote_at: &|other| remote_of(&self.doc, other),
                };
                for action in engine::plan_path(&view, FolderMode::SendReceive, &self.id) {
                    self.execute(action, local.as_ref(), &mut rescan);
                    if self.crashed {
                        return;
                    }
                }
            }
            if !rescan.is_empty() {
                self.scan(Some(collapse(rescan)));
            }
            let mut next: Vec<RelPath> = std::mem::take(&mut self.needs_plan).into_iter().collect();
            next.extend(self.unblocked());
            next.extend(queue.drain(..));
            next.sort_unstable_by(|a, b| b.cmp(a));
            next.dedup();
            queue.extend(next);
        }
        if !queue.is_empty() {
            self.note(format!(
                "planning did not settle; left for the next change: {:?}",
                queue.iter().take(4).collect::<Vec<_>>()
            ));
            self.needs_plan.extend(queue);
        }
    }

    fn parents_are_directories(&self, path: &RelPath) -> bool {
        self.non_directory_parent(path).is_none()
    }

    fn non_directory_parent(&self, path: &RelPath) -> Option<RelPath> {
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

    /// Takes the blocked paths whose blocking parent is now a directory or gone.
    fn unblocked(&mut self) -> Vec<RelPath> {
        let disk = &self.disk;
        engine::take_unblocked(&mut self.blocked, |blocker| {
            matches!(disk.get(blocker.as_str()), Some(Node::Dir) | None)
        })
    }

    fn disk_matches(&self, path: &RelPath, expected: Option<&LocalEntry>) -> bool {
        if self.sabotage == Sabotage::NoPreReplaceCheck {
            return true;
        }
        engine::disk_unchanged(self.disk.lstat(disk_path(path)).as_ref(), expected)
    }

    fn execute(
        &mut self,
        action: Action,
        local: Option<&LocalEntry>,
        rescan: &mut BTreeSet<RelPath>,
    ) {
        let touches_disk = match &action {
            Action::Apply { path, .. }
            | Action::Remove { path, .. }
            | Action::MoveToConflictCopy { path, .. } => Some(path.clone()),
            _ => None,
        };
        if let Some(path) = touches_disk
            && let Some(blocker) = self.non_directory_parent(&path)
        {
            self.note(format!("refused {path}: {blocker} is a symlink or file"));
            self.blocked.entry(blocker).or_default().insert(path);
            return;
        }
        match action {
            Action::MarkSynced { path, entry, local } => {
                self.commit_decisions(vec![(path, SyncedEntry { entry, local })]);
            }
            Action::Publish { path } => self.publish(&path, local),
            Action::Resolve {
                path,
                winner,
                copies,
            } => {
                let mut ok = self.doc.put(&path, &winner).is_ok();
                for (copy, entry) in &copies {
                    ok &= self.doc.put(copy, entry).is_ok();
                }
                if ok && self.commit_decisions(Vec::new()) {
                    let named: Vec<String> = copies
                        .iter()
                        .map(|(copy, entry)| format!("{copy} = {}", describe_entry(entry)))
                        .collect();
                    self.note(format!(
                        "resolved {path} as {} ({} copies: {})",
                        describe_entry(&winner),
                        copies.len(),
                        named.join(", ")
                    ));
                    self.needs_plan.insert(path);
                    self.needs_plan
                        .extend(copies.into_iter().map(|(copy, _)| copy));
                }
            }
            Action::Apply {
                path,
                entry,
                expected,
            } => {
                if !self.disk_matches(&path, expected.as_ref())
                    || self.changed_unseen(&path, expected.as_ref())
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
                    self.disk.remove_temp_files(disk_path(&path));
                    let roll = self.roll();
                    if let Err(error) = self.disk.remove_dir(disk_path(&path), roll, true) {
                        self.note(format!("directory {path} kept: {error:?}"));
                        if local.is_some() {
                            let doc = &self.doc;
                            let copy = engine::replacement_copy_path(&path, &entry, &|other| {
                                remote_of(doc, other)
                            });
                            if let Some(copy) = copy
                                && self.doc.put(&copy, &entry).is_ok()
                            {
                                self.note(format!(
                                    "{path} kept as directory; its replacement kept as {copy}"
                                ));
                                self.needs_plan.insert(copy);
                            }
                            self.publish(&path, local);
                        }
                        rescan.insert(path);
                        return;
                    }
                    expected = None;
                }
                let roll = self.roll();
                match entry.kind {
                    EntryKind::Directory => {
                        if let Some(expected) = &expected
                            && expected.kind != EntryKind::Directory
                        {
                            if !self.keep_version(&path, expected) {
                                self.failed.insert(path);
                                return;
                            }
                            let roll = self.roll();
                            let _ = self.disk.remove_file(disk_path(&path), roll, true);
                        }
                        if let Err(error) = self.disk.create_dir_all(disk_path(&path), roll, true) {
                            self.note(format!("cannot create directory {path}: {error:?}"));
                        }
                        rescan.insert(path);
                    }
                    EntryKind::Symlink => {
                        if let Content::Symlink(target) = &entry.content {
                            let temp = temp_beside(&path, &format!("{}", self.now));
                            if let Some(dir) = parent(disk_path(&path)) {
                                let _ = self.disk.create_dir_all(dir, roll, true);
                            }
                            let roll2 = self.roll();
                            let made =
                                self.disk.symlink(target, &temp, roll, true).and_then(|()| {
                                    self.disk.rename(&temp, disk_path(&path), roll2, true)
                                });
                            if let Err(error) = made {
                                let _ = self.disk.remove_file(&temp, 100, true);
                                self.note(format!("cannot create symlink {path}: {error:?}"));
                            }
                        }
                        rescan.insert(path);
                    }
                    EntryKind::File => self.start_fetch(path, entry, expected),
                }
            }
            Action::Remove { path, expected, .. } => {
                if !self.disk_matches(&path, Some(&expected))
                    || self.changed_unseen(&path, Some(&expected))
                {
                    rescan.insert(path);
                    return;
                }
                if expected.kind == EntryKind::File && !self.keep_version(&path, &expected) {
                    self.failed.insert(path);
                    return;
                }
                if expected.kind == EntryKind::Directory {
                    self.disk.remove_temp_files(disk_path(&path));
                }
                let roll = self.roll();
                let removed = match expected.kind {
                    EntryKind::Directory => self.disk.remove_dir(disk_path(&path), roll, true),
                    _ => self.disk.remove_file(disk_path(&path), roll, true),
                };
                match removed {
                    Ok(()) => self.note(format!("removed {path}")),
                    Err(error) if expected.kind == EntryKind::Directory => {
                        let children: Vec<RelPath> = self
                            .store
                            .local
                            .keys()
                            .filter(|child| child.starts_with(&path) && **child != path)
                            .cloned()
                            .collect();
                        let all_going = children.iter().all(|child| {
                            matches!(remote_of(&self.doc, child), Remote::Value(ref e) if e.deleted)
                        });
                        if all_going && !children.is_empty() {
                            self.needs_plan.insert(path.clone());
                        } else {
                            self.note(format!("directory {path} kept: {error:?}"));
                            if local.is_some() {
                                self.publish(&path, local);
                            }
                        }
                    }
                    Err(error) => self.note(format!("cannot delete {path}: {error:?}")),
                }
                rescan.insert(path);
            }
            Action::MoveToConflictCopy { path, to, expected } => {
                if !self.disk_matches(&path, Some(&expected)) {
                    rescan.insert(path);
                    return;
                }
                let planned = to.clone();
                let mut to = to;
                let mut n = 2;
                while self.disk.get(disk_path(&to)).is_some() {
                    match engine::numbered_copy_path(&planned, n) {
                        Some(next) if n < engine::MAX_COPY_NUMBER => to = next,
                        _ => return,
                    }
                    n += 1;
                }
                // Nothing is synced at `path` once its version is moved aside (the
                // node's `MoveToConflictCopy`).
                if !self.forget_synced(&path) {
                    return;
                }
                let roll = self.roll();
                match self
                    .disk
                    .rename(disk_path(&path), disk_path(&to), roll, true)
                {
                    Ok(()) => self.note(format!("conflict: {path} kept as {to}")),
                    Err(error) => {
                        self.note(format!("cannot make conflict copy of {path}: {error:?}"))
                    }
                }
                rescan.insert(path);
                rescan.insert(to);
            }
            Action::KeepLocal { .. } => {}
        }
    }

    fn publish(&mut self, path: &RelPath, local: Option<&LocalEntry>) {
        let entry = match local {
            Some(local) => {
                let manifest = local
                    .manifest
                    .and_then(|hash| self.store.manifests.get(&hash).cloned());
                publish_entry(local, manifest.as_ref(), self.id)
            }
            None => match engine::live_value(&engine::remote_of(&self.doc, path)) {
                Some(current) => tombstone(current, self.now, self.id),
                None => return,
            },
        };
        if self.doc.put(path, &entry).is_ok() {
            self.commit_decisions(vec![(
                path.clone(),
                SyncedEntry {
                    entry,
                    local: local.cloned(),
                },
            )]);
        }
    }

    /// Keeps the content of the local file at `path` (about to be replaced or deleted)
    /// in the version store, if it still is what `old` says.
    /// False if the version could not be kept (disk full): the caller leaves the
    /// file alone and retries.
    fn keep_version(&mut self, path: &RelPath, old: &LocalEntry) -> bool {
        let (Some(hash), Some(data)) = (old.manifest, self.disk.read(disk_path(path))) else {
            return true;
        };
        if manifest_of(data).hash() != hash || self.sabotage == Sabotage::NoVersionStore {
            return true;
        }
        if self.disk.full {
            self.note(format!(
                "could not keep the old version of {path}: disk full; left in place"
            ));
            return false;
        }
        self.store.versions.insert(hash, data.to_vec());
        true
    }

    // ---- fetching (fetch.rs) ------------------------------------------------------

    fn start_fetch(&mut self, path: RelPath, entry: Entry, expected: Option<LocalEntry>) {
        let manifest = match &entry.content {
            Content::Inline(manifest) => Some(manifest.clone()),
            Content::Manifest(hash) => self.store.manifests.get(hash).cloned(),
            _ => None,
        };
        self.downloads.insert(
            path.clone(),
            Download {
                entry,
                expected,
                manifest,
                temp: None,
                have: Vec::new(),
                pending: None,
                tried: BTreeSet::new(),
            },
        );
        self.advance(&path);
    }

    fn pick_peer(&mut self, tried: &BTreeSet<DeviceId>) -> Option<DeviceId> {
        let candidates: Vec<DeviceId> = self
            .peers
            .keys()
            .copied()
            .filter(|p| !tried.contains(p))
            .collect();
        self.rng.pick(&candidates).copied()
    }

    fn fail(&mut self, path: &RelPath, why: &str) {
        self.downloads.remove(path);
        self.note(format!("download of {path} failed: {why}; will retry"));
        self.failed.insert(path.clone());
    }

    /// Moves a download forward: manifest, temp file, local copies, then peers.
    fn advance(&mut self, path: &RelPath) {
        if self.crashed {
            return;
        }
        let Some(download) = self.downloads.get(path).cloned() else {
            return;
        };
        if download.pending.is_some() {
            return;
        }
        let Some(manifest) = download.manifest.clone() else {
            let Content::Manifest(hash) = download.entry.content else {
                self.fail(path, "entry without content");
                return;
            };
            let Some(peer) = self.pick_peer(&download.tried) else {
                self.fail(path, "no peer has the manifest");
                return;
            };
            let id = self.request_id();
            self.outbox.push((peer, Msg::ManifestRequest { id, hash }));
            if let Some(d) = self.downloads.get_mut(path) {
                d.pending = Some((peer, id));
            }
            return;
        };
        let temp = match &download.temp {
            Some(temp) => temp.clone(),
            None => match self.prepare_temp(path, &manifest) {
                Ok(temp) => temp,
                Err(error) => {
                    self.fail(path, &format!("temp file: {error:?}"));
                    return;
                }
            },
        };
        // Local copies first: any block some local file or version holds.
        let mut have = self
            .downloads
            .get(path)
            .map(|d| d.have.clone())
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
                    self.fail(path, &format!("writing the temp file: {error:?}"));
                    return;
                }
                have[index] = true;
                wrote.push(index);
            }
        }
        self.record_progress(&temp, &wrote);
        if let Some(d) = self.downloads.get_mut(path) {
            d.temp = Some(temp);
            d.have = have.clone();
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
            self.finish(path);
            return;
        }
        let Some(peer) = self.pick_peer(&download.tried) else {
            self.fail(path, "no connected peer has the blocks");
            return;
        };
        let id = self.request_id();
        self.outbox.push((
            peer,
            Msg::BlockRequest {
                id,
                hashes: missing,
            },
        ));
        if let Some(d) = self.downloads.get_mut(path) {
            d.pending = Some((peer, id));
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
    fn prepare_temp(&mut self, path: &RelPath, manifest: &Manifest) -> Result<String, DiskError> {
        let mut key = blake3::Hasher::new();
        key.update(path.as_str().as_bytes());
        key.update(manifest.hash().as_bytes());
        let name = key.finalize().to_hex()[..16].to_owned();
        let temp = temp_beside(path, &name);
        // fetch::check_parents: a parent that became a symlink (or file) since the
        // download was planned would put the temp file outside the folder.
        if !self.parents_are_directories(path) {
            return Err(DiskError::NotADirectory);
        }
        if let Some(dir) = parent(disk_path(path)) {
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
        if let Some(d) = self.downloads.get_mut(path) {
            d.have = have;
        }
        Ok(temp)
    }

    fn on_manifest(&mut self, from: DeviceId, id: u64, manifest: Option<Manifest>) {
        let Some(path) = self.waiting_for(from, id) else {
            return;
        };
        let Some(download) = self.downloads.get_mut(&path) else {
            return;
        };
        download.pending = None;
        let wanted = download.entry.content.manifest_hash();
        match manifest {
            Some(manifest) if Some(manifest.hash()) == wanted => download.manifest = Some(manifest),
            Some(_) => {
                download.tried.insert(from);
                *self.bad_blocks.entry(from).or_default() += 1;
            }
            None => {
                download.tried.insert(from);
            }
        }
        self.advance(&path);
    }

    fn waiting_for(&self, from: DeviceId, id: u64) -> Option<RelPath> {
        self.downloads
            .iter()
            .find(|(_, d)| d.pending == Some((from, id)))
            .map(|(path, _)| path.clone())
    }

    fn on_blocks(&mut self, from: DeviceId, id: u64, blocks: Vec<(BlockHash, Option<Vec<u8>>)>) {
        // Answers to requests no longer pending (duplicates, late) are dropped.
        let Some(path) = self.waiting_for(from, id) else {
            return;
        };
        let Some(download) = self.downloads.get(&path).cloned() else {
            return;
        };
        let (Some(manifest), Some(temp)) = (download.manifest.clone(), download.temp.clone())
        else {
            return;
        };
        let mut have = download.have.clone();
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
                        self.fail(&path, &format!("writing the temp file: {error:?}"));
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
        if let Some(d) = self.downloads.get_mut(&path) {
            d.pending = None;
            d.have = have;
            if bad || !useful {
                d.tried.insert(from);
            }
        }
        self.advance(&path);
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

    /// Puts a complete download into place (folder.rs finish_downloads, one item).
    fn finish(&mut self, path: &RelPath) {
        let Some(download) = self.downloads.remove(path) else {
            return;
        };
        let (Some(manifest), Some(temp)) = (download.manifest, download.temp) else {
            return;
        };
        let entry = download.entry;
        let still_wanted = engine::settled_value(&remote_of(&self.doc, path)) == Some(&entry);
        if !still_wanted
            || !self.disk_matches(path, download.expected.as_ref())
            || self.changed_unseen(path, download.expected.as_ref())
            || !self.parents_are_directories(path)
        {
            if !still_wanted {
                let _ = self.disk.remove_file(&temp, 100, true);
                self.store.progress.remove(&temp);
            }
            self.scan(Some(vec![path.clone()]));
            self.plan_paths(vec![path.clone()]);
            return;
        }
        if let Some(dir) = parent(disk_path(path)) {
            let roll = self.roll();
            let _ = self.disk.create_dir_all(dir, roll, true);
        }
        if let Some(old) = &download.expected
            && !self.keep_version(path, old)
        {
            self.failed.insert(path.clone());
            return;
        }
        let mode = if entry.mode & 0o777 == 0 {
            0o644
        } else {
            entry.mode & 0o7777
        };
        self.disk.set_times(&temp, mode, entry.mtime_ns);
        let roll = self.roll();
        if let Err(error) = self.disk.rename(&temp, disk_path(path), roll, true) {
            self.fail(path, &format!("cannot move into place: {error:?}"));
            return;
        }
        self.store.progress.remove(&temp);
        self.note(format!("wrote {path} ({})", &manifest.hash().to_hex()[..8]));
        if self.crash_after_rename {
            self.crashed = true;
            self.note(format!(
                "crash point: {path} renamed into place, not recorded"
            ));
            return;
        }
        let Some(mut local) = self.disk.lstat(disk_path(path)) else {
            self.plan_paths(vec![path.clone()]);
            return;
        };
        local.manifest = Some(manifest.hash());
        let racy = if self.note_if_racy(path, local.mtime_ns) {
            vec![path.clone()]
        } else {
            Vec::new()
        };
        self.commit(
            vec![LocalChange::Upsert {
                path: path.clone(),
                entry: local,
                manifest: Some(manifest),
            }],
            &racy,
        );
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
        Msg::DocSync(_) => "sync message",
        Msg::ManifestRequest { .. } => "manifest request",
        Msg::ManifestResponse { .. } => "manifest",
        Msg::BlockRequest { .. } => "block request",
        Msg::Blocks { .. } => "blocks",
    }
}

/// Keeps the outermost of nested paths (`a` covers `a/b`), as folder.rs does.
fn collapse(paths: BTreeSet<RelPath>) -> Vec<RelPath> {
    paths
        .iter()
        .filter(|path| {
            let mut at = path.parent();
            while let Some(dir) = at {
                if paths.contains(&dir) {
                    return false;
                }
                at = dir.parent();
            }
            true
        })
        .cloned()
        .collect()
}

/// An entry as traces show it: `deleted`, or its kind, first hash bytes and author.
fn describe_entry(entry: &Entry) -> String {
    if entry.deleted {
        return format!("deleted by {}", entry.author.short());
    }
    let hash = entry
        .content
        .manifest_hash()
        .map_or("-".to_owned(), |h| h.to_hex()[..8].to_owned());
    format!("{:?} {hash} by {}", entry.kind, entry.author.short())
}
