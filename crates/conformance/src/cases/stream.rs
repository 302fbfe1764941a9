//! The SOCK_STREAM tests of `vsock_test.c` (6.12), half for half.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::{errno, Case, Ctx, Expect, Failure, Half, Outcome, Verdict};
use crate::control::TIMEOUT;
use crate::list::KERNEL_6_12 as NAMES;
use crate::peer::{Feature, Interest, RecvFlags, SockType};

const STREAM: SockType = SockType::Stream;

/// 0: a connect to a port nobody binds fails with ECONNRESET (the peer answers RST).
pub const CONNECTION_RESET: Case =
    Case { name: NAMES[0], client: Half::run(connection_reset_client), server: Half::NONE };

fn connection_reset_client(ctx: &mut Ctx<'_>) -> Outcome {
    ctx.step("connect");
    let result = ctx.peer.connect(STREAM, ctx.peer_addr(), None);
    expect_refused(ctx, result.map(drop))?;
    Ok(Verdict::default())
}

fn expect_refused(ctx: &Ctx<'_>, result: std::io::Result<()>) -> Result<(), Failure> {
    match result {
        Ok(()) => Err(ctx.fail("expected connect(2) failure, got 0")),
        Err(e) if e.raw_os_error() == Some(errno::ECONNRESET) => Ok(()),
        Err(e) => Err(ctx.fail(format!("unexpected connect(2) errno: {}", super::describe(&e)))),
    }
}

/// 1: a port bound but not listening also resets.
pub const BIND_ONLY: Case = Case {
    name: NAMES[1],
    client: Half::run(bind_only_client),
    server: Half::run(bind_only_server),
};

fn bind_only_client(ctx: &mut Ctx<'_>) -> Outcome {
    ctx.expectln("BIND")?;
    ctx.step("connect");
    let result = ctx.peer.connect(STREAM, ctx.peer_addr(), None);
    expect_refused(ctx, result.map(drop))?;
    ctx.writeln("DONE")?;
    Ok(Verdict::default())
}

fn bind_only_server(ctx: &mut Ctx<'_>) -> Outcome {
    ctx.step("bind");
    let bound = ctx.io(ctx.peer.bind_only(STREAM, ctx.any_port()))?;
    ctx.writeln("BIND")?;
    ctx.expectln("DONE")?;
    drop(bound);
    Ok(Verdict::default())
}

/// 2: the client sends a byte and closes; the server sees the close, then EPIPE on send,
/// then the byte, then end of stream.
pub const CLIENT_CLOSE: Case = Case {
    name: NAMES[2],
    client: Half::run(send_byte_and_close_client),
    server: Half::run(see_close_server),
};

fn send_byte_and_close_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(STREAM)?;
    ctx.send_byte(&*conn, Expect::Bytes(1))?;
    Ok(Verdict::default())
}

fn see_close_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(STREAM)?;
    see_close(ctx, &*conn)
}

fn see_close(ctx: &mut Ctx<'_>, conn: &dyn crate::peer::Conn) -> Outcome {
    ctx.wait_remote_close(conn)?;
    ctx.send_byte(conn, Expect::Errno(errno::EPIPE))?;
    ctx.recv_byte(conn, Expect::Bytes(1))?;
    ctx.recv_byte(conn, Expect::Bytes(0))?;
    Ok(Verdict::default())
}

/// 3: the mirror of 2.
pub const SERVER_CLOSE: Case = Case {
    name: NAMES[3],
    client: Half::run(see_close_client),
    server: Half::run(send_byte_and_close_server),
};

fn see_close_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(STREAM)?;
    see_close(ctx, &*conn)
}

fn send_byte_and_close_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(STREAM)?;
    ctx.send_byte(&*conn, Expect::Bytes(1))?;
    Ok(Verdict::default())
}

/// 4: 100 connections at once, a fresh listener for each; a byte each way in turn.
pub const MULTIPLE_CONNECTIONS: Case = Case {
    name: NAMES[4],
    client: Half::run(multiconn_client),
    server: Half::run(multiconn_server),
};

const MULTICONN: usize = 100;

fn multiconn_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conns = (0..MULTICONN).map(|_| ctx.connect(STREAM)).collect::<Result<Vec<_>, _>>()?;
    for (i, conn) in conns.iter().enumerate() {
        if i % 2 == 1 {
            ctx.recv_byte(&**conn, Expect::Bytes(1))?;
        } else {
            ctx.send_byte(&**conn, Expect::Bytes(1))?;
        }
    }
    Ok(Verdict::default())
}

