//! The one abstraction the test cases are written against: a vsock socket family ([`Peer`])
//! and its connections ([`Conn`]), implemented by the userspace stack (loopback, or either
//! side of the device) in [`crate::stack`] and by the kernel's `AF_VSOCK` in
//! [`crate::kernel`].
//!
//! The operations are the system calls `vsock_test` makes, in the shape the two socket
//! crates share (`std::net` names, `Readiness` for `poll`, `RecvMeta` for `recvmsg`). What
//! only some families can do is a [`Feature`]: a test half that needs one its family lacks
//! is skipped on both sides, with the family's reason.

use std::io;
use std::net::Shutdown;
use std::time::Duration;

pub use zerovsock_proto::{Completion, Interest, Readiness, RecvMeta};
pub use zerovsock_wire::{Addr, Cid, Port};

/// The socket type of a test connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockType {
    /// SOCK_STREAM.
    Stream,
    /// SOCK_SEQPACKET.
    Seqpacket,
}

/// What some socket families can do and others cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Reading into memory the process does not map (EFAULT), and a zerocopy send from an
    /// iovec with an unmapped page (ENOMEM): the kernel tool's `mmap`/`munmap` cases.
    UnmappedMemory,
    /// io_uring sends on the socket.
    IoUring,
}

/// The options of a `recv`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvFlags {
    /// MSG_PEEK.
    pub peek: bool,
    /// MSG_DONTWAIT.
    pub dontwait: bool,
}

impl RecvFlags {
    /// No flags.
    pub const NONE: RecvFlags = RecvFlags { peek: false, dontwait: false };
    /// MSG_PEEK.
    pub const PEEK: RecvFlags = RecvFlags { peek: true, dontwait: false };
    /// MSG_DONTWAIT.
    pub const DONTWAIT: RecvFlags = RecvFlags { peek: false, dontwait: true };
}

/// One buffer of a zerocopy send: `data[offset..]`, so a case can send from an address that
/// is not page aligned, as the kernel tool's `(void *)1` iovec does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZcBuf {
    /// The allocation.
    pub data: Vec<u8>,
    /// Where the sent bytes start in it.
    pub offset: usize,
}

impl AsRef<[u8]> for ZcBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[self.offset..]
    }
}

/// A socket family on one endpoint: what `socket(AF_VSOCK, ...)` gives a test.
pub trait Peer: Send + Sync {
    /// A short name for reports (`loopback`, `kernel`, `device`, ...).
    fn name(&self) -> String;

    /// Why this family cannot do `feature`, or `None` when it can.
    fn lacks(&self, feature: Feature) -> Option<&'static str>;

    /// `socket()` + `connect()` (after `bind()` to `bind_port` when given), within the
    /// family's connect timeout.
    fn connect(
        &self,
        ty: SockType,
        addr: Addr,
        bind_port: Option<Port>,
    ) -> io::Result<Box<dyn Conn>>;

    /// `socket()` + `bind()` + `listen()`.
    fn listen(&self, ty: SockType, addr: Addr, backlog: u32) -> io::Result<Box<dyn Listener>>;

    /// `socket()` + `bind()` without `listen()`: a port bound by nobody who answers. The
    /// binding lasts as long as the returned value.
    fn bind_only(&self, ty: SockType, addr: Addr) -> io::Result<Box<dyn Send>>;
}

/// A listening socket.
pub trait Listener: Send {
    /// `accept()`, waiting at most `timeout` (`TimedOut` after).
    fn accept(&self, timeout: Duration) -> io::Result<(Box<dyn Conn>, Addr)>;
}

/// A connected socket. Every method is the system call of the same name; errors carry the
/// errno Linux gives (`raw_os_error()`).
pub trait Conn: Send + Sync {
    /// `send()`; `eor` is MSG_EOR (SEQPACKET).
    fn send(&self, buf: &[u8], eor: bool) -> io::Result<usize>;

