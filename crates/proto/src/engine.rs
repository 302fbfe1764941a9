//! The engine: every socket of one endpoint, and the calls an application makes on them.
//!
//! Incoming packets and timers are handled in `dispatch.rs`; this file holds the
//! application-facing half (open, bind, listen, connect, send, receive, options, close).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use zerovsock_wire::{
    Addr, Cid, Op, Port, Repr, SeqFlags, ShutdownFlags, SocketType, MAX_PACKET_PAYLOAD,
};

use crate::error::*;
use crate::packet::{Packet, Payload};
use crate::rx::RecvLease;
use crate::socket::{Listen, Options, Socket, SocketId, State};
use crate::zerocopy::{guard_payload, CompletionSink, DEFAULT_NOTIFICATION_LIMIT};

/// `VSOCK_DEFAULT_CONNECT_TIMEOUT`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `VSOCK_CLOSE_TIMEOUT`: how long a closed socket waits for the peer's RST.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(8);

/// What the engine is, and what its transport can do.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This endpoint's CID: packets are sent from it and must be addressed to it.
    pub local_cid: Cid,
    /// The transport supports MSG_ZEROCOPY (`msgzerocopy_allow`); EOPNOTSUPP otherwise.
    pub zerocopy: bool,
    /// The transport negotiated SEQPACKET.
    pub seqpacket: bool,
    /// Per-socket bound on outstanding plus queued zerocopy notifications.
    pub notification_limit: u32,
    /// Default connect timeout for new sockets.
    pub connect_timeout: Duration,
    /// How long a closed connection waits for the peer's RST before sending one.
    pub close_timeout: Duration,
    /// Upper bound on live sockets, orphans and unaccepted connections included.
    pub max_sockets: usize,
    /// First port tried for automatic binding.
    pub ephemeral_start: u32,
}

impl EngineConfig {
    /// Defaults as Linux has them, for an endpoint with CID `local_cid`.
    pub fn new(local_cid: Cid) -> EngineConfig {
        EngineConfig {
            local_cid,
            zerocopy: true,
            seqpacket: true,
            notification_limit: DEFAULT_NOTIFICATION_LIMIT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            close_timeout: CLOSE_TIMEOUT,
            max_sockets: 65_536,
            ephemeral_start: 1 << 30,
        }
    }
}

/// What one send pass may do, decided by [`Engine::begin_send`].
///
/// The caller builds a payload of exactly [`SendGrant::len`] bytes (copying when
/// [`SendGrant::must_copy`]) and hands it to [`Engine::finish_send`], or gives the grant back with
/// [`Engine::abort_send`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a grant holds credit until it is finished or aborted"]
pub struct SendGrant {
    socket: SocketId,
    len: usize,
    zerocopy: Option<ZerocopyPass>,
    end_of_message: bool,
    eor: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ZerocopyPass {
    id: u32,
    copied: bool,
}

impl SendGrant {
    /// Bytes this pass sends.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the pass sends nothing (only for an empty message).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The payload must be a copy: either this is not a zerocopy pass, or it fell back to
    /// copying (it will complete with COPIED).
    pub fn must_copy(&self) -> bool {
        self.zerocopy.is_none_or(|pass| pass.copied)
    }

    /// The completion id of this pass, when it is a zerocopy pass.
    pub fn completion_id(&self) -> Option<u32> {
        self.zerocopy.map(|pass| pass.id)
    }
}

/// One send pass as the application asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRequest {
    /// Bytes of the message not yet sent.
    pub remaining: usize,
    /// The pass starts where one of the caller's buffers starts (`iov_offset == 0` in
    /// `virtio_transport_can_zcopy`): the first pass of a message, or a later one that begins
    /// on a buffer boundary of a vectored send. Only such a pass may be zerocopy.
    pub at_segment_start: bool,
    /// MSG_ZEROCOPY.
    pub zerocopy: bool,
    /// MSG_EOR (SEQPACKET).
    pub eor: bool,
    /// Send at most this much in this pass. A driver that copies may send a copy-mode message
    /// in several smaller passes so the peer starts reading before the copy is done; the
    /// zerocopy decision still looks at the whole remaining message.
    pub max_pass: usize,
}

