//! `zerovsock perf`: vsock throughput and latency, copy against MSG_ZEROCOPY, beside what a
//! user would pick instead, measured in the same run.
//!
//! Two ways to run:
//! * **Both sides here** (the default): for each message size, a sender and a receiver thread
//!   move `--bytes` over a fresh connection of each link, and the report gives the time inside
//!   send() (the RFC's figure), delivered end-to-end throughput, both against `memcpy` of the
//!   same size, and with `--baseline` against an AF_UNIX socketpair and TCP over 127.0.0.1.
//!   Links: the embedded loopback; the kernel's vsock_loopback (in a lab guest); the device
//!   with the userspace guest on the other side of a real vhost-user socket; a device's hybrid
//!   Unix endpoints (ours, or any backend such as vhost-device-vsock).
//! * **One side of a vsock_perf pair**: `--sender <cid>` or `--receiver`, with vsock_perf's
//!   flags, defaults and printed lines, so that the other side can be the kernel's C tool.
//!   Over kernel AF_VSOCK (the default then), our device's native sockets facing a real guest,
//!   or a device's hybrid Unix endpoints.

mod conn;
mod latency;
mod link;
mod pattern;
mod report;
mod single;
#[cfg(test)]
mod tests;
mod throughput;
mod units;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use link::{Direction, Link};
use report::{LatencyRow, Progress, Row, Skipped};
use units::{approx, available_memory, human, parse_cid, parse_port, parse_size, parse_size_u32};

/// The RFC's message sizes (its tables' rows).
const RFC_SIZES: [u64; 5] = [4 << 10, 32 << 10, 256 << 10, 1 << 20, 8 << 20];

