//! `device-tests`: a real Linux 6.12 guest (QEMU `vhost-user-vsock-pci`, guest memory a shared
//! memfd) against the project's vhost-user-vsock device, run in this process. The guest runs the
//! kernel's AF_VSOCK through `zerovsock-linux` (the `device_guest` example); the host side uses
//! the device's Unix endpoints and its socket API. Every transfer is checked by length and hash
//! on both sides.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::VsockListener;
use zerovsock_testkit::suite::{djb2, pattern};
use zerovsock_vhost::{Device, DeviceConfig};

use zerovsock_lab::{build_static_example, Guest, Lab};

/// Bytes per transfer.
const TOTAL: usize = 4 << 20;
/// The host listens this long for the guest.
const PATIENCE: Duration = Duration::from_secs(300);

/// One guest-to-host transfer: the host port, the guest's write size, MSG_ZEROCOPY, and
/// whether the host end is the device's socket API instead of a Unix endpoint.
struct Send {
    port: u32,
    write: usize,
    zerocopy: bool,
    native: bool,
}

const SENDS: [Send; 5] = [
    Send { port: 5001, write: 4096, zerocopy: false, native: false },
    Send { port: 5002, write: 65536, zerocopy: false, native: false },
    Send { port: 5003, write: 1 << 20, zerocopy: false, native: false },
    Send { port: 5004, write: 65536, zerocopy: true, native: false },
    Send { port: 6000, write: 65536, zerocopy: false, native: true },
];
const REFUSED_PORT: u32 = 5999;
/// ECONNRESET on Linux, as the guest prints it.
const ECONNRESET: i32 = 104;
const H2G_PORTS: [(u32, usize); 3] = [(4001, 4096), (4002, 65536), (4003, 1 << 20)];

/// What a host end read: bytes and their hash.
type Seen = JoinHandle<Result<(usize, u64)>>;

