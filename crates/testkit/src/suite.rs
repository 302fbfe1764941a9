//! Pieces of the kernel's vsock test suite (`tools/testing/vsock`) that every implementation's
//! tests share: the data hash, test data, and the MSG_ZEROCOPY case table of
//! `vsock_test_zerocopy.c`, with the outcome the kernel expects for each case.

use zerovsock_proto::Completion;
use zerovsock_wire::SocketType;

/// `PAGE_SIZE` as the kernel tests use it.
pub const PAGE: usize = 4096;

/// `hash_djb2` from `tools/testing/vsock/util.c`.
pub fn djb2(data: &[u8]) -> u64 {
    data.iter().fold(5381u64, |h, b| h.wrapping_mul(33).wrapping_add(u64::from(*b)))
}

/// Deterministic pseudo-random bytes (xorshift), so that failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// One element of a case's iovec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Element {
    /// Bytes.
    pub len: usize,
    /// The data starts this far into its allocation (the kernel test's `base + 1`).
    pub offset: usize,
    /// The element is memory that was mapped and unmapped again.
    pub unmapped: bool,
}

const fn page(len: usize) -> Element {
    Element { len, offset: 0, unmapped: false }
}

/// What the kernel makes of a zerocopy send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Sent in place: a completion without COPIED.
    Zerocopied,
    /// Fell back to copying: a completion with COPIED.
    Copied,
    /// SO_ZEROCOPY off: copied, and no completion at all.
    NoCompletion,
    /// ENOMEM before any byte moves; no completion, no id taken.
    Enomem,
}

/// One row of the kernel's table.
#[derive(Clone, Copy, Debug)]
pub struct ZerocopyCase {
    /// The iovec.
    pub iov: &'static [Element],
    /// Whether SO_ZEROCOPY is set first.
    pub so_zerocopy: bool,
    /// The kernel's outcome.
    pub expect: Expect,
    /// Only run on STREAM sockets.
    pub stream_only: bool,
}

impl ZerocopyCase {
    /// Bytes the send carries when it succeeds.
    pub fn total(&self) -> usize {
        self.iov.iter().map(|e| e.len).sum()
    }

    /// The iovec's data, as owned buffers with their offsets applied (`(buffer, offset)`);
    /// unmapped elements come back empty.
    pub fn buffers(&self, seed: u64) -> Vec<(Vec<u8>, usize)> {
        self.iov
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if e.unmapped {
                    (Vec::new(), 0)
                } else {
                    (pattern(e.len + e.offset, seed + i as u64), e.offset)
                }
            })
            .collect()
    }
}

/// `vsock_test_zerocopy.c`, in its order: seven cases, the last for STREAM only.
pub const ZEROCOPY_CASES: &[ZerocopyCase] = &[
    ZerocopyCase {
        iov: &[page(PAGE), page(PAGE), page(200)],
        so_zerocopy: true,
        expect: Expect::Zerocopied,
        stream_only: false,
    },
    ZerocopyCase {
        iov: &[page(PAGE), page(2 * PAGE), page(3 * PAGE)],
        so_zerocopy: true,
        expect: Expect::Zerocopied,
        stream_only: false,
    },
    // More than 64 KiB: several packets, one completion.
    ZerocopyCase {
        iov: &[page(65536), page(65536), page(65536)],
        so_zerocopy: true,
        expect: Expect::Zerocopied,
        stream_only: false,
    },
    // An unaligned middle element is still zerocopied (the merged code has no alignment rule).
    ZerocopyCase {
        iov: &[page(PAGE), Element { len: 100, offset: 1, unmapped: false }, page(PAGE)],
        so_zerocopy: true,
        expect: Expect::Zerocopied,
        stream_only: false,
    },
    ZerocopyCase {
        iov: &[page(PAGE), Element { len: PAGE, offset: 0, unmapped: true }, page(PAGE)],
        so_zerocopy: true,
        expect: Expect::Enomem,
        stream_only: false,
    },
    ZerocopyCase {
        iov: &[page(PAGE)],
        so_zerocopy: false,
        expect: Expect::NoCompletion,
        stream_only: false,
    },
    // 100 pages: more than the peer's 256 KiB buffer, so the whole message is copied.
    ZerocopyCase {
        iov: &[page(100 * PAGE)],
        so_zerocopy: true,
        expect: Expect::Copied,
        stream_only: true,
    },
];

/// The cases the kernel runs for `socket_type` (seven for STREAM, six for SEQPACKET).
pub fn zerocopy_cases(socket_type: SocketType) -> impl Iterator<Item = &'static ZerocopyCase> {
    ZEROCOPY_CASES.iter().filter(move |case| socket_type == SocketType::Stream || !case.stream_only)
}

/// Checks what `poll(POLLERR)` plus `recvmsg(MSG_ERRQUEUE)` produced against the case, run as
/// the first send of a fresh socket (ids start at 0): a zerocopied send is one pass, so its
/// completion is exactly `0..=0`; a copied one may have taken several passes, each with its own
/// id, so its first completion starts at 0 and may cover more.
pub fn check_completion(expect: Expect, completion: Option<Completion>) -> Result<(), String> {
    match (expect, completion) {
        (Expect::NoCompletion | Expect::Enomem, None) => Ok(()),
        (Expect::NoCompletion | Expect::Enomem, Some(c)) => {
            Err(format!("no completion expected, got {c:?}"))
        }
        (_, None) => Err("POLLERR expected".into()),
        (Expect::Zerocopied, Some(c)) if c.copied => Err(format!("zerocopy expected, got {c:?}")),
        (Expect::Zerocopied, Some(c)) if (c.lo, c.hi) != (0, 0) => {
            Err(format!("one pass with id 0 expected, got {c:?}"))
        }
        (Expect::Copied, Some(c)) if !c.copied => Err(format!("COPIED expected, got {c:?}")),
        (Expect::Copied, Some(c)) if c.lo != 0 => {
            Err(format!("the first pass (id 0) completes first, got {c:?}"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_has_seven_cases_and_seqpacket_six() {
        assert_eq!(zerocopy_cases(SocketType::Stream).count(), 7);
        assert_eq!(zerocopy_cases(SocketType::Seqpacket).count(), 6);
    }

    #[test]
    fn djb2_matches_the_c_definition() {
        assert_eq!(djb2(b""), 5381);
        assert_eq!(djb2(b"a"), 5381 * 33 + 97);
    }

    #[test]
    fn checks_follow_the_kernel_table() {
        let zc = Completion { lo: 0, hi: 0, copied: false };
        let copied = Completion { copied: true, ..zc };
        assert!(check_completion(Expect::Zerocopied, Some(zc)).is_ok());
        assert!(check_completion(Expect::Zerocopied, Some(copied)).is_err());
        assert!(check_completion(Expect::Copied, Some(copied)).is_ok());
        assert!(check_completion(Expect::NoCompletion, Some(zc)).is_err());
        assert!(check_completion(Expect::Copied, None).is_err());
        let later = Completion { lo: 1, hi: 1, copied: false };
        assert!(check_completion(Expect::Zerocopied, Some(later)).is_err(), "ids start at 0");
        let two = Completion { lo: 0, hi: 1, copied: false };
        assert!(check_completion(Expect::Zerocopied, Some(two)).is_err(), "one pass");
        let passes = Completion { lo: 0, hi: 2, copied: true };
        assert!(check_completion(Expect::Copied, Some(passes)).is_ok());
        let late = Completion { lo: 1, hi: 2, copied: true };
        assert!(check_completion(Expect::Copied, Some(late)).is_err());
    }
}
