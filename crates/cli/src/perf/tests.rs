//! Flags and defaults, every link moving a short verified transfer, and the checks that must
//! be able to fail (verification, refusals).

use std::io;
use std::time::Duration;

use clap::Parser;
use zerovsock::wire::{Addr, Cid, Port};

use super::conn::Conn;
use super::link::{self, Link, Pair};
use super::pattern::Pattern;
use super::throughput::{measure, Transfer};
use super::*;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    perf: PerfArgs,
}

fn parse(args: &[&str]) -> Result<PerfArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("perf").chain(args.iter().copied())).map(|c| c.perf)
}

#[test]
fn vsock_perf_flags_keep_their_names_units_and_defaults() {
    let args = parse(&[
        "--sender",
        "2",
        "--port",
        "5000",
        "--bytes",
        "1M",
        "--buf-size",
        "4K",
        "--vsk-size",
        "512K",
        "--rcvlowat",
        "2K",
        "--zerocopy",
    ])
    .unwrap();
    assert_eq!(args.sender, Some(2));
    assert_eq!(args.port, 5000);
    assert_eq!(args.bytes, Some(1 << 20));
    assert_eq!(args.buf_size, Some(4096));
    assert_eq!(args.vsk_size, Some(512 << 10));
    assert_eq!(args.rcvlowat, 2048);
    assert!(args.zerocopy);

    // vsock_perf's defaults apply to one side of a pair (the bytes and sizes a peer sees are
    // checked in tests/perf.rs)...
    let args = parse(&["--receiver"]).unwrap();
    assert_eq!((args.port, args.rcvlowat), (1234, 1));
    // ...and both sides here sweep the RFC's sizes, copy and zerocopy, 256 MiB each.
    let args = parse(&[]).unwrap();
    assert_eq!(sizes(&args), RFC_SIZES);
    assert_eq!(modes(&args), [Mode::Copy, Mode::Zerocopy]);
    assert_eq!(args.transport, None);
    assert_eq!(sizes(&parse(&["--buf-size", "64K"]).unwrap()), [65536]);
    assert_eq!(sizes(&parse(&["--sizes", "4K,1M"]).unwrap()), [4096, 1 << 20]);
    assert_eq!(modes(&parse(&["--zerocopy"]).unwrap()), [Mode::Zerocopy]);
    assert_eq!(modes(&parse(&["--copy", "--uring"]).unwrap()), [Mode::Copy, Mode::UringZc]);
}

#[test]
fn flags_that_cannot_go_together_are_refused_by_clap() {
    for bad in [
        &["--sender", "2", "--receiver"][..],
        &["--sweep", "--sizes", "4K"],
        &["--sweep", "--zerocopy"],
        &["--buf-size", "4K", "--sizes", "8K"],
        &["--rounds", "10"],
        &["--inflight", "0"],
        &["--sender", "4294967295"],
        &["--port", "4294967295"],
        &["--bytes", "12Q"],
        &["--transport", "carrier-pigeon"],
        &["--latency", "--inflight", "4"],
        &["--latency", "--runs", "3"],
    ] {
        assert!(parse(bad).is_err(), "{bad:?} should be refused");
    }
}

/// What `run` refuses, in one line each, before any socket is opened.
#[test]
fn what_cannot_run_here_is_refused_up_front_in_one_line() {
    let cases: [(&[&str], &str); 14] = [
        (&["--wait", "5"], "one side of a pair"),
        (&["--guest-cid", "7"], "one side of a pair"),
        (&["--sender", "1", "--transport", "loopback"], "inside one process"),
        (&["--receiver", "--transport", "kernel"], "not a guest booted by the project's VM lab"),
        (&["--sender", "2"], "not a guest booted"),
        (&["--receiver", "--transport", "device"], "--vhost-socket"),
        (&["--receiver", "--transport", "unix"], "--uds-path"),
        (&["--receiver", "--transport", "unix", "--uds-path", "/x", "--baseline"], "both sides"),
        (&["--uring"], "--transport kernel"),
        (&["--transport", "kernel"], "not a guest booted"),
        (&["--direction", "g2h"], "device and unix"),
        (&["--transport", "unix", "--uds-path", "/x"], "--vhost-socket"),
        (&["--sizes", "4K,4K"], "twice"),
        (&["--vsk-size", "1K"], "fewer than three"),
    ];
    for (flags, expected) in cases {
        let error = format!("{:#}", run(parse(flags).unwrap()).expect_err("refused"));
        assert!(error.contains(expected), "{flags:?}: {error:?} should say {expected:?}");
        assert!(!error.contains('\n'), "one line: {error:?}");
    }
    let mut args = parse(&["--sizes", "1"]).unwrap();
    args.bytes = Some(1 << 30);
    let error = format!("{:#}", run(args).unwrap_err());
    assert!(error.contains("sends per measurement"), "{error}");
}

