//! Credit-based flow control, as current Linux does it (`virtio_transport_common.c`).
//!
//! Every packet carries the sender's `buf_alloc` (receive buffer size) and `fwd_cnt` (bytes its
//! application has consumed, free-running `u32`). A sender may have at most
//! `min(peer buf_alloc, own buf_alloc)` bytes in flight, counted as `tx_cnt - peer_fwd_cnt`.
//! The `min` with the sender's own buffer is the 2026 "cap TX credit" rule.

use zerovsock_wire::MAX_PACKET_PAYLOAD;

/// Both halves of one connection's credit state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Credit {
    /// Bytes this side has reserved for sending, free-running.
    pub(crate) tx_cnt: u32,
    /// The peer's last advertised `fwd_cnt`.
    pub(crate) peer_fwd_cnt: u32,
    /// The peer's last advertised `buf_alloc`.
    pub(crate) peer_buf_alloc: u32,
    /// This side's receive buffer size, advertised as `buf_alloc`.
    pub(crate) buf_alloc: u32,
    /// Bytes of whole packets this side's application has consumed, free-running.
    pub(crate) fwd_cnt: u32,
    /// `fwd_cnt` as last advertised to the peer.
    pub(crate) last_fwd_cnt: u32,
    /// Unread payload bytes in the receive queue.
    pub(crate) rx_bytes: u32,
    /// `hdr.len` of every queued packet, read or not: what the peer's credit covers.
    pub(crate) buf_used: u32,
}

impl Credit {
    pub(crate) fn new(buf_alloc: u32) -> Credit {
        Credit { buf_alloc, ..Credit::default() }
    }

    /// Takes the peer's view from any packet it sent (`virtio_transport_space_update`).
    pub(crate) fn update_from_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// The largest message size a SEQPACKET send may have (`EMSGSIZE` above it).
    pub(crate) fn message_limit(&self) -> u32 {
        self.peer_buf_alloc.min(self.buf_alloc)
    }

