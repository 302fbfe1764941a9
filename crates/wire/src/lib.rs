//! The virtio-vsock packet header, and nothing else.
//!
//! Every virtio-vsock packet starts with a 44-byte little-endian header
//! (`struct virtio_vsock_hdr`, virtio 1.3 §5.10.6, Linux `include/uapi/linux/virtio_vsock.h`).
//! This crate gives two ways to look at it, in the manner of smoltcp's wire layer:
//!
//! * [`Header`] is a *checked view* over a byte buffer: it only promises that the buffer is long
//!   enough, and reads or writes fields in place. It never allocates.
//! * [`Repr`] is the *typed representation*: addresses as [`Addr`], the operation as [`Op`],
//!   the socket type as [`SocketType`]. [`Repr::parse`] turns a view into a `Repr` and names
//!   every way the bytes can be wrong ([`WireError`]); [`Repr::emit`] writes one back.
//!
//! The constants that the rest of the project relies on (sizes, well-known CIDs, defaults) are
//! defined here once, each with the header or spec section it comes from.
//!
//! This layer does no I/O, keeps no state, never reads a clock and never panics on input.
//!
//! ```
//! use zerovsock_wire::{Addr, Cid, Header, Op, Port, Repr, SocketType, HEADER_LEN};
//!
//! let repr = Repr::new(
//!     Op::Request,
//!     SocketType::Stream,
//!     Addr::new(Cid::LOCAL, Port(1025)),
//!     Addr::new(Cid::LOCAL, Port(1234)),
//! );
//! let mut bytes = [0u8; HEADER_LEN];
//! repr.emit(&mut Header::new_checked(&mut bytes[..]).unwrap());
//! let parsed = Repr::parse(&Header::new_checked(&bytes[..]).unwrap()).unwrap();
//! assert_eq!(parsed, repr);
//! ```

#![forbid(unsafe_code)]

use core::fmt;

/// Size of `struct virtio_vsock_hdr` on the wire (virtio 1.3 §5.10.6).
pub const HEADER_LEN: usize = 44;

/// Largest RW payload a peer may send in one packet: `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`
/// (`include/linux/virtio_vsock.h`). vhost drops guest packets above it.
pub const MAX_PACKET_PAYLOAD: u32 = 64 * 1024;

/// `VSOCK_DEFAULT_BUFFER_SIZE` (`net/vmw_vsock/af_vsock.c`): the default receive buffer.
pub const DEFAULT_BUFFER_SIZE: u64 = 256 * 1024;
/// `VSOCK_DEFAULT_BUFFER_MAX_SIZE` (`af_vsock.c`).
pub const DEFAULT_BUFFER_MAX_SIZE: u64 = 256 * 1024;
/// `VSOCK_DEFAULT_BUFFER_MIN_SIZE` (`af_vsock.c`).
pub const DEFAULT_BUFFER_MIN_SIZE: u64 = 128;
/// `VIRTIO_VSOCK_MAX_BUF_SIZE`: `buf_alloc` is a `u32` on the wire.
pub const MAX_BUFFER_SIZE: u64 = u32::MAX as u64;

/// Ports up to this one are reserved (`LAST_RESERVED_PORT`, `include/net/af_vsock.h`).
pub const LAST_RESERVED_PORT: u32 = 1023;

const SRC_CID: usize = 0;
const DST_CID: usize = 8;
const SRC_PORT: usize = 16;
const DST_PORT: usize = 20;
const LEN: usize = 24;
const TYPE: usize = 28;
const OP: usize = 30;
const FLAGS: usize = 32;
const BUF_ALLOC: usize = 36;
const FWD_CNT: usize = 40;

/// A context id: the address of a VM (or of the host, or of loopback).
///
/// Linux treats CIDs as `u32`; the wire field is `le64` with the upper half reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid(pub u32);

