//! Networking: libp2p (QUIC, and TCP + noise + yamux as fallback), identify, mDNS, and
//! Weft's two stream protocols on `libp2p-stream`.
//!
//! - `/weft/control/1` is one-way: each side opens one stream per peer and writes
//!   frames on it (first a `Hello`, then document sync messages and invites); the other
//!   side only reads. No side has to decide who opens. A device's `Hello` on a second
//!   stream begins a new session: it restarted, so its older connections are closed
//!   and syncs start over ([`Sessions`]).
//! - `/weft/blocks/1` carries requests: the requester writes a
//!   `BlockRequest` or `ManifestRequest` frame; the responder answers each hash in
//!   order (`Block`/`BlockMissing`, or `ManifestResponse`); a requester may send its
//!   next request on the same stream.
//!
//! Frames are `weft_protocol::wire` frames. A malformed or oversized frame, or a wrong
//! protocol version, disconnects that peer with a logged reason; nothing else is
//! affected. The PeerId is the device key, so the transport authenticates the device;
//! what a device may see is decided by the [`BlockSource`] and the node, not here.

mod coalescer;
mod control;
mod error;
mod request;
mod serve;
mod session;
mod swarm;

pub use error::{FrameError, NetError, ProtocolBreach, StreamFailure};
pub use swarm::start;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use weft_protocol::wire::Message;
use weft_protocol::{BlockHash, DeviceId, FolderId, Manifest, ManifestHash};

pub use libp2p::{Multiaddr, Stream};

/// The one-way control stream protocol.
pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/weft/control/1");
/// The block and manifest request protocol.
pub const BLOCKS_PROTOCOL: StreamProtocol = StreamProtocol::new("/weft/blocks/1");
/// Messages queued for one peer's control stream before senders wait.
pub const CONTROL_QUEUE: usize = 256;
/// Blocks a responder reads per trip to the blocking pool (and holds at once).
pub const READ_GROUP: usize = 8;
/// Blocks held in memory for serving, across every request from every peer: what
/// bounds a sending node's memory however many downloads peers run (each block is
/// at most the folder's max chunk size, 1 MiB by default; 256 KiB on average).
pub const SERVE_SLOTS: usize = 48;
/// How long a block or manifest request may take before the peer is given up on.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A responder closes a block stream that has carried no request for this long.
pub const SERVE_IDLE: Duration = Duration::from_secs(30);
/// A device must send its `Hello` this soon after opening a control stream.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A frame whose first bytes arrived must arrive whole this soon (a largest frame,
/// 32 MiB, at 1 MiB/s).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(32);
/// Largest first frame on a control stream: a `Hello` (name and version, at most
/// 320 bytes encoded) with room to spare. A stranger cannot make the node allocate a
/// large frame before it has even said who it is.
pub const MAX_HELLO_FRAME_LEN: usize = 1024;
/// Bytes of control frames read and not yet handled by the node, from all peers: what
/// bounds the memory a flood of large frames can take. A reader waits for room
/// (backpressure on its stream).
pub const CONTROL_BYTES_IN_FLIGHT: usize = 256 * 1024 * 1024;
/// The share of [`CONTROL_BYTES_IN_FLIGHT`] one device may hold, so that one peer's
/// flood does not stall the others.
pub const PEER_CONTROL_BYTES: usize = 64 * 1024 * 1024;
/// A peer whose frames wait this long for room in its byte budget is disconnected.
pub const BUDGET_WAIT: Duration = Duration::from_secs(30);
/// Control streams read at once from one device (its current session's and, briefly,
/// a restarted one's); more are refused.
pub const MAX_CONTROL_STREAMS_PER_DEVICE: usize = 4;
/// Connections being set up, from everyone.
pub const MAX_PENDING_CONNECTIONS: u32 = 64;
/// Established connections per device (QUIC and TCP, a simultaneous dial, a restart).
pub const MAX_CONNECTIONS_PER_DEVICE: u32 = 4;
/// Established connections in all.
pub const MAX_CONNECTIONS: u32 = 512;

/// Longest a responder waits for one answer frame to be taken by the requester:
/// a requester that stops reading holds its serving slots no longer (an honest one
/// on a slow link still takes a 1 MiB block in this time at 100 KiB/s).
pub const SERVE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where blocks and manifests come from when a peer asks. Implemented by the node;
/// it decides what the asking device may see.
pub trait BlockSource: Send + Sync + 'static {
    /// May `device` read `folder`?
    fn authorised(&self, device: &DeviceId, folder: &FolderId) -> bool;
    /// A block of `folder`, read and verified from a local file.
    fn block(&self, folder: &FolderId, hash: &BlockHash) -> Option<Vec<u8>>;
    /// The blocks `device` asked for, in order (`None`: missing or refused); empty if
    /// `device` may not read `folder`. A source may look the folder up once for all.
    fn blocks(
        &self,
        device: &DeviceId,
        folder: &FolderId,
        hashes: &[BlockHash],
    ) -> Vec<Option<Vec<u8>>> {
        if !self.authorised(device, folder) {
            return Vec::new();
        }
        hashes.iter().map(|hash| self.block(folder, hash)).collect()
    }
    /// A manifest of `folder`.
    fn manifest(&self, folder: &FolderId, hash: &ManifestHash) -> Option<Manifest>;
}

