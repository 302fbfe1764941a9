//! Chains of every shape Linux (or a hostile driver) builds, over real guest memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use zerovsock_proto::{Payload, Segment};
use zerovsock_wire::{Addr, Cid, Op, Port, Repr, SeqFlags, SocketType, HEADER_LEN};

use crate::*;

const MEM_SIZE: usize = 4 << 20;
const DATA: u64 = 0x10_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn memory() -> Arc<GuestMemory> {
    Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory"))
}

fn repr(len: u32) -> Repr {
    let mut repr = Repr::new(
        Op::Rw,
        SocketType::Stream,
        Addr::new(Cid(3), Port(1000)),
        Addr::new(Cid::HOST, Port(5000)),
    );
    repr.len = len;
    repr.buf_alloc = 65536;
    repr.fwd_cnt = 7;
    repr
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Writes header and payload contiguously at `DATA` and returns them as one byte string.
fn place(mem: &GuestMemory, header: &Repr, payload: &[u8]) -> Vec<u8> {
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(payload);
    mem.write_slice(&bytes, GuestAddress(DATA)).expect("write packet");
    bytes
}

/// Descriptors cutting `DATA..DATA+total` at `cuts` (lengths), with `flags` each.
fn cut(cuts: &[u32], flags: u16) -> Vec<RawDescriptor> {
    let mut addr = DATA;
    cuts.iter()
        .map(|&len| {
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
            addr += u64::from(len);
            desc
        })
        .collect()
}

struct Counter(Arc<AtomicUsize>);

fn returns() -> (Arc<Returns>, Counter) {
    let wakes = Arc::new(AtomicUsize::new(0));
    let counted = wakes.clone();
    (
        Returns::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }),
        Counter(wakes),
    )
}

fn parse(mem: &Arc<GuestMemory>, descs: &[RawDescriptor]) -> Result<TxPacket, (u16, ChainError)> {
    let queue = MockSplitQueue::new(&**mem, 256);
    let chain = queue.build_desc_chain(descs).expect("chain");
    let (returns, _) = returns();
    TxPacket::parse(mem, chain, &returns)
}

#[test]
fn tx_chains_of_every_shape_carry_the_same_packet() {
    let payload = pattern(65536, 1);
    let shapes: [(&str, Vec<u32>); 6] = [
        ("one descriptor", vec![44 + 65536]),
        ("header, then one data descriptor", vec![44, 65536]),
        ("header, then one per page (MSG_ZEROCOPY)", [vec![44], vec![4096; 16]].concat()),
        ("Linux 6.12 over 32 KiB", vec![44, 32768, 32768]),
        ("header split over descriptors", vec![20, 24, 100, 65436]),
        ("header and payload cut mid-way", vec![30, 14 + 1000, 64536]),
    ];
    for (name, cuts) in shapes {
        let mem = memory();
        place(&mem, &repr(65536), &payload);
        let packet = parse(&mem, &cut(&cuts, 0)).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(Repr::parse_bytes(&packet.header), Ok(repr(65536)), "{name}");
        assert_eq!(packet.payload.to_vec(), payload, "{name}");
        assert!(packet.held(), "{name}");
        assert!(
            packet.payload.segments().all(|s| matches!(s, Segment::Foreign(_))),
            "{name}: the payload must be guest memory, not a copy"
        );
    }
}

#[test]
fn tx_chain_through_an_indirect_table() {
    let mem = memory();
    let payload = pattern(9000, 2);
    place(&mem, &repr(9000), &payload);
    // The table: header, then three data descriptors, chained inside the table.
    let table = GuestAddress(0x8_0000);
    let cuts = [44u32, 4096, 4096, 808];
    let mut addr = DATA;
    for (i, len) in cuts.iter().enumerate() {
        let flags = if i + 1 < cuts.len() { VRING_DESC_F_NEXT as u16 } else { 0 };
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, *len, flags, i as u16 + 1));
        mem.write_obj(desc, table.unchecked_add(16 * i as u64)).expect("table");
        addr += u64::from(*len);
    }
    let indirect =
        SplitDescriptor::new(table.0, 16 * cuts.len() as u32, VRING_DESC_F_INDIRECT as u16, 0);
    let packet = parse(&mem, &[RawDescriptor::from(indirect)]).expect("indirect chain");
    assert_eq!(packet.payload.to_vec(), payload);
}

