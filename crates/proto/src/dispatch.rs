//! Incoming packets and timers: dispatch on (state, op) to small handlers, after
//! `virtio_transport_recv_pkt` and friends.

use std::time::Instant;

use zerovsock_wire::{
    Addr, Cid, Header, Op, Port, Repr, ShutdownFlags, SocketType, WireError, HEADER_LEN,
    MAX_PACKET_PAYLOAD,
};

use crate::engine::Engine;
use crate::error::SocketError;
use crate::packet::{Packet, Payload};
use crate::rx::Overrun;
use crate::socket::{Options, Socket, SocketId, State};

/// What happened to a packet handed to [`Engine::handle_packet`], for counters and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// A socket took it.
    Delivered,
    /// Nobody wanted it; answered with RST (unless it was an RST).
    Refused,
    /// Not addressed to this endpoint, or meaningless here; dropped without reply.
    Dropped,
    /// It broke the protocol; the connection it belonged to was reset.
    Violation,
    /// Its connection's receive queue already held as many packets as the buffer size allows
    /// and collapsing made no room, so the connection was reset (ENOBUFS), as Linux does,
    /// although the peer kept within its credit.
    QueueFull,
}

impl Engine {
    /// Handles one packet from the transport.
    ///
    /// Timers already due at `now` fire first: a RESPONSE that arrives after the connect
    /// deadline finds the attempt failed, as it would have if the driver had been on time.
    pub fn handle_packet(&mut self, now: Instant, packet: Packet) -> Disposition {
        if self.poll_timeout().is_some_and(|deadline| deadline <= now) {
            self.handle_timeout(now);
        }
        self.poll_completions();
        let repr = packet.repr;
        if repr.dst.cid != self.config.local_cid {
            return Disposition::Dropped;
        }
        let Some(id) = self.lookup(&repr) else {
            self.out.reset_reply(&repr);
            return Disposition::Refused;
        };
        let Some(socket) = self.sockets.get_mut(&id) else { return Disposition::Dropped };
        // A socket the peer already reset or closed (`SOCK_DONE`) wants nothing more from it.
        if socket.socket_type != repr.socket_type || socket.done {
            self.out.reset_reply(&repr);
            return Disposition::Refused;
        }
        let state = socket.state;
        self.take_credit(id, &repr);
        match state {
            State::Listening => self.on_listening(id, packet),
            State::Connecting => self.on_connecting(id, &repr),
            State::Established => self.on_established(id, packet),
            State::Closing => self.on_closing(id, &repr),
            State::Unconnected => {
                self.out.reset_reply(&repr);
                Disposition::Refused
            }
        }
    }

    /// The peer at `cid` is gone (its device was released, its VM stopped): every connection
    /// to it ends as if it had sent RST, so the application sees ECONNRESET and nothing is
    /// sent to it. `vhost_vsock_reset_orphans` does this when a guest's vhost device is
    /// released.
    pub fn reset_peer(&mut self, now: Instant, cid: Cid) {
        let peers: Vec<(SocketId, Addr, Addr, SocketType)> = self
            .connected
            .iter()
            .filter(|((_, remote), _)| remote.cid == cid)
            .filter_map(|((local, remote), id)| {
                self.sockets.get(id).map(|s| (*id, *local, *remote, s.socket_type))
            })
            .collect();
        for (id, local, remote, socket_type) in peers {
            let local = Addr::new(self.config.local_cid, local.port);
            let rst = Repr::new(Op::Rst, socket_type, remote, local);
            self.handle_packet(now, Packet::control(rst));
            // Unlike a peer's RST, this is an error (`sk_err = ECONNRESET`).
            if let Some(socket) = self.sockets.get_mut(&id).filter(|s| !s.orphan) {
                socket.error.get_or_insert(SocketError::ConnectionReset);
                self.out.wake(id, socket);
            }
            // The peer's next life may reuse these addresses (a guest restarted with the same
            // ports): it must reach a listener, not this dead connection. Linux leaves the
            // socket listed until its application releases it.
            self.unlist(id);
        }
        // The RSTs were the peer's; nothing answers them, but drop anything queued for it.
        self.out.transmit.retain(|packet| packet.repr.dst.cid != cid);
    }

