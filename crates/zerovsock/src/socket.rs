//! What every socket type shares: options, blocking and timeouts, the send and receive loops,
//! readiness, and the completion queue. The public types in `types.rs` are thin wrappers over
//! [`Inner`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use zerovsock_proto::{
    AcceptError, Completion, Engine, Interest, Payload, Readiness, RecvError, RecvLease, RecvMeta,
    SendError, SendGrant, SendRequest, SocketId,
};
use zerovsock_wire::{Addr, Repr, ShutdownFlags, SocketType, MAX_PACKET_PAYLOAD};

use crate::core::{Shared, Waiter};
use crate::error;
use crate::pool::BufferPool;
use crate::turn::Turn;

/// The bytes a send takes them from: a borrowed slice is copied; shared buffers may be sent as
/// they are.
pub(crate) enum Source<'a> {
    Borrowed(&'a [u8]),
    Shared(&'a Payload),
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Source::Borrowed(bytes) => bytes.len(),
            Source::Shared(payload) => payload.len(),
        }
    }

    /// Whether byte `offset` starts one of the caller's buffers (`iov_offset == 0`).
    fn starts_segment(&self, offset: usize) -> bool {
        match self {
            Source::Borrowed(_) => offset == 0,
            Source::Shared(payload) => {
                let mut at = 0;
                for segment in payload.segments() {
                    if at >= offset {
                        return at == offset;
                    }
                    at += segment.len();
                }
                at == offset
            }
        }
    }

    /// `len` bytes from `start`, copied into a pooled buffer.
    fn copy(&self, pool: &Arc<BufferPool>, start: usize, len: usize) -> Payload {
        let bytes = pool.filled(len, |buffer| match self {
            Source::Borrowed(bytes) => buffer.extend_from_slice(&bytes[start..start + len]),
            Source::Shared(payload) => payload.slice(start, len).extend_vec(buffer),
        });
        Payload::from_bytes(bytes)
    }

    fn share(&self, pool: &Arc<BufferPool>, start: usize, len: usize) -> Payload {
        match self {
            Source::Borrowed(_) => self.copy(pool, start, len),
            Source::Shared(payload) => payload.slice(start, len),
        }
    }
}

#[doc(hidden)]
pub struct Inner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: SocketId,
    socket_type: SocketType,
    waiter: Arc<Waiter>,
    nonblocking: AtomicBool,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
    /// Serialises sends, and receives, each for threads and tasks alike.
    send_turn: Turn,
    recv_turn: Turn,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").field("id", &self.id).finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let id = self.id;
        self.shared.with(|engine, now| engine.close(now, id));
        self.shared.lock().unregister(id);
    }
}

/// Largest copy-mode pass.
const COPY_PASS: usize = 1024 * 1024;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn check_timeout(timeout: Option<Duration>) -> io::Result<Option<Duration>> {
    if timeout == Some(Duration::ZERO) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot set a 0 duration timeout"));
    }
    Ok(timeout)
}

impl Inner {
    pub(crate) fn open(shared: &Arc<Shared>, socket_type: SocketType) -> io::Result<Inner> {
        let id = shared.with(|engine, _| engine.open(socket_type)).map_err(error::open)?;
        Ok(Inner::adopt(shared, id, socket_type))
    }

    pub(crate) fn adopt(shared: &Arc<Shared>, id: SocketId, socket_type: SocketType) -> Inner {
        let waiter = shared.lock().register(id);
        Inner {
            shared: shared.clone(),
            id,
            socket_type,
            waiter,
            nonblocking: AtomicBool::new(false),
            read_timeout: Mutex::new(None),
            write_timeout: Mutex::new(None),
            send_turn: Turn::default(),
            recv_turn: Turn::default(),
        }
    }

    fn wait<T>(
        &self,
        timeout: Option<Duration>,
        attempt: impl FnMut(&mut zerovsock_proto::Engine, Instant) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.shared.wait(&self.waiter, self.nonblocking(), deadline, attempt)
    }

    pub(crate) fn bind(&self, addr: Addr) -> io::Result<Addr> {
        self.shared.with(|engine, _| engine.bind(self.id, addr)).map_err(error::bind)
    }

    pub(crate) fn listen(&self, backlog: u32) -> io::Result<()> {
        self.shared.with(|engine, _| engine.listen(self.id, backlog)).map_err(error::listen)
    }

