//! Review: the device as a raw vhost-user frontend sees it (a minimal driver that negotiates
//! only VERSION_1, i.e. no SEQPACKET and no EVENT_IDX, and writes its rings by hand).
//!
//! TX chains held in payloads across a vring stop (GET_VRING_BASE) and a new ring: a guest reset (reboot, driver reload, `virsh reset`) or a migration makes the VMM stop the
//! rings (GET_VRING_BASE) and set them up again from index 0. Linux's vhost-vsock holds no
//! chain across that: `vhost_vsock_handle_tx_kick` copies each packet into an skb and calls
//! `vhost_add_used` before it returns, and `vhost_vsock_stop` + flush runs before the rings
//! change. This device keeps a chain until its payload's last view drops, and gives it back
//! whenever that happens, to whatever ring is set up then: the new driver finds in its used
//! ring a head it never made available (Linux: "id %u is not a head!", the virtqueue is
//! marked broken), or one it has just reused for another packet.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use zerovsock::wire::{Addr, Cid, Op, Port, Repr, SocketType};
use zerovsock::{VsockListener, VsockSeqpacketListener, VsockSocket};
use zerovsock_vhost::Device;

mod common;

const QUEUE: u16 = 64;
const MEM_SIZE: usize = 16 << 20;
/// Descriptor table, avail ring, used ring of RX (0), TX (1) and the event queue (2).
const RINGS: [u64; 3] = [0x0, 0x4000, 0x8000];
const TX_BUFFERS: u64 = 0x20_0000;

struct Driver {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    host: u64,
    tx_avail: u16,
    _fds: Vec<EventFd>,
    tx_kick: Option<EventFd>,
    rx_kick: Option<EventFd>,
    rx_avail: u16,
}

impl Driver {
    fn connect(socket: &std::path::Path) -> Driver {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut frontend = loop {
            match Frontend::connect(socket, 3) {
                Ok(frontend) => break frontend,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("frontend: {e}"),
            }
        };
        frontend.set_owner().expect("owner");
        frontend.get_features().expect("features");
        let protocol = frontend.get_protocol_features().expect("protocol features");
        frontend
            .set_protocol_features(
                protocol & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG),
            )
            .expect("protocol features");
        frontend
            .set_features(
                (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            )
            .expect("features");
        let path = common::fresh_dir("mem").join("guest-memory");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("memory file");
        let _ = std::fs::remove_file(&path);
        file.set_len(MEM_SIZE as u64).expect("memory size");
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("guest memory");
        let region = mem.iter().next().expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        frontend.set_mem_table(&[info]).expect("mem table");
        let host = info.userspace_addr;
        let mut driver = Driver {
            frontend,
            mem,
            host,
            tx_avail: 0,
            _fds: Vec::new(),
            tx_kick: None,
            rx_kick: None,
            rx_avail: 0,
        };
        driver.start_rings();
        driver
    }

    /// SET_VRING_* from index 0, as after a reset (rings zeroed first).
    fn start_rings(&mut self) {
        self.mem.write_slice(&vec![0u8; 0xC000], GuestAddress(0)).expect("zero rings");
        self.tx_avail = 0;
        self.rx_avail = 0;
        for (queue, &base) in RINGS.iter().enumerate() {
            self.frontend.set_vring_num(queue, QUEUE).expect("num");
            let config = VringConfigData {
                queue_max_size: QUEUE,
                queue_size: QUEUE,
                flags: 0,
                desc_table_addr: self.host + base,
                avail_ring_addr: self.host + base + 0x1000,
                used_ring_addr: self.host + base + 0x2000,
                log_addr: None,
            };
            self.frontend.set_vring_addr(queue, &config).expect("addr");
            self.frontend.set_vring_base(queue, 0).expect("base");
            if queue < 2 {
                let call = EventFd::new(libc::EFD_NONBLOCK).expect("call");
                let kick = EventFd::new(libc::EFD_NONBLOCK).expect("kick");
                self.frontend.set_vring_call(queue, &call).expect("call");
                self.frontend.set_vring_kick(queue, &kick).expect("kick");
                self.frontend.set_vring_enable(queue, true).expect("enable");
                self._fds.push(call);
                if queue == 1 {
                    self.tx_kick = Some(kick);
                } else {
                    self.rx_kick = Some(kick);
                }
            }
        }
    }

    /// The device stops the rings (what QEMU sends when the guest resets).
    fn stop_rings(&mut self) {
        for queue in 0..2usize {
            self.frontend.get_vring_base(queue).expect("get vring base");
        }
    }

