//! The kernel's MSG_ZEROCOPY cases (`vsock_test_zerocopy.c`, tests 18 and 19) on loopback:
//! seven for STREAM, six for SEQPACKET, with data hashes and the COPIED flag where the kernel
//! expects them; plus the error-queue rules around them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use zerovsock::wire::SocketType;
use zerovsock::{
    Completion, Interest, LoopbackConfig, Vsock, VsockListener, VsockSeqpacket,
    VsockSeqpacketListener, VsockSocket, VsockStream, ZerocopyWriter,
};
use zerovsock_testkit::suite::{check_completion, djb2, zerocopy_cases, Expect, ZerocopyCase};

/// How long a completion may take to appear once the peer has read the data. The kernel test
/// allows 100 ms; the loopback completes synchronously with the read, so this only guards
/// against a stuck test.
const COMPLETION_WAIT: Duration = Duration::from_secs(10);

/// The iovec of a case as shared buffers, each starting at its offset.
fn iovec(case: &ZerocopyCase, seed: u64) -> Vec<Bytes> {
    case.buffers(seed).into_iter().map(|(data, offset)| Bytes::from(data).slice(offset..)).collect()
}

/// Runs one case of the kernel table: the "server" reads concurrently and hashes; the client
/// sends, then waits for the completion as the kernel test's `poll(POLLERR)` does.
///
/// Case 5 puts an unmapped page in the iovec, which safe Rust buffers cannot express; the other
/// way Linux fails a zerocopy send with ENOMEM before any byte moves is an exhausted
/// notification budget (optmem), so it runs with a budget of one notification already in use.
macro_rules! run_case {
    ($listener:ty, $conn:ty, $case:expr, $seed:expr, $read:expr) => {{
        let case: &ZerocopyCase = $case;
        let enomem = case.expect == Expect::Enomem;
        let limit = if enomem { 1 } else { 128 };
        let vsock = Vsock::loopback_with(LoopbackConfig {
            notification_limit: limit,
            ..LoopbackConfig::default()
        });
        let port = port();
        let listener = <$listener>::bind(&vsock, any(port)).unwrap();
        let iov = iovec(case, $seed);
        let total: usize = if enomem { 1 } else { case.total() };
        let expected =
            if enomem { vec![0xee] } else { iov.iter().flat_map(|b| b.to_vec()).collect() };
        let server = thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let data: Vec<u8> = $read(&conn, total);
            djb2(&data)
        });
        let client = <$conn>::connect(&vsock, local(port)).unwrap();
        if case.so_zerocopy {
            client.set_zerocopy(true).unwrap();
            assert!(client.zerocopy().unwrap());
        }
        if enomem {
            // Takes the only notification; its completion stays unread.
            client.send_zerocopy(vec![0xee]).unwrap();
            client.poll(Interest::NONE, Some(COMPLETION_WAIT)).unwrap();
            assert_eq!(errno(client.send_zerocopy_vectored(iov)), 12, "ENOMEM");
            assert_eq!(client.next_completion_id(), 1, "the failed send took no id");
            assert_eq!(client.recv_completion().unwrap().hi, 0, "only the first send completed");
        } else {
            assert_eq!(client.send_zerocopy_vectored(iov).unwrap(), total);
        }
        let waits = case.so_zerocopy && !enomem;
        let wait = if waits { COMPLETION_WAIT } else { Duration::from_millis(100) };
        let readiness = client.poll(Interest::NONE, Some(wait)).unwrap();
        let completion = readiness.error.then(|| client.recv_completion().unwrap());
        check_completion(case.expect, completion).unwrap();
        drop(client);
        assert_eq!(server.join().unwrap(), djb2(&expected), "data hash");
    }};
}

/// Reads `total` bytes, then waits for the client to close (so the client never sends to a
/// closed peer, which would turn its errors into EPIPE).
fn read_stream(conn: &VsockStream, total: usize) -> Vec<u8> {
    let mut data = vec![0u8; total];
    (&*conn).read_exact(&mut data).unwrap();
    assert_eq!((&*conn).read(&mut [0u8; 1]).unwrap(), 0, "nothing after the case's data");
    data
}

/// Reads one message of `total` bytes, then waits for the client to close.
fn read_message(conn: &VsockSeqpacket, total: usize) -> Vec<u8> {
    let mut data = vec![0u8; total + 1];
    let meta = conn.recv(&mut data).unwrap();
    assert_eq!(meta.len, total, "one whole message");
    data.truncate(meta.len);
    assert_eq!(conn.recv(&mut [0u8; 1]).unwrap().len, 0, "nothing after the case's message");
    data
}

