//! The device end to end, driven through its real vhost-user socket by the userspace guest
//! (`zerovsock_testkit::guest`), with host programs on its Unix endpoints and its socket API.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{VsockListener, VsockStream};
use zerovsock_testkit::guest::{GuestDriver, TxLayout};
use zerovsock_testkit::suite::pattern;
use zerovsock_vhost::Device;

mod common;

struct Setup {
    dir: PathBuf,
    device: Arc<Device>,
    guest: GuestDriver,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(layout: TxLayout) -> Setup {
    let dir = common::fresh_dir("e2e");
    let (device, socket, _) = common::serve_device(&dir, true);
    let guest = GuestDriver::connect(&socket, layout).expect("guest driver");
    assert_eq!(guest.guest_cid(), Cid(3), "the CID comes from the device's config space");
    Setup { dir, device, guest }
}

fn guest_to_host(layout: TxLayout, len: usize) {
    let s = setup(layout);
    let listener = UnixListener::bind(s.dir.join("vm.vsock_5000")).expect("host listener");
    let data = pattern(len, len as u64);
    let sent = data.clone();
    let vsock = s.guest.vsock().clone();
    let writer = thread::spawn(move || {
        let mut stream =
            VsockStream::connect(&vsock, Addr::new(Cid::HOST, Port(5000))).expect("guest connect");
        stream.write_all(&sent).expect("guest write");
        stream.shutdown(std::net::Shutdown::Write).expect("guest shutdown");
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).expect("guest read");
        reply
    });
    let (mut host, _) = listener.accept().expect("host accept");
    let mut got = Vec::new();
    host.read_to_end(&mut got).expect("host read to the guest's SHUT_WR");
    assert_eq!(got.len(), data.len(), "{layout:?}: bytes lost or invented");
    assert!(got == data, "{layout:?}: the host read other bytes than the guest wrote");
    host.write_all(b"thanks").expect("host reply");
    drop(host);
    assert_eq!(writer.join().expect("guest thread"), b"thanks");
}

#[test]
fn guest_to_host_through_the_unix_endpoint_in_every_layout() {
    for layout in [TxLayout::Linux, TxLayout::Pages, TxLayout::Single] {
        guest_to_host(layout, 1 << 20);
    }
}

#[test]
fn host_to_guest_through_connect_and_ok() {
    let s = setup(TxLayout::Linux);
    let listener = VsockListener::bind(s.guest.vsock(), Addr::new(Cid::ANY, Port(4000)))
        .expect("guest listener");
    let data = pattern(3 << 20, 7);
    let expected = data.clone();
    let reader = thread::spawn(move || {
        let (mut stream, peer) = listener.accept().expect("guest accept");
        assert_eq!(peer.cid, Cid::HOST);
        let mut got = Vec::new();
        stream.read_to_end(&mut got).expect("guest read");
        stream.write_all(b"bye").expect("guest reply");
        (got, peer.port)
    });
    let mut host = UnixStream::connect(s.dir.join("vm.vsock")).expect("host connect");
    host.write_all(b"CONNECT 4000\n").expect("connect line");
    let mut line = String::new();
    let mut buffered = BufReader::new(host.try_clone().expect("clone"));
    buffered.read_line(&mut line).expect("OK line");
    let port: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("answer {line:?}"));
    host.write_all(&data).expect("host write");
    host.shutdown(std::net::Shutdown::Write).expect("host shutdown");
    let mut reply = Vec::new();
    buffered.read_to_end(&mut reply).expect("host read");
    let (got, guest_saw_port) = reader.join().expect("guest thread");
    assert_eq!(port, guest_saw_port.0, "OK carries the host-side port the guest sees");
    assert!(
        got == expected,
        "the guest read other bytes than the host wrote ({} of {})",
        got.len(),
        expected.len()
    );
    assert_eq!(reply, b"bye");
}

#[test]
fn guest_connect_to_a_port_nobody_listens_on_is_reset_at_once() {
    let s = setup(TxLayout::Linux);
    let started = std::time::Instant::now();
    let error = VsockStream::connect(s.guest.vsock(), Addr::new(Cid::HOST, Port(5999)))
        .expect_err("nobody listens");
    assert_eq!(error.raw_os_error(), Some(libc::ECONNRESET), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not by the connect timeout"
    );
}

#[test]
fn host_connect_to_a_guest_port_nobody_listens_on_closes_the_unix_socket() {
    let s = setup(TxLayout::Linux);
    let mut host = UnixStream::connect(s.dir.join("vm.vsock")).expect("host connect");
    host.write_all(b"CONNECT 4444\n").expect("connect line");
    host.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).expect("closed, not timed out");
    assert_eq!(rest, b"", "no OK line");
}

