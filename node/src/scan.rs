//! The scanner: what is on disk now, compared with what the store last saw.
//!
//! The scanner is the truth about the local tree; the watcher only says where to look.
//! A scan walks the folder (or some paths of it), `lstat`s every entry, and compares it
//! with the stored [`LocalEntry`]: a file is re-chunked only when its size, mtime, inode
//! or mode changed. Changed files are chunked and hashed on every core (one worker per
//! core; a large file also overlaps cutting and hashing inside `build_manifest`).
//!
//! Rules, by design:
//! - `.weft/` at the top and `.weft.tmp.*` temp files anywhere are never scanned;
//!   `.weftignore` in the folder root holds gitignore-syntax rules (re-read before a
//!   scan when it changed; the file itself is synced, so every device ignores alike).
//!   A path that becomes ignored is reported removed from the local tree.
//! - Symlinks are recorded with their target, never followed.
//! - A name that is not UTF-8, or not a valid [`RelPath`] (a backslash, say), is
//!   reported as a problem and skipped: it cannot have the same name on every device.
//! - An unreadable file or directory is reported and skipped; the scan goes on, and the
//!   stored entry (if any) is kept, not deleted.
//! - A file that changes while it is hashed is hashed again (up to
//!   [`MAX_HASH_ATTEMPTS`] times), then reported and left for the next scan.
//! - A file hashed while its mtime is within the filesystem's timestamp granularity of
//!   the hash ([`racy_window`]) is *racy*: a write of the same size right after the
//!   hash can get the very same mtime (FAT keeps even seconds, HFS+ and ext3 whole
//!   seconds, ext4 before Linux 6.13 one clock tick), and then size, mtime and inode
//!   all say "unchanged". The scan reports such files (to the sink, and in
//!   [`ScanSummary::racy`]); the caller marks their rows in the store and has them
//!   hashed again, whatever their metadata says, once the window has passed (`rehash`
//!   of [`Scanner::scan`]). Git calls these entries "racily clean".

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use weft_protocol::chunk::{build_manifest, build_manifest_like};
use weft_protocol::document::EntryKind;
use weft_protocol::path::{METADATA_DIR, TEMP_PREFIX};
use weft_protocol::{ChunkParams, Manifest, ManifestHash, RelPath};

use crate::store::{LocalChange, LocalEntry};

/// Name of the ignore file in a folder's root.
pub const IGNORE_FILE: &str = ".weftignore";
/// Times a file that keeps changing under the hasher is hashed before giving up.
pub const MAX_HASH_ATTEMPTS: usize = 3;
pub use weft_core::racy::{COARSE_RACY_WINDOW, FINE_RACY_WINDOW, is_racy, racy_window};

/// Files written this recently may still be racy in the store (their second hash may
/// not have run yet): whoever trusts a stored hash by metadata alone checks the bytes.
pub const RECENT_WRITE: Duration = Duration::from_secs(10);

/// Whether `mtime_ns` is within [`RECENT_WRITE`] of now (or ahead of it).
pub fn recently_written(mtime_ns: i64) -> bool {
    let recent = i64::try_from(RECENT_WRITE.as_nanos()).unwrap_or(i64::MAX);
    mtime_ns > now_ns().saturating_sub(recent)
}

/// The wall clock in ns since the Unix epoch (the clock of mtimes).
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

pub use weft_core::scan::Scope;

/// A path the scan could not handle, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// The path, relative to the folder (lossy for non-UTF-8 names).
    pub path: String,
    /// What went wrong, for a person.
    pub error: String,
}

/// Live counters of a scan, readable from other threads (status, progress events).
#[derive(Debug, Default)]
pub struct ScanProgress {
    /// Files that need hashing in this scan.
    pub files_to_hash: AtomicU64,
    /// Bytes that need hashing in this scan.
    pub bytes_to_hash: AtomicU64,
    /// Files hashed so far.
    pub files_hashed: AtomicU64,
    /// Bytes hashed so far.
    pub bytes_hashed: AtomicU64,
}

