//! One end of a connection as perf drives it, whatever carries it: the userspace stack
//! (loopback, the device's host side, the userspace guest), kernel AF_VSOCK, an AF_UNIX stream
//! (a socketpair, or a vhost-user-vsock device's hybrid endpoint), TCP.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::Bytes;
use zerovsock::{Completion, Interest, Readiness};

/// Completions read after a wait.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Completion ids (zerocopy passes) covered.
    pub ids: u64,
    /// Of those, the ids whose completion carried COPIED.
    pub copied: u64,
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, what.to_string())
}

/// A connected stream end.
pub trait Conn: Send {
    /// One `send()`: returns the bytes taken (a stream may take fewer).
    fn send(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// One `read()`.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// `shutdown(SHUT_WR)`: the receiver sees end of file.
    fn close_write(&mut self) -> io::Result<()>;
    /// SO_ZEROCOPY.
    fn enable_zerocopy(&mut self) -> io::Result<()> {
        Err(unsupported("this connection has no MSG_ZEROCOPY"))
    }
    /// One MSG_ZEROCOPY send of `buf`, lent until its completion; returns the bytes taken.
    fn send_zerocopy(&mut self, _buf: Bytes) -> io::Result<usize> {
        Err(unsupported("this connection has no MSG_ZEROCOPY"))
    }
    /// The completion id the next zerocopy send pass takes (the ids a send took are the
    /// difference across it).
    fn next_completion_id(&self) -> u32 {
        0
    }
    /// Waits up to `timeout` for completions (POLLERR), then reads queued ones until they
    /// cover `want` ids or the queue is empty.
    fn reap(&mut self, _timeout: Duration, _want: u64) -> io::Result<Reaped> {
        Err(unsupported("this connection has no MSG_ZEROCOPY"))
    }
    /// One io_uring SEND_ZC of `buf`, waited for to its notification; returns the bytes sent
    /// and whether the kernel copied.
    fn send_uring_zc(&mut self, _buf: Bytes) -> io::Result<(usize, bool)> {
        Err(unsupported("io_uring SEND_ZC needs a kernel socket"))
    }
}

/// Waits up to `timeout` for POLLERR, then reads completions until they cover `want` ids or
/// the queue is empty (stopping at `want` spares a call that finds the queue empty).
fn reap_queue(
    timeout: Duration,
    want: u64,
    poll: impl FnOnce(Duration) -> io::Result<Readiness>,
    mut next: impl FnMut() -> io::Result<Completion>,
) -> io::Result<Reaped> {
    let mut reaped = Reaped::default();
    if !poll(timeout)?.error {
        return Ok(reaped);
    }
    while reaped.ids < want {
        match next() {
            Ok(done) => {
                reaped.ids += done.count();
                if done.copied {
                    reaped.copied += done.count();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(reaped)
}

/// The zerocopy methods of a type with the zerovsock socket shape, reached through `$s`.
macro_rules! zerocopy_methods {
    ($this:ident => $s:expr) => {
        fn enable_zerocopy(&mut self) -> io::Result<()> {
            let $this = self;
            let socket = &$s;
            socket.set_zerocopy(true)
        }

        fn send_zerocopy(&mut self, buf: Bytes) -> io::Result<usize> {
            let $this = self;
            // Through a shared reference, so the socket's own method is called, not this one.
            let socket = &$s;
            socket.send_zerocopy(buf)
        }

        fn next_completion_id(&self) -> u32 {
            let $this = self;
            let socket = &$s;
            socket.next_completion_id()
        }

        fn reap(&mut self, timeout: Duration, want: u64) -> io::Result<Reaped> {
            let $this = self;
            let socket = &$s;
            reap_queue(
                timeout,
                want,
                |t| socket.poll(Interest::NONE, Some(t)),
                || socket.recv_completion(),
            )
        }
    };
}

/// `Conn` for a stream type with the zerovsock socket shape (`Read`/`Write` on `&T`).
macro_rules! stream_conn {
    ($type:ty) => {
        impl Conn for $type {
            fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
                (&*self).write(buf)
            }
            fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                (&*self).read(buf)
            }
            fn close_write(&mut self) -> io::Result<()> {
                self.shutdown(Shutdown::Write)
            }
            zerocopy_methods!(this => *this);
        }
    };
}

stream_conn!(zerovsock::VsockStream);
stream_conn!(zerovsock_linux::TcpZerocopyStream);

/// A kernel AF_VSOCK stream, with an io_uring for SEND_ZC made on first use.
pub struct KernelConn {
    pub stream: zerovsock_linux::VsockStream,
    ring: Option<zerovsock_linux::UringZerocopy>,
}

impl KernelConn {
    pub fn new(stream: zerovsock_linux::VsockStream) -> KernelConn {
        KernelConn { stream, ring: None }
    }
}

impl Conn for KernelConn {
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.stream).write(buf)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.stream).read(buf)
    }
    fn close_write(&mut self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }
    zerocopy_methods!(this => this.stream);

    fn send_uring_zc(&mut self, buf: Bytes) -> io::Result<(usize, bool)> {
        let ring = match &mut self.ring {
            Some(ring) => ring,
            None => self.ring.insert(zerovsock_linux::UringZerocopy::new()?),
        };
        let (report, _buf) = ring.send_zc(&self.stream, buf)?;
        Ok((report.sent, report.copied))
    }
}

impl Conn for UnixStream {
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write(buf)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
    fn close_write(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}
