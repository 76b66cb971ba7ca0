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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{PeerId, StreamProtocol, Swarm, identify, mdns, noise, tcp, yamux};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use weft_protocol::wire::{
    self, Block, BlockMissing, BlockRequest, FRAME_HEADER_LEN, Hello, ManifestRequest,
    ManifestResponse, Message, PROTOCOL_VERSION,
};
use weft_protocol::{BlockHash, DeviceId, DeviceKey, FolderId, Manifest, ManifestHash};

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

/// Why a network request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The peer is not connected.
    #[error("device {0:?} is not connected")]
    NotConnected(DeviceId),
    /// The stream failed.
    #[error("stream to {device:?} failed: {reason}")]
    Stream {
        /// The peer.
        device: DeviceId,
        /// What happened.
        reason: String,
    },
    /// The peer broke the protocol.
    #[error("device {device:?} broke the protocol: {reason}")]
    Protocol {
        /// The peer.
        device: DeviceId,
        /// What it did.
        reason: String,
    },
    /// Setting up the transport failed.
    #[error("network setup failed: {0}")]
    Setup(String),
}

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
    /// A control message arrived.
    Message(DeviceId, Message),
    /// mDNS found a peer on the LAN.
    Discovered(DeviceId, Vec<Multiaddr>),
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

struct PeerState {
    address: String,
    name: String,
    sender: mpsc::Sender<Message>,
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

#[derive(Default)]
struct Shared {
    peers: Mutex<HashMap<DeviceId, PeerState>>,
    counters: Mutex<HashMap<DeviceId, Arc<Counters>>>,
    listen: Mutex<Vec<Multiaddr>>,
    coalescer: crate::coalescer::Coalescer,
    /// Per device, how many times a connection to it opened or closed: a kept request
    /// stream is only reused while this has not moved (it may be on a dead connection).
    connection_epochs: Mutex<HashMap<DeviceId, u64>>,
    /// Per device, the token of the control reader whose `Hello` began its current
    /// session (cleared when its last connection closes). Written only by the swarm
    /// task ([`Sessions`]), in order with connection events; readers read it.
    greetings: Mutex<HashMap<DeviceId, u64>>,
    /// Source of control-reader tokens.
    next_reader: AtomicU64,
}

impl Shared {
    fn connections_changed(&self, device: &DeviceId) {
        let mut epochs = self
            .connection_epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *epochs.entry(*device).or_default() += 1;
    }

    fn counters(&self, device: &DeviceId) -> Arc<Counters> {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters.entry(*device).or_default().clone()
    }
}

enum Command {
    Dial(PeerId, Vec<Multiaddr>),
    Disconnect(PeerId),
    /// A control reader (its token) got the device's `Hello` ([`Sessions`]).
    Greeted(PeerId, u64),
}

/// The handle the node uses to talk to the network.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::UnboundedSender<Command>,
    control: libp2p_stream::Control,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetHandle")
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    stream: libp2p_stream::Behaviour,
}

/// Network settings.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// LAN discovery.
    pub mdns: bool,
}

/// Largest yamux data frame sent: one stream's whole initial window (256 KiB).
const YAMUX_FRAME: usize = 256 * 1024;

