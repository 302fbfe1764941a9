//! Protocol transcripts: the engine plays the host (CID 2); the tests play a guest (CID 3) by
//! writing its packets by hand and reading what the engine answers. One rule per test.

use std::time::{Duration, Instant};

use bytes::Bytes;
use zerovsock_wire::{Addr, Cid, Op, Port, Repr, SeqFlags, ShutdownFlags, SocketType};

use crate::*;

const HOST: Cid = Cid(2);
const GUEST: Cid = Cid(3);
const LISTEN_PORT: Port = Port(1234);
const GUEST_PORT: Port = Port(5000);
const BUF: u32 = 256 * 1024;

struct Host {
    engine: Engine,
    now: Instant,
}

impl Host {
    fn new() -> Host {
        Host::with(EngineConfig::new(HOST))
    }

    // The virtual clock needs an origin; from there on time only moves through `advance`.
    #[allow(clippy::disallowed_methods)]
    fn with(config: EngineConfig) -> Host {
        Host { engine: Engine::new(config), now: Instant::now() }
    }

    fn listener(&mut self, socket_type: SocketType, backlog: u32) -> SocketId {
        let id = self.engine.open(socket_type).unwrap();
        self.engine.bind(id, Addr::new(Cid::ANY, LISTEN_PORT)).unwrap();
        self.engine.listen(id, backlog).unwrap();
        id
    }

    fn deliver(&mut self, repr: Repr, payload: &[u8]) -> Disposition {
        let packet = Packet::data(repr, Payload::from(payload.to_vec()));
        self.engine.handle_packet(self.now, packet)
    }

    fn sent(&mut self) -> Vec<Packet> {
        std::iter::from_fn(|| self.engine.poll_transmit()).collect()
    }

    fn ops(&mut self) -> Vec<Op> {
        self.sent().iter().map(|p| p.repr.op).collect()
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.engine.handle_timeout(self.now);
    }

    /// A connection accepted from the guest's port `GUEST_PORT`.
    fn established(&mut self, socket_type: SocketType) -> SocketId {
        let listener = self.listener(socket_type, 8);
        self.deliver(guest(Op::Request, socket_type), &[]);
        self.sent();
        self.engine.accept(listener).unwrap()
    }

    fn send(&mut self, id: SocketId, data: &[u8], zerocopy: bool) -> Result<SendGrant, SendError> {
        let request = SendRequest {
            remaining: data.len(),
            at_segment_start: true,
            zerocopy,
            eor: false,
            max_pass: usize::MAX,
        };
        self.engine.begin_send(id, request)
    }
}

/// A packet from the guest to the host listener's port, with a full credit window.
fn guest(op: Op, socket_type: SocketType) -> Repr {
    Repr {
        buf_alloc: BUF,
        ..Repr::new(op, socket_type, Addr::new(GUEST, GUEST_PORT), Addr::new(HOST, LISTEN_PORT))
    }
}

fn stream(op: Op) -> Repr {
    guest(op, SocketType::Stream)
}

#[test]
fn rst_for_unknown_port() {
    let mut host = Host::new();
    assert_eq!(host.deliver(stream(Op::Request), &[]), Disposition::Refused);
    let sent = host.sent();
    assert_eq!(sent.len(), 1);
    let rst = sent[0].repr;
    assert_eq!((rst.op, rst.src, rst.dst), (Op::Rst, stream(Op::Rst).dst, stream(Op::Rst).src));
    assert_eq!((rst.buf_alloc, rst.fwd_cnt, rst.len), (0, 0, 0));
}

#[test]
fn never_rst_in_reply_to_rst() {
    let mut host = Host::new();
    host.deliver(stream(Op::Rst), &[]);
    assert!(host.sent().is_empty());
}

#[test]
fn rst_when_bound_but_not_listening() {
    let mut host = Host::new();
    let id = host.engine.open(SocketType::Stream).unwrap();
    host.engine.bind(id, Addr::new(Cid::ANY, LISTEN_PORT)).unwrap();
    host.deliver(stream(Op::Request), &[]);
    assert_eq!(host.ops(), [Op::Rst]);
}

#[test]
fn rst_when_backlog_full() {
    let mut host = Host::new();
    host.listener(SocketType::Stream, 0);
    host.deliver(stream(Op::Request), &[]);
    assert_eq!(host.ops(), [Op::Response]);
    let mut second = stream(Op::Request);
    second.src.port = Port(5001);
    host.deliver(second, &[]);
    assert_eq!(host.ops(), [Op::Rst]);
}

#[test]
fn rst_on_socket_type_mismatch() {
    let mut host = Host::new();
    host.listener(SocketType::Stream, 8);
    host.deliver(guest(Op::Request, SocketType::Seqpacket), &[]);
    assert_eq!(host.ops(), [Op::Rst]);
}

#[test]
fn non_request_to_listener_is_reset() {
    let mut host = Host::new();
    host.listener(SocketType::Stream, 8);
    host.deliver(stream(Op::Rw), &[]);
    assert_eq!(host.ops(), [Op::Rst]);
}

#[test]
fn request_is_answered_with_response_stamped_with_credit() {
    let mut host = Host::new();
    let listener = host.listener(SocketType::Stream, 8);
    host.deliver(stream(Op::Request), &[]);
    let response = host.sent()[0].repr;
    assert_eq!(response.op, Op::Response);
    assert_eq!((response.buf_alloc, response.fwd_cnt), (BUF, 0));
    let child = host.engine.accept(listener).unwrap();
    assert_eq!(host.engine.state(child), Some(State::Established));
    assert_eq!(host.engine.peer_addr(child), Some(Addr::new(GUEST, GUEST_PORT)));
}

#[test]
fn unexpected_packet_from_listening_port_peer_goes_to_child() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.deliver(stream(Op::Rw), b"data");
    assert_eq!(host.engine.unread_bytes(child), 4);
}

fn connecting(host: &mut Host) -> SocketId {
    let id = host.engine.open(SocketType::Stream).unwrap();
    host.engine.connect(host.now, id, Addr::new(GUEST, LISTEN_PORT)).unwrap();
    id
}

/// The guest's reply to the host's REQUEST.
fn reply_to(request: &Packet, op: Op) -> Repr {
    Repr { buf_alloc: BUF, ..request.repr.reply(op) }
}

#[test]
fn connect_sends_request_and_response_establishes() {
    let mut host = Host::new();
    let id = connecting(&mut host);
    let request = host.sent().remove(0);
    assert_eq!(request.repr.op, Op::Request);
    assert_eq!(host.engine.connect_result(id), Ok(false));
    host.deliver(reply_to(&request, Op::Response), &[]);
    assert_eq!(host.engine.connect_result(id), Ok(true));
}

#[test]
fn connect_times_out_after_two_seconds() {
    let mut host = Host::new();
    let id = connecting(&mut host);
    let request = host.sent().remove(0);
    host.advance(Duration::from_millis(1999));
    assert_eq!(host.engine.connect_result(id), Ok(false));
    host.advance(Duration::from_millis(1));
    assert_eq!(host.engine.connect_result(id), Err(ConnectError::Failed(SocketError::TimedOut)));
    // A late RESPONSE finds nobody and is reset.
    host.deliver(reply_to(&request, Op::Response), &[]);
    assert_eq!(host.ops(), [Op::Rst]);
}