fn transfer<'a>(mode: Mode, pattern: &'a Pattern, total: u64) -> Transfer<'a> {
    Transfer {
        mode,
        size: 64 << 10,
        total,
        inflight: 2,
        buffer: 256 << 10,
        rcvlowat: 1,
        port: 1234,
        pattern,
        verify: true,
    }
}

/// Runs copy and (where the link has it) zerocopy, verified; returns the COPIED shares.
fn verified_transfers(link: &mut dyn Link) -> Vec<(Mode, u64, u64)> {
    let pattern = Pattern::new(64 << 10).unwrap();
    let mut out = Vec::new();
    for mode in [Mode::Copy, Mode::Zerocopy] {
        if link.refuses(mode).is_some() {
            continue;
        }
        // Not a multiple of the message size: the last send is short.
        let total = (2 << 20) + 1000;
        let sample = measure(link, &transfer(mode, &pattern, total))
            .unwrap_or_else(|e| panic!("{} {}: {e:#}", link.name(), mode.name()));
        assert_eq!(sample.sent.bytes, total);
        assert_eq!(
            sample.sent.sends,
            33,
            "{} {}: 32 whole messages and a short one",
            link.name(),
            mode.name()
        );
        out.push((mode, sample.sent.passes, sample.sent.copied));
    }
    out
}

#[test]
fn every_host_link_moves_a_verified_transfer() {
    let mut loopback = link::StackLink::loopback();
    assert_eq!(
        verified_transfers(&mut loopback),
        [(Mode::Copy, 0, 0), (Mode::Zerocopy, 33, 0)],
        "whole messages fit the credit: no COPIED"
    );
    let mut unix = link::UnixPairLink;
    assert_eq!(verified_transfers(&mut unix), [(Mode::Copy, 0, 0)]);
    let mut tcp = link::TcpLink::new().unwrap();
    let tcp_runs = verified_transfers(&mut tcp);
    let (mode, passes, copied) = tcp_runs[1];
    assert_eq!(mode, Mode::Zerocopy);
    assert!(passes >= 33 && copied == passes, "Linux copies loopback TCP zerocopy: {tcp_runs:?}");
}

#[test]
fn the_device_and_its_hybrid_endpoints_move_verified_transfers_both_ways() {
    let harness = std::sync::Arc::new(link::DeviceHarness::ours().unwrap());
    for direction in [link::Direction::GuestToHost, link::Direction::HostToGuest] {
        let mut device = link::StackLink::device(&harness, direction).unwrap();
        let runs = verified_transfers(&mut device);
        assert_eq!(runs.len(), 2, "{direction:?}: copy and zerocopy");
        assert_eq!(runs[1].1, 33, "{direction:?}: one completion id per zerocopy send");
        let mut hybrid = link::HybridLink::new(&harness, direction);
        let runs = verified_transfers(&mut hybrid);
        let expected = if direction == link::Direction::GuestToHost { 2 } else { 1 };
        assert_eq!(runs.len(), expected, "{direction:?}: zerocopy only from the guest");
    }
}

/// A receiving end that flips one byte of what it reads, once.
struct Corrupting {
    inner: Box<dyn Conn>,
    at: u64,
    seen: u64,
}

impl Conn for Corrupting {
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.send(buf)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.recv(buf)?;
        if (self.seen..self.seen + n as u64).contains(&self.at) {
            buf[(self.at - self.seen) as usize] ^= 0x40;
        }
        self.seen += n as u64;
        Ok(n)
    }
    fn close_write(&mut self) -> io::Result<()> {
        self.inner.close_write()
    }
}

struct CorruptingLink(link::StackLink);

impl Link for CorruptingLink {
    fn name(&self) -> String {
        "corrupting".into()
    }
    fn pair(&mut self, port: u32, buffer: u64, rcvlowat: u32) -> anyhow::Result<Pair> {
        let (sender, receiver) = self.0.pair(port, buffer, rcvlowat)?;
        Ok((sender, Box::new(Corrupting { inner: receiver, at: 1_000_003, seen: 0 })))
    }
    fn refuses(&self, mode: Mode) -> Option<&'static str> {
        self.0.refuses(mode)
    }
}

