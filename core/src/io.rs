//! What the folder core needs from the world, as small traits: the executors.
//!
//! The core is generic over these traits rather than a pure "events in, effects out"
//! machine, for one measured reason: a plan round interleaves decisions with reads of
//! the disk and the store (the check before every replace, a racy file's bytes, the
//! store's rows of each path, a rescan of what the round changed), and each read
//! decides the next step. As effects, every read would become an event that resumes a
//! suspended plan, and the plan loop a hand-written coroutine. As traits (the way
//! TigerBeetle's replica is generic over its message bus, storage and time, and
//! Syncthing's folder over `fs.Filesystem`), the loop stays the straight code it is,
//! and the node and the simulation each implement the same few operations:
//!
//! - [`Disk`]: the folder's files (check, remove, rename, make, keep a version, put a
//!   download into place, sync directories before a commit).
//! - [`Store`]: the durable rows (local and synced trees, manifests, document
//!   increments, signatures, racy marks); one [`Store::commit`] is one transaction.
//! - [`Peers`]: sync messages out, disconnects, and block transfers started.
//! - [`Scan`]: the scanner (walk and hash), feeding changes back as it finds them.
//! - [`Clock`]: the time.
//! - [`Report`]: logs, status and replies to the user.
//!
//! **Invariant:** an implementation carries out what it is told or reports an error;
//! it never decides whether to act. Every "whether" is in the core.

use std::collections::BTreeMap;

use weft_protocol::change_signature::SignedChange;
use weft_protocol::document::Entry;
use weft_protocol::{DeviceId, Manifest, ManifestHash, RelPath};

use crate::engine::{LocalEntry, SyncedEntry};
use crate::scan::{LocalChange, ScanOutcome, ScanRequest};

/// An operation of an executor failed; the message says why, for a person.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct IoError {
    /// What went wrong.
    pub message: String,
}

impl IoError {
    /// An error with this message.
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
        }
    }
}

/// The time: the wall clock for what is compared with mtimes or written into the
/// document, a monotonic clock for deadlines (a wall clock set back would delay them).
pub trait Clock {
    /// Now, in ns since the Unix epoch (the clock of mtimes).
    fn now_ns(&self) -> i64;
    /// Now, in ns on a clock that never goes back (from any fixed start).
    fn monotonic_ns(&self) -> i64;
}

/// The folder's files, by path relative to its root.
pub trait Disk {
    /// A finished download's temp file, as the executor knows it.
    type Temp;

    /// What is at `path` now (without following a symlink): `None` if nothing, an
    /// error if it cannot be read (then nothing is done to it).
    fn lstat(&mut self, path: &RelPath) -> Result<Option<LocalEntry>, IoError>;
    /// The check before every replace or delete: whether the disk at `path` still
    /// holds what `expected` says (nothing, for `None`). Unreadable counts as changed:
    /// never act on what cannot be seen. Executors keep this default; the simulation
    /// replaces it only to show that its checker catches a broken one.
    fn unchanged_since_plan(&mut self, path: &RelPath, expected: Option<&LocalEntry>) -> bool {
        match self.lstat(path) {
            Ok(actual) => crate::engine::disk_unchanged(actual.as_ref(), expected),
            Err(_) => false,
        }
    }
    /// The manifest hash of the file's current bytes (`None`: cannot be read).
    fn content_hash(&mut self, path: &RelPath) -> Option<ManifestHash>;
    /// The nearest ancestor of `path` that exists and is not a real directory (a file,
    /// a symlink, or unreadable): acting on `path` would go through it.
    fn non_directory_parent(&mut self, path: &RelPath) -> Option<RelPath>;
    /// Whether `path` is a directory or nothing.
    fn is_directory_or_gone(&mut self, path: &RelPath) -> bool;
    /// Whether anything is at `path`.
    fn exists(&mut self, path: &RelPath) -> bool;
    /// Removes the node's temp files directly inside directory `dir` (abandoned
    /// downloads would keep a deleted directory alive).
    fn remove_temp_files(&mut self, dir: &RelPath);
    /// Removes the empty directory `path`.
    fn remove_dir(&mut self, path: &RelPath) -> Result<(), IoError>;
    /// Removes the file or symlink `path` (of `size` bytes).
    fn remove_file(&mut self, path: &RelPath, size: u64) -> Result<(), IoError>;
    /// Removes the file `path` without keeping anything (a file replaced by a
    /// directory, whose version was kept first); errors are ignored.
    fn discard_file(&mut self, path: &RelPath);
    /// Makes directory `path` and its parents; `mode` (permission bits, 0: default)
    /// is set on `path`.
    fn create_dir(&mut self, path: &RelPath, mode: u32) -> Result<(), IoError>;
    /// Makes a symlink to `target` at `path` (through a temp name, renamed into place),
    /// with its parents.
    fn make_symlink(&mut self, path: &RelPath, target: &str) -> Result<(), IoError>;
    /// Renames `from` to `to` (a conflict copy).
    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<(), IoError>;
    /// Keeps the blocks of the file at `path`, whose recorded content is `old`, in the
    /// version store before it is replaced (by `new`) or deleted. Succeeds without
    /// keeping anything where no version store is configured or the file no longer
    /// holds `old`; an error means it should have been kept and could not be.
    fn keep_version(
        &mut self,
        path: &RelPath,
        old: &Manifest,
        new: Option<&Manifest>,
    ) -> Result<(), IoError>;
    /// Puts the finished download `temp` into place at `path` (making its parents),
    /// replacing what is there (`replaces`, checked by the core just before), and
    /// returns what is there now, as the scanner would see it (without a manifest):
    /// `None` if it was put into place but cannot be read back. An error means it was
    /// not put into place.
    fn put_into_place(
        &mut self,
        temp: &Self::Temp,
        path: &RelPath,
        entry: &Entry,
        replaces: Option<&LocalEntry>,
    ) -> Result<Option<LocalEntry>, IoError>;
    /// Removes a download's temp file that is no longer wanted.
    fn discard_temp(&mut self, temp: Self::Temp);
    /// Makes every directory change made since the last call durable (`fsync` of the
    /// directories): called before each store commit, which could record them.
    fn sync_dirs(&mut self);
}

