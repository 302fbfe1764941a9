//! The in-process loopback transport (Linux's `vsock_loopback`, CID 1).
//!
//! A packet is handed back to the same engine as it is: its payload segments are the sender's
//! buffers, so a zerocopy send is read by the receiver straight out of the sender's memory, and
//! the sender's completion fires once the receiver has consumed it.

use std::collections::VecDeque;

use zerovsock_proto::Packet;
use zerovsock_wire::{Cid, Op};

use crate::core::Transport;

/// What the loopback transport offers.
#[derive(Clone, Debug)]
pub struct LoopbackConfig {
    /// Support MSG_ZEROCOPY (default: yes, as `vsock_loopback` does). Turning it off models a
    /// transport without it: SO_ZEROCOPY and MSG_ZEROCOPY then fail with EOPNOTSUPP.
    pub zerocopy: bool,
    /// Support SEQPACKET (default: yes).
    pub seqpacket: bool,
    /// Per-socket bound on zerocopy notifications; past it a zerocopy send fails with ENOMEM.
    pub notification_limit: u32,
}

impl Default for LoopbackConfig {
    fn default() -> LoopbackConfig {
        LoopbackConfig {
            zerocopy: true,
            seqpacket: true,
            notification_limit: zerovsock_proto::DEFAULT_NOTIFICATION_LIMIT,
        }
    }
}

pub(crate) struct Loopback {
    pub(crate) config: LoopbackConfig,
}

impl Transport for Loopback {
    fn local_cid(&self) -> Cid {
        Cid::LOCAL
    }

    fn supports_zerocopy(&self) -> bool {
        self.config.zerocopy
    }

    fn supports_seqpacket(&self) -> bool {
        self.config.seqpacket
    }

    fn transmit(&mut self, packet: Packet, inbound: &mut VecDeque<Packet>) {
        if packet.repr.dst.cid == Cid::LOCAL {
            inbound.push_back(packet);
        } else if packet.repr.op != Op::Rst {
            // Nothing lives at any other CID: answer as a peer with no such socket would.
            inbound.push_back(Packet::control(packet.repr.reply(Op::Rst)));
        }
    }
}
