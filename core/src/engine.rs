//! The sync engine: pure decisions about one path, from three views of it.
//!
//! Modelled on Dropbox's Nucleus planner. For every path the engine compares
//! - **local**: what the scanner last saw on disk ([`LocalEntry`]),
//! - **remote**: what the merged folder document says (one value, or concurrent
//!   values: a conflict),
//! - **synced**: what this device and the document last agreed on ([`SyncedEntry`]),
//!
//! and returns [`Action`]s for the shell to carry out. It does no I/O, reads no clock
//! and keeps no hidden state: the same inputs give the same actions on every device,
//! which is what lets `simulations/` run it against a virtual disk and network.
//!
//! Rules (each is a test below):
//! - local matches remote: record them as synced (nothing to move).
//! - only remote changed since the last sync: apply it (write the file, make the
//!   directory or symlink, or delete what the remote deleted).
//! - only local changed: publish it (receive-only folders keep it local instead).
//! - both changed: an edit wins over a delete, on either side; two edits keep both,
//!   the local one moved aside as a conflict copy.
//! - concurrent document values: every device picks the same winner (an edit over a
//!   delete, then the newest mtime, then the larger device ID) and writes the same
//!   conflict-copy entries, so resolutions by several devices merge into one.
//!
//! "Changed" compares content (kind, manifest, mode, link target), not timestamps: a
//! file touched without a new content is not a conflict.

use serde::{Deserialize, Serialize};
use weft_protocol::document::{Content, Entry, EntryKind, FolderDocument};
use weft_protocol::{DeviceId, Manifest, ManifestHash, RelPath};

/// Marker in conflict copy names: `name.sync-conflict-YYYYMMDD-HHMMSS-<device>.ext`.
pub const CONFLICT_MARKER: &str = ".sync-conflict-";

/// What the scanner saw at a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEntry {
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Size in bytes (files).
    pub size: u64,
    /// Modification time, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// Permission bits.
    pub mode: u32,
    /// Inode number (0 where the platform has none).
    pub inode: u64,
    /// The file's manifest hash (files).
    pub manifest: Option<ManifestHash>,
    /// The link target (symlinks).
    pub symlink_target: Option<String>,
}

/// What this device and the document last agreed on at a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncedEntry {
    /// The document's entry at that moment (a tombstone if both said "deleted").
    pub entry: Entry,
    /// What was on disk at that moment (`None` for a tombstone).
    pub local: Option<LocalEntry>,
}

/// The document's view of a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Remote {
    /// The document never had the path.
    Absent,
    /// One current value (possibly a tombstone).
    Value(Entry),
    /// Concurrent values: a conflict to resolve.
    Conflict(Vec<Entry>),
}

/// Whether this device may change the folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FolderMode {
    /// Local changes are published (permission `edit`).
    SendReceive,
    /// Local changes stay local (permission `view`).
    ReceiveOnly,
}

/// Everything the engine knows about one path.
#[derive(Clone)]
pub struct PathView<'a> {
    /// The path.
    pub path: &'a RelPath,
    /// On disk now.
    pub local: Option<&'a LocalEntry>,
    /// Last agreed.
    pub synced: Option<&'a SyncedEntry>,
    /// In the document.
    pub remote: Remote,
    /// The document's view of any other path: a conflict copy is named where the
    /// document holds no other version ([`free_copy_path`]).
    pub remote_at: &'a dyn Fn(&RelPath) -> Remote,
}

impl std::fmt::Debug for PathView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathView")
            .field("path", &self.path)
            .field("local", &self.local)
            .field("synced", &self.synced)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// What the shell must do. Each action names what it expects to find, so the shell
/// can refuse to act on a disk that changed meanwhile (that is a conflict, not an
/// overwrite: the shell rescans and the engine decides again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Local and remote agree: record `entry` (and what is on disk) as synced.
    MarkSynced {
        /// The path.
        path: RelPath,
        /// The agreed document entry.
        entry: Entry,
        /// What is on disk (`None` for an agreed deletion).
        local: Option<LocalEntry>,
    },
    /// Publish the local version in the document (the shell builds the entry from
    /// the local row and its manifest).
    Publish {
        /// The path.
        path: RelPath,
    },
    /// Make the disk hold `entry`: fetch and write a file, make a directory or symlink.
    Apply {
        /// The path.
        path: RelPath,
        /// The remote version.
        entry: Entry,
        /// What must be on disk before it is replaced (`None`: nothing).
        expected: Option<LocalEntry>,
    },
    /// Delete the local file, symlink or (empty) directory: the remote deleted it.
    Remove {
        /// The path.
        path: RelPath,
        /// The remote tombstone.
        entry: Entry,
        /// What must be on disk before it is removed.
        expected: LocalEntry,
    },
    /// Move the local version aside as a conflict copy (then the remote one is applied).
    MoveToConflictCopy {
        /// The path.
        path: RelPath,
        /// The conflict copy path.
        to: RelPath,
        /// What must be on disk before it is moved.
        expected: LocalEntry,
    },
    /// Resolve concurrent document values: write `winner` at `path` and each losing
    /// edit at its conflict copy path.
    Resolve {
        /// The path.
        path: RelPath,
        /// The winning value, written again so it supersedes the others.
        winner: Entry,
        /// Conflict copies: path and the losing value.
        copies: Vec<(RelPath, Entry)>,
    },
    /// A local change that is not published (receive-only folder).
    KeepLocal {
        /// The path.
        path: RelPath,
    },
}

/// True if the disk holds exactly what `entry` describes.
pub fn local_matches(local: Option<&LocalEntry>, entry: Option<&Entry>) -> bool {
    match (local, entry) {
        (None, None) => true,
        (None, Some(entry)) => entry.deleted,
        (Some(_), None) => false,
        (Some(local), Some(entry)) => {
            if entry.deleted || local.kind != entry.kind {
                return false;
            }
            match local.kind {
                EntryKind::File => {
                    local.manifest.is_some()
                        && local.manifest == entry.content.manifest_hash()
                        && local.mode & 0o777 == entry.mode & 0o777
                }
                // A mode of 0 says nothing (entries that carry none).
                EntryKind::Directory => {
                    entry.mode & 0o777 == 0 || local.mode & 0o777 == entry.mode & 0o777
                }
                EntryKind::Symlink => match &entry.content {
                    Content::Symlink(target) => local.symlink_target.as_ref() == Some(target),
                    _ => false,
                },
            }
        }
    }
}

/// True if two document entries describe the same content (tombstones are equal).
pub fn same_content(a: Option<&Entry>, b: Option<&Entry>) -> bool {
    fn live(entry: Option<&Entry>) -> Option<&Entry> {
        entry.filter(|e| !e.deleted)
    }
    match (live(a), live(b)) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.kind == b.kind
                && match a.kind {
                    EntryKind::File => {
                        a.content.manifest_hash() == b.content.manifest_hash()
                            && a.mode & 0o777 == b.mode & 0o777
                    }
                    EntryKind::Directory => {
                        a.mode & 0o777 == 0
                            || b.mode & 0o777 == 0
                            || a.mode & 0o777 == b.mode & 0o777
                    }
                    EntryKind::Symlink => a.content == b.content,
                }
        }
        _ => false,
    }
}

/// True if `edit` was deleted by its own author afterwards: one of `values` is a
/// tombstone by the same device, written at or after the edit's mtime. A device is
/// sequential, so that delete came after the edit there; the edit is then not a
/// concurrent edit but an old value (written again by a device resolving an earlier
/// conflict), and it must not come back to life by "an edit beats a delete".
pub fn deleted_by_author(edit: &Entry, values: &[Entry]) -> bool {
    !edit.deleted
        && values
            .iter()
            .any(|t| t.deleted && t.author == edit.author && t.mtime_ns >= edit.mtime_ns)
}