/// Something the network reports to the node.
#[derive(Debug)]
pub enum NetEvent {
    /// A device connected (first connection).
    Connected(DeviceId),
    /// A device's last connection closed.
    Disconnected(DeviceId),
    /// A control message arrived; the budget holds its bytes until the event is
    /// dropped (handled).
    Message(DeviceId, Message, FrameBudget),
    /// mDNS found a peer on the LAN.
    Discovered(DeviceId, Vec<Multiaddr>),
}

/// The share of the control byte budgets ([`CONTROL_BYTES_IN_FLIGHT`],
/// [`PEER_CONTROL_BYTES`]) one received frame holds while the node has not handled it.
#[derive(Debug)]
pub struct FrameBudget {
    _all: Option<tokio::sync::OwnedSemaphorePermit>,
    _peer: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl FrameBudget {
    /// A budget that holds nothing (for events made outside a reader).
    pub fn none() -> Self {
        Self {
            _all: None,
            _peer: None,
        }
    }

    pub(super) fn held(
        all: tokio::sync::OwnedSemaphorePermit,
        peer: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        Self {
            _all: Some(all),
            _peer: Some(peer),
        }
    }
}

/// A peer's connection, as the status shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The device.
    pub device_id: String,
    /// The remote address of the connection.
    pub address: String,
    /// The device's name from its Hello.
    pub name: String,
    /// Bytes received from it (Weft frames, headers included).
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
    /// Blocks from it that failed verification.
    pub bad_blocks: u64,
    /// Block and manifest requests it made to this node.
    #[serde(default)]
    pub requests_in: u64,
    /// Streams those requests came on (a requester keeps its streams for more).
    #[serde(default)]
    pub request_streams_in: u64,
}

pub(super) struct PeerState {
    pub(super) address: String,
    pub(super) name: String,
    pub(super) sender: mpsc::Sender<Message>,
}

/// Byte and error counters of one device (kept across reconnects).
#[derive(Default, Debug)]
pub struct Counters {
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Bytes sent.
    pub bytes_out: AtomicU64,
    /// Blocks that failed verification.
    pub bad_blocks: AtomicU64,
    /// Requests served.
    pub requests_in: AtomicU64,
    /// Request streams accepted.
    pub request_streams_in: AtomicU64,
}

pub(super) struct Shared {
    pub(super) peers: Mutex<HashMap<DeviceId, PeerState>>,
    pub(super) counters: Mutex<HashMap<DeviceId, Arc<Counters>>>,
    pub(super) listen: Mutex<Vec<Multiaddr>>,
    pub(super) coalescer: coalescer::Coalescer,
    /// Per device, how many times a connection to it opened or closed: a kept request
    /// stream is only reused while this has not moved (it may be on a dead connection).
    pub(super) connection_epochs: Mutex<HashMap<DeviceId, u64>>,
    /// Per device, the token of the control reader whose `Hello` began its current
    /// session (cleared when its last connection closes). Written only by the swarm
    /// task ([`Sessions`]), in order with connection events; readers read it.
    pub(super) greetings: Mutex<HashMap<DeviceId, u64>>,
    /// Source of control-reader tokens.
    pub(super) next_reader: AtomicU64,
    /// Bytes of control frames in flight, from everyone ([`CONTROL_BYTES_IN_FLIGHT`]).
    pub(super) control_bytes: Arc<tokio::sync::Semaphore>,
    /// Per device: its share ([`PEER_CONTROL_BYTES`]) and its control readers.
    pub(super) peer_budgets: Mutex<HashMap<DeviceId, (Arc<tokio::sync::Semaphore>, usize)>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            peers: Default::default(),
            counters: Default::default(),
            listen: Default::default(),
            coalescer: Default::default(),
            connection_epochs: Default::default(),
            greetings: Default::default(),
            next_reader: Default::default(),
            control_bytes: Arc::new(tokio::sync::Semaphore::new(CONTROL_BYTES_IN_FLIGHT)),
            peer_budgets: Default::default(),
        }
    }
}

impl Shared {
    /// A new control reader of `device`: its byte budget, or `None` if it already has
    /// [`MAX_CONTROL_STREAMS_PER_DEVICE`] readers.
    pub(super) fn reader_started(&self, device: &DeviceId) -> Option<Arc<tokio::sync::Semaphore>> {
        let mut budgets = self.peer_budgets.lock().unwrap_or_else(|p| p.into_inner());
        let (budget, readers) = budgets
            .entry(*device)
            .or_insert_with(|| (Arc::new(tokio::sync::Semaphore::new(PEER_CONTROL_BYTES)), 0));
        if *readers >= MAX_CONTROL_STREAMS_PER_DEVICE {
            return None;
        }
        *readers += 1;
        Some(budget.clone())
    }