    /// Handles raw bytes of a header (for transports that carry bytes). A header that does not
    /// parse is answered as Linux answers it: an unknown op goes to its socket like any packet
    /// and is dropped by an established one (`virtio_transport_recv_connected`, `default:`);
    /// anything else long enough to answer gets an RST, as an invalid type does.
    pub fn handle_bytes(
        &mut self,
        now: Instant,
        header: &[u8],
        payload: Payload,
    ) -> Result<Disposition, WireError> {
        match Repr::parse_bytes(header) {
            Ok(repr) => Ok(self.handle_packet(now, Packet::data(repr, payload))),
            Err(error) => {
                if let Ok(view) = Header::new_checked(header) {
                    if let WireError::UnknownOp(_) = error {
                        self.handle_unknown_op(now, header, &view);
                    } else if view.op() != Op::Rst as u16 {
                        self.reset_malformed(&view);
                    }
                }
                Err(error)
            }
        }
    }

    /// A header that is valid but for its op: dispatched on the state of the socket it
    /// reaches, as `virtio_transport_recv_pkt` does with ops it does not know.
    fn handle_unknown_op(&mut self, now: Instant, header: &[u8], view: &Header<&[u8]>) {
        // Parse it as if it were INVALID: every other field is checked as usual.
        let mut bytes = [0u8; HEADER_LEN];
        bytes.copy_from_slice(&header[..HEADER_LEN]);
        bytes[30..32].copy_from_slice(&(Op::Invalid as u16).to_le_bytes());
        let Ok(repr) = Repr::parse_bytes(&bytes) else {
            self.reset_malformed(view);
            return;
        };
        if self.poll_timeout().is_some_and(|deadline| deadline <= now) {
            self.handle_timeout(now);
        }
        if repr.dst.cid != self.config.local_cid {
            return;
        }
        let socket = self.lookup(&repr).and_then(|id| Some((id, self.sockets.get(&id)?)));
        let Some((id, socket)) =
            socket.filter(|(_, s)| s.socket_type == repr.socket_type && !s.done)
        else {
            self.out.reset_reply(&repr);
            return;
        };
        let state = socket.state;
        self.take_credit(id, &repr);
        match state {
            State::Established | State::Closing => {}
            State::Connecting => {
                self.reset_socket(id);
                self.fail_connect(id, SocketError::Protocol);
            }
            _ => self.out.reset_reply(&repr),
        }
    }

    /// `virtio_transport_space_update`, then `sk_write_space` when there is room: any packet
    /// may carry credit, whatever its op, so a writer waiting for it is woken.
    fn take_credit(&mut self, id: SocketId, repr: &Repr) {
        let Some(socket) = self.sockets.get_mut(&id) else { return };
        if socket.state == State::Listening {
            return;
        }
        let before = socket.credit.send_space();
        socket.credit.update_from_peer(repr.buf_alloc, repr.fwd_cnt);
        if socket.credit.send_space() > before {
            self.out.wake(id, socket);
        }
    }

    /// RST from `id` itself, stamped with its credit (`virtio_transport_reset`).
    fn reset_socket(&mut self, id: SocketId) {
        if let Some(socket) = self.sockets.get_mut(&id) {
            self.out.send(socket, Op::Rst, 0, Payload::new());
        }
    }

    fn reset_malformed(&mut self, view: &Header<&[u8]>) {
        let (Ok(src), Ok(dst)) = (u32::try_from(view.src_cid()), u32::try_from(view.dst_cid()))
        else {
            return;
        };
        if Cid(dst) != self.config.local_cid {
            return;
        }
        let to = Addr::new(Cid(src), Port(view.src_port()));
        let from = Addr::new(Cid(dst), Port(view.dst_port()));
        // An unknown type cannot be echoed in a typed header; STREAM is the type every peer knows.
        let rst = Repr::new(Op::Rst, SocketType::Stream, from, to);
        self.out.transmit.push_back(Packet::control(rst));
    }

    /// The connected table first, then a listener on the port (`virtio_transport_recv_pkt`).
    fn lookup(&self, repr: &Repr) -> Option<SocketId> {
        if let Some(id) = self.connected.get(&(repr.dst, repr.src)) {
            return Some(*id);
        }
        // Connected sockets may have been bound to CID ANY.
        let any = Addr::new(Cid::ANY, repr.dst.port);
        if let Some(id) = self.connected.get(&(any, repr.src)) {
            return Some(*id);
        }
        let Some(&id) = self.bound.get(&repr.dst.port) else {
            return self
                .unclaimed
                .filter(|id| self.sockets.get(id).is_some_and(|s| s.state == State::Listening));
        };
        let socket = self.sockets.get(&id)?;
        let cid_ok = socket.local.is_some_and(|l| l.cid == Cid::ANY || l.cid == repr.dst.cid);
        // A bound socket that is not listening only takes packets from its own peer, and those
        // matched the connected table above (`vsock_check_source`).
        (cid_ok && socket.state == State::Listening).then_some(id)
    }

