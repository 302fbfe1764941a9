//! Every system call of the crate, each in a small function that owns its `unsafe` block.
//!
//! The rest of the crate never sees a raw pointer: these wrappers take Rust references or
//! typed values, return `OwnedFd` at once, and turn `-1` into `io::Error::last_os_error()`.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use zerovsock_proto::Completion;
use zerovsock_wire::{Addr, Cid, Port, SocketType};

/// `SOL_VSOCK`: the control-message level of zerocopy notifications (uapi `vm_sockets.h`).
pub const SOL_VSOCK: i32 = 287;
/// `VSOCK_RECVERR`: the control-message type of zerocopy notifications.
pub const VSOCK_RECVERR: i32 = 1;
/// `SO_EE_ORIGIN_ZEROCOPY` (uapi `errqueue.h`).
pub const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED` (uapi `errqueue.h`).
pub const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
/// Options at level `AF_VSOCK` (uapi `vm_sockets.h`).
pub const SO_VM_SOCKETS_BUFFER_SIZE: i32 = 0;
/// See [`SO_VM_SOCKETS_BUFFER_SIZE`].
pub const SO_VM_SOCKETS_BUFFER_MIN_SIZE: i32 = 1;
/// See [`SO_VM_SOCKETS_BUFFER_SIZE`].
pub const SO_VM_SOCKETS_BUFFER_MAX_SIZE: i32 = 2;
/// `SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD` (a `struct timeval`; 64-bit on x86-64).
pub const SO_VM_SOCKETS_CONNECT_TIMEOUT: i32 = 6;
/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` on `/dev/vsock`.
pub const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn check_size(result: libc::ssize_t) -> io::Result<usize> {
    // A negative return is exactly the error case; anything else fits usize.
    usize::try_from(result).map_err(|_| io::Error::last_os_error())
}

fn sockaddr(addr: Addr) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value (and zeroes the
    // reserved and flag bytes, as the kernel expects).
    let mut raw: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    raw.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    raw.svm_port = addr.port.0;
    raw.svm_cid = addr.cid.0;
    raw
}

fn from_sockaddr(raw: &libc::sockaddr_vm) -> Addr {
    Addr::new(Cid(raw.svm_cid), Port(raw.svm_port))
}

const SOCKADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// `socket(AF_VSOCK, type | SOCK_CLOEXEC, 0)`.
pub fn socket(socket_type: SocketType) -> io::Result<OwnedFd> {
    let kind = match socket_type {
        SocketType::Stream => libc::SOCK_STREAM,
        SocketType::Seqpacket => libc::SOCK_SEQPACKET,
    };
    // SAFETY: no pointers are passed; a non-negative return is a new descriptor we own.
    let fd = check(unsafe { libc::socket(libc::AF_VSOCK, kind | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bind(2)`.
pub fn bind(fd: BorrowedFd<'_>, addr: Addr) -> io::Result<()> {
    let raw = sockaddr(addr);
    // SAFETY: `raw` is a valid sockaddr_vm that outlives the call; the length matches it.
    check(unsafe {
        libc::bind(fd.as_raw_fd(), (&raw as *const libc::sockaddr_vm).cast(), SOCKADDR_LEN)
    })?;
    Ok(())
}

/// `connect(2)`.
pub fn connect(fd: BorrowedFd<'_>, addr: Addr) -> io::Result<()> {
    let raw = sockaddr(addr);
    // SAFETY: as in `bind`.
    check(unsafe {
        libc::connect(fd.as_raw_fd(), (&raw as *const libc::sockaddr_vm).cast(), SOCKADDR_LEN)
    })?;
    Ok(())
}

/// `listen(2)`.
pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: no pointers.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(())
}

/// `accept4(2)` with `SOCK_CLOEXEC`.
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<(OwnedFd, Addr)> {
    let mut raw = MaybeUninit::<libc::sockaddr_vm>::zeroed();
    let mut len = SOCKADDR_LEN;
    // SAFETY: `raw` has room for `len` bytes and both outlive the call.
    let child = check(unsafe {
        libc::accept4(fd.as_raw_fd(), raw.as_mut_ptr().cast(), &mut len, libc::SOCK_CLOEXEC)
    })?;
    // SAFETY: accept4 returned a new descriptor that we now own.
    let child = unsafe { OwnedFd::from_raw_fd(child) };
    // SAFETY: zero-initialised and possibly filled by the kernel: valid either way.
    let raw = unsafe { raw.assume_init() };
    Ok((child, from_sockaddr(&raw)))
}

fn name(fd: BorrowedFd<'_>, peer: bool) -> io::Result<Addr> {
    let mut raw = MaybeUninit::<libc::sockaddr_vm>::zeroed();
    let mut len = SOCKADDR_LEN;
    let call = if peer { libc::getpeername } else { libc::getsockname };
    // SAFETY: `raw` has room for `len` bytes and both outlive the call.
    check(unsafe { call(fd.as_raw_fd(), raw.as_mut_ptr().cast(), &mut len) })?;
    // SAFETY: zero-initialised, then filled by the kernel.
    Ok(from_sockaddr(&unsafe { raw.assume_init() }))
}

/// `getsockname(2)`.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<Addr> {
    name(fd, false)
}

/// `getpeername(2)`.
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<Addr> {
    name(fd, true)
}

/// `send(2)` of one buffer.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: i32) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length for the duration of the call.
    check_size(unsafe {
        libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags | libc::MSG_NOSIGNAL)
    })
}

/// `sendmsg(2)` of raw memory ranges (`(address, length)` pairs).
///
/// # Safety
/// Each range must be memory the caller may let the kernel read. With `MSG_ZEROCOPY` the
/// kernel keeps reading the pages after the call returns, until the completion that covers
/// the send: the caller must keep them mapped and unchanged until then. An unmapped range is
/// allowed: the kernel reports it (EFAULT, or ENOMEM for a zerocopy send) without reading it.
pub unsafe fn sendmsg_raw(
    fd: BorrowedFd<'_>,
    ranges: &[(*const u8, usize)],
    flags: i32,
) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = ranges
        .iter()
        .map(|&(base, len)| libc::iovec { iov_base: base as *mut _, iov_len: len })
        .collect();
    // SAFETY: msghdr is plain old data; zeroed means no name and no control data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    // SAFETY: `msg` and `iov` outlive the call; the caller vouches for the ranges.
    check_size(unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags | libc::MSG_NOSIGNAL) })
}

/// Memory ranges (`(address, length)` pairs) that the kernel may read until the zerocopy
/// completion of the send that uses them; only [`ZerocopyRanges::new`] makes one, and its caller
/// takes on that promise.
#[derive(Clone, Copy, Debug)]
pub struct ZerocopyRanges<'a>(&'a [(*const u8, usize)]);

impl<'a> ZerocopyRanges<'a> {
    /// # Safety
    /// As for [`sendmsg_raw`] with `MSG_ZEROCOPY`: each range must stay mapped and unchanged
    /// until the completion that covers the send (an unmapped range is allowed: the kernel
    /// reports it without reading it).
    pub unsafe fn new(ranges: &'a [(*const u8, usize)]) -> ZerocopyRanges<'a> {
        ZerocopyRanges(ranges)
    }
}

/// `sendmsg(2)` of ranges vouched for by [`ZerocopyRanges::new`]'s caller.
pub fn sendmsg_ranges(
    fd: BorrowedFd<'_>,
    ranges: ZerocopyRanges<'_>,
    flags: i32,
) -> io::Result<usize> {
    // SAFETY: whoever made `ranges` promised they stay readable until the completion.
    unsafe { sendmsg_raw(fd, ranges.0, flags) }
}

/// `sendmsg(2)` of Rust slices.
pub fn sendmsg(fd: BorrowedFd<'_>, bufs: &[&[u8]], flags: i32) -> io::Result<usize> {
    let ranges: Vec<(*const u8, usize)> = bufs.iter().map(|b| (b.as_ptr(), b.len())).collect();
    // SAFETY: every range is a live slice borrowed for the call. Callers that pass
    // MSG_ZEROCOPY keep the owners alive until the completion (see `zerocopy.rs`).
    unsafe { sendmsg_raw(fd, &ranges, flags) }
}

/// `recvmsg(2)` into one buffer; returns the length (the full message length with
/// `MSG_TRUNC`) and the returned `msg_flags`.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> io::Result<(usize, i32)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: plain old data, zeroed = no name, no control.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: `buf` is valid for writes of its length; `msg` and `iov` outlive the call.
    let n = check_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) })?;
    Ok((n, msg.msg_flags))
}

/// One entry of the error queue (`recvmsg(MSG_ERRQUEUE)`), or `None` when it is empty.
pub fn recv_completion(fd: BorrowedFd<'_>) -> io::Result<Option<Completion>> {
    // 128 bytes, as the kernel test uses; u64 elements keep it aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>();
    // SAFETY: `control` and `msg` outlive the call; no data buffer is passed.
    let result =
        unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if result < 0 {
        let error = io::Error::last_os_error();
        return match error.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(error),
        };
    }
    parse_completion(&msg).map(Some)
}

fn parse_completion(msg: &libc::msghdr) -> io::Result<Completion> {
    let invalid =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("error queue: {what}"));
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR only reads its control fields.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    if cmsg.is_null() {
        return Err(invalid("no control message"));
    }
    // SAFETY: non-null CMSG_FIRSTHDR points inside the control buffer the kernel filled.
    let header = unsafe { &*cmsg };
    // vsock queues its notifications as SOL_VSOCK/VSOCK_RECVERR; TCP (the baseline
    // `TcpZerocopyStream`) as IP_RECVERR or IPV6_RECVERR by address family. The payload is the
    // same sock_extended_err.
    let known = matches!(
        (header.cmsg_level, header.cmsg_type),
        (SOL_VSOCK, VSOCK_RECVERR)
            | (libc::SOL_IP, libc::IP_RECVERR)
            | (libc::SOL_IPV6, libc::IPV6_RECVERR)
    );
    if !known {
        return Err(invalid(&format!(
            "unexpected cmsg level {} type {}",
            header.cmsg_level, header.cmsg_type
        )));
    }
    // SAFETY: CMSG_LEN is arithmetic only.
    let needed = unsafe { libc::CMSG_LEN(size_of::<libc::sock_extended_err>() as u32) } as usize;
    if header.cmsg_len < needed {
        return Err(invalid("short sock_extended_err"));
    }
    // SAFETY: the control message holds at least a sock_extended_err (checked above);
    // read_unaligned because cmsg data carries no alignment promise for the struct.
    let err: libc::sock_extended_err =
        unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
    if err.ee_origin != SO_EE_ORIGIN_ZEROCOPY || err.ee_errno != 0 {
        return Err(invalid(&format!("origin {} errno {}", err.ee_origin, err.ee_errno)));
    }
    Ok(Completion {
        lo: err.ee_info,
        hi: err.ee_data,
        copied: err.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
    })
}

/// `setsockopt(2)` of a plain value.
pub fn set_option<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32, value: T) -> io::Result<()> {
    // SAFETY: `value` is a live T of size_of::<T>() bytes; T is Copy (plain data).
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// `getsockopt(2)` of a plain value (`i32`, `u64`, `timeval`).
pub fn option<T: Copy + Default>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` has room for `len` bytes and both outlive the call.
    check(unsafe {
        libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut T).cast(), &mut len)
    })?;
    Ok(value)
}

/// A `timeval` for SO_RCVTIMEO-style options; `None` is "forever" (zero).
pub fn timeval(duration: Option<Duration>) -> libc::timeval {
    let duration = duration.unwrap_or_default();
    libc::timeval {
        tv_sec: duration.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        tv_usec: duration.subsec_micros().into(),
    }
}

/// The duration a `timeval` option holds; zero is `None`.
pub fn duration(value: libc::timeval) -> Option<Duration> {
    let duration = Duration::new(value.tv_sec.max(0) as u64, (value.tv_usec.max(0) as u32) * 1000);
    (!duration.is_zero()).then_some(duration)
}

/// Sets or clears `O_NONBLOCK`.
pub fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    let mut value: libc::c_int = nonblocking.into();
    // SAFETY: FIONBIO reads one int from a live location.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &mut value) })?;
    Ok(())
}