#[test]
fn verify_catches_a_flipped_byte_and_names_its_offset() {
    let pattern = Pattern::new(64 << 10).unwrap();
    let mut link = CorruptingLink(link::StackLink::loopback());
    let mut plan = transfer(Mode::Copy, &pattern, 2 << 20);
    let error = format!("{:#}", measure(&mut link, &plan).expect_err("corruption found"));
    assert!(error.contains("receiver") && error.contains("byte 1000003"), "{error}");
    // Without --verify the same transfer passes: only the check caught it.
    plan.verify = false;
    measure(&mut link, &plan).unwrap();
}

#[test]
fn latency_counts_every_round_trip() {
    let pattern = Pattern::new(4096).unwrap();
    let mut loopback = link::StackLink::loopback();
    for mode in [Mode::Copy, Mode::Zerocopy] {
        let mut plan = transfer(mode, &pattern, 0);
        plan.size = 4096;
        let p = latency::measure(&mut loopback, &plan, 300).unwrap();
        assert_eq!(p.rounds, 300);
        assert!(p.p50_us > 0.0 && p.p50_us <= p.p99_us && p.p99_us <= p.max_us, "{p:?}");
    }
}

/// One side of a pair on the device, the userspace guest driver standing in for QEMU's guest:
/// our receiver verifies what a guest sends, our sender reaches a guest's listener.
#[test]
fn one_side_on_the_device_pairs_with_a_guest() {
    use std::io::{Read, Write};
    use zerovsock_testkit::guest::{GuestDriver, TxLayout};

    let dir = std::env::temp_dir().join(format!("zerovsock-perf-single-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Each run serves a device of its own: a socket each, and a guest each.
    let flags = |role: &[&str], socket: &str| {
        let mut args = vec!["--transport", "device", "--vhost-socket", socket];
        args.extend_from_slice(role);
        parse(
            &[
                &args[..],
                &[
                    "--port",
                    "7000",
                    "--bytes",
                    "3M",
                    "--buf-size",
                    "64K",
                    "--verify",
                    "--wait",
                    "20",
                ],
            ]
            .concat(),
        )
        .unwrap()
    };

    let guest_sends = |guest: &GuestDriver, data: &[u8]| {
        let mut stream = loop {
            match zerovsock::VsockStream::connect(guest.vsock(), Addr::new(Cid::HOST, Port(7000))) {
                Ok(stream) => break stream,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.write_all(data)
    };
    let pattern = Pattern::new(3 << 20).unwrap();

    // Host receiver, guest sender: the pattern passes --verify, one flipped byte does not.
    let socket = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (good, flipped, sending) =
        (socket("good.sock"), socket("flipped.sock"), socket("sender.sock"));
    let receiver = std::thread::spawn({
        let args = flags(&["--receiver"], &good);
        move || run(args)
    });
    let guest = GuestDriver::connect(good.as_ref(), TxLayout::Linux).unwrap();
    guest_sends(&guest, &pattern.at(0, 3 << 20)).expect("the guest sends");
    receiver.join().unwrap().expect("the receiver verified every byte");
    let receiver = std::thread::spawn({
        let args = flags(&["--receiver"], &flipped);
        move || run(args)
    });
    let guest = GuestDriver::connect(flipped.as_ref(), TxLayout::Linux).unwrap();
    let mut bad = pattern.at(0, 3 << 20).to_vec();
    bad[2_000_000] ^= 1;
    // The receiver stops at the bad byte and closes: the guest's last writes may fail.
    let _ = guest_sends(&guest, &bad);
    let error = format!("{:#}", receiver.join().unwrap().expect_err("a flipped byte"));
    assert!(error.contains("byte 2000000"), "{error}");

    // Host sender, guest receiver: the bytes the guest reads are the pattern's.
    let sender = std::thread::spawn({
        let args = flags(&["--sender", "3"], &sending);
        move || run(args)
    });
    let guest = GuestDriver::connect(sending.as_ref(), TxLayout::Linux).unwrap();
    let listener =
        zerovsock::VsockListener::bind(guest.vsock(), Addr::new(Cid::ANY, Port(7000))).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    // The sender holds the device, and waits for this end to close before it exits.
    drop(conn);
    sender.join().unwrap().expect("the sender");
    assert!(got == pattern.at(0, 3 << 20), "the guest read {} bytes, not the pattern", got.len());
    drop(guest);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sending end whose reads fail: the client of a ping-pong that gives up mid-echo.
struct FailingReads(Box<dyn Conn>);

impl Conn for FailingReads {
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::other("injected read failure"))
    }
    fn close_write(&mut self) -> io::Result<()> {
        self.0.close_write()
    }
}

struct FailingClientLink(link::StackLink);

impl Link for FailingClientLink {
    fn name(&self) -> String {
        "failing client".into()
    }
    fn pair(&mut self, port: u32, buffer: u64, rcvlowat: u32) -> anyhow::Result<Pair> {
        let (client, server) = self.0.pair(port, buffer, rcvlowat)?;
        Ok((Box::new(FailingReads(client)), server))
    }
    fn refuses(&self, mode: Mode) -> Option<&'static str> {
        self.0.refuses(mode)
    }
}

/// Runs `f` on a thread; None when it has not returned within `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// A latency client that fails while the echo is still sending a message larger than the
/// client's buffer does not leave the echo blocked in send() (seen hanging when the client only
/// shut down its write side before joining the echo).
#[test]
fn a_failing_latency_client_does_not_block_the_echo_forever() {
    let result = within(Duration::from_secs(20), || {
        let pattern = Pattern::new(64 << 10).unwrap();
        let mut link = FailingClientLink(link::StackLink::loopback());
        let mut plan = transfer(Mode::Copy, &pattern, 0);
        plan.buffer = 4096;
        latency::measure(&mut link, &plan, 3).map(|_| ()).map_err(|e| format!("{e:#}"))
    });
    let error =
        result.expect("latency::measure returned within 20 s").expect_err("the client failed");
    assert!(error.contains("injected read failure"), "{error}");
}

/// A zerocopy sender facing a receiver that fails (a flipped byte under --verify) gets its
/// error back promptly: the failed receiver's end is dropped, which resets the sender.
#[test]
fn a_failing_receiver_does_not_leave_a_zerocopy_sender_blocked() {
    let result = within(Duration::from_secs(20), || {
        let pattern = Pattern::new(64 << 10).unwrap();
        let mut link = CorruptingLink(link::StackLink::loopback());
        let plan = transfer(Mode::Zerocopy, &pattern, 64 << 20);
        measure(&mut link, &plan).map(|_| ()).map_err(|e| format!("{e:#}"))
    });
    let error = result.expect("measure returned within 20 s").expect_err("corruption found");
    assert!(error.contains("receiver") && error.contains("byte 1000003"), "{error}");
}

/// vsock_perf sends from the start of a page-aligned buffer: so do sends of whole pages here.
#[test]
fn zerocopy_sends_of_whole_pages_start_on_a_page_like_vsock_perfs_mmap() {
    let pattern = Pattern::new(4096).unwrap();
    let misaligned: Vec<u64> = (0..64u64)
        .map(|k| k * 4096)
        .filter(|&offset| pattern.at(offset, 4096).as_ptr() as usize % 4096 != 0)
        .collect();
    assert!(misaligned.is_empty(), "sends at {misaligned:?} span two pages");
}

/// vsock_perf runs `--rcvlowat 256K` with its 128K reads and 256K buffer: a read waits for
/// min(SO_RCVLOWAT, its length), 128K, below the buffer (`vsock_connectible_recvmsg` fails only
/// a target at the buffer size with ENOMEM). Both sides here run it too.
#[test]
fn rcvlowat_at_the_buffer_size_runs_when_reads_are_smaller() {
    assert!(check_buffer(256 << 10, 256 << 10, 128 << 10).is_ok());
    let error = check_buffer(256 << 10, 256 << 10, 256 << 10).unwrap_err().to_string();
    assert!(error.contains("ENOMEM"), "{error}");
    let args = ["--sizes", "128K", "--bytes", "1M", "--runs", "1", "--vsk-size", "256K"];
    run(parse(&[&args[..], &["--rcvlowat", "256K", "--verify"]].concat()).unwrap())
        .expect("the stack serves reads of 128K under SO_RCVLOWAT 256K");
    let at_the_buffer =
        ["--sizes", "256K", "--bytes", "1M", "--vsk-size", "256K", "--rcvlowat", "256K"];
    let refused = run(parse(&at_the_buffer).unwrap());
    assert!(format!("{:#}", refused.unwrap_err()).contains("ENOMEM"));
}
