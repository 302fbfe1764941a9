//! The asynchronous socket calls, driven by a minimal executor (no runtime dependency): each
//! task blocks its own thread in `block_on`, parking until its waker fires.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::Duration;

use common::*;
use zerovsock::{
    Completion, Vsock, VsockListener, VsockSeqpacket, VsockSeqpacketListener, VsockStream,
};

/// Wakes a parked thread, and counts how often it was asked to.
struct Unpark {
    thread: Thread,
    wakes: AtomicUsize,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Runs `future` to completion on this thread; returns its output and how many times the task
/// was woken (0 means it never had to wait).
fn block_on<F: Future>(future: F) -> (F::Output, usize) {
    let unpark = Arc::new(Unpark { thread: thread::current(), wakes: AtomicUsize::new(0) });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return (output, unpark.wakes.load(Ordering::SeqCst));
        }
        thread::park_timeout(Duration::from_secs(10));
    }
}

#[test]
fn accept_connect_write_and_read_without_blocking_calls() {
    let vsock = Vsock::loopback();
    let port = port();
    let listener = VsockListener::bind(&vsock, any(port)).unwrap();
    let data = pattern(300 * 1024, 1);
    let expected = data.clone();
    let client_vsock = vsock.clone();
    let client = thread::spawn(move || {
        block_on(async {
            let stream = VsockStream::connect_async(&client_vsock, local(port)).await.unwrap();
            stream.write_all_async(&data).await.unwrap();
        })
    });
    let ((got, _), _) = block_on(async {
        let (server, _) = listener.accept_async().await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 50_000];
        while got.len() < expected.len() {
            let n = server.read_async(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        (got, server)
    });
    client.join().unwrap();
    assert_eq!(got, expected, "300 KiB is more than the credit: both sides had to wait");
}

#[test]
fn a_pending_read_is_woken_by_the_write() {
    let vsock = Vsock::loopback();
    let (client, server) = pair(&vsock);
    let writer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        (&client).write_all(b"late").unwrap();
        client
    });
    let (read, wakes) = block_on(async {
        let mut buf = [0u8; 8];
        let n = server.read_async(&mut buf).await.unwrap();
        buf[..n].to_vec()
    });
    assert_eq!(read, b"late");
    assert!(wakes >= 1, "the read waited and was woken");
    drop(writer.join().unwrap());
}

#[test]
fn completion_future_resolves_after_the_reader_consumed() {
    let vsock = Vsock::loopback();
    let (client, server) = pair(&vsock);
    client.set_zerocopy(true).unwrap();
    let (sent, _) = block_on(client.send_zerocopy_async(vec![9u8; 4096]));
    assert_eq!(sent.unwrap(), 4096);
    let reader = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        let mut buf = vec![0u8; 4096];
        (&server).read_exact(&mut buf).unwrap();
        server
    });
    let (completion, wakes) = block_on(client.completion());
    assert_eq!(completion.unwrap(), Completion { lo: 0, hi: 0, copied: false });
    assert!(wakes >= 1);
    drop(reader.join().unwrap());
}

#[test]
fn seqpacket_send_waits_until_the_whole_message_fits() {
    let vsock = Vsock::loopback();
    let port = port();
    let listener = VsockSeqpacketListener::bind(&vsock, any(port)).unwrap();
    let client = VsockSeqpacket::connect(&vsock, local(port)).unwrap();
    let (server, _) = listener.accept().unwrap();
    let size = 200 * 1024;
    client.send(&vec![1u8; size]).unwrap();
    let reader = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        let mut buf = vec![0u8; size];
        let first = server.recv(&mut buf).unwrap();
        let second = server.recv(&mut buf).unwrap();
        (first.len, second.len, buf[0])
    });
    // The second message does not fit until the first is read; it must not go out in halves.
    let (sent, wakes) = block_on(client.send_async(&vec![2u8; size]));
    assert_eq!(sent.unwrap(), size);
    assert!(wakes >= 1, "it waited for credit");
    assert_eq!(reader.join().unwrap(), (size, size, 2));
}

/// Runs `f` on a thread and fails if it has not finished within 10 s (a deadlock).
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, wait) = std::sync::mpsc::channel();
    thread::spawn(move || done.send(f()).ok());
    wait.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what}: deadlock"))
}

