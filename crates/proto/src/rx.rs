//! A connection's receive queue: packets as they arrived, read in place.
//!
//! STREAM reads cross packet boundaries; SEQPACKET reads take one whole message (the packets up
//! to and including the next one with EOM). `fwd_cnt` advances only when a whole packet has been
//! consumed, by that packet's length, as in Linux. Reads are two-step: [`RxQueue::lease`]
//! describes the bytes (sharing the buffers, so a driver can copy them without holding the
//! engine), and [`RxQueue::commit`] consumes them.

use std::collections::VecDeque;

use bytes::BytesMut;
use zerovsock_wire::SeqFlags;

use crate::credit::Credit;
use crate::packet::Payload;

/// Packets at or below this size are copied into the tail packet (`GOOD_COPY_LEN`).
const GOOD_COPY_LEN: u32 = 128;
/// What Linux charges per queued packet (`SKB_TRUESIZE(0)` on x86-64); bounds the queue length.
pub(crate) const PACKET_OVERHEAD: u32 = 576;
/// Collapsed packets are at most this large.
const COLLAPSE_LIMIT: usize = 64 * 1024;
/// A small packet is copied onto the tail only while the tail stays this small, so that
/// appending never copies much.
const SMALL_TAIL_LIMIT: usize = 4096;

#[derive(Debug)]
struct RxPacket {
    data: Payload,
    /// The sender's own memory (a zerocopy pass): never copied into another packet.
    pinned: bool,
    /// `hdr.len` summed over the packets merged into this one: what `fwd_cnt` advances by.
    len: u32,
    /// Bytes already read from the front.
    read: u32,
    flags: SeqFlags,
}

impl RxPacket {
    fn unread(&self) -> u32 {
        self.len - self.read
    }
}

/// What a read will hand out, before it is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvLease {
    pub(crate) data: Payload,
    pub(crate) consume: u32,
    pub(crate) message_len: usize,
    pub(crate) eor: bool,
    pub(crate) position: u64,
    pub(crate) message: bool,
}

impl RecvLease {
    /// The bytes to hand to the reader, sharing the queue's buffers.
    pub fn payload(&self) -> &Payload {
        &self.data
    }

    /// Bytes this read returns.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the read returns no bytes (end of stream when it came from a receive call).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// SEQPACKET: the whole message length, larger than [`RecvLease::len`] when truncated.
    /// STREAM: equal to `len`.
    pub fn message_len(&self) -> usize {
        self.message_len
    }

    /// SEQPACKET: bytes of the message beyond the reader's buffer are discarded (MSG_TRUNC).
    pub fn truncated(&self) -> bool {
        self.message_len > self.data.len()
    }

    /// SEQPACKET: the message was sent with MSG_EOR.
    pub fn eor(&self) -> bool {
        self.eor
    }

    /// Copies the bytes into `dst`, returning how many were copied.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        self.data.copy_to(0, dst)
    }
}

/// A packet could not be queued: the peer exceeded the credit it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overrun;

#[derive(Debug, Default)]
pub(crate) struct RxQueue {
    packets: VecDeque<RxPacket>,
    messages: usize,
    /// Bytes consumed since the connection started; identifies a lease's starting point.
    position: u64,
}

impl RxQueue {
    pub(crate) fn has_data(&self) -> bool {
        self.packets.iter().any(|p| p.unread() > 0)
    }

    pub(crate) fn has_message(&self) -> bool {
        self.messages > 0
    }

    /// Queues a packet, charging it to `credit`; refuses it if the peer overran its credit.
    pub(crate) fn enqueue(
        &mut self,
        credit: &mut Credit,
        data: Payload,
        flags: SeqFlags,
        pinned: bool,
    ) -> Result<(), Overrun> {
        let len = u32::try_from(data.len()).map_err(|_| Overrun)?;
        if !credit.can_queue(len) {
            return Err(Overrun);
        }
        let small = len <= GOOD_COPY_LEN && !pinned;
        if small && self.append_to_tail(&data, flags) {
            credit.on_queued(len);
            return Ok(());
        }
        if self.too_long(credit.buf_alloc) {
            self.collapse();
            if self.too_long(credit.buf_alloc) {
                return Err(Overrun);
            }
        }
        if flags.contains(SeqFlags::EOM) {
            self.messages += 1;
        }
        let data = if small { linear(&data) } else { data };
        self.packets.push_back(RxPacket { data, pinned, len, read: 0, flags });
        credit.on_queued(len);
        Ok(())
    }