/// Starts the network on the current tokio runtime.
pub fn start(
    key: &DeviceKey,
    config: NetConfig,
    source: Arc<dyn BlockSource>,
) -> Result<(NetHandle, mpsc::UnboundedReceiver<NetEvent>), NetError> {
    let keypair = key
        .to_libp2p_keypair()
        .map_err(|error| NetError::Setup(error.to_string()))?;
    let mdns_enabled = config.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            // TLS first (AES-GCM on CPUs that have it, see vendor/README.md), noise for
            // peers that only speak noise.
            (libp2p::tls::Config::new, noise::Config::new),
            || {
                // Block answers travel in frames of up to 256 KiB (yamux splits at 16 KiB
                // by default: two TLS records and two writes per 16 KiB; see
                // vendor/README.md).
                let mut config = yamux::Config::default();
                config.set_split_send_size(YAMUX_FRAME);
                config
            },
        )
        .map_err(|error| NetError::Setup(error.to_string()))?
        .with_quic_config(|mut quic| {
            // Bulk transfers: large flow-control windows (DESIGN.md transport notes).
            quic.max_stream_data = 64 * 1024 * 1024;
            quic.max_connection_data = 256 * 1024 * 1024;
            quic
        })
        .with_behaviour(|key| {
            let mdns = if mdns_enabled {
                mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id()).ok()
            } else {
                None
            };
            Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/weft/id/1".into(),
                    key.public(),
                )),
                mdns: Toggle::from(mdns),
                stream: libp2p_stream::Behaviour::new(),
            }
        })
        .map_err(|error| NetError::Setup(error.to_string()))?
        .with_swarm_config(|swarm| swarm.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    for address in &config.listen {
        swarm
            .listen_on(address.clone())
            .map_err(|error| NetError::Setup(format!("cannot listen on {address}: {error}")))?;
    }
    let mut control = swarm.behaviour().stream.new_control();
    let shared = Arc::new(Shared::default());
    let (commands, command_receiver) = mpsc::unbounded_channel();
    let (events, event_receiver) = mpsc::unbounded_channel();
    let handle = NetHandle {
        commands: commands.clone(),
        control: control.clone(),
        shared: shared.clone(),
    };
    let local_name = hello_name();
    let incoming_control = control
        .accept(CONTROL_PROTOCOL)
        .map_err(|error| NetError::Setup(error.to_string()))?;
    let incoming_blocks = control
        .accept(BLOCKS_PROTOCOL)
        .map_err(|error| NetError::Setup(error.to_string()))?;
    tokio::spawn(accept_control(
        incoming_control,
        events.clone(),
        shared.clone(),
        commands.clone(),
    ));
    tokio::spawn(accept_blocks(incoming_blocks, source, shared.clone()));
    tokio::spawn(run_swarm(
        swarm,
        command_receiver,
        events,
        handle.clone(),
        local_name,
    ));
    Ok((handle, event_receiver))
}

fn hello_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "weft".into())
}

async fn run_swarm(
    mut swarm: Swarm<Behaviour>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<NetEvent>,
    handle: NetHandle,
    device_name: String,
) {
    let mut sessions = Sessions {
        events,
        handle,
        device_name,
        connections: HashMap::new(),
        restarts: HashMap::new(),
    };
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    tracing::info!(%address, "listening");
                    sessions.handle.shared.listen.lock().unwrap_or_else(|p| p.into_inner()).push(address);
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                    let Ok(device) = DeviceId::try_from_peer_id(&peer_id) else {
                        tracing::warn!(%peer_id, "peer is not a Weft device; disconnecting");
                        let _ = swarm.disconnect_peer_id(peer_id);
                        continue;
                    };
                    let address = endpoint.get_remote_address().to_string();
                    sessions.established(device, connection_id, address, num_established.get());
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                    if let Ok(device) = DeviceId::try_from_peer_id(&peer_id) {
                        sessions.closed(device, connection_id, num_established, cause.as_ref());
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                    for (peer, address) in found {
                        by_peer.entry(peer).or_default().push(address);
                    }
                    for (peer, addresses) in by_peer {
                        if let Ok(device) = DeviceId::try_from_peer_id(&peer) {
                            let _ = sessions.events.send(NetEvent::Discovered(device, addresses));
                        }
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                    tracing::debug!(?peer_id, %error, "dial failed");
                }
                _ => {}
            },
            command = commands.recv() => match command {
                Some(Command::Dial(peer, addresses)) => {
                    if swarm.is_connected(&peer) {
                        continue;
                    }
                    let options = DialOpts::peer_id(peer).addresses(addresses).build();
                    if let Err(error) = swarm.dial(options) {
                        tracing::debug!(%peer, %error, "dial not started");
                    }
                }
                Some(Command::Disconnect(peer)) => {
                    let _ = swarm.disconnect_peer_id(peer);
                }
                Some(Command::Greeted(peer, token)) => {
                    if let Ok(device) = DeviceId::try_from_peer_id(&peer) {
                        sessions.greeted(&mut swarm, device, token);
                    }
                }
                None => break,
            },
        }
    }
}

