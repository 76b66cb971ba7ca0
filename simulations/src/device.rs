//! One simulated device: the folder core ([`weft_core::Folder`]), the same code the
//! node runs, over a virtual disk, store and network.
//!
//! Every decision is the core's. A device is the core plus its executor
//! ([`crate::executor::SimIo`]: virtual disk, store, network, clock; block transfers in
//! [`crate::transfer`]); this module turns the world's events into calls of the core,
//! as the node's folder actor turns its channel's commands into them.
//!
//! A crash ([`Device::crash`]) drops everything but the store and the disk; the core
//! is opened again from the store by [`Device::start`], as the node does after
//! `kill -9`.

use std::collections::BTreeSet;
use std::ops::{Deref, DerefMut};

use weft_core::engine::{self, Remote, remote_of};
use weft_core::folder::{Folder, FolderSettings, Membership};
use weft_core::io::PeerInput;
use weft_core::scan::Scope;
use weft_protocol::document::{Entry, FolderDocument};
use weft_protocol::{DeviceId, DeviceKey, ManifestHash, RelPath};

use crate::executor::{COMPACT_AFTER, SimIo, SimTemp};
use crate::message::{Msg, kind_of};
use crate::rng::Rng;

/// The one folder every simulated device shares.
pub fn folder_id() -> weft_protocol::FolderId {
    weft_protocol::FolderId::random([0x5e; 8])
}

/// Download tasks reported to the core in one event at most (see [`Device::on_core`]).
const MAX_ROUNDS_PER_EVENT: usize = 1_000;

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

impl Device {
    /// A device with an empty folder and store (not started).
    pub fn new(index: usize, key: DeviceKey, rng: &mut Rng) -> Self {
        let mut suffix = [0u8; 8];
        suffix.copy_from_slice(&rng.bytes(8));
        Self {
            core: None,
            io: SimIo::new(index, key, suffix, rng.fork()),
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
        // Downloads that finish at once (every block is local) and are planned again at
        // once would loop here forever: a livelock, left for the termination check.
        for _ in 0..MAX_ROUNDS_PER_EVENT {
            let completed = std::mem::take(&mut self.io.transfers.completed);
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
            id: folder_id(),
            key: self.io.key.clone(),
            actor_suffix: self.io.actor_suffix,
            founder: self.io.founder,
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

    /// Sets `device`'s role in the access list (as this device's user would).
    pub fn set_access(
        &mut self,
        now: i64,
        device: DeviceId,
        role: Option<weft_protocol::access::Role>,
    ) -> Result<(), String> {
        let mut result = Err("the device is down".to_owned());
        self.on_core(now, |core, io| {
            result = core
                .set_access(io, device, role)
                .map_err(|error| error.to_string());
        });
        result
    }

    /// `kill -9`: everything not in the store or on disk is gone.
    pub fn crash(&mut self) {
        self.core = None;
        let io = &mut self.io;
        io.up = false;
        io.crashed = false;
        io.crash_after_rename = false;
        io.connected.clear();
        io.transfers = Default::default();
        io.dirty.clear();
        io.outbox.clear();
        io.disconnects.clear();
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

    /// Paths whose download failed, waiting for a retry.
    pub fn failed(&self) -> Vec<RelPath> {
        self.core.as_ref().map(Folder::failed).unwrap_or_default()
    }

    /// Local changes this device keeps unpublished (a receive-only device's).
    pub fn local_only(&self) -> Vec<RelPath> {
        self.core
            .as_ref()
            .map(|core| core.counts().local_only.clone())
            .unwrap_or_default()
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
            io.peer_gone(peer);
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
        self.on_core(now, |_, io| io.request_failed(request));
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
