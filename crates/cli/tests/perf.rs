//! `zerovsock perf` as a user runs it: the binary, its JSON, its chart, its errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn zerovsock(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zerovsock")).args(args).output().expect("running zerovsock")
}

#[test]
fn a_verified_run_reports_every_link_and_mode_in_json_and_draws_them() {
    let chart = std::env::temp_dir().join(format!("zerovsock-perf-{}.svg", std::process::id()));
    let out = zerovsock(&[
        "perf",
        "--sizes",
        "4K,64K",
        "--bytes",
        "4M",
        "--runs",
        "1",
        "--baseline",
        "--verify",
        "--json",
        "--plot",
        chart.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["verify"], true);
    let rows = report["rows"].as_array().unwrap();
    let row = |size: u64, link: &str, mode: Option<&str>| {
        rows.iter()
            .find(|r| r["size"] == size && r["link"] == link && r["mode"].as_str() == mode)
            .unwrap_or_else(|| panic!("no row {size} {link} {mode:?} in {rows:#?}"))
    };
    let gbps = |r: &serde_json::Value, field: &str| r[field].as_f64().unwrap();
    for size in [4096, 65536] {
        let memcpy = gbps(row(size, "memcpy", None), "e2e_gbps");
        let unix = gbps(row(size, "AF_UNIX", Some("copy")), "e2e_gbps");
        for (link, mode) in [("loopback", "copy"), ("loopback", "zerocopy"), ("TCP", "copy")] {
            let r = row(size, link, Some(mode));
            let e2e = gbps(r, "e2e_gbps");
            // Every transfer copies at least once, with the other thread in the way: memcpy of
            // the same size in the same process is the ceiling.
            assert!(0.0 < e2e && e2e < memcpy, "{size} {link} {mode}: {e2e} against {memcpy}");
            assert!(gbps(r, "send_gbps") > 0.0);
            let near = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
            assert!(near(gbps(r, "e2e_vs_memcpy"), e2e / memcpy), "{r}");
            assert!(near(gbps(r, "e2e_vs_unix"), e2e / unix), "{r}");
        }
        assert_eq!(row(size, "loopback", Some("zerocopy"))["copied_share"], 0.0);
        assert_eq!(row(size, "TCP", Some("zerocopy"))["copied_share"], 1.0, "loopback TCP copies");
    }
    assert_eq!(rows.len(), 2 * 6, "memcpy, loopback x2, AF_UNIX, TCP x2 per size");
    // AF_UNIX is the reference: it copies, and is not "skipped" for zerocopy.
    let skipped = report["skipped"].as_array().unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    let svg = std::fs::read_to_string(&chart).expect("the chart");
    for name in ["loopback zerocopy", "AF_UNIX copy", "TCP zerocopy", "memcpy", "4 KiB", "64 KiB"] {
        assert!(svg.contains(name), "the chart names {name:?}");
    }
    let _ = std::fs::remove_file(&chart);
}

#[test]
fn the_af_unix_reference_is_measured_whatever_the_modes() {
    let out = zerovsock(&[
        "perf",
        "--sizes",
        "64K",
        "--bytes",
        "2M",
        "--runs",
        "1",
        "--baseline",
        "--zerocopy",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let unix = rows.iter().find(|r| r["link"] == "AF_UNIX").expect("the AF_UNIX row");
    assert_eq!(unix["mode"], "copy");
    let zc = rows.iter().find(|r| r["link"] == "loopback").unwrap();
    assert_eq!(zc["mode"], "zerocopy", "--zerocopy alone: the loopback's only row");
    assert!(zc["e2e_vs_unix"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_flags_and_impossible_runs_exit_non_zero_with_one_line() {
    for args in [
        &["perf", "--sender", "2"][..],
        &["perf", "--bytes", "12Q"],
        &["perf", "--transport", "unix", "--uds-path", "/nonexistent"],
        &["perf", "--transport", "unix", "--receiver", "--uds-path", "/nonexistent/dir/vsock"],
    ] {
        let out = zerovsock(args);
        assert_eq!(out.status.code(), Some(if args[1] == "--bytes" { 2 } else { 1 }), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        // clap adds a usage hint after its one-line error; ours is the one line alone.
        assert!(lines[0].contains("error") || lines[0].starts_with("zerovsock:"), "{stderr}");
        if args[1] != "--bytes" {
            assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        }
    }
}

#[test]
fn a_latency_run_prints_percentiles() {
    let out = zerovsock(&["perf", "--latency", "--sizes", "64,4K", "--bytes", "1M", "--copy"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("p99.9"), "{stdout}");
    let rows: Vec<&str> =
        stdout.lines().filter(|l| l.contains("loopback") && l.contains("copy")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0].split_whitespace().any(|w| w == "16384"), "1 MiB / 64 B rounds: {stdout}");
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("zerovsock-perf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Connects to `path`, retrying while the receiver starts.
fn connect_retrying(path: &std::path::Path) -> std::os::unix::net::UnixStream {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(stream) => return stream,
            Err(e) if std::time::Instant::now() > deadline => panic!("{}: {e}", path.display()),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// One side, receiver: vsock_perf's lines, its defaults, and its POLLIN wakeups (the reads
/// that returned data and the final zero-byte one), as a peer sees them.
#[test]
fn a_receiver_prints_vsock_perfs_lines_about_what_the_peer_sent() {
    use std::io::Write;
    let dir = temp_dir("receiver");
    let uds = dir.join("v");
    let child = Command::new(env!("CARGO_BIN_EXE_zerovsock"))
        .args(["perf", "--receiver", "--transport", "unix", "--uds-path"])
        .arg(&uds)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut peer = connect_retrying(&dir.join("v_1234"));
    // One 1000-byte write, then end of file: one read with data, one of zero bytes.
    peer.write_all(&[7u8; 1000]).unwrap();
    drop(peer);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..5],
        [
            "Run as receiver",
            "Listen port 1234",
            "RX buffer 131072 bytes",
            "vsock buffer 262144 bytes",
            "SO_RCVLOWAT 1 bytes"
        ],
        "{stdout}"
    );
    assert_eq!(lines[5], "total bytes received: 1000", "{stdout}");
    assert!(lines[6].starts_with("rx performance: ") && lines[6].ends_with(" Gbits/s"), "{stdout}");
    assert!(lines[7].starts_with("total time in 'read()': ") && lines[7].ends_with(" sec"));
    assert!(lines[8].starts_with("average time in 'read()': ") && lines[8].ends_with(" ns"));
    assert_eq!(lines[9], "POLLIN wakeups: 2", "{stdout}");
    assert_eq!(lines.len(), 10, "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hybrid backend's endpoint for one connect: answers `CONNECT <port>` with OK and returns
/// every byte that follows.
fn fake_backend(path: &std::path::Path) -> std::thread::JoinHandle<(String, Vec<u8>)> {
    use std::io::{BufRead, Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        reader.get_mut().write_all(b"OK 1025\n").unwrap();
        let mut data = Vec::new();
        reader.read_to_end(&mut data).unwrap();
        (line, data)
    })
}

/// One side, sender: vsock_perf's default byte count reaches the peer, its lines are printed,
/// and "tx performance" is bits over the time inside send() (not the loop's).
#[test]
fn a_sender_sends_vsock_perfs_defaults_and_rates_the_time_in_send() {
    let dir = temp_dir("sender");
    let uds = dir.join("v");
    let backend = fake_backend(&uds);
    let out = zerovsock(&[
        "perf",
        "--sender",
        "3",
        "--transport",
        "unix",
        "--uds-path",
        uds.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (connect, data) = backend.join().unwrap();
    assert_eq!(connect, "CONNECT 1234\n");
    assert_eq!(data.len(), 64 << 10, "vsock_perf's default --bytes reached the peer");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..5],
        [
            "Run as sender",
            "Connect to 3:1234",
            "Send 65536 bytes",
            "TX buffer 131072 bytes",
            "total bytes sent: 65536"
        ],
        "{stdout}"
    );
    assert!(lines[5].starts_with("tx performance: ") && lines[5].ends_with(" Gbits/s"), "{stdout}");
    assert!(lines[6].starts_with("total time in tx loop: ") && lines[6].ends_with(" sec"));
    assert!(lines[7].starts_with("time in 'send()': ") && lines[7].ends_with(" sec"));
    assert_eq!(lines.len(), 8, "{stdout}");

    // The figure's formula, from the JSON (the text rounds the seconds to microseconds).
    let uds = dir.join("w");
    let backend = fake_backend(&uds);
    let out = zerovsock(&[
        "perf",
        "--sender",
        "3",
        "--transport",
        "unix",
        "--uds-path",
        uds.to_str().unwrap(),
        "--bytes",
        "8M",
        "--buf-size",
        "4K",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(backend.join().unwrap().1.len(), 8 << 20);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gbps = report["tx_gbps"].as_f64().unwrap();
    let in_send = report["in_send_secs"].as_f64().unwrap();
    let expected = (8u64 << 23) as f64 / in_send / 1e9;
    assert!(
        (gbps - expected).abs() <= expected * 1e-6,
        "{gbps} Gbit/s, bits / in_send = {expected}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// vsock_perf sets --rcvlowat and --vsk-size on its vsock socket; the unix transport's end is
/// an AF_UNIX socket, so they are refused rather than printed and ignored.
#[test]
fn a_unix_end_refuses_the_vsock_socket_options() {
    for option in [["--rcvlowat", "1000"], ["--vsk-size", "1M"]] {
        for role in [&["--receiver"][..], &["--sender", "3"]] {
            let mut args = vec!["perf", "--transport", "unix", "--uds-path", "/tmp/x.vsock"];
            args.extend_from_slice(role);
            args.extend_from_slice(&option);
            let out = zerovsock(&args);
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("AF_UNIX") && stderr.lines().count() == 1, "{stderr}");
        }
    }
}
