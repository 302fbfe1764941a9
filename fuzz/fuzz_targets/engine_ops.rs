//! Any sequence of application calls, deliveries and timeouts between two engines keeps the
//! invariants checked by `zerovsock_testkit::Sim` (no credit violation, data in order, each
//! completion once, no leaked socket).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    zerovsock_testkit::Sim::run(data);
});
