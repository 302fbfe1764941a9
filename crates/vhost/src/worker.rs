//! The device's queue work, with no threads and no vhost-user: TX chains into the engine, the
//! engine's packets into RX buffers. `backend.rs` calls it from the vring worker; the tests call
//! it with mock queues over real guest memory.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;
use zerovsock::{Packet, Transport, Vsock};
use zerovsock_virtio::{GuestMemory, Returns, RxBuffer, TxPacket, Used};
use zerovsock_wire::{Addr, Cid, Header, Op, Repr, HEADER_LEN, MAX_PACKET_PAYLOAD};

use crate::direct::HostReader;

/// Per wake-up bounds on TX work, as vhost's `vhost_exceeds_weight` (`VHOST_VSOCK_PKT_WEIGHT`,
/// `VHOST_VSOCK_WEIGHT`), so one busy queue cannot hold the worker.
pub(crate) const TX_PACKET_BUDGET: usize = 256;
pub(crate) const TX_BYTE_BUDGET: usize = 512 * 1024;
/// The same bounds on RX work per wake-up.
pub(crate) const RX_PACKET_BUDGET: usize = 256;

/// Packets the engine wants delivered to the guest, in order, and the host sockets whose data
/// the worker reads straight into RX buffers ([`HostReader`]).
pub(crate) struct Outbound {
    queue: Mutex<Queued>,
    /// Wakes the vring worker when the queue stops being empty.
    pub(crate) kick: EventFd,
}

#[derive(Default)]
struct Queued {
    packets: VecDeque<Packet>,
    /// Among them, answers to the guest's packets (RESPONSE, RST): what
    /// `vhost_vsock_more_replies` counts (`virtio_vsock_skb_reply`).
    replies: usize,
    /// Queued packets per connection (source, destination): a connection's host data may be
    /// placed only when none of its packets wait, so the guest sees its headers in order.
    per_conn: HashMap<(Addr, Addr), usize>,
    /// Payload bytes per connection not yet written whole into RX buffers (the queued packets
    /// and the one the worker is cutting): SIOCOUTQ, counted until the whole packet is in
    /// guest memory, as `vhost_transport_do_send_pkt` calls `virtio_transport_consume_skb_sent`.
    unsent: HashMap<(Addr, Addr), usize>,
    /// Host sockets that may have data for the guest.
    readers: VecDeque<Arc<HostReader>>,
}

impl Queued {
    fn count(&mut self, packet: &Packet, added: bool) {
        let key = (packet.repr.src, packet.repr.dst);
        if added {
            *self.per_conn.entry(key).or_default() += 1;
            self.replies += usize::from(is_reply(packet));
        } else {
            if let Some(count) = self.per_conn.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    self.per_conn.remove(&key);
                }
            }
            self.replies -= usize::from(is_reply(packet));
        }
    }

    /// Counts `packet`'s payload as unsent (`added`) or no longer.
    fn count_unsent(&mut self, packet: &Packet, added: bool) {
        let len = packet.payload.len();
        if len == 0 {
            return;
        }
        let key = (packet.repr.src, packet.repr.dst);
        if added {
            *self.unsent.entry(key).or_default() += len;
        } else if let Some(bytes) = self.unsent.get_mut(&key) {
            *bytes = bytes.saturating_sub(len);
            if *bytes == 0 {
                self.unsent.remove(&key);
            }
        }
    }

    fn idle(&self) -> bool {
        self.packets.is_empty() && self.readers.is_empty()
    }
}

/// Whether a packet counts as a reply to the guest.
fn is_reply(packet: &Packet) -> bool {
    matches!(packet.repr.op, Op::Response | Op::Rst)
}

