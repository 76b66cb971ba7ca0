//! `weft-node`: the Weft device node, as a library behind the `weft` binary.
//!
//! The node is an I/O shell around the pure folder core (`weft-core`: the sync
//! [`engine`] and the folder state machine): the node home (identity key, config), the
//! redb [`store`], the [`scan`]ner and [`watch`]er, one [`folder`] actor per folder that
//! runs the core over the real disk, store and network, the network ([`net`], [`coalescer`]) and downloads
//! ([`fetch`], with reused [`block_buffers`]), the [`versions`] store, the [`node`]
//! that ties them together, and the control [`api`] with its [`client`]. `main.rs` is
//! the CLI.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod block_buffers;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dir_sync;
pub mod dirty;
/// The sync engine, from the folder core (`weft-core`).
pub use weft_core::engine;
pub mod events;
pub mod fetch;
pub mod folder;
pub mod home;
pub mod invites;
pub mod net;
pub mod node;
pub mod release;
pub mod scan;
pub mod store;
pub mod temp_file;
pub mod versions;
pub mod watch;
