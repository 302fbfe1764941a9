//! Protocol errors to `io::Error`, with the errno Linux gives for the same condition, so that
//! `raw_os_error()` matches a kernel socket and `kind()` matches `std::net`.

use std::io;

use zerovsock_proto::{
    AcceptError, BindError, ConnectError, ListenError, OpenError, OptionError, RecvError,
    SendError, ShutdownError, SocketError,
};

fn os(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

pub(crate) fn socket(error: SocketError) -> io::Error {
    os(match error {
        SocketError::ConnectionReset => libc::ECONNRESET,
        SocketError::TimedOut => libc::ETIMEDOUT,
        SocketError::Protocol => libc::EPROTO,
        SocketError::CreditExceeded => libc::ENOBUFS,
        _ => libc::EIO,
    })
}

pub(crate) fn open(error: OpenError) -> io::Error {
    match error {
        OpenError::TooManySockets => os(libc::ENFILE),
        _ => os(libc::EIO),
    }
}

pub(crate) fn bind(error: BindError) -> io::Error {
    os(match error {
        BindError::UnknownSocket => libc::EBADF,
        BindError::AlreadyBound => libc::EINVAL,
        BindError::AddrInUse => libc::EADDRINUSE,
        BindError::AddrNotAvailable => libc::EADDRNOTAVAIL,
        _ => libc::EIO,
    })
}

pub(crate) fn listen(error: ListenError) -> io::Error {
    os(match error {
        ListenError::UnknownSocket => libc::EBADF,
        ListenError::InvalidState => libc::EINVAL,
        _ => libc::EIO,
    })
}

pub(crate) fn accept(error: AcceptError) -> io::Error {
    os(match error {
        AcceptError::UnknownSocket => libc::EBADF,
        AcceptError::NotListening => libc::EINVAL,
        AcceptError::WouldBlock => libc::EAGAIN,
        _ => libc::EIO,
    })
}

pub(crate) fn connect(error: ConnectError) -> io::Error {
    match error {
        ConnectError::Failed(error) => socket(error),
        ConnectError::UnknownSocket => os(libc::EBADF),
        ConnectError::AlreadyConnected => os(libc::EISCONN),
        ConnectError::InProgress => os(libc::EALREADY),
        ConnectError::InvalidState | ConnectError::InvalidAddress => os(libc::EINVAL),
        ConnectError::AddrNotAvailable => os(libc::EADDRNOTAVAIL),
        ConnectError::ZerocopyUnsupported => os(libc::EOPNOTSUPP),
        ConnectError::SeqpacketUnsupported => os(libc::ESOCKTNOSUPPORT),
        _ => os(libc::EIO),
    }
}

pub(crate) fn send(error: SendError) -> io::Error {
    match error {
        SendError::Failed(error) => socket(error),
        SendError::UnknownSocket => os(libc::EBADF),
        SendError::WouldBlock => os(libc::EAGAIN),
        SendError::NotConnected => os(libc::ENOTCONN),
        SendError::BrokenPipe => os(libc::EPIPE),
        SendError::MessageTooLong => os(libc::EMSGSIZE),
        SendError::ZerocopyUnsupported => os(libc::EOPNOTSUPP),
        SendError::NotificationBudget => os(libc::ENOMEM),
        _ => os(libc::EIO),
    }
}

pub(crate) fn recv(error: RecvError) -> io::Error {
    match error {
        RecvError::Failed(error) => socket(error),
        RecvError::UnknownSocket => os(libc::EBADF),
        RecvError::WouldBlock => os(libc::EAGAIN),
        RecvError::NotConnected => os(libc::ENOTCONN),
        RecvError::TargetExceedsBuffer => os(libc::ENOMEM),
        _ => os(libc::EIO),
    }
}

pub(crate) fn option(error: OptionError) -> io::Error {
    os(match error {
        OptionError::UnknownSocket => libc::EBADF,
        OptionError::InvalidValue => libc::EINVAL,
        OptionError::Unsupported => libc::EOPNOTSUPP,
        _ => libc::EIO,
    })
}

pub(crate) fn shutdown(error: ShutdownError) -> io::Error {
    os(match error {
        ShutdownError::UnknownSocket => libc::EBADF,
        ShutdownError::NotConnected => libc::ENOTCONN,
        _ => libc::EIO,
    })
}
