//! Recording: scan results become document entries and store rows, and decisions
//! (publish, resolve, mark synced) are committed, one store transaction each.
//!
//! **Invariant:** the document never holds a local change the store does not: a failed
//! commit reloads the document from the store (plus received changes not yet saved),
//! and the next scan finds the changes again.

use std::collections::BTreeMap;
use std::time::Duration;

use weft_protocol::RelPath;
use weft_protocol::change_signature::SignedChange;
use weft_protocol::document::{self, Entry, EntryKind, FolderDocument};

use super::Folder;
use crate::engine::{
    self, Action, LocalEntry, PathView, SyncedEntry, publish_entry, remote_of, tombstone,
};
use crate::io::{Commit, Counts, FolderIo, Level};
use crate::scan::LocalChange;

/// Changes per store transaction during a scan (also committed every [`BATCH_INTERVAL`]).
pub const BATCH_CHANGES: usize = 2_000;
/// Longest wait before a pending batch is committed and offered to peers.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(250);
/// A scan's first batch is committed (and offered to peers) after this already: a
/// peer waiting for a new folder starts fetching its first (small) files sooner.
pub const FIRST_BATCH_INTERVAL: Duration = Duration::from_millis(50);

impl<T> Folder<T> {
    /// The signatures of `changes`, to send with them: kept ones, and this device's own
    /// changes signed now. A change of another device that came without a signature
    /// (kept from before signatures existed) is sent without; receivers refuse it.
    pub(super) fn signatures_for<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        changes: &[document::ChangeHash],
    ) -> Vec<SignedChange> {
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
                let signature = SignedChange::sign(&self.key, &self.id, change);
                self.signatures.insert(signature.hash, signature.signature);
                made.push(signature);
                signed.push(signature);
            } else {
                io.log(
                    Level::Debug,
                    format_args!("change {change} without a kept signature; sent unsigned"),
                );
            }
        }
        if !made.is_empty()
            && let Err(error) = io.put_change_signatures(&made)
        {
            io.log(
                Level::Error,
                format_args!("keeping change signatures failed: {error}"),
            );
        }
        signed
    }

    /// Keeps verified signatures of received changes, to pass them on.
    pub(super) fn keep_signatures<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        signed: &[SignedChange],
    ) {
        let new: Vec<SignedChange> = signed
            .iter()
            .filter(|s| !self.signatures.contains_key(&s.hash))
            .copied()
            .collect();
        self.signatures
            .extend(new.iter().map(|s| (s.hash, s.signature)));
        if !new.is_empty()
            && let Err(error) = io.put_change_signatures(&new)
        {
            io.log(
                Level::Error,
                format_args!("keeping change signatures failed: {error}"),
            );
        }
    }

    /// Sets the counts from a whole local tree.
    pub(super) fn recount(&mut self, tree: &BTreeMap<RelPath, LocalEntry>) {
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
        self.counts = Counts {
            files,
            directories,
            symlinks,
            bytes,
            ..std::mem::take(&mut self.counts)
        };
    }

    /// The document entry for a local change.
    fn entry_for(&self, change: &LocalChange, now: i64) -> Option<Entry> {
        match change {
            LocalChange::Upsert {
                entry, manifest, ..
            } => Some(publish_entry(entry, manifest.as_ref(), self.device)),
            LocalChange::Remove { path } => {
                let remote = remote_of(&self.document, path);
                let current = engine::live_value(&remote)?;
                Some(tombstone(current, now, self.device))
            }
        }
    }

    /// Commits a batch of scan results (or of downloads put into place); `racy` are its
    /// paths whose rows are racily clean, `previous` the rows they replace (for the
    /// counts). On failure the document is reloaded from the store so that it never
    /// holds changes the store does not (the next scan finds them again).
    pub(super) fn commit<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        batch: Vec<LocalChange>,
        previous: &BTreeMap<RelPath, LocalEntry>,
        racy: &[RelPath],
    ) {
        if batch.is_empty() {
            return;
        }
        let now = io.now_ns();
        let mut recorded = Vec::new();
        let mut synced_updates = Vec::new();
        for change in &batch {
            let (path, local) = match change {
                LocalChange::Upsert { path, entry, .. } => (path, Some(entry)),
                LocalChange::Remove { path } => (path, None),
            };
            let synced = io.synced(path).ok().flatten();
            let view = PathView {
                path,
                local,
                synced: synced.as_ref(),
                remote: remote_of(&self.document, path),
                remote_at: &|other| remote_of(&self.document, other),
            };
            for action in engine::plan_path(&view, self.membership.mode, &self.device) {
                match action {
                    Action::Publish { .. } => {
                        let Some(entry) = self.entry_for(change, now) else {
                            continue;
                        };
                        if let Err(error) = self.document.put(path, &entry) {
                            io.log(
                                Level::Error,
                                format_args!("{path}: document write failed: {error}"),
                            );
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
        io.sync_dirs();
        let committed = io.commit(Commit {
            changes: &batch,
            synced: &synced_updates,
            increment: &increment,
            racy,
        });
        match committed {
            Ok(increments) => {
                self.stored(io, increments);
            }
            Err(error) => {
                io.log(
                    Level::Error,
                    format_args!("committing scan results failed; will rescan: {error}"),
                );
                self.commit_failed = true;
                self.store_failing = true;
                self.reload_document(io);
                return;
            }
        }
        if !recorded.is_empty() {
            self.published = true;
        }
        self.adjust_counts(&batch, previous);
        io.counts(&self.counts);
        for (path, deleted) in recorded {
            io.local_change(&path, deleted);
        }
    }

    fn adjust_counts(&mut self, batch: &[LocalChange], previous: &BTreeMap<RelPath, LocalEntry>) {
        let counts = &mut self.counts;
        let mut apply = |entry: &LocalEntry, sign: i64| {
            let (count, bytes) = match entry.kind {
                EntryKind::File => (&mut counts.files, entry.size),
                EntryKind::Directory => (&mut counts.directories, 0),
                EntryKind::Symlink => (&mut counts.symlinks, 0),
            };
            *count = count.saturating_add_signed(sign);
            let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
            counts.bytes = counts
                .bytes
                .saturating_add_signed(sign.saturating_mul(bytes));
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
    }

    /// A commit succeeded with `increments` now stored: nothing is left unsaved, the
    /// store works, and the document is compacted when it is due.
    fn stored<I: FolderIo<Temp = T>>(&mut self, io: &mut I, increments: u64) {
        self.unsaved.clear();
        self.store_failing = false;
        self.maybe_compact(io, increments);
    }

    fn maybe_compact<I: FolderIo<Temp = T>>(&mut self, io: &mut I, increments: u64) {
        if increments >= self.compact_after {
            let snapshot = self.document.save();
            if let Err(error) = io.compact(&snapshot) {
                io.log(
                    Level::Warn,
                    format_args!("document compaction failed: {error}"),
                );
            }
        }
    }

    /// Commits document operations already made (publish, resolve) with synced
    /// updates. False if the commit failed (the document is then the store's again).
    pub(super) fn commit_decisions<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        synced_updates: &[(RelPath, Option<SyncedEntry>)],
    ) -> bool {
        self.document.commit(io.now_ns() / 1_000_000, "sync");
        let increment = self.increment();
        if !increment.is_empty() {
            self.published = true;
        }
        io.sync_dirs();
        let committed = io.commit(Commit {
            changes: &[],
            synced: synced_updates,
            increment: &increment,
            racy: &[],
        });
        match committed {
            Ok(increments) => {
                self.stored(io, increments);
                true
            }
            Err(error) => {
                io.log(
                    Level::Error,
                    format_args!("committing a sync decision failed: {error}"),
                );
                self.store_failing = true;
                self.reload_document(io);
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
    pub(super) fn save_received<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        let increment = self.increment();
        if increment.is_empty() {
            return;
        }
        let committed = io.commit(Commit {
            changes: &[],
            synced: &[],
            increment: &increment,
            racy: &[],
        });
        match committed {
            Ok(increments) => {
                self.stored(io, increments);
            }
            Err(error) => {
                io.log(
                    Level::Error,
                    format_args!(
                        "saving received changes failed; kept in memory for the next commit: {error}"
                    ),
                );
                self.unsaved = increment;
                self.store_failing = true;
            }
        }
    }

    /// Drops changes that a failed commit did not store: the document becomes the
    /// store's (plus received changes not yet saved).
    pub(super) fn reload_document<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        let actor = document::actor_id(&self.device, self.actor_suffix);
        self.reloaded = true;
        match io.document() {
            Ok((snapshot, increments)) => {
                let chunks = increments
                    .iter()
                    .map(Vec::as_slice)
                    .chain((!self.unsaved.is_empty()).then_some(self.unsaved.as_slice()));
                match FolderDocument::load(&snapshot, chunks, actor) {
                    Ok(document) => {
                        self.document = document;
                        self.reloaded_void = true;
                    }
                    Err(error) => {
                        io.log(
                            Level::Error,
                            format_args!("reloading the document failed: {error}"),
                        );
                    }
                }
            }
            Err(error) => {
                io.log(
                    Level::Error,
                    format_args!("reloading the document failed: {error}"),
                );
            }
        }
    }

    /// Publishes what is on disk at `path` (a tombstone when nothing is) and records
    /// it as synced, in one transaction.
    pub(super) fn publish<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        path: &RelPath,
        local: Option<&LocalEntry>,
    ) {
        let entry = match local {
            Some(local) => {
                let manifest = local.manifest.and_then(|hash| io.manifest(&hash));
                publish_entry(local, manifest.as_ref(), self.device)
            }
            None => match engine::live_value(&remote_of(&self.document, path)) {
                Some(current) => tombstone(current, io.now_ns(), self.device),
                None => return,
            },
        };
        if self.document.put(path, &entry).is_ok() {
            let _ = self.commit_decisions(
                io,
                &[(
                    path.clone(),
                    Some(SyncedEntry {
                        entry,
                        local: local.cloned(),
                    }),
                )],
            );
        }
    }
}
