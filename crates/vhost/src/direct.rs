//! Host to guest without a copy in userspace: the bytes a host program writes to a Unix
//! endpoint are `readv`n by the vring worker straight into the guest's RX buffers, which only
//! it holds, behind headers the engine stamps at that moment
//! ([`zerovsock::VsockStream::poll_send_in_place`]).
//!
//! A [`HostReader`] is one connection's host socket as the worker sees it. It is queued on the
//! device's [`Outbound`](crate::worker::Outbound) when its socket may have data (an epoll
//! event on the bridge thread) or when the guest gives credit again (the engine wakes it), and
//! leaves the queue when the socket is drained, the credit is spent, or the connection ends.
//! The pipe on the bridge thread learns of end of file and errors through its own waker.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Wake, Waker};

use zerovsock::wire::Addr;
use zerovsock::VsockStream;

use crate::worker::Outbound;

const OPEN: u8 = 0;
const EOF: u8 = 1;
const FAILED: u8 = 2;
/// The guest takes no more (it shut down its receive side); the other direction goes on.
const REFUSED: u8 = 3;

/// One connection's host-to-guest direction, read by the vring worker.
pub(crate) struct HostReader {
    pub(crate) unix: UnixStream,
    pub(crate) stream: VsockStream,
    /// (host address, guest address): what the connection's packets carry.
    pub(crate) conn: (Addr, Addr),
    outbound: Weak<Outbound>,
    /// In the worker's queue.
    queued: AtomicBool,
    /// Asked to read since the worker last started a read.
    wanted: AtomicBool,
    /// OPEN, EOF, FAILED or REFUSED, as the worker found the host socket and the guest.
    state: AtomicU8,
    /// The pipe is gone: drop this reader instead of reading.
    closed: AtomicBool,
    /// The pipe's task, told when `state` changes.
    pipe: Waker,
    /// Queues this reader again (registered with the engine while the guest has no credit).
    pub(crate) requeue: Waker,
}

/// The waker the engine calls when the guest's credit comes back.
struct Requeue(Weak<HostReader>);

impl Wake for Requeue {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(reader) = self.0.upgrade() {
            reader.request();
        }
    }
}

impl HostReader {
    pub(crate) fn new(
        unix: UnixStream,
        stream: VsockStream,
        conn: (Addr, Addr),
        outbound: &Arc<Outbound>,
        pipe: Waker,
    ) -> Arc<HostReader> {
        Arc::new_cyclic(|own| HostReader {
            unix,
            stream,
            conn,
            outbound: Arc::downgrade(outbound),
            queued: AtomicBool::new(false),
            wanted: AtomicBool::new(false),
            state: AtomicU8::new(OPEN),
            closed: AtomicBool::new(false),
            pipe,
            requeue: Waker::from(Arc::new(Requeue(own.clone()))),
        })
    }

    /// The host socket may have data, or the guest has credit again: queue this reader for
    /// the worker, once.
    pub(crate) fn request(self: &Arc<Self>) {
        if self.state.load(Ordering::SeqCst) != OPEN || self.closed.load(Ordering::SeqCst) {
            return;
        }
        self.wanted.store(true, Ordering::SeqCst);
        if !self.queued.swap(true, Ordering::SeqCst) {
            if let Some(outbound) = self.outbound.upgrade() {
                outbound.push_reader(self.clone());
            }
        }
    }

    /// The worker is about to read: a request from now on means new data.
    pub(crate) fn start_read(&self) {
        self.wanted.store(false, Ordering::SeqCst);
    }

    /// The worker is done with this reader for now (the socket drained, or no credit). A
    /// request that came in since [`HostReader::start_read`] queues it again, so an epoll
    /// event that raced with the read is not lost.
    pub(crate) fn idle(self: &Arc<Self>) {
        self.queued.store(false, Ordering::SeqCst);
        if self.wanted.load(Ordering::SeqCst) {
            self.request();
        }
    }

    /// Taken off the queue without a read (the guest went away): a later request queues it.
    pub(crate) fn unqueued(&self) {
        self.queued.store(false, Ordering::SeqCst);
    }

    /// The host socket reached end of file: every byte before it is in guest buffers.
    pub(crate) fn set_eof(&self) {
        self.finish(EOF);
    }

    /// Reading the host socket failed, or the connection is gone.
    pub(crate) fn set_failed(&self) {
        self.finish(FAILED);
    }

    /// The guest shut down its receive side: nothing more goes its way.
    pub(crate) fn set_refused(&self) {
        self.finish(REFUSED);
    }

    fn finish(&self, state: u8) {
        self.state.store(state, Ordering::SeqCst);
        self.queued.store(false, Ordering::SeqCst);
        self.pipe.wake_by_ref();
    }

    pub(crate) fn at_eof(&self) -> bool {
        self.state.load(Ordering::SeqCst) == EOF
    }

    pub(crate) fn failed(&self) -> bool {
        self.state.load(Ordering::SeqCst) == FAILED
    }

    pub(crate) fn refused(&self) -> bool {
        self.state.load(Ordering::SeqCst) == REFUSED
    }

    /// The pipe ended; a queued reader is dropped by the worker.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}