use vm_memory::Address;

#[test]
fn tx_header_is_copied_once_and_later_guest_writes_do_not_change_it() {
    let mem = memory();
    place(&mem, &repr(10), b"0123456789");
    let packet = parse(&mem, &cut(&[54], 0)).expect("packet");
    mem.write_slice(&[0xffu8; 44], GuestAddress(DATA)).expect("overwrite");
    assert_eq!(Repr::parse_bytes(&packet.header), Ok(repr(10)));
}

#[test]
fn tx_bytes_past_the_header_length_are_ignored() {
    let mem = memory();
    place(&mem, &repr(3), b"abcdefgh");
    let packet = parse(&mem, &cut(&[44 + 8], 0)).expect("packet");
    assert_eq!(packet.payload.to_vec(), b"abc");
}

#[test]
fn tx_control_packet_holds_no_chain() {
    let mem = memory();
    place(&mem, &repr(0), &[]);
    let packet = parse(&mem, &cut(&[44], 0)).expect("packet");
    assert!(packet.payload.is_empty());
    assert!(!packet.held(), "nothing refers to the chain: the caller returns it");
}

#[test]
fn tx_chain_goes_back_only_when_the_last_view_of_its_payload_is_dropped() {
    let mem = memory();
    place(&mem, &repr(8192), &pattern(8192, 3));
    let queue = MockSplitQueue::new(&*mem, 256);
    let chain = queue.build_desc_chain(&cut(&[44, 4096, 4096], 0)).expect("chain");
    let head = chain.head_index();
    let (returns, wakes) = returns();
    let packet = TxPacket::parse(&mem, chain, &returns).expect("packet");
    assert_eq!(returns.outstanding(), 1);
    let tail = packet.payload.slice(5000, 100);
    drop(packet);
    assert_eq!(returns.take(), vec![], "a slice of the payload still reads guest memory");
    assert_eq!(tail.to_vec(), pattern(8192, 3)[5000..5100]);
    drop(tail);
    assert_eq!(returns.take(), vec![Used { head, len: 0 }]);
    assert_eq!(returns.outstanding(), 0);
    assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
}

#[test]
fn tx_copied_packet_returns_nothing_later() {
    let mem = memory();
    place(&mem, &repr(100), &pattern(100, 4));
    let queue = MockSplitQueue::new(&*mem, 256);
    let chain = queue.build_desc_chain(&cut(&[44, 100], 0)).expect("chain");
    let packet = TxPacket::parse_copied(&mem, chain).expect("packet");
    mem.write_slice(&[0u8; 100], GuestAddress(DATA + 44)).expect("overwrite");
    assert_eq!(packet.payload.to_vec(), pattern(100, 4));
    assert!(!packet.held());
}

#[test]
fn hostile_tx_chains_are_refused_with_their_head() {
    let mem = memory();
    place(&mem, &repr(100), &pattern(100, 5));
    let cases: Vec<(&str, Vec<RawDescriptor>, ChainError)> = vec![
        ("device-writable descriptor", cut(&[44, 100], W), ChainError::WritableInTx),
        ("shorter than a header", cut(&[30], 0), ChainError::TooShort { len: 30 }),
        (
            "longer than 64 KiB + header",
            cut(&[44, 65537], 0),
            ChainError::TooLong { len: 44 + 65537 },
        ),
        (
            "header claims more than the chain carries",
            cut(&[44, 99], 0),
            ChainError::LengthMismatch { claimed: 100, available: 99 },
        ),
        (
            "address outside guest memory",
            vec![RawDescriptor::from(SplitDescriptor::new(MEM_SIZE as u64 - 10, 144, 0, 0))],
            ChainError::BadAddress { addr: MEM_SIZE as u64 - 10, len: 144 },
        ),
        (
            "address plus length overflows",
            vec![RawDescriptor::from(SplitDescriptor::new(u64::MAX - 10, 144, 0, 0))],
            ChainError::BadAddress { addr: u64::MAX - 10, len: 144 },
        ),
    ];
    for (name, descs, expected) in cases {
        let queue = MockSplitQueue::new(&*mem, 256);
        let chain = queue.build_desc_chain(&descs).expect("chain");
        let head = chain.head_index();
        let (returns, _) = returns();
        let error = TxPacket::parse(&mem, chain, &returns).expect_err(name);
        assert_eq!(error, (head, expected), "{name}");
        assert_eq!(returns.outstanding(), 0, "{name}: nothing held");
    }
}

