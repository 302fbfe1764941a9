//! A connection's receive queue: packets as they arrived, read in place.
//!
//! STREAM reads cross packet boundaries; SEQPACKET reads take one whole message (the packets up
//! to and including the next one with EOM). `fwd_cnt` advances only when a whole packet has been
//! consumed, by that packet's length, as in Linux. Reads are two-step: [`RxQueue::lease`]
//! describes the bytes (sharing the buffers, so a driver can copy them without holding the
//! engine), and [`RxQueue::commit`] consumes them.

use std::collections::VecDeque;

use zerovsock_wire::SeqFlags;

use crate::credit::Credit;
use crate::packet::Payload;

/// Packets at or below this size are copied into the tail packet (`GOOD_COPY_LEN`).
const GOOD_COPY_LEN: u32 = 128;
/// What Linux charges per queued packet (`SKB_TRUESIZE(0)` on x86-64); bounds the queue length.
pub(crate) const PACKET_OVERHEAD: u32 = crate::QueueStats::PACKET_OVERHEAD;
/// Packets this large are never collapsed (`MAX_COLLAPSE_LEN`).
const COLLAPSE_LIMIT: u32 = crate::QueueStats::COLLAPSE_LIMIT;
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

/// A linear packet being filled by [`RxQueue::collapse`].
struct Collapsed {
    bytes: Vec<u8>,
    size: u32,
    len: u32,
    flags: SeqFlags,
}

impl Collapsed {
    fn with_size(size: u32) -> Collapsed {
        Collapsed {
            bytes: Vec::with_capacity(size as usize),
            size,
            len: 0,
            flags: SeqFlags::empty(),
        }
    }

    fn room(&self) -> u32 {
        self.size - self.len
    }

    /// Copies an untouched packet in; its buffers are dropped with it by the caller.
    fn take(&mut self, packet: &RxPacket) {
        packet.data.extend_vec(&mut self.bytes);
        self.len += packet.len;
        self.flags |= packet.flags;
    }

