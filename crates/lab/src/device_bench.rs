//! `device-bench`: the device bench with a real guest. One Linux 6.12 guest per backend
//! (QEMU `vhost-user-vsock-pci`, TCG) moves data through the backend's hybrid Unix endpoints,
//! guest to host and host to guest, at 4 KiB, 64 KiB and 1 MiB writes, with the kernel's
//! AF_VSOCK in the guest (the `device_guest` example). The backends run as child processes
//! with the same flags: `zerovsock vhost` and, when installed, vhost-device-vsock 0.3.0 at its
//! defaults and with the same buffer size as ours. Every transfer is checked by length and
//! hash; a transfer that stalls is reported as stalled (vhost-device-vsock 0.3.0 drops a Linux
//! guest's non-linear packets, which Linux sends for writes over 32 KiB). Both ends read a
//! known length instead of waiting for end of file, since vhost-device-vsock 0.3.0 does not
//! pass a half-close (`shutdown(SHUT_WR)`) on in either direction.
//!
//! Under TCG the guest's vCPU is the bottleneck: the table shows it with its busy share.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use zerovsock_testkit::measure::cpu_time;
use zerovsock_testkit::suite::{djb2, pattern};

use crate::device::{accept_within, field};
use zerovsock_lab::{build_host_binary, build_static_example, workspace_root, Guest, Lab};

/// Bytes per transfer.
const TOTAL: usize = 32 << 20;
/// A transfer that moves nothing for this long has stalled.
const STALL: Duration = Duration::from_secs(20);
/// How long the guest gives one transfer (busybox `timeout`).
const GUEST_LIMIT: u32 = 40;
const WRITES: [usize; 3] = [4096, 65536, 1 << 20];
/// The buffer size (`buf_alloc`) zerovsock's device advertises by default, Linux's default.
const OUR_BUFFER: u32 = 256 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    GuestToHost,
    HostToGuest,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::GuestToHost => "guest to host",
            Direction::HostToGuest => "host to guest",
        }
    }
}

/// One backend: a program and its extra flags, before the common ones.
struct Backend {
    name: String,
    program: PathBuf,
    args: Vec<String>,
}

/// One transfer as measured.
#[derive(Clone, Copy)]
struct Cell {
    /// MiB/s in the guest, or `None` if it stalled or failed.
    mib_s: Option<f64>,
    /// Backend CPU seconds per GiB moved.
    cpu_per_gib: f64,
    /// The guest's busy share during the transfer.
    guest_busy: f64,
}

pub fn run(guest: &Guest) -> Result<()> {
    let guest_bin = build_static_example("zerovsock-linux", "device_guest")?;
    let ours = build_host_binary("zerovsock-cli", "zerovsock")?;
    let mut backends =
        vec![Backend { name: "zerovsock".into(), program: ours, args: vec!["vhost".into()] }];
    match peer()? {
        Some(peer) => {
            backends.push(Backend {
                name: "vhost-device-vsock".into(),
                program: peer.clone(),
                args: Vec::new(),
            });
            backends.push(Backend {
                name: format!("vhost-device-vsock --tx-buffer-size {}K", OUR_BUFFER / 1024),
                program: peer,
                args: vec!["--tx-buffer-size".into(), OUR_BUFFER.to_string()],
            });
        }
        None => println!(
            "device-bench: vhost-device-vsock is not installed (scripts/install-vhost-device-vsock, \
             or VHOST_DEVICE_VSOCK): only zerovsock is measured"
        ),
    }
    let lab = Lab::prepare()?;
    let mut results = Vec::new();
    for backend in &backends {
        println!("device-bench: {} ...", backend.name);
        results.push(run_backend(&lab, guest, &guest_bin, backend)?);
    }
    print_table(&backends, &results);
    Ok(())
}

/// vhost-device-vsock 0.3.0 as `scripts/install-vhost-device-vsock` installs it, or as
/// `VHOST_DEVICE_VSOCK` names it.
fn peer() -> Result<Option<PathBuf>> {
    if let Some(path) = std::env::var_os("VHOST_DEVICE_VSOCK") {
        return Ok(Some(PathBuf::from(path)));
    }
    let installed = workspace_root()?.join("target/peers/bin/vhost-device-vsock");
    Ok(installed.exists().then_some(installed))
}

