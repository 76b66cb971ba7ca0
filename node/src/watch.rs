//! The file watcher: a hint about where to rescan, never the truth.
//!
//! notify's recommended backend (inotify on Linux) watches a folder recursively. Each
//! event only sends its paths to the folder actor, which marks them dirty and rescans
//! them after a debounce; the scanner alone decides what changed. Reads by anyone
//! (including our own scanner) are not changes and are dropped here. An event that
//! says events were lost, or a watcher error, asks for a full rescan.

use std::path::Path;
use std::sync::mpsc;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::folder::FolderCommand;

/// A running watcher; dropping it stops watching.
pub type Watcher = notify::RecommendedWatcher;

/// Starts watching `root`; `None` (with a warning) if the platform refuses, in which
/// case the folder relies on periodic full rescans.
pub fn watch(root: &str, actor: mpsc::Sender<FolderCommand>) -> Option<Watcher> {
    let handler = move |result: notify::Result<notify::Event>| {
        let command = match result {
            Ok(event) if event.need_rescan() => FolderCommand::WatcherOverflow,
            Ok(event) => match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                    FolderCommand::FileEvents(event.paths)
                }
                EventKind::Access(_) => return,
                _ => FolderCommand::FileEvents(event.paths),
            },
            Err(error) => {
                tracing::warn!(%error, "file watcher error; rescanning the folder");
                FolderCommand::WatcherOverflow
            }
        };
        let _ = actor.send(command);
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
