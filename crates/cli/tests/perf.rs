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
    for size in [4096, 65536] {
        assert_eq!(row(size, "memcpy", None)["e2e_vs_memcpy"], 1.0);
        assert!(row(size, "loopback", Some("copy"))["e2e_gbps"].as_f64().unwrap() > 0.0);
        assert_eq!(row(size, "loopback", Some("zerocopy"))["copied_share"], 0.0);
        assert_eq!(row(size, "AF_UNIX", Some("copy"))["e2e_vs_unix"], 1.0);
        assert!(row(size, "TCP", Some("copy"))["send_gbps"].as_f64().unwrap() > 0.0);
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
