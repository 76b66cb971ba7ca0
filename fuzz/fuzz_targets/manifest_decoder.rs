//! Fuzzes manifest decoding: never panics; an accepted manifest keeps its invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_protocol::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::decode(data) {
        let sum: u64 = manifest.blocks().iter().map(|b| u64::from(b.len)).sum();
        assert_eq!(sum, manifest.size());
    }
});
