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
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

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

/// A buffer that counts when the library lets go of it.
struct Watched {
    data: Vec<u8>,
    drops: Arc<AtomicUsize>,
}

impl Watched {
    /// A buffer and the count its drop increments.
    fn new(data: Vec<u8>) -> (Watched, Arc<AtomicUsize>) {
        let drops = Arc::new(AtomicUsize::new(0));
        (Watched::counted(data, &drops), drops)
    }

    /// A buffer whose drop increments `drops`.
    fn counted(data: Vec<u8>, drops: &Arc<AtomicUsize>) -> Watched {
        Watched { data, drops: drops.clone() }
    }
}

impl AsRef<[u8]> for Watched {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

fn dropped(drops: &AtomicUsize) -> bool {
    drops.load(Ordering::SeqCst) > 0
}

/// The next completion the kernel queues (waiting up to [`WAIT`] for POLLERR).
fn next_completion<S: Pollable>(socket: &S) -> Completion {
    assert!(socket.wait_error(WAIT), "POLLERR: a completion is queued");
    socket.completion()
}

/// What the helpers need of a connected socket.
trait Pollable {
    fn wait_error(&self, timeout: Duration) -> bool;
    fn completion(&self) -> Completion;
}

macro_rules! pollable {
    ($name:ty) => {
        impl Pollable for $name {
            fn wait_error(&self, timeout: Duration) -> bool {
                self.poll(Interest::NONE, Some(timeout)).unwrap().error
            }
            fn completion(&self) -> Completion {
                self.recv_completion().unwrap()
            }
        }
    };
}
pollable!(VsockStream);
pollable!(VsockSeqpacket);

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
        if let Some(completion) = completion {
            // A fresh socket's ids start at 0; a case that fits the credit goes in one pass.
            assert_eq!(completion.lo, 0, "{case:?}: the first id of a fresh socket");
            if case.expect == Expect::Zerocopied {
                assert_eq!(completion.hi, 0, "{case:?}: one pass, one id");
            }
        }
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
fn without_so_zerocopy_there_is_no_completion_and_no_id() {
    guest();
    let (client, mut server) = pair();
    let (buffer, released) = Watched::new(vec![1u8; 1000]);
    client.send_zerocopy(buffer).unwrap();
    assert!(dropped(&released), "copied at once: nothing to keep");
    let mut got = [0u8; 1000];
    server.read_exact(&mut got).unwrap();
    assert!(!client.poll(Interest::NONE, Some(Duration::from_millis(300))).unwrap().error);
    // The kernel took no id for the copy: the first zerocopied send gets id 0.
    client.set_zerocopy(true).unwrap();
    client.send_zerocopy(vec![2u8; 10]).unwrap();
    server.read_exact(&mut got[..10]).unwrap();
    assert_eq!(next_completion(&client), Completion { lo: 0, hi: 0, copied: false });
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
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn a_merged_completion_releases_every_buffer_it_covers() {
    guest();
    let (client, mut server) = pair();
    client.set_zerocopy(true).unwrap();
    let mut flags = Vec::new();
    for i in 0..3 {
        let (buffer, released) = Watched::new(vec![i as u8; 100]);
        client.send_zerocopy(buffer).unwrap();
        flags.push(released);
    }
    let mut all = [0u8; 300];
    server.read_exact(&mut all).unwrap();
    assert_eq!(next_completion(&client), Completion { lo: 0, hi: 2, copied: false });
    assert!(flags.iter().all(|f| dropped(f)), "all three released by the kernel's one range");
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn buffers_stay_pinned_until_the_reader_consumed_them() {
    guest();
    let (client, mut server) = pair();
    client.set_zerocopy(true).unwrap();
    let (buffer, released) = Watched::new(pattern(2 * PAGE, 9));
    client.send_zerocopy(buffer).unwrap();
    // vsock_loopback keeps the pages until the peer reads: the kernel has no completion yet.
    assert!(!client.readiness().unwrap().error, "no completion before the peer read");
    assert!(!dropped(&released));
    let mut got = vec![0u8; 2 * PAGE];
    server.read_exact(&mut got).unwrap();
    assert_eq!(got, pattern(2 * PAGE, 9));
    assert_eq!(next_completion(&client), Completion { lo: 0, hi: 0, copied: false });
    assert!(dropped(&released), "released once the kernel's completion was read");
}

#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn closing_with_unread_sends_leaks_instead_of_freeing() {
    guest();
    let (client, server) = pair();
    client.set_zerocopy(true).unwrap();
    let (buffer, released) = Watched::new(vec![7u8; PAGE]);
    client.send_zerocopy(buffer).unwrap();
    client.set_zerocopy_linger(Duration::from_millis(100));
    let before = zerovsock_linux::leaked_buffers();
    drop(client);
    assert_eq!(
        zerovsock_linux::leaked_buffers(),
        before + 1,
        "the peer never read: pages may still be read"
    );
    assert!(!dropped(&released), "leaked, never freed");
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
/// while another reads completions: nothing deadlocks, the kernel completes every id exactly
/// once, and every buffer comes back.
#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn completions_are_read_while_another_thread_sends() {
    guest();
    const SENDS: usize = 64;
    let (client, server) = pair();
    client.set_zerocopy(true).unwrap();
    let client = Arc::new(client);
    let released = Arc::new(AtomicUsize::new(0));
    let reader = thread::spawn(move || read_stream(&server, 0).len());
    let watcher = {
        let (client, released) = (client.clone(), released.clone());
        thread::spawn(move || completions_until(&client, &released, SENDS))
    };
    let mut sent = 0;
    for i in 0..SENDS {
        sent += client
            .send_zerocopy(Watched::counted(pattern(64 * 1024, i as u64), &released))
            .unwrap();
    }
    let seen = watcher.join().unwrap();
    assert_eq!(released.load(Ordering::SeqCst), SENDS, "every buffer came back");
    let next = contiguous_from_zero(&seen);
    // The kernel's next id follows the last one it completed: it took no other.
    client.send_zerocopy(vec![0u8; 10]).unwrap();
    assert_eq!(next_completion(&*client).lo, next, "the next id after {seen:?}");
    drop(Arc::try_unwrap(client).unwrap());
    assert_eq!(reader.join().unwrap(), sent + 10);
}

/// Reads completions until `count` buffers were released (or 60 s passed), and then every one
/// still queued.
fn completions_until(
    socket: &VsockStream,
    released: &AtomicUsize,
    count: usize,
) -> Vec<Completion> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        while let Ok(completion) = socket.recv_completion() {
            seen.push(completion);
        }
        if released.load(Ordering::SeqCst) >= count || Instant::now() > deadline {
            return seen;
        }
        socket.poll(Interest::NONE, Some(Duration::from_millis(50))).unwrap();
    }
}

