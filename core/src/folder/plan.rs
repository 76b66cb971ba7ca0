//! Planning and carrying out: the engine's actions for each path, done through the
//! executor's disk with the checks the engine relies on.
//!
//! A plan round asks the engine about every path (children before their parents: a
//! directory is removed after its contents), carries each action out, and rescans what
//! it changed; the rescan records the changes and may plan again, up to
//! [`MAX_PLAN_ROUNDS`] rounds. Before any replace or delete, the disk must still hold
//! what the plan was made against ([`engine::disk_unchanged`], and for a racily clean
//! file its bytes): otherwise the path is rescanned and decided again. A path whose
//! parent is a file or symlink on this device is refused and remembered by that parent
//! ([`engine::Blocked`]), to be planned again once it is a directory or gone.

use std::collections::{BTreeSet, VecDeque};

use weft_protocol::RelPath;
use weft_protocol::document::{Content, Entry, EntryKind};

use super::{Folder, MAX_LOCAL_ONLY_SHOWN, Plan};
use crate::engine::{
    self, Action, FolderMode, LocalEntry, PathView, Remote, SyncedEntry, remote_of,
};
use crate::io::{FolderIo, Level};
use crate::racy::{is_racy, racy_recheck_delay, racy_window};
use crate::scan::Scope;

/// Longest chain of plan -> act -> rescan -> plan rounds after one trigger; real
/// convergence takes two or three, so more means a bug, logged rather than looped.
pub const MAX_PLAN_ROUNDS: usize = 8;