/// The swarm task's view of each device's connections and control session.
///
/// A device's session begins with its first connection: a control writer starts and
/// the node hears `Connected`. Each `Hello` a control reader receives is reported here
/// ([`Command::Greeted`]), in order with the connection events. A second `Hello` means
/// the device started over (it restarted, or gave up a connection that we still hold:
/// with QUIC a dead connection lingers until its idle timeout). Then the node hears `Disconnected`, every
/// connection of the device but the newest is closed — block requests would otherwise
/// go to a random one of them, and the control writer may be writing into a dead one —
/// and once they are gone the session starts over: a new writer (made at once, so that
/// the old one failing on a closed connection does not disconnect the device) and
/// `Connected`, so that folders restart their syncs with a peer that has forgotten
/// them.
struct Sessions {
    events: mpsc::UnboundedSender<NetEvent>,
    handle: NetHandle,
    device_name: String,
    /// Open connections per device, oldest first, with their remote addresses.
    connections: HashMap<DeviceId, Vec<(ConnectionId, String)>>,
    /// Devices whose session is starting over.
    restarts: HashMap<DeviceId, Restart>,
}

/// A session starting over ([`Sessions`]).
struct Restart {
    /// Connections of the previous session being closed; the new session starts when
    /// none is left.
    closing: Vec<ConnectionId>,
    /// The new session's control writer; it opens its stream once `closing` is empty.
    writer: Writer,
}

impl Sessions {
    fn established(
        &mut self,
        device: DeviceId,
        connection: ConnectionId,
        address: String,
        count: u32,
    ) {
        self.handle.shared.connections_changed(&device);
        self.connections
            .entry(device)
            .or_default()
            .push((connection, address.clone()));
        if count == 1 {
            tracing::info!(device = %device, %address, "connected");
            self.start_writer(device, address);
            let _ = self.events.send(NetEvent::Connected(device));
        }
    }

