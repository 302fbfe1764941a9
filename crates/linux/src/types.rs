//! The public socket types, shaped like the `zerovsock` crate's loopback sockets.

use std::io::{self, IoSlice, Read, Write};
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use zerovsock_proto::{Completion, Readiness};
use zerovsock_wire::{Addr, Cid, Port, SocketType};

use crate::socket::Inner;
use crate::sys;
use crate::zerocopy::Owner;
use zerovsock_proto::{Interest, RecvMeta};

mod sealed {
    pub trait Sealed {}
}

/// A socket type: [`Stream`] or [`Seqpacket`].
pub trait Kind: sealed::Sealed {
    /// The socket type.
    const TYPE: SocketType;
    /// What `connect` and `accept` give.
    type Connected: From<Inner>;
    /// What `listen` gives.
    type Listener: From<Inner>;
}

/// SOCK_STREAM.
#[derive(Debug)]
pub enum Stream {}
/// SOCK_SEQPACKET.
#[derive(Debug)]
pub enum Seqpacket {}
impl sealed::Sealed for Stream {}
impl sealed::Sealed for Seqpacket {}

impl Kind for Stream {
    const TYPE: SocketType = SocketType::Stream;
    type Connected = VsockStream;
    type Listener = VsockListener;
}

impl Kind for Seqpacket {
    const TYPE: SocketType = SocketType::Seqpacket;
    type Connected = VsockSeqpacket;
    type Listener = VsockSeqpacketListener;
}

/// A buffer handed to the kernel for a zerocopy send, kept alive by the library until the
/// kernel reports it done.
fn owned<B: AsRef<[u8]> + Send + Sync + 'static>(buffers: Vec<B>) -> (Vec<Arc<B>>, Vec<Owner>) {
    let shared: Vec<Arc<B>> = buffers.into_iter().map(Arc::new).collect();
    let owners = shared.iter().map(|b| Box::new(b.clone()) as Owner).collect();
    (shared, owners)
}

macro_rules! common_options {
    () => {
        /// SO_VM_SOCKETS_BUFFER_SIZE (clamped by the kernel into `[min, max]`).
        pub fn set_buffer_size(&self, size: u64) -> io::Result<()> {
            self.inner.set_vsock_u64(sys::SO_VM_SOCKETS_BUFFER_SIZE, size)
        }

        /// SO_VM_SOCKETS_BUFFER_MIN_SIZE.
        pub fn set_buffer_min_size(&self, size: u64) -> io::Result<()> {
            self.inner.set_vsock_u64(sys::SO_VM_SOCKETS_BUFFER_MIN_SIZE, size)
        }

        /// SO_VM_SOCKETS_BUFFER_MAX_SIZE.
        pub fn set_buffer_max_size(&self, size: u64) -> io::Result<()> {
            self.inner.set_vsock_u64(sys::SO_VM_SOCKETS_BUFFER_MAX_SIZE, size)
        }

        /// Raises the maximum, then sets the size (vsock_perf's `--vsk-size`).
        pub fn set_buffer_size_unclamped(&self, size: u64) -> io::Result<()> {
            self.set_buffer_max_size(size)?;
            self.set_buffer_size(size)
        }

        /// SO_VM_SOCKETS_BUFFER_SIZE in force.
        pub fn buffer_size(&self) -> io::Result<u64> {
            self.inner.vsock_u64(sys::SO_VM_SOCKETS_BUFFER_SIZE)
        }

        /// SO_VM_SOCKETS_BUFFER_MIN_SIZE.
        pub fn buffer_min_size(&self) -> io::Result<u64> {
            self.inner.vsock_u64(sys::SO_VM_SOCKETS_BUFFER_MIN_SIZE)
        }

        /// SO_VM_SOCKETS_BUFFER_MAX_SIZE.
        pub fn buffer_max_size(&self) -> io::Result<u64> {
            self.inner.vsock_u64(sys::SO_VM_SOCKETS_BUFFER_MAX_SIZE)
        }

        /// The local address.
        pub fn local_addr(&self) -> io::Result<Addr> {
            sys::local_addr(self.inner.fd())
        }

        /// Sets `O_NONBLOCK`.
        pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
            self.inner.set_nonblocking(nonblocking)
        }
    };
}

