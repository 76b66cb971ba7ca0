//! The libp2p swarm: transports (QUIC; TCP with TLS or noise, and yamux), identify,
//! mDNS and the stream behaviour, and the task that drives it and turns its events
//! into sessions.

use super::control::accept_control;
use super::serve::accept_blocks;
use super::session::Sessions;
use super::{
    BLOCKS_PROTOCOL, Behaviour, BehaviourEvent, BlockSource, CONTROL_PROTOCOL, Command, NetConfig,
    NetError, NetEvent, NetHandle, Shared,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{PeerId, Swarm, identify, mdns, noise, tcp, yamux};
use tokio::sync::mpsc;
use weft_protocol::{DeviceId, DeviceKey};

pub use libp2p::Multiaddr;

/// Largest yamux data frame sent: one stream's whole initial window (256 KiB).
pub(super) const YAMUX_FRAME: usize = 256 * 1024;

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
            let limits = libp2p::connection_limits::ConnectionLimits::default()
                .with_max_pending_incoming(Some(super::MAX_PENDING_CONNECTIONS))
                .with_max_pending_outgoing(Some(super::MAX_PENDING_CONNECTIONS))
                .with_max_established_per_peer(Some(super::MAX_CONNECTIONS_PER_DEVICE))
                .with_max_established(Some(super::MAX_CONNECTIONS));
            Behaviour {
                limits: libp2p::connection_limits::Behaviour::new(limits),
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

pub(super) fn hello_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "weft".into())
}

pub(super) async fn run_swarm(
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
