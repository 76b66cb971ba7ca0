//! Node events: what the control API streams to the CLI and GUI (`GET /v1/events`).
//!
//! Events are broadcast; a slow subscriber misses old events rather than slowing the
//! node (it sees a `lagged` notice and can re-read `/v1/status`).

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Events kept for slow subscribers before the oldest are dropped.
pub const EVENT_BUFFER: usize = 1024;

/// Something that happened in the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A scan began.
    ScanStarted {
        /// The folder.
        folder: String,
        /// True for a full scan, false for a scan of changed paths.
        full: bool,
    },
    /// Scan progress (sent about every 250 ms while hashing).
    ScanProgress {
        /// The folder.
        folder: String,
        /// Files hashed so far.
        files_hashed: u64,
        /// Files to hash in this scan.
        files_to_hash: u64,
        /// Bytes hashed so far.
        bytes_hashed: u64,
        /// Bytes to hash in this scan.
        bytes_to_hash: u64,
    },
    /// A scan ended.
    ScanFinished {
        /// The folder.
        folder: String,
        /// Entries seen on disk.
        seen: u64,
        /// Changes recorded.
        changes: u64,
        /// Paths that could not be scanned.
        problems: u64,
        /// Wall time of the scan in milliseconds.
        millis: u64,
    },
    /// A local change was recorded in the folder document.
    LocalChange {
        /// The folder.
        folder: String,
        /// The path.
        path: String,
        /// `created_or_modified` or `deleted`.
        action: String,
    },
    /// A folder was added.
    FolderAdded {
        /// The folder.
        folder: String,
    },
    /// A folder was removed (its files stay on disk).
    FolderRemoved {
        /// The folder.
        folder: String,
    },
}

/// The node's event bus.
#[derive(Clone, Debug)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        let (sender, _) = broadcast::channel(EVENT_BUFFER);
        Self { sender }
    }
}

impl EventBus {
    /// Publishes an event (dropped if nobody listens).
    pub fn publish(&self, event: Event) {
        let _ = self.sender.send(event);
    }

    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}
