//! `zerovsock perf`: copy vs zerocopy throughput on the in-process loopback, measured the way
//! the RFC and `vsock_perf` measure it, beside `memcpy` of the same sizes in the same run.
//!
//! Per message size and mode, one sender and one receiver thread move `--bytes` bytes:
//! * **send**: bytes over the time spent inside the send calls only (the RFC's tables);
//! * **e2e**: bytes over wall time from the first send to the receiver's last read;
//! * **memcpy**: a plain copy of the same size, same total, on this machine, in this run.
//!
//! The zerocopy sender behaves like `vsock_perf --zerocopy`: after each send it waits for the
//! completion before sending again (`--inflight` raises that depth). Socket buffers are sized so
//! that a whole message fits the credit, so the zerocopy path is really taken (as vsock_perf's
//! `--vsk-size`); the share of sends that still completed COPIED is reported.

use std::hint::black_box;
use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::Serialize;
use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{Interest, Vsock, VsockSocket, VsockStream};

/// Arguments; the vsock_perf ones keep their names and units (K/M/G are powers of 1024).
#[derive(clap::Args, Debug)]
pub struct PerfArgs {
    /// Message sizes: each send() and read() moves this much. Comma separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_size,
          default_value = "4K,32K,256K,1M,8M")]
    sizes: Vec<u64>,
    /// vsock_perf's --buf-size: measure this one size only.
    #[arg(long, value_parser = parse_size)]
    buf_size: Option<u64>,
    /// Bytes moved per measurement.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    bytes: u64,
    /// Socket buffer (SO_VM_SOCKETS_BUFFER_SIZE) of both ends. Default: four messages per
    /// in-flight send, at least 256 KiB, so zerocopy sends always fit the credit.
    #[arg(long, value_parser = parse_size)]
    vsk_size: Option<u64>,
    /// Receiver SO_RCVLOWAT.
    #[arg(long, default_value_t = 1)]
    rcvlowat: u32,
    /// Measure zerocopy only (vsock_perf's --zerocopy).
    #[arg(long, conflicts_with = "copy")]
    zerocopy: bool,
    /// Measure copy only.
    #[arg(long)]
    copy: bool,
    /// Zerocopy sends kept in flight before waiting for a completion (vsock_perf: 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    inflight: u32,
    /// Repetitions per measurement; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Port the receiver listens on (any but VMADDR_PORT_ANY, 4294967295).
    #[arg(long, default_value_t = 1234, value_parser = parse_port)]
    port: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Parses `memparse`-style sizes: `4096`, `4K`, `256M`, `1G`.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&text[..text.len() - 1], 10),
        Some('M') => (&text[..text.len() - 1], 20),
        Some('G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value: u64 = digits.parse().map_err(|_| format!("not a size: {text:?}"))?;
    let value = value.checked_mul(1 << shift).ok_or_else(|| format!("size too large: {text}"))?;
    if value == 0 {
        return Err("size must be positive".into());
    }
    Ok(value)
}

fn parse_port(text: &str) -> Result<u32, String> {
    let port: u32 = text.trim().parse().map_err(|_| format!("not a port number: {text:?}"))?;
    if port == Port::ANY.0 {
        return Err(format!("{port} is VMADDR_PORT_ANY, which no socket can listen on"));
    }
    Ok(port)
}

/// Most sends one measurement may take: past this a run takes hours.
const MAX_SENDS: u64 = 1 << 24;
/// Smallest socket buffer that works: Linux charges 576 bytes per queued packet
/// (`SKB_TRUESIZE(0)`), and a queue that cannot hold three packets (a partly read one, one that
/// cannot be collapsed with it, and the next) resets the connection with ENOBUFS.
const MIN_SOCKET_BUFFER: u64 = 3 * 576;
/// Largest socket buffer: `buf_alloc` is 32 bits on the wire.
const MAX_SOCKET_BUFFER: u64 = u32::MAX as u64;

