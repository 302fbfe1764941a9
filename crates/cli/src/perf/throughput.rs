//! Moving bytes and timing it, as vsock_perf does: the sender times only its `send()` calls,
//! the receiver the whole read loop; here both run in one process, so delivered (end-to-end)
//! throughput is measured too, from the first send to the last byte read.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::conn::Conn;
use super::link::Link;
use super::pattern::Pattern;
use super::Mode;

/// How long a zerocopy sender waits for a completion before it gives up. vsock_perf's
/// `run_sender` polls without a bound (`poll(.., -1)`) and reads one completion per send; here
/// a stall becomes an error that names it, and every queued completion is read at once (the
/// same order at `--inflight 1`).
pub const COMPLETION_WAIT: Duration = Duration::from_secs(30);

/// What one sender did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// When the first send started.
    pub start: Option<Instant>,
    /// Time inside the send calls only.
    pub in_send: Duration,
    /// First send to the last completion.
    pub total: Duration,
    pub bytes: u64,
    pub sends: u64,
    /// Zerocopy passes (completion ids, or io_uring notifications), and how many were COPIED.
    pub passes: u64,
    pub copied: u64,
}

/// Sends `total` bytes of the pattern in sends of up to `size`, in `mode`, keeping up to
/// `inflight` zerocopy sends outstanding (vsock_perf waits for each: 1).
pub fn send(
    conn: &mut dyn Conn,
    mode: Mode,
    size: u64,
    total: u64,
    inflight: u32,
    pattern: &Pattern,
) -> Result<Sent> {
    if mode == Mode::Zerocopy {
        conn.enable_zerocopy().context("SO_ZEROCOPY")?;
    }
    let mut sent = Sent::default();
    let mut outstanding = 0u64;
    // The id the next pass takes: what a send took is how far it moved.
    let mut next_id = conn.next_completion_id();
    let start = Instant::now();
    sent.start = Some(start);
    while sent.bytes < total {
        let n = (total - sent.bytes).min(size) as usize;
        let taken = match mode {
            Mode::Copy => {
                let data = pattern.at(sent.bytes, n);
                let t = Instant::now();
                let taken = conn.send(&data);
                sent.in_send += t.elapsed();
                taken.context("send")?
            }
            Mode::Zerocopy => {
                while outstanding >= u64::from(inflight) {
                    outstanding -= reap(conn, &mut sent, outstanding)?;
                }
                let data = pattern.at(sent.bytes, n);
                let t = Instant::now();
                let result = conn.send_zerocopy(data);
                sent.in_send += t.elapsed();
                let taken = result.context("send(MSG_ZEROCOPY)")?;
                let after = conn.next_completion_id();
                outstanding += u64::from(after.wrapping_sub(next_id));
                next_id = after;
                taken
            }
            Mode::UringZc => {
                let data = pattern.at(sent.bytes, n);
                let t = Instant::now();
                let result = conn.send_uring_zc(data);
                sent.in_send += t.elapsed();
                let (taken, copied) = result.context("io_uring SEND_ZC")?;
                sent.passes += 1;
                sent.copied += u64::from(copied);
                taken
            }
        };
        if taken == 0 {
            bail!("send took no bytes after {} of {total}", sent.bytes);
        }
        sent.sends += 1;
        sent.bytes += taken as u64;
    }
    while outstanding > 0 {
        outstanding = outstanding.saturating_sub(reap(conn, &mut sent, outstanding)?);
    }
    sent.total = start.elapsed();
    Ok(sent)
}

/// Waits for completions and reads them; returns the ids covered.
fn reap(conn: &mut dyn Conn, sent: &mut Sent, want: u64) -> Result<u64> {
    let reaped = conn.reap(COMPLETION_WAIT, want).context("reading zerocopy completions")?;
    if reaped.ids == 0 {
        bail!("no zerocopy completion within {} s", COMPLETION_WAIT.as_secs());
    }
    sent.passes += reaped.ids;
    sent.copied += reaped.copied;
    Ok(reaped.ids)
}

