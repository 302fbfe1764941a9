//! The public socket types: an unconnected [`VsockSocket`] for options before connect or
//! listen, listeners, and connected STREAM and SEQPACKET sockets.

use std::io::{self, IoSlice, Read, Write};
use std::marker::PhantomData;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use zerovsock_proto::{Completion, Payload, Readiness};
use zerovsock_wire::{Addr, SocketType};

use crate::socket::{payload_of, Inner, Source};
use crate::Vsock;
use zerovsock_proto::{Interest, RecvMeta};

mod sealed {
    pub trait Sealed {}
}

/// A socket type: [`Stream`] or [`Seqpacket`].
pub trait Kind: sealed::Sealed {
    /// The virtio socket type.
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

/// A socket not yet connected or listening: set options first, then [`VsockSocket::connect`] or
/// [`VsockSocket::listen`]. Options set on a listener are inherited by accepted connections,
/// except SO_ZEROCOPY (as in Linux).
#[derive(Debug)]
pub struct VsockSocket<K: Kind> {
    inner: Inner,
    kind: PhantomData<K>,
}

impl VsockSocket<Stream> {
    /// A new STREAM socket.
    pub fn stream(vsock: &Vsock) -> io::Result<VsockSocket<Stream>> {
        VsockSocket::new(vsock)
    }
}

impl VsockSocket<Seqpacket> {
    /// A new SEQPACKET socket.
    pub fn seqpacket(vsock: &Vsock) -> io::Result<VsockSocket<Seqpacket>> {
        VsockSocket::new(vsock)
    }
}

macro_rules! buffer_options {
    () => {
        /// SO_VM_SOCKETS_BUFFER_SIZE: the receive buffer advertised to the peer. Clamped into
        /// `[min, max]`; returns the value in force.
        pub fn set_buffer_size(&self, size: u64) -> io::Result<u64> {
            self.inner.set_buffer_size(size)
        }

        /// SO_VM_SOCKETS_BUFFER_MIN_SIZE.
        pub fn set_buffer_min_size(&self, size: u64) -> io::Result<u64> {
            self.inner.set_buffer_min_size(size)
        }

        /// SO_VM_SOCKETS_BUFFER_MAX_SIZE (raise it first to go past 256 KiB).
        pub fn set_buffer_max_size(&self, size: u64) -> io::Result<u64> {
            self.inner.set_buffer_max_size(size)
        }

        /// Raises the maximum and sets the size in one step, as vsock_perf's `--vsk-size` does.
        pub fn set_buffer_size_unclamped(&self, size: u64) -> io::Result<u64> {
            self.inner.set_buffer_max_size(size)?;
            self.inner.set_buffer_size(size)
        }

        /// The receive buffer size in force.
        pub fn buffer_size(&self) -> io::Result<u64> {
            self.inner.buffer_sizes().map(|(size, _, _)| size)
        }

        /// SO_VM_SOCKETS_BUFFER_MIN_SIZE.
        pub fn buffer_min_size(&self) -> io::Result<u64> {
            self.inner.buffer_sizes().map(|(_, min, _)| min)
        }

        /// SO_VM_SOCKETS_BUFFER_MAX_SIZE.
        pub fn buffer_max_size(&self) -> io::Result<u64> {
            self.inner.buffer_sizes().map(|(_, _, max)| max)
        }

        /// The local address.
        pub fn local_addr(&self) -> io::Result<Addr> {
            self.inner.local_addr()
        }

        /// Sets non-blocking mode: calls that would wait fail with `WouldBlock` instead.
        pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
            self.inner.set_nonblocking(nonblocking);
            Ok(())
        }
    };
}

impl<K: Kind> VsockSocket<K> {
    /// A new socket of kind `K`.
    pub fn new(vsock: &Vsock) -> io::Result<VsockSocket<K>> {
        Ok(VsockSocket { inner: Inner::open(vsock.shared(), K::TYPE)?, kind: PhantomData })
    }

    /// Binds to a local address ([`zerovsock_wire::Cid::ANY`] and [`zerovsock_wire::Port::ANY`]
    /// are wildcards). Returns the address bound.
    pub fn bind(&self, addr: Addr) -> io::Result<Addr> {
        self.inner.bind(addr)
    }

    /// SO_ZEROCOPY. On a transport without zerocopy it is accepted here and refused by
    /// `connect` with EOPNOTSUPP, as Linux does.
    pub fn set_zerocopy(&self, enabled: bool) -> io::Result<()> {
        self.inner.set_zerocopy(enabled)
    }

