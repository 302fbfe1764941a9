//! What every kernel vsock socket shares: the descriptor, options, and the zerocopy tracker.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use zerovsock_proto::{Completion, Interest, Readiness};
use zerovsock_wire::{Addr, SocketType};

use crate::sys;
use crate::zerocopy::{Owner, SendKey, Tracker};

/// How long `Drop` waits for outstanding zerocopy completions before leaking their buffers.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(2);

#[doc(hidden)]
pub struct Inner {
    fd: OwnedFd,
    socket_type: SocketType,
    zerocopy: Mutex<Tracker>,
    /// SO_ZEROCOPY as last set through this handle (off on new and accepted sockets). Held by
    /// `set_zerocopy` around the `setsockopt` and by each tracked pass from reading the flag to
    /// the end of its `sendmsg`, so the kernel applies the value the pass's id was recorded under.
    zerocopy_enabled: Mutex<bool>,
    nonblocking: AtomicBool,
    /// SO_SNDTIMEO as last set, for the waits the library does itself.
    write_timeout: Mutex<Option<Duration>>,
    /// Serialises zerocopy sends, so their ids follow their order.
    send_lock: Mutex<()>,
    linger: Mutex<Duration>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").field("fd", &self.fd).field("type", &self.socket_type).finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    pub(crate) fn open(socket_type: SocketType) -> io::Result<Inner> {
        Ok(Inner::from_fd(sys::socket(socket_type)?, socket_type))
    }

    pub(crate) fn from_fd(fd: OwnedFd, socket_type: SocketType) -> Inner {
        Inner {
            fd,
            socket_type,
            zerocopy: Mutex::default(),
            zerocopy_enabled: Mutex::new(false),
            nonblocking: AtomicBool::new(false),
            write_timeout: Mutex::new(None),
            send_lock: Mutex::new(()),
            linger: Mutex::new(DEFAULT_LINGER),
        }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn accept(&self) -> io::Result<(Inner, Addr)> {
        let (fd, peer) = sys::accept(self.fd())?;
        Ok((Inner::from_fd(fd, self.socket_type), peer))
    }

    pub(crate) fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        sys::set_nonblocking(self.fd(), nonblocking)?;
        self.nonblocking.store(nonblocking, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn set_timeout(&self, name: i32, timeout: Option<Duration>) -> io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot set a 0 duration timeout",
            ));
        }
        sys::set_option(self.fd(), libc::SOL_SOCKET, name, sys::timeval(timeout))?;
        if name == libc::SO_SNDTIMEO {
            *lock(&self.write_timeout) = timeout;
        }
        Ok(())
    }

    pub(crate) fn timeout(&self, name: i32) -> io::Result<Option<Duration>> {
        let value: libc::timeval = sys::option(self.fd(), libc::SOL_SOCKET, name)?;
        Ok(sys::duration(value))
    }

    pub(crate) fn set_vsock_u64(&self, name: i32, value: u64) -> io::Result<()> {
        sys::set_option(self.fd(), libc::AF_VSOCK, name, value)
    }

    pub(crate) fn vsock_u64(&self, name: i32) -> io::Result<u64> {
        sys::option(self.fd(), libc::AF_VSOCK, name)
    }

    /// SO_ZEROCOPY. Waits for a pass in progress (a STREAM pass never blocks; a SEQPACKET
    /// message may wait for credit), so no pass sees one value while the kernel applies another.
    pub(crate) fn set_zerocopy(&self, enabled: bool) -> io::Result<()> {
        let mut flag = lock(&self.zerocopy_enabled);
        sys::set_option(
            self.fd(),
            libc::SOL_SOCKET,
            libc::SO_ZEROCOPY,
            libc::c_int::from(enabled),
        )?;
        *flag = enabled;
        Ok(())
    }

    pub(crate) fn zerocopy(&self) -> io::Result<bool> {
        let value: libc::c_int = sys::option(self.fd(), libc::SOL_SOCKET, libc::SO_ZEROCOPY)?;
        Ok(value != 0)
    }

    pub(crate) fn set_linger(&self, linger: Duration) {
        *lock(&self.linger) = linger;
    }

    pub(crate) fn readiness(&self) -> io::Result<Readiness> {
        self.poll(Interest { readable: true, writable: true }, Some(Duration::ZERO))
    }

    /// `poll(2)`; `None` waits forever. Empty readiness on timeout.
    pub(crate) fn poll(
        &self,
        interest: Interest,
        timeout: Option<Duration>,
    ) -> io::Result<Readiness> {
        let mut events = 0;
        if interest.readable {
            events |= libc::POLLIN;
        }
        if interest.writable {
            events |= libc::POLLOUT;
        }
        events |= libc::POLLRDHUP;
        let revents = sys::poll(self.fd(), events, timeout)?;
        let queued = lock(&self.zerocopy).has_queued();
        Ok(Readiness {
            readable: revents & libc::POLLIN != 0,
            writable: revents & libc::POLLOUT != 0,
            error: revents & libc::POLLERR != 0 || queued,
            hangup: revents & libc::POLLHUP != 0,
            read_closed: revents & libc::POLLRDHUP != 0,
        })
    }

    /// Reads every completion the kernel has queued into the tracker (releasing buffers).
    fn drain_completions(&self, tracker: &mut Tracker) -> io::Result<()> {
        let seqpacket = self.socket_type == SocketType::Seqpacket;
        while let Some(completion) = sys::recv_completion(self.fd())? {
            tracker.completed(completion, seqpacket);
        }
        Ok(())
    }

    /// The oldest completion (`recvmsg(MSG_ERRQUEUE)`); `WouldBlock` when none is queued.
    pub(crate) fn recv_completion(&self) -> io::Result<Completion> {
        let mut tracker = lock(&self.zerocopy);
        if let Some(completion) = tracker.pop() {
            return Ok(completion);
        }
        self.drain_completions(&mut tracker)?;
        tracker.pop().ok_or_else(|| io::Error::from_raw_os_error(libc::EAGAIN))
    }

    pub(crate) fn next_completion_id(&self) -> u32 {
        lock(&self.zerocopy).next_id()
    }

    pub(crate) fn pinned_buffers(&self) -> usize {
        lock(&self.zerocopy).pinned()
    }

    /// One MSG_ZEROCOPY send of `bufs`; `owners` keep their memory alive until every pass
    /// that carried them has completed. STREAM: non-blocking passes, the library waits for
    /// room in between (see `zerocopy.rs`); SEQPACKET: one call per message.
    ///
    /// The id of each pass is recorded before its `sendmsg` (and given back if the pass moved
    /// nothing), so a completion can never be matched before its id is known, and the tracker
    /// lock is not held while the kernel call blocks: other threads may read completions and
    /// readiness meanwhile. Sends are serialised.
    pub(crate) fn send_zerocopy(&self, bufs: &[&[u8]], owners: Vec<Owner>) -> io::Result<usize> {
        let _serial = lock(&self.send_lock);
        let send = self.open_send(owners)?;
        let pass = |flags: i32, rest: &[&[u8]]| {
            self.tracked_pass(send, || sys::sendmsg(self.fd(), rest, libc::MSG_ZEROCOPY | flags))
        };
        let result = match self.socket_type {
            SocketType::Stream => self.stream_passes(bufs, &pass),
            SocketType::Seqpacket => pass(0, bufs),
        };
        lock(&self.zerocopy).close(send);
        result
    }

    /// Starts a tracked send pinning `owners`, after freeing what the kernel is done with.
    /// The caller holds `send_lock`.
    fn open_send(&self, owners: Vec<Owner>) -> io::Result<SendKey> {
        let mut tracker = lock(&self.zerocopy);
        self.drain_completions(&mut tracker)?;
        Ok(tracker.open(owners))
    }

    /// One MSG_ZEROCOPY `sendmsg` of a tracked send. With SO_ZEROCOPY on, its id is recorded
    /// before the call (so a completion is never matched before its id is known) and given back
    /// if the call moved nothing. The flag stays locked until the call returns, so SO_ZEROCOPY
    /// cannot change in between; the tracker is not locked while the call blocks.
    fn tracked_pass(
        &self,
        send: SendKey,
        call: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize> {
        let enabled = lock(&self.zerocopy_enabled);
        let id = enabled.then(|| lock(&self.zerocopy).pass(send));
        let result = call();
        if let (Some(id), Ok(0) | Err(_)) = (id, &result) {
            lock(&self.zerocopy).unpass(send, id);
        }
        drop(enabled);
        result
    }

    /// Non-blocking passes until everything is sent, waiting for POLLOUT in between as a
    /// blocking socket would (honouring SO_SNDTIMEO).
    fn stream_passes(&self, bufs: &[&[u8]], pass: &Pass<'_>) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let blocking = !self.nonblocking.load(Ordering::Relaxed);
        let deadline = lock(&self.write_timeout).map(|t| Instant::now() + t);
        let mut sent = 0;
        while sent < total {
            match pass(libc::MSG_DONTWAIT, &skip(bufs, sent)) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && blocking => {
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if left == Some(Duration::ZERO) {
                        return if sent > 0 { Ok(sent) } else { Err(e) };
                    }
                    sys::poll(self.fd(), libc::POLLOUT, left)?;
                }
                // Like the kernel: once bytes moved, report them; the error recurs next call.
                Err(_) if sent > 0 => return Ok(sent),
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    /// Raw zerocopy send for callers that manage their own memory (they vouched for the ranges
    /// when making `ranges`). STREAM sends never wait (one pass: what the credit allows, or
    /// EAGAIN), so the send takes exactly one id.
    pub(crate) fn send_zerocopy_raw(&self, ranges: sys::ZerocopyRanges<'_>) -> io::Result<usize> {
        let _serial = lock(&self.send_lock);
        let send = self.open_send(Vec::new())?;
        let flags = match self.socket_type {
            SocketType::Stream => libc::MSG_ZEROCOPY | libc::MSG_DONTWAIT,
            SocketType::Seqpacket => libc::MSG_ZEROCOPY,
        };
        let result = self.tracked_pass(send, || sys::sendmsg_ranges(self.fd(), ranges, flags));
        lock(&self.zerocopy).close(send);
        result
    }

    /// Waits until no buffer is pinned, or `timeout` passes. Returns whether all came back.
    pub(crate) fn drain(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut tracker = lock(&self.zerocopy);
                self.drain_completions(&mut tracker)?;
                if tracker.pinned() == 0 {
                    return Ok(true);
                }
                if !tracker.in_sync() {
                    return Ok(false);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            sys::poll(self.fd(), 0, Some(left.min(Duration::from_millis(50))))?;
        }
    }
}

/// One `sendmsg` pass with extra flags over the rest of a send's buffers.
type Pass<'a> = dyn Fn(i32, &[&[u8]]) -> io::Result<usize> + 'a;

/// The unsent rest of `bufs` after `skip` bytes.
fn skip<'a>(bufs: &[&'a [u8]], mut skip: usize) -> Vec<&'a [u8]> {
    let mut rest = Vec::with_capacity(bufs.len());
    for buf in bufs {
        if skip >= buf.len() {
            skip -= buf.len();
            continue;
        }
        rest.push(&buf[skip..]);
        skip = 0;
    }
    rest
}

