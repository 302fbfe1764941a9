//! Zerocopy sends through io_uring: `IORING_OP_SEND_ZC` and `IORING_OP_SENDMSG_ZC`.
//!
//! Each request produces two completions: the *result* (bytes sent, or an error), flagged
//! `IORING_CQE_F_MORE` when a notification follows, and the *notification*
//! (`IORING_CQE_F_NOTIF`) once the kernel no longer reads the buffer. With
//! `IORING_SEND_ZC_REPORT_USAGE` the notification's result carries
//! `IORING_NOTIF_USAGE_ZC_COPIED` when the data was copied after all. A buffer is released only
//! after its notification. io_uring's notifier replaces the socket's error queue for these
//! sends: no `MSG_ERRQUEUE` entry is produced and no socket completion id is taken.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsFd;

use io_uring::{cqueue, opcode, types, IoUring};

use crate::sys;

/// `IORING_SEND_ZC_REPORT_USAGE` (not exported by the `io-uring` crate).
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: the notification's result when the data was copied.
const IORING_NOTIF_USAGE_ZC_COPIED: i32 = 1 << 31;

/// What one zerocopy request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringSend {
    /// Bytes sent (the result completion).
    pub sent: usize,
    /// The kernel copied the data instead (from the notification, `REPORT_USAGE`).
    pub copied: bool,
    /// Whether a notification arrived (always, when any byte was sent).
    pub notified: bool,
}

/// An io_uring instance for zerocopy sends on vsock sockets.
pub struct UringZerocopy {
    ring: IoUring,
}

impl std::fmt::Debug for UringZerocopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringZerocopy").finish_non_exhaustive()
    }
}

impl UringZerocopy {
    /// A ring with room for a few requests.
    pub fn new() -> io::Result<UringZerocopy> {
        Ok(UringZerocopy { ring: IoUring::new(8)? })
    }

    /// `IORING_OP_SEND_ZC` of `buf` on `socket`; waits for the result and the notification,
    /// then gives the buffer back. Without SO_ZEROCOPY on the socket the kernel copies
    /// (reported as `copied`).
    pub fn send_zc<S: AsFd, B: AsRef<[u8]>>(
        &mut self,
        socket: &S,
        buf: B,
    ) -> io::Result<(UringSend, B)> {
        let data = buf.as_ref();
        let fd = types::Fd(sys::raw(socket.as_fd()));
        let len =
            u32::try_from(data.len()).map_err(|_| io::Error::from_raw_os_error(libc::EMSGSIZE))?;
        let entry = opcode::SendZc::new(fd, data.as_ptr(), len)
            .zc_flags(IORING_SEND_ZC_REPORT_USAGE)
            .build()
            .user_data(1);
        // SAFETY: the entry points at `data`, which `buf` keeps alive until `complete` has seen
        // the notification (or learned that none will come): only then is `buf` returned.
        let report = unsafe { self.submit(&entry) }?;
        Ok((report, buf))
    }

    /// `IORING_OP_SENDMSG_ZC` of several buffers as one message.
    pub fn sendmsg_zc<S: AsFd, B: AsRef<[u8]>>(
        &mut self,
        socket: &S,
        bufs: Vec<B>,
    ) -> io::Result<(UringSend, Vec<B>)> {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ref().as_ptr() as *mut _,
                iov_len: b.as_ref().len(),
            })
            .collect();
        // SAFETY: plain old data; zeroed = no name, no control.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        let fd = types::Fd(sys::raw(socket.as_fd()));
        let entry = opcode::SendMsgZc::new(fd, &msg).build().user_data(2);
        // SAFETY: `msg`, `iov` and the buffers they point at live until `submit` returns, which
        // is after the notification (or the result saying none will come).
        let report = unsafe { self.submit(&entry) }?;
        drop(iov);
        Ok((report, bufs))
    }

    /// Submits one request and waits for its result and, if announced, its notification.
    ///
    /// # Safety
    /// Everything `entry` points at must stay valid until this returns.
    unsafe fn submit(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<UringSend> {
        // SAFETY: forwarded from the caller; the ring is drained before we return.
        unsafe { self.ring.submission().push(entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        let mut result: Option<i32> = None;
        let mut expect_notification = false;
        let mut report = UringSend { sent: 0, copied: false, notified: false };
        loop {
            let done = result.is_some() && (!expect_notification || report.notified);
            if done {
                break;
            }
            self.ring.submit_and_wait(1)?;
            for cqe in self.ring.completion() {
                if cqueue::notif(cqe.flags()) {
                    report.notified = true;
                    report.copied = cqe.result() & IORING_NOTIF_USAGE_ZC_COPIED != 0;
                } else {
                    result = Some(cqe.result());
                    expect_notification = cqueue::more(cqe.flags());
                }
            }
        }
        match result {
            Some(n) if n >= 0 => {
                report.sent = n as usize;
                Ok(report)
            }
            Some(errno) => Err(io::Error::from_raw_os_error(-errno)),
            None => Err(io::Error::other("io_uring returned no result")),
        }
    }
}