    /// Bytes that may be sent now.
    pub(crate) fn send_space(&self) -> u32 {
        let limit = i64::from(self.message_limit());
        let in_flight = i64::from(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt));
        u32::try_from((limit - in_flight).max(0)).unwrap_or(0)
    }

    /// Reserves up to `want` bytes of credit and returns how many were granted.
    pub(crate) fn reserve(&mut self, want: u32) -> u32 {
        let granted = want.min(self.send_space());
        self.tx_cnt = self.tx_cnt.wrapping_add(granted);
        granted
    }

    /// Returns credit that was reserved but not sent (`virtio_transport_put_credit`).
    pub(crate) fn unreserve(&mut self, bytes: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_sub(bytes);
    }

    /// Whether a packet of `len` bytes fits what this side advertised.
    pub(crate) fn can_queue(&self, len: u32) -> bool {
        u64::from(self.buf_used) + u64::from(len) <= u64::from(self.buf_alloc)
    }

    pub(crate) fn on_queued(&mut self, len: u32) {
        self.rx_bytes += len;
        self.buf_used += len;
    }

    /// The unread data was dropped (a closed socket): nothing is queued any more.
    pub(crate) fn drop_unread(&mut self) {
        self.rx_bytes = 0;
        self.buf_used = 0;
    }

    pub(crate) fn on_read(&mut self, bytes: u32) {
        self.rx_bytes -= bytes;
    }

    /// A whole packet of `len` bytes has been consumed: the peer may reuse its credit.
    pub(crate) fn on_packet_consumed(&mut self, len: u32) {
        self.buf_used -= len;
        self.fwd_cnt = self.fwd_cnt.wrapping_add(len);
    }

    /// Values to stamp on an outgoing packet; records that the peer now knows `fwd_cnt`.
    pub(crate) fn stamp(&mut self) -> (u32, u32) {
        self.last_fwd_cnt = self.fwd_cnt;
        (self.buf_alloc, self.fwd_cnt)
    }

    /// Linux's rule after a STREAM read: update when something was freed and either the
    /// peer's view of free space has fallen under one maximum packet, or the unread bytes
    /// have fallen under `SO_RCVLOWAT`.
    pub(crate) fn update_due_after_stream_read(&self, rcvlowat: u32) -> bool {
        let delta = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt);
        // `free_space` is u32 arithmetic in Linux: after the buffer shrank below `delta` it
        // wraps and no update is due on that account.
        delta != 0
            && (self.buf_alloc.wrapping_sub(delta) < MAX_PACKET_PAYLOAD || self.rx_bytes < rcvlowat)
    }

    /// Whether an update is owed because `SO_RCVLOWAT` rose above the unread bytes.
    pub(crate) fn update_due_for_rcvlowat(&self, rcvlowat: u32) -> bool {
        self.rx_bytes < rcvlowat && self.fwd_cnt != self.last_fwd_cnt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn space_is_capped_by_own_buffer() {
        let mut credit = Credit::new(4096);
        credit.update_from_peer(2 << 20, 0);
        assert_eq!(credit.send_space(), 4096);
    }

    #[test]
    fn space_never_goes_negative_when_peer_shrinks() {
        let mut credit = Credit::new(1 << 20);
        credit.update_from_peer(1 << 20, 0);
        assert_eq!(credit.reserve(1 << 20), 1 << 20);
        credit.update_from_peer(4096, 0);
        assert_eq!(credit.send_space(), 0);
    }

    #[test]
    fn counters_wrap() {
        let mut credit = Credit::new(1000);
        credit.tx_cnt = u32::MAX - 10;
        credit.update_from_peer(1000, u32::MAX - 10);
        assert_eq!(credit.reserve(100), 100);
        assert_eq!(credit.tx_cnt, 89);
        assert_eq!(credit.send_space(), 900);
    }

    #[test]
    fn no_update_while_plenty_of_space_is_advertised() {
        let mut credit = Credit::new(256 * 1024);
        credit.on_queued(128 * 1024);
        credit.on_read(64 * 1024);
        credit.on_packet_consumed(64 * 1024);
        assert!(!credit.update_due_after_stream_read(1));
        credit.on_read(64 * 1024);
        credit.on_packet_consumed(64 * 1024);
        assert!(credit.update_due_after_stream_read(1));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Send(u32),
        Read,
        Update,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![(1u32..100_000).prop_map(Step::Send), Just(Step::Read), Just(Step::Update),]
    }

    proptest! {
        /// A sender that obeys `send_space` never makes the receiver refuse a packet, and
        /// every byte sent is eventually counted by `fwd_cnt`, whatever the interleaving.
        #[test]
        fn obedient_sender_never_overruns_receiver(
            sender_buf in 1u32..1_000_000,
            receiver_buf in 1u32..1_000_000,
            start in any::<u32>(),
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let mut tx = Credit::new(sender_buf);
            let mut rx = Credit::new(receiver_buf);
            tx.tx_cnt = start;
            rx.fwd_cnt = start;
            rx.last_fwd_cnt = start;
            let (b, f) = rx.stamp();
            tx.update_from_peer(b, f);
            let mut queue = std::collections::VecDeque::new();
            let mut sent: u64 = 0;
            for step in steps {
                match step {
                    Step::Send(want) => {
                        let granted = tx.reserve(want.min(MAX_PACKET_PAYLOAD));
                        if granted > 0 {
                            prop_assert!(rx.can_queue(granted));
                            rx.on_queued(granted);
                            queue.push_back(granted);
                            sent += u64::from(granted);
                        }
                    }
                    Step::Read => {
                        if let Some(len) = queue.pop_front() {
                            rx.on_read(len);
                            rx.on_packet_consumed(len);
                        }
                    }
                    Step::Update => {
                        let (b, f) = rx.stamp();
                        tx.update_from_peer(b, f);
                    }
                }
            }
            while let Some(len) = queue.pop_front() {
                rx.on_read(len);
                rx.on_packet_consumed(len);
            }
            prop_assert_eq!(rx.fwd_cnt.wrapping_sub(start), (sent % (1u64 << 32)) as u32);
            prop_assert_eq!(rx.buf_used, 0);
            prop_assert_eq!(rx.rx_bytes, 0);
        }
    }
}
