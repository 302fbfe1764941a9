//! The device's queue work against a hostile guest: mock queues over real guest memory.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use zerovsock::wire::{Addr, Cid, Op, Port, Repr, SocketType, HEADER_LEN};
use zerovsock::{Vsock, VsockListener};
use zerovsock_virtio::{GuestMemory, Returns, Used};

use crate::worker::{DeviceTransport, Outbound, Worker};

const GUEST: Cid = Cid(3);
const DATA: u64 = 0x10_0000;
const SLOT: u64 = 0x1_1000;

struct Harness {
    mem: Arc<GuestMemory>,
    tx_mock: MockSplitQueue<'static, GuestMemory>,
    tx: Queue,
    next_desc: u16,
    next_slot: u64,
    worker: Worker,
    vsock: Vsock,
    used: Vec<Used>,
}

impl Harness {
    fn new(queue_size: u16) -> Harness {
        let mem =
            Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).expect("memory"));
        let leaked: &'static GuestMemory = Box::leak(Box::new(mem.clone()));
        let tx_mock = MockSplitQueue::create(leaked, GuestAddress(0x8_0000), queue_size);
        let tx = tx_mock.create_queue().expect("tx queue");
        let outbound = Outbound::new().expect("outbound");
        let vsock =
            Vsock::with_transport(DeviceTransport { guest_cid: GUEST, outbound: outbound.clone() });
        let returns = Returns::new(|| {});
        let worker = Worker::new(GUEST, vsock.clone(), outbound, returns);
        Harness { mem, tx_mock, tx, next_desc: 0, next_slot: 0, worker, vsock, used: Vec::new() }
    }

    /// Puts one TX chain on the ring: `bytes` at a fresh slot, cut into descriptors of `cuts`.
    fn offer(&mut self, bytes: &[u8], cuts: &[u32], flags: u16) -> u16 {
        let base = DATA + self.next_slot * SLOT;
        self.next_slot += 1;
        self.mem.write_slice(bytes, GuestAddress(base)).expect("packet bytes");
        let mut addr = base;
        let head = self.next_desc;
        let descs: Vec<RawDescriptor> = cuts
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let last = i + 1 == cuts.len();
                let next_flag = if last {
                    0
                } else {
                    virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16
                };
                let desc = Descriptor::new(addr, len, flags | next_flag, head + i as u16 + 1);
                addr += u64::from(len);
                RawDescriptor::from(desc)
            })
            .collect();
        self.tx_mock.add_desc_chains(&descs, head).expect("chain");
        self.next_desc += cuts.len() as u16;
        head
    }

    fn offer_packet(&mut self, repr: Repr, payload: &[u8]) -> u16 {
        let mut bytes = Repr { len: payload.len() as u32, ..repr }.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        let cuts = if payload.is_empty() {
            vec![HEADER_LEN as u32]
        } else {
            vec![HEADER_LEN as u32, payload.len() as u32]
        };
        self.offer(&bytes, &cuts, 0)
    }

    fn run_tx(&mut self) -> crate::worker::Progress {
        self.worker.process_tx(&self.mem, &mut self.tx, &mut self.used)
    }

    /// The packets waiting for RX buffers, taken out.
    fn outbound_ops(&mut self) -> Vec<Op> {
        let mut ops = Vec::new();
        let rx_mock = MockSplitQueue::create(&*self.mem, GuestAddress(0x40_0000), 256);
        let mut rx: Queue = rx_mock.create_queue().expect("rx queue");
        let descs: Vec<RawDescriptor> = (0..200u16)
            .map(|i| {
                RawDescriptor::from(Descriptor::new(
                    0x50_0000 + u64::from(i) * 4096,
                    4096,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        rx_mock.add_desc_chains(&descs, 0).expect("rx chains");
        let mut used = Vec::new();
        while self.worker.rx_pending() && used.len() < 200 {
            let before = used.len();
            self.worker.process_rx(&self.mem, &mut rx, &mut used);
            if used.len() == before {
                break;
            }
        }
        for entry in used {
            let mut header = [0u8; HEADER_LEN];
            let head = u64::from(entry.head);
            self.mem
                .read_slice(&mut header, GuestAddress(0x50_0000 + head * 4096))
                .expect("rx header");
            ops.push(Repr::parse_bytes(&header).expect("device header").op);
        }
        ops
    }
}

fn from_guest(op: Op, src_port: u32, dst_port: u32) -> Repr {
    let mut repr = Repr::new(
        op,
        SocketType::Stream,
        Addr::new(GUEST, Port(src_port)),
        Addr::new(Cid::HOST, Port(dst_port)),
    );
    repr.buf_alloc = 256 * 1024;
    repr
}

#[test]
fn spoofed_source_cid_is_dropped_and_its_chain_returned() {
    let mut h = Harness::new(64);
    let _listener =
        VsockListener::bind(&h.vsock, Addr::new(Cid::ANY, Port(5000))).expect("listener");
    let mut spoofed = from_guest(Op::Request, 1000, 5000);
    spoofed.src.cid = Cid(4);
    let head = h.offer_packet(spoofed, &[]);
    h.run_tx();
    assert_eq!(h.used, vec![Used { head, len: 0 }]);
    assert_eq!(h.worker.stats.misaddressed, 1);
    assert_eq!(h.outbound_ops(), vec![], "a spoofed REQUEST gets no answer at all");
    // The guest's own CID is answered.
    h.offer_packet(from_guest(Op::Request, 1000, 5000), &[]);
    h.run_tx();
    assert_eq!(h.outbound_ops(), vec![Op::Response]);
}

#[test]
fn packets_for_another_destination_cid_are_dropped() {
    let mut h = Harness::new(64);
    let mut sibling = from_guest(Op::Request, 1000, 5000);
    sibling.dst.cid = Cid(7);
    h.offer_packet(sibling, &[]);
    h.run_tx();
    assert_eq!((h.worker.stats.misaddressed, h.used.len()), (1, 1));
    assert_eq!(h.outbound_ops(), vec![]);
}

#[test]
fn bad_chains_go_back_to_the_used_ring_and_the_next_packet_still_works() {
    let mut h = Harness::new(64);
    let request = from_guest(Op::Request, 1000, 5000).to_bytes();
    let writable = h.offer(&request, &[44], VRING_DESC_F_WRITE as u16);
    let short = h.offer(&request[..30], &[30], 0);
    let mut lying = Repr { len: 1000, ..from_guest(Op::Rw, 1000, 5000) }.to_bytes().to_vec();
    lying.extend_from_slice(&[0u8; 100]);
    let lie = h.offer(&lying, &[44, 100], 0);
    let outside = h.next_desc;
    h.tx_mock
        .add_desc_chains(&[RawDescriptor::from(Descriptor::new((32 << 20) - 8, 44, 0, 0))], outside)
        .expect("chain");
    h.next_desc += 1;
    let good = h.offer_packet(from_guest(Op::Request, 1001, 5999), &[]);
    h.run_tx();
    let heads: Vec<u16> = h.used.iter().map(|u| u.head).collect();
    assert_eq!(
        heads,
        vec![writable, short, lie, outside, good],
        "every chain is returned, none leaked"
    );
    assert_eq!(h.worker.stats.bad_tx_chains, 4);
    assert_eq!(h.outbound_ops(), vec![Op::Rst], "the good REQUEST (to a closed port) is answered");
}

#[test]
fn credit_violation_resets_the_connection() {
    let mut h = Harness::new(64);
    let listener =
        VsockListener::bind(&h.vsock, Addr::new(Cid::ANY, Port(5000))).expect("listener");
    h.offer_packet(from_guest(Op::Request, 1000, 5000), &[]);
    h.run_tx();
    let (_server, _) = listener.accept().expect("accept");
    assert_eq!(h.outbound_ops(), vec![Op::Response]);
    // The child's buffer is 256 KiB; the guest sends 320 KiB that nobody reads.
    for _ in 0..5 {
        h.offer_packet(from_guest(Op::Rw, 1000, 5000), &vec![1u8; 65536]);
    }
    h.run_tx();
    assert!(h.outbound_ops().contains(&Op::Rst), "more than the credit is reset, as Linux does");
}

#[test]
fn a_flood_of_requests_to_one_port_is_bounded_by_the_backlog() {
    let mut h = Harness::new(256);
    let socket = zerovsock::VsockSocket::stream(&h.vsock).expect("socket");
    socket.bind(Addr::new(Cid::ANY, Port(5000))).expect("bind");
    let _listener = socket.listen(4).expect("listen");
    for port in 0..100 {
        h.offer_packet(from_guest(Op::Request, 2000 + port, 5000), &[]);
    }
    h.run_tx();
    assert!(
        h.vsock.socket_count() <= 1 + 5,
        "{} sockets for a backlog of 4",
        h.vsock.socket_count()
    );
    let ops = h.outbound_ops();
    assert_eq!(ops.iter().filter(|op| **op == Op::Response).count(), 5);
    assert_eq!(ops.iter().filter(|op| **op == Op::Rst).count(), 95);
}

#[test]
fn held_chains_are_bounded_and_payloads_past_the_bound_are_copied() {
    let mut h = Harness::new(16);
    let listener =
        VsockListener::bind(&h.vsock, Addr::new(Cid::ANY, Port(5000))).expect("listener");
    h.offer_packet(from_guest(Op::Request, 1000, 5000), &[]);
    h.run_tx();
    let (server, _) = listener.accept().expect("accept");
    h.used.clear();
    for i in 0..12u8 {
        let mut bytes = Repr { len: 1000, ..from_guest(Op::Rw, 1000, 5000) }.to_bytes().to_vec();
        bytes.extend_from_slice(&[i; 1000]);
        h.offer(&bytes, &[1044], 0);
    }
    h.run_tx();
    // Half the queue (8) stay in guest memory; the other four are copied and returned now.
    assert_eq!(h.worker.returns.outstanding(), 8);
    assert_eq!(h.worker.stats.copied_tx, 4);
    assert_eq!(h.used.len(), 4);
    let mut got = vec![0u8; 12_000];
    std::io::Read::read_exact(&mut &server, &mut got).expect("read");
    assert_eq!(h.worker.returns.outstanding(), 0, "read data gives the guest its chains back");
    let expected: Vec<u8> = (0..12u8).flat_map(|i| [i; 1000]).collect();
    assert_eq!(got, expected);
}

// ---- Bounds taken from the ring in use, replies, cancelled connects ----

impl Harness {
    /// The guest reuses its ring: a fresh TX ring of `size` at `base` (the worker keeps no
    /// per-ring state, so this is what a guest recycling its descriptors looks like).
    fn new_tx_ring(&mut self, base: u64, size: u16) {
        let leaked: &'static GuestMemory = Box::leak(Box::new(self.mem.clone()));
        self.tx_mock = MockSplitQueue::create(leaked, GuestAddress(base), size);
        self.tx = self.tx_mock.create_queue().expect("tx queue");
        self.next_desc = 0;
    }
}

/// QEMU's vhost-user-vsock-pci sets up 128-entry rings (`VHOST_VSOCK_QUEUE_SIZE`) while the
/// device's default maximum is 1024: "half the queue" must be half of the ring in use, or
/// every TX descriptor the guest has can end up held by payloads nobody reads, and the guest
/// can send nothing on any other connection.
#[test]
fn held_chains_are_bounded_by_the_ring_in_use_not_the_configured_maximum() {
    let mut h = Harness::new(128);
    let listener =
        VsockListener::bind(&h.vsock, Addr::new(Cid::ANY, Port(5000))).expect("listener");
    h.offer_packet(from_guest(Op::Request, 1000, 5000), &[]);
    h.run_tx();
    let (_server, _) = listener.accept().expect("accept");
    // 120 KiB within the host's 256 KiB credit, on one connection whose reader is busy.
    for i in 0..120u8 {
        let mut bytes = Repr { len: 1024, ..from_guest(Op::Rw, 1000, 5000) }.to_bytes().to_vec();
        bytes.extend_from_slice(&[i; 1024]);
        h.offer(&bytes, &[44 + 1024], 0); // one descriptor each: 121 chains fit the ring
    }
    h.run_tx();
    assert!(
        h.worker.returns.outstanding() <= 64,
        "{} of the guest's 128 TX descriptors held by one connection's unread data (bound: half \
         the ring, 64)",
        h.worker.returns.outstanding()
    );
}

/// `vhost_vsock_more_replies`: TX stops while `queued_replies >= tx_vq->num`, the size of the
/// ring the driver set up (128 with QEMU), not the device's configured maximum.
#[test]
fn tx_stops_at_the_ring_size_in_replies_for_a_guest_without_rx_buffers() {
    let mut h = Harness::new(128);
    // Two full rings of REQUESTs to a closed port; each is answered with RST, which needs an
    // RX buffer the guest never posts.
    for (round, base) in [0x8_0000u64, 0xC_0000].into_iter().enumerate() {
        h.new_tx_ring(base, 128);
        for port in 0..120u32 {
            h.offer_packet(from_guest(Op::Request, 3000 + 200 * round as u32 + port, 6000), &[]);
        }
        h.run_tx();
    }
    assert!(
        h.worker.outbound.len() <= 128,
        "{} replies queued for a guest with a 128-entry ring and no RX buffers (Linux stops TX \
         at 128)",
        h.worker.outbound.len()
    );
}

/// Linux purges a connect's queued REQUEST when the connect times out
/// (`vsock_connect_timeout` -> `vhost_transport_cancel_pkt`). Here it stays queued for the
/// guest forever, one more per attempt: a host program retrying `CONNECT <port>` against a
/// guest that posts no RX buffers grows the device's queue without bound, and a guest that
/// wakes up later is sent REQUESTs for connections the host has long forgotten.
#[test]
fn timed_out_host_connects_leave_nothing_queued_for_the_guest() {
    let h = Harness::new(64);
    for _ in 0..20 {
        let socket = zerovsock::VsockSocket::stream(&h.vsock).expect("socket");
        socket.set_connect_timeout(std::time::Duration::from_millis(5)).expect("timeout");
        let error = socket.connect(Addr::new(GUEST, Port(4000))).expect_err("nobody answers");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    }
    assert_eq!(
        h.worker.outbound.len(),
        0,
        "REQUESTs of timed-out connects still queued for the guest"
    );
}

/// `vhost_vsock_more_replies` counts `queued_replies`: only the packets the host makes in
/// answer to the guest's (RESPONSE, RST; `virtio_vsock_skb_reply`). The worker counts every
/// packet waiting for the guest, host data included (`outbound.len()`), so a host program
/// writing to the guest faster than the guest posts RX buffers stops all guest TX: the
/// guest's own data and credit updates on every connection wait behind host data.
#[test]
fn host_data_waiting_for_rx_buffers_does_not_stop_guest_tx() {
    let mut h = Harness::new(64);
    let listener =
        VsockListener::bind(&h.vsock, Addr::new(Cid::ANY, Port(5000))).expect("listener");
    h.offer_packet(from_guest(Op::Request, 1000, 5000), &[]);
    h.run_tx();
    let (server, _) = listener.accept().expect("accept");
    // The host writes 64 small messages; the guest has not posted RX buffers for them yet.
    for i in 0..64u8 {
        std::io::Write::write_all(&mut &server, &[i; 100]).expect("host write");
    }
    assert!(h.worker.outbound.len() >= 64, "{} packets wait", h.worker.outbound.len());
    // One reply (the RESPONSE) is queued; the guest now sends 10 bytes on the connection.
    h.offer_packet(from_guest(Op::Rw, 1000, 5000), b"0123456789");
    let progress = h.run_tx();
    assert!(
        !progress.blocked && progress.chains == 1,
        "guest TX stopped by {} packets of host data waiting for RX buffers ({progress:?}); \
         Linux counts only replies (1 here) against the ring size",
        h.worker.outbound.len()
    );
    let mut got = [0u8; 10];
    std::io::Read::read_exact(&mut &server, &mut got).expect("host read");
}

/// Linux-shaped RX buffers: `count` single descriptors of `size` bytes (header included).
fn rx_ring(mem: &GuestMemory, count: u16, size: u32) -> (MockSplitQueue<'_, GuestMemory>, Queue) {
    let rx_mock = MockSplitQueue::create(mem, GuestAddress(0x40_0000), 256);
    let rx: Queue = rx_mock.create_queue().expect("rx queue");
    let descs: Vec<RawDescriptor> = (0..count)
        .map(|i| {
            let addr = RX_BUFFERS + u64::from(i) * u64::from(size);
            RawDescriptor::from(Descriptor::new(addr, size, VRING_DESC_F_WRITE as u16, 0))
        })
        .collect();
    rx_mock.add_desc_chains(&descs, 0).expect("rx chains");
    (rx_mock, rx)
}

const RX_BUFFERS: u64 = 0x50_0000;

/// Payload bytes of the RW packets in the used RX chains (4 KiB apart).
fn rw_bytes(mem: &GuestMemory, used: &[Used]) -> usize {
    rx_packets(mem, used, 4096).iter().filter(|(r, _)| r.op == Op::Rw).map(|(_, p)| p.len()).sum()
}

/// Headers and payload bytes of the used RX chains, in used-ring order (chains returned
/// empty carry nothing).
fn rx_packets(mem: &GuestMemory, used: &[Used], size: u32) -> Vec<(Repr, Vec<u8>)> {
    used.iter()
        .filter(|entry| entry.len > 0)
        .map(|entry| {
            let at = RX_BUFFERS + u64::from(entry.head) * u64::from(size);
            let mut bytes = vec![0u8; entry.len as usize];
            mem.read_slice(&mut bytes, GuestAddress(at)).expect("rx chain");
            let repr = Repr::parse_bytes(&bytes[..HEADER_LEN]).expect("device header");
            assert_eq!(repr.len as usize, bytes.len() - HEADER_LEN, "header length vs used length");
            (repr, bytes.split_off(HEADER_LEN))
        })
        .collect()
}

/// Host to guest through a Unix endpoint: the worker `readv`s the host socket straight into
/// the guest's RX buffers, never past the guest's credit, with nothing queued in between; the
/// rest stays in the host socket until the guest gives credit; end of file is seen even when
/// it arrived with the last bytes.
#[test]
fn host_socket_data_is_read_straight_into_rx_buffers_within_the_guests_credit() {
    use std::io::Write;
    let mut h = Harness::new(64);
    let mem = h.mem.clone();
    let (reader, mut program, _listener) = placed_connection(&mut h, 20_000);
    let conn = reader.conn;
    let data: Vec<u8> = (0..30_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    program.write_all(&data).expect("program write");
    program.shutdown(std::net::Shutdown::Write).expect("program shutdown");
    const SIZE: u32 = 3776;
    let (_rx_mock, mut rx) = rx_ring(&mem, 64, SIZE);
    let mut used = Vec::new();
    // The RESPONSE went out through the queue; everything after it is placed.
    h.worker.process_rx(&mem, &mut rx, &mut used);
    reader.request();
    for _ in 0..8 {
        h.worker.process_rx(&mem, &mut rx, &mut used);
    }
    let packets = rx_packets(&mem, &used, SIZE);
    assert_eq!(packets[0].0.op, Op::Response);
    let rw: Vec<_> = packets[1..].iter().filter(|(r, _)| r.op == Op::Rw).collect();
    let placed: Vec<u8> = rw.iter().flat_map(|(_, b)| b.clone()).collect();
    assert_eq!(placed.len(), 20_000, "the guest's whole credit and no more");
    assert!(placed == data[..20_000], "other bytes than the host program wrote");
    for (repr, _) in &rw {
        assert_eq!((repr.src, repr.dst), conn);
        assert!(repr.len as usize <= SIZE as usize - HEADER_LEN);
    }
    assert_eq!(h.worker.outbound.len(), 0, "host data went through the packet queue");
    assert!(!reader.at_eof(), "end of file seen before the bytes ahead of it were placed");
    // The guest reads it all and says so: the rest comes, then end of file.
    h.offer_packet(
        Repr { buf_alloc: 20_000, fwd_cnt: 20_000, ..from_guest(Op::CreditUpdate, 1000, 5000) },
        &[],
    );
    h.run_tx();
    let before = used.len();
    for _ in 0..8 {
        h.worker.process_rx(&mem, &mut rx, &mut used);
    }
    let rest: Vec<u8> =
        rx_packets(&mem, &used[before..], SIZE).into_iter().flat_map(|(_, b)| b).collect();
    assert!(rest == data[20_000..], "{} bytes after the credit update", rest.len());
    assert!(reader.at_eof(), "the host program's end of file was not seen");
}

/// Every packet stamps the host's `fwd_cnt`, and Linux's driver takes the latest header's
/// value as it is (`virtio_transport_space_update`): a header placed ahead of an older queued
/// packet of the same connection would make the guest's view of its credit go backwards.
#[test]
fn placed_host_data_never_overtakes_the_connections_queued_packets() {
    use std::io::{Read, Write};
    let mut h = Harness::new(64);
    let mem = h.mem.clone();
    let (reader, mut program, _listener) = placed_connection(&mut h, 256 * 1024);
    let server = &reader.stream;
    let mut got = [0u8; 150];
    // fwd_cnt 100, announced by CREDIT_UPDATEs that wait for RX buffers; then 150.
    h.offer_packet(from_guest(Op::Rw, 1000, 5000), &[1; 100]);
    h.run_tx();
    (&*server).read_exact(&mut got[..100]).expect("host read");
    h.offer_packet(from_guest(Op::CreditRequest, 1000, 5000), &[]);
    h.offer_packet(from_guest(Op::Rw, 1000, 5000), &[2; 50]);
    h.run_tx();
    (&*server).read_exact(&mut got[100..]).expect("host read");
    program.write_all(&[9; 1000]).expect("program write");
    reader.request();
    const SIZE: u32 = 4096;
    let (_rx_mock, mut rx) = rx_ring(&mem, 64, SIZE);
    let mut used = Vec::new();
    for _ in 0..4 {
        h.worker.process_rx(&mem, &mut rx, &mut used);
    }
    let packets = rx_packets(&mem, &used, SIZE);
    let ops: Vec<Op> = packets.iter().map(|(r, _)| r.op).collect();
    assert_eq!(ops.last(), Some(&Op::Rw), "host data after the queued packets: {ops:?}");
    let fwd: Vec<u32> = packets.iter().map(|(r, _)| r.fwd_cnt).collect();
    assert!(fwd.contains(&100), "{fwd:?}");
    assert!(fwd.is_sorted(), "fwd_cnt went backwards in delivery order: {fwd:?} ({ops:?})");
    assert_eq!(packets.last().map(|p| p.1.as_slice()), Some(&[9u8; 1000][..]));
}

// ---- Review of the in-place host-to-guest path (direct.rs, Worker::place_*) ----

/// A connection from guest port 1000 to host port 5000 whose guest buffer is `buf_alloc`, its
/// host end read by a `HostReader` over a Unix socket pair (the other end is the "host
/// program"). The RESPONSE is still queued for the guest.
fn placed_connection(
    h: &mut Harness,
    buf_alloc: u32,
) -> (Arc<crate::direct::HostReader>, std::os::unix::net::UnixStream, VsockListener) {
    let listener =
        VsockListener::bind(&h.vsock, Addr::new(Cid::ANY, Port(5000))).expect("listener");
    h.offer_packet(Repr { buf_alloc, ..from_guest(Op::Request, 1000, 5000) }, &[]);
    h.run_tx();
    let (server, _) = listener.accept().expect("accept");
    let (host_end, program) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    host_end.set_nonblocking(true).expect("nonblocking");
    let conn = (Addr::new(Cid::HOST, Port(5000)), Addr::new(GUEST, Port(1000)));
    let reader = crate::direct::HostReader::new(
        host_end,
        server,
        conn,
        &h.worker.outbound,
        std::task::Waker::noop().clone(),
    );
    (reader, program, listener)
}

/// RX chains of the given sizes (header included), one descriptor each, buffer `i` at
/// `RX_BUFFERS + i * 4096` (so `rx_packets(.., 4096)` reads them back).
fn rx_ring_of<'a>(mem: &'a GuestMemory, sizes: &[u32]) -> (MockSplitQueue<'a, GuestMemory>, Queue) {
    let rx_mock = MockSplitQueue::create(mem, GuestAddress(0x40_0000), 256);
    let rx: Queue = rx_mock.create_queue().expect("rx queue");
    let descs: Vec<RawDescriptor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            assert!(size <= 4096);
            let addr = RX_BUFFERS + i as u64 * 4096;
            RawDescriptor::from(Descriptor::new(addr, size, VRING_DESC_F_WRITE as u16, 0))
        })
        .collect();
    rx_mock.add_desc_chains(&descs, 0).expect("rx chains");
    (rx_mock, rx)
}

/// A guest may post RX buffers with room for a header and nothing else (44 bytes is a legal
/// chain: `vhost_transport_do_send_pkt` only refuses `iov_len < sizeof(hdr)`). Linux writes
/// such a buffer a header with `len` 0 and moves on to the next buffer, so the data flows as
/// soon as the guest posts real buffers. The first version's `place_one` took up to
/// `MAX_PLACE_BUFFERS` (32) buffers, found 0 bytes of room, and kept them aside in `spare`,
/// which `next_buffer` hands out first: every later round took the same 32 and nothing else,
/// the host data never reached the guest, and the 32 chains were never returned. Now such a
/// buffer goes back empty.
#[test]
fn header_only_rx_buffers_do_not_wedge_host_data_forever() {
    use std::io::Write;
    let mut h = Harness::new(64);
    let mem = h.mem.clone();
    let (reader, mut program, _listener) = placed_connection(&mut h, 256 * 1024);
    // The RESPONSE's buffer, 32 header-only buffers, then 8 ordinary ones.
    let mut sizes = vec![HEADER_LEN as u32; 1 + 32];
    sizes.extend([4096u32; 8]);
    let (_rx_mock, mut rx) = rx_ring_of(&mem, &sizes);
    let mut used = Vec::new();
    h.worker.process_rx(&mem, &mut rx, &mut used); // the RESPONSE
    program.write_all(&[7u8; 1000]).expect("program write");
    reader.request();
    for _ in 0..16 {
        h.worker.process_rx(&mem, &mut rx, &mut used);
    }
    let placed = rw_bytes(&mem, &used);
    assert_eq!(
        placed,
        1000,
        "{placed} of 1000 host bytes reached the guest with 8 good RX buffers posted behind 32 \
         header-only ones ({} chains used of {})",
        used.len(),
        sizes.len()
    );
}

/// The host program writes exactly the guest's credit and closes its socket. Linux sends
/// SHUTDOWN (and, after `VSOCK_CLOSE_TIMEOUT`, RST) whatever the credit: control packets
/// need none (`virtio_transport_close`). The first version found the end of file only by a
/// `readv`, and `place_one` only reads inside `poll_send_in_place`, which is `Pending` while the
/// guest has no credit: the reader went idle with the end of file in its socket, the pipe never learns
/// of it, the guest is never told, and a guest that does not read (or never returns credit)
/// keeps the `VsockStream`, the pipe task and the Unix socket alive forever.
#[test]
fn host_close_is_seen_when_the_guest_has_no_credit_left() {
    use std::io::Write;
    let mut h = Harness::new(64);
    let mem = h.mem.clone();
    let (reader, mut program, _listener) = placed_connection(&mut h, 1000);
    let (_rx_mock, mut rx) = rx_ring(&mem, 64, 4096);
    let mut used = Vec::new();
    program.write_all(&[3u8; 1000]).expect("program write");
    drop(program);
    reader.request();
    for _ in 0..8 {
        h.worker.process_rx(&mem, &mut rx, &mut used);
    }
    let placed = rw_bytes(&mem, &used);
    assert_eq!(placed, 1000, "the guest's whole credit");
    assert!(
        reader.at_eof() || reader.failed(),
        "the host program closed its socket, every byte before the end of file is in guest \
         buffers, and the device has not noticed (reader neither at EOF nor failed)"
    );
}

/// The connection's RESPONSE is queued when the host socket already has data (a server that
/// speaks first, e.g. an SSH banner, on a guest connect through `<uds>_<port>`). The first
/// `process_rx` of a session places host data first: `place_one` sees the queued RESPONSE and
/// answers `Placed::Later`, `deliver_packets` then sends the RESPONSE, and the pass ends with
/// `more == false` and no kick, though RX buffers and host data are both there. Without
/// EVENT_IDX `Backend::run` does one pass per event, and nothing else comes: the epoll event
/// for the data was spent (the reader is still "queued", so `request` pushes nothing and
/// `push_reader` kicks only an idle queue), and a Linux driver kicks RX only after it used
/// half its buffers (`virtio_transport_rx_work` -> `virtio_vsock_rx_fill`). Linux's
/// `vhost_transport_do_send_pkt` loops until the queue is empty or the buffers run out.
#[test]
fn host_data_behind_the_connections_queued_packet_is_not_left_without_a_wakeup() {
    use std::io::Write;
    let mut h = Harness::new(64);
    let mem = h.mem.clone();
    let (reader, mut program, _listener) = placed_connection(&mut h, 256 * 1024);
    program.write_all(b"SSH-2.0-banner\r\n").expect("program write");
    reader.request();
    let _ = h.worker.outbound.kick.read(); // the RESPONSE's kick, taken by the vring worker
    let (_rx_mock, mut rx) = rx_ring(&mem, 64, 4096);
    let mut used = Vec::new();
    let progress = h.worker.process_rx(&mem, &mut rx, &mut used);
    let packets = rx_packets(&mem, &used, 4096);
    let ops: Vec<Op> = packets.iter().map(|(r, _)| r.op).collect();
    let kicked = h.worker.outbound.kick.read().is_ok();
    assert!(
        ops.contains(&Op::Rw) || progress.more || kicked,
        "one RX pass delivered {ops:?} and left the host data in its socket with RX buffers \
         free, yet asked for no other pass ({progress:?}, kick: {kicked})"
    );
}

/// SIOCOUTQ on the device: a native socket's data counts as unsent while it waits for the
/// guest's RX buffers, a packet cut over several buffers until its last chunk is written (as
/// `vhost_transport_do_send_pkt` consumes an skb only once it is all sent), and nothing once
/// it is all in guest memory.
#[test]
fn unsent_bytes_count_host_data_until_it_is_all_in_guest_memory() {
    let mut h = Harness::new(64);
    let mem = h.mem.clone();
    let listener =
        VsockListener::bind(&h.vsock, Addr::new(Cid::ANY, Port(5000))).expect("listener");
    h.offer_packet(from_guest(Op::Request, 1000, 5000), &[]);
    h.run_tx();
    let (server, _) = listener.accept().expect("accept");
    assert_eq!(server.unsent_bytes(), 0, "a RESPONSE carries no data");
    std::io::Write::write_all(&mut &server, &[7u8; 10_000]).expect("host write");
    assert_eq!(server.unsent_bytes(), 10_000, "no RX buffers yet");
    // Two 4 KiB buffers take 8104 bytes of the packet: it is not all sent yet.
    let (_rx_mock, mut rx) = rx_ring(&mem, 2, 4096);
    let mut used = Vec::new();
    h.worker.process_rx(&h.mem, &mut rx, &mut used);
    assert!(rw_bytes(&mem, &used) > 0, "part of the packet went out");
    assert_eq!(server.unsent_bytes(), 10_000, "a packet counts until its last chunk");
    h.outbound_ops();
    assert_eq!(server.unsent_bytes(), 0);
}
