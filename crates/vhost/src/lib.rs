//! A vhost-user-vsock device: the host half of virtio-vsock (what Linux's
//! `drivers/vhost/vsock.c` does) as a vhost-user backend for QEMU's `vhost-user-vsock-pci`,
//! cloud-hypervisor and crosvm.
//!
//! One [`Device`] serves one guest CID. The protocol engine (`zerovsock-proto`) plays the host
//! (CID 2); this crate only moves its packets through the guest's queues (`zerovsock-virtio`)
//! and makes no protocol decision itself. Host programs reach the guest in two ways:
//!
//! * **Hybrid Unix sockets** ([`DeviceConfig::uds_path`]), compatible with vhost-device-vsock
//!   and Firecracker: connect to `uds_path` and write `CONNECT <port>\n` to reach a guest port
//!   (the answer is `OK <host port>\n`); a guest connect to host port P reaches
//!   `<uds_path>_P`, and fails with ECONNRESET at once when nobody listens there.
//! * **The socket API** ([`Device::vsock`]): `VsockListener` / `VsockStream` / `send_zerocopy`
//!   on the device's endpoint, as on loopback, without a Unix-socket hop.
//!
//! Guest payloads are never copied on their way to a Unix socket: they stay in guest memory
//! until `writev` has taken them, and the TX chain goes back to the guest then. The chains held
//! this way are bounded (half the queue); past that, payloads are copied out so other
//! connections keep moving.
//!
//! ```no_run
//! use zerovsock_vhost::{Device, DeviceConfig};
//!
//! let mut config = DeviceConfig::new(3);
//! config.uds_path = Some("/tmp/vm3.vsock".into());
//! let device = Device::new(config)?;
//! device.serve("/tmp/vm3.vhost".as_ref())?; // one frontend after another
//! # Ok::<(), std::io::Error>(())
//! ```

#![deny(unsafe_code)]

mod backend;
mod bridge;
mod direct;
mod sys;
mod worker;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use zerovsock::Vsock;
use zerovsock_virtio::GuestMemory;
use zerovsock_wire::Cid;

pub use worker::DeviceStats;

#[cfg(test)]
mod tests;

use backend::{Backend, OUTBOUND_EVENT, RETURNS_EVENT};
use worker::{DeviceTransport, Outbound, Worker};

/// What a device serves.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The guest's CID (3 or more, below `u32::MAX`).
    pub guest_cid: u32,
    /// Hybrid Unix-socket endpoints at this path (and `<path>_<port>` for guest connects).
    pub uds_path: Option<PathBuf>,
    /// The largest virtqueue the frontend may set up.
    pub queue_size: u16,
}

impl DeviceConfig {
    /// Defaults (queue size 1024, as vhost-device-vsock) for guest `guest_cid`, no Unix
    /// endpoints.
    pub fn new(guest_cid: u32) -> DeviceConfig {
        DeviceConfig { guest_cid, uds_path: None, queue_size: 1024 }
    }
}

/// One guest's device: the host endpoint and, once a frontend connects, its queues.
pub struct Device {
    config: DeviceConfig,
    vsock: Vsock,
    outbound: Arc<Outbound>,
    bridge: Option<Arc<bridge::Bridge>>,
    /// The session being served, if any.
    current: Mutex<Option<Arc<Backend>>>,
    /// Counts of the sessions that ended.
    ended: Mutex<DeviceStats>,
}