/// A socket not yet connected or listening, for options that must come first (SO_ZEROCOPY
/// before connect gives EOPNOTSUPP at connect on a transport without zerocopy, as Linux does).
#[derive(Debug)]
pub struct VsockSocket<K: Kind> {
    inner: Inner,
    kind: PhantomData<K>,
}

impl VsockSocket<Stream> {
    /// A new STREAM socket.
    pub fn stream() -> io::Result<VsockSocket<Stream>> {
        VsockSocket::new()
    }
}

impl VsockSocket<Seqpacket> {
    /// A new SEQPACKET socket.
    pub fn seqpacket() -> io::Result<VsockSocket<Seqpacket>> {
        VsockSocket::new()
    }
}

impl<K: Kind> VsockSocket<K> {
    /// A new socket of kind `K`.
    pub fn new() -> io::Result<VsockSocket<K>> {
        Ok(VsockSocket { inner: Inner::open(K::TYPE)?, kind: PhantomData })
    }

    /// `bind(2)`.
    pub fn bind(&self, addr: Addr) -> io::Result<()> {
        sys::bind(self.inner.fd(), addr)
    }

    /// SO_ZEROCOPY.
    pub fn set_zerocopy(&self, enabled: bool) -> io::Result<()> {
        self.inner.set_zerocopy(enabled)
    }

    /// SO_VM_SOCKETS_CONNECT_TIMEOUT.
    pub fn set_connect_timeout(&self, timeout: Duration) -> io::Result<()> {
        sys::set_option(
            self.inner.fd(),
            libc::AF_VSOCK,
            sys::SO_VM_SOCKETS_CONNECT_TIMEOUT,
            sys::timeval(Some(timeout)),
        )
    }

    common_options!();

    /// `connect(2)`.
    pub fn connect(self, addr: Addr) -> io::Result<K::Connected> {
        sys::connect(self.inner.fd(), addr)?;
        Ok(K::Connected::from(self.inner))
    }

    /// `listen(2)`; binds to any free port first if unbound.
    pub fn listen(self, backlog: i32) -> io::Result<K::Listener> {
        if sys::local_addr(self.inner.fd()).map_or(true, |a| a.port == Port::ANY) {
            sys::bind(self.inner.fd(), Addr::new(Cid::ANY, Port::ANY))?;
        }
        sys::listen(self.inner.fd(), backlog)?;
        Ok(K::Listener::from(self.inner))
    }
}

/// A public socket type over [`Inner`], with its conversions.
macro_rules! socket_type {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        ///
        /// [`AsFd`] lends the descriptor for polling, plain reads and writes and other options;
        /// its implementation says what must not go through it.
        #[derive(Debug)]
        pub struct $name {
            inner: Inner,
        }

        impl From<Inner> for $name {
            fn from(inner: Inner) -> $name {
                $name { inner }
            }
        }

        /// The socket's descriptor. The library mirrors the kernel's zerocopy completion ids,
        /// and only sees the sends and SO_ZEROCOPY changes made through its own methods. Setting
        /// SO_ZEROCOPY or sending with MSG_ZEROCOPY through this descriptor makes the kernel
        /// take ids the mirror never recorded (or skip ones it did): a later completion can then
        /// release a buffer of `send_zerocopy` while the kernel still reads it, and the peer
        /// receives whatever that memory holds by then. Plain sends and reads, `poll`, and other
        /// options are fine.
        impl AsFd for $name {
            fn as_fd(&self) -> BorrowedFd<'_> {
                self.inner.fd()
            }
        }
    };
}

macro_rules! listener {
    ($name:ident, $kind:ident, $conn:ident, $doc:literal) => {
        socket_type!($name, $doc);

        impl $name {
            /// Binds to `addr` and listens with a backlog of 128.
            pub fn bind(addr: Addr) -> io::Result<$name> {
                let socket = VsockSocket::<$kind>::new()?;
                socket.bind(addr)?;
                socket.listen(128)
            }

            /// `accept(2)`.
            pub fn accept(&self) -> io::Result<($conn, Addr)> {
                let (inner, peer) = self.inner.accept()?;
                Ok(($conn::from(inner), peer))
            }

            /// An endless iterator over accepted connections.
            pub fn incoming(&self) -> impl Iterator<Item = io::Result<$conn>> + '_ {
                std::iter::repeat_with(move || self.accept().map(|(conn, _)| conn))
            }

            common_options!();
        }
    };
}