#[test]
fn native_socket_api_on_the_device_sends_zerocopy_to_the_guest() {
    let s = setup(TxLayout::Pages);
    let listener = VsockListener::bind(s.device.vsock(), Addr::new(Cid::ANY, Port(6000)))
        .expect("host listener");
    let vsock = s.guest.vsock().clone();
    // Within the guest's 256 KiB credit: one pass, sent in place (no COPIED).
    let data = pattern(128 << 10, 9);
    let expected = data.clone();
    let guest = thread::spawn(move || {
        let mut stream =
            VsockStream::connect(&vsock, Addr::new(Cid::HOST, Port(6000))).expect("guest connect");
        let mut got = vec![0u8; expected.len()];
        stream.read_exact(&mut got).expect("guest read");
        assert!(got == expected, "the guest read other bytes than the host sent");
        stream.write_all(b"done").expect("guest write");
    });
    let (mut host, peer) = listener.accept().expect("host accept");
    assert_eq!(peer.cid, Cid(3));
    host.set_zerocopy(true).expect("SO_ZEROCOPY");
    host.send_zerocopy(data).expect("zerocopy send");
    let mut done = [0u8; 4];
    host.read_exact(&mut done).expect("host read");
    assert_eq!(&done, b"done");
    let completion =
        host.recv_completion().expect("a completion once the bytes are in guest memory");
    assert_eq!((completion.lo, completion.hi, completion.copied), (0, 0, false));
    guest.join().expect("guest thread");
}

#[test]
fn a_frontend_that_goes_away_resets_its_connections_and_the_next_one_is_served() {
    let mut s = setup(TxLayout::Linux);
    let listener = VsockListener::bind(s.device.vsock(), Addr::new(Cid::ANY, Port(6001)))
        .expect("host listener");
    let guest_side = VsockStream::connect(s.guest.vsock(), Addr::new(Cid::HOST, Port(6001)))
        .expect("guest connect");
    let (host, _) = listener.accept().expect("host accept");
    (&guest_side).write_all(b"before").expect("guest write");
    let mut before = [0u8; 6];
    (&host).read_exact(&mut before).expect("host read");
    s.guest.shutdown().expect("guest driver stops cleanly");
    // The device notices the frontend is gone and ends the host's connection as Linux does
    // (`vhost_vsock_reset_orphans`): reads see end of stream, poll an error, sends EPIPE.
    host.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut rest = [0u8; 1];
    assert_eq!((&host).read(&mut rest).expect("end of stream"), 0);
    assert!(host.readiness().error, "the reset shows as POLLERR");
    let error = (&host).write(b"x").expect_err("the guest is gone");
    assert_eq!(error.raw_os_error(), Some(libc::EPIPE), "{error}");
    // A new frontend (a restarted VM) is served on the same socket.
    let again =
        GuestDriver::connect(&s.dir.join("vhost.sock"), TxLayout::Linux).expect("second frontend");
    let second = VsockStream::connect(again.vsock(), Addr::new(Cid::HOST, Port(6001)))
        .expect("connect again");
    let (host2, _) = listener.accept().expect("second accept");
    (&second).write_all(b"after").expect("write");
    let mut after = [0u8; 5];
    (&host2).read_exact(&mut after).expect("read");
    assert_eq!(&after, b"after");
}

/// A guest that shuts down reading (SHUTDOWN with RCV) only ends the host-to-guest direction:
/// the host program's writes fail with EPIPE, as a Linux host's sends to that socket do, and
/// what the guest still sends reaches it.
#[test]
fn a_guest_that_stops_reading_still_sends_and_the_host_program_gets_epipe() {
    let s = setup(TxLayout::Linux);
    let listener = UnixListener::bind(s.dir.join("vm.vsock_5000")).expect("host listener");
    let vsock = s.guest.vsock().clone();
    let (shut_tx, shut_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let guest = thread::spawn(move || {
        let mut stream =
            VsockStream::connect(&vsock, Addr::new(Cid::HOST, Port(5000))).expect("guest connect");
        stream.shutdown(std::net::Shutdown::Read).expect("guest SHUT_RD");
        shut_tx.send(()).expect("signal");
        go_rx.recv().expect("go");
        stream.write_all(b"still here").expect("guest write after SHUT_RD");
        stream.shutdown(std::net::Shutdown::Write).expect("guest SHUT_WR");
    });
    let (mut host, _) = listener.accept().expect("host accept");
    shut_rx.recv().expect("guest shut down reading");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let error = loop {
        match host.write(b"hello") {
            Ok(_) if std::time::Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5))
            }
            Ok(_) => panic!("the host program may still write to a guest that reads no more"),
            Err(e) => break e,
        }
    };
    assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    go_tx.send(()).expect("go");
    let mut got = Vec::new();
    host.read_to_end(&mut got).expect("host read");
    assert_eq!(got, b"still here", "the guest's other direction was torn down with it");
    guest.join().expect("guest thread");
}