fn multiconn_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conns = (0..MULTICONN).map(|_| ctx.accept(STREAM)).collect::<Result<Vec<_>, _>>()?;
    for (i, conn) in conns.iter().enumerate() {
        if i % 2 == 1 {
            ctx.send_byte(&**conn, Expect::Bytes(1))?;
        } else {
            ctx.recv_byte(&**conn, Expect::Bytes(1))?;
        }
    }
    Ok(Verdict::default())
}

/// 5: MSG_PEEK: EAGAIN before any data, partial and whole peeks agree with the read.
pub const MSG_PEEK: Case = Case {
    name: NAMES[5],
    client: Half::run(|ctx| msg_peek_client(ctx, STREAM)),
    server: Half::run(|ctx| msg_peek_server(ctx, STREAM)),
};

const MSG_PEEK_LEN: usize = 64;

pub(super) fn msg_peek_client(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    let conn = ctx.connect(ty)?;
    let buf = super::random_bytes(MSG_PEEK_LEN, &mut super::seed());
    ctx.expectln("SRVREADY")?;
    ctx.send_buf(&*conn, &buf, false, Expect::Bytes(buf.len()))?;
    Ok(Verdict::default())
}

pub(super) fn msg_peek_server(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    let conn = ctx.accept(ty)?;
    let (mut half, mut peek, mut normal) = ([0u8; 32], [0u8; MSG_PEEK_LEN], [0u8; MSG_PEEK_LEN]);
    let dontwait_peek = RecvFlags { peek: true, dontwait: true };
    ctx.recv_buf(&*conn, &mut peek, dontwait_peek, Expect::Errno(errno::EAGAIN))?;
    ctx.writeln("SRVREADY")?;
    ctx.recv_buf(&*conn, &mut half, RecvFlags::PEEK, Expect::Bytes(32))?;
    ctx.recv_buf(&*conn, &mut peek, RecvFlags::PEEK, Expect::Bytes(MSG_PEEK_LEN))?;
    ctx.check(half[..] == peek[..half.len()], || "Partial peek data mismatch".into())?;
    if ty == SockType::Seqpacket {
        // MSG_PEEK | MSG_TRUNC into 32 bytes reports the whole message's 64.
        ctx.step("recv (MSG_PEEK | MSG_TRUNC)");
        let meta = ctx.io(conn.recv(&mut half, RecvFlags::PEEK))?;
        ctx.check(meta.message_len == MSG_PEEK_LEN, || {
            format!("bogus recv(2) return value {} (expected {MSG_PEEK_LEN})", meta.message_len)
        })?;
    }
    ctx.recv_buf(&*conn, &mut normal, RecvFlags::NONE, Expect::Bytes(MSG_PEEK_LEN))?;
    ctx.check(peek == normal, || "Full peek data mismatch".into())?;
    Ok(Verdict::default())
}

/// 10: poll() under SO_RCVLOWAT 128: nothing after 1 byte, exactly POLLIN|POLLRDNORM after
/// 128, and a MSG_DONTWAIT read of 128 then succeeds.
pub const POLL_RCVLOWAT: Case = Case {
    name: NAMES[10],
    client: Half::run(poll_rcvlowat_client),
    server: Half::run(poll_rcvlowat_server),
};

const RCVLOWAT: usize = 128;

fn poll_rcvlowat_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(STREAM)?;
    ctx.send_byte(&*conn, Expect::Bytes(1))?;
    ctx.writeln("SRVSENT")?;
    ctx.expectln("CLNSENT")?;
    for _ in 0..RCVLOWAT - 1 {
        ctx.send_byte(&*conn, Expect::Bytes(1))?;
    }
    ctx.expectln("POLLDONE")?;
    Ok(Verdict::default())
}