pub fn run(guest: &Guest) -> Result<()> {
    let guest_bin = build_static_example("zerovsock-linux", "device_guest")?;
    let lab = Lab::prepare()?;
    let dir = lab.workdir()?;
    let uds = dir.join("vm.vsock");
    let socket = dir.join("vhost.sock");
    let mut config = DeviceConfig::new(3);
    config.uds_path = Some(uds.clone());
    let device = Arc::new(Device::new(config).context("starting the device")?);
    let serving = device.clone();
    let vhost_socket = socket.clone();
    thread::Builder::new().name("device".into()).spawn(move || serving.serve(&vhost_socket))?;

    let mut seen: Vec<(u32, Seen)> = Vec::new();
    for send in &SENDS {
        let handle = if send.native {
            let listener =
                VsockListener::bind(device.vsock(), Addr::new(Cid::ANY, Port(send.port)))?;
            thread::spawn(move || -> Result<(usize, u64)> {
                let (mut stream, peer) = listener.accept()?;
                if peer.cid != Cid(3) {
                    bail!("native accept from {peer:?}");
                }
                read_and_answer(&mut stream)
            })
        } else {
            let listener = UnixListener::bind(format!("{}_{}", uds.display(), send.port))?;
            thread::spawn(move || -> Result<(usize, u64)> {
                let (mut stream, _) = accept_within(&listener, PATIENCE)?;
                read_and_answer(&mut stream)
            })
        };
        seen.push((send.port, handle));
    }
    let writers: Vec<(u32, JoinHandle<Result<()>>)> = H2G_PORTS
        .iter()
        .map(|&(port, write)| {
            let uds = uds.clone();
            (port, thread::spawn(move || host_to_guest(&uds, port, write)))
        })
        .collect();

    let mut script = String::from("set -e\n");
    script.push_str(&format!("/bin/device_guest refused {REFUSED_PORT}\n"));
    for send in &SENDS {
        let zerocopy = if send.zerocopy { " zerocopy" } else { "" };
        script.push_str(&format!(
            "/bin/device_guest send {} {TOTAL} {}{zerocopy}\n",
            send.port, send.write
        ));
    }
    for (port, _) in H2G_PORTS {
        script.push_str(&format!("/bin/device_guest recv {port}\n"));
    }
    let guest = Guest { vhost_user_vsock: Some(socket.clone()), ..guest.clone() };
    let started = Instant::now();
    let outcome = lab.run(&[guest_bin], &script, &guest)?;
    print!("{}", outcome.output);
    if outcome.exit != 0 {
        bail!("the guest's side failed (exit {}):\n{}", outcome.exit, outcome.console);
    }
    check(&outcome.output, seen, writers)?;
    println!(
        "device-tests: all transfers verified; boot {:.1?}, total {:.1?}; device stats {:?}",
        outcome.boot_time,
        started.elapsed(),
        device.stats()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

pub(crate) fn accept_within(
    listener: &UnixListener,
    patience: Duration,
) -> Result<(UnixStream, std::os::unix::net::SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + patience;
    loop {
        match listener.accept() {
            Ok((stream, addr)) => {
                stream.set_nonblocking(false)?;
                return Ok((stream, addr));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("waiting for the guest's connect"),
        }
    }
}

fn read_and_answer(stream: &mut (impl Read + Write)) -> Result<(usize, u64)> {
    let mut got = Vec::with_capacity(TOTAL);
    stream.read_to_end(&mut got)?;
    stream.write_all(b"ok")?;
    Ok((got.len(), djb2(&got)))
}

/// Connects to a guest port through `CONNECT`, retrying while the guest is not listening yet
/// (the device then closes the Unix socket), and writes `pattern(TOTAL, port)`.
fn host_to_guest(uds: &Path, port: u32, write: usize) -> Result<()> {
    let deadline = Instant::now() + PATIENCE;
    let data = pattern(TOTAL, u64::from(port));
    loop {
        let mut stream = UnixStream::connect(uds)?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.is_empty() {
            if Instant::now() > deadline {
                bail!("guest port {port} never accepted");
            }
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        if !line.starts_with("OK ") {
            bail!("CONNECT {port} answered {line:?}");
        }
        for chunk in data.chunks(write) {
            stream.write_all(chunk)?;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut reply = Vec::new();
        reader.read_to_end(&mut reply)?;
        if reply != b"ok" {
            bail!("guest port {port} answered {reply:?}");
        }
        return Ok(());
    }
}

/// A `key=value` field of the guest's result line for `kind port=PORT`.
pub(crate) fn field(output: &str, kind: &str, port: u32, key: &str) -> Option<String> {
    let prefix = format!("{kind} port={port} ");
    let line =
        output.lines().find(|l| l.starts_with(&prefix) && l.contains(&format!(" {key}=")))?;
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

fn check(
    output: &str,
    seen: Vec<(u32, Seen)>,
    writers: Vec<(u32, JoinHandle<Result<()>>)>,
) -> Result<()> {
    let errno = field(output, "refused", REFUSED_PORT, "errno").context("no refused line")?;
    if errno != ECONNRESET.to_string() {
        bail!("a connect to a port nobody listens on failed with errno {errno}, not ECONNRESET");
    }
    let secs: f64 =
        field(output, "refused", REFUSED_PORT, "secs").and_then(|s| s.parse().ok()).unwrap_or(99.0);
    if secs > 1.0 {
        bail!("the refused connect took {secs} s: it must be refused at once, not time out");
    }
    println!("device-tests: guest connect to a port nobody listens on: ECONNRESET in {secs:.3} s");
    for (port, handle) in seen {
        let (len, hash) = handle.join().map_err(|_| anyhow::anyhow!("host thread panicked"))??;
        let expected = djb2(&pattern(TOTAL, u64::from(port)));
        let guest_hash = field(output, "send", port, "hash").context("no send line")?;
        if len != TOTAL || hash != expected || guest_hash != format!("{expected:016x}") {
            bail!("port {port}: host read {len} bytes hash {hash:016x}; guest sent hash {guest_hash}; expected {TOTAL} bytes hash {expected:016x}");
        }
        let secs: f64 =
            field(output, "send", port, "secs").and_then(|s| s.parse().ok()).unwrap_or(0.0);
        let write = field(output, "send", port, "write").unwrap_or_default();
        let mut note = format!(
            "device-tests: guest to host, port {port}, {write}-byte writes: {TOTAL} bytes verified, {:.1} MiB/s in the guest",
            TOTAL as f64 / (1 << 20) as f64 / secs.max(1e-9)
        );
        if let Some(ids) = field(output, "send", port, "ids") {
            let drained = field(output, "send", port, "drained").unwrap_or_default();
            let pinned = field(output, "send", port, "pinned").unwrap_or_default();
            let highest = field(output, "send", port, "highest").unwrap_or_default();
            let last: u32 = ids.parse().unwrap_or(0);
            if drained != "true"
                || pinned != "0"
                || highest != format!("Some({})", last.saturating_sub(1))
            {
                bail!("port {port}: zerocopy completions incomplete: ids {ids}, drained {drained}, pinned {pinned}, highest {highest}");
            }
            note.push_str(&format!(", MSG_ZEROCOPY: all {ids} ids completed"));
        }
        println!("{note}");
    }
    for (port, handle) in writers {
        handle.join().map_err(|_| anyhow::anyhow!("host thread panicked"))??;
        let expected = format!("{:016x}", djb2(&pattern(TOTAL, u64::from(port))));
        let bytes = field(output, "recv", port, "bytes").unwrap_or_default();
        let hash = field(output, "recv", port, "hash").unwrap_or_default();
        if bytes != TOTAL.to_string() || hash != expected {
            bail!("guest port {port} read {bytes} bytes hash {hash}; expected {TOTAL} hash {expected}");
        }
        println!("device-tests: host to guest, port {port}: {TOTAL} bytes verified");
    }
    Ok(())
}