/// The winner among concurrent values, the same on every device: an edit beats a
/// delete (unless its own author deleted it later, [`deleted_by_author`]), then a
/// directory beats a file or symlink, then the newest mtime, then the larger device
/// ID, then the larger encoding (so that even identical keys order totally).
///
/// Why a directory wins: the paths under it stay where they are, and the file or
/// symlink becomes the conflict copy. A directory's copy would be the directory entry
/// alone, with its contents left in the document under a path that is now a file: the
/// devices that had the directory could not remove it, published it again, and so
/// replaced the winning file's edit (found with two real nodes). A
/// directory's own mtime is not synced (it is 0), so by time alone it always lost.
pub fn pick_winner(values: &[Entry]) -> Option<&Entry> {
    let live = |e: &Entry| !e.deleted && !deleted_by_author(e, values);
    let rank = |e: &Entry| {
        (
            live(e),
            e.kind == EntryKind::Directory,
            e.mtime_ns,
            e.author,
        )
    };
    values.iter().max_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| a.encode().cmp(&b.encode()))
    })
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Hinnant's
/// civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `name.sync-conflict-YYYYMMDD-HHMMSS-<short device>.ext` beside `path`, from the
/// losing version's mtime (UTC) and author: every device derives the same name. A
/// version with no time (a directory: its mtime is not synced, so it is 0) gets no
/// stamp, `name.sync-conflict-<short device>`, rather than a date in 1970.
pub fn conflict_copy_path(path: &RelPath, mtime_ns: i64, author: &DeviceId) -> RelPath {
    let seconds = mtime_ns.div_euclid(1_000_000_000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let in_day = seconds.rem_euclid(86_400);
    let stamp = if mtime_ns == 0 {
        String::new()
    } else {
        format!(
            "{year:04}{month:02}{day:02}-{:02}{:02}{:02}-",
            in_day / 3600,
            in_day / 60 % 60,
            in_day % 60
        )
    };
    let name = path.file_name();
    let (stem, extension) = match name.rfind('.') {
        Some(dot) if dot > 0 => (&name[..dot], &name[dot..]),
        _ => (name, ""),
    };
    let copy = format!(
        "{stem}{CONFLICT_MARKER}{stamp}{}{extension}",
        author.short()
    );
    let joined = match path.parent() {
        Some(parent) => parent.join(&copy),
        None => RelPath::new(&copy),
    };
    // A name too long for the filesystem: drop the original stem, keep the marker.
    joined.unwrap_or_else(|_| {
        let short = format!("conflict{CONFLICT_MARKER}{stamp}{}", author.short());
        path.parent()
            .and_then(|parent| parent.join(&short).ok())
            .or_else(|| RelPath::new(&short).ok())
            .unwrap_or_else(|| path.clone())
    })
}

/// The `n`th alternative to a conflict-copy name (`n >= 2`), for when the name is
/// taken (two losing versions by one device written in the same second):
/// `report.sync-conflict-20261127-090304-ABCDEFG-2.txt`. `n` is added to the name
/// given, so callers trying several numbers pass the same name each time. A name that
/// the number would take past the filesystem's limit
/// ([`weft_protocol::path::MAX_COMPONENT_LEN`]) loses the end of its original name
/// (before the marker) instead; the marker, stamp, device and extension stay.
pub fn numbered_copy_path(copy: &RelPath, n: u32) -> Option<RelPath> {
    let name = copy.file_name();
    // The last marker: a copy of a conflict copy has two.
    let marker = name.rfind(CONFLICT_MARKER)?;
    // The extension (if any) follows the stamp and device: after the marker's tail.
    let tail_start = marker + CONFLICT_MARKER.len();
    let (stem, extension) = match name[tail_start..].find('.') {
        Some(dot) => name.split_at(tail_start + dot),
        None => (name, ""),
    };
    let number = format!("-{n}");
    let over = (stem.len() + number.len() + extension.len())
        .saturating_sub(weft_protocol::path::MAX_COMPONENT_LEN);
    let mut keep = marker.saturating_sub(over);
    while !stem.is_char_boundary(keep) {
        keep -= 1;
    }
    if over > 0 && keep == 0 {
        // Nothing of the original name would be left.
        return None;
    }
    let numbered = format!("{}{}{number}{extension}", &stem[..keep], &stem[marker..]);
    match copy.parent() {
        Some(parent) => parent.join(&numbered).ok(),
        None => RelPath::new(&numbered).ok(),
    }
}

/// How many numbered alternatives to a conflict-copy name are tried.
pub const MAX_COPY_NUMBER: u32 = 1000;

/// The path a conflict copy (or a path inside a directory's conflict copy) stands for,
/// read off the name [`conflict_copy_path`] or [`numbered_copy_path`] gave it:
/// `a/b.sync-conflict-20261127-090304-ABCDEFG-2.txt` -> `a/b.txt`,
/// `d.sync-conflict-ABCDEFG/x` -> `d/x`. `None` if no marker is followed by a short
/// device ID (after a stamp, unless the version had no time). A name that was
/// shortened to fit the 255-byte limit gives the shortened original.
pub fn conflict_original(path: &str) -> Option<String> {
    let marker = path.rfind(CONFLICT_MARKER)?;
    let mut tail = &path[marker + CONFLICT_MARKER.len()..];
    let digits = |bytes: &[u8]| bytes.iter().all(u8::is_ascii_digit);
    // YYYYMMDD-HHMMSS-, if the version had a time.
    if let Some(stamp) = tail.as_bytes().get(..16)
        && digits(&stamp[..8])
        && stamp[8] == b'-'
        && digits(&stamp[9..15])
        && stamp[15] == b'-'
    {
        tail = &tail[16..];
    }
    // The short device ID: base32 capitals and digits 2-7.
    let short_len = weft_protocol::identity::SHORT_ID_LEN;
    let short = tail.as_bytes().get(..short_len)?;
    if !short
        .iter()
        .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(c))
    {
        return None;
    }
    let mut rest = &tail[short_len..];
    // A numbered copy's `-N`.
    if let Some(number) = rest.strip_prefix('-') {
        let end = number.find(['.', '/']).unwrap_or(number.len());
        if end > 0 && digits(&number.as_bytes()[..end]) {
            rest = &number[end..];
        }
    }
    if !(rest.is_empty() || rest.starts_with('.') || rest.starts_with('/')) {
        return None;
    }
    Some(format!("{}{rest}", &path[..marker]))
}

/// The conflict-copy name for a version of `path` (written at `mtime_ns` by `author`)
/// that the document holds for no other version: the plain name
/// ([`conflict_copy_path`]), else its numbered alternatives `-2`, `-3`, ...
///
/// A name is free where the document has nothing live, or only values for which
/// `same` is true (another device's resolution already put this version there). Why:
/// putting a value supersedes every value the writer sees at that key, so a copy
/// written over an earlier copy of another version would delete that version from the
/// document (simulation seed 190: two rounds of concurrent edits within one second).
/// Devices that see the same document derive the same name; devices that do not may
/// pick different names, which costs a duplicate copy, never a version.
pub fn free_copy_path(
    path: &RelPath,
    mtime_ns: i64,
    author: &DeviceId,
    same: &dyn Fn(&Entry) -> bool,
    remote_at: &dyn Fn(&RelPath) -> Remote,
) -> Option<RelPath> {
    let plain = conflict_copy_path(path, mtime_ns, author);
    let free = |candidate: &RelPath| {
        let holds_other = |entry: &Entry| !entry.deleted && !same(entry);
        match remote_at(candidate) {
            Remote::Absent => true,
            Remote::Value(entry) => !holds_other(&entry),
            Remote::Conflict(values) => !values.iter().any(holds_other),
        }
    };
    if free(&plain) {
        return Some(plain);
    }
    // Every name taken (or too long): none. Writing over a taken name would delete
    // the version there from the document; the caller leaves the conflict as it is.
    (2..=MAX_COPY_NUMBER)
        .filter_map(|n| numbered_copy_path(&plain, n))
        .find(|candidate| free(candidate))
}