    /// One TX packet in one descriptor; returns its head.
    fn send(&mut self, repr: Repr, payload: &[u8]) -> u16 {
        let head = self.tx_avail % QUEUE;
        let buffer = TX_BUFFERS + u64::from(head) * 0x1_1000;
        let mut bytes = Repr { len: payload.len() as u32, ..repr }.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.mem.write_slice(&bytes, GuestAddress(buffer)).expect("packet");
        let desc = Descriptor::new(buffer, bytes.len() as u32, 0, 0);
        let _ = VRING_DESC_F_NEXT;
        let table = GuestAddress(RINGS[1]);
        self.mem.write_obj(desc, table.unchecked_add(16 * u64::from(head))).expect("desc");
        let avail = GuestAddress(RINGS[1] + 0x1000);
        let slot = u64::from(self.tx_avail % QUEUE);
        self.mem.write_obj(head, avail.unchecked_add(4 + 2 * slot)).expect("avail entry");
        self.tx_avail = self.tx_avail.wrapping_add(1);
        self.mem.store(self.tx_avail, avail.unchecked_add(2), Ordering::Release).expect("idx");
        self.tx_kick.as_ref().expect("kick").write(1).expect("kick");
        head
    }

    /// The TX used ring: (idx, the ids of its first two entries).
    fn tx_used(&self) -> (u16, [u32; 2]) {
        let used = GuestAddress(RINGS[1] + 0x2000);
        let idx: u16 = self.mem.load(used.unchecked_add(2), Ordering::Acquire).expect("used idx");
        let id =
            |slot: u64| -> u32 { self.mem.read_obj(used.unchecked_add(4 + 8 * slot)).expect("id") };
        (idx, [id(0), id(1)])
    }
}

