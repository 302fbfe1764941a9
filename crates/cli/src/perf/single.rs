//! One side of a vsock_perf pair: the kernel tool's flags, defaults and printed lines, so that
//! the other side may be `vsock_perf` itself. Lines past vsock_perf's (zerocopy completions,
//! verification) come after its own, so a script that reads vsock_perf's output reads ours.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::VsockSocket;
use zerovsock_vhost::{Device, DeviceConfig};

use super::conn::{Conn, KernelConn};
use super::link::{ensure_lab_guest, hybrid_connect, hybrid_listen_path, retrying};
use super::pattern::Pattern;
use super::throughput::{self, Received, Sent};
use super::units::human;
use super::{check_buffer, Mode, PerfArgs, Transport};

/// vsock_perf's defaults.
const DEFAULT_BYTES: u64 = 64 << 10;
const DEFAULT_BUF_SIZE: u64 = 128 << 10;
const DEFAULT_VSK_SIZE: u64 = 256 << 10;

#[derive(Serialize)]
struct SenderReport {
    role: &'static str,
    transport: Transport,
    mode: Mode,
    peer_cid: u32,
    port: u32,
    bytes: u64,
    buf_size: u64,
    tx_gbps: f64,
    tx_loop_secs: f64,
    in_send_secs: f64,
    sends: u64,
    zerocopy_passes: u64,
    copied_passes: u64,
}

#[derive(Serialize)]
struct ReceiverReport {
    role: &'static str,
    transport: Transport,
    port: u32,
    bytes: u64,
    buf_size: u64,
    vsk_size: u64,
    rcvlowat: u32,
    rx_gbps: f64,
    in_read_secs: f64,
    average_read_ns: f64,
    pollin_wakeups: u64,
    verified: bool,
}

pub fn run(args: &PerfArgs) -> Result<()> {
    let transport = args.transport.unwrap_or(Transport::Kernel);
    check(args, transport)?;
    let buf_size = args.buf_size.unwrap_or(DEFAULT_BUF_SIZE);
    let vsk_size = args.vsk_size.unwrap_or(DEFAULT_VSK_SIZE);
    if args.receiver && transport != Transport::Unix {
        check_buffer(vsk_size, args.rcvlowat, buf_size)?;
    }
    // The device must outlive the connection; it serves QEMU on its own thread.
    let device = match transport {
        Transport::Device => Some(serve_device(args)?),
        _ => None,
    };
    match args.sender {
        Some(cid) => sender(args, transport, device.as_deref(), cid, buf_size),
        None => receiver(args, transport, device.as_deref(), buf_size, vsk_size),
    }
}

fn check(args: &PerfArgs, transport: Transport) -> Result<()> {
    let both_only = [
        (!args.sizes.is_empty(), "--sizes"),
        (args.sweep, "--sweep"),
        (args.baseline, "--baseline"),
        (args.latency, "--latency"),
        (args.plot.is_some(), "--plot"),
        (!args.direction.is_empty(), "--direction"),
        (args.copy, "--copy"),
    ];
    if let Some((_, flag)) = both_only.iter().find(|(set, _)| *set) {
        bail!("{flag} needs both sides in this process: drop --sender/--receiver");
    }
    if args.uring && args.zerocopy {
        bail!("--uring and --zerocopy are two ways to send: pick one");
    }
    if args.uring && transport != Transport::Kernel {
        bail!("--uring sends through io_uring on kernel sockets: it needs --transport kernel");
    }
    match transport {
        Transport::Loopback => bail!(
            "the loopback transport lives inside one process: run without --sender/--receiver"
        ),
        Transport::Kernel => ensure_lab_guest()?,
        Transport::Device if args.vhost_socket.is_none() => {
            bail!("--transport device with --sender/--receiver serves a guest: name the socket QEMU connects to with --vhost-socket")
        }
        Transport::Unix if args.uds_path.is_none() => {
            bail!("--transport unix with --sender/--receiver needs the backend's hybrid endpoint: --uds-path")
        }
        _ => {}
    }
    if transport == Transport::Unix && args.zerocopy && args.sender.is_some() {
        bail!("a hybrid Unix endpoint is an AF_UNIX socket, which has no MSG_ZEROCOPY");
    }
    // vsock_perf sets these on its vsock socket; this end is an AF_UNIX one. (The receiver
    // still prints vsock_perf's lines for them, with the defaults, so scripts read it alike.)
    if transport == Transport::Unix && (args.vsk_size.is_some() || args.rcvlowat != 1) {
        bail!(
            "--vsk-size and --rcvlowat are vsock socket options, and the unix transport's end is \
             an AF_UNIX socket"
        );
    }
    Ok(())
}