listener!(VsockListener, Stream, VsockStream, "A kernel STREAM listener.");
listener!(VsockSeqpacketListener, Seqpacket, VsockSeqpacket, "A kernel SEQPACKET listener.");

macro_rules! connected {
    ($name:ident, $kind:ident, $doc:literal) => {
        socket_type!($name, $doc);

        impl $name {
            /// Connects to `addr` (the kernel's connect timeout applies, 2 s by default).
            pub fn connect(addr: Addr) -> io::Result<$name> {
                VsockSocket::<$kind>::new()?.connect(addr)
            }

            /// Connects, waiting at most `timeout`.
            pub fn connect_timeout(addr: Addr, timeout: Duration) -> io::Result<$name> {
                let socket = VsockSocket::<$kind>::new()?;
                socket.set_connect_timeout(timeout)?;
                socket.connect(addr)
            }

            /// The peer's address.
            pub fn peer_addr(&self) -> io::Result<Addr> {
                sys::peer_addr(self.inner.fd())
            }

            /// `shutdown(2)`.
            pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
                sys::shutdown(self.inner.fd(), how)
            }

            /// SO_RCVTIMEO.
            pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                self.inner.set_timeout(libc::SO_RCVTIMEO, timeout)
            }

            /// SO_RCVTIMEO.
            pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
                self.inner.timeout(libc::SO_RCVTIMEO)
            }

            /// SO_SNDTIMEO.
            pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                self.inner.set_timeout(libc::SO_SNDTIMEO, timeout)
            }

            /// SO_SNDTIMEO.
            pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
                self.inner.timeout(libc::SO_SNDTIMEO)
            }

            /// SO_RCVLOWAT.
            pub fn set_rcvlowat(&self, bytes: u32) -> io::Result<()> {
                let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
                sys::set_option(self.inner.fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, value)
            }

            /// SO_RCVLOWAT.
            pub fn rcvlowat(&self) -> io::Result<u32> {
                let value: libc::c_int =
                    sys::option(self.inner.fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT)?;
                Ok(u32::try_from(value).unwrap_or(0))
            }

            /// SO_ZEROCOPY. EOPNOTSUPP where the transport has no zerocopy, and on accepted
            /// sockets of kernels 6.7 until the 2026 fix.
            pub fn set_zerocopy(&self, enabled: bool) -> io::Result<()> {
                self.inner.set_zerocopy(enabled)
            }

            /// SO_ZEROCOPY, read from the kernel.
            pub fn zerocopy(&self) -> io::Result<bool> {
                self.inner.zerocopy()
            }

            /// Sends `buf` with MSG_ZEROCOPY, taking ownership: the library keeps it until the
            /// kernel's completion says its pages are no longer read. Without SO_ZEROCOPY the
            /// kernel copies, no completion comes, and the buffer is dropped at once.
            pub fn send_zerocopy<B: AsRef<[u8]> + Send + Sync + 'static>(
                &self,
                buf: B,
            ) -> io::Result<usize> {
                self.send_zerocopy_vectored(vec![buf])
            }

            /// [`Self::send_zerocopy`] of several buffers as one message (an iovec).
            pub fn send_zerocopy_vectored<B: AsRef<[u8]> + Send + Sync + 'static>(
                &self,
                bufs: Vec<B>,
            ) -> io::Result<usize> {
                let (shared, owners) = owned(bufs);
                let slices: Vec<&[u8]> = shared.iter().map(|b| (**b).as_ref()).collect();
                self.inner.send_zerocopy(&slices, owners)
            }

            /// Like [`Self::send_zerocopy`], but falls back to a plain copying send when the
            /// kernel refuses zerocopy (EOPNOTSUPP, or ENOMEM from the notification budget).
            /// Returns the bytes sent and whether the fallback was taken.
            pub fn send_zerocopy_or_copy<B: AsRef<[u8]> + Send + Sync + 'static>(
                &self,
                buf: B,
            ) -> io::Result<(usize, bool)> {
                let bytes: Arc<B> = Arc::new(buf);
                let owner: Owner = Box::new(bytes.clone());
                match self.inner.send_zerocopy(&[(*bytes).as_ref()], vec![owner]) {
                    Ok(sent) => Ok((sent, false)),
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EOPNOTSUPP) | Some(libc::ENOMEM)
                        ) =>
                    {
                        sys::send(self.inner.fd(), (*bytes).as_ref(), 0).map(|sent| (sent, true))
                    }
                    Err(e) => Err(e),
                }
            }

            /// MSG_ZEROCOPY send of memory the caller manages.
            ///
            /// # Safety
            /// Every `(address, length)` range must stay mapped and unchanged until a
            /// completion covers this send's id ([`Self::next_completion_id`] before the call).
            /// An unmapped range is reported by the kernel (ENOMEM) without being read.
            #[allow(unsafe_code)]
            pub unsafe fn send_zerocopy_raw(
                &self,
                ranges: &[(*const u8, usize)],
            ) -> io::Result<usize> {
                // SAFETY: this function's contract is `ZerocopyRanges::new`'s, passed on as is.
                let ranges = unsafe { sys::ZerocopyRanges::new(ranges) };
                self.inner.send_zerocopy_raw(ranges)
            }

            /// The oldest zerocopy completion (`recvmsg(MSG_ERRQUEUE)`); `WouldBlock` when
            /// none is queued.
            pub fn recv_completion(&self) -> io::Result<Completion> {
                self.inner.recv_completion()
            }

            /// The id the next zerocopy send pass takes (the library's mirror of the kernel's).
            pub fn next_completion_id(&self) -> u32 {
                self.inner.next_completion_id()
            }

            /// Buffers of zerocopy sends still held for the kernel.
            pub fn pinned_buffers(&self) -> usize {
                self.inner.pinned_buffers()
            }

            /// Waits up to `timeout` for every zerocopy buffer to be released; returns whether
            /// they all were.
            pub fn drain_zerocopy(&self, timeout: Duration) -> io::Result<bool> {
                self.inner.drain(timeout)
            }

            /// How long dropping the socket waits for outstanding completions before leaking
            /// the buffers they pin (default 2 s).
            pub fn set_zerocopy_linger(&self, linger: Duration) {
                self.inner.set_linger(linger)
            }

            /// What `poll` reports now; `error` is POLLERR (completions pending).
            pub fn readiness(&self) -> io::Result<Readiness> {
                self.inner.readiness()
            }

            /// `poll(2)` for `interest` (POLLERR and POLLHUP always), up to `timeout`.
            pub fn poll(
                &self,
                interest: Interest,
                timeout: Option<Duration>,
            ) -> io::Result<Readiness> {
                self.inner.poll(interest, timeout)
            }

            /// Unsent bytes (SIOCOUTQ).
            pub fn unsent_bytes(&self) -> io::Result<usize> {
                Ok(sys::ioctl_int(self.inner.fd(), libc::TIOCOUTQ)?.max(0) as usize)
            }

            common_options!();
        }
    };
}

