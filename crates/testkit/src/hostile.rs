//! A hostile peer: arbitrary packets into an engine that listens on three ports and holds the
//! connections it accepts. The fuzz target `hostile_peer` runs [`run`]; the tests below check
//! that inputs reach the bounds it guards, so the fuzzer's silence means something.
//!
//! After every packet [`run`] checks that the engine never panics, that every packet it emits
//! has a header length equal to its payload and at most 64 KiB, that the connection the packet
//! reached keeps its receive memory within what it advertised (unread and charged bytes at most
//! `buf_alloc`, at most `buf_alloc / 576` packets queued), and that the socket count stays
//! within the listeners, their backlogs, the connections held, and those still closing.
//!
//! Input, step by step:
//! * a control byte `c`; when `c & 3 == 3` an application action follows (one byte: accept,
//!   read, close, or let time pass);
//! * otherwise a packet: a fix-up byte (each bit makes one header field sane: destination CID,
//!   a listening port, the type, the op, the length, the source CID), 44 header bytes, and a
//!   16-bit payload length. With `c & 4` the length is pushed past 64 KiB; with `c & 8` the
//!   payload is taken from the input, otherwise it is generated (so one input can carry large
//!   payloads). The packet is sent `(c >> 4) + 1` times, to flood with little input.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use zerovsock_proto::{Disposition, Engine, EngineConfig, Payload, SocketId, CLOSE_TIMEOUT};
use zerovsock_wire::{Addr, Cid, Header, Port, SocketType, HEADER_LEN, MAX_PACKET_PAYLOAD};

/// The engine's CID, and the one the fix-up gives the peer.
const HOST: Cid = Cid(2);
const PEER: Cid = Cid(3);
/// (port, type, buffer size): a default STREAM listener and two with small buffers, so queue
/// and credit bounds are reached with little input.
const LISTENERS: [(u32, SocketType, u64); 3] = [
    (1234, SocketType::Stream, 256 * 1024),
    (1235, SocketType::Seqpacket, 4096),
    (1236, SocketType::Stream, 4096),
];
const BACKLOG: u32 = 2;

/// What a run reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HostileReport {
    /// Packets handed to the engine.
    pub packets: usize,
    /// Connections the application accepted.
    pub accepted: usize,
    /// Connections reset for exceeding their credit or a bad length (`Violation`).
    pub violations: usize,
    /// Connections reset for receive-queue length (`QueueFull`).
    pub queue_resets: usize,
    /// Times a connection's queue held exactly as many packets as its buffer allows.
    pub queue_at_limit: usize,
    /// Times a connection's charged bytes reached 90 % of its buffer.
    pub credit_full: usize,
    /// Bytes the application read.
    pub bytes_read: u64,
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.0.len() < len {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(head)
    }
}

struct Hostile {
    engine: Engine,
    now: Instant,
    listeners: Vec<SocketId>,
    held: Vec<SocketId>,
    /// When each of our closes happened: a closed connection may linger until its timeout.
    closes: VecDeque<Instant>,
    report: HostileReport,
}

/// Runs the input against a fresh engine; panics when the engine breaks a rule.
pub fn run(data: &[u8]) -> HostileReport {
    let mut hostile = Hostile::new();
    let mut input = Input(data);
    while let Some(control) = input.byte() {
        let step = if control & 3 == 3 {
            input.byte().map(|action| hostile.act(action))
        } else {
            hostile.packet(control, &mut input)
        };
        if step.is_none() {
            break;
        }
        hostile.check_count();
    }
    hostile.report
}

impl Hostile {
    // The virtual clock needs an origin; from there on time only moves through `act`.
    #[allow(clippy::disallowed_methods)]
    fn new() -> Hostile {
        let mut engine = Engine::new(EngineConfig::new(HOST));
        let mut listeners = Vec::new();
        for (port, socket_type, size) in LISTENERS {
            let id = engine.open(socket_type).expect("first sockets open");
            engine.set_buffer_size(id, size).expect("the listener exists");
            engine.bind(id, Addr::new(Cid::ANY, Port(port))).expect("free port");
            engine.listen(id, BACKLOG).expect("listens");
            listeners.push(id);
        }
        Hostile {
            engine,
            now: Instant::now(),
            listeners,
            held: Vec::new(),
            closes: VecDeque::new(),
            report: HostileReport::default(),
        }
    }