/// This project's device for one QEMU guest, serving `--vhost-socket` on a thread.
fn serve_device(args: &PerfArgs) -> Result<Arc<Device>> {
    let socket = args.vhost_socket.clone().context("--vhost-socket")?;
    let device = Arc::new(Device::new(DeviceConfig::new(args.guest_cid))?);
    let serving = device.clone();
    let (failed, failure) = std::sync::mpsc::channel();
    thread::Builder::new().name("perf-device".into()).spawn(move || {
        // `serve` returns only when it cannot listen on the socket at all.
        if let Err(e) = serving.serve(&socket) {
            let _ = failed.send(e);
        }
    })?;
    // Binding the socket is the first thing `serve` does: a path that cannot be bound fails
    // well within this, and the run stops with its error instead of waiting for a guest.
    match failure.recv_timeout(Duration::from_millis(500)) {
        Ok(error) => Err(error).context("serving the device"),
        Err(_) => Ok(device),
    }
}

fn sender(
    args: &PerfArgs,
    transport: Transport,
    device: Option<&Device>,
    cid: u32,
    buf_size: u64,
) -> Result<()> {
    let bytes = args.bytes.unwrap_or(DEFAULT_BYTES);
    let mode = match (args.zerocopy, args.uring) {
        (true, _) => Mode::Zerocopy,
        (_, true) => Mode::UringZc,
        _ => Mode::Copy,
    };
    let addr = Addr::new(Cid(cid), Port(args.port));
    if !args.json {
        match mode {
            Mode::Zerocopy => println!("Run as sender MSG_ZEROCOPY"),
            Mode::UringZc => println!("Run as sender io_uring SEND_ZC"),
            Mode::Copy => println!("Run as sender"),
        }
        println!("Connect to {cid}:{}", args.port);
        println!("Send {bytes} bytes");
        println!("TX buffer {buf_size} bytes");
    }
    let unreachable =
        || format!("connecting to {cid}:{} over the {transport:?} transport", args.port);
    let mut conn: Box<dyn Conn> = match transport {
        Transport::Kernel => Box::new(KernelConn::new(
            retrying(Duration::from_secs(args.wait), || {
                let socket = zerovsock_linux::VsockSocket::stream()?;
                if let Some(size) = args.vsk_size {
                    socket.set_buffer_size_unclamped(size)?;
                }
                Ok(socket.connect(addr)?)
            })
            .with_context(unreachable)?,
        )),
        Transport::Device => {
            let device = device.context("the device")?;
            if cid != args.guest_cid {
                bail!("--sender {cid}: the device's guest is CID {} (--guest-cid)", args.guest_cid);
            }
            Box::new(
                retrying(Duration::from_secs(args.wait), || {
                    let socket = VsockSocket::stream(device.vsock())?;
                    if let Some(size) = args.vsk_size {
                        socket.set_buffer_size_unclamped(size)?;
                    }
                    Ok(socket.connect(addr)?)
                })
                .with_context(unreachable)?,
            )
        }
        Transport::Unix => {
            let uds = args.uds_path.as_deref().context("--uds-path")?;
            Box::new(hybrid_connect(uds, args.port, Duration::from_secs(args.wait))?)
        }
        Transport::Loopback => bail!("loopback has no other side"),
    };
    let pattern = Pattern::new(buf_size)?;
    let sent = throughput::send(&mut *conn, mode, buf_size, bytes, args.inflight, &pattern)?;
    conn.close_write().context("shutdown(SHUT_WR)")?;
    if transport == Transport::Device {
        wait_for_close(&mut *conn)?;
    }
    print_sent(args, transport, mode, cid, buf_size, &sent)
}

/// Waits until the receiver closes. The device lives in this process: what it still holds for
/// the guest (up to the guest's credit) and the shutdown reach the guest only while it runs,
/// and a sender that exits at once leaves the guest's receiver waiting for the tail forever.
/// vsock_perf's receiver closes once it read end of file.
fn wait_for_close(conn: &mut dyn Conn) -> Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        match conn.recv(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e).context("waiting for the receiver to close"),
        }
    }
}

