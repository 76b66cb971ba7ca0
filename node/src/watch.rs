//! The file watcher: a hint about where to rescan, never the truth.
//!
//! notify's recommended backend (inotify on Linux) watches a folder recursively. Each
//! event only sends its paths to the folder actor, which marks them dirty and rescans
//! them after a debounce; the scanner alone decides what changed. Each event also says
//! whether the change is complete ([`change_of`]): a file closed after writing, a
//! rename, a delete or a new directory is rescanned at once, anything else after the
//! debounce ([`crate::dirty`]). Reads by anyone (including our own scanner) are not
//! changes and are dropped here, and so are the events of Weft's own temp files (never
//! scanned). An event that says events were lost, or a watcher error, asks for a full
//! rescan.

use std::path::{Path, PathBuf};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher as _};

use weft_protocol::path::TEMP_PREFIX;

use crate::dirty::Change;

/// Whether an event of this kind says its change is complete. Only kinds that say so
/// for sure are [`Change::Settled`]; a platform whose watcher reports less (no close
/// events) falls back to the debounce.
pub fn change_of(kind: &EventKind) -> Change {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(_))
        | EventKind::Remove(_)
        | EventKind::Create(CreateKind::Folder) => Change::Settled,
        _ => Change::Open,
    }
}

/// Whether `path` names one of Weft's temp files.
fn is_temp_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with(TEMP_PREFIX))
}

/// What the watcher reports.
#[derive(Debug)]
pub enum WatchEvent {
    /// These absolute paths changed; `change` says whether the event marks the change
    /// as complete.
    Paths {
        /// Absolute paths.
        paths: Vec<PathBuf>,
        /// Settled or still open.
        change: Change,
    },
    /// Events were lost: only a full rescan can tell what changed.
    Overflow,
}

/// A running watcher; dropping it stops watching.
pub type Watcher = notify::RecommendedWatcher;

/// Starts watching `root`; `None` (with a warning) if the platform refuses, in which
/// case the folder relies on periodic full rescans.
pub fn watch(root: &str, on_event: impl Fn(WatchEvent) + Send + 'static) -> Option<Watcher> {
    let handler = move |result: notify::Result<notify::Event>| {
        let event = match result {
            Ok(event) if event.need_rescan() => WatchEvent::Overflow,
            Ok(event) => {
                if let EventKind::Access(kind) = event.kind
                    && kind != AccessKind::Close(AccessMode::Write)
                {
                    return;
                }
                // Weft's own temp files are never scanned: a download's every write
                // would otherwise wake the folder actor (its rename into place still
                // arrives under the final name).
                let paths: Vec<_> = event
                    .paths
                    .into_iter()
                    .filter(|path| !is_temp_file(path))
                    .collect();
                if paths.is_empty() {
                    return;
                }
                WatchEvent::Paths {
                    paths,
                    change: change_of(&event.kind),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "file watcher error; rescanning the folder");
                WatchEvent::Overflow
            }
        };
        on_event(event);
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::warn!(%error, root, "cannot watch the folder; changes are found by periodic rescans");
            return None;
        }
    };
    if let Err(error) = watcher.watch(Path::new(root), RecursiveMode::Recursive) {
        tracing::warn!(%error, root, "cannot watch the folder (raise fs.inotify.max_user_watches?); changes are found by periodic rescans");
        return None;
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn temp_files_are_not_reported_and_their_rename_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sender, receiver) = std::sync::mpsc::channel();
        let root = dir.path().to_str().expect("utf-8 temp dir");
        let _watcher = watch(root, move |event| {
            let _ = sender.send(event);
        })
        .expect("watcher");
        let temp = dir.path().join(format!("{TEMP_PREFIX}download"));
        std::fs::write(&temp, b"partial").expect("write temp");
        std::fs::write(dir.path().join("other.txt"), b"edit").expect("write file");
        std::fs::rename(&temp, dir.path().join("done.txt")).expect("rename");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen
            .iter()
            .any(|p: &std::path::PathBuf| p.ends_with("done.txt"))
            && Instant::now() < deadline
        {
            if let Ok(WatchEvent::Paths { paths, .. }) =
                receiver.recv_timeout(Duration::from_millis(100))
            {
                seen.extend(paths);
            }
        }
        assert!(seen.iter().any(|p| p.ends_with("other.txt")), "{seen:?}");
        assert!(seen.iter().any(|p| p.ends_with("done.txt")), "{seen:?}");
        assert!(!seen.iter().any(|p| is_temp_file(p)), "{seen:?}");
    }

    /// The events of `name` until `until` holds for them (or 5 s pass).
    fn events_of(
        receiver: &std::sync::mpsc::Receiver<WatchEvent>,
        name: &str,
        until: impl Fn(&[Change]) -> bool,
    ) -> Vec<Change> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !until(&seen) && Instant::now() < deadline {
            if let Ok(WatchEvent::Paths { paths, change }) =
                receiver.recv_timeout(Duration::from_millis(50))
                && paths.iter().any(|p| p.ends_with(name))
            {
                seen.push(change);
            }
        }
        seen
    }

    #[test]
    fn writes_to_an_open_file_are_open_and_its_close_or_rename_settles_it() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let (sender, receiver) = std::sync::mpsc::channel();
        let root = dir.path().to_str().expect("utf-8 temp dir");
        let _watcher = watch(root, move |event| {
            let _ = sender.send(event);
        })
        .expect("watcher");
        // A file still being written: its events are open, and stay so while it is.
        let mut file = std::fs::File::create(dir.path().join("growing.log")).expect("create");
        file.write_all(b"first line\n").expect("write");
        let open = events_of(&receiver, "growing.log", |seen| seen.len() >= 2);
        assert!(!open.is_empty(), "no event for the write");
        assert!(open.iter().all(|&c| c == Change::Open), "{open:?}");
        // Closed: settled.
        drop(file);
        let closed = events_of(&receiver, "growing.log", |seen| {
            seen.contains(&Change::Settled)
        });
        assert_eq!(closed.last(), Some(&Change::Settled), "{closed:?}");
        // An atomic save (written elsewhere, renamed in): settled.
        let staged = outside.path().join("draft");
        std::fs::write(&staged, b"saved").expect("write draft");
        std::fs::rename(&staged, dir.path().join("saved.txt")).expect("rename in");
        let saved = events_of(&receiver, "saved.txt", |seen| !seen.is_empty());
        assert_eq!(saved, vec![Change::Settled]);
        // A delete and a new directory: settled.
        std::fs::remove_file(dir.path().join("saved.txt")).expect("delete");
        let deleted = events_of(&receiver, "saved.txt", |seen| !seen.is_empty());
        assert_eq!(deleted, vec![Change::Settled]);
        std::fs::create_dir(dir.path().join("new-dir")).expect("mkdir");
        let made = events_of(&receiver, "new-dir", |seen| !seen.is_empty());
        assert_eq!(made, vec![Change::Settled]);
    }
}
