//! The userspace guest driver against the peer device, vhost-device-vsock 0.3.0, so that the
//! device bench measures both devices with a driver known to work with each. `#[ignore]`d:
//! `scripts/test` installs the peer (`scripts/install-vhost-device-vsock`) and runs this with
//! `--ignored`, `VHOST_DEVICE_VSOCK` naming the binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{VsockListener, VsockStream};
use zerovsock_testkit::guest::{GuestDriver, TxLayout};
use zerovsock_testkit::suite::{djb2, pattern};

mod common;

/// The peer, killed when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs vhost-device-vsock 0.3.0 (VHOST_DEVICE_VSOCK); scripts/test installs it"]
fn the_guest_driver_moves_data_both_ways_through_vhost_device_vsock() {
    let binary = std::env::var_os("VHOST_DEVICE_VSOCK")
        .expect("VHOST_DEVICE_VSOCK names the vhost-device-vsock 0.3.0 binary");
    let dir = common::fresh_dir("peer");
    let (socket, uds) = (dir.join("vhost.sock"), dir.join("vm.vsock"));
    let _peer = Peer(
        Command::new(binary)
            .args(["--guest-cid", "3", "--socket"])
            .arg(&socket)
            .arg("--uds-path")
            .arg(&uds)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting vhost-device-vsock"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "vhost-device-vsock made no socket");
        thread::sleep(Duration::from_millis(20));
    }
    // One data descriptor per packet: the layout vhost-device-vsock 0.3.0 can read.
    let guest = GuestDriver::connect(&socket, TxLayout::HeaderAndData).expect("guest driver");
    assert_eq!(guest.guest_cid(), Cid(3), "the CID from the peer's config space");

    // Guest to host, 1 MiB in 64 KiB writes, through <uds>_5000.
    let data = pattern(1 << 20, 5000);
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).expect("listener");
    let expected = data.len();
    let host = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("host accept");
        let mut got = vec![0u8; expected];
        stream.read_exact(&mut got).expect("host read");
        got
    });
    let mut stream =
        VsockStream::connect(guest.vsock(), Addr::new(Cid::HOST, Port(5000))).expect("connect");
    for chunk in data.chunks(64 << 10) {
        stream.write_all(chunk).expect("guest write");
    }
    assert_eq!(djb2(&host.join().expect("host thread")), djb2(&data), "guest to host bytes");

    // Host to guest through CONNECT, 1 MiB.
    let data = pattern(1 << 20, 4000);
    let listener =
        VsockListener::bind(guest.vsock(), Addr::new(Cid::ANY, Port(4000))).expect("listener");
    let expected = data.len();
    let reader = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("guest accept");
        let mut got = vec![0u8; expected];
        stream.read_exact(&mut got).expect("guest read");
        got
    });
    let mut host = UnixStream::connect(&uds).expect("host connect");
    host.write_all(b"CONNECT 4000\n").expect("connect line");
    let mut line = String::new();
    BufReader::with_capacity(1, host.try_clone().expect("clone"))
        .read_line(&mut line)
        .expect("OK line");
    assert!(line.starts_with("OK "), "CONNECT answered {line:?}");
    host.write_all(&data).expect("host write");
    assert_eq!(djb2(&reader.join().expect("guest thread")), djb2(&data), "host to guest bytes");
    let _ = std::fs::remove_dir_all(&dir);
}