/// The protocol engine. See the crate documentation for the model.
#[derive(Debug)]
pub struct Engine {
    pub(crate) config: EngineConfig,
    /// Keyed by ids the engine hands out, so a fast hash is safe; the tables below are keyed
    /// by addresses a peer chooses and keep the DoS-resistant default.
    pub(crate) sockets: FxHashMap<SocketId, Socket>,
    next_socket: u64,
    pub(crate) bound: HashMap<Port, SocketId>,
    pub(crate) connected: HashMap<(Addr, Addr), SocketId>,
    /// The listener for ports no socket is bound to ([`Engine::listen_unclaimed`]).
    pub(crate) unclaimed: Option<SocketId>,
    pub(crate) out: Outbox,
    pub(crate) timers: BTreeSet<(Instant, SocketId)>,
    next_ephemeral: u32,
    pub(crate) sink: CompletionSink,
}

/// Packets to transmit and sockets to wake.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub(crate) transmit: VecDeque<Packet>,
    pub(crate) wakeups: Vec<SocketId>,
    /// Connections whose packets still queued in the transport are void (`cancel_pkt`).
    pub(crate) cancels: Vec<(Addr, Addr)>,
}

/// The header of a packet from `socket`, stamped with its credit (`virtio_transport_inc_tx_pkt`:
/// the peer now knows its `fwd_cnt`); `None` before it has both addresses.
fn stamped(socket: &mut Socket, op: Op, flags: u32) -> Option<Repr> {
    let (Some(local), Some(remote)) = (socket.local, socket.remote) else { return None };
    let (buf_alloc, fwd_cnt) = socket.credit.stamp();
    Some(Repr { flags, buf_alloc, fwd_cnt, ..Repr::new(op, socket.socket_type, local, remote) })
}

impl Outbox {
    /// Sends a packet from `socket`, stamped with its credit (`virtio_transport_inc_tx_pkt`).
    pub(crate) fn send(&mut self, socket: &mut Socket, op: Op, flags: u32, payload: Payload) {
        self.send_data(socket, op, flags, payload, false);
    }

    /// [`Outbox::send`] for data that may be the application's own memory (`pinned`).
    pub(crate) fn send_data(
        &mut self,
        socket: &mut Socket,
        op: Op,
        flags: u32,
        payload: Payload,
        pinned: bool,
    ) {
        let Some(repr) = stamped(socket, op, flags) else { return };
        self.transmit.push_back(Packet { pinned, ..Packet::data(repr, payload) });
    }

    /// RST in answer to a packet no socket wants (`virtio_transport_reset_no_sock`).
    pub(crate) fn reset_reply(&mut self, to: &Repr) {
        if to.op != Op::Rst {
            self.transmit.push_back(Packet::control(to.reply(Op::Rst)));
        }
    }

    pub(crate) fn wake(&mut self, id: SocketId, socket: &mut Socket) {
        if !socket.wake_queued {
            socket.wake_queued = true;
            self.wakeups.push(id);
        }
    }
}

impl Engine {
    /// An engine with no sockets.
    pub fn new(config: EngineConfig) -> Engine {
        Engine {
            next_ephemeral: config.ephemeral_start,
            config,
            sockets: FxHashMap::default(),
            next_socket: 0,
            bound: HashMap::new(),
            connected: HashMap::new(),
            unclaimed: None,
            out: Outbox::default(),
            timers: BTreeSet::new(),
            sink: CompletionSink::default(),
        }
    }

    /// The transport renegotiated SEQPACKET (a device learns it from the driver's features,
    /// per session): from now on SEQPACKET connects and REQUESTs follow `enabled`
    /// (`seqpacket_allow`).
    pub fn set_seqpacket(&mut self, enabled: bool) {
        self.config.seqpacket = enabled;
    }

    /// The configuration the engine was built with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Live sockets, orphans included.
    pub fn socket_count(&self) -> usize {
        self.sockets.len()
    }

