//! Simulation for tests: two protocol engines (a host at CID 2 and a guest at CID 3) joined by
//! an in-order, lossless link, under a virtual clock, driven by a sequence of operations.
//!
//! [`Sim::run`] decodes operations from arbitrary bytes (so the same driver serves property
//! tests and the fuzzer) and checks, after every step, the invariants two honest peers must
//! keep:
//!
//! * neither engine ever sees a protocol violation from the other (credit is never exceeded);
//! * every STREAM connection delivers exactly the bytes sent, in order; every SEQPACKET message
//!   arrives whole and in order (truncated only by the reader's own buffer);
//! * zerocopy completions cover only ids that were handed out, each exactly once;
//! * once everything is closed and the close timeout has passed, no socket is left.
//!
//! ```
//! let report = zerovsock_testkit::Sim::run(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
//! assert!(report.steps > 0);
//! ```

#![forbid(unsafe_code)]

pub mod suite;

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use zerovsock_proto::{
    Disposition, Engine, EngineConfig, Packet, Payload, SendError, SendRequest, SocketId, State,
};
use zerovsock_wire::{Addr, Cid, Port, ShutdownFlags, SocketType};

const CIDS: [Cid; 2] = [Cid(2), Cid(3)];
/// Listeners: STREAM on the first port, SEQPACKET on the second.
const LISTEN_PORTS: [Port; 2] = [Port(1234), Port(1235)];

fn kind(socket_type: SocketType) -> usize {
    usize::from(socket_type == SocketType::Seqpacket)
}

/// One simulated socket, as the application sees it.
#[derive(Debug)]
struct SimSocket {
    side: usize,
    id: SocketId,
    socket_type: SocketType,
    /// Bytes (STREAM) or messages (SEQPACKET) sent so far.
    sent: u64,
    /// Bytes (STREAM) or messages (SEQPACKET) received so far.
    received: u64,
    zerocopy: bool,
    completed: HashSet<u32>,
}

/// What a run did, for tests that want to see that it did something.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Operations applied.
    pub steps: usize,
    /// Connections established.
    pub connections: usize,
    /// Payload bytes delivered to readers.
    pub bytes_delivered: u64,
    /// SEQPACKET messages received.
    pub messages: usize,
    /// Zerocopy completions read.
    pub completions: usize,
}

