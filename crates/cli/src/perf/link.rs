//! The links a measurement runs over, each yielding connected (sender, receiver) pairs: the
//! vsock transports (loopback, kernel, the device with the userspace guest on the other side,
//! a device's hybrid Unix endpoints) and the baselines (an AF_UNIX socketpair, TCP over
//! 127.0.0.1).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{Vsock, VsockSocket};
use zerovsock_testkit::guest::{GuestDriver, TxLayout};
use zerovsock_vhost::{Device, DeviceConfig};

use super::conn::{Conn, KernelConn};
use super::Mode;

/// A connected pair: the sending end and the receiving end.
pub type Pair = (Box<dyn Conn>, Box<dyn Conn>);

/// Where measurements run.
pub trait Link {
    /// The row label.
    fn name(&self) -> String;
    /// A fresh connection on `port`; vsock ends get `buffer` as SO_VM_SOCKETS_BUFFER_SIZE
    /// (both ends, so whole messages fit the TX credit too), the receiver `rcvlowat`.
    fn pair(&mut self, port: u32, buffer: u64, rcvlowat: u32) -> Result<Pair>;
    /// Why `mode` cannot run on this link, if it cannot.
    fn refuses(&self, mode: Mode) -> Option<&'static str>;
    /// Whether this is the baseline every other link's e2e is compared with (xAF_UNIX).
    fn is_reference(&self) -> bool {
        false
    }
}

/// The userspace stack: both ends on zerovsock endpoints (the same one for the loopback; the
/// device's host side and the userspace guest for the device).
pub struct StackLink {
    name: String,
    sender: Vsock,
    receiver: Vsock,
    /// The receiver's CID as the sender addresses it.
    to: Cid,
    /// Keeps the device and guest alive while the link is in use.
    _harness: Option<Arc<DeviceHarness>>,
}

impl StackLink {
    /// The in-process loopback (CID 1).
    pub fn loopback() -> StackLink {
        let vsock = Vsock::loopback();
        StackLink {
            name: "loopback".into(),
            sender: vsock.clone(),
            receiver: vsock,
            to: Cid::LOCAL,
            _harness: None,
        }
    }

    /// The device's native sockets and the userspace guest, in `direction`.
    pub fn device(harness: &Arc<DeviceHarness>, direction: Direction) -> Result<StackLink> {
        let device = harness.device.as_ref().context("the device transport needs our device")?;
        let (host, guest) = (device.vsock().clone(), harness.guest.vsock().clone());
        let (sender, receiver, to) = match direction {
            Direction::GuestToHost => (guest, host, Cid::HOST),
            Direction::HostToGuest => (host, guest, harness.guest.guest_cid()),
        };
        Ok(StackLink {
            name: format!("device {}", direction.short()),
            sender,
            receiver,
            to,
            _harness: Some(harness.clone()),
        })
    }
}

impl Link for StackLink {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn pair(&mut self, port: u32, buffer: u64, rcvlowat: u32) -> Result<Pair> {
        let listener = VsockSocket::stream(&self.receiver)?;
        listener
            .bind(Addr::new(Cid::ANY, Port(port)))
            .with_context(|| format!("bind port {port}"))?;
        listener.set_buffer_size_unclamped(buffer)?;
        let listener = listener.listen(1)?;
        let socket = VsockSocket::stream(&self.sender)?;
        socket.set_buffer_size_unclamped(buffer)?;
        let sender = socket
            .connect(Addr::new(self.to, Port(port)))
            .with_context(|| format!("connect to {}:{port}", self.to.0))?;
        let (receiver, _) = listener.accept()?;
        receiver.set_rcvlowat(rcvlowat)?;
        Ok((Box::new(sender), Box::new(receiver)))
    }

    fn refuses(&self, mode: Mode) -> Option<&'static str> {
        (mode == Mode::UringZc).then_some("io_uring is a kernel interface")
    }
}

/// Kernel AF_VSOCK on both ends, over the guest's own transport to CID 1 (vsock_loopback).
pub struct KernelLink;

impl KernelLink {
    /// Refuses outside a guest the project's lab booted: AF_VSOCK on this machine is its
    /// host's control channel.
    pub fn new() -> Result<KernelLink> {
        ensure_lab_guest()?;
        Ok(KernelLink)
    }
}

/// The kernel transport opens AF_VSOCK, which only a guest the VM lab booted may do.
pub fn ensure_lab_guest() -> Result<()> {
    if !zerovsock_lab::in_lab_guest() {
        bail!(
            "--transport kernel opens AF_VSOCK, and this is not a guest booted by the project's \
             VM lab: refusing (run it inside one, e.g. `zerovsock-lab run --bin zerovsock -- \
             zerovsock perf --transport kernel`)"
        );
    }
    Ok(())
}