    /// SO_VM_SOCKETS_CONNECT_TIMEOUT (default 2 s).
    pub fn set_connect_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.inner.set_connect_timeout(timeout)
    }

    buffer_options!();

    /// Connects to `addr`, waiting for the answer up to the connect timeout.
    pub fn connect(self, addr: Addr) -> io::Result<K::Connected> {
        self.inner.connect(addr, None)?;
        Ok(K::Connected::from(self.inner))
    }

    /// Starts listening; binds to any free port first if unbound.
    pub fn listen(self, backlog: u32) -> io::Result<K::Listener> {
        if self.inner.local_addr().is_err() {
            self.inner.bind(Addr::new(zerovsock_wire::Cid::ANY, zerovsock_wire::Port::ANY))?;
        }
        self.inner.listen(backlog)?;
        Ok(K::Listener::from(self.inner))
    }
}

macro_rules! listener {
    ($name:ident, $kind:ident, $conn:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug)]
        pub struct $name {
            inner: Inner,
        }

        impl From<Inner> for $name {
            fn from(inner: Inner) -> $name {
                $name { inner }
            }
        }

        impl $name {
            /// Binds to `addr` and listens with a backlog of 128.
            pub fn bind(vsock: &Vsock, addr: Addr) -> io::Result<$name> {
                let socket = VsockSocket::<$kind>::new(vsock)?;
                socket.bind(addr)?;
                socket.listen(128)
            }

            /// Waits for a connection (or fails with `WouldBlock` when non-blocking).
            pub fn accept(&self) -> io::Result<($conn, Addr)> {
                let conn = $conn::from(self.inner.accept()?);
                let peer = conn.peer_addr()?;
                Ok((conn, peer))
            }

            /// Waits for a connection without blocking the thread.
            pub async fn accept_async(&self) -> io::Result<($conn, Addr)> {
                std::future::poll_fn(|cx| self.poll_accept(cx)).await
            }

            /// The poll form of [`Self::accept_async`], for hand-written futures.
            pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<($conn, Addr)>> {
                self.inner.poll_accept(cx).map(|inner| {
                    let conn = $conn::from(inner?);
                    let peer = conn.peer_addr()?;
                    Ok((conn, peer))
                })
            }

            /// An endless iterator over accepted connections.
            pub fn incoming(&self) -> impl Iterator<Item = io::Result<$conn>> + '_ {
                std::iter::repeat_with(move || self.accept().map(|(conn, _)| conn))
            }

            /// What `poll` would report (readable: a connection is waiting).
            pub fn readiness(&self) -> Readiness {
                self.inner.readiness()
            }

            buffer_options!();
        }
    };
}

listener!(VsockListener, Stream, VsockStream, "A STREAM listener, like `std::net::TcpListener`.");
listener!(VsockSeqpacketListener, Seqpacket, VsockSeqpacket, "A SEQPACKET listener.");

