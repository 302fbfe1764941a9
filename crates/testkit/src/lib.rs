//! Simulation for tests: two protocol engines (a host at CID 2 and a guest at CID 3) joined by
//! an in-order, lossless link, under a virtual clock, driven by a sequence of operations.
//!
//! [`Sim::run`] decodes operations from arbitrary bytes (so the same driver serves property
//! tests and the fuzzer) and checks, after every step, the invariants two honest peers must
//! keep:
//!
//! * neither engine ever sees a protocol violation from the other (credit is never exceeded);
//!   a reset for receive-queue length is allowed only where Linux makes it too (a buffer too
//!   small to hold three packets, or SEQPACKET message ends that cannot be collapsed);
//! * every byte a reader gets is the next byte its peer sent on that connection, and every
//!   SEQPACKET message arrives whole, once, in order, with its full length reported (its data
//!   truncated only by the reader's own buffer); each message carries distinct bytes, so a
//!   duplicated, reordered or merged message is seen;
//! * zerocopy completions cover only ids that were handed out, each exactly once, with the
//!   COPIED flag of the pass that starts the range;
//! * before the end, once every packet is delivered and every reader has read, everything sent
//!   has arrived and every zerocopy pass whose data was consumed has completed;
//! * once everything is closed and the close timeout has passed, no socket is left.
//!
//! Buffer sizes change through the run (listeners and growing connections), and bursts of
//! small sends reach the receive queue's length bound, where the engine collapses packets.
//!
//! ```
//! let report = zerovsock_testkit::Sim::run(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
//! assert!(report.steps > 0);
//! ```

#![forbid(unsafe_code)]

#[cfg(feature = "guest-driver")]
pub mod guest;
pub mod hostile;
pub mod measure;
pub mod suite;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use zerovsock_proto::{
    Disposition, Engine, EngineConfig, Packet, Payload, QueueStats, RecvError, SendError,
    SendRequest, SocketId, State,
};
use zerovsock_wire::{Addr, Cid, Op, Port, ShutdownFlags, SocketType};

const CIDS: [Cid; 2] = [Cid(2), Cid(3)];
/// Listeners: STREAM on the first port, SEQPACKET on the second.
const LISTEN_PORTS: [Port; 2] = [Port(1234), Port(1235)];
/// Sizes the buffer-size operation picks from (besides arbitrary ones): around the queue
/// bound's thresholds (two and three 576-byte packets) and Linux's defaults.
const BUFFER_SIZES: [u64; 8] = [1024, 1728, 2304, 4096, 16384, 65536, 262_144, 1 << 20];
/// Collapsed packets stay below this (`MAX_COLLAPSE_LEN`); used to bound honest queue lengths.
const COLLAPSE_LIMIT: usize = QueueStats::COLLAPSE_LIMIT as usize;

fn kind(socket_type: SocketType) -> usize {
    usize::from(socket_type == SocketType::Seqpacket)
}

/// One simulated socket, as the application sees it.
#[derive(Debug)]
struct SimSocket {
    side: usize,
    id: SocketId,
    socket_type: SocketType,
    zerocopy: bool,
    /// Zerocopy ids handed out, with whether the pass was to complete COPIED.
    passes: HashMap<u32, bool>,
    completed: HashSet<u32>,
    /// This side shut down receiving: what is queued is never read.
    shut_receive: bool,
}

/// Connections are told apart by (sender's address, receiver's address).
type FlowKey = (Addr, Addr);

/// What one direction of a connection has sent and its reader has not read yet.
#[derive(Debug)]
enum Flow {
    Stream(VecDeque<u8>),
    Seqpacket(VecDeque<Vec<u8>>),
}

impl Flow {
    fn is_empty(&self) -> bool {
        match self {
            Flow::Stream(bytes) => bytes.is_empty(),
            Flow::Seqpacket(messages) => messages.is_empty(),
        }
    }
}

/// What a run did, for tests that want to see that it did something.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Operations applied.
    pub steps: usize,
    /// Connections established.
    pub connections: usize,
    /// Payload bytes delivered to readers and checked against what was sent.
    pub bytes_delivered: u64,
    /// SEQPACKET messages received and checked.
    pub messages: usize,
    /// Zerocopy completions read.
    pub completions: usize,
    /// Data packets that arrived at a receive queue already at its length bound (each makes the
    /// engine collapse the queue first).
    pub queue_bound_hits: usize,
    /// Connections reset for receive-queue length, where Linux resets them too.
    pub queue_resets: usize,
    /// Buffer-size changes applied.
    pub buffer_changes: usize,
}

