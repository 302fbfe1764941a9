//! Helpers shared by the loopback integration tests.
#![allow(dead_code, unused_imports, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{Vsock, VsockListener, VsockStream};

pub use zerovsock_testkit::suite::{djb2, pattern};

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

/// A connected STREAM pair on `vsock`: (client, accepted server side).
pub fn pair(vsock: &Vsock) -> (VsockStream, VsockStream) {
    let port = port();
    let listener = VsockListener::bind(vsock, any(port)).unwrap();
    let client = VsockStream::connect(vsock, local(port)).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}