#[test]
fn stream_zerocopy_cases() {
    for (seed, case) in zerocopy_cases(SocketType::Stream).enumerate() {
        run_case!(VsockListener, VsockStream, case, seed as u64, read_stream);
    }
}

#[test]
fn seqpacket_zerocopy_cases() {
    for (seed, case) in zerocopy_cases(SocketType::Seqpacket).enumerate() {
        run_case!(VsockSeqpacketListener, VsockSeqpacket, case, seed as u64, read_message);
    }
}

#[test]
fn empty_error_queue_is_would_block() {
    let vsock = Vsock::loopback();
    let (client, _server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    assert_eq!(errno(client.recv_completion()), libc_eagain());
    assert!(!client.readiness().error);
}

fn libc_eagain() -> i32 {
    std::io::Error::from(std::io::ErrorKind::WouldBlock).raw_os_error().unwrap_or(11)
}

#[test]
fn completion_waits_for_the_reader_on_loopback() {
    let vsock = Vsock::loopback();
    let (client, mut server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    client.send_zerocopy(vec![1u8; 1000]).unwrap();
    assert!(!client.readiness().error, "nothing completes before the receiver reads");
    let mut half = [0u8; 500];
    server.read_exact(&mut half).unwrap();
    assert!(!client.readiness().error, "a partly read packet is not consumed");
    server.read_exact(&mut half).unwrap();
    assert!(client.readiness().error);
    let completion = client.recv_completion().unwrap();
    assert_eq!(completion, Completion { lo: 0, hi: 0, copied: false });
}

#[test]
fn consecutive_completions_merge() {
    let vsock = Vsock::loopback();
    let (client, mut server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    for _ in 0..3 {
        client.send_zerocopy(vec![2u8; 100]).unwrap();
    }
    let mut all = [0u8; 300];
    server.read_exact(&mut all).unwrap();
    assert_eq!(client.recv_completion().unwrap(), Completion { lo: 0, hi: 2, copied: false });
    assert!(client.recv_completion().is_err());
}

#[test]
fn message_larger_than_credit_completes_copied() {
    let vsock = Vsock::loopback();
    let (client, server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    let reader = thread::spawn(move || {
        let mut data = vec![0u8; 300 * 1024];
        (&server).read_exact(&mut data).unwrap();
        data
    });
    client.send_zerocopy(vec![3u8; 300 * 1024]).unwrap();
    assert_eq!(reader.join().unwrap(), vec![3u8; 300 * 1024]);
    client.poll(Interest::NONE, Some(COMPLETION_WAIT)).unwrap();
    let completion = client.recv_completion().unwrap();
    assert!(completion.copied);
    assert_eq!((completion.lo, completion.hi), (0, 1), "two passes, two ids, merged");
}

#[test]
fn budget_exhaustion_is_enomem_and_sends_nothing() {
    let config = LoopbackConfig { notification_limit: 1, ..LoopbackConfig::default() };
    let vsock = Vsock::loopback_with(config);
    let (client, mut server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    client.send_zerocopy(vec![4u8; 10]).unwrap();
    assert_eq!(errno(client.send_zerocopy(vec![5u8; 10])), 12, "ENOMEM");
    assert_eq!(client.next_completion_id(), 1, "the refused send took no id");
    let mut buf = [0u8; 64];
    assert_eq!(server.read(&mut buf).unwrap(), 10, "only the first send's bytes arrived");
    assert_eq!(client.recv_completion().unwrap(), Completion { lo: 0, hi: 0, copied: false });
    client.send_zerocopy(vec![6u8; 10]).unwrap();
    assert_eq!(server.read(&mut buf).unwrap(), 10);
    let next = client.recv_completion().unwrap();
    assert_eq!((next.lo, next.hi), (1, 1), "the refused send took no id: the next one is 1");
}

#[test]
fn transport_without_zerocopy_refuses_with_eopnotsupp() {
    let config = LoopbackConfig { zerocopy: false, ..LoopbackConfig::default() };
    let vsock = Vsock::loopback_with(config);
    let port = port();
    let _listener = VsockListener::bind(&vsock, any(port)).unwrap();
    let socket = VsockSocket::stream(&vsock).unwrap();
    socket.set_zerocopy(true).unwrap();
    assert_eq!(errno(socket.connect(local(port))), 95, "EOPNOTSUPP at connect");
    let (client, _server) = pair(&vsock);
    assert_eq!(errno(client.set_zerocopy(true)), 95);
    assert_eq!(
        errno(client.send_zerocopy(vec![0u8; 8])),
        95,
        "MSG_ZEROCOPY regardless of SO_ZEROCOPY"
    );
}

#[test]
fn writer_hands_buffers_back_after_the_reader_consumed_them() {
    let vsock = Vsock::loopback();
    let (client, mut server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    let mut writer = ZerocopyWriter::new(&client);
    writer.send(vec![8u8; 8192]).unwrap();
    writer.send(vec![9u8; 8192]).unwrap();
    assert_eq!(writer.reclaim().unwrap(), None);
    let mut got = vec![0u8; 8192];
    server.read_exact(&mut got).unwrap();
    let first = writer.reclaim().unwrap().expect("first buffer back");
    assert_eq!((first.buffer[0], first.copied), (8, false));
    assert_eq!(writer.reclaim().unwrap(), None, "second not read yet");
    server.read_exact(&mut got).unwrap();
    assert_eq!(writer.reclaim_wait(Some(COMPLETION_WAIT)).unwrap().unwrap().buffer[0], 9);
    assert_eq!(writer.in_flight(), 0);
}

#[test]
fn closing_the_receiver_completes_unread_sends() {
    let vsock = Vsock::loopback();
    let (client, server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    client.send_zerocopy(vec![1u8; 4096]).unwrap();
    drop(server);
    client.poll(Interest::NONE, Some(COMPLETION_WAIT)).unwrap();
    assert_eq!(client.recv_completion().unwrap().lo, 0, "buffer released, never read");
}

/// After the kernel's "vsock/virtio: Coalesce only linear skb" fix (test "SOCK_STREAM virtio
/// MSG_ZEROCOPY coalescence corruption"): a small zerocopy send behind queued data is not copied
/// into the queued packet; it stays the sender's memory, intact, until the reader takes it.
#[test]
fn small_zerocopy_send_is_not_merged_into_queued_data() {
    let vsock = Vsock::loopback();
    let (client, mut server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    (&client).write_all(&[b'x'; 4097]).unwrap();
    let small = zerovsock_testkit::suite::pattern(128, 5);
    client.send_zerocopy(small.clone()).unwrap();
    assert!(!client.readiness().error, "the 128 bytes are unread: still the sender's");
    let mut skip = vec![0u8; 4097];
    server.read_exact(&mut skip).unwrap();
    assert!(!client.readiness().error);
    let mut got = [0u8; 128];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got[..], &small[..]);
    assert_eq!(client.recv_completion().unwrap(), Completion { lo: 0, hi: 0, copied: false });
}

/// Kernel 6.12.117 collapses non-linear (zerocopy) skbs by copying when the receive queue
/// reaches its length bound (`virtio_transport_collapse_rx_queue`): small zerocopy sends well
/// inside the credit never reset the connection, and a collapsed send completes at the copy.
#[test]
fn small_zerocopy_sends_inside_the_credit_are_collapsed_not_reset() {
    let vsock = Vsock::loopback();
    let port = port();
    let listener = VsockSocket::stream(&vsock).unwrap();
    listener.set_buffer_size(64 * 1024).unwrap();
    listener.bind(any(port)).unwrap();
    let listener = listener.listen(8).unwrap();
    let client = VsockStream::connect(&vsock, local(port)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.set_zerocopy(true).unwrap();
    let sends = 120u8;
    for i in 0..sends {
        assert_eq!(client.send_zerocopy(vec![i; 100]).unwrap(), 100, "send {i}");
    }
    // The first ~113 packets were copied into one by the collapse: their completions are in.
    let early = client.recv_completion().unwrap();
    assert_eq!(early.lo, 0);
    assert!(early.count() >= 100 && !early.copied, "{early:?}");
    let mut got = vec![0u8; 100 * sends as usize];
    server.read_exact(&mut got).unwrap();
    let expected: Vec<u8> = (0..sends).flat_map(|i| [i; 100]).collect();
    assert_eq!(got, expected);
    let rest = client.recv_completion().unwrap();
    assert_eq!((rest.lo, rest.hi), (early.hi + 1, u32::from(sends) - 1));
}

/// `out_err` in `vsock_connectible_sendmsg`: ENOMEM on a later pass of a zerocopy STREAM send
/// returns the bytes the earlier passes sent.
#[test]
fn zerocopy_send_stopped_by_enomem_on_a_later_pass_returns_the_bytes_written() {
    let config = LoopbackConfig { notification_limit: 1, ..LoopbackConfig::default() };
    let vsock = Vsock::loopback_with(config);
    let (client, server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    let window = server.buffer_size().unwrap() as usize;
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; window];
        (&server).read_exact(&mut got).unwrap();
        got
    });
    // The first pass takes the whole window (and the one notification); once the reader has
    // consumed it, its completion waits unread, so the second pass finds no budget.
    let sent = client.send_zerocopy(vec![7u8; 2 * window]).unwrap();
    assert_eq!(sent, window);
    assert_eq!(reader.join().unwrap(), vec![7u8; window]);
    let completion = client.recv_completion().unwrap();
    assert_eq!((completion.lo, completion.hi, completion.copied), (0, 0, true));
}

#[test]
fn empty_zerocopy_message_takes_no_completion_id() {
    let vsock = Vsock::loopback();
    let port = port();
    let listener = VsockSeqpacketListener::bind(&vsock, any(port)).unwrap();
    let client = VsockSeqpacket::connect(&vsock, local(port)).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_zerocopy(true).unwrap();
    assert_eq!(client.send_zerocopy(Vec::new()).unwrap(), 0);
    client.send_zerocopy(vec![1u8; 10]).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(server.recv(&mut buf).unwrap().len, 10);
    assert_eq!(client.recv_completion().unwrap(), Completion { lo: 0, hi: 0, copied: false });
}

/// A transport whose packets cross a thread of their own, as a virtqueue's do: each payload
/// is copied there and the original dropped on that thread, outside both engines (as the
/// userspace guest driver and the device do).
struct ThreadWire {
    cid: zerovsock::wire::Cid,
    out: std::sync::mpsc::Sender<zerovsock::Packet>,
}

impl zerovsock::Transport for ThreadWire {
    fn local_cid(&self) -> zerovsock::wire::Cid {
        self.cid
    }
    fn supports_zerocopy(&self) -> bool {
        true
    }
    fn supports_seqpacket(&self) -> bool {
        false
    }
    fn transmit(
        &mut self,
        packet: zerovsock::Packet,
        _inbound: &mut std::collections::VecDeque<zerovsock::Packet>,
    ) {
        let _ = self.out.send(packet);
    }
}

/// Two endpoints (CIDs 2 and 3) joined by [`ThreadWire`]s.
fn threaded_pair() -> (Vsock, Vsock) {
    use zerovsock::wire::{Cid, Header, HEADER_LEN};
    let (to_guest, for_guest) = std::sync::mpsc::channel::<zerovsock::Packet>();
    let (to_host, for_host) = std::sync::mpsc::channel::<zerovsock::Packet>();
    let host = Vsock::with_transport(ThreadWire { cid: Cid::HOST, out: to_guest });
    let guest = Vsock::with_transport(ThreadWire { cid: Cid(3), out: to_host });
    for (packets, into) in [(for_guest, guest.clone()), (for_host, host.clone())] {
        thread::spawn(move || {
            for packet in packets {
                let mut header = [0u8; HEADER_LEN];
                packet.repr.emit(&mut Header::new_checked(&mut header[..]).unwrap());
                let copy = zerovsock::Payload::from_bytes(Bytes::from(packet.payload.to_vec()));
                // The sender's memory is released here, on this thread, before delivery.
                drop(packet);
                into.deliver([(header, copy)]);
            }
        });
    }
    (host, guest)
}

/// A completion queued when another thread drops the payload reaches the sender at once, not
/// at the clock thread's next idle tick (up to a second later): Linux wakes the socket from
/// the skb destructor. The receiver never reads, so nothing else comes back to wake the sender.
#[test]
fn a_payload_dropped_on_a_transport_thread_completes_without_waiting_for_a_tick() {
    let (host, guest) = threaded_pair();
    let listener = VsockListener::bind(&host, any(port())).unwrap();
    let port = listener.local_addr().unwrap().port;
    let sender =
        VsockStream::connect(&guest, zerovsock::wire::Addr::new(zerovsock::wire::Cid::HOST, port))
            .unwrap();
    let (_receiver, _) = listener.accept().unwrap();
    sender.set_zerocopy(true).unwrap();
    let start = std::time::Instant::now();
    for id in 0..10 {
        sender.send_zerocopy(vec![id as u8; 4096]).unwrap();
        let ready = sender.poll(Interest::NONE, Some(COMPLETION_WAIT)).unwrap();
        assert!(ready.error, "completion {id} within {COMPLETION_WAIT:?}");
        let done = sender.recv_completion().unwrap();
        assert_eq!((done.lo, done.hi, done.copied), (id, id, false));
    }
    // Waiting for the idle tick instead takes half a second per send on average: ten sends
    // summing under 2 s that way has a chance of 2^10/10! (0.03%).
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "10 completions took {took:?}");
}
