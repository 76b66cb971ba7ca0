//! The node: the device's identity, store and running folders, behind one handle that
//! the control API and the daemon share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_protocol::{ChunkParams, DeviceId, DeviceKey, FolderId, RelPath};

use crate::config::Config;
use crate::events::{Event, EventBus};
use crate::folder::{self, FolderCommand, FolderHandle, FolderSettings, FolderStatus, ScanResult};
use crate::scan::Scope;
use crate::store::{FolderRecord, Store, StoreError};

/// File name of the store inside the home.
pub const STORE_FILE: &str = "weft.redb";

/// Why a node operation failed. The text tells the user what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A folder could not start.
    #[error(transparent)]
    Folder(#[from] folder::FolderError),
    /// No folder with that ID.
    #[error("no folder with ID {0:?}; `weft folder list` shows the folders")]
    UnknownFolder(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A filesystem operation failed.
    #[error("{0}")]
    Io(String),
}

/// Node status, as `weft status --json` shows it (a documented contract).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This device's ID.
    pub device_id: String,
    /// This device's name.
    pub device_name: String,
    /// Software version.
    pub version: String,
    /// Folders, ordered by ID.
    pub folders: Vec<FolderStatus>,
    /// Connected peers (the sync issue fills this in).
    pub peers: Vec<serde_json::Value>,
}

/// One path of a folder's local tree, as `GET /v1/folders/{id}/files` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Path relative to the folder.
    pub path: String,
    /// What the scanner saw.
    pub entry: crate::store::LocalEntry,
}

/// A request to add a folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddFolder {
    /// Where the folder is (created if missing).
    pub path: String,
    /// Folder ID; random if absent.
    pub id: Option<String>,
    /// Label; the directory name if absent.
    pub label: Option<String>,
}

/// The node.
pub struct Node {
    key: DeviceKey,
    config: Config,
    store: Arc<Store>,
    events: EventBus,
    folders: Mutex<BTreeMap<FolderId, FolderHandle>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({:?})", self.key.device_id())
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], NodeError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|error| {
        NodeError::Io(format!("the OS random number generator failed: {error}"))
    })?;
    Ok(bytes)
}

impl Node {
    /// Opens the store in `home` and starts every folder.
    pub fn open(home: &Path, key: DeviceKey, config: Config) -> Result<Self, NodeError> {
        let store = Arc::new(Store::open(&home.join(STORE_FILE), random_bytes()?)?);
        let node = Self {
            key,
            config,
            store,
            events: EventBus::default(),
            folders: Mutex::new(BTreeMap::new()),
        };
        for record in node.store.folders()? {
            node.start_folder(record)?;
        }
        Ok(node)
    }

