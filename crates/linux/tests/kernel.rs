//! zerovsock-linux against the real kernel, inside a lab guest, over `vsock_loopback` (CID 1).
//!
//! Every test here opens AF_VSOCK, so every test is `#[ignore]`d on the host and starts by
//! refusing to run anywhere but a zerovsock lab guest. Run them with
//! `cargo run -p zerovsock-lab -- guest-tests`.
//!
//! Expectations come from the kernel's rules (`vsock_test_zerocopy.c` and the code it tests),
//! not from this library: where the kernel says COPIED, the test expects COPIED.
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use zerovsock_linux::wire::{Addr, Cid, Port, SocketType};
use zerovsock_linux::{
    Completion, Interest, UringZerocopy, VsockListener, VsockSeqpacket, VsockSeqpacketListener,
    VsockSocket, VsockStream,
};
use zerovsock_testkit::suite::{
    check_completion, djb2, pattern, zerocopy_cases, Expect, ZerocopyCase, PAGE,
};

const WAIT: Duration = Duration::from_secs(20);

/// Refuses to go on outside the project's guest, before any AF_VSOCK socket is opened.
fn guest() {
    assert!(
        zerovsock_lab::in_lab_guest(),
        "refusing to open AF_VSOCK: this is not a zerovsock lab guest (no `{}` on the kernel command line \
         or no {}). Run these tests with `cargo run -p zerovsock-lab -- guest-tests`.",
        zerovsock_lab::GUEST_CMDLINE_FLAG,
        zerovsock_lab::GUEST_MARKER
    );
}

/// Runs on the host: the guard must refuse here, before anything touches AF_VSOCK.
#[test]
#[should_panic(expected = "refusing to open AF_VSOCK")]
fn the_guard_refuses_outside_a_lab_guest() {
    guest();
}

fn port() -> Port {
    static NEXT: AtomicU32 = AtomicU32::new(40_000);
    Port(NEXT.fetch_add(1, Ordering::Relaxed))
}

fn errno<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
    result.expect_err("expected an error").raw_os_error().expect("an errno")
}

fn local(port: Port) -> Addr {
    Addr::new(Cid::LOCAL, port)
}

fn any(port: Port) -> Addr {
    Addr::new(Cid::ANY, port)
}

/// A buffer whose data starts `offset` bytes in, like the kernel test's unaligned element.
struct Offset(Vec<u8>, usize);

impl AsRef<[u8]> for Offset {
    fn as_ref(&self) -> &[u8] {
        &self.0[self.1..]
    }
}

/// Memory that was mapped and then unmapped: the kernel must refuse to read it.
fn unmapped_page() -> *const u8 {
    // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(address, libc::MAP_FAILED);
    // SAFETY: unmapping the page we just mapped; only its address is kept, never dereferenced.
    assert_eq!(unsafe { libc::munmap(address, PAGE) }, 0);
    address as *const u8
}

