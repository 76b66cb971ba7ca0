//! Sessions: each device's connections and control session, kept by the swarm task.

use super::control::{Writer, write_control};
use super::{Behaviour, CONTROL_QUEUE, NetEvent, NetHandle, PeerState};
use std::collections::HashMap;

use libp2p::Swarm;
use libp2p::swarm::ConnectionId;
use tokio::sync::mpsc;
use weft_protocol::DeviceId;

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
pub(super) struct Sessions {
    pub(super) events: mpsc::UnboundedSender<NetEvent>,
    pub(super) handle: NetHandle,
    pub(super) device_name: String,
    /// Open connections per device, oldest first, with their remote addresses.
    pub(super) connections: HashMap<DeviceId, Vec<(ConnectionId, String)>>,
    /// Devices whose session is starting over.
    pub(super) restarts: HashMap<DeviceId, Restart>,
}

/// A session starting over ([`Sessions`]).
pub(super) struct Restart {
    /// Connections of the previous session being closed; the new session starts when
    /// none is left.
    pub(super) closing: Vec<ConnectionId>,
    /// The new session's control writer; it opens its stream once `closing` is empty.
    pub(super) writer: Writer,
}

impl Sessions {
    pub(super) fn established(
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

    pub(super) fn closed(
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
    pub(super) fn greeted(&mut self, swarm: &mut Swarm<Behaviour>, device: DeviceId, token: u64) {
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
    pub(super) fn finish_restart(&mut self, device: DeviceId) {
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
    pub(super) fn start_writer(&self, device: DeviceId, address: String) {
        let writer = self.new_writer(device);
        self.spawn_writer(writer, address);
    }

    /// Makes the device's control writer: from now on messages for the device queue for
    /// it, and the old writer (if any) ends when its channel is dropped here.
    pub(super) fn new_writer(&self, device: DeviceId) -> Writer {
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
    pub(super) fn spawn_writer(&self, writer: Writer, address: String) {
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
