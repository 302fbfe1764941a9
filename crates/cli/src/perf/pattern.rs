//! What the sender sends and `--verify` checks: the byte at stream offset `o` is a fixed
//! pseudo-random function of `o mod PERIOD`.
//!
//! `PERIOD` is a prime number of pages, so that sends at offsets that are multiples of 4 KiB
//! start on a page, as vsock_perf's do (`run_sender` sends from the start of an `mmap`ed
//! buffer every time: a 4 KiB zerocopy send pins one page, not two), while no power-of-two
//! message size is a multiple of it: a lost, repeated or reordered chunk moves every later byte to an offset
//! where the pattern differs, and the receiver catches it at the first byte. The pattern is
//! kept `PERIOD` plus the largest message long, so the bytes of any send are one contiguous
//! slice of it: a copy sender passes that slice and a zerocopy sender lends it (`Bytes::slice`,
//! no copy, no fill per send), and checking a read is one comparison against the slice at the
//! reader's offset, at memory speed.

use anyhow::{bail, Result};
use bytes::Bytes;

/// The pattern repeats every this many bytes: 31 (a prime) pages.
pub const PERIOD: u64 = 31 * 4096;
/// The pattern's first byte sits on a page boundary.
const ALIGN: usize = 4096;

/// The bytes senders send and receivers expect.
#[derive(Clone, Debug)]
pub struct Pattern {
    bytes: Bytes,
}

impl Pattern {
    /// A pattern for reads and sends of up to `max_len` bytes.
    pub fn new(max_len: u64) -> Result<Pattern> {
        let len = (PERIOD + max_len) as usize;
        let mut buf = super::units::filled(len as u64 + ALIGN as u64, 0)?;
        let skip = buf.as_ptr().align_offset(ALIGN);
        let bytes = &mut buf[skip..skip + len];
        // xorshift64: cheap, and no byte value or short run repeats at a small stride.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for byte in &mut bytes[..PERIOD as usize] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = (state >> 32) as u8;
        }
        for at in PERIOD as usize..len {
            bytes[at] = bytes[at - PERIOD as usize];
        }
        Ok(Pattern { bytes: Bytes::from(buf).slice(skip..skip + len) })
    }

    /// The `len` bytes that belong at stream offset `offset`, shared (no copy).
    pub fn at(&self, offset: u64, len: usize) -> Bytes {
        let start = (offset % PERIOD) as usize;
        self.bytes.slice(start..start + len)
    }

    /// Checks that `read` is what belongs at stream offset `offset`.
    pub fn check(&self, offset: u64, read: &[u8]) -> Result<()> {
        let expected = self.at(offset, read.len());
        if expected[..] != *read {
            let at = read.iter().zip(expected.iter()).position(|(a, b)| a != b).unwrap_or(0);
            bail!(
                "--verify: byte {} of the stream is {:#04x}, the sender's pattern has {:#04x} \
                 (lost, repeated or corrupted data; or the sender is not `zerovsock perf`)",
                offset + at as u64,
                read[at],
                expected[at]
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_check_at_their_own_offset_only() {
        let pattern = Pattern::new(8192).unwrap();
        // The stream cut at arbitrary points checks chunk by chunk.
        let stream: Vec<u8> = (0..4).flat_map(|i| pattern.at(i * 8192, 8192).to_vec()).collect();
        let mut offset = 0;
        for len in [1, 4095, 8192, 3, 17000, 3477] {
            pattern.check(offset, &stream[offset as usize..][..len]).unwrap();
            offset += len as u64;
        }
        assert_eq!(offset, stream.len() as u64);
        // A lost message (offset skipped), a repeated one, a flipped byte: all caught.
        assert!(pattern.check(0, &stream[8192..16384]).is_err(), "lost");
        assert!(pattern.check(16384, &stream[8192..16384]).is_err(), "repeated");
        let mut flipped = stream[..8192].to_vec();
        flipped[5000] ^= 1;
        let error = pattern.check(0, &flipped).unwrap_err().to_string();
        assert!(error.contains("byte 5000"), "{error}");
    }
}
