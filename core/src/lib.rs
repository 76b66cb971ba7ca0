//! `weft-core`: the folder core, the part of Weft that decides.
//!
//! It holds the sync [`engine`] (per-path decisions from the local, remote and synced
//! views) and the [`folder`] state machine around it: recording scan results and
//! publishing them, syncing the folder document with peers (signatures checked),
//! planning rounds and their order, carrying out the engine's actions with the checks
//! before every replace or delete, download queueing and putting finished downloads
//! into place, block transfers ([`transfer`]: which peer is asked for which blocks),
//! racy-file rechecks ([`racy`]), and what each store commit holds.
//!
//! The node (`weft-node`) and the simulation (`weft-simulations`) both run this code:
//! each is an executor of the small traits in [`io`] (disk, store, peers, scanner,
//! clock, reports), over the real filesystem, redb and libp2p in the node and over a
//! virtual disk and network in the simulation. So the simulation's claims hold for
//! the code the node ships, not for a model of it.
//!
//! **Architecture invariant:** no tokio, no filesystem or socket access, no clock or
//! randomness reads: time comes from [`io::Clock`], everything else through [`io`].
//! `.ci/run` checks the dependency tree and greps this crate's source so that this
//! stays true.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod engine;
pub mod folder;
pub mod io;
pub mod racy;
pub mod scan;
pub mod transfer;

pub use folder::{Folder, FolderSettings};
pub use io::{FolderIo, IoError};
pub use scan::{LocalChange, Scope};
