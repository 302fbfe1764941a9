//! Tests after the 6.12 list: the ones mainline `vsock_test` added later that apply to a
//! userspace stack (their mainline numbers in the comments), and the two cases of
//! `vsock_uring_test.c`. No 6.12 C tool has them, so their control lines are this suite's
//! own, kept close to mainline's.

use std::io;
use std::time::{Duration, Instant};

use super::zerocopy::recv_completion;
use super::{djb2, errno, Case, Ctx, Expect, Failure, Half, Outcome, Verdict};
use crate::control::TIMEOUT;
use crate::list::LATER as NAMES;
use crate::peer::{Conn, Feature, Interest, RecvFlags, SockType, ZcBuf};

/// In list order after id 25.
pub const CASES: [Case; 9] = [
    Case {
        name: NAMES[0],
        client: Half::run(|ctx| unread_bytes_client(ctx, SockType::Stream)),
        server: Half::run(|ctx| unread_bytes_server(ctx, SockType::Stream)),
    },
    Case {
        name: NAMES[1],
        client: Half::run(|ctx| unread_bytes_client(ctx, SockType::Seqpacket)),
        server: Half::run(|ctx| unread_bytes_server(ctx, SockType::Seqpacket)),
    },
    Case {
        name: NAMES[2],
        client: Half::run(accepted_setsockopt_client),
        server: Half::run(accepted_setsockopt_server),
    },
    Case {
        name: NAMES[3],
        client: Half::run(coalescence_client),
        server: Half::run(coalescence_server),
    },
    Case {
        name: NAMES[4],
        client: Half::run(tx_credit_bounds_client),
        server: Half::run(tx_credit_bounds_server),
    },
    Case {
        name: NAMES[5],
        client: Half::run(peek_after_recv_client),
        server: Half::run(peek_after_recv_server),
    },
    Case {
        name: NAMES[6],
        client: Half::run(small_packets_client),
        server: Half::run(small_packets_server),
    },
    Case {
        name: NAMES[7],
        client: Half::needing(|ctx| uring_client(ctx, false), &[Feature::IoUring]),
        server: Half::run(uring_server),
    },
    Case {
        name: NAMES[8],
        client: Half::needing(|ctx| uring_client(ctx, true), &[Feature::IoUring]),
        server: Half::run(uring_server),
    },
];

const DATA_LEN: usize = 64;

/// Mainline 34/35: SIOCINQ counts the unread bytes, then 0 once they are read. An ioctl the
/// family refuses (6.12 has no SIOCINQ on vsock) skips it, as the C tool skips SIOCOUTQ.
fn unread_bytes_server(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    let conn = ctx.accept(ty)?;
    let buf = super::random_bytes(DATA_LEN, &mut super::seed());
    ctx.send_buf(&*conn, &buf, false, Expect::Bytes(DATA_LEN))?;
    ctx.writeln("SENT")?;
    ctx.expectln("RECEIVED")?;
    Ok(Verdict::default())
}

