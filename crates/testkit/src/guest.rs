//! A userspace guest: a vhost-user frontend plus a virtio-vsock driver in the guest role, over
//! memfd memory, driving any vhost-user-vsock backend through its real socket (ours or
//! vhost-device-vsock). The guest side is the zerovsock stack ([`GuestDriver::vsock`]), so
//! tests and benchmarks use the socket API as a guest application would.
//!
//! The rings are split virtqueues written by hand (descriptor table, avail and used rings at
//! fixed guest addresses), with EVENT_IDX when the backend offers it. RX buffers are single
//! descriptors of 3776 bytes, as Linux posts them. TX packets go out in the layout chosen by
//! [`TxLayout`]: Linux's (the header alone, then one descriptor for a payload up to 32 KiB and
//! page-sized descriptors beyond), one descriptor per page, or header and payload in one.
//!
//! This never opens an AF_VSOCK socket.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use zerovsock::wire::{Addr, Cid, Features, HEADER_LEN};
use zerovsock::{Packet, Payload, Transport, Vsock};

/// Queue size of both rings.
const QUEUE: u16 = 256;
/// Linux's RX buffer (header included).
pub const RX_BUFFER: u32 = 3776;
const MEM_SIZE: usize = 64 << 20;
/// Ring areas (descriptor table, avail, used) per queue.
const RINGS: [u64; 3] = [0x0, 0x4000, 0x8000];
const RX_BUFFERS: u64 = 0x10_0000;
const TX_SLOTS: u64 = 0x100_0000;
const TX_SLOT: u64 = 0x1_1000; // a header and 64 KiB, page aligned

/// How TX packets are laid out in descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxLayout {
    /// Linux 6.12: the header alone, then the payload in one descriptor up to 32 KiB and in
    /// 32 KiB descriptors beyond (non-linear skbs).
    Linux,
    /// The header alone, then one descriptor per 4 KiB (a MSG_ZEROCOPY send).
    Pages,
    /// Header and payload in one descriptor.
    Single,
    /// The header alone, then the whole payload in one descriptor (the classic layout, the
    /// only multi-descriptor one vhost-device-vsock 0.3.0 accepts).
    HeaderAndData,
}

/// The guest and its driver thread.
pub struct GuestDriver {
    vsock: Vsock,
    stop: Arc<AtomicBool>,
    kick: Arc<EventFd>,
    thread: Option<JoinHandle<io::Result<()>>>,
    guest_cid: Cid,
}

impl GuestDriver {
    /// Connects to the backend at `socket` (retrying for a while, as a backend that has just
    /// started or is rebinding may not be there yet), negotiates, and starts the guest.
    pub fn connect(socket: &Path, layout: TxLayout) -> io::Result<GuestDriver> {
        let frontend = connect_retrying(socket, Duration::from_secs(10))?;
        let setup = Setup::negotiate(frontend)?;
        let guest_cid = Cid(setup.guest_cid);
        let outgoing = Arc::new(Mutex::new(VecDeque::new()));
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let transport =
            GuestTransport { cid: guest_cid, outgoing: outgoing.clone(), kick: kick.clone() };
        let vsock = Vsock::with_transport(transport);
        // A guest's blocked writer sleeps at once, as in a kernel (`sk_wait_event`): spinning
        // here would take a core from the device under test, which shares the machine.
        vsock.set_spin(false);
        let stop = Arc::new(AtomicBool::new(false));
        let mut rings = Rings::new(setup, layout, outgoing, vsock.clone())?;
        let flag = stop.clone();
        let local = kick.clone();
        let thread = std::thread::Builder::new()
            .name("zerovsock-guest".into())
            .spawn(move || rings.run(&flag, &local))?;
        Ok(GuestDriver { vsock, stop, kick, thread: Some(thread), guest_cid })
    }

    /// The guest's endpoint: sockets on it are the guest's.
    pub fn vsock(&self) -> &Vsock {
        &self.vsock
    }

    /// The CID the device gave the guest.
    pub fn guest_cid(&self) -> Cid {
        self.guest_cid
    }

    /// Stops the driver and disconnects from the backend; returns the driver thread's error.
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        let _ = self.kick.write(1);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the guest driver thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for GuestDriver {
    fn drop(&mut self) {
        let _ = self.stop_thread();
    }
}

fn connect_retrying(socket: &Path, patience: Duration) -> io::Result<Frontend> {
    let deadline = Instant::now() + patience;
    loop {
        match Frontend::connect(socket, 3) {
            Ok(frontend) => return Ok(frontend),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return Err(io::Error::other(format!("connecting to {}: {e}", socket.display())))
            }
        }
    }
}