macro_rules! connected {
    ($name:ident, $kind:ident) => {
        impl From<Inner> for $name {
            fn from(inner: Inner) -> $name {
                $name { inner }
            }
        }

        impl $name {
            /// Connects to `addr` with default options.
            pub fn connect(vsock: &Vsock, addr: Addr) -> io::Result<$name> {
                VsockSocket::<$kind>::new(vsock)?.connect(addr)
            }

            /// Connects to `addr`, waiting at most `timeout` for the answer (ETIMEDOUT after).
            pub fn connect_timeout(
                vsock: &Vsock,
                addr: Addr,
                timeout: Duration,
            ) -> io::Result<$name> {
                let socket = VsockSocket::<$kind>::new(vsock)?;
                socket.inner.connect(addr, Some(timeout))?;
                Ok($name::from(socket.inner))
            }

            /// Connects without blocking the thread (the connect timeout still applies).
            pub async fn connect_async(vsock: &Vsock, addr: Addr) -> io::Result<$name> {
                let socket = VsockSocket::<$kind>::new(vsock)?;
                socket.inner.start_connect(addr, None)?;
                std::future::poll_fn(|cx| socket.inner.poll_connected(cx)).await?;
                Ok($name::from(socket.inner))
            }

            /// [`Self::send_zerocopy`] without blocking the thread. A STREAM send completes with
            /// what the credit took (at least one byte); a SEQPACKET message waits until it fits.
            pub async fn send_zerocopy_async(&self, buf: impl Into<Bytes>) -> io::Result<usize> {
                let payload = payload_of([buf.into()]);
                let source = Source::Shared(&payload);
                std::future::poll_fn(|cx| self.inner.poll_send(cx, &source, true, false)).await
            }

            /// Waits for the next zerocopy completion without blocking the thread.
            pub async fn completion(&self) -> io::Result<Completion> {
                std::future::poll_fn(|cx| self.poll_completion(cx)).await
            }

            /// The poll form of [`Self::completion`].
            pub fn poll_completion(&self, cx: &mut Context<'_>) -> Poll<io::Result<Completion>> {
                self.inner.poll_completion(cx)
            }

            /// The peer's address.
            pub fn peer_addr(&self) -> io::Result<Addr> {
                self.inner.peer_addr()
            }

            /// Shuts down reading, writing or both; the peer is told with SHUTDOWN.
            pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
                self.inner.shutdown(how)
            }

            /// SO_RCVTIMEO. `None` waits forever; an expired wait fails with `WouldBlock`.
            pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                self.inner.set_read_timeout(timeout)
            }

            /// SO_RCVTIMEO.
            pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
                Ok(self.inner.read_timeout())
            }

            /// SO_SNDTIMEO.
            pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                self.inner.set_write_timeout(timeout)
            }

            /// SO_SNDTIMEO.
            pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
                Ok(self.inner.write_timeout())
            }

            /// SO_RCVLOWAT: reads wake once this many bytes are queued.
            pub fn set_rcvlowat(&self, bytes: u32) -> io::Result<()> {
                self.inner.set_rcvlowat(bytes)
            }

            /// SO_RCVLOWAT.
            pub fn rcvlowat(&self) -> io::Result<u32> {
                self.inner.rcvlowat()
            }

            /// SO_ZEROCOPY: without it, zerocopy sends are plain copies with no completion.
            pub fn set_zerocopy(&self, enabled: bool) -> io::Result<()> {
                self.inner.set_zerocopy(enabled)
            }

            /// SO_ZEROCOPY.
            pub fn zerocopy(&self) -> io::Result<bool> {
                self.inner.zerocopy()
            }

            /// Sends `buf` with MSG_ZEROCOPY, taking ownership: the transport holds the buffer
            /// until the send's completion ([`Self::recv_completion`]). Returns the bytes sent.
            pub fn send_zerocopy(&self, buf: impl Into<Bytes>) -> io::Result<usize> {
                let payload = payload_of([buf.into()]);
                self.inner.send(Source::Shared(&payload), true, false)
            }

            /// [`Self::send_zerocopy`] over several buffers sent as one message (an iovec).
            pub fn send_zerocopy_vectored(
                &self,
                bufs: impl IntoIterator<Item = Bytes>,
            ) -> io::Result<usize> {
                let payload = payload_of(bufs);
                self.inner.send(Source::Shared(&payload), true, false)
            }

            /// Takes the oldest zerocopy completion (`recvmsg(MSG_ERRQUEUE)`); `WouldBlock` when
            /// none is queued. Never waits: wait with [`Self::poll`] and [`Interest::NONE`].
            pub fn recv_completion(&self) -> io::Result<Completion> {
                self.inner.recv_completion()
            }

            /// The id the next zerocopy send pass will take.
            pub fn next_completion_id(&self) -> u32 {
                self.inner.next_completion_id()
            }

            /// What `poll` would report now; `error` means completions (or an error) are pending.
            pub fn readiness(&self) -> Readiness {
                self.inner.readiness()
            }

            /// Waits up to `timeout` for `interest`, a pending completion, an error or a
            /// hang-up, like `poll(2)`. Returns empty readiness on timeout.
            pub fn poll(
                &self,
                interest: Interest,
                timeout: Option<Duration>,
            ) -> io::Result<Readiness> {
                self.inner.wait_readiness(interest, timeout)
            }

            /// Unread bytes queued (SIOCINQ).
            pub fn unread_bytes(&self) -> usize {
                self.inner.unread_bytes()
            }

            /// Bytes sent that the transport has not yet handed on (SIOCOUTQ): on a device,
            /// data still waiting for the guest's RX buffers; on loopback always 0 once a send
            /// returns, since delivery is immediate.
            pub fn unsent_bytes(&self) -> usize {
                self.inner.unsent_bytes()
            }

            buffer_options!();
        }
    };
}

/// A connected STREAM socket, like `std::net::TcpStream`.
#[derive(Debug)]
pub struct VsockStream {
    inner: Inner,
}

connected!(VsockStream, Stream);

impl VsockListener {
    /// Listens on every port no other socket on `vsock` is bound to, answering nobody until
    /// told: an accepted connection has not been answered yet; [`VsockStream::confirm`]
    /// answers it, and dropping it unconfirmed refuses it (the peer's connect fails with
    /// ECONNRESET, as if nobody listened). For a proxy that must reach its own endpoint first,
    /// such as a device's Unix-socket bridge. At most `backlog` + 1 connections wait.
    pub fn bind_unclaimed(vsock: &Vsock, backlog: u32) -> io::Result<VsockListener> {
        let inner = Inner::open(vsock.shared(), SocketType::Stream)?;
        inner.listen_unclaimed(backlog)?;
        Ok(VsockListener::from(inner))
    }
}