impl ScanProgress {
    fn reset(&self) {
        for counter in [
            &self.files_to_hash,
            &self.bytes_to_hash,
            &self.files_hashed,
            &self.bytes_hashed,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct ScanSummary {
    /// Entries seen on disk (files, directories, symlinks).
    pub seen: u64,
    /// Changes found (also delivered to the sink as they are found).
    pub changes: u64,
    /// Paths that could not be scanned.
    pub problems: Vec<Problem>,
    /// The node's temp files the walk passed (`.weft.tmp.*`), for cleanup.
    pub temp_files: Vec<PathBuf>,
    /// Files hashed so soon after their last write that another write of the same size
    /// could have the same mtime (see the module doc), with their [`racy_window`]: to
    /// hash again once it has passed.
    pub racy: Vec<(RelPath, Duration)>,
}

/// A folder's scanner: its root, chunk parameters and ignore rules.
pub struct Scanner {
    root: PathBuf,
    params: ChunkParams,
    ignore: Gitignore,
    /// Size and mtime of `.weftignore` when `ignore` was built (`None`: no file).
    ignore_stamp: Option<(u64, i64)>,
    workers: usize,
    /// Where the manifests of stored versions come from ([`Scanner::with_manifests`]).
    manifests: Option<ManifestLookup>,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("root", &self.root)
            .field("params", &self.params)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// Looks up a stored manifest by its hash.
pub type ManifestLookup = Arc<dyn Fn(&ManifestHash) -> Option<Manifest> + Send + Sync>;

/// Files from this size on are re-hashed like their previous version
/// ([`build_manifest_like`]) when its manifest is known.
pub const LIKE_PREVIOUS_MIN_SIZE: u64 = 1024 * 1024;

fn ignore_stamp(root: &Path) -> Option<(u64, i64)> {
    fs::metadata(root.join(IGNORE_FILE))
        .ok()
        .map(|metadata| (metadata.len(), mtime_ns(&metadata)))
}

/// Builds the ignore matcher from `root/.weftignore`; problems are returned, and the
/// rules that could be read still apply.
fn load_ignore(root: &Path) -> (Gitignore, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut builder = GitignoreBuilder::new(root);
    let ignore_file = root.join(IGNORE_FILE);
    if ignore_file.exists()
        && let Some(error) = builder.add(&ignore_file)
    {
        problems.push(Problem {
            path: IGNORE_FILE.into(),
            error: format!("some ignore rules could not be read: {error}"),
        });
    }
    let ignore = builder.build().unwrap_or_else(|error| {
        problems.push(Problem {
            path: IGNORE_FILE.into(),
            error: format!("ignore rules are invalid, none apply: {error}"),
        });
        Gitignore::empty()
    });
    (ignore, problems)
}

/// What a walk collects.
#[derive(Default)]
struct Walk {
    observed: Vec<Observed>,
    problems: Vec<Problem>,
    /// Stored rows inside these paths are kept: they could not be read, not deleted.
    unreadable: Vec<RelPath>,
    /// The node's temp files passed on the way.
    temp_files: Vec<PathBuf>,
    /// The folder root itself could not be listed (unmounted disk, permissions): keep
    /// every stored row rather than report the whole folder deleted.
    root_unreadable: bool,
}

impl Walk {
    fn problem(&mut self, path: impl Into<String>, error: String) {
        self.problems.push(Problem {
            path: path.into(),
            error,
        });
    }
}

/// A file hashed by [`Scanner::hash_file`].
struct Hashed {
    path: RelPath,
    entry: LocalEntry,
    manifest: Manifest,
    /// The file's [`racy_window`] if it is racy.
    racy: Option<Duration>,
}

/// An entry found on disk, before hashing.
#[derive(Debug, Clone)]
struct Observed {
    path: RelPath,
    entry: LocalEntry,
}

fn mtime_ns(metadata: &fs::Metadata) -> i64 {
    match metadata.modified() {
        Ok(time) => match time.duration_since(std::time::UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_nanos()).unwrap_or(i64::MAX),
        },
        Err(_) => 0,
    }
}

#[cfg(unix)]
fn mode_and_inode(metadata: &fs::Metadata) -> (u32, u64) {
    use std::os::unix::fs::MetadataExt;
    (metadata.mode() & 0o7777, metadata.ino())
}

#[cfg(not(unix))]
fn mode_and_inode(metadata: &fs::Metadata) -> (u32, u64) {
    (
        if metadata.permissions().readonly() {
            0o444
        } else {
            0o644
        },
        0,
    )
}

impl Scanner {
    /// A scanner for the folder at `root`. Reads `.weftignore` now; a broken rule is
    /// returned as a problem and the other rules still apply.
    pub fn new(root: PathBuf, params: ChunkParams) -> (Self, Vec<Problem>) {
        let (ignore, problems) = load_ignore(&root);
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        (
            Self {
                ignore_stamp: ignore_stamp(&root),
                root,
                params,
                ignore,
                workers,
                manifests: None,
            },
            problems,
        )
    }

    /// Lets the scanner look up the previous manifest of a changed file: a large file
    /// after a small edit is then re-hashed mostly by checking its previous chunks
    /// (a 256 MiB file after a 10-byte insert: BLAKE3 over it, FastCDC over ~2 chunks).
    pub fn with_manifests(mut self, lookup: ManifestLookup) -> Self {
        self.manifests = Some(lookup);
        self
    }

    /// Re-reads `.weftignore` if it changed since it was last read.
    pub fn refresh_ignore(&mut self) -> Vec<Problem> {
        let stamp = ignore_stamp(&self.root);
        if stamp == self.ignore_stamp {
            return Vec::new();
        }
        let (ignore, problems) = load_ignore(&self.root);
        self.ignore = ignore;
        self.ignore_stamp = stamp;
        problems
    }

    /// The folder's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True if `path` is never synced: the node's own files or an ignore rule.
    pub fn is_ignored(&self, path: &RelPath, is_dir: bool) -> bool {
        let first = path.components().next().unwrap_or_default();
        if first == METADATA_DIR || path.file_name().starts_with(TEMP_PREFIX) {
            return true;
        }
        self.ignore
            .matched_path_or_any_parents(path.as_str(), is_dir)
            .is_ignore()
    }

    /// Turns an absolute path inside the folder into a [`RelPath`], if it is one.
    pub fn relative(&self, absolute: &Path) -> Option<RelPath> {
        let relative = absolute.strip_prefix(&self.root).ok()?;
        let text = relative.to_str()?;
        if text.is_empty() {
            return None;
        }
        let text = if std::path::MAIN_SEPARATOR == '/' {
            text.to_owned()
        } else {
            text.replace(std::path::MAIN_SEPARATOR, "/")
        };
        RelPath::new(&text).ok()
    }

    /// Scans `scope`, comparing with `previous` (the stored local rows of that scope),
    /// and sends every change to `sink` as soon as it is known, with whether the row is
    /// racily clean (see the module doc). Returns a summary.
    ///
    /// `previous` must hold every stored row inside the scope: a row not seen on disk is
    /// reported removed. Files at the paths in `rehash` (racy ones of earlier scans) are
    /// hashed even if their metadata is unchanged, and reported only if their content
    /// changed.
    pub fn scan(
        &self,
        scope: &Scope,
        previous: &BTreeMap<RelPath, LocalEntry>,
        rehash: &std::collections::BTreeSet<RelPath>,
        progress: &ScanProgress,
        sink: &mut dyn FnMut(LocalChange, bool),
    ) -> ScanSummary {
        progress.reset();
        let mut walk = Walk::default();
        match scope {
            Scope::Full => self.walk_dir(&self.root, None, &mut walk),
            Scope::Paths(paths) => {
                for path in paths {
                    if !self.is_ignored(path, false) {
                        self.observe_path(path, &mut walk);
                    }
                }
            }
        }
        let mut summary = ScanSummary {
            seen: walk.observed.len() as u64,
            ..ScanSummary::default()
        };

        // Removals: stored rows in scope that are no longer on disk.
        if !walk.root_unreadable {
            let seen: std::collections::HashSet<&RelPath> =
                walk.observed.iter().map(|o| &o.path).collect();
            for path in previous.keys() {
                if !seen.contains(path)
                    && scope.covers(path)
                    && !walk.unreadable.iter().any(|dir| path.starts_with(dir))
                {
                    summary.changes += 1;
                    sink(LocalChange::Remove { path: path.clone() }, false);
                }
            }
        }
        summary.problems = std::mem::take(&mut walk.problems);
        summary.temp_files = std::mem::take(&mut walk.temp_files);
        let observed = walk.observed;

        // Directories and symlinks need no hashing; files only when metadata changed.
        let mut to_hash = Vec::new();
        for item in observed {
            if !rehash.contains(&item.path)
                && previous
                    .get(&item.path)
                    .is_some_and(|old| crate::engine::metadata_unchanged(old, &item.entry))
            {
                continue;
            }
            if item.entry.kind == EntryKind::File {
                progress.files_to_hash.fetch_add(1, Ordering::Relaxed);
                progress
                    .bytes_to_hash
                    .fetch_add(item.entry.size, Ordering::Relaxed);
                to_hash.push(item);
            } else {
                summary.changes += 1;
                sink(
                    LocalChange::Upsert {
                        path: item.path,
                        entry: item.entry,
                        manifest: None,
                    },
                    false,
                );
            }
        }
        to_hash.sort_by_key(|item| item.entry.size);
        self.hash_files(to_hash, previous, progress, &mut summary, sink);
        summary
    }

    fn hash_files(
        &self,
        files: Vec<Observed>,
        previous: &BTreeMap<RelPath, LocalEntry>,
        progress: &ScanProgress,
        summary: &mut ScanSummary,
        sink: &mut dyn FnMut(LocalChange, bool),
    ) {
        if files.is_empty() {
            return;
        }
        let order = HashOrder::new(files.len());
        let (sender, receiver) = mpsc::channel::<Result<Hashed, Problem>>();
        std::thread::scope(|scope| {
            for worker in 0..self.workers.min(files.len()) {
                let sender = sender.clone();
                let files = &files;
                let order = &order;
                scope.spawn(move || {
                    while let Some(index) = order.take(worker == 0) {
                        let Some(item) = files.get(index) else { break };
                        let like = previous.get(&item.path).and_then(|p| p.manifest);
                        let result = self.hash_file(item, like, progress);
                        if sender.send(result).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(sender);
            for result in receiver {
                match result {
                    Ok(Hashed {
                        path,
                        entry,
                        manifest,
                        racy,
                    }) => {
                        if let Some(window) = racy {
                            summary.racy.push((path.clone(), window));
                        }
                        // A racy file hashed again to the same content is no change.
                        if previous.get(&path) == Some(&entry) {
                            continue;
                        }
                        summary.changes += 1;
                        sink(
                            LocalChange::Upsert {
                                path,
                                entry,
                                manifest: Some(manifest),
                            },
                            racy.is_some(),
                        );
                    }
                    Err(problem) => summary.problems.push(problem),
                }
            }
        });
    }

    /// Hashes one file, re-hashing if it changed meanwhile; `like` is the manifest of
    /// its previous version, if it had one.
    fn hash_file(
        &self,
        item: &Observed,
        like: Option<ManifestHash>,
        progress: &ScanProgress,
    ) -> Result<Hashed, Problem> {
        let absolute = self.root.join(item.path.as_str());
        let problem = |error: String| Problem {
            path: item.path.to_string(),
            error,
        };
        let mut before = item.entry.clone();
        let previous = like
            .filter(|_| item.entry.size >= LIKE_PREVIOUS_MIN_SIZE)
            .zip(self.manifests.as_ref())
            .and_then(|(hash, lookup)| lookup(&hash));
        for _ in 0..MAX_HASH_ATTEMPTS {
            let hashed_at = now_ns();
            let file =
                fs::File::open(&absolute).map_err(|e| problem(format!("cannot read: {e}")))?;
            let opened = file
                .metadata()
                .map_err(|e| problem(format!("cannot read: {e}")))?;
            let mut hashed = 0u64;
            let report = |done: u64| {
                progress
                    .bytes_hashed
                    .fetch_add(done - hashed, Ordering::Relaxed);
                hashed = done;
            };
            let manifest = match &previous {
                Some(previous) => build_manifest_like(&file, &self.params, previous, report),
                None => build_manifest(&file, &self.params, report),
            };
            let manifest = match manifest {
                Ok(manifest) => manifest,
                Err(error) => return Err(problem(format!("cannot read: {error}"))),
            };
            // The file is unchanged if what we opened is what we saw and it still is.
            let after = match fs::symlink_metadata(&absolute) {
                Ok(metadata) => entry_from_metadata(&metadata, None),
                Err(error) => return Err(problem(format!("vanished while hashing: {error}"))),
            };
            let (_, opened_inode) = mode_and_inode(&opened);
            let stable = after.kind == EntryKind::File
                && after.size == manifest.size()
                && after.size == before.size
                && after.mtime_ns == before.mtime_ns
                && after.inode == before.inode
                && opened_inode == before.inode;
            if stable {
                progress.files_hashed.fetch_add(1, Ordering::Relaxed);
                let mut entry = after;
                entry.manifest = Some(manifest.hash());
                let racy = is_racy(entry.mtime_ns, hashed_at).then(|| racy_window(entry.mtime_ns));
                return Ok(Hashed {
                    path: item.path.clone(),
                    entry,
                    manifest,
                    racy,
                });
            }
            before = after;
            if before.kind != EntryKind::File {
                return Err(problem(
                    "changed into a non-file while hashing; will rescan".into(),
                ));
            }
        }
        Err(problem(format!(
            "kept changing while being read ({MAX_HASH_ATTEMPTS} attempts); will retry on the next scan"
        )))
    }

    /// Observes one scoped path: the entry itself and, for a directory, its subtree.
    fn observe_path(&self, path: &RelPath, walk: &mut Walk) {
        let absolute = self.root.join(path.as_str());
        // Scoped paths go through their parents: a parent that is a symlink would let a
        // scan escape the folder, and a parent that is gone means the path is gone.
        let mut parent = path.parent();
        while let Some(dir) = parent {
            match fs::symlink_metadata(self.root.join(dir.as_str())) {
                Ok(metadata) if metadata.is_dir() => {}
                _ => return,
            }
            parent = dir.parent();
        }
        match fs::symlink_metadata(&absolute) {
            Ok(metadata) => {
                if let Some(item) = self.observe(path.clone(), &absolute, &metadata, walk) {
                    let is_dir = item.entry.kind == EntryKind::Directory;
                    walk.observed.push(item);
                    if is_dir {
                        self.walk_dir(&absolute, Some(path), walk);
                    }
                }
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                walk.problem(path.as_str(), format!("cannot read: {error}"));
                walk.unreadable.push(path.clone());
            }
        }
    }

    fn observe(
        &self,
        path: RelPath,
        absolute: &Path,
        metadata: &fs::Metadata,
        walk: &mut Walk,
    ) -> Option<Observed> {
        let file_type = metadata.file_type();
        let target = if file_type.is_symlink() {
            match fs::read_link(absolute) {
                Ok(target) => match target.into_os_string().into_string() {
                    Ok(target) => Some(target),
                    Err(_) => {
                        walk.problem(path.as_str(), "symlink target is not UTF-8; skipped".into());
                        return None;
                    }
                },
                Err(error) => {
                    walk.problem(path.as_str(), format!("cannot read symlink: {error}"));
                    return None;
                }
            }
        } else if !file_type.is_file() && !file_type.is_dir() {
            // Sockets, FIFOs, devices: not content a person syncs.
            return None;
        } else {
            None
        };
        Some(Observed {
            entry: entry_from_metadata(metadata, target),
            path,
        })
    }

    /// Walks the directory `absolute` (whose path is `relative`, `None` for the root).
    fn walk_dir(&self, absolute: &Path, relative: Option<&RelPath>, walk: &mut Walk) {
        let mut stack: Vec<(PathBuf, Option<RelPath>)> =
            vec![(absolute.to_path_buf(), relative.cloned())];
        while let Some((dir, dir_relative)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(error) => {
                    let name = dir_relative.as_ref().map_or(".", |p| p.as_str()).to_owned();
                    walk.problem(name, format!("cannot list directory: {error}"));
                    match dir_relative {
                        Some(path) => walk.unreadable.push(path),
                        None => walk.root_unreadable = true,
                    }
                    continue;
                }
            };
            for dir_entry in entries {
                let dir_entry = match dir_entry {
                    Ok(entry) => entry,
                    Err(error) => {
                        walk.problem(
                            dir.display().to_string(),
                            format!("cannot list directory: {error}"),
                        );
                        continue;
                    }
                };
                let name = dir_entry.file_name();
                let Some(name) = name.to_str() else {
                    walk.problem(
                        dir_entry.path().display().to_string(),
                        "name is not valid UTF-8; skipped (rename it to sync it)".into(),
                    );
                    continue;
                };
                let path = match &dir_relative {
                    Some(parent) => parent.join(name),
                    None => RelPath::new(name),
                };
                let path = match path {
                    Ok(path) => path,
                    // `.weft` and temp files are reserved: not ours to sync, not a problem.
                    Err(weft_protocol::PathError::Reserved(_)) => {
                        if name.starts_with(TEMP_PREFIX) {
                            walk.temp_files.push(dir_entry.path());
                        }
                        continue;
                    }
                    Err(error) => {
                        walk.problem(
                            dir_entry.path().display().to_string(),
                            format!("name cannot be synced: {error}; skipped"),
                        );
                        continue;
                    }
                };
                let absolute = dir_entry.path();
                let metadata = match fs::symlink_metadata(&absolute) {
                    Ok(metadata) => metadata,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(error) => {
                        walk.problem(path.as_str(), format!("cannot read: {error}"));
                        walk.unreadable.push(path);
                        continue;
                    }
                };
                let is_dir = metadata.is_dir();
                if self.is_ignored(&path, is_dir) {
                    continue;
                }
                if let Some(item) = self.observe(path.clone(), &absolute, &metadata, walk) {
                    walk.observed.push(item);
                    if is_dir {
                        stack.push((absolute, Some(path)));
                    }
                }
            }
        }
    }
}

/// Builds a [`LocalEntry`] (without manifest) from `lstat` metadata.
pub(crate) fn entry_from_metadata(
    metadata: &fs::Metadata,
    symlink_target: Option<String>,
) -> LocalEntry {
    let (mode, inode) = mode_and_inode(metadata);
    let file_type = metadata.file_type();
    let kind = if file_type.is_symlink() {
        EntryKind::Symlink
    } else if file_type.is_dir() {
        EntryKind::Directory
    } else {
        EntryKind::File
    };
    LocalEntry {
        kind,
        size: if kind == EntryKind::File {
            metadata.len()
        } else {
            0
        },
        mtime_ns: if kind == EntryKind::Directory {
            0
        } else {
            mtime_ns(metadata)
        },
        mode,
        inode,
        manifest: None,
        symlink_target,
    }
}

/// The order in which a scan's files (sorted by size, smallest first) are hashed:
/// the first worker takes the largest file left, the others the smallest. Small
/// files are then recorded, and offered to peers, in the first batch of a scan (a
/// new peer starts fetching at once) rather than after every large file, and the
/// largest files still start at once, so no worker is left alone with a giant at the
/// end. Every index is taken exactly once.
struct HashOrder {
    /// `(next from the small end, one past the next from the large end)`.
    ends: std::sync::Mutex<(usize, usize)>,
}

impl HashOrder {
    fn new(len: usize) -> Self {
        Self {
            ends: std::sync::Mutex::new((0, len)),
        }
    }

    /// The next index to hash, from the large end or the small one; `None` once every
    /// index has been taken.
    fn take(&self, largest: bool) -> Option<usize> {
        let mut ends = self
            .ends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (small, large) = &mut *ends;
        if *small >= *large {
            return None;
        }
        if largest {
            *large -= 1;
            Some(*large)
        } else {
            *small += 1;
            Some(*small - 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_order_takes_every_file_once_from_both_ends() {
        let order = HashOrder::new(5);
        let taken: Vec<Option<usize>> = [true, false, false, true, false, true, false]
            .into_iter()
            .map(|largest| order.take(largest))
            .collect();
        assert_eq!(
            taken,
            [Some(4), Some(0), Some(1), Some(3), Some(2), None, None]
        );
        assert_eq!(HashOrder::new(0).take(true), None);
    }

    #[test]
    fn racy_means_within_the_timestamp_granularity_on_either_side() {
        let second = 1_000_000_000i64;
        let fine = 1_700_000_000 * second + 123_456_789;
        assert_eq!(racy_window(fine), FINE_RACY_WINDOW);
        assert!(is_racy(fine, fine + 99_000_000));
        assert!(!is_racy(fine, fine + 100_000_000));
        assert!(is_racy(fine, fine - 50_000_000));
        // Whole seconds: FAT's two-second buckets.
        let coarse = 1_700_000_000 * second;
        assert_eq!(racy_window(coarse), COARSE_RACY_WINDOW);
        assert!(is_racy(coarse, coarse + 1_999_000_000));
        assert!(!is_racy(coarse, coarse + 2 * second));
        // Far in the future or the past: no sign of a write just now.
        assert!(!is_racy(coarse + 3600 * second, coarse));
        assert!(!is_racy(i64::MIN, i64::MAX));
    }

    /// Every change of one scan, and its summary.
    fn scan_once(
        scanner: &Scanner,
        previous: &BTreeMap<RelPath, LocalEntry>,
        rehash: &[&str],
    ) -> (Vec<LocalChange>, ScanSummary) {
        let rehash = rehash.iter().map(|p| RelPath::new(p).unwrap()).collect();
        let mut changes = Vec::new();
        let summary = scanner.scan(
            &Scope::Full,
            previous,
            &rehash,
            &ScanProgress::default(),
            &mut |change, _| changes.push(change),
        );
        (changes, summary)
    }

    #[test]
    fn a_racy_file_hashed_again_reports_a_same_size_write_with_the_same_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        // Whole seconds, like FAT: a second write in the same two seconds keeps the mtime.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let mtime = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        let write = |contents: &[u8]| {
            fs::write(&path, contents).unwrap();
            let file = fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(mtime).unwrap();
        };
        write(b"first");
        let (scanner, _) = Scanner::new(dir.path().to_path_buf(), ChunkParams::default());
        let (changes, summary) = scan_once(&scanner, &BTreeMap::new(), &[]);
        let f = RelPath::new("f.txt").unwrap();
        assert_eq!(summary.racy, vec![(f.clone(), COARSE_RACY_WINDOW)]);
        let mut previous = BTreeMap::new();
        for change in changes {
            if let LocalChange::Upsert { path, entry, .. } = change {
                previous.insert(path, entry);
            }
        }
        let first = previous[&f].manifest;

        // Hashed again with nothing written: no change.
        let (changes, _) = scan_once(&scanner, &previous, &["f.txt"]);
        assert!(changes.is_empty(), "{changes:?}");

        // The same size, the same mtime: metadata alone cannot tell...
        write(b"other");
        let (changes, _) = scan_once(&scanner, &previous, &[]);
        assert!(changes.is_empty(), "{changes:?}");
        // ... hashing it again does.
        let (changes, _) = scan_once(&scanner, &previous, &["f.txt"]);
        match changes.as_slice() {
            [LocalChange::Upsert { path, entry, .. }] => {
                assert_eq!(path, &f);
                assert!(entry.manifest.is_some() && entry.manifest != first);
            }
            other => panic!("expected one upsert of f.txt, got {other:?}"),
        }
    }
}