/// Where a file or symlink goes that replaced a directory on another device while
/// this device's copy of the directory still holds files (an edit inside, a file the
/// replacing device never saw, an ignored file): the directory stays and is published
/// again, so the replacement loses like any version that loses to a directory
/// ([`pick_winner`]) and is kept as a conflict copy, named as any loser's. Without the
/// copy, the directory published over it superseded it and it was left only in version
/// stores (simulation seed 40 under the stricter "nothing lost" check).
pub fn replacement_copy_path(
    path: &RelPath,
    replacement: &Entry,
    remote_at: &dyn Fn(&RelPath) -> Remote,
) -> Option<RelPath> {
    let same = |entry: &Entry| same_content(Some(entry), Some(replacement));
    free_copy_path(
        path,
        replacement.mtime_ns,
        &replacement.author,
        &same,
        remote_at,
    )
}

/// Paths refused because a parent is a file or symlink on this device, by that parent.
pub type Blocked = std::collections::BTreeMap<RelPath, std::collections::BTreeSet<RelPath>>;

/// Takes out of `blocked` the paths whose blocking parent `is_free` now says is a
/// directory or gone, to be planned again (one still blocked further up is refused
/// again, under that parent).
pub fn take_unblocked(
    blocked: &mut Blocked,
    mut is_free: impl FnMut(&RelPath) -> bool,
) -> Vec<RelPath> {
    let free: Vec<RelPath> = blocked.keys().filter(|b| is_free(b)).cloned().collect();
    free.iter()
        .filter_map(|blocker| blocked.remove(blocker))
        .flatten()
        .collect()
}

/// The entry a local row would publish, for conflict-copy naming and comparisons.
fn local_mtime(local: &LocalEntry) -> i64 {
    local.mtime_ns
}

/// The one value the document settles on at a path, if it does: its value, or the
/// common value of concurrent but identical writes (several devices resolving the same
/// conflict). `None` for an absent path or a real conflict.
pub fn settled_value(remote: &Remote) -> Option<&Entry> {
    match remote {
        Remote::Absent => None,
        Remote::Value(entry) => Some(entry),
        Remote::Conflict(values) => {
            let first = values.first()?;
            values.iter().all(|v| v == first).then_some(first)
        }
    }
}

/// A tombstone for `current`, written by `author` at `now`.
pub fn tombstone(current: &Entry, now: i64, author: DeviceId) -> Entry {
    Entry {
        kind: current.kind,
        deleted: true,
        size: 0,
        mtime_ns: now,
        mode: 0,
        content: Content::None,
        author,
    }
}

/// The live value a local delete at a path replaces, in the engine's view of the
/// document ([`remote_of`]), if there is one. Not automerge's own pick among the
/// path's values: that may be a value the engine set aside (a resolver's overtaken
/// rewrite of a tombstone, say), and taking it for the current value would make the
/// delete look done already and leave it unpublished on this device alone.
pub fn live_value(remote: &Remote) -> Option<&Entry> {
    match remote {
        Remote::Absent => None,
        Remote::Value(entry) => (!entry.deleted).then_some(entry),
        Remote::Conflict(values) => values.iter().find(|entry| !entry.deleted),
    }
}

/// The document's view of a path, for the engine. Undecodable values are left out, and
/// so are resolvers' rewrites of versions that have been replaced since: beside a value
/// whose writer had seen that version and written over it
/// ([`FolderDocument::overtaken_rewrites`], simulation seed 169), or beside a value the
/// version's own author wrote ([`drop_replaced_copies`], seed 82). A rewrite carries no
/// new edit, only an old version's mtime, and that version may exist nowhere any more.
/// If every value would go, all are kept.
pub fn remote_of(document: &FolderDocument, path: &RelPath) -> Remote {
    let written = document.get_all_written(path).unwrap_or_default();
    let overtaken = if written.len() > 1 {
        document.overtaken_rewrites(path).unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut decoded: Vec<((Entry, Option<DeviceId>), bool)> = written
        .into_iter()
        .enumerate()
        .filter_map(|(i, (entry, writer))| {
            let overtaken = overtaken.get(i).copied().unwrap_or(false);
            entry.ok().map(|entry| ((entry, writer), overtaken))
        })
        .collect();
    if decoded.iter().any(|(_, overtaken)| !overtaken) {
        decoded.retain(|(_, overtaken)| !overtaken);
    }
    let mut values = drop_replaced_copies(decoded.into_iter().map(|(value, _)| value).collect());
    if values.len() > 1 {
        return Remote::Conflict(values);
    }
    values.pop().map_or(Remote::Absent, Remote::Value)
}

/// Concurrent values, each with the device that wrote it into the document, minus the
/// copies of versions that their author has replaced since: a value authored by device
/// X but written by another device (one resolving an earlier conflict wrote X's version
/// again), beside a value that X wrote itself.
///
/// Why the copy is older: concurrent writes do not see each other, so the resolver never
/// saw X's own write here; it copied a version of X's that it had seen. X is sequential
/// (its document changes are committed before they are offered, and a restarted node
/// loads them), so that version came from an earlier write of X's at this path: X's
/// user replaced it. It must not win by its mtime (a file moved over another keeps its
/// older mtime), since X may no longer have its content, and nobody else may ever have
/// had it (simulation seed 82). The same reasoning as [`deleted_by_author`], for edits.
/// If the rule would leave nothing (two resolvers each wrote the other's version), every
/// value is kept.
pub fn drop_replaced_copies(written: Vec<(Entry, Option<DeviceId>)>) -> Vec<Entry> {
    let wrote_itself = |device: &DeviceId| written.iter().any(|(_, w)| w.as_ref() == Some(device));
    let replaced = |(entry, writer): &(Entry, Option<DeviceId>)| {
        writer.as_ref() != Some(&entry.author) && wrote_itself(&entry.author)
    };
    if written.iter().all(replaced) {
        return written.into_iter().map(|(entry, _)| entry).collect();
    }
    written
        .iter()
        .filter(|value| !replaced(value))
        .map(|(entry, _)| entry.clone())
        .collect()
}

/// The document entry that publishes a local row.
pub fn publish_entry(local: &LocalEntry, manifest: Option<&Manifest>, author: DeviceId) -> Entry {
    let content = match (local.kind, manifest, &local.symlink_target) {
        (EntryKind::File, Some(manifest), _) => Content::for_manifest(manifest),
        (EntryKind::Symlink, _, Some(target)) => Content::Symlink(target.clone()),
        _ => Content::None,
    };
    Entry {
        kind: local.kind,
        deleted: false,
        size: local.size,
        mtime_ns: local.mtime_ns,
        mode: local.mode,
        content,
        author,
    }
}

/// Same file content as far as metadata can tell (the scanner's test for skipping a
/// re-hash): size, mtime, inode and mode for files; mode for directories; the target
/// for symlinks.
pub fn metadata_unchanged(old: &LocalEntry, new: &LocalEntry) -> bool {
    match (old.kind, new.kind) {
        (EntryKind::File, EntryKind::File) => {
            old.size == new.size
                && old.mtime_ns == new.mtime_ns
                && old.inode == new.inode
                && old.mode == new.mode
                && old.manifest.is_some()
        }
        // A directory's mtime changes with its contents; only its mode is its own.
        (EntryKind::Directory, EntryKind::Directory) => old.mode == new.mode,
        (EntryKind::Symlink, EntryKind::Symlink) => old.symlink_target == new.symlink_target,
        _ => false,
    }
}

/// The pre-replace check: true if what is on disk now (`actual`, from `lstat`, no
/// manifest) is still what an action `expected` (nothing, for `None`). Files compare
/// size, mtime and inode: a user's write since the scan changes at least one of them.
pub fn disk_unchanged(actual: Option<&LocalEntry>, expected: Option<&LocalEntry>) -> bool {
    match (actual, expected) {
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(actual), Some(expected)) => {
            actual.kind == expected.kind
                && match actual.kind {
                    EntryKind::File => {
                        actual.size == expected.size
                            && actual.mtime_ns == expected.mtime_ns
                            && actual.inode == expected.inode
                    }
                    EntryKind::Directory => true,
                    EntryKind::Symlink => actual.symlink_target == expected.symlink_target,
                }
        }
    }
}