/// Refuses, up front and in one line each, what cannot run: sizes past `--bytes`, repeated
/// sizes, runs of too many sends, buffers below what Linux's accounting allows or above the
/// wire's 32 bits, SO_RCVLOWAT not below the buffer, more memory than the machine has.
fn check(args: &PerfArgs, sizes: &[u64]) -> Result<()> {
    for (i, &size) in sizes.iter().enumerate() {
        if sizes[..i].contains(&size) {
            bail!("--sizes lists {} twice", human(size));
        }
        if size > args.bytes {
            bail!("size {} exceeds --bytes ({})", human(size), human(args.bytes));
        }
        let sends = args.bytes.div_ceil(size);
        if sends > MAX_SENDS {
            bail!(
                "size {} with --bytes {} is {sends} sends per measurement (at most {MAX_SENDS}); \
                 raise the size or lower --bytes",
                human(size),
                human(args.bytes)
            );
        }
        let buffer = socket_buffer(args, size);
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
        if u64::from(args.rcvlowat) >= buffer {
            bail!(
                "--rcvlowat {} must be below the socket buffer ({buffer} bytes): Linux fails \
                 such reads with ENOMEM",
                args.rcvlowat
            );
        }
        let need = memory_needed(args, size, buffer);
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

/// Peak memory of one measurement: the memcpy source and destination, the sender's buffers,
/// the receiver's, and a socket buffer's worth of copies in flight.
fn memory_needed(args: &PerfArgs, size: u64, buffer: u64) -> u64 {
    size.saturating_mul(4 + u64::from(args.inflight)).saturating_add(buffer)
}

/// `MemAvailable` from `/proc/meminfo`, when there is one.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A zeroed buffer, or an error (rather than an abort) when the memory is not there.
fn filled(len: u64, fill: u8) -> Result<Vec<u8>> {
    let len = usize::try_from(len).context("buffer larger than the address space")?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).with_context(|| format!("allocating {}", human(len as u64)))?;
    buf.resize(len, fill);
    Ok(buf)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Copy,
    Zerocopy,
}

/// One measurement.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    send: Duration,
    e2e: Duration,
    sends: u64,
    /// Zerocopy passes (completion ids) the sends took, and how many completed COPIED.
    passes: u64,
    copied_passes: u64,
}

/// One row of the report.
#[derive(Debug, Serialize)]
struct Row {
    size: u64,
    mode: Mode,
    bytes: u64,
    socket_buffer: u64,
    send_gbps: f64,
    e2e_gbps: f64,
    memcpy_gbps: f64,
    e2e_vs_memcpy: f64,
    /// Share of zerocopy passes (completion ids) whose completion carried COPIED.
    copied_share: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    transport: &'static str,
    runs: u32,
    inflight: u32,
    rows: Vec<Row>,
    /// zerocopy send throughput over copy send throughput, per size (when both ran).
    zerocopy_over_copy_send: Vec<(u64, f64)>,
}

fn gbps(bytes: u64, time: Duration) -> f64 {
    bytes as f64 * 8.0 / time.as_secs_f64().max(1e-12) / 1e9
}

