//! The lines vsock_perf prints (tools/testing/vsock/vsock_perf.c, 6.12), read back: the sender's
//! and the receiver's figures, and each line's template (its text with the numbers taken
//! out), so that `zerovsock perf` can be held to the C tool's output line for line.

use anyhow::{bail, Context, Result};

/// What a vsock_perf sender printed after its transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SenderFigures {
    /// `total bytes sent: N`.
    pub bytes: u64,
    /// `tx performance: X Gbits/s` (bits over the time inside send()).
    pub tx_gbps: f64,
    /// `total time in tx loop: X sec`.
    pub tx_loop_secs: f64,
    /// `time in 'send()': X sec`.
    pub in_send_secs: f64,
    /// `zerocopy completions: N ids, M COPIED` (`zerovsock perf` only, with --zerocopy): one id
    /// per sendmsg pass, so a send the credit splits takes several.
    pub completions: Option<(u64, u64)>,
}

/// What a vsock_perf receiver printed after its transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReceiverFigures {
    /// `total bytes received: N`.
    pub bytes: u64,
    /// `rx performance: X Gbits/s` (bits over the whole read loop).
    pub rx_gbps: f64,
    /// `total time in 'read()': X sec`.
    pub in_read_secs: f64,
    /// `average time in 'read()': X ns`.
    pub average_read_ns: f64,
    /// `POLLIN wakeups: N`.
    pub wakeups: u64,
    /// `verified: ...` (`zerovsock perf --receiver --verify` only).
    pub verified: bool,
}

/// The value after `key` on the last line that starts with it, with `unit` cut from its end.
fn value<'a>(text: &'a str, key: &str, unit: &str) -> Result<&'a str> {
    let line = text
        .lines()
        .rev()
        .find_map(|line| line.trim_end().strip_prefix(key))
        .with_context(|| format!("no line {key:?}"))?;
    let trimmed = line.trim();
    trimmed
        .strip_suffix(unit)
        .map(str::trim)
        .with_context(|| format!("{key:?} is not followed by a number and {unit:?}: {line:?}"))
}

fn number<T: std::str::FromStr>(text: &str, key: &str, unit: &str) -> Result<T> {
    let raw = value(text, key, unit)?;
    raw.parse().map_err(|_| anyhow::anyhow!("{key:?}: {raw:?} is not a number"))
}

/// A figure that must be a finite number above zero.
fn positive(text: &str, key: &str, unit: &str) -> Result<f64> {
    let x: f64 = number(text, key, unit)?;
    if !x.is_finite() || x <= 0.0 {
        bail!("{key:?} is {x}, not a positive figure");
    }
    Ok(x)
}

/// Reads a sender's figures from what it printed.
pub fn sender(text: &str) -> Result<SenderFigures> {
    let completions = match value(text, "zerocopy completions:", "COPIED") {
        Ok(raw) => {
            let (ids, copied) = raw
                .split_once(" ids, ")
                .with_context(|| format!("zerocopy completions: {raw:?}"))?;
            Some((ids.trim().parse()?, copied.trim().parse()?))
        }
        Err(_) => None,
    };
    Ok(SenderFigures {
        bytes: number(text, "total bytes sent:", "")?,
        tx_gbps: positive(text, "tx performance:", "Gbits/s")?,
        tx_loop_secs: positive(text, "total time in tx loop:", "sec")?,
        in_send_secs: positive(text, "time in 'send()':", "sec")?,
        completions,
    })
}

/// Reads a receiver's figures from what it printed.
pub fn receiver(text: &str) -> Result<ReceiverFigures> {
    Ok(ReceiverFigures {
        bytes: number(text, "total bytes received:", "")?,
        rx_gbps: positive(text, "rx performance:", "Gbits/s")?,
        in_read_secs: positive(text, "total time in 'read()':", "sec")?,
        average_read_ns: positive(text, "average time in 'read()':", "ns")?,
        wakeups: number(text, "POLLIN wakeups:", "")?,
        verified: text.lines().any(|line| line.starts_with("verified: every byte")),
    })
}

