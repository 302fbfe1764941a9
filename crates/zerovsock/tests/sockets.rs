//! Socket behaviour on loopback, after the kernel's `vsock_test` cases that do not involve
//! zerocopy: resets, close, shutdown, SEQPACKET bounds, truncation, peek, timeouts, many
//! connections, and bulk data integrity.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use common::*;
use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{
    Interest, LoopbackConfig, Vsock, VsockListener, VsockSeqpacket, VsockSeqpacketListener,
    VsockSocket, VsockStream,
};

const ECONNRESET: i32 = 104;
const EPIPE: i32 = 32;
const EMSGSIZE: i32 = 90;
const EINVAL: i32 = 22;
const EADDRINUSE: i32 = 98;
const ESOCKTNOSUPPORT: i32 = 94;

fn seqpacket_pair(vsock: &Vsock) -> (VsockSeqpacket, VsockSeqpacket) {
    let port = port();
    let listener = VsockSeqpacketListener::bind(vsock, any(port)).unwrap();
    let client = VsockSeqpacket::connect(vsock, local(port)).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

#[test]
fn connect_to_unknown_port_is_reset() {
    let vsock = Vsock::loopback();
    assert_eq!(errno(VsockStream::connect(&vsock, local(port()))), ECONNRESET);
}

#[test]
fn connect_to_bound_but_not_listening_port_is_reset() {
    let vsock = Vsock::loopback();
    let port = port();
    let socket = VsockSocket::stream(&vsock).unwrap();
    socket.bind(any(port)).unwrap();
    assert_eq!(errno(VsockStream::connect(&vsock, local(port))), ECONNRESET);
}

#[test]
fn connect_to_unreachable_cid_is_reset() {
    let vsock = Vsock::loopback();
    assert_eq!(errno(VsockStream::connect(&vsock, Addr::new(Cid(42), Port(1)))), ECONNRESET);
}

#[test]
fn binding_a_port_twice_is_addr_in_use() {
    let vsock = Vsock::loopback();
    let port = port();
    let _first = VsockListener::bind(&vsock, any(port)).unwrap();
    assert_eq!(errno(VsockListener::bind(&vsock, any(port))), EADDRINUSE);
}

#[test]
fn seqpacket_refused_when_transport_lacks_it() {
    let vsock = Vsock::loopback_with(LoopbackConfig { seqpacket: false, ..Default::default() });
    assert_eq!(errno(VsockSeqpacket::connect(&vsock, local(port()))), ESOCKTNOSUPPORT);
}

#[test]
fn client_close_is_seen_as_hangup_then_end_of_stream() {
    let vsock = Vsock::loopback();
    let (mut client, mut server) = pair(&vsock);
    client.write_all(b"A").unwrap();
    drop(client);
    let readiness = server.poll(Interest::READABLE, Some(Duration::from_secs(10))).unwrap();
    assert!(readiness.read_closed && readiness.readable, "POLLRDHUP, as vsock_poll reports it");
    assert_eq!(errno(server.write(b"x")), EPIPE);
    let mut byte = [0u8; 1];
    assert_eq!(server.read(&mut byte).unwrap(), 1);
    assert_eq!(&byte, b"A");
    assert_eq!(server.read(&mut byte).unwrap(), 0);
}

#[test]
fn closed_connections_release_every_socket() {
    let vsock = Vsock::loopback();
    let port = port();
    let listener = VsockListener::bind(&vsock, any(port)).unwrap();
    let (client, server) =
        (VsockStream::connect(&vsock, local(port)).unwrap(), listener.accept().unwrap().0);
    drop(client);
    drop(server);
    drop(listener);
    assert_eq!(vsock.socket_count(), 0, "SHUTDOWN answered by RST frees both ends");
}

#[test]
fn shut_wr_gives_epipe() {
    let vsock = Vsock::loopback();
    let (mut client, mut server) = pair(&vsock);
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(errno(client.write(b"x")), EPIPE);
    let mut buf = [0u8; 4];
    assert_eq!(server.read(&mut buf).unwrap(), 0, "the peer sees end of stream");
}

#[test]
fn peer_shut_rd_gives_epipe() {
    let vsock = Vsock::loopback();
    let (mut client, server) = pair(&vsock);
    server.shutdown(Shutdown::Read).unwrap();
    assert_eq!(errno(client.write(b"x")), EPIPE);
}

#[test]
fn hundred_sequential_connections() {
    let vsock = Vsock::loopback();
    let port = port();
    let listener = VsockListener::bind(&vsock, any(port)).unwrap();
    for i in 0..100u8 {
        let mut client = VsockStream::connect(&vsock, local(port)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let (from, to) =
            if i % 2 == 0 { (&mut client, &mut server) } else { (&mut server, &mut client) };
        from.write_all(&[i]).unwrap();
        let mut byte = [0u8];
        to.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], i);
    }
    drop(listener);
    assert_eq!(vsock.socket_count(), 0);
}