/// Runs the comparison and prints it, a row as soon as it is measured.
pub fn run(args: PerfArgs) -> Result<()> {
    let sizes = match args.buf_size {
        Some(size) => vec![size],
        None => args.sizes.clone(),
    };
    check(&args, &sizes)?;
    let modes: Vec<Mode> = match (args.copy, args.zerocopy) {
        (true, false) => vec![Mode::Copy],
        (false, true) => vec![Mode::Zerocopy],
        _ => vec![Mode::Copy, Mode::Zerocopy],
    };
    if !args.json {
        print_header(&args);
    }
    let mut rows = Vec::new();
    for &size in &sizes {
        let measured = measure_size(&args, size, &modes)?;
        if !args.json {
            print_row(size, &measured);
        }
        rows.extend(measured);
    }
    let ratios = sizes
        .iter()
        .filter_map(|&size| {
            let find = |mode| rows.iter().find(|r| r.size == size && r.mode == mode);
            let (copy, zc) = (find(Mode::Copy)?, find(Mode::Zerocopy)?);
            Some((size, zc.send_gbps / copy.send_gbps))
        })
        .collect();
    let report = Report {
        transport: "loopback",
        runs: args.runs,
        inflight: args.inflight,
        rows,
        zerocopy_over_copy_send: ratios,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn socket_buffer(args: &PerfArgs, size: u64) -> u64 {
    args.vsk_size.unwrap_or_else(|| default_buffer(size, args.inflight))
}

/// The rows of one message size: memcpy and the modes, interleaved run by run so that drift on
/// a shared machine hits all of them alike; medians.
fn measure_size(args: &PerfArgs, size: u64, modes: &[Mode]) -> Result<Vec<Row>> {
    let buffer = socket_buffer(args, size);
    let mut memcpy = Vec::new();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for _ in 0..args.runs {
        memcpy.push(memcpy_time(size, args.bytes)?);
        for (mode, runs) in modes.iter().zip(&mut samples) {
            let sample = measure(args, size, *mode, buffer)
                .with_context(|| format!("{mode:?} at {}", human(size)))?;
            runs.push(sample);
        }
    }
    let memcpy_gbps = gbps(args.bytes, median(&mut memcpy));
    let mut rows = Vec::new();
    for (&mode, samples) in modes.iter().zip(&samples) {
        let send = median(&mut samples.iter().map(|s| s.send).collect::<Vec<_>>());
        let e2e = median(&mut samples.iter().map(|s| s.e2e).collect::<Vec<_>>());
        let passes: u64 = samples.iter().map(|s| s.passes).sum();
        let copied: u64 = samples.iter().map(|s| s.copied_passes).sum();
        let e2e_gbps = gbps(args.bytes, e2e);
        rows.push(Row {
            size,
            mode,
            bytes: args.bytes,
            socket_buffer: buffer,
            send_gbps: gbps(args.bytes, send),
            e2e_gbps,
            memcpy_gbps,
            e2e_vs_memcpy: e2e_gbps / memcpy_gbps,
            copied_share: (mode == Mode::Zerocopy).then(|| copied as f64 / passes.max(1) as f64),
        });
    }
    Ok(rows)
}

/// Room for four messages per in-flight slot, at least Linux's default 256 KiB: whole messages
/// always fit the credit (so zerocopy is really taken), and a copy sender can fill the next
/// message while the receiver drains the last.
fn default_buffer(size: u64, inflight: u32) -> u64 {
    size.saturating_mul(4 * u64::from(inflight)).clamp(256 << 10, MAX_SOCKET_BUFFER)
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn memcpy_time(size: u64, bytes: u64) -> Result<Duration> {
    let src = filled(size, 0x5a)?;
    let mut dst = filled(size, 0)?;
    let rounds = bytes.div_ceil(size);
    let start = Instant::now();
    for _ in 0..rounds {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    Ok(start.elapsed())
}

/// One sender/receiver pair moving `args.bytes` in messages of `size`.
fn measure(args: &PerfArgs, size: u64, mode: Mode, buffer: u64) -> Result<Sample> {
    let vsock = Vsock::loopback();
    let listener = VsockSocket::stream(&vsock)?;
    listener.bind(Addr::new(Cid::ANY, Port(args.port)))?;
    listener.set_buffer_size_unclamped(buffer)?;
    let listener = listener.listen(1)?;
    let (total, rcvlowat) = (args.bytes, args.rcvlowat);
    let receiver = thread::spawn(move || -> Result<Instant> {
        let (mut conn, _) = listener.accept()?;
        conn.set_rcvlowat(rcvlowat)?;
        let mut buf = filled(size, 0)?;
        let mut received = 0u64;
        while received < total {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                bail!("sender closed after {received} of {total} bytes");
            }
            received += n as u64;
        }
        Ok(Instant::now())
    });
    let socket = VsockSocket::stream(&vsock)?;
    socket.set_buffer_size_unclamped(buffer)?;
    let sender = socket.connect(Addr::new(Cid::LOCAL, Port(args.port)))?;
    let sent = match mode {
        Mode::Copy => send_copy(&sender, size, total),
        Mode::Zerocopy => send_zerocopy(&sender, size, total, args.inflight),
    };
    // A failed sender closes its end, so the receiver always returns; its error is the cause
    // when both failed.
    drop(sender);
    let received = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let ((start, mut sample), end) = match (sent, received) {
        (_, Err(error)) => return Err(error.context("receiver")),
        (Err(error), _) => return Err(error.context("sender")),
        (Ok(sent), Ok(end)) => (sent, end),
    };
    sample.e2e = end.saturating_duration_since(start);
    Ok(sample)
}

fn send_copy(sender: &VsockStream, size: u64, total: u64) -> Result<(Instant, Sample)> {
    let buf = filled(size, 0x5a)?;
    let mut sample = Sample::default();
    let mut left = total;
    let start = Instant::now();
    while left > 0 {
        let n = left.min(size) as usize;
        let t = Instant::now();
        let sent = (&*sender).write(&buf[..n])?;
        sample.send += t.elapsed();
        sample.sends += 1;
        left -= sent as u64;
    }
    Ok((start, sample))
}

fn send_zerocopy(
    sender: &VsockStream,
    size: u64,
    total: u64,
    inflight: u32,
) -> Result<(Instant, Sample)> {
    sender.set_zerocopy(true)?;
    let pool: Vec<Bytes> = (0..inflight)
        .map(|i| filled(size, 0x5a ^ i as u8).map(Bytes::from))
        .collect::<Result<_>>()?;
    let mut sample = Sample::default();
    let mut outstanding = 0u64;
    let mut left = total;
    let mut slot = 0;
    let start = Instant::now();
    while left > 0 {
        while outstanding >= u64::from(inflight) {
            outstanding -= reap(sender, &mut sample)?;
        }
        let n = left.min(size) as usize;
        let first = sender.next_completion_id();
        let t = Instant::now();
        let sent = sender.send_zerocopy(pool[slot].slice(..n))?;
        sample.send += t.elapsed();
        sample.sends += 1;
        outstanding += u64::from(sender.next_completion_id().wrapping_sub(first));
        left -= sent as u64;
        slot = (slot + 1) % pool.len();
    }
    while outstanding > 0 {
        outstanding = outstanding.saturating_sub(reap(sender, &mut sample)?);
    }
    Ok((start, sample))
}

/// Waits for completions (POLLERR) and reads them all; returns how many ids they covered.
fn reap(sender: &VsockStream, sample: &mut Sample) -> Result<u64> {
    let ready = sender.poll(Interest::NONE, Some(Duration::from_secs(30)))?;
    if !ready.error {
        bail!("no zerocopy completion within 30 s");
    }
    let mut ids = 0;
    loop {
        match sender.recv_completion() {
            Ok(completion) => {
                ids += completion.count();
                sample.passes += completion.count();
                if completion.copied {
                    sample.copied_passes += completion.count();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(ids),
            Err(e) => return Err(e).context("reading completions"),
        }
    }
}

fn human(size: u64) -> String {
    match size {
        s if s >= 1 << 30 && s % (1 << 30) == 0 => format!("{} GiB", s >> 30),
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

/// A large amount in GiB (or MiB) with one decimal.
fn approx(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1 << 30)),
        b => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
    }
}

fn print_header(args: &PerfArgs) {
    println!(
        "zerovsock perf: loopback transport, {} per measurement, median of {}, zerocopy in flight: {}",
        human(args.bytes),
        args.runs,
        args.inflight
    );
    println!("throughput in Gbit/s; send = time inside send() only (as the RFC), e2e = first send to last byte read");
    println!("COPIED = share of zerocopy passes that completed with the COPIED flag\n");
    println!(
        "{:>8} {:>9} | {:>9} {:>9} {:>7} | {:>9} {:>9} {:>7} {:>7} | {:>8}",
        "size",
        "memcpy",
        "copy send",
        "copy e2e",
        "xmemcpy",
        "zc send",
        "zc e2e",
        "xmemcpy",
        "COPIED",
        "zc/copy"
    );
}

fn print_row(size: u64, rows: &[Row]) {
    let find = |mode| rows.iter().find(|r| r.mode == mode);
    let (copy, zc) = (find(Mode::Copy), find(Mode::Zerocopy));
    let memcpy = copy.or(zc).map_or(0.0, |r| r.memcpy_gbps);
    let cell = |row: Option<&Row>, f: fn(&Row) -> String| row.map_or("-".to_string(), f);
    let ratio = copy.zip(zc).map(|(copy, zc)| zc.send_gbps / copy.send_gbps);
    println!(
        "{:>8} {:>9.1} | {:>9} {:>9} {:>7} | {:>9} {:>9} {:>7} {:>7} | {:>8}",
        human(size),
        memcpy,
        cell(copy, |r| format!("{:.1}", r.send_gbps)),
        cell(copy, |r| format!("{:.1}", r.e2e_gbps)),
        cell(copy, |r| format!("{:.2}x", r.e2e_vs_memcpy)),
        cell(zc, |r| format!("{:.1}", r.send_gbps)),
        cell(zc, |r| format!("{:.1}", r.e2e_gbps)),
        cell(zc, |r| format!("{:.2}x", r.e2e_vs_memcpy)),
        cell(zc, |r| format!("{:.0}%", r.copied_share.unwrap_or(0.0) * 100.0)),
        ratio.map_or("-".to_string(), |r| format!("{r:.1}x")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_memparse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    fn args() -> PerfArgs {
        PerfArgs {
            sizes: vec![4 << 10],
            buf_size: None,
            bytes: 256 << 20,
            vsk_size: None,
            rcvlowat: 1,
            zerocopy: false,
            copy: false,
            inflight: 1,
            runs: 1,
            port: 1234,
            json: false,
        }
    }

    fn refusal(args: &PerfArgs) -> String {
        let sizes = args.sizes.clone();
        format!("{:#}", check(args, &sizes).expect_err("refused"))
    }

    #[test]
    fn port_any_is_refused_by_name() {
        assert_eq!(parse_port("1234"), Ok(1234));
        let error = parse_port("4294967295").unwrap_err();
        assert!(error.contains("VMADDR_PORT_ANY"), "{error}");
        assert!(parse_port("4294967296").is_err());
    }

    #[test]
    fn what_cannot_run_is_refused_up_front_in_one_line() {
        assert!(check(&args(), &[4 << 10, 1 << 20]).is_ok());
        type Change = fn(&mut PerfArgs);
        let cases: [(Change, &str); 6] = [
            (|a| a.sizes = vec![4096, 4096], "twice"),
            (|a| a.sizes = vec![1], "sends per measurement"),
            (|a| a.sizes = vec![512 << 20], "exceeds --bytes"),
            (|a| a.vsk_size = Some(1152), "fewer than three"),
            (|a| a.rcvlowat = 256 << 10, "below the socket buffer"),
            (|a| (a.sizes, a.bytes) = (vec![1 << 40], 1 << 40), "of memory"),
        ];
        for (change, expected) in cases {
            let mut args = args();
            change(&mut args);
            let message = refusal(&args);
            assert!(message.contains(expected), "{message:?} should say {expected:?}");
            assert!(!message.contains('\n'), "one line: {message:?}");
        }
    }

    #[test]
    fn the_default_buffer_fits_the_wire_and_a_whole_message() {
        assert_eq!(default_buffer(4096, 1), 256 << 10);
        assert_eq!(default_buffer(1 << 20, 2), 8 << 20);
        assert_eq!(default_buffer(2 << 30, 1), MAX_SOCKET_BUFFER);
    }

    #[test]
    fn a_small_run_moves_every_byte_and_takes_the_zerocopy_path() {
        let args = PerfArgs {
            sizes: vec![64 << 10],
            buf_size: None,
            bytes: 4 << 20,
            vsk_size: None,
            rcvlowat: 1,
            zerocopy: false,
            copy: false,
            inflight: 2,
            runs: 1,
            port: 1234,
            json: true,
        };
        let sample = measure(&args, 64 << 10, Mode::Zerocopy, 256 << 10).unwrap();
        assert_eq!(sample.sends, 64);
        assert_eq!((sample.passes, sample.copied_passes), (64, 0), "whole messages fit the credit");
        assert!(sample.e2e >= sample.send);
        let sample = measure(&args, 64 << 10, Mode::Copy, 256 << 10).unwrap();
        assert_eq!(sample.sends, 64);
    }
}