/// Arguments. vsock_perf's keep their names, units (K/M/G are powers of 1024) and defaults.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Both sides run in this process unless --sender or --receiver makes it \
    one side of a vsock_perf pair (vsock_perf's receiver is its default; ours needs \
    --receiver). Sizes take K, M and G (powers of 1024), as vsock_perf's memparse.")]
pub struct PerfArgs {
    /// vsock_perf: be the sender, connecting to this CID.
    #[arg(long, value_name = "CID", value_parser = parse_cid, conflicts_with = "receiver")]
    sender: Option<u32>,
    /// Be the receiver of a vsock_perf pair.
    #[arg(long)]
    receiver: bool,
    /// vsock_perf: the port.
    #[arg(long, default_value_t = 1234, value_parser = parse_port)]
    port: u32,
    /// vsock_perf: bytes to send [default: 64K for --sender, as vsock_perf; 256M per
    /// measurement when both sides run here].
    #[arg(long, value_parser = parse_size)]
    bytes: Option<u64>,
    /// vsock_perf: size of each send() and read() [default: 128K for one side]. When both
    /// sides run here: measure this one size.
    #[arg(long, value_parser = parse_size)]
    buf_size: Option<u64>,
    /// vsock_perf: SO_VM_SOCKETS_BUFFER_SIZE (and _MAX_SIZE) of the receiver [default: 256K
    /// for one side]. Ours also sets it on the sender, when given, so that zerocopy sends
    /// past 256 KiB fit the TX credit; both sides here: default four messages per in-flight
    /// send, at least 256 KiB, on both ends.
    #[arg(long, value_parser = parse_size)]
    vsk_size: Option<u64>,
    /// vsock_perf: the receiver's SO_RCVLOWAT.
    #[arg(long, default_value = "1", value_parser = parse_size_u32)]
    rcvlowat: u32,
    /// vsock_perf: send with MSG_ZEROCOPY (alone: measure zerocopy only).
    #[arg(long)]
    zerocopy: bool,
    /// Where the bytes go: `loopback` (in-process, the default), `kernel` (AF_VSOCK, inside a
    /// lab guest only; the default for --sender/--receiver), `device` (this project's
    /// vhost-user-vsock device, its native sockets), `unix` (a device's hybrid Unix
    /// endpoints).
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// Measure copying sends (alone: copy only).
    #[arg(long)]
    copy: bool,
    /// Measure io_uring SEND_ZC sends (kernel transport).
    #[arg(long)]
    uring: bool,
    /// Message sizes to measure, comma separated [default: the RFC's 4K,32K,256K,1M,8M].
    #[arg(long, value_delimiter = ',', value_parser = parse_size, conflicts_with = "buf_size")]
    sizes: Vec<u64>,
    /// The RFC's sizes, copy and zerocopy, one table, memcpy beside (the default when no size
    /// or mode is named).
    #[arg(long, conflicts_with_all = ["buf_size", "sizes", "copy", "zerocopy", "uring"])]
    sweep: bool,
    /// Device and unix transports: which way data flows [default: both].
    #[arg(long, value_enum, value_delimiter = ',')]
    direction: Vec<Direction>,
    /// Also measure an AF_UNIX socketpair and TCP over 127.0.0.1 (copy and MSG_ZEROCOPY).
    #[arg(long)]
    baseline: bool,
    /// Measure round-trip latency (ping-pong) instead of throughput.
    #[arg(long)]
    latency: bool,
    /// Latency: round trips per size [default: --bytes / size, within 100..=100000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000), requires = "latency")]
    rounds: Option<u64>,
    /// Zerocopy sends kept in flight before waiting for a completion (vsock_perf: 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64),
          conflicts_with = "latency")]
    inflight: u32,
    /// Repetitions per measurement, interleaved; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100),
          conflicts_with = "latency")]
    runs: u32,
    /// Check every received byte against the sender's pattern.
    #[arg(long)]
    verify: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Draw throughput (or latency) against message size into this SVG file.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// The vhost-user socket: for `device` with one side, where QEMU connects; for `unix`,
    /// an external backend's (with --uds-path) that the userspace guest drives.
    #[arg(long, value_name = "PATH")]
    vhost_socket: Option<PathBuf>,
    /// A backend's hybrid Unix endpoint (`unix` transport).
    #[arg(long, value_name = "PATH")]
    uds_path: Option<PathBuf>,
    /// The guest's CID (`device` with one side).
    #[arg(long, default_value_t = 3)]
    guest_cid: u32,
    /// One side: keep retrying the connect for this many seconds (the peer may be starting).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    wait: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Loopback,
    Kernel,
    Device,
    Unix,
}

/// How the sender sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Copy,
    Zerocopy,
    /// io_uring SEND_ZC, each send waited for to its notification.
    UringZc,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Copy => "copy",
            Mode::Zerocopy => "zerocopy",
            Mode::UringZc => "uring-zc",
        }
    }
}

/// Most sends one measurement may take: past this a run takes hours.
const MAX_SENDS: u64 = 1 << 24;
/// Smallest socket buffer that works: Linux charges 576 bytes per queued packet
/// (`SKB_TRUESIZE(0)`), and a queue that cannot hold three packets (a partly read one, one that
/// cannot be collapsed with it, and the next) resets the connection with ENOBUFS.
const MIN_SOCKET_BUFFER: u64 = 3 * 576;
/// Largest socket buffer: `buf_alloc` is 32 bits on the wire.
const MAX_SOCKET_BUFFER: u64 = u32::MAX as u64;

pub fn run(args: PerfArgs) -> Result<()> {
    let one_side = args.sender.is_some() || args.receiver;
    if one_side {
        return single::run(&args);
    }
    both(&args)
}

/// The modes named, or copy and zerocopy.
fn modes(args: &PerfArgs) -> Vec<Mode> {
    let named: Vec<Mode> =
        [(args.copy, Mode::Copy), (args.zerocopy, Mode::Zerocopy), (args.uring, Mode::UringZc)]
            .into_iter()
            .filter_map(|(on, mode)| on.then_some(mode))
            .collect();
    if named.is_empty() {
        vec![Mode::Copy, Mode::Zerocopy]
    } else {
        named
    }
}

