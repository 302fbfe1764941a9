//! The SOCK_SEQPACKET tests of `vsock_test.c` (6.12), half for half.

use std::time::{Duration, Instant};

use super::stream::{
    invalid_buffer_client, invalid_buffer_server, msg_peek_client, msg_peek_server,
    unsent_bytes_client, unsent_bytes_server,
};
use super::{djb2, errno, Case, Ctx, Expect, Half, Outcome, Verdict};
use crate::list::KERNEL_6_12 as NAMES;
use crate::peer::{Feature, RecvFlags, SockType};

const SEQPACKET: SockType = SockType::Seqpacket;
const PAGE: usize = 4096;

/// 6: 128 messages of 1 byte to 4 pages, some with MSG_EOR: every receive returns one whole
/// message with its MSG_EOR, checked as a sum of hashes plus the number of EOR messages.
pub const MSG_BOUNDS: Case = Case {
    name: NAMES[6],
    client: Half::run(msg_bounds_client),
    server: Half::run(msg_bounds_server),
};

const SOCK_BUF_SIZE: u64 = 2 * 1024 * 1024;
const MAX_MSG_PAGES: usize = 4;

fn big_buffers(ctx: &Ctx<'_>, conn: &dyn crate::peer::Conn) -> Result<(), super::Failure> {
    ctx.set_buffer_max_size(conn, SOCK_BUF_SIZE)?;
    ctx.set_buffer_size(conn, SOCK_BUF_SIZE)
}

fn msg_bounds_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SEQPACKET)?;
    big_buffers(ctx, &*conn)?;
    ctx.expectln("SRVREADY")?;
    let mut seed = super::seed();
    let mut hash = 0u64;
    let max_msg = MAX_MSG_PAGES * PAGE;
    let count = SOCK_BUF_SIZE as usize / max_msg;
    for i in 0..count {
        let roll = super::random_bytes(8, &mut seed);
        let r = u64::from_le_bytes(roll.try_into().unwrap_or_default()) as usize;
        let len = if i & 1 == 1 { PAGE + r % (max_msg - PAGE) } else { 1 + r % PAGE };
        let buf = vec![(r >> 32) as u8; len];
        let eor = i == count / 2 || (r >> 40) & 1 == 1;
        if eor {
            hash = hash.wrapping_add(1);
        }
        ctx.send_buf(&*conn, &buf, eor, Expect::Bytes(len))?;
        hash = hash.wrapping_add(djb2(&buf));
    }
    ctx.writeln("SENDDONE")?;
    ctx.write_ulong(hash)?;
    Ok(Verdict::default())
}

fn msg_bounds_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(SEQPACKET)?;
    big_buffers(ctx, &*conn)?;
    ctx.writeln("SRVREADY")?;
    ctx.expectln("SENDDONE")?;
    let mut buf = vec![0u8; MAX_MSG_PAGES * PAGE];
    let mut hash = 0u64;
    ctx.step("recvmsg until end of stream");
    loop {
        let meta = ctx.io(conn.recv(&mut buf, RecvFlags::NONE))?;
        if meta.len == 0 {
            break;
        }
        if meta.eor {
            hash = hash.wrapping_add(1);
        }
        hash = hash.wrapping_add(djb2(&buf[..meta.len]));
    }
    drop(conn);
    let remote = ctx.read_ulong()?;
    ctx.check(hash == remote, || "Message bounds broken".into())?;
    Ok(Verdict::default())
}

/// 7: a 32-byte message read into 16 bytes with MSG_TRUNC reports 32 and MSG_TRUNC.
pub const MSG_TRUNC: Case = Case {
    name: NAMES[7],
    client: Half::run(msg_trunc_client),
    server: Half::run(msg_trunc_server),
};

const TRUNC_LEN: usize = 32;

fn msg_trunc_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SEQPACKET)?;
    ctx.send_buf(&*conn, &[0u8; TRUNC_LEN], false, Expect::Bytes(TRUNC_LEN))?;
    ctx.writeln("SENDDONE")?;
    Ok(Verdict::default())
}

fn msg_trunc_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(SEQPACKET)?;
    ctx.expectln("SENDDONE")?;
    ctx.step("recvmsg(MSG_TRUNC) into 16 bytes");
    let mut buf = [0u8; TRUNC_LEN / 2];
    let meta = ctx.io(conn.recv(&mut buf, RecvFlags::NONE))?;
    ctx.check(meta.message_len == TRUNC_LEN, || {
        format!("MSG_TRUNC doesn't work: {} (expected {TRUNC_LEN})", meta.message_len)
    })?;
    ctx.check(meta.truncated, || "MSG_TRUNC expected".into())?;
    // The C tool stops here. A truncated read discards the rest of its message, so nothing
    // more is there: EAGAIN, or end of stream once the client has closed (no control line,
    // so the pairing is unchanged).
    ctx.step("recv (MSG_DONTWAIT) after the truncated read");
    let mut rest = [0u8; TRUNC_LEN];
    let after = conn.recv(&mut rest, RecvFlags::DONTWAIT);
    ctx.check(!matches!(after, Ok(meta) if meta.len > 0), || {
        format!("the rest of the truncated message was kept: {after:?}")
    })?;
    Ok(Verdict::default())
}

