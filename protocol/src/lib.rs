//! `weft-protocol`: everything two Weft parties must agree on, with no I/O.
//!
//! This crate is the pure core of Weft (see `ARCHITECTURE.md`): device identity and
//! the typed device ID, content-defined chunking and BLAKE3 block hashes, file
//! manifests, folder IDs, and the wire messages with their framed codec. It works on
//! byte buffers, `std::io::Read`ers and plain values.
//!
//! **Architecture invariant:** no tokio, no filesystem or socket access, no clock
//! reads. Time, randomness and bytes are passed in by the caller. `.ci/run` checks the
//! dependency tree so that this stays true.
//!
//! **API boundary:** every function that parses outside data (device IDs, frames,
//! manifests, chunk parameters, key files) returns a typed error and never panics.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod access;
pub mod actor;
pub mod causality;
pub mod change_signature;
pub mod chunk;
pub mod document;
pub mod folder;
pub mod hash;
pub mod identity;
pub mod manifest;
pub mod path;
pub mod sync_parts;
pub mod wire;

pub use chunk::{ChunkParams, ChunkParamsError, Chunker};
pub use folder::{FolderId, FolderIdError};
pub use hash::{BlockHash, ManifestHash};
pub use identity::{DeviceId, DeviceIdError, DeviceKey, KeyFileError, Signature};
pub use manifest::{BlockRef, Manifest, ManifestError};
pub use path::{PathError, RelPath};
