//! MSG_ZEROCOPY on a TCP stream, with the same ownership rules as the vsock sockets.
//!
//! TCP is not vsock, but it is what a user compares vsock against: `zerovsock perf --baseline`
//! measures TCP over 127.0.0.1 both copying and with MSG_ZEROCOPY (which Linux turns into a
//! copy on loopback, reporting every completion COPIED). The zerocopy tracker, the buffer
//! ownership and the error-queue reader are the vsock sockets' own; only the control message
//! differs (`IP_RECVERR`/`IPV6_RECVERR` instead of `VSOCK_RECVERR`).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use zerovsock_proto::{Completion, Interest, Readiness};
use zerovsock_wire::SocketType;

use crate::socket::Inner;
use crate::sys;

/// A connected TCP stream with safe MSG_ZEROCOPY sends.
#[derive(Debug)]
pub struct TcpZerocopyStream {
    inner: Inner,
}

impl From<TcpStream> for TcpZerocopyStream {
    fn from(stream: TcpStream) -> TcpZerocopyStream {
        // A TCP stream is a byte stream: the tracker's STREAM rules (one id per sendmsg pass,
        // ranges merged on completion) are TCP's own.
        TcpZerocopyStream { inner: Inner::from_fd(OwnedFd::from(stream), SocketType::Stream) }
    }
}

impl TcpZerocopyStream {
    /// SO_ZEROCOPY.
    pub fn set_zerocopy(&self, enabled: bool) -> io::Result<()> {
        self.inner.set_zerocopy(enabled)
    }

    /// Sends `buf` with MSG_ZEROCOPY, keeping it until the kernel's completion covers it (as
    /// [`crate::VsockStream::send_zerocopy`]).
    pub fn send_zerocopy<B: AsRef<[u8]> + Send + Sync + 'static>(
        &self,
        buf: B,
    ) -> io::Result<usize> {
        let buf = std::sync::Arc::new(buf);
        let owner: crate::zerocopy::Owner = Box::new(buf.clone());
        self.inner.send_zerocopy(&[(*buf).as_ref()], vec![owner])
    }

    /// The oldest zerocopy completion; `WouldBlock` when none is queued.
    pub fn recv_completion(&self) -> io::Result<Completion> {
        self.inner.recv_completion()
    }

    /// The id the next zerocopy send pass takes.
    pub fn next_completion_id(&self) -> u32 {
        self.inner.next_completion_id()
    }

    /// Buffers of zerocopy sends still held for the kernel.
    pub fn pinned_buffers(&self) -> usize {
        self.inner.pinned_buffers()
    }

    /// `poll(2)` for `interest` (POLLERR, completions pending, always), up to `timeout`.
    pub fn poll(&self, interest: Interest, timeout: Option<Duration>) -> io::Result<Readiness> {
        self.inner.poll(interest, timeout)
    }

    /// `shutdown(2)`.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        sys::shutdown(self.inner.fd(), how)
    }
}

impl AsFd for TcpZerocopyStream {
    /// For polling and options. Sending with MSG_ZEROCOPY or changing SO_ZEROCOPY through it
    /// desynchronises the library's completion ids (see [`crate::VsockStream`]'s `AsFd`).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd()
    }
}

impl Read for &TcpZerocopyStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv(self.inner.fd(), buf, 0).map(|(n, _)| n)
    }
}

impl Write for &TcpZerocopyStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.inner.fd(), buf, 0)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
