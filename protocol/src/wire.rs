//! The wire protocol: messages between devices and their framed codec.
//!
//! A frame is a 4-byte little-endian payload length followed by the payload, a
//! postcard-encoded [`Message`]. The first frame each side sends on a connection is a
//! [`Hello`] carrying [`PROTOCOL_VERSION`]. `docs/protocol.md` has the layouts, the
//! message flow and the version log.
//!
//! [`decode`] takes the bytes received so far and returns [`Decoded::Incomplete`],
//! a [`Decoded::Frame`], or a [`WireError`] after which the connection must be closed.
//! It never panics and never allocates more than the frame it is given: a length
//! over [`MAX_FRAME_LEN`] is rejected from the header alone, before any payload
//! arrives. Every decoded message is then checked against the per-field limits
//! below ([`Message::validate`]), and [`encode`] checks the same limits, so an honest
//! peer never sends what the other side must refuse.

use serde::{Deserialize, Serialize};

pub use crate::access::Role;
use crate::change_signature::SignedChange;
use crate::folder::FolderId;
use crate::hash::{BlockHash, ManifestHash};
use crate::identity::DeviceId;
use crate::manifest::{MAX_BLOCK_LEN, Manifest};

/// Wire protocol version spoken by this build; see the version log in `docs/protocol.md`.
pub const PROTOCOL_VERSION: u32 = 3;

/// Bytes of the frame header (payload length, u32 little-endian).
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest frame payload: one largest manifest (`MAX_MANIFEST_BLOCKS` x 36 bytes, under
/// 28 MiB) or one largest block (16 MiB) plus headers, with room to spare. Anything
/// larger is a broken or hostile peer, refused from the header alone.
pub const MAX_FRAME_LEN: usize = 32 * 1024 * 1024;

/// Hashes in one block or manifest request. 1024 blocks of 256 KiB is 256 MiB per
/// batch: enough to keep a fast link busy with a few batches in flight, small enough
/// that a cancelled batch wastes little.
pub const MAX_BATCH_HASHES: usize = 1024;

/// Largest piece of an automerge sync message in one frame. automerge puts every
/// change the peer lacks into one sync message (a new device's first sync of a large
/// folder is tens of MiB), so a larger message travels as [`Message::DocSyncPart`]
/// frames and a final [`Message::DocSync`] (see [`crate::sync_parts`]).
pub const MAX_DOC_SYNC_LEN: usize = 16 * 1024 * 1024;

/// Largest sync message a receiver reassembles from parts. A million-file folder's
/// whole document saves to about 46 MiB (DESIGN.md); this leaves room for its change
/// history while bounding what one peer can make the receiver hold.
pub const MAX_DOC_SYNC_TOTAL_LEN: usize = 256 * 1024 * 1024;

/// Signed changes in one [`ChangeSignatures`] message (about 100 bytes each).
pub const MAX_SIGNED_CHANGES: usize = 65_536;

/// Longest device name, in bytes (a hostname or a person's label for the device).
pub const MAX_DEVICE_NAME_LEN: usize = 256;

/// Longest client version string, in bytes (`weft 1.2.3-abcdef`).
pub const MAX_CLIENT_VERSION_LEN: usize = 64;

/// Longest folder label in an invite, in bytes.
pub const MAX_LABEL_LEN: usize = 256;

/// Longest human-readable error text, in bytes.
pub const MAX_ERROR_TEXT_LEN: usize = 1024;

/// Every message two devices exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Handshake, first frame on every connection, in both directions.
    Hello(Hello),
    /// One message of automerge's sync protocol for a folder document.
    DocSync(DocSync),
    /// Asks for manifests by hash.
    ManifestRequest(ManifestRequest),
    /// Answers one hash of a [`ManifestRequest`].
    ManifestResponse(ManifestResponse),
    /// Asks for a batch of blocks; answered by one [`Block`] or [`BlockMissing`] per
    /// hash, in request order.
    BlockRequest(BlockRequest),
    /// One block of a batch.
    Block(Block),
    /// The sender does not have (or will not give) a requested block.
    BlockMissing(BlockMissing),
    /// The sender refuses something; the text is for logs and people.
    Error(ErrorMessage),
    /// The sender invites the receiver to a folder.
    Invite(Invite),
    /// A leading piece of a sync message too large for one frame; the pieces that
    /// follow for the same folder, up to and including the next [`Message::DocSync`],
    /// complete it.
    DocSyncPart(DocSync),
    /// Authors' signatures of the changes in the sync message that follows for the
    /// same folder (sent just before it; see [`crate::change_signature`]).
    ChangeSignatures(ChangeSignatures),
}

