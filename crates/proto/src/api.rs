//! Vocabulary every socket implementation shares (the loopback stack, the kernel library, later
//! the device's native sockets): readiness as `poll` reports it, the interest to wait for, and
//! what a receive returned. Code generic over implementations speaks in these types.

/// How a socket looks to `poll`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// A read would not block (data, a message, end of stream, an error, or a pending accept).
    pub readable: bool,
    /// A send would not block (credit, or an error it would report).
    pub writable: bool,
    /// Zerocopy completions or a socket error are pending (POLLERR).
    pub error: bool,
    /// This side shut down both directions, or both sides shut down sending (POLLHUP).
    pub hangup: bool,
    /// No more data will arrive: the peer shut down sending or reset, or this side shut down
    /// receiving (POLLRDHUP).
    pub read_closed: bool,
}

/// Readiness to wait for, as `poll` events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// POLLIN.
    pub readable: bool,
    /// POLLOUT.
    pub writable: bool,
}

impl Interest {
    /// POLLIN.
    pub const READABLE: Interest = Interest { readable: true, writable: false };
    /// POLLOUT.
    pub const WRITABLE: Interest = Interest { readable: false, writable: true };
    /// No events: like `poll` with `events = 0`, only errors (pending completions) and
    /// hang-ups wake.
    pub const NONE: Interest = Interest { readable: false, writable: false };
}

/// What one receive returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvMeta {
    /// Bytes written into the caller's buffer.
    pub len: usize,
    /// The whole message length (SEQPACKET; larger than `len` when truncated). For STREAM,
    /// `len`.
    pub message_len: usize,
    /// The message was sent with MSG_EOR (SEQPACKET).
    pub eor: bool,
    /// Bytes were discarded because the buffer was smaller than the message (MSG_TRUNC in
    /// `msg_flags`). Reported by the stack that received, not derived from the lengths, so a
    /// stack that loses the flag is seen.
    pub truncated: bool,
}

/// One connection's receive queue, as Linux accounts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Packets queued (after merging and collapsing).
    pub packets: usize,
    /// Whole SEQPACKET messages among them.
    pub messages: usize,
    /// Bytes the application has not read (`rx_bytes`).
    pub unread_bytes: u32,
    /// Bytes charged against the credit this side gave (`buf_used`): unread bytes plus the read
    /// part of packets not yet wholly consumed.
    pub charged_bytes: u32,
    /// The receive buffer size advertised to the peer.
    pub buf_alloc: u32,
}

impl QueueStats {
    /// What Linux charges per queued packet (`SKB_TRUESIZE(0)` on x86-64).
    pub const PACKET_OVERHEAD: u32 = 576;

    /// Packets this large are never collapsed, and collapsed packets stay below it
    /// (`MAX_COLLAPSE_LEN` = `SKB_MAX_ORDER(44, 3)`: 32 KiB less the 44-byte header and the
    /// 320-byte `skb_shared_info` on x86-64).
    pub const COLLAPSE_LIMIT: u32 = 32 * 1024 - 44 - 320;

    /// The most packets the queue may hold (`(packets + 1) * 576 <= buf_alloc` on entry).
    pub fn packet_limit(&self) -> usize {
        (self.buf_alloc / QueueStats::PACKET_OVERHEAD) as usize
    }
}