/// Two engines and the link between them.
pub struct Sim {
    engines: [Engine; 2],
    links: [VecDeque<Packet>; 2],
    now: Instant,
    sockets: Vec<SimSocket>,
    /// Per side, per kind (see [`LISTEN_PORTS`]).
    listeners: [[Option<SocketId>; 2]; 2],
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

/// The pattern byte at `offset` of a stream or message; lets readers check order and content.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
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
            report: Report::default(),
        }
    }

    /// Decodes and applies operations from `input`, checking invariants after each; then
    /// closes everything and checks that nothing is left. Panics on a broken invariant.
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
        match op % 12 {
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
            5 => self.recv(input.byte()?, input.size()?),
            6 => self.deliver(input.byte()? as usize),
            7 => self.advance(Duration::from_millis(u64::from(input.byte()?) * 40)),
            8 => self.shutdown(input.byte()?, input.byte()?),
            9 => self.close(input.byte()?),
            10 => self.set_zerocopy(input.byte()?),
            _ => self.completions(input.byte()?),
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
            sent: 0,
            received: 0,
            zerocopy: false,
            completed: HashSet::new(),
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
            fresh: true,
            zerocopy,
            eor: false,
            max_pass: usize::MAX,
        };
        let grant = match engine.begin_send(socket.id, request) {
            Ok(grant) => grant,
            Err(SendError::ZerocopyUnsupported) => panic!("loopback engines support zerocopy"),
            Err(_) => return,
        };
        let start = if seqpacket { 0 } else { socket.sent };
        let data: Vec<u8> = (0..grant.len() as u64).map(|i| pattern(start + i)).collect();
        let len = grant.len();
        if engine.finish_send(grant, Payload::from_bytes(Bytes::from(data))).is_ok() {
            let socket = &mut self.sockets[index];
            socket.sent += if seqpacket { 1 } else { len as u64 };
        }
    }

    fn recv(&mut self, selector: u8, max: usize) {
        let Some(index) = self.pick(selector) else { return };
        let socket = &mut self.sockets[index];
        let engine = &mut self.engines[socket.side];
        let Ok(lease) = engine.recv(socket.id, max) else { return };
        let data = lease.payload().to_vec();
        match socket.socket_type {
            SocketType::Stream => {
                for (i, byte) in data.iter().enumerate() {
                    assert_eq!(
                        *byte,
                        pattern(socket.received + i as u64),
                        "stream byte out of order"
                    );
                }
                socket.received += data.len() as u64;
            }
            SocketType::Seqpacket => {
                if lease.message_len() > 0 || !data.is_empty() {
                    for (i, byte) in data.iter().enumerate() {
                        assert_eq!(*byte, pattern(i as u64), "message content");
                    }
                    socket.received += 1;
                    self.report.messages += 1;
                }
            }
        }
        self.report.bytes_delivered += data.len() as u64;
        engine.commit_recv(socket.id, lease);
    }

    /// Moves up to `count` packets across the link, each direction in order.
    fn deliver(&mut self, count: usize) {
        self.collect();
        for _ in 0..count.max(1) {
            let mut moved = false;
            for from in 0..2 {
                if let Some(packet) = self.links[from].pop_front() {
                    let disposition = self.engines[1 - from].handle_packet(self.now, packet);
                    assert_ne!(
                        disposition,
                        Disposition::Violation,
                        "an honest peer broke the protocol"
                    );
                    moved = true;
                }
            }
            self.collect();
            if !moved {
                break;
            }
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
        let socket = &self.sockets[index];
        let _ = self.engines[socket.side].shutdown(socket.id, flags);
    }

    fn close(&mut self, selector: u8) {
        let Some(index) = self.pick(selector) else { return };
        let socket = self.sockets.swap_remove(index);
        self.engines[socket.side].close(self.now, socket.id);
    }

    fn set_zerocopy(&mut self, selector: u8) {
        let Some(index) = self.pick(selector) else { return };
        let socket = &mut self.sockets[index];
        if self.engines[socket.side].set_zerocopy(socket.id, true).is_ok() {
            socket.zerocopy = true;
        }
    }

    fn completions(&mut self, selector: u8) {
        let Some(index) = self.pick(selector) else { return };
        let socket = &mut self.sockets[index];
        let engine = &mut self.engines[socket.side];
        let next = engine.next_completion_id(socket.id).unwrap_or(0);
        while let Ok(Some(completion)) = engine.recv_completion(socket.id) {
            assert!(socket.zerocopy, "completion on a socket without SO_ZEROCOPY");
            for offset in 0..completion.count() {
                let id = completion.lo.wrapping_add(offset as u32);
                assert!(id < next, "completion for id {id} never handed out (next {next})");
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

    /// Closes everything, lets the close handshakes and timeouts run, and checks that both
    /// engines are empty.
    fn finish(&mut self) {
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

    /// The byte decoder reaches the interesting paths from random input, so the property test
    /// below is not vacuous.
    #[test]
    fn random_inputs_reach_data_and_completions() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut total = Report::default();
        for _ in 0..300 {
            let input: Vec<u8> = (0..600)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let report = Sim::run(&input);
            total.connections += report.connections;
            total.bytes_delivered += report.bytes_delivered;
            total.completions += report.completions;
            total.messages += report.messages;
        }
        assert!(total.connections > 100, "{total:?}");
        assert!(total.bytes_delivered > 100_000, "{total:?}");
        assert!(total.completions > 10, "{total:?}");
        assert!(total.messages > 10, "{total:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any sequence of application calls, deliveries and timeouts keeps the invariants.
        #[test]
        fn any_op_sequence_keeps_the_invariants(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            Sim::run(&input);
        }
    }
}