/// Checks that `completions` cover ids `0..n` exactly once each, in any order, and returns `n`.
fn contiguous_from_zero(completions: &[Completion]) -> u32 {
    let mut ranges: Vec<(u32, u32)> = completions.iter().map(|c| (c.lo, c.hi)).collect();
    ranges.sort_unstable();
    let mut next = 0u32;
    for (lo, hi) in ranges {
        assert_eq!(lo, next, "ids completed once each, no gap: {completions:?}");
        next = hi + 1;
    }
    next
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
    let mut got = [0u8; 100];
    server.read_exact(&mut got).unwrap();
    assert_eq!(got, [2u8; 100], "only the fallback's bytes arrived");
    assert!(!client.poll(Interest::NONE, Some(Duration::from_millis(300))).unwrap().error);
    // Neither took an id: the next zerocopied send gets id 0.
    client.send_zerocopy(vec![3u8; 100]).unwrap();
    server.read_exact(&mut got).unwrap();
    assert_eq!(next_completion(&client), Completion { lo: 0, hi: 0, copied: false });
}

/// A zerocopy send the kernel refuses (ENOMEM: a page of the iovec is unmapped) moves nothing
/// and takes no id (`net_zcopy_put_abort`): the next send gets id 0.
#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn a_refused_zerocopy_send_takes_no_id() {
    guest();
    let (client, mut server) = pair();
    client.set_zerocopy(true).unwrap();
    let page = vec![1u8; PAGE];
    let ranges = [(page.as_ptr(), PAGE), (unmapped_page(), PAGE)];
    // SAFETY: `page` outlives the call and is never changed; the unmapped range is the point of
    // the test and is never read.
    assert_eq!(errno(unsafe { client.send_zerocopy_raw(&ranges) }), libc::ENOMEM);
    client.send_zerocopy(vec![2u8; 10]).unwrap();
    let mut got = [0u8; 10];
    server.read_exact(&mut got).unwrap();
    assert_eq!(got, [2u8; 10], "the refused send moved nothing");
    assert_eq!(next_completion(&client), Completion { lo: 0, hi: 0, copied: false });
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
    assert_eq!((meta.len, meta.message_len, meta.truncated, meta.eor), (16, 32, true, true));
    let big = vec![0u8; receiver.buffer_size().unwrap() as usize + 1];
    assert_eq!(errno(sender.send(&big)), libc::EMSGSIZE);
    let _ = VsockSocket::stream().unwrap();
}

