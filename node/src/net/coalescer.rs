//! Coalescing concurrent block requests to one device into shared requests.
//!
//! Many small files download at once (one block each), and a request costs a stream:
//! opening and negotiating it, a trip to the blocking pool for the answer on the
//! sending side, and several task wake-ups on both. The coalescer keeps at most
//! [`REQUESTS_IN_FLIGHT`] requests open per device and folder; requests that arrive
//! while all are busy wait, and the next free slot takes as many waiting requests as
//! fit in [`MERGE_BLOCKS`] hashes as one request. An idle device gets each request
//! at once, so coalescing costs no latency; it only kicks in under load, where it
//! saves most.
//!
//! Streams are kept: a request that got its whole answer leaves its stream to the
//! queue's idle streams, and the next request takes one (the blocks protocol answers
//! any number of requests on a stream, one after the other). Opening a stream costs a
//! protocol negotiation and a dozen task wake-ups on the two nodes; an initial sync
//! makes thousands of requests. A stream idle for [`STREAM_IDLE`] is dropped (the
//! responder closes its end after [`super::SERVE_IDLE`]), so is every kept
//! stream once a connection to the device opens or closes (a stream on a connection
//! whose peer died, e.g. QUIC after `kill -9`, would take a request and never answer),
//! and a request that fails on a kept stream (closed by the other side meanwhile) is
//! sent again at once on a new one.
//!
//! A request whose new stream fails is sent again up to three times within ~25 ms:
//! under load `libp2p-stream` drops inbound streams that arrive faster than the
//! responder takes them, and one immediate second try was sometimes dropped as well.
//!
//! Invariants: a request is never split (each caller gets exactly its own hashes back,
//! in its order); a failed shared request fails every caller in it, each of which
//! retries on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};
use weft_protocol::{BlockHash, DeviceId, FolderId};

use super::error::{NetError, StreamFailure};

/// What the coalescer needs of the network (the node's `NetHandle` in `request.rs`):
/// one block request on a kept or new stream, and the epoch of a device's connections,
/// which says whether a kept stream may still be used.
pub trait BlockStreams: Clone + Send + Sync + 'static {
    /// Changes whenever a connection to `device` opens or closes.
    fn connection_epoch(&self, device: &DeviceId) -> u64;
    /// One block request on `stream` (a new one if `None`), which is left there for
    /// the next request if the whole answer came.
    fn request_blocks(
        &self,
        device: &DeviceId,
        folder: &FolderId,
        hashes: Vec<BlockHash>,
        stream: &mut Option<libp2p::Stream>,
    ) -> impl Future<Output = Result<Blocks, NetError>> + Send;
}

/// Requests open at once per device and folder. Their blocks are what a receiver
/// holds in memory while the disk catches up: at 16 they were 33 MiB of its 71 MiB
/// peak heap in an initial sync of the bench dataset (heaptrack, at bb96046), and 8 (up to
/// [`MERGE_BLOCKS`] blocks each, 16 MiB at 256 KiB blocks) sync it as fast on
/// loopback while still covering ~100 ms of round trip at 160 MB/s.
pub const REQUESTS_IN_FLIGHT: usize = 8;
/// Most hashes in one shared request (requests with more go alone).
pub const MERGE_BLOCKS: usize = 8;
/// Pauses before the quick retries of a request whose stream failed (at most ~25 ms
/// in all; a device that is really gone fails on every try).
pub const STREAM_RETRY_PAUSES: [std::time::Duration; 3] = [
    std::time::Duration::ZERO,
    std::time::Duration::from_millis(5),
    std::time::Duration::from_millis(20),
];

/// Kept streams unused for this long are dropped rather than reused (shorter than
/// the responder's [`super::SERVE_IDLE`], so a kept stream is rarely one the
/// other side has just closed).
pub const STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(20);

/// Each hash with its bytes (unverified), or `None` if the device lacks it.
pub type Blocks = Vec<(BlockHash, Option<Vec<u8>>)>;

struct Pending {
    hashes: Vec<BlockHash>,
    reply: oneshot::Sender<Result<Blocks, NetError>>,
}

/// One queue per device and folder, each drained by its own task.
#[derive(Default)]
pub struct Coalescer {
    queues: Mutex<HashMap<(DeviceId, FolderId), mpsc::UnboundedSender<Pending>>>,
}

