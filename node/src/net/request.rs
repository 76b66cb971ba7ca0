//! Block requests (`/weft/blocks/1`, requester): one request on a stream and its
//! answers, blocks through the [`coalescer`](super::coalescer), manifests.

use super::control::{read_frame, write_frame};
use super::{
    BLOCKS_PROTOCOL, FrameError, NetError, NetHandle, ProtocolBreach, REQUEST_TIMEOUT,
    StreamFailure,
};

use weft_protocol::wire::{BlockRequest, ManifestRequest, Message};
use weft_protocol::{BlockHash, DeviceId, FolderId, Manifest, ManifestHash};

impl NetHandle {
    /// One request on its own stream (closed afterwards).
    pub(super) async fn request(
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
    pub(super) async fn request_on(
        &self,
        device: &DeviceId,
        stream: &mut Option<libp2p::Stream>,
        request: Message,
        answers: usize,
    ) -> Result<Vec<Message>, NetError> {
        let counters = self.shared.counters(device);
        let mut control = self.control.clone();
        let stream_error = |source: StreamFailure| NetError::Stream {
            device: *device,
            source,
        };
        let work = async {
            let open = match stream.take() {
                Some(kept) => kept,
                None => control
                    .open_stream(device.to_peer_id(), BLOCKS_PROTOCOL)
                    .await
                    .map_err(|error| stream_error(StreamFailure::Open(error.to_string())))?,
            };
            let open = stream.insert(open);
            write_frame(open, &request, &counters)
                .await
                .map_err(|error| stream_error(StreamFailure::Frame(error)))?;
            let mut replies = Vec::with_capacity(answers);
            while replies.len() < answers {
                match read_frame(open, &counters).await {
                    Ok(Some(message)) => replies.push(message),
                    Ok(None) => return Err(stream_error(StreamFailure::EndedEarly)),
                    Err(error @ (FrameError::Decode(_) | FrameError::EndedInHeader)) => {
                        return Err(NetError::Protocol {
                            device: *device,
                            reason: ProtocolBreach::Frame(error),
                        });
                    }
                    Err(error) => return Err(stream_error(StreamFailure::Frame(error))),
                }
            }
            Ok(replies)
        };
        let result = tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err(stream_error(StreamFailure::TimedOut)));
        if result.is_err() {
            *stream = None;
        }
        result
    }

    /// Asks `device` for blocks; returns each hash with its bytes (unverified) or `None`.
    /// Requests made while many are open to the device share streams
    /// ([`coalescer`](super::coalescer)).
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
                        reason: ProtocolBreach::WrongAnswer {
                            expected: format!("block {expected}"),
                            got: other.kind().to_owned(),
                        },
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
                        reason: ProtocolBreach::ManifestMismatch,
                    }),
                    None => Ok(None),
                }
            }
            other => Err(NetError::Protocol {
                device: *device,
                reason: ProtocolBreach::WrongAnswer {
                    expected: format!("manifest {hash}"),
                    got: other.as_ref().map_or("nothing", Message::kind).to_owned(),
                },
            }),
        }
    }
}

impl super::coalescer::BlockStreams for NetHandle {
    fn connection_epoch(&self, device: &DeviceId) -> u64 {
        NetHandle::connection_epoch(self, device)
    }

    fn request_blocks(
        &self,
        device: &DeviceId,
        folder: &FolderId,
        hashes: Vec<BlockHash>,
        stream: &mut Option<libp2p::Stream>,
    ) -> impl Future<Output = Result<super::coalescer::Blocks, NetError>> + Send {
        NetHandle::request_blocks(self, device, folder, hashes, stream)
    }
}