#[test]
fn tx_descriptor_loop_ends_after_the_queue_size() {
    let mem = memory();
    place(&mem, &repr(100), &pattern(100, 6));
    let queue = MockSplitQueue::new(&*mem, 16);
    // Descriptor 0 points back at itself: the walk stops after 16 descriptors of 44 bytes each.
    let looped = RawDescriptor::from(SplitDescriptor::new(DATA, 44, VRING_DESC_F_NEXT as u16, 0));
    queue.add_desc_chains(&[looped], 0).expect("chain");
    let mut q: virtio_queue::Queue = queue.create_queue().expect("queue");
    let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut q, &*mem).expect("available chain");
    let (returns, _) = returns();
    // 16 x 44 bytes, the header read from the first: hdr.len 100 fits the 660 that follow.
    let packet = TxPacket::parse(&mem, chain, &returns).expect("bounded walk");
    assert_eq!(packet.payload.len(), 100);
}

fn rx_chain(mem: &GuestMemory, descs: &[RawDescriptor]) -> Result<RxBuffer, (u16, ChainError)> {
    let queue = MockSplitQueue::new(mem, 256);
    RxBuffer::new(mem, queue.build_desc_chain(descs).expect("chain"))
}

fn read_rx(mem: &GuestMemory, used: Used) -> (Repr, Vec<u8>) {
    let mut bytes = vec![0u8; used.len as usize];
    mem.read_slice(&mut bytes, GuestAddress(DATA)).expect("read rx");
    (Repr::parse_bytes(&bytes).expect("header"), bytes[HEADER_LEN..].to_vec())
}

#[test]
fn rx_packet_is_split_over_linux_sized_buffers_with_eom_only_on_the_last() {
    let mem = memory();
    let data = pattern(10000, 7);
    let mut header = repr(10000);
    header.socket_type = SocketType::Seqpacket;
    header.flags = (SeqFlags::EOM | SeqFlags::EOR).bits();
    let payload = Payload::from(data.clone());
    let mut offset = 0;
    let mut got = Vec::new();
    let mut chunks = Vec::new();
    while offset < data.len() {
        let buffer = rx_chain(&mem, &cut(&[3776], W)).expect("rx buffer");
        assert_eq!(buffer.payload_capacity(), 3732);
        let chunk = buffer.fill(&mem, &header, &payload, offset).expect("fill");
        let (repr, bytes) = read_rx(&mem, chunk.used);
        assert_eq!(repr.len as usize, chunk.payload_len);
        assert_eq!(chunk.used.len as usize, HEADER_LEN + chunk.payload_len);
        assert_eq!(
            (repr.buf_alloc, repr.fwd_cnt, repr.src, repr.dst),
            (65536, 7, header.src, header.dst)
        );
        chunks.push(repr.flags);
        got.extend_from_slice(&bytes);
        offset += chunk.payload_len;
    }
    assert_eq!(got, data);
    assert_eq!(chunks, vec![0, 0, (SeqFlags::EOM | SeqFlags::EOR).bits()]);
}