fn spawn(backend: &Backend, socket: &Path, uds: &Path) -> Result<Child> {
    let child = Command::new(&backend.program)
        .args(&backend.args)
        .args(["--guest-cid", "3", "--socket"])
        .arg(socket)
        .arg("--uds-path")
        .arg(uds)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", backend.name))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("{} made no socket at {}", backend.name, socket.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

const fn g2h_port(i: usize) -> u32 {
    5001 + i as u32
}

const fn h2g_port(i: usize) -> u32 {
    4001 + i as u32
}

fn run_backend(lab: &Lab, guest: &Guest, guest_bin: &Path, backend: &Backend) -> Result<Vec<Cell>> {
    let dir = lab.workdir()?;
    let socket = dir.join("vhost.sock");
    let uds = dir.join("vm.vsock");
    let mut child = spawn(backend, &socket, &uds)?;
    let pid = child.id();
    let listeners = (0..WRITES.len())
        .map(|i| UnixListener::bind(format!("{}_{}", uds.display(), g2h_port(i))))
        .collect::<std::io::Result<Vec<_>>>()?;
    let host_uds = uds.clone();
    // One host thread, in the guest's order, so each transfer's CPU time is its own.
    let host = thread::spawn(move || {
        let mut cpu = Vec::new();
        for (i, listener) in listeners.iter().enumerate() {
            cpu.push(host_reads(listener, g2h_port(i), pid));
        }
        for (i, &write) in WRITES.iter().enumerate() {
            cpu.push(host_writes(&host_uds, h2g_port(i), write, pid));
        }
        cpu
    });
    let mut script = String::new();
    for (i, write) in WRITES.iter().enumerate() {
        let port = g2h_port(i);
        script.push_str(&format!(
            "timeout {GUEST_LIMIT} /bin/device_guest send {port} {TOTAL} {write} || echo \"send port={port} stalled\"\n"
        ));
    }
    for i in 0..WRITES.len() {
        let port = h2g_port(i);
        script.push_str(&format!(
            "timeout {GUEST_LIMIT} /bin/device_guest recv {port} {TOTAL} || echo \"recv port={port} stalled\"\n"
        ));
    }
    let guest = Guest { vhost_user_vsock: Some(socket.clone()), ..guest.clone() };
    let outcome = lab.run(&[guest_bin.to_path_buf()], &script, &guest);
    let _ = child.kill();
    let _ = child.wait();
    let outcome = outcome?;
    let host = host.join().map_err(|_| anyhow::anyhow!("host thread panicked"))?;
    let mut cells = Vec::new();
    for (i, result) in host.into_iter().enumerate() {
        let (kind, port, expected) = if i < WRITES.len() {
            ("send", g2h_port(i), djb2(&pattern(TOTAL, u64::from(g2h_port(i)))))
        } else {
            let j = i - WRITES.len();
            ("recv", h2g_port(j), djb2(&pattern(TOTAL, u64::from(h2g_port(j)))))
        };
        let secs: Option<f64> =
            field(&outcome.output, kind, port, "secs").and_then(|s| s.parse().ok());
        let guest_busy: f64 =
            field(&outcome.output, kind, port, "cpu").and_then(|s| s.parse().ok()).unwrap_or(0.0);
        let guest_hash = field(&outcome.output, kind, port, "hash");
        let verified = match &result {
            Ok(host) => {
                let host_ok = kind == "recv" || host.hash == Some(expected);
                host_ok && guest_hash == Some(format!("{expected:016x}"))
            }
            Err(_) => false,
        };
        let cpu = result.as_ref().map(|h| h.cpu).unwrap_or_default();
        let mib_s =
            secs.filter(|_| verified).map(|s| TOTAL as f64 / (1 << 20) as f64 / s.max(1e-9));
        if mib_s.is_none() {
            let why = match &result {
                Err(e) => format!("{e:#}"),
                Ok(_) if secs.is_none() => "the guest reported no result (stalled)".into(),
                Ok(_) => "the bytes did not match".into(),
            };
            println!("device-bench: {}: {kind} port {port}: {why}", backend.name);
        }
        cells.push(Cell {
            mib_s,
            cpu_per_gib: cpu.as_secs_f64() / (TOTAL as f64 / (1u64 << 30) as f64),
            guest_busy,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(cells)
}

/// What the host side of one transfer saw.
struct HostSide {
    cpu: Duration,
    hash: Option<u64>,
}

/// Guest to host: accept the guest's connect on `<uds>_<port>`, read `TOTAL` bytes, answer.
fn host_reads(listener: &UnixListener, port: u32, pid: u32) -> Result<HostSide> {
    let (mut stream, _) = accept_within(listener, Duration::from_secs(300))
        .with_context(|| format!("port {port}: no guest connect"))?;
    stream.set_read_timeout(Some(STALL))?;
    let before = cpu_time(pid);
    let mut got = vec![0u8; TOTAL];
    let mut len = 0;
    while len < TOTAL {
        match stream.read(&mut got[len..]) {
            Ok(0) => bail!("port {port}: {len} of {TOTAL} bytes arrived"),
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context(format!("port {port}: stalled after {len} bytes")),
        }
    }
    let cpu = cpu_time(pid).saturating_sub(before);
    stream.write_all(b"ok")?;
    Ok(HostSide { cpu, hash: Some(djb2(&got)) })
}

/// Host to guest: `CONNECT <port>` (retried until the guest listens), write, wait for `ok`.
fn host_writes(uds: &Path, port: u32, write: usize, pid: u32) -> Result<HostSide> {
    let data = pattern(TOTAL, u64::from(port));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut stream = UnixStream::connect(uds)?;
        stream.set_read_timeout(Some(STALL))?;
        stream.set_write_timeout(Some(STALL))?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        if !line.starts_with("OK ") {
            if Instant::now() > deadline {
                bail!("guest port {port} never accepted");
            }
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        let before = cpu_time(pid);
        for chunk in data.chunks(write) {
            stream.write_all(chunk).with_context(|| format!("port {port}: stalled"))?;
        }
        let mut reply = [0u8; 2];
        reader.read_exact(&mut reply).with_context(|| format!("port {port}: no answer"))?;
        let cpu = cpu_time(pid).saturating_sub(before);
        if &reply != b"ok" {
            bail!("guest port {port} answered {reply:?}");
        }
        return Ok(HostSide { cpu, hash: None });
    }
}

fn print_table(backends: &[Backend], results: &[Vec<Cell>]) {
    println!();
    println!(
        "VM lab: Linux 6.12 guest (1 vCPU, QEMU TCG), kernel AF_VSOCK, {} MiB per transfer through \
         the backend's Unix endpoints; MiB/s in the guest (backend CPU s/GiB, guest CPU busy)",
        TOTAL >> 20
    );
    let mut header = format!("{:<14} {:>6}", "direction", "write");
    for backend in backends {
        header.push_str(&format!(" | {:>36}", backend.name));
    }
    println!("{header}");
    for (d, direction) in [Direction::GuestToHost, Direction::HostToGuest].into_iter().enumerate() {
        for (w, write) in WRITES.iter().enumerate() {
            let index = d * WRITES.len() + w;
            let mut line = format!("{:<14} {:>5}K", direction.name(), write / 1024);
            let ours = results[0][index].mib_s;
            for (b, cells) in results.iter().enumerate() {
                let cell = cells[index];
                let text = match cell.mib_s {
                    Some(mib) => {
                        let ratio = match (b, ours) {
                            (0, _) | (_, None) => String::new(),
                            (_, Some(ours)) => format!(" x{:.2}", ours / mib),
                        };
                        format!(
                            "{mib:7.1} ({:.2} s/GiB, {:3.0}%){ratio}",
                            cell.cpu_per_gib,
                            cell.guest_busy * 100.0
                        )
                    }
                    None => "stalled".into(),
                };
                line.push_str(&format!(" | {text:>36}"));
            }
            println!("{line}");
        }
    }
    println!("(xN: zerovsock's throughput over that backend's, same run)");
}