    pub(crate) fn listen_unclaimed(&self, backlog: u32) -> io::Result<()> {
        self.shared
            .with(|engine, _| engine.listen_unclaimed(self.id, backlog))
            .map_err(error::listen)
    }

    pub(crate) fn confirm(&self) -> io::Result<()> {
        if self.shared.with(|engine, _| engine.confirm(self.id)) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::ECONNRESET))
        }
    }

    fn try_accept(&self, engine: &mut Engine) -> io::Result<Option<SocketId>> {
        match engine.accept(self.id) {
            Ok(child) => Ok(Some(child)),
            Err(AcceptError::WouldBlock) => Ok(None),
            Err(other) => Err(error::accept(other)),
        }
    }

    pub(crate) fn accept(&self) -> io::Result<Inner> {
        let id = self.wait(None, |engine, _| self.try_accept(engine))?;
        Ok(Inner::adopt(&self.shared, id, self.socket_type))
    }

    /// Sends REQUEST; the outcome is awaited with [`Inner::try_connected`].
    pub(crate) fn start_connect(&self, addr: Addr, timeout: Option<Duration>) -> io::Result<()> {
        if let Some(timeout) = check_timeout(timeout)? {
            self.set_connect_timeout(timeout)?;
        }
        self.shared.with(|engine, now| engine.connect(now, self.id, addr)).map_err(error::connect)
    }

    fn try_connected(&self, engine: &mut Engine) -> io::Result<Option<()>> {
        match engine.connect_result(self.id) {
            Ok(true) => Ok(Some(())),
            Ok(false) => Ok(None),
            Err(failure) => Err(error::connect(failure)),
        }
    }

    /// Connects, waiting up to `timeout` (default: the socket's connect timeout, 2 s).
    pub(crate) fn connect(&self, addr: Addr, timeout: Option<Duration>) -> io::Result<()> {
        self.start_connect(addr, timeout)?;
        // The engine's own timer ends a connect that gets no answer.
        self.shared.wait(&self.waiter, false, None, |engine, _| self.try_connected(engine))
    }

    /// The pass request for the rest of a message.
    fn request(source: &Source<'_>, sent: usize, zerocopy: bool, eor: bool) -> SendRequest {
        // Copy-mode messages go out in passes of a few packets, so the receiver reads the
        // first while the rest is still being copied (Linux hands each skb over as it is
        // filled). Zerocopy passes take all the credit there is, as Linux's do.
        let max_pass = if zerocopy { usize::MAX } else { COPY_PASS };
        SendRequest {
            remaining: source.len() - sent,
            at_segment_start: source.starts_segment(sent),
            zerocopy,
            eor,
            max_pass,
        }
    }

    fn try_pass(&self, engine: &mut Engine, request: SendRequest) -> io::Result<Option<SendGrant>> {
        match engine.begin_send(self.id, request) {
            Ok(grant) => Ok(Some(grant)),
            Err(SendError::WouldBlock) => Ok(None),
            Err(other) => Err(error::send(other)),
        }
    }

    /// Builds the pass's payload (a copy only when the grant says so) and sends it.
    fn finish_pass(&self, grant: SendGrant, source: &Source<'_>, sent: usize) -> io::Result<usize> {
        let len = grant.len();
        let pool = self.shared.pool();
        let payload = if grant.must_copy() {
            source.copy(pool, sent, len)
        } else {
            source.share(pool, sent, len)
        };
        self.shared.with(|engine, _| engine.finish_send(grant, payload)).map_err(error::send)
    }

    /// Sends `source` as one message (the `vsock_connectible_sendmsg` loop): one engine pass per
    /// credit window, waiting for credit in between. Returns the bytes sent. A STREAM send that
    /// stops after some bytes went out (non-blocking mode, a timeout, EPIPE, ENOMEM on a later
    /// zerocopy pass...) returns the bytes written, as Linux does (`out_err`) and
    /// `Write::write` requires; the error recurs on the next call. A SEQPACKET send fails
    /// unless the whole message went out.
    pub(crate) fn send(&self, source: Source<'_>, zerocopy: bool, eor: bool) -> io::Result<usize> {
        let _turn = self.send_turn.take();
        let total = source.len();
        let stream = self.socket_type == SocketType::Stream;
        // SO_SNDTIMEO bounds the whole call, not each wait for credit.
        let deadline = lock(&self.write_timeout).map(|t| Instant::now() + t);
        let mut sent = 0;
        loop {
            let request = Inner::request(&source, sent, zerocopy, eor);
            let pass = self
                .shared
                .wait(&self.waiter, self.nonblocking(), deadline, |engine, _| {
                    self.try_pass(engine, request)
                })
                .and_then(|grant| self.finish_pass(grant, &source, sent));
            match pass {
                Ok(len) => sent += len,
                Err(_) if sent > 0 && stream => return Ok(sent),
                Err(e) => return Err(e),
            }
            if sent == total {
                return Ok(sent);
            }
        }
    }

    fn try_recv(
        &self,
        engine: &mut Engine,
        min: usize,
        max: usize,
    ) -> io::Result<Option<RecvLease>> {
        match engine.recv_at_least(self.id, min, max) {
            Ok(lease) => Ok(Some(lease)),
            Err(RecvError::WouldBlock) => Ok(None),
            Err(other) => Err(error::recv(other)),
        }
    }

    /// Copies a lease out (without the engine lock), then consumes it unless peeking.
    fn finish_recv(&self, lease: RecvLease, buf: &mut [u8], peek: bool) -> RecvMeta {
        let len = lease.copy_to(buf);
        let meta = RecvMeta {
            len,
            message_len: lease.message_len(),
            eor: lease.eor(),
            truncated: lease.truncated(),
        };
        if !peek {
            self.shared.with(|engine, _| engine.commit_recv(self.id, lease));
        }
        meta
    }

    /// Receives into `buf` (one message for SEQPACKET). With `peek`, nothing is consumed.
    ///
    /// A blocking STREAM read gathers data until SO_RCVLOWAT bytes (at most `buf.len()`) are
    /// copied, or the stream ends, fails, or the read timeout passes: then it returns what it
    /// has (`__vsock_stream_recvmsg`). A peek or a SEQPACKET read takes one lease.
    pub(crate) fn recv(&self, buf: &mut [u8], peek: bool) -> io::Result<RecvMeta> {
        let _turn = self.recv_turn.take();
        let deadline = lock(&self.read_timeout).map(|t| Instant::now() + t);
        // The SO_RCVLOWAT target is read under the lock of the first attempt (one engine lock
        // per lease); a peek is refused the same ENOMEM but never gathers.
        let mut target: Option<Option<usize>> = None;
        let mut copied = 0;
        loop {
            let max = buf.len() - copied;
            let lease = self.shared.wait(&self.waiter, self.nonblocking(), deadline, |e, _| {
                if target.is_none() {
                    target = Some(e.recv_target(self.id, max).map_err(error::recv)?);
                }
                self.try_recv(e, 1, max)
            });
            let read = match lease {
                Ok(lease) => self.finish_recv(lease, &mut buf[copied..], peek),
                Err(_) if copied > 0 => break,
                Err(e) => return Err(e),
            };
            let Some(left) = target.flatten().filter(|_| !peek) else { return Ok(read) };
            copied += read.len;
            if read.len == 0 || read.len >= left || copied == buf.len() {
                break;
            }
            target = Some(Some(left - read.len));
        }
        Ok(RecvMeta { len: copied, message_len: copied, eor: false, truncated: false })
    }

    /// Asynchronous accept.
    pub(crate) fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Inner>> {
        self.shared
            .poll_attempt(&self.waiter, cx, |engine, _| self.try_accept(engine))
            .map_ok(|id| Inner::adopt(&self.shared, id, self.socket_type))
    }

    /// Asynchronous wait for a connect started with [`Inner::start_connect`].
    pub(crate) fn poll_connected(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.poll_attempt(&self.waiter, cx, |engine, _| self.try_connected(engine))
    }

    /// Asynchronous send. STREAM sends what the credit allows now (at least one byte); a
    /// SEQPACKET message waits until it fits whole, so a message is never left half sent.
    /// While another caller (a blocking send, another task) has the turn, the task waits.
    pub(crate) fn poll_send(
        &self,
        cx: &mut Context<'_>,
        source: &Source<'_>,
        zerocopy: bool,
        eor: bool,
    ) -> Poll<io::Result<usize>> {
        let Poll::Ready(_turn) = self.send_turn.poll_take(cx) else { return Poll::Pending };
        let total = source.len();
        let stream = self.socket_type == SocketType::Stream;
        let request =
            SendRequest { max_pass: usize::MAX, ..Inner::request(source, 0, zerocopy, eor) };
        let grant = self.shared.poll_attempt(&self.waiter, cx, |engine, _| {
            let grant = self.try_pass(engine, request)?;
            match grant {
                Some(grant) if !stream && grant.len() < total => {
                    engine.abort_send(grant);
                    Ok(None)
                }
                other => Ok(other),
            }
        });
        grant.map(|grant| self.finish_pass(grant?, source, 0))
    }

    /// Asynchronous in-place STREAM send ([`crate::VsockStream::poll_send_in_place`]): one
    /// grant of at most one packet, `place` fills it under the engine lock, and the engine
    /// returns the header instead of queueing a packet.
    pub(crate) fn poll_send_placed(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        place: impl FnOnce(usize) -> io::Result<usize>,
    ) -> Poll<io::Result<Option<Repr>>> {
        if self.socket_type != SocketType::Stream {
            return Poll::Ready(Err(io::ErrorKind::InvalidInput.into()));
        }
        if max == 0 {
            return Poll::Ready(Ok(None));
        }
        let Poll::Ready(_turn) = self.send_turn.poll_take(cx) else { return Poll::Pending };
        let packet = MAX_PACKET_PAYLOAD as usize;
        let request = SendRequest {
            remaining: max.min(packet),
            at_segment_start: true,
            zerocopy: false,
            eor: false,
            max_pass: packet,
        };
        self.shared.poll_attempt(&self.waiter, cx, |engine, _| {
            let Some(grant) = self.try_pass(engine, request)? else { return Ok(None) };
            let placed = match place(grant.len()) {
                Ok(placed) => placed.min(grant.len()),
                Err(error) => {
                    engine.abort_send(grant);
                    return Err(error);
                }
            };
            engine.finish_placed(grant, placed).map(Some).map_err(error::send)
        })
    }

    /// Asynchronous receive: ready once a read would not block (for STREAM, once SO_RCVLOWAT
    /// bytes, at most `buf.len()`, are queued, or no more will come); then one lease.
    pub(crate) fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        peek: bool,
    ) -> Poll<io::Result<RecvMeta>> {
        let Poll::Ready(_turn) = self.recv_turn.poll_take(cx) else { return Poll::Pending };
        let max = buf.len();
        let lease = self.shared.poll_attempt(&self.waiter, cx, |engine, _| {
            let target = engine.recv_target(self.id, max).map_err(error::recv)?;
            let min = if peek { 1 } else { target.unwrap_or(1) };
            self.try_recv(engine, min, max)
        });
        lease.map_ok(|lease| self.finish_recv(lease, buf, peek))
    }

    /// Asynchronous zero-copy STREAM receive: once data is queued, lends up to `max` bytes to
    /// `consume` (views of the queue's own buffers; on a device, guest memory) outside the engine
    /// lock, and consumes as many as it reports taking. 0 is end of stream.
    pub(crate) fn poll_recv_with(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        consume: impl FnOnce(&Payload) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let Poll::Ready(_turn) = self.recv_turn.poll_take(cx) else { return Poll::Pending };
        let lease = self
            .shared
            .poll_attempt(&self.waiter, cx, |engine, _| self.try_recv(engine, 1, max.max(1)));
        let mut lease = match lease {
            Poll::Ready(Ok(lease)) => lease,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => return Poll::Pending,
        };
        if lease.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let taken = match consume(lease.payload()) {
            Ok(taken) => taken.min(lease.len()),
            Err(error) => return Poll::Ready(Err(error)),
        };
        lease.truncate(taken);
        if taken > 0 {
            self.shared.with(|engine, _| engine.commit_recv(self.id, lease));
        }
        Poll::Ready(Ok(taken))
    }

    /// Asynchronous wait for the next zerocopy completion.
    pub(crate) fn poll_completion(&self, cx: &mut Context<'_>) -> Poll<io::Result<Completion>> {
        self.shared.poll_attempt(&self.waiter, cx, |engine, _| {
            engine.recv_completion(self.id).map_err(error::option)
        })
    }

    pub(crate) fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        let flags = match how {
            std::net::Shutdown::Read => ShutdownFlags::RECEIVE,
            std::net::Shutdown::Write => ShutdownFlags::SEND,
            std::net::Shutdown::Both => ShutdownFlags::all(),
        };
        self.shared.with(|engine, _| engine.shutdown(self.id, flags)).map_err(error::shutdown)
    }

    pub(crate) fn local_addr(&self) -> io::Result<Addr> {
        let addr = self.shared.lock().engine.local_addr(self.id);
        addr.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    pub(crate) fn peer_addr(&self) -> io::Result<Addr> {
        let addr = self.shared.lock().engine.peer_addr(self.id);
        addr.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTCONN))
    }

    pub(crate) fn set_nonblocking(&self, nonblocking: bool) {
        self.nonblocking.store(nonblocking, Ordering::Relaxed);
    }

    pub(crate) fn nonblocking(&self) -> bool {
        self.nonblocking.load(Ordering::Relaxed)
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        *lock(&self.read_timeout) = check_timeout(timeout)?;
        Ok(())
    }

    pub(crate) fn read_timeout(&self) -> Option<Duration> {
        *lock(&self.read_timeout)
    }

    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        *lock(&self.write_timeout) = check_timeout(timeout)?;
        Ok(())
    }

    pub(crate) fn write_timeout(&self) -> Option<Duration> {
        *lock(&self.write_timeout)
    }

    pub(crate) fn set_connect_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.shared.with(|e, _| e.set_connect_timeout(self.id, timeout)).map_err(error::option)
    }

    pub(crate) fn set_buffer_size(&self, size: u64) -> io::Result<u64> {
        self.shared.with(|e, _| e.set_buffer_size(self.id, size)).map_err(error::option)
    }

    pub(crate) fn set_buffer_min_size(&self, size: u64) -> io::Result<u64> {
        self.shared.with(|e, _| e.set_buffer_min_size(self.id, size)).map_err(error::option)
    }

    pub(crate) fn set_buffer_max_size(&self, size: u64) -> io::Result<u64> {
        self.shared.with(|e, _| e.set_buffer_max_size(self.id, size)).map_err(error::option)
    }

    /// SO_VM_SOCKETS_BUFFER_SIZE, _MIN_SIZE and _MAX_SIZE.
    pub(crate) fn buffer_sizes(&self) -> io::Result<(u64, u64, u64)> {
        self.shared.lock().engine.buffer_sizes(self.id).map_err(error::option)
    }

    pub(crate) fn rcvlowat(&self) -> io::Result<u32> {
        self.shared.lock().engine.rcvlowat(self.id).map_err(error::option)
    }

    pub(crate) fn set_rcvlowat(&self, bytes: u32) -> io::Result<()> {
        self.shared.with(|e, _| e.set_rcvlowat(self.id, bytes)).map_err(error::option)
    }

    pub(crate) fn set_zerocopy(&self, enabled: bool) -> io::Result<()> {
        self.shared.with(|e, _| e.set_zerocopy(self.id, enabled)).map_err(error::option)
    }

    pub(crate) fn zerocopy(&self) -> io::Result<bool> {
        self.shared.lock().engine.zerocopy(self.id).map_err(error::option)
    }

    pub(crate) fn next_completion_id(&self) -> u32 {
        self.shared.lock().engine.next_completion_id(self.id).unwrap_or(0)
    }

    pub(crate) fn recv_completion(&self) -> io::Result<Completion> {
        let completion = self.shared.with(|e, _| e.recv_completion(self.id));
        completion.map_err(error::option)?.ok_or_else(|| io::Error::from_raw_os_error(libc::EAGAIN))
    }

    pub(crate) fn readiness(&self) -> Readiness {
        self.shared.with(|e, _| e.readiness(self.id))
    }

    /// Waits until one of `interest` is ready, or an error, a completion or a hang-up is
    /// pending (those are always reported, as `poll` does). `None` waits forever.
    pub(crate) fn wait_readiness(
        &self,
        interest: Interest,
        timeout: Option<Duration>,
    ) -> io::Result<Readiness> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let result = self.shared.wait(&self.waiter, false, deadline, |engine, _| {
            let r = engine.readiness(self.id);
            let hit = (interest.readable && r.readable)
                || (interest.writable && r.writable)
                || r.error
                || r.hangup;
            Ok(hit.then_some(r))
        });
        match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Readiness::default()),
            other => other,
        }
    }

    pub(crate) fn unread_bytes(&self) -> usize {
        self.shared.lock().engine.unread_bytes(self.id)
    }

    pub(crate) fn unsent_bytes(&self) -> usize {
        self.shared.lock().unsent_bytes(self.id)
    }
}

/// Shares `bytes` as a payload without copying.
pub(crate) fn payload_of(buffers: impl IntoIterator<Item = Bytes>) -> Payload {
    let mut payload = Payload::new();
    for buffer in buffers {
        payload.push(buffer);
    }
    payload
}
