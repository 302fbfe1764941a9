//! Socket options and queries: SO_ZEROCOPY and the completion queue, buffer sizes, timeouts,
//! SO_RCVLOWAT, addresses, and readiness.

use std::time::Duration;

use zerovsock_wire::{Addr, Op, ShutdownFlags, SocketType};

use crate::api::{QueueStats, Readiness};
use crate::engine::Engine;
use crate::error::OptionError;
use crate::packet::Payload;
use crate::socket::{Options, SocketId, State};
use crate::zerocopy::Completion;

impl Engine {
    /// Enables or disables SO_ZEROCOPY. Refused with `Unsupported` once the socket is tied to
    /// a transport without zerocopy (a connected or listening socket).
    pub fn set_zerocopy(&mut self, id: SocketId, enabled: bool) -> Result<(), OptionError> {
        let zerocopy = self.config.zerocopy;
        let socket = socket_mut!(self, id, OptionError::UnknownSocket);
        if !zerocopy && socket.state != State::Unconnected {
            return Err(OptionError::Unsupported);
        }
        socket.options.zerocopy = enabled;
        Ok(())
    }

    /// SO_ZEROCOPY.
    pub fn zerocopy(&self, id: SocketId) -> Result<bool, OptionError> {
        Ok(socket_ref!(self, id, OptionError::UnknownSocket).options.zerocopy)
    }

    /// The id the next zerocopy pass of this socket will take.
    pub fn next_completion_id(&self, id: SocketId) -> Option<u32> {
        self.sockets.get(&id).map(|s| s.ledger.next_id())
    }

    /// Sets the per-socket notification budget (Linux's optmem share).
    pub fn set_notification_limit(&mut self, id: SocketId, limit: u32) -> Result<(), OptionError> {
        socket_mut!(self, id, OptionError::UnknownSocket).ledger.set_limit(limit);
        Ok(())
    }

    /// Takes the oldest zerocopy completion (`recvmsg(MSG_ERRQUEUE)`); `None` is EAGAIN.
    pub fn recv_completion(&mut self, id: SocketId) -> Result<Option<Completion>, OptionError> {
        self.poll_completions();
        Ok(socket_mut!(self, id, OptionError::UnknownSocket).ledger.pop())
    }

    /// SO_VM_SOCKETS_BUFFER_SIZE; clamped into `[min, max]`. Tells the peer when it changes.
    pub fn set_buffer_size(&mut self, id: SocketId, size: u64) -> Result<u64, OptionError> {
        self.update_buffer(id, |o| o.buffer_size = size)
    }

    /// SO_VM_SOCKETS_BUFFER_MIN_SIZE.
    pub fn set_buffer_min_size(&mut self, id: SocketId, size: u64) -> Result<u64, OptionError> {
        self.update_buffer(id, |o| o.buffer_min = size)
    }

    /// SO_VM_SOCKETS_BUFFER_MAX_SIZE.
    pub fn set_buffer_max_size(&mut self, id: SocketId, size: u64) -> Result<u64, OptionError> {
        self.update_buffer(id, |o| o.buffer_max = size)
    }

    fn update_buffer(
        &mut self,
        id: SocketId,
        change: impl FnOnce(&mut Options),
    ) -> Result<u64, OptionError> {
        let socket = socket_mut!(self, id, OptionError::UnknownSocket);
        let before = socket.options.buffer_size;
        change(&mut socket.options);
        socket.credit.buf_alloc = socket.options.clamp_buffer_size(socket.transport);
        // `vsock_update_buffer_size`: a changed size is announced once there is a transport,
        // whatever the state (connecting included).
        if socket.options.buffer_size != before && socket.transport {
            self.out.send(socket, Op::CreditUpdate, 0, Payload::new());
        }
        Ok(socket.options.buffer_size)
    }

    /// The buffer size as (size, min, max).
    pub fn buffer_sizes(&self, id: SocketId) -> Result<(u64, u64, u64), OptionError> {
        let o = socket_ref!(self, id, OptionError::UnknownSocket).options;
        Ok((o.buffer_size, o.buffer_min, o.buffer_max))
    }

    /// SO_VM_SOCKETS_CONNECT_TIMEOUT.
    pub fn set_connect_timeout(
        &mut self,
        id: SocketId,
        timeout: Duration,
    ) -> Result<(), OptionError> {
        if timeout.is_zero() {
            return Err(OptionError::InvalidValue);
        }
        socket_mut!(self, id, OptionError::UnknownSocket).options.connect_timeout = timeout;
        Ok(())
    }