impl Drop for Inner {
    fn drop(&mut self) {
        let pinned = lock(&self.zerocopy).pinned();
        if pinned == 0 {
            return;
        }
        let linger = *lock(&self.linger);
        // Errors here only shorten the wait; whatever is still pinned is leaked below.
        let _ = self.drain(linger);
        lock(&self.zerocopy).leak_pinned();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::sync::{mpsc, Arc};

    /// An `Inner` over a TCP socket on 127.0.0.1: SO_ZEROCOPY and the error queue behave as on
    /// vsock for what these tests need, and no AF_VSOCK socket is opened.
    fn tcp_inner() -> (Arc<Inner>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (Arc::new(Inner::from_fd(OwnedFd::from(client), SocketType::Stream)), server)
    }

    #[test]
    fn so_zerocopy_cannot_change_while_a_pass_is_made() {
        let (inner, _server) = tcp_inner();
        let send = inner.open_send(Vec::new()).unwrap();
        let (done, finished) = mpsc::channel();
        let mut toggler = None;
        let mut during = None;
        inner
            .tracked_pass(send, || {
                // The pass's sendmsg would run here. Another thread turns SO_ZEROCOPY on.
                let other = inner.clone();
                let done = done.clone();
                toggler = Some(std::thread::spawn(move || {
                    other.set_zerocopy(true).unwrap();
                    let _ = done.send(());
                }));
                // Bounded wait for a change that must not happen before the pass ends.
                let _ = finished.recv_timeout(Duration::from_millis(200));
                let recorded_an_id = inner.next_completion_id() != 0;
                during = Some((recorded_an_id, inner.zerocopy().unwrap()));
                Ok(1)
            })
            .unwrap();
        lock(&inner.zerocopy).close(send);
        toggler.unwrap().join().unwrap();
        let (recorded_an_id, kernel_flag) = during.unwrap();
        assert_eq!(
            kernel_flag, recorded_an_id,
            "SO_ZEROCOPY was {kernel_flag} in the kernel during a pass that recorded an id: \
             {recorded_an_id}"
        );
        assert!(inner.zerocopy().unwrap(), "the change is made once the pass is over");
    }

    #[test]
    fn skip_resumes_inside_the_right_buffer() {
        let (a, b, c) = (&b"abc"[..], &b"de"[..], &b"fgh"[..]);
        let rest = skip(&[a, b, c], 4);
        assert_eq!(rest, vec![&b"e"[..], &b"fgh"[..]]);
        assert!(skip(&[a], 3).is_empty());
    }
}
