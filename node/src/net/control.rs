//! The control stream (`/weft/control/1`): frames read and written, the writer of
//! each device's stream and the readers of the streams peers open.

use super::{
    BUDGET_WAIT, CONTROL_PROTOCOL, Command, Counters, FRAME_TIMEOUT, FrameBudget, FrameError,
    HELLO_TIMEOUT, MAX_HELLO_FRAME_LEN, NetEvent, NetHandle, Shared,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use tokio::sync::mpsc;
use weft_protocol::DeviceId;
use weft_protocol::wire::{self, Block, FRAME_HEADER_LEN, Hello, Message, PROTOCOL_VERSION};

/// Writes one frame; counts its bytes.
pub(super) async fn write_frame(
    stream: &mut libp2p::Stream,
    message: &Message,
    counters: &Counters,
) -> Result<(), FrameError> {
    let frame = wire::encode(message).map_err(FrameError::Encode)?;
    stream.write_all(&frame).await.map_err(FrameError::io)?;
    counters
        .bytes_out
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Reads one frame; `Ok(None)` at a clean end of stream. (Answers to requests: any
/// frame up to the wire's limit.)
pub(super) async fn read_frame(
    stream: &mut libp2p::Stream,
    counters: &Counters,
) -> Result<Option<Message>, FrameError> {
    Ok(read_frame_with(stream, counters, wire::MAX_FRAME_LEN, None)
        .await?
        .map(|(message, _)| message))
}

/// The byte budgets a control reader's frames are held against.
pub(super) struct Budgets<'a> {
    pub(super) all: &'a Arc<tokio::sync::Semaphore>,
    pub(super) peer: &'a Arc<tokio::sync::Semaphore>,
}

/// Smallest share of the budgets a frame holds: bounds how many small messages can
/// wait to be handled, not only their bytes.
const MIN_FRAME_BUDGET: usize = 1024;

/// Reads one frame of at most `limit` payload bytes; `Ok(None)` at a clean end of
/// stream. The frame may take as long as it likes to begin; once begun it must arrive
/// whole within [`FRAME_TIMEOUT`]. With `budgets`, its bytes are held against them
/// until the returned [`FrameBudget`] is dropped; a frame that finds no room within
/// [`BUDGET_WAIT`] is an error (the peer is flooding).
pub(super) async fn read_frame_with(
    stream: &mut libp2p::Stream,
    counters: &Counters,
    limit: usize,
    budgets: Option<Budgets<'_>>,
) -> Result<Option<(Message, FrameBudget)>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let first = stream.read(&mut header).await.map_err(FrameError::io)?;
    if first == 0 {
        return Ok(None);
    }
    let mut filled = first;
    let len = tokio::time::timeout(FRAME_TIMEOUT, async {
        while filled < FRAME_HEADER_LEN {
            let read = stream
                .read(&mut header[filled..])
                .await
                .map_err(FrameError::io)?;
            if read == 0 {
                return Err(FrameError::EndedInHeader);
            }
            filled += read;
        }
        wire::frame_len(header).map_err(FrameError::Decode)
    })
    .await
    .map_err(|_| FrameError::ReadTimeout)??;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let budget = match budgets {
        None => FrameBudget::none(),
        Some(budgets) => {
            let bytes = u32::try_from(len.max(MIN_FRAME_BUDGET)).unwrap_or(u32::MAX);
            tokio::time::timeout(BUDGET_WAIT, async {
                let peer = budgets.peer.clone().acquire_many_owned(bytes).await;
                let all = budgets.all.clone().acquire_many_owned(bytes).await;
                match (peer, all) {
                    (Ok(peer), Ok(all)) => Ok(FrameBudget::held(all, peer)),
                    _ => Err(FrameError::ShuttingDown),
                }
            })
            .await
            .map_err(|_| FrameError::OverBudget)??
        }
    };
    let message = tokio::time::timeout(FRAME_TIMEOUT, read_payload(stream, len))
        .await
        .map_err(|_| FrameError::ReadTimeout)??;
    counters
        .bytes_in
        .fetch_add((FRAME_HEADER_LEN + len) as u64, Ordering::Relaxed);
    Ok(Some((message, budget)))
}

/// Reads and decodes a frame's payload of `len` bytes.
async fn read_payload(stream: &mut libp2p::Stream, len: usize) -> Result<Message, FrameError> {
    let ended = FrameError::ended;
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
            wire::decode_payload(&payload).map_err(FrameError::Decode)?
        }
    };
    Ok(message)
}