    /// Creates an unbound socket.
    pub fn open(&mut self, socket_type: SocketType) -> Result<SocketId, OpenError> {
        if self.sockets.len() >= self.config.max_sockets {
            return Err(OpenError::TooManySockets);
        }
        let id = SocketId(self.next_socket);
        self.next_socket += 1;
        let options = Options::new(self.config.connect_timeout);
        let socket = Socket::new(socket_type, options, self.config.notification_limit, false);
        self.sockets.insert(id, socket);
        Ok(id)
    }

    /// Binds to `addr`. The CID must be [`Cid::ANY`] or this engine's; [`Port::ANY`] picks a
    /// free port. Returns the bound address.
    pub fn bind(&mut self, id: SocketId, addr: Addr) -> Result<Addr, BindError> {
        let socket = socket_ref!(self, id, BindError::UnknownSocket);
        if socket.local.is_some() {
            return Err(BindError::AlreadyBound);
        }
        if addr.cid != Cid::ANY && addr.cid != self.config.local_cid {
            return Err(BindError::AddrNotAvailable);
        }
        let port = if addr.port == Port::ANY {
            self.ephemeral_port().ok_or(BindError::AddrNotAvailable)?
        } else if self.bound.contains_key(&addr.port) {
            return Err(BindError::AddrInUse);
        } else {
            addr.port
        };
        let local = Addr::new(addr.cid, port);
        self.bound.insert(port, id);
        let socket = socket_mut!(self, id, BindError::UnknownSocket);
        socket.local = Some(local);
        socket.bound = true;
        Ok(local)
    }

