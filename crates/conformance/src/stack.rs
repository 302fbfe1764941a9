//! [`Peer`] over the userspace stack (`zerovsock`): the loopback endpoint, the device's host
//! side (`Device::vsock`) or the userspace guest driver's guest side.

use std::io::{self, Read, Write};
use std::net::Shutdown;
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
            Feature::IoUring => Some("io_uring is a kernel interface"),
        }
    }

    fn connect(
        &self,
        ty: SockType,
        addr: Addr,
        bind_port: Option<Port>,
    ) -> io::Result<Box<dyn Conn>> {
        let local = bind_port.map(|port| Addr::new(Cid::ANY, port));
        let conn = match ty {
            SockType::Stream => {
                let socket = VsockSocket::<Stream>::new(&self.vsock)?;
                if let Some(local) = local {
                    socket.bind(local)?;
                }
                Kind::Stream(socket.connect(addr)?)
            }
            SockType::Seqpacket => {
                let socket = VsockSocket::<Seqpacket>::new(&self.vsock)?;
                if let Some(local) = local {
                    socket.bind(local)?;
                }
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

family_conn!(StackConn, VsockStream, VsockSeqpacket);

impl Conn for StackConn {
    forward_conn_methods!();

    fn send_zerocopy(&self, bufs: Vec<ZcBuf>) -> io::Result<usize> {
        let bufs = bufs.into_iter().map(|b| Bytes::from(b.data).slice(b.offset..));
        either!(self, s => s.send_zerocopy_vectored(bufs))
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

    fn unsent_bytes(&self) -> io::Result<usize> {
        Ok(either!(self, s => s.unsent_bytes()))
    }

    fn unread_bytes(&self) -> io::Result<usize> {
        Ok(either!(self, s => s.unread_bytes()))
    }
}
