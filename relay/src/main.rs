//! `weft-relay`: the always-on relay, discovery and storage node.
//!
//! Circuit relay and hole-punch coordination, the erasure-coded shard store, repair,
//! and the public-link gateway arrive with their issues; today the binary only
//! reports what it is.

#![forbid(unsafe_code)]

fn main() {
    println!(
        "weft-relay {} (wire protocol v{}): relay and storage services are not built yet",
        env!("CARGO_PKG_VERSION"),
        weft_protocol::wire::PROTOCOL_VERSION
    );
}