#[test]
fn response_after_the_deadline_does_not_establish() {
    let mut host = Host::new();
    let id = connecting(&mut host);
    let request = host.sent().remove(0);
    host.now += Duration::from_secs(3);
    host.deliver(reply_to(&request, Op::Response), &[]);
    assert_eq!(host.ops(), [Op::Rst]);
    assert_eq!(host.engine.connect_result(id), Err(ConnectError::Failed(SocketError::TimedOut)));
}

#[test]
fn connect_refused_by_rst_is_connection_reset() {
    let mut host = Host::new();
    let id = connecting(&mut host);
    let request = host.sent().remove(0);
    host.deliver(reply_to(&request, Op::Rst), &[]);
    assert_eq!(
        host.engine.connect_result(id),
        Err(ConnectError::Failed(SocketError::ConnectionReset))
    );
}

#[test]
fn unexpected_op_while_connecting_is_protocol_error() {
    let mut host = Host::new();
    let id = connecting(&mut host);
    let request = host.sent().remove(0);
    host.deliver(reply_to(&request, Op::Rw), &[]);
    assert_eq!(host.ops(), [Op::Rst]);
    assert_eq!(host.engine.connect_result(id), Err(ConnectError::Failed(SocketError::Protocol)));
}

#[test]
fn close_sends_shutdown_and_peer_rst_finishes_it() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.close(host.now, child);
    let sent = host.sent();
    assert_eq!(sent[0].repr.op, Op::Shutdown);
    assert_eq!(sent[0].repr.shutdown_flags(), ShutdownFlags::all());
    let sockets = host.engine.socket_count();
    host.deliver(stream(Op::Rst), &[]);
    assert_eq!(host.engine.socket_count(), sockets - 1);
    assert!(host.sent().is_empty());
}

#[test]
fn close_forces_rst_after_eight_seconds() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.close(host.now, child);
    host.sent();
    host.advance(Duration::from_millis(7999));
    assert!(host.sent().is_empty());
    host.advance(Duration::from_millis(1));
    assert_eq!(host.ops(), [Op::Rst]);
    assert_eq!(host.engine.poll_timeout(), None);
}

#[test]
fn peer_full_shutdown_with_nothing_unread_is_answered_with_rst() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.deliver(Repr { flags: 3, ..stream(Op::Shutdown) }, &[]);
    assert_eq!(host.ops(), [Op::Rst]);
    let readiness = host.engine.readiness(child);
    assert!(readiness.read_closed && readiness.readable && !readiness.hangup);
    assert_eq!(host.engine.recv(child, 16).map(|l| l.len()), Ok(0));
}

#[test]
fn peer_shutdown_send_gives_end_of_stream_after_data() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.deliver(stream(Op::Rw), b"tail");
    host.deliver(Repr { flags: 2, ..stream(Op::Shutdown) }, &[]);
    let lease = host.engine.recv(child, 16).unwrap();
    assert_eq!(lease.payload().to_vec(), b"tail");
    host.engine.commit_recv(child, lease);
    assert_eq!(host.engine.recv(child, 16).map(|l| l.len()), Ok(0));
}

#[test]
fn credit_request_gets_credit_update() {
    let mut host = Host::new();
    host.established(SocketType::Stream);
    host.deliver(stream(Op::CreditRequest), &[]);
    assert_eq!(host.ops(), [Op::CreditUpdate]);
}

#[test]
fn peer_exceeding_credit_is_reset_with_error() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.set_buffer_size(child, 4096).unwrap();
    host.sent();
    host.deliver(stream(Op::Rw), &[0u8; 4096]);
    assert!(host.sent().is_empty());
    assert_eq!(host.deliver(stream(Op::Rw), &[0u8; 1]), Disposition::Violation);
    assert_eq!(host.ops(), [Op::Rst]);
    let lease = host.engine.recv(child, 8192).unwrap();
    assert_eq!(lease.len(), 4096, "data queued before the violation stays readable");
    host.engine.commit_recv(child, lease);
    assert_eq!(host.engine.recv(child, 1), Err(RecvError::Failed(SocketError::CreditExceeded)));
}

#[test]
fn header_length_that_disagrees_with_payload_is_a_violation() {
    let mut host = Host::new();
    host.established(SocketType::Stream);
    let repr = Repr { len: 10, ..stream(Op::Rw) };
    let packet = Packet { repr, payload: Payload::from(b"short".to_vec()), pinned: false };
    assert_eq!(host.engine.handle_packet(host.now, packet), Disposition::Violation);
    assert_eq!(host.ops(), [Op::Rst]);
}

#[test]
fn credit_update_when_advertised_space_falls_below_64k() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    for _ in 0..4 {
        host.deliver(stream(Op::Rw), &[1u8; 65536]);
    }
    for expected in [vec![], vec![], vec![], vec![Op::CreditUpdate]] {
        let lease = host.engine.recv(child, 65536).unwrap();
        host.engine.commit_recv(child, lease);
        assert_eq!(host.ops(), expected);
    }
}

#[test]
fn seqpacket_sends_credit_update_after_every_message() {
    let mut host = Host::new();
    let child = host.established(SocketType::Seqpacket);
    host.deliver(
        Repr { flags: SeqFlags::EOM.bits(), ..guest(Op::Rw, SocketType::Seqpacket) },
        b"m",
    );
    let lease = host.engine.recv(child, 16).unwrap();
    host.engine.commit_recv(child, lease);
    let sent = host.sent();
    assert_eq!(sent[0].repr.op, Op::CreditUpdate);
    assert_eq!(sent[0].repr.fwd_cnt, 1);
}

#[test]
fn seqpacket_message_larger_than_buffer_is_emsgsize() {
    let mut host = Host::new();
    let child = host.established(SocketType::Seqpacket);
    let big = vec![0u8; BUF as usize + 1];
    assert_eq!(host.send(child, &big, false), Err(SendError::MessageTooLong));
}

#[test]
fn data_is_split_at_64k_with_eom_and_eor_on_the_last_packet() {
    let mut host = Host::new();
    let child = host.established(SocketType::Seqpacket);
    let data = vec![9u8; 150_000];
    let request = SendRequest {
        remaining: data.len(),
        at_segment_start: true,
        zerocopy: false,
        eor: true,
        max_pass: usize::MAX,
    };
    let grant = host.engine.begin_send(child, request).unwrap();
    host.engine.finish_send(grant, Payload::from(data)).unwrap();
    let sent: Vec<(u32, u32)> = host.sent().iter().map(|p| (p.repr.len, p.repr.flags)).collect();
    assert_eq!(sent, [(65536, 0), (65536, 0), (18928, 3)]);
}

#[test]
fn sender_never_exceeds_peer_credit() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.deliver(Repr { buf_alloc: 1000, ..stream(Op::CreditUpdate) }, &[]);
    let grant = host.send(child, &[0u8; 5000], false).unwrap();
    assert_eq!(grant.len(), 1000);
    host.engine.finish_send(grant, Payload::from(vec![0u8; 1000])).unwrap();
    assert_eq!(host.send(child, &[0u8; 1], false), Err(SendError::WouldBlock));
    host.deliver(Repr { buf_alloc: 1000, fwd_cnt: 400, ..stream(Op::CreditUpdate) }, &[]);
    assert_eq!(host.send(child, &[0u8; 5000], false).map(|g| g.len()), Ok(400));
}

