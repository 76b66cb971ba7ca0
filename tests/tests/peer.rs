//! A peer written with `weft-protocol` and the node's own network layer, for tests
//! that need a device to say what an honest node never would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_node::net::{self, BlockSource, NetConfig, NetEvent};
use weft_protocol::change_signature::SignedChange;
use weft_protocol::document::{Content, Entry, EntryKind, FolderDocument, SyncState};
use weft_protocol::wire::{ChangeSignatures, DocSync, Message};
use weft_protocol::{BlockHash, BlockRef, DeviceId, DeviceKey, FolderId, Manifest};
use weft_tests::wait_for;

pub fn file_entry(author: DeviceId, data: &[u8]) -> Entry {
    let manifest = Manifest::from_blocks(vec![BlockRef {
        hash: BlockHash::of(data),
        len: data.len() as u32,
    }])
    .unwrap();
    Entry {
        kind: EntryKind::File,
        deleted: false,
        size: data.len() as u64,
        mtime_ns: 1_000_000_000,
        mode: 0o644,
        content: Content::for_manifest(&manifest),
        author,
    }
}

/// Sends the next sync message of `doc`, preceded by `key`'s signatures of the changes
/// it carries (a node refuses changes not signed by the device their actor names).
pub fn send_signed(
    net: &net::NetHandle,
    victim: DeviceId,
    folder: &FolderId,
    key: &DeviceKey,
    doc: &mut FolderDocument,
    state: &mut SyncState,
) -> Option<Vec<u8>> {
    let (bytes, changes) = doc.generate_sync_message_with_changes(state)?;
    let changes = changes
        .iter()
        .map(|change| SignedChange::sign(key, folder, change))
        .collect();
    let _ = net.send(
        &victim,
        Message::ChangeSignatures(ChangeSignatures {
            folder: folder.clone(),
            changes,
        }),
    );
    Some(bytes)
}

/// Runs the automerge sync protocol from the hostile side for `seconds`, signing what
/// it sends with `key`.
pub async fn sync_for(
    net: &net::NetHandle,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<NetEvent>,
    victim: DeviceId,
    folder: &FolderId,
    key: &DeviceKey,
    doc: &mut FolderDocument,
    seconds: u64,
) {
    let mut state = SyncState::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let send = |doc: &mut FolderDocument, state: &mut SyncState| {
        if let Some(bytes) = send_signed(net, victim, folder, key, doc, state) {
            let _ = net.send(
                &victim,
                Message::DocSync(DocSync {
                    folder: folder.clone(),
                    sync_message: bytes,
                }),
            );
        }
    };
    send(doc, &mut state);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
            Ok(Some(NetEvent::Message(from, Message::DocSync(sync), _)))
                if from == victim && &sync.folder == folder =>
            {
                let _ = doc.receive_sync_message(&mut state, &sync.sync_message);
                send(doc, &mut state);
            }
            Ok(None) => break,
            _ => {}
        }
    }
    // Received outside the folder core, the changes are not in the document's access
    // log until it is loaded again.
    let actor = doc.automerge().get_actor().clone();
    if let Ok(loaded) = FolderDocument::load(&doc.save(), [], actor) {
        *doc = loaded;
    }
}

/// Syncs `doc` of `folder` with `device` (see [`sync_for`]) until it holds the
/// folder's access list with `me` on it, for at most ten rounds of a second: a peer's
/// changes must build on the folder's history, or they are refused outright. True
/// once it does.
#[allow(clippy::too_many_arguments)]
pub fn sync_until_member(
    runtime: &tokio::runtime::Runtime,
    net: &net::NetHandle,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<NetEvent>,
    device: DeviceId,
    folder: &FolderId,
    key: &DeviceKey,
    doc: &mut FolderDocument,
    me: &DeviceId,
) -> bool {
    for _ in 0..10 {
        runtime.block_on(sync_for(net, events, device, folder, key, doc, 1));
        if doc.access_list().role(me).is_some() {
            return true;
        }
    }
    false
}

/// A protocol peer with its own runtime, listening on loopback QUIC.
pub struct Peer {
    /// Its runtime (the network runs on it).
    pub runtime: tokio::runtime::Runtime,
    /// Its network handle.
    pub net: net::NetHandle,
    /// What its network reports.
    pub events: tokio::sync::mpsc::UnboundedReceiver<NetEvent>,
    /// Its key.
    pub key: DeviceKey,
    /// Its device ID.
    pub id: DeviceId,
    /// Signatures of other devices' changes it received: sent on with those changes
    /// when it relays them.
    pub signatures: std::collections::BTreeMap<[u8; 32], weft_protocol::Signature>,
}

