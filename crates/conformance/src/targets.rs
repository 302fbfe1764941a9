//! The targets the suite runs against in one process: the loopback stack, and the device
//! with the userspace guest driver on the other side of a real vhost-user socket. (The kernel
//! target is [`crate::kernel::KernelPeer`] on both sides, inside a lab guest.)

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use zerovsock::Vsock;
use zerovsock_testkit::guest::{GuestDriver, TxLayout};
use zerovsock_vhost::{Device, DeviceConfig};

use crate::peer::Cid;
use crate::runner::Endpoint;
use crate::stack::StackPeer;

/// Both ends on one in-process loopback endpoint (CID 1).
pub fn loopback() -> (Endpoint, Endpoint) {
    let peer: Arc<StackPeer> = Arc::new(StackPeer::new(Vsock::loopback(), "loopback"));
    let end = Endpoint { peer, cid: Cid::LOCAL };
    (end.clone(), end)
}

/// The guest CID the device target gives its guest.
pub const DEVICE_GUEST_CID: u32 = 3;

/// The device serving one userspace guest: the host's native sockets and the guest's.
pub struct DeviceTarget {
    device: Arc<Device>,
    guest: GuestDriver,
    dir: PathBuf,
}

impl DeviceTarget {
    /// Starts a device for guest CID 3 on a fresh vhost-user socket and connects the
    /// userspace guest driver to it (TX chains laid out as Linux 6.12 lays them out).
    pub fn start() -> io::Result<DeviceTarget> {
        let dir = std::env::temp_dir().join(format!(
            "zerovsock-conformance-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("vhost.sock");
        let device = Arc::new(Device::new(DeviceConfig::new(DEVICE_GUEST_CID))?);
        let (serving, path) = (device.clone(), socket.clone());
        thread::Builder::new().name("conformance-device".into()).spawn(move || {
            if let Err(e) = serving.serve(&path) {
                eprintln!("conformance: the device stopped serving: {e}");
            }
        })?;
        let guest = GuestDriver::connect(&socket, TxLayout::Linux)?;
        Ok(DeviceTarget { device, guest, dir })
    }

    /// The host side: the device's native sockets (CID 2).
    pub fn host(&self) -> Endpoint {
        let peer = StackPeer::new(self.device.vsock().clone(), "device host");
        Endpoint { peer: Arc::new(peer), cid: Cid::HOST }
    }

    /// The guest side: the userspace guest driver's sockets.
    pub fn guest(&self) -> Endpoint {
        let peer = StackPeer::new(self.guest.vsock().clone(), "device guest");
        Endpoint { peer: Arc::new(peer), cid: self.guest.guest_cid() }
    }
}

impl Drop for DeviceTarget {
    fn drop(&mut self) {
        let _ = self.guest.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
