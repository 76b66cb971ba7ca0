//! Why a network operation failed: typed, so that callers decide by kind (a stream
//! failure is retried on a new stream; a protocol breach is not) and logs say what
//! happened in words.

use std::sync::Arc;

use weft_protocol::DeviceId;
use weft_protocol::wire::WireError;

/// Why a network request failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The peer is not connected.
    #[error("device {0} is not connected")]
    NotConnected(DeviceId),
    /// The stream (or the way to it) failed; a new stream may work.
    #[error("stream to {device} failed: {source}")]
    Stream {
        /// The peer.
        device: DeviceId,
        /// What happened.
        source: StreamFailure,
    },
    /// The peer broke the protocol.
    #[error("device {device} broke the protocol: {reason}")]
    Protocol {
        /// The peer.
        device: DeviceId,
        /// What it did.
        reason: ProtocolBreach,
    },
    /// Setting up the transport failed.
    #[error("network setup failed: {0}")]
    Setup(String),
}

/// How a stream failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamFailure {
    /// No stream could be opened (libp2p's reason).
    #[error("cannot open a stream: {0}")]
    Open(String),
    /// Reading or writing a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer closed the stream before the whole answer.
    #[error("the stream ended before the whole answer")]
    EndedEarly,
    /// No answer within [`super::REQUEST_TIMEOUT`].
    #[error("the request timed out")]
    TimedOut,
    /// The control queue was full: the connection was closed so that every sync
    /// starts over (a dropped sync message would never be sent again).
    #[error("control queue full; disconnected to resync")]
    QueueFull,
    /// The connection's writer is gone.
    #[error("the connection is closing")]
    Closing,
    /// The request was dropped before it was answered (shutting down).
    #[error("the request was dropped (shutting down?)")]
    Dropped,
}

/// What a peer did that the protocol does not allow.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolBreach {
    /// A frame that does not decode.
    #[error(transparent)]
    Frame(FrameError),
    /// An answer that does not answer the request.
    #[error("answered {expected} with {got}")]
    WrongAnswer {
        /// What was asked for.
        expected: String,
        /// What came.
        got: String,
    },
    /// A manifest whose hash is not the one asked for.
    #[error("a manifest does not match its hash")]
    ManifestMismatch,
}

/// Why one frame could not be read or written.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The message cannot be encoded (too large, say).
    #[error("cannot encode a frame: {0}")]
    Encode(WireError),
    /// The stream failed.
    #[error("the stream failed: {0}")]
    Io(Arc<std::io::Error>),
    /// The stream ended in the middle of a frame's header.
    #[error("the stream ended inside a frame header")]
    EndedInHeader,
    /// The stream ended (or failed) in the middle of a frame.
    #[error("the stream ended inside a frame: {0}")]
    EndedInFrame(Arc<std::io::Error>),
    /// The frame's length or bytes are not a valid frame.
    #[error("bad frame: {0}")]
    Decode(WireError),
    /// A request of a kind the stream does not carry.
    #[error("unexpected request {0}")]
    UnexpectedRequest(&'static str),
    /// The node is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// The requester did not take an answer within the serving write timeout.
    #[error("the peer did not read its answer in time")]
    WriteTimeout,
    /// A frame did not arrive whole within its deadline.
    #[error("a frame did not arrive whole in time")]
    ReadTimeout,
    /// A frame is larger than this place allows (a first frame larger than a `Hello`,
    /// a request larger than a request).
    #[error("a frame of {len} bytes where at most {limit} are allowed")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The limit here.
        limit: usize,
    },
    /// The peer's frames found no room in its byte budget in time.
    #[error("the peer sends faster than its messages are handled")]
    OverBudget,
}

impl FrameError {
    /// A failed read or write.
    pub fn io(error: std::io::Error) -> Self {
        FrameError::Io(Arc::new(error))
    }

    /// A read that ended inside a frame.
    pub fn ended(error: std::io::Error) -> Self {
        FrameError::EndedInFrame(Arc::new(error))
    }
}
