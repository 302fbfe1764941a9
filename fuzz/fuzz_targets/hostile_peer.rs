//! A hostile peer: arbitrary packets (header bytes, payloads up to past 64 KiB, floods) into an
//! engine that listens on three ports and holds what it accepts. The checks are
//! `zerovsock_testkit::hostile::run`'s: no panic, well-formed output, receive memory and queue
//! length within what each connection advertised, a bounded socket count. Its tests show that
//! inputs of this target's size reach those bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    zerovsock_testkit::hostile::run(data);
});
