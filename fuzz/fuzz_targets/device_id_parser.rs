//! Fuzzes device ID parsing: never panics; an accepted ID prints to a form that parses
//! back to the same ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_protocol::DeviceId;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = text.parse::<DeviceId>() {
            assert_eq!(id.to_string().parse::<DeviceId>(), Ok(id));
        }
    }
});