    fn too_long(&self, buf_alloc: u32) -> bool {
        (self.packets.len() as u64 + 1) * u64::from(PACKET_OVERHEAD) > u64::from(buf_alloc)
    }

    /// Small packets are copied onto the tail when it is not a message end (Linux's
    /// `virtio_transport_recv_enqueue`), so a flood of tiny packets costs bytes, not entries.
    fn append_to_tail(&mut self, data: &Payload, flags: SeqFlags) -> bool {
        let Some(tail) = self.packets.back_mut() else { return false };
        if tail.pinned
            || tail.flags.contains(SeqFlags::EOM)
            || tail.data.len() + data.len() > SMALL_TAIL_LIMIT
        {
            return false;
        }
        let mut merged = BytesMut::with_capacity(tail.data.len() + data.len());
        merged.extend_from_slice(&tail.data.to_vec());
        merged.extend_from_slice(&data.to_vec());
        tail.data = Payload::from_bytes(merged.freeze());
        tail.len += data.len() as u32;
        tail.flags |= flags;
        if flags.contains(SeqFlags::EOM) {
            self.messages += 1;
        }
        true
    }

    /// Merges runs of untouched packets (Linux's `virtio_transport_collapse_rx_queue`), so that
    /// many mid-sized packets cannot exhaust the per-packet budget while credit remains.
    fn collapse(&mut self) {
        let mut out: VecDeque<RxPacket> = VecDeque::with_capacity(self.packets.len());
        for packet in self.packets.drain(..) {
            if let Some(tail) = out.back_mut() {
                let fits = tail.data.len() + packet.data.len() <= COLLAPSE_LIMIT;
                if fits
                    && !tail.pinned
                    && !packet.pinned
                    && tail.read == 0
                    && packet.read == 0
                    && !tail.flags.contains(SeqFlags::EOM)
                {
                    let mut merged = tail.data.to_vec();
                    merged.extend_from_slice(&packet.data.to_vec());
                    tail.data = Payload::from(merged);
                    tail.len += packet.len;
                    tail.flags |= packet.flags;
                    continue;
                }
            }
            out.push_back(packet);
        }
        self.packets = out;
    }

    /// Up to `max` bytes from the front of a byte stream.
    pub(crate) fn lease_stream(&self, max: usize) -> RecvLease {
        let mut data = Payload::new();
        for packet in &self.packets {
            let want = max - data.len();
            if want == 0 {
                break;
            }
            let take = (packet.unread() as usize).min(want);
            data.append(packet.data.slice(packet.read as usize, take));
        }
        let consume = data.len() as u32;
        RecvLease {
            message_len: data.len(),
            data,
            consume,
            eor: false,
            position: self.position,
            message: false,
        }
    }

    /// The first whole message, of which at most `max` bytes are handed out.
    pub(crate) fn lease_message(&self, max: usize) -> Option<RecvLease> {
        if self.messages == 0 {
            return None;
        }
        let mut data = Payload::new();
        let mut message_len = 0usize;
        let mut eor = false;
        for packet in &self.packets {
            let unread = packet.unread() as usize;
            let take = unread.min(max - data.len());
            data.append(packet.data.slice(packet.read as usize, take));
            message_len += unread;
            if packet.flags.contains(SeqFlags::EOM) {
                eor = packet.flags.contains(SeqFlags::EOR);
                break;
            }
        }
        Some(RecvLease {
            consume: message_len as u32,
            message_len,
            data,
            eor,
            position: self.position,
            message: true,
        })
    }

    /// Consumes what `lease` described; a lease that no longer matches the queue is ignored.
    pub(crate) fn commit(&mut self, credit: &mut Credit, lease: &RecvLease) -> bool {
        if lease.position != self.position {
            return false;
        }
        let mut left = lease.consume;
        while let Some(packet) = self.packets.front_mut() {
            let take = packet.unread().min(left);
            packet.read += take;
            left -= take;
            credit.on_read(take);
            self.position += u64::from(take);
            let eom = packet.flags.contains(SeqFlags::EOM);
            if packet.unread() > 0 {
                break;
            }
            let len = packet.len;
            self.packets.pop_front();
            credit.on_packet_consumed(len);
            if eom {
                self.messages -= 1;
                if lease.message {
                    break;
                }
            }
            if left == 0 && !lease.message {
                break;
            }
        }
        true
    }
}

