//! Messages between simulated devices: the document sync on the ordered control
//! stream, and block and manifest requests with their answers on their own streams.

use weft_protocol::change_signature::SignedChange;
use weft_protocol::{BlockHash, Manifest, ManifestHash};

/// Messages between devices. `DocSync` rides the ordered control stream; the others
/// are block-stream requests and answers.
#[derive(Clone, Debug)]
pub enum Msg {
    /// An automerge sync message and the signatures of the changes it carries.
    DocSync {
        /// The authors' signatures.
        signatures: Vec<SignedChange>,
        /// The sync message.
        message: Vec<u8>,
    },
    /// Asks for a manifest.
    ManifestRequest {
        /// Request ID.
        id: u64,
        /// The manifest wanted.
        hash: ManifestHash,
    },
    /// Answers a manifest request.
    ManifestResponse {
        /// Request ID.
        id: u64,
        /// The manifest, if the peer has it.
        manifest: Option<Manifest>,
    },
    /// Asks for blocks.
    BlockRequest {
        /// Request ID.
        id: u64,
        /// Blocks wanted.
        hashes: Vec<BlockHash>,
    },
    /// Answers a block request (`None`: missing).
    Blocks {
        /// Request ID.
        id: u64,
        /// The blocks.
        blocks: Vec<(BlockHash, Option<Vec<u8>>)>,
    },
}

impl Msg {
    /// Rides the ordered control stream.
    pub fn is_control(&self) -> bool {
        matches!(self, Msg::DocSync { .. })
    }

    /// A request that expects an answer (the world arms a timeout).
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Msg::ManifestRequest { id, .. } | Msg::BlockRequest { id, .. } => Some(*id),
            _ => None,
        }
    }
}

pub(crate) fn kind_of(message: &Msg) -> &'static str {
    match message {
        Msg::DocSync { .. } => "sync message",
        Msg::ManifestRequest { .. } => "manifest request",
        Msg::ManifestResponse { .. } => "manifest",
        Msg::BlockRequest { .. } => "block request",
        Msg::Blocks { .. } => "blocks",
    }
}