    fn on_listening(&mut self, listener: SocketId, packet: Packet) -> Disposition {
        let repr = packet.repr;
        if repr.op != Op::Request {
            self.out.reset_reply(&repr);
            return Disposition::Refused;
        }
        let Some(parent) = self.sockets.get(&listener) else { return Disposition::Dropped };
        let full =
            parent.listen.as_ref().is_none_or(|l| l.pending.len() as u64 > u64::from(l.backlog));
        let seqpacket_refused = repr.socket_type == SocketType::Seqpacket && !self.config.seqpacket;
        let shut = !parent.shutdown.is_empty();
        if full || seqpacket_refused || shut || self.sockets.len() >= self.config.max_sockets {
            self.out.reset_reply(&repr);
            return Disposition::Refused;
        }
        // `__vsock_create`: a child inherits the connect timeout and the buffer sizes; its
        // SO_ZEROCOPY and SO_RCVLOWAT start at the defaults.
        let mut options: Options = parent.options;
        options.zerocopy = false;
        options.rcvlowat = 1;
        let deferred = parent.listen.as_ref().is_some_and(|l| l.deferred);
        let child = self.accept_child(repr, options, deferred);
        if let Some(parent) = self.sockets.get_mut(&listener) {
            if let Some(listen) = parent.listen.as_mut() {
                listen.pending.push_back(child);
            }
            self.out.wake(listener, parent);
        }
        if let Some(socket) = self.sockets.get_mut(&child) {
            socket.parent = Some(listener);
        }
        Disposition::Delivered
    }

    /// A child straight in ESTABLISHED, answered with RESPONSE (there is no third step), or
    /// for a deferring listener left unanswered until [`Engine::confirm`].
    fn accept_child(&mut self, request: Repr, options: Options, deferred: bool) -> SocketId {
        let id = self.open_with(request.socket_type, options);
        if let Some(socket) = self.sockets.get_mut(&id) {
            socket.local = Some(request.dst);
            socket.remote = Some(request.src);
            socket.state = State::Established;
            socket.credit.update_from_peer(request.buf_alloc, request.fwd_cnt);
            socket.unconfirmed = deferred;
            if !deferred {
                self.out.send(socket, Op::Response, 0, Payload::new());
            }
        }
        self.connected.insert((request.dst, request.src), id);
        id
    }

    fn open_with(&mut self, socket_type: SocketType, options: Options) -> SocketId {
        // `open` only fails at the socket limit, which the caller has checked.
        let id = self.open(socket_type).unwrap_or_else(|_| unreachable!("socket limit checked"));
        if let Some(socket) = self.sockets.get_mut(&id) {
            *socket = Socket::new(socket_type, options, self.config.notification_limit, true);
        }
        id
    }

    fn on_connecting(&mut self, id: SocketId, repr: &Repr) -> Disposition {
        match repr.op {
            Op::Response => {
                self.set_timer(id, None);
                if let Some(socket) = self.sockets.get_mut(&id) {
                    socket.state = State::Established;
                    self.out.wake(id, socket);
                }
                Disposition::Delivered
            }
            Op::Invalid => Disposition::Dropped,
            Op::Rst => {
                self.fail_connect(id, SocketError::ConnectionReset);
                Disposition::Delivered
            }
            _ => {
                self.reset_socket(id);
                self.fail_connect(id, SocketError::Protocol);
                Disposition::Violation
            }
        }
    }

    pub(crate) fn fail_connect(&mut self, id: SocketId, error: SocketError) {
        self.set_timer(id, None);
        let Some(socket) = self.sockets.get_mut(&id) else { return };
        if let (Some(local), Some(remote)) = (socket.local, socket.remote) {
            self.connected.remove(&(local, remote));
        }
        socket.state = State::Unconnected;
        socket.remote = None;
        socket.error = Some(error);
        self.out.wake(id, socket);
    }

    fn on_established(&mut self, id: SocketId, packet: Packet) -> Disposition {
        let repr = packet.repr;
        match repr.op {
            Op::Rw => self.on_data(id, packet),
            Op::CreditRequest => {
                if let Some(socket) = self.sockets.get_mut(&id) {
                    self.out.send(socket, Op::CreditUpdate, 0, Payload::new());
                }
                Disposition::Delivered
            }
            Op::CreditUpdate => {
                self.wake(id);
                Disposition::Delivered
            }
            Op::Shutdown => self.on_shutdown(id, repr.shutdown_flags()),
            Op::Rst => self.on_reset(id),
            Op::Request | Op::Response | Op::Invalid => Disposition::Dropped,
        }
    }

