//! A hostile peer: arbitrary packets (header bytes plus payload) into an engine that listens
//! and holds a connection. The engine must never panic, never emit an RW payload over 64 KiB or
//! a header whose length disagrees with its payload, and must keep its receive memory within
//! what it advertised.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use zerovsock_proto::{Engine, EngineConfig, Payload};
use zerovsock_wire::{Addr, Cid, Port, SocketType, HEADER_LEN, MAX_PACKET_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut engine = Engine::new(EngineConfig::new(Cid(2)));
    for (port, socket_type) in [(1234, SocketType::Stream), (1235, SocketType::Seqpacket)] {
        let listener = engine.open(socket_type).expect("first sockets open");
        engine.bind(listener, Addr::new(Cid::ANY, Port(port))).expect("free port");
        engine.listen(listener, 2).expect("listens");
    }
    let mut rest = data;
    let mut now = start;
    while rest.len() > HEADER_LEN + 2 {
        let (header, tail) = rest.split_at(HEADER_LEN);
        let payload_len = (usize::from(tail[0]) << 4 | usize::from(tail[1] & 0x0f)).min(tail.len() - 2);
        let payload = Payload::from_bytes(Bytes::copy_from_slice(&tail[2..2 + payload_len]));
        rest = &tail[2 + payload_len..];
        let _ = engine.handle_bytes(now, header, payload);
        now += Duration::from_millis(u64::from(tail[1] >> 4) * 300);
        engine.handle_timeout(now);
        while let Some(packet) = engine.poll_transmit() {
            assert_eq!(packet.repr.len as usize, packet.payload.len());
            assert!(packet.repr.len <= MAX_PACKET_PAYLOAD);
        }
        while engine.poll_wakeup().is_some() {}
        assert!(engine.socket_count() <= 2 + 2 * 3, "backlog bounds the accepted sockets");
    }
});
