//! The guest half of the device tests (`zerovsock-lab device-tests`): kernel AF_VSOCK in a lab
//! guest, talking to the host through the project's vhost-user-vsock device. Each command prints
//! one result line the host checks against what it saw itself.
//!
//! * `send PORT TOTAL WRITE [zerocopy]`: connect to the host's PORT, write TOTAL bytes of
//!   `pattern(TOTAL, PORT)` in WRITE-byte writes (MSG_ZEROCOPY sends with `zerocopy`), shut
//!   down writing, read the host's two-byte reply.
//! * `recv PORT [TOTAL]`: listen on PORT, take one connection, read it to its end (or TOTAL
//!   bytes: a backend that does not pass the host's half-close on can be measured too),
//!   answer `ok`.
//! * `refused PORT`: connect to a host port nobody listens on; the error must be ECONNRESET.
//!
//! `send` and `recv` also print `secs` (the transfer's wall time in the guest) and `cpu` (the
//! share of the guest's CPU time that was busy meanwhile, from `/proc/stat`), for the device
//! bench (`zerovsock-lab device-bench`).
//!
//! It refuses to run anywhere but a zerovsock lab guest.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use zerovsock_linux::wire::{Addr, Cid, Port};
use zerovsock_linux::{VsockListener, VsockStream};
use zerovsock_testkit::suite::{djb2, pattern};

fn main() {
    if !zerovsock_lab::in_lab_guest() {
        eprintln!("device_guest: refusing to open AF_VSOCK outside a zerovsock lab guest");
        std::process::exit(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number =
        |i: usize| -> usize { args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage()) };
    let result = match args.first().map(String::as_str) {
        Some("send") => send(
            number(1) as u32,
            number(2),
            number(3),
            args.get(4).is_some_and(|a| a == "zerocopy"),
        ),
        Some("recv") => recv(number(1) as u32, args.get(2).map(|_| number(2))),
        Some("refused") => refused(number(1) as u32),
        _ => usage(),
    };
    if let Err(error) = result {
        println!("device_guest: FAILED {error}");
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: device_guest send PORT TOTAL WRITE [zerocopy] | recv PORT [TOTAL] | refused PORT"
    );
    std::process::exit(2);
}

fn send(port: u32, total: usize, write: usize, zerocopy: bool) -> std::io::Result<()> {
    let data = pattern(total, u64::from(port));
    let mut stream = connect_retrying(port)?;
    let started = Instant::now();
    let cpu = CpuTime::now();
    if zerocopy {
        stream.set_zerocopy(true)?;
        for chunk in data.chunks(write) {
            let mut sent = 0;
            while sent < chunk.len() {
                sent += stream.send_zerocopy(chunk[sent..].to_vec())?;
            }
        }
    } else {
        for chunk in data.chunks(write) {
            stream.write_all(chunk)?;
        }
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = [0u8; 2];
    stream.read_exact(&mut reply)?;
    let elapsed = started.elapsed();
    let mut line = format!(
        "send port={port} bytes={total} write={write} hash={:016x} reply={} secs={:.3} cpu={:.2}",
        djb2(&data),
        String::from_utf8_lossy(&reply),
        elapsed.as_secs_f64(),
        cpu.busy_share()
    );
    if zerocopy {
        // Every pass's completion must arrive: the device has copied every byte by now.
        let drained = stream.drain_zerocopy(Duration::from_secs(10))?;
        let mut completions = 0;
        let mut copied = 0;
        let mut highest = None;
        while let Ok(completion) = stream.recv_completion() {
            completions += 1;
            copied += u32::from(completion.copied);
            highest = Some(completion.hi);
        }
        line.push_str(&format!(
            " zerocopy ids={} drained={drained} pinned={} completions={completions} copied={copied} highest={highest:?}",
            stream.next_completion_id(),
            stream.pinned_buffers()
        ));
    }
    println!("{line}");
    Ok(())
}

/// The host's Unix listener may come up a moment after the guest: a refused connect is retried
/// for a while (the device answers RST while nobody listens).
fn connect_retrying(port: u32) -> std::io::Result<VsockStream> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match VsockStream::connect(Addr::new(Cid::HOST, Port(port))) {
            Ok(stream) => return Ok(stream),
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

fn recv(port: u32, total: Option<usize>) -> std::io::Result<()> {
    let listener = VsockListener::bind(Addr::new(Cid::ANY, Port(port)))?;
    println!("recv port={port} listening");
    let (mut stream, peer) = listener.accept()?;
    let started = Instant::now();
    let cpu = CpuTime::now();
    let mut got = Vec::new();
    match total {
        Some(total) => {
            got.resize(total, 0);
            stream.read_exact(&mut got)?;
        }
        None => {
            stream.read_to_end(&mut got)?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let busy = cpu.busy_share();
    stream.write_all(b"ok")?;
    println!(
        "recv port={port} from={} bytes={} hash={:016x} secs={secs:.3} cpu={busy:.2}",
        peer.cid.0,
        got.len(),
        djb2(&got)
    );
    Ok(())
}

/// The guest's CPU time so far, busy and in all (`/proc/stat`'s `cpu` line, in jiffies).
struct CpuTime {
    busy: u64,
    total: u64,
}

impl CpuTime {
    fn now() -> CpuTime {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let line = stat.lines().next().unwrap_or_default();
        // user nice system idle iowait irq softirq steal
        let ticks: Vec<u64> =
            line.split_whitespace().skip(1).take(8).filter_map(|t| t.parse().ok()).collect();
        let total: u64 = ticks.iter().sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        CpuTime { busy: total - idle, total }
    }

    /// The busy share of the CPU time since `self`.
    fn busy_share(&self) -> f64 {
        let now = CpuTime::now();
        let total = now.total.saturating_sub(self.total);
        now.busy.saturating_sub(self.busy) as f64 / total.max(1) as f64
    }
}

fn refused(port: u32) -> std::io::Result<()> {
    let started = Instant::now();
    match VsockStream::connect(Addr::new(Cid::HOST, Port(port))) {
        Ok(_) => Err(std::io::Error::other("connected to a port nobody listens on")),
        Err(e) => {
            println!(
                "refused port={port} errno={} secs={:.3}",
                e.raw_os_error().unwrap_or(0),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}