/// Signatures of document changes, for one folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSignatures {
    /// The folder.
    pub folder: FolderId,
    /// At most [`MAX_SIGNED_CHANGES`]; more go in several messages.
    pub changes: Vec<SignedChange>,
}

/// An invitation to a folder: everything the invited device needs to join it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The folder.
    pub folder: FolderId,
    /// The inviting person's label for it.
    pub label: String,
    /// The folder's chunk parameters (every device must cut alike).
    pub params: crate::chunk::ChunkParams,
    /// The role the inviter gave the invited device in the folder's access list.
    pub role: Role,
    /// The device that created the folder: its access list must begin with it.
    pub founder: DeviceId,
}

/// Handshake: who is talking and which protocol it speaks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The sender's device name, as its user set it.
    pub device_name: String,
    /// The sender's software and version, for diagnostics.
    pub client_version: String,
}

/// One automerge sync message for a folder's document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSync {
    /// The folder.
    pub folder: FolderId,
    /// automerge `sync::Message` bytes; decoded (and checked) by the node.
    #[serde(with = "serde_bytes")]
    pub sync_message: Vec<u8>,
}

/// Request for manifests by hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRequest {
    /// The folder the manifests belong to (authorisation is per folder).
    pub folder: FolderId,
    /// Chosen by the requester; echoed in responses.
    pub request_id: u64,
    /// At most [`MAX_BATCH_HASHES`].
    pub hashes: Vec<ManifestHash>,
}

/// One manifest, or `None` if the responder does not have it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestResponse {
    /// Echo of the request's ID.
    pub request_id: u64,
    /// Which manifest this answers.
    pub hash: ManifestHash,
    /// The manifest (the receiver checks that it hashes to `hash`).
    pub manifest: Option<Manifest>,
}

/// Request for a batch of blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRequest {
    /// The folder the blocks belong to (authorisation is per folder).
    pub folder: FolderId,
    /// Chosen by the requester; echoed in responses.
    pub request_id: u64,
    /// At most [`MAX_BATCH_HASHES`], answered in this order.
    pub hashes: Vec<BlockHash>,
}

/// One block's bytes. The receiver verifies them against `hash` before use.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Echo of the request's ID.
    pub request_id: u64,
    /// The hash that was asked for.
    pub hash: BlockHash,
    /// The bytes, at most [`MAX_BLOCK_LEN`].
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("request_id", &self.request_id)
            .field("hash", &self.hash)
            .field("len", &self.data.len())
            .finish()
    }
}

/// A requested block the responder cannot give.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMissing {
    /// Echo of the request's ID.
    pub request_id: u64,
    /// The block.
    pub hash: BlockHash,
}

/// Why the sender refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer's protocol version is not supported.
    UnsupportedVersion,
    /// The folder is not shared with the requester (says nothing about whether it exists).
    NotShared,
    /// A message broke the protocol.
    Malformed,
    /// The sender is overloaded; retry later.
    Busy,
}

/// An error report; the connection may stay open unless the error says otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable text, at most [`MAX_ERROR_TEXT_LEN`] bytes.
    pub text: String,
}

/// Why a frame or message was refused. After any of these the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The header announces a payload over [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    FrameTooLarge {
        /// Announced payload length.
        len: usize,
    },
    /// The payload is not a valid message encoding.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The payload decodes but leaves bytes over.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    /// A field is over its limit.
    #[error("{field} has {len}, limit {limit}")]
    Limit {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// Result of [`decode`] when no error occurred.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// More bytes are needed: at least `needed` more.
    Incomplete {
        /// Minimum number of additional bytes before a frame can complete.
        needed: usize,
    },
    /// A whole frame: the message and how many bytes of the input it used.
    Frame {
        /// The decoded, validated message.
        message: Message,
        /// Bytes consumed (header + payload).
        consumed: usize,
    },
}

fn check_limit(field: &'static str, len: usize, limit: usize) -> Result<(), WireError> {
    if len > limit {
        return Err(WireError::Limit { field, len, limit });
    }
    Ok(())
}