impl Cid {
    /// `VMADDR_CID_HYPERVISOR`.
    pub const HYPERVISOR: Cid = Cid(0);
    /// `VMADDR_CID_LOCAL`: loopback.
    pub const LOCAL: Cid = Cid(1);
    /// `VMADDR_CID_HOST`: the host, as seen from a guest.
    pub const HOST: Cid = Cid(2);
    /// `VMADDR_CID_ANY`: wildcard for `bind`.
    pub const ANY: Cid = Cid(u32::MAX);
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Cid::ANY {
            f.write_str("any")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// A vsock port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u32);

impl Port {
    /// `VMADDR_PORT_ANY`: "pick a free port for me".
    pub const ANY: Port = Port(u32::MAX);

    /// Whether binding this port needs privilege on Linux (`CAP_NET_BIND_SERVICE`).
    pub fn is_reserved(self) -> bool {
        self.0 <= LAST_RESERVED_PORT
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Port::ANY {
            f.write_str("any")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// A vsock socket address (the useful half of `struct sockaddr_vm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    /// The context id.
    pub cid: Cid,
    /// The port.
    pub port: Port,
}

impl Addr {
    /// An address from its parts.
    pub const fn new(cid: Cid, port: Port) -> Addr {
        Addr { cid, port }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.cid, self.port)
    }
}

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// The value from its wire encoding, if it is one this crate knows.
            pub fn from_u16(value: u16) -> Option<$name> {
                match value {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

wire_enum! {
    /// The `op` field (`VIRTIO_VSOCK_OP_*`).
    Op {
        /// `VIRTIO_VSOCK_OP_INVALID`: ignored while connecting.
        Invalid = 0,
        /// Connection request.
        Request = 1,
        /// Connection accepted.
        Response = 2,
        /// Connection reset.
        Rst = 3,
        /// One or both directions shut down (see [`ShutdownFlags`]).
        Shutdown = 4,
        /// Data.
        Rw = 5,
        /// Unsolicited credit information.
        CreditUpdate = 6,
        /// Ask the peer for a credit update.
        CreditRequest = 7,
    }
}

wire_enum! {
    /// The `type` field (`VIRTIO_VSOCK_TYPE_*`).
    SocketType {
        /// Byte stream (`SOCK_STREAM`).
        Stream = 1,
        /// Message-preserving stream (`SOCK_SEQPACKET`).
        Seqpacket = 2,
    }
}

bitflags::bitflags! {
    /// `flags` of a SHUTDOWN packet (`VIRTIO_VSOCK_SHUTDOWN_*`). Sticky at the receiver.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ShutdownFlags: u32 {
        /// The sender will receive no more data.
        const RECEIVE = 1;
        /// The sender will send no more data.
        const SEND = 2;
    }
}

bitflags::bitflags! {
    /// `flags` of an RW packet on a SEQPACKET connection (`VIRTIO_VSOCK_SEQ_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct SeqFlags: u32 {
        /// Last packet of a message.
        const EOM = 1;
        /// The message was sent with `MSG_EOR`.
        const EOR = 2;
    }
}

bitflags::bitflags! {
    /// Device feature bits (virtio 1.3 §5.10.3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// `VIRTIO_VSOCK_F_STREAM`: stream sockets (implied when nothing is negotiated).
        const STREAM = 1 << 0;
        /// `VIRTIO_VSOCK_F_SEQPACKET`: the only bit Linux knows.
        const SEQPACKET = 1 << 1;
        /// `VIRTIO_VSOCK_F_NO_IMPLIED_STREAM`.
        const NO_IMPLIED_STREAM = 1 << 2;
    }
}

/// What can be wrong with a header's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("packet of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated {
        /// How many bytes there were.
        len: usize,
    },
    /// An `op` value outside `VIRTIO_VSOCK_OP_*`.
    #[error("unknown op {0}")]
    UnknownOp(u16),
    /// A `type` value that is neither STREAM nor SEQPACKET.
    #[error("unknown socket type {0}")]
    UnknownType(u16),
    /// A CID with its reserved upper 32 bits set.
    #[error("cid {0:#x} does not fit in 32 bits")]
    CidOutOfRange(u64),
}