#[test]
fn local_shut_wr_and_peer_shut_rd_give_broken_pipe() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.shutdown(child, ShutdownFlags::SEND).unwrap();
    assert_eq!(host.ops(), [Op::Shutdown]);
    assert_eq!(host.send(child, b"x", false), Err(SendError::BrokenPipe));

    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    let shutdown =
        Repr { flags: ShutdownFlags::RECEIVE.bits(), buf_alloc: 1000, ..stream(Op::Shutdown) };
    host.deliver(shutdown, &[]);
    assert_eq!(host.send(child, b"x", false), Err(SendError::BrokenPipe));
}

fn zerocopy_child(host: &mut Host) -> SocketId {
    let child = host.established(SocketType::Stream);
    host.engine.set_zerocopy(child, true).unwrap();
    child
}

fn finish(host: &mut Host, grant: SendGrant, data: &'static [u8]) {
    host.engine.finish_send(grant, Payload::from(Bytes::from_static(data))).unwrap();
}

#[test]
fn zerocopy_is_ignored_without_so_zerocopy() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    let grant = host.send(child, b"abc", true).unwrap();
    assert!(grant.must_copy());
    assert_eq!(grant.completion_id(), None);
    finish(&mut host, grant, b"abc");
    drop(host.sent());
    assert_eq!(host.engine.recv_completion(child), Ok(None));
}

#[test]
fn zerocopy_completion_fires_when_the_transport_drops_the_payload() {
    let mut host = Host::new();
    let child = zerocopy_child(&mut host);
    let grant = host.send(child, b"abc", true).unwrap();
    assert_eq!((grant.completion_id(), grant.must_copy()), (Some(0), false));
    finish(&mut host, grant, b"abc");
    let in_flight = host.sent();
    assert_eq!(host.engine.recv_completion(child), Ok(None));
    assert!(!host.engine.readiness(child).error);
    drop(in_flight);
    host.engine.poll_completions();
    assert!(host.engine.readiness(child).error);
    let completion = host.engine.recv_completion(child).unwrap().unwrap();
    assert_eq!(completion, Completion { lo: 0, hi: 0, copied: false });
}

#[test]
fn zerocopy_message_larger_than_credit_is_copied_over_several_ids() {
    let mut host = Host::new();
    let child = zerocopy_child(&mut host);
    host.deliver(Repr { buf_alloc: 100, ..stream(Op::CreditUpdate) }, &[]);
    let request = SendRequest {
        remaining: 150,
        at_segment_start: true,
        zerocopy: true,
        eor: false,
        max_pass: usize::MAX,
    };
    let first = host.engine.begin_send(child, request).unwrap();
    assert_eq!((first.len(), first.completion_id(), first.must_copy()), (100, Some(0), true));
    host.engine.finish_send(first, Payload::from(vec![0u8; 100])).unwrap();
    host.deliver(Repr { buf_alloc: 100, fwd_cnt: 100, ..stream(Op::CreditUpdate) }, &[]);
    let request = SendRequest {
        remaining: 50,
        at_segment_start: false,
        zerocopy: true,
        eor: false,
        max_pass: usize::MAX,
    };
    let second = host.engine.begin_send(child, request).unwrap();
    assert_eq!((second.len(), second.completion_id(), second.must_copy()), (50, Some(1), true));
    host.engine.finish_send(second, Payload::from(vec![0u8; 50])).unwrap();
    drop(host.sent());
    let merged = host.engine.recv_completion(child).unwrap();
    assert_eq!(merged, Some(Completion { lo: 0, hi: 1, copied: true }));
}

#[test]
fn zerocopy_pass_that_sends_nothing_takes_no_id() {
    let mut host = Host::new();
    let child = zerocopy_child(&mut host);
    host.deliver(Repr { buf_alloc: 0, ..stream(Op::CreditUpdate) }, &[]);
    assert_eq!(host.send(child, b"abc", true), Err(SendError::WouldBlock));
    assert_eq!(host.engine.next_completion_id(child), Some(0));
    host.deliver(Repr { buf_alloc: 64, ..stream(Op::CreditUpdate) }, &[]);
    let grant = host.send(child, b"abc", true).unwrap();
    host.engine.abort_send(grant);
    assert_eq!(host.engine.next_completion_id(child), Some(0));
}

#[test]
fn zerocopy_budget_exhaustion_is_enomem_and_returns_credit() {
    let mut host = Host::new();
    let child = zerocopy_child(&mut host);
    host.engine.set_notification_limit(child, 1).unwrap();
    let grant = host.send(child, b"abc", true).unwrap();
    finish(&mut host, grant, b"abc");
    let space = host.engine.send_space(child);
    assert_eq!(host.send(child, b"abc", true), Err(SendError::NotificationBudget));
    assert_eq!(host.engine.send_space(child), space);
    assert_eq!(host.engine.next_completion_id(child), Some(1));
}

#[test]
fn transport_without_zerocopy_gives_eopnotsupp() {
    let mut config = EngineConfig::new(HOST);
    config.zerocopy = false;
    let mut host = Host::with(config);
    let unconnected = host.engine.open(SocketType::Stream).unwrap();
    host.engine.set_zerocopy(unconnected, true).unwrap();
    let result = host.engine.connect(host.now, unconnected, Addr::new(GUEST, LISTEN_PORT));
    assert_eq!(result, Err(ConnectError::ZerocopyUnsupported));
    let child = host.established(SocketType::Stream);
    assert_eq!(host.engine.set_zerocopy(child, true), Err(OptionError::Unsupported));
    assert_eq!(host.send(child, b"abc", true), Err(SendError::ZerocopyUnsupported));
}

#[test]
fn malformed_header_bytes_with_unknown_type_are_reset() {
    let mut host = Host::new();
    let mut bytes = stream(Op::Request).to_bytes();
    bytes[28] = 3;
    let result = host.engine.handle_bytes(host.now, &bytes, Payload::new());
    assert!(result.is_err());
    assert_eq!(host.ops(), [Op::Rst]);
}

#[test]
fn packets_for_another_cid_are_dropped_silently() {
    let mut host = Host::new();
    host.listener(SocketType::Stream, 8);
    let mut request = stream(Op::Request);
    request.dst.cid = Cid(7);
    assert_eq!(host.deliver(request, &[]), Disposition::Dropped);
    assert!(host.sent().is_empty());
}

#[test]
fn buffer_size_change_is_announced_with_credit_update() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.set_buffer_size(child, 4096).unwrap();
    let sent = host.sent();
    assert_eq!((sent[0].repr.op, sent[0].repr.buf_alloc), (Op::CreditUpdate, 4096));
    host.engine.set_buffer_size(child, 4096).unwrap();
    assert!(host.sent().is_empty(), "no change, no update");
}

