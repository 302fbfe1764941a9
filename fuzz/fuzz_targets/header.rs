//! Header parsing never panics, and a header that parses writes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zerovsock_wire::{Repr, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(repr) = Repr::parse_bytes(data) {
        assert_eq!(&repr.to_bytes()[..], &data[..HEADER_LEN]);
    }
});
