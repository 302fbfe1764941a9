//! The two system calls the safe crates do not offer, because their memory is guest memory
//! (which Rust code never borrows, so `IoSlice` cannot describe it): `writev` from a payload
//! whose segments may live in a guest, and `readv` into guest RX buffers. And a peek for end
//! of file.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use zerovsock::Payload;
use zerovsock_virtio::{GuestMemory, RxBuffer};

/// At most this many segments per call (Linux's `UIO_MAXIOV` is 1024).
const MAX_IOVECS: usize = 64;

const EMPTY: libc::iovec = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };

/// Writes as much of `payload` as `fd` takes in one `writev`, straight from the segments'
/// memory. Returns the bytes written.
pub(crate) fn writev(fd: BorrowedFd<'_>, payload: &Payload) -> io::Result<usize> {
    let mut iovecs = [EMPTY; MAX_IOVECS];
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

/// Reads up to `len` bytes from `fd` with one `readv` straight into the payload areas of
/// `buffers`, in order (each at most one packet's room). Returns the bytes read; 0 is end of
/// file. `scratch` is reused for the addresses.
pub(crate) fn readv_into(
    fd: BorrowedFd<'_>,
    mem: &GuestMemory,
    buffers: &[RxBuffer],
    len: usize,
    scratch: &mut Vec<(usize, usize)>,
) -> io::Result<usize> {
    scratch.clear();
    let mut left = len;
    for buffer in buffers {
        if left == 0 {
            break;
        }
        let want = left.min(buffer.packet_room());
        let described = buffer.payload_iovecs(mem, want, scratch);
        left -= described;
        // The bytes must land in buffer order: after a buffer that is not whole, stop.
        if described < want {
            break;
        }
    }
    let mut iovecs = [EMPTY; MAX_IOVECS];
    let count = scratch.len().min(MAX_IOVECS);
    for (iovec, &(addr, len)) in iovecs.iter_mut().zip(scratch.iter()) {
        *iovec = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    }
    if count == 0 {
        return Ok(0);
    }
    // SAFETY: the addresses come from `RxBuffer::payload_iovecs`: host addresses of
    // device-writable guest memory that the chain walk checked against `mem`'s map, which
    // stays mapped while `mem` is borrowed. The kernel writes only there (guest memory is
    // shared with the guest anyway; no Rust reference points into it). `count` <= MAX_IOVECS
    // entries are initialized.
    let read = unsafe { libc::readv(fd.as_raw_fd(), iovecs.as_ptr(), count as libc::c_int) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(read as usize)
}

/// Whether a non-blocking stream socket is at end of file with no data before it (a one-byte
/// `MSG_PEEK`: 0 is end of file, EAGAIN or a byte is not).
pub(crate) fn peek_eof(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(&fd).peek(&mut byte) {
        Ok(n) => Ok(n == 0),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
