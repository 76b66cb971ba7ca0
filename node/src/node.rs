//! The node: the device's identity, store and running folders, behind one handle that
//! the control API and the daemon share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_protocol::wire::{Invite, Message, Role};
use weft_protocol::{ChunkParams, DeviceId, DeviceKey, FolderId, RelPath};

use crate::config::Config;
use crate::engine::FolderMode;
use crate::events::{Event, EventBus};
use crate::folder::{self, FolderCommand, FolderHandle, FolderSettings, FolderStatus, ScanResult};
use crate::net::NetEvent;
use crate::scan::Scope;
use crate::store::{DeviceRecord, FolderRecord, PendingInvite, Store, StoreError};

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
    /// Connected peers.
    pub peers: Vec<crate::net::PeerInfo>,
    /// Addresses the node listens on for peers.
    pub listen: Vec<String>,
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

/// A device as `weft device list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device ID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Addresses to dial.
    pub addresses: Vec<String>,
    /// Connected now.
    pub connected: bool,
    /// Connection details when connected.
    pub connection: Option<crate::net::PeerInfo>,
    /// Why a folder last refused this device's changes (a role that did not allow
    /// them: a misbehaving or removed device), if one did.
    #[serde(default)]
    pub refused: Option<String>,
}

/// A request to add a device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddDevice {
    /// Device ID (text form).
    pub id: String,
    /// A name for it.
    pub name: Option<String>,
    /// Multiaddrs to dial it at.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// A request to share a folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShareFolder {
    /// The device to invite.
    pub device: String,
    /// The role to give it: `View`, `Edit`, `Admin` or `Owner`.
    pub permission: Role,
}

/// A request to accept an invite.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AcceptInvite {
    /// Where to put the folder (default: `~/Weft/<label>`). A directory that exists
    /// and holds files is taken only when named here: its files are then shared.
    pub path: Option<String>,
    /// The inviting device, when several invite to the same folder.
    #[serde(default)]
    pub from: Option<String>,
}

/// A pending invite as `weft invites` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InviteView {
    /// The inviting device.
    pub from: DeviceId,
    /// Its name on this device (its short ID if it has none).
    pub from_name: String,
    /// The invite: folder, label, role offered, founder.
    pub invite: Invite,
    /// Where accepting without `--path` puts the folder.
    #[serde(default)]
    pub place: Option<String>,
    /// Why that place would be refused (it holds files: name a place with `--path`,
    /// and a directory named there that holds files is shared as it is).
    #[serde(default)]
    pub place_note: Option<String>,
}

/// Network options of the node.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Addresses to listen on.
    pub listen: Vec<libp2p::Multiaddr>,
    /// LAN discovery.
    pub mdns: bool,
    /// Where accepted invites go by default.
    pub default_parent: Option<PathBuf>,
}

/// The node.
pub struct Node {
    key: Arc<DeviceKey>,
    config: Config,
    store: Arc<Store>,
    events: EventBus,
    folders: Mutex<BTreeMap<FolderId, FolderHandle>>,
    network: Option<folder::Network>,
    /// Devices that connected without being accepted (bounded, oldest dropped).
    pending: Mutex<crate::invites::PendingDevices>,
    default_parent: Option<PathBuf>,
    versions: Option<crate::versions::VersionStore>,
}

/// What peers may read: blocks and manifests of folders shared with them.
struct StoreSource {
    store: Arc<Store>,
}

impl StoreSource {
    /// Where `folder` is on disk, if the node has it (and, given a device, shares it
    /// with that device).
    fn folder_root(&self, folder: &FolderId, device: Option<&DeviceId>) -> Option<String> {
        self.store
            .folders()
            .ok()?
            .into_iter()
            .find(|f| {
                &f.id == folder
                    && device.is_none_or(|device| f.devices.iter().any(|(d, _)| d == device))
            })
            .map(|f| f.path)
    }