fn poll_rcvlowat_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(STREAM)?;
    ctx.set_rcvlowat(&*conn, RCVLOWAT as u32)?;
    ctx.expectln("SRVSENT")?;
    ctx.step("poll (1 byte queued, SO_RCVLOWAT 128)");
    let ready = ctx.io(conn.poll(Interest::READABLE, Some(Duration::from_secs(1))))?;
    ctx.check(revents(&ready).is_empty(), || format!("Unexpected poll result {ready:?}"))?;
    ctx.writeln("CLNSENT")?;
    ctx.step("poll (128 bytes queued)");
    let ready = ctx.io(conn.poll(Interest::READABLE, Some(TIMEOUT)))?;
    ctx.check(revents(&ready) == ["POLLIN"], || format!("Unexpected poll result {ready:?}"))?;
    let mut buf = [0u8; RCVLOWAT];
    ctx.recv_buf(&*conn, &mut buf, RecvFlags::DONTWAIT, Expect::Bytes(RCVLOWAT))?;
    ctx.writeln("POLLDONE")?;
    Ok(Verdict::default())
}

/// The events `poll` reports for POLLIN | POLLRDNORM interest (POLLRDNORM comes with
/// POLLIN): POLLIN, and POLLERR and POLLHUP, which are always reported.
fn revents(ready: &crate::peer::Readiness) -> Vec<&'static str> {
    let mut events = Vec::new();
    if ready.readable {
        events.push("POLLIN");
    }
    if ready.error {
        events.push("POLLERR");
    }
    if ready.hangup {
        events.push("POLLHUP");
    }
    events
}

/// 12: a read into an invalid buffer fails with EFAULT and leaves the data queued.
pub const INVALID_BUFFER: Case = Case {
    name: NAMES[12],
    client: Half::needing(|ctx| invalid_buffer_client(ctx, STREAM), &[Feature::UnmappedMemory]),
    server: Half::run(|ctx| invalid_buffer_server(ctx, STREAM)),
};

const INVALID_BUFFER_LEN: usize = 512;

pub(super) fn invalid_buffer_client(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    let conn = ctx.connect(ty)?;
    ctx.expectln("SENDDONE")?;
    ctx.step("recv into NULL");
    let result = conn.recv_unmapped(INVALID_BUFFER_LEN);
    ctx.expect("recv", result, Expect::Errno(errno::EFAULT))?;
    let expected = match ty {
        // A stream keeps the bytes; a SEQPACKET message is gone.
        SockType::Stream => Expect::Bytes(INVALID_BUFFER_LEN),
        SockType::Seqpacket => Expect::Errno(errno::EAGAIN),
    };
    let mut data = [0u8; INVALID_BUFFER_LEN];
    ctx.recv_buf(&*conn, &mut data, RecvFlags::DONTWAIT, expected)?;
    ctx.writeln("DONE")?;
    Ok(Verdict::default())
}

pub(super) fn invalid_buffer_server(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    let conn = ctx.accept(ty)?;
    let data = [0u8; INVALID_BUFFER_LEN];
    ctx.send_buf(&*conn, &data, false, Expect::Bytes(data.len()))?;
    ctx.writeln("SENDDONE")?;
    ctx.expectln("DONE")?;
    Ok(Verdict::default())
}

/// 14: "WORLD" sent after a partial read of "HELLO" reads back as "LLOWORLD", nothing more.
pub const SKB_MERGE: Case = Case {
    name: NAMES[14],
    client: Half::run(skb_merge_client),
    server: Half::run(skb_merge_server),
};

fn skb_merge_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(STREAM)?;
    ctx.send_buf(&*conn, b"HELLO", false, Expect::Bytes(5))?;
    ctx.writeln("SEND0")?;
    ctx.expectln("REPLY0")?;
    ctx.send_buf(&*conn, b"WORLD", false, Expect::Bytes(5))?;
    ctx.writeln("SEND1")?;
    ctx.expectln("REPLY1")?;
    Ok(Verdict::default())
}

fn skb_merge_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(STREAM)?;
    let mut buf = [0u8; 64];
    ctx.expectln("SEND0")?;
    ctx.recv_buf(&*conn, &mut buf[..2], RecvFlags::NONE, Expect::Bytes(2))?;
    ctx.writeln("REPLY0")?;
    ctx.expectln("SEND1")?;
    ctx.recv_buf(&*conn, &mut buf[2..10], RecvFlags::NONE, Expect::Bytes(8))?;
    ctx.recv_buf(&*conn, &mut buf[10..], RecvFlags::DONTWAIT, Expect::Errno(errno::EAGAIN))?;
    ctx.check(&buf[..10] == b"HELLOWORLD", || "pattern mismatch".into())?;
    ctx.writeln("REPLY1")?;
    Ok(Verdict::default())
}

