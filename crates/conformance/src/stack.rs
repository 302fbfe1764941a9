//! [`Peer`] over the userspace stack (`zerovsock`): the loopback endpoint, the device's host
//! side (`Device::vsock`) or the userspace guest driver's guest side.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use bytes::Bytes;
use zerovsock::{
    Seqpacket, Stream, Vsock, VsockListener, VsockSeqpacket, VsockSeqpacketListener, VsockSocket,
    VsockStream,
};

use crate::peer::{
    Addr, Cid, Completion, Conn, Feature, Interest, Listener, Peer, Port, Readiness, RecvFlags,
    RecvMeta, SockType, ZcBuf,
};

/// The userspace stack on one endpoint.
#[derive(Debug, Clone)]
pub struct StackPeer {
    vsock: Vsock,
    name: String,
}

impl StackPeer {
    /// Sockets on `vsock`, reported as `name`.
    pub fn new(vsock: Vsock, name: impl Into<String>) -> StackPeer {
        StackPeer { vsock, name: name.into() }
    }
}

impl Peer for StackPeer {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn lacks(&self, feature: Feature) -> Option<&'static str> {
        match feature {
            Feature::UnmappedMemory => Some(
                "the socket API takes Rust buffers, which are always mapped (no EFAULT, no \
                 unmapped iovec)",
            ),
            Feature::UnsentBytes => Some("no SIOCOUTQ on the userspace stack yet"),
            Feature::IoUring => Some("io_uring is a kernel interface"),
            Feature::UnreadBytes => None,
        }
    }

    fn connect(
        &self,
        ty: SockType,
        addr: Addr,
        bind_port: Option<Port>,
    ) -> io::Result<Box<dyn Conn>> {
        let bind = |socket_addr: &dyn Fn(Addr) -> io::Result<Addr>| match bind_port {
            Some(port) => socket_addr(Addr::new(Cid::ANY, port)).map(drop),
            None => Ok(()),
        };
        let conn = match ty {
            SockType::Stream => {
                let socket = VsockSocket::<Stream>::new(&self.vsock)?;
                bind(&|a| socket.bind(a))?;
                Kind::Stream(socket.connect(addr)?)
            }
            SockType::Seqpacket => {
                let socket = VsockSocket::<Seqpacket>::new(&self.vsock)?;
                bind(&|a| socket.bind(a))?;
                Kind::Seqpacket(socket.connect(addr)?)
            }
        };
        Ok(Box::new(StackConn::new(conn)))
    }

    fn listen(&self, ty: SockType, addr: Addr, backlog: u32) -> io::Result<Box<dyn Listener>> {
        Ok(match ty {
            SockType::Stream => {
                let socket = VsockSocket::<Stream>::new(&self.vsock)?;
                socket.bind(addr)?;
                Box::new(StackListener::Stream(socket.listen(backlog)?))
            }
            SockType::Seqpacket => {
                let socket = VsockSocket::<Seqpacket>::new(&self.vsock)?;
                socket.bind(addr)?;
                Box::new(StackListener::Seqpacket(socket.listen(backlog)?))
            }
        })
    }

    fn bind_only(&self, ty: SockType, addr: Addr) -> io::Result<Box<dyn Send>> {
        Ok(match ty {
            SockType::Stream => {
                let socket = VsockSocket::<Stream>::new(&self.vsock)?;
                socket.bind(addr)?;
                Box::new(socket)
            }
            SockType::Seqpacket => {
                let socket = VsockSocket::<Seqpacket>::new(&self.vsock)?;
                socket.bind(addr)?;
                Box::new(socket)
            }
        })
    }
}

enum StackListener {
    Stream(VsockListener),
    Seqpacket(VsockSeqpacketListener),
}

impl Listener for StackListener {
    fn accept(&self, timeout: Duration) -> io::Result<(Box<dyn Conn>, Addr)> {
        let accepted = wait_for(timeout, |cx| match self {
            StackListener::Stream(l) => {
                l.poll_accept(cx).map(|r| r.map(|(c, a)| (Kind::Stream(c), a)))
            }
            StackListener::Seqpacket(l) => {
                l.poll_accept(cx).map(|r| r.map(|(c, a)| (Kind::Seqpacket(c), a)))
            }
        });
        let (conn, addr) = accepted.ok_or(io::ErrorKind::TimedOut)??;
        Ok((Box::new(StackConn::new(conn)), addr))
    }
}

