//! Making renames, creations and deletions durable before the store records them.
//!
//! A rename, a new name or an unlink is a change to its directory, and `fsync` of the
//! file says nothing about that directory: after a power loss the directory may still
//! hold the old name. ext4 with a journal happens to write such changes with the next
//! `fsync` of any file (the store's commit), but ext4 without a journal or with
//! `fast_commit`, and btrfs, do not. If the store had recorded a download as put into
//! place and the rename was undone, the next scan would read the old file as this
//! device's edit and publish it over the version it had received: a remote edit
//! silently reverted on every device.
//!
//! **Invariant**: every directory the folder actor changed (a file renamed into it, a
//! directory, symlink or conflict copy made in it, an entry deleted from it) is synced
//! ([`PendingDirs::sync`]) before the next store commit, which is what could record the
//! change. The set is synced on one thread per directory (up to [`SYNC_THREADS`]): each
//! sync ends in a flush of the disk's cache, which under load waits behind the writes
//! queued before it, and flushes issued together are merged. During the bench's initial
//! sync (88 directories; a batch of downloads touches 1-46 of them) syncing four at a
//! time held the folder actor 100-200 ms per batch; one thread per directory, 1-70 ms.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

/// Most threads one [`PendingDirs::sync`] uses (more directories share them).
pub const SYNC_THREADS: usize = 32;

/// Stack of a sync thread: it only opens, syncs and closes.
const SYNC_THREAD_STACK: usize = 64 * 1024;

/// Makes the entries of directory `dir` durable (`fsync` of the directory). A
/// filesystem that cannot sync a directory (some network and FUSE ones answer
/// `EINVAL`) offers nothing better: that is not an error.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    match std::fs::File::open(dir)?.sync_all() {
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!(dir = %dir.display(), %error, "this filesystem cannot sync a directory");
            Ok(())
        }
        synced => synced,
    }
}

/// Syncs `dir`, logging a failure; a directory that is gone has nothing to make
/// durable.
fn sync_dir_logged(dir: &Path) {
    match sync_dir(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot make the directory's changes durable");
        }
    }
}

/// The directories changed since the last [`PendingDirs::sync`].
#[derive(Debug, Default)]
pub struct PendingDirs {
    dirs: BTreeSet<PathBuf>,
}

impl PendingDirs {
    /// Notes that an entry of `dir` was made, renamed or removed.
    pub fn changed(&mut self, dir: &Path) {
        if !self.dirs.contains(dir) {
            self.dirs.insert(dir.to_path_buf());
        }
    }

    /// Notes a change to the entry at `path`: its parent directory changed.
    pub fn changed_entry(&mut self, path: &Path) {
        if let Some(parent) = path.parent() {
            self.changed(parent);
        }
    }

    /// Notes that `path` and any of its parents below `root` may have been created
    /// (`create_dir_all`): the parent of `path` and of each of its ancestors strictly
    /// below `root` changed (`root` itself included, as the last parent). Nothing is
    /// noted for `root` itself or a path outside it.
    pub fn created_all(&mut self, root: &Path, path: &Path) {
        let mut current = path;
        while current != root && current.starts_with(root) {
            let Some(parent) = current.parent() else {
                break;
            };
            self.changed(parent);
            current = parent;
        }
    }

    /// How many directories wait to be synced.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    /// Whether no directory waits.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Syncs every noted directory (one thread each, up to [`SYNC_THREADS`]) and forgets
    /// them. Failures are logged: a directory that cannot be synced does not hold up
    /// the commit, which records what the disk shows either way.
    pub fn sync(&mut self) {
        if self.dirs.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let dirs: Vec<PathBuf> = std::mem::take(&mut self.dirs).into_iter().collect();
        let threads = dirs.len().min(SYNC_THREADS);
        sync_on_threads(&dirs, threads);
        tracing::debug!(
            dirs = dirs.len(),
            threads,
            micros = started.elapsed().as_micros(),
            "directories synced"
        );
    }
}

/// Syncs `dirs` on `threads` threads (at least one), this one among them: with one,
/// no thread is started.
fn sync_on_threads(dirs: &[PathBuf], threads: usize) {
    let share = dirs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut parts = dirs.chunks(share);
        // This thread takes the first part itself.
        let first = parts.next();
        for part in parts {
            let spawned = std::thread::Builder::new()
                .name("weft-dir-sync".into())
                .stack_size(SYNC_THREAD_STACK)
                .spawn_scoped(scope, move || {
                    part.iter().for_each(|dir| sync_dir_logged(dir))
                });
            if let Err(error) = spawned {
                tracing::debug!(%error, "no thread for a directory sync; syncing here");
                part.iter().for_each(|dir| sync_dir_logged(dir));
            }
        }
        first
            .into_iter()
            .flatten()
            .for_each(|dir| sync_dir_logged(dir));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_noted_once_and_forgotten_after_a_sync() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut pending = PendingDirs::default();
        std::fs::create_dir_all(root.path().join("a/b")).expect("mkdir");
        pending.changed_entry(&root.path().join("a/b/file"));
        pending.changed_entry(&root.path().join("a/b/other"));
        assert_eq!(pending.len(), 1);
        pending.created_all(root.path(), &root.path().join("a/b"));
        // And a/b's parent a, and a's parent the root.
        assert_eq!(pending.len(), 3, "{pending:?}");
        pending.sync();
        assert!(pending.is_empty());
    }

    #[test]
    fn created_all_stops_at_the_root_and_notes_nothing_outside_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut pending = PendingDirs::default();
        pending.created_all(root.path(), &root.path().join("x/y/z"));
        let noted: Vec<PathBuf> = pending.dirs.iter().cloned().collect();
        assert_eq!(
            noted,
            vec![
                root.path().to_path_buf(),
                root.path().join("x"),
                root.path().join("x/y"),
            ]
        );
        let mut outside = PendingDirs::default();
        outside.created_all(&root.path().join("x"), &root.path().join("elsewhere/z"));
        assert!(outside.is_empty(), "{outside:?}");
    }

    #[test]
    fn many_directories_sync_on_several_threads_and_missing_ones_are_skipped() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut pending = PendingDirs::default();
        for i in 0..40 {
            let dir = root.path().join(format!("d{i}"));
            if i % 5 != 0 {
                std::fs::create_dir(&dir).expect("mkdir");
                std::fs::write(dir.join("f"), b"x").expect("write");
            }
            // Every fifth directory was removed before the sync.
            pending.changed(&dir);
        }
        assert_eq!(pending.len(), 40);
        pending.sync();
        assert!(pending.is_empty());
        // The directories are intact.
        assert!(root.path().join("d1/f").is_file());
    }

    #[test]
    fn a_directory_syncs_and_a_missing_one_is_an_error() {
        let root = tempfile::tempdir().expect("tempdir");
        sync_dir(root.path()).expect("sync");
        let error = sync_dir(&root.path().join("gone")).expect_err("missing");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