    fn closed(
        &mut self,
        device: DeviceId,
        connection: ConnectionId,
        count: u32,
        cause: Option<&impl std::fmt::Debug>,
    ) {
        self.handle.shared.connections_changed(&device);
        if let Some(list) = self.connections.get_mut(&device) {
            list.retain(|(id, _)| *id != connection);
        }
        if count == 0 {
            tracing::info!(device = %device, ?cause, "disconnected");
            self.connections.remove(&device);
            self.restarts.remove(&device);
            self.handle
                .shared
                .greetings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&device);
            self.handle
                .shared
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&device);
            let _ = self.events.send(NetEvent::Disconnected(device));
            return;
        }
        if let Some(restart) = self.restarts.get_mut(&device) {
            restart.closing.retain(|id| *id != connection);
            if restart.closing.is_empty() {
                self.finish_restart(device);
            }
        }
    }

    /// A control reader got the device's `Hello`.
    fn greeted(&mut self, swarm: &mut Swarm<Behaviour>, device: DeviceId, token: u64) {
        let Some(open) = self
            .connections
            .get(&device)
            .filter(|list| !list.is_empty())
        else {
            // Its connections closed meanwhile: a stale reader.
            return;
        };
        // Every connection but the newest: the restarted device dialed that one, and
        // the ones before it (the ones of its previous life, a simultaneous dial's
        // second one) may be dead while they linger. (Should it have dialed twice and
        // greeted on the older of its two new connections, that one's end restarts
        // the device's connections once more.)
        let older: Vec<ConnectionId> = open[..open.len() - 1].iter().map(|(id, _)| *id).collect();
        let earlier = self
            .handle
            .shared
            .greetings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device, token);
        if earlier.is_none() {
            return;
        }
        tracing::info!(device = %device, "the device greeted again on a new stream: a new session");
        let _ = self.events.send(NetEvent::Disconnected(device));
        let closing: Vec<ConnectionId> = older
            .into_iter()
            .filter(|id| swarm.close_connection(*id))
            .collect();
        tracing::debug!(device = %device, count = closing.len(), "closing older connections");
        match self.restarts.get_mut(&device) {
            // A restart already under way keeps its writer and waits for these too.
            Some(restart) => restart.closing.extend(closing),
            None => {
                let writer = self.new_writer(device);
                self.restarts.insert(device, Restart { closing, writer });
            }
        }
        if self
            .restarts
            .get(&device)
            .is_some_and(|restart| restart.closing.is_empty())
        {
            self.finish_restart(device);
        }
    }

    /// The previous session's connections are gone: the new session's writer starts.
    fn finish_restart(&mut self, device: DeviceId) {
        let Some(restart) = self.restarts.remove(&device) else {
            return;
        };
        let address = self
            .connections
            .get(&device)
            .and_then(|list| list.last())
            .map(|(_, address)| address.clone())
            .unwrap_or_default();
        tracing::info!(device = %device, %address, "the device's new session starts");
        self.spawn_writer(restart.writer, address);
        let _ = self.events.send(NetEvent::Connected(device));
    }

    /// Starts a control writer for a device's first connection.
    fn start_writer(&self, device: DeviceId, address: String) {
        let writer = self.new_writer(device);
        self.spawn_writer(writer, address);
    }

    /// Makes the device's control writer: from now on messages for the device queue for
    /// it, and the old writer (if any) ends when its channel is dropped here.
    fn new_writer(&self, device: DeviceId) -> Writer {
        let (sender, receiver) = mpsc::channel(CONTROL_QUEUE);
        let writer = Writer {
            device,
            peer: device.to_peer_id(),
            outbox: receiver,
            me: sender.downgrade(),
        };
        let mut peers = self
            .handle
            .shared
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let state = peers.entry(device).or_insert_with(|| PeerState {
            address: String::new(),
            name: String::new(),
            sender: sender.clone(),
        });
        state.sender = sender;
        writer
    }

    /// Opens the writer's stream and starts it.
    fn spawn_writer(&self, writer: Writer, address: String) {
        if let Some(state) = self
            .handle
            .shared
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&writer.device)
        {
            state.address = address;
        }
        tokio::spawn(write_control(
            self.handle.clone(),
            writer,
            self.device_name.clone(),
        ));
    }
}

