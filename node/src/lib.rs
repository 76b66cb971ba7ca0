//! `weft-node`: the Weft device node, as a library behind the `weft` binary.
//!
//! The node is a pure sync engine (arriving with the sync issue) inside an I/O shell:
//! the node home (config, identity key, store), the scanner and watcher, networking and
//! the control API. This crate holds the shell's modules; `main.rs` is the CLI.
#![deny(missing_docs)]

pub mod home;