/// One store transaction: scan results, synced rows, a document increment, racy marks.
#[derive(Clone, Copy, Debug)]
pub struct Commit<'a> {
    /// Local rows (with their manifests and block index rows).
    pub changes: &'a [LocalChange],
    /// Synced rows to write (`None`: remove).
    pub synced: &'a [(RelPath, Option<SyncedEntry>)],
    /// The document's new bytes.
    pub increment: &'a [u8],
    /// Paths among `changes` whose rows are racily clean (a removed path loses its
    /// mark).
    pub racy: &'a [RelPath],
}

/// The folder's durable rows.
pub trait Store {
    /// The local row of one path.
    fn local(&self, path: &RelPath) -> Result<Option<LocalEntry>, IoError>;
    /// The local rows at `under` and inside it, or all of them.
    fn local_under(
        &self,
        under: Option<&RelPath>,
    ) -> Result<BTreeMap<RelPath, LocalEntry>, IoError>;
    /// The synced row of one path.
    fn synced(&self, path: &RelPath) -> Result<Option<SyncedEntry>, IoError>;
    /// Every path with a synced row.
    fn synced_paths(&self) -> Result<Vec<RelPath>, IoError>;
    /// A manifest by hash.
    fn manifest(&self, hash: &ManifestHash) -> Option<Manifest>;
    /// The stored document: a snapshot and the increments after it.
    fn document(&self) -> Result<(Vec<u8>, Vec<Vec<u8>>), IoError>;
    /// The kept signatures of the document's changes.
    fn change_signatures(&self) -> Result<Vec<SignedChange>, IoError>;
    /// One transaction; returns the number of document increments now stored.
    fn commit(&mut self, commit: Commit<'_>) -> Result<u64, IoError>;
    /// Replaces the document's increments with one snapshot.
    fn compact(&mut self, snapshot: &[u8]) -> Result<(), IoError>;
    /// Keeps signatures of document changes.
    fn put_change_signatures(&mut self, signed: &[SignedChange]) -> Result<(), IoError>;
    /// The paths whose rows are marked racily clean.
    fn racy_paths(&self) -> Result<Vec<RelPath>, IoError>;
    /// Removes the racy marks of `paths`.
    fn clear_racy(&mut self, paths: &[RelPath]) -> Result<(), IoError>;
}

/// A file version to download.
#[derive(Clone, Debug)]
pub struct DownloadRequest {
    /// Names this download in [`crate::folder::Fetched`].
    pub id: u64,
    /// The path.
    pub path: RelPath,
    /// The version wanted.
    pub entry: Entry,
}

/// The other devices sharing the folder.
pub trait Peers {
    /// Sends `device` an automerge sync message and the signatures of the changes it
    /// carries. False if it could not be sent.
    fn send_sync(
        &mut self,
        device: DeviceId,
        signatures: Vec<SignedChange>,
        message: Vec<u8>,
    ) -> bool;
    /// Closes every connection to `device`.
    fn disconnect(&mut self, device: DeviceId);
    /// Whether `device` is connected now.
    fn is_connected(&self, device: &DeviceId) -> bool;
    /// Starts downloading `group` (one large file, or small ones that share requests)
    /// from `peers`; the result comes back as one `Folder::fetched` call.
    fn start_download(&mut self, group: Vec<DownloadRequest>, peers: Vec<DeviceId>);
    /// Whether received changes are checked against the access list. Always, but for
    /// the simulation's sabotage, which shows that its checker notices when they are
    /// not.
    fn check_access(&self) -> bool {
        true
    }
}

/// Who shares the folder, and what this device does with its local changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// Whether this device publishes its local changes.
    pub mode: crate::engine::FolderMode,
    /// The other devices the folder is shared with.
    pub devices: Vec<DeviceId>,
}

