//! The one system call the safe crates do not offer: `writev` from a payload whose segments may
//! be guest memory (which Rust code never borrows, so `IoSlice` cannot describe it).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use zerovsock::Payload;

/// At most this many segments per call (Linux's `UIO_MAXIOV` is 1024).
const MAX_IOVECS: usize = 64;

/// Writes as much of `payload` as `fd` takes in one `writev`, straight from the segments'
/// memory. Returns the bytes written.
pub(crate) fn writev(fd: BorrowedFd<'_>, payload: &Payload) -> io::Result<usize> {
    let mut iovecs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOVECS];
    let mut count = 0;
    for segment in payload.segments().take(MAX_IOVECS) {
        iovecs[count] =
            libc::iovec { iov_base: segment.as_ptr() as *mut libc::c_void, iov_len: segment.len() };
        count += 1;
    }
    if count == 0 {
        return Ok(0);
    }
    // SAFETY: each iovec describes a segment of `payload`, valid for its length while `payload`
    // is borrowed (a foreign segment keeps its guest mapping alive; `ForeignMemory::as_ptr`).
    // The kernel only reads them; `count` <= MAX_IOVECS entries are initialized.
    let written = unsafe { libc::writev(fd.as_raw_fd(), iovecs.as_ptr(), count as libc::c_int) };
    if written < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(written as usize)
}
