//! Review: what host programs see when the VMM (the vhost-user frontend) goes away.
//!
//! Linux's `vhost_vsock_dev_release` runs `vhost_vsock_reset_orphans` over every connected
//! socket whose guest is gone: SOCK_DONE, `peer_shutdown = SHUTDOWN_MASK`, `sk_err =
//! ECONNRESET`, so a host reader wakes at once with ECONNRESET (or end of stream). The guest
//! that could have answered is gone; nothing will ever arrive.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{VsockListener, VsockStream};
use zerovsock_testkit::guest::{GuestDriver, TxLayout};
use zerovsock_vhost::Device;

mod common;

fn setup() -> (PathBuf, Arc<Device>, GuestDriver) {
    let dir = common::fresh_dir("lifecycle");
    let (device, socket, _) = common::serve_device(&dir, true);
    let guest = GuestDriver::connect(&socket, TxLayout::Linux).expect("guest driver");
    (dir, device, guest)
}

/// One read of one byte.
fn read_once(mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize>) -> std::io::Result<usize> {
    let mut byte = [0u8; 1];
    read(&mut byte)
}

fn ended(result: &std::io::Result<usize>) -> bool {
    match result {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => {
            e.raw_os_error() == Some(libc::ECONNRESET) || e.kind() == ErrorKind::ConnectionReset
        }
    }
}

#[test]
fn native_host_socket_is_reset_when_the_frontend_disconnects() {
    let (_dir, device, mut guest) = setup();
    let listener = VsockListener::bind(device.vsock(), Addr::new(Cid::ANY, Port(6000)))
        .expect("host listener");
    let guest_stream = VsockStream::connect(guest.vsock(), Addr::new(Cid::HOST, Port(6000)))
        .expect("guest connect");
    let (host, _) = listener.accept().expect("host accept");
    // The VMM exits (or crashes): the vhost-user socket closes.
    guest.shutdown().expect("guest driver");
    host.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let started = Instant::now();
    let result = read_once(|buf| (&host).read(buf));
    assert!(
        ended(&result),
        "host read after the guest's VMM went away: {result:?} after {:?} (Linux: ECONNRESET at \
         once)",
        started.elapsed()
    );
    drop(guest_stream);
}

#[test]
fn unix_endpoint_is_closed_when_the_frontend_disconnects() {
    let (dir, _device, mut guest) = setup();
    let listener = UnixListener::bind(dir.join("vm.vsock_5000")).expect("host listener");
    let guest_stream = VsockStream::connect(guest.vsock(), Addr::new(Cid::HOST, Port(5000)))
        .expect("guest connect");
    let (mut host, _) = listener.accept().expect("host accept");
    guest.shutdown().expect("guest driver");
    host.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let started = Instant::now();
    let result = read_once(|buf| host.read(buf));
    assert!(
        ended(&result),
        "host program's read after the guest's VMM went away: {result:?} after {:?}",
        started.elapsed()
    );
    drop(guest_stream);
}

fn device_serving() -> (PathBuf, thread::JoinHandle<std::io::Result<()>>) {
    let (_, socket, serving) = common::serve_device(&common::fresh_dir("serve"), false);
    (socket, serving)
}

/// `Device::serve` promises the next frontend after one goes away. A frontend that dies in
/// the middle of the protocol (here: a message with an unknown request code, then gone) makes
/// `daemon.serve` return an error other than `Disconnected`, `serve_one(..)?` returns it, and
/// the device serves nobody ever again.
#[test]
fn a_broken_frontend_does_not_stop_the_device_serving_the_next_one() {
    let (socket, serving) = device_serving();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut raw = loop {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(raw) => break raw,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("device socket: {e}"),
        }
    };
    // vhost-user header: request 0xffff (no such request), flags = version 1, size 0.
    let mut header = Vec::new();
    header.extend_from_slice(&0xffffu32.to_le_bytes());
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    std::io::Write::write_all(&mut raw, &header).expect("garbage message");
    drop(raw);
    thread::sleep(Duration::from_millis(500));
    assert!(
        !serving.is_finished(),
        "Device::serve returned after one broken frontend: {:?}",
        serving.join().expect("serve thread")
    );
    let guest =
        GuestDriver::connect(&socket, TxLayout::Linux).expect("the next frontend is served");
    assert_eq!(guest.guest_cid(), Cid(3));
}

/// A restarted VMM that connects while the old session is being torn down (or a second VMM
/// queued behind the first) lands in the backlog of the listener `daemon.serve` keeps open for
/// the whole session, and is reset when that listener is dropped instead of being served.
#[test]
fn a_frontend_waiting_for_the_device_is_served_after_the_current_one_leaves() {
    let (socket, _serving) = device_serving();
    let mut first = GuestDriver::connect(&socket, TxLayout::Linux).expect("first frontend");
    let path = socket.clone();
    let second = thread::spawn(move || GuestDriver::connect(&path, TxLayout::Linux).map(|_| ()));
    thread::sleep(Duration::from_millis(300));
    first.shutdown().expect("first frontend leaves");
    let result = second.join().expect("second frontend thread");
    assert!(result.is_ok(), "the frontend that waited was not served: {result:?}");
}

/// The usual request/reply pattern: the guest sends its request and half-closes
/// (`shutdown(SHUT_WR)`), the host program reads to end of file and works on its reply, and
/// the VMM goes away meanwhile. Linux resets the host's socket at once
/// (`vhost_vsock_reset_orphans`). Here the device's end of the Unix socket is never closed: the
/// pipe stopped polling the guest stream at the guest's end of file, so the reset does not
/// wake it; it waits for the vring worker to find an error on the host socket, but the reader
/// the host program's reply queues is only ever run by a vring worker with RX buffers, and
/// there is none (`Worker::reset` dropped the queued readers with their `queued` flag still
/// set, so one queued then is never queued again, even for the next VM). The host program's
/// writes succeed forever and the connection, its pipe and its Unix socket are never freed.
#[test]
fn unix_endpoint_is_closed_when_the_frontend_disconnects_after_the_guest_half_closed() {
    use std::io::Write;
    let (dir, _device, mut guest) = setup();
    let listener = UnixListener::bind(dir.join("vm.vsock_5000")).expect("host listener");
    let mut guest_stream = VsockStream::connect(guest.vsock(), Addr::new(Cid::HOST, Port(5000)))
        .expect("guest connect");
    let (mut host, _) = listener.accept().expect("host accept");
    guest_stream.write_all(b"request").expect("guest write");
    guest_stream.shutdown(std::net::Shutdown::Write).expect("guest shutdown");
    host.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut request = Vec::new();
    host.read_to_end(&mut request).expect("host read to the guest's SHUT_WR");
    assert_eq!(request, b"request");
    // The VMM exits while the host program works on its reply.
    guest.shutdown().expect("guest driver");
    thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let outcome = loop {
        match host.write(b"reply") {
            Ok(_) if started.elapsed() < Duration::from_secs(5) => {
                thread::sleep(Duration::from_millis(50));
            }
            other => break other,
        }
    };
    assert!(
        outcome
            .as_ref()
            .is_err_and(|e| matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET))),
        "the host program's writes after the guest's VMM went away: still {outcome:?} after {:?} \
         (the device never closed its end of the Unix socket)",
        started.elapsed()
    );
    drop(guest_stream);
}