/// Writes one frame; counts its bytes.
async fn write_frame(
    stream: &mut libp2p::Stream,
    message: &Message,
    counters: &Counters,
) -> Result<(), String> {
    let frame = wire::encode(message).map_err(|error| error.to_string())?;
    stream
        .write_all(&frame)
        .await
        .map_err(|error| error.to_string())?;
    counters
        .bytes_out
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Writes a [`Message::Block`] frame: its head, then the bytes from where they are
/// (the frame [`write_frame`] would write, without copying the block into it).
async fn write_block_frame(
    stream: &mut libp2p::Stream,
    request_id: u64,
    hash: BlockHash,
    data: &[u8],
    counters: &Counters,
) -> Result<(), String> {
    let head = wire::BlockHead {
        request_id,
        hash,
        data_len: data.len(),
    }
    .encode_frame_head()
    .map_err(|error| error.to_string())?;
    for part in [&head[..], data] {
        stream
            .write_all(part)
            .await
            .map_err(|error| error.to_string())?;
    }
    counters
        .bytes_out
        .fetch_add((head.len() + data.len()) as u64, Ordering::Relaxed);
    Ok(())
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
async fn read_frame(
    stream: &mut libp2p::Stream,
    counters: &Counters,
) -> Result<Option<Message>, String> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut filled = 0;
    while filled < FRAME_HEADER_LEN {
        let read = stream
            .read(&mut header[filled..])
            .await
            .map_err(|error| error.to_string())?;
        if read == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err("stream ended inside a frame header".into())
            };
        }
        filled += read;
    }
    let len = wire::frame_len(header).map_err(|error| error.to_string())?;
    let ended = |error: std::io::Error| format!("stream ended inside a frame: {error}");
    // A block's bytes are read straight into the block's buffer (no frame-sized copy);
    // anything else, or a block frame that does not add up, is decoded whole.
    let mut head = [0u8; wire::BLOCK_HEAD_MAX];
    let peeked = len.min(wire::BLOCK_HEAD_MAX);
    stream
        .read_exact(&mut head[..peeked])
        .await
        .map_err(ended)?;
    let message = match wire::BlockHead::parse(&head[..peeked]) {
        Some((block, head_len))
            if head_len + block.data_len == len
                && block.data_len <= weft_protocol::manifest::MAX_BLOCK_LEN as usize =>
        {
            // A used buffer, not a zeroed one: every byte is written below.
            let mut data = crate::block_buffers::take(block.data_len);
            let (start, rest) = data.split_at_mut(peeked - head_len);
            start.copy_from_slice(&head[head_len..peeked]);
            stream.read_exact(rest).await.map_err(ended)?;
            Message::Block(Block {
                request_id: block.request_id,
                hash: block.hash,
                data,
            })
        }
        _ => {
            let mut payload = vec![0u8; len];
            payload[..peeked].copy_from_slice(&head[..peeked]);
            stream
                .read_exact(&mut payload[peeked..])
                .await
                .map_err(ended)?;
            wire::decode_payload(&payload).map_err(|error| error.to_string())?
        }
    };
    counters
        .bytes_in
        .fetch_add((FRAME_HEADER_LEN + len) as u64, Ordering::Relaxed);
    Ok(Some(message))
}

/// The writing end of one device's control stream.
struct Writer {
    device: DeviceId,
    peer: PeerId,
    /// Frames to send.
    outbox: mpsc::Receiver<Message>,
    /// Its own channel, to tell whether it is still the device's writer.
    me: mpsc::WeakSender<Message>,
}

async fn write_control(handle: NetHandle, mut writer: Writer, device_name: String) {
    let (device, peer) = (writer.device, writer.peer);
    let counters = handle.shared.counters(&device);
    let mut control = handle.control.clone();
    let mut stream = match control.open_stream(peer, CONTROL_PROTOCOL).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(device = %device, %error, "cannot open the control stream");
            let _ = handle.commands.send(Command::Disconnect(peer));
            return;
        }
    };
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        device_name,
        client_version: format!("weft {}", env!("CARGO_PKG_VERSION")),
    });
    if let Err(error) = write_frame(&mut stream, &hello, &counters).await {
        control_lost(&handle, &writer, &error);
        return;
    }
    while let Some(message) = writer.outbox.recv().await {
        if let Err(error) = write_frame(&mut stream, &message, &counters).await {
            control_lost(&handle, &writer, &error);
            return;
        }
    }
}

/// A control frame could not be written: the device may have missed a sync message,
/// and automerge's sync protocol would wait for an answer that never comes. If this is
/// still the device's writer, its connections are dropped so that both sides start
/// their syncs over on the next one. (A writer retired by a new session, [`Sessions`],
/// fails quietly.)
fn control_lost(handle: &NetHandle, writer: &Writer, error: &impl std::fmt::Display) {
    let mine = writer.me.upgrade();
    let current = handle
        .shared
        .peers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&writer.device)
        .is_some_and(|state| {
            mine.as_ref()
                .is_some_and(|me| me.same_channel(&state.sender))
        });
    if current {
        tracing::warn!(device = %writer.device, %error, "control stream failed; disconnecting so that syncs start over");
        let _ = handle.commands.send(Command::Disconnect(writer.peer));
    } else {
        tracing::debug!(device = %writer.device, %error, "an old control stream closed");
    }
}