/// A size as vsock_perf's `memparse` reads it: a number, then K, M or G (powers of 1024).
pub fn size(text: &str) -> Result<u64> {
    let (digits, shift) = match text.chars().last() {
        Some('K' | 'k') => (&text[..text.len() - 1], 10),
        Some('M' | 'm') => (&text[..text.len() - 1], 20),
        Some('G' | 'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().with_context(|| format!("{text:?} is not a size"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).with_context(|| format!("{text:?} overflows"))
}

/// Each line with every number replaced by `#`: what two tools must print alike.
pub fn templates(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty())
        .map(|line| {
            let mut out = String::new();
            let mut in_number = false;
            for c in line.chars() {
                let numeric = c.is_ascii_digit() || (in_number && c == '.');
                if numeric && !in_number {
                    out.push('#');
                }
                if !numeric {
                    out.push(c);
                }
                in_number = numeric;
            }
            out
        })
        .collect()
}

/// Checks that `ours` prints the C tool's lines, in its order, numbers aside; lines past the
/// C tool's are allowed after them.
pub fn same_lines(c_tool: &str, ours: &str) -> Result<()> {
    let (c_tool, ours) = (templates(c_tool), templates(ours));
    for (i, line) in c_tool.iter().enumerate() {
        match ours.get(i) {
            Some(mine) if mine == line => {}
            Some(mine) => bail!("line {}: vsock_perf prints {line:?}, ours {mine:?}", i + 1),
            None => bail!("line {}: vsock_perf prints {line:?}, ours nothing", i + 1),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vsock_perf 6.12's sender and receiver, as printed in a lab guest.
    const C_SENDER: &str = "Run as sender MSG_ZEROCOPY\nConnect to 1:1234\nSend 16777216 bytes\n\
        TX buffer 65536 bytes\ntotal bytes sent: 16777216\ntx performance: 0.586191 Gbits/s\n\
        total time in tx loop: 0.229947 sec\ntime in 'send()': 0.228966 sec\n";
    const C_RECEIVER: &str = "Run as receiver\nListen port 1234\nRX buffer 65536 bytes\n\
        vsock buffer 262144 bytes\nSO_RCVLOWAT 1 bytes\ntotal bytes received: 16777216\n\
        rx performance: 0.531549 Gbits/s\ntotal time in 'read()': 0.158040 sec\n\
        average time in 'read()': 614939.750000 ns\nPOLLIN wakeups: 257\n";

    #[test]
    fn a_sender_s_figures_are_read_from_its_lines() {
        let got = sender(C_SENDER).unwrap();
        assert_eq!(got.bytes, 16 << 20);
        assert_eq!(got.tx_gbps, 0.586191);
        assert_eq!(got.in_send_secs, 0.228966);
        assert_eq!(got.completions, None, "the C tool prints no completion count");
        let ours = format!("{C_SENDER}zerocopy completions: 256 ids, 3 COPIED\n");
        assert_eq!(sender(&ours).unwrap().completions, Some((256, 3)));
    }

    #[test]
    fn a_receiver_s_figures_are_read_from_its_lines() {
        let got = receiver(C_RECEIVER).unwrap();
        assert_eq!((got.bytes, got.wakeups), (16 << 20, 257));
        assert_eq!(got.rx_gbps, 0.531549);
        assert!(!got.verified);
        let ours =
            format!("{C_RECEIVER}verified: every byte of 16 MiB matched the sender's pattern\n");
        assert!(receiver(&ours).unwrap().verified);
    }

    #[test]
    fn a_missing_or_broken_figure_is_an_error() {
        assert!(sender("total bytes sent: 5\n").is_err());
        let zero = C_SENDER.replace("0.586191 Gbits/s", "0.000000 Gbits/s");
        assert!(sender(&zero).is_err(), "a zero throughput is not a measurement");
        let garbled = C_RECEIVER.replace("257", "many");
        assert!(receiver(&garbled).is_err());
    }

    #[test]
    fn sizes_take_vsock_perf_s_suffixes() {
        assert_eq!(size("16M").unwrap(), 16 << 20);
        assert_eq!(size("64K").unwrap(), 65536);
        assert_eq!(size("4096").unwrap(), 4096);
        assert!(size("lots").is_err());
    }

    #[test]
    fn templates_take_the_numbers_out() {
        assert_eq!(
            templates("tx performance: 0.586191 Gbits/s\nConnect to 1:1234\n\n"),
            ["tx performance: # Gbits/s", "Connect to #:#"]
        );
    }

    #[test]
    fn ours_may_add_lines_after_the_c_tool_s_but_not_change_them() {
        let ours = format!("{C_SENDER}zerocopy completions: 256 ids, 0 COPIED\n")
            .replace("16777216", "8388608");
        same_lines(C_SENDER, &ours).unwrap();
        let renamed = C_SENDER.replace("tx performance", "TX performance");
        assert!(same_lines(C_SENDER, &renamed).is_err());
        assert!(same_lines(C_SENDER, "Run as sender MSG_ZEROCOPY\n").is_err());
    }
}