/// Polls `poll` until it is ready or `timeout` passes, parking the thread in between.
fn wait_for<T>(timeout: Duration, mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Option<T> {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let deadline = Instant::now() + timeout;
    loop {
        if let Poll::Ready(value) = poll(&mut cx) {
            return Some(value);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        thread::park_timeout(left);
    }
}

enum Kind {
    Stream(VsockStream),
    Seqpacket(VsockSeqpacket),
}

/// Calls the same method on whichever socket type `$conn` holds.
macro_rules! either {
    ($conn:expr, $s:ident => $call:expr) => {
        match &$conn.socket {
            Kind::Stream($s) => $call,
            Kind::Seqpacket($s) => $call,
        }
    };
}

struct StackConn {
    socket: Kind,
    /// O_NONBLOCK as the test set it; MSG_DONTWAIT sets it for one call only.
    nonblocking: AtomicBool,
}

impl StackConn {
    fn new(socket: Kind) -> StackConn {
        StackConn { socket, nonblocking: AtomicBool::new(false) }
    }

    /// Runs `call` non-blocking when `dontwait`, as MSG_DONTWAIT does.
    fn dontwait<T>(&self, dontwait: bool, call: impl FnOnce() -> T) -> io::Result<T> {
        if !dontwait || self.nonblocking.load(Ordering::Relaxed) {
            return Ok(call());
        }
        either!(self, s => s.set_nonblocking(true))?;
        let result = call();
        either!(self, s => s.set_nonblocking(false))?;
        Ok(result)
    }
}

impl Conn for StackConn {
    fn send(&self, buf: &[u8], eor: bool) -> io::Result<usize> {
        match &self.socket {
            Kind::Stream(s) => (&*s).write(buf),
            Kind::Seqpacket(s) if eor => s.send_eor(buf),
            Kind::Seqpacket(s) => s.send(buf),
        }
    }

    fn send_zerocopy(&self, bufs: Vec<ZcBuf>) -> io::Result<usize> {
        let bufs = bufs.into_iter().map(|b| Bytes::from(b.data).slice(b.offset..));
        either!(self, s => s.send_zerocopy_vectored(bufs))
    }

    fn recv(&self, buf: &mut [u8], flags: RecvFlags) -> io::Result<RecvMeta> {
        self.dontwait(flags.dontwait, || match &self.socket {
            Kind::Stream(s) => {
                let len = if flags.peek { s.peek(buf)? } else { (&*s).read(buf)? };
                Ok(RecvMeta { len, message_len: len, eor: false })
            }
            Kind::Seqpacket(s) if flags.peek => s.peek(buf),
            Kind::Seqpacket(s) => s.recv(buf),
        })?
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        either!(self, s => s.shutdown(how))
    }

    fn poll(&self, interest: Interest, timeout: Option<Duration>) -> io::Result<Readiness> {
        either!(self, s => s.poll(interest, timeout))
    }

    fn wait_remote_close(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = self.poll(Interest::READABLE, Some(left))?;
            if ready.read_closed || ready.hangup {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            // Readable with data but not closed yet: look again shortly.
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn set_rcvlowat(&self, bytes: u32) -> io::Result<()> {
        either!(self, s => s.set_rcvlowat(bytes))
    }

    fn set_buffer_size(&self, bytes: u64) -> io::Result<()> {
        either!(self, s => s.set_buffer_size(bytes)).map(drop)
    }

    fn set_buffer_max_size(&self, bytes: u64) -> io::Result<()> {
        either!(self, s => s.set_buffer_max_size(bytes)).map(drop)
    }

    fn buffer_size(&self) -> io::Result<u64> {
        either!(self, s => s.buffer_size())
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        either!(self, s => s.set_read_timeout(timeout))
    }

    fn read_timeout(&self) -> io::Result<Option<Duration>> {
        either!(self, s => s.read_timeout())
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        either!(self, s => s.set_write_timeout(timeout))
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        either!(self, s => s.set_nonblocking(nonblocking))?;
        self.nonblocking.store(nonblocking, Ordering::Relaxed);
        Ok(())
    }

    fn set_zerocopy(&self, enabled: bool) -> io::Result<()> {
        either!(self, s => s.set_zerocopy(enabled))
    }

    fn zerocopy(&self) -> io::Result<bool> {
        either!(self, s => s.zerocopy())
    }

    fn recv_completion(&self) -> io::Result<Completion> {
        either!(self, s => s.recv_completion())
    }

    fn unsent_bytes(&self) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(EOPNOTSUPP))
    }

    fn unread_bytes(&self) -> io::Result<usize> {
        Ok(either!(self, s => s.unread_bytes()))
    }
}

/// EOPNOTSUPP on Linux, what an unsupported ioctl gives.
const EOPNOTSUPP: i32 = 95;