impl VsockStream {
    /// Answers a connection accepted from [`VsockListener::bind_unclaimed`]; ECONNRESET if the
    /// peer gave up meanwhile or it was answered already.
    pub fn confirm(&self) -> io::Result<()> {
        self.inner.confirm()
    }

    /// Reads without consuming (MSG_PEEK).
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.recv(buf, true).map(|meta| meta.len)
    }

    /// Reads without blocking the thread; 0 is end of stream.
    pub async fn read_async(&self, buf: &mut [u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read(cx, buf)).await
    }

    /// Writes what the credit takes now (at least one byte) without blocking the thread.
    pub async fn write_async(&self, buf: &[u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_write(cx, buf)).await
    }

    /// Writes all of `buf` without blocking the thread.
    pub async fn write_all_async(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write_async(buf).await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// The poll form of [`Self::read_async`] (the shape of `AsyncRead::poll_read`).
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, buf, false).map_ok(|meta| meta.len)
    }

    /// The poll form of [`Self::write_async`] (the shape of `AsyncWrite::poll_write`).
    pub fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.inner.poll_send(cx, &Source::Borrowed(buf), false, false)
    }

    /// Reads without copying: once data is queued, lends up to `max` bytes to `consume` as a
    /// [`Payload`] (the receive queue's own buffers: the sender's memory on loopback, guest
    /// memory on a device) and consumes the bytes `consume` reports taking; the rest stay
    /// queued. `Ready(Ok(0))` is end of stream. This is how a bridge `writev`s received data
    /// straight into another file descriptor. `consume` runs without the engine lock.
    pub fn poll_read_with(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        consume: impl FnOnce(&Payload) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv_with(cx, max, consume)
    }

    /// Writes in place, for a transport that owns the memory the peer reads from (a device
    /// that `readv`s a host socket straight into guest RX buffers, with no copy in between):
    /// once the peer has credit, `place(room)` writes up to `room` bytes of stream data there
    /// (`room` is at most `max` and at most one 64 KiB packet) and returns how many it wrote.
    /// The header of the RW packet that carries them comes back for the caller to put in
    /// front of them; the caller delivers it before any packet its transport is given after
    /// this returns, so the peer sees `fwd_cnt` in order. `place` runs under the stack's lock
    /// (nothing is transmitted meanwhile) and must neither block nor call into the stack; an
    /// error from it gives the credit back. `Ready(Ok(None))`: `place` wrote nothing.
    /// STREAM only.
    pub fn poll_send_in_place(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        place: impl FnOnce(usize) -> io::Result<usize>,
    ) -> Poll<io::Result<Option<crate::wire::Repr>>> {
        self.inner.poll_send_placed(cx, max, place)
    }
}

impl Read for &VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.recv(buf, false).map(|meta| meta.len)
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for &VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.send(Source::Borrowed(buf), false, false)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let payload = payload_of(bufs.iter().map(|b| Bytes::copy_from_slice(b)));
        self.inner.send(Source::Shared(&payload), false, false)
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

/// A connected SEQPACKET socket: every send is one message, every receive returns one.
#[derive(Debug)]
pub struct VsockSeqpacket {
    inner: Inner,
}

connected!(VsockSeqpacket, Seqpacket);

impl VsockSeqpacket {
    /// Sends one message; EMSGSIZE if it exceeds the usable buffer.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.inner.send(Source::Borrowed(buf), false, false)
    }

    /// Sends one message marked with MSG_EOR.
    pub fn send_eor(&self, buf: &[u8]) -> io::Result<usize> {
        self.inner.send(Source::Borrowed(buf), false, true)
    }

    /// Receives one message; bytes past `buf` are discarded and reported as truncation.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<RecvMeta> {
        self.inner.recv(buf, false)
    }

    /// Looks at the next message without consuming it.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<RecvMeta> {
        self.inner.recv(buf, true)
    }

    /// Sends one message without blocking the thread; waits until it fits whole.
    pub async fn send_async(&self, buf: &[u8]) -> io::Result<usize> {
        let source = Source::Borrowed(buf);
        std::future::poll_fn(|cx| self.inner.poll_send(cx, &source, false, false)).await
    }

    /// Receives one message without blocking the thread.
    pub async fn recv_async(&self, buf: &mut [u8]) -> io::Result<RecvMeta> {
        std::future::poll_fn(|cx| self.inner.poll_recv(cx, buf, false)).await
    }
}