fn unread_bytes_client(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    let conn = ctx.connect(ty)?;
    ctx.expectln("SENT")?;
    ctx.step("ioctl(SIOCINQ) until 64");
    let started = Instant::now();
    loop {
        match conn.unread_bytes() {
            Ok(DATA_LEN) => break,
            Ok(n) => ctx.check(n < DATA_LEN && started.elapsed() < TIMEOUT, || {
                format!("SIOCINQ gave {n} (expected {DATA_LEN})")
            })?,
            Err(e) if matches!(e.raw_os_error(), Some(errno::EOPNOTSUPP | errno::ENOTTY)) => {
                ctx.skip(format!("SIOCINQ not supported on {}", ctx.peer.name()));
                ctx.writeln("RECEIVED")?;
                return Ok(Verdict::default());
            }
            Err(e) => return Err(ctx.fail(format!("ioctl: {}", super::describe(&e)))),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut buf = [0u8; DATA_LEN];
    ctx.recv_buf(&*conn, &mut buf, RecvFlags::NONE, Expect::Bytes(DATA_LEN))?;
    ctx.step("ioctl(SIOCINQ) after the read");
    let left = ctx.io(conn.unread_bytes())?;
    ctx.check(left == 0, || format!("SIOCINQ gave {left} after the read (expected 0)"))?;
    ctx.writeln("RECEIVED")?;
    Ok(Verdict::default())
}

/// Mainline 36: SO_ZEROCOPY can be set on an accepted socket.
fn accepted_setsockopt_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(SockType::Stream)?;
    ctx.step("setsockopt(SO_ZEROCOPY) on the accepted socket");
    ctx.io(conn.set_zerocopy(true))?;
    let on = ctx.io(conn.zerocopy())?;
    ctx.check(on, || "value mismatch: set 1 got 0".into())?;
    ctx.writeln("DONE")?;
    Ok(Verdict::default())
}

fn accepted_setsockopt_client(ctx: &mut Ctx<'_>) -> Outcome {
    let _conn = ctx.connect(SockType::Stream)?;
    ctx.expectln("DONE")?;
    Ok(Verdict::default())
}

/// Mainline 37: a small zerocopy send behind a copied one must not be merged into it (the
/// receiver would read the sender's buffer after its completion): 4097 plain bytes, then 128
/// with MSG_ZEROCOPY; the receiver waits until all are queued and checks the last 128.
const PLAIN_LEN: usize = 4097;
const ZC_LEN: usize = 128;

fn coalescence_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SockType::Stream)?;
    ctx.step("setsockopt(SO_ZEROCOPY)");
    ctx.io(conn.set_zerocopy(true))?;
    ctx.send_buf(&*conn, &[b'x'; PLAIN_LEN], false, Expect::Bytes(PLAIN_LEN))?;
    let data = super::random_bytes(ZC_LEN, &mut super::seed());
    let hash = djb2(&data);
    ctx.step("sendmsg(MSG_ZEROCOPY) of 128 bytes");
    let sent = conn.send_zerocopy(vec![ZcBuf { data, offset: 0 }]);
    ctx.expect("sendmsg", sent, Expect::Bytes(ZC_LEN))?;
    ctx.write_ulong(hash)?;
    ctx.step("poll for the completion (POLLERR)");
    let ready = ctx.io(conn.poll(Interest::NONE, Some(TIMEOUT)))?;
    ctx.check(ready.error, || "POLLERR expected".into())?;
    recv_completion(ctx, &*conn, None)?;
    ctx.expectln("DONE")?;
    Ok(Verdict::default())
}

fn coalescence_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(SockType::Stream)?;
    let mut all = vec![0u8; PLAIN_LEN + ZC_LEN];
    peek_until_queued(ctx, &*conn, &mut all)?;
    let mut plain = vec![0u8; PLAIN_LEN];
    ctx.recv_buf(&*conn, &mut plain, RecvFlags::NONE, Expect::Bytes(PLAIN_LEN))?;
    let mut data = [0u8; ZC_LEN];
    ctx.recv_buf(&*conn, &mut data, RecvFlags::NONE, Expect::Bytes(ZC_LEN))?;
    let remote = ctx.read_ulong()?;
    ctx.check(djb2(&data) == remote, || "hash mismatch".into())?;
    ctx.writeln("DONE")?;
    Ok(Verdict::default())
}

