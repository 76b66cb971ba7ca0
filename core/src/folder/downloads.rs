//! Downloads: which file versions are fetched when, and how finished ones are put
//! into place.
//!
//! At most [`MAX_DOWNLOADS`] download tasks run at once; the largest file and a group
//! of small files (up to [`GROUP_FILES`] and [`GROUP_BYTES`], one task that shares
//! requests) start in turn, so that large transfers overlap with the many small files
//! whose cost is mostly file creation. The executor moves the bytes
//! ([`crate::io::Peers::start_download`]) and reports each task's end
//! ([`Folder::fetched`]); finished files are put into place in batches (one store
//! transaction for up to [`FINALIZE_BATCH`] files, waiting at most [`FINALIZE_DELAY`]),
//! each checked against the disk just before. A failed download is tried again every
//! [`RETRY_INTERVAL`] and whenever a peer connects.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use weft_protocol::document::{Entry, EntryKind};
use weft_protocol::{DeviceId, RelPath};

use super::{Fetched, Folder};
use crate::engine::{self, LocalEntry, remote_of};
use crate::io::{DownloadRequest, FolderIo, Level};
use crate::racy::nanos;
use crate::scan::{LocalChange, Scope};

/// Download tasks running at once per folder: enough to hide round trips with many
/// small files, few enough to bound memory, streams and open temp files.
pub const MAX_DOWNLOADS: usize = 32;
/// Files up to this size download in groups (one task, shared requests, one blocking
/// call per answer for the whole group).
pub const GROUP_FILE_MAX: u64 = 256 * 1024;
/// Files per download group.
pub const GROUP_FILES: usize = 16;
/// Bytes per download group.
pub const GROUP_BYTES: u64 = 2 * 1024 * 1024;
/// Finished downloads put into place together, in one store transaction.
pub const FINALIZE_BATCH: usize = 256;
/// Longest a finished download waits for others to be put into place with it: a store
/// commit (an fsync) per file would make the folder the bottleneck of many small files.
pub const FINALIZE_DELAY: Duration = Duration::from_millis(50);
/// How often failed downloads are tried again (also whenever a peer connects).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// A download queued or running.
#[derive(Debug)]
struct Download {
    id: u64,
    path: RelPath,
    entry: Entry,
    /// What the disk held when the download was planned.
    expected: Option<LocalEntry>,
    /// A restore (its ticket): the version is wanted even though the document has a
    /// newer one.
    restore: Option<u64>,
}

/// The folder's downloads.
#[derive(Debug)]
pub(super) struct Downloads<T> {
    /// Whether this folder can download at all (a node without network cannot).
    enabled: bool,
    /// Downloads queued or running: path and bytes.
    pub(super) in_flight: BTreeMap<RelPath, u64>,
    /// Downloads waiting for a slot; the largest starts first.
    queue: Vec<Download>,
    /// Downloads started, by ID, until their task reports.
    started: BTreeMap<u64, Download>,
    next_id: u64,
    /// Whether the next slot goes to a group of small files.
    small_turn: bool,
    /// Tasks running now.
    running: usize,
    /// Finished downloads waiting to be put into place, and since when (ns).
    finished: Vec<(Download, Result<Fetched<T>, String>)>,
    finished_since: Option<i64>,
    /// Paths whose download failed; planned again when peers change or at the retry.
    pub(super) failed: BTreeSet<RelPath>,
    /// When failed downloads were last tried again (ns).
    pub(super) last_retry: i64,
}