/// Plans one path.
pub fn plan_path(view: &PathView<'_>, mode: FolderMode, device: &DeviceId) -> Vec<Action> {
    let path = view.path.clone();
    let remote = match &view.remote {
        Remote::Absent => None,
        Remote::Value(entry) => Some(entry.clone()),
        Remote::Conflict(values) => {
            let Some(winner) = pick_winner(values).cloned() else {
                return Vec::new();
            };
            let distinct = values.iter().any(|v| v != &winner);
            if distinct && mode == FolderMode::SendReceive {
                return plan_resolution(view, values, winner);
            }
            // Identical values are not a conflict; a receive-only device shows the
            // winner and waits for a device that may write to resolve it.
            Some(winner)
        }
    };
    let remote = remote.as_ref();
    let synced = view.synced.map(|s| &s.entry);
    let local = view.local;

    if local_matches(local, remote) {
        let already = view
            .synced
            .is_some_and(|s| remote == Some(&s.entry) && s.local.as_ref() == local);
        return match remote {
            Some(entry) if !already => vec![Action::MarkSynced {
                path,
                entry: entry.clone(),
                local: local.cloned(),
            }],
            _ => Vec::new(),
        };
    }
    let local_changed = !local_matches(local, synced);
    let remote_changed = !same_content(remote, synced);
    let remote_is_edit = remote.is_some_and(|e| !e.deleted);

    if !local_changed {
        // Only the remote moved on: follow it.
        return match (remote, local) {
            (Some(entry), _) if remote_is_edit => vec![Action::Apply {
                path,
                entry: entry.clone(),
                expected: local.cloned(),
            }],
            (Some(entry), Some(local)) => vec![Action::Remove {
                path,
                entry: entry.clone(),
                expected: local.clone(),
            }],
            // Remote absent while we had agreed on something: the document lost
            // nothing (it never forgets), so this is a new document; keep local.
            _ => publish_or_keep(path, mode, local.is_some()),
        };
    }
    if !remote_changed {
        // Only the local side changed.
        return publish_or_keep(path, mode, true);
    }
    // Both changed, differently.
    match (local, remote_is_edit) {
        // Deleted here, edited there: the edit wins.
        (None, true) => match remote {
            Some(entry) => vec![Action::Apply {
                path,
                entry: entry.clone(),
                expected: None,
            }],
            None => Vec::new(),
        },
        // Edited here, deleted (or never known) there: the edit wins.
        (Some(_), false) => publish_or_keep(path, mode, true),
        // Edited on both sides: keep ours as a conflict copy, then take theirs.
        (Some(local), true) => {
            if local.kind == EntryKind::Directory
                && let Some(entry) = remote.filter(|e| e.kind == EntryKind::Directory)
            {
                // Both changed a directory's mode: the document's wins (the same on
                // every device); the contents are planned path by path.
                return vec![Action::Apply {
                    path,
                    entry: entry.clone(),
                    expected: Some(local.clone()),
                }];
            }
            let ours = |entry: &Entry| local_matches(Some(local), Some(entry));
            // No free name: the local version stays where it is, unpublished, and the
            // document's is not applied over it.
            let Some(to) = free_copy_path(&path, local_mtime(local), device, &ours, view.remote_at)
            else {
                return Vec::new();
            };
            vec![Action::MoveToConflictCopy {
                to,
                path,
                expected: local.clone(),
            }]
        }
        (None, false) => Vec::new(),
    }
}

fn publish_or_keep(path: RelPath, mode: FolderMode, local_exists: bool) -> Vec<Action> {
    match mode {
        FolderMode::SendReceive => vec![Action::Publish { path }],
        FolderMode::ReceiveOnly if local_exists => vec![Action::KeepLocal { path }],
        FolderMode::ReceiveOnly => Vec::new(),
    }
}