fn print_sent(
    args: &PerfArgs,
    transport: Transport,
    mode: Mode,
    cid: u32,
    buf_size: u64,
    sent: &Sent,
) -> Result<()> {
    let tx_gbps = super::units::gbps(sent.bytes, sent.in_send);
    if args.json {
        let report = SenderReport {
            role: "sender",
            transport,
            mode,
            peer_cid: cid,
            port: args.port,
            bytes: sent.bytes,
            buf_size,
            tx_gbps,
            tx_loop_secs: sent.total.as_secs_f64(),
            in_send_secs: sent.in_send.as_secs_f64(),
            sends: sent.sends,
            zerocopy_passes: sent.passes,
            copied_passes: sent.copied,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("total bytes sent: {}", sent.bytes);
    println!("tx performance: {tx_gbps:.6} Gbits/s");
    println!("total time in tx loop: {:.6} sec", sent.total.as_secs_f64());
    println!("time in 'send()': {:.6} sec", sent.in_send.as_secs_f64());
    if mode != Mode::Copy {
        println!("zerocopy completions: {} ids, {} COPIED", sent.passes, sent.copied);
    }
    Ok(())
}

fn receiver(
    args: &PerfArgs,
    transport: Transport,
    device: Option<&Device>,
    buf_size: u64,
    vsk_size: u64,
) -> Result<()> {
    if !args.json {
        println!("Run as receiver");
        println!("Listen port {}", args.port);
        println!("RX buffer {buf_size} bytes");
        println!("vsock buffer {vsk_size} bytes");
        println!("SO_RCVLOWAT {} bytes", args.rcvlowat);
    }
    let any = Addr::new(Cid::ANY, Port(args.port));
    let mut conn: Box<dyn Conn> = match transport {
        Transport::Kernel => {
            let listener = zerovsock_linux::VsockListener::bind(any)
                .with_context(|| format!("listening on port {}", args.port))?;
            let (conn, _) = listener.accept()?;
            conn.set_buffer_size_unclamped(vsk_size)?;
            conn.set_rcvlowat(args.rcvlowat)?;
            Box::new(KernelConn::new(conn))
        }
        Transport::Device => {
            let device = device.context("the device")?;
            let listener = zerovsock::VsockListener::bind(device.vsock(), any)
                .with_context(|| format!("listening on port {}", args.port))?;
            let (conn, _) = listener.accept()?;
            conn.set_buffer_size_unclamped(vsk_size)?;
            conn.set_rcvlowat(args.rcvlowat)?;
            Box::new(conn)
        }
        Transport::Unix => {
            let uds = args.uds_path.as_deref().context("--uds-path")?;
            Box::new(unix_accept(uds, args.port)?)
        }
        Transport::Loopback => bail!("loopback has no other side"),
    };
    let pattern = if args.verify { Some(Pattern::new(buf_size)?) } else { None };
    let got = throughput::receive(&mut *conn, buf_size, None, pattern.as_ref())?;
    print_received(args, transport, buf_size, vsk_size, &got)
}

/// A guest's connect to host port `port` arrives at `<uds>_<port>`.
fn unix_accept(uds: &Path, port: u32) -> Result<std::os::unix::net::UnixStream> {
    let path = hybrid_listen_path(uds, port);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    let (conn, _) = listener.accept()?;
    let _ = std::fs::remove_file(&path);
    Ok(conn)
}

fn print_received(
    args: &PerfArgs,
    transport: Transport,
    buf_size: u64,
    vsk_size: u64,
    got: &Received,
) -> Result<()> {
    // vsock_perf's `run_receiver` counts every read among its wakeups, the final zero-byte one
    // too when end of file ends its loop, and times the whole loop. When POLLHUP ends it
    // instead, it counts one read fewer than this does (see `throughput::receive`).
    let wakeups = got.reads + 1;
    let rx_gbps = super::units::gbps(got.bytes, got.end - got.start);
    let in_read = got.in_read.as_secs_f64();
    let average_ns = got.in_read.as_nanos() as f64 / wakeups as f64;
    if args.json {
        let report = ReceiverReport {
            role: "receiver",
            transport,
            port: args.port,
            bytes: got.bytes,
            buf_size,
            vsk_size,
            rcvlowat: args.rcvlowat,
            rx_gbps,
            in_read_secs: in_read,
            average_read_ns: average_ns,
            pollin_wakeups: wakeups,
            verified: args.verify,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("total bytes received: {}", got.bytes);
    println!("rx performance: {rx_gbps:.6} Gbits/s");
    println!("total time in 'read()': {in_read:.6} sec");
    println!("average time in 'read()': {average_ns:.6} ns");
    println!("POLLIN wakeups: {wakeups}");
    if args.verify {
        println!("verified: every byte of {} matched the sender's pattern", human(got.bytes));
    }
    Ok(())
}
