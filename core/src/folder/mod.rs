//! The folder state machine: one folder's document, its rows' bookkeeping, its peers'
//! sync states, its downloads and its racy files, and every decision about them.
//!
//! The executor (the node's folder actor, the simulation's device) calls one method
//! per event: [`Folder::start`], a requested or due scan ([`Folder::scan`]), a peer's
//! message ([`Folder::peer_input`]), a finished download ([`Folder::fetched`]), a tick
//! ([`Folder::tick`], when [`Folder::next_deadline`] says), a restore; then
//! [`Folder::after_changes`]. Each call carries its effects out through the
//! [`FolderIo`] it is given and returns when they are done.
//!
//! The work is split by what it decides:
//! - [`record`]: scan results become document entries and store rows, one transaction a
//!   batch; decisions (publish, resolve, mark synced) are committed the same way.
//! - [`peers`]: the document's sync with each peer, with every received change's
//!   signature checked before anything is saved or acted on.
//! - [`plan`]: planning rounds (children before parents, refused paths remembered by
//!   their blocking parent) and carrying the engine's actions out, with the check of
//!   the disk before every replace or delete.
//! - [`downloads`]: the download queue (largest file and groups of small ones in
//!   turn), finished downloads put into place in batches, retries, restores.
//! - [`scanning`]: what a scan is asked (scope, racy files due) and what is done with
//!   what it found.
//!
//! **Invariants** (each checked by the simulation for every seed):
//! - Nothing the store does not hold is acted on: a failed commit reloads the document
//!   from the store, and the rescan that follows finds the changes again.
//! - A file is replaced or deleted only if the disk still holds what the plan was made
//!   against ([`crate::engine::disk_unchanged`], and the bytes of a racily clean file),
//!   and only after its version was kept.
//! - Every directory changed is synced before the commit that records the change
//!   ([`crate::io::Disk::sync_dirs`]).

mod downloads;
mod members;
mod peers;
mod plan;
mod record;
mod scanning;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use weft_protocol::access::AccessList;
use weft_protocol::document::{self, Entry, FolderDocument, SyncState};
use weft_protocol::sync_parts::SyncAssembly;
use weft_protocol::{DeviceId, DeviceKey, FolderId, Manifest, RelPath, Signature};

use crate::engine;
pub use crate::io::Membership;
use crate::io::{Counts, FolderIo, IoError, PeerInput};
use crate::racy::nanos;
use crate::scan::Scope;

pub use downloads::{
    FINALIZE_BATCH, FINALIZE_DELAY, GROUP_BYTES, GROUP_FILE_MAX, GROUP_FILES, MAX_DOWNLOADS,
    RETRY_INTERVAL,
};
pub use members::ShareError;
pub use peers::{MAX_PENDING_SIGNATURES, MAX_REFUSALS};
pub use plan::{MAX_PLAN_ROUNDS, describe};
pub use record::{BATCH_CHANGES, BATCH_INTERVAL, FIRST_BATCH_INTERVAL};

/// Paths listed as kept local only (a view-only device's local changes).
pub const MAX_LOCAL_ONLY_SHOWN: usize = 100;

/// What a folder is set up with.
#[derive(Clone, Debug)]
pub struct FolderSettings {
    /// The folder.
    pub id: FolderId,
    /// This device's key: signs its document changes.
    pub key: Arc<DeviceKey>,
    /// The random part of this device's automerge actor, fixed when the store was made.
    pub actor_suffix: [u8; 8],
    /// The device that created the folder: its access list must begin with it (from
    /// the invite this device accepted, or this device itself).
    pub founder: DeviceId,
    /// The devices to sync with until the folder's access list has arrived (the
    /// inviter), and the mode until then; afterwards the access list decides.
    pub membership: Membership,
    /// Whether files can be downloaded (false: a node without network).
    pub downloads: bool,
    /// Document increments after which the store's document is compacted to one
    /// snapshot.
    pub compact_after: u64,
}

