//! One socket's state inside the engine.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use zerovsock_wire::{
    Addr, ShutdownFlags, SocketType, DEFAULT_BUFFER_MAX_SIZE, DEFAULT_BUFFER_MIN_SIZE,
    DEFAULT_BUFFER_SIZE, MAX_BUFFER_SIZE,
};

use crate::credit::Credit;
use crate::error::SocketError;
use crate::rx::RxQueue;
use crate::zerocopy::Ledger;

/// Identifies a socket inside one [`Engine`](crate::Engine). Never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub(crate) u64);

impl fmt::Display for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Connection states, named after Linux's (`sk_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Created or bound; not connected (`TCP_CLOSE`).
    Unconnected,
    /// Accepting REQUESTs (`TCP_LISTEN`).
    Listening,
    /// REQUEST sent, waiting for RESPONSE (`TCP_SYN_SENT`).
    Connecting,
    /// Connected (`TCP_ESTABLISHED`).
    Established,
    /// The peer is gone and no unread data remains (`TCP_CLOSING`).
    Closing,
}

/// Per-socket options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    pub(crate) buffer_size: u64,
    pub(crate) buffer_min: u64,
    pub(crate) buffer_max: u64,
    pub(crate) connect_timeout: Duration,
    pub(crate) rcvlowat: u32,
    pub(crate) zerocopy: bool,
}

impl Options {
    pub(crate) fn new(connect_timeout: Duration) -> Options {
        Options {
            buffer_size: DEFAULT_BUFFER_SIZE,
            buffer_min: DEFAULT_BUFFER_MIN_SIZE,
            buffer_max: DEFAULT_BUFFER_MAX_SIZE,
            connect_timeout,
            rcvlowat: 1,
            zerocopy: false,
        }
    }

    /// `vsock_update_buffer_size`: raise to `min`, then lower to `max` (so with `min > max`,
    /// `max` wins); once the socket has a transport, also into the wire's `u32`
    /// (`virtio_transport_notify_buffer_size`, `virtio_transport_do_socket_init`). Returns the
    /// `buf_alloc` to advertise.
    pub(crate) fn clamp_buffer_size(&mut self, transport: bool) -> u32 {
        self.buffer_size = self.buffer_size.max(self.buffer_min).min(self.buffer_max);
        if transport {
            self.buffer_size = self.buffer_size.min(MAX_BUFFER_SIZE);
        }
        u32::try_from(self.buffer_size.min(MAX_BUFFER_SIZE)).unwrap_or(u32::MAX)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Listen {
    pub(crate) backlog: u32,
    pub(crate) pending: VecDeque<crate::SocketId>,
    /// Children are not answered until the application confirms them
    /// ([`crate::Engine::listen_unclaimed`]).
    pub(crate) deferred: bool,
}

#[derive(Debug)]
pub(crate) struct Socket {
    pub(crate) socket_type: SocketType,
    pub(crate) state: State,
    pub(crate) local: Option<Addr>,
    pub(crate) remote: Option<Addr>,
    /// Holds an entry in the bound table under `local.port`.
    pub(crate) bound: bool,
    pub(crate) options: Options,
    pub(crate) credit: Credit,
    pub(crate) rx: RxQueue,
    pub(crate) shutdown: ShutdownFlags,
    pub(crate) peer_shutdown: ShutdownFlags,
    /// The peer reset or fully closed (`SOCK_DONE`).
    pub(crate) done: bool,
    pub(crate) error: Option<SocketError>,
    /// The application closed it; the engine finishes the close on its own.
    pub(crate) orphan: bool,
    pub(crate) listen: Option<Listen>,
    /// A connection not yet accepted belongs to this listener.
    pub(crate) parent: Option<SocketId>,
    pub(crate) ledger: Ledger,
    pub(crate) deadline: Option<Instant>,
    pub(crate) wake_queued: bool,
    /// Tied to a transport (`vsk->transport`): connected once, or accepted.
    pub(crate) transport: bool,
    /// A child of a deferring listener whose RESPONSE has not been sent yet.
    pub(crate) unconfirmed: bool,
}

impl Socket {
    pub(crate) fn new(
        socket_type: SocketType,
        options: Options,
        notification_limit: u32,
        transport: bool,
    ) -> Socket {
        let mut options = options;
        let buf_alloc = options.clamp_buffer_size(transport);
        Socket {
            socket_type,
            state: State::Unconnected,
            local: None,
            remote: None,
            bound: false,
            options,
            credit: Credit::new(buf_alloc),
            rx: RxQueue::default(),
            shutdown: ShutdownFlags::empty(),
            peer_shutdown: ShutdownFlags::empty(),
            done: false,
            error: None,
            orphan: false,
            listen: None,
            parent: None,
            ledger: Ledger::new(notification_limit),
            deadline: None,
            wake_queued: false,
            transport,
            unconfirmed: false,
        }
    }

    /// The socket is tied to a transport (it connected, or was accepted): from now on its
    /// buffer size is also a `u32` (`virtio_transport_do_socket_init`).
    pub(crate) fn assign_transport(&mut self) {
        self.transport = true;
        self.options.buffer_size = self.options.buffer_size.min(MAX_BUFFER_SIZE);
    }

    pub(crate) fn has_unread(&self) -> bool {
        match self.socket_type {
            SocketType::Stream => self.rx.has_data(),
            SocketType::Seqpacket => self.rx.has_message(),
        }
    }

    /// What `vsock_connectible_sendmsg` refuses before it looks at credit: EPIPE, then
    /// ENOTCONN.
    pub(crate) fn send_refused(&self) -> Option<crate::SendError> {
        if self.shutdown.contains(ShutdownFlags::SEND)
            || self.peer_shutdown.contains(ShutdownFlags::RECEIVE)
        {
            return Some(crate::SendError::BrokenPipe);
        }
        if self.state != State::Established || self.unconfirmed {
            return Some(crate::SendError::NotConnected);
        }
        None
    }

    /// Whether this side may send now, ignoring credit: [`Socket::send_refused`], then the
    /// socket's error.
    pub(crate) fn send_blocked_by(&self) -> Option<crate::SendError> {
        self.send_refused().or(self.error.map(crate::SendError::Failed))
    }

    /// `vsock_stream_has_data`: unread bytes, whole messages or not. Linux asks this (not
    /// whether a whole message is queued) when it decides to reset or close.
    pub(crate) fn has_unread_bytes(&self) -> bool {
        self.credit.rx_bytes > 0
    }

    /// `virtio_transport_do_close`: the peer is gone.
    pub(crate) fn mark_done(&mut self) {
        self.done = true;
        self.peer_shutdown = ShutdownFlags::all();
        if !self.has_unread_bytes() {
            self.state = State::Closing;
        }
    }
}