connected!(VsockStream, Stream, "A connected kernel STREAM socket.");
connected!(VsockSeqpacket, Seqpacket, "A connected kernel SEQPACKET socket.");

impl VsockStream {
    /// Reads without consuming (MSG_PEEK).
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv(self.inner.fd(), buf, libc::MSG_PEEK).map(|(n, _)| n)
    }
}

impl Read for &VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv(self.inner.fd(), buf, 0).map(|(n, _)| n)
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for &VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.inner.fd(), buf, 0)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let slices: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
        sys::sendmsg(self.inner.fd(), &slices, 0)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a `recvmsg` with MSG_TRUNC into `room` bytes returned: `n` (the whole message) and
/// `msg_flags`.
fn meta(room: usize, n: usize, flags: i32) -> RecvMeta {
    RecvMeta {
        len: n.min(room),
        message_len: n,
        eor: flags & libc::MSG_EOR != 0,
        truncated: flags & libc::MSG_TRUNC != 0,
    }
}

impl VsockSeqpacket {
    /// Sends one message.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.inner.fd(), buf, 0)
    }

    /// Sends one message with MSG_EOR.
    pub fn send_eor(&self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.inner.fd(), buf, libc::MSG_EOR)
    }

    /// Receives one message (MSG_TRUNC reports its full length).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<RecvMeta> {
        let (n, flags) = sys::recv(self.inner.fd(), buf, libc::MSG_TRUNC)?;
        Ok(meta(buf.len(), n, flags))
    }

    /// Looks at the next message without consuming it.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<RecvMeta> {
        let (n, flags) = sys::recv(self.inner.fd(), buf, libc::MSG_PEEK | libc::MSG_TRUNC)?;
        Ok(meta(buf.len(), n, flags))
    }
}