#[test]
fn rx_buffer_of_several_descriptors_takes_header_and_payload_across_them() {
    let mem = memory();
    let data = pattern(5000, 8);
    let buffer = rx_chain(&mem, &cut(&[20, 24, 1000, 4000], W)).expect("rx buffer");
    let chunk = buffer.fill(&mem, &repr(5000), &Payload::from(data.clone()), 0).expect("fill");
    assert_eq!(chunk.payload_len, 5000);
    let (header, bytes) = read_rx(&mem, chunk.used);
    assert_eq!(header, repr(5000));
    assert_eq!(bytes, data);
}

#[test]
fn rx_control_packet_fits_a_bare_header_buffer() {
    let mem = memory();
    let buffer = rx_chain(&mem, &cut(&[44], W)).expect("rx buffer");
    let mut header = repr(0);
    header.op = Op::CreditUpdate;
    let chunk = buffer.fill(&mem, &header, &Payload::new(), 0).expect("fill");
    assert_eq!(chunk, RxChunk { used: Used { head: buffer.head(), len: 44 }, payload_len: 0 });
}

#[test]
fn hostile_rx_chains_are_refused() {
    let mem = memory();
    let readable = rx_chain(&mem, &cut(&[3776], 0)).expect_err("readable");
    assert_eq!(readable.1, ChainError::ReadableInRx);
    let small = rx_chain(&mem, &cut(&[40], W)).expect_err("small");
    assert_eq!(small.1, ChainError::TooShort { len: 40 });
    let outside =
        rx_chain(&mem, &[RawDescriptor::from(SplitDescriptor::new(MEM_SIZE as u64, 3776, W, 0))])
            .expect_err("outside");
    assert_eq!(outside.1, ChainError::BadAddress { addr: MEM_SIZE as u64, len: 3776 });
}

#[test]
fn rx_in_place_payload_gets_its_header() {
    let mem = memory();
    let buffer = rx_chain(&mem, &cut(&[44, 2000, 2000], W)).expect("rx buffer");
    let mut iovecs = Vec::new();
    assert_eq!(buffer.payload_iovecs(&mem, usize::MAX, &mut iovecs), 4000);
    assert_eq!(iovecs.iter().map(|v| v.1).sum::<usize>(), 4000);
    iovecs.clear();
    assert_eq!(buffer.payload_iovecs(&mem, 100, &mut iovecs), 100, "as much as asked");
    assert_eq!(iovecs.iter().map(|v| v.1).sum::<usize>(), 100);
    mem.write_slice(b"inplace", GuestAddress(DATA + 44)).expect("payload");
    let used = buffer.finish_in_place(&mem, &repr(7), 7).expect("header");
    let (header, bytes) = read_rx(&mem, used);
    assert_eq!((header.len, bytes.as_slice()), (7, b"inplace".as_slice()));
    assert_eq!(buffer.finish_in_place(&mem, &repr(7), 4001), None, "past the buffer");
}

/// The issue and DESIGN.md section 4: "never an RW payload over 64 KiB" into the guest.
/// `vhost_transport_do_send_pkt` can rely on skbs of at most 64 KiB; `RxBuffer::fill` takes
/// any `Payload` and cuts it only at the buffer's capacity, so a driver that posts one large
/// buffer (1 MiB here; nothing forbids it) is handed a single RW packet of any size.
#[test]
fn rx_never_writes_an_rw_payload_over_64_kib() {
    let mem = memory();
    let buffer = rx_chain(&mem, &cut(&[1 << 20], W)).expect("rx buffer");
    let data = pattern(70_000, 9);
    let chunk = buffer.fill(&mem, &repr(70_000), &Payload::from(data), 0).expect("fill");
    assert!(
        chunk.payload_len <= 65_536,
        "one RW packet of {} payload bytes written into the guest",
        chunk.payload_len
    );
    let used = buffer.finish_in_place(&mem, &repr(0), 70_000);
    assert!(
        used.is_none_or(|used| used.len as usize <= HEADER_LEN + 65_536),
        "finish_in_place announced an RW payload of 70000 bytes"
    );
    let mut iovecs = Vec::new();
    assert_eq!(buffer.payload_iovecs(&mem, usize::MAX, &mut iovecs), 65_536, "a readv's room");
}
