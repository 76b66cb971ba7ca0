//! Fuzzes the frame decoder: any bytes give Incomplete, a frame, or an error; a decoded
//! message re-encodes to a frame the decoder accepts again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_protocol::wire::{Decoded, decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Frame { message, consumed }) = decode(data) {
        assert!(consumed <= data.len());
        let frame = encode(&message).expect("a decoded message is within limits");
        assert!(matches!(decode(&frame), Ok(Decoded::Frame { .. })));
    }
});