/// An event from a peer that the folder handles between the batches of a scan.
#[derive(Debug)]
pub enum PeerInput {
    /// A device that shares the folder connected.
    Connected(DeviceId),
    /// It disconnected.
    Disconnected(DeviceId),
    /// Signatures of the changes in the device's next sync message.
    Signatures(DeviceId, Vec<SignedChange>),
    /// A leading piece of a sync message too large for one frame.
    SyncPart(DeviceId, Vec<u8>),
    /// A sync message (or its last piece).
    Sync(DeviceId, Vec<u8>),
    /// The folder's members or mode changed.
    Settings(Membership),
    /// This device's user sets a device's role (`None`: unshares); the outcome goes to
    /// [`Report::access_set`] with the ticket.
    Access {
        /// The device.
        device: DeviceId,
        /// Its new role.
        role: Option<weft_protocol::access::Role>,
        /// Names the reply.
        ticket: u64,
    },
}

/// The scanner.
pub trait Scan {
    /// Scans `request.scope`, handing each change to `sink` as it is found (with
    /// whether the file is racily clean), and `self` with it so that the sink can
    /// commit; returns the racy files.
    fn scan(
        &mut self,
        request: ScanRequest<'_>,
        sink: &mut dyn FnMut(&mut Self, LocalChange, bool),
    ) -> ScanOutcome
    where
        Self: Sized;
    /// An event from a peer that arrived during the scan, if it may be handled between
    /// batches (others wait for the scan's end, and so does everything after them).
    fn peer_input_during_scan(&mut self) -> Option<PeerInput>;
}

/// How much a log line matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Detail for debugging.
    Debug,
    /// Something done.
    Info,
    /// Something refused or failed that is retried or harmless.
    Warn,
    /// Something failed that needs attention.
    Error,
}

/// A folder's counts, as its status shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Regular files in the local tree.
    pub files: u64,
    /// Directories in the local tree.
    pub directories: u64,
    /// Symlinks in the local tree.
    pub symlinks: u64,
    /// Total bytes of the files.
    pub bytes: u64,
    /// Files this device still needs from peers.
    pub need_files: u64,
    /// Bytes this device still needs from peers.
    pub need_bytes: u64,
    /// Local changes not published because this device may only view the folder.
    pub local_only: Vec<RelPath>,
}

/// Logs, status, and replies to the user.
pub trait Report {
    /// A log line about the folder.
    fn log(&mut self, level: Level, message: std::fmt::Arguments<'_>);
    /// This device's change at `path` was recorded in the document.
    fn local_change(&mut self, path: &RelPath, deleted: bool);
    /// The counts changed.
    fn counts(&mut self, counts: &Counts);
    /// A scan could not run (the store's rows cannot be read).
    fn scan_failed(&mut self, error: &IoError);
    /// A restore (named by its ticket) finished: the path written, or why not.
    fn restored(&mut self, ticket: u64, result: Result<String, String>);
    /// A role change asked for with [`PeerInput::Access`] (named by its ticket) was made,
    /// or why not.
    fn access_set(&mut self, ticket: u64, result: Result<String, String>);
    /// The folder's access list changed (members, roles).
    fn access_changed(&mut self, list: &weft_protocol::access::AccessList);
    /// A sync message from `device` was refused because a change in it broke the
    /// access list (the device is disconnected; the user should see it flagged).
    fn refused(&mut self, device: DeviceId, error: &weft_protocol::access::AccessError);
}

/// Everything a folder needs, in one bound.
pub trait FolderIo: Clock + Disk + Store + Peers + Scan + Report {}

impl<T: Clock + Disk + Store + Peers + Scan + Report> FolderIo for T {}