    /// SO_RCVLOWAT; above the buffer size is EINVAL. May send a credit update.
    pub fn set_rcvlowat(&mut self, id: SocketId, bytes: u32) -> Result<(), OptionError> {
        let socket = socket_mut!(self, id, OptionError::UnknownSocket);
        if u64::from(bytes) > socket.options.buffer_size {
            return Err(OptionError::InvalidValue);
        }
        socket.options.rcvlowat = bytes.max(1);
        // `virtio_transport_notify_set_rcvlowat` looks at the value as given (0 stays 0).
        if socket.state == State::Established && socket.credit.update_due_for_rcvlowat(bytes) {
            self.out.send(socket, Op::CreditUpdate, 0, Payload::new());
        }
        Ok(())
    }

    /// SO_RCVLOWAT.
    pub fn rcvlowat(&self, id: SocketId) -> Result<u32, OptionError> {
        Ok(socket_ref!(self, id, OptionError::UnknownSocket).options.rcvlowat)
    }

    /// The socket's state.
    pub fn state(&self, id: SocketId) -> Option<State> {
        self.sockets.get(&id).filter(|s| !s.orphan).map(|s| s.state)
    }

    /// The socket's type.
    pub fn socket_type(&self, id: SocketId) -> Option<SocketType> {
        self.sockets.get(&id).map(|s| s.socket_type)
    }

    /// The local address, once bound.
    pub fn local_addr(&self, id: SocketId) -> Option<Addr> {
        self.sockets.get(&id).and_then(|s| s.local)
    }

    /// The peer's address, once connecting or connected.
    pub fn peer_addr(&self, id: SocketId) -> Option<Addr> {
        self.sockets.get(&id).and_then(|s| s.remote)
    }

    /// The connection a packet from `remote` to `local` belongs to, as the engine would find it
    /// (listeners aside).
    pub fn find_connection(&self, local: Addr, remote: Addr) -> Option<SocketId> {
        let any = Addr::new(zerovsock_wire::Cid::ANY, local.port);
        self.connected.get(&(local, remote)).or_else(|| self.connected.get(&(any, remote))).copied()
    }

    /// The receive queue as Linux accounts it, for metrics and tests.
    pub fn receive_queue(&self, id: SocketId) -> Option<QueueStats> {
        let socket = self.sockets.get(&id)?;
        let (packets, messages) = socket.rx.counts();
        Some(QueueStats {
            packets,
            messages,
            unread_bytes: socket.credit.rx_bytes,
            charged_bytes: socket.credit.buf_used,
            buf_alloc: socket.credit.buf_alloc,
        })
    }

    /// Unread bytes (SIOCINQ).
    pub fn unread_bytes(&self, id: SocketId) -> usize {
        self.sockets.get(&id).map_or(0, |s| s.credit.rx_bytes as usize)
    }

    /// What `poll` would report.
    pub fn readiness(&self, id: SocketId) -> Readiness {
        let Some(socket) = self.sockets.get(&id).filter(|s| !s.orphan) else {
            return Readiness {
                readable: true,
                writable: true,
                error: true,
                hangup: true,
                read_closed: true,
            };
        };
        let peer_gone = socket.done || socket.peer_shutdown.contains(ShutdownFlags::SEND);
        let readable = match socket.state {
            State::Listening => socket.listen.as_ref().is_some_and(|l| !l.pending.is_empty()),
            _ => {
                let enough = match socket.socket_type {
                    // SO_RCVLOWAT sets how much must be queued before POLLIN (`notify_poll_in`).
                    SocketType::Stream => socket.credit.rx_bytes >= socket.options.rcvlowat,
                    SocketType::Seqpacket => socket.has_unread(),
                };
                enough
                    || peer_gone
                    || socket.error.is_some()
                    || socket.shutdown.contains(ShutdownFlags::RECEIVE)
            }
        };
        let writable = match socket.send_blocked_by() {
            Some(_) => socket.state != State::Connecting && socket.state != State::Listening,
            None => socket.credit.send_space() > 0,
        };
        Readiness {
            readable,
            writable,
            error: socket.error.is_some() || socket.ledger.has_pending(),
            // As `vsock_poll`: POLLHUP when this side shut both ways, or both sides shut
            // sending; POLLRDHUP when no more data can arrive.
            hangup: socket.shutdown == ShutdownFlags::all()
                || (socket.shutdown.contains(ShutdownFlags::SEND)
                    && socket.peer_shutdown.contains(ShutdownFlags::SEND)),
            read_closed: peer_gone || socket.shutdown.contains(ShutdownFlags::RECEIVE),
        }
    }
}