macro_rules! zerocopy_case {
    ($listener:ty, $conn:ty, $case:expr, $read:expr) => {{
        let case: &ZerocopyCase = $case;
        let enomem = case.expect == Expect::Enomem;
        let port = port();
        let listener = <$listener>::bind(any(port)).unwrap();
        let total: usize = if enomem { 0 } else { case.total() };
        let server = thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let data: Vec<u8> = $read(&conn, total);
            djb2(&data)
        });
        let client = <$conn>::connect(local(port)).unwrap();
        if case.so_zerocopy {
            client.set_zerocopy(true).unwrap();
            assert!(client.zerocopy().unwrap());
        }
        let buffers = case.buffers(7);
        let expected_hash =
            if enomem {
                let ranges: Vec<(*const u8, usize)> =
                    case.iov
                        .iter()
                        .zip(&buffers)
                        .map(|(e, (data, _))| {
                            if e.unmapped {
                                (unmapped_page(), PAGE)
                            } else {
                                (data.as_ptr(), e.len)
                            }
                        })
                        .collect();
                // SAFETY: the mapped ranges outlive the completion wait below; the unmapped one is
                // the point of the case and is never read by the kernel.
                assert_eq!(errno(unsafe { client.send_zerocopy_raw(&ranges) }), libc::ENOMEM);
                assert_eq!(client.next_completion_id(), 0, "nothing sent, no id taken");
                djb2(&[])
            } else {
                let iov: Vec<Offset> =
                    buffers.into_iter().map(|(data, offset)| Offset(data, offset)).collect();
                let all: Vec<u8> = iov.iter().flat_map(|b| b.as_ref().to_vec()).collect();
                assert_eq!(client.send_zerocopy_vectored(iov).unwrap(), total);
                djb2(&all)
            };
        let wait = if case.so_zerocopy && !enomem { WAIT } else { Duration::from_millis(300) };
        let ready = client.poll(Interest::NONE, Some(wait)).unwrap();
        let completion = ready.error.then(|| client.recv_completion().unwrap());
        check_completion(case.expect, completion).unwrap();
        drop(client);
        assert_eq!(server.join().unwrap(), expected_hash, "data hash");
    }};
}

fn read_stream(conn: &VsockStream, total: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(total);
    (&*conn).read_to_end(&mut data).unwrap();
    data
}