async fn accept_control(
    mut incoming: libp2p_stream::IncomingStreams,
    events: mpsc::UnboundedSender<NetEvent>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
) {
    while let Some((peer, stream)) = incoming.next().await {
        let Ok(device) = DeviceId::try_from_peer_id(&peer) else {
            continue;
        };
        let reader = ControlReader {
            device,
            peer,
            token: shared.next_reader.fetch_add(1, Ordering::Relaxed),
            greeted: false,
            events: events.clone(),
            shared: shared.clone(),
            commands: commands.clone(),
        };
        tokio::spawn(reader.run(stream));
    }
}

/// The reading end of one control stream from a device.
struct ControlReader {
    device: DeviceId,
    peer: PeerId,
    /// This reader's token in [`Shared::greetings`] (tokens only grow).
    token: u64,
    greeted: bool,
    events: mpsc::UnboundedSender<NetEvent>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
}

impl ControlReader {
    async fn run(mut self, mut stream: libp2p::Stream) {
        let device = self.device;
        let counters = self.shared.counters(&device);
        loop {
            match read_frame(&mut stream, &counters).await {
                Ok(Some(Message::Hello(hello))) if !self.greeted => {
                    if hello.protocol_version != PROTOCOL_VERSION {
                        tracing::warn!(device = %device, version = hello.protocol_version, "unsupported protocol version; disconnecting");
                        self.disconnect();
                        return;
                    }
                    self.greet(hello.device_name);
                }
                Ok(Some(message)) if self.greeted => {
                    if self.superseded() {
                        tracing::debug!(device = %device, "a message on a control stream of an earlier session; dropped");
                        continue;
                    }
                    let _ = self.events.send(NetEvent::Message(device, message));
                }
                Ok(Some(_)) => {
                    tracing::warn!(device = %device, "first control frame was not a Hello; disconnecting");
                    self.disconnect();
                    return;
                }
                Ok(None) => return,
                Err(reason) if self.superseded() => {
                    tracing::debug!(device = %device, %reason, "a control stream of an earlier session ended");
                    return;
                }
                Err(reason) => {
                    tracing::warn!(device = %device, %reason, "bad control frame; disconnecting");
                    self.disconnect();
                    return;
                }
            }
        }
    }

    /// Records the device's name and tells the swarm task ([`Sessions::greeted`]).
    fn greet(&mut self, name: String) {
        self.greeted = true;
        if let Some(state) = self
            .shared
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&self.device)
        {
            state.name = name;
        }
        let _ = self.commands.send(Command::Greeted(self.peer, self.token));
    }

    /// True if a later reader's `Hello` began another session: what comes on this
    /// stream, or its end, says nothing about the current one.
    fn superseded(&self) -> bool {
        self.shared
            .greetings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.device)
            .is_some_and(|current| *current > self.token)
    }

    fn disconnect(&self) {
        let _ = self.commands.send(Command::Disconnect(self.peer));
    }
}

async fn accept_blocks(
    mut incoming: libp2p_stream::IncomingStreams,
    source: Arc<dyn BlockSource>,
    shared: Arc<Shared>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(SERVE_SLOTS));
    // Streams come in bursts from one device; checking its key once per burst keeps
    // this loop quick (libp2p-stream drops streams that arrive while it is busy).
    let mut last: Option<(PeerId, DeviceId)> = None;
    while let Some((peer, stream)) = incoming.next().await {
        let device = match last {
            Some((known, device)) if known == peer => device,
            _ => match DeviceId::try_from_peer_id(&peer) {
                Ok(device) => {
                    last = Some((peer, device));
                    device
                }
                Err(_) => continue,
            },
        };
        let source = source.clone();
        let counters = shared.counters(&device);
        let slots = slots.clone();
        tokio::spawn(async move {
            if let Err(reason) = serve_request(device, stream, source, &counters, &slots).await {
                tracing::warn!(device = %device, %reason, "block request refused");
            }
        });
    }
}

