//! The MSG_ZEROCOPY tests of `vsock_test_zerocopy.c` (6.12): seven send cases on STREAM, six
//! on SEQPACKET, and the empty error queue.

use super::{djb2, errno, Case, Ctx, Expect, Half, Outcome, Verdict, SHORT};
use crate::list::KERNEL_6_12 as NAMES;
use crate::peer::{Interest, RecvFlags, SockType, ZcBuf};

const PAGE: usize = 4096;

/// One `struct vsock_test_data`.
struct Data {
    stream_only: bool,
    /// The completion must not say COPIED.
    zerocopied: bool,
    so_zerocopy: bool,
    /// The errno `sendmsg` must give (0: success).
    sendmsg_errno: i32,
    /// The iovec: (offset of the base in its allocation, length).
    vecs: &'static [(usize, usize)],
    /// Which element is unmapped (the C tool's `MAP_FAILED` base).
    unmapped: Option<usize>,
}

const DATA: [Data; 7] = [
    // The last element is not page sized.
    Data {
        stream_only: false,
        zerocopied: true,
        so_zerocopy: true,
        sendmsg_errno: 0,
        vecs: &[(0, PAGE), (0, PAGE), (0, 200)],
        unmapped: None,
    },
    // Page-aligned bases and sizes.
    Data {
        stream_only: false,
        zerocopied: true,
        so_zerocopy: true,
        sendmsg_errno: 0,
        vecs: &[(0, PAGE), (0, 2 * PAGE), (0, 3 * PAGE)],
        unmapped: None,
    },
    // More than 64 KiB.
    Data {
        stream_only: false,
        zerocopied: true,
        so_zerocopy: true,
        sendmsg_errno: 0,
        vecs: &[(0, 16 * PAGE), (0, 16 * PAGE), (0, 16 * PAGE)],
        unmapped: None,
    },
    // The middle element's base and size are not page aligned.
    Data {
        stream_only: false,
        zerocopied: true,
        so_zerocopy: true,
        sendmsg_errno: 0,
        vecs: &[(0, PAGE), (1, 100), (0, PAGE)],
        unmapped: None,
    },
    // The middle element is unmapped.
    Data {
        stream_only: false,
        zerocopied: false,
        so_zerocopy: true,
        sendmsg_errno: errno::ENOMEM,
        vecs: &[(0, PAGE), (0, PAGE), (0, PAGE)],
        unmapped: Some(1),
    },
    // SO_ZEROCOPY off: a plain copy.
    Data {
        stream_only: false,
        zerocopied: false,
        so_zerocopy: false,
        sendmsg_errno: 0,
        vecs: &[(0, PAGE)],
        unmapped: None,
    },
    // More than the peer's buffer: copied (SEQPACKET would give EMSGSIZE).
    Data {
        stream_only: true,
        zerocopied: false,
        so_zerocopy: true,
        sendmsg_errno: 0,
        vecs: &[(0, 100 * PAGE)],
        unmapped: None,
    },
];

/// 18.
pub const STREAM: Case = Case {
    name: NAMES[18],
    client: Half::run(|ctx| client(ctx, SockType::Stream)),
    server: Half::run(|ctx| server(ctx, SockType::Stream)),
};

/// 19.
pub const SEQPACKET: Case = Case {
    name: NAMES[19],
    client: Half::run(|ctx| client(ctx, SockType::Seqpacket)),
    server: Half::run(|ctx| server(ctx, SockType::Seqpacket)),
};

fn cases(ty: SockType) -> impl Iterator<Item = (usize, &'static Data)> {
    DATA.iter().enumerate().filter(move |(_, d)| ty == SockType::Stream || !d.stream_only)
}

fn client(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    let mut seed = super::seed();
    for (index, data) in cases(ty) {
        send_case(ctx, ty, index, data, &mut seed)?;
    }
    Ok(Verdict::default())
}

