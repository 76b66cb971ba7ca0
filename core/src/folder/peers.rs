//! The folder document's sync with each peer: automerge's sync protocol, with the
//! authors' signature of every change checked before anything of a message is saved
//! or acted on.
//!
//! Only devices the folder is shared with take part; a device that keeps sending
//! changes without valid signatures ([`MAX_REFUSALS`] times without an accepted change
//! in between) is disconnected, since its sync is looping without progress.

use weft_protocol::access::AccessError;
use weft_protocol::change_signature::{self, ChangeSignatureError, SignedChange};
use weft_protocol::document::SyncState;
use weft_protocol::{DeviceId, RelPath};

use super::{Folder, Plan};
use crate::io::{FolderIo, Level};

/// Sync messages with unsigned or forged changes a device may send without one
/// accepted change in between before it is disconnected.
pub const MAX_REFUSALS: u32 = 3;
/// Change signatures held for one device's next sync message.
pub const MAX_PENDING_SIGNATURES: usize = 1 << 20;

impl<T> Folder<T> {
    pub(super) fn peer_connected<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        device: DeviceId,
        plan: Plan,
    ) {
        if !self.membership.devices.contains(&device) {
            return;
        }
        self.peers.insert(device, SyncState::new());
        self.send_sync(io, device);
        // Downloads that failed for want of a peer may succeed now.
        let failed: Vec<RelPath> = std::mem::take(&mut self.downloads.failed)
            .into_iter()
            .collect();
        self.plan(io, failed, plan);
    }

    pub(super) fn peer_disconnected(&mut self, device: DeviceId) {
        self.peers.remove(&device);
        self.assemblies.remove(&device);
        self.pending_signatures.remove(&device);
    }

    /// Sends `device` the next sync message of the document, if it lacks anything.
    pub(super) fn send_sync<I: FolderIo<Temp = T>>(&mut self, io: &mut I, device: DeviceId) {
        let Some(state) = self.peers.get_mut(&device) else {
            return;
        };
        let Some((message, changes)) = self.document.generate_sync_message_with_changes(state)
        else {
            return;
        };
        let signatures = self.signatures_for(io, &changes);
        if !io.send_sync(device, signatures, message) {
            io.log(
                Level::Debug,
                format_args!("sync message to {device} not sent"),
            );
        }
    }

    /// Offers the document to every connected peer.
    pub(super) fn broadcast<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        let peers: Vec<DeviceId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.send_sync(io, peer);
        }
    }

    fn shared_with<I: FolderIo<Temp = T>>(&self, io: &mut I, device: &DeviceId) -> bool {
        let shared = self.membership.devices.contains(device);
        if !shared {
            io.log(
                Level::Warn,
                format_args!(
                    "sync message from {device}, a device this folder is not shared with; ignored"
                ),
            );
        }
        shared
    }

    pub(super) fn change_signatures<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        device: DeviceId,
        signed: Vec<SignedChange>,
    ) {
        if !self.shared_with(io, &device) {
            return;
        }
        let pending = self.pending_signatures.entry(device).or_default();
        if pending.len().saturating_add(signed.len()) > MAX_PENDING_SIGNATURES {
            pending.clear();
            io.log(
                Level::Warn,
                format_args!(
                    "too many change signatures from {device} before a sync message; dropped"
                ),
            );
            return;
        }
        pending.extend(signed.into_iter().map(|s| (s.hash, s.signature)));
    }

    /// Refuses a sync message whose changes are not all signed by their authors: the
    /// document goes back to what the store holds (nothing of the message was saved
    /// or acted on), every peer's sync starts over, and a device refused
    /// [`MAX_REFUSALS`] times without an accepted change in between is disconnected.
    fn refuse_sync_message<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        device: DeviceId,
        error: &ChangeSignatureError,
    ) {
        io.log(
            Level::Warn,
            format_args!(
                "sync message from {device} refused: a change is not signed by its author ({error}); nothing of it was applied"
            ),
        );
        self.reload_document(io);
        let refusals = self.refusals.entry(device).or_default();
        *refusals += 1;
        if *refusals >= MAX_REFUSALS {
            *refusals = 0;
            io.log(
                Level::Warn,
                format_args!(
                    "device {device} keeps sending changes without valid signatures; disconnecting"
                ),
            );
            io.disconnect(device);
        }
    }

    /// Paths where a change of this device's own is void (made concurrently with its
    /// removal or downgrade), however that was found (a sync message, or the document
    /// loaded again): the synced row that recorded it published is dropped,
    /// so that its version reads as a local change the folder does not hold (kept as
    /// a conflict copy, or published again once this device may edit), not as a
    /// version the folder replaced.
    pub(super) fn forget_own_void<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        let mut forget = Vec::new();
        for path in &self.document.void_paths_by(&self.device) {
            if let Ok(Some(synced)) = io.synced(path)
                && synced.entry.author == self.device
                && self.document.get(path).ok().flatten().as_ref() != Some(&synced.entry)
            {
                forget.push((path.clone(), None));
            }
        }
        if !forget.is_empty() {
            self.commit_decisions(io, &forget);
        }
    }

    /// Refuses a sync message with a change its author's role did not allow: nothing
    /// of it is saved, applied or passed on (the document goes back to what the store
    /// holds), the device is disconnected at once (an honest device never sends one:
    /// it checks what it receives before passing it on) and reported.
    fn refuse_forbidden<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        device: DeviceId,
        error: &AccessError,
    ) {
        io.log(
            Level::Warn,
            format_args!(
                "sync message from {device} refused: {error}; nothing of it was applied; disconnecting"
            ),
        );
        self.reload_document(io);
        self.pending_signatures.remove(&device);
        io.refused(device, error);
        self.peer_disconnected(device);
        io.disconnect(device);
    }

    pub(super) fn sync_message_part<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        device: DeviceId,
        bytes: &[u8],
    ) {
        if !self.shared_with(io, &device) {
            return;
        }
        let assembly = self.assemblies.entry(device).or_default();
        if let Err(error) = assembly.push_part(bytes) {
            io.log(
                Level::Warn,
                format_args!("sync message from {device} too large; dropped: {error}"),
            );
        }
    }

    pub(super) fn sync_message<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        device: DeviceId,
        bytes: Vec<u8>,
        plan: Plan,
    ) {
        if !self.shared_with(io, &device) {
            return;
        }
        let bytes = match self.assemblies.remove(&device) {
            Some(mut assembly) => assembly.finish(bytes),
            None => Ok(bytes),
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => {
                io.log(
                    Level::Warn,
                    format_args!("sync message from {device} too large; dropped: {error}"),
                );
                return;
            }
        };
        let before = self.document.heads();
        let state = self.peers.entry(device).or_default();
        if let Err(error) = self.document.receive_sync_message(state, &bytes) {
            io.log(
                Level::Warn,
                format_args!("bad sync message from {device}; ignored: {error}"),
            );
            return;
        }
        // Every change the message added must be signed by its author before anything
        // is saved or acted on. Signatures stay pending until their change arrives
        // (automerge holds back a change whose dependencies are still missing).
        let added = if self.document.heads() == before {
            Vec::new()
        } else {
            self.document.changes_since(&before)
        };
        if !added.is_empty() {
            // A signature is checked against its author's key, so it may have come from
            // any peer: a change automerge held back for a missing dependency is
            // applied when another peer sends that dependency.
            let pending = &self.pending_signatures;
            let known = &self.signatures;
            let checked = change_signature::verify(&self.id, &added, |hash| {
                pending
                    .get(&device)
                    .and_then(|own| own.get(hash))
                    .or_else(|| known.get(hash))
                    .or_else(|| pending.values().find_map(|other| other.get(hash)))
                    .copied()
            });
            match checked {
                Ok(signed) => {
                    // Progress: the device's refusals no longer count as a loop.
                    self.refusals.remove(&device);
                    self.keep_signatures(io, &signed);
                    for pending in self.pending_signatures.values_mut() {
                        for change in &signed {
                            pending.remove(&change.hash);
                        }
                    }
                    self.pending_signatures
                        .retain(|_, pending| !pending.is_empty());
                }
                Err(error) => {
                    self.pending_signatures.remove(&device);
                    self.refuse_sync_message(io, device, &error);
                    return;
                }
            }
        }
        // Every change must also be allowed by its author's role at its dependencies;
        // a change made concurrently with its author's removal is kept but void, and
        // the paths it wrote are planned again.
        let voided = match self
            .document
            .admit(&added, &self.founder, io.check_access())
        {
            Ok(paths) => paths,
            Err(error) => {
                self.refuse_forbidden(io, device, &error);
                return;
            }
        };
        self.save_received(io);
        if !voided.is_empty() {
            self.forget_own_void(io);
        }
        self.refresh_access(io);
        let mut changed = self.document.changed_paths(&before);
        changed.paths.extend(voided);
        changed.paths.sort();
        changed.paths.dedup();
        if !changed.rejected.is_empty() {
            io.log(
                Level::Warn,
                format_args!(
                    "ignored entries from {device} whose paths are invalid (absolute, '..', reserved); nothing written for them: {:?}",
                    changed.rejected
                ),
            );
        }
        let changed = changed.paths;
        // Answer this peer, and pass new changes on to the others (A-B-C chains): any
        // new change, even one that changes no visible value (a conflict resolved to a
        // value already shown), or the others never learn it.
        self.send_sync(io, device);
        if self.document.heads() != before {
            let others: Vec<DeviceId> = self
                .peers
                .keys()
                .copied()
                .filter(|d| *d != device)
                .collect();
            for other in others {
                self.send_sync(io, other);
            }
        }
        if !changed.is_empty() {
            self.plan(io, changed, plan);
        }
    }
}