/// Concurrent values: the deterministic resolution, plus moving our own losing version
/// aside locally so that it need not be fetched back.
fn plan_resolution(view: &PathView<'_>, values: &[Entry], winner: Entry) -> Vec<Action> {
    let mut copies: Vec<(RelPath, Entry)> = Vec::new();
    // In one order on every device, so that two losers wanting one name get the same
    // names everywhere.
    let mut losers: Vec<&Entry> = values.iter().collect();
    losers.sort_by_cached_key(|e| (e.mtime_ns, e.author, e.encode()));
    for loser in losers {
        // A directory that lost to a directory differs in its mode only: the winner's
        // applies, and an empty copy of it would keep nothing.
        if loser.deleted
            || deleted_by_author(loser, values)
            || same_content(Some(loser), Some(&winner))
            || (loser.kind == EntryKind::Directory && winner.kind == EntryKind::Directory)
        {
            continue;
        }
        if copies.iter().any(|(_, e)| e == loser) {
            continue;
        }
        // Free in the document and among the copies this resolution writes.
        let same = |entry: &Entry| same_content(Some(entry), Some(loser));
        let remote_at = |candidate: &RelPath| {
            let chosen = copies.iter().find(|(p, _)| p == candidate);
            match (chosen, (view.remote_at)(candidate)) {
                (Some((_, entry)), Remote::Absent) => Remote::Value(entry.clone()),
                (Some((_, entry)), Remote::Value(value)) => {
                    Remote::Conflict(vec![entry.clone(), value])
                }
                (Some((_, entry)), Remote::Conflict(mut values)) => {
                    values.push(entry.clone());
                    Remote::Conflict(values)
                }
                (None, remote) => remote,
            }
        };
        let Some(copy_path) =
            free_copy_path(view.path, loser.mtime_ns, &loser.author, &same, &remote_at)
        else {
            // No free name for a loser: the conflict stays unresolved rather than
            // lose a version.
            return Vec::new();
        };
        copies.push((copy_path, loser.clone()));
    }
    // The version this device last agreed on, if its user has replaced or deleted it
    // since, gets no conflict copy (it may exist nowhere any more; simulation seed 190:
    // a user's `rm -rf` came back as a copy of the file it deleted). Left out only
    // after every loser is named: the names depend on the document alone, so a device
    // that makes the copy and one that does not still agree on every other copy's name.
    if let Some(old) = view
        .synced
        .map(|s| &s.entry)
        .filter(|entry| !local_matches(view.local, Some(entry)))
    {
        copies.retain(|(_, loser)| !same_content(Some(old), Some(loser)));
    }
    copies.sort_by(|a, b| a.0.cmp(&b.0));
    let mut actions = Vec::new();
    if let Some(local) = view.local
        && let Some((copy_path, _)) = copies
            .iter()
            .find(|(_, loser)| local_matches(Some(local), Some(loser)))
    {
        actions.push(Action::MoveToConflictCopy {
            path: view.path.clone(),
            to: copy_path.clone(),
            expected: local.clone(),
        });
    }
    actions.insert(
        0,
        Action::Resolve {
            path: view.path.clone(),
            winner,
            copies,
        },
    );
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use weft_protocol::{BlockHash, BlockRef, DeviceKey};

    fn device(seed: u8) -> DeviceId {
        DeviceKey::from_secret_bytes([seed; 32]).device_id()
    }

    fn manifest(seed: u8) -> Manifest {
        Manifest::from_blocks(vec![BlockRef {
            hash: BlockHash([seed; 32]),
            len: 10,
        }])
        .unwrap()
    }

    fn remote_file(seed: u8, author: DeviceId, mtime_ns: i64) -> Entry {
        Entry {
            kind: EntryKind::File,
            deleted: false,
            size: 10,
            mtime_ns,
            mode: 0o644,
            content: Content::for_manifest(&manifest(seed)),
            author,
        }
    }

    fn tombstone(author: DeviceId, mtime_ns: i64) -> Entry {
        Entry {
            kind: EntryKind::File,
            deleted: true,
            size: 0,
            mtime_ns,
            mode: 0,
            content: Content::None,
            author,
        }
    }

    fn local_file(seed: u8) -> LocalEntry {
        LocalEntry {
            kind: EntryKind::File,
            size: 10,
            mtime_ns: 5,
            mode: 0o644,
            inode: 1,
            manifest: Some(manifest(seed).hash()),
            symlink_target: None,
        }
    }

    fn synced(seed: u8) -> SyncedEntry {
        SyncedEntry {
            entry: remote_file(seed, device(1), 1),
            local: Some(local_file(seed)),
        }
    }

    fn path() -> RelPath {
        RelPath::new("docs/report.txt").unwrap()
    }

    /// One row of the decision table: (local seed, synced seed, remote) -> actions.
    fn plan(local: Option<u8>, synced_seed: Option<u8>, remote: Remote) -> Vec<Action> {
        let local = local.map(local_file);
        let synced = synced_seed.map(synced);
        let path = path();
        plan_path(
            &PathView {
                path: &path,
                local: local.as_ref(),
                synced: synced.as_ref(),
                remote,
                remote_at: &|_| Remote::Absent,
            },
            FolderMode::SendReceive,
            &device(9),
        )
    }

    /// The conflict copies a device holding nothing writes for concurrent `values`.
    fn resolution_copies(
        path: &RelPath,
        values: Vec<Entry>,
        remote_at: &dyn Fn(&RelPath) -> Remote,
    ) -> Vec<(RelPath, Entry)> {
        let actions = plan_path(
            &PathView {
                path,
                local: None,
                synced: None,
                remote: Remote::Conflict(values),
                remote_at,
            },
            FolderMode::SendReceive,
            &device(9),
        );
        match actions.first() {
            Some(Action::Resolve { copies, .. }) => copies.clone(),
            _ => panic!("{actions:?}"),
        }
    }

    /// Plans one path on device 9 (send and receive).
    fn plan_view(
        path: &RelPath,
        local: Option<&LocalEntry>,
        synced: Option<&SyncedEntry>,
        remote: Remote,
        remote_at: &dyn Fn(&RelPath) -> Remote,
    ) -> Vec<Action> {
        plan_path(
            &PathView {
                path,
                local,
                synced,
                remote,
                remote_at,
            },
            FolderMode::SendReceive,
            &device(9),
        )
    }

    fn kinds(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .map(|a| match a {
                Action::MarkSynced { .. } => "mark_synced",
                Action::Publish { .. } => "publish",
                Action::Apply { .. } => "apply",
                Action::Remove { .. } => "remove",
                Action::MoveToConflictCopy { .. } => "conflict_copy",
                Action::Resolve { .. } => "resolve",
                Action::KeepLocal { .. } => "keep_local",
            })
            .collect()
    }

    #[test]
    fn decision_table() {
        let a = device(1);
        let value = |seed| Remote::Value(remote_file(seed, a, 7));
        let cases: Vec<(&str, Vec<&str>)> = vec![
            (
                "in sync",
                kinds(&plan(Some(1), Some(1), Remote::Value(synced(1).entry))),
            ),
            ("new remote file", kinds(&plan(None, None, value(2)))),
            ("remote edit", kinds(&plan(Some(1), Some(1), value(2)))),
            (
                "remote delete",
                kinds(&plan(Some(1), Some(1), Remote::Value(tombstone(a, 9)))),
            ),
            (
                "local edit",
                kinds(&plan(Some(2), Some(1), Remote::Value(synced(1).entry))),
            ),
            (
                "local delete",
                kinds(&plan(None, Some(1), Remote::Value(synced(1).entry))),
            ),
            (
                "new local file",
                kinds(&plan(Some(3), None, Remote::Absent)),
            ),
            (
                "same edit both sides",
                kinds(&plan(Some(2), Some(1), value(2))),
            ),
            (
                "edit here, delete there",
                kinds(&plan(Some(2), Some(1), Remote::Value(tombstone(a, 9)))),
            ),
            (
                "delete here, edit there",
                kinds(&plan(None, Some(1), value(2))),
            ),
            (
                "edit on both sides",
                kinds(&plan(Some(3), Some(1), value(2))),
            ),
            (
                "both deleted",
                kinds(&plan(None, Some(1), Remote::Value(tombstone(a, 9)))),
            ),
        ];
        let expected = vec![
            ("in sync", vec![]),
            ("new remote file", vec!["apply"]),
            ("remote edit", vec!["apply"]),
            ("remote delete", vec!["remove"]),
            ("local edit", vec!["publish"]),
            ("local delete", vec!["publish"]),
            ("new local file", vec!["publish"]),
            ("same edit both sides", vec!["mark_synced"]),
            ("edit here, delete there", vec!["publish"]),
            ("delete here, edit there", vec!["apply"]),
            ("edit on both sides", vec!["conflict_copy"]),
            ("both deleted", vec!["mark_synced"]),
        ];
        assert_eq!(cases, expected);
    }

    #[test]
    fn receive_only_keeps_local_changes_local() {
        let path = path();
        let local = local_file(2);
        let synced = synced(1);
        let actions = plan_path(
            &PathView {
                path: &path,
                local: Some(&local),
                synced: Some(&synced),
                remote: Remote::Value(synced.entry.clone()),
                remote_at: &|_| Remote::Absent,
            },
            FolderMode::ReceiveOnly,
            &device(9),
        );
        assert_eq!(kinds(&actions), vec!["keep_local"]);
    }

    #[test]
    fn concurrent_values_resolve_identically_everywhere() {
        let (a, b) = (device(1), device(2));
        let older = remote_file(2, a, 1_000_000_000);
        let newer = remote_file(3, b, 2_000_000_000);
        let deleted = tombstone(device(3), 9_000_000_000);
        let path = path();
        let resolve = |values: Vec<Entry>, local: Option<&LocalEntry>| {
            plan_path(
                &PathView {
                    path: &path,
                    local,
                    synced: None,
                    remote: Remote::Conflict(values),
                    remote_at: &|_| Remote::Absent,
                },
                FolderMode::SendReceive,
                &device(9),
            )
        };
        let one = resolve(vec![older.clone(), newer.clone(), deleted.clone()], None);
        let other = resolve(vec![deleted, newer.clone(), older.clone()], None);
        assert_eq!(one, other, "order of values must not matter");
        let Action::Resolve { winner, copies, .. } = &one[0] else {
            panic!("{one:?}")
        };
        // The newer edit wins over both the older edit and the (newest) delete.
        assert_eq!(winner, &newer);
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].1, older);
        assert!(
            copies[0]
                .0
                .as_str()
                .contains(".sync-conflict-19700101-000001-")
        );
        // The device holding the losing version moves it aside instead of refetching.
        let local = local_file(2);
        let mine = resolve(vec![older, newer], Some(&local));
        assert_eq!(kinds(&mine), vec!["resolve", "conflict_copy"]);
        // Identical values are no conflict at all.
        let same = remote_file(4, a, 5);
        assert_eq!(
            kinds(&resolve(vec![same.clone(), same], None)),
            vec!["apply"]
        );
    }

    #[test]
    fn directory_modes_are_content() {
        let dir = |mode: u32| LocalEntry {
            kind: EntryKind::Directory,
            size: 0,
            mtime_ns: 0,
            mode,
            inode: 0,
            manifest: None,
            symlink_target: None,
        };
        let entry = |mode: u32| Entry {
            kind: EntryKind::Directory,
            deleted: false,
            size: 0,
            mtime_ns: 1,
            mode,
            content: Content::None,
            author: device(1),
        };
        let plan_dir = |local: u32, synced: u32, remote: u32| {
            let path = path();
            let synced = SyncedEntry {
                entry: entry(synced),
                local: Some(dir(synced)),
            };
            kinds(&plan_path(
                &PathView {
                    path: &path,
                    local: Some(&dir(local)),
                    synced: Some(&synced),
                    remote: Remote::Value(entry(remote)),
                    remote_at: &|_| Remote::Absent,
                },
                FolderMode::SendReceive,
                &device(9),
            ))
        };
        assert_eq!(plan_dir(0o755, 0o755, 0o700), vec!["apply"]);
        assert_eq!(plan_dir(0o700, 0o755, 0o755), vec!["publish"]);
        // Both changed: the document's mode, never a conflict copy of a directory.
        assert_eq!(plan_dir(0o750, 0o755, 0o700), vec!["apply"]);
        assert_eq!(plan_dir(0o700, 0o755, 0o700), vec!["mark_synced"]);
        // An entry without a mode matches any directory.
        assert!(local_matches(Some(&dir(0o755)), Some(&entry(0))));
    }

    #[test]
    fn a_directory_beats_a_newer_file_or_symlink_but_not_a_newer_delete_of_it() {
        let (a, b) = (device(1), device(2));
        let directory = Entry {
            kind: EntryKind::Directory,
            deleted: false,
            size: 0,
            mtime_ns: 0,
            mode: 0o755,
            content: Content::None,
            author: a,
        };
        let file = remote_file(1, b, 9_000_000_000);
        let link = Entry {
            kind: EntryKind::Symlink,
            content: Content::Symlink("/etc".into()),
            ..remote_file(2, b, 9_000_000_000)
        };
        for other in [file, link] {
            let values = [other.clone(), directory.clone()];
            assert_eq!(pick_winner(&values), Some(&directory));
            let reversed = [directory.clone(), other.clone()];
            assert_eq!(pick_winner(&reversed), Some(&directory));
            // The file or symlink is the one kept as a copy.
            let copies = resolution_copies(&path(), values.to_vec(), &|_| Remote::Absent);
            assert_eq!(copies.len(), 1, "{copies:?}");
            assert_eq!(copies[0].1, other);
        }
        // Two directories: the winner's mode applies, and no empty copy is made.
        let other_mode = Entry {
            mode: 0o700,
            author: b,
            ..directory.clone()
        };
        let copies = resolution_copies(&path(), vec![directory.clone(), other_mode], &|_| {
            Remote::Absent
        });
        assert!(copies.is_empty(), "{copies:?}");
        // A live file beats a deleted directory.
        let deleted = Entry {
            deleted: true,
            ..directory.clone()
        };
        let file = remote_file(3, b, 1);
        assert_eq!(pick_winner(&[deleted, file.clone()]), Some(&file));
    }

    #[test]
    fn an_edit_its_author_deleted_later_does_not_come_back() {
        let (a, b) = (device(1), device(2));
        // B wrote a version at t=1 and deleted it at t=5; a device resolving an older
        // conflict wrote B's version again, concurrently with the delete.
        let rewritten = remote_file(2, b, 1_000_000_000);
        let deleted = tombstone(b, 5_000_000_000);
        assert_eq!(
            pick_winner(&[rewritten.clone(), deleted.clone()]),
            Some(&deleted)
        );
        // A concurrent edit by another device still beats the delete, and B's old
        // version gets no conflict copy: its author deleted it.
        let other = remote_file(3, a, 900_000_000);
        let values = vec![rewritten, deleted, other.clone()];
        assert_eq!(pick_winner(&values), Some(&other));
        let path = path();
        let copies = &resolution_copies(&path, values, &|_| Remote::Absent);
        assert!(copies.is_empty(), "{copies:?}");
        // A delete by the author *before* its edit does not count.
        let later = remote_file(4, b, 9_000_000_000);
        assert_eq!(
            pick_winner(&[later.clone(), tombstone(b, 5_000_000_000)]),
            Some(&later)
        );
    }

    #[test]
    fn a_copy_of_a_version_its_author_replaced_does_not_win() {
        use weft_protocol::document::actor_id;
        let (x, y, z) = (device(1), device(2), device(3));
        let path = path();
        // X published a version at t=4 s beside one of Y's (t=1 s); Y resolved the
        // conflict for X's and wrote it again. Concurrently X's user moved an older
        // file (mtime t=2 s) over it.
        let mut on_x = FolderDocument::new(actor_id(&x, [1; 8]));
        let old = remote_file(1, x, 4_000_000_000);
        on_x.put(&path, &old).unwrap();
        on_x.commit(0, "x");
        // Y wrote twice, so its value is automerge's own pick among the two (a later
        // Lamport time): writing X's version then is a new operation, a copy. (Had
        // automerge picked X's, Y's write would only delete its own value.)
        let mut on_y = FolderDocument::new(actor_id(&y, [2; 8]));
        on_y.put(&path, &remote_file(5, y, 500_000_000)).unwrap();
        on_y.commit(0, "y");
        on_y.put(&path, &remote_file(4, y, 1_000_000_000)).unwrap();
        on_y.commit(0, "y again");
        let mut on_y = FolderDocument::load(
            &[],
            [on_y.save().as_slice(), on_x.save().as_slice()],
            actor_id(&y, [2; 8]),
        )
        .unwrap();
        assert_eq!(on_y.get_all(&path).unwrap().len(), 2);
        on_y.put(&path, &old).unwrap();
        on_y.commit(0, "y resolves");
        let newer = remote_file(2, x, 2_000_000_000);
        on_x.put(&path, &newer).unwrap();
        on_x.commit(0, "x moves a file over it");
        let merge = |x_saved: &[u8], y_saved: &[u8]| {
            FolderDocument::load(&[], [x_saved, y_saved], actor_id(&z, [3; 8])).unwrap()
        };
        let x_saved = on_x.save();
        let both = merge(&x_saved, &on_y.save());
        assert_eq!(both.get_all(&path).unwrap().len(), 2, "a real conflict");
        // Without the rule X's old version would win by its mtime.
        assert_eq!(pick_winner(&[old.clone(), newer.clone()]), Some(&old));
        assert_eq!(remote_of(&both, &path), Remote::Value(newer.clone()));
        // A later edit of Y's own makes a conflict with X's newer version.
        let ys = remote_file(3, y, 3_000_000_000);
        on_y.put(&path, &ys).unwrap();
        on_y.commit(0, "y edits");
        let three = merge(&x_saved, &on_y.save());
        let Remote::Conflict(mut values) = remote_of(&three, &path) else {
            panic!("{:?}", remote_of(&three, &path))
        };
        values.sort_by_key(|e| e.mtime_ns);
        assert_eq!(values, vec![newer, ys]);
    }

    #[test]
    fn replaced_copies_are_dropped_only_beside_their_authors_own_write() {
        let (x, y) = (device(1), device(2));
        let copy = remote_file(1, x, 4);
        let own = remote_file(2, x, 2);
        let other = remote_file(3, y, 3);
        // A copy with no write of its author's beside it is an ordinary value.
        assert_eq!(
            drop_replaced_copies(vec![(copy.clone(), Some(y)), (other.clone(), Some(y))]),
            vec![copy.clone(), other.clone()]
        );
        assert_eq!(
            drop_replaced_copies(vec![(copy.clone(), Some(y)), (own.clone(), Some(x))]),
            vec![own.clone()]
        );
        // Two resolvers that each wrote the other's version: nothing is dropped.
        let copy_of_y = remote_file(4, y, 5);
        assert_eq!(
            drop_replaced_copies(vec![(copy.clone(), Some(y)), (copy_of_y.clone(), Some(x))]),
            vec![copy, copy_of_y]
        );
        // A value whose writer is unknown counts as a copy.
        assert_eq!(
            drop_replaced_copies(vec![(own.clone(), None), (other.clone(), Some(x))]),
            vec![other]
        );
    }

    #[test]
    fn a_version_its_user_replaced_or_deleted_here_gets_no_copy_here() {
        let path = path();
        // This device had agreed on version 1 (synced); a concurrent edit by A wins.
        let mine = synced(1);
        let winner = remote_file(2, device(1), 9_000_000_000);
        let values = vec![mine.entry.clone(), winner.clone()];
        let resolve = |local: Option<&LocalEntry>| {
            plan_path(
                &PathView {
                    path: &path,
                    local,
                    synced: Some(&mine),
                    remote: Remote::Conflict(values.clone()),
                    remote_at: &|_| Remote::Absent,
                },
                FolderMode::SendReceive,
                &device(9),
            )
        };
        let copies = |actions: &[Action]| match actions.first() {
            Some(Action::Resolve {
                winner: w, copies, ..
            }) => {
                assert_eq!(w, &winner);
                copies.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        };
        // Still on disk: kept as a conflict copy, moved aside locally.
        let on_disk = local_file(1);
        let actions = resolve(Some(&on_disk));
        assert_eq!(copies(&actions), vec![mine.entry.clone()]);
        assert_eq!(kinds(&actions), vec!["resolve", "conflict_copy"]);
        // Deleted here since: no copy of it (it may exist nowhere any more).
        assert!(copies(&resolve(None)).is_empty());
        // Replaced here by a new edit: no copy of the old one either; the new edit
        // is this device's to publish (as a conflict copy once the winner is in).
        let edited = local_file(7);
        assert!(copies(&resolve(Some(&edited))).is_empty());
    }

    #[test]
    fn leaving_out_a_version_replaced_here_does_not_rename_the_other_copies() {
        // Two losers with one plain copy name (B, within one second); the first is
        // the version this device had synced and its user has since deleted.
        let b = device(2);
        let path = path();
        let first = remote_file(1, b, 1_100_000_000);
        let second = remote_file(3, b, 1_200_000_000);
        let winner = remote_file(4, device(1), 1_900_000_000);
        let values = vec![second.clone(), winner.clone(), first.clone()];
        let mine = SyncedEntry {
            entry: first.clone(),
            local: Some(local_file(1)),
        };
        let copies_with = |synced: Option<&SyncedEntry>| {
            let actions = plan_view(
                &path,
                None,
                synced,
                Remote::Conflict(values.clone()),
                &|_| Remote::Absent,
            );
            match actions.first() {
                Some(Action::Resolve { copies, .. }) => copies.clone(),
                other => panic!("{other:?}"),
            }
        };
        let everywhere = copies_with(None);
        let here = copies_with(Some(&mine));
        assert_eq!(everywhere.len(), 2, "{everywhere:?}");
        // Here the deleted version gets no copy, and the other keeps the name every
        // other device gives it.
        assert_eq!(here.len(), 1, "{here:?}");
        assert_eq!(here[0].1, second);
        assert!(everywhere.contains(&here[0]), "{here:?} vs {everywhere:?}");
        // The names do not depend on the order the values come in.
        let mut shuffled = values.clone();
        shuffled.reverse();
        assert_eq!(
            resolution_copies(&path, shuffled, &|_| Remote::Absent),
            everywhere
        );
    }

    #[test]
    fn a_loser_with_no_free_copy_name_leaves_the_conflict_unresolved() {
        let (a, b) = (device(1), device(2));
        let path = path();
        let loser = remote_file(2, b, 1_100_000_000);
        let winner = remote_file(4, a, 1_900_000_000);
        // Every name holds another version.
        let other = remote_file(8, a, 3);
        let taken = |_: &RelPath| Remote::Value(other.clone());
        let actions = plan_view(
            &path,
            None,
            None,
            Remote::Conflict(vec![loser, winner]),
            &taken,
        );
        assert!(actions.is_empty(), "{actions:?}");
        // Nor is a local edit moved over a taken name.
        let local = local_file(5);
        let synced = synced(1);
        let actions = plan_view(
            &path,
            Some(&local),
            Some(&synced),
            Remote::Value(remote_file(6, a, 7)),
            &taken,
        );
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn a_delete_replaces_the_live_value_of_the_engines_view() {
        let a = device(1);
        let live = remote_file(1, a, 5);
        let gone = tombstone(a, 6);
        assert_eq!(live_value(&Remote::Value(live.clone())), Some(&live));
        assert_eq!(live_value(&Remote::Value(gone.clone())), None);
        assert_eq!(live_value(&Remote::Absent), None);
        assert_eq!(
            live_value(&Remote::Conflict(vec![gone.clone(), live.clone()])),
            Some(&live)
        );
        assert_eq!(
            live_value(&Remote::Conflict(vec![gone.clone(), gone])),
            None
        );
    }

    #[test]
    fn a_conflict_copy_never_takes_a_name_the_document_holds_for_another_version() {
        let (a, b) = (device(1), device(2));
        let path = path();
        // Two rounds of concurrent edits within one second: B's losers of both rounds
        // have the same plain copy name.
        let first_loser = remote_file(2, b, 1_100_000_000);
        let second_loser = remote_file(3, b, 1_200_000_000);
        let winner = remote_file(4, a, 1_900_000_000);
        let plain = conflict_copy_path(&path, second_loser.mtime_ns, &b);
        assert_eq!(plain, conflict_copy_path(&path, first_loser.mtime_ns, &b));
        let resolve = |at_plain: Remote| {
            let remote_at = |other: &RelPath| {
                if other == &plain {
                    at_plain.clone()
                } else {
                    Remote::Absent
                }
            };
            let copies = resolution_copies(
                &path,
                vec![second_loser.clone(), winner.clone()],
                &remote_at,
            );
            assert_eq!(copies.len(), 1, "{copies:?}");
            assert_eq!(copies[0].1, second_loser);
            copies[0].0.clone()
        };
        let second = numbered_copy_path(&plain, 2).unwrap();
        // The first round's copy holds the plain name: the second goes beside it.
        assert_eq!(resolve(Remote::Value(first_loser.clone())), second);
        assert_eq!(
            resolve(Remote::Conflict(vec![
                first_loser.clone(),
                second_loser.clone()
            ])),
            second
        );
        // Free: nothing there, a deleted copy, or this very version (another device's
        // resolution wrote it already).
        assert_eq!(resolve(Remote::Absent), plain);
        assert_eq!(resolve(Remote::Value(tombstone(a, 5))), plain);
        assert_eq!(resolve(Remote::Value(second_loser.clone())), plain);
        // Two losers of one resolution with the same plain name get two names.
        let values = vec![first_loser.clone(), second_loser.clone(), winner];
        let copies = &resolution_copies(&path, values, &|_| Remote::Absent);
        let names: BTreeSet<&RelPath> = copies.iter().map(|(p, _)| p).collect();
        assert_eq!(names, BTreeSet::from([&plain, &second]));
        // A device moving its own edit aside skips a name the document holds too.
        let local = local_file(5);
        let synced = synced(1);
        let copy_of = |at_plain: Remote| {
            let remote_at = |other: &RelPath| {
                if other == &conflict_copy_path(&path, local.mtime_ns, &device(9)) {
                    at_plain.clone()
                } else {
                    Remote::Absent
                }
            };
            let actions = plan_path(
                &PathView {
                    path: &path,
                    local: Some(&local),
                    synced: Some(&synced),
                    remote: Remote::Value(remote_file(6, a, 7)),
                    remote_at: &remote_at,
                },
                FolderMode::SendReceive,
                &device(9),
            );
            match &actions[..] {
                [Action::MoveToConflictCopy { to, .. }] => to.clone(),
                other => panic!("{other:?}"),
            }
        };
        let mine = conflict_copy_path(&path, local.mtime_ns, &device(9));
        assert_eq!(copy_of(Remote::Absent), mine);
        assert_eq!(
            copy_of(Remote::Value(remote_file(7, b, 1))),
            numbered_copy_path(&mine, 2).unwrap()
        );
    }

    #[test]
    fn blocked_paths_come_back_once_their_parent_is_free() {
        let rel = |p: &str| RelPath::new(p).unwrap();
        let mut blocked = Blocked::new();
        blocked
            .entry(rel("a"))
            .or_default()
            .extend([rel("a/x"), rel("a/y/z")]);
        blocked.entry(rel("b")).or_default().insert(rel("b/w"));
        // Nothing free: nothing comes back, nothing is forgotten.
        assert!(take_unblocked(&mut blocked, |_| false).is_empty());
        assert_eq!(blocked.len(), 2);
        assert_eq!(
            take_unblocked(&mut blocked, |p| p.as_str() == "a"),
            vec![rel("a/x"), rel("a/y/z")]
        );
        assert_eq!(blocked.keys().collect::<Vec<_>>(), vec![&rel("b")]);
        assert_eq!(take_unblocked(&mut blocked, |_| true), vec![rel("b/w")]);
        assert!(blocked.is_empty());
    }

    #[test]
    fn conflict_copy_names() {
        let id = device(1);
        let at = |text: &str, mtime: i64| {
            conflict_copy_path(&RelPath::new(text).unwrap(), mtime, &id).to_string()
        };
        let short = id.short();
        // 2026-11-27 09:03:04 UTC.
        let mtime = 1_795_770_184 * 1_000_000_000;
        assert_eq!(
            at("a/b/report.txt", mtime),
            format!("a/b/report.sync-conflict-20261127-090304-{short}.txt")
        );
        assert_eq!(
            at("Makefile", mtime),
            format!("Makefile.sync-conflict-20261127-090304-{short}")
        );
        assert_eq!(
            at(".bashrc", mtime),
            format!(".bashrc.sync-conflict-20261127-090304-{short}")
        );
        assert_eq!(
            at("x.tar.gz", 1_000_000_000),
            format!("x.tar.sync-conflict-19700101-000001-{short}.gz")
        );
        // No time (a directory): no stamp.
        assert_eq!(at("photos", 0), format!("photos.sync-conflict-{short}"));
        assert_eq!(at("x.tar.gz", 0), format!("x.tar.sync-conflict-{short}.gz"));
        let copy = RelPath::new(&at("a/b/report.txt", mtime)).unwrap();
        assert_eq!(
            numbered_copy_path(&copy, 2).unwrap().to_string(),
            format!("a/b/report.sync-conflict-20261127-090304-{short}-2.txt")
        );
        let copy_of_copy = RelPath::new(&at(copy.as_str(), mtime)).unwrap();
        assert_eq!(
            numbered_copy_path(&copy_of_copy, 2).unwrap().to_string(),
            format!(
                "a/b/report.sync-conflict-20261127-090304-{short}.sync-conflict-20261127-090304-{short}-2.txt"
            )
        );
        let copy = RelPath::new(&at("Makefile", mtime)).unwrap();
        assert_eq!(
            numbered_copy_path(&copy, 3).unwrap().to_string(),
            format!("Makefile.sync-conflict-20261127-090304-{short}-3")
        );
        assert_eq!(numbered_copy_path(&path(), 2), None);
        let long = format!("{}.txt", "n".repeat(250));
        assert!(at(&long, mtime).starts_with("conflict.sync-conflict-"));
    }

    #[test]
    fn a_copy_names_its_original() {
        let id = device(1);
        let mtime = 1_795_770_184 * 1_000_000_000;
        for (original, mtime) in ["a/b/report.txt", "Makefile", ".bashrc", "x.tar.gz", "d/e"]
            .into_iter()
            .flat_map(|original| [(original, mtime), (original, 0)])
        {
            let copy = conflict_copy_path(&RelPath::new(original).unwrap(), mtime, &id);
            assert_eq!(conflict_original(copy.as_str()).as_deref(), Some(original));
            for n in [2, 10, 1000] {
                let numbered = numbered_copy_path(&copy, n).unwrap();
                assert_eq!(
                    conflict_original(numbered.as_str()).as_deref(),
                    Some(original),
                    "{numbered}"
                );
            }
            // A file inside a directory's conflict copy.
            let inside = format!("{copy}/inner/f.txt");
            assert_eq!(
                conflict_original(&inside),
                Some(format!("{original}/inner/f.txt"))
            );
        }
        let short = id.short();
        for not_a_copy in [
            "plain.txt".to_owned(),
            "a.sync-conflict-.txt".to_owned(),
            format!("a.sync-conflict-2026112-090304-{short}.txt"),
            format!("a.sync-conflict-20261127-090304-{short}x.txt"),
            "a.sync-conflict-abcdefg.txt".to_owned(),
            "a.sync-conflict-ABC.txt".to_owned(),
        ] {
            assert_eq!(conflict_original(&not_a_copy), None, "{not_a_copy}");
        }
    }

    #[test]
    fn a_copy_name_at_the_length_limit_is_numbered_by_shortening_the_original_name() {
        let id = device(1);
        let mtime = 1_795_770_184 * 1_000_000_000;
        let tail = format!(".sync-conflict-20261127-090304-{}", id.short());
        for letter in ["n", "é"] {
            // The plain copy name is exactly at the limit (or one byte under it, where
            // a two-byte letter does not fit).
            let count = (255 - tail.len() - ".txt".len()) / letter.len();
            let original = format!("dir/{}.txt", letter.repeat(count));
            let plain = conflict_copy_path(&RelPath::new(&original).unwrap(), mtime, &id);
            assert!(plain.file_name().len() >= 254, "{plain}");
            let mut names = BTreeSet::new();
            for n in [2, 9, 10, 999, 1000] {
                let numbered = numbered_copy_path(&plain, n).unwrap();
                let name = numbered.file_name();
                assert!(name.len() <= 255, "{name}");
                assert!(name.starts_with(letter), "{name}");
                assert!(name.ends_with(&format!("{tail}-{n}.txt")), "{name}");
                assert_eq!(numbered.parent().map(|p| p.to_string()), Some("dir".into()));
                assert!(names.insert(name.to_owned()));
            }
        }
        // A name that is mostly extension keeps its extension; with nothing of the
        // original name left to shorten, it is not numbered.
        let extension = |stem: &str| {
            let rest = 255 - stem.len() - tail.len() - 1;
            RelPath::new(&format!("{stem}{tail}.{}", "e".repeat(rest))).unwrap()
        };
        let numbered = numbered_copy_path(&extension("abc"), 2).unwrap();
        assert!(numbered.as_str().starts_with(&format!("a{tail}-2.ee")));
        assert_eq!(numbered.as_str().len(), 255);
        assert_eq!(numbered_copy_path(&extension("a"), 2), None);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
