//! The test list of the kernel's `vsock_test.c` as of 6.12.117 (checked against Debian's
//! linux-source 6.12.118): ids 0-25, in the order both
//! halves run them (`test_cases[]`). A pairing with the C tool works only if both sides
//! walk the same list, so the names and order here are the kernel's.

/// One test of the list: its id (its index) and the name `--list` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestId {
    /// The index in the list, as `--skip` and `--pick` take it.
    pub id: usize,
    /// The kernel's name for it.
    pub name: &'static str,
}

/// `test_cases[]` of `vsock_test.c` in 6.12.117.
pub const KERNEL_6_12: [&str; 26] = [
    "SOCK_STREAM connection reset",
    "SOCK_STREAM bind only",
    "SOCK_STREAM client close",
    "SOCK_STREAM server close",
    "SOCK_STREAM multiple connections",
    "SOCK_STREAM MSG_PEEK",
    "SOCK_SEQPACKET msg bounds",
    "SOCK_SEQPACKET MSG_TRUNC flag",
    "SOCK_SEQPACKET timeout",
    "SOCK_SEQPACKET invalid receive buffer",
    "SOCK_STREAM poll() + SO_RCVLOWAT",
    "SOCK_SEQPACKET big message",
    "SOCK_STREAM test invalid buffer",
    "SOCK_SEQPACKET test invalid buffer",
    "SOCK_STREAM virtio skb merge",
    "SOCK_SEQPACKET MSG_PEEK",
    "SOCK_STREAM SHUT_WR",
    "SOCK_STREAM SHUT_RD",
    "SOCK_STREAM MSG_ZEROCOPY",
    "SOCK_SEQPACKET MSG_ZEROCOPY",
    "SOCK_STREAM MSG_ZEROCOPY empty MSG_ERRQUEUE",
    "SOCK_STREAM double bind connect",
    "SOCK_STREAM virtio credit update + SO_RCVLOWAT",
    "SOCK_STREAM virtio credit update + low rx_bytes",
    "SOCK_STREAM ioctl(SIOCOUTQ) 0 unsent bytes",
    "SOCK_SEQPACKET ioctl(SIOCOUTQ) 0 unsent bytes",
];

/// The tests after the 6.12 list, ids 26 on: what mainline `vsock_test` added later and
/// applies to a userspace stack (names as mainline's), then `vsock_uring_test`'s two.
pub const LATER: [&str; 9] = [
    "SOCK_STREAM ioctl(SIOCINQ) functionality",
    "SOCK_SEQPACKET ioctl(SIOCINQ) functionality",
    "SOCK_STREAM accept()ed socket custom setsockopt()",
    "SOCK_STREAM virtio MSG_ZEROCOPY coalescence corruption",
    "SOCK_STREAM TX credit bounds",
    "SOCK_STREAM MSG_PEEK after partial recv",
    "SOCK_STREAM small packets backpressure",
    "SOCK_STREAM io_uring test",
    "SOCK_STREAM io_uring MSG_ZEROCOPY test",
];

/// The kernel 6.12 list with ids.
pub fn kernel_6_12() -> impl Iterator<Item = TestId> {
    KERNEL_6_12.iter().enumerate().map(|(id, &name)| TestId { id, name })
}

/// The whole list: the kernel 6.12 tests, then [`LATER`].
pub fn all() -> impl Iterator<Item = TestId> {
    KERNEL_6_12.iter().chain(LATER.iter()).enumerate().map(|(id, &name)| TestId { id, name })
}

/// What `vsock_test --list` prints for `tests` (`list_tests`): a heading, then
/// `<id>\t<name>` per line.
pub fn listing(tests: impl IntoIterator<Item = TestId>) -> String {
    let mut out = String::from("ID\tTest name\n");
    for test in tests {
        out.push_str(&format!("{}\t{}\n", test.id, test.name));
    }
    out
}

/// One `--skip` or `--pick` flag, in command-line order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// `--skip <id>`.
    Skip(usize),
    /// `--pick <id>` (mainline 6.14+).
    Pick(usize),
}

/// Which tests to skip after the flags, taken in command-line order as the kernel tool takes
/// them (`skip_test`, `pick_test`): `--skip` skips; the first `--pick` marks every test
/// skipped, and each `--pick` un-skips its test. An id past the list is an error worded as
/// the C tool's.
pub fn skipped(len: usize, flags: &[Select]) -> Result<Vec<bool>, String> {
    let check = |id: usize| {
        if id < len {
            Ok(id)
        } else {
            Err(format!("test ID ({id}) larger than the max allowed ({})", len.saturating_sub(1)))
        }
    };
    let mut skipped = vec![false; len];
    let mut picked = false;
    for flag in flags {
        match *flag {
            Select::Skip(id) => skipped[check(id)?] = true,
            Select::Pick(id) => {
                let id = check(id)?;
                if !picked {
                    picked = true;
                    skipped.iter_mut().for_each(|s| *s = true);
                }
                skipped[id] = false;
            }
        }
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_the_kernels_in_its_order() {
        let listed = listing(kernel_6_12());
        let lines: Vec<&str> = listed.lines().collect();
        assert_eq!(lines.len(), 27);
        assert_eq!(lines[0], "ID\tTest name");
        assert_eq!(lines[1], "0\tSOCK_STREAM connection reset");
        assert_eq!(lines[19], "18\tSOCK_STREAM MSG_ZEROCOPY");
        assert_eq!(lines[26], "25\tSOCK_SEQPACKET ioctl(SIOCOUTQ) 0 unsent bytes");
    }

    #[test]
    fn skip_and_pick_apply_in_command_line_order() {
        use Select::{Pick, Skip};
        assert_eq!(skipped(4, &[]).unwrap(), [false; 4]);
        assert_eq!(skipped(4, &[Skip(1)]).unwrap(), [false, true, false, false]);
        assert_eq!(skipped(4, &[Pick(2)]).unwrap(), [true, true, false, true]);
        assert_eq!(skipped(4, &[Pick(2), Pick(3), Skip(2)]).unwrap(), [true, true, true, false]);
        // The first pick marks everything skipped, an earlier skip included.
        assert_eq!(skipped(4, &[Skip(2), Pick(2)]).unwrap(), [true, true, false, true]);
        assert_eq!(
            skipped(4, &[Skip(4)]).unwrap_err(),
            "test ID (4) larger than the max allowed (3)"
        );
    }
}
