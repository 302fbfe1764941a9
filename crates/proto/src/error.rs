//! Errors, one type per operation. Each names the protocol rule that refused the operation; the
//! socket layer maps them to `errno` values deliberately (see the `zerovsock` crate).

use thiserror::Error;

/// Why a connection failed or was torn down (Linux's `sk_err`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SocketError {
    /// The peer answered with RST (ECONNRESET).
    #[error("connection reset by peer")]
    ConnectionReset,
    /// No RESPONSE arrived within the connect timeout (ETIMEDOUT).
    #[error("connection timed out")]
    TimedOut,
    /// The peer sent a packet that makes no sense in this state (EPROTO).
    #[error("protocol violation by peer")]
    Protocol,
    /// The peer sent more than its credit allowed; the connection was reset (ENOBUFS).
    #[error("peer exceeded its credit; connection reset")]
    CreditExceeded,
}

/// `open` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The engine's socket limit is reached (ENFILE).
    #[error("too many sockets")]
    TooManySockets,
}

/// `bind` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BindError {
    /// No such socket.
    #[error("no such socket")]
    UnknownSocket,
    /// The socket already has a local address (EINVAL).
    #[error("socket is already bound")]
    AlreadyBound,
    /// Another socket holds the port (EADDRINUSE).
    #[error("address in use")]
    AddrInUse,
    /// The CID is not this endpoint's, or no ephemeral port was free (EADDRNOTAVAIL).
    #[error("address not available")]
    AddrNotAvailable,
}

/// `listen` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ListenError {
    /// No such socket.
    #[error("no such socket")]
    UnknownSocket,
    /// The socket is connected or connecting, or not bound (EINVAL).
    #[error("socket cannot listen in its state")]
    InvalidState,
}

/// `accept` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// No such socket.
    #[error("no such socket")]
    UnknownSocket,
    /// The socket is not listening (EINVAL).
    #[error("socket is not listening")]
    NotListening,
    /// No connection is waiting (EAGAIN).
    #[error("no pending connection")]
    WouldBlock,
}

/// `connect` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No such socket.
    #[error("no such socket")]
    UnknownSocket,
    /// Already connected (EISCONN).
    #[error("socket is already connected")]
    AlreadyConnected,
    /// A connect is already under way (EALREADY).
    #[error("connect already in progress")]
    InProgress,
    /// Listening sockets cannot connect (EINVAL).
    #[error("socket cannot connect in its state")]
    InvalidState,
    /// The remote address is a wildcard (EINVAL).
    #[error("invalid remote address")]
    InvalidAddress,
    /// No local port could be bound (EADDRNOTAVAIL).
    #[error("no local port available")]
    AddrNotAvailable,
    /// SO_ZEROCOPY is set and the transport has no zerocopy (EOPNOTSUPP).
    #[error("transport does not support MSG_ZEROCOPY")]
    ZerocopyUnsupported,
    /// The transport did not negotiate SEQPACKET (ESOCKTNOSUPPORT).
    #[error("transport does not support SEQPACKET")]
    SeqpacketUnsupported,
    /// The attempt failed.
    #[error(transparent)]
    Failed(#[from] SocketError),
}

/// A send pass was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SendError {
    /// No such socket.
    #[error("no such socket")]
    UnknownSocket,
    /// No credit now (EAGAIN); wait for the socket to become writable.
    #[error("no send credit")]
    WouldBlock,
    /// The socket is not connected (ENOTCONN).
    #[error("socket is not connected")]
    NotConnected,
    /// This side shut down sending, or the peer shut down receiving (EPIPE).
    #[error("broken pipe")]
    BrokenPipe,
    /// A SEQPACKET message larger than the usable buffer (EMSGSIZE).
    #[error("message larger than the peer's buffer")]
    MessageTooLong,
    /// MSG_ZEROCOPY on a transport without it (EOPNOTSUPP).
    #[error("transport does not support MSG_ZEROCOPY")]
    ZerocopyUnsupported,
    /// The socket's zerocopy notification budget is used up (ENOMEM).
    #[error("zerocopy notification budget exhausted")]
    NotificationBudget,
    /// The connection failed.
    #[error(transparent)]
    Failed(#[from] SocketError),
}

/// A receive was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RecvError {
    /// No such socket.
    #[error("no such socket")]
    UnknownSocket,
    /// Nothing to read yet (EAGAIN).
    #[error("no data")]
    WouldBlock,
    /// The socket is not connected (ENOTCONN).
    #[error("socket is not connected")]
    NotConnected,
    /// SO_RCVLOWAT asks for at least the whole receive buffer, which can never be queued
    /// (ENOMEM).
    #[error("SO_RCVLOWAT is not below the receive buffer size")]
    TargetExceedsBuffer,
    /// The connection failed.
    #[error(transparent)]
    Failed(#[from] SocketError),
}

/// A socket option was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OptionError {
    /// No such socket.
    #[error("no such socket")]
    UnknownSocket,
    /// The value is out of range (EINVAL).
    #[error("invalid option value")]
    InvalidValue,
    /// The transport does not support it (EOPNOTSUPP).
    #[error("option not supported by the transport")]
    Unsupported,
}

/// `shutdown` was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ShutdownError {
    /// No such socket.
    #[error("no such socket")]
    UnknownSocket,
    /// The socket is not connected (ENOTCONN).
    #[error("socket is not connected")]
    NotConnected,
}
