//! `UringZerocopy` under signals, on the host: io_uring `SEND_ZC` over TCP on 127.0.0.1 (no
//! AF_VSOCK is opened here).
//!
//! A signal handler installed without `SA_RESTART` makes every wait inside `io_uring_enter`
//! return EINTR. The kernel still holds the request (and reads the buffer) after that, so the
//! library must neither fail the send nor hand the buffer back early: what the peer receives is
//! checked byte for byte against what the program sent.
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use zerovsock_linux::UringZerocopy;
use zerovsock_testkit::suite::pattern;

/// Signals the handler has seen.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::Relaxed);
}

/// SIGALRM handled by [`count_signal`], without `SA_RESTART`, until dropped (then the old
/// disposition is back).
struct Handler {
    old: libc::sigaction,
}

impl Handler {
    fn install() -> Handler {
        // SAFETY: sigaction is plain old data; all-zero is an empty mask and no flags.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = 0; // no SA_RESTART: interrupted waits return EINTR
                             // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live sigaction values; the handler only touches an
        // atomic, which is async-signal-safe.
        assert_eq!(unsafe { libc::sigaction(libc::SIGALRM, &action, &mut old) }, 0);
        Handler { old }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // SAFETY: restores the disposition saved by `install`, a valid sigaction.
        unsafe { libc::sigaction(libc::SIGALRM, &self.old, std::ptr::null_mut()) };
    }
}

/// Sends SIGALRM to one thread every 200 µs until stopped (or for at most 20 s). Directed at
/// the sending thread, so no other thread of the test binary is interrupted.
struct Storm {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Storm {
    fn at_this_thread() -> Storm {
        // SAFETY: no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                // SAFETY: `target` is the test thread, which outlives the storm: `Storm::drop`
                // joins this thread before the test thread can return.
                unsafe { libc::pthread_kill(target, libc::SIGALRM) };
                thread::sleep(Duration::from_micros(200));
            }
        });
        Storm { stop, thread: Some(thread) }
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn set_int_option(socket: &impl AsRawFd, name: libc::c_int, value: libc::c_int) {
    // SAFETY: `value` is a live int and the length matches it.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "setsockopt {name}");
}

/// A connected pair with small buffers, and the bytes written until both are full, so that the
/// next send must wait for the peer to read.
fn full_pair() -> (TcpStream, TcpStream, Vec<u8>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    set_int_option(&listener, libc::SO_RCVBUF, 4096);
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    set_int_option(&client, libc::SO_SNDBUF, 4096);
    client.set_nonblocking(true).unwrap();
    let filler = pattern(1024, 1);
    let mut written = Vec::new();
    loop {
        match (&client).write(&filler) {
            Ok(n) => written.extend_from_slice(&filler[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
    client.set_nonblocking(false).unwrap();
    (client, server, written)
}

/// The peer: reads nothing until the storm has interrupted the sender `signals` times (or the
/// sender says its interrupted phase is over), then reads to the end (or 10 s of silence).
fn stalled_reader(
    server: TcpStream,
    signals: usize,
    phase_over: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while SIGNALS.load(Ordering::Relaxed) < signals
            && !phase_over.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            thread::yield_now();
        }
        // Bounded: a request the library lost track of could keep the socket open.
        server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = (&server).read_to_end(&mut got);
        got
    })
}

#[test]
fn send_zc_interrupted_by_signals_sends_exactly_its_buffer() {
    const LEN: usize = 64 * 1024;
    let (client, server, mut expected) = full_pair();
    let phase_over = Arc::new(AtomicBool::new(false));
    let start = SIGNALS.load(Ordering::Relaxed);
    let reader = stalled_reader(server, start + 50, phase_over.clone());
    let mut ring = UringZerocopy::new().unwrap();
    let mut errors = Vec::new();
    // Memory that reuses whatever a send gave back too early, filled with bytes never sent.
    let mut scribbles: Vec<Vec<u8>> = Vec::new();
    {
        let _handler = Handler::install();
        let _storm = Storm::at_this_thread();
        for seed in [2, 3] {
            match ring.send_zc(&client, pattern(LEN, seed)) {
                Ok((report, buf)) => expected.extend_from_slice(&buf[..report.sent]),
                Err(e) => errors.push(e),
            }
            scribbles.extend((0..16).map(|_| vec![0xEE; LEN]));
        }
        phase_over.store(true, Ordering::Relaxed);
    }
    let interrupted = SIGNALS.load(Ordering::Relaxed) - start;
    // After the storm: the next send reports its own result, not an earlier request's.
    let last = pattern(777, 4);
    let (report, buf) = ring.send_zc(&client, last).unwrap();
    assert_eq!(report.sent, 777, "the following send reports its own result");
    expected.extend_from_slice(&buf[..report.sent]);
    drop(client);
    let got = reader.join().unwrap();
    drop(scribbles);
    let first_difference = got.iter().zip(&expected).position(|(a, b)| a != b);
    let scribbled = got.windows(64).any(|w| w.iter().all(|&b| b == 0xEE));
    assert!(
        got == expected,
        "the peer received {} bytes, {} were sent (first difference at {first_difference:?}, \
         bytes the program never sent arrived: {scribbled}); {interrupted} signals",
        got.len(),
        expected.len()
    );
    assert!(errors.is_empty(), "interrupted sends failed: {errors:?}");
    // The peer began reading only after 50 signals (or after the sends returned).
    assert!(interrupted >= 50, "the storm interrupted the waiting sender: {interrupted} signals");
}