/// 16: after the client's SHUT_WR, its sends fail with EPIPE.
pub const SHUT_WR: Case = Case {
    name: NAMES[16],
    client: Half::run(shut_wr_client),
    server: Half::run(wait_client_done_server),
};

fn shut_wr_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(STREAM)?;
    ctx.step("shutdown(SHUT_WR)");
    ctx.io(conn.shutdown(Shutdown::Write))?;
    check_epipe(ctx, &*conn)?;
    ctx.writeln("CLIENTDONE")?;
    Ok(Verdict::default())
}

/// `test_stream_check_sigpipe`: two sends fail with EPIPE. The C tool also checks that the
/// first raises SIGPIPE and the second (MSG_NOSIGNAL) does not; a Rust program ignores
/// SIGPIPE and the userspace stack raises no signals, so that part is noted, not checked.
fn check_epipe(ctx: &mut Ctx<'_>, conn: &dyn crate::peer::Conn) -> Result<(), Failure> {
    ctx.send_byte(conn, Expect::Errno(errno::EPIPE))?;
    ctx.send_byte(conn, Expect::Errno(errno::EPIPE))?;
    ctx.note("SIGPIPE not checked: Rust programs ignore it, EPIPE checked instead");
    Ok(())
}

fn wait_client_done_server(ctx: &mut Ctx<'_>) -> Outcome {
    let _conn = ctx.accept(STREAM)?;
    ctx.expectln("CLIENTDONE")?;
    Ok(Verdict::default())
}

/// 17: after the server's SHUT_RD, the client's sends fail with EPIPE.
pub const SHUT_RD: Case =
    Case { name: NAMES[17], client: Half::run(shut_rd_client), server: Half::run(shut_rd_server) };

fn shut_rd_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(STREAM)?;
    ctx.expectln("SHUTRDDONE")?;
    check_epipe(ctx, &*conn)?;
    ctx.writeln("CLIENTDONE")?;
    Ok(Verdict::default())
}

fn shut_rd_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(STREAM)?;
    ctx.step("shutdown(SHUT_RD)");
    ctx.io(conn.shutdown(Shutdown::Read))?;
    ctx.writeln("SHUTRDDONE")?;
    ctx.expectln("CLIENTDONE")?;
    Ok(Verdict::default())
}

/// 21: a client bound to `peer_port + 1` connects and closes twice: the port is free again
/// after each close.
pub const DOUBLE_BIND_CONNECT: Case = Case {
    name: NAMES[21],
    client: Half::run(double_bind_connect_client),
    server: Half::run(double_bind_connect_server),
};

fn double_bind_connect_server(ctx: &mut Ctx<'_>) -> Outcome {
    ctx.step("listen");
    let listener = ctx.io(ctx.peer.listen(STREAM, ctx.any_port(), 1))?;
    // The accepted sockets stay open to the end, as in the C tool: closing one whose peer
    // has shut down both ways sends another RST to its (cid, port) pair
    // (`virtio_transport_close`), which may by then be the client's next connection.
    let mut accepted = Vec::new();
    for _ in 0..2 {
        ctx.writeln("LISTENING")?;
        ctx.step("accept");
        let (conn, _) = ctx.io(listener.accept(TIMEOUT))?;
        ctx.wait_remote_close(&*conn)?;
        accepted.push(conn);
    }
    Ok(Verdict::default())
}

fn double_bind_connect_client(ctx: &mut Ctx<'_>) -> Outcome {
    for _ in 0..2 {
        ctx.expectln("LISTENING")?;
        let port = ctx.peer_port + 1;
        drop(ctx.bind_connect(STREAM, port)?);
    }
    Ok(Verdict::default())
}

/// 22: reading 64 KiB of a full 128 KiB buffer sends no credit update, but raising
/// SO_RCVLOWAT above what is queued must, or the last byte never comes.
pub const CREDIT_UPDATE_SET_RCVLOWAT: Case = Case {
    name: NAMES[22],
    client: Half::run(credit_update_client),
    server: Half::run(|ctx| credit_update_server(ctx, false)),
};

/// 23: the same with SO_RCVLOWAT set first: the read that leaves less than it queued must
/// send the credit update.
pub const CREDIT_UPDATE_LOW_RX_BYTES: Case = Case {
    name: NAMES[23],
    client: Half::run(credit_update_client),
    server: Half::run(|ctx| credit_update_server(ctx, true)),
};