#[test]
fn buffer_size_is_clamped_into_min_and_max() {
    let mut host = Host::new();
    let id = host.engine.open(SocketType::Stream).unwrap();
    assert_eq!(host.engine.set_buffer_size(id, 1 << 30), Ok(256 * 1024), "max is 256 KiB");
    assert_eq!(host.engine.set_buffer_size(id, 1), Ok(128), "min is 128");
    host.engine.set_buffer_max_size(id, 1 << 30).unwrap();
    assert_eq!(host.engine.set_buffer_size(id, 1 << 30), Ok(1 << 30));
}

#[test]
fn raising_rcvlowat_above_unread_bytes_sends_credit_update() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.deliver(stream(Op::Rw), &[0u8; 1000]);
    // Over 128 bytes, so a packet of its own rather than merged into the first.
    host.deliver(stream(Op::Rw), &[0u8; 200]);
    // Consuming the first packet frees credit silently: 200 bytes stay unread (>= SO_RCVLOWAT 1)
    // and far more than 64 KiB is advertised free.
    let lease = host.engine.recv(child, 1000).unwrap();
    host.engine.commit_recv(child, lease);
    assert!(host.sent().is_empty());
    host.engine.set_rcvlowat(child, 150).unwrap();
    assert!(host.sent().is_empty(), "200 unread bytes already reach the mark");
    host.engine.set_rcvlowat(child, 300).unwrap();
    let update = host.sent();
    assert_eq!((update[0].repr.op, update[0].repr.fwd_cnt), (Op::CreditUpdate, 1000));
    assert_eq!(host.engine.set_rcvlowat(child, 1 << 30), Err(OptionError::InvalidValue));
}

#[test]
fn close_after_peer_shut_both_ways_is_an_immediate_rst() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.deliver(stream(Op::Rw), b"unread");
    host.deliver(Repr { flags: 3, ..stream(Op::Shutdown) }, &[]);
    assert!(host.sent().is_empty(), "unread data: no RST yet");
    host.engine.close(host.now, child);
    assert_eq!(host.ops(), [Op::Rst]);
    assert_eq!(host.engine.socket_count(), 1, "only the listener is left");
}

fn guest_bytes(repr: Repr, op: u16) -> [u8; zerovsock_wire::HEADER_LEN] {
    let mut bytes = repr.to_bytes();
    bytes[30..32].copy_from_slice(&op.to_le_bytes());
    bytes
}

#[test]
fn close_after_shut_wr_still_sends_shutdown_with_both_flags() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.shutdown(child, ShutdownFlags::SEND).unwrap();
    assert_eq!(host.sent()[0].repr.shutdown_flags(), ShutdownFlags::SEND);
    host.engine.close(host.now, child);
    let sent = host.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].repr.op, sent[0].repr.shutdown_flags()),
        (Op::Shutdown, ShutdownFlags::all())
    );
}

#[test]
fn close_after_shutdown_both_ways_sends_no_second_shutdown() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.shutdown(child, ShutdownFlags::all()).unwrap();
    host.sent();
    host.engine.close(host.now, child);
    assert!(host.sent().is_empty());
}

#[test]
fn zero_length_seqpacket_send_puts_nothing_on_the_wire_and_takes_no_id() {
    let mut host = Host::new();
    let child = host.established(SocketType::Seqpacket);
    host.engine.set_zerocopy(child, true).unwrap();
    let grant = host.send(child, b"", true).unwrap();
    assert_eq!((grant.len(), grant.completion_id()), (0, None));
    assert_eq!(host.engine.finish_send(grant, Payload::new()), Ok(0));
    assert!(host.sent().is_empty());
    assert_eq!(host.engine.next_completion_id(child), Some(0));
}

#[test]
fn zero_length_send_still_reports_broken_pipe() {
    let mut host = Host::new();
    let child = host.established(SocketType::Seqpacket);
    host.engine.shutdown(child, ShutdownFlags::SEND).unwrap();
    assert_eq!(host.send(child, b"", false), Err(SendError::BrokenPipe));
}

/// Drains the wake-ups the engine has queued.
fn woken(host: &mut Host) -> Vec<SocketId> {
    std::iter::from_fn(|| host.engine.poll_wakeup()).collect()
}

#[test]
fn credit_carried_by_any_packet_wakes_the_writer() {
    for carrier in [Op::CreditRequest, Op::Rw, Op::Shutdown] {
        let mut host = Host::new();
        let child = host.established(SocketType::Stream);
        host.deliver(Repr { buf_alloc: 100, ..stream(Op::CreditUpdate) }, &[]);
        let grant = host.send(child, &[0u8; 100], false).unwrap();
        host.engine.finish_send(grant, Payload::from(vec![0u8; 100])).unwrap();
        host.sent();
        woken(&mut host);
        assert_eq!(host.engine.send_space(child), 0);
        host.deliver(Repr { buf_alloc: 100, fwd_cnt: 100, ..stream(carrier) }, &[]);
        assert_eq!(host.engine.send_space(child), 100);
        assert_eq!(woken(&mut host), [child], "{carrier:?} carried credit");
    }
}

#[test]
fn placed_pass_takes_only_what_was_placed_and_returns_its_header_unqueued() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    // The guest has read 40 bytes of 1000 sent before: the header must carry that fwd_cnt.
    host.deliver(Repr { buf_alloc: 1000, ..stream(Op::CreditUpdate) }, &[]);
    host.deliver(Repr { len: 40, buf_alloc: 1000, ..stream(Op::Rw) }, &[7u8; 40]);
    let lease = host.engine.recv(child, 40).unwrap();
    host.engine.commit_recv(child, lease);
    host.sent();
    let grant = host.send(child, &[0u8; 600], false).unwrap();
    assert_eq!(grant.len(), 600);
    // A readv filled 250 bytes of the 600 it was offered.
    let repr = host.engine.finish_placed(grant, 250).unwrap().expect("a header");
    assert_eq!((repr.op, repr.len, repr.flags), (Op::Rw, 250, 0));
    assert_eq!((repr.src, repr.dst), (stream(Op::Rw).dst, stream(Op::Rw).src));
    assert_eq!((repr.buf_alloc, repr.fwd_cnt), (BUF, 40));
    assert!(host.sent().is_empty(), "the caller delivers the header itself");
    assert_eq!(host.engine.send_space(child), 750, "the unplaced 350 bytes are credit again");
    // Nothing placed: the whole grant comes back, and no header.
    let grant = host.send(child, &[0u8; 100], false).unwrap();
    assert_eq!(host.engine.finish_placed(grant, 0).unwrap(), None);
    assert_eq!(host.engine.send_space(child), 750);
    // A shutdown since the grant: refused, credit back.
    let grant = host.send(child, &[0u8; 100], false).unwrap();
    let shutdown =
        Repr { flags: ShutdownFlags::RECEIVE.bits(), buf_alloc: 1000, ..stream(Op::Shutdown) };
    host.deliver(shutdown, &[]);
    assert_eq!(host.engine.finish_placed(grant, 100), Err(SendError::BrokenPipe));
    assert_eq!(host.engine.send_space(child), 750);
}