    /// `__vsock_bind_connectible`: a counter above the reserved ports, 24 tries.
    fn ephemeral_port(&mut self) -> Option<Port> {
        for _ in 0..24 {
            let port = Port(self.next_ephemeral);
            self.next_ephemeral = self.next_ephemeral.wrapping_add(1);
            if self.next_ephemeral == u32::MAX || self.next_ephemeral <= 1023 {
                self.next_ephemeral = 1024;
            }
            if !self.bound.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }

    /// Starts listening with room for `backlog` pending connections.
    pub fn listen(&mut self, id: SocketId, backlog: u32) -> Result<(), ListenError> {
        let socket = socket_mut!(self, id, ListenError::UnknownSocket);
        match socket.state {
            State::Unconnected if socket.bound => {}
            State::Listening => {}
            _ => return Err(ListenError::InvalidState),
        }
        socket.state = State::Listening;
        socket.listen.get_or_insert_with(Listen::default).backlog = backlog;
        Ok(())
    }

    /// Listens on every port that no socket is bound to, and defers each answer: a REQUEST
    /// queues a child as `listen` does, but nothing is sent until the application decides.
    /// [`Engine::confirm`] sends the RESPONSE; closing the child unconfirmed answers RST, so
    /// the peer's connect fails with ECONNRESET as if nobody had listened. The backlog bounds
    /// the children waiting for a decision.
    ///
    /// This is for a proxy that must reach its own endpoint before it can accept (a device's
    /// hybrid Unix sockets); Linux has no such socket. One per engine; the socket must be
    /// unbound.
    pub fn listen_unclaimed(&mut self, id: SocketId, backlog: u32) -> Result<(), ListenError> {
        if self.unclaimed.is_some_and(|other| other != id) {
            return Err(ListenError::InvalidState);
        }
        let socket = socket_mut!(self, id, ListenError::UnknownSocket);
        if socket.state != State::Unconnected || socket.bound {
            return Err(ListenError::InvalidState);
        }
        socket.local = Some(Addr::new(Cid::ANY, Port::ANY));
        socket.state = State::Listening;
        socket.listen = Some(Listen { backlog, pending: VecDeque::new(), deferred: true });
        self.unclaimed = Some(id);
        Ok(())
    }

    /// Answers a connection accepted from [`Engine::listen_unclaimed`] with RESPONSE. Returns
    /// false if it is no longer there to answer (the peer reset it meanwhile) or was answered.
    pub fn confirm(&mut self, id: SocketId) -> bool {
        let Some(socket) = self.sockets.get_mut(&id) else { return false };
        if !socket.unconfirmed || socket.done || socket.state != State::Established {
            return false;
        }
        socket.unconfirmed = false;
        self.out.send(socket, Op::Response, 0, Payload::new());
        self.out.wake(id, socket);
        true
    }

    /// Takes the oldest connection a listener has accepted.
    pub fn accept(&mut self, id: SocketId) -> Result<SocketId, AcceptError> {
        let socket = socket_mut!(self, id, AcceptError::UnknownSocket);
        let listen = socket.listen.as_mut().filter(|_| socket.state == State::Listening);
        let child = listen.ok_or(AcceptError::NotListening)?.pending.pop_front();
        let child = child.ok_or(AcceptError::WouldBlock)?;
        if let Some(socket) = self.sockets.get_mut(&child) {
            socket.parent = None;
        }
        Ok(child)
    }

    /// Sends REQUEST to `remote`. The outcome arrives later: see [`Engine::connect_result`].
    pub fn connect(
        &mut self,
        now: Instant,
        id: SocketId,
        remote: Addr,
    ) -> Result<(), ConnectError> {
        if remote.cid == Cid::ANY || remote.port == Port::ANY {
            return Err(ConnectError::InvalidAddress);
        }
        let socket = socket_mut!(self, id, ConnectError::UnknownSocket);
        match socket.state {
            State::Unconnected => {}
            State::Connecting => return Err(ConnectError::InProgress),
            State::Established | State::Closing => return Err(ConnectError::AlreadyConnected),
            State::Listening => return Err(ConnectError::InvalidState),
        }
        if socket.options.zerocopy && !self.config.zerocopy {
            return Err(ConnectError::ZerocopyUnsupported);
        }
        if socket.socket_type == SocketType::Seqpacket && !self.config.seqpacket {
            return Err(ConnectError::SeqpacketUnsupported);
        }
        if socket.local.is_none() {
            self.bind(id, Addr::new(Cid::ANY, Port::ANY))
                .map_err(|_| ConnectError::AddrNotAvailable)?;
        }
        let local_cid = self.config.local_cid;
        let socket = socket_mut!(self, id, ConnectError::UnknownSocket);
        let local = socket.local.map(|a| Addr::new(local_cid, a.port));
        let local = local.ok_or(ConnectError::AddrNotAvailable)?;
        if self.connected.contains_key(&(local, remote)) {
            return Err(ConnectError::AddrNotAvailable);
        }
        socket.local = Some(local);
        socket.remote = Some(remote);
        socket.state = State::Connecting;
        socket.assign_transport();
        socket.credit.buf_alloc = socket.options.clamp_buffer_size(true);
        socket.error = None;
        socket.done = false;
        socket.peer_shutdown = ShutdownFlags::empty();
        socket.shutdown = ShutdownFlags::empty();
        let deadline = now + socket.options.connect_timeout;
        self.out.send(socket, Op::Request, 0, Payload::new());
        self.connected.insert((local, remote), id);
        self.set_timer(id, Some(deadline));
        Ok(())
    }

    /// `Ok(true)` once connected, `Ok(false)` while pending, the failure otherwise (reported
    /// once, as `SO_ERROR` is).
    pub fn connect_result(&mut self, id: SocketId) -> Result<bool, ConnectError> {
        let socket = socket_mut!(self, id, ConnectError::UnknownSocket);
        match socket.state {
            State::Connecting => Ok(false),
            State::Established | State::Closing => Ok(true),
            _ => match socket.error.take() {
                Some(error) => Err(ConnectError::Failed(error)),
                None => Err(ConnectError::InvalidState),
            },
        }
    }

    /// Shuts down one or both directions; tells the peer with SHUTDOWN.
    pub fn shutdown(&mut self, id: SocketId, how: ShutdownFlags) -> Result<(), ShutdownError> {
        let socket = socket_mut!(self, id, ShutdownError::UnknownSocket);
        if !matches!(socket.state, State::Established | State::Closing | State::Connecting) {
            return Err(ShutdownError::NotConnected);
        }
        socket.shutdown |= how;
        // `vsock_shutdown` tells the peer in any connected or connecting state.
        self.out.send(socket, Op::Shutdown, how.bits(), Payload::new());
        self.out.wake(id, socket);
        Ok(())
    }

    /// The application is done with the socket (`close()`). Connections close gracefully in
    /// the background: SHUTDOWN now, and RST when the peer answers or the close timeout passes.
    pub fn close(&mut self, now: Instant, id: SocketId) {
        let Some(socket) = self.sockets.get_mut(&id).filter(|s| !s.orphan) else { return };
        if socket.unconfirmed {
            // Never answered: refuse it as a port nobody listens on would be.
            if !socket.done {
                self.out.send(socket, Op::Rst, 0, Payload::new());
            }
            self.remove(id);
            return;
        }
        match socket.state {
            State::Listening => self.close_listener(now, id),
            State::Established | State::Closing => self.close_connection(now, id),
            _ => self.remove(id),
        }
    }

    /// `virtio_transport_close`: RST at once if the peer already shut both ways (a reset counts:
    /// it sets both), else SHUTDOWN(RCV|SEND) unless both were sent, and an orphan that the
    /// peer's RST or the close timeout removes. The orphan drops its unread data at once.
    fn close_connection(&mut self, now: Instant, id: SocketId) {
        let Some(socket) = self.sockets.get_mut(&id) else { return };
        if socket.peer_shutdown == ShutdownFlags::all() {
            self.out.send(socket, Op::Rst, 0, Payload::new());
            self.remove(id);
            return;
        }
        if socket.shutdown != ShutdownFlags::all() {
            self.out.send(socket, Op::Shutdown, ShutdownFlags::all().bits(), Payload::new());
        }
        socket.shutdown = ShutdownFlags::all();
        socket.orphan = true;
        socket.parent = None;
        socket.rx = Default::default();
        socket.credit.drop_unread();
        let deadline = now + self.config.close_timeout;
        self.set_timer(id, Some(deadline));
    }

    /// `__vsock_release` of a listener: connections not yet accepted are closed as if their
    /// application had closed them.
    fn close_listener(&mut self, now: Instant, id: SocketId) {
        let pending = self.sockets.get_mut(&id).and_then(|s| s.listen.take()).unwrap_or_default();
        for child in pending.pending {
            let unconfirmed = self.sockets.get(&child).is_some_and(|s| s.unconfirmed);
            if unconfirmed {
                self.close(now, child);
            } else {
                self.close_connection(now, child);
            }
        }
        self.remove(id);
    }

    /// Removes a socket from the lookup tables but keeps it for its application.
    pub(crate) fn unlist(&mut self, id: SocketId) {
        let Some(socket) = self.sockets.get_mut(&id) else { return };
        if let (Some(local), Some(remote)) = (socket.local, socket.remote) {
            if self.connected.get(&(local, remote)) == Some(&id) {
                self.connected.remove(&(local, remote));
            }
        }
        if let Some(local) = socket.local.filter(|_| socket.bound) {
            if self.bound.get(&local.port) == Some(&id) {
                self.bound.remove(&local.port);
            }
            socket.bound = false;
        }
    }

    /// Forgets a socket entirely: tables, timer, and any completions still to come.
    pub(crate) fn remove(&mut self, id: SocketId) {
        if self.unclaimed == Some(id) {
            self.unclaimed = None;
        }
        self.unlist(id);
        let Some(socket) = self.sockets.remove(&id) else { return };
        if let Some(deadline) = socket.deadline {
            self.timers.remove(&(deadline, id));
        }
        if let Some(parent) = socket.parent.and_then(|p| self.sockets.get_mut(&p)) {
            if let Some(listen) = parent.listen.as_mut() {
                listen.pending.retain(|c| *c != id);
            }
        }
    }

    pub(crate) fn set_timer(&mut self, id: SocketId, deadline: Option<Instant>) {
        let Some(socket) = self.sockets.get_mut(&id) else { return };
        if let Some(old) = socket.deadline.take() {
            self.timers.remove(&(old, id));
        }
        if let Some(deadline) = deadline {
            socket.deadline = Some(deadline);
            self.timers.insert((deadline, id));
        }
    }

    /// Bytes a send could take right now.
    pub fn send_space(&self, id: SocketId) -> usize {
        self.sockets.get(&id).map_or(0, |s| s.credit.send_space() as usize)
    }

    /// Decides one transport send pass (`virtio_transport_send_pkt_info`, steps 1-4): reserves
    /// credit, and for a zerocopy pass takes the next completion id and decides COPIED.
    ///
    /// The checks come in `vsock_connectible_sendmsg`'s order (EPIPE, ENOTCONN, then
    /// EOPNOTSUPP for MSG_ZEROCOPY). An empty message passes them and is granted zero bytes:
    /// Linux's send loop never runs for it, so nothing goes on the wire and no id is taken.
    pub fn begin_send(
        &mut self,
        id: SocketId,
        request: SendRequest,
    ) -> Result<SendGrant, SendError> {
        let config_zerocopy = self.config.zerocopy;
        let socket = socket_mut!(self, id, SendError::UnknownSocket);
        if let Some(error) = socket.send_refused() {
            return Err(error);
        }
        if request.zerocopy && !config_zerocopy {
            return Err(SendError::ZerocopyUnsupported);
        }
        let seqpacket = socket.socket_type == SocketType::Seqpacket;
        let empty =
            SendGrant { socket: id, len: 0, zerocopy: None, end_of_message: false, eor: false };
        if request.remaining == 0 {
            return Ok(empty);
        }
        // The send loop: an error ends the wait for space; no space is EAGAIN; then, on every
        // pass, `virtio_transport_seqpacket_enqueue` refuses a rest larger than the buffers.
        if let Some(error) = socket.error {
            return Err(SendError::Failed(error));
        }
        if socket.credit.send_space() == 0 {
            return Err(SendError::WouldBlock);
        }
        if seqpacket && request.remaining > socket.credit.message_limit() as usize {
            return Err(SendError::MessageTooLong);
        }
        let want = u32::try_from(request.remaining.min(request.max_pass)).unwrap_or(u32::MAX);
        let granted = socket.credit.reserve(want);
        let zerocopy = if request.zerocopy && socket.options.zerocopy {
            let Ok(pass_id) = socket.ledger.allocate() else {
                socket.credit.unreserve(granted);
                return Err(SendError::NotificationBudget);
            };
            let whole = request.at_segment_start && request.remaining <= granted as usize;
            Some(ZerocopyPass { id: pass_id, copied: !whole })
        } else {
            None
        };
        Ok(SendGrant {
            len: granted as usize,
            zerocopy,
            end_of_message: seqpacket && granted as usize == request.remaining,
            eor: request.eor,
            ..empty
        })
    }

    /// Gives a grant back unsent: credit returns and a zerocopy id is reused.
    pub fn abort_send(&mut self, grant: SendGrant) {
        if let Some(socket) = self.sockets.get_mut(&grant.socket) {
            socket.credit.unreserve(grant.len as u32);
            if let Some(pass) = grant.zerocopy {
                socket.ledger.abort(pass.id);
            }
        }
    }

    /// Sends the pass's payload as RW packets of at most 64 KiB (`virtio_transport_send_pkt_info`,
    /// step 5). `payload` must hold exactly `grant.len()` bytes.
    pub fn finish_send(&mut self, grant: SendGrant, payload: Payload) -> Result<usize, SendError> {
        assert_eq!(payload.len(), grant.len, "payload does not match its grant");
        let Some(socket) = self.sockets.get_mut(&grant.socket).filter(|s| !s.orphan) else {
            return Err(SendError::UnknownSocket);
        };
        if let Some(error) = socket.send_blocked_by() {
            self.abort_send(grant);
            return Err(error);
        }
        let payload = match grant.zerocopy {
            Some(pass) => guard_payload(&self.sink, grant.socket, pass.id, pass.copied, payload),
            None => payload,
        };
        let pinned = grant.zerocopy.is_some_and(|pass| !pass.copied);
        let mut offset = 0;
        while offset < grant.len {
            let chunk = (grant.len - offset).min(MAX_PACKET_PAYLOAD as usize);
            let last = offset + chunk == grant.len;
            let mut flags = SeqFlags::empty();
            if last && grant.end_of_message {
                flags |= SeqFlags::EOM;
                if grant.eor {
                    flags |= SeqFlags::EOR;
                }
            }
            let chunk_payload = payload.slice(offset, chunk);
            self.out.send_data(socket, Op::Rw, flags.bits(), chunk_payload, pinned);
            offset += chunk;
        }
        Ok(grant.len)
    }

    /// Finishes a copy-mode STREAM pass whose bytes the caller has already written where the
    /// peer reads them (a device's `readv` from a host socket straight into guest RX buffers):
    /// the first `len` bytes of the grant were sent, the rest of its credit comes back, and the
    /// header of the one RW packet that carries them is returned instead of queued. The caller
    /// delivers it in front of those bytes, before any packet it transmits afterwards, so the
    /// peer sees `fwd_cnt` in order. `None` when `len` is 0 (the grant is given back).
    ///
    /// STREAM only (a message cannot be cut where a `readv` stopped). The grant must be a copy
    /// pass of at most one packet (64 KiB) and `len` at most its length; a grant that cannot be finished (the socket was shut down or reset since, by
    /// the same lock holder) is given back and its error returned, as [`Engine::finish_send`].
    pub fn finish_placed(
        &mut self,
        grant: SendGrant,
        len: usize,
    ) -> Result<Option<Repr>, SendError> {
        assert!(grant.zerocopy.is_none(), "a placed pass copies: it has no completion id");
        assert!(len <= grant.len && grant.len <= MAX_PACKET_PAYLOAD as usize);
        let Some(socket) = self.sockets.get_mut(&grant.socket).filter(|s| !s.orphan) else {
            return Err(SendError::UnknownSocket);
        };
        assert_eq!(socket.socket_type, SocketType::Stream, "only a STREAM pass can be placed");
        if let Some(error) = socket.send_blocked_by() {
            self.abort_send(grant);
            return Err(error);
        }
        socket.credit.unreserve((grant.len - len) as u32);
        if len == 0 {
            return Ok(None);
        }
        let repr = stamped(socket, Op::Rw, 0).ok_or(SendError::NotConnected)?;
        Ok(Some(Repr { len: len as u32, ..repr }))
    }

    /// Describes what a read of up to `max` bytes returns, without consuming it. An empty lease
    /// is end of stream. Commit it with [`Engine::commit_recv`] unless peeking.
    ///
    /// A zero-length read consumes nothing and never waits (`__vsock_connectible_recvmsg`):
    /// an empty lease on a connected (or peer-closed) socket, ENOTCONN otherwise.
    pub fn recv(&mut self, id: SocketId, max: usize) -> Result<RecvLease, RecvError> {
        self.recv_at_least(id, 1, max)
    }

    /// STREAM: [`Engine::recv`] that waits (`WouldBlock`) until `min` bytes are queued, unless
    /// no more can come (end of stream, an error, a shutdown), when it hands out what there is.
    /// This is readability under SO_RCVLOWAT, for callers that read once per wake-up.
    ///
    /// In `__vsock_connectible_recvmsg`'s order: a socket not connected reads end of stream if
    /// the peer closed it (`SOCK_DONE`), else ENOTCONN; then SHUT_RD and a zero-length read give
    /// end of stream; then queued data; then the socket's error, which stays (a STREAM read
    /// reports it again and again, as Linux's `sk_err` is not cleared by reads).
    pub fn recv_at_least(
        &mut self,
        id: SocketId,
        min: usize,
        max: usize,
    ) -> Result<RecvLease, RecvError> {
        let socket = socket_mut!(self, id, RecvError::UnknownSocket);
        let end_of_stream = RecvLease {
            data: Payload::new(),
            consume: 0,
            message_len: 0,
            eor: false,
            position: 0,
            message: false,
        };
        if socket.state != State::Established {
            return if socket.done { Ok(end_of_stream) } else { Err(RecvError::NotConnected) };
        }
        if socket.shutdown.contains(ShutdownFlags::RECEIVE) || max == 0 {
            return Ok(end_of_stream);
        }
        let ending = socket.error.is_some()
            || socket.done
            || socket.peer_shutdown.contains(ShutdownFlags::SEND);
        let lease = match socket.socket_type {
            SocketType::Stream if ending || socket.credit.rx_bytes as usize >= min.min(max) => {
                Some(socket.rx.lease_stream(max)).filter(|l| !l.is_empty())
            }
            SocketType::Stream => None,
            SocketType::Seqpacket => socket.rx.lease_message(max),
        };
        if let Some(lease) = lease {
            return Ok(lease);
        }
        if let Some(error) = socket.error {
            return Err(RecvError::Failed(error));
        }
        if ending {
            return Ok(end_of_stream);
        }
        Err(RecvError::WouldBlock)
    }

    /// How many bytes a blocking STREAM read of `len` bytes gathers before it returns
    /// (`sock_rcvlowat`: SO_RCVLOWAT, at most `len`, at least 1); `None` when the read returns
    /// without looking at data (not connected, SHUT_RD, zero length). ENOMEM when the target is
    /// not below the buffer size, as `__vsock_stream_recvmsg` refuses a target the queue can
    /// never hold (peeks included).
    pub fn recv_target(&self, id: SocketId, len: usize) -> Result<Option<usize>, RecvError> {
        let socket = socket_ref!(self, id, RecvError::UnknownSocket);
        if socket.state != State::Established
            || socket.shutdown.contains(ShutdownFlags::RECEIVE)
            || len == 0
            || socket.socket_type != SocketType::Stream
        {
            return Ok(None);
        }
        let target = (socket.options.rcvlowat as usize).min(len).max(1);
        if target as u64 >= u64::from(socket.credit.buf_alloc) {
            return Err(RecvError::TargetExceedsBuffer);
        }
        Ok(Some(target))
    }

    /// Consumes a lease from [`Engine::recv`] and sends CREDIT_UPDATE where Linux would.
    pub fn commit_recv(&mut self, id: SocketId, lease: RecvLease) {
        let Some(socket) = self.sockets.get_mut(&id).filter(|s| !s.orphan) else { return };
        if lease.consume == 0 && !lease.message {
            return;
        }
        if !socket.rx.commit(&mut socket.credit, &lease) {
            return;
        }
        drop(lease);
        let update = match socket.socket_type {
            SocketType::Stream => {
                socket.credit.update_due_after_stream_read(socket.options.rcvlowat)
            }
            SocketType::Seqpacket => true,
        };
        if update && socket.state == State::Established && !socket.done {
            self.out.send(socket, Op::CreditUpdate, 0, Payload::new());
        }
        self.poll_completions();
    }

    /// The next packet to hand to the transport.
    pub fn poll_transmit(&mut self) -> Option<Packet> {
        self.out.transmit.pop_front()
    }

    /// A connection whose packets, if the transport still holds any, must not be sent: a
    /// connect that timed out takes back its REQUEST (`vsock_transport_cancel_pkt`). Given as
    /// (local, remote) addresses, as in the packets' `src` and `dst`.
    pub fn poll_cancel(&mut self) -> Option<(Addr, Addr)> {
        self.out.cancels.pop()
    }

    /// The next socket whose readiness may have changed.
    pub fn poll_wakeup(&mut self) -> Option<SocketId> {
        self.poll_completions();
        let id = self.out.wakeups.pop()?;
        if let Some(socket) = self.sockets.get_mut(&id) {
            socket.wake_queued = false;
        }
        Some(id)
    }

    /// When [`Engine::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(deadline, _)| *deadline)
    }

    /// Sets what is called when a zerocopy payload's last piece is dropped and its completion
    /// queued (set once; later calls are ignored). Payloads are often dropped outside the
    /// engine, on whichever thread consumed them (a transport's, say); the completion reaches
    /// its socket's error queue only at the next engine call, so the notifier should make one
    /// happen soon: Linux wakes the socket from the skb's destructor (`sk_error_report`). It
    /// runs on the dropping thread, possibly under that thread's own locks, so it must not
    /// wait for anything, the engine least of all.
    pub fn set_completion_notifier(&mut self, notify: impl Fn() + Send + Sync + 'static) {
        self.sink.set_notifier(Arc::new(notify));
    }

    /// Moves completions reported by dropped payloads onto their sockets' error queues.
    pub fn poll_completions(&mut self) {
        if self.sink.is_empty() {
            return;
        }
        for (id, pass, copied) in self.sink.drain() {
            let Some(socket) = self.sockets.get_mut(&id).filter(|s| !s.orphan) else { continue };
            socket.ledger.complete(pass, copied);
            self.out.wake(id, socket);
        }
    }
}