/// `test_client`: one connection, one `sendmsg(MSG_ZEROCOPY)`, the completion within 100 ms
/// (POLLERR), then the data's hash (0 after an expected error) and `DONE`.
fn send_case(
    ctx: &mut Ctx<'_>,
    ty: SockType,
    index: usize,
    data: &Data,
    seed: &mut u64,
) -> Result<(), super::Failure> {
    let conn = ctx.connect(ty)?;
    if data.so_zerocopy {
        ctx.step("setsockopt(SO_ZEROCOPY)");
        ctx.io(conn.set_zerocopy(true))?;
        let on = ctx.io(conn.zerocopy())?;
        ctx.check(on, || "value mismatch: set 1 got 0".into())?;
    }
    let bufs: Vec<ZcBuf> = data
        .vecs
        .iter()
        .map(|&(offset, len)| {
            let mut data = vec![0u8; offset];
            data.extend(super::random_bytes(len, seed));
            ZcBuf { data, offset }
        })
        .collect();
    let hash = djb2(&bufs.iter().flat_map(|b| b.as_ref().iter().copied()).collect::<Vec<u8>>());
    let total: usize = data.vecs.iter().map(|&(_, len)| len).sum();
    ctx.step(&format!("case {}: sendmsg(MSG_ZEROCOPY)", index + 1));
    let result = match data.unmapped {
        Some(hole) => match conn.send_zerocopy_unmapped(
            &data.vecs.iter().map(|&(_, len)| len).collect::<Vec<_>>(),
            hole,
        ) {
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                // The family cannot express the case; the protocol goes on as after the
                // expected failure (nothing sent, hash 0).
                ctx.note(format!(
                    "case {} (unmapped iovec, ENOMEM) not run: {}",
                    index + 1,
                    ctx.peer.lacks(crate::peer::Feature::UnmappedMemory).unwrap_or("unsupported")
                ));
                Err(std::io::Error::from_raw_os_error(errno::ENOMEM))
            }
            other => other,
        },
        None => conn.send_zerocopy(bufs),
    };
    let expected = match data.sendmsg_errno {
        0 => Expect::Bytes(total),
        errno => Expect::Errno(errno),
    };
    ctx.expect("sendmsg", result, expected)?;
    ctx.step(&format!("case {}: poll for the completion (POLLERR within 100 ms)", index + 1));
    let ready = ctx.io(conn.poll(Interest::NONE, Some(SHORT)))?;
    if ready.error {
        recv_completion(ctx, &*conn, Some(data.zerocopied))?;
    } else {
        ctx.check(!data.so_zerocopy || data.sendmsg_errno != 0, || "POLLERR expected".into())?;
    }
    ctx.write_ulong(if data.sendmsg_errno == 0 { hash } else { 0 })?;
    ctx.writeln("DONE")?;
    Ok(())
}

/// `vsock_recv_completion`: one completion, with COPIED as `zerocopied` says (unchecked when
/// `None`).
pub(super) fn recv_completion(
    ctx: &Ctx<'_>,
    conn: &dyn crate::peer::Conn,
    zerocopied: Option<bool>,
) -> Result<(), super::Failure> {
    ctx.step("recvmsg(MSG_ERRQUEUE)");
    let completion = ctx.io(conn.recv_completion())?;
    if let Some(zerocopied) = zerocopied {
        ctx.check(completion.copied != zerocopied, || {
            format!(
                "completion {}..={} {} (expected {})",
                completion.lo,
                completion.hi,
                if completion.copied { "COPIED" } else { "zerocopied" },
                if zerocopied { "zerocopied" } else { "COPIED" }
            )
        })?;
    }
    Ok(())
}

fn server(ctx: &mut Ctx<'_>, ty: SockType) -> Outcome {
    for (index, data) in cases(ty) {
        let conn = ctx.accept(ty)?;
        let len: usize = data.vecs.iter().map(|&(_, len)| len).sum();
        let mut buf = vec![0u8; len];
        ctx.step(&format!("case {}: read the data", index + 1));
        let (mut read, mut first) = (0, None);
        while read < len {
            match conn.recv(&mut buf[read..], RecvFlags::NONE) {
                Ok(meta) if meta.len > 0 => {
                    first.get_or_insert(meta);
                    read += meta.len;
                }
                // The C tool stops at end of stream or an error and compares hashes.
                _ => break,
            }
        }
        // The client sent one message, so one SEQPACKET read returns all of it. The C tool's
        // loop would also pass a stack that hands a message out in pieces, whose hash still
        // matches; this half checks it too (no control line changes).
        if let (SockType::Seqpacket, Some(meta)) = (ty, first) {
            ctx.check(meta.len == len && meta.message_len == len, || {
                format!(
                    "read(2) returned {} bytes of the {len}-byte message (message length {})",
                    meta.len, meta.message_len
                )
            })?;
        }
        let local = if data.sendmsg_errno == 0 { djb2(&buf) } else { 0 };
        let remote = ctx.read_ulong()?;
        ctx.check(remote == local, || format!("case {}: hash mismatch", index + 1))?;
        ctx.expectln("DONE")?;
    }
    Ok(Verdict::default())
}

/// 20: `recvmsg(MSG_ERRQUEUE)` on a fresh connection fails (EAGAIN).
pub const EMPTY_ERRQUEUE: Case = Case {
    name: NAMES[20],
    client: Half::run(empty_errqueue_client),
    server: Half::run(empty_errqueue_server),
};

fn empty_errqueue_client(ctx: &mut Ctx<'_>) -> Outcome {
    let conn = ctx.connect(SockType::Stream)?;
    ctx.step("recvmsg(MSG_ERRQUEUE)");
    let result = conn.recv_completion();
    ctx.check(result.is_err(), || format!("expected 'recvmsg(2)' failure, got {result:?}"))?;
    ctx.writeln("DONE")?;
    Ok(Verdict::default())
}

fn empty_errqueue_server(ctx: &mut Ctx<'_>) -> Outcome {
    let _conn = ctx.accept(SockType::Stream)?;
    ctx.expectln("DONE")?;
    Ok(Verdict::default())
}