#[test]
fn packet_without_new_credit_does_not_wake_the_writer() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    woken(&mut host);
    host.deliver(stream(Op::CreditRequest), &[]);
    assert!(woken(&mut host).is_empty());
    assert!(host.engine.readiness(child).writable);
}

#[test]
fn packet_for_a_socket_the_peer_reset_is_answered_with_rst() {
    for unread in [false, true] {
        let mut host = Host::new();
        let child = host.established(SocketType::Stream);
        if unread {
            host.deliver(stream(Op::Rw), b"unread");
        }
        host.deliver(stream(Op::Rst), &[]);
        assert!(host.sent().is_empty());
        assert_eq!(host.deliver(stream(Op::Request), &[]), Disposition::Refused);
        let sent = host.sent();
        assert_eq!(sent.len(), 1, "unread: {unread}");
        assert_eq!((sent[0].repr.op, sent[0].repr.dst), (Op::Rst, Addr::new(GUEST, GUEST_PORT)));
        assert_eq!((sent[0].repr.buf_alloc, sent[0].repr.fwd_cnt), (0, 0), "as reset_no_sock");
        assert_eq!(host.engine.unread_bytes(child), if unread { 6 } else { 0 });
    }
}

#[test]
fn unknown_op_on_an_established_connection_is_dropped() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    let bytes = guest_bytes(stream(Op::Rw), 99);
    let result = host.engine.handle_bytes(host.now, &bytes, Payload::new());
    assert_eq!(result, Err(zerovsock_wire::WireError::UnknownOp(99)));
    assert!(host.sent().is_empty());
    assert_eq!(host.engine.state(child), Some(State::Established));
    host.deliver(stream(Op::Rw), b"still here");
    assert_eq!(host.engine.unread_bytes(child), 10);
}

#[test]
fn unknown_op_while_connecting_is_reset_as_a_protocol_error() {
    let mut host = Host::new();
    let id = connecting(&mut host);
    let request = host.sent().remove(0);
    let bytes = guest_bytes(reply_to(&request, Op::Response), 99);
    assert!(host.engine.handle_bytes(host.now, &bytes, Payload::new()).is_err());
    assert_eq!(host.ops(), [Op::Rst]);
    assert_eq!(host.engine.connect_result(id), Err(ConnectError::Failed(SocketError::Protocol)));
}

#[test]
fn unknown_op_to_a_listener_or_nobody_is_reset() {
    let mut host = Host::new();
    let bytes = guest_bytes(stream(Op::Request), 99);
    assert!(host.engine.handle_bytes(host.now, &bytes, Payload::new()).is_err());
    assert_eq!(host.ops(), [Op::Rst]);
    host.listener(SocketType::Stream, 8);
    assert!(host.engine.handle_bytes(host.now, &bytes, Payload::new()).is_err());
    assert_eq!(host.ops(), [Op::Rst]);
}

#[test]
fn buffer_max_wins_over_min_as_linux_applies_min_then_max() {
    let mut host = Host::new();
    let id = host.engine.open(SocketType::Stream).unwrap();
    host.engine.set_buffer_min_size(id, 1000).unwrap();
    assert_eq!(host.engine.set_buffer_max_size(id, 500), Ok(500));
    assert_eq!(host.engine.set_buffer_min_size(id, 2000), Ok(500));
    assert_eq!(host.engine.set_buffer_size(id, 100_000), Ok(500));
}

#[test]
fn peer_full_shutdown_with_an_incomplete_message_queued_is_not_reset() {
    let mut host = Host::new();
    let child = host.established(SocketType::Seqpacket);
    host.deliver(guest(Op::Rw, SocketType::Seqpacket), b"no end of message yet");
    host.deliver(Repr { flags: 3, ..guest(Op::Shutdown, SocketType::Seqpacket) }, &[]);
    assert!(host.sent().is_empty(), "rx_bytes > 0: Linux sends no RST");
    assert_eq!(host.engine.unread_bytes(child), 21);
}

#[test]
fn pinned_packets_are_collapsed_by_copying_instead_of_resetting() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.set_buffer_size(child, 64 * 1024).unwrap();
    host.sent();
    let sink = std::sync::Arc::new(());
    for i in 0..120u8 {
        let owner = sink.clone();
        let data = Bytes::from_owner(PinnedBytes(vec![i; 100], owner));
        let packet = Packet { pinned: true, ..Packet::data(stream(Op::Rw), Payload::from(data)) };
        assert_eq!(
            host.engine.handle_packet(host.now, packet),
            Disposition::Delivered,
            "packet {i}"
        );
    }
    assert!(host.sent().is_empty());
    // Collapsing copied the first packets and dropped the sender's buffers (their completions).
    assert!(std::sync::Arc::strong_count(&sink) < 100, "{}", std::sync::Arc::strong_count(&sink));
    let lease = host.engine.recv(child, 64 * 1024).unwrap();
    let expected: Vec<u8> = (0..120u8).flat_map(|i| [i; 100]).collect();
    assert_eq!(lease.payload().to_vec(), expected);
    host.engine.commit_recv(child, lease);
    assert_eq!(std::sync::Arc::strong_count(&sink), 1);
}

/// A sender's buffer whose lifetime a test can observe.
struct PinnedBytes(Vec<u8>, #[allow(dead_code)] std::sync::Arc<()>);

impl AsRef<[u8]> for PinnedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Linux cannot collapse message ends, so a SEQPACKET peer that queues more small messages than
/// the buffer allows packets gets the connection reset though it kept within its credit.
#[test]
fn seqpacket_messages_beyond_the_queue_bound_reset_the_connection() {
    let mut host = Host::new();
    let child = host.established(SocketType::Seqpacket);
    host.engine.set_buffer_size(child, 4 * 576).unwrap();
    host.sent();
    let message = Repr { flags: SeqFlags::EOM.bits(), ..guest(Op::Rw, SocketType::Seqpacket) };
    for _ in 0..4 {
        assert_eq!(host.deliver(message, &[7u8; 200]), Disposition::Delivered);
    }
    let queue = host.engine.receive_queue(child).unwrap();
    assert_eq!((queue.packets, queue.messages, queue.packet_limit()), (4, 4, 4));
    assert_eq!(host.deliver(message, &[7u8; 200]), Disposition::QueueFull);
    assert_eq!(host.ops(), [Op::Rst]);
    for _ in 0..4 {
        let lease = host.engine.recv(child, 512).unwrap();
        assert_eq!(lease.len(), 200, "messages queued before the reset stay readable");
        host.engine.commit_recv(child, lease);
    }
    assert_eq!(host.engine.recv(child, 512), Err(RecvError::Failed(SocketError::CreditExceeded)));
}

// ---------------------------------------------------------------------------------------------
// Review tests (kernel 6.12.117 comparison). Each one fails on the current engine and states
// what Linux does; file:line refer to /work/ksrc/linux/net/vmw_vsock.
// ---------------------------------------------------------------------------------------------

/// virtio_transport_common.c:1848 (`virtio_transport_recv_pkt`) takes the header's credit
/// (`virtio_transport_space_update`) for every packet that reaches a socket, before the state
/// switch and whatever its op; only then does `virtio_transport_recv_connected` drop the unknown
/// op (`default:`, line 1642).
#[test]
fn unknown_op_still_carries_credit() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.deliver(Repr { buf_alloc: 100, ..stream(Op::CreditUpdate) }, &[]);
    let grant = host.send(child, &[0u8; 100], false).unwrap();
    host.engine.finish_send(grant, Payload::from(vec![0u8; 100])).unwrap();
    host.sent();
    woken(&mut host);
    assert_eq!(host.engine.send_space(child), 0);
    let bytes = guest_bytes(Repr { buf_alloc: 100, fwd_cnt: 100, ..stream(Op::CreditUpdate) }, 99);
    let _ = host.engine.handle_bytes(host.now, &bytes, Payload::new());
    assert!(host.sent().is_empty(), "dropped without reply, as before");
    assert_eq!(host.engine.send_space(child), 100, "the unknown op's fwd_cnt counts");
    assert_eq!(woken(&mut host), [child], "sk_write_space");
}

