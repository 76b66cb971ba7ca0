//! `weft-simulations`: deterministic, seeded simulations of many Weft devices.
//!
//! Many sync engines on a virtual filesystem and network with faults, driven from one
//! seeded RNG, with invariants checked after every step (see the simulation issue).
//! This crate arrives with the pure engine; until then it only fixes its place in the
//! dependency graph.
