//! Device throughput beside the peer, measured by one driver in one run.
//!
//! The userspace guest (`zerovsock_testkit::guest`) drives each backend through its real
//! vhost-user socket: this project's device (run in a child process, so that its CPU time is
//! its own) and vhost-device-vsock 0.3.0 (installed by `scripts/install-vhost-device-vsock`),
//! both through their Unix endpoints. Guest to host and host to guest, at 4 KiB, 64 KiB and
//! 1 MiB writes; the host CPU time of each backend process per GiB moved; and an AF_UNIX
//! socketpair for scale (the ceiling of any Unix endpoint). Each cell is the median of five
//! runs, the backends' runs interleaved. The guest uses the classic TX layout (header, then
//! one payload descriptor), the only multi-descriptor layout vhost-device-vsock accepts, for
//! both devices.
//!
//! `cargo bench -p zerovsock-vhost --bench device` (or `scripts/bench-device`, which installs
//! the peer first). `VHOST_DEVICE_VSOCK` names the peer's binary; without it the peer columns
//! are left out, loudly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{VsockListener, VsockStream};
use zerovsock_testkit::guest::{GuestDriver, TxLayout};
use zerovsock_testkit::measure::cpu_time;
use zerovsock_vhost::{Device, DeviceConfig};

const SERVE_ENV: &str = "ZEROVSOCK_BENCH_SERVE";
const RUNS: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    GuestToHost,
    HostToGuest,
}

#[derive(Clone, Debug)]
enum Backend {
    Zerovsock,
    Peer { binary: PathBuf, tx_buffer_size: Option<u32> },
}

impl Backend {
    fn name(&self) -> String {
        match self {
            Backend::Zerovsock => "zerovsock".into(),
            Backend::Peer { tx_buffer_size: None, .. } => "vhost-device-vsock".into(),
            Backend::Peer { tx_buffer_size: Some(size), .. } => {
                format!("vhost-device-vsock --tx-buffer-size {}K", size / 1024)
            }
        }
    }

    fn spawn(&self, socket: &Path, uds: &Path) -> Child {
        let mut command = match self {
            Backend::Zerovsock => {
                let mut command = Command::new(std::env::current_exe().expect("bench binary"));
                command.env(SERVE_ENV, "1");
                command
            }
            Backend::Peer { binary, tx_buffer_size } => {
                let mut command = Command::new(binary);
                if let Some(size) = tx_buffer_size {
                    command.args(["--tx-buffer-size", &size.to_string()]);
                }
                command
            }
        };
        command
            .args(["--guest-cid", "3", "--socket"])
            .arg(socket)
            .arg("--uds-path")
            .arg(uds)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting a backend")
    }
}

/// The device in this (child) process, with vhost-device-vsock's flags.
fn serve() -> ! {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| -> String {
        let at = args.iter().position(|a| a == flag).expect(flag);
        args[at + 1].clone()
    };
    let mut config = DeviceConfig::new(value("--guest-cid").parse().expect("cid"));
    config.uds_path = Some(PathBuf::from(value("--uds-path")));
    let device = Device::new(config).expect("device");
    let _ = device.serve(Path::new(&value("--socket")));
    std::process::exit(1);
}

struct Cell {
    gbit: f64,
    cpu_per_gib: f64,
}

/// A run that moved nothing for this long has stalled (the peer is known to hang).
const STALL: Duration = Duration::from_secs(30);

fn bytes_for(write: usize) -> usize {
    if write < 65536 {
        64 << 20
    } else {
        256 << 20
    }
}

/// One transfer; `None` if it stalled (the backend is killed and the guest abandoned).
fn run_once(
    backend: &Backend,
    direction: Direction,
    write: usize,
    dir: &Path,
    run: usize,
) -> Option<Cell> {
    let socket = dir.join(format!("vhost-{run}.sock"));
    let uds = dir.join(format!("vm-{run}.vsock"));
    let mut child = backend.spawn(&socket, &uds);
    let guest = GuestDriver::connect(&socket, TxLayout::HeaderAndData).expect("guest driver");
    let total = bytes_for(write);
    let cpu_before = cpu_time(child.id());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let transfer = thread::spawn(move || {
        let elapsed = transfer(&guest, direction, &uds, write, total);
        let _ = done_tx.send(elapsed);
        guest
    });
    let Ok(elapsed) = done_rx.recv_timeout(STALL) else {
        eprintln!(
            "device bench: {} {direction:?} {write}: run {run} failed or stalled",
            backend.name()
        );
        let _ = child.kill();
        let _ = child.wait();
        drop(transfer); // its threads wait on a dead backend; leave them
        return None;
    };
    let cpu = cpu_time(child.id()).saturating_sub(cpu_before);
    drop(transfer.join().expect("transfer thread"));
    let _ = child.kill();
    let _ = child.wait();
    let gib = total as f64 / (1u64 << 30) as f64;
    Some(Cell {
        gbit: total as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        cpu_per_gib: cpu.as_secs_f64() / gib,
    })
}

fn transfer(
    guest: &GuestDriver,
    direction: Direction,
    uds: &Path,
    write: usize,
    total: usize,
) -> Duration {
    let buffer = vec![0x5au8; write];
    match direction {
        Direction::GuestToHost => {
            let listener =
                UnixListener::bind(format!("{}_5000", uds.display())).expect("host listener");
            let reader = thread::spawn(move || {
                let (mut stream, _) = listener.accept().expect("accept");
                drain(&mut stream, total)
            });
            let mut stream = VsockStream::connect(guest.vsock(), Addr::new(Cid::HOST, Port(5000)))
                .expect("guest connect");
            let started = Instant::now();
            send(&mut stream, &buffer, total);
            let done = reader.join().expect("reader");
            done.duration_since(started)
        }
        Direction::HostToGuest => {
            let listener = VsockListener::bind(guest.vsock(), Addr::new(Cid::ANY, Port(4000)))
                .expect("guest listener");
            let reader = thread::spawn(move || {
                let (mut stream, _) = listener.accept().expect("guest accept");
                drain(&mut stream, total)
            });
            let mut stream = connect_host(uds, 4000);
            let started = Instant::now();
            send(&mut stream, &buffer, total);
            let done = reader.join().expect("reader");
            done.duration_since(started)
        }
    }
}