impl<T> Downloads<T> {
    pub(super) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            in_flight: BTreeMap::new(),
            queue: Vec::new(),
            started: BTreeMap::new(),
            next_id: 0,
            small_turn: false,
            running: 0,
            finished: Vec::new(),
            finished_since: None,
            failed: BTreeSet::new(),
            last_retry: 0,
        }
    }

    pub(super) fn next_deadline(&self) -> Option<i64> {
        let retry = (!self.failed.is_empty())
            .then(|| self.last_retry.saturating_add(nanos(RETRY_INTERVAL)));
        let finalize = self
            .finished_since
            .map(|since| since.saturating_add(nanos(FINALIZE_DELAY)));
        retry.into_iter().chain(finalize).min()
    }

    pub(super) fn retry_due(&self, now: i64) -> bool {
        !self.failed.is_empty() && now >= self.last_retry.saturating_add(nanos(RETRY_INTERVAL))
    }

    pub(super) fn is_idle(&self) -> bool {
        self.failed.is_empty() && self.is_idle_but_failed()
    }

    pub(super) fn is_idle_but_failed(&self) -> bool {
        self.in_flight.is_empty() && self.finished.is_empty()
    }

    /// Removes up to `files` small downloads of at most `bytes` in all from the queue.
    fn take_small_group_within(&mut self, bytes: u64, files: usize) -> Vec<Download> {
        let mut left = bytes;
        let mut chosen = Vec::new();
        for (index, download) in self.queue.iter().enumerate() {
            if chosen.len() == files {
                break;
            }
            let size = download.entry.size;
            if download.restore.is_none() && size <= GROUP_FILE_MAX && size <= left {
                left -= size;
                chosen.push(index);
            }
        }
        // Highest index first, so that each swap_remove moves an unchosen download.
        chosen
            .into_iter()
            .rev()
            .map(|index| self.queue.swap_remove(index))
            .collect()
    }

    /// Removes the largest queued download from the queue.
    fn take_largest(&mut self) -> Option<Download> {
        let largest = self
            .queue
            .iter()
            .enumerate()
            .max_by_key(|(_, d)| d.entry.size)
            .map(|(index, _)| index)?;
        Some(self.queue.swap_remove(largest))
    }

    /// The next task to start: the largest file and a group of small ones in turn.
    fn next_group(&mut self) -> Vec<Download> {
        self.small_turn = !self.small_turn;
        let mut group = if self.small_turn {
            self.take_small_group_within(GROUP_BYTES, GROUP_FILES)
        } else {
            Vec::new()
        };
        if group.is_empty() {
            let Some(largest) = self.take_largest() else {
                return group;
            };
            let groupable = largest.restore.is_none() && largest.entry.size <= GROUP_FILE_MAX;
            let room = GROUP_BYTES.saturating_sub(largest.entry.size);
            group.push(largest);
            if groupable {
                group.extend(self.take_small_group_within(room, GROUP_FILES - 1));
            }
        }
        group
    }
}