impl Link for KernelLink {
    fn name(&self) -> String {
        "kernel loopback".into()
    }

    fn pair(&mut self, port: u32, buffer: u64, rcvlowat: u32) -> Result<Pair> {
        use zerovsock_linux::VsockSocket;
        let listener = VsockSocket::stream()?;
        listener
            .bind(Addr::new(Cid::ANY, Port(port)))
            .with_context(|| format!("bind port {port}"))?;
        listener.set_buffer_size_unclamped(buffer)?;
        let listener = listener.listen(1)?;
        let socket = VsockSocket::stream()?;
        socket.set_buffer_size_unclamped(buffer)?;
        let sender = socket.connect(Addr::new(Cid::LOCAL, Port(port)))?;
        let (receiver, _) = listener.accept()?;
        receiver.set_buffer_size_unclamped(buffer)?;
        receiver.set_rcvlowat(rcvlowat)?;
        Ok((Box::new(KernelConn::new(sender)), Box::new(KernelConn::new(receiver))))
    }

    fn refuses(&self, _mode: Mode) -> Option<&'static str> {
        None
    }
}

/// Which way data flows between host and guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// The guest sends, the host receives.
    #[value(name = "g2h")]
    GuestToHost,
    /// The host sends, the guest receives.
    #[value(name = "h2g")]
    HostToGuest,
}

impl Direction {
    pub fn short(self) -> &'static str {
        match self {
            Direction::GuestToHost => "g2h",
            Direction::HostToGuest => "h2g",
        }
    }
}

/// A vhost-user-vsock backend with the userspace guest driving it: this project's device in
/// this process, or another backend (vhost-device-vsock) already serving a socket.
pub struct DeviceHarness {
    device: Option<Arc<Device>>,
    guest: GuestDriver,
    /// The backend's hybrid Unix endpoint.
    uds: Option<PathBuf>,
    dir: Option<PathBuf>,
}

/// The guest CID of the in-process device.
pub const GUEST_CID: u32 = 3;