struct GuestTransport {
    cid: Cid,
    outgoing: Arc<Mutex<VecDeque<Packet>>>,
    kick: Arc<EventFd>,
}

impl Transport for GuestTransport {
    fn local_cid(&self) -> Cid {
        self.cid
    }

    fn supports_zerocopy(&self) -> bool {
        true
    }

    fn supports_seqpacket(&self) -> bool {
        true
    }

    fn transmit(&mut self, packet: Packet, _inbound: &mut VecDeque<Packet>) {
        self.outgoing.lock().unwrap_or_else(PoisonError::into_inner).push_back(packet);
        let _ = self.kick.write(1);
    }

    /// What waits for the TX ring (a packet is handed on once it is in the ring's memory).
    fn unsent_bytes(&self, local: Addr, remote: Addr) -> usize {
        let outgoing = self.outgoing.lock().unwrap_or_else(PoisonError::into_inner);
        outgoing
            .iter()
            .filter(|p| p.repr.src == local && p.repr.dst == remote)
            .map(|p| p.payload.len())
            .sum()
    }
}

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// A negotiated frontend with memory and rings set up.
struct Setup {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    guest_cid: u32,
    event_idx: bool,
    calls: [EventFd; 2],
    kicks: [EventFd; 2],
}

impl Setup {
    fn negotiate(mut frontend: Frontend) -> io::Result<Setup> {
        frontend.set_owner().map_err(err)?;
        let offered = frontend.get_features().map_err(err)?;
        let protocol = frontend.get_protocol_features().map_err(err)?;
        let want = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
        frontend.set_protocol_features(protocol & want).map_err(err)?;
        let (_, config) =
            frontend.get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8]).map_err(err)?;
        let guest_cid =
            u32::try_from(u64::from_le_bytes(config[..8].try_into().map_err(err)?)).map_err(err)?;
        let event_idx = offered & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut acked =
            (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        acked |= offered & ((1 << VIRTIO_RING_F_EVENT_IDX) | Features::SEQPACKET.bits());
        frontend.set_features(acked).map_err(err)?;

        let file = memfd()?;
        file.set_len(MEM_SIZE as u64)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(err)?;
        let region = mem.iter().next().ok_or_else(|| err("no memory region"))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).map_err(err)?;
        frontend.set_mem_table(&[info]).map_err(err)?;
        let host = info.userspace_addr;
        let calls = [EventFd::new(libc::EFD_NONBLOCK)?, EventFd::new(libc::EFD_NONBLOCK)?];
        let kicks = [EventFd::new(libc::EFD_NONBLOCK)?, EventFd::new(libc::EFD_NONBLOCK)?];
        for queue in 0..3usize {
            let base = RINGS[queue];
            frontend.set_vring_num(queue, QUEUE).map_err(err)?;
            // The backend takes frontend virtual addresses and maps them back itself.
            let config = VringConfigData {
                queue_max_size: QUEUE,
                queue_size: QUEUE,
                flags: 0,
                desc_table_addr: host + base,
                avail_ring_addr: host + base + 0x1000,
                used_ring_addr: host + base + 0x2000,
                log_addr: None,
            };
            frontend.set_vring_addr(queue, &config).map_err(err)?;
            frontend.set_vring_base(queue, 0).map_err(err)?;
            if queue < 2 {
                frontend.set_vring_call(queue, &calls[queue]).map_err(err)?;
                frontend.set_vring_kick(queue, &kicks[queue]).map_err(err)?;
                frontend.set_vring_enable(queue, true).map_err(err)?;
            }
        }
        Ok(Setup { frontend, mem, guest_cid, event_idx, calls, kicks })
    }
}

fn memfd() -> io::Result<File> {
    let fd = rustix::fs::memfd_create("zerovsock-guest", rustix::fs::MemfdFlags::CLOEXEC)?;
    Ok(File::from(fd))
}

/// One split ring as the driver sees it.
struct Ring {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    avail_idx: u16,
    last_used: u16,
}

impl Ring {
    fn new(base: u64) -> Ring {
        Ring {
            desc: GuestAddress(base),
            avail: GuestAddress(base + 0x1000),
            used: GuestAddress(base + 0x2000),
            avail_idx: 0,
            last_used: 0,
        }
    }

    fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, desc: Descriptor) -> io::Result<()> {
        mem.write_obj(desc, self.desc.unchecked_add(16 * u64::from(index))).map_err(err)
    }

    /// Makes chain `head` available (the index store is a release: the backend sees the
    /// descriptors first).
    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) -> io::Result<()> {
        let slot = u64::from(self.avail_idx % QUEUE);
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot)).map_err(err)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(self.avail_idx, self.avail.unchecked_add(2), Ordering::Release).map_err(err)
    }

    /// The next used element, if any: (head, len).
    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> io::Result<Option<(u16, u32)>> {
        let idx: u16 = mem.load(self.used.unchecked_add(2), Ordering::Acquire).map_err(err)?;
        if idx == self.last_used {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % QUEUE);
        let at = self.used.unchecked_add(4 + 8 * slot);
        let id: u32 = mem.read_obj(at).map_err(err)?;
        let len: u32 = mem.read_obj(at.unchecked_add(4)).map_err(err)?;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some((id as u16, len)))
    }

    /// EVENT_IDX: ask for a call once the next used element lands.
    fn set_used_event(&self, mem: &GuestMemoryMmap) -> io::Result<()> {
        mem.store(
            self.last_used,
            self.avail.unchecked_add(4 + 2 * u64::from(QUEUE)),
            Ordering::Release,
        )
        .map_err(err)
    }
}

use vm_memory::Address;

struct Rings {
    setup: Setup,
    layout: TxLayout,
    rx: Ring,
    tx: Ring,
    /// Free TX slots (descriptor ranges and buffers), by slot number.
    free_slots: Vec<u16>,
    /// TX slot of each head in flight.
    outgoing: Arc<Mutex<VecDeque<Packet>>>,
    vsock: Vsock,
}

/// Descriptors per TX slot: a header and up to sixteen 4 KiB pages.
const SLOT_DESCS: u16 = 17;
const TX_SLOT_COUNT: u16 = QUEUE / SLOT_DESCS;

impl Rings {
    fn new(
        setup: Setup,
        layout: TxLayout,
        outgoing: Arc<Mutex<VecDeque<Packet>>>,
        vsock: Vsock,
    ) -> io::Result<Rings> {
        let mut rings = Rings {
            setup,
            layout,
            rx: Ring::new(RINGS[0]),
            tx: Ring::new(RINGS[1]),
            free_slots: (0..TX_SLOT_COUNT).rev().collect(),
            outgoing,
            vsock,
        };
        for index in 0..QUEUE {
            rings.post_rx(index)?;
        }
        rings.setup.kicks[0].write(1).map_err(err)?;
        Ok(rings)
    }

    fn post_rx(&mut self, index: u16) -> io::Result<()> {
        let addr = RX_BUFFERS + u64::from(index) * u64::from(RX_BUFFER);
        let desc = Descriptor::new(addr, RX_BUFFER, VRING_DESC_F_WRITE as u16, 0);
        self.rx.write_desc(&self.setup.mem, index, desc)?;
        self.rx.publish(&self.setup.mem, index)
    }

