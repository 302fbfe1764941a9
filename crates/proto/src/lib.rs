//! The virtio-vsock protocol engine: every protocol decision, and no I/O.
//!
//! One [`Engine`] holds every socket of one endpoint (a guest, the host side of a device, or
//! both ends of loopback). It never touches a socket, a thread or a clock: the driver feeds it
//! packets ([`Engine::handle_packet`]) and the time ([`Engine::handle_timeout`]), makes the
//! application's calls on it, and drains what it produced:
//!
//! * [`Engine::poll_transmit`]: packets for the transport;
//! * [`Engine::poll_wakeup`]: sockets whose readiness may have changed;
//! * [`Engine::poll_timeout`]: when to call [`Engine::handle_timeout`] next.
//!
//! # Protocol primer
//!
//! A connection starts with REQUEST; the listener answers RESPONSE and the connection is
//! established on both sides (there is no third step). An RST answers anything nobody wants:
//! an unknown port, a bound socket that is not listening, a full backlog, a type mismatch.
//! RST is never answered. Data travels in RW packets of at most 64 KiB.
//!
//! Flow control is credit: each packet carries the sender's receive buffer size (`buf_alloc`)
//! and how many bytes its application has consumed (`fwd_cnt`). A sender keeps at most
//! `min(peer buf_alloc, own buf_alloc)` bytes in flight; a receiver that is sent more resets the
//! connection instead of growing its memory. Receivers advertise freed space with
//! CREDIT_UPDATE on Linux's schedule (see `credit.rs`).
//!
//! Close is SHUTDOWN with both flags, answered by the peer's RST; if no RST comes within 8 s the
//! closing side sends one itself. SEQPACKET marks the last packet of a message with EOM (and
//! EOR when the sender asked for it); a read returns one whole message, truncated to the
//! reader's buffer.
//!
//! # MSG_ZEROCOPY
//!
//! A send is done in passes ([`Engine::begin_send`], then [`Engine::finish_send`]); each pass
//! takes whatever credit there is. A zerocopy pass on a socket with SO_ZEROCOPY takes the next
//! completion id; it is zerocopy only when the whole remaining message fits the credit and no
//! earlier pass sent part of it, otherwise its completion carries COPIED. The payload segments
//! of a pass keep it open; when the last one is dropped by whoever consumed it, the completion
//! is queued (see [`Completion`]) and merged with the previous one when the ids follow on.
//!
//! # Example
//!
//! Two sockets on one loopback endpoint, with the transport reduced to a loop:
//!
//! ```
//! use std::time::Instant;
//! use zerovsock_proto::{Engine, EngineConfig, Payload, SendRequest};
//! use zerovsock_wire::{Addr, Cid, Port, SocketType};
//!
//! let now = Instant::now();
//! let mut engine = Engine::new(EngineConfig::new(Cid::LOCAL));
//! let pump = |engine: &mut Engine| {
//!     while let Some(packet) = engine.poll_transmit() {
//!         engine.handle_packet(now, packet);
//!     }
//! };
//!
//! let listener = engine.open(SocketType::Stream).unwrap();
//! engine.bind(listener, Addr::new(Cid::ANY, Port(1234))).unwrap();
//! engine.listen(listener, 16).unwrap();
//! let client = engine.open(SocketType::Stream).unwrap();
//! engine.connect(now, client, Addr::new(Cid::LOCAL, Port(1234))).unwrap();
//! pump(&mut engine);
//! assert_eq!(engine.connect_result(client), Ok(true));
//! let server = engine.accept(listener).unwrap();
//!
//! let request = SendRequest { remaining: 5, at_segment_start: true, zerocopy: false, eor: false, max_pass: usize::MAX };
//! let grant = engine.begin_send(client, request).unwrap();
//! engine.finish_send(grant, Payload::from(b"hello".to_vec())).unwrap();
//! pump(&mut engine);
//!
//! let lease = engine.recv(server, 64).unwrap();
//! assert_eq!(lease.payload().to_vec(), b"hello");
//! engine.commit_recv(server, lease);
//! ```

#![forbid(unsafe_code)]

#[macro_use]
mod macros;

mod api;
mod credit;
mod dispatch;
mod engine;
mod error;
mod options;
mod packet;
mod rx;
mod socket;
mod zerocopy;

pub use api::{Interest, QueueStats, Readiness, RecvMeta};
pub use dispatch::Disposition;
pub use engine::{
    Engine, EngineConfig, SendGrant, SendRequest, CLOSE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT,
};
pub use error::{
    AcceptError, BindError, ConnectError, ListenError, OpenError, OptionError, RecvError,
    SendError, ShutdownError, SocketError,
};
pub use packet::{ForeignMemory, ForeignSlice, Packet, Payload, Segment};
pub use rx::RecvLease;
pub use socket::{SocketId, State};
pub use zerocopy::{Completion, DEFAULT_NOTIFICATION_LIMIT};

#[cfg(test)]
mod tests;
