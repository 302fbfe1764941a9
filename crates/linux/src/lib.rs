//! Kernel `AF_VSOCK` sockets with safe `MSG_ZEROCOPY` (Linux 6.7 and later) and io_uring
//! `SEND_ZC`.
//!
//! The sockets have the same shape as the `zerovsock` crate's loopback sockets
//! ([`VsockListener`], [`VsockStream`], [`VsockSeqpacket`], [`VsockSocket`] for options before
//! connect or listen), so code can move between the in-process stack and the kernel.
//!
//! # Zerocopy
//!
//! * [`VsockStream::set_zerocopy`] sets SO_ZEROCOPY; without it the kernel copies and sends no
//!   completion.
//! * [`VsockStream::send_zerocopy`] takes ownership of the buffer and keeps it until the
//!   kernel's completion says the pages are no longer read (see `zerocopy.rs` for how ids are
//!   matched to buffers, and what happens when a socket closes with sends in flight).
//! * [`VsockStream::recv_completion`] reads the error queue (`recvmsg(MSG_ERRQUEUE)`, control
//!   message `SOL_VSOCK`/`VSOCK_RECVERR`, `sock_extended_err` with origin 5): `lo..=hi` with the
//!   COPIED flag, `WouldBlock` when empty. Readiness reports pending completions as `error`
//!   (POLLERR).
//! * [`VsockStream::send_zerocopy_raw`] is the unsafe form for callers that manage memory.
//! * [`UringZerocopy`] sends through `IORING_OP_SEND_ZC`/`SENDMSG_ZC` and hands the buffer back
//!   after the notification.
//!
//! Errors keep the kernel's errno: EOPNOTSUPP (transport without zerocopy, SO_ZEROCOPY before
//! connecting to one, accepted sockets on kernels before the 2026 fix), ENOMEM (notification
//! budget, or a bad buffer through the raw form), EAGAIN on an empty queue.
//!
//! # Example
//!
//! Inside a VM with kernel vsock (this opens `AF_VSOCK`, so it is not run here):
//!
//! ```no_run
//! use std::io::Read;
//! use zerovsock_linux::wire::{Addr, Cid, Port};
//! use zerovsock_linux::{Interest, VsockListener, VsockStream};
//!
//! let listener = VsockListener::bind(Addr::new(Cid::ANY, Port(1234)))?;
//! let client = VsockStream::connect(Addr::new(Cid::LOCAL, Port(1234)))?;
//! let (mut server, _) = listener.accept()?;
//!
//! client.set_zerocopy(true)?;
//! client.send_zerocopy(vec![7u8; 64 * 1024])?; // the library keeps the Vec for the kernel
//! let mut buf = vec![0u8; 64 * 1024];
//! server.read_exact(&mut buf)?;
//! client.poll(Interest::NONE, None)?; // POLLERR: a completion is queued
//! let done = client.recv_completion()?;
//! assert_eq!((done.lo, done.hi, done.copied), (0, 0, false));
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Safety of use
//!
//! The `unsafe` blocks that reach memory or the kernel live in `sys.rs` (system calls) and
//! `uring.rs` (submission entries), each with its argument; `types.rs` only declares the public
//! `unsafe fn send_zerocopy_raw`, whose one block passes the caller's promise on to `sys.rs`. This crate never decides *where* it runs: the project's own tests of it run
//! only inside guests the VM lab boots, and refuse to run anywhere else.

mod socket;
mod sys;
mod tcp;
mod types;
mod uring;
mod zerocopy;

pub use socket::DEFAULT_LINGER;
pub use tcp::TcpZerocopyStream;
pub use types::{
    Kind, Seqpacket, Stream, VsockListener, VsockSeqpacket, VsockSeqpacketListener, VsockSocket,
    VsockStream,
};
pub use uring::{UringSend, UringZerocopy};
pub use zerocopy::leaked_buffers;
pub use zerovsock_proto::{Completion, Interest, Readiness, RecvMeta};
pub use zerovsock_wire as wire;

/// The local CID (`IOCTL_VM_SOCKETS_GET_LOCAL_CID` on `/dev/vsock`).
pub fn local_cid() -> std::io::Result<wire::Cid> {
    sys::local_cid()
}
