//! Latency: ping-pong of one message size. The client sends a message and waits for the
//! whole of it to come back; the server reads it whole and sends it back. Each round trip goes
//! into an HDR histogram (nanoseconds, three significant digits).

use std::thread;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;

use super::conn::Conn;
use super::link::Link;
use super::pattern::Pattern;
use super::throughput::{Transfer, COMPLETION_WAIT};
use super::Mode;

/// Round-trip percentiles.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Percentiles {
    pub rounds: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1e3;
        Percentiles {
            rounds: histogram.len(),
            p50_us: us(histogram.value_at_quantile(0.5)),
            p99_us: us(histogram.value_at_quantile(0.99)),
            p999_us: us(histogram.value_at_quantile(0.999)),
            max_us: us(histogram.max()),
        }
    }
}

/// Reads exactly `buf.len()` bytes, checking them against the pattern at `offset` if asked.
fn read_whole(
    conn: &mut dyn Conn,
    buf: &mut [u8],
    offset: u64,
    verify: Option<&Pattern>,
) -> Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let n = conn.recv(&mut buf[at..])?;
        if n == 0 {
            bail!("the peer closed in the middle of a message ({at} of {} bytes)", buf.len());
        }
        at += n;
    }
    if let Some(pattern) = verify {
        pattern.check(offset, buf)?;
    }
    Ok(())
}

/// Sends all of `data`, copying or lending it.
fn send_whole(
    conn: &mut dyn Conn,
    mode: Mode,
    pattern: &Pattern,
    offset: u64,
    len: usize,
) -> Result<u64> {
    let mut done = 0;
    let mut ids = 0u64;
    while done < len {
        let data = pattern.at(offset + done as u64, len - done);
        let n = match mode {
            Mode::Copy => conn.send(&data)?,
            Mode::Zerocopy => {
                let before = conn.next_completion_id();
                let n = conn.send_zerocopy(data)?;
                ids += u64::from(conn.next_completion_id().wrapping_sub(before));
                n
            }
            Mode::UringZc => conn.send_uring_zc(data)?.0,
        };
        if n == 0 {
            bail!("send took no bytes");
        }
        done += n;
    }
    Ok(ids)
}

/// `rounds` round trips of `t.size` bytes over a fresh connection of `link` (`t.total` and
/// `t.inflight` do not apply: one message is in flight at a time).
pub fn measure(link: &mut dyn Link, t: &Transfer<'_>, rounds: u64) -> Result<Percentiles> {
    let (mode, size, pattern, verify) = (t.mode, t.size, t.pattern, t.verify);
    let (mut client, mut server) = link.pair(t.port, t.buffer, t.rcvlowat)?;
    let len = usize::try_from(size)?;
    let echo_pattern = pattern.clone();
    let echo = thread::Builder::new().name("perf-echo".into()).spawn(move || -> Result<()> {
        let mut buf = vec![0u8; len];
        for round in 0..rounds {
            let offset = round * size;
            read_whole(&mut *server, &mut buf, offset, verify.then_some(&echo_pattern))?;
            send_whole(&mut *server, Mode::Copy, &echo_pattern, offset, len)?;
        }
        Ok(())
    })?;
    let result = (|| -> Result<Histogram<u64>> {
        if mode == Mode::Zerocopy {
            client.enable_zerocopy().context("SO_ZEROCOPY")?;
        }
        let mut histogram = Histogram::<u64>::new(3)?;
        let mut buf = vec![0u8; len];
        let mut outstanding = 0u64;
        for round in 0..rounds {
            let offset = round * size;
            let t = Instant::now();
            outstanding += send_whole(&mut *client, mode, pattern, offset, len)?;
            read_whole(&mut *client, &mut buf, offset, verify.then_some(pattern))?;
            let rtt = t.elapsed();
            histogram.record(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX))?;
            // Completions are read between rounds, outside the timed part.
            while outstanding > 0 {
                let reaped = client.reap(COMPLETION_WAIT, outstanding)?;
                if reaped.ids == 0 {
                    bail!("no zerocopy completion within {} s", COMPLETION_WAIT.as_secs());
                }
                outstanding = outstanding.saturating_sub(reaped.ids);
            }
        }
        Ok(histogram)
    })();
    // Closing the whole end (not only its write side) also ends an echo blocked sending to a
    // client that stopped reading.
    drop(client);
    let echoed = echo.join().map_err(|_| anyhow!("the echo thread panicked"))?;
    let histogram = result.context("client")?;
    echoed.context("echo")?;
    Ok(Percentiles::of(&histogram))
}

/// Rounds for one size: about `bytes` each way, at least 100 and at most 100 000.
pub fn default_rounds(bytes: u64, size: u64) -> u64 {
    (bytes / size).clamp(100, 100_000)
}
