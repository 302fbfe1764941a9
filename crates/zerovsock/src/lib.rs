//! vsock sockets shaped like `std::net`, with MSG_ZEROCOPY.
//!
//! A [`Vsock`] is one vsock endpoint: the protocol engine (`zerovsock-proto`) and a transport.
//! Today the transport is the in-process loopback ([`Vsock::loopback`], CID 1), which needs no
//! VM; the vhost-user device will be another transport under the same socket API.
//!
//! * [`VsockListener`] / [`VsockStream`]: SOCK_STREAM, with `Read` and `Write`.
//! * [`VsockSeqpacketListener`] / [`VsockSeqpacket`]: SOCK_SEQPACKET, one message per call.
//! * [`VsockSocket`]: an unconnected socket for options that must be set before connecting or
//!   listening (buffer sizes, SO_ZEROCOPY, connect timeout).
//!
//! Every blocking call has an `async` form (`accept_async`, `connect_async`, `read_async`,
//! `write_async`, `send_zerocopy_async`, `completion`, ...) and a `poll_*` form with the shape of
//! `AsyncRead`/`AsyncWrite`, so any executor can drive them: a waiting task is registered on its
//! socket under the engine lock and woken by the same event that wakes blocked threads. No
//! runtime is required.
//!
//! # Zerocopy
//!
//! With SO_ZEROCOPY on, [`VsockStream::send_zerocopy`] takes ownership of the buffer and
//! sends it in place; on loopback the receiver copies straight out of it. Each send pass takes
//! a completion id (per socket, from 0); [`VsockStream::recv_completion`] reads completions as
//! the kernel's error queue presents them (`lo..=hi`, COPIED), readiness reports them as
//! `error`, and an empty queue is `WouldBlock`. [`ZerocopyWriter`] hands buffers back.
//! Errors carry the errno Linux would give (`raw_os_error()`), e.g. EOPNOTSUPP, ENOMEM,
//! EMSGSIZE, EPIPE.
//!
//! This crate never opens a kernel AF_VSOCK socket.
//!
//! ```
//! use std::io::{Read, Write};
//! use zerovsock::{Vsock, VsockListener, VsockStream};
//! use zerovsock::wire::{Addr, Cid, Port};
//!
//! let vsock = Vsock::loopback();
//! let listener = VsockListener::bind(&vsock, Addr::new(Cid::ANY, Port(1234)))?;
//! let mut client = VsockStream::connect(&vsock, Addr::new(Cid::LOCAL, Port(1234)))?;
//! let (mut server, peer) = listener.accept()?;
//! assert_eq!(peer, client.local_addr()?);
//!
//! client.write_all(b"ping")?;
//! let mut buf = [0u8; 4];
//! server.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"ping");
//! # Ok::<(), std::io::Error>(())
//! ```

#![forbid(unsafe_code)]

mod core;
mod error;
mod loopback;
mod pool;
mod socket;
mod turn;
mod types;
mod zerocopy;

use std::sync::Arc;

pub use crate::core::Transport;
pub use loopback::LoopbackConfig;
pub use types::{
    Kind, Seqpacket, Stream, VsockListener, VsockSeqpacket, VsockSeqpacketListener, VsockSocket,
    VsockStream,
};
pub use zerocopy::{Reclaimed, ZerocopySocket, ZerocopyWriter};
pub use zerovsock_proto::{
    Completion, EngineConfig, ForeignMemory, Interest, Packet, Payload, Readiness, RecvMeta,
    Segment,
};
pub use zerovsock_wire as wire;

/// One vsock endpoint: an engine and its transport. Cheap to clone; sockets keep it alive.
#[derive(Clone)]
pub struct Vsock {
    shared: Arc<core::Shared>,
}

impl Vsock {
    /// The in-process loopback endpoint (CID 1) with Linux's defaults, zerocopy included.
    pub fn loopback() -> Vsock {
        Vsock::loopback_with(LoopbackConfig::default())
    }

    /// A loopback endpoint with chosen capabilities.
    pub fn loopback_with(config: LoopbackConfig) -> Vsock {
        let limit = config.notification_limit;
        let transport = Box::new(loopback::Loopback { config });
        Vsock { shared: core::Shared::new(transport, |c| c.notification_limit = limit) }
    }

    /// An endpoint over any transport.
    pub fn with_transport(transport: impl Transport) -> Vsock {
        Vsock::with_transport_config(transport, |_| {})
    }

    /// An endpoint over any transport, with the engine's limits and timeouts adjusted by
    /// `configure` (socket limit, notification budget, connect and close timeouts). What the
    /// transport decides (its CID, zerocopy and SEQPACKET support) stays the transport's.
    pub fn with_transport_config(
        transport: impl Transport,
        configure: impl FnOnce(&mut EngineConfig),
    ) -> Vsock {
        Vsock { shared: core::Shared::new(Box::new(transport), configure) }
    }

    /// Whether a blocked call spins briefly before it sleeps (default: it does, for as long as
    /// spinning has been catching the wake-up, up to 300 us; on an idle multi-core machine a
    /// sleeping thread's wake-up costs more). Off, it sleeps at once, as a kernel socket does
    /// (`sk_wait_event`): for a stack whose callers share few cores with the threads that must
    /// run before they can go on, such as a userspace guest and the device it drives.
    pub fn set_spin(&self, spin: bool) {
        self.shared.spin.store(spin, std::sync::atomic::Ordering::Relaxed);
    }

    /// For a transport that receives on its own (a device's TX queue): hands packets from the
    /// peer to the engine, header bytes as they came and the payload, all under one lock; the
    /// answers go to the transport and waiting sockets wake, as after any call. A header that
    /// does not parse is answered as Linux answers it (see `Engine::handle_bytes`).
    pub fn deliver(&self, packets: impl IntoIterator<Item = ([u8; wire::HEADER_LEN], Payload)>) {
        self.shared.with(|engine, now| {
            for (header, payload) in packets {
                let _ = engine.handle_bytes(now, &header, payload);
            }
        });
    }

    /// For a transport whose peer went away (a guest's device was released): every connection
    /// to `cid` ends with ECONNRESET, and nothing more is sent to it.
    pub fn reset_peer(&self, cid: wire::Cid) {
        self.shared.with(|engine, now| engine.reset_peer(now, cid));
    }

    /// For a transport that negotiates SEQPACKET with its peer (a device, from the features the
    /// driver acked): whether SEQPACKET connections are allowed from now on. Without it a
    /// SEQPACKET connect fails with ESOCKTNOSUPPORT and the peer's SEQPACKET REQUESTs get RST.
    pub fn set_seqpacket(&self, enabled: bool) {
        self.shared.with(|engine, _| engine.set_seqpacket(enabled));
    }

    /// Sockets alive on this endpoint, including connections still closing.
    pub fn socket_count(&self) -> usize {
        self.shared.lock().engine.socket_count()
    }

    pub(crate) fn shared(&self) -> &Arc<core::Shared> {
        &self.shared
    }
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("local_cid", &self.shared.lock().engine.config().local_cid)
            .finish()
    }
}
