//! Block serving (`/weft/blocks/1`, responder): requests of connected devices answered
//! from the node's [`BlockSource`](super::BlockSource), a bounded number at once.

use super::control::{read_frame_with, write_frame};
use super::{
    BlockSource, Counters, FrameError, READ_GROUP, SERVE_IDLE, SERVE_SLOTS, SERVE_WRITE_TIMEOUT,
    Shared,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use weft_protocol::wire::{
    self, BlockMissing, BlockRequest, ManifestRequest, ManifestResponse, Message,
};
use weft_protocol::{BlockHash, DeviceId};

/// Largest request frame: a batch of [`weft_protocol::wire::MAX_BATCH_HASHES`]
/// hashes and its folder ID, with room to spare.
const MAX_REQUEST_FRAME_LEN: usize = 64 * 1024;

/// A write to a requester, given at most [`SERVE_WRITE_TIMEOUT`]: one that does not
/// read its answers holds its serving slots no longer than that.
async fn timed(
    write: impl std::future::Future<Output = Result<(), FrameError>>,
) -> Result<(), FrameError> {
    tokio::time::timeout(SERVE_WRITE_TIMEOUT, write)
        .await
        .unwrap_or(Err(FrameError::WriteTimeout))
}

/// Writes a [`Message::Block`] frame: its head, then the bytes from where they are
/// (the frame [`write_frame`] would write, without copying the block into it).
pub(super) async fn write_block_frame(
    stream: &mut libp2p::Stream,
    request_id: u64,
    hash: BlockHash,
    data: &[u8],
    counters: &Counters,
) -> Result<(), FrameError> {
    let head = wire::BlockHead {
        request_id,
        hash,
        data_len: data.len(),
    }
    .encode_frame_head()
    .map_err(FrameError::Encode)?;
    for part in [&head[..], data] {
        stream.write_all(part).await.map_err(FrameError::io)?;
    }
    counters
        .bytes_out
        .fetch_add((head.len() + data.len()) as u64, Ordering::Relaxed);
    Ok(())
}

pub(super) async fn accept_blocks(
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
pub(super) async fn serve_request(
    device: DeviceId,
    mut stream: libp2p::Stream,
    source: Arc<dyn BlockSource>,
    counters: &Counters,
    slots: &tokio::sync::Semaphore,
) -> Result<(), FrameError> {
    counters.request_streams_in.fetch_add(1, Ordering::Relaxed);
    loop {
        let request = match tokio::time::timeout(
            SERVE_IDLE,
            read_frame_with(&mut stream, counters, MAX_REQUEST_FRAME_LEN, None),
        )
        .await
        {
            Ok(Ok(Some((request, _)))) => request,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(reason)) => return Err(reason),
        };
        counters.requests_in.fetch_add(1, Ordering::Relaxed);
        serve_one(device, &mut stream, request, &source, counters, slots).await?;
    }
    stream.close().await.map_err(FrameError::io)
}

/// Answers one request: every block (or manifest) asked for, in order.
pub(super) async fn serve_one(
    device: DeviceId,
    stream: &mut libp2p::Stream,
    request: Message,
    source: &Arc<dyn BlockSource>,
    counters: &Counters,
    slots: &tokio::sync::Semaphore,
) -> Result<(), FrameError> {
    match request {
        Message::BlockRequest(BlockRequest {
            folder,
            request_id,
            hashes,
        }) => {
            // The permission check comes before any serving slot is taken: a device
            // that may not read the folder gets "missing" for every block and holds
            // nothing.
            let authorised = {
                let source = source.clone();
                let folder = folder.clone();
                tokio::task::spawn_blocking(move || source.authorised(&device, &folder))
                    .await
                    .unwrap_or(false)
            };
            if !authorised {
                for hash in &hashes {
                    let missing = Message::BlockMissing(BlockMissing {
                        request_id,
                        hash: *hash,
                    });
                    timed(write_frame(stream, &missing, counters)).await?;
                }
                return Ok(());
            }
            // A few blocks per trip to the blocking pool: fewer trips than one per
            // block, and at most READ_GROUP blocks in memory per request.
            for group in hashes.chunks(READ_GROUP) {
                // Held until the group is written out ([`SERVE_SLOTS`]).
                let _slots = slots
                    .acquire_many(group.len() as u32)
                    .await
                    .map_err(|_| FrameError::ShuttingDown)?;
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
                            timed(write_block_frame(
                                stream, request_id, *hash, &data, counters,
                            ))
                            .await?;
                        }
                        None => {
                            let missing = Message::BlockMissing(BlockMissing {
                                request_id,
                                hash: *hash,
                            });
                            timed(write_frame(stream, &missing, counters)).await?;
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
                timed(write_frame(stream, &message, counters)).await?;
            }
        }
        other => return Err(FrameError::UnexpectedRequest(other.kind())),
    }
    Ok(())
}