    /// A control reader of `device` ended.
    pub(super) fn reader_ended(&self, device: &DeviceId) {
        let mut budgets = self.peer_budgets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, readers)) = budgets.get_mut(device) {
            *readers = readers.saturating_sub(1);
            if *readers == 0 {
                budgets.remove(device);
            }
        }
    }

    pub(super) fn connections_changed(&self, device: &DeviceId) {
        let mut epochs = self
            .connection_epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *epochs.entry(*device).or_default() += 1;
    }

    pub(super) fn counters(&self, device: &DeviceId) -> Arc<Counters> {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters.entry(*device).or_default().clone()
    }
}

pub(super) enum Command {
    Dial(PeerId, Vec<Multiaddr>),
    Disconnect(PeerId),
    /// A control reader (its token) got the device's `Hello` ([`Sessions`]).
    Greeted(PeerId, u64),
}

/// The handle the node uses to talk to the network.
#[derive(Clone)]
pub struct NetHandle {
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) control: libp2p_stream::Control,
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetHandle")
    }
}

/// The libp2p behaviours the swarm runs.
#[derive(libp2p::swarm::NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: libp2p::connection_limits::Behaviour,
    pub(super) identify: libp2p::identify::Behaviour,
    pub(super) mdns: libp2p::swarm::behaviour::toggle::Toggle<libp2p::mdns::tokio::Behaviour>,
    pub(super) stream: libp2p_stream::Behaviour,
}

/// Network settings.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// LAN discovery.
    pub mdns: bool,
}

impl NetHandle {
    /// Dials a device at the given addresses (no-op if connected).
    pub fn dial(&self, device: &DeviceId, addresses: Vec<Multiaddr>) {
        let _ = self
            .commands
            .send(Command::Dial(device.to_peer_id(), addresses));
    }

    /// Queues a control message for a connected device.
    pub fn send(&self, device: &DeviceId, message: Message) -> Result<(), NetError> {
        let sender = {
            let peers = self.shared.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers
                .get(device)
                .map(|p| p.sender.clone())
                .ok_or(NetError::NotConnected(*device))?
        };
        match sender.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                // A dropped message would leave automerge's sync state believing the
                // peer got it, and the sync would never settle. Close the connection
                // instead: reconnecting starts every sync over on both sides.
                tracing::warn!(device = %device, "control queue full; disconnecting to resync");
                let _ = self.commands.send(Command::Disconnect(device.to_peer_id()));
                Err(NetError::Stream {
                    device: *device,
                    source: StreamFailure::QueueFull,
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(NetError::Stream {
                device: *device,
                source: StreamFailure::Closing,
            }),
        }
    }

    /// Closes the connection to a device (it may dial again; its syncs start over).
    pub fn disconnect(&self, device: &DeviceId) {
        let _ = self.commands.send(Command::Disconnect(device.to_peer_id()));
    }

    /// Is this device connected?
    pub fn is_connected(&self, device: &DeviceId) -> bool {
        self.shared
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(device)
    }

    /// Connected devices.
    pub fn connected(&self) -> Vec<DeviceId> {
        self.shared
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Addresses this node listens on.
    pub fn listen_addresses(&self) -> Vec<Multiaddr> {
        self.shared
            .listen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes whenever a connection to `device` opens or closes (see
    /// [`coalescer`](self::coalescer): kept streams of an older epoch are not reused).
    pub(crate) fn connection_epoch(&self, device: &DeviceId) -> u64 {
        self.shared
            .connection_epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .copied()
            .unwrap_or(0)
    }

    /// Status of every connected peer.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let peers = self.shared.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .iter()
            .map(|(device, state)| {
                let counters = self.shared.counters(device);
                PeerInfo {
                    device_id: device.to_string(),
                    address: state.address.clone(),
                    name: state.name.clone(),
                    bytes_in: counters.bytes_in.load(Ordering::Relaxed),
                    bytes_out: counters.bytes_out.load(Ordering::Relaxed),
                    bad_blocks: counters.bad_blocks.load(Ordering::Relaxed),
                    requests_in: counters.requests_in.load(Ordering::Relaxed),
                    request_streams_in: counters.request_streams_in.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Opens a raw stream to a connected device (tools and protocol tests: frames are
    /// the caller's business).
    pub async fn open_raw_stream(
        &self,
        device: &DeviceId,
        protocol: StreamProtocol,
    ) -> Result<libp2p::Stream, NetError> {
        let mut control = self.control.clone();
        control
            .open_stream(device.to_peer_id(), protocol)
            .await
            .map_err(|error| NetError::Stream {
                device: *device,
                source: StreamFailure::Open(error.to_string()),
            })
    }

    /// Counts a block from `device` that failed verification.
    pub fn penalise(&self, device: &DeviceId) {
        self.shared
            .counters(device)
            .bad_blocks
            .fetch_add(1, Ordering::Relaxed);
    }
}