/// A checked view of a packet header over any byte buffer.
///
/// Only the length is checked on construction; field values are validated by [`Repr::parse`].
#[derive(Debug, Clone, Copy)]
pub struct Header<T> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wraps `buffer`, which must hold at least [`HEADER_LEN`] bytes. Bytes past the header are
    /// left alone (they may be the payload).
    pub fn new_checked(buffer: T) -> Result<Header<T>, WireError> {
        let len = buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::Truncated { len });
        }
        Ok(Header { buffer })
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn field<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buffer.as_ref()[at..at + N]);
        out
    }

    /// `src_cid`, all 64 bits.
    pub fn src_cid(&self) -> u64 {
        u64::from_le_bytes(self.field(SRC_CID))
    }
    /// `dst_cid`, all 64 bits.
    pub fn dst_cid(&self) -> u64 {
        u64::from_le_bytes(self.field(DST_CID))
    }
    /// `src_port`.
    pub fn src_port(&self) -> u32 {
        u32::from_le_bytes(self.field(SRC_PORT))
    }
    /// `dst_port`.
    pub fn dst_port(&self) -> u32 {
        u32::from_le_bytes(self.field(DST_PORT))
    }
    /// `len`: payload bytes that follow the header.
    pub fn len(&self) -> u32 {
        u32::from_le_bytes(self.field(LEN))
    }
    /// Whether `len` is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `type`, raw.
    pub fn socket_type(&self) -> u16 {
        u16::from_le_bytes(self.field(TYPE))
    }
    /// `op`, raw.
    pub fn op(&self) -> u16 {
        u16::from_le_bytes(self.field(OP))
    }
    /// `flags`, raw.
    pub fn flags(&self) -> u32 {
        u32::from_le_bytes(self.field(FLAGS))
    }
    /// `buf_alloc`: the sender's receive buffer size.
    pub fn buf_alloc(&self) -> u32 {
        u32::from_le_bytes(self.field(BUF_ALLOC))
    }
    /// `fwd_cnt`: bytes the sender's application has consumed, free-running.
    pub fn fwd_cnt(&self) -> u32 {
        u32::from_le_bytes(self.field(FWD_CNT))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    fn set<const N: usize>(&mut self, at: usize, bytes: [u8; N]) {
        self.buffer.as_mut()[at..at + N].copy_from_slice(&bytes);
    }
    /// Sets `src_cid`.
    pub fn set_src_cid(&mut self, value: u64) {
        self.set(SRC_CID, value.to_le_bytes());
    }
    /// Sets `dst_cid`.
    pub fn set_dst_cid(&mut self, value: u64) {
        self.set(DST_CID, value.to_le_bytes());
    }
    /// Sets `src_port`.
    pub fn set_src_port(&mut self, value: u32) {
        self.set(SRC_PORT, value.to_le_bytes());
    }
    /// Sets `dst_port`.
    pub fn set_dst_port(&mut self, value: u32) {
        self.set(DST_PORT, value.to_le_bytes());
    }
    /// Sets `len`.
    pub fn set_len(&mut self, value: u32) {
        self.set(LEN, value.to_le_bytes());
    }
    /// Sets `type`.
    pub fn set_socket_type(&mut self, value: u16) {
        self.set(TYPE, value.to_le_bytes());
    }
    /// Sets `op`.
    pub fn set_op(&mut self, value: u16) {
        self.set(OP, value.to_le_bytes());
    }
    /// Sets `flags`.
    pub fn set_flags(&mut self, value: u32) {
        self.set(FLAGS, value.to_le_bytes());
    }
    /// Sets `buf_alloc`.
    pub fn set_buf_alloc(&mut self, value: u32) {
        self.set(BUF_ALLOC, value.to_le_bytes());
    }
    /// Sets `fwd_cnt`.
    pub fn set_fwd_cnt(&mut self, value: u32) {
        self.set(FWD_CNT, value.to_le_bytes());
    }
}

/// A header with every field typed.
///
/// `flags` stays a raw `u32` because its meaning depends on `op`; read it through
/// [`Repr::shutdown_flags`] or [`Repr::seq_flags`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Repr {
    /// Sender's address.
    pub src: Addr,
    /// Receiver's address.
    pub dst: Addr,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type.
    pub socket_type: SocketType,
    /// Operation.
    pub op: Op,
    /// Op-specific flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, free-running.
    pub fwd_cnt: u32,
}

fn cid_from_wire(raw: u64) -> Result<Cid, WireError> {
    u32::try_from(raw).map(Cid).map_err(|_| WireError::CidOutOfRange(raw))
}

impl Repr {
    /// A header with zero length, flags and credit fields.
    pub fn new(op: Op, socket_type: SocketType, src: Addr, dst: Addr) -> Repr {
        Repr { src, dst, len: 0, socket_type, op, flags: 0, buf_alloc: 0, fwd_cnt: 0 }
    }