const CREDIT_BUF: usize = 128 * 1024;
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`, which decides when Linux sends a credit update.
const MAX_PKT_BUF: usize = 64 * 1024;

fn credit_update_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(STREAM)?;
    let buf = vec![0u8; CREDIT_BUF + 1];
    ctx.recv_byte(&*conn, Expect::Bytes(1))?;
    // One send(2), as the C tool makes; it returns once every byte is queued.
    ctx.step("send 128 KiB + 1");
    let sent = ctx.io(conn.send(&buf, false))?;
    ctx.check(sent == buf.len(), || format!("send failed: {sent} of {} bytes", buf.len()))?;
    Ok(Verdict::default())
}

fn credit_update_server(ctx: &mut Ctx<'_>, low_rx_bytes: bool) -> Outcome {
    let conn = ctx.accept(STREAM)?;
    ctx.set_buffer_size(&*conn, CREDIT_BUF as u64)?;
    if low_rx_bytes {
        ctx.set_rcvlowat(&*conn, MAX_PKT_BUF as u32 + 1)?;
    }
    ctx.send_byte(&*conn, Expect::Bytes(1))?;
    let mut buf = vec![0u8; CREDIT_BUF];
    ctx.step("recv (MSG_PEEK) until 128 KiB are queued");
    let started = Instant::now();
    loop {
        let meta = ctx.io(conn.recv(&mut buf, crate::peer::RecvFlags::PEEK))?;
        if meta.len == CREDIT_BUF {
            break;
        }
        ctx.check(meta.len > 0, || format!("unexpected 'recv()' return: {}", meta.len))?;
        ctx.check(started.elapsed() < TIMEOUT, || "recv (MSG_PEEK) timed out".into())?;
    }
    ctx.recv_buf(&*conn, &mut buf[..MAX_PKT_BUF], RecvFlags::NONE, Expect::Bytes(MAX_PKT_BUF))?;
    let mut want = MAX_PKT_BUF;
    if !low_rx_bytes {
        want += 1;
        ctx.set_rcvlowat(&*conn, want as u32)?;
    }
    ctx.step("poll for the last byte");
    let ready = ctx.io(conn.poll(Interest::READABLE, Some(TIMEOUT)))?;
    ctx.check(!ready.error, || "'poll()' error".into())?;
    ctx.check(ready.readable, || "POLLIN | POLLRDNORM expected".into())?;
    let mut rest = vec![0u8; want];
    ctx.recv_buf(&*conn, &mut rest, RecvFlags::DONTWAIT, Expect::Bytes(want))?;
    Ok(Verdict::default())
}

/// 24: SIOCOUTQ reaches 0 once the peer has the data (EOPNOTSUPP: skipped, as the C tool).
pub const UNSENT_BYTES: Case = Case {
    name: NAMES[24],
    client: Half::run(|ctx| unsent_bytes_client(ctx, STREAM)),
    server: Half::run(|ctx| unsent_bytes_server(ctx, STREAM)),
};

const IOCTL_LEN: usize = 64;

pub(super) fn unsent_bytes_server(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    let conn = ctx.accept(ty)?;
    let mut buf = [0u8; IOCTL_LEN];
    ctx.recv_buf(&*conn, &mut buf, RecvFlags::NONE, Expect::Bytes(IOCTL_LEN))?;
    ctx.writeln("RECEIVED")?;
    Ok(Verdict::default())
}

pub(super) fn unsent_bytes_client(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    let conn = ctx.connect(ty)?;
    let buf = super::random_bytes(IOCTL_LEN, &mut super::seed());
    ctx.send_buf(&*conn, &buf, false, Expect::Bytes(IOCTL_LEN))?;
    ctx.expectln("RECEIVED")?;
    ctx.step("ioctl(SIOCOUTQ) until 0");
    let started = Instant::now();
    loop {
        match conn.unsent_bytes() {
            Ok(0) => break,
            Ok(n) => ctx.check(started.elapsed() < TIMEOUT, || {
                format!("SIOCOUTQ timed out with {n} bytes unsent")
            })?,
            Err(e) if e.raw_os_error() == Some(errno::EOPNOTSUPP) => {
                ctx.skip(format!("SIOCOUTQ not supported on {}", ctx.peer.name()));
                break;
            }
            Err(e) => return Err(ctx.fail(format!("ioctl: {}", super::describe(&e)))),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Verdict::default())
}
