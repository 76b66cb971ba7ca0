//! Scans as the folder asks for them: which rows the scanner compares against, which
//! racily clean files it hashes again, how its changes are committed in batches (each
//! offered to peers at once, with peers' sync messages answered between batches), and
//! what is done with the racy files it found.

use std::collections::BTreeSet;

use weft_protocol::RelPath;

use super::{Folder, Plan};
use crate::io::{FolderIo, Level};
use crate::racy::{RACY_RECHECK_AFTER, nanos, racy_recheck_delay};
use crate::scan::{LocalChange, ScanRequest, Scope};

use super::record::{BATCH_CHANGES, BATCH_INTERVAL, FIRST_BATCH_INTERVAL};

impl<T> Folder<T> {
    /// Scans `scope` and records what changed. Nothing is planned here; the paths that
    /// need more than recording are planned by [`Folder::after_changes`].
    pub fn scan<I: FolderIo<Temp = T>>(&mut self, io: &mut I, scope: Scope) {
        self.begin_event();
        self.scan_scope(io, scope);
    }

    /// [`Folder::scan`] within an event (a plan round's rescan, say).
    pub(super) fn scan_scope<I: FolderIo<Temp = T>>(&mut self, io: &mut I, scope: Scope) {
        let started = io.monotonic_ns();
        let full = matches!(scope, Scope::Full);
        let previous = match &scope {
            Scope::Full => io.local_under(None),
            Scope::Paths(paths) => {
                let mut rows = std::collections::BTreeMap::new();
                let mut result = Ok(());
                for path in paths {
                    match io.local_under(Some(path)) {
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
                io.log(
                    Level::Error,
                    format_args!("cannot read the local tree; scan skipped: {error}"),
                );
                io.scan_failed(&error);
                return;
            }
        };
        if full {
            self.recount(&previous);
            io.counts(&self.counts);
        }
        // Racy files in scope that are due are hashed again: a write since the last hash
        // may have left their metadata as it was. One not due yet is left for its own
        // recheck: a rescan of a large file just after the one that found it racy (the
        // watcher's and a requested one) would hash it twice while peers fetch it.
        let rehash: BTreeSet<RelPath> = self
            .racy
            .iter()
            .filter(|(path, due)| **due <= started && scope.covers(path))
            .map(|(path, _)| path.clone())
            .collect();
        self.commit_failed = false;
        let mut batch = Vec::new();
        let mut racy_batch = Vec::new();
        let mut last_commit = started;
        let mut interval = nanos(FIRST_BATCH_INTERVAL);
        let request = ScanRequest {
            scope: &scope,
            previous: &previous,
            rehash: &rehash,
        };
        let outcome = io.scan(
            request,
            &mut |io: &mut I, change: LocalChange, racy: bool| {
                if racy && let LocalChange::Upsert { path, .. } = &change {
                    racy_batch.push(path.clone());
                }
                batch.push(change);
                // A peer's message is answered with everything hashed so far.
                let input = io.peer_input_during_scan();
                let now = io.monotonic_ns();
                if batch.len() >= BATCH_CHANGES
                    || now.saturating_sub(last_commit) >= interval
                    || input.is_some()
                {
                    self.commit(
                        io,
                        std::mem::take(&mut batch),
                        &previous,
                        &std::mem::take(&mut racy_batch),
                    );
                    last_commit = io.monotonic_ns();
                    interval = nanos(BATCH_INTERVAL);
                    // Offer each committed batch at once: peers start fetching while the
                    // rest of a long scan goes on.
                    if self.published {
                        self.published = false;
                        self.broadcast(io);
                    }
                }
                // Peers' messages between batches, in their order; the paths they touch
                // are planned after the scan.
                let mut next = input;
                while let Some(input) = next {
                    self.handle_peer_input(io, input, Plan::AfterScan);
                    next = io.peer_input_during_scan();
                }
            },
        );
        self.commit(io, batch, &previous, &racy_batch);
        // Files hashed again leave the map, unless what the hash found could not be
        // committed: then they stay, due again later.
        let failed = self.commit_failed;
        let now = io.monotonic_ns();
        for path in &rehash {
            if failed {
                self.racy_due(path, Self::due_in(now, RACY_RECHECK_AFTER));
            } else {
                self.racy.remove(path);
            }
        }
        // Marks of files hashed again and no longer racy go; a mark left by a failed
        // write only costs another hash.
        let settled: Vec<RelPath> = rehash
            .iter()
            .filter(|path| !outcome.racy.iter().any(|(racy, _)| racy == *path))
            .cloned()
            .collect();
        if !failed
            && !settled.is_empty()
            && let Err(error) = io.clear_racy(&settled)
        {
            io.log(
                Level::Warn,
                format_args!("cannot clear racily clean marks; they are hashed again: {error}"),
            );
        }
        // Hashed again once the window has passed ([`racy_recheck_delay`]).
        let took = std::time::Duration::from_nanos(
            u64::try_from(now.saturating_sub(started)).unwrap_or(0),
        );
        for (path, window) in &outcome.racy {
            self.racy_due(path, Self::due_in(now, racy_recheck_delay(*window, took)));
        }
    }
}