/// A finished download's temp file and the manifest it was verified against.
#[derive(Debug)]
pub struct Fetched<T> {
    /// The temp file, as the executor knows it.
    pub temp: T,
    /// The manifest its blocks were verified against.
    pub manifest: Manifest,
}

/// Why a folder could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The store could not be read.
    #[error("folder {folder}: cannot read its store: {source}")]
    Store {
        /// The folder.
        folder: FolderId,
        /// What failed.
        source: IoError,
    },
    /// The saved document is damaged.
    #[error("folder {folder}: {source}")]
    Document {
        /// The folder.
        folder: FolderId,
        /// What is wrong.
        source: document::DocumentError,
    },
}

/// When the paths an event touches are planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// At once.
    Now,
    /// After the scan in progress: nothing is written to the folder while it is being
    /// scanned.
    AfterScan,
}

/// One folder's state and decisions; `T` is the executor's temp-file handle.
pub struct Folder<T> {
    id: FolderId,
    device: DeviceId,
    key: Arc<DeviceKey>,
    actor_suffix: [u8; 8],
    founder: DeviceId,
    /// The settings' devices and mode, used until the access list has arrived.
    bootstrap: Membership,
    /// The access list as of the last event.
    access: AccessList,
    /// Members and this device's mode, from `access` (or `bootstrap`).
    membership: Membership,
    compact_after: u64,
    document: FolderDocument,
    /// Authors' signatures of the document's changes, by change hash (verified, or
    /// made here); passed on with the changes.
    signatures: BTreeMap<[u8; 32], Signature>,
    /// Received changes whose store commit failed: kept in memory and saved with the
    /// next commit (automerge's `save_incremental` hands each change out only once).
    unsaved: Vec<u8>,
    /// The document was reloaded from the store (dropping changes a failed commit did
    /// not store): peers' sync states no longer describe it and must start over.
    reloaded: bool,
    /// The document gained local changes not yet offered to peers.
    published: bool,
    /// The document was loaded (opened or reloaded): this device's own void changes
    /// are to be looked for ([`peers`]' `forget_own_void`) before the next plan.
    reloaded_void: bool,
    /// A commit of scan results failed since this was last cleared (a scan's racy files
    /// then stay racy: what their second hash found is not in the store).
    commit_failed: bool,
    /// A store commit failed in this event (a full disk, say): planning stops until
    /// the next event, since every round's rescan would fail to commit and reload the
    /// document again. The paths left wait in `needs_plan`.
    store_failing: bool,
    /// Deletions the remote asked for and this device carried out in the plan round
    /// under way, as synced rows: committed before the round's rescan records the
    /// paths, so that a path emptied by this device is not read as its user's delete
    /// (see `plan::Folder::record_removals`).
    removed: Vec<(RelPath, Option<engine::SyncedEntry>)>,
    /// Paths where the engine wants more than publishing (apply, conflict, ...), or
    /// left over from a planning that did not settle.
    needs_plan: BTreeSet<RelPath>,
    /// Automerge sync state per connected device sharing this folder.
    peers: BTreeMap<DeviceId, SyncState>,
    /// Sync messages arriving in parts, per device.
    assemblies: BTreeMap<DeviceId, SyncAssembly>,
    /// Signatures a device sent for the changes of its next sync message.
    pending_signatures: BTreeMap<DeviceId, BTreeMap<[u8; 32], Signature>>,
    /// Sync messages refused since the device's last accepted change.
    refusals: BTreeMap<DeviceId, u32>,
    downloads: downloads::Downloads<T>,
    /// Paths refused because a parent is a file or symlink on this device, by that
    /// parent. Planned again once it is a directory or gone, whatever made it so.
    blocked: engine::Blocked,
    /// Files hashed within their timestamp granularity of their last write (racily
    /// clean, see [`crate::racy`]), and when (ns) to hash them again whatever their
    /// metadata says. Their rows are marked in the store too, so that the first scan
    /// after a restart hashes them again.
    racy: BTreeMap<RelPath, i64>,
    counts: Counts,
}