/// 8: with SO_RCVTIMEO 1 s a read fails with EAGAIN within 1.25 s.
pub const TIMEOUT: Case =
    Case { name: NAMES[8], client: Half::run(timeout_client), server: Half::run(timeout_server) };

fn timeout_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SEQPACKET)?;
    ctx.step("setsockopt(SO_RCVTIMEO)");
    let limit = Duration::from_secs(1);
    ctx.io(conn.set_read_timeout(Some(limit)))?;
    let set = ctx.io(conn.read_timeout())?;
    ctx.check(set == Some(limit), || format!("value mismatch: set {limit:?} got {set:?}"))?;
    ctx.step("read (SO_RCVTIMEO 1 s)");
    let started = Instant::now();
    let result = conn.recv(&mut [0u8; 1], RecvFlags::NONE);
    let took = started.elapsed();
    ctx.expect("read", result.map(|m| m.len), Expect::Errno(errno::EAGAIN))?;
    let overhead = took.saturating_sub(limit);
    ctx.check(overhead <= Duration::from_millis(250), || {
        format!("too much time in read(2), {} > 250000000 ns", overhead.as_nanos())
    })?;
    ctx.writeln("WAITDONE")?;
    Ok(Verdict::default())
}

fn timeout_server(ctx: &mut Ctx<'_>) -> Outcome {
    let _conn = ctx.accept(SEQPACKET)?;
    ctx.expectln("WAITDONE")?;
    Ok(Verdict::default())
}

/// 9: a read into a buffer with an unmapped page fails with EFAULT and drops that message;
/// the next read returns the next message whole.
pub const INVALID_RECEIVE_BUFFER: Case = Case {
    name: NAMES[9],
    client: Half::run(invalid_receive_buffer_client),
    server: Half::needing(invalid_receive_buffer_server, &[Feature::UnmappedMemory]),
};

fn invalid_receive_buffer_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SEQPACKET)?;
    let len = 3 * PAGE;
    ctx.send_buf(&*conn, &vec![b'a'; len], false, Expect::Bytes(len))?;
    ctx.send_buf(&*conn, &vec![b'b'; len], false, Expect::Bytes(len))?;
    Ok(Verdict::default())
}

fn invalid_receive_buffer_server(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.accept(SEQPACKET)?;
    let len = 3 * PAGE;
    ctx.step("read into a buffer with an unmapped page");
    let result = conn.recv_unmapped(len);
    ctx.expect("read", result, Expect::Errno(errno::EFAULT))?;
    ctx.step("read the next message");
    let mut buf = vec![0u8; len];
    let meta = ctx.io(conn.recv(&mut buf, RecvFlags::NONE))?;
    ctx.check(meta.len == len, || {
        format!("invalid 'valid_buf' read(2), expected {len}, got {}", meta.len)
    })?;
    let bad = buf.iter().position(|&b| b != b'b');
    ctx.check(bad.is_none(), || format!("invalid pattern for 'valid_buf' at {bad:?}"))?;
    Ok(Verdict::default())
}

/// 11: a message one byte over the buffer size fails with EMSGSIZE.
pub const BIG_MESSAGE: Case = Case {
    name: NAMES[11],
    client: Half::run(big_message_client),
    server: Half::run(big_message_server),
};

fn big_message_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SEQPACKET)?;
    ctx.step("getsockopt(SO_VM_SOCKETS_BUFFER_SIZE)");
    let size = ctx.io(conn.buffer_size())? as usize + 1;
    let data = vec![0u8; size];
    ctx.send_buf(&*conn, &data, false, Expect::Errno(errno::EMSGSIZE))?;
    ctx.writeln("CLISENT")?;
    Ok(Verdict::default())
}

fn big_message_server(ctx: &mut Ctx<'_>) -> Outcome {
    let _conn = ctx.accept(SEQPACKET)?;
    ctx.expectln("CLISENT")?;
    Ok(Verdict::default())
}

/// 13: as 12 for SEQPACKET: after EFAULT the message is gone.
pub const INVALID_BUFFER: Case = Case {
    name: NAMES[13],
    client: Half::needing(|ctx| invalid_buffer_client(ctx, SEQPACKET), &[Feature::UnmappedMemory]),
    server: Half::run(|ctx| invalid_buffer_server(ctx, SEQPACKET)),
};

/// 15: MSG_PEEK on SEQPACKET, MSG_PEEK | MSG_TRUNC included.
pub const MSG_PEEK: Case = Case {
    name: NAMES[15],
    client: Half::run(|ctx| msg_peek_client(ctx, SEQPACKET)),
    server: Half::run(|ctx| msg_peek_server(ctx, SEQPACKET)),
};

/// 25: as 24 for SEQPACKET.
pub const UNSENT_BYTES: Case = Case {
    name: NAMES[25],
    client: Half::run(|ctx| unsent_bytes_client(ctx, SEQPACKET)),
    server: Half::run(|ctx| unsent_bytes_server(ctx, SEQPACKET)),
};