    fn run(&mut self, stop: &AtomicBool, local: &EventFd) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let epoll = Epoll::new()?;
        for (i, fd) in
            [self.setup.calls[0].as_raw_fd(), self.setup.calls[1].as_raw_fd(), local.as_raw_fd()]
                .into_iter()
                .enumerate()
        {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, i as u64))?;
        }
        let mut events = [EpollEvent::default(); 4];
        while !stop.load(Ordering::Acquire) {
            let _ = self.setup.calls[0].read();
            let _ = self.setup.calls[1].read();
            let _ = local.read();
            let moved = self.drain_rx()? | self.reclaim_tx()? | self.send_tx()?;
            if moved {
                continue;
            }
            match epoll.wait(100, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Dropping the frontend closes the vhost-user socket: the backend ends its session.
        let _ = self.setup.frontend.reset_owner();
        Ok(())
    }

    fn drain_rx(&mut self) -> io::Result<bool> {
        let mut batch = Vec::new();
        let mut reposted = false;
        while let Some((head, len)) = self.rx.pop_used(&self.setup.mem)? {
            let addr = GuestAddress(RX_BUFFERS + u64::from(head) * u64::from(RX_BUFFER));
            // Linux's checks (`virtio_transport_rx_work` / `virtio_vsock_rx_fill`): the used
            // length covers a header and the header's length.
            if (HEADER_LEN as u32..=RX_BUFFER).contains(&len) {
                let mut bytes = vec![0u8; len as usize];
                self.setup.mem.read_slice(&mut bytes, addr).map_err(err)?;
                let mut header = [0u8; HEADER_LEN];
                header.copy_from_slice(&bytes[..HEADER_LEN]);
                let claimed = u32::from_le_bytes(header[24..28].try_into().map_err(err)?);
                if claimed <= len - HEADER_LEN as u32 {
                    let payload = bytes[HEADER_LEN..HEADER_LEN + claimed as usize].to_vec();
                    batch.push((header, Payload::from(payload)));
                }
            }
            self.post_rx(head)?;
            reposted = true;
        }
        if self.setup.event_idx {
            self.rx.set_used_event(&self.setup.mem)?;
        }
        let moved = !batch.is_empty() || reposted;
        if !batch.is_empty() {
            self.vsock.deliver(batch);
        }
        if reposted {
            self.setup.kicks[0].write(1).map_err(err)?;
        }
        Ok(moved)
    }

    fn reclaim_tx(&mut self) -> io::Result<bool> {
        let mut moved = false;
        while let Some((head, _)) = self.tx.pop_used(&self.setup.mem)? {
            self.free_slots.push(head / SLOT_DESCS);
            moved = true;
        }
        if self.setup.event_idx {
            self.tx.set_used_event(&self.setup.mem)?;
        }
        Ok(moved)
    }

    fn send_tx(&mut self) -> io::Result<bool> {
        let mut sent = false;
        loop {
            if self.free_slots.is_empty() {
                break;
            }
            let Some(packet) =
                self.outgoing.lock().unwrap_or_else(PoisonError::into_inner).pop_front()
            else {
                break;
            };
            let slot = self.free_slots.pop().unwrap_or(0);
            self.write_packet(slot, &packet)?;
            sent = true;
        }
        if sent {
            self.setup.kicks[1].write(1).map_err(err)?;
        }
        Ok(sent)
    }

    /// Writes one packet into TX slot `slot` in the chosen layout and makes it available.
    fn write_packet(&mut self, slot: u16, packet: &Packet) -> io::Result<()> {
        let mem = &self.setup.mem;
        let base = TX_SLOTS + u64::from(slot) * TX_SLOT;
        mem.write_slice(&packet.repr.to_bytes(), GuestAddress(base)).map_err(err)?;
        // Each payload segment straight into the slot: one copy, as a guest's own send makes.
        let mut at = base + HEADER_LEN as u64;
        for segment in packet.payload.segments() {
            match segment {
                zerovsock::Segment::Local(bytes) => {
                    mem.write_slice(bytes, GuestAddress(at)).map_err(err)?
                }
                other => {
                    let mut bytes = vec![0u8; other.len()];
                    other.read_at(0, &mut bytes);
                    mem.write_slice(&bytes, GuestAddress(at)).map_err(err)?;
                }
            }
            at += segment.len() as u64;
        }
        let payload_len = packet.payload.len();
        let mut cuts: Vec<(u64, u32)> = Vec::new();
        let data = base + HEADER_LEN as u64;
        let piece = |size: usize| -> Vec<(u64, u32)> {
            (0..payload_len)
                .step_by(size)
                .map(|at| (data + at as u64, (payload_len - at).min(size) as u32))
                .collect()
        };
        match self.layout {
            TxLayout::Single => cuts.push((base, (HEADER_LEN + payload_len) as u32)),
            TxLayout::Linux => {
                cuts.push((base, HEADER_LEN as u32));
                cuts.extend(piece(32 * 1024));
            }
            TxLayout::Pages => {
                cuts.push((base, HEADER_LEN as u32));
                cuts.extend(piece(4096));
            }
            TxLayout::HeaderAndData => {
                cuts.push((base, HEADER_LEN as u32));
                cuts.extend(piece(usize::MAX));
            }
        }
        let first = slot * SLOT_DESCS;
        for (i, (addr, len)) in cuts.iter().enumerate() {
            let index = first + i as u16;
            let last = i + 1 == cuts.len();
            let flags = if last { 0 } else { VRING_DESC_F_NEXT as u16 };
            self.tx.write_desc(mem, index, Descriptor::new(*addr, *len, flags, index + 1))?;
        }
        self.tx.publish(mem, first)
    }
}