impl Outbound {
    pub(crate) fn new() -> std::io::Result<Arc<Outbound>> {
        Ok(Arc::new(Outbound {
            queue: Mutex::new(Queued::default()),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Packets waiting for RX buffers.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().packets.len()
    }

    /// Nothing waits for RX buffers.
    pub(crate) fn is_idle(&self) -> bool {
        self.lock().idle()
    }

    /// Replies waiting for RX buffers.
    pub(crate) fn replies(&self) -> usize {
        self.lock().replies
    }

    fn push(&self, packet: Packet) {
        let was_idle = {
            let mut queue = self.lock();
            let was_idle = queue.idle();
            queue.count(&packet, true);
            queue.count_unsent(&packet, true);
            queue.packets.push_back(packet);
            was_idle
        };
        // On the vring worker itself (answers to the guest's packets, credit updates after
        // the bridge's writes), RX work follows anyway.
        if was_idle && !crate::bridge::is_helping() {
            let _ = self.kick.write(1);
        }
    }

    fn pop(&self) -> Option<Packet> {
        let mut queue = self.lock();
        let packet = queue.packets.pop_front()?;
        queue.count(&packet, false);
        Some(packet)
    }

    /// `packet`, taken with [`Self::pop`], is in guest memory now, all of it.
    fn sent(&self, packet: &Packet) {
        self.lock().count_unsent(packet, false);
    }

    /// Payload bytes from `local` to `remote` not yet written whole into RX buffers.
    pub(crate) fn unsent(&self, local: Addr, remote: Addr) -> usize {
        self.lock().unsent.get(&(local, remote)).copied().unwrap_or(0)
    }

    /// Packets of connection `conn` (source, destination) waiting.
    pub(crate) fn pending_for(&self, conn: (Addr, Addr)) -> usize {
        self.lock().per_conn.get(&conn).copied().unwrap_or(0)
    }

    /// Queues a host socket to be read into RX buffers ([`HostReader::request`] does, once).
    pub(crate) fn push_reader(&self, reader: Arc<HostReader>) {
        let was_idle = {
            let mut queue = self.lock();
            let was_idle = queue.idle();
            queue.readers.push_back(reader);
            was_idle
        };
        // On the vring worker itself (credit that came with the guest's packets), RX work
        // follows anyway.
        if was_idle && !crate::bridge::is_helping() {
            let _ = self.kick.write(1);
        }
    }

    fn pop_reader(&self) -> Option<Arc<HostReader>> {
        self.lock().readers.pop_front()
    }

    /// Puts a reader back first in line (it waits for RX buffers).
    fn unpop_reader(&self, reader: Arc<HostReader>) {
        self.lock().readers.push_front(reader);
    }

    /// Puts a reader back last in line (it had its turn).
    fn requeue_reader(&self, reader: Arc<HostReader>) {
        self.lock().readers.push_back(reader);
    }

    fn readers(&self) -> usize {
        self.lock().readers.len()
    }

    /// Drops the packets from `local` to `remote` (`virtio_transport_purge_skbs`).
    fn cancel(&self, local: Addr, remote: Addr) {
        let dropped: VecDeque<Packet> = {
            let mut queue = self.lock();
            let (gone, kept) = std::mem::take(&mut queue.packets)
                .into_iter()
                .partition(|p| p.repr.src == local && p.repr.dst == remote);
            queue.packets = kept;
            for packet in &gone {
                queue.count(packet, false);
                queue.count_unsent(packet, false);
            }
            gone
        };
        drop(dropped);
    }

    /// Drops every queued packet and reader (the guest went away); zerocopy senders get their
    /// completions.
    pub(crate) fn clear(&self) {
        let dropped = std::mem::take(&mut *self.lock());
        for reader in &dropped.readers {
            reader.unqueued();
        }
        drop(dropped);
    }
}

/// The engine's transport on a device: packets for the guest go to the RX queue, packets for
/// any other CID are answered with RST (nothing else is reachable yet), like loopback does.
pub(crate) struct DeviceTransport {
    pub(crate) guest_cid: Cid,
    pub(crate) outbound: Arc<Outbound>,
}

impl Transport for DeviceTransport {
    fn local_cid(&self) -> Cid {
        Cid::HOST
    }

    fn supports_zerocopy(&self) -> bool {
        true
    }

    fn supports_seqpacket(&self) -> bool {
        true
    }

    fn transmit(&mut self, packet: Packet, inbound: &mut VecDeque<Packet>) {
        if packet.repr.dst.cid == self.guest_cid {
            self.outbound.push(packet);
        } else if packet.repr.op != Op::Rst {
            inbound.push_back(Packet::control(packet.repr.reply(Op::Rst)));
        }
    }

    fn cancel(&mut self, local: Addr, remote: Addr) {
        self.outbound.cancel(local, remote);
    }

    fn unsent_bytes(&self, local: Addr, remote: Addr) -> usize {
        self.outbound.unsent(local, remote)
    }
}

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Chains taken from the available ring.
    pub(crate) chains: usize,
    /// The budget ran out with work left: come back after other events.
    pub(crate) more: bool,
    /// TX: stopped because too many replies wait for RX buffers.
    pub(crate) blocked: bool,
}

/// Counters a device keeps for what it refused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStats {
    /// TX chains that failed the checks (returned with length 0).
    pub bad_tx_chains: u64,
    /// RX chains that failed the checks, or had room for a header only when host data was
    /// due (returned with length 0).
    pub bad_rx_chains: u64,
    /// TX packets dropped for a `src_cid` other than the guest's or a `dst_cid` other than
    /// the host's (spoofing; vhost drops them the same way).
    pub misaddressed: u64,
    /// TX payloads copied out because too many chains were held already.
    pub copied_tx: u64,
    /// Packets delivered into guest RX buffers (chunks counted once per packet).
    pub rx_packets: u64,
    /// Packets taken from the guest's TX queue and handed to the engine.
    pub tx_packets: u64,
}

impl DeviceStats {
    /// Adds another session's counts.
    pub(crate) fn add(&mut self, other: &DeviceStats) {
        self.bad_tx_chains += other.bad_tx_chains;
        self.bad_rx_chains += other.bad_rx_chains;
        self.misaddressed += other.misaddressed;
        self.copied_tx += other.copied_tx;
        self.rx_packets += other.rx_packets;
        self.tx_packets += other.tx_packets;
    }
}

/// The state of one device session's queue work.
pub(crate) struct Worker {
    pub(crate) guest_cid: Cid,
    pub(crate) vsock: Vsock,
    pub(crate) outbound: Arc<Outbound>,
    pub(crate) returns: Arc<Returns>,
    /// The Unix endpoints, whose woken connections this thread runs right after a delivery.
    pub(crate) bridge: Option<Arc<crate::bridge::Bridge>>,
    /// The packet being cut into RX buffers, and how far.
    current: Option<(Packet, usize)>,
    /// RX buffers taken from the ring and not filled yet (a `readv` that read less than it
    /// had room for); they are filled before any other.
    spare: VecDeque<RxBuffer>,
    /// Whether host data went first in the last RX pass.
    place_first: bool,
    /// Addresses for `readv`, kept between calls.
    scratch: Vec<(usize, usize)>,
    pub(crate) stats: DeviceStats,
}

/// At most this many RX buffers take one placed packet (Linux posts ~4 KiB buffers: 18 make
/// 64 KiB).
const MAX_PLACE_BUFFERS: usize = 32;

/// How one reader's turn ended.
enum Placed {
    /// A packet went in; the socket may have more.
    Some,
    /// Nothing more for now (drained, no credit, end of file, failed, closed).
    Done,
    /// The connection's queued packets go first; next round.
    Later,
    /// No RX buffers: wait for the guest.
    NoBuffers,
}

/// What the `readv` found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Not read: the connection's queued packets go first, or the read was interrupted.
    Again,
    Eof,
    /// EAGAIN: the socket is empty now.
    Drained,
    Data,
}