    /// A block of the folder at `root`, read from a local file that the block index
    /// says holds it.
    ///
    /// The file may have changed since it was indexed. If the open file's metadata
    /// still passes the scanner's own test for skipping a re-hash
    /// ([`crate::engine::metadata_unchanged`]) against the row of the scan that indexed
    /// it (`scanned`, looked up once per path and kept for the caller's next blocks),
    /// its bytes are what that scan hashed, as far as the scanner itself can tell,
    /// unless the file was written in the last [`crate::scan::RECENT_WRITE`] (it may
    /// be racily clean); otherwise the block is hashed before it is served. Either way the receiver
    /// verifies every block, so this only spares the sender a second BLAKE3 pass over
    /// everything it serves (a third of the hashing in an initial sync: A's scan, A's
    /// serving, B's check) while keeping a changed file's bytes off the wire.
    fn read_block(
        &self,
        root: &Path,
        folder: &FolderId,
        hash: &weft_protocol::BlockHash,
        scanned: &mut BTreeMap<RelPath, Option<crate::engine::LocalEntry>>,
    ) -> Option<Vec<u8>> {
        use std::io::{Read, Seek};
        let locations = self.store.block_locations(hash).ok()?;
        locations
            .into_iter()
            .filter(|location| &location.folder == folder)
            .find_map(|location| {
                let mut file = std::fs::File::open(root.join(location.path.as_str())).ok()?;
                file.seek(std::io::SeekFrom::Start(location.offset)).ok()?;
                // `read_to_end` fills the buffer without zeroing it first.
                let len = usize::try_from(location.len).ok()?;
                let mut data = Vec::with_capacity(len);
                (&mut file)
                    .take(u64::from(location.len))
                    .read_to_end(&mut data)
                    .ok()?;
                // Stamped after the read: a write before or during it moved the mtime.
                let now = file
                    .metadata()
                    .ok()
                    .map(|m| crate::scan::entry_from_metadata(&m, None));
                let row = scanned
                    .entry(location.path.clone())
                    .or_insert_with(|| self.store.local(folder, &location.path).ok().flatten());
                // A file written in the last seconds may be racily clean in the store
                // (see the `scan` module doc): its bytes are checked.
                let unchanged = matches!((&*row, &now), (Some(row), Some(now))
                    if crate::engine::metadata_unchanged(row, now)
                        && !crate::scan::recently_written(now.mtime_ns));
                (data.len() == len && (unchanged || weft_protocol::BlockHash::of(&data) == *hash))
                    .then_some(data)
            })
    }
}

impl crate::net::BlockSource for StoreSource {
    fn authorised(&self, device: &DeviceId, folder: &FolderId) -> bool {
        self.folder_root(folder, Some(device)).is_some()
    }

    fn block(&self, folder: &FolderId, hash: &weft_protocol::BlockHash) -> Option<Vec<u8>> {
        let root = self.folder_root(folder, None)?;
        self.read_block(Path::new(&root), folder, hash, &mut BTreeMap::new())
    }

    fn blocks(
        &self,
        device: &DeviceId,
        folder: &FolderId,
        hashes: &[weft_protocol::BlockHash],
    ) -> Vec<Option<Vec<u8>>> {
        // One look at the folder records for the whole group.
        let Some(root) = self.folder_root(folder, Some(device)) else {
            return Vec::new();
        };
        let mut scanned = BTreeMap::new();
        hashes
            .iter()
            .map(|hash| self.read_block(Path::new(&root), folder, hash, &mut scanned))
            .collect()
    }

    /// A manifest of a file of `folder`: one whose blocks this node holds in that
    /// folder's files (a hash is not a capability: a member of one folder learns
    /// nothing of another's content by asking).
    fn manifest(
        &self,
        folder: &FolderId,
        hash: &weft_protocol::ManifestHash,
    ) -> Option<weft_protocol::Manifest> {
        let manifest = self.store.manifest(hash).ok().flatten()?;
        let in_folder = match manifest.blocks().first() {
            None => true,
            Some(block) => self
                .store
                .block_locations(&block.hash)
                .ok()?
                .iter()
                .any(|location| &location.folder == folder),
        };
        in_folder.then_some(manifest)
    }
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
    /// Opens the store in `home`, starts the network (when `net` is given, on the
    /// current tokio runtime) and every folder. Returns the network's events for
    /// [`Node::route`].
    pub fn open(
        home: &Path,
        key: DeviceKey,
        config: Config,
        net: Option<NetOptions>,
    ) -> Result<(Self, Option<tokio::sync::mpsc::UnboundedReceiver<NetEvent>>), NodeError> {
        let store = Arc::new(Store::open(&home.join(STORE_FILE), random_bytes()?)?);
        let (network, events, default_parent) = match net {
            Some(options) => {
                let source = Arc::new(StoreSource {
                    store: store.clone(),
                });
                let (handle, events) = crate::net::start(
                    &key,
                    crate::net::NetConfig {
                        listen: options.listen,
                        mdns: options.mdns,
                    },
                    source,
                )
                .map_err(|error| NodeError::Io(error.to_string()))?;
                let network = folder::Network {
                    net: handle,
                    runtime: tokio::runtime::Handle::current(),
                };
                (Some(network), Some(events), options.default_parent)
            }
            None => (None, None, None),
        };
        let node = Self {
            key: Arc::new(key),
            config,
            store,
            events: EventBus::default(),
            folders: Mutex::new(BTreeMap::new()),
            network,
            pending: Mutex::new(crate::invites::PendingDevices::default()),
            default_parent,
            versions: Some(crate::versions::VersionStore::new(home)),
        };
        for record in node.store.folders()? {
            node.start_folder(record)?;
        }
        Ok((node, events))
    }

