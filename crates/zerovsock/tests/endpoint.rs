//! An endpoint over a transport of the test's own: what goes out when the application is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zerovsock::wire::{Addr, Cid, Op, Port, Repr};
use zerovsock::{Packet, Transport, Vsock, VsockStream};

/// A peer at CID 3 that accepts every connection and then never answers again (no RST after
/// our SHUTDOWN), recording every packet it is sent.
struct SilentPeer {
    sent: Arc<Mutex<Vec<Repr>>>,
}

impl Transport for SilentPeer {
    fn local_cid(&self) -> Cid {
        Cid::HOST
    }

    fn supports_zerocopy(&self) -> bool {
        true
    }

    fn supports_seqpacket(&self) -> bool {
        true
    }

    fn transmit(&mut self, packet: Packet, inbound: &mut VecDeque<Packet>) {
        self.sent.lock().unwrap().push(packet.repr);
        if packet.repr.op == Op::Request {
            let response = Repr { buf_alloc: 256 * 1024, ..packet.repr.reply(Op::Response) };
            inbound.push_back(Packet::control(response));
        }
    }
}

/// Longer than the clock thread's one-second idle wait, so the RST cannot be sent by a wait
/// that merely happened to be in progress when the last handle went.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(1500);

#[test]
fn forced_rst_is_sent_after_the_last_handle_is_gone() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let peer = SilentPeer { sent: sent.clone() };
    let vsock = Vsock::with_transport_config(peer, |config| config.close_timeout = CLOSE_TIMEOUT);
    let stream = VsockStream::connect(&vsock, Addr::new(Cid(3), Port(1234))).unwrap();
    drop(stream);
    drop(vsock);
    let ops = || sent.lock().unwrap().iter().map(|r| r.op).collect::<Vec<_>>();
    assert_eq!(ops(), [Op::Request, Op::Shutdown]);
    let deadline = Instant::now() + CLOSE_TIMEOUT + Duration::from_secs(5);
    while !ops().contains(&Op::Rst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ops(), [Op::Request, Op::Shutdown, Op::Rst]);
}

#[test]
fn transport_capabilities_win_over_the_configuration() {
    let peer = SilentPeer { sent: Arc::default() };
    let vsock = Vsock::with_transport_config(peer, |config| {
        config.local_cid = Cid(77);
        config.close_timeout = CLOSE_TIMEOUT;
    });
    let stream = VsockStream::connect(&vsock, Addr::new(Cid(3), Port(1234))).unwrap();
    assert_eq!(stream.local_addr().unwrap().cid, Cid::HOST);
}