impl<T> Folder<T> {
    /// Queues the download of `entry` to `path`, planned against `expected`.
    pub(super) fn queue_download<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        path: RelPath,
        entry: Entry,
        expected: Option<LocalEntry>,
        restore: Option<u64>,
    ) {
        if !self.downloads.enabled {
            if let Some(ticket) = restore {
                io.restored(ticket, Err("the node has no network".into()));
            }
            return;
        }
        self.downloads.in_flight.insert(path.clone(), entry.size);
        self.downloads.next_id += 1;
        let id = self.downloads.next_id;
        self.downloads.queue.push(Download {
            id,
            path,
            entry,
            expected,
            restore,
        });
    }

    /// Starts queued downloads while there are free slots.
    pub(super) fn pump_downloads<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        if !self.downloads.enabled {
            return;
        }
        while self.downloads.running < MAX_DOWNLOADS {
            let group = self.downloads.next_group();
            if group.is_empty() {
                break;
            }
            let peers: Vec<DeviceId> = self
                .peers
                .keys()
                .copied()
                .filter(|device| io.is_connected(device))
                .collect();
            io.log(
                Level::Debug,
                format_args!(
                    "download starts: {} and {} more, from {} peers",
                    group[0].path,
                    group.len() - 1,
                    peers.len()
                ),
            );
            self.downloads.running += 1;
            let requests = group
                .iter()
                .map(|d| DownloadRequest {
                    id: d.id,
                    path: d.path.clone(),
                    entry: d.entry.clone(),
                })
                .collect();
            for download in group {
                self.downloads.started.insert(download.id, download);
            }
            io.start_download(requests, peers);
        }
    }

    /// A download task ended: each of its downloads (by [`DownloadRequest::id`])
    /// with its temp file, or why it failed. Its slot is free at once; putting files
    /// into place waits for a batch ([`Folder::tick`]).
    pub fn fetched<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        results: Vec<(u64, Result<Fetched<T>, String>)>,
    ) {
        self.begin_event();
        self.downloads.running = self.downloads.running.saturating_sub(1);
        for (id, result) in results {
            if let Some(download) = self.downloads.started.remove(&id) {
                self.downloads.finished.push((download, result));
            }
        }
        let now = io.monotonic_ns();
        self.downloads.finished_since.get_or_insert(now);
        self.pump_downloads(io);
    }

    /// Puts finished downloads into place if a batch is due: it is full, nothing else
    /// is running, or the oldest has waited [`FINALIZE_DELAY`].
    pub(super) fn finish_due_downloads<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        let downloads = &self.downloads;
        let due = downloads.finished.len() >= FINALIZE_BATCH
            || (!downloads.finished.is_empty() && downloads.running == 0)
            || downloads.finished_since.is_some_and(|since| {
                io.monotonic_ns() >= since.saturating_add(nanos(FINALIZE_DELAY))
            });
        if due {
            self.finish_downloads_now(io);
        }
    }

    /// Puts every finished download into place now.
    pub fn finish_downloads_now<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        self.downloads.finished_since = None;
        let batch = std::mem::take(&mut self.downloads.finished);
        if !batch.is_empty() {
            self.finish_downloads(io, batch);
        }
    }

    /// Tries failed downloads again.
    pub fn retry<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        self.begin_event();
        self.downloads.last_retry = io.monotonic_ns();
        let failed: Vec<RelPath> = std::mem::take(&mut self.downloads.failed)
            .into_iter()
            .collect();
        if !failed.is_empty() {
            self.plan_paths(io, failed);
        }
    }

    fn download_failed<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        download: Download,
        why: &str,
    ) {
        match download.restore {
            Some(ticket) => io.restored(ticket, Err(why.to_owned())),
            None => {
                self.downloads.failed.insert(download.path);
            }
        }
    }

    /// Puts finished downloads into place: each is checked against the disk, renamed
    /// over its path, and recorded (with the manifest it was verified against, so it is
    /// not hashed again); the whole batch is one store transaction.
    fn finish_downloads<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        batch: Vec<(Download, Result<Fetched<T>, String>)>,
    ) {
        let started = io.monotonic_ns();
        let files = batch.len();
        let mut changes = Vec::new();
        let mut previous = BTreeMap::new();
        let mut racy = Vec::new();
        let mut replies = Vec::new();
        let mut replan = Vec::new();
        for (download, result) in batch {
            self.downloads.in_flight.remove(&download.path);
            let fetched = match result {
                Ok(fetched) => fetched,
                Err(error) => {
                    if download.restore.is_none() {
                        io.log(
                            Level::Warn,
                            format_args!("{}: download failed; will retry: {error}", download.path),
                        );
                    }
                    let why = format!("cannot get that version's content: {error}");
                    self.download_failed(io, download, &why);
                    continue;
                }
            };
            let path = download.path.clone();
            // The version may have been superseded while it downloaded.
            let still_wanted = download.restore.is_some()
                || engine::settled_value(&remote_of(&self.document, &path))
                    == Some(&download.entry);
            let parents_ok = io.non_directory_parent(&path).is_none();
            if !still_wanted
                || !parents_ok
                || !Self::disk_matches(io, &path, download.expected.as_ref())
                || self.changed_unseen(io, &path, download.expected.as_ref())
            {
                // Changed here or there meanwhile: decide again. The temp file is kept
                // for a retry of the same version, and removed otherwise; never through
                // a parent that is no longer a directory (a symlink there leads out of
                // the folder: the scan's temp-file expiry finds it if it is still ours).
                if (!still_wanted || download.restore.is_some()) && parents_ok {
                    io.discard_temp(fetched.temp);
                }
                changed_while_restoring(io, download.restore, &path);
                replan.push(path);
                continue;
            }
            if let Some(old) = &download.expected
                && !self.keep_version(io, &path, old, Some(&fetched.manifest))
            {
                // The old version could not be kept (disk full?): leave it in place
                // and retry; the verified temp file is resumed.
                let why = format!(
                    "{path}: the current version could not be kept in the version store; nothing replaced"
                );
                self.download_failed(io, download, &why);
                continue;
            }
            let placed = io.put_into_place(
                &fetched.temp,
                &path,
                &download.entry,
                download.expected.as_ref(),
            );
            let mut local = match placed {
                Ok(Some(local)) => local,
                Ok(None) => {
                    // In place, but it cannot be read back: the rescan says what is there.
                    if let Some(ticket) = download.restore {
                        replies.push((ticket, path.to_string()));
                    }
                    replan.push(path);
                    continue;
                }
                Err(error) => {
                    io.log(
                        Level::Warn,
                        format_args!("{path}: cannot move the downloaded file into place: {error}"),
                    );
                    self.download_failed(io, download, &error.to_string());
                    continue;
                }
            };
            local.manifest = Some(fetched.manifest.hash());
            if local.kind != EntryKind::File {
                // Something else took the path at once: the rescan says what.
                changed_while_restoring(io, download.restore, &path);
                replan.push(path);
                continue;
            }
            if self.note_if_racy(io, &path, local.mtime_ns) {
                racy.push(path.clone());
            }
            if let Some(old) = download.expected {
                previous.insert(path.clone(), old);
            }
            changes.push(LocalChange::Upsert {
                path: path.clone(),
                entry: local,
                manifest: Some(fetched.manifest),
            });
            if let Some(ticket) = download.restore {
                replies.push((ticket, path.to_string()));
            }
        }
        if !changes.is_empty() {
            self.commit(io, changes, &previous, &racy);
        }
        let took_ms = io.monotonic_ns().saturating_sub(started) / 1_000_000;
        io.log(
            Level::Debug,
            format_args!("{files} downloads put into place in {took_ms} ms"),
        );
        for (ticket, path) in replies {
            io.restored(ticket, Ok(path));
        }
        if !replan.is_empty() {
            self.scan_scope(io, Scope::of(replan.iter().cloned().collect()));
            self.plan_paths(io, replan);
        }
        self.pump_downloads(io);
    }

    /// Restores a version of `path` from its history (`version`: an index, default the
    /// newest that differs from the current content) as a new version, at `to` or over
    /// the path; the outcome goes to [`crate::io::Report::restored`] with `ticket`.
    pub fn restore<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        path: RelPath,
        version: Option<usize>,
        to: Option<RelPath>,
        ticket: u64,
    ) {
        self.begin_event();
        let versions = self.history(&path);
        if versions.is_empty() {
            io.restored(ticket, Err(format!("{path} has no history in this folder")));
            return;
        }
        let current = engine::settled_value(&remote_of(&self.document, &path)).cloned();
        let chosen = match version {
            Some(index) => versions.get(index).cloned(),
            None => versions
                .iter()
                .rev()
                .find(|v| !v.deleted && !engine::same_content(Some(v), current.as_ref()))
                .cloned(),
        };
        let Some(entry) = chosen else {
            io.restored(
                ticket,
                Err("no such version (`weft versions` lists them)".into()),
            );
            return;
        };
        if entry.deleted || entry.kind != EntryKind::File {
            io.restored(
                ticket,
                Err("that version is a deletion or not a file".into()),
            );
            return;
        }
        let target = to.unwrap_or(path);
        if io.non_directory_parent(&target).is_some() {
            io.restored(
                ticket,
                Err(format!("a parent of {target} is not a directory")),
            );
            return;
        }
        let expected = io.local(&target).ok().flatten();
        // The restored file gets the time of the restore, so it is the newest version.
        let mut entry = entry;
        entry.mtime_ns = io.now_ns();
        self.queue_download(io, target, entry, expected, Some(ticket));
        self.pump_downloads(io);
    }
}

/// Tells a restore (if `ticket` names one) that `path` changed before the version
/// could be put into place.
fn changed_while_restoring<I: crate::io::Report>(io: &mut I, ticket: Option<u64>, path: &RelPath) {
    if let Some(ticket) = ticket {
        io.restored(
            ticket,
            Err(format!("{path} changed while restoring; try again")),
        );
    }
}