    /// `sendmsg(MSG_ZEROCOPY)` of `bufs` as one iovec.
    fn send_zerocopy(&self, bufs: Vec<ZcBuf>) -> io::Result<usize>;

    /// `sendmsg(MSG_ZEROCOPY)` of one buffer of `lens[i]` bytes per entry, where entry
    /// `unmapped` is a range the process does not map ([`Feature::UnmappedMemory`]).
    fn send_zerocopy_unmapped(&self, lens: &[usize], unmapped: usize) -> io::Result<usize> {
        let _ = (lens, unmapped);
        Err(io::ErrorKind::Unsupported.into())
    }

    /// `recv()`/`recvmsg()`: for SEQPACKET one message, `message_len` its whole length
    /// (MSG_TRUNC) and `eor` its MSG_EOR.
    fn recv(&self, buf: &mut [u8], flags: RecvFlags) -> io::Result<RecvMeta>;

    /// `recv()` of `len` bytes into memory the process does not map
    /// ([`Feature::UnmappedMemory`]).
    fn recv_unmapped(&self, len: usize) -> io::Result<usize> {
        let _ = len;
        Err(io::ErrorKind::Unsupported.into())
    }

    /// `shutdown()`.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;

    /// `poll()` for `interest` (errors and hang-ups always), at most `timeout`; empty
    /// readiness when it timed out.
    fn poll(&self, interest: Interest, timeout: Option<Duration>) -> io::Result<Readiness>;

    /// Waits at most `timeout` for the peer to close or shut down sending (EPOLLRDHUP or
    /// EPOLLHUP, `vsock_wait_remote_close`); whether it did.
    fn wait_remote_close(&self, timeout: Duration) -> io::Result<bool>;

    /// SO_RCVLOWAT.
    fn set_rcvlowat(&self, bytes: u32) -> io::Result<()>;

    /// SO_VM_SOCKETS_BUFFER_SIZE (set).
    fn set_buffer_size(&self, bytes: u64) -> io::Result<()>;

    /// SO_VM_SOCKETS_BUFFER_MAX_SIZE (set).
    fn set_buffer_max_size(&self, bytes: u64) -> io::Result<()>;

    /// SO_VM_SOCKETS_BUFFER_SIZE (get).
    fn buffer_size(&self) -> io::Result<u64>;

    /// SO_VM_SOCKETS_BUFFER_MAX_SIZE (get).
    fn buffer_max_size(&self) -> io::Result<u64>;

    /// SO_RCVLOWAT (get).
    fn rcvlowat(&self) -> io::Result<u32>;

    /// SO_RCVTIMEO (set).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;

    /// SO_RCVTIMEO (get).
    fn read_timeout(&self) -> io::Result<Option<Duration>>;

    /// SO_SNDTIMEO (set).
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;

    /// O_NONBLOCK.
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()>;

    /// SO_ZEROCOPY (set).
    fn set_zerocopy(&self, enabled: bool) -> io::Result<()>;

    /// SO_ZEROCOPY (get).
    fn zerocopy(&self) -> io::Result<bool>;

    /// `recvmsg(MSG_ERRQUEUE)`: the oldest completion; `WouldBlock` when none is queued.
    fn recv_completion(&self) -> io::Result<Completion>;

    /// `ioctl(SIOCOUTQ)`; EOPNOTSUPP where the family has none (the test is then skipped, as
    /// the C tool skips it).
    fn unsent_bytes(&self) -> io::Result<usize>;

    /// `ioctl(SIOCINQ)`; an error where the family has none (Linux 6.12: the test is then
    /// skipped).
    fn unread_bytes(&self) -> io::Result<usize>;

    /// An io_uring `SENDMSG_ZC` of `bufs` as one message ([`Feature::IoUring`]); the bytes
    /// sent and whether the kernel reported COPIED. With SO_ZEROCOPY off it is a copy.
    fn uring_sendmsg(&self, bufs: Vec<ZcBuf>) -> io::Result<(usize, bool)> {
        let _ = bufs;
        Err(io::ErrorKind::Unsupported.into())
    }
}
