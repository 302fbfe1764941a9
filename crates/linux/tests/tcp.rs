//! MSG_ZEROCOPY on TCP over 127.0.0.1: no vsock involved, so this runs on the host. Linux
//! copies zerocopy data that stays on the machine (loopback delivery), so every completion is
//! COPIED, and the library must still hold each buffer until its completion arrives.

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use zerovsock_linux::{Interest, TcpZerocopyStream};

#[test]
fn tcp_zerocopy_sends_are_delivered_and_completed_copied() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sender =
        TcpZerocopyStream::from(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
    let (mut receiver, _) = listener.accept().unwrap();
    sender.set_zerocopy(true).unwrap();

    let messages: Vec<Vec<u8>> =
        (0..4u8).map(|i| vec![i.wrapping_mul(37) ^ 0x5a; 256 << 10]).collect();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        receiver.read_to_end(&mut got).unwrap();
        got
    });
    for message in &messages {
        assert_eq!(sender.send_zerocopy(message.clone()).unwrap(), message.len());
    }
    assert_eq!(sender.next_completion_id(), 4, "one id per send pass");

    // Completions may be merged into ranges; together they cover ids 0..=3.
    let mut covered = 0;
    while covered < 4 {
        let ready = sender.poll(Interest::NONE, Some(Duration::from_secs(10))).unwrap();
        assert!(ready.error, "POLLERR: a completion is queued");
        while let Ok(done) = sender.recv_completion() {
            assert_eq!(done.lo, covered, "completions come in id order");
            assert!(done.copied, "loopback TCP copies: {done:?}");
            covered = done.hi + 1;
        }
    }
    assert_eq!(sender.pinned_buffers(), 0, "every buffer released after its completion");
    sender.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap(), messages.concat(), "the peer's bytes");
}
