//! `weft-node`: the Weft device node, as a library behind the `weft` binary.
//!
//! The node is an I/O shell around pure parts: the node home (identity key, config),
//! the redb [`store`], the [`scan`]ner and [`watch`]er, one [`folder`] actor per folder
//! that records local changes in the folder document, the [`node`] that ties them
//! together, and the control [`api`] with its [`client`]. The pure sync engine arrives
//! with the sync issue. `main.rs` is the CLI.
#![deny(missing_docs)]

pub mod api;
pub mod client;
pub mod coalescer;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod events;
pub mod fetch;
pub mod folder;
pub mod home;
pub mod net;
pub mod node;
pub mod scan;
pub mod store;
pub mod versions;
pub mod watch;