impl Device {
    /// Checks the configuration as `vhost_vsock_set_cid` does and starts the Unix endpoints.
    pub fn new(config: DeviceConfig) -> io::Result<Device> {
        if config.guest_cid <= Cid::HOST.0 || config.guest_cid == u32::MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest CID {} is reserved: use 3 or more", config.guest_cid),
            ));
        }
        if !config.queue_size.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue size {} is not a power of two", config.queue_size),
            ));
        }
        let outbound = Outbound::new()?;
        let transport =
            DeviceTransport { guest_cid: Cid(config.guest_cid), outbound: outbound.clone() };
        let vsock = Vsock::with_transport(transport);
        // `seqpacket_allow` starts false (vhost_vsock_dev_open zeroes it): only a driver's
        // acked features turn it on (`Backend::acked_features`), and each session's end
        // turns it off again.
        vsock.set_seqpacket(false);
        let bridge = match &config.uds_path {
            Some(path) => Some(Arc::new(bridge::Bridge::start(
                &vsock,
                &outbound,
                Cid(config.guest_cid),
                path,
            )?)),
            None => None,
        };
        Ok(Device {
            config,
            vsock,
            outbound,
            bridge,
            current: Mutex::new(None),
            ended: Mutex::new(DeviceStats::default()),
        })
    }

    /// The host endpoint (CID 2) facing this guest: sockets on it talk to the guest.
    pub fn vsock(&self) -> &Vsock {
        &self.vsock
    }

    /// The configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// What the queues did, refused or copied, over every session so far.
    pub fn stats(&self) -> DeviceStats {
        let mut stats = *self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(backend) = self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref()
        {
            stats.add(&backend.stats());
        }
        stats
    }

    /// Serves frontends on the vhost-user socket `socket`, one after another, forever: when a
    /// frontend disconnects (or breaks the protocol), the next one is served; a VMM that
    /// connects meanwhile waits in the socket's backlog until then.
    pub fn serve(&self, socket: &Path) -> io::Result<()> {
        let mut listener = Listener::new(socket, true)
            .map_err(|e| io::Error::other(format!("listening on {}: {e}", socket.display())))?;
        loop {
            if let Err(error) = self.session(&mut listener) {
                // One frontend's failure ends its session, not the device.
                eprintln!("zerovsock-vhost: {}: session ended: {error}", socket.display());
            }
        }
    }

    /// Serves one frontend on `socket` until it disconnects.
    pub fn serve_one(&self, socket: &Path) -> io::Result<()> {
        let mut listener = Listener::new(socket, true)
            .map_err(|e| io::Error::other(format!("listening on {}: {e}", socket.display())))?;
        self.session(&mut listener)
    }

    /// One frontend, from its connect to its disconnect. Then packets still waiting for that
    /// guest are dropped and its connections end with ECONNRESET, as when a vhost-vsock
    /// device is released.
    fn session(&self, listener: &mut Listener) -> io::Result<()> {
        let returns_kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let returns = backend::returns_with(&returns_kick);
        let mut worker = Worker::new(
            Cid(self.config.guest_cid),
            self.vsock.clone(),
            self.outbound.clone(),
            returns,
        );
        worker.bridge = self.bridge.clone();
        let backend = Arc::new(Backend::new(
            u64::from(self.config.guest_cid),
            self.config.queue_size,
            worker,
            returns_kick.clone(),
        )?);
        let memory = GuestMemoryAtomic::new(GuestMemory::new());
        let mut daemon = VhostUserDaemon::new("zerovsock-vhost".into(), backend.clone(), memory)
            .map_err(|e| io::Error::other(format!("vhost-user daemon: {e}")))?;
        for handler in daemon.get_epoll_handlers() {
            for (fd, event) in [
                (self.outbound.kick.as_raw_fd(), OUTBOUND_EVENT),
                (returns_kick.as_raw_fd(), RETURNS_EVENT),
            ] {
                handler
                    .register_listener(fd, EventSet::IN, u64::from(event))
                    .map_err(|e| io::Error::other(format!("epoll: {e}")))?;
            }
        }
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(backend.clone());
        let result = daemon
            .start(listener)
            .and_then(|()| daemon.wait())
            .map_err(|e| io::Error::other(format!("vhost-user: {e}")));
        backend.exit();
        backend.reset();
        self.vsock.reset_peer(Cid(self.config.guest_cid));
        if let Some(bridge) = &self.bridge {
            bridge.reset();
        }
        self.vsock.set_seqpacket(false);
        self.current.lock().unwrap_or_else(PoisonError::into_inner).take();
        self.ended.lock().unwrap_or_else(PoisonError::into_inner).add(&backend.stats());
        result
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("config", &self.config).finish_non_exhaustive()
    }
}