impl DeviceHarness {
    /// This project's device for guest CID 3 on a fresh socket, with hybrid endpoints, and
    /// the userspace guest connected to it (TX laid out as Linux 6.12 does).
    pub fn ours() -> Result<DeviceHarness> {
        let dir = std::env::temp_dir().join(format!(
            "zerovsock-perf-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("vhost.sock");
        let uds = dir.join("vsock.uds");
        let mut config = DeviceConfig::new(GUEST_CID);
        config.uds_path = Some(uds.clone());
        let device = Arc::new(Device::new(config)?);
        let (serving, path) = (device.clone(), socket.clone());
        // One session: the userspace guest's. It ends when the harness drops the guest; a
        // failure before that shows up as the measurement's own connection error.
        thread::Builder::new().name("perf-device".into()).spawn(move || {
            let _ = serving.serve_one(&path);
        })?;
        let guest = GuestDriver::connect(&socket, TxLayout::Linux)
            .context("connecting the userspace guest to the device")?;
        Ok(DeviceHarness { device: Some(device), guest, uds: Some(uds), dir: Some(dir) })
    }

    /// Another backend, already serving `socket` with hybrid endpoints at `uds`: the guest
    /// lays TX out as header and one data descriptor, the only multi-descriptor layout
    /// vhost-device-vsock 0.3.0 accepts.
    pub fn external(socket: &Path, uds: &Path) -> Result<DeviceHarness> {
        let guest = GuestDriver::connect(socket, TxLayout::HeaderAndData)
            .with_context(|| format!("connecting the userspace guest to {}", socket.display()))?;
        Ok(DeviceHarness { device: None, guest, uds: Some(uds.to_path_buf()), dir: None })
    }
}

impl Drop for DeviceHarness {
    fn drop(&mut self) {
        let _ = self.guest.shutdown();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A device's hybrid Unix endpoints on the host side, the userspace guest on the other.
pub struct HybridLink {
    harness: Arc<DeviceHarness>,
    direction: Direction,
}

impl HybridLink {
    pub fn new(harness: &Arc<DeviceHarness>, direction: Direction) -> HybridLink {
        HybridLink { harness: harness.clone(), direction }
    }
}

impl Link for HybridLink {
    fn name(&self) -> String {
        format!("unix {}", self.direction.short())
    }

    fn pair(&mut self, port: u32, buffer: u64, rcvlowat: u32) -> Result<Pair> {
        let uds = self.harness.uds.as_deref().ok_or_else(|| anyhow!("no hybrid endpoint"))?;
        let guest = self.harness.guest.vsock();
        match self.direction {
            Direction::GuestToHost => {
                let path = hybrid_listen_path(uds, port);
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path)
                    .with_context(|| format!("listening on {}", path.display()))?;
                let socket = VsockSocket::stream(guest)?;
                socket.set_buffer_size_unclamped(buffer)?;
                let sender = socket.connect(Addr::new(Cid::HOST, Port(port)))?;
                let (receiver, _) = listener.accept()?;
                let _ = std::fs::remove_file(&path);
                Ok((Box::new(sender), Box::new(receiver)))
            }
            Direction::HostToGuest => {
                let listener = VsockSocket::stream(guest)?;
                listener.bind(Addr::new(Cid::ANY, Port(port)))?;
                listener.set_buffer_size_unclamped(buffer)?;
                let listener = listener.listen(1)?;
                let sender = hybrid_connect(uds, port, Duration::ZERO)?;
                let (receiver, _) = listener.accept()?;
                receiver.set_rcvlowat(rcvlowat)?;
                Ok((Box::new(sender), Box::new(receiver)))
            }
        }
    }

    fn refuses(&self, mode: Mode) -> Option<&'static str> {
        match (mode, self.direction) {
            (Mode::Copy, _) => None,
            (Mode::Zerocopy, Direction::GuestToHost) => None,
            (Mode::Zerocopy, Direction::HostToGuest) => {
                Some("the host end is an AF_UNIX socket: no MSG_ZEROCOPY")
            }
            (Mode::UringZc, _) => Some("io_uring is a kernel interface"),
        }
    }
}

/// Where a guest's connect to host port `port` arrives: `<uds>_<port>`.
pub fn hybrid_listen_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// A host connect to guest port `port` through the hybrid endpoint `uds`: `CONNECT <port>`,
/// then `OK <host port>`. Retried for up to `wait` while the backend or the guest's listener
/// is not there yet.
pub fn hybrid_connect(uds: &Path, port: u32, wait: Duration) -> Result<UnixStream> {
    retrying(wait, || hybrid_connect_once(uds, port))
}

/// Retries `connect` every 100 ms for up to `wait`; the last error when it never succeeds.
pub fn retrying<T>(wait: Duration, mut connect: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + wait;
    loop {
        match connect() {
            Ok(conn) => return Ok(conn),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn hybrid_connect_once(uds: &Path, port: u32) -> Result<UnixStream> {
    let mut stream =
        UnixStream::connect(uds).with_context(|| format!("connecting to {}", uds.display()))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the answer byte by byte: what follows the line is the connection's data.
    let mut reader = BufReader::with_capacity(1, &stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        bail!(
            "{} refused CONNECT {port}{}",
            uds.display(),
            if line.is_empty() { String::new() } else { format!(": {:?}", line.trim_end()) }
        );
    }
    drop(reader);
    Ok(stream)
}

/// An AF_UNIX stream socketpair, default buffers: the in-process channel a user would pick.
pub struct UnixPairLink;

impl Link for UnixPairLink {
    fn name(&self) -> String {
        "AF_UNIX".into()
    }

    fn pair(&mut self, _port: u32, _buffer: u64, _rcvlowat: u32) -> Result<Pair> {
        let (sender, receiver) = UnixStream::pair()?;
        Ok((Box::new(sender), Box::new(receiver)))
    }

    fn refuses(&self, mode: Mode) -> Option<&'static str> {
        (mode != Mode::Copy).then_some("AF_UNIX has no MSG_ZEROCOPY")
    }

    fn is_reference(&self) -> bool {
        true
    }
}

/// TCP over 127.0.0.1, default buffers; zerocopy through MSG_ZEROCOPY, which Linux turns into
/// a copy on loopback (its completions say COPIED).
pub struct TcpLink {
    listener: TcpListener,
}

impl TcpLink {
    pub fn new() -> Result<TcpLink> {
        Ok(TcpLink { listener: TcpListener::bind((Ipv4Addr::LOCALHOST, 0))? })
    }
}

impl Link for TcpLink {
    fn name(&self) -> String {
        "TCP".into()
    }

    fn pair(&mut self, _port: u32, _buffer: u64, _rcvlowat: u32) -> Result<Pair> {
        let sender = TcpStream::connect(self.listener.local_addr()?)?;
        let (receiver, _) = self.listener.accept()?;
        Ok((
            Box::new(zerovsock_linux::TcpZerocopyStream::from(sender)),
            Box::new(zerovsock_linux::TcpZerocopyStream::from(receiver)),
        ))
    }

    fn refuses(&self, mode: Mode) -> Option<&'static str> {
        (mode == Mode::UringZc).then_some("io_uring SEND_ZC is measured on vsock only")
    }
}