impl Worker {
    pub(crate) fn new(
        guest_cid: Cid,
        vsock: Vsock,
        outbound: Arc<Outbound>,
        returns: Arc<Returns>,
    ) -> Worker {
        Worker {
            guest_cid,
            vsock,
            outbound,
            returns,
            bridge: None,
            current: None,
            spare: VecDeque::new(),
            place_first: false,
            scratch: Vec::new(),
            stats: DeviceStats::default(),
        }
    }

    /// Takes TX chains (within the budget), hands their packets to the engine in one batch, and
    /// collects the chains to return now into `used` (those whose payload is not held, and
    /// those given back meanwhile).
    pub(crate) fn process_tx(
        &mut self,
        mem: &Arc<GuestMemory>,
        queue: &mut Queue,
        used: &mut Vec<Used>,
    ) -> Progress {
        let mut progress = Progress::default();
        let mut batch = Vec::new();
        let mut bytes = 0;
        // Bounds from the ring the driver set up (`vq->num`), not the device's maximum: TX
        // stops while that many replies wait for RX buffers (`vhost_vsock_more_replies`), and
        // payloads hold at most half of it, so one connection's unread data cannot take every
        // descriptor the guest has.
        let ring = usize::from(queue.size());
        let held_limit = ring / 2;
        loop {
            if progress.chains >= TX_PACKET_BUDGET || bytes >= TX_BYTE_BUDGET {
                progress.more = true;
                break;
            }
            // Packets of this batch are not delivered yet; each may be answered, so each
            // counts as a reply to come.
            if self.outbound.replies() + batch.len() >= ring {
                progress.blocked = true;
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(&**mem) else { break };
            progress.chains += 1;
            let parsed = if self.returns.outstanding() < held_limit {
                TxPacket::parse(mem, chain, &self.returns)
            } else {
                self.stats.copied_tx += 1;
                TxPacket::parse_copied(mem, chain)
            };
            let packet = match parsed {
                Ok(packet) => packet,
                Err((head, _error)) => {
                    self.stats.bad_tx_chains += 1;
                    used.push(Used { head, len: 0 });
                    continue;
                }
            };
            if !packet.held() {
                used.push(Used { head: packet.head, len: 0 });
            }
            // `vhost_vsock_handle_tx_kick`: only packets from the guest's own CID to the host.
            let addressed = Header::new_checked(&packet.header[..]).is_ok_and(|h| {
                h.src_cid() == u64::from(self.guest_cid.0) && h.dst_cid() == u64::from(Cid::HOST.0)
            });
            if !addressed {
                self.stats.misaddressed += 1;
                continue; // a held payload gives its chain back as it drops
            }
            bytes += HEADER_LEN + packet.payload.len();
            self.stats.tx_packets += 1;
            batch.push((packet.header, packet.payload));
        }
        if !batch.is_empty() {
            let vsock = &self.vsock;
            crate::bridge::helping(self.bridge.as_deref(), || vsock.deliver(batch));
        }
        self.returns.take_into(used);
        progress
    }

    /// Fills the guest's RX buffers (within the budget) with the engine's packets and with
    /// data read straight from host sockets; the two take turns at going first, so neither
    /// starves the other.
    pub(crate) fn process_rx(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        used: &mut Vec<Used>,
    ) -> Progress {
        let mut progress = Progress::default();
        self.place_first = !self.place_first;
        if self.place_first {
            self.place_host_data(mem, queue, used, &mut progress);
        }
        self.deliver_packets(mem, queue, used, &mut progress);
        // Always a placing round after the packets: a reader that had to wait behind its
        // connection's queued packets goes now, as `vhost_transport_do_send_pkt` loops until
        // the queue is empty or the buffers run out.
        self.place_host_data(mem, queue, used, &mut progress);
        progress
    }

    /// The next RX buffer: one taken before and not filled, or the next good chain. `None`
    /// when the ring is empty or this wake-up's budget is spent (then `progress.more`).
    fn next_buffer(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        used: &mut Vec<Used>,
        progress: &mut Progress,
    ) -> Option<RxBuffer> {
        if let Some(buffer) = self.spare.pop_front() {
            return Some(buffer);
        }
        loop {
            if progress.chains >= RX_PACKET_BUDGET {
                progress.more = true;
                return None;
            }
            let chain = queue.pop_descriptor_chain(mem)?;
            progress.chains += 1;
            match RxBuffer::new(mem, chain) {
                Ok(buffer) => return Some(buffer),
                Err((head, _error)) => {
                    self.stats.bad_rx_chains += 1;
                    used.push(Used { head, len: 0 });
                }
            }
        }
    }

    /// Cuts the engine's packets into RX buffers.
    fn deliver_packets(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        used: &mut Vec<Used>,
        progress: &mut Progress,
    ) {
        loop {
            let (packet, offset) = match self.current.take() {
                Some(current) => current,
                None => match self.outbound.pop() {
                    Some(packet) => (packet, 0),
                    None => return,
                },
            };
            let Some(buffer) = self.next_buffer(mem, queue, used, progress) else {
                self.current = Some((packet, offset));
                return;
            };
            match buffer.fill(mem, &packet.repr, &packet.payload, offset) {
                Some(chunk) => {
                    used.push(chunk.used);
                    let next = offset + chunk.payload_len;
                    if next < packet.payload.len() {
                        self.current = Some((packet, next));
                    } else {
                        self.stats.rx_packets += 1;
                        self.outbound.sent(&packet);
                        // Dropping the packet here ends a zerocopy sender's pass: its bytes
                        // are in guest memory now.
                    }
                }
                None => {
                    self.stats.bad_rx_chains += 1;
                    used.push(Used { head: buffer.head(), len: 0 });
                    self.current = Some((packet, offset));
                }
            }
        }
    }

    /// Reads host sockets straight into RX buffers: each queued reader gets one packet's worth
    /// (at most 64 KiB) per round, round after round while buffers and budget last.
    fn place_host_data(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        used: &mut Vec<Used>,
        progress: &mut Progress,
    ) {
        loop {
            let mut placed_any = false;
            for _ in 0..self.outbound.readers() {
                let Some(reader) = self.outbound.pop_reader() else { return };
                match self.place_one(&reader, mem, queue, used, progress) {
                    Placed::Some => {
                        placed_any = true;
                        self.outbound.requeue_reader(reader);
                    }
                    Placed::Done => {}
                    Placed::Later => self.outbound.requeue_reader(reader),
                    Placed::NoBuffers => {
                        self.outbound.unpop_reader(reader);
                        return;
                    }
                }
            }
            if !placed_any {
                return;
            }
        }
    }

    /// One `readv` of one reader's socket into as many RX buffers as one packet fills.
    fn place_one(
        &mut self,
        reader: &Arc<HostReader>,
        mem: &GuestMemory,
        queue: &mut Queue,
        used: &mut Vec<Used>,
        progress: &mut Progress,
    ) -> Placed {
        if reader.is_closed() {
            return Placed::Done;
        }
        // The connection's queued packets (a partly delivered one included) go first.
        let conn = reader.conn;
        let waiting = self.current.as_ref().is_some_and(|(p, _)| (p.repr.src, p.repr.dst) == conn);
        if waiting || self.outbound.pending_for(conn) > 0 {
            return Placed::Later;
        }
        let mut buffers: Vec<RxBuffer> = Vec::new();
        let mut room = 0;
        while room < MAX_PACKET_PAYLOAD as usize && buffers.len() < MAX_PLACE_BUFFERS {
            let Some(buffer) = self.next_buffer(mem, queue, used, progress) else { break };
            if buffer.packet_room() == 0 {
                // Room for a header only: no data fits, and kept aside it would be taken
                // again every round. It goes back empty.
                self.stats.bad_rx_chains += 1;
                used.push(Used { head: buffer.head(), len: 0 });
                continue;
            }
            room += buffer.packet_room();
            buffers.push(buffer);
        }
        if buffers.is_empty() {
            return Placed::NoBuffers;
        }
        let room = room.min(MAX_PACKET_PAYLOAD as usize);
        let (outbound, scratch) = (&self.outbound, &mut self.scratch);
        let mut read = Read::Again;
        reader.start_read();
        let mut cx = Context::from_waker(&reader.requeue);
        let sent = reader.stream.poll_send_in_place(&mut cx, room, |room| {
            // Under the engine lock: nothing of this connection may have been queued since.
            if outbound.pending_for(conn) > 0 {
                return Ok(0);
            }
            match crate::sys::readv_into(reader.unix.as_fd(), mem, &buffers, room, scratch) {
                Ok(0) => {
                    read = Read::Eof;
                    Ok(0)
                }
                // Even a short read may leave an end of file behind whose epoll event came
                // before this read: read again until EAGAIN.
                Ok(n) => {
                    read = Read::Data;
                    Ok(n)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    read = Read::Drained;
                    Ok(0)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(0),
                Err(e) => Err(e),
            }
        });
        let outcome = match sent {
            // No credit: the engine wakes `requeue` when the guest gives some. An end of file
            // with nothing before it needs none (SHUTDOWN is a control packet): look for it.
            Poll::Pending => {
                match crate::sys::peek_eof(reader.unix.as_fd()) {
                    Ok(true) => reader.set_eof(),
                    Ok(false) => reader.idle(),
                    Err(_) => reader.set_failed(),
                }
                Placed::Done
            }
            Poll::Ready(Ok(Some(header))) => {
                if self.finish_placed(mem, &header, &mut buffers, used) {
                    reader.set_failed();
                    Placed::Done
                } else if read == Read::Data {
                    Placed::Some
                } else {
                    reader.idle();
                    Placed::Done
                }
            }
            Poll::Ready(Ok(None)) => match read {
                Read::Eof => {
                    reader.set_eof();
                    Placed::Done
                }
                Read::Drained => {
                    reader.idle();
                    Placed::Done
                }
                // Queued packets first, or an interrupted read: next round.
                Read::Again | Read::Data => Placed::Later,
            },
            // The guest shut down its receive side (EPIPE, as a Linux host's send gets): this
            // direction ends, the other goes on.
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                reader.set_refused();
                Placed::Done
            }
            // The host socket failed, or the connection is gone.
            Poll::Ready(Err(_)) => {
                reader.set_failed();
                Placed::Done
            }
        };
        // Buffers the read did not reach wait for the next packet.
        self.spare.extend(buffers);
        outcome
    }

    /// Writes the headers of bytes a `readv` put into `buffers` (one packet's worth, cut at
    /// the buffers as [`RxBuffer::fill`] cuts a packet) and files them as used; the buffers
    /// it did not reach stay in `buffers`. Returns whether a header could not be written,
    /// which only a guest memory map that changed under the worker causes.
    fn finish_placed(
        &mut self,
        mem: &GuestMemory,
        header: &Repr,
        buffers: &mut Vec<RxBuffer>,
        used: &mut Vec<Used>,
    ) -> bool {
        let mut left = header.len as usize;
        let mut filled = 0;
        let mut failed = false;
        for buffer in buffers.iter() {
            if left == 0 {
                break;
            }
            let len = left.min(buffer.packet_room());
            match buffer.finish_in_place(mem, header, len) {
                Some(entry) => used.push(entry),
                None => {
                    failed = true;
                    self.stats.bad_rx_chains += 1;
                    used.push(Used { head: buffer.head(), len: 0 });
                }
            }
            left -= len;
            filled += 1;
        }
        buffers.drain(..filled);
        self.stats.rx_packets += 1;
        failed
    }

    /// Whether packets or host data wait for RX buffers.
    pub(crate) fn rx_pending(&self) -> bool {
        self.current.is_some() || !self.outbound.is_idle()
    }

    /// The guest is gone: drop what waited for it, and the RX buffers of its old ring.
    pub(crate) fn reset(&mut self) {
        self.current = None;
        self.drop_rx_buffers();
        self.outbound.clear();
    }

    /// The RX ring was taken back (GET_VRING_BASE): buffers taken from it are not ours to
    /// fill or return any more; their heads may mean other buffers in the next ring.
    pub(crate) fn drop_rx_buffers(&mut self) {
        self.spare.clear();
    }
}