impl<T> Folder<T> {
    /// Plans `paths` now, or after the scan in progress.
    pub(super) fn plan<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        paths: Vec<RelPath>,
        plan: Plan,
    ) {
        match plan {
            Plan::Now => self.plan_paths(io, paths),
            Plan::AfterScan => self.needs_plan.extend(paths),
        }
    }

    /// Plans every path the document, the local tree or the synced tree knows: after
    /// start (work left by a crash) and after each full scan (the periodic repair).
    pub(super) fn plan_all<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        let mut paths: BTreeSet<RelPath> = BTreeSet::new();
        match io.local_under(None) {
            Ok(tree) => paths.extend(tree.into_keys()),
            Err(error) => io.log(
                Level::Error,
                format_args!("reading the local tree failed: {error}"),
            ),
        }
        if let Ok(synced) = io.synced_paths() {
            paths.extend(synced);
        }
        paths.extend(
            self.document
                .entries()
                .filter_map(Result::ok)
                .map(|entry| entry.path),
        );
        self.plan_paths(io, paths.into_iter().collect());
    }

    /// After any event: plan what scans left over, offer new local changes to peers,
    /// report the counts.
    pub fn after_changes<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        for _ in 0..MAX_PLAN_ROUNDS {
            if self.needs_plan.is_empty() || self.store_failing {
                break;
            }
            let paths: Vec<RelPath> = std::mem::take(&mut self.needs_plan).into_iter().collect();
            self.plan_paths(io, paths);
        }
        if self.reloaded {
            // The document lost changes peers were told about: start their syncs over.
            self.reloaded = false;
            for state in self.peers.values_mut() {
                *state = weft_protocol::document::SyncState::new();
            }
            self.published = true;
        }
        if self.published {
            self.published = false;
            self.broadcast(io);
        }
        self.counts.need_bytes = self.downloads.in_flight.values().sum();
        self.counts.need_files = self.downloads.in_flight.len() as u64;
        io.counts(&self.counts);
    }

    /// Remembers a file this device just wrote and records without hashing (a
    /// download put into place) as racily clean if its mtime is within its timestamp
    /// granularity of now: a user's write of the same size right after would keep the
    /// metadata recorded here. Returns whether it is racy (its row is then to be
    /// marked in the store).
    pub(super) fn note_if_racy<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        path: &RelPath,
        mtime_ns: i64,
    ) -> bool {
        let racy = is_racy(mtime_ns, io.now_ns());
        if racy {
            let delay = racy_recheck_delay(racy_window(mtime_ns), std::time::Duration::ZERO);
            self.racy_due(path, Self::due_in(io.monotonic_ns(), delay));
        }
        racy
    }

    /// True if the disk at `path` holds what `expected` says (nothing, for `None`).
    pub(super) fn disk_matches<I: FolderIo<Temp = T>>(
        io: &mut I,
        path: &RelPath,
        expected: Option<&LocalEntry>,
    ) -> bool {
        io.unchanged_since_plan(path, expected)
    }

    /// Whether the file at `path` holds other content than `expected` (what an action
    /// was planned against) in a way [`Self::disk_matches`] cannot see: a write of the
    /// same size within the file's timestamp granularity leaves size, mtime and inode
    /// as they were. True if a scan since the plan recorded other content there (a
    /// racy file hashed again), or if the file is racy now and its bytes differ; it is
    /// then due at once, so that the rescan that follows records the write. Only racy
    /// files are hashed here; one that cannot be read counts as changed.
    pub(super) fn changed_unseen<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        path: &RelPath,
        expected: Option<&LocalEntry>,
    ) -> bool {
        let Some(want) = expected
            .filter(|e| e.kind == EntryKind::File)
            .and_then(|e| e.manifest)
        else {
            return false;
        };
        let recorded = io.local(path).ok().flatten().and_then(|row| row.manifest);
        if recorded != Some(want) {
            return true;
        }
        if !self.racy.contains_key(path) {
            return false;
        }
        let changed = io.content_hash(path) != Some(want);
        if changed {
            let now = io.monotonic_ns();
            self.racy_due(path, now);
        }
        changed
    }

    /// Plans `paths` and carries the actions out; disk changes are rescanned, which
    /// records them and may plan again (bounded by [`MAX_PLAN_ROUNDS`]).
    pub(super) fn plan_paths<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        mut paths: Vec<RelPath>,
    ) {
        if self.store_failing {
            // Nothing could be recorded: the paths wait for the next event.
            self.needs_plan.extend(paths);
            return;
        }
        if self.reloaded_void {
            // The document was loaded again: its void changes were found anew, this
            // device's own among them.
            self.reloaded_void = false;
            let own = self.document.void_paths_by(&self.device);
            if !own.is_empty() {
                self.forget_own_void(io);
                paths.extend(own);
            }
        }
        // Children before their parents: a directory is removed after its contents
        // (and files create their parent directories themselves).
        paths.extend(self.unblocked(io));
        paths.sort_unstable_by(|a, b| b.cmp(a));
        paths.dedup();
        let mut queue: VecDeque<RelPath> = paths.into_iter().collect();
        let mut rounds = 0;
        while !queue.is_empty() && rounds < MAX_PLAN_ROUNDS {
            rounds += 1;
            let mut rescan: BTreeSet<RelPath> = BTreeSet::new();
            let mut seen: BTreeSet<RelPath> = BTreeSet::new();
            while let Some(path) = queue.pop_front() {
                if self.downloads.in_flight.contains_key(&path) || !seen.insert(path.clone()) {
                    continue;
                }
                let local = match io.local(&path) {
                    Ok(row) => row,
                    Err(error) => {
                        io.log(
                            Level::Error,
                            format_args!("reading the local tree failed: {error}"),
                        );
                        continue;
                    }
                };
                let synced = io.synced(&path).ok().flatten();
                let view = PathView {
                    path: &path,
                    local: local.as_ref(),
                    synced: synced.as_ref(),
                    remote: remote_of(&self.document, &path),
                    remote_at: &|other| remote_of(&self.document, other),
                };
                let actions = engine::plan_path(&view, self.membership.mode, &self.device);
                for action in actions {
                    self.execute(io, action, local.as_ref(), &mut rescan);
                }
            }
            self.record_removals(io);
            if !rescan.is_empty() {
                self.scan_scope(io, Scope::of(rescan));
            }
            if self.store_failing {
                // Nothing can be recorded: the rest waits for the next event.
                self.needs_plan.extend(queue.drain(..));
                io.log(
                    Level::Warn,
                    format_args!(
                        "the store cannot commit; {} paths wait for the next event",
                        self.needs_plan.len()
                    ),
                );
                break;
            }
            let mut next: Vec<RelPath> = std::mem::take(&mut self.needs_plan).into_iter().collect();
            next.extend(self.unblocked(io));
            next.extend(queue.drain(..));
            next.sort_unstable_by(|a, b| b.cmp(a));
            next.dedup();
            queue.extend(next);
        }
        if !queue.is_empty() {
            io.log(
                Level::Warn,
                format_args!(
                    "planning did not settle; will retry on the next change ({} paths left, first {:?})",
                    queue.len(),
                    queue.iter().take(4).map(RelPath::as_str).collect::<Vec<_>>()
                ),
            );
            self.needs_plan.extend(queue);
        }
        // Started once everything is planned, so that small files go in groups.
        self.pump_downloads(io);
    }

    /// Carries out one engine action as a plan round does (refused under a file or
    /// symlink, the check before a replace or delete, the version kept, the commit),
    /// and starts the downloads it queued; returns the paths it changed on disk. For
    /// property checks that apply the engine's actions in an order of their own.
    pub fn carry_out<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        action: Action,
        local: Option<&LocalEntry>,
    ) -> Vec<RelPath> {
        self.begin_event();
        let mut rescan = BTreeSet::new();
        self.execute(io, action, local, &mut rescan);
        self.record_removals(io);
        self.pump_downloads(io);
        rescan.into_iter().collect()
    }

    /// Commits the deletions carried out in this round as synced, before the rescan
    /// records their paths. Without it, a path this device emptied for the document's
    /// tombstone reads as its user's delete if the document meanwhile gets the old
    /// content back at that path (a conflict copy named like the deleted file, written
    /// by a resolution in the same round): the deletion was published over that copy,
    /// and its version was lost (simulation seed 4039, 6 devices, 1500 steps). One
    /// commit per round, not per file: a remote `rm -rf` of many files is one round.
    fn record_removals<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        if self.removed.is_empty() {
            return;
        }
        let removed = std::mem::take(&mut self.removed);
        let _ = self.commit_decisions(io, &removed);
    }

    /// Takes the blocked paths whose blocking parent is now a directory or gone, to be
    /// planned again. One still blocked by something further up is refused again
    /// under that.
    fn unblocked<I: FolderIo<Temp = T>>(&mut self, io: &mut I) -> Vec<RelPath> {
        if self.blocked.is_empty() {
            return Vec::new();
        }
        engine::take_unblocked(&mut self.blocked, |blocker| {
            io.is_directory_or_gone(blocker)
        })
    }

    fn execute<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        action: Action,
        local: Option<&LocalEntry>,
        rescan: &mut BTreeSet<RelPath>,
    ) {
        let touches_disk = match &action {
            // A conflict copy goes beside its original: one check covers both.
            Action::Apply { path, .. }
            | Action::Remove { path, .. }
            | Action::MoveToConflictCopy { path, .. } => Some(path),
            _ => None,
        };
        if let Some(path) = touches_disk
            && let Some(blocker) = io.non_directory_parent(path)
        {
            io.log(
                Level::Warn,
                format_args!(
                    "{path} refused: its parent {blocker} is a symlink or file on this device; planned again when it is a directory or gone"
                ),
            );
            self.blocked
                .entry(blocker)
                .or_default()
                .insert(path.clone());
            return;
        }
        match action {
            Action::MarkSynced { path, entry, local } => {
                self.counts.local_only.retain(|p| *p != path);
                let _ = self.commit_decisions(io, &[(path, Some(SyncedEntry { entry, local }))]);
            }
            Action::Publish { path } => self.publish(io, &path, local),
            Action::Resolve {
                path,
                winner,
                copies,
            } => {
                let mut ok = self.document.put(&path, &winner).is_ok();
                for (copy, entry) in &copies {
                    ok &= self.document.put(copy, entry).is_ok();
                }
                if ok && self.commit_decisions(io, &[]) {
                    io.log(
                        Level::Info,
                        format_args!(
                            "{path}: conflict resolved ({} copies: {})",
                            copies.len(),
                            copies
                                .iter()
                                .map(|(copy, entry)| format!("{copy} = {}", describe(entry)))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                    // Planned again in the next round, now that the document agrees.
                    self.needs_plan.insert(path);
                    self.needs_plan
                        .extend(copies.into_iter().map(|(copy, _)| copy));
                }
            }
            Action::Apply {
                path,
                entry,
                expected,
            } => self.apply(io, path, entry, expected, local, rescan),
            Action::Remove {
                path,
                entry,
                expected,
            } => self.remove(io, path, entry, expected, local, rescan),
            Action::MoveToConflictCopy { path, to, expected } => {
                if !Self::disk_matches(io, &path, Some(&expected)) {
                    rescan.insert(path);
                    return;
                }
                // The name is taken (an earlier version moved aside in the same
                // second): number this one.
                let planned = to.clone();
                let mut to = to;
                let mut n = 2;
                while io.exists(&to) {
                    match engine::numbered_copy_path(&planned, n) {
                        Some(next) if n < engine::MAX_COPY_NUMBER => to = next,
                        _ => {
                            io.log(
                                Level::Warn,
                                format_args!("{path}: no free conflict-copy name"),
                            );
                            return;
                        }
                    }
                    n += 1;
                }
                // Nothing is synced at `path` once its version is moved aside: forgotten
                // first (a crash between the two then only resolves again). Kept, the
                // old row made the empty path read as the user's delete of it, and a
                // later remote value with that same content (another device renaming the
                // copy back, say) as unchanged: the node published the delete
                // (simulation seed 200 under the stricter "nothing lost" check).
                if !self.commit_decisions(io, &[(path.clone(), None)]) {
                    return;
                }
                match io.rename(&path, &to) {
                    Ok(()) => io.log(
                        Level::Info,
                        format_args!(
                            "{path}: conflict: local version kept as the conflict copy {to}"
                        ),
                    ),
                    Err(error) => io.log(
                        Level::Warn,
                        format_args!("{path}: cannot make a conflict copy: {error}"),
                    ),
                }
                rescan.insert(path);
                rescan.insert(to);
            }
            Action::KeepLocal { path } => self.keep_local(path),
        }
    }

    /// Lists `path` among the local changes this device keeps unpublished.
    fn keep_local(&mut self, path: RelPath) {
        if self.counts.local_only.len() < MAX_LOCAL_ONLY_SHOWN
            && !self.counts.local_only.contains(&path)
        {
            self.counts.local_only.push(path);
        }
    }

    /// Carries out [`Action::Apply`]: makes a directory or symlink at once, or queues
    /// the download of a file.
    fn apply<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        path: RelPath,
        entry: Entry,
        expected: Option<LocalEntry>,
        local: Option<&LocalEntry>,
        rescan: &mut BTreeSet<RelPath>,
    ) {
        if !Self::disk_matches(io, &path, expected.as_ref())
            || self.changed_unseen(io, &path, expected.as_ref())
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
            // A directory replaced by a file or symlink: only an empty one can go. One
            // still holding files stays and is published again (an edit inside wins
            // over the replacement), and the replacement becomes a conflict copy.
            io.remove_temp_files(&path);
            if let Err(error) = io.remove_dir(&path) {
                io.log(
                    Level::Info,
                    format_args!("{path}: directory kept: it still holds files ({error})"),
                );
                if self.membership.mode == FolderMode::SendReceive && local.is_some() {
                    self.keep_replacement_as_copy(io, &path, &entry);
                    self.publish(io, &path, local);
                }
                rescan.insert(path);
                return;
            }
            expected = None;
        }
        match entry.kind {
            EntryKind::Directory => {
                if let Some(expected) = &expected
                    && expected.kind != EntryKind::Directory
                {
                    // A file replaced by a directory: keep its content first.
                    if !self.keep_version(io, &path, expected, None) {
                        self.downloads.failed.insert(path);
                        return;
                    }
                    io.discard_file(&path);
                }
                if let Err(error) = io.create_dir(&path, entry.mode) {
                    io.log(
                        Level::Warn,
                        format_args!("{path}: cannot create directory: {error}"),
                    );
                }
                rescan.insert(path);
            }
            EntryKind::Symlink => {
                // A file replaced by a symlink: keep its content first (a conflict copy
                // of it may still be fetched from there).
                if let Some(expected) = &expected
                    && !self.keep_version(io, &path, expected, None)
                {
                    self.downloads.failed.insert(path);
                    return;
                }
                if let Content::Symlink(target) = &entry.content
                    && let Err(error) = io.make_symlink(&path, target)
                {
                    io.log(
                        Level::Warn,
                        format_args!("{path}: cannot create symlink: {error}"),
                    );
                }
                rescan.insert(path);
            }
            EntryKind::File => self.queue_download(io, path, entry, expected, None),
        }
    }

    /// Carries out [`Action::Remove`].
    fn remove<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        path: RelPath,
        tombstone: Entry,
        expected: LocalEntry,
        local: Option<&LocalEntry>,
        rescan: &mut BTreeSet<RelPath>,
    ) {
        if !Self::disk_matches(io, &path, Some(&expected))
            || self.changed_unseen(io, &path, Some(&expected))
        {
            rescan.insert(path);
            return;
        }
        if expected.kind == EntryKind::File && !self.keep_version(io, &path, &expected, None) {
            // Never destroy what could not be kept; try again later.
            self.downloads.failed.insert(path);
            return;
        }
        let removed = match expected.kind {
            EntryKind::Directory => {
                io.remove_temp_files(&path);
                io.remove_dir(&path)
            }
            _ => io.remove_file(&path, expected.size),
        };
        match removed {
            Ok(()) => {
                io.log(Level::Debug, format_args!("{path}: removed"));
                self.removed.push((
                    path.clone(),
                    Some(SyncedEntry {
                        entry: tombstone,
                        local: None,
                    }),
                ));
            }
            Err(error) if expected.kind == EntryKind::Directory => {
                // Still holds files. If they are all tracked and going away too, try
                // again after them; otherwise (a kept child: a local edit or a file the
                // remote still has; or files that are not synced at all, like ignored
                // ones) the directory stays and is published again: an edit wins over a
                // delete, and a directory planned for removal forever would never settle.
                // A child is going if the document deleted it and it is as it was
                // synced: a local change there stays (published, or kept local by a
                // receive-only device), and so does the directory.
                let children = io.local_under(Some(&path)).unwrap_or_default();
                let mut children = children.iter().filter(|(child, _)| **child != path);
                let all_going = children.clone().next().is_some()
                    && children.all(|(child, row)| {
                        let deleted = matches!(
                            remote_of(&self.document, child),
                            Remote::Value(ref e) if e.deleted
                        );
                        let synced = io.synced(child).ok().flatten();
                        deleted
                            && synced.is_some_and(|s| {
                                s.local
                                    .as_ref()
                                    .is_some_and(|at| engine::metadata_unchanged(at, row))
                            })
                    });
                if all_going {
                    self.needs_plan.insert(path.clone());
                } else {
                    io.log(
                        Level::Info,
                        format_args!("{path}: directory kept: it still holds files ({error})"),
                    );
                    match self.membership.mode {
                        FolderMode::SendReceive if local.is_some() => {
                            self.publish(io, &path, local);
                        }
                        // Kept for the local changes inside it: a local change itself.
                        FolderMode::ReceiveOnly => self.keep_local(path.clone()),
                        FolderMode::SendReceive => {}
                    }
                }
            }
            Err(error) => io.log(Level::Warn, format_args!("{path}: cannot delete: {error}")),
        }
        rescan.insert(path);
    }

    /// Puts `replacement`, the file or symlink that lost to the directory kept at
    /// `path`, into the document as a conflict copy ([`engine::replacement_copy_path`]);
    /// committed with the directory's publication that follows.
    fn keep_replacement_as_copy<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        path: &RelPath,
        replacement: &Entry,
    ) {
        let document = &self.document;
        let copy =
            engine::replacement_copy_path(path, replacement, &|other| remote_of(document, other));
        match copy {
            Some(copy) if self.document.put(&copy, replacement).is_ok() => {
                io.log(
                    Level::Info,
                    format_args!(
                        "{path}: conflict: the file that replaced the directory is kept as the conflict copy {copy}"
                    ),
                );
                self.needs_plan.insert(copy);
            }
            _ => io.log(
                Level::Warn,
                format_args!(
                    "{path}: no conflict-copy name for the file that replaced the directory; the directory wins alone"
                ),
            ),
        }
    }

    /// Keeps the version of the local file at `path` (recorded as `old`) about to be
    /// replaced (by `new`) or deleted. False if it should have been kept and could not
    /// be: the caller then leaves the file alone.
    pub(super) fn keep_version<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        path: &RelPath,
        old: &LocalEntry,
        new: Option<&weft_protocol::Manifest>,
    ) -> bool {
        if old.kind != EntryKind::File {
            return true;
        }
        let Some(manifest) = old.manifest.and_then(|hash| io.manifest(&hash)) else {
            return true;
        };
        match io.keep_version(path, &manifest, new) {
            Ok(()) => true,
            Err(error) => {
                io.log(
                    Level::Warn,
                    format_args!(
                        "{path}: could not keep the old version; the file is left in place and retried: {error}"
                    ),
                );
                false
            }
        }
    }
}

/// An entry as logs show it: `deleted`, or its kind, first hash bytes and author.
pub fn describe(entry: &Entry) -> String {
    if entry.deleted {
        return format!("deleted by {}", entry.author.short());
    }
    let hash = entry
        .content
        .manifest_hash()
        .map_or("-".to_owned(), |h| h.to_hex()[..8].to_owned());
    format!("{:?} {hash} by {}", entry.kind, entry.author.short())
}