fn from_guest(op: Op) -> Repr {
    let mut repr = Repr::new(
        op,
        SocketType::Stream,
        Addr::new(Cid(3), Port(1000)),
        Addr::new(Cid::HOST, Port(5000)),
    );
    repr.buf_alloc = 256 * 1024;
    repr
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_chain_held_across_a_ring_reset_is_not_returned_into_the_new_ring() {
    let (device, socket, _) = common::serve_device(&common::fresh_dir("reset"), false);
    let listener = VsockListener::bind(device.vsock(), Addr::new(Cid::ANY, Port(5000)))
        .expect("host listener");
    let mut driver = Driver::connect(&socket);

    // A connection, then 1000 bytes the host application has not read yet: the RW chain
    // stays in guest memory, held by the payload in the host socket's queue.
    driver.send(from_guest(Op::Request), &[]);
    let (mut host, _) = listener.accept().expect("host accept");
    let held = driver.send(from_guest(Op::Rw), &[0x5a; 1000]);
    wait_for("the REQUEST's chain", || driver.tx_used().0 == 1);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(driver.tx_used().0, 1, "the RW chain is held while its bytes are unread");

    // The guest resets: the VMM stops the rings and sets them up again from index 0.
    driver.stop_rings();
    driver.start_rings();
    assert_eq!(driver.tx_used().0, 0);

    // The host application reads now; the old chain is released.
    let mut got = [0u8; 1000];
    host.read_exact(&mut got).expect("host read");
    thread::sleep(Duration::from_millis(500));
    let (idx, ids) = driver.tx_used();
    assert_eq!(
        idx, 0,
        "the new driver made nothing available, yet its TX used ring's idx is {idx} (ids in \
         the first slots: {ids:?}; head {held} was a chain from before the reset)"
    );
}

fn device_and_driver(tag: &str) -> (Arc<Device>, Driver) {
    let (device, socket, _) = common::serve_device(&common::fresh_dir(tag), false);
    let driver = Driver::connect(&socket);
    (device, driver)
}

/// `vhost_transport_seqpacket_allow` is `vsock->seqpacket_allow`, set from the features the
/// driver acked (`vhost_vsock_set_features`); `vsock_assign_transport` fails a SEQPACKET
/// connect with ESOCKTNOSUPPORT at once when it is off. `DeviceTransport::supports_seqpacket`
/// is always true and the backend never looks at the acked features: the host's connect goes
/// out as a SEQPACKET REQUEST the guest never agreed to, and fails later, another way.
#[test]
fn host_seqpacket_connect_fails_at_once_when_the_guest_did_not_ack_seqpacket() {
    let (device, _driver) = device_and_driver("seq-connect");
    let socket = VsockSocket::seqpacket(device.vsock()).expect("socket");
    socket.set_connect_timeout(Duration::from_millis(500)).expect("timeout");
    let started = Instant::now();
    let error = socket.connect(Addr::new(Cid(3), Port(4000))).expect_err("no SEQPACKET");
    assert_eq!(
        error.raw_os_error(),
        Some(libc::ESOCKTNOSUPPORT),
        "{error} after {:?}",
        started.elapsed()
    );
}

/// The other way: `virtio_transport_recv_listen` -> `vsock_assign_transport(child)` fails for
/// a SEQPACKET child without the feature, and the REQUEST gets RST. Here it is accepted.
#[test]
fn guest_seqpacket_request_is_refused_when_the_guest_did_not_ack_seqpacket() {
    let (device, mut driver) = device_and_driver("seq-request");
    let listener = VsockSeqpacketListener::bind(device.vsock(), Addr::new(Cid::ANY, Port(5000)))
        .expect("host listener");
    let mut request = from_guest(Op::Request);
    request.socket_type = SocketType::Seqpacket;
    driver.send(request, &[]);
    wait_for("the REQUEST's chain", || driver.tx_used().0 == 1);
    thread::sleep(Duration::from_millis(100));
    listener.set_nonblocking(true).expect("nonblocking");
    let accepted = listener.accept();
    assert!(
        accepted.is_err(),
        "a SEQPACKET connection from a guest that did not negotiate SEQPACKET was accepted: {:?}",
        accepted.map(|(_, peer)| peer)
    );
}

const RX_BUFFERS: u64 = 0xA0_0000;
const RX_SIZE: u32 = 4096;

impl Driver {
    /// Makes `count` RX buffers of `RX_SIZE` available (one descriptor each, head = slot).
    fn post_rx(&mut self, count: u16) {
        let table = GuestAddress(RINGS[0]);
        let avail = GuestAddress(RINGS[0] + 0x1000);
        for _ in 0..count {
            let head = self.rx_avail % QUEUE;
            let buffer = RX_BUFFERS + u64::from(head) * u64::from(RX_SIZE);
            let desc = Descriptor::new(
                buffer,
                RX_SIZE,
                virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
                0,
            );
            self.mem.write_obj(desc, table.unchecked_add(16 * u64::from(head))).expect("desc");
            let slot = u64::from(self.rx_avail % QUEUE);
            self.mem.write_obj(head, avail.unchecked_add(4 + 2 * slot)).expect("avail entry");
            self.rx_avail = self.rx_avail.wrapping_add(1);
        }
        self.mem.store(self.rx_avail, avail.unchecked_add(2), Ordering::Release).expect("idx");
        self.rx_kick.as_ref().expect("kick").write(1).expect("kick");
    }

    /// The RX used ring: (idx, the ids of its first two entries).
    fn rx_used(&self) -> (u16, [u32; 2]) {
        let used = GuestAddress(RINGS[0] + 0x2000);
        let idx: u16 = self.mem.load(used.unchecked_add(2), Ordering::Acquire).expect("used idx");
        let id =
            |slot: u64| -> u32 { self.mem.read_obj(used.unchecked_add(4 + 8 * slot)).expect("id") };
        (idx, [id(0), id(1)])
    }
}

/// RX buffers held across a vring stop. `place_one` takes buffers for up to 64 KiB of room
/// and keeps those a short `readv` did not reach in `Worker::spare`, handed out before any
/// chain of the ring. `Backend::stop_vring` (GET_VRING_BASE) only detaches TX; the spare RX
/// buffers survive the ring's reset, and the next host data is written into guest memory the
/// new driver never offered (it may be anything by then) and its head put on the new used
/// ring. Linux's `vhost_transport_do_send_pkt` holds no descriptor past one packet: what it
/// cannot fill it gives back with `vhost_discard_vq_desc`, so a stopped ring owes nothing.
#[test]
fn rx_buffers_taken_before_a_ring_reset_are_not_used_after_it() {
    use std::io::Write;
    let dir = common::fresh_dir("rx-reset");
    let (_device, socket, _) = common::serve_device(&dir, true);
    let host_listener =
        std::os::unix::net::UnixListener::bind(dir.join("vm.vsock_5000")).expect("listener");
    let mut driver = Driver::connect(&socket);
    driver.post_rx(4);

    // A guest connect through the Unix endpoint: RESPONSE in RX buffer 0.
    driver.send(from_guest(Op::Request), &[]);
    let (mut host, _) = host_listener.accept().expect("host accept");
    wait_for("the RESPONSE", || driver.rx_used().0 == 1);
    // 100 bytes from the host program: read into buffer 1, buffers 2 and 3 taken too.
    host.write_all(&[0x42; 100]).expect("host write");
    thread::sleep(Duration::from_millis(100));
    // A guest packet, so the worker makes another RX pass whatever it waits for.
    let mut credit = from_guest(Op::CreditUpdate);
    credit.fwd_cnt = 0;
    driver.send(credit, &[]);
    wait_for("the host data", || driver.rx_used().0 == 2);

    // The guest resets: the VMM stops the rings and sets them up again from index 0, with no
    // RX buffer offered yet.
    driver.stop_rings();
    driver.start_rings();
    assert_eq!(driver.rx_used().0, 0);
    host.write_all(&[0x43; 100]).expect("host write");
    thread::sleep(Duration::from_millis(500));
    let (idx, ids) = driver.rx_used();
    assert_eq!(
        idx, 0,
        "the new driver made no RX buffer available, yet its RX used ring's idx is {idx} (ids \
         in the first slots: {ids:?}: buffers of the ring before the reset)"
    );
}