/// Peeks until `buf.len()` bytes are queued (a STREAM peek returns what is queued).
fn peek_until_queued(ctx: &Ctx<'_>, conn: &dyn Conn, buf: &mut [u8]) -> Result<(), Failure> {
    ctx.step("recv (MSG_PEEK) until everything is queued");
    let started = Instant::now();
    loop {
        let meta = ctx.io(conn.recv(buf, RecvFlags::PEEK))?;
        if meta.len == buf.len() {
            return Ok(());
        }
        ctx.check(meta.len > 0, || format!("unexpected 'recv()' return: {}", meta.len))?;
        ctx.check(started.elapsed() < TIMEOUT, || "recv (MSG_PEEK) timed out".into())?;
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Mainline 38: a sender's credit is bounded by its own buffer too: with a 64 KiB buffer it
/// queues at most 64 KiB towards a receiver that advertises 2 MiB and reads nothing.
const SMALL_BUF: u64 = 64 * 1024;
const BIG_BUF: u64 = 2 * 1024 * 1024;

fn tx_credit_bounds_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(SockType::Stream)?;
    ctx.set_buffer_max_size(&*conn, BIG_BUF)?;
    ctx.set_buffer_size(&*conn, BIG_BUF)?;
    ctx.writeln("SRVREADY")?;
    ctx.expectln("SENDDONE")?;
    Ok(Verdict::default())
}

fn tx_credit_bounds_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SockType::Stream)?;
    ctx.set_buffer_size(&*conn, SMALL_BUF)?;
    ctx.expectln("SRVREADY")?;
    // The receiver's 2 MiB may or may not be known here yet (its CREDIT_UPDATE races the
    // control line); the bound holds either way: the credit never exceeds the own 64 KiB.
    ctx.step("send without blocking until EAGAIN");
    ctx.io(conn.set_nonblocking(true))?;
    let chunk = [0u8; 4096];
    let mut total = 0u64;
    let started = Instant::now();
    loop {
        match conn.send(&chunk, false) {
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(ctx.fail(format!("send: {}", super::describe(&e)))),
        }
        ctx.check(total <= BIG_BUF && started.elapsed() < TIMEOUT, || {
            format!("sent {total} bytes without EAGAIN")
        })?;
    }
    ctx.check(total > 0 && total <= SMALL_BUF, || {
        format!("{total} bytes queued: the credit is not bounded by the sender's {SMALL_BUF}")
    })?;
    ctx.writeln("SENDDONE")?;
    Ok(Verdict::default())
}

/// Mainline 39: a peek after a partial read returns the bytes after it.
fn peek_after_recv_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SockType::Stream)?;
    let buf = super::random_bytes(DATA_LEN, &mut super::seed());
    ctx.send_buf(&*conn, &buf, false, Expect::Bytes(DATA_LEN))?;
    ctx.write_ulong(djb2(&buf))?;
    ctx.expectln("DONE")?;
    Ok(Verdict::default())
}

fn peek_after_recv_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(SockType::Stream)?;
    let mut all = [0u8; DATA_LEN];
    peek_until_queued(ctx, &*conn, &mut all)?;
    let (mut head, mut peek, mut rest) = ([0u8; 16], [0u8; 48], [0u8; 48]);
    ctx.recv_buf(&*conn, &mut head, RecvFlags::NONE, Expect::Bytes(16))?;
    ctx.recv_buf(&*conn, &mut peek, RecvFlags::PEEK, Expect::Bytes(48))?;
    ctx.recv_buf(&*conn, &mut rest, RecvFlags::NONE, Expect::Bytes(48))?;
    ctx.check(peek == rest, || "peek after a partial read returned other bytes".into())?;
    let remote = ctx.read_ulong()?;
    let whole: Vec<u8> = head.iter().chain(rest.iter()).copied().collect();
    ctx.check(djb2(&whole) == remote, || "hash mismatch".into())?;
    ctx.writeln("DONE")?;
    Ok(Verdict::default())
}

/// Mainline 40: sends of 129-512 bytes into a receiver that reads nothing until the credit is
/// used up: the small packets must not overflow its queue (no reset), and every byte arrives.
const SMALL_SENDS: usize = 4096;