    fn on_data(&mut self, id: SocketId, packet: Packet) -> Disposition {
        let repr = packet.repr;
        let Some(socket) = self.sockets.get_mut(&id) else { return Disposition::Dropped };
        let malformed = repr.len as usize != packet.payload.len() || repr.len > MAX_PACKET_PAYLOAD;
        if malformed {
            return self.reset_violation(id, SocketError::Protocol);
        }
        if socket.orphan || (repr.len == 0 && socket.socket_type == SocketType::Stream) {
            return Disposition::Dropped;
        }
        // Linux keeps the flags of STREAM packets too: a STREAM packet marked EOM is counted
        // and never merged or collapsed (`virtio_transport_recv_enqueue`).
        let flags = repr.seq_flags();
        match socket.rx.enqueue(&mut socket.credit, packet.payload, flags, packet.pinned) {
            Ok(()) => {}
            Err(Overrun::Credit) => return self.reset_violation(id, SocketError::CreditExceeded),
            Err(Overrun::QueueLength) => {
                self.reset_violation(id, SocketError::CreditExceeded);
                return Disposition::QueueFull;
            }
        }
        self.out.wake(id, socket);
        Disposition::Delivered
    }

    /// The peer broke the rules: RST it and fail the connection (Linux: RST + ENOBUFS).
    fn reset_violation(&mut self, id: SocketId, error: SocketError) -> Disposition {
        if let Some(socket) = self.sockets.get_mut(&id) {
            self.out.send(socket, Op::Rst, 0, Payload::new());
            socket.error = Some(error);
            socket.mark_done();
            self.out.wake(id, socket);
            if socket.orphan {
                self.remove(id);
            } else {
                // `vsock_remove_sock`: the peer may connect again from the same port.
                self.unlist(id);
            }
        }
        Disposition::Violation
    }

    fn on_shutdown(&mut self, id: SocketId, flags: ShutdownFlags) -> Disposition {
        let Some(socket) = self.sockets.get_mut(&id) else { return Disposition::Dropped };
        socket.peer_shutdown |= flags;
        self.out.wake(id, socket);
        if socket.peer_shutdown != ShutdownFlags::all() {
            return Disposition::Delivered;
        }
        if !socket.has_unread_bytes() && !socket.done {
            self.out.send(socket, Op::Rst, 0, Payload::new());
            socket.mark_done();
        }
        if socket.orphan {
            self.remove(id);
        } else {
            // The peer may reuse its port at once, even before this socket is released.
            self.unlist(id);
        }
        Disposition::Delivered
    }

    fn on_reset(&mut self, id: SocketId) -> Disposition {
        let Some(socket) = self.sockets.get_mut(&id) else { return Disposition::Dropped };
        socket.mark_done();
        self.out.wake(id, socket);
        if socket.orphan {
            self.remove(id);
        }
        Disposition::Delivered
    }

    fn on_closing(&mut self, id: SocketId, repr: &Repr) -> Disposition {
        if repr.op == Op::Rst {
            return self.on_reset(id);
        }
        Disposition::Dropped
    }

    fn wake(&mut self, id: SocketId) {
        if let Some(socket) = self.sockets.get_mut(&id) {
            self.out.wake(id, socket);
        }
    }

    /// Fires every timer due at `now`: connect timeouts and close timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.poll_completions();
        while let Some(&(deadline, id)) = self.timers.first() {
            if deadline > now {
                break;
            }
            self.timers.pop_first();
            let Some(socket) = self.sockets.get_mut(&id) else { continue };
            socket.deadline = None;
            match socket.state {
                State::Connecting if !socket.orphan => {
                    // `vsock_connect_timeout` -> `vsock_transport_cancel_pkt`: the REQUEST
                    // still waiting in the transport must not go out late.
                    if let (Some(local), Some(remote)) = (socket.local, socket.remote) {
                        let local = Addr::new(self.config.local_cid, local.port);
                        self.out.cancels.push((local, remote));
                    }
                    self.fail_connect(id, SocketError::TimedOut)
                }
                _ if socket.orphan => {
                    if !socket.done {
                        self.out.send(socket, Op::Rst, 0, Payload::new());
                    }
                    self.remove(id);
                }
                _ => {}
            }
        }
    }
}