fn linear(data: &Payload) -> Payload {
    Payload::from(data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credit() -> Credit {
        Credit::new(256 * 1024)
    }

    fn stream_read(queue: &mut RxQueue, credit: &mut Credit, max: usize) -> Vec<u8> {
        let lease = queue.lease_stream(max);
        assert!(queue.commit(credit, &lease));
        lease.payload().to_vec()
    }

    #[test]
    fn small_packet_is_appended_to_partially_read_tail() {
        let (mut queue, mut credit) = (RxQueue::default(), credit());
        queue
            .enqueue(&mut credit, Payload::from(b"HELLO".to_vec()), SeqFlags::empty(), false)
            .unwrap();
        assert_eq!(stream_read(&mut queue, &mut credit, 2), b"HE");
        queue
            .enqueue(&mut credit, Payload::from(b"WORLD".to_vec()), SeqFlags::empty(), false)
            .unwrap();
        assert_eq!(stream_read(&mut queue, &mut credit, 64), b"LLOWORLD");
        assert!(!queue.has_data());
        assert_eq!((credit.fwd_cnt, credit.buf_used, credit.rx_bytes), (10, 0, 0));
    }

    #[test]
    fn fwd_cnt_moves_only_per_whole_packet() {
        let (mut queue, mut credit) = (RxQueue::default(), credit());
        queue
            .enqueue(&mut credit, Payload::from(vec![1u8; 1000]), SeqFlags::empty(), false)
            .unwrap();
        stream_read(&mut queue, &mut credit, 999);
        assert_eq!(credit.fwd_cnt, 0);
        stream_read(&mut queue, &mut credit, 1);
        assert_eq!(credit.fwd_cnt, 1000);
    }

    #[test]
    fn overrun_is_refused() {
        let (mut queue, mut credit) = (RxQueue::default(), Credit::new(1000));
        assert_eq!(
            queue.enqueue(&mut credit, Payload::from(vec![0u8; 1001]), SeqFlags::empty(), false),
            Err(Overrun)
        );
        assert_eq!(credit.buf_used, 0);
    }

    #[test]
    fn many_mid_sized_packets_collapse_instead_of_overrunning() {
        let (mut queue, mut credit) = (RxQueue::default(), Credit::new(256 * 1024));
        for _ in 0..1500 {
            queue
                .enqueue(&mut credit, Payload::from(vec![7u8; 129]), SeqFlags::empty(), false)
                .unwrap();
        }
        assert!(queue.packets.len() < 455);
        assert_eq!(stream_read(&mut queue, &mut credit, usize::MAX).len(), 1500 * 129);
        assert_eq!(credit.fwd_cnt, 1500 * 129);
    }

    #[test]
    fn message_read_truncates_and_discards_the_rest() {
        let (mut queue, mut credit) = (RxQueue::default(), credit());
        queue
            .enqueue(&mut credit, Payload::from(vec![1u8; 200]), SeqFlags::empty(), false)
            .unwrap();
        queue
            .enqueue(
                &mut credit,
                Payload::from(vec![2u8; 200]),
                SeqFlags::EOM | SeqFlags::EOR,
                false,
            )
            .unwrap();
        queue.enqueue(&mut credit, Payload::from(vec![3u8; 300]), SeqFlags::EOM, false).unwrap();
        let lease = queue.lease_message(16).unwrap();
        assert_eq!(
            (lease.len(), lease.message_len(), lease.truncated(), lease.eor()),
            (16, 400, true, true)
        );
        assert!(queue.commit(&mut credit, &lease));
        let lease = queue.lease_message(1000).unwrap();
        assert_eq!((lease.len(), lease.eor()), (300, false));
        assert!(queue.commit(&mut credit, &lease));
        assert!(!queue.has_message());
        assert_eq!(credit.fwd_cnt, 700);
    }

    #[test]
    fn stale_lease_is_ignored() {
        let (mut queue, mut credit) = (RxQueue::default(), credit());
        queue
            .enqueue(&mut credit, Payload::from(vec![1u8; 300]), SeqFlags::empty(), false)
            .unwrap();
        let lease = queue.lease_stream(100);
        assert!(queue.commit(&mut credit, &lease));
        assert!(!queue.commit(&mut credit, &lease));
        assert_eq!(credit.rx_bytes, 200);
    }
}
