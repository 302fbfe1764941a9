//! Zerocopy sends through io_uring: `IORING_OP_SEND_ZC` and `IORING_OP_SENDMSG_ZC`.
//!
//! Each request produces two completions: the *result* (bytes sent, or an error), flagged
//! `IORING_CQE_F_MORE` when a notification follows, and the *notification*
//! (`IORING_CQE_F_NOTIF`) once the kernel no longer reads the buffer. With
//! `IORING_SEND_ZC_REPORT_USAGE` the notification's result carries
//! `IORING_NOTIF_USAGE_ZC_COPIED` when the data was copied after all. io_uring's notifier
//! replaces the socket's error queue for these sends: no `MSG_ERRQUEUE` entry is produced and no
//! socket completion id is taken.
//!
//! Who owns the memory of a request: the ring. Before the entry is pushed, the buffers (and for
//! `SENDMSG_ZC` the iovec array and the `msghdr`) move into one heap allocation, recorded in the
//! ring's table of requests in flight under the request's own `user_data`. Completions are
//! matched to requests by `user_data`. An entry leaves the table only after its last completion
//! (the notification, when the result announced one); only then is the buffer handed back.
//! A wait that a signal interrupts (EINTR) is simply waited again. If waiting fails for another
//! reason, the send reports that error but its request stays in the table, and a later call
//! frees it once its completions arrive. Dropping the ring waits up to its linger time for such
//! requests, then leaks what the kernel may still read (counted by [`crate::leaked_buffers`]).
#![allow(unsafe_code)]

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::socket::DEFAULT_LINGER;
use crate::{sys, zerocopy};

/// `IORING_SEND_ZC_REPORT_USAGE` (not exported by the `io-uring` crate).
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: the notification's result when the data was copied.
const IORING_NOTIF_USAGE_ZC_COPIED: i32 = 1 << 31;

/// What one zerocopy request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringSend {
    /// Bytes sent (the result completion).
    pub sent: usize,
    /// The kernel copied the data instead (from the notification, `REPORT_USAGE`).
    pub copied: bool,
    /// Whether a notification arrived (always, when any byte was sent).
    pub notified: bool,
}

/// Memory a request points at, kept at a fixed heap address while the kernel may use it.
type Memory = Box<dyn Any + Send>;

/// A request the kernel may still use.
struct Request {
    memory: Memory,
    /// The result completion's value, once it arrived.
    result: Option<i32>,
    /// The result announced a notification (`IORING_CQE_F_MORE`).
    more: bool,
    /// The notification arrived; whether it said COPIED.
    notification: Option<bool>,
}

impl Request {
    fn new(memory: Memory) -> Request {
        Request { memory, result: None, more: false, notification: None }
    }

    /// Every completion of the request has arrived: the kernel is done with its memory.
    fn finished(&self) -> bool {
        self.result.is_some() && (!self.more || self.notification.is_some())
    }

    fn take(&mut self, cqe: &cqueue::Entry) {
        if cqueue::notif(cqe.flags()) {
            self.notification = Some(cqe.result() & IORING_NOTIF_USAGE_ZC_COPIED != 0);
        } else {
            self.result = Some(cqe.result());
            self.more = cqueue::more(cqe.flags());
        }
    }

    fn report(self) -> (io::Result<UringSend>, Memory) {
        let report = match self.result {
            Some(n) if n >= 0 => Ok(UringSend {
                sent: n as usize,
                copied: self.notification.unwrap_or(false),
                notified: self.notification.is_some(),
            }),
            Some(errno) => Err(io::Error::from_raw_os_error(-errno)),
            None => Err(io::Error::other("io_uring returned no result")),
        };
        (report, self.memory)
    }
}

/// The buffers of a `SENDMSG_ZC`, with the iovec array and the `msghdr` that point at them.
struct Message<B> {
    bufs: Vec<B>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

// SAFETY: the raw pointers in `iov` and `msg` point only into this same value's heap memory
// (the buffers' data and `iov`'s allocation), which moves with it; user space never
// dereferences them, and the buffers themselves are `Send`.
unsafe impl<B: Send> Send for Message<B> {}

/// An io_uring instance for zerocopy sends on vsock sockets.
pub struct UringZerocopy {
    ring: IoUring,
    next_user_data: u64,
    /// Requests whose memory the kernel may still use, by `user_data`.
    in_flight: HashMap<u64, Request>,
    linger: Duration,
}

impl std::fmt::Debug for UringZerocopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringZerocopy").field("in_flight", &self.in_flight.len()).finish()
    }
}

impl UringZerocopy {
    /// A ring with room for a few requests.
    pub fn new() -> io::Result<UringZerocopy> {
        Ok(UringZerocopy {
            ring: IoUring::new(8)?,
            next_user_data: 0,
            in_flight: HashMap::new(),
            linger: DEFAULT_LINGER,
        })
    }