    fn packet(&mut self, control: u8, input: &mut Input<'_>) -> Option<()> {
        let fixups = input.byte()?;
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(input.take(HEADER_LEN)?);
        let len_bytes = input.take(2)?;
        let mut len = usize::from(u16::from_le_bytes([len_bytes[0], len_bytes[1]]));
        if control & 4 != 0 {
            len += MAX_PACKET_PAYLOAD as usize;
        }
        let payload = if control & 8 != 0 {
            let available = input.0.len();
            Bytes::copy_from_slice(input.take(len.min(available))?)
        } else {
            Bytes::from(vec![control; len])
        };
        fix_up(&mut header, fixups, payload.len());
        for _ in 0..=(control >> 4) {
            self.deliver(&header, payload.clone());
        }
        Some(())
    }

    fn deliver(&mut self, header: &[u8; HEADER_LEN], payload: Bytes) {
        self.report.packets += 1;
        let result = self.engine.handle_bytes(self.now, header, Payload::from_bytes(payload));
        match result {
            Ok(Disposition::Violation) => self.report.violations += 1,
            Ok(Disposition::QueueFull) => self.report.queue_resets += 1,
            _ => {}
        }
        self.drain();
        let Ok(view) = Header::new_checked(&header[..]) else { return };
        let (Ok(src), Ok(dst)) = (u32::try_from(view.src_cid()), u32::try_from(view.dst_cid()))
        else {
            return;
        };
        let local = Addr::new(Cid(dst), Port(view.dst_port()));
        let remote = Addr::new(Cid(src), Port(view.src_port()));
        if let Some(id) = self.engine.find_connection(local, remote) {
            self.check_memory(id);
        }
    }

    /// The connection's receive memory stays within what it advertised.
    fn check_memory(&mut self, id: SocketId) {
        let Some(queue) = self.engine.receive_queue(id) else { return };
        assert!(queue.unread_bytes <= queue.charged_bytes, "{queue:?}");
        assert!(queue.charged_bytes <= queue.buf_alloc, "credit exceeded: {queue:?}");
        assert!(queue.packets <= queue.packet_limit(), "queue past its bound: {queue:?}");
        if queue.packets == queue.packet_limit() {
            self.report.queue_at_limit += 1;
        }
        if u64::from(queue.charged_bytes) * 10 >= u64::from(queue.buf_alloc) * 9
            && queue.buf_alloc > 0
        {
            self.report.credit_full += 1;
        }
    }

    /// Everything the engine emits is well formed.
    fn drain(&mut self) {
        while let Some(packet) = self.engine.poll_transmit() {
            assert_eq!(packet.repr.len as usize, packet.payload.len());
            assert!(packet.repr.len <= MAX_PACKET_PAYLOAD);
        }
        while self.engine.poll_wakeup().is_some() {}
    }

    fn act(&mut self, action: u8) {
        match action & 3 {
            0 => {
                for listener in self.listeners.clone() {
                    while let Ok(child) = self.engine.accept(listener) {
                        self.held.push(child);
                        self.report.accepted += 1;
                    }
                }
            }
            1 => {
                if let Some(&id) = self.held.get(usize::from(action >> 2) % self.held.len().max(1))
                {
                    let max = usize::from(action >> 2) << 10 | 1;
                    if let Ok(lease) = self.engine.recv(id, max) {
                        self.report.bytes_read += lease.len() as u64;
                        self.engine.commit_recv(id, lease);
                    }
                }
            }
            2 => {
                if !self.held.is_empty() {
                    let id = self.held.swap_remove(usize::from(action >> 2) % self.held.len());
                    self.engine.close(self.now, id);
                    self.closes.push_back(self.now);
                }
            }
            _ => {
                self.now += Duration::from_millis(u64::from(action >> 2) * 200);
                self.engine.handle_timeout(self.now);
            }
        }
        self.drain();
    }

    /// Listeners, their backlogs (a listener takes one more than its backlog), the connections
    /// held, and those closed within the close timeout (which may still be closing).
    fn check_count(&mut self) {
        while self.closes.front().is_some_and(|t| *t + CLOSE_TIMEOUT < self.now) {
            self.closes.pop_front();
        }
        let pending = LISTENERS.len() * (BACKLOG as usize + 1);
        let bound = LISTENERS.len() + pending + self.held.len() + self.closes.len();
        assert!(self.engine.socket_count() <= bound, "{} sockets", self.engine.socket_count());
    }
}