    fn finish(self) -> RxPacket {
        RxPacket {
            data: Payload::from(self.bytes),
            pinned: false,
            len: self.len,
            read: 0,
            flags: self.flags,
        }
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

    /// STREAM: keeps only the first `len` bytes, so committing consumes just those (a reader
    /// that passed the bytes on and saw only part of them taken, as a short `writev`). A
    /// SEQPACKET lease is one message and is left whole.
    pub fn truncate(&mut self, len: usize) {
        if self.message || len >= self.data.len() {
            return;
        }
        self.data = self.data.slice(0, len);
        self.consume = len as u32;
        self.message_len = len;
    }
}

/// Why a packet could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overrun {
    /// The peer sent more than the credit it was given.
    Credit,
    /// The queue holds as many packets as its size allows (`buf_alloc / 576`) and collapsing
    /// made no room; the peer kept its credit.
    QueueLength,
}

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

    /// Packets queued, and whole messages among them.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.packets.len(), self.messages)
    }

    /// Queues a packet, charging it to `credit`; refuses it if the peer overran its credit or
    /// the queue its length bound (`virtio_transport_recv_enqueue`, in Linux's order: collapse
    /// when the queue is at its bound, check credit and length, then merge or append).
    pub(crate) fn enqueue(
        &mut self,
        credit: &mut Credit,
        data: Payload,
        flags: SeqFlags,
        pinned: bool,
    ) -> Result<(), Overrun> {
        let len = u32::try_from(data.len()).map_err(|_| Overrun::Credit)?;
        let queue_max = (credit.buf_alloc / PACKET_OVERHEAD) as usize;
        if self.packets.len() >= queue_max {
            // Room for this packet and the next one.
            self.collapse(self.packets.len() + 2 - queue_max);
        }
        // `virtio_transport_inc_rx_pkt`.
        let overhead = (self.packets.len() as u64 + 1) * u64::from(PACKET_OVERHEAD);
        if !credit.can_queue(len) {
            return Err(Overrun::Credit);
        }
        if overhead > u64::from(credit.buf_alloc) {
            return Err(Overrun::QueueLength);
        }
        credit.on_queued(len);
        if flags.contains(SeqFlags::EOM) {
            self.messages += 1;
        }
        let small = len <= GOOD_COPY_LEN && !pinned;
        if small && self.append_to_tail(&data, flags) {
            return Ok(());
        }
        let data = if small { linear(&data) } else { data };
        self.packets.push_back(RxPacket { data, pinned, len, read: 0, flags });
        Ok(())
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
        let mut merged = Vec::with_capacity(tail.data.len() + data.len());
        tail.data.extend_vec(&mut merged);
        data.extend_vec(&mut merged);
        tail.data = Payload::from(merged);
        tail.len += data.len() as u32;
        tail.flags |= flags;
        true
    }

    /// `virtio_transport_can_collapse`: untouched, not a message end, not already large.
    /// Pinned packets (a zerocopy sender's memory) are collapsed too: the copy is what Linux
    /// makes of a non-linear skb, and dropping the original completes the sender's pass.
    fn can_collapse(packet: &RxPacket) -> bool {
        packet.read == 0 && !packet.flags.contains(SeqFlags::EOM) && packet.len < COLLAPSE_LIMIT
    }

    /// `virtio_transport_collapse_size`: bytes of the run of collapsible packets starting with
    /// `first` (whose followers are at the front of the queue) that fit one collapsed packet.
    fn collapse_size(&self, first: &RxPacket) -> u32 {
        let mut target = first.len;
        for packet in self.packets.iter().take_while(|p| RxQueue::can_collapse(p)) {
            if packet.len > COLLAPSE_LIMIT - target {
                break;
            }
            target += packet.len;
        }
        target
    }

    /// Copies runs of collapsible packets into fewer linear ones until at least `min_to_free`
    /// entries are saved, filling each new packet to capacity
    /// (`virtio_transport_collapse_rx_queue`).
    fn collapse(&mut self, min_to_free: usize) {
        let mut out: VecDeque<RxPacket> = VecDeque::with_capacity(self.packets.len());
        let mut pending: Option<Collapsed> = None;
        // Entries removed so far, less the collapsed ones that replace them.
        let mut saved = 0usize;
        while let Some(packet) = self.packets.pop_front() {
            if !RxQueue::can_collapse(&packet) {
                if let Some(done) = pending.take() {
                    out.push_back(done.finish());
                    saved -= 1;
                }
                out.push_back(packet);
                continue;
            }
            if pending.as_ref().is_some_and(|p| packet.len > p.room()) {
                out.extend(pending.take().map(Collapsed::finish));
                saved -= 1;
            }
            let collapsed = match pending.as_mut() {
                Some(collapsed) => collapsed,
                None => {
                    if saved >= min_to_free {
                        self.packets.push_front(packet);
                        break;
                    }
                    let size = self.collapse_size(&packet);
                    if size <= packet.len {
                        out.push_back(packet);
                        continue;
                    }
                    pending.insert(Collapsed::with_size(size))
                }
            };
            collapsed.take(&packet);
            saved += 1;
        }
        out.extend(pending.map(Collapsed::finish));
        out.append(&mut self.packets);
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
            Err(Overrun::Credit)
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

    fn push(queue: &mut RxQueue, credit: &mut Credit, byte: u8, len: usize, flags: SeqFlags) {
        queue.enqueue(credit, Payload::from(vec![byte; len]), flags, false).unwrap();
    }

    #[test]
    fn collapse_keeps_partly_read_packets_and_message_ends_in_place() {
        let (mut queue, mut credit) = (RxQueue::default(), Credit::new(4 * PACKET_OVERHEAD));
        for (byte, flags) in [(1, SeqFlags::empty()), (2, SeqFlags::EOM), (3, SeqFlags::empty())] {
            push(&mut queue, &mut credit, byte, 200, flags);
        }
        let lease = queue.lease_stream(10);
        assert!(queue.commit(&mut credit, &lease));
        push(&mut queue, &mut credit, 4, 200, SeqFlags::empty());
        // Four entries is the bound: the fifth packet makes the queue collapse first, and only
        // the last two packets are a collapsible run.
        push(&mut queue, &mut credit, 5, 200, SeqFlags::empty());
        let shape: Vec<(u32, u32)> = queue.packets.iter().map(|p| (p.len, p.read)).collect();
        assert_eq!(shape, [(200, 10), (200, 0), (400, 0), (200, 0)]);
        let data = stream_read(&mut queue, &mut credit, usize::MAX);
        let expected: Vec<u8> = [(1u8, 190), (2, 200), (3, 200), (4, 200), (5, 200)]
            .iter()
            .flat_map(|&(b, n)| vec![b; n])
            .collect();
        assert_eq!(data, expected);
    }

    #[test]
    fn collapse_leaves_large_packets_alone_and_stops_once_enough_is_saved() {
        let (mut queue, mut credit) = (RxQueue::default(), credit());
        for _ in 0..5 {
            push(&mut queue, &mut credit, 1, COLLAPSE_LIMIT as usize, SeqFlags::empty());
        }
        let queue_max = (credit.buf_alloc / PACKET_OVERHEAD) as usize;
        while queue.packets.len() < queue_max {
            push(&mut queue, &mut credit, 2, 129, SeqFlags::empty());
        }
        push(&mut queue, &mut credit, 3, 129, SeqFlags::empty());
        let large = queue.packets.iter().filter(|p| p.len == COLLAPSE_LIMIT).count();
        assert_eq!(large, 5);
        // One collapsed packet holds as many 129-byte packets as fit; that saves enough.
        let per_collapsed = (COLLAPSE_LIMIT / 129) as usize;
        assert_eq!(queue.packets.len(), queue_max - per_collapsed + 1 + 1);
        assert_eq!(queue.packets[5].len, per_collapsed as u32 * 129);
    }

    #[test]
    fn a_small_message_is_not_appended_to_the_message_before_it() {
        // `virtio_transport_recv_enqueue` never copies a packet onto a tail that has EOM: the
        // two messages must still read back one by one.
        let (mut queue, mut credit) = (RxQueue::default(), credit());
        push(&mut queue, &mut credit, 1, 10, SeqFlags::EOM);
        push(&mut queue, &mut credit, 2, 10, SeqFlags::EOM | SeqFlags::EOR);
        let lease = queue.lease_message(1000).unwrap();
        assert_eq!((lease.len(), lease.message_len(), lease.eor()), (10, 10, false));
        assert!(queue.commit(&mut credit, &lease));
        let lease = queue.lease_message(1000).unwrap();
        assert_eq!((lease.payload().to_vec(), lease.eor()), (vec![2u8; 10], true));
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
