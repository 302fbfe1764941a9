//! Where the order of Linux's checks shows at the socket layer (6.12.117, `net/vmw_vsock`):
//! end of stream before ENOMEM, ENOMEM for peeks, an error met while gathering SO_RCVLOWAT
//! bytes reported by the next read, zerocopy for a later pass that starts on a buffer boundary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use zerovsock::{Completion, Interest, Vsock, VsockSocket, VsockStream};

const ENOMEM: i32 = 12;
const ENOBUFS: i32 = 105;
const WAIT: Duration = Duration::from_secs(10);

/// A STREAM pair whose accepting side has `buffer` bytes of receive buffer from the start.
fn pair_with_server_buffer(vsock: &Vsock, buffer: u64) -> (VsockStream, VsockStream) {
    let port = port();
    let listener = VsockSocket::stream(vsock).unwrap();
    listener.set_buffer_size(buffer).unwrap();
    listener.bind(any(port)).unwrap();
    let listener = listener.listen(8).unwrap();
    let client = VsockStream::connect(vsock, local(port)).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// af_vsock.c:2434-2436 (`__vsock_connectible_recvmsg`) returns 0 after SHUT_RD (and 2411-2418
/// returns 0 for a SOCK_DONE socket no longer ESTABLISHED) before `__vsock_stream_recvmsg`
/// computes its target (line 2283-2285, ENOMEM).
#[test]
fn read_after_shut_rd_is_end_of_stream_even_with_rcvlowat_at_the_buffer() {
    let vsock = Vsock::loopback();
    let (_client, server) = pair(&vsock);
    let size = server.buffer_size().unwrap() as usize;
    server.set_rcvlowat(size as u32).unwrap();
    server.shutdown(Shutdown::Read).unwrap();
    let mut buf = vec![0u8; size];
    assert_eq!((&server).read(&mut buf).unwrap(), 0);
}

/// af_vsock.c:2283-2285: MSG_PEEK goes through `__vsock_stream_recvmsg` too, so a peek whose
/// target (min(SO_RCVLOWAT, len)) is not below the buffer size is ENOMEM.
#[test]
fn peek_with_rcvlowat_at_the_buffer_is_enomem() {
    let vsock = Vsock::loopback();
    let (mut client, server) = pair(&vsock);
    let size = server.buffer_size().unwrap() as usize;
    server.set_rcvlowat(size as u32).unwrap();
    client.write_all(b"ten bytes!").unwrap();
    let mut buf = vec![0u8; size];
    assert_eq!(errno(server.peek(&mut buf)), ENOMEM);
}

/// af_vsock.c:2296-2335 (`__vsock_stream_recvmsg`): a read that gathered some bytes and then finds
/// `sk_err` returns the bytes; `sk_err` stays set (line 2329 only reads it), so the next read
/// reports ENOBUFS.
#[test]
fn error_met_while_gathering_rcvlowat_is_not_lost() {
    let vsock = Vsock::loopback();
    // 1000 bytes hold one packet (1000 / 576): the second packet resets the connection
    // (virtio_transport_inc_rx_pkt, virtio_transport_common.c:584) with ENOBUFS.
    let (client, server) = pair_with_server_buffer(&vsock, 1000);
    server.set_rcvlowat(100).unwrap();
    server.set_read_timeout(Some(WAIT)).unwrap();
    (&client).write_all(&[1u8; 10]).unwrap();
    (&client).write_all(&[2u8; 10]).unwrap();
    let mut buf = [0u8; 500];
    assert_eq!((&server).read(&mut buf).unwrap(), 10, "the bytes queued before the reset");
    assert_eq!(errno((&server).read(&mut buf)), ENOBUFS);
}

/// virtio_transport_common.c:62-67 (`virtio_transport_can_zcopy`): a pass is zerocopy when the
/// iov_iter is at offset 0 of its current segment and the rest fits the credit; a later pass of a
/// vectored send that starts exactly on a segment boundary qualifies.
#[test]
fn later_pass_on_an_iovec_boundary_is_zerocopy() {
    let vsock = Vsock::loopback();
    let (client, server) = pair_with_server_buffer(&vsock, 4096);
    client.set_zerocopy(true).unwrap();
    let a = Bytes::from(vec![1u8; 4096]);
    let b = Bytes::from(vec![2u8; 4096]);
    thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut first = vec![0u8; 4096];
            (&server).read_exact(&mut first).unwrap();
            // Take the first pass's completion before the second can complete and merge.
            client.poll(Interest::NONE, Some(WAIT)).unwrap();
            let c0 = client.recv_completion().unwrap();
            let mut second = vec![0u8; 4096];
            (&server).read_exact(&mut second).unwrap();
            (c0, first, second)
        });
        assert_eq!(client.send_zerocopy_vectored([a, b]).unwrap(), 8192);
        let (c0, first, second) = reader.join().unwrap();
        assert_eq!((first, second), (vec![1u8; 4096], vec![2u8; 4096]));
        assert_eq!(c0, Completion { lo: 0, hi: 0, copied: true }, "8192 > 4096 credit");
    });
    client.poll(Interest::NONE, Some(WAIT)).unwrap();
    assert_eq!(client.recv_completion().unwrap(), Completion { lo: 1, hi: 1, copied: false });
}
