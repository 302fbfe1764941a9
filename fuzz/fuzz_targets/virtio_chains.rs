//! Arbitrary guest memory and descriptor tables (loops, indirect tables, addresses outside or
//! across memory regions, lengths that overflow) through the TX parser and the RX filler: no
//! panic, every accepted packet within its bounds, every held chain given back exactly once.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use zerovsock_proto::Payload;
use zerovsock_virtio::{GuestMemory, Returns, RxBuffer, TxPacket, Used, MAX_TX_CHAIN_LEN};
use zerovsock_wire::{Addr, Cid, Op, Port, Repr, SocketType, HEADER_LEN};

const TABLE: u64 = 0x0;
const AVAIL: u64 = 0x1_0000;
const USED: u64 = 0x2_0000;
const DATA: u64 = 0x3_0000;

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    let size = 1u16 << (input[0] % 9); // 1..=256
    let rx = input[1] & 1 == 1;
    let head = u16::from(input[2]) % size;
    let table_len = (usize::from(size) * 16).min(input.len() - 3);
    let (table, data) = input[3..].split_at(table_len);
    // Two adjacent regions and one apart, so chains cross region ends and gaps.
    let mem = Arc::new(
        GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x8_0000),
            (GuestAddress(0x8_0000), 0x8_0000),
            (GuestAddress(0x20_0000), 0x1_0000),
        ])
        .expect("memory"),
    );
    mem.write_slice(table, GuestAddress(TABLE)).expect("table");
    mem.write_slice(data, GuestAddress(DATA)).expect("data");
    mem.write_obj(head, GuestAddress(AVAIL + 4)).expect("avail ring");
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).expect("avail idx");
    let mut queue = Queue::new(size).expect("queue");
    queue.set_size(size);
    queue.set_ready(true);
    queue.set_desc_table_address(Some(TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    let Some(chain) = queue.pop_descriptor_chain(&*mem) else { return };
    assert_eq!(chain.head_index(), head);
    if rx {
        let Ok(buffer) = RxBuffer::new(&mem, chain) else { return };
        let repr = Repr::new(
            Op::Rw,
            SocketType::Stream,
            Addr::new(Cid::HOST, Port(1)),
            Addr::new(Cid(3), Port(2)),
        );
        let payload = Payload::from(vec![0xa5u8; 70_000]);
        if let Some(chunk) = buffer.fill(&mem, &repr, &payload, 0) {
            assert!(chunk.payload_len <= buffer.payload_capacity());
            assert_eq!(chunk.used.len as usize, HEADER_LEN + chunk.payload_len);
            assert_eq!(chunk.used.head, head);
        }
        return;
    }
    let returns = Returns::new(|| {});
    match TxPacket::parse(&mem, chain, &returns) {
        Ok(packet) => {
            let claimed = u32::from_le_bytes(packet.header[24..28].try_into().expect("len field"));
            assert_eq!(packet.payload.len(), claimed as usize);
            assert!(HEADER_LEN + packet.payload.len() <= MAX_TX_CHAIN_LEN);
            assert_eq!(packet.payload.to_vec().len(), packet.payload.len());
            assert_eq!(returns.outstanding(), usize::from(packet.held()));
            let held = packet.held();
            drop(packet);
            let back = returns.take();
            assert_eq!(back, if held { vec![Used { head, len: 0 }] } else { vec![] });
            assert_eq!(returns.outstanding(), 0);
        }
        Err((error_head, _)) => {
            assert_eq!(error_head, head);
            assert_eq!(returns.outstanding(), 0, "a refused chain holds nothing");
        }
    }
});
