//! The device's queue work, with no threads and no vhost-user: TX chains into the engine, the
//! engine's packets into RX buffers. `backend.rs` calls it from the vring worker; the tests call
//! it with mock queues over real guest memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;
use zerovsock::{Packet, Transport, Vsock};
use zerovsock_virtio::{GuestMemory, Returns, RxBuffer, TxPacket, Used};
use zerovsock_wire::{Addr, Cid, Header, Op, HEADER_LEN};

/// Per wake-up bounds on TX work, as vhost's `vhost_exceeds_weight` (`VHOST_VSOCK_PKT_WEIGHT`,
/// `VHOST_VSOCK_WEIGHT`), so one busy queue cannot hold the worker.
pub(crate) const TX_PACKET_BUDGET: usize = 256;
pub(crate) const TX_BYTE_BUDGET: usize = 512 * 1024;
/// The same bounds on RX work per wake-up.
pub(crate) const RX_PACKET_BUDGET: usize = 256;

/// Packets the engine wants delivered to the guest, in order.
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

    pub(crate) fn len(&self) -> usize {
        self.lock().packets.len()
    }

    /// Replies waiting for RX buffers.
    pub(crate) fn replies(&self) -> usize {
        self.lock().replies
    }

    fn push(&self, packet: Packet) {
        let was_empty = {
            let mut queue = self.lock();
            queue.replies += usize::from(is_reply(&packet));
            queue.packets.push_back(packet);
            queue.packets.len() == 1
        };
        if was_empty {
            let _ = self.kick.write(1);
        }
    }

    fn pop(&self) -> Option<Packet> {
        let mut queue = self.lock();
        let packet = queue.packets.pop_front()?;
        queue.replies -= usize::from(is_reply(&packet));
        Some(packet)
    }

    /// Drops the packets from `local` to `remote` (`virtio_transport_purge_skbs`).
    fn cancel(&self, local: Addr, remote: Addr) {
        let dropped: VecDeque<Packet> = {
            let mut queue = self.lock();
            let (gone, kept) = std::mem::take(&mut queue.packets)
                .into_iter()
                .partition(|p| p.repr.src == local && p.repr.dst == remote);
            queue.packets = kept;
            queue.replies = queue.packets.iter().filter(|p| is_reply(p)).count();
            gone
        };
        drop(dropped);
    }

    /// Drops every queued packet (the guest went away); zerocopy senders get their completions.
    pub(crate) fn clear(&self) {
        let dropped = std::mem::take(&mut *self.lock());
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
    /// RX chains that failed the checks (returned with length 0).
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
    pub(crate) stats: DeviceStats,
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

    /// Cuts the engine's packets into the guest's RX buffers (within the budget).
    pub(crate) fn process_rx(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        used: &mut Vec<Used>,
    ) -> Progress {
        let mut progress = Progress::default();
        loop {
            if progress.chains >= RX_PACKET_BUDGET {
                progress.more = true;
                break;
            }
            let (packet, offset) = match self.current.take() {
                Some(current) => current,
                None => match self.outbound.pop() {
                    Some(packet) => (packet, 0),
                    None => break,
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.current = Some((packet, offset));
                break;
            };
            progress.chains += 1;
            let buffer = match RxBuffer::new(mem, chain) {
                Ok(buffer) => buffer,
                Err((head, _error)) => {
                    self.stats.bad_rx_chains += 1;
                    used.push(Used { head, len: 0 });
                    self.current = Some((packet, offset));
                    continue;
                }
            };
            match buffer.fill(mem, &packet.repr, &packet.payload, offset) {
                Some(chunk) => {
                    used.push(chunk.used);
                    let next = offset + chunk.payload_len;
                    if next < packet.payload.len() {
                        self.current = Some((packet, next));
                    } else {
                        self.stats.rx_packets += 1;
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
        progress
    }

    /// Whether packets wait for RX buffers.
    pub(crate) fn rx_pending(&self) -> bool {
        self.current.is_some() || self.outbound.len() > 0
    }

    /// The guest is gone: drop what waited for it.
    pub(crate) fn reset(&mut self) {
        self.current = None;
        self.outbound.clear();
    }
}
