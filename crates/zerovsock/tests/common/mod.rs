//! Helpers shared by the loopback integration tests.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use zerovsock::wire::{Addr, Cid, Port};

/// `hash_djb2` from the kernel's `tools/testing/vsock/util.c`.
pub fn djb2(data: &[u8]) -> u64 {
    data.iter().fold(5381u64, |h, b| h.wrapping_mul(33).wrapping_add(u64::from(*b)))
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A port no other test in this process uses.
pub fn port() -> Port {
    static NEXT: AtomicU32 = AtomicU32::new(20_000);
    Port(NEXT.fetch_add(1, Ordering::Relaxed))
}

pub fn any(port: Port) -> Addr {
    Addr::new(Cid::ANY, port)
}

pub fn local(port: Port) -> Addr {
    Addr::new(Cid::LOCAL, port)
}

pub fn errno(result: io::Result<impl std::fmt::Debug>) -> i32 {
    result.expect_err("expected an error").raw_os_error().expect("an errno")
}
