//! Sizes as vsock_perf writes them, and as the report prints them.

use anyhow::{Context, Result};

use zerovsock::wire::Port;

/// Parses sizes the way vsock_perf's `memparse` (lib/cmdline.c's) does: a number as
/// `strtoull(.., 0)` reads it (`0x` hex, a leading `0` octal, decimal otherwise), then an
/// optional K, M, G, T, P or E (powers of 1024, either case): `4096`, `4K`, `0x10000`, `256m`.
/// Unlike `memparse`, which stops at the first character it cannot use and answers what it
/// has, junk after the suffix, zero and overflow are errors rather than a silent 0 or a
/// wrapped value.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (radix, digits_from) = match text.as_bytes() {
        [b'0', b'x' | b'X', ..] => (16, 2),
        [b'0', _, ..] => (8, 1),
        _ => (10, 0),
    };
    let body = &text[digits_from..];
    let digits_len = body.find(|c: char| !c.is_digit(radix)).unwrap_or(body.len());
    let (digits, suffix) = body.split_at(digits_len);
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        "E" => 60,
        _ => return Err(format!("not a size: {text:?}")),
    };
    let value = match (digits.is_empty(), radix) {
        // "0" alone, or "0K": the octal branch with no digits after its 0.
        (true, 8) => 0,
        (true, _) => return Err(format!("not a size: {text:?}")),
        (false, _) => {
            u64::from_str_radix(digits, radix).map_err(|_| format!("size too large: {text}"))?
        }
    };
    let value = value
        .checked_mul(1u64.checked_shl(shift).unwrap_or(0))
        .filter(|v| shift < 64 && (value == 0 || *v >> shift == value))
        .ok_or_else(|| format!("size too large: {text}"))?;
    if value == 0 {
        return Err("size must be positive".into());
    }
    Ok(value)
}

/// A size that must fit 32 bits (SO_RCVLOWAT is an int).
pub fn parse_size_u32(text: &str) -> Result<u32, String> {
    let value = parse_size(text)?;
    u32::try_from(value)
        .ok()
        .filter(|&v| v <= i32::MAX as u32)
        .ok_or_else(|| format!("{text} is too large: SO_RCVLOWAT is an int (at most {})", i32::MAX))
}

/// A port any socket can bind: anything but VMADDR_PORT_ANY.
pub fn parse_port(text: &str) -> Result<u32, String> {
    let port: u32 = text.trim().parse().map_err(|_| format!("not a port number: {text:?}"))?;
    if port == Port::ANY.0 {
        return Err(format!("{port} is VMADDR_PORT_ANY, which no socket can listen on"));
    }
    Ok(port)
}

/// A CID to connect to: a number, below VMADDR_CID_ANY.
pub fn parse_cid(text: &str) -> Result<u32, String> {
    let cid: u32 = text.trim().parse().map_err(|_| format!("not a CID: {text:?}"))?;
    if cid == u32::MAX {
        return Err("4294967295 is VMADDR_CID_ANY, which no socket can connect to".into());
    }
    Ok(cid)
}

/// `4 KiB`, `256 MiB`, or bytes when not a round number.
pub fn human(size: u64) -> String {
    match size {
        s if s >= 1 << 30 && s % (1 << 30) == 0 => format!("{} GiB", s >> 30),
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

/// A large amount in GiB (or MiB) with one decimal.
pub fn approx(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1 << 30)),
        b => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
    }
}

/// `MemAvailable` from `/proc/meminfo`, when there is one.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A buffer of `len` bytes of `fill`, or an error (rather than an abort) when the memory is
/// not there.
pub fn filled(len: u64, fill: u8) -> Result<Vec<u8>> {
    let len = usize::try_from(len).context("buffer larger than the address space")?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).with_context(|| format!("allocating {}", human(len as u64)))?;
    buf.resize(len, fill);
    Ok(buf)
}

/// Gbit/s as vsock_perf computes it: bits / 1e9 / seconds.
pub fn gbps(bytes: u64, time: std::time::Duration) -> f64 {
    bytes as f64 * 8.0 / time.as_secs_f64().max(1e-12) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_memparse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0x10000"), Ok(65536));
        // strtoull reads "0x1E" as hex 30, not 1 exbibyte; "010" as octal 8.
        assert_eq!(parse_size("0x1E"), Ok(30));
        assert_eq!(parse_size("0x1k"), Ok(1024));
        assert_eq!(parse_size("010"), Ok(8));
        assert!(parse_size("08").is_err(), "8 is no octal digit");
        assert!(parse_size("0").is_err());
        assert!(parse_size("0x").is_err());
        assert!(parse_size("16E").is_err(), "past 64 bits");
        assert!(parse_size("4KB").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999G").is_err());
        assert_eq!(parse_size_u32("64K"), Ok(65536));
        assert!(parse_size_u32("2G").unwrap_err().contains("int"));
    }

    #[test]
    fn reserved_ports_and_cids_are_refused_by_name() {
        assert_eq!(parse_port("1234"), Ok(1234));
        assert!(parse_port("4294967295").unwrap_err().contains("VMADDR_PORT_ANY"));
        assert!(parse_port("4294967296").is_err());
        assert_eq!(parse_cid("2"), Ok(2));
        assert!(parse_cid("4294967295").unwrap_err().contains("VMADDR_CID_ANY"));
        assert!(parse_cid("host").is_err());
    }
}