    /// How long dropping the ring waits for requests still in flight before leaking their
    /// memory (default 2 s).
    pub fn set_linger(&mut self, linger: Duration) {
        self.linger = linger;
    }

    /// Requests whose memory the ring still holds for the kernel (left by sends whose wait
    /// failed).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// `IORING_OP_SEND_ZC` of `buf` on `socket`; waits for the result and the notification,
    /// then gives the buffer back. Without SO_ZEROCOPY on the socket the kernel copies
    /// (reported as `copied`). If the wait itself fails (not EINTR, which is retried), the
    /// error is returned and the ring keeps the buffer until the kernel is done with it.
    pub fn send_zc<S: AsFd, B: AsRef<[u8]> + Send + 'static>(
        &mut self,
        socket: &S,
        buf: B,
    ) -> io::Result<(UringSend, B)> {
        let buf = Box::new(buf);
        let data = (*buf).as_ref();
        let len =
            u32::try_from(data.len()).map_err(|_| io::Error::from_raw_os_error(libc::EMSGSIZE))?;
        let fd = types::Fd(sys::raw(socket.as_fd()));
        let entry = opcode::SendZc::new(fd, data.as_ptr(), len)
            .zc_flags(IORING_SEND_ZC_REPORT_USAGE)
            .build();
        // SAFETY: the entry points at `len` bytes of `*buf`'s data. `buf` is a heap allocation
        // that moving the box does not move; `submit` keeps it in the table until the request's
        // last completion, and nothing writes to it meanwhile (it is owned, not shared).
        let (report, memory) = unsafe { self.submit(entry, buf) }?;
        Ok((report?, *downcast::<B>(memory)?))
    }

    /// `IORING_OP_SENDMSG_ZC` of several buffers as one message; the same ownership as
    /// [`Self::send_zc`].
    pub fn sendmsg_zc<S: AsFd, B: AsRef<[u8]> + Send + 'static>(
        &mut self,
        socket: &S,
        bufs: Vec<B>,
    ) -> io::Result<(UringSend, Vec<B>)> {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ref().as_ptr() as *mut _,
                iov_len: b.as_ref().len(),
            })
            .collect();
        let mut message = Box::new(Message {
            bufs,
            iov,
            // SAFETY: plain old data; zeroed = no name, no control.
            msg: unsafe { std::mem::zeroed() },
        });
        message.msg.msg_iov = message.iov.as_mut_ptr();
        message.msg.msg_iovlen = message.iov.len();
        let fd = types::Fd(sys::raw(socket.as_fd()));
        let entry = opcode::SendMsgZc::new(fd, &message.msg).build();
        // SAFETY: the entry points at `message.msg`, which points at `message.iov`'s heap array,
        // which points at the buffers' data: all inside the boxed `message`, whose heap address
        // and contents stay put while `submit` keeps it in the table, until the request's last
        // completion. The buffers are owned, so nothing writes to them meanwhile.
        let (report, memory) = unsafe { self.submit(entry, message) }?;
        Ok((report?, downcast::<Message<B>>(memory)?.bufs))
    }

    /// Submits one request owning `memory` and waits for all its completions. The outer error
    /// is the ring's (the request then stays in the table); the inner one the request's.
    ///
    /// # Safety
    /// Everything `entry` points at must lie in `memory`'s heap allocation, stay valid and not be
    /// written while the table holds it.
    unsafe fn submit(
        &mut self,
        entry: squeue::Entry,
        memory: Memory,
    ) -> io::Result<(io::Result<UringSend>, Memory)> {
        // SAFETY: forwarded from the caller.
        let user_data = unsafe { self.start(entry, memory) }?;
        self.wait_for(user_data)?;
        let request = self
            .in_flight
            .remove(&user_data)
            .ok_or_else(|| io::Error::other("io_uring request lost from the table"))?;
        Ok(request.report())
    }

    /// Pushes `entry` under a fresh `user_data` and records `memory` as in flight.
    ///
    /// # Safety
    /// As for [`Self::submit`].
    unsafe fn start(&mut self, entry: squeue::Entry, memory: Memory) -> io::Result<u64> {
        let user_data = self.next_user_data;
        self.next_user_data = self.next_user_data.wrapping_add(1);
        let entry = entry.user_data(user_data);
        // SAFETY: the caller guarantees what the entry points at lives in `memory`, which is
        // stored in the table right after a successful push and stays there until the
        // request's last completion. If the push fails the kernel never sees the entry, and
        // `memory` may be dropped.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.in_flight.insert(user_data, Request::new(memory));
        Ok(user_data)
    }

    /// Waits until the request `user_data` has had every completion.
    fn wait_for(&mut self, user_data: u64) -> io::Result<()> {
        loop {
            self.reap(Some(user_data));
            if self.in_flight.get(&user_data).is_none_or(Request::finished) {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Hands each queued completion to the request it names, and frees the requests left by
    /// earlier calls that have now finished (all but `current`).
    fn reap(&mut self, current: Option<u64>) {
        for cqe in self.ring.completion() {
            if let Some(request) = self.in_flight.get_mut(&cqe.user_data()) {
                request.take(&cqe);
            }
        }
        self.in_flight
            .retain(|user_data, request| Some(*user_data) == current || !request.finished());
    }
}

fn downcast<T: 'static>(memory: Memory) -> io::Result<Box<T>> {
    memory.downcast::<T>().map_err(|_| io::Error::other("io_uring request memory of another type"))
}

impl Drop for UringZerocopy {
    fn drop(&mut self) {
        let deadline = Instant::now() + self.linger;
        while !self.in_flight.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let timeout = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&timeout);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(_) => break,
            }
            self.reap(None);
        }
        // The kernel may still read these: leak them rather than free them.
        for (_, request) in self.in_flight.drain() {
            zerocopy::leak(request.memory);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// A client whose send buffer and peer's receive buffer are full: a send now waits.
    fn full(client: &TcpStream) {
        client.set_nonblocking(true).unwrap();
        let chunk = [0u8; 4096];
        loop {
            match (&*client).write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
        client.set_nonblocking(false).unwrap();
    }

    /// A request nobody waits for: `SEND_ZC` of a leaked buffer under `user_data`, submitted,
    /// with its result and notification left in the completion queue.
    fn foreign_send(ring: &mut UringZerocopy, socket: &TcpStream, len: u32, user_data: u64) {
        let data: &'static [u8] = Vec::leak(vec![5u8; len as usize]);
        let entry = opcode::SendZc::new(types::Fd(sys::raw(socket.as_fd())), data.as_ptr(), len)
            .build()
            .user_data(user_data);
        // SAFETY: the entry points at leaked memory, valid forever.
        unsafe { ring.ring.submission().push(&entry) }.unwrap();
        ring.ring.submit().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ring.ring.completion().len() < 2 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(ring.ring.completion().len(), 2, "result and notification queued");
    }

    #[test]
    fn a_completion_of_another_request_is_not_this_sends_result() {
        let (client, server) = tcp_pair();
        let (other, _other_peer) = tcp_pair();
        full(&client);
        let mut ring = UringZerocopy::new().unwrap();
        foreign_send(&mut ring, &other, 321, u64::MAX);
        // The peer reads only once this send is waiting (the pause orders the events for the
        // check; the rule holds whatever the order).
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut all = Vec::new();
            let _ = (&server).read_to_end(&mut all);
        });
        let (report, buf) = ring.send_zc(&client, vec![9u8; 1000]).unwrap();
        assert_eq!((report.sent, report.notified), (1000, true), "its own result and notification");
        assert_eq!(buf, vec![9u8; 1000]);
        drop(client);
        reader.join().unwrap();
    }

    #[test]
    fn a_finished_request_of_an_earlier_call_is_freed_by_the_next() {
        let (client, server) = tcp_pair();
        let mut ring = UringZerocopy::new().unwrap();
        let nop = opcode::Nop::new().build();
        // SAFETY: a NOP points at nothing.
        unsafe { ring.start(nop, Box::new(())) }.unwrap();
        assert_eq!(ring.in_flight(), 1);
        ring.send_zc(&client, vec![1u8; 10]).unwrap();
        assert_eq!(ring.in_flight(), 0, "the NOP's completion went to its own entry");
        drop(server);
    }

    #[test]
    fn dropping_the_ring_leaks_a_request_the_kernel_still_holds() {
        let (client, server) = tcp_pair();
        full(&client);
        let buffer = Arc::new(vec![3u8; 4096]);
        let mut ring = UringZerocopy::new().unwrap();
        ring.set_linger(Duration::from_millis(50));
        let data = buffer.as_slice();
        let entry =
            opcode::SendZc::new(types::Fd(sys::raw(client.as_fd())), data.as_ptr(), 4096).build();
        // SAFETY: the entry points into `buffer`'s heap data, owned by the boxed Arc clone.
        unsafe { ring.start(entry, Box::new(buffer.clone())) }.unwrap();
        let before = crate::leaked_buffers();
        drop(ring);
        assert_eq!(crate::leaked_buffers(), before + 1);
        assert_eq!(Arc::strong_count(&buffer), 2, "leaked, not freed: the peer never read");
        drop(server);
    }
}