    /// This device's ID.
    pub fn device_id(&self) -> DeviceId {
        self.key.device_id()
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The config in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn folders(&self) -> MutexGuard<'_, BTreeMap<FolderId, FolderHandle>> {
        match self.folders.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn settings(&self) -> FolderSettings {
        FolderSettings {
            debounce: Duration::from_millis(self.config.debounce_ms),
            full_rescan_interval: Duration::from_secs(self.config.full_rescan_interval_s.max(1)),
            watch: self.config.watch,
        }
    }

    fn start_folder(&self, record: FolderRecord) -> Result<(), NodeError> {
        let id = record.id.clone();
        let handle = folder::start(
            record,
            self.store.clone(),
            self.device_id(),
            self.settings(),
            self.events.clone(),
        )?;
        self.folders().insert(id, handle);
        Ok(())
    }

    /// Adds a folder: creates its directory if needed, records it, starts scanning.
    pub fn add_folder(&self, request: AddFolder) -> Result<FolderRecord, NodeError> {
        let path = PathBuf::from(&request.path);
        if !path.is_absolute() {
            return Err(NodeError::Invalid(format!(
                "folder path {:?} must be absolute",
                request.path
            )));
        }
        std::fs::create_dir_all(&path)
            .map_err(|error| NodeError::Io(format!("cannot create {}: {error}", path.display())))?;
        let path = path
            .canonicalize()
            .map_err(|error| NodeError::Io(format!("cannot open {}: {error}", path.display())))?;
        let path_text = path
            .to_str()
            .ok_or_else(|| NodeError::Invalid("folder path must be valid UTF-8".into()))?
            .to_owned();
        let id = match &request.id {
            Some(id) => FolderId::new(id).map_err(|error| NodeError::Invalid(error.to_string()))?,
            None => FolderId::random(random_bytes()?),
        };
        {
            let folders = self.folders();
            if folders.contains_key(&id) {
                return Err(NodeError::Invalid(format!(
                    "a folder with ID {id} already exists"
                )));
            }
            for existing in folders.values() {
                let other = Path::new(&existing.record.path);
                if path.starts_with(other) || other.starts_with(&path) {
                    return Err(NodeError::Invalid(format!(
                        "{} overlaps folder {} at {}; folders cannot nest",
                        path.display(),
                        existing.record.id,
                        other.display()
                    )));
                }
            }
        }
        let label = request.label.unwrap_or_else(|| {
            path.file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("folder")
                .to_owned()
        });
        let record = FolderRecord {
            id: id.clone(),
            label,
            path: path_text,
            params: ChunkParams::DEFAULT,
            mode: crate::engine::FolderMode::SendReceive,
            devices: Vec::new(),
        };
        self.store.put_folder(&record)?;
        self.start_folder(record.clone())?;
        tracing::info!(folder = %id, path = record.path, "folder added");
        self.events.publish(Event::FolderAdded {
            folder: id.to_string(),
        });
        Ok(record)
    }

    /// Forgets a folder. Its files stay on disk.
    pub fn remove_folder(&self, id: &str) -> Result<(), NodeError> {
        let id = FolderId::new(id).map_err(|_| NodeError::UnknownFolder(id.to_owned()))?;
        let handle = self
            .folders()
            .remove(&id)
            .ok_or_else(|| NodeError::UnknownFolder(id.to_string()))?;
        handle.stop();
        self.store.remove_folder(&id)?;
        tracing::info!(folder = %id, "folder removed (files left on disk)");
        self.events.publish(Event::FolderRemoved {
            folder: id.to_string(),
        });
        Ok(())
    }

    /// Folder records.
    pub fn folder_records(&self) -> Vec<FolderRecord> {
        self.folders().values().map(|h| h.record.clone()).collect()
    }

    /// The local tree of a folder, as last scanned.
    pub fn files(&self, id: &str) -> Result<Vec<FileInfo>, NodeError> {
        let id = FolderId::new(id).map_err(|_| NodeError::UnknownFolder(id.to_owned()))?;
        if !self.folders().contains_key(&id) {
            return Err(NodeError::UnknownFolder(id.to_string()));
        }
        Ok(self
            .store
            .local_tree(&id)?
            .into_iter()
            .map(|(path, entry)| FileInfo {
                path: path.to_string(),
                entry,
            })
            .collect())
    }

    /// A stored manifest.
    pub fn manifest(&self, hash: &str) -> Result<weft_protocol::Manifest, NodeError> {
        let hash = weft_protocol::ManifestHash::from_hex(hash)
            .ok_or_else(|| NodeError::Invalid(format!("{hash:?} is not a manifest hash")))?;
        self.store
            .manifest(&hash)?
            .ok_or_else(|| NodeError::Invalid(format!("no manifest {hash}")))
    }

    /// Scans one folder (or all) and waits for the results.
    pub fn scan(
        &self,
        folder: Option<&str>,
        paths: &[String],
    ) -> Result<Vec<(String, ScanResult)>, NodeError> {
        let scope = if paths.is_empty() {
            Scope::Full
        } else {
            let paths = paths
                .iter()
                .map(|p| RelPath::new(p).map_err(|error| NodeError::Invalid(error.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            Scope::Paths(paths)
        };
        let mut waiting = Vec::new();
        {
            let folders = self.folders();
            let selected: Vec<&FolderHandle> = match folder {
                Some(id) => {
                    let id =
                        FolderId::new(id).map_err(|_| NodeError::UnknownFolder(id.to_owned()))?;
                    vec![
                        folders
                            .get(&id)
                            .ok_or_else(|| NodeError::UnknownFolder(id.to_string()))?,
                    ]
                }
                None => folders.values().collect(),
            };
            for handle in selected {
                let (reply, result) = std::sync::mpsc::channel();
                if handle.send(FolderCommand::Scan {
                    scope: scope.clone(),
                    reply: Some(reply),
                }) {
                    waiting.push((handle.record.id.to_string(), result));
                }
            }
        }
        let mut results = Vec::new();
        for (id, result) in waiting {
            match result.recv() {
                Ok(result) => results.push((id, result)),
                Err(_) => {
                    return Err(NodeError::Io(format!(
                        "folder {id} stopped during the scan"
                    )));
                }
            }
        }
        Ok(results)
    }

    /// The node's status.
    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            device_id: self.device_id().to_string(),
            device_name: self.config.device_name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            folders: self
                .folders()
                .values()
                .map(|h| h.shared.snapshot())
                .collect(),
            peers: Vec::new(),
        }
    }

    /// Stops every folder (each finishes its current batch first).
    pub fn shutdown(&self) {
        let handles: Vec<FolderHandle> =
            std::mem::take(&mut *self.folders()).into_values().collect();
        for handle in handles {
            handle.stop();
        }
    }
}