/// af_vsock.c:1110-1127 (`vsock_shutdown`): a socket in SS_CONNECTING may shut down, and the
/// SHUTDOWN goes out at once (`vsock_send_shutdown` -> `virtio_transport_shutdown`, which
/// `send_pkt_info` sends in any state). It reaches the peer's child after the REQUEST.
#[test]
fn shutdown_while_connecting_reaches_the_peer() {
    let mut host = Host::new();
    let id = connecting(&mut host);
    let request = host.sent().remove(0);
    host.engine.shutdown(id, ShutdownFlags::SEND).unwrap();
    let mut sent = host.sent();
    host.deliver(reply_to(&request, Op::Response), &[]);
    assert_eq!(host.engine.connect_result(id), Ok(true));
    sent.extend(host.sent());
    let shutdowns: Vec<u32> =
        sent.iter().filter(|p| p.repr.op == Op::Shutdown).map(|p| p.repr.flags).collect();
    assert_eq!(shutdowns, [ShutdownFlags::SEND.bits()], "the peer must learn of SHUT_WR");
}

/// af_vsock.c:1850-1851 (`vsock_update_buffer_size`) calls `notify_buffer_size` whenever the value
/// changes and a transport is assigned, which it is from connect() on;
/// virtio_transport_common.c:1093 then sends CREDIT_UPDATE in any state (SYN_SENT included).
#[test]
fn buffer_size_changed_while_connecting_is_advertised() {
    let mut host = Host::new();
    let id = connecting(&mut host);
    let request = host.sent().remove(0);
    host.engine.set_buffer_size(id, 4096).unwrap();
    let mut sent = host.sent();
    host.deliver(reply_to(&request, Op::Response), &[]);
    sent.extend(host.sent());
    assert!(
        sent.iter().any(|p| p.repr.buf_alloc == 4096),
        "the peer still believes buf_alloc = {}",
        request.repr.buf_alloc
    );
    // (Today the peer then sends up to 256 KiB and the 4 KiB buffer resets it: ENOBUFS.)
}

/// af_vsock.c:824 (`__vsock_create` -> `sock_init_data`, which sets `sk_rcvlowat = 1`) for the
/// child made by `virtio_transport_recv_listen` (virtio_transport_common.c:1731,
/// `vsock_create_connected`); lines 854-860 copy only connect timeout and buffer sizes from the
/// listener.
#[test]
fn accepted_socket_does_not_inherit_rcvlowat() {
    let mut host = Host::new();
    let listener = host.listener(SocketType::Stream, 8);
    host.engine.set_rcvlowat(listener, 100).unwrap();
    host.deliver(stream(Op::Request), &[]);
    let child = host.engine.accept(listener).unwrap();
    assert_eq!(host.engine.rcvlowat(child), Ok(1));
}

/// virtio_transport_common.c:1543-1544 and 442 (`virtio_transport_recv_enqueue`,
/// `virtio_transport_can_collapse`) look at VIRTIO_VSOCK_SEQ_EOM whatever the socket type: a
/// STREAM peer that sets EOM on its RW packets gets packets that are never collapsed (nor merged
/// onto), so the queue bound resets the connection (line 1601, ENOBUFS).
#[test]
fn stream_packets_with_eom_are_not_collapsed() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.set_buffer_size(child, 4 * 576).unwrap();
    host.sent();
    let rw = Repr { flags: SeqFlags::EOM.bits(), ..stream(Op::Rw) };
    for _ in 0..4 {
        assert_eq!(host.deliver(rw, &[7u8; 200]), Disposition::Delivered);
    }
    assert_eq!(host.deliver(rw, &[7u8; 200]), Disposition::QueueFull);
}

/// virtio_transport_common.c:1600-1601 and 1395-1396: a credit overrun with nothing queued leaves
/// the socket in TCP_CLOSING with SOCK_DONE, and af_vsock.c:2411-2418
/// (`__vsock_connectible_recvmsg`) answers any read of a non-ESTABLISHED, SOCK_DONE socket with 0;
/// ENOBUFS is seen only through SO_ERROR / POLLERR.
#[test]
fn read_after_overrun_with_empty_queue_is_end_of_stream() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.set_buffer_size(child, 4096).unwrap();
    host.sent();
    assert_eq!(host.deliver(stream(Op::Rw), &[0u8; 4097]), Disposition::Violation);
    assert_eq!(host.ops(), [Op::Rst]);
    assert_eq!(host.engine.recv(child, 16).map(|l| l.len()), Ok(0));
}

/// af_vsock.c:2329 (`__vsock_stream_recvmsg`) reads `sk->sk_err` without clearing it, and a socket
/// reset with data queued stays TCP_ESTABLISHED after the data is read (no code moves it on), so
/// every later read returns ENOBUFS again until SO_ERROR clears it.
#[test]
fn overrun_error_persists_on_later_stream_reads() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.set_buffer_size(child, 4096).unwrap();
    host.sent();
    host.deliver(stream(Op::Rw), &[0u8; 4096]);
    assert_eq!(host.deliver(stream(Op::Rw), &[0u8; 1]), Disposition::Violation);
    let lease = host.engine.recv(child, 8192).unwrap();
    host.engine.commit_recv(child, lease);
    let error = Err(RecvError::Failed(SocketError::CreditExceeded));
    assert_eq!(host.engine.recv(child, 1).map(|l| l.len()), error);
    assert_eq!(host.engine.recv(child, 1).map(|l| l.len()), error, "sk_err is not cleared");
}

/// af_vsock.c:2099-2106 (`vsock_connectible_sendmsg`) waits for space (EAGAIN when non-blocking)
/// before it calls `seqpacket_enqueue` (line 2156), whose EMSGSIZE check
/// (virtio_transport_common.c:978) therefore comes only once there is credit.
#[test]
fn oversized_seqpacket_message_without_credit_would_block_first() {
    let mut host = Host::new();
    let child = host.established(SocketType::Seqpacket);
    host.deliver(Repr { buf_alloc: 1000, ..guest(Op::CreditUpdate, SocketType::Seqpacket) }, &[]);
    let grant = host.send(child, &[0u8; 1000], false).unwrap();
    host.engine.finish_send(grant, Payload::from(vec![0u8; 1000])).unwrap();
    assert_eq!(host.engine.send_space(child), 0);
    assert_eq!(host.send(child, &[0u8; 1001], false), Err(SendError::WouldBlock));
}