/// SO_ZEROCOPY toggled by one thread while another sends: each pass is zerocopied by the kernel
/// exactly when the library recorded an id for it, so the library's mirror and the kernel's
/// counter stay equal and every buffer comes back once the kernel completed it.
#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn toggling_so_zerocopy_while_sending_keeps_ids_in_step() {
    guest();
    const SENDS: usize = 200;
    let (client, server) = pair();
    let client = Arc::new(client);
    let released = Arc::new(AtomicUsize::new(0));
    let reader = thread::spawn(move || read_stream(&server, 0).len());
    let sender = {
        let (client, released) = (client.clone(), released.clone());
        thread::spawn(move || {
            (0..SENDS)
                .map(|i| {
                    let buffer = Watched::counted(pattern(512, i as u64), &released);
                    // Copies when the notification budget is spent (ENOMEM, no id taken).
                    client.send_zerocopy_or_copy(buffer).unwrap().0
                })
                .sum::<usize>()
        })
    };
    let mut on = false;
    while !sender.is_finished() {
        on = !on;
        client.set_zerocopy(on).unwrap();
        thread::yield_now();
    }
    let sent = sender.join().unwrap();
    client.set_zerocopy(true).unwrap();
    let seen = completions_until(&client, &released, SENDS);
    assert_eq!(released.load(Ordering::SeqCst), SENDS, "every buffer came back");
    let next = contiguous_from_zero(&seen);
    assert_eq!(client.next_completion_id(), next, "the mirror took the ids the kernel took");
    client.send_zerocopy(vec![0u8; 10]).unwrap();
    assert_eq!(next_completion(&*client).lo, next, "the kernel's next id is the mirror's");
    drop(Arc::try_unwrap(client).unwrap());
    assert_eq!(reader.join().unwrap(), sent + 10);
}

/// The kernel merges consecutive completions into one range that keeps the first one's
/// COPIED flag. Here Z (zerocopied, id 0) is followed by M, one SEQPACKET message bigger than
/// the free credit, which the kernel copies in two passes (ids 1 and 2), then N (zerocopied,
/// id 3). The reader reads Z and M before the sender drains, so the error queue holds
/// {0..2, not COPIED}: it must not release N, whose pages the kernel holds until N is read.
#[test]
#[ignore = "opens AF_VSOCK: runs only in a lab guest (cargo run -p zerovsock-lab -- guest-tests)"]
fn a_merged_seqpacket_range_hiding_copied_passes_releases_no_later_send() {
    guest();
    const BUFFER: u64 = 16 * 1024;
    let port = port();
    let listener = VsockSeqpacketListener::bind(any(port)).unwrap();
    listener.set_buffer_size(BUFFER).unwrap(); // the accepted socket inherits it
    let sender = Arc::new(VsockSeqpacket::connect(local(port)).unwrap());
    let (receiver, _) = listener.accept().unwrap();
    assert_eq!(receiver.buffer_size().unwrap(), BUFFER);
    sender.set_zerocopy(true).unwrap();
    // The reader reads one message per request and answers with its length.
    let (read, lengths) = {
        let (ask, asked) = mpsc::channel::<()>();
        let (answer, answers) = mpsc::channel::<usize>();
        thread::spawn(move || {
            let mut buf = vec![0u8; BUFFER as usize];
            for () in asked {
                answer.send(receiver.recv(&mut buf).unwrap().len).unwrap();
            }
        });
        (ask, answers)
    };
    let read_one = || {
        read.send(()).unwrap();
        lengths.recv_timeout(WAIT).unwrap()
    };
    let (z, z_drops) = Watched::new(vec![b'z'; 1024]);
    let (m, m_drops) = Watched::new(vec![b'm'; 12 * 1024]);
    let (n, n_drops) = Watched::new(vec![b'n'; 1024]);
    assert_eq!(sender.send(&[b'y'; 8 * 1024]).unwrap(), 8 * 1024); // plain: no id
    assert_eq!(sender.send_zerocopy(z).unwrap(), 1024); // fits the 7 KiB left: id 0
    let big = {
        let sender = sender.clone();
        thread::spawn(move || sender.send_zerocopy(m).unwrap())
    };
    // M's first pass takes the 7 KiB of credit left (copied: it does not fit), then waits.
    let deadline = Instant::now() + WAIT;
    while sender.readiness().unwrap().writable && Instant::now() < deadline {
        thread::yield_now();
    }
    assert!(!sender.readiness().unwrap().writable, "M's first pass used up the credit");
    assert_eq!(read_one(), 8 * 1024, "Y"); // frees 8 KiB: M's second pass (copied)
    assert_eq!(big.join().unwrap(), 12 * 1024);
    assert_eq!(sender.send_zerocopy(n).unwrap(), 1024); // fits the 3 KiB left: zerocopied
    assert_eq!(read_one(), 1024, "Z");
    assert_eq!(read_one(), 12 * 1024, "M");
    assert_eq!(
        next_completion(&*sender),
        Completion { lo: 0, hi: 2, copied: false },
        "Z's completion with M's two copied passes merged in, COPIED hidden"
    );
    assert!(!dropped(&n_drops), "N released while the kernel still holds its pages (id 3)");
    assert_eq!(read_one(), 1024, "N");
    assert_eq!(next_completion(&*sender), Completion { lo: 3, hi: 3, copied: false });
    // The tracker stopped matching at the ambiguous range: nothing is freed, all is leaked.
    sender.set_zerocopy_linger(Duration::from_millis(10));
    let before = zerovsock_linux::leaked_buffers();
    drop(Arc::try_unwrap(sender).unwrap());
    assert_eq!(zerovsock_linux::leaked_buffers(), before + 3);
    assert!(!dropped(&z_drops) && !dropped(&m_drops) && !dropped(&n_drops));
}