impl Coalescer {
    /// Asks `device` for `hashes` of `folder`, sharing a request with others waiting.
    pub async fn fetch(
        &self,
        net: &impl BlockStreams,
        device: DeviceId,
        folder: &FolderId,
        hashes: Vec<BlockHash>,
    ) -> Result<Blocks, NetError> {
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending { hashes, reply };
        // A queue whose task has ended (runtime shutting down) is replaced once.
        for _ in 0..2 {
            let sender = {
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                queues
                    .entry((device, folder.clone()))
                    .or_insert_with(|| {
                        let (sender, receiver) = mpsc::unbounded_channel();
                        tokio::spawn(drain(net.clone(), device, folder.clone(), receiver));
                        sender
                    })
                    .clone()
            };
            match sender.send(pending) {
                Ok(()) => {
                    return answer.await.unwrap_or(Err(NetError::Stream {
                        device,
                        source: StreamFailure::Dropped,
                    }));
                }
                Err(mpsc::error::SendError(returned)) => {
                    pending = returned;
                    let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                    queues.remove(&(device, folder.clone()));
                }
            }
        }
        Err(NetError::Stream {
            device,
            source: StreamFailure::Dropped,
        })
    }
}

/// A stream whose last request got its whole answer, waiting for the next.
struct KeptStream {
    since: Instant,
    /// [`BlockStreams::connection_epoch`] when it was last used.
    epoch: u64,
    stream: libp2p::Stream,
}

/// The most recently used kept stream, if one is recent and of the current connection
/// epoch; the others are dropped.
fn take_idle(idle: &Mutex<Vec<KeptStream>>, epoch: u64) -> Option<libp2p::Stream> {
    let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
    idle.retain(|kept| kept.epoch == epoch && kept.since.elapsed() < STREAM_IDLE);
    idle.pop().map(|kept| kept.stream)
}

/// The task of one queue: takes a free slot, then every waiting request that fits.
async fn drain(
    net: impl BlockStreams,
    device: DeviceId,
    folder: FolderId,
    mut receiver: mpsc::UnboundedReceiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT));
    // At most one per slot: a stream is taken by the request holding a slot.
    let idle: Arc<Mutex<Vec<KeptStream>>> = Arc::default();
    let mut held: Option<Pending> = None;
    loop {
        let first = match held.take() {
            Some(pending) => pending,
            None => match receiver.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut count = first.hashes.len();
        let mut group = vec![first];
        while count < MERGE_BLOCKS {
            match receiver.try_recv() {
                Ok(next) if count + next.hashes.len() <= MERGE_BLOCKS => {
                    count += next.hashes.len();
                    group.push(next);
                }
                Ok(next) => {
                    held = Some(next);
                    break;
                }
                Err(_) => break,
            }
        }
        let net = net.clone();
        let folder = folder.clone();
        let idle = idle.clone();
        tokio::spawn(async move {
            let hashes: Vec<BlockHash> = group
                .iter()
                .flat_map(|pending| pending.hashes.iter().copied())
                .collect();
            let epoch = net.connection_epoch(&device);
            let mut stream = take_idle(&idle, epoch);
            let kept = stream.is_some();
            let mut result = net
                .request_blocks(&device, &folder, hashes.clone(), &mut stream)
                .await;
            if kept && matches!(result, Err(NetError::Stream { .. })) {
                // The kept stream was closed meanwhile: a new one, at once.
                result = net
                    .request_blocks(&device, &folder, hashes.clone(), &mut stream)
                    .await;
            }
            for pause in STREAM_RETRY_PAUSES {
                if !matches!(result, Err(NetError::Stream { .. })) {
                    break;
                }
                // `libp2p-stream` drops inbound streams that arrive faster than the
                // responder takes them (the requester sees "connection is closed"):
                // a few quick tries, before the callers' paced retries.
                tokio::time::sleep(pause).await;
                result = net
                    .request_blocks(&device, &folder, hashes.clone(), &mut stream)
                    .await;
            }
            if let Some(stream) = stream
                && net.connection_epoch(&device) == epoch
            {
                idle.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(KeptStream {
                        since: Instant::now(),
                        epoch,
                        stream,
                    });
            }
            drop(slot);
            match result {
                Ok(blocks) => {
                    let mut blocks = blocks.into_iter();
                    for pending in group {
                        let own: Blocks = blocks.by_ref().take(pending.hashes.len()).collect();
                        let _ = pending.reply.send(Ok(own));
                    }
                }
                Err(error) => {
                    for pending in group {
                        let _ = pending.reply.send(Err(error.clone()));
                    }
                }
            }
        });
    }
}
