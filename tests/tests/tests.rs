//! Black-box tests of the real binaries (one test binary for the whole suite).

mod blocks;
mod cli;
mod hostile;
mod node;
mod peer;
mod sharing;
mod sync;
mod tidy;