fn sizes(args: &PerfArgs) -> Vec<u64> {
    match (args.buf_size, args.sizes.is_empty()) {
        (Some(size), _) => vec![size],
        (None, false) => args.sizes.clone(),
        (None, true) => RFC_SIZES.to_vec(),
    }
}

fn socket_buffer(args: &PerfArgs, size: u64) -> u64 {
    args.vsk_size.unwrap_or_else(|| default_buffer(size, args.inflight))
}

/// Room for four messages per in-flight slot, at least Linux's default 256 KiB: whole messages
/// always fit the credit (so zerocopy is really taken), and a copy sender can fill the next
/// message while the receiver drains the last.
fn default_buffer(size: u64, inflight: u32) -> u64 {
    size.saturating_mul(4 * u64::from(inflight)).clamp(256 << 10, MAX_SOCKET_BUFFER)
}

/// Refuses, up front and in one line each, what cannot run here.
fn check_both(args: &PerfArgs, transport: Transport, sizes: &[u64], bytes: u64) -> Result<()> {
    if args.uring && transport != Transport::Kernel {
        bail!("--uring sends through io_uring on kernel sockets: it needs --transport kernel");
    }
    if args.wait != 0 || args.guest_cid != link::GUEST_CID {
        bail!("--wait and --guest-cid apply to one side of a pair (--sender/--receiver)");
    }
    if !args.direction.is_empty() && !matches!(transport, Transport::Device | Transport::Unix) {
        bail!("--direction applies to the device and unix transports");
    }
    match transport {
        Transport::Unix if args.vhost_socket.is_some() != args.uds_path.is_some() => bail!(
            "--transport unix drives an external backend with both --vhost-socket and \
             --uds-path, or this project's device in this process with neither"
        ),
        Transport::Unix => {}
        _ if args.vhost_socket.is_some() || args.uds_path.is_some() => bail!(
            "--vhost-socket and --uds-path name another backend (--transport unix), or the \
             socket QEMU connects to for one side of a pair (--transport device --sender/--receiver)"
        ),
        _ => {}
    }
    for (i, &size) in sizes.iter().enumerate() {
        if sizes[..i].contains(&size) {
            bail!("--sizes lists {} twice", human(size));
        }
        if size > bytes {
            bail!("size {} exceeds --bytes ({})", human(size), human(bytes));
        }
        let sends = bytes.div_ceil(size);
        if sends > MAX_SENDS {
            bail!(
                "size {} with --bytes {} is {sends} sends per measurement (at most {MAX_SENDS}); \
                 raise the size or lower --bytes",
                human(size),
                human(bytes)
            );
        }
        let buffer = socket_buffer(args, size);
        check_buffer(buffer, args.rcvlowat, size)?;
        let need = size.saturating_mul(5 + u64::from(args.inflight)).saturating_add(buffer);
        if let Some(available) = available_memory() {
            if need > available {
                bail!(
                    "size {} needs about {} of memory (buffers and copies in flight); {} is \
                     available",
                    human(size),
                    approx(need),
                    approx(available)
                );
            }
        }
    }
    Ok(())
}

/// What a vsock socket buffer of `buffer` bytes allows, read `read` bytes at a time with
/// SO_RCVLOWAT `rcvlowat`.
fn check_buffer(buffer: u64, rcvlowat: u32, read: u64) -> Result<()> {
    if buffer < MIN_SOCKET_BUFFER {
        bail!(
            "--vsk-size {buffer} is below {MIN_SOCKET_BUFFER} bytes: Linux charges 576 bytes \
             per queued packet, and a buffer that holds fewer than three resets the \
             connection (ENOBUFS)"
        );
    }
    if buffer > MAX_SOCKET_BUFFER {
        bail!("--vsk-size {buffer} exceeds {MAX_SOCKET_BUFFER}, the largest buf_alloc");
    }
    // vsock_connectible_recvmsg: a read waits for min(SO_RCVLOWAT, its length) bytes, and
    // fails with ENOMEM when that target is not below the buffer.
    if u64::from(rcvlowat).min(read) >= buffer {
        bail!(
            "--rcvlowat {rcvlowat} with reads of {read} bytes waits for the whole socket buffer \
             ({buffer} bytes): Linux fails such reads with ENOMEM"
        );
    }
    Ok(())
}