/// Two engines and the link between them.
pub struct Sim {
    engines: [Engine; 2],
    links: [VecDeque<Packet>; 2],
    now: Instant,
    sockets: Vec<SimSocket>,
    /// Per side, per kind (see [`LISTEN_PORTS`]).
    listeners: [[Option<SocketId>; 2]; 2],
    flows: HashMap<FlowKey, Flow>,
    /// Connections reset by their receiver: what is sent on them from now on cannot arrive.
    refused: HashSet<FlowKey>,
    /// Source of the bytes sent: every byte of a run is drawn from one counter, so no two
    /// messages or stretches of a stream look alike.
    next_byte: u64,
    report: Report,
}

/// Reads operation arguments from the input, as a fuzzer would have it; runs out gracefully.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    fn size(&mut self) -> Option<usize> {
        let high = self.byte()? as usize;
        let low = self.byte()? as usize;
        // Mostly small, sometimes past one packet or a whole buffer.
        Some(match high >> 6 {
            0 | 1 => low,
            2 => (high & 0x3f) << 8 | low,
            _ => ((high & 0x3f) << 12 | low << 4) + 1,
        })
    }
}

/// The byte drawn for position `n` of the run (a fixed scramble of the counter).
fn byte_at(n: u64) -> u8 {
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

impl Sim {
    /// A host and a guest with default configuration, each with a listener for each type.
    pub fn new() -> Sim {
        Sim::with(|_| {})
    }

    /// Like [`Sim::new`], with the engines' configuration adjusted first.
    // The virtual clock needs an origin; from there on time only moves through `advance`.
    #[allow(clippy::disallowed_methods)]
    pub fn with(tune: impl Fn(&mut EngineConfig)) -> Sim {
        let engine = |cid| {
            let mut config = EngineConfig::new(cid);
            tune(&mut config);
            Engine::new(config)
        };
        Sim {
            engines: [engine(CIDS[0]), engine(CIDS[1])],
            links: [VecDeque::new(), VecDeque::new()],
            now: Instant::now(),
            sockets: Vec::new(),
            listeners: [[None; 2]; 2],
            flows: HashMap::new(),
            refused: HashSet::new(),
            next_byte: 0,
            report: Report::default(),
        }
    }

    /// Decodes and applies operations from `input`, checking invariants after each; then
    /// drains, checks that everything sent arrived, closes everything and checks that nothing
    /// is left. Panics on a broken invariant.
    pub fn run(input: &[u8]) -> Report {
        let mut sim = Sim::new();
        let mut input = Input(input);
        while let Some(op) = input.byte() {
            if sim.apply(op, &mut input).is_none() {
                break;
            }
            sim.report.steps += 1;
        }
        sim.finish();
        sim.report
    }

    fn apply(&mut self, op: u8, input: &mut Input<'_>) -> Option<()> {
        match op % 14 {
            0 => {
                let selector = input.byte()?;
                let socket_type =
                    if selector & 2 == 0 { SocketType::Stream } else { SocketType::Seqpacket };
                self.listen(selector as usize % 2, socket_type)
            }
            1 => self.connect(input.byte()? as usize % 2, input.byte()?),
            2 => self.accept_all(),
            3 => self.send(input.byte()?, input.size()?, false),
            4 => self.send(input.byte()?, input.size()?, true),
            5 => {
                self.recv(input.byte()?, input.size()?);
            }
            6 => self.deliver(input.byte()? as usize),
            7 => self.advance(Duration::from_millis(u64::from(input.byte()?) * 40)),
            8 => self.shutdown(input.byte()?, input.byte()?),
            9 => self.close(input.byte()?),
            10 => self.set_zerocopy(input.byte()?),
            11 => self.completions(input.byte()?),
            12 => self.set_buffer_size(input.byte()?, input.byte()?, input.byte()?),
            _ => self.burst(input.byte()?, input.byte()?, input.byte()?),
        }
        self.check_sockets();
        Some(())
    }

    fn pick(&self, selector: u8) -> Option<usize> {
        (!self.sockets.is_empty()).then(|| selector as usize % self.sockets.len())
    }

    fn listen(&mut self, side: usize, socket_type: SocketType) {
        if self.listeners[side][kind(socket_type)].is_some() {
            return;
        }
        let engine = &mut self.engines[side];
        let Ok(id) = engine.open(socket_type) else { return };
        let port = LISTEN_PORTS[kind(socket_type)];
        engine.bind(id, Addr::new(Cid::ANY, port)).expect("listen port is free");
        engine.listen(id, 4).expect("bound socket listens");
        self.listeners[side][kind(socket_type)] = Some(id);
    }

    fn connect(&mut self, side: usize, flavour: u8) {
        let socket_type = if flavour % 2 == 0 { SocketType::Stream } else { SocketType::Seqpacket };
        let engine = &mut self.engines[side];
        let Ok(id) = engine.open(socket_type) else { return };
        if flavour & 0x80 != 0 {
            // A client with a buffer of its own, set before connecting.
            let size = BUFFER_SIZES[usize::from(flavour >> 1) % BUFFER_SIZES.len()];
            let _ = engine.set_buffer_max_size(id, size.max(262_144));
            let _ = engine.set_buffer_size(id, size);
        }
        let peer = Addr::new(CIDS[1 - side], LISTEN_PORTS[kind(socket_type)]);
        if engine.connect(self.now, id, peer).is_ok() {
            self.adopt(side, id, socket_type);
        }
    }

    fn adopt(&mut self, side: usize, id: SocketId, socket_type: SocketType) {
        self.sockets.push(SimSocket {
            side,
            id,
            socket_type,
            zerocopy: false,
            passes: HashMap::new(),
            completed: HashSet::new(),
            shut_receive: false,
        });
    }

    fn accept_all(&mut self) {
        for (side, listener) in self.all_listeners() {
            while let Ok(child) = self.engines[side].accept(listener) {
                let socket_type =
                    self.engines[side].socket_type(child).expect("accepted socket exists");
                self.adopt(side, child, socket_type);
                self.report.connections += 1;
            }
        }
    }

    fn all_listeners(&self) -> Vec<(usize, SocketId)> {
        (0..2)
            .flat_map(|side| self.listeners[side].iter().flatten().map(move |id| (side, *id)))
            .collect()
    }

    /// The key of what `socket` sends, once it is connected.
    fn outgoing(&self, socket: &SimSocket) -> Option<FlowKey> {
        let engine = &self.engines[socket.side];
        Some((engine.local_addr(socket.id)?, engine.peer_addr(socket.id)?))
    }

    /// The key of what `socket` receives.
    fn incoming(&self, socket: &SimSocket) -> Option<FlowKey> {
        self.outgoing(socket).map(|(local, peer)| (peer, local))
    }

    fn send(&mut self, selector: u8, size: usize, zerocopy: bool) {
        let Some(index) = self.pick(selector) else { return };
        let socket = &self.sockets[index];
        let engine = &mut self.engines[socket.side];
        let seqpacket = socket.socket_type == SocketType::Seqpacket;
        // SEQPACKET messages are sent only when they fit in one pass, so that none is left half
        // sent (the simulated application never abandons a message).
        if seqpacket && engine.send_space(socket.id) < size {
            return;
        }
        let request = SendRequest {
            remaining: size,
            at_segment_start: true,
            zerocopy,
            eor: false,
            max_pass: usize::MAX,
        };
        let grant = match engine.begin_send(socket.id, request) {
            Ok(grant) => grant,
            Err(SendError::ZerocopyUnsupported) => panic!("loopback engines support zerocopy"),
            Err(_) => return,
        };
        let id = grant.completion_id();
        let copied = grant.must_copy();
        let len = grant.len();
        let start = self.next_byte;
        let data: Vec<u8> = (0..len as u64).map(|i| byte_at(start + i)).collect();
        if engine.finish_send(grant, Payload::from_bytes(Bytes::from(data.clone()))).is_err() {
            return;
        }
        self.next_byte += len as u64;
        if let Some(id) = id {
            let fresh = self.sockets[index].passes.insert(id, copied).is_none();
            assert!(fresh, "zerocopy id {id} handed out twice");
        }
        if len == 0 {
            return;
        }
        let key = self.outgoing(&self.sockets[index]).expect("a socket that sent is connected");
        if self.refused.contains(&key) {
            // Sent before the sender heard of the reset; the receiver refuses it.
            return;
        }
        let flow = self.flows.entry(key).or_insert_with(|| match seqpacket {
            true => Flow::Seqpacket(VecDeque::new()),
            false => Flow::Stream(VecDeque::new()),
        });
        match flow {
            Flow::Stream(bytes) => bytes.extend(data),
            Flow::Seqpacket(messages) => messages.push_back(data),
        }
    }

    /// `count` small sends on one socket in a row, to reach queue bounds with little input.
    fn burst(&mut self, selector: u8, count: u8, size: u8) {
        for _ in 0..=count % 64 {
            self.send(selector, usize::from(size), size & 1 == 1);
        }
    }

    /// One read; returns whether it got data (or a message).
    fn recv(&mut self, selector: u8, max: usize) -> bool {
        let Some(index) = self.pick(selector) else { return false };
        self.recv_at(index, max)
    }

    fn recv_at(&mut self, index: usize, max: usize) -> bool {
        let key = self.incoming(&self.sockets[index]);
        let socket = &mut self.sockets[index];
        let engine = &mut self.engines[socket.side];
        let Ok(lease) = engine.recv(socket.id, max) else { return false };
        let data = lease.payload().to_vec();
        let is_message = socket.socket_type == SocketType::Seqpacket && lease.message_len() > 0;
        if data.is_empty() && !is_message {
            engine.commit_recv(socket.id, lease);
            return false;
        }
        let flow = key.and_then(|key| self.flows.get_mut(&key));
        match flow.expect("data arrived on a connection nobody sent on") {
            Flow::Stream(sent) => {
                assert!(data.len() <= sent.len(), "more bytes arrived than were sent");
                for (i, byte) in data.iter().enumerate() {
                    assert_eq!(Some(*byte), sent.pop_front(), "stream byte {i} of this read");
                }
            }
            Flow::Seqpacket(sent) => {
                let message = sent.pop_front().expect("a message arrived that was never sent");
                assert_eq!(lease.message_len(), message.len(), "whole message length");
                assert_eq!(data.len(), message.len().min(max), "truncated only to the buffer");
                assert_eq!(&data[..], &message[..data.len()], "message content");
                self.report.messages += 1;
            }
        }
        self.report.bytes_delivered += data.len() as u64;
        engine.commit_recv(socket.id, lease);
        true
    }

    /// Moves up to `count` packets across the link, each direction in order.
    fn deliver(&mut self, count: usize) {
        self.collect();
        for _ in 0..count.max(1) {
            let mut moved = false;
            for from in 0..2 {
                if let Some(packet) = self.links[from].pop_front() {
                    self.deliver_one(1 - from, packet);
                    moved = true;
                }
            }
            self.collect();
            if !moved {
                break;
            }
        }
    }

    fn deliver_one(&mut self, to: usize, packet: Packet) {
        let (local, remote) = (packet.repr.dst, packet.repr.src);
        let target = self.engines[to].find_connection(local, remote);
        let before = target.and_then(|id| self.engines[to].receive_queue(id));
        if packet.repr.op == Op::Rw && before.is_some_and(|q| q.packets >= q.packet_limit()) {
            self.report.queue_bound_hits += 1;
        }
        match self.engines[to].handle_packet(self.now, packet) {
            Disposition::Violation => panic!("an honest peer broke the protocol"),
            Disposition::QueueFull => {
                let id = target.expect("a queue-length reset has a connection");
                self.queue_reset(to, id, (remote, local));
            }
            _ => {}
        }
    }

    /// A connection was reset because its receive queue was full: check that Linux would have
    /// reset it too, and forget what can no longer arrive.
    fn queue_reset(&mut self, side: usize, id: SocketId, key: FlowKey) {
        let engine = &self.engines[side];
        let queue = engine.receive_queue(id).expect("the reset socket is still there");
        let honest_entries = match engine.socket_type(id) {
            // A partly read packet and one more that cannot merge with anything.
            Some(SocketType::Stream) => 2,
            // Every message end is its own entry, and each may follow one uncollapsed packet.
            _ => 2 * (queue.messages + 1) + queue.charged_bytes as usize / COLLAPSE_LIMIT,
        };
        assert!(
            queue.packet_limit() <= honest_entries,
            "queue-length reset that Linux would not make: {queue:?}"
        );
        self.report.queue_resets += 1;
        self.refused.insert(key);
        // What is queued stays readable; the rest was refused.
        match self.flows.get_mut(&key) {
            Some(Flow::Stream(bytes)) => bytes.truncate(queue.unread_bytes as usize),
            Some(Flow::Seqpacket(messages)) => messages.truncate(queue.messages),
            None => {}
        }
    }

    fn collect(&mut self) {
        for side in 0..2 {
            while let Some(packet) = self.engines[side].poll_transmit() {
                assert_eq!(packet.repr.len as usize, packet.payload.len());
                assert!(packet.repr.len <= zerovsock_wire::MAX_PACKET_PAYLOAD);
                self.links[side].push_back(packet);
            }
            while self.engines[side].poll_wakeup().is_some() {}
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        for engine in &mut self.engines {
            engine.handle_timeout(self.now);
        }
        self.collect();
    }

    fn shutdown(&mut self, selector: u8, how: u8) {
        let Some(index) = self.pick(selector) else { return };
        let flags = ShutdownFlags::from_bits_truncate(u32::from(how % 3 + 1));
        let socket = &mut self.sockets[index];
        if self.engines[socket.side].shutdown(socket.id, flags).is_ok() {
            socket.shut_receive |= flags.contains(ShutdownFlags::RECEIVE);
        }
    }

    fn close(&mut self, selector: u8) {
        let Some(index) = self.pick(selector) else { return };
        let key = self.incoming(&self.sockets[index]);
        let socket = self.sockets.swap_remove(index);
        self.engines[socket.side].close(self.now, socket.id);
        // Unread data dies with the reader.
        if let Some(key) = key {
            self.flows.remove(&key);
        }
    }

    fn set_zerocopy(&mut self, selector: u8) {
        let Some(index) = self.pick(selector) else { return };
        let socket = &mut self.sockets[index];
        if self.engines[socket.side].set_zerocopy(socket.id, true).is_ok() {
            socket.zerocopy = true;
        }
    }

    /// Sets a listener's buffer size (its future connections inherit it), or grows a
    /// connection's. Shrinking a live connection's buffer can make packets already in flight
    /// exceed it, which Linux resets as it would any overrun; honest applications do not.
    fn set_buffer_size(&mut self, target: u8, choice: u8, extra: u8) {
        let size = match choice as usize {
            c if c < 4 * BUFFER_SIZES.len() => BUFFER_SIZES[c % BUFFER_SIZES.len()],
            c => (c as u64) << 8 | u64::from(extra),
        };
        let (side, id) = if target & 1 == 0 {
            let side = usize::from(target >> 1) % 2;
            let Some(id) = self.listeners[side][usize::from(target >> 2) % 2] else { return };
            (side, id)
        } else {
            let Some(index) = self.pick(target >> 1) else { return };
            let socket = &self.sockets[index];
            let (current, _, _) =
                self.engines[socket.side].buffer_sizes(socket.id).ok().unwrap_or_default();
            if size < current {
                return;
            }
            (socket.side, socket.id)
        };
        let engine = &mut self.engines[side];
        let _ = engine.set_buffer_max_size(id, size.max(262_144));
        if engine.set_buffer_size(id, size).is_ok() {
            self.report.buffer_changes += 1;
        }
    }

    fn completions(&mut self, selector: u8) {
        let Some(index) = self.pick(selector) else { return };
        self.completions_at(index);
    }

    fn completions_at(&mut self, index: usize) {
        let socket = &mut self.sockets[index];
        let engine = &mut self.engines[socket.side];
        while let Ok(Some(completion)) = engine.recv_completion(socket.id) {
            assert!(socket.zerocopy, "completion on a socket without SO_ZEROCOPY");
            let first = socket.passes.get(&completion.lo);
            let first = first.unwrap_or_else(|| panic!("completion {completion:?}: unknown id"));
            assert_eq!(completion.copied, *first, "a range keeps its first pass's COPIED flag");
            for offset in 0..completion.count() {
                let id = completion.lo.wrapping_add(offset as u32);
                assert!(socket.passes.contains_key(&id), "id {id} was never handed out");
                assert!(socket.completed.insert(id), "id {id} completed twice");
            }
            self.report.completions += 1;
        }
    }

    fn check_sockets(&self) {
        for socket in &self.sockets {
            let state = self.engines[socket.side].state(socket.id);
            assert!(state.is_some(), "a socket the application holds disappeared");
            assert_ne!(state, Some(State::Listening));
        }
    }

    /// Delivers everything and lets every reader read all it can; then everything sent must
    /// have arrived, and every zerocopy pass whose data was consumed must have completed.
    fn drain_and_check(&mut self) {
        self.accept_all();
        for _ in 0..64 {
            self.deliver(usize::MAX);
            let mut progress = false;
            for index in 0..self.sockets.len() {
                while self.recv_at(index, usize::MAX) {
                    progress = true;
                }
            }
            if !progress && self.links.iter().all(VecDeque::is_empty) {
                break;
            }
        }
        for index in 0..self.sockets.len() {
            let socket = &self.sockets[index];
            let readable = !socket.shut_receive
                && matches!(
                    self.engines[socket.side].recv(socket.id, 0),
                    Ok(_) | Err(RecvError::WouldBlock)
                );
            if let Some(flow) = self.incoming(socket).and_then(|key| self.flows.get(&key)) {
                if readable
                    && self.engines[socket.side].state(socket.id) != Some(State::Unconnected)
                {
                    assert!(flow.is_empty(), "data sent but never received: {flow:?}");
                }
            }
            self.completions_at(index);
            let socket = &self.sockets[index];
            let consumed = self
                .outgoing(socket)
                .and_then(|key| self.flows.get(&key))
                .is_none_or(Flow::is_empty)
                && !self.peer_of(socket).is_some_and(|peer| peer.shut_receive);
            if consumed {
                let missing: Vec<u32> = socket
                    .passes
                    .keys()
                    .filter(|id| !socket.completed.contains(id))
                    .copied()
                    .collect();
                assert!(missing.is_empty(), "passes consumed but never completed: {missing:?}");
            }
        }
    }

    /// The simulated socket at the other end of `socket`'s connection, if the application
    /// holds it.
    fn peer_of(&self, socket: &SimSocket) -> Option<&SimSocket> {
        let key = self.outgoing(socket)?;
        self.sockets.iter().find(|other| self.incoming(other) == Some(key))
    }

    /// Checks the drained state, closes everything, lets the close handshakes and timeouts
    /// run, and checks that both engines are empty.
    fn finish(&mut self) {
        self.drain_and_check();
        for socket in std::mem::take(&mut self.sockets) {
            self.engines[socket.side].close(self.now, socket.id);
        }
        for (side, listener) in self.all_listeners() {
            self.engines[side].close(self.now, listener);
        }
        self.listeners = [[None; 2]; 2];
        for _ in 0..4 {
            self.deliver(usize::MAX);
            self.advance(Duration::from_secs(9));
        }
        self.deliver(usize::MAX);
        let left = [self.engines[0].socket_count(), self.engines[1].socket_count()];
        assert_eq!(left, [0, 0], "sockets leaked (host, guest)");
    }
}

impl Default for Sim {
    fn default() -> Sim {
        Sim::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A scripted run: connect, exchange data both ways, zerocopy, close.
    #[test]
    fn scripted_exchange_delivers_and_cleans_up() {
        let script = [
            0, 0, // host listens (stream)
            1, 1, 0, // guest connects, stream
            6, 4, // deliver
            2, // accept
            3, 0, 0x90, 0x00, // guest socket 0 sends 4 KiB
            6, 8, // deliver
            5, 1, 0xa0, 0x00, // host child reads up to 8 KiB
            10, 0, // zerocopy on guest socket
            4, 0, 0x00, 0x40, // zerocopy send of 64 bytes
            6, 8, 5, 1, 0x00, 0xff, 6, 8, // deliver, read, deliver
            11, 0, // read completions
        ];
        let report = Sim::run(&script);
        assert_eq!(report.connections, 1);
        assert_eq!(report.bytes_delivered, 4096 + 64);
        assert_eq!(report.completions, 1);
    }

    /// Found by the property test: a SEQPACKET connection reset for queue length while its peer
    /// still had messages on the way, and sent more before the RST reached it.
    #[test]
    fn messages_sent_after_a_queue_reset_are_not_expected() {
        let input: &[u8] = &[
            252, 143, 224, 65, 95, 220, 225, 108, 68, 140, 198, 239, 40, 66, 125, 51, 54, 211, 244,
            248, 253, 69, 63, 216, 74, 155, 153, 19, 169, 164, 171, 141, 115, 65, 99, 46, 181, 120,
            212, 29, 90, 78, 172, 95, 213, 78, 169, 152, 170, 70, 117, 43, 58, 56, 29, 172, 85,
            225, 63, 96, 18, 52, 131, 126, 44, 155, 228, 221, 188, 47, 197, 15, 254, 247, 196, 57,
            62, 254, 239, 237, 30, 74, 236, 88, 199, 15, 201, 139, 145, 33, 30, 231, 155, 251, 231,
            56, 48, 169, 97, 181, 220, 2, 160, 99, 198, 237, 82, 155, 106, 23, 17, 204, 30, 12, 71,
            195, 92, 164, 73, 253, 1, 167, 169, 66, 111, 118, 77, 253, 114, 84, 85, 100, 51, 229,
            32, 29, 32, 118, 0, 218, 134, 107, 243, 69, 117, 77, 160, 208, 218, 223, 0, 225, 180,
            3, 23, 177, 127, 53, 193, 44, 255, 174, 95, 215, 71, 124, 197, 155, 156, 102, 124, 144,
            240, 134, 225, 254, 105, 211, 222, 198, 219, 132, 157, 227, 38, 140, 65, 106, 151, 158,
            71, 62, 129, 33, 205, 117, 180, 113, 244, 15, 247, 186, 247, 57, 51, 37, 149, 18, 233,
            236, 104, 34, 198, 12, 183, 178, 59, 135, 6, 110, 129, 11, 237, 15, 179, 135, 51, 76,
            225, 17, 224, 34, 107, 127, 76, 236, 37, 50, 121, 58, 223, 227, 46, 73, 135, 87, 83,
            93, 176, 71, 132, 0, 183, 23, 62, 32, 217, 20, 42, 86, 90, 52, 227, 186, 23, 211,
        ];
        let report = Sim::run(input);
        assert!(report.queue_resets > 0, "{report:?}");
    }

    /// Random input of `len` bytes from a xorshift generator.
    fn random_inputs(count: usize, len: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut state = 0x1234_5678_9abc_def0u64;
        (0..count).map(move |_| {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        })
    }

    fn add(total: &mut Report, report: Report) {
        total.steps += report.steps;
        total.connections += report.connections;
        total.bytes_delivered += report.bytes_delivered;
        total.completions += report.completions;
        total.messages += report.messages;
        total.queue_bound_hits += report.queue_bound_hits;
        total.queue_resets += report.queue_resets;
        total.buffer_changes += report.buffer_changes;
    }

    /// The byte decoder reaches the interesting paths from random input, so the property test
    /// and the fuzzer are not vacuous: data and messages checked, completions, buffer changes,
    /// and receive queues at their length bound.
    #[test]
    fn random_inputs_reach_data_completions_and_queue_bounds() {
        let mut total = Report::default();
        for input in random_inputs(300, 2000) {
            add(&mut total, Sim::run(&input));
        }
        eprintln!("{total:?}");
        assert!(total.connections > 100, "{total:?}");
        assert!(total.bytes_delivered > 100_000, "{total:?}");
        assert!(total.completions > 10, "{total:?}");
        assert!(total.messages > 10, "{total:?}");
        assert!(total.buffer_changes > 10, "{total:?}");
        assert!(total.queue_bound_hits > 10, "{total:?}");
    }

    /// Any sequence of application calls, deliveries and timeouts keeps the invariants. Most
    /// generated cases must reach data (or the checks after each read say little).
    #[test]
    fn any_op_sequence_keeps_the_invariants() {
        let config =
            ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let with_data = std::cell::Cell::new(0u32);
        let strategy = proptest::collection::vec(any::<u8>(), 0..4096);
        let result = runner.run(&strategy, |input| {
            if Sim::run(&input).bytes_delivered > 0 {
                with_data.set(with_data.get() + 1);
            }
            Ok(())
        });
        if let Err(failure) = result {
            panic!("{failure}");
        }
        assert!(with_data.get() > 128, "only {} of 256 cases delivered data", with_data.get());
    }
}