fn read_message(conn: &VsockSeqpacket, total: usize) -> Vec<u8> {
    let mut data = vec![0u8; total + 1];
    if total == 0 {
        // Nothing should arrive: wait for the client to close (end of stream) instead of
        // closing first, which would turn the client's send into EPIPE.
        assert_eq!(conn.recv(&mut data).unwrap().len, 0);
        return Vec::new();
    }
    let meta = conn.recv(&mut data).unwrap();
    assert_eq!(meta.len, total, "one whole message");
    data.truncate(meta.len);
    data
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn stream_msg_zerocopy_cases() {
    guest();
    for case in zerocopy_cases(SocketType::Stream) {
        zerocopy_case!(VsockListener, VsockStream, case, read_stream);
    }
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn seqpacket_msg_zerocopy_cases() {
    guest();
    for case in zerocopy_cases(SocketType::Seqpacket) {
        zerocopy_case!(VsockSeqpacketListener, VsockSeqpacket, case, read_message);
    }
}

fn pair() -> (VsockStream, VsockStream) {
    let port = port();
    let listener = VsockListener::bind(any(port)).unwrap();
    let client = VsockStream::connect(local(port)).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn empty_error_queue_is_would_block() {
    guest();
    let (client, _server) = pair();
    client.set_zerocopy(true).unwrap();
    assert_eq!(client.recv_completion().unwrap_err().kind(), ErrorKind::WouldBlock);
    assert!(!client.readiness().unwrap().error);
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn without_so_zerocopy_there_is_no_completion() {
    guest();
    let (client, mut server) = pair();
    client.send_zerocopy(vec![1u8; 1000]).unwrap();
    let mut got = [0u8; 1000];
    server.read_exact(&mut got).unwrap();
    assert!(!client.poll(Interest::NONE, Some(Duration::from_millis(300))).unwrap().error);
    assert_eq!(client.pinned_buffers(), 0, "copied at once: nothing to keep");
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn consecutive_completions_merge_in_the_kernel_queue() {
    guest();
    let (client, mut server) = pair();
    client.set_zerocopy(true).unwrap();
    for i in 0..3 {
        client.send_zerocopy(vec![i as u8; 100]).unwrap();
    }
    let mut all = [0u8; 300];
    server.read_exact(&mut all).unwrap();
    client.poll(Interest::NONE, Some(WAIT)).unwrap();
    assert_eq!(client.recv_completion().unwrap(), Completion { lo: 0, hi: 2, copied: false });
    assert_eq!(client.pinned_buffers(), 0);
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn buffers_stay_pinned_until_the_reader_consumed_them() {
    guest();
    let (client, mut server) = pair();
    client.set_zerocopy(true).unwrap();
    client.send_zerocopy(pattern(2 * PAGE, 9)).unwrap();
    assert_eq!(client.pinned_buffers(), 1, "vsock_loopback reads the pages when the peer reads");
    let mut got = vec![0u8; 2 * PAGE];
    server.read_exact(&mut got).unwrap();
    assert_eq!(got, pattern(2 * PAGE, 9));
    assert!(client.drain_zerocopy(WAIT).unwrap());
    assert_eq!(client.pinned_buffers(), 0);
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn closing_with_unread_sends_leaks_instead_of_freeing() {
    guest();
    let (client, server) = pair();
    client.set_zerocopy(true).unwrap();
    client.send_zerocopy(vec![7u8; PAGE]).unwrap();
    client.set_zerocopy_linger(Duration::from_millis(100));
    let before = zerovsock_linux::leaked_buffers();
    drop(client);
    assert_eq!(
        zerovsock_linux::leaked_buffers(),
        before + 1,
        "the peer never read: pages may still be read"
    );
    drop(server);
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn io_uring_send_zc_reports_result_and_notification() {
    guest();
    for so_zerocopy in [true, false] {
        let (client, server) = pair();
        client.set_zerocopy(so_zerocopy).unwrap();
        let reader = thread::spawn(move || {
            let mut got = vec![0u8; 3 * PAGE];
            (&server).read_exact(&mut got).unwrap();
            got
        });
        let mut ring = UringZerocopy::new().unwrap();
        let (report, buf) = ring.send_zc(&client, pattern(3 * PAGE, 4)).unwrap();
        assert_eq!(report.sent, 3 * PAGE);
        assert!(report.notified, "a notification CQE follows the result");
        // Without SO_ZEROCOPY the kernel clears MSG_ZEROCOPY and copies.
        assert_eq!(report.copied, !so_zerocopy);
        assert_eq!(reader.join().unwrap(), buf);
    }
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn io_uring_sendmsg_zc_sends_one_message() {
    guest();
    let (client, server) = pair();
    client.set_zerocopy(true).unwrap();
    let reader = thread::spawn(move || read_stream(&server, 0));
    let mut ring = UringZerocopy::new().unwrap();
    let bufs = vec![pattern(PAGE, 1), pattern(200, 2), pattern(3 * PAGE, 3)];
    let (report, bufs) = ring.sendmsg_zc(&client, bufs).unwrap();
    assert_eq!((report.sent, report.notified, report.copied), (PAGE + 200 + 3 * PAGE, true, false));
    drop(client);
    let all: Vec<u8> = bufs.concat();
    assert_eq!(reader.join().unwrap(), all);
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn so_zerocopy_on_an_accepted_socket() {
    guest();
    let (mut client, server) = pair();
    // Linux 6.7 until the 2026 fix ("vsock: Make accept()ed sockets use custom setsockopt()",
    // ce5e612dd411) refused this with EOPNOTSUPP; the lab's 6.12.117 kernel carries the fix, so
    // the option must be accepted, read back, and work.
    server.set_zerocopy(true).expect("SO_ZEROCOPY on an accepted socket (fixed kernel)");
    assert!(server.zerocopy().unwrap());
    server.send_zerocopy(vec![5u8; 64]).unwrap();
    let mut got = [0u8; 64];
    client.read_exact(&mut got).unwrap();
    server.poll(Interest::NONE, Some(WAIT)).unwrap();
    assert_eq!(server.recv_completion().unwrap(), Completion { lo: 0, hi: 0, copied: false });
}

/// One thread sends zerocopy buffers (more than the credit, so some passes wait for room)
/// while another reads completions: nothing deadlocks, every id completes exactly once, and
/// every buffer comes back.
#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn completions_are_read_while_another_thread_sends() {
    guest();
    let (client, server) = pair();
    client.set_zerocopy(true).unwrap();
    let client = std::sync::Arc::new(client);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = thread::spawn(move || read_stream(&server, 0).len());
    let watcher = {
        let (client, done) = (client.clone(), done.clone());
        thread::spawn(move || {
            let mut ids = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                client.poll(Interest::NONE, Some(Duration::from_millis(50))).unwrap();
                while let Ok(completion) = client.recv_completion() {
                    ids += completion.count();
                }
                let finished = done.load(Ordering::SeqCst) && client.pinned_buffers() == 0;
                if finished || std::time::Instant::now() > deadline {
                    return ids;
                }
            }
        })
    };
    let mut sent = 0;
    for i in 0..64u64 {
        sent += client.send_zerocopy(pattern(64 * 1024, i)).unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let ids = watcher.join().unwrap();
    assert_eq!(client.pinned_buffers(), 0, "every buffer came back");
    assert_eq!(ids, u64::from(client.next_completion_id()), "each id completed once");
    drop(std::sync::Arc::try_unwrap(client).unwrap());
    assert_eq!(reader.join().unwrap(), sent);
}

/// The notification budget is `net.core.optmem_max`: with none left, `sock_omalloc` fails and
/// the send returns ENOMEM before any byte moves (kernel fix 60cf6206a1f5); a caller that asked
/// for it gets a copying send instead.
#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn exhausted_notification_budget_is_enomem_and_fallback_copies() {
    guest();
    const OPTMEM: &str = "/proc/sys/net/core/optmem_max";
    let (client, mut server) = pair();
    client.set_zerocopy(true).unwrap();
    let saved = std::fs::read_to_string(OPTMEM).unwrap();
    std::fs::write(OPTMEM, "0").unwrap();
    let refused = client.send_zerocopy(vec![1u8; 100]);
    let fallback = client.send_zerocopy_or_copy(vec![2u8; 100]);
    std::fs::write(OPTMEM, saved.trim()).unwrap();
    assert_eq!(errno(refused), libc::ENOMEM);
    assert_eq!(fallback.unwrap(), (100, true));
    assert_eq!(client.next_completion_id(), 0, "no id was taken");
    let mut got = [0u8; 100];
    server.read_exact(&mut got).unwrap();
    assert_eq!(got, [2u8; 100], "only the fallback's bytes arrived");
    assert!(!client.poll(Interest::NONE, Some(Duration::from_millis(300))).unwrap().error);
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn basic_socket_rules() {
    guest();
    // Connection reset when nobody listens.
    assert_eq!(errno(VsockStream::connect(local(port()))), libc::ECONNRESET);
    // Data, peek, shutdown.
    let (mut client, mut server) = pair();
    client.write_all(b"hello").unwrap();
    let mut peeked = [0u8; 5];
    server.poll(Interest::READABLE, Some(WAIT)).unwrap();
    assert_eq!(server.peek(&mut peeked).unwrap(), 5);
    let mut got = [0u8; 5];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    server.set_nonblocking(true).unwrap();
    assert_eq!(server.read(&mut got).unwrap_err().kind(), ErrorKind::WouldBlock);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(errno(client.write(b"x")), libc::EPIPE);
    // SEQPACKET truncation and EOR.
    let port = port();
    let listener = VsockSeqpacketListener::bind(any(port)).unwrap();
    let sender = VsockSeqpacket::connect(local(port)).unwrap();
    let (receiver, _) = listener.accept().unwrap();
    sender.send_eor(&[3u8; 32]).unwrap();
    let mut small = [0u8; 16];
    let meta = receiver.recv(&mut small).unwrap();
    assert_eq!((meta.len, meta.message_len, meta.truncated(), meta.eor), (16, 32, true, true));
    let big = vec![0u8; receiver.buffer_size().unwrap() as usize + 1];
    assert_eq!(errno(sender.send(&big)), libc::EMSGSIZE);
    let _ = VsockSocket::stream().unwrap();
}