/// Makes the fields `fixups` names sane, so that a fuzzer reaches connections quickly.
fn fix_up(header: &mut [u8; HEADER_LEN], fixups: u8, payload_len: usize) {
    let Ok(mut view) = Header::new_checked(&mut header[..]) else { return };
    if fixups & 1 != 0 {
        view.set_dst_cid(u64::from(HOST.0));
    }
    if fixups & 2 != 0 {
        let (port, socket_type, _) =
            LISTENERS[usize::from(view.dst_port() as u8) % LISTENERS.len()];
        view.set_dst_port(port);
        if fixups & 4 != 0 {
            view.set_socket_type(socket_type as u16);
        }
    } else if fixups & 4 != 0 {
        view.set_socket_type(1 + view.socket_type() % 2);
    }
    if fixups & 8 != 0 {
        view.set_op(view.op() % 8);
    }
    if fixups & 16 != 0 {
        view.set_len(u32::try_from(payload_len).unwrap_or(u32::MAX));
    }
    if fixups & 32 != 0 {
        view.set_src_cid(u64::from(PEER.0));
        view.set_src_port(1024 + view.src_port() % 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerovsock_wire::{Op, Repr};

    /// A packet step: control byte, fix-ups (all), header, 16-bit length.
    fn step(control: u8, repr: Repr, len: u16) -> Vec<u8> {
        let mut bytes = vec![control, 0x3f];
        bytes.extend_from_slice(&repr.to_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes
    }

    fn to(port: u32, op: Op, socket_type: SocketType) -> Repr {
        let src = Addr::new(PEER, Port(1024));
        Repr::new(op, socket_type, src, Addr::new(HOST, Port(port)))
    }

    /// A REQUEST to the small STREAM listener, then floods of RW packets that keep within the
    /// credit in bytes but not in packets, then past it in bytes.
    #[test]
    fn scripted_floods_reach_the_queue_and_credit_bounds() {
        let request = to(1236, Op::Request, SocketType::Stream);
        let rw = to(1236, Op::Rw, SocketType::Stream);
        let mut input = step(0, request, 0);
        // Seven 200-byte packets fill the 4 KiB buffer's seven-packet queue... and collapse.
        input.extend(step(0x70, rw, 200));
        let collapsing = run(&input);
        assert!(collapsing.queue_at_limit > 0, "{collapsing:?}");
        assert_eq!(collapsing.violations + collapsing.queue_resets, 0, "{collapsing:?}");
        // Then 4 KiB more than the credit allows.
        input.extend(step(0x10, rw, 4000));
        let overrun = run(&input);
        assert!(overrun.credit_full > 0 || overrun.violations > 0, "{overrun:?}");
        assert_eq!(overrun.violations, 1, "{overrun:?}");
        // A SEQPACKET connection with one-packet messages cannot collapse: reset for length.
        let request = to(1235, Op::Request, SocketType::Seqpacket);
        let message = Repr { flags: 1, ..to(1235, Op::Rw, SocketType::Seqpacket) };
        let mut input = step(0, request, 0);
        input.extend(step(0x70, message, 100));
        let messages = run(&input);
        assert_eq!(messages.queue_resets, 1, "{messages:?}");
    }

    /// Random inputs of fuzzer size reach every bound the target checks.
    #[test]
    fn random_inputs_reach_every_bound() {
        let mut state = 0x0bad_cafe_f00d_1234u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut total = HostileReport::default();
        for _ in 0..400 {
            let mut input = Vec::new();
            while input.len() < 4096 {
                let r = next();
                if r % 5 == 0 {
                    input.extend([3, (r >> 8) as u8]);
                    continue;
                }
                let port = LISTENERS[(r >> 16) as usize % 3].0;
                let op = [Op::Request, Op::Rw, Op::Rw, Op::Rw, Op::Shutdown, Op::CreditRequest]
                    [(r >> 20) as usize % 6];
                let socket_type =
                    if port == 1235 { SocketType::Seqpacket } else { SocketType::Stream };
                // Flags on a STREAM packet only now and then: an EOM there keeps it from merging.
                let flagged = port == 1235 || (r >> 50) & 7 == 0;
                let flags = if flagged { (r >> 24) as u32 & 3 } else { 0 };
                let repr = Repr { flags, ..to(port, op, socket_type) };
                let control = ((r >> 28) as u8 & 0xf0) | (r >> 32) as u8 & 4 & ((r >> 40) as u8);
                input.extend(step(control, repr, (r >> 44) as u16 % 2048));
            }
            let report = run(&input);
            total.packets += report.packets;
            total.accepted += report.accepted;
            total.violations += report.violations;
            total.queue_resets += report.queue_resets;
            total.queue_at_limit += report.queue_at_limit;
            total.credit_full += report.credit_full;
            total.bytes_read += report.bytes_read;
        }
        assert!(total.accepted > 100, "{total:?}");
        assert!(total.violations > 10, "{total:?}");
        assert!(total.queue_resets > 10, "{total:?}");
        assert!(total.queue_at_limit > 10, "{total:?}");
        assert!(total.credit_full > 10, "{total:?}");
        assert!(total.bytes_read > 10_000, "{total:?}");
    }
}