/// The links of a both-sides run, in the table's order.
fn links(args: &PerfArgs, transport: Transport) -> Result<Vec<Box<dyn Link>>> {
    let directions = if args.direction.is_empty() {
        vec![Direction::GuestToHost, Direction::HostToGuest]
    } else {
        args.direction.clone()
    };
    let mut links: Vec<Box<dyn Link>> = Vec::new();
    match transport {
        Transport::Loopback => links.push(Box::new(link::StackLink::loopback())),
        Transport::Kernel => links.push(Box::new(link::KernelLink::new()?)),
        Transport::Device => {
            let harness = std::sync::Arc::new(link::DeviceHarness::ours()?);
            for &direction in &directions {
                links.push(Box::new(link::StackLink::device(&harness, direction)?));
            }
        }
        Transport::Unix => {
            let harness = match (&args.vhost_socket, &args.uds_path) {
                (Some(socket), Some(uds)) => link::DeviceHarness::external(socket, uds)?,
                _ => link::DeviceHarness::ours()?,
            };
            let harness = std::sync::Arc::new(harness);
            for &direction in &directions {
                links.push(Box::new(link::HybridLink::new(&harness, direction)));
            }
        }
    }
    if args.baseline {
        links.push(Box::new(link::UnixPairLink));
        links.push(Box::new(link::TcpLink::new()?));
    }
    Ok(links)
}

#[derive(Debug, Serialize)]
struct Report {
    transport: Transport,
    bytes: u64,
    runs: u32,
    inflight: u32,
    verify: bool,
    rows: Vec<Row>,
    latency: Vec<LatencyRow>,
    /// zerocopy send throughput over copy send throughput: (link, size, ratio).
    zerocopy_over_copy_send: Vec<(String, u64, f64)>,
    skipped: Vec<Skipped>,
}