impl<T> std::fmt::Debug for Folder<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Folder")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<T> Folder<T> {
    /// Opens a folder: its document and change signatures from the store.
    pub fn open(
        settings: FolderSettings,
        store: &impl crate::io::Store,
    ) -> Result<Self, OpenError> {
        let folder = settings.id.clone();
        let store_error = |source| OpenError::Store {
            folder: folder.clone(),
            source,
        };
        let (snapshot, increments) = store.document().map_err(store_error)?;
        let signatures = store
            .change_signatures()
            .map_err(store_error)?
            .into_iter()
            .map(|signed| (signed.hash, signed.signature))
            .collect();
        let device = settings.key.device_id();
        let actor = document::actor_id(&device, settings.actor_suffix);
        let document = FolderDocument::load(&snapshot, increments.iter().map(Vec::as_slice), actor)
            .map_err(|source| OpenError::Document {
                folder: folder.clone(),
                source,
            })?;
        let mut folder = Self {
            id: settings.id,
            device,
            key: settings.key,
            actor_suffix: settings.actor_suffix,
            founder: settings.founder,
            bootstrap: settings.membership.clone(),
            access: AccessList::default(),
            membership: settings.membership,
            compact_after: settings.compact_after,
            document,
            signatures,
            unsaved: Vec::new(),
            reloaded: false,
            published: false,
            reloaded_void: true,
            commit_failed: false,
            store_failing: false,
            removed: Vec::new(),
            needs_plan: BTreeSet::new(),
            peers: BTreeMap::new(),
            assemblies: BTreeMap::new(),
            pending_signatures: BTreeMap::new(),
            refusals: BTreeMap::new(),
            downloads: downloads::Downloads::new(settings.downloads),
            blocked: BTreeMap::new(),
            racy: BTreeMap::new(),
            counts: Counts::default(),
        };
        folder.access = folder.document.access_list();
        folder.membership = folder.membership_of(&folder.access);
        Ok(folder)
    }

    /// The folder.
    pub fn id(&self) -> &FolderId {
        &self.id
    }

    /// This device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The folder document (in memory: it may hold received changes not yet saved).
    pub fn document(&mut self) -> &mut FolderDocument {
        &mut self.document
    }

    /// The counts as of the last event.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Members and mode.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Every version of `path` the document's history holds, oldest first.
    pub fn history(&mut self, path: &RelPath) -> Vec<Entry> {
        self.document
            .history()
            .remove(path.as_str())
            .unwrap_or_default()
    }

    /// After start (or a restart after a crash): files racily clean when it stopped are
    /// due at once, a full scan records what changed meanwhile, and every known path is
    /// planned (work a crash left).
    pub fn start<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        self.begin_event();
        self.downloads.last_retry = io.monotonic_ns();
        match io.racy_paths() {
            Ok(paths) => {
                let now = io.monotonic_ns();
                self.racy.extend(paths.into_iter().map(|path| (path, now)));
            }
            Err(error) => {
                io.log(
                    crate::io::Level::Warn,
                    format_args!("cannot read racily clean marks: {error}"),
                );
            }
        }
        self.found(io);
        self.scan_scope(io, Scope::Full);
        self.plan_all(io);
        self.after_changes(io);
    }

    /// The periodic full scan: rescan everything and plan every known path (repairs
    /// whatever an earlier event left undone).
    pub fn full_scan<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        self.begin_event();
        self.scan_scope(io, Scope::Full);
        self.plan_all(io);
    }

    /// An event from a peer (or a change of members), handled at once.
    pub fn peer_input<I: FolderIo<Temp = T>>(&mut self, io: &mut I, input: PeerInput) {
        self.begin_event();
        self.handle_peer_input(io, input, Plan::Now);
    }

    fn handle_peer_input<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        input: PeerInput,
        plan: Plan,
    ) {
        match input {
            PeerInput::Connected(device) => self.peer_connected(io, device, plan),
            PeerInput::Disconnected(device) => self.peer_disconnected(device),
            PeerInput::Signatures(device, signed) => self.change_signatures(io, device, signed),
            PeerInput::SyncPart(device, bytes) => self.sync_message_part(io, device, &bytes),
            PeerInput::Sync(device, bytes) => self.sync_message(io, device, bytes, plan),
            PeerInput::Settings(membership) => self.set_membership(membership),
            PeerInput::Access {
                device,
                role,
                ticket,
            } => {
                let result = self
                    .set_access(io, device, role)
                    .map(|()| match role {
                        Some(role) => format!("{device} is {role} in folder {}", self.id),
                        None => format!("{device} was removed from folder {}", self.id),
                    })
                    .map_err(|error| error.to_string());
                io.access_set(ticket, result);
            }
        }
    }

    /// The devices to sync with until the access list has arrived changed (the node
    /// accepted an invite again, say). Once the list is there, it decides.
    pub fn set_membership(&mut self, membership: Membership) {
        self.bootstrap = membership;
        if !self.access.is_founded() {
            self.membership = self.membership_of(&self.access);
            let members = &self.membership.devices;
            self.peers.retain(|device, _| members.contains(device));
        }
    }

    /// When [`Folder::tick`] has work next (ns of [`crate::io::Clock::monotonic_ns`]), if ever: a racy file due, failed
    /// downloads to retry, finished downloads to put into place.
    pub fn next_deadline(&self) -> Option<i64> {
        [
            self.racy.values().min().copied(),
            self.downloads.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Does what is due by now: racy files hashed again, finished downloads put into
    /// place, failed downloads tried again.
    pub fn tick<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        self.begin_event();
        self.recheck_racy(io);
        self.finish_due_downloads(io);
        if self.downloads.retry_due(io.monotonic_ns()) {
            self.retry(io);
        }
    }

    /// Hashes again the racily clean files that are due.
    pub fn recheck_racy<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        self.begin_event();
        let now = io.monotonic_ns();
        let due: BTreeSet<RelPath> = self
            .racy
            .iter()
            .filter(|(_, due)| **due <= now)
            .map(|(path, _)| path.clone())
            .collect();
        if !due.is_empty() {
            self.scan_scope(io, Scope::of(due));
        }
    }

    /// When a racily clean file is next due to be hashed again (ns).
    pub fn next_racy_due(&self) -> Option<i64> {
        self.racy.values().min().copied()
    }

    /// Nothing left to do but wait for news.
    pub fn is_idle(&self) -> bool {
        self.downloads.is_idle() && self.needs_plan.is_empty()
    }

    /// Idle but for failed downloads waiting for their retry.
    pub fn is_idle_but_failed(&self) -> bool {
        self.downloads.is_idle_but_failed() && self.needs_plan.is_empty()
    }

    /// Paths whose download failed, waiting for a retry.
    pub fn failed(&self) -> Vec<RelPath> {
        self.downloads.failed.iter().cloned().collect()
    }

    /// Paths downloading or waiting to.
    pub fn downloading(&self) -> Vec<RelPath> {
        self.downloads.in_flight.keys().cloned().collect()
    }

    /// A new event: the store is tried again (planning stopped for the rest of the
    /// event in which a commit failed).
    fn begin_event(&mut self) {
        self.store_failing = false;
    }

    /// Marks a path to be hashed again at `due` (ns) whatever its metadata says.
    fn racy_due(&mut self, path: &RelPath, due: i64) {
        self.racy.insert(path.clone(), due);
    }

    /// Due `delay` from now.
    fn due_in(now: i64, delay: Duration) -> i64 {
        now.saturating_add(nanos(delay))
    }
}