    /// Handles network events until the network stops; also redials accepted devices
    /// every few seconds.
    pub async fn route(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<NetEvent>,
    ) {
        let mut redial = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { break };
                    let node = self.clone();
                    // Store reads and folder commands are quick but blocking.
                    let _ = tokio::task::spawn_blocking(move || node.on_net_event(event)).await;
                }
                _ = redial.tick() => {
                    let node = self.clone();
                    let _ = tokio::task::spawn_blocking(move || node.dial_devices()).await;
                }
            }
        }
    }

    fn dial_devices(&self) {
        let Some(network) = &self.network else { return };
        for device in self.store.devices().unwrap_or_default() {
            if network.net.is_connected(&device.id) {
                continue;
            }
            let addresses: Vec<libp2p::Multiaddr> = device
                .addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            if !addresses.is_empty() {
                network.net.dial(&device.id, addresses);
            }
        }
    }

    fn accepted(&self, device: &DeviceId) -> bool {
        self.store
            .devices()
            .map(|devices| devices.iter().any(|d| d.id == *device))
            .unwrap_or(false)
    }

    fn on_net_event(&self, event: NetEvent) {
        match event {
            NetEvent::Connected(device) => {
                if !self.accepted(&device) {
                    tracing::info!(device = %device, "unknown device connected; shown as pending (`weft device list --pending`)");
                    let address = self
                        .network
                        .as_ref()
                        .and_then(|n| {
                            n.net
                                .peers()
                                .into_iter()
                                .find(|p| p.device_id == device.to_string())
                        })
                        .map(|p| p.address)
                        .unwrap_or_default();
                    self.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(device, address);
                    return;
                }
                for handle in self.folders().values() {
                    if let Some(role) = handle.shared.role_of(&device) {
                        self.send_invite(&device, &handle.record, role);
                        handle.send(FolderCommand::PeerConnected(device));
                    }
                }
            }
            NetEvent::Disconnected(device) => {
                for handle in self.folders().values() {
                    handle.send(FolderCommand::PeerDisconnected(device));
                }
            }
            NetEvent::Discovered(device, addresses) => {
                if self.accepted(&device)
                    && let Some(network) = &self.network
                {
                    network.net.dial(&device, addresses);
                }
            }
            // The budget goes with a folder's message into its inbox, and is given
            // back when the folder has handled it.
            NetEvent::Message(device, message, budget) => self.on_message(device, message, budget),
        }
    }

    fn on_message(&self, device: DeviceId, message: Message, budget: crate::net::FrameBudget) {
        match message {
            Message::DocSync(sync) => self.to_folder(
                device,
                &sync.folder,
                FolderCommand::SyncMessage(device, sync.sync_message, budget),
            ),
            Message::DocSyncPart(sync) => self.to_folder(
                device,
                &sync.folder,
                FolderCommand::SyncMessagePart(device, sync.sync_message, budget),
            ),
            Message::ChangeSignatures(signatures) => self.to_folder(
                device,
                &signatures.folder,
                FolderCommand::ChangeSignatures(device, signatures.changes, budget),
            ),
            Message::Invite(invite) => self.on_invite(device, invite),
            other => {
                tracing::debug!(device = %device, ?other, "unexpected control message; ignored")
            }
        }
    }

    /// Keeps an invite from an accepted device (bounded: [`crate::invites`]); one from
    /// anyone else is dropped (the device is listed as pending).
    fn on_invite(&self, device: DeviceId, invite: Invite) {
        if !self.accepted(&device) {
            tracing::debug!(device = %device, folder = %invite.folder, "invite from a device not accepted; dropped (the device is listed as pending)");
            return;
        }
        if self.folders().contains_key(&invite.folder) {
            return;
        }
        let Ok(invites) = self.store.invites() else {
            return;
        };
        let pending = PendingInvite {
            from: device,
            invite,
        };
        if invites.contains(&pending) {
            return;
        }
        let replaces = invites
            .iter()
            .any(|i| i.from == device && i.invite.folder == pending.invite.folder);
        let from_device = invites.iter().filter(|i| i.from == device).count();
        if !replaces
            && (from_device >= crate::invites::MAX_INVITES_PER_DEVICE
                || invites.len() >= crate::invites::MAX_PENDING_INVITES)
        {
            tracing::warn!(device = %device, folder = %pending.invite.folder, "too many pending invites; this one is dropped (answer some with `weft invites`)");
            return;
        }
        tracing::info!(device = %device, folder = %pending.invite.folder, label = pending.invite.label, "invite received (`weft invites`)");
        if let Err(error) = self.store.put_invite(&pending) {
            tracing::error!(%error, "cannot keep an invite");
        }
    }

    /// Hands a document message from `device` to the folder's actor, if the device is
    /// accepted and the folder is shared with it; otherwise it is ignored and logged.
    fn to_folder(&self, device: DeviceId, folder: &FolderId, command: FolderCommand) {
        let accepted = self.accepted(&device);
        let folders = self.folders();
        let shared = folders
            .get(folder)
            .filter(|h| accepted && h.shared.role_of(&device).is_some());
        match shared {
            Some(handle) => {
                handle.send(command);
            }
            None => {
                tracing::warn!(device = %device, folder = %folder, "document sync for a folder not shared with that device; ignored")
            }
        }
    }

    fn send_invite(&self, device: &DeviceId, record: &FolderRecord, role: Role) {
        if let Some(network) = &self.network {
            let invite = Message::Invite(Invite {
                folder: record.id.clone(),
                label: record.label.clone(),
                params: record.params,
                role,
                founder: record.founder.unwrap_or_else(|| self.device_id()),
            });
            let _ = network.net.send(device, invite);
        }
    }

    fn parse_device(text: &str) -> Result<DeviceId, NodeError> {
        text.parse()
            .map_err(|error: weft_protocol::DeviceIdError| NodeError::Invalid(error.to_string()))
    }

    /// Accepts a device (or updates its name and addresses) and dials it.
    pub fn add_device(&self, request: AddDevice) -> Result<DeviceRecord, NodeError> {
        let id = Self::parse_device(&request.id)?;
        if id == self.device_id() {
            return Err(NodeError::Invalid("that is this device's own ID".into()));
        }
        for address in &request.addresses {
            address
                .parse::<libp2p::Multiaddr>()
                .map_err(|error| NodeError::Invalid(format!("address {address:?}: {error}")))?;
        }
        let existing = self.store.devices()?.into_iter().find(|d| d.id == id);
        let record = DeviceRecord {
            id,
            name: request
                .name
                .or_else(|| existing.as_ref().map(|d| d.name.clone()))
                .unwrap_or_else(|| id.short()),
            addresses: if request.addresses.is_empty() {
                existing.map(|d| d.addresses).unwrap_or_default()
            } else {
                request.addresses
            },
        };
        self.store.put_device(&record)?;
        let was_pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.dial_devices();
        // Already connected (it was pending): start what it shares now.
        if was_pending
            && self
                .network
                .as_ref()
                .is_some_and(|n| n.net.is_connected(&id))
        {
            self.on_net_event(NetEvent::Connected(id));
        }
        Ok(record)
    }

    /// Forgets a device, and unshares every folder shared with it that this device
    /// may unshare (the others say why not, and the device is still forgotten).
    pub fn remove_device(&self, id: &str) -> Result<(), NodeError> {
        let id = Self::parse_device(id)?;
        let shared: Vec<FolderId> = self
            .folders()
            .values()
            .filter(|handle| handle.shared.role_of(&id).is_some())
            .map(|handle| handle.record.id.clone())
            .collect();
        let mut refused = Vec::new();
        for folder in shared {
            if let Err(error) = self.set_access(&folder, id, None) {
                refused.push(format!("{folder}: {error}"));
            }
        }
        let known = self.store.remove_device(&id)?;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(network) = &self.network {
            network.net.disconnect(&id);
        }
        if !refused.is_empty() {
            return Err(NodeError::Invalid(format!(
                "device {id} forgotten, but still a member of folders this device may not unshare ({})",
                refused.join("; ")
            )));
        }
        if !known {
            return Err(NodeError::Invalid(format!("device {id} is not known")));
        }
        Ok(())
    }

    /// Accepted devices with their connection state.
    pub fn devices(&self) -> Result<Vec<DeviceView>, NodeError> {
        let peers = self
            .network
            .as_ref()
            .map(|n| n.net.peers())
            .unwrap_or_default();
        let refused: Vec<crate::folder::RefusedDevice> = self
            .folders()
            .values()
            .flat_map(|handle| handle.shared.snapshot().refused)
            .collect();
        Ok(self
            .store
            .devices()?
            .into_iter()
            .map(|device| {
                let id = device.id.to_string();
                let connection = peers.iter().find(|p| p.device_id == id).cloned();
                DeviceView {
                    refused: refused
                        .iter()
                        .find(|r| r.device == id)
                        .map(|r| format!("{} change(s) refused: {}", r.count, r.reason)),
                    connected: connection.is_some(),
                    connection,
                    name: device.name,
                    addresses: device.addresses,
                    id,
                }
            })
            .collect())
    }

    /// Devices that connected without being accepted: (ID, address), oldest first.
    pub fn pending_devices(&self) -> Vec<(String, String)> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .list()
            .into_iter()
            .map(|(device, address)| (device.to_string(), address))
            .collect()
    }

    /// Shares a folder with a device (accepting the device too) and invites it.
    pub fn share_folder(
        &self,
        folder: &str,
        request: ShareFolder,
    ) -> Result<FolderRecord, NodeError> {
        let device = Self::parse_device(&request.device)?;
        let id = FolderId::new(folder).map_err(|_| NodeError::UnknownFolder(folder.to_owned()))?;
        if !self.folders().contains_key(&id) {
            return Err(NodeError::UnknownFolder(folder.to_owned()));
        }
        if !self.accepted(&device) {
            self.add_device(AddDevice {
                id: request.device.clone(),
                name: None,
                addresses: Vec::new(),
            })?;
        }
        self.set_access(&id, device, Some(request.permission))?;
        let record = self
            .folders()
            .get(&id)
            .map(FolderHandle::current_record)
            .ok_or_else(|| NodeError::UnknownFolder(folder.to_owned()))?;
        if self
            .network
            .as_ref()
            .is_some_and(|n| n.net.is_connected(&device))
        {
            self.send_invite(&device, &record, request.permission);
            if let Some(handle) = self.folders().get(&id) {
                handle.send(FolderCommand::PeerConnected(device));
            }
        }
        Ok(record)
    }

    /// Removes a device from a folder's access list: from then on no member sends it
    /// changes, manifests or blocks, its later changes are refused everywhere, and it
    /// is disconnected. It keeps what it already had.
    pub fn unshare_folder(&self, folder: &str, device: &str) -> Result<(), NodeError> {
        let device = Self::parse_device(device)?;
        let id = FolderId::new(folder).map_err(|_| NodeError::UnknownFolder(folder.to_owned()))?;
        self.set_access(&id, device, None)
    }

    /// Has the folder's core set `device`'s role, and waits for the outcome.
    fn set_access(
        &self,
        id: &FolderId,
        device: DeviceId,
        role: Option<Role>,
    ) -> Result<(), NodeError> {
        self.folder_command(id.as_str(), |reply| FolderCommand::SetAccess {
            device,
            role,
            reply,
        })?
        .map(|_| ())
        .map_err(NodeError::Invalid)
    }

    /// Invites received and not yet answered, with the inviting device's name.
    pub fn invites(&self) -> Result<Vec<InviteView>, NodeError> {
        let devices = self.store.devices()?;
        Ok(self
            .store
            .invites()?
            .into_iter()
            .map(|pending| {
                let place = self.default_place(&pending).ok();
                let place_note = place
                    .as_ref()
                    .and_then(|place| crate::invites::check_default_place(place).err());
                InviteView {
                    from_name: devices
                        .iter()
                        .find(|d| d.id == pending.from)
                        .map(|d| d.name.clone())
                        .unwrap_or_else(|| pending.from.short()),
                    from: pending.from,
                    place: place.map(|place| place.display().to_string()),
                    place_note,
                    invite: pending.invite,
                }
            })
            .collect())
    }

    /// The pending invite to `folder`, from `from` if given (needed when several
    /// devices invite to the same folder).
    fn pending_invite(
        &self,
        folder: &FolderId,
        from: Option<&str>,
    ) -> Result<PendingInvite, NodeError> {
        let from = from.map(Self::parse_device).transpose()?;
        let mut matching: Vec<PendingInvite> = self
            .store
            .invites()?
            .into_iter()
            .filter(|i| &i.invite.folder == folder && from.is_none_or(|from| i.from == from))
            .collect();
        match matching.len() {
            0 => Err(NodeError::Invalid(format!(
                "no pending invite for folder {folder}; `weft invites` lists them"
            ))),
            1 => Ok(matching.remove(0)),
            _ => Err(NodeError::Invalid(format!(
                "several devices invite to folder {folder}; name one with --from (`weft invites` lists them)"
            ))),
        }
    }

    /// Accepts an invite: the folder is created at `path` (default `~/Weft/<label>`
    /// when the label is a plain name, else `~/Weft/<folder ID>`; never an existing
    /// directory that holds anything unless the user named it) and synced with the
    /// inviting device, which is accepted too.
    pub fn accept_invite(
        &self,
        folder: &str,
        request: AcceptInvite,
    ) -> Result<FolderRecord, NodeError> {
        let id = FolderId::new(folder).map_err(|_| NodeError::UnknownFolder(folder.to_owned()))?;
        let invite = self.pending_invite(&id, request.from.as_deref())?;
        let path = match request.path {
            Some(path) => path,
            None => {
                let path = self.default_place(&invite)?;
                crate::invites::check_default_place(&path).map_err(NodeError::Invalid)?;
                path.display().to_string()
            }
        };
        if !self.accepted(&invite.from) {
            self.add_device(AddDevice {
                id: invite.from.to_string(),
                name: None,
                addresses: Vec::new(),
            })?;
        }
        // Receives only until the access list arrives and says otherwise.
        let record = self.create_folder(FolderRecord {
            id,
            label: invite.invite.label.clone(),
            path,
            params: invite.invite.params,
            mode: FolderMode::ReceiveOnly,
            devices: vec![(invite.from, Role::Edit)],
            founder: Some(invite.invite.founder),
        })?;
        // Every invite to this folder is answered.
        for other in self.store.invites()? {
            if other.invite.folder == record.id {
                self.store.remove_invite(&record.id, &other.from)?;
            }
        }
        if self
            .network
            .as_ref()
            .is_some_and(|n| n.net.is_connected(&invite.from))
            && let Some(handle) = self.folders().get(&record.id)
        {
            handle.send(FolderCommand::PeerConnected(invite.from));
        }
        Ok(record)
    }

    /// Where an invite goes when accepted without a path: `~/Weft/<label>` (or
    /// `~/<label>` when `~/Weft` is itself a folder: folders cannot nest) if the label
    /// is a plain name, else `~/Weft/<folder ID>`. The label comes from a peer: it
    /// never names another place.
    fn default_place(&self, invite: &PendingInvite) -> Result<PathBuf, NodeError> {
        let parent = self
            .default_parent
            .clone()
            .ok_or_else(|| NodeError::Invalid("give a path with --path".into()))?;
        let name = crate::invites::plain_name(&invite.invite.label)
            .map_or_else(|| invite.invite.folder.to_string(), str::to_owned);
        let nested = self
            .folders()
            .values()
            .any(|f| parent.starts_with(&f.record.path));
        let parent = match parent.parent() {
            Some(home) if nested => home.to_path_buf(),
            _ => parent,
        };
        Ok(parent.join(name))
    }

    /// Declines an invite (from `from`, if several devices invite to the folder).
    pub fn decline_invite(&self, folder: &str, from: Option<&str>) -> Result<(), NodeError> {
        let id = FolderId::new(folder).map_err(|_| NodeError::UnknownFolder(folder.to_owned()))?;
        let invite = self.pending_invite(&id, from)?;
        self.store.remove_invite(&id, &invite.from)?;
        Ok(())
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
            versions: self.versions.clone(),
            version_retention: Duration::from_secs(
                self.config.version_retention_days.saturating_mul(86_400),
            ),
            temp_file_expiry: Duration::from_secs(self.config.temp_file_expiry_s),
        }
    }

    fn start_folder(&self, record: FolderRecord) -> Result<(), NodeError> {
        let id = record.id.clone();
        let handle = folder::start(
            record,
            self.store.clone(),
            self.key.clone(),
            self.settings(),
            self.events.clone(),
            self.network.clone(),
        )?;
        self.folders().insert(id, handle);
        Ok(())
    }

    /// Adds a folder: creates its directory if needed, records it, starts scanning.
    pub fn add_folder(&self, request: AddFolder) -> Result<FolderRecord, NodeError> {
        let id = match &request.id {
            Some(id) => FolderId::new(id).map_err(|error| NodeError::Invalid(error.to_string()))?,
            None => FolderId::random(random_bytes()?),
        };
        let label = request.label.unwrap_or_else(|| {
            Path::new(&request.path)
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("folder")
                .to_owned()
        });
        self.create_folder(FolderRecord {
            id,
            label,
            path: request.path,
            params: ChunkParams::DEFAULT,
            mode: FolderMode::SendReceive,
            devices: Vec::new(),
            founder: Some(self.device_id()),
        })
    }

    /// Records and starts the folder `record` describes, at `record.path` (made if
    /// missing, then canonicalised).
    fn create_folder(&self, record: FolderRecord) -> Result<FolderRecord, NodeError> {
        let id = record.id.clone();
        let path = PathBuf::from(&record.path);
        if !path.is_absolute() {
            return Err(NodeError::Invalid(format!(
                "folder path {} must be absolute",
                path.display()
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
        let record = FolderRecord {
            path: path_text,
            ..record
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
        self.folders()
            .values()
            .map(FolderHandle::current_record)
            .collect()
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

    fn folder_command<T>(
        &self,
        id: &str,
        make: impl FnOnce(std::sync::mpsc::Sender<T>) -> FolderCommand,
    ) -> Result<T, NodeError> {
        let id = FolderId::new(id).map_err(|_| NodeError::UnknownFolder(id.to_owned()))?;
        let (reply, answer) = std::sync::mpsc::channel();
        {
            let folders = self.folders();
            let handle = folders
                .get(&id)
                .ok_or_else(|| NodeError::UnknownFolder(id.to_string()))?;
            handle.send(make(reply));
        }
        answer
            .recv_timeout(Duration::from_secs(600))
            .map_err(|_| NodeError::Io(format!("folder {id} did not answer")))
    }

    /// The versions of a path in a folder.
    pub fn versions(
        &self,
        folder: &str,
        path: &str,
    ) -> Result<Vec<folder::VersionInfo>, NodeError> {
        let path = RelPath::new(path).map_err(|error| NodeError::Invalid(error.to_string()))?;
        self.folder_command(folder, |reply| FolderCommand::Versions { path, reply })
    }

    /// Restores a version of a path (as a new version); returns the path written.
    pub fn restore(
        &self,
        folder: &str,
        path: &str,
        version: Option<usize>,
        to: Option<&str>,
    ) -> Result<String, NodeError> {
        let path = RelPath::new(path).map_err(|error| NodeError::Invalid(error.to_string()))?;
        let to = to
            .map(RelPath::new)
            .transpose()
            .map_err(|error| NodeError::Invalid(error.to_string()))?;
        self.folder_command(folder, |reply| FolderCommand::Restore {
            path,
            version,
            to,
            reply,
        })?
        .map_err(NodeError::Invalid)
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
            peers: self
                .network
                .as_ref()
                .map(|n| n.net.peers())
                .unwrap_or_default(),
            listen: self
                .network
                .as_ref()
                .map(|n| {
                    n.net
                        .listen_addresses()
                        .iter()
                        .map(ToString::to_string)
                        .collect()
                })
                .unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::BlockSource as _;
    use crate::store::LocalChange;
    use weft_protocol::chunk::build_manifest;
    use weft_protocol::{BlockHash, Manifest};

    /// A store whose folder holds one file, `a.bin`, recorded as the scanner records
    /// it; the folder is shared with the returned device.
    struct Scanned {
        _dir: tempfile::TempDir,
        file: PathBuf,
        source: StoreSource,
        folder: FolderId,
        device: DeviceId,
        manifest: Manifest,
    }

    fn scanned(bytes: &[u8]) -> Scanned {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("folder");
        std::fs::create_dir(&root).expect("folder");
        let file = root.join("a.bin");
        std::fs::write(&file, bytes).expect("write");
        let store = Arc::new(Store::open(&dir.path().join("store.redb"), [1; 8]).expect("store"));
        let folder = FolderId::new("f").expect("folder id");
        let device = DeviceKey::from_secret_bytes([7; 32]).device_id();
        store
            .put_folder(&FolderRecord {
                id: folder.clone(),
                label: "f".into(),
                path: root.to_string_lossy().into_owned(),
                params: ChunkParams::DEFAULT,
                mode: FolderMode::SendReceive,
                devices: vec![(device, Role::Edit)],
                founder: None,
            })
            .expect("folder record");
        let manifest = build_manifest(bytes, &ChunkParams::DEFAULT, |_| {}).expect("manifest");
        let mut entry = crate::scan::entry_from_metadata(
            &std::fs::symlink_metadata(&file).expect("metadata"),
            None,
        );
        entry.manifest = Some(manifest.hash());
        store
            .commit_scan_batch(
                &folder,
                &[LocalChange::Upsert {
                    path: RelPath::new("a.bin").expect("path"),
                    entry,
                    manifest: Some(manifest.clone()),
                }],
                &[],
            )
            .expect("scan batch");
        Scanned {
            _dir: dir,
            file,
            source: StoreSource { store },
            folder,
            device,
            manifest,
        }
    }

    fn pseudo_random(len: usize, seed: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut counter = 0u64;
        while out.len() < len {
            let block = blake3::hash(&[&[seed][..], &counter.to_le_bytes()].concat());
            out.extend_from_slice(block.as_bytes());
            counter += 1;
        }
        out.truncate(len);
        out
    }

    fn served(scanned: &Scanned) -> Vec<Option<Vec<u8>>> {
        let hashes: Vec<BlockHash> = scanned.manifest.blocks().iter().map(|b| b.hash).collect();
        scanned
            .source
            .blocks(&scanned.device, &scanned.folder, &hashes)
    }

    #[test]
    fn every_block_of_a_file_as_it_was_scanned_is_served() {
        let bytes = pseudo_random(2 << 20, 1);
        let scanned = scanned(&bytes);
        assert!(scanned.manifest.blocks().len() > 2);
        let answers = served(&scanned);
        for ((offset, block), answer) in scanned.manifest.blocks_with_offsets().zip(&answers) {
            let start = usize::try_from(offset).expect("offset");
            let expected = &bytes[start..start + block.len as usize];
            assert_eq!(answer.as_deref(), Some(expected), "block at {offset}");
        }
        // A device the folder is not shared with gets nothing.
        let stranger = DeviceKey::from_secret_bytes([9; 32]).device_id();
        let hashes: Vec<BlockHash> = scanned.manifest.blocks().iter().map(|b| b.hash).collect();
        assert!(
            scanned
                .source
                .blocks(&stranger, &scanned.folder, &hashes)
                .is_empty()
        );
    }

    #[test]
    fn a_file_changed_since_its_scan_serves_only_the_blocks_that_still_verify() {
        let bytes = pseudo_random(2 << 20, 2);
        let scanned = scanned(&bytes);
        // Rewritten in place with the same size: its first MiB changed, the rest did
        // not. The mtime is moved explicitly, so the test does not depend on the
        // filesystem's timestamp granularity.
        let mut changed = bytes.clone();
        changed[..1 << 20].copy_from_slice(&pseudo_random(1 << 20, 3));
        std::fs::write(&scanned.file, &changed).expect("rewrite");
        let earlier = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&scanned.file)
            .and_then(|f| f.set_modified(earlier))
            .expect("mtime");
        let answers = served(&scanned);
        let mut refused = 0;
        for ((offset, block), answer) in scanned.manifest.blocks_with_offsets().zip(&answers) {
            let start = usize::try_from(offset).expect("offset");
            let end = start + block.len as usize;
            if end <= 1 << 20 {
                assert_eq!(answer, &None, "changed block at {offset} was served");
                refused += 1;
            } else if start >= 1 << 20 {
                assert_eq!(
                    answer.as_deref(),
                    Some(&bytes[start..end]),
                    "block at {offset}"
                );
            }
        }
        assert!(refused > 0, "no block lay wholly in the changed part");
    }
}
