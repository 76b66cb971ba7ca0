//! Deterministic simulations of Weft's sync: many devices running the node's folder
//! core against a virtual disk and network, with faults, on virtual time, all from one
//! seed.
//!
//! - [`world`]: the scheduler, the users, the network and the faults;
//! - [`device`]: one device: the folder core (`weft-core`, the node's own code) and its
//!   [`executor`] over the virtual [`disk`], store and network ([`message`],
//!   [`transfer`]);
//! - [`check`]: the invariants;
//! - [`planner`]: a CanopyCheck-style property check of the planner alone;
//! - [`rng`]: the one source of randomness.
//!
//! `cargo run --release -p weft-simulations -- run --seeds N` runs many seeds;
//! `-- replay SEED` prints one run's whole trace.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod check;
pub mod device;
pub mod disk;
pub mod executor;
pub mod message;
pub mod planner;
pub mod rng;
pub mod transfer;
pub mod world;

pub use check::Violation;
pub use executor::Sabotage;
pub use world::{Config, Outcome, World};

/// Runs one seed.
pub fn simulate(seed: u64, config: Config) -> Outcome {
    World::new(seed, config).run(seed)
}