#[test]
fn double_bind_connect_reuses_the_port() {
    let vsock = Vsock::loopback();
    let (port, client_port) = (port(), port());
    let listener = VsockListener::bind(&vsock, any(port)).unwrap();
    for _ in 0..2 {
        let socket = VsockSocket::stream(&vsock).unwrap();
        socket.bind(any(client_port)).unwrap();
        let client = socket.connect(local(port)).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert_eq!(peer.port, client_port);
        drop(client);
        server.poll(Interest::READABLE, Some(Duration::from_secs(10))).unwrap();
    }
}

#[test]
fn peek_before_and_after_data() {
    let vsock = Vsock::loopback();
    let (mut client, server) = pair(&vsock);
    server.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(server.peek(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    server.set_nonblocking(false).unwrap();
    let data = pattern(64, 1);
    client.write_all(&data).unwrap();
    let mut small = [0u8; 32];
    assert_eq!(server.peek(&mut small).unwrap(), 32);
    assert_eq!(&small, &data[..32]);
    assert_eq!(server.peek(&mut buf).unwrap(), 64);
    assert_eq!(&buf[..], &data[..]);
    let mut read = [0u8; 64];
    (&server).read_exact(&mut read).unwrap();
    assert_eq!(&read[..], &data[..]);
}

#[test]
fn small_write_is_appended_to_a_partly_read_packet() {
    let vsock = Vsock::loopback();
    let (mut client, mut server) = pair(&vsock);
    client.write_all(b"HELLO").unwrap();
    let mut two = [0u8; 2];
    server.read_exact(&mut two).unwrap();
    client.write_all(b"WORLD").unwrap();
    let mut rest = [0u8; 8];
    server.read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"LLOWORLD");
    server.set_nonblocking(true).unwrap();
    assert_eq!(server.read(&mut rest).unwrap_err().kind(), ErrorKind::WouldBlock);
}

#[test]
fn rcvlowat_delays_readability() {
    let vsock = Vsock::loopback();
    let (mut client, server) = pair(&vsock);
    server.set_rcvlowat(128).unwrap();
    client.write_all(&[1u8]).unwrap();
    let ready = server.poll(Interest::READABLE, Some(Duration::from_millis(50))).unwrap();
    assert!(!ready.readable, "1 byte is below SO_RCVLOWAT");
    client.write_all(&[2u8; 127]).unwrap();
    let ready = server.poll(Interest::READABLE, Some(Duration::from_secs(10))).unwrap();
    assert!(ready.readable && !ready.error && !ready.hangup);
    assert_eq!(errno(server.set_rcvlowat(1 << 20)), EINVAL, "above the buffer size");
}

#[test]
fn seqpacket_message_bounds_and_eor() {
    let vsock = Vsock::loopback();
    let (client, server) = seqpacket_pair(&vsock);
    for socket in [&client, &server] {
        socket.set_buffer_size_unclamped(2 << 20).unwrap();
    }
    let messages: Vec<(Vec<u8>, bool)> = (0..128usize)
        .map(|i| {
            let len = if i % 2 == 0 { 1 + i * 31 % 4096 } else { 4096 + i * 97 % (3 * 4096) };
            (pattern(len, i as u64), i % 3 == 0 || i == 64)
        })
        .collect();
    let expected = messages.clone();
    let sender = thread::spawn(move || {
        for (data, eor) in &messages {
            let sent = if *eor { client.send_eor(data) } else { client.send(data) };
            assert_eq!(sent.unwrap(), data.len());
        }
        client
    });
    let mut buf = vec![0u8; 5 * 4096];
    for (data, eor) in &expected {
        let meta = server.recv(&mut buf).unwrap();
        assert_eq!((meta.len, meta.eor, meta.truncated), (data.len(), *eor, false));
        assert_eq!(djb2(&buf[..meta.len]), djb2(data));
    }
    drop(sender.join().unwrap());
}

#[test]
fn seqpacket_truncation_reports_the_full_length() {
    let vsock = Vsock::loopback();
    let (client, server) = seqpacket_pair(&vsock);
    client.send(&[7u8; 32]).unwrap();
    let mut small = [0u8; 16];
    let meta = server.recv(&mut small).unwrap();
    assert_eq!((meta.len, meta.message_len, meta.truncated), (16, 32, true));
    client.send(b"next").unwrap();
    assert_eq!(server.recv(&mut small).unwrap().len, 4, "the rest of the first was discarded");
}

#[test]
fn seqpacket_peek_leaves_the_message() {
    let vsock = Vsock::loopback();
    let (client, server) = seqpacket_pair(&vsock);
    client.send(&pattern(64, 3)).unwrap();
    let mut small = [0u8; 32];
    assert_eq!(server.peek(&mut small).unwrap().message_len, 64);
    let mut full = [0u8; 64];
    assert_eq!(server.recv(&mut full).unwrap().len, 64);
    assert_eq!(&full[..], &pattern(64, 3)[..]);
}

#[test]
fn seqpacket_big_message_is_emsgsize() {
    let vsock = Vsock::loopback();
    let (client, _server) = seqpacket_pair(&vsock);
    let size = client.buffer_size().unwrap() as usize;
    assert_eq!(errno(client.send(&vec![0u8; size + 1])), EMSGSIZE);
}

#[test]
fn seqpacket_read_timeout_is_would_block() {
    let vsock = Vsock::loopback();
    let (client, _server) = seqpacket_pair(&vsock);
    client.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(client.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
}

#[test]
fn nonblocking_write_returns_partial_count_when_credit_runs_out() {
    let vsock = Vsock::loopback();
    let (mut client, _server) = pair(&vsock);
    client.set_nonblocking(true).unwrap();
    let sent = client.write(&vec![0u8; 1 << 20]).unwrap();
    assert_eq!(sent, 256 * 1024, "exactly the peer's buffer");
    assert_eq!(client.write(&[0u8]).unwrap_err().kind(), ErrorKind::WouldBlock);
}

#[test]
fn tx_credit_is_capped_by_own_buffer() {
    let vsock = Vsock::loopback();
    let (mut client, server) = pair(&vsock);
    server.set_buffer_size_unclamped(2 << 20).unwrap();
    client.set_buffer_size(4096).unwrap();
    client.set_nonblocking(true).unwrap();
    assert_eq!(client.write(&vec![0u8; 1 << 20]).unwrap(), 4096);
}

#[test]
fn bulk_transfer_keeps_every_byte_in_order() {
    let vsock = Vsock::loopback();
    let (mut client, mut server) = pair(&vsock);
    let data = pattern(8 << 20, 9);
    let expected = djb2(&data);
    let reader = thread::spawn(move || {
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        (got.len(), djb2(&got))
    });
    for chunk in data.chunks(100_003) {
        client.write_all(chunk).unwrap();
    }
    drop(client);
    assert_eq!(reader.join().unwrap(), (8 << 20, expected));
}

#[test]
fn bulk_zerocopy_transfer_keeps_every_byte_in_order() {
    let vsock = Vsock::loopback();
    let (client, mut server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    let data = bytes::Bytes::from(pattern(8 << 20, 10));
    let expected = djb2(&data);
    let reader = thread::spawn(move || {
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        (got.len(), djb2(&got))
    });
    for start in (0..data.len()).step_by(65_536 * 3) {
        let end = (start + 65_536 * 3).min(data.len());
        client.send_zerocopy(data.slice(start..end)).unwrap();
    }
    drop(client);
    assert_eq!(reader.join().unwrap(), (8 << 20, expected));
}

/// Many connections at once, each with its own writer and reader thread, copy and zerocopy
/// mixed, small and large writes: every stream arrives whole and in order, and every socket is
/// gone afterwards (no lost wake-up, no deadlock, no leak).
#[test]
fn concurrent_connections_keep_their_streams_apart() {
    let vsock = Vsock::loopback();
    let port = port();
    let listener = VsockListener::bind(&vsock, any(port)).unwrap();
    let mut threads = Vec::new();
    for index in 0..8u64 {
        let client = VsockStream::connect(&vsock, local(port)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let data = pattern(1 << 20, 100 + index);
        let expected = djb2(&data);
        threads.push(thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 1000 + index as usize * 7919];
            loop {
                match server.read(&mut buf).unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
            assert_eq!((got.len(), djb2(&got)), (1 << 20, expected), "connection {index}");
        }));
        threads.push(thread::spawn(move || {
            let zerocopy = index % 2 == 1;
            client.set_zerocopy(zerocopy).unwrap();
            let data = bytes::Bytes::from(data);
            let step = 4096 + index as usize * 12_345;
            for start in (0..data.len()).step_by(step) {
                let chunk = data.slice(start..(start + step).min(data.len()));
                if zerocopy {
                    client.send_zerocopy(chunk).unwrap();
                } else {
                    (&client).write_all(&chunk).unwrap();
                }
            }
        }));
    }
    for thread in threads {
        thread.join().unwrap();
    }
    drop(listener);
    assert_eq!(vsock.socket_count(), 0);
}

/// Kernel test "SOCK_STREAM MSG_PEEK after partial recv": a peek starts where the last read
/// stopped.
#[test]
fn peek_after_a_partial_read_starts_at_the_read_position() {
    let vsock = Vsock::loopback();
    let (mut client, mut server) = pair(&vsock);
    let data = pattern(64, 8);
    client.write_all(&data).unwrap();
    let mut first = [0u8; 10];
    server.read_exact(&mut first).unwrap();
    let mut peeked = [0u8; 54];
    assert_eq!(server.peek(&mut peeked).unwrap(), 54);
    assert_eq!(&peeked[..], &data[10..]);
}

const ENOMEM: i32 = 12;

/// Linux's `vsock_connectible_sendmsg` (`out_err`): once bytes went out, a STREAM send
/// returns their count, and the error comes with the next call.
#[test]
fn stream_send_stopped_by_the_peer_shut_rd_returns_the_bytes_written() {
    let vsock = Vsock::loopback();
    let (client, server) = pair(&vsock);
    let buffer = server.buffer_size().unwrap() as usize;
    let reader = thread::spawn(move || {
        while server.unread_bytes() < buffer {
            server.poll(Interest::READABLE, Some(Duration::from_millis(10))).unwrap();
        }
        server.shutdown(Shutdown::Read).unwrap();
        server
    });
    let written = (&client).write(&vec![1u8; 4 * buffer]).unwrap();
    assert_eq!(written, buffer, "one credit window went out before SHUT_RD");
    assert_eq!(errno((&client).write(b"more")), EPIPE);
    let server = reader.join().unwrap();
    assert_eq!(server.unread_bytes(), buffer);
}

#[test]
fn zero_length_stream_read_returns_at_once_and_consumes_nothing() {
    let vsock = Vsock::loopback();
    let (mut client, server) = pair(&vsock);
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!((&server).read(&mut []).unwrap(), 0, "no data: still 0, at once");
    client.write_all(b"data").unwrap();
    assert_eq!((&server).read(&mut []).unwrap(), 0);
    assert_eq!(server.unread_bytes(), 4);
    let mut buf = [0u8; 4];
    (&server).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"data");
}

#[test]
fn zero_length_seqpacket_recv_leaves_the_message() {
    let vsock = Vsock::loopback();
    let (client, server) = seqpacket_pair(&vsock);
    client.send(b"whole").unwrap();
    let meta = server.recv(&mut []).unwrap();
    assert_eq!((meta.len, meta.message_len), (0, 0));
    let mut buf = [0u8; 16];
    let meta = server.recv(&mut buf).unwrap();
    assert_eq!(&buf[..meta.len], b"whole");
}

#[test]
fn empty_seqpacket_message_puts_nothing_on_the_wire() {
    let vsock = Vsock::loopback();
    let (client, server) = seqpacket_pair(&vsock);
    assert_eq!(client.send(b"").unwrap(), 0);
    client.send(b"first real message").unwrap();
    let mut buf = [0u8; 64];
    let meta = server.recv(&mut buf).unwrap();
    assert_eq!(&buf[..meta.len], b"first real message", "no empty message came before it");
    server.set_nonblocking(true).unwrap();
    assert_eq!(errno(server.recv(&mut buf)), libc_eagain());
}

fn libc_eagain() -> i32 {
    std::io::Error::from(ErrorKind::WouldBlock).raw_os_error().unwrap_or(11)
}

/// `__vsock_stream_recvmsg`: a blocking read gathers SO_RCVLOWAT bytes before it returns.
#[test]
fn blocking_read_gathers_rcvlowat_bytes() {
    let vsock = Vsock::loopback();
    let (mut client, server) = pair(&vsock);
    server.set_rcvlowat(100).unwrap();
    client.write_all(&[1u8; 10]).unwrap();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 1000];
        let n = (&server).read(&mut buf).unwrap();
        (n, buf[..n].to_vec())
    });
    // Whether the reader sees the first ten bytes alone or not, it must not return with them.
    thread::sleep(Duration::from_millis(20));
    client.write_all(&[2u8; 95]).unwrap();
    let (n, got) = reader.join().unwrap();
    assert_eq!(n, 105);
    assert_eq!(got, [vec![1u8; 10], vec![2u8; 95]].concat());
}

