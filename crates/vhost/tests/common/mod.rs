//! What the device's integration tests share: a fresh directory, and a device serving in it.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use zerovsock_vhost::{Device, DeviceConfig};

/// A new, empty directory for one test's sockets and files.
pub fn fresh_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "zerovsock-vhost-test-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A device for guest CID 3 serving frontends on `<dir>/vhost.sock` on a thread of its own,
/// with its Unix endpoints at `<dir>/vm.vsock` when `uds`. Returns the device, the vhost-user
/// socket and the serving thread.
pub fn serve_device(
    dir: &Path,
    uds: bool,
) -> (Arc<Device>, PathBuf, JoinHandle<std::io::Result<()>>) {
    let mut config = DeviceConfig::new(3);
    if uds {
        config.uds_path = Some(dir.join("vm.vsock"));
    }
    let device = Arc::new(Device::new(config).expect("device"));
    let socket = dir.join("vhost.sock");
    let (serving, path) = (device.clone(), socket.clone());
    let thread = thread::spawn(move || serving.serve(&path));
    (device, socket, thread)
}