impl Peer {
    /// Starts a peer with the key made from `seed`, serving from `source`, on QUIC.
    pub fn start(seed: u8, source: Arc<dyn BlockSource>) -> Self {
        Self::start_on(seed, source, "/ip4/127.0.0.1/udp/0/quic-v1")
    }

    /// Starts a peer listening on `listen` (TCP + yamux has small stream windows: a
    /// peer that does not read stalls the writer at once).
    pub fn start_on(seed: u8, source: Arc<dyn BlockSource>, listen: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let key = DeviceKey::from_secret_bytes([seed; 32]);
        let id = key.device_id();
        let listen: net::Multiaddr = listen.parse().unwrap();
        let (net, events) = runtime.block_on(async {
            net::start(
                &key,
                NetConfig {
                    listen: vec![listen],
                    mdns: false,
                },
                source,
            )
            .unwrap()
        });
        let listening = wait_for(Duration::from_secs(10), || {
            !net.listen_addresses().is_empty()
        });
        assert!(listening.is_some(), "the peer is not listening");
        Self {
            runtime,
            net,
            events,
            key,
            id,
            signatures: Default::default(),
        }
    }

    /// The address to dial it at.
    pub fn address(&self) -> String {
        self.net.listen_addresses()[0].to_string()
    }

    /// Waits until `device` is connected.
    pub fn connected(&self, device: &DeviceId) -> bool {
        wait_for(Duration::from_secs(30), || self.net.is_connected(device)).is_some()
    }

    /// Syncs `doc` of `folder` with `device` for `seconds`: its own changes signed with
    /// its key, other devices' changes with the signatures it received for them.
    pub fn sync(
        &mut self,
        device: DeviceId,
        folder: &FolderId,
        doc: &mut FolderDocument,
        seconds: u64,
    ) {
        let Self {
            runtime,
            net,
            events,
            key,
            signatures,
            ..
        } = self;
        runtime.block_on(async {
            let mut state = SyncState::new();
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let send = |doc: &mut FolderDocument,
                        state: &mut SyncState,
                        signatures: &std::collections::BTreeMap<
                [u8; 32],
                weft_protocol::Signature,
            >| {
                let Some((bytes, changes)) = doc.generate_sync_message_with_changes(state) else {
                    return;
                };
                let changes = changes
                    .iter()
                    .map(|change| match signatures.get(&change.0) {
                        Some(signature) => SignedChange {
                            hash: change.0,
                            signature: *signature,
                        },
                        None => SignedChange::sign(key, folder, change),
                    })
                    .collect();
                let _ = net.send(
                    &device,
                    Message::ChangeSignatures(ChangeSignatures {
                        folder: folder.clone(),
                        changes,
                    }),
                );
                let _ = net.send(
                    &device,
                    Message::DocSync(DocSync {
                        folder: folder.clone(),
                        sync_message: bytes,
                    }),
                );
            };
            send(doc, &mut state, signatures);
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                    Ok(Some(NetEvent::Message(from, Message::DocSync(sync), _)))
                        if from == device && &sync.folder == folder =>
                    {
                        let _ = doc.receive_sync_message(&mut state, &sync.sync_message);
                        send(doc, &mut state, signatures);
                    }
                    Ok(Some(NetEvent::Message(_, Message::ChangeSignatures(signed), _)))
                        if &signed.folder == folder =>
                    {
                        signatures.extend(signed.changes.iter().map(|s| (s.hash, s.signature)));
                    }
                    Ok(None) => break,
                    _ => {}
                }
            }
        });
        let actor = doc.automerge().get_actor().clone();
        if let Ok(loaded) = FolderDocument::load(&doc.save(), [], actor) {
            *doc = loaded;
        }
    }
}

/// Serves the given byte strings as blocks, to anyone.
pub struct Blocks(pub Vec<Vec<u8>>);

impl BlockSource for Blocks {
    fn authorised(&self, _: &DeviceId, _: &FolderId) -> bool {
        true
    }
    fn block(&self, _: &FolderId, hash: &BlockHash) -> Option<Vec<u8>> {
        self.0.iter().find(|b| BlockHash::of(b) == *hash).cloned()
    }
    fn manifest(&self, _: &FolderId, _: &weft_protocol::ManifestHash) -> Option<Manifest> {
        None
    }
}

/// How long to wait for something that should not happen (a refused change applied).
pub const NEVER: Duration = Duration::from_secs(4);

/// True if `condition` stays false for [`NEVER`].
pub fn stays_false(mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < NEVER {
        if condition() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}