impl Message {
    /// The message's kind, for logs and errors (never its contents, which may be
    /// large or a peer's).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::DocSync(_) => "DocSync",
            Message::ManifestRequest(_) => "ManifestRequest",
            Message::ManifestResponse(_) => "ManifestResponse",
            Message::BlockRequest(_) => "BlockRequest",
            Message::Block(_) => "Block",
            Message::BlockMissing(_) => "BlockMissing",
            Message::Error(_) => "Error",
            Message::Invite(_) => "Invite",
            Message::DocSyncPart(_) => "DocSyncPart",
            Message::ChangeSignatures(_) => "ChangeSignatures",
        }
    }

    /// Checks every field against its limit.
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Message::Hello(hello) => {
                check_limit("device_name", hello.device_name.len(), MAX_DEVICE_NAME_LEN)?;
                check_limit(
                    "client_version",
                    hello.client_version.len(),
                    MAX_CLIENT_VERSION_LEN,
                )
            }
            Message::DocSync(sync) | Message::DocSyncPart(sync) => {
                check_limit("sync_message", sync.sync_message.len(), MAX_DOC_SYNC_LEN)
            }
            Message::ManifestRequest(request) => {
                check_limit("hashes", request.hashes.len(), MAX_BATCH_HASHES)
            }
            Message::BlockRequest(request) => {
                check_limit("hashes", request.hashes.len(), MAX_BATCH_HASHES)
            }
            Message::Block(block) => check_limit("data", block.data.len(), MAX_BLOCK_LEN as usize),
            Message::Error(error) => check_limit("text", error.text.len(), MAX_ERROR_TEXT_LEN),
            Message::Invite(invite) => check_limit("label", invite.label.len(), MAX_LABEL_LEN),
            Message::ChangeSignatures(signatures) => {
                check_limit("changes", signatures.changes.len(), MAX_SIGNED_CHANGES)
            }
            // Manifests validate themselves on decode; the frame limit bounds them.
            Message::ManifestResponse(_) | Message::BlockMissing(_) => Ok(()),
        }
    }

    /// Length of this message's frame (header included) as [`encode`] writes it.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + postcard::experimental::serialized_size(self).unwrap_or(0)
    }
}

/// Encodes `message` as one frame, appending it to `out`.
pub fn encode_into(message: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    message.validate()?;
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    let result = postcard::to_io(message, &mut *out);
    if let Err(error) = result {
        out.truncate(start);
        return Err(WireError::Malformed(error.to_string()));
    }
    let len = out.len() - start - FRAME_HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(WireError::FrameTooLarge { len });
    }
    // len <= MAX_FRAME_LEN < u32::MAX.
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Encodes `message` as one frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(message.encoded_len());
    encode_into(message, &mut out)?;
    Ok(out)
}

/// Reads the payload length from a frame header, rejecting oversized frames.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(WireError::FrameTooLarge { len });
    }
    Ok(len)
}