/// An int-returning `ioctl` (SIOCINQ, SIOCOUTQ).
pub fn ioctl_int(fd: BorrowedFd<'_>, request: libc::c_ulong) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    // SAFETY: the request writes one int into a live location.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut value) })?;
    Ok(value)
}

/// `poll(2)` on one descriptor; returns `revents` (0 on timeout).
pub fn poll(fd: BorrowedFd<'_>, events: i16, timeout: Option<Duration>) -> io::Result<i16> {
    let mut entry = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    let millis = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    loop {
        // SAFETY: one valid pollfd for the call's duration.
        match check(unsafe { libc::poll(&mut entry, 1, millis) }) {
            Ok(_) => return Ok(entry.revents),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `shutdown(2)`.
pub fn shutdown(fd: BorrowedFd<'_>, how: std::net::Shutdown) -> io::Result<()> {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: no pointers.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), how) })?;
    Ok(())
}

/// The local CID from `/dev/vsock`.
pub fn local_cid() -> io::Result<Cid> {
    let file = std::fs::File::open("/dev/vsock")?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 into a live location.
    check(unsafe { libc::ioctl(file.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) })?;
    Ok(Cid(cid))
}

/// A raw descriptor for io_uring submissions.
pub fn raw(fd: BorrowedFd<'_>) -> RawFd {
    fd.as_raw_fd()
}
