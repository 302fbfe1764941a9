//! Hot paths of the engine, each beside a baseline measured in the same run: header
//! parse + emit, and one 64 KiB RW packet through a loopback engine (send pass, delivery,
//! receive lease, commit) beside a plain 64 KiB memcpy.
#![allow(missing_docs, clippy::unwrap_used)]
// The benchmark is a driver, not the engine: it may read the clock to give the engine a time.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use zerovsock_proto::{Engine, EngineConfig, Payload, SendRequest, SocketId};
use zerovsock_wire::{Addr, Cid, Op, Port, Repr, SocketType};

fn header(c: &mut Criterion) {
    let repr = Repr {
        len: 4096,
        ..Repr::new(
            Op::Rw,
            SocketType::Stream,
            Addr::new(Cid(3), Port(1)),
            Addr::new(Cid(2), Port(2)),
        )
    };
    let bytes = repr.to_bytes();
    let mut group = c.benchmark_group("header");
    group.bench_function("parse", |b| b.iter(|| Repr::parse_bytes(black_box(&bytes)).unwrap()));
    group.bench_function("emit", |b| b.iter(|| black_box(&repr).to_bytes()));
    group.finish();
}

/// A connected pair on one loopback engine.
fn pair(now: Instant) -> (Engine, SocketId, SocketId) {
    let mut engine = Engine::new(EngineConfig::new(Cid::LOCAL));
    let listener = engine.open(SocketType::Stream).unwrap();
    engine.bind(listener, Addr::new(Cid::ANY, Port(1234))).unwrap();
    engine.listen(listener, 4).unwrap();
    let client = engine.open(SocketType::Stream).unwrap();
    engine.connect(now, client, Addr::new(Cid::LOCAL, Port(1234))).unwrap();
    pump(&mut engine, now);
    let server = engine.accept(listener).unwrap();
    (engine, client, server)
}

fn pump(engine: &mut Engine, now: Instant) {
    while let Some(packet) = engine.poll_transmit() {
        engine.handle_packet(now, packet);
    }
    while engine.poll_wakeup().is_some() {}
}

fn rw_packet(c: &mut Criterion) {
    const SIZE: usize = 64 * 1024;
    let now = Instant::now();
    let (mut engine, client, server) = pair(now);
    let data = Bytes::from(vec![7u8; SIZE]);
    let mut out = vec![0u8; SIZE];
    let mut group = c.benchmark_group("rw_64k");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group.bench_function("memcpy_baseline", |b| b.iter(|| out.copy_from_slice(black_box(&data))));
    group.bench_function("engine_send_deliver_recv", |b| {
        b.iter(|| {
            let request = SendRequest {
                remaining: SIZE,
                at_segment_start: true,
                zerocopy: false,
                eor: false,
                max_pass: usize::MAX,
            };
            let grant = engine.begin_send(client, request).unwrap();
            engine.finish_send(grant, Payload::from_bytes(data.clone())).unwrap();
            pump(&mut engine, now);
            let lease = engine.recv(server, SIZE).unwrap();
            lease.copy_to(&mut out);
            engine.commit_recv(server, lease);
            pump(&mut engine, now);
        })
    });
    group.finish();
}

criterion_group!(benches, header, rw_packet);
criterion_main!(benches);