/// The writing end of one device's control stream.
pub(super) struct Writer {
    pub(super) device: DeviceId,
    pub(super) peer: PeerId,
    /// Frames to send.
    pub(super) outbox: mpsc::Receiver<Message>,
    /// Its own channel, to tell whether it is still the device's writer.
    pub(super) me: mpsc::WeakSender<Message>,
}

pub(super) async fn write_control(handle: NetHandle, mut writer: Writer, device_name: String) {
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
pub(super) fn control_lost(handle: &NetHandle, writer: &Writer, error: &impl std::fmt::Display) {
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

pub(super) async fn accept_control(
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
pub(super) struct ControlReader {
    pub(super) device: DeviceId,
    pub(super) peer: PeerId,
    /// This reader's token in [`Shared::greetings`] (tokens only grow).
    pub(super) token: u64,
    pub(super) greeted: bool,
    pub(super) events: mpsc::UnboundedSender<NetEvent>,
    pub(super) shared: Arc<Shared>,
    pub(super) commands: mpsc::UnboundedSender<Command>,
}

impl ControlReader {
    pub(super) async fn run(mut self, mut stream: libp2p::Stream) {
        let device = self.device;
        let Some(peer_budget) = self.shared.reader_started(&device) else {
            tracing::warn!(device = %device, "too many control streams from one device; this one is refused");
            return;
        };
        self.read(&mut stream, &peer_budget).await;
        self.shared.reader_ended(&device);
    }

    async fn read(
        &mut self,
        stream: &mut libp2p::Stream,
        peer_budget: &Arc<tokio::sync::Semaphore>,
    ) {
        let device = self.device;
        let counters = self.shared.counters(&device);
        let all = self.shared.control_bytes.clone();
        // The Hello: small, and soon.
        let hello = tokio::time::timeout(
            HELLO_TIMEOUT,
            read_frame_with(stream, &counters, MAX_HELLO_FRAME_LEN, None),
        )
        .await;
        match hello {
            Ok(Ok(Some((Message::Hello(hello), _)))) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    tracing::warn!(device = %device, version = hello.protocol_version, "unsupported protocol version; disconnecting");
                    self.disconnect();
                    return;
                }
                self.greet(hello.device_name);
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(_))) => {
                tracing::warn!(device = %device, "first control frame was not a Hello; disconnecting");
                self.disconnect();
                return;
            }
            Ok(Err(reason)) => {
                tracing::warn!(device = %device, %reason, "bad first control frame; disconnecting");
                self.disconnect();
                return;
            }
            Err(_) => {
                tracing::warn!(device = %device, "no Hello within {HELLO_TIMEOUT:?}; disconnecting");
                self.disconnect();
                return;
            }
        }
        loop {
            let budgets = Budgets {
                all: &all,
                peer: peer_budget,
            };
            match read_frame_with(stream, &counters, wire::MAX_FRAME_LEN, Some(budgets)).await {
                Ok(Some((Message::Hello(_), _))) => {
                    tracing::warn!(device = %device, "a second Hello on one control stream; disconnecting");
                    self.disconnect();
                    return;
                }
                Ok(Some((message, budget))) => {
                    if self.superseded() {
                        tracing::debug!(device = %device, "a message on a control stream of an earlier session; dropped");
                        continue;
                    }
                    let _ = self.events.send(NetEvent::Message(device, message, budget));
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
    pub(super) fn greet(&mut self, name: String) {
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
    pub(super) fn superseded(&self) -> bool {
        self.shared
            .greetings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.device)
            .is_some_and(|current| *current > self.token)
    }

    pub(super) fn disconnect(&self) {
        let _ = self.commands.send(Command::Disconnect(self.peer));
    }
}
