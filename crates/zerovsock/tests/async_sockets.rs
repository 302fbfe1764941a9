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