/// What one receiver did.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub bytes: u64,
    /// Reads that returned data (vsock_perf's "POLLIN wakeups" also counts the final 0).
    pub reads: u64,
    pub in_read: Duration,
    pub start: Instant,
    /// When the last byte arrived.
    pub last_byte: Instant,
    /// When end of file was read.
    pub end: Instant,
}

/// Reads until end of file, or until `expect` bytes when given, with blocking reads: unlike
/// vsock_perf's `run_receiver`, which polls and also stops at the first POLLHUP/POLLRDHUP (after
/// at most one read in that round, possibly with bytes still queued: it was seen losing the
/// tail), this reads everything up to end of file. The reads are counted, and a reset from
/// the peer is an error rather than an end. Reads take up to `size` bytes each,
/// checking every byte against the pattern when `verify` is given. (A known length does not
/// rely on the half-close reaching the receiver: vhost-device-vsock 0.3.0 drops the guest's
/// SHUTDOWN and never passes a host's on.)
pub fn receive(
    conn: &mut dyn Conn,
    size: u64,
    expect: Option<u64>,
    verify: Option<&Pattern>,
) -> Result<Received> {
    let mut buf = super::units::filled(size, 0)?;
    let start = Instant::now();
    let mut got = Received {
        bytes: 0,
        reads: 0,
        in_read: Duration::ZERO,
        start,
        last_byte: start,
        end: start,
    };
    loop {
        if expect == Some(got.bytes) {
            got.end = got.last_byte;
            return Ok(got);
        }
        let want = expect.map_or(buf.len(), |e| (e - got.bytes).min(size) as usize);
        let t = Instant::now();
        let n = conn
            .recv(&mut buf[..want])
            .with_context(|| format!("read after {} bytes", got.bytes))?;
        let now = Instant::now();
        got.in_read += now - t;
        if n == 0 {
            got.end = now;
            return Ok(got);
        }
        if let Some(pattern) = verify {
            pattern.check(got.bytes, &buf[..n])?;
        }
        got.reads += 1;
        got.bytes += n as u64;
        got.last_byte = now;
    }
}

/// One transfer over a fresh connection of `link`.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub sent: Sent,
    /// First send to the receiver's last byte.
    pub e2e: Duration,
}

/// Everything a transfer needs besides the link.
pub struct Transfer<'a> {
    pub mode: Mode,
    pub size: u64,
    pub total: u64,
    pub inflight: u32,
    pub buffer: u64,
    pub rcvlowat: u32,
    pub port: u32,
    pub pattern: &'a Pattern,
    pub verify: bool,
}

/// Connects, sends in this thread while another receives, and checks the count.
pub fn measure(link: &mut dyn Link, t: &Transfer<'_>) -> Result<Sample> {
    let (mut sender, mut receiver) = link.pair(t.port, t.buffer, t.rcvlowat)?;
    let (size, total, pattern) = (t.size, t.total, t.pattern.clone());
    let verify = t.verify;
    let reader = thread::Builder::new().name("perf-receiver".into()).spawn(move || {
        let result = receive(&mut *receiver, size, Some(total), verify.then_some(&pattern));
        // Dropping the end tells a sender still sending that the receiver is gone.
        drop(receiver);
        result
    })?;
    let sent = send(&mut *sender, t.mode, t.size, t.total, t.inflight, t.pattern);
    // End of file ends the reader, also when the sender failed.
    let closed = sender.close_write();
    let received = reader.join().map_err(|_| anyhow!("the receiver panicked"))?;
    drop(sender);
    let (sent, received) = match (sent, received) {
        (_, Err(error)) => return Err(error.context("receiver")),
        (Err(error), _) => return Err(error.context("sender")),
        (Ok(sent), Ok(received)) => (sent, received),
    };
    closed.context("shutdown(SHUT_WR)")?;
    if received.bytes != t.total {
        bail!("the receiver got {} of {} bytes", received.bytes, t.total);
    }
    let start = sent.start.unwrap_or(received.start);
    Ok(Sample { sent, e2e: received.last_byte.saturating_duration_since(start) })
}