/// Decodes a message payload (the bytes after the header).
pub fn decode_payload(payload: &[u8]) -> Result<Message, WireError> {
    let (message, rest) = postcard::take_from_bytes::<Message>(payload)
        .map_err(|error| WireError::Malformed(error.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    message.validate()?;
    Ok(message)
}

/// Index of [`Message::Block`] among the variants (postcard's enum tag).
const BLOCK_VARIANT: u32 = 5;

/// Most bytes a [`Message::Block`] payload has before the block's bytes: the variant,
/// the request ID, the hash and the length, varints at their longest.
pub const BLOCK_HEAD_MAX: usize = 5 + 10 + crate::hash::HASH_LEN + 10;

/// Everything of a [`Message::Block`] but its bytes: what comes before them in the
/// payload. A receiver parses it to read the bytes straight into the block's own
/// buffer, and a sender sends it in front of bytes it already holds, so that a block
/// is not copied into (or out of) a frame-sized buffer on either side. The frames are
/// the ones [`encode`] and [`decode_payload`] make and read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHead {
    /// Echo of the request's ID.
    pub request_id: u64,
    /// The hash that was asked for.
    pub hash: BlockHash,
    /// Length of the block's bytes.
    pub data_len: usize,
}

impl BlockHead {
    /// Parses the head at the start of a payload: the head and its length in bytes.
    /// `None` if the payload is not a block, or `bytes` ends inside the head; such a
    /// payload is for [`decode_payload`], which says what is wrong with it.
    pub fn parse(bytes: &[u8]) -> Option<(Self, usize)> {
        let (variant, rest) = postcard::take_from_bytes::<u32>(bytes).ok()?;
        if variant != BLOCK_VARIANT {
            return None;
        }
        let (request_id, rest) = postcard::take_from_bytes::<u64>(rest).ok()?;
        let (hash, rest) = postcard::take_from_bytes::<BlockHash>(rest).ok()?;
        let (data_len, rest) = postcard::take_from_bytes::<u64>(rest).ok()?;
        let head = Self {
            request_id,
            hash,
            data_len: usize::try_from(data_len).ok()?,
        };
        Some((head, bytes.len() - rest.len()))
    }

    /// The frame header and the head of this block's frame: followed by the block's
    /// `data_len` bytes, they are the frame [`encode`] makes of the whole message.
    pub fn encode_frame_head(&self) -> Result<Vec<u8>, WireError> {
        check_limit("data", self.data_len, MAX_BLOCK_LEN as usize)?;
        let mut head = vec![0u8; FRAME_HEADER_LEN];
        let fields = (
            BLOCK_VARIANT,
            self.request_id,
            self.hash,
            self.data_len as u64,
        );
        postcard::to_io(&fields, &mut head)
            .map_err(|error| WireError::Malformed(error.to_string()))?;
        let payload_len = head.len() - FRAME_HEADER_LEN + self.data_len;
        let header = u32::try_from(payload_len)
            .map_err(|_| WireError::FrameTooLarge { len: payload_len })?;
        head[..FRAME_HEADER_LEN].copy_from_slice(&header.to_le_bytes());
        Ok(head)
    }
}

/// Decodes the first frame in `buffer`.
pub fn decode(buffer: &[u8]) -> Result<Decoded, WireError> {
    let Some(header) = buffer.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(Decoded::Incomplete {
            needed: FRAME_HEADER_LEN - buffer.len(),
        });
    };
    let len = frame_len(*header)?;
    let total = FRAME_HEADER_LEN + len;
    if buffer.len() < total {
        return Ok(Decoded::Incomplete {
            needed: total - buffer.len(),
        });
    }
    let message = decode_payload(&buffer[FRAME_HEADER_LEN..total])?;
    Ok(Decoded::Frame {
        message,
        consumed: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::BlockRef;
    use proptest::prelude::*;

    fn arb_hash() -> impl Strategy<Value = [u8; 32]> {
        any::<[u8; 32]>()
    }

    fn arb_folder() -> impl Strategy<Value = FolderId> {
        "[a-z0-9][a-z0-9._-]{0,20}".prop_map(|text| FolderId::new(&text).unwrap())
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        proptest::collection::vec((arb_hash(), 1u32..=MAX_BLOCK_LEN), 0..8).prop_map(|blocks| {
            Manifest::from_blocks(
                blocks
                    .into_iter()
                    .map(|(hash, len)| BlockRef {
                        hash: BlockHash(hash),
                        len,
                    })
                    .collect(),
            )
            .unwrap()
        })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u32>(), ".{0,40}", ".{0,20}").prop_map(|(protocol_version, name, version)| {
                Message::Hello(Hello {
                    protocol_version,
                    device_name: name,
                    client_version: version,
                })
            }),
            (arb_folder(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
                |(folder, sync_message)| Message::DocSync(DocSync {
                    folder,
                    sync_message
                })
            ),
            (arb_folder(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
                |(folder, sync_message)| Message::DocSyncPart(DocSync {
                    folder,
                    sync_message
                })
            ),
            (
                arb_folder(),
                proptest::collection::vec((arb_hash(), arb_hash(), arb_hash()), 0..5)
            )
                .prop_map(|(folder, changes)| {
                    Message::ChangeSignatures(ChangeSignatures {
                        folder,
                        changes: changes
                            .into_iter()
                            .map(|(hash, a, b)| {
                                let mut signature = [0u8; 64];
                                signature[..32].copy_from_slice(&a);
                                signature[32..].copy_from_slice(&b);
                                SignedChange {
                                    hash,
                                    signature: crate::identity::Signature(signature),
                                }
                            })
                            .collect(),
                    })
                }),
            (
                arb_folder(),
                any::<u64>(),
                proptest::collection::vec(arb_hash(), 0..20)
            )
                .prop_map(|(folder, request_id, hashes)| {
                    Message::ManifestRequest(ManifestRequest {
                        folder,
                        request_id,
                        hashes: hashes.into_iter().map(ManifestHash).collect(),
                    })
                }),
            (
                any::<u64>(),
                arb_hash(),
                proptest::option::of(arb_manifest())
            )
                .prop_map(|(request_id, hash, manifest)| Message::ManifestResponse(
                    ManifestResponse {
                        request_id,
                        hash: ManifestHash(hash),
                        manifest
                    }
                )),
            (
                arb_folder(),
                any::<u64>(),
                proptest::collection::vec(arb_hash(), 0..20)
            )
                .prop_map(|(folder, request_id, hashes)| {
                    Message::BlockRequest(BlockRequest {
                        folder,
                        request_id,
                        hashes: hashes.into_iter().map(BlockHash).collect(),
                    })
                }),
            (
                any::<u64>(),
                arb_hash(),
                proptest::collection::vec(any::<u8>(), 0..2000)
            )
                .prop_map(|(request_id, hash, data)| Message::Block(Block {
                    request_id,
                    hash: BlockHash(hash),
                    data
                })),
            (any::<u64>(), arb_hash()).prop_map(|(request_id, hash)| {
                Message::BlockMissing(BlockMissing {
                    request_id,
                    hash: BlockHash(hash),
                })
            }),
            (
                prop_oneof![
                    Just(ErrorCode::UnsupportedVersion),
                    Just(ErrorCode::NotShared),
                    Just(ErrorCode::Malformed),
                    Just(ErrorCode::Busy)
                ],
                ".{0,60}"
            )
                .prop_map(|(code, text)| Message::Error(ErrorMessage { code, text })),
            (arb_folder(), ".{0,30}", any::<bool>()).prop_map(|(folder, label, edit)| {
                Message::Invite(Invite {
                    folder,
                    label,
                    params: crate::chunk::ChunkParams::DEFAULT,
                    role: if edit { Role::Edit } else { Role::View },
                    founder: crate::identity::DeviceKey::from_secret_bytes([3; 32]).device_id(),
                })
            }),
        ]
    }

    #[test]
    fn oversized_header_is_refused_before_the_payload_arrives() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        assert_eq!(
            decode(&header),
            Err(WireError::FrameTooLarge {
                len: MAX_FRAME_LEN + 1
            })
        );
        assert_eq!(decode(&[1, 0]), Ok(Decoded::Incomplete { needed: 2 }));
        assert_eq!(
            decode(&[10, 0, 0, 0, 1]),
            Ok(Decoded::Incomplete { needed: 9 })
        );
    }

    #[test]
    fn limits_are_enforced_on_both_sides() {
        let request = Message::BlockRequest(BlockRequest {
            folder: FolderId::new("f").unwrap(),
            request_id: 1,
            hashes: vec![BlockHash([0; 32]); MAX_BATCH_HASHES + 1],
        });
        assert!(matches!(
            encode(&request),
            Err(WireError::Limit {
                field: "hashes",
                ..
            })
        ));
        // A hostile peer that encodes it anyway is refused by the decoder.
        let payload = postcard::to_allocvec(&request).unwrap();
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&payload);
        assert!(matches!(decode(&frame), Err(WireError::Limit { .. })));
        let long_name = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            device_name: "x".repeat(MAX_DEVICE_NAME_LEN + 1),
            client_version: String::new(),
        });
        assert!(encode(&long_name).is_err());
    }

    #[test]
    fn trailing_bytes_in_a_payload_are_refused() {
        let message = Message::BlockMissing(BlockMissing {
            request_id: 3,
            hash: BlockHash([1; 32]),
        });
        let mut payload = postcard::to_allocvec(&message).unwrap();
        payload.push(0);
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&payload);
        assert_eq!(decode(&frame), Err(WireError::TrailingBytes(1)));
    }

    #[test]
    fn a_lying_manifest_inside_a_response_is_refused() {
        /// A manifest as raw (size, [(hash, len)]), free of the invariant checks.
        type RawManifest = (u64, Vec<([u8; 32], u32)>);
        #[derive(Serialize)]
        enum FakeMessage {
            #[allow(dead_code)]
            Hello(u8),
            #[allow(dead_code)]
            DocSync(u8),
            #[allow(dead_code)]
            ManifestRequest(u8),
            ManifestResponse(u64, [u8; 32], Option<RawManifest>),
        }
        let fake = FakeMessage::ManifestResponse(1, [0; 32], Some((999, vec![([0; 32], 5)])));
        let payload = postcard::to_allocvec(&fake).unwrap();
        assert!(matches!(
            decode_payload(&payload),
            Err(WireError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn every_message_round_trips_with_exact_encoded_len(message in arb_message()) {
            let frame = encode(&message).unwrap();
            prop_assert_eq!(frame.len(), message.encoded_len());
            let decoded = decode(&frame).unwrap();
            prop_assert_eq!(decoded, Decoded::Frame { message: message.clone(), consumed: frame.len() });
            // Any strict prefix is incomplete, never an error or a message.
            let cut = frame.len() / 2;
            prop_assert!(matches!(decode(&frame[..cut]), Ok(Decoded::Incomplete { .. })), "prefix was not incomplete");
        }

        #[test]
        fn truncated_payloads_are_errors(message in arb_message(), cut in any::<prop::sample::Index>()) {
            let frame = encode(&message).unwrap();
            let payload = &frame[FRAME_HEADER_LEN..];
            let cut = cut.index(payload.len());
            let mut truncated = (cut as u32).to_le_bytes().to_vec();
            truncated.extend_from_slice(&payload[..cut]);
            prop_assert!(decode(&truncated).is_err());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode(&bytes);
            let _ = decode_payload(&bytes);
        }

        #[test]
        fn random_payloads_behind_a_valid_header_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut frame = (bytes.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&bytes);
            match decode(&frame) {
                Ok(Decoded::Frame { consumed, .. }) => prop_assert_eq!(consumed, frame.len()),
                Ok(Decoded::Incomplete { .. }) => prop_assert!(false, "complete frame reported incomplete"),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn a_block_head_and_its_bytes_are_the_frame_encode_makes() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for (request_id, len) in [
            (0, 0),
            (7, 1),
            (u64::MAX, 127),
            (300, 128),
            (1 << 40, data.len()),
        ] {
            let block = Block {
                request_id,
                hash: BlockHash([request_id as u8; 32]),
                data: data[..len].to_vec(),
            };
            let frame = encode(&Message::Block(block.clone())).unwrap();
            let head = BlockHead {
                request_id,
                hash: block.hash,
                data_len: len,
            };
            let mut parts = head.encode_frame_head().unwrap();
            assert!(parts.len() <= FRAME_HEADER_LEN + BLOCK_HEAD_MAX);
            parts.extend_from_slice(&block.data);
            assert_eq!(parts, frame);
            let (parsed, head_len) = BlockHead::parse(&frame[FRAME_HEADER_LEN..]).unwrap();
            assert_eq!(parsed, head);
            assert_eq!(&frame[FRAME_HEADER_LEN + head_len..], &block.data[..]);
        }
    }

    #[test]
    fn block_heads_are_refused_where_they_do_not_fit() {
        let head = BlockHead {
            request_id: 1,
            hash: BlockHash([1; 32]),
            data_len: MAX_BLOCK_LEN as usize + 1,
        };
        assert!(matches!(
            head.encode_frame_head(),
            Err(WireError::Limit { .. })
        ));
        // Not a block, or a head cut short: left to `decode_payload`.
        let missing = encode(&Message::BlockMissing(BlockMissing {
            request_id: 1,
            hash: BlockHash([1; 32]),
        }))
        .unwrap();
        assert_eq!(BlockHead::parse(&missing[FRAME_HEADER_LEN..]), None);
        let frame = encode(&Message::Block(Block {
            request_id: 1,
            hash: BlockHash([2; 32]),
            data: vec![3; 10],
        }))
        .unwrap();
        for cut in 0..FRAME_HEADER_LEN + 35 {
            assert_eq!(
                BlockHead::parse(&frame[FRAME_HEADER_LEN..cut.max(FRAME_HEADER_LEN)]),
                None
            );
        }
    }
}