#[test]
fn blocking_read_below_rcvlowat_returns_what_it_has_at_the_timeout_or_end_of_stream() {
    let vsock = Vsock::loopback();
    let (mut client, server) = pair(&vsock);
    server.set_rcvlowat(100).unwrap();
    server.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    client.write_all(&[1u8; 10]).unwrap();
    let mut buf = [0u8; 1000];
    assert_eq!((&server).read(&mut buf).unwrap(), 10, "timeout with bytes copied: the count");
    assert_eq!(errno((&server).read(&mut buf)), libc_eagain(), "timeout with none: EAGAIN");
    client.write_all(&[2u8; 20]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!((&server).read(&mut buf).unwrap(), 20, "end of stream ends the gathering");
    assert_eq!((&server).read(&mut buf).unwrap(), 0);
}

#[test]
fn read_with_rcvlowat_at_the_buffer_size_is_enomem() {
    let vsock = Vsock::loopback();
    let (_client, server) = pair(&vsock);
    let size = server.buffer_size().unwrap() as usize;
    server.set_rcvlowat(size as u32).unwrap();
    let mut buf = vec![0u8; size];
    assert_eq!(errno((&server).read(&mut buf)), ENOMEM);
    let mut small = [0u8; 16];
    server.set_nonblocking(true).unwrap();
    assert_eq!(errno((&server).read(&mut small)), libc_eagain(), "a smaller read is fine");
}