    /// Parses and validates a header view.
    pub fn parse<T: AsRef<[u8]>>(header: &Header<T>) -> Result<Repr, WireError> {
        let op = Op::from_u16(header.op()).ok_or(WireError::UnknownOp(header.op()))?;
        let socket_type = SocketType::from_u16(header.socket_type())
            .ok_or(WireError::UnknownType(header.socket_type()))?;
        Ok(Repr {
            src: Addr::new(cid_from_wire(header.src_cid())?, Port(header.src_port())),
            dst: Addr::new(cid_from_wire(header.dst_cid())?, Port(header.dst_port())),
            len: header.len(),
            socket_type,
            op,
            flags: header.flags(),
            buf_alloc: header.buf_alloc(),
            fwd_cnt: header.fwd_cnt(),
        })
    }

    /// Parses the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Repr, WireError> {
        Repr::parse(&Header::new_checked(bytes)?)
    }

    /// Writes every header field into `header`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, header: &mut Header<T>) {
        header.set_src_cid(u64::from(self.src.cid.0));
        header.set_dst_cid(u64::from(self.dst.cid.0));
        header.set_src_port(self.src.port.0);
        header.set_dst_port(self.dst.port.0);
        header.set_len(self.len);
        header.set_socket_type(self.socket_type as u16);
        header.set_op(self.op as u16);
        header.set_flags(self.flags);
        header.set_buf_alloc(self.buf_alloc);
        header.set_fwd_cnt(self.fwd_cnt);
    }

    /// The header as its 44 wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        // The array is exactly HEADER_LEN long, so the view cannot be refused.
        if let Ok(mut header) = Header::new_checked(&mut bytes[..]) {
            self.emit(&mut header);
        }
        bytes
    }

    /// `flags` read as SHUTDOWN flags; unknown bits are dropped.
    pub fn shutdown_flags(&self) -> ShutdownFlags {
        ShutdownFlags::from_bits_truncate(self.flags)
    }

    /// `flags` read as SEQPACKET RW flags; unknown bits are dropped.
    pub fn seq_flags(&self) -> SeqFlags {
        SeqFlags::from_bits_truncate(self.flags)
    }

    /// The header of a reply: source and destination swapped, same type, no payload.
    pub fn reply(&self, op: Op) -> Repr {
        Repr::new(op, self.socket_type, self.dst, self.src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Repr {
        Repr {
            src: Addr::new(Cid(3), Port(1025)),
            dst: Addr::new(Cid::HOST, Port(1234)),
            len: 4096,
            socket_type: SocketType::Seqpacket,
            op: Op::Rw,
            flags: (SeqFlags::EOM | SeqFlags::EOR).bits(),
            buf_alloc: 262_144,
            fwd_cnt: 77,
        }
    }

    #[test]
    fn layout_matches_virtio_vsock_hdr() {
        let bytes = sample().to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[8..16], &2u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &1025u32.to_le_bytes());
        assert_eq!(&bytes[20..24], &1234u32.to_le_bytes());
        assert_eq!(&bytes[24..28], &4096u32.to_le_bytes());
        assert_eq!(&bytes[28..30], &2u16.to_le_bytes());
        assert_eq!(&bytes[30..32], &5u16.to_le_bytes());
        assert_eq!(&bytes[32..36], &3u32.to_le_bytes());
        assert_eq!(&bytes[36..40], &262_144u32.to_le_bytes());
        assert_eq!(&bytes[40..44], &77u32.to_le_bytes());
    }

    #[test]
    fn short_buffer_is_truncated_error() {
        assert_eq!(Repr::parse_bytes(&[0u8; 43]), Err(WireError::Truncated { len: 43 }));
    }

    #[test]
    fn unknown_op_is_named() {
        let mut bytes = sample().to_bytes();
        bytes[30] = 8;
        assert_eq!(Repr::parse_bytes(&bytes), Err(WireError::UnknownOp(8)));
    }

    #[test]
    fn unknown_type_is_named() {
        let mut bytes = sample().to_bytes();
        bytes[28] = 3; // SOCK_DGRAM has no virtio type
        assert_eq!(Repr::parse_bytes(&bytes), Err(WireError::UnknownType(3)));
    }

    #[test]
    fn reserved_cid_bits_are_rejected() {
        let mut bytes = sample().to_bytes();
        bytes[4] = 1;
        assert_eq!(Repr::parse_bytes(&bytes), Err(WireError::CidOutOfRange(1 << 32 | 3)));
    }

    #[test]
    fn trailing_payload_is_ignored_by_the_view() {
        let mut bytes = sample().to_bytes().to_vec();
        bytes.extend_from_slice(b"payload");
        assert_eq!(Repr::parse_bytes(&bytes), Ok(sample()));
    }

    #[test]
    fn reply_swaps_addresses() {
        let reply = sample().reply(Op::Rst);
        assert_eq!(
            (reply.src, reply.dst, reply.len, reply.flags),
            (sample().dst, sample().src, 0, 0)
        );
    }

    fn any_op() -> impl Strategy<Value = Op> {
        (0u16..8).prop_map(|v| Op::from_u16(v).expect("0..8 are ops"))
    }

    fn any_repr() -> impl Strategy<Value = Repr> {
        let addr = || (any::<u32>(), any::<u32>()).prop_map(|(c, p)| Addr::new(Cid(c), Port(p)));
        let fields = (any::<u32>(), any::<bool>(), any::<u32>(), any::<u32>(), any::<u32>());
        (addr(), addr(), any_op(), fields).prop_map(
            |(src, dst, op, (len, seqpacket, flags, buf_alloc, fwd_cnt))| {
                let socket_type =
                    if seqpacket { SocketType::Seqpacket } else { SocketType::Stream };
                Repr { src, dst, len, socket_type, op, flags, buf_alloc, fwd_cnt }
            },
        )
    }

    /// Runs `cases` generated cases of `strategy` through `check`, which says whether the case
    /// reached the assertion it exists for; returns how many did.
    fn run_counted<S: Strategy>(
        strategy: S,
        cases: u32,
        check: impl FnMut(S::Value) -> Result<bool, TestCaseError>,
    ) -> u32 {
        let config =
            ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let reached = std::cell::Cell::new(0u32);
        let check = std::cell::RefCell::new(check);
        let result = runner.run(&strategy, |value| {
            if (check.borrow_mut())(value)? {
                reached.set(reached.get() + 1);
            }
            Ok(())
        });
        if let Err(failure) = result {
            panic!("{failure}");
        }
        reached.get()
    }

    #[test]
    fn every_valid_header_round_trips() {
        let reached = run_counted(any_repr(), 2000, |repr| {
            let bytes = repr.to_bytes();
            prop_assert_eq!(Repr::parse_bytes(&bytes), Ok(repr));
            Ok(true)
        });
        assert_eq!(reached, 2000);
    }

    /// One byte of a valid header changed: the result either parses and round-trips to the
    /// changed bytes, or names the field the change broke.
    #[test]
    fn a_mutated_header_parses_exactly_or_names_the_broken_field() {
        let mutation = (any_repr(), 0..HEADER_LEN, any::<u8>());
        let (mut parsed, mut refused) = (0, 0);
        run_counted(mutation, 4000, |(repr, at, value)| {
            let mut bytes = repr.to_bytes();
            bytes[at] = value;
            match Repr::parse_bytes(&bytes) {
                Ok(again) => {
                    prop_assert_eq!(again.to_bytes(), bytes);
                    parsed += 1;
                }
                Err(error) => {
                    let field = match error {
                        WireError::CidOutOfRange(_) => 4..8usize,
                        WireError::UnknownType(_) => 28..30,
                        WireError::UnknownOp(_) => 30..32,
                        WireError::Truncated { .. } => 0..0,
                    };
                    let dst_cid_high = 12..16;
                    prop_assert!(
                        field.contains(&at) || (field == (4..8) && dst_cid_high.contains(&at))
                    );
                    refused += 1;
                }
            }
            Ok(true)
        });
        // Both outcomes must actually occur, or the property says nothing about one of them.
        assert!(parsed > 1000 && refused > 100, "parsed {parsed}, refused {refused}");
    }

    #[test]
    fn any_bytes_parse_or_fail_cleanly() {
        let reached = run_counted(proptest::collection::vec(any::<u8>(), 0..64), 2000, |bytes| {
            match Repr::parse_bytes(&bytes) {
                Ok(repr) => prop_assert_eq!(&repr.to_bytes()[..], &bytes[..HEADER_LEN]),
                Err(WireError::Truncated { len }) => prop_assert!(len < HEADER_LEN),
                Err(_) => prop_assert!(bytes.len() >= HEADER_LEN),
            }
            Ok(true)
        });
        assert_eq!(reached, 2000);
    }
}
