//! The control channel against a peer that writes and reads raw bytes, as the C tool does.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::*;

/// A server `Control` and the raw client stream connected to it.
fn pair() -> (Control, TcpStream) {
    let listener = ControlListener::bind("127.0.0.1", 0).expect("listen");
    let port = listener.port();
    let client = std::thread::spawn(move || TcpStream::connect(("127.0.0.1", port)));
    let control = listener.accept(Duration::from_secs(5)).expect("accept");
    (control, client.join().expect("client thread").expect("connect"))
}

/// Reads what the other side wrote until it closes.
fn rest(mut stream: TcpStream) -> String {
    let mut got = String::new();
    stream.read_to_string(&mut got).expect("read");
    got
}

#[test]
fn barriers_follow_run_tests_and_end_with_completed() {
    let (mut control, mut peer) = pair();
    // The peer pipelines its words, as a captured C run does: NEXT, SKIP, NEXT, COMPLETED.
    peer.write_all(b"NEXT\nSKIP\nNEXT\nCOMPLETED\n").expect("peer words");
    assert_eq!(control.barrier(false).expect("test 0"), Barrier::Run);
    assert_eq!(control.barrier(false).expect("test 1"), Barrier::Skip, "the peer skips");
    assert_eq!(control.barrier(true).expect("test 2"), Barrier::Skip, "this side skips");
    control.completed().expect("final barrier");
    drop(control);
    assert_eq!(rest(peer), "NEXT\nNEXT\nSKIP\nCOMPLETED\n", "the bytes this side wrote");
}

#[test]
fn the_client_side_speaks_the_same_bytes() {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.write_all(b"LISTENING\n42\n").expect("server words");
        let mut got = [0u8; 10];
        stream.read_exact(&mut got).expect("client words");
        got
    });
    let mut control = Control::connect("127.0.0.1", port).expect("connect");
    control.expectln("LISTENING").expect("token");
    assert_eq!(control.read_ulong().expect("number"), 42);
    control.write_ulong(5381).expect("hash");
    control.writeln("DONE").expect("done");
    assert_eq!(&server.join().expect("server thread"), b"5381\nDONE\n");
}

#[test]
fn failures_name_the_step_as_the_c_tool_does() {
    let (mut control, mut peer) = pair();
    peer.write_all(b"DONEX\nBIND\nNEXTT\nabc\n").expect("peer words");
    let error = control.expectln("DONE").expect_err("a longer line is another token");
    assert_eq!(error.to_string(), "expected \"DONE\" on control socket, got \"DONEX\"");
    let error = control.expectln("LISTENING").expect_err("another token");
    assert_eq!(error.to_string(), "expected \"LISTENING\" on control socket, got \"BIND\"");
    let error = control.barrier(false).expect_err("not a barrier word");
    assert_eq!(error.to_string(), "expected \"NEXT\" on control socket, got \"NEXTT\"");
    let error = control.read_ulong().expect_err("not a number");
    assert_eq!(error.to_string(), "expected a number on control socket, got \"abc\"");
    control.set_timeout(Duration::from_millis(50)).expect("timeout");
    let error = control.readln().expect_err("nothing comes");
    assert_eq!(error.to_string(), "control read timed out");
    peer.write_all(b"half a line").expect("peer");
    peer.shutdown(std::net::Shutdown::Write).expect("peer closes its side");
    let error = control.readln().expect_err("closed mid-line");
    assert!(matches!(error, ControlError::Eof { .. }), "{error}");
}

#[test]
fn a_server_nobody_connects_to_gives_up_in_time() {
    let listener = ControlListener::bind("127.0.0.1", 0).expect("listen");
    let error = listener.accept(Duration::from_millis(50)).expect_err("nobody");
    assert_eq!(error.to_string(), "control accept timed out");
}

#[test]
fn a_client_does_not_retry_a_server_that_is_not_there() {
    let port = {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("listen");
        listener.local_addr().expect("addr").port()
    };
    let error = Control::connect("127.0.0.1", port).expect_err("refused");
    assert!(matches!(error, ControlError::Io { .. }), "{error}");
}

#[test]
fn a_retrying_client_waits_until_a_server_speaks_and_then_reads_all_it_said() {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        // A forwarder with nobody behind it yet: accepts, then closes at once.
        drop(listener.accept().expect("first accept"));
        // Then the real server: it speaks first, as run_tests does.
        let (mut stream, _) = listener.accept().expect("second accept");
        stream.write_all(b"NEXT\n").expect("server word");
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).expect("client word");
        got
    });
    let mut control =
        Control::connect_retrying("127.0.0.1", port, Duration::from_secs(5)).expect("connect");
    assert_eq!(control.barrier(false).expect("barrier"), Barrier::Run, "nothing was lost");
    assert_eq!(&server.join().expect("server thread"), b"NEXT\n");
}

#[test]
fn a_retrying_client_gives_up_at_its_deadline() {
    let port = {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("listen");
        listener.local_addr().expect("addr").port()
    };
    let started = std::time::Instant::now();
    let error = Control::connect_retrying("127.0.0.1", port, Duration::from_millis(500))
        .expect_err("nobody listens");
    assert!(matches!(error, ControlError::Io { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(3));
}