fn send(stream: &mut impl Write, buffer: &[u8], total: usize) {
    let mut sent = 0;
    while sent < total {
        let n = buffer.len().min(total - sent);
        stream.write_all(&buffer[..n]).expect("write");
        sent += n;
    }
}

/// Reads `total` bytes; returns when the last arrived.
fn drain(stream: &mut impl Read, total: usize) -> Instant {
    let mut buffer = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < total {
        let n = stream.read(&mut buffer).expect("read");
        assert!(n > 0, "stream ended after {got} of {total} bytes");
        got += n;
    }
    Instant::now()
}

fn connect_host(uds: &Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = UnixStream::connect(uds).expect("host connect");
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).expect("connect line");
        let mut line = String::new();
        // One byte at a time: nothing past the line may be taken from the stream.
        let mut reader = BufReader::with_capacity(1, stream.try_clone().expect("clone"));
        // A guest not listening yet: the peer closes or resets the Unix socket; try again.
        if reader.read_line(&mut line).is_ok() && line.starts_with("OK") {
            return stream;
        }
        assert!(Instant::now() < deadline, "CONNECT {port} answered {line:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The median run; a stalled run counts as the slowest. `None` if most runs stalled.
fn median(cells: Vec<Option<Cell>>) -> Option<Cell> {
    let stalled = cells.iter().filter(|c| c.is_none()).count();
    let mut done: Vec<Cell> = cells.into_iter().flatten().collect();
    if stalled * 2 > RUNS || done.is_empty() {
        return None;
    }
    done.sort_by(|a, b| a.gbit.total_cmp(&b.gbit));
    // Stalled runs sit below every finished one.
    let index = (RUNS / 2).saturating_sub(stalled).min(done.len() - 1);
    Some(done.swap_remove(index))
}

/// An AF_UNIX socketpair at the same write size, for scale.
fn socketpair(write: usize) -> f64 {
    let total = bytes_for(write);
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let (mut a, mut b) = UnixStream::pair().expect("socketpair");
        let reader = thread::spawn(move || drain(&mut b, total));
        let buffer = vec![0x5au8; write];
        let started = Instant::now();
        send(&mut a, &buffer, total);
        let done = reader.join().expect("reader");
        runs.push(total as f64 * 8.0 / done.duration_since(started).as_secs_f64() / 1e9);
    }
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    if std::env::var_os(SERVE_ENV).is_some() {
        serve();
    }
    let dir = std::env::temp_dir().join(format!("zerovsock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut backends = vec![Backend::Zerovsock];
    match std::env::var_os("VHOST_DEVICE_VSOCK").map(PathBuf::from) {
        Some(binary) if binary.exists() => {
            backends.push(Backend::Peer { binary: binary.clone(), tx_buffer_size: None });
            backends.push(Backend::Peer { binary, tx_buffer_size: Some(256 * 1024) });
        }
        _ => eprintln!(
            "device bench: VHOST_DEVICE_VSOCK is not set to an installed vhost-device-vsock 0.3.0: \
             the peer columns are left out (scripts/bench-device installs it)"
        ),
    }
    println!(
        "device throughput, Gbit/s (median of {RUNS}); host CPU of the backend process, s/GiB"
    );
    let mut run = 0;
    // BENCH_FILTER=g2h|h2g and BENCH_WRITES=4096,65536 narrow the table while iterating.
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let writes: Vec<usize> = std::env::var("BENCH_WRITES")
        .ok()
        .map(|w| w.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![4096, 65536, 1 << 20]);
    for direction in [Direction::GuestToHost, Direction::HostToGuest] {
        let tag = if direction == Direction::GuestToHost { "g2h" } else { "h2g" };
        if !filter.is_empty() && filter != tag {
            continue;
        }
        for &write in &writes {
            let unix = socketpair(write);
            let mut first = None;
            // Runs interleave the backends, so a change in the machine's state between them
            // (this VM's speed drifts) falls on all of them alike.
            let mut runs: Vec<Vec<Option<Cell>>> = backends.iter().map(|_| Vec::new()).collect();
            for _ in 0..RUNS {
                for (backend, cells) in backends.iter().zip(&mut runs) {
                    run += 1;
                    cells.push(run_once(backend, direction, write, &dir, run));
                }
            }
            for (backend, cells) in backends.iter().zip(runs) {
                let Some(cell) = median(cells) else {
                    println!(
                        "{:<14} {:>6}K {:>40}: STALLED (no progress in {STALL:?}) {:>9.1}",
                        format!("{direction:?}"),
                        write / 1024,
                        backend.name(),
                        unix
                    );
                    continue;
                };
                let ratio = first
                    .map(|zerovsock: f64| format!("  zerovsock x{:.2}", zerovsock / cell.gbit))
                    .unwrap_or_default();
                first.get_or_insert(cell.gbit);
                println!(
                    "{:<14} {:>6}K {:>40}: {:>6.2} Gbit/s, {:.3} CPU s/GiB{ratio}   AF_UNIX {:.1}",
                    format!("{direction:?}"),
                    write / 1024,
                    backend.name(),
                    cell.gbit,
                    cell.cpu_per_gib,
                    unix
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