/// Serves the requests that come on one stream, one after the other, until the
/// requester closes it or leaves it idle for [`SERVE_IDLE`].
async fn serve_request(
    device: DeviceId,
    mut stream: libp2p::Stream,
    source: Arc<dyn BlockSource>,
    counters: &Counters,
    slots: &tokio::sync::Semaphore,
) -> Result<(), String> {
    counters.request_streams_in.fetch_add(1, Ordering::Relaxed);
    loop {
        let request =
            match tokio::time::timeout(SERVE_IDLE, read_frame(&mut stream, counters)).await {
                Ok(Ok(Some(request))) => request,
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(reason)) => return Err(reason),
            };
        counters.requests_in.fetch_add(1, Ordering::Relaxed);
        serve_one(device, &mut stream, request, &source, counters, slots).await?;
    }
    stream.close().await.map_err(|error| error.to_string())
}

/// Answers one request: every block (or manifest) asked for, in order.
async fn serve_one(
    device: DeviceId,
    stream: &mut libp2p::Stream,
    request: Message,
    source: &Arc<dyn BlockSource>,
    counters: &Counters,
    slots: &tokio::sync::Semaphore,
) -> Result<(), String> {
    match request {
        Message::BlockRequest(BlockRequest {
            folder,
            request_id,
            hashes,
        }) => {
            // A few blocks per trip to the blocking pool (with the permission check):
            // fewer trips than one per block, and at most READ_GROUP blocks in memory
            // per request. An unauthorised device gets "missing" for every block.
            for group in hashes.chunks(READ_GROUP) {
                // Held until the group is written out ([`SERVE_SLOTS`]).
                let _slots = slots
                    .acquire_many(group.len() as u32)
                    .await
                    .map_err(|_| "shutting down".to_owned())?;
                let blocks: Vec<Option<Vec<u8>>> = {
                    let source = source.clone();
                    let folder = folder.clone();
                    let group = group.to_vec();
                    tokio::task::spawn_blocking(move || source.blocks(&device, &folder, &group))
                        .await
                        .unwrap_or_default()
                };
                let mut blocks = blocks.into_iter();
                for hash in group {
                    match blocks.next().flatten() {
                        Some(data) => {
                            write_block_frame(stream, request_id, *hash, &data, counters).await?;
                        }
                        None => {
                            let missing = Message::BlockMissing(BlockMissing {
                                request_id,
                                hash: *hash,
                            });
                            write_frame(stream, &missing, counters).await?;
                        }
                    }
                }
            }
        }
        Message::ManifestRequest(ManifestRequest {
            folder,
            request_id,
            hashes,
        }) => {
            for hash in hashes {
                let manifest = {
                    let source = source.clone();
                    let folder = folder.clone();
                    tokio::task::spawn_blocking(move || {
                        if source.authorised(&device, &folder) {
                            source.manifest(&folder, &hash)
                        } else {
                            None
                        }
                    })
                    .await
                    .ok()
                    .flatten()
                };
                let message = Message::ManifestResponse(ManifestResponse {
                    request_id,
                    hash,
                    manifest,
                });
                write_frame(stream, &message, counters).await?;
            }
        }
        other => return Err(format!("unexpected request {other:?}")),
    }
    Ok(())
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
                    reason: "control queue full; disconnected to resync".into(),
                })
            }
            Err(error) => Err(NetError::Stream {
                device: *device,
                reason: error.to_string(),
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
    /// [`crate::coalescer`]: kept streams of an older epoch are not reused).
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
                reason: error.to_string(),
            })
    }

    /// Counts a block from `device` that failed verification.
    pub fn penalise(&self, device: &DeviceId) {
        self.shared
            .counters(device)
            .bad_blocks
            .fetch_add(1, Ordering::Relaxed);
    }

    /// One request on its own stream (closed afterwards).
    async fn request(
        &self,
        device: &DeviceId,
        request: Message,
        answers: usize,
    ) -> Result<Vec<Message>, NetError> {
        self.request_on(device, &mut None, request, answers).await
    }

    /// One request on `stream` (a new one if `None`): sends it and reads `answers`
    /// frames. The stream is left in `stream` for the next request if the whole answer
    /// came, and taken away on any failure (its state is unknown).
    async fn request_on(
        &self,
        device: &DeviceId,
        stream: &mut Option<libp2p::Stream>,
        request: Message,
        answers: usize,
    ) -> Result<Vec<Message>, NetError> {
        let counters = self.shared.counters(device);
        let mut control = self.control.clone();
        let stream_error = |reason: String| NetError::Stream {
            device: *device,
            reason,
        };
        let work = async {
            let open = match stream.take() {
                Some(kept) => kept,
                None => control
                    .open_stream(device.to_peer_id(), BLOCKS_PROTOCOL)
                    .await
                    .map_err(|error| stream_error(error.to_string()))?,
            };
            let open = stream.insert(open);
            write_frame(open, &request, &counters)
                .await
                .map_err(stream_error)?;
            let mut replies = Vec::with_capacity(answers);
            while replies.len() < answers {
                match read_frame(open, &counters).await {
                    Ok(Some(message)) => replies.push(message),
                    Ok(None) => return Err(stream_error("stream ended early".into())),
                    Err(reason) => {
                        return Err(NetError::Protocol {
                            device: *device,
                            reason,
                        });
                    }
                }
            }
            Ok(replies)
        };
        let result = tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err(stream_error("request timed out".into())));
        if result.is_err() {
            *stream = None;
        }
        result
    }

    /// Asks `device` for blocks; returns each hash with its bytes (unverified) or `None`.
    /// Requests made while many are open to the device share streams
    /// ([`crate::coalescer`]).
    pub async fn fetch_blocks(
        &self,
        device: &DeviceId,
        folder: &FolderId,
        hashes: Vec<BlockHash>,
    ) -> Result<Vec<(BlockHash, Option<Vec<u8>>)>, NetError> {
        self.shared
            .coalescer
            .fetch(self, *device, folder, hashes)
            .await
    }

    /// One block request on `stream` (see [`Self::request_on`]).
    pub(crate) async fn request_blocks(
        &self,
        device: &DeviceId,
        folder: &FolderId,
        hashes: Vec<BlockHash>,
        stream: &mut Option<libp2p::Stream>,
    ) -> Result<Vec<(BlockHash, Option<Vec<u8>>)>, NetError> {
        let count = hashes.len();
        let request = Message::BlockRequest(BlockRequest {
            folder: folder.clone(),
            request_id: 0,
            hashes: hashes.clone(),
        });
        let replies = self.request_on(device, stream, request, count).await?;
        let mut blocks = Vec::with_capacity(count);
        for (expected, reply) in hashes.into_iter().zip(replies) {
            match reply {
                Message::Block(block) if block.hash == expected => {
                    blocks.push((expected, Some(block.data)));
                }
                Message::BlockMissing(missing) if missing.hash == expected => {
                    blocks.push((expected, None));
                }
                other => {
                    return Err(NetError::Protocol {
                        device: *device,
                        reason: format!("answered {expected:?} with {other:?}"),
                    });
                }
            }
        }
        Ok(blocks)
    }

    /// Asks `device` for a manifest; the answer is checked against its hash.
    pub async fn fetch_manifest(
        &self,
        device: &DeviceId,
        folder: &FolderId,
        hash: ManifestHash,
    ) -> Result<Option<Manifest>, NetError> {
        let request = Message::ManifestRequest(ManifestRequest {
            folder: folder.clone(),
            request_id: 0,
            hashes: vec![hash],
        });
        let replies = self.request(device, request, 1).await?;
        match replies.into_iter().next() {
            Some(Message::ManifestResponse(response)) if response.hash == hash => {
                match response.manifest {
                    Some(manifest) if manifest.hash() == hash => Ok(Some(manifest)),
                    Some(_) => Err(NetError::Protocol {
                        device: *device,
                        reason: "manifest does not match its hash".into(),
                    }),
                    None => Ok(None),
                }
            }
            other => Err(NetError::Protocol {
                device: *device,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }
}
