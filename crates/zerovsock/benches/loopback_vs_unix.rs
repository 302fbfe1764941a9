//! End-to-end throughput of the loopback transport beside an AF_UNIX stream socketpair, in the
//! same run, at the RFC's message sizes (issue 9's target: vsock copy and zerocopy at least the
//! socketpair's figure at every size).
//!
//! One sender and one receiver thread, the reader's buffer the size of a message; the zerocopy
//! sender waits for each completion before the next send (`vsock_perf --zerocopy`). The three
//! transfers are interleaved run by run so that drift on a shared machine hits them alike, and
//! the median is printed. `cargo bench -p zerovsock --bench loopback_vs_unix`, with:
//! * `ZV_BYTES` (default 256 MiB) moved per measurement, `ZV_RUNS` (5) repetitions,
//! * `ZV_SIZES` (`4K,32K,256K,1M,8M`), `ZV_MODES` (`unix,copy,zc`: the transfers measured),
//! * `ZV_HOGS=N`: N busy threads compete for the cores during the whole run (an oversubscribed
//!   machine),
//! * `ZV_NOSPIN=1`: blocked calls sleep at once ([`Vsock::set_spin`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{Interest, Vsock, VsockSocket, VsockStream};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn parse_size(text: &str) -> usize {
    let text = text.trim();
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        _ => (text, 0),
    };
    digits.parse::<usize>().expect("a size such as 4K") << shift
}

/// Reads `total` bytes with a buffer of `size`; returns when the last arrived.
fn drain(mut reader: impl Read, size: usize, total: usize) -> Instant {
    let mut buf = vec![0u8; size];
    let mut received = 0;
    while received < total {
        let n = reader.read(&mut buf).expect("read");
        assert!(n > 0, "sender closed after {received} of {total} bytes");
        received += n;
    }
    Instant::now()
}

fn unix(size: usize, total: usize) -> Duration {
    let (mut tx, rx) = UnixStream::pair().expect("socketpair");
    let receiver = thread::spawn(move || drain(rx, size, total));
    let buf = vec![0x5au8; size];
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(size);
        tx.write_all(&buf[..n]).expect("write");
        left -= n;
    }
    receiver.join().expect("receiver").saturating_duration_since(start)
}

fn vsock_pair(size: usize, spin: bool) -> (VsockStream, thread::JoinHandle<VsockStream>) {
    let vsock = Vsock::loopback();
    vsock.set_spin(spin);
    // Four messages of room, at least Linux's 256 KiB, as `zerovsock perf` sizes it.
    let buffer = (4 * size as u64).max(256 << 10);
    let listener = VsockSocket::stream(&vsock).expect("socket");
    listener.bind(Addr::new(Cid::ANY, Port(1234))).expect("bind");
    listener.set_buffer_size_unclamped(buffer).expect("buffer");
    let listener = listener.listen(1).expect("listen");
    let accepted = thread::spawn(move || listener.accept().expect("accept").0);
    let socket = VsockSocket::stream(&vsock).expect("socket");
    socket.set_buffer_size_unclamped(buffer).expect("buffer");
    (socket.connect(Addr::new(Cid::LOCAL, Port(1234))).expect("connect"), accepted)
}

fn vsock(size: usize, total: usize, zerocopy: bool, spin: bool) -> Duration {
    let (sender, accepted) = vsock_pair(size, spin);
    let receiver = accepted.join().expect("accept");
    let receiver = thread::spawn(move || drain(&receiver, size, total));
    let buf = Bytes::from(vec![0x5au8; size]);
    if zerocopy {
        sender.set_zerocopy(true).expect("SO_ZEROCOPY");
    }
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(size);
        if zerocopy {
            let sent = sender.send_zerocopy(buf.slice(..n)).expect("send");
            assert_eq!(sent, n);
            loop {
                let ready = sender.poll(Interest::NONE, None).expect("poll");
                assert!(ready.error);
                if sender.recv_completion().is_ok() {
                    break;
                }
            }
        } else {
            (&sender).write_all(&buf[..n]).expect("write");
        }
        left -= n;
    }
    let end = receiver.join().expect("receiver");
    end.saturating_duration_since(start)
}

/// Gbit/s of the median run (NaN for a transfer not measured).
fn gbps(bytes: usize, mut times: Vec<Duration>) -> f64 {
    times.sort();
    let median = times.get(times.len() / 2).map_or(f64::NAN, Duration::as_secs_f64);
    bytes as f64 * 8.0 / median / 1e9
}

fn main() {
    let total = parse_size(&env("ZV_BYTES", "256M"));
    let runs: usize = env("ZV_RUNS", "5").parse().expect("ZV_RUNS");
    let sizes: Vec<usize> =
        env("ZV_SIZES", "4K,32K,256K,1M,8M").split(',').map(parse_size).collect();
    let hogs: usize = env("ZV_HOGS", "0").parse().expect("ZV_HOGS");
    let spin = env("ZV_NOSPIN", "0") == "0";
    let modes = env("ZV_MODES", "unix,copy,zc");
    let on = |mode: &str| modes.split(',').any(|m| m == mode);
    let stop = Arc::new(AtomicBool::new(false));
    let hog_threads: Vec<_> = (0..hogs)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    println!(
        "{} per measurement, median of {runs}, {hogs} CPU hogs, spin {spin}; e2e Gbit/s",
        total >> 20
    );
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "size", "unix", "vs copy", "vs zc", "copy/ux", "zc/ux"
    );
    for size in sizes {
        let (mut u, mut c, mut z) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            if on("unix") {
                u.push(unix(size, total));
            }
            if on("copy") {
                c.push(vsock(size, total, false, spin));
            }
            if on("zc") {
                z.push(vsock(size, total, true, spin));
            }
        }
        let (u, c, z) = (gbps(total, u), gbps(total, c), gbps(total, z));
        println!("{:>5}K {u:>9.2} {c:>9.2} {z:>9.2} {:>8.2} {:>8.2}", size >> 10, c / u, z / u);
    }
    stop.store(true, Ordering::Relaxed);
    hog_threads.into_iter().for_each(|h| h.join().expect("hog"));
}