/// A waker that calls back into the stack when woken, as an executor that polls inline does.
struct CallsBack(std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl Wake for CallsBack {
    fn wake(self: Arc<Self>) {
        if let Some(call) = self.0.lock().unwrap().take() {
            call();
        }
    }
}

#[test]
fn a_waker_may_call_into_the_stack_or_drop_a_socket() {
    within_deadline("waker calling back", || {
        let vsock = Vsock::loopback();
        let (mut client, server) = pair(&vsock);
        let (other, _other_server) = pair(&vsock);
        let server = Arc::new(server);
        let probe = server.clone();
        let call: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = probe.readiness();
            drop(other);
        });
        let waker = Waker::from(Arc::new(CallsBack(std::sync::Mutex::new(Some(call)))));
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 4];
        assert!(server.poll_read(&mut cx, &mut buf).is_pending());
        client.write_all(b"wake").unwrap();
        assert!(matches!(server.poll_read(&mut cx, &mut buf), Poll::Ready(Ok(4))));
    });
}

#[test]
fn an_async_read_waits_for_its_turn_without_blocking_while_a_thread_reads() {
    within_deadline("async read behind a blocking read", || {
        let vsock = Vsock::loopback();
        let (mut client, server) = pair(&vsock);
        let server = Arc::new(server);
        let blocking = server.clone();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 5];
            (&*blocking).read_exact(&mut buf).unwrap();
            buf
        });
        thread::sleep(Duration::from_millis(50));
        let unpark = Arc::new(Unpark { thread: thread::current(), wakes: AtomicUsize::new(0) });
        let waker = Waker::from(unpark.clone());
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 5];
        assert!(server.poll_read(&mut cx, &mut buf).is_pending(), "returns, does not block");
        client.write_all(b"firstsecnd").unwrap();
        assert_eq!(&reader.join().unwrap(), b"first", "the thread had the turn");
        assert!(unpark.wakes.load(Ordering::SeqCst) > 0, "woken when the turn came free");
        assert!(matches!(server.poll_read(&mut cx, &mut buf), Poll::Ready(Ok(5))));
        assert_eq!(&buf, b"secnd");
    });
}

#[test]
fn an_async_write_waits_for_its_turn_without_blocking_while_a_thread_writes() {
    within_deadline("async write behind a blocking write", || {
        let vsock = Vsock::loopback();
        let (client, server) = pair(&vsock);
        let window = server.buffer_size().unwrap() as usize;
        let client = Arc::new(client);
        let blocking = client.clone();
        let writer = thread::spawn(move || (&*blocking).write_all(&vec![1u8; 2 * window]));
        while server.unread_bytes() < window {
            server.poll(zerovsock::Interest::READABLE, Some(Duration::from_millis(10))).unwrap();
        }
        let unpark = Arc::new(Unpark { thread: thread::current(), wakes: AtomicUsize::new(0) });
        let waker = Waker::from(unpark.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(client.poll_write(&mut cx, &[2u8; 10]).is_pending(), "returns, does not block");
        let mut got = vec![0u8; 2 * window];
        (&server).read_exact(&mut got).unwrap();
        writer.join().unwrap().unwrap();
        assert!(got.iter().all(|&b| b == 1), "the async bytes did not cut into the message");
        assert!(matches!(client.poll_write(&mut cx, &[2u8; 10]), Poll::Ready(Ok(10))));
    });
}

#[test]
fn an_async_read_is_ready_only_once_rcvlowat_bytes_are_queued() {
    let vsock = Vsock::loopback();
    let (mut client, server) = pair(&vsock);
    server.set_rcvlowat(8).unwrap();
    let unpark = Arc::new(Unpark { thread: thread::current(), wakes: AtomicUsize::new(0) });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    let mut buf = [0u8; 64];
    client.write_all(b"four").unwrap();
    assert!(server.poll_read(&mut cx, &mut buf).is_pending());
    client.write_all(b"more").unwrap();
    assert!(matches!(server.poll_read(&mut cx, &mut buf), Poll::Ready(Ok(8))));
    client.write_all(b"end").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(server.poll_read(&mut cx, &mut buf), Poll::Ready(Ok(3))), "end of stream");
}