/// virtio_transport_common.c:1433-1435 (`virtio_transport_close`): a socket whose peer has shut
/// both ways, which every SOCK_DONE socket has (`do_close`, line 1394), answers close() with RST
/// even when the peer already reset it.
#[test]
fn close_after_peer_reset_sends_rst() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.deliver(stream(Op::Rst), &[]);
    assert!(host.sent().is_empty());
    host.engine.close(host.now, child);
    assert_eq!(host.ops(), [Op::Rst]);
}

/// virtio_transport_common.c:773 (`virtio_transport_stream_do_dequeue`): `free_space = buf_alloc -
/// fwd_cnt_delta` is u32 arithmetic; after the buffer shrank below the bytes consumed since the
/// last update it wraps, is not < 64 KiB, and no CREDIT_UPDATE is sent (unless rx_bytes <
/// SO_RCVLOWAT).
#[test]
fn credit_update_after_shrink_follows_linux_u32_wrap() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    for len in [65536usize, 65536, 10_000] {
        assert_eq!(host.deliver(stream(Op::Rw), &vec![1u8; len]), Disposition::Delivered);
    }
    let lease = host.engine.recv(child, 65536).unwrap();
    host.engine.commit_recv(child, lease);
    assert!(host.sent().is_empty(), "192 KiB still advertised free");
    host.engine.set_buffer_size(child, 40 * 1024).unwrap();
    assert_eq!(host.ops(), [Op::CreditUpdate]);
    let lease = host.engine.recv(child, 65536).unwrap();
    host.engine.commit_recv(child, lease);
    assert!(host.sent().is_empty(), "40 KiB - 64 KiB wraps in u32: no update");
}

/// virtio_transport_common.c:1603 (`virtio_transport_recv_connected`, RW that cannot be queued):
/// after RST + ENOBUFS the socket is removed from the connected table (`vsock_remove_sock`), so
/// the peer may connect again from the same port at once.
#[test]
fn socket_reset_for_overrun_frees_the_peer_port() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.engine.set_buffer_size(child, 4096).unwrap();
    host.sent();
    assert_eq!(host.deliver(stream(Op::Rw), &[0u8; 4097]), Disposition::Violation);
    assert_eq!(host.ops(), [Op::Rst]);
    assert_eq!(host.deliver(stream(Op::Request), &[]), Disposition::Delivered);
    assert_eq!(host.ops(), [Op::Response]);
}

/// virtio_transport_common.c:1622-1625: SHUTDOWN(RCV|SEND) on a socket with nothing unread is
/// answered with RST; with data kept (Linux keeps an orphan's data) the close timeout (line 1411)
/// sends the RST instead.
#[test]
fn orphan_that_dropped_unread_data_still_answers_shutdown_with_rst() {
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    host.deliver(stream(Op::Rw), b"unread");
    host.engine.close(host.now, child);
    assert_eq!(host.ops(), [Op::Shutdown]);
    host.deliver(Repr { flags: 3, ..stream(Op::Shutdown) }, &[]);
    let mut ops = host.ops();
    host.advance(CLOSE_TIMEOUT);
    ops.extend(host.ops());
    assert_eq!(ops, [Op::Rst], "an RST at once, or at the close timeout");
}

/// af_vsock.c:912-915 (`__vsock_release` of a listener releases each connection still in the
/// accept queue) -> virtio_transport_common.c:1438-1439 (`virtio_transport_close`): an ESTABLISHED
/// child is closed gracefully, SHUTDOWN(RCV|SEND) and the close timeout.
#[test]
fn closing_a_listener_shuts_down_unaccepted_connections_gracefully() {
    let mut host = Host::new();
    let listener = host.listener(SocketType::Stream, 8);
    host.deliver(stream(Op::Request), &[]);
    host.sent();
    host.engine.close(host.now, listener);
    let sent: Vec<(Op, u32)> = host.sent().iter().map(|p| (p.repr.op, p.repr.flags)).collect();
    assert_eq!(sent, [(Op::Shutdown, ShutdownFlags::all().bits())]);
}

/// af_vsock.c:1839-1853 (`vsock_update_buffer_size`): without a transport (not yet connecting) the
/// value is stored as clamped to [min, max] only; the u32 clamp is
/// `virtio_transport_notify_buffer_size` / `do_socket_init` (virtio_transport_common.c:1088,
/// 1069), applied once a transport is assigned.
#[test]
fn buffer_size_of_an_unconnected_socket_is_not_clamped_to_u32() {
    let mut host = Host::new();
    let id = host.engine.open(SocketType::Stream).unwrap();
    host.engine.set_buffer_max_size(id, 1 << 33).unwrap();
    host.engine.set_buffer_size(id, 1 << 33).unwrap();
    assert_eq!(host.engine.buffer_sizes(id).map(|s| s.0), Ok(1 << 33));
}

/// Guest memory as the device hands it over: the engine queues it without copying, the reader's
/// lease shows the same memory, and it is released (the device's chain goes back) only when the
/// reader has consumed it.
#[test]
fn foreign_payload_is_queued_in_place_and_released_after_the_read() {
    use std::sync::atomic::Ordering;
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    drop(host.sent());
    let (memory, released) = crate::packet::tests::Guest::memory(&[9u8; 4096]);
    let repr = Repr { len: 4096, ..stream(Op::Rw) };
    let packet = Packet::data(repr, Payload::from_foreign(memory.clone()));
    assert_eq!(host.engine.handle_packet(host.now, packet), Disposition::Delivered);
    drop(memory);
    assert!(!released.load(Ordering::SeqCst), "queued data still needs the guest's memory");
    let lease = host.engine.recv(child, 8192).unwrap();
    let Some(Segment::Foreign(_)) = lease.payload().segments().next() else {
        panic!("the lease must show the guest's memory, not a copy")
    };
    assert_eq!(lease.payload().to_vec(), vec![9u8; 4096]);
    host.engine.commit_recv(child, lease);
    assert!(released.load(Ordering::SeqCst), "consumed data gives the memory back");
}

/// A small packet merged into the queue's tail is copied there, so its guest memory comes back
/// at once instead of waiting for the reader.
#[test]
fn small_foreign_packet_merged_into_the_tail_is_released_at_once() {
    use std::sync::atomic::Ordering;
    let mut host = Host::new();
    let child = host.established(SocketType::Stream);
    assert_eq!(
        host.deliver(Repr { len: 10, ..stream(Op::Rw) }, &[1u8; 10]),
        Disposition::Delivered
    );
    let (memory, released) = crate::packet::tests::Guest::memory(&[2u8; 20]);
    let packet = Packet::data(Repr { len: 20, ..stream(Op::Rw) }, Payload::from_foreign(memory));
    assert_eq!(host.engine.handle_packet(host.now, packet), Disposition::Delivered);
    assert!(released.load(Ordering::SeqCst));
    let lease = host.engine.recv(child, 64).unwrap();
    assert_eq!(lease.payload().to_vec(), [[1u8; 10].as_slice(), &[2u8; 20]].concat());
}

