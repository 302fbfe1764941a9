//! [`Peer`] over the kernel's `AF_VSOCK` (`zerovsock-linux`). It opens kernel vsock sockets,
//! so [`KernelPeer::new`] refuses to run anywhere but inside a guest the project's VM lab
//! booted: the machine this project is developed on must never open one itself.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use zerovsock_linux::{
    Seqpacket, Stream, UringZerocopy, VsockListener, VsockSeqpacket, VsockSeqpacketListener,
    VsockSocket, VsockStream,
};

use crate::peer::{
    Addr, Cid, Completion, Conn, Feature, Interest, Listener, Peer, Port, Readiness, RecvFlags,
    RecvMeta, SockType, ZcBuf,
};

/// The kernel's vsock, inside a lab guest.
#[derive(Debug)]
pub struct KernelPeer {
    _guarded: (),
}

impl KernelPeer {
    /// The kernel's sockets; an error anywhere but in a guest the VM lab booted.
    pub fn new() -> io::Result<KernelPeer> {
        if !zerovsock_lab::in_lab_guest() {
            return Err(io::Error::other(
                "refusing to open AF_VSOCK: this is not a guest booted by the project's VM lab \
                 (kernel vsock runs only there; use `zerovsock-lab` to run the kernel tier)",
            ));
        }
        Ok(KernelPeer { _guarded: () })
    }
}

impl Peer for KernelPeer {
    fn name(&self) -> String {
        "kernel".into()
    }

    fn lacks(&self, feature: Feature) -> Option<&'static str> {
        match feature {
            Feature::UnmappedMemory => Some(
                "unmapped memory needs unsafe code, which the project keeps inside \
                 zerovsock-linux's system call wrappers",
            ),
            Feature::IoUring => None,
        }
    }

    fn connect(
        &self,
        ty: SockType,
        addr: Addr,
        bind_port: Option<Port>,
    ) -> io::Result<Box<dyn Conn>> {
        let local = bind_port.map(|port| Addr::new(Cid::ANY, port));
        let socket = match ty {
            SockType::Stream => {
                let socket = VsockSocket::<Stream>::new()?;
                if let Some(local) = local {
                    socket.bind(local)?;
                }
                Kind::Stream(socket.connect(addr)?)
            }
            SockType::Seqpacket => {
                let socket = VsockSocket::<Seqpacket>::new()?;
                if let Some(local) = local {
                    socket.bind(local)?;
                }
                Kind::Seqpacket(socket.connect(addr)?)
            }
        };
        Ok(Box::new(KernelConn::new(socket)))
    }

    fn listen(&self, ty: SockType, addr: Addr, backlog: u32) -> io::Result<Box<dyn Listener>> {
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        Ok(match ty {
            SockType::Stream => {
                let socket = VsockSocket::<Stream>::new()?;
                socket.bind(addr)?;
                Box::new(KernelListener::Stream(socket.listen(backlog)?))
            }
            SockType::Seqpacket => {
                let socket = VsockSocket::<Seqpacket>::new()?;
                socket.bind(addr)?;
                Box::new(KernelListener::Seqpacket(socket.listen(backlog)?))
            }
        })
    }

    fn bind_only(&self, ty: SockType, addr: Addr) -> io::Result<Box<dyn Send>> {
        Ok(match ty {
            SockType::Stream => {
                let socket = VsockSocket::<Stream>::new()?;
                socket.bind(addr)?;
                Box::new(socket)
            }
            SockType::Seqpacket => {
                let socket = VsockSocket::<Seqpacket>::new()?;
                socket.bind(addr)?;
                Box::new(socket)
            }
        })
    }
}

enum KernelListener {
    Stream(VsockListener),
    Seqpacket(VsockSeqpacketListener),
}

impl Listener for KernelListener {
    fn accept(&self, timeout: Duration) -> io::Result<(Box<dyn Conn>, Addr)> {
        let fd = match self {
            KernelListener::Stream(l) => l.as_fd(),
            KernelListener::Seqpacket(l) => l.as_fd(),
        };
        if poll_fd(fd, PollFlags::IN, timeout)?.is_empty() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let (socket, peer) = match self {
            KernelListener::Stream(l) => l.accept().map(|(c, a)| (Kind::Stream(c), a))?,
            KernelListener::Seqpacket(l) => l.accept().map(|(c, a)| (Kind::Seqpacket(c), a))?,
        };
        Ok((Box::new(KernelConn::new(socket)), peer))
    }
}

/// `poll(2)` of one descriptor, retried on EINTR; the events that came (empty on timeout).
fn poll_fd(fd: BorrowedFd<'_>, events: PollFlags, timeout: Duration) -> io::Result<PollFlags> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let spec = Timespec::try_from(left).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut fds = [PollFd::new(&fd, events)];
        match rustix::event::poll(&mut fds, Some(&spec)) {
            Ok(_) => return Ok(fds[0].revents()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

family_conn!(KernelConn, VsockStream, VsockSeqpacket);

impl KernelConn {
    fn fd(&self) -> BorrowedFd<'_> {
        either!(self, s => s.as_fd())
    }
}

impl Conn for KernelConn {
    forward_conn_methods!();

    fn send_zerocopy(&self, bufs: Vec<ZcBuf>) -> io::Result<usize> {
        either!(self, s => s.send_zerocopy_vectored(bufs))
    }

    fn wait_remote_close(&self, timeout: Duration) -> io::Result<bool> {
        let events = poll_fd(self.fd(), PollFlags::RDHUP | PollFlags::HUP, timeout)?;
        Ok(events.intersects(PollFlags::RDHUP | PollFlags::HUP))
    }

    fn unsent_bytes(&self) -> io::Result<usize> {
        either!(self, s => s.unsent_bytes())
    }

    fn unread_bytes(&self) -> io::Result<usize> {
        let n = rustix::io::ioctl_fionread(self.fd())?;
        usize::try_from(n).map_err(|_| io::ErrorKind::InvalidData.into())
    }

    fn uring_sendmsg(&self, bufs: Vec<ZcBuf>) -> io::Result<(usize, bool)> {
        let mut ring = UringZerocopy::new()?;
        let (report, _bufs) = either!(self, s => ring.sendmsg_zc(s, bufs))?;
        Ok((report.sent, report.copied))
    }
}