fn small_packets_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SockType::Stream)?;
    let mut seed = super::seed();
    let mut sent = Vec::new();
    ctx.step("small sends without blocking until EAGAIN");
    ctx.io(conn.set_nonblocking(true))?;
    let mut filled = false;
    for _ in 0..SMALL_SENDS {
        let len = 129 + usize::from(super::random_bytes(2, &mut seed)[0]) * 383 / 255;
        let data = super::random_bytes(len, &mut seed);
        let mut at = 0;
        while at < len {
            match conn.send(&data[at..], false) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !filled => {
                    // The receiver's credit is used up: let it start reading, then block.
                    filled = true;
                    ctx.writeln("FILLED")?;
                    ctx.step("small sends");
                    ctx.io(conn.set_nonblocking(false))?;
                }
                Err(e) => return Err(ctx.fail(format!("send: {}", super::describe(&e)))),
            }
        }
        sent.extend_from_slice(&data);
    }
    if !filled {
        ctx.writeln("FILLED")?;
    }
    ctx.step("shutdown(SHUT_WR)");
    ctx.io(conn.shutdown(std::net::Shutdown::Write))?;
    ctx.write_ulong(sent.len() as u64)?;
    ctx.write_ulong(djb2(&sent))?;
    ctx.expectln("DONE")?;
    Ok(Verdict::default())
}

fn small_packets_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(SockType::Stream)?;
    ctx.expectln("FILLED")?;
    ctx.step("read until end of stream");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let meta = ctx.io(conn.recv(&mut buf, RecvFlags::NONE))?;
        if meta.len == 0 {
            break;
        }
        got.extend_from_slice(&buf[..meta.len]);
    }
    let len = ctx.read_ulong()?;
    let hash = ctx.read_ulong()?;
    ctx.check(got.len() as u64 == len, || format!("{} bytes read, {len} sent", got.len()))?;
    ctx.check(djb2(&got) == hash, || "hash mismatch".into())?;
    ctx.writeln("DONE")?;
    Ok(Verdict::default())
}

/// `vsock_uring_test.c`'s data sets: (offset of the base, length).
const URING_DATA: [&[(usize, usize)]; 2] =
    [&[(0, 4096), (0, 8192), (0, 12288)], &[(0, 4096), (1, 200), (0, 12288)]];

/// `vsock_uring_test.c` 0 and 1: one io_uring send of an iovec per data set (with
/// SO_ZEROCOPY for 1), then its hash. Sent with `SENDMSG_ZC` in both: the kernel copies when
/// SO_ZEROCOPY is off (the C tool's test 0 uses plain `SENDMSG`).
fn uring_client(ctx: &mut Ctx<'_>, zerocopy: bool) -> Outcome {
    let mut seed = super::seed();
    for vecs in URING_DATA {
        let conn = ctx.connect(SockType::Stream)?;
        if zerocopy {
            ctx.step("setsockopt(SO_ZEROCOPY)");
            ctx.io(conn.set_zerocopy(true))?;
        }
        let bufs: Vec<ZcBuf> = vecs
            .iter()
            .map(|&(offset, len)| {
                let mut data = vec![0u8; offset];
                data.extend(super::random_bytes(len, &mut seed));
                ZcBuf { data, offset }
            })
            .collect();
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.as_ref().to_vec()).collect();
        ctx.step("io_uring sendmsg");
        let (sent, _copied) = ctx.io(conn.uring_sendmsg(bufs))?;
        ctx.check(sent == all.len(), || format!("io_uring sent {sent} of {}", all.len()))?;
        ctx.write_ulong(djb2(&all))?;
        ctx.writeln("DONE")?;
    }
    if !zerocopy {
        ctx.note("sent with SENDMSG_ZC and SO_ZEROCOPY off (a copy), not plain SENDMSG");
    }
    Ok(Verdict::default())
}

fn uring_server(ctx: &mut Ctx<'_>) -> Outcome {
    for vecs in URING_DATA {
        let conn = ctx.accept(SockType::Stream)?;
        let len: usize = vecs.iter().map(|&(_, len)| len).sum();
        let mut buf = vec![0u8; len];
        ctx.recv_buf(&*conn, &mut buf, RecvFlags::NONE, Expect::Bytes(len))?;
        let remote = ctx.read_ulong()?;
        ctx.check(djb2(&buf) == remote, || "hash mismatch".into())?;
        ctx.expectln("DONE")?;
    }
    Ok(Verdict::default())
}