fn both(args: &PerfArgs) -> Result<()> {
    let transport = args.transport.unwrap_or(Transport::Loopback);
    let sizes = sizes(args);
    let bytes = args.bytes.unwrap_or(256 << 20);
    check_both(args, transport, &sizes, bytes)?;
    let modes = modes(args);
    let mut links = links(args, transport)?;
    let max_size = sizes.iter().copied().max().unwrap_or(0);
    let pattern = pattern::Pattern::new(max_size)?;

    let mut skipped = Vec::new();
    let mut plan: Vec<(usize, Mode)> = Vec::new();
    for (i, link) in links.iter().enumerate() {
        // The AF_UNIX socketpair is the reference of the xAF_UNIX column: it copies whatever
        // modes were asked for.
        let link_modes = match link.is_reference() {
            true => vec![Mode::Copy],
            false => modes.clone(),
        };
        for mode in link_modes {
            match link.refuses(mode) {
                Some(reason) => {
                    skipped.push(Skipped { link: link.name(), mode, reason: reason.into() })
                }
                None => plan.push((i, mode)),
            }
        }
    }
    let transport_name = format!("{transport:?}").to_lowercase();
    let title = match args.latency {
        true => format!(
            "zerovsock perf: round-trip latency, {transport_name} transport{}",
            if args.verify { ", every byte verified" } else { "" }
        ),
        false => format!(
            "zerovsock perf: {transport_name} transport, {} per measurement, median of {}, \
             zerocopy in flight: {}{}",
            human(bytes),
            args.runs,
            args.inflight,
            if args.verify { ", every byte verified" } else { "" }
        ),
    };
    let steps = match args.latency {
        true => sizes.len() * plan.len(),
        false => sizes.len() * (plan.len() + 1) * args.runs as usize,
    };
    let mut progress = Progress::new(steps as u64);
    let mut rows = Vec::new();
    let mut latency_rows = Vec::new();
    if !args.json {
        if args.latency {
            let rounds = match args.rounds {
                Some(n) => format!("{n} per size"),
                None => "--bytes / size, 100 to 100000".into(),
            };
            report::print_latency_header(&title, &rounds);
        } else {
            report::print_header(&title);
        }
    }
    for &size in &sizes {
        let buffer = socket_buffer(args, size);
        let transfer = |mode| throughput::Transfer {
            mode,
            size,
            total: bytes,
            inflight: args.inflight,
            buffer,
            rcvlowat: args.rcvlowat,
            port: args.port,
            pattern: &pattern,
            verify: args.verify,
        };
        if args.latency {
            let rounds = args.rounds.unwrap_or_else(|| latency::default_rounds(bytes, size));
            for &(i, mode) in &plan {
                let link = &mut links[i];
                progress.start(format!("{} {} {}", link.name(), mode.name(), human(size)));
                // One message in flight each way, read whole: no SO_RCVLOWAT to wait on.
                let transfer = throughput::Transfer { inflight: 1, rcvlowat: 1, ..transfer(mode) };
                let percentiles =
                    latency::measure(link.as_mut(), &transfer, rounds).with_context(|| {
                        format!("{} {} latency at {}", link.name(), mode.name(), human(size))
                    })?;
                progress.done();
                let row = LatencyRow { size, link: link.name(), mode, percentiles };
                if !args.json {
                    progress.suspend(|| report::print_latency_row(&row));
                }
                latency_rows.push(row);
            }
            continue;
        }
        let mut memcpy = Vec::new();
        let mut samples: Vec<Vec<throughput::Sample>> = vec![Vec::new(); plan.len()];
        for _ in 0..args.runs {
            progress.start(format!("memcpy {}", human(size)));
            memcpy.push(memcpy_gbps(size, bytes)?);
            progress.done();
            for (&(i, mode), runs) in plan.iter().zip(&mut samples) {
                let link = &mut links[i];
                progress.start(format!("{} {} {}", link.name(), mode.name(), human(size)));
                let sample =
                    throughput::measure(link.as_mut(), &transfer(mode)).with_context(|| {
                        format!("{} {} at {}", link.name(), mode.name(), human(size))
                    })?;
                runs.push(sample);
                progress.done();
            }
        }
        // memcpy is the machine's ceiling: its best run is the honest one (a short copy loses
        // most to a neighbour's time slice).
        let memcpy_gbps = memcpy.into_iter().fold(0.0, f64::max);
        let mut size_rows = vec![Row {
            size,
            link: "memcpy".into(),
            mode: None,
            send_gbps: None,
            e2e_gbps: memcpy_gbps,
            e2e_vs_memcpy: 1.0,
            e2e_vs_unix: None,
            copied_share: None,
        }];
        for (&(i, mode), runs) in plan.iter().zip(&samples) {
            let send = median(runs.iter().map(|s| s.sent.in_send).collect());
            let e2e = units::gbps(bytes, median(runs.iter().map(|s| s.e2e).collect()));
            let passes: u64 = runs.iter().map(|s| s.sent.passes).sum();
            let copied: u64 = runs.iter().map(|s| s.sent.copied).sum();
            size_rows.push(Row {
                size,
                link: links[i].name(),
                mode: Some(mode),
                send_gbps: Some(units::gbps(bytes, send)),
                e2e_gbps: e2e,
                e2e_vs_memcpy: e2e / memcpy_gbps,
                e2e_vs_unix: None,
                copied_share: (mode != Mode::Copy).then(|| copied as f64 / passes.max(1) as f64),
            });
        }
        let unix = size_rows.iter().find(|r| r.link == "AF_UNIX").map(|r| r.e2e_gbps);
        for row in &mut size_rows {
            row.e2e_vs_unix = unix.map(|u| row.e2e_gbps / u);
        }
        if !args.json {
            progress.suspend(|| size_rows.iter().for_each(report::print_row));
        }
        rows.extend(size_rows);
    }
    progress.finish();
    let ratios = report::ratios(&rows);
    if !args.json {
        if !ratios.is_empty() {
            println!("\nzerocopy / copy, send throughput:");
            for (link, size, ratio) in &ratios {
                println!("  {:<16} {:>8}  {ratio:.2}x", link, human(*size));
            }
        }
        for skip in &skipped {
            println!("not measured: {} {}: {}", skip.link, skip.mode.name(), skip.reason);
        }
    }
    if let Some(path) = &args.plot {
        if args.latency {
            let series = report::series(
                &latency_rows,
                |r| format!("{} {} p99", r.link, r.mode.name()),
                |r| (r.size, r.percentiles.p99_us),
            );
            report::plot(path, &chart_title(transport, "round-trip latency"), "p99 (us)", &series)?;
        } else {
            let series = report::series(
                &rows,
                |r| match r.mode {
                    Some(mode) => format!("{} {}", r.link, mode.name()),
                    None => r.link.clone(),
                },
                |r| (r.size, r.e2e_gbps),
            );
            report::plot(
                path,
                &chart_title(transport, "throughput"),
                "end-to-end Gbit/s",
                &series,
            )?;
        }
        if !args.json {
            println!("chart: {}", path.display());
        }
    }
    if args.json {
        let report = Report {
            transport,
            bytes,
            runs: args.runs,
            inflight: args.inflight,
            verify: args.verify,
            rows,
            latency: latency_rows,
            zerocopy_over_copy_send: ratios,
            skipped,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn chart_title(transport: Transport, what: &str) -> String {
    format!("zerovsock perf: {what}, {} transport", format!("{transport:?}").to_lowercase())
}

fn median(mut values: Vec<std::time::Duration>) -> std::time::Duration {
    values.sort();
    values[values.len() / 2]
}

const PAGE: u64 = 4096;

/// The `len` bytes of `buf` that start at its first page boundary.
fn page_aligned(buf: &mut [u8], len: u64) -> &mut [u8] {
    let skip = buf.as_ptr().align_offset(PAGE as usize);
    &mut buf[skip..skip + len as usize]
}

/// memcpy of `size`-byte buffers: Gbit/s over at least `bytes` and at least 50 ms (a copy is
/// fast enough that a shorter run measures the scheduler).
fn memcpy_gbps(size: u64, bytes: u64) -> Result<f64> {
    use std::hint::black_box;
    use std::time::{Duration, Instant};
    // Both page-aligned, as vsock_perf's buffers are. Two malloc'd buffers one after the
    // other lie a few bytes past a multiple of 4 KiB apart, and a string copy (`rep movsb`,
    // glibc's choice from a few KiB) between such addresses runs at a tenth of its speed on
    // this machine (measured: 32 KiB at 24 Gbit/s instead of 300-390).
    let mut src = units::filled(size + PAGE, 0x5a)?;
    let mut dst = units::filled(size + PAGE, 0)?;
    let (src, dst) = (page_aligned(&mut src, size), page_aligned(&mut dst, size));
    let start = Instant::now();
    let mut copied = 0u64;
    while copied < bytes || start.elapsed() < Duration::from_millis(50) {
        dst.copy_from_slice(black_box(&*src));
        black_box(&mut *dst);
        copied += size;
    }
    Ok(units::gbps(copied, start.elapsed()))
}