/// A zerocopy send whose buffer is foreign memory (a payload passed on as it is) completes when
/// the transport drops the packet, as a local buffer does.
#[test]
fn zerocopy_pass_over_foreign_memory_completes_when_the_transport_drops_it() {
    use std::sync::atomic::Ordering;
    let mut host = Host::new();
    let child = zerocopy_child(&mut host);
    let (memory, released) = crate::packet::tests::Guest::memory(b"abc");
    let grant = host.send(child, b"abc", true).unwrap();
    assert!(!grant.must_copy());
    host.engine.finish_send(grant, Payload::from_foreign(memory)).unwrap();
    let in_flight = host.sent();
    assert!(in_flight.iter().any(|p| p.payload.has_foreign()));
    host.engine.poll_completions();
    assert_eq!(host.engine.recv_completion(child), Ok(None));
    drop(in_flight);
    assert!(released.load(Ordering::SeqCst));
    host.engine.poll_completions();
    assert_eq!(
        host.engine.recv_completion(child),
        Ok(Some(Completion { lo: 0, hi: 0, copied: false }))
    );
}

fn unclaimed(host: &mut Host, backlog: u32) -> SocketId {
    let id = host.engine.open(SocketType::Stream).unwrap();
    host.engine.listen_unclaimed(id, backlog).unwrap();
    id
}

/// A STREAM packet from the guest's port `from` to the host's `port`.
fn between(op: Op, port: u32, from: u32) -> Repr {
    let mut repr = stream(op);
    repr.dst.port = Port(port);
    repr.src.port = Port(from);
    repr
}

fn request_to(port: u32, from: u32) -> Repr {
    between(Op::Request, port, from)
}

#[test]
fn unclaimed_listener_takes_any_port_and_answers_only_when_confirmed() {
    let mut host = Host::new();
    let listener = unclaimed(&mut host, 8);
    assert_eq!(host.deliver(request_to(7000, 1), &[]), Disposition::Delivered);
    assert_eq!(host.ops(), vec![], "nothing is answered before the application decides");
    let child = host.engine.accept(listener).unwrap();
    assert_eq!(host.engine.local_addr(child).unwrap().port, Port(7000));
    assert!(host.engine.confirm(child));
    let sent = host.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].repr.op, sent[0].repr.src.port, sent[0].repr.dst.port),
        (Op::Response, Port(7000), Port(1))
    );
    assert!(!host.engine.confirm(child), "answered once");
    let rw = between(Op::Rw, 7000, 1);
    assert_eq!(host.deliver(Repr { len: 2, ..rw }, b"hi"), Disposition::Delivered);
    assert_eq!(host.engine.recv(child, 8).unwrap().payload().to_vec(), b"hi");
}

#[test]
fn unconfirmed_child_cannot_send_and_closing_it_answers_rst() {
    let mut host = Host::new();
    let listener = unclaimed(&mut host, 8);
    host.deliver(request_to(7000, 1), &[]);
    let child = host.engine.accept(listener).unwrap();
    let request = SendRequest {
        remaining: 1,
        at_segment_start: true,
        zerocopy: false,
        eor: false,
        max_pass: usize::MAX,
    };
    assert_eq!(host.engine.begin_send(child, request), Err(SendError::NotConnected));
    host.engine.close(host.now, child);
    let sent = host.sent();
    assert_eq!(sent.iter().map(|p| p.repr.op).collect::<Vec<_>>(), vec![Op::Rst]);
    assert_eq!(host.engine.socket_count(), 1, "only the listener is left");
}

#[test]
fn unclaimed_listener_bounds_waiting_requests_by_its_backlog() {
    let mut host = Host::new();
    let _listener = unclaimed(&mut host, 4);
    let answers: Vec<Disposition> =
        (0..20).map(|i| host.deliver(request_to(7000, i), &[])).collect();
    // Linux refuses once more than `backlog` wait (`sk_acceptq_is_full`): five are queued.
    assert_eq!(answers.iter().filter(|d| **d == Disposition::Delivered).count(), 5);
    assert!(host.sent().iter().all(|p| p.repr.op == Op::Rst));
    assert_eq!(host.engine.socket_count(), 6);
}

#[test]
fn bound_ports_are_not_unclaimed() {
    let mut host = Host::new();
    let _any = unclaimed(&mut host, 8);
    let specific = host.listener(SocketType::Stream, 8);
    assert_eq!(host.deliver(request_to(LISTEN_PORT.0, 1), &[]), Disposition::Delivered);
    assert_eq!(host.ops(), vec![Op::Response], "the port's own listener answers at once");
    assert!(host.engine.accept(specific).is_ok());
    // A port held by a socket that is not listening refuses, as without the catch-all.
    let bound = host.engine.open(SocketType::Stream).unwrap();
    host.engine.bind(bound, Addr::new(Cid::ANY, Port(9000))).unwrap();
    assert_eq!(host.deliver(request_to(9000, 2), &[]), Disposition::Refused);
    assert_eq!(host.ops(), vec![Op::Rst]);
}

#[test]
fn peer_reset_before_confirm_leaves_nothing_to_answer() {
    let mut host = Host::new();
    let listener = unclaimed(&mut host, 8);
    host.deliver(request_to(7000, 1), &[]);
    let child = host.engine.accept(listener).unwrap();
    host.deliver(between(Op::Rst, 7000, 1), &[]);
    assert!(!host.engine.confirm(child));
    host.engine.close(host.now, child);
    assert_eq!(host.ops(), vec![], "RST is never answered");
}

#[test]
fn closing_the_unclaimed_listener_refuses_its_waiting_children() {
    let mut host = Host::new();
    let listener = unclaimed(&mut host, 8);
    host.deliver(request_to(7000, 1), &[]);
    host.engine.close(host.now, listener);
    assert_eq!(host.ops(), vec![Op::Rst]);
    assert_eq!(host.engine.socket_count(), 0);
    assert_eq!(host.deliver(request_to(7000, 2), &[]), Disposition::Refused);
}

/// `vhost_vsock_reset_orphans`: when the guest's device goes away, its connections end with
/// ECONNRESET and nothing more is sent to it; connections to other peers stay.
#[test]
fn reset_peer_ends_every_connection_to_that_cid_only() {
    let mut host = Host::new();
    let established = host.established(SocketType::Stream);
    let connecting = connecting(&mut host);
    let other = host.engine.open(SocketType::Stream).unwrap();
    host.engine.connect(host.now, other, Addr::new(Cid(9), Port(1))).unwrap();
    drop(host.sent());
    host.engine.reset_peer(host.now, GUEST);
    assert_eq!(host.sent(), vec![], "nothing is sent to a peer that is gone");
    assert_eq!(
        host.engine.connect_result(connecting),
        Err(ConnectError::Failed(SocketError::ConnectionReset))
    );
    let request = SendRequest {
        remaining: 1,
        at_segment_start: true,
        zerocopy: false,
        eor: false,
        max_pass: usize::MAX,
    };
    assert!(host.engine.begin_send(established, request).is_err());
    assert!(host.engine.readiness(established).error, "the reset is reported as an error");
    assert_eq!(host.engine.connect_result(other), Ok(false), "a connection to another CID goes on");
}
