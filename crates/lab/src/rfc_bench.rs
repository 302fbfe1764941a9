//! `rfc-bench`: the three tables of the MSG_ZEROCOPY RFC v3 cover letter (vsock_perf, copy
//! against zerocopy, 4 KiB to 8 MiB sends; the figure is the time spent inside send()), made
//! again in the VM lab with `zerovsock perf`:
//!
//! * guest to host: `zerovsock perf --sender 2` on the guest kernel's `AF_VSOCK`, through this
//!   project's vhost-user-vsock device, to a host process `zerovsock perf --transport device
//!   --receiver` on the device's native sockets;
//! * host to guest: a host process `zerovsock perf --transport device --sender 3` to
//!   `zerovsock perf --receiver` on the guest kernel's `AF_VSOCK`;
//! * loopback: inside one guest, the kernel's own `vsock_loopback` (`zerovsock perf
//!   --transport kernel`, both sides in one process) beside the userspace loopback
//!   (`--transport loopback`), size by size in the same guest, so their zerocopy/copy ratios
//!   come from one run.
//!
//! Each device transfer boots its own guest (the host process's device ends with its one
//! connection). Sizes get fewer bytes the smaller they are, so a run under TCG stays within
//! minutes. Writes a Markdown report (with the command, the machine and the RFC's own figures
//! beside ours) and an SVG chart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;
use zerovsock_lab::{build_host_binary, build_static_binary, workspace_root, Guest, Lab};

use crate::perf::serve_guest;

/// One row of the tables: the send size, its label, and the bytes moved per transfer.
#[derive(Debug, Clone, Copy)]
struct Size {
    bytes_per_send: u64,
    label: &'static str,
    total: &'static str,
}

const SIZES: [Size; 5] = [
    Size { bytes_per_send: 4 << 10, label: "4K", total: "16M" },
    Size { bytes_per_send: 32 << 10, label: "32K", total: "32M" },
    Size { bytes_per_send: 256 << 10, label: "256K", total: "64M" },
    Size { bytes_per_send: 1 << 20, label: "1M", total: "64M" },
    Size { bytes_per_send: 8 << 20, label: "8M", total: "128M" },
];

/// The RFC v3 cover letter's figures (Core i7, nested guest), Gbit/s, copy and zerocopy.
const RFC_G2H: [(f64, f64); 5] =
    [(3.0, 10.0), (20.0, 61.0), (33.0, 244.0), (30.0, 373.0), (22.0, 475.0)];
const RFC_H2G: [(f64, f64); 5] =
    [(20.0, 10.0), (37.0, 75.0), (44.0, 299.0), (28.0, 335.0), (27.0, 417.0)];
const RFC_LOOPBACK: [(f64, f64); 5] =
    [(8.0, 7.0), (38.0, 44.0), (55.0, 168.0), (53.0, 250.0), (40.0, 344.0)];

/// Median of this many runs per loopback measurement (device transfers run once: each boots
/// a guest).
const LOOPBACK_RUNS: u32 = 3;
/// vCPUs of the loopback guest (sender and receiver threads run at once); the device guests
/// run one side, on one.
const LOOPBACK_CPUS: u32 = 2;
/// How long a host sender retries its connect while the guest boots.
const HOST_WAIT: u32 = 180;

/// SO_VM_SOCKETS_BUFFER_SIZE for both ends: four sends, at least Linux's 256 KiB (what
/// `zerovsock perf` takes when both sides run in it), so whole zerocopy sends fit the credit.
fn vsk_size(size: Size) -> u64 {
    (size.bytes_per_send * 4).max(256 << 10)
}

/// One measured transfer (or a loopback median).
#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    /// Bits over the time inside send().
    send_gbps: f64,
    /// Delivered: the receiver's rx figure (device) or first send to last byte (loopback).
    e2e_gbps: f64,
    /// Share of zerocopy sends completed COPIED.
    copied: Option<f64>,
}

/// A table's copy and zerocopy cells per size; `None` where the transfer failed.
type Series = Vec<(Option<Cell>, Option<Cell>)>;

/// The loopback guest's results per size: kernel, ours, memcpy (Gbit/s).
type LoopbackRow = (Option<Cell>, Option<Cell>, Option<Cell>, Option<Cell>, Option<f64>);

pub fn run(guest: &Guest, out: &Path, svg: &Path) -> Result<()> {
    let started = Instant::now();
    let lab = Lab::prepare()?;
    let ours_guest = build_static_binary("zerovsock-cli", "zerovsock")?;
    let ours_host = build_host_binary("zerovsock-cli", "zerovsock")?;
    let binaries = [ours_guest];
    let mut failures = Vec::new();
    let mut device = |direction: Direction| -> Series {
        let mut series = Vec::new();
        for size in SIZES {
            let mut pair = [None, None];
            for (slot, zerocopy) in pair.iter_mut().zip([false, true]) {
                let what = format!("{} {} {}", direction.title(), size.label, mode(zerocopy));
                println!("\n== rfc-bench: {what}");
                match device_transfer(&lab, guest, &binaries, &ours_host, direction, size, zerocopy)
                {
                    Ok(cell) => *slot = Some(cell),
                    Err(error) => {
                        println!("== FAILED: {what}: {error:#}");
                        failures.push(what);
                    }
                }
            }
            series.push((pair[0], pair[1]));
        }
        series
    };
    let g2h = device(Direction::GuestToHost);
    let h2g = device(Direction::HostToGuest);
    println!("\n== rfc-bench: loopback, the kernel's and ours, in one guest");
    let loopback = loopback_guest(&lab, guest, &binaries, &mut failures)?;
    let machine = machine_notes(&lab)?;
    let report = markdown(&g2h, &h2g, &loopback, &machine, started.elapsed().as_secs());
    std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    chart(svg, &g2h, &h2g, &loopback)?;
    print!("\n{report}");
    println!("rfc-bench: wrote {} and {}", out.display(), svg.display());
    if !failures.is_empty() {
        bail!("{} transfers failed: {}", failures.len(), failures.join(", "));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    GuestToHost,
    HostToGuest,
}

impl Direction {
    fn title(self) -> &'static str {
        match self {
            Direction::GuestToHost => "guest to host",
            Direction::HostToGuest => "host to guest",
        }
    }
}

fn mode(zerocopy: bool) -> &'static str {
    if zerocopy {
        "zerocopy"
    } else {
        "copy"
    }
}

/// The two commands of a device transfer: (host, guest).
fn device_commands(
    direction: Direction,
    size: Size,
    zerocopy: bool,
    socket: &Path,
) -> (String, String) {
    let vsk = vsk_size(size);
    let zc = if zerocopy { " --zerocopy" } else { "" };
    let send = format!("--buf-size {} --bytes {} --vsk-size {vsk}{zc}", size.label, size.total);
    let device = format!(
        "zerovsock perf --transport device --vhost-socket {} --guest-cid 3",
        socket.display()
    );
    match direction {
        Direction::GuestToHost => (
            format!("{device} --receiver --vsk-size {vsk} --json"),
            format!("/bin/zerovsock perf --sender 2 {send} --wait 60 --json"),
        ),
        Direction::HostToGuest => (
            format!("{device} --sender 3 {send} --wait {HOST_WAIT} --json"),
            format!("/bin/zerovsock perf --receiver --vsk-size {vsk} --json"),
        ),
    }
}

fn device_transfer(
    lab: &Lab,
    guest: &Guest,
    binaries: &[PathBuf],
    host_binary: &Path,
    direction: Direction,
    size: Size,
    zerocopy: bool,
) -> Result<Cell> {
    let dir = lab.workdir()?;
    let (host_command, guest_command) =
        device_commands(direction, size, zerocopy, &dir.join("vhost.sock"));
    println!("--- host: {host_command}\n--- guest: {guest_command}");
    let host_args = host_command.split_whitespace().skip(1).map(str::to_owned).collect();
    let script = format!(
        "timeout 300 {guest_command} > /tmp/side 2> /tmp/side.err\n\
         g=$?\ncat /tmp/side /tmp/side.err\necho \"--- exit $g\"\n"
    );
    let run = serve_guest(lab, guest, binaries, host_binary, host_args, &dir, &script)?;
    print!("{}", run.outcome.output);
    let guest_exit = run
        .outcome
        .output
        .lines()
        .find_map(|l| l.strip_prefix("--- exit "))
        .and_then(|v| v.trim().parse::<i32>().ok());
    if guest_exit != Some(0) || run.host_exit != Some(0) {
        bail!(
            "the guest side exited {guest_exit:?}, the host side {:?}; the console:\n{}",
            run.host_exit,
            run.outcome.console
        );
    }
    let guest_report = json_object(&run.outcome.output)?;
    let host_report = json_object(&run.host_out)?;
    let (sender, receiver) = match direction {
        Direction::GuestToHost => (guest_report, host_report),
        Direction::HostToGuest => (host_report, guest_report),
    };
    let cell = cell(&sender, &receiver, size)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(cell)
}

/// The first JSON object in `text` (from its first `{` to its last `}`).
fn json_object(text: &str) -> Result<Value> {
    let start = text.find('{').context("no JSON report")?;
    let end = text.rfind('}').context("no JSON report")?;
    serde_json::from_str(&text[start..=end]).with_context(|| format!("not a JSON report:\n{text}"))
}

/// A device transfer's cell from the two sides' reports, once both counted every byte.
fn cell(sender: &Value, receiver: &Value, size: Size) -> Result<Cell> {
    let total = crate::perf_lines::size(size.total)?;
    let (sent, got) = (sender["bytes"].as_u64(), receiver["bytes"].as_u64());
    if sent != Some(total) || got != Some(total) {
        bail!("{} bytes were to move: the sender counted {sent:?}, the receiver {got:?}", total);
    }
    let passes = sender["zerocopy_passes"].as_u64().unwrap_or(0);
    let copied = sender["copied_passes"].as_u64().unwrap_or(0);
    Ok(Cell {
        send_gbps: sender["tx_gbps"].as_f64().context("no tx_gbps")?,
        e2e_gbps: receiver["rx_gbps"].as_f64().context("no rx_gbps")?,
        copied: (sender["mode"] != "copy").then(|| copied as f64 / passes.max(1) as f64),
    })
}

/// Both loopbacks, size by size, in one guest.
fn loopback_guest(
    lab: &Lab,
    guest: &Guest,
    binaries: &[PathBuf],
    failures: &mut Vec<String>,
) -> Result<Vec<LoopbackRow>> {
    let mut script = String::new();
    for size in SIZES {
        for transport in ["kernel", "loopback"] {
            let id = format!("{transport}-{}", size.label);
            script.push_str(&format!(
                "echo '=== {id}'\n\
                 timeout 600 {} > /tmp/out 2> /tmp/err\n\
                 s=$?\ncat /tmp/out /tmp/err\necho \"--- exit $s\"\n",
                loopback_command(transport, size)
            ));
        }
    }
    script.push_str("exit 0\n");
    let guest = Guest { cpus: LOOPBACK_CPUS, ..guest.clone() };
    let outcome = lab.run(binaries, &script, &guest)?;
    print!("{}", outcome.output);
    let mut rows = Vec::new();
    for size in SIZES {
        let mut row: LoopbackRow = (None, None, None, None, None);
        for transport in ["kernel", "loopback"] {
            let id = format!("{transport}-{}", size.label);
            match loopback_cells(&outcome.output, &id, size) {
                Ok((copy, zerocopy, memcpy)) => {
                    if transport == "kernel" {
                        (row.0, row.1) = (Some(copy), Some(zerocopy));
                    } else {
                        (row.2, row.3) = (Some(copy), Some(zerocopy));
                    }
                    row.4 = Some(row.4.unwrap_or(0.0).max(memcpy));
                }
                Err(error) => {
                    println!("== FAILED: {id}: {error:#}");
                    failures.push(id);
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

fn loopback_command(transport: &str, size: Size) -> String {
    format!(
        "/bin/zerovsock perf --transport {transport} --sizes {} --bytes {} --runs {LOOPBACK_RUNS} \
         --copy --zerocopy --json",
        size.label, size.total
    )
}

/// (copy, zerocopy, memcpy Gbit/s) of one loopback run's JSON report.
fn loopback_cells(output: &str, id: &str, size: Size) -> Result<(Cell, Cell, f64)> {
    let mark = format!("=== {id}\n");
    let start = output.find(&mark).with_context(|| format!("the guest never ran {id}"))?;
    let body = &output[start + mark.len()..];
    let body = &body[..body.find("\n=== ").map_or(body.len(), |i| i + 1)];
    let status = body.lines().find_map(|l| l.strip_prefix("--- exit "));
    if status.map(str::trim) != Some("0") {
        bail!("exited {status:?}:\n{body}");
    }
    let report = json_object(body)?;
    let rows = report["rows"].as_array().context("no rows")?;
    let find = |mode: &str| -> Result<Cell> {
        let row = rows
            .iter()
            .find(|r| r["size"] == size.bytes_per_send && r["mode"] == mode)
            .with_context(|| format!("no {mode} row"))?;
        Ok(Cell {
            send_gbps: row["send_gbps"].as_f64().context("no send_gbps")?,
            e2e_gbps: row["e2e_gbps"].as_f64().context("no e2e_gbps")?,
            copied: row["copied_share"].as_f64(),
        })
    };
    let memcpy = rows
        .iter()
        .find(|r| r["link"] == "memcpy")
        .and_then(|r| r["e2e_gbps"].as_f64())
        .unwrap_or(0.0);
    Ok((find("copy")?, find("zerocopy")?, memcpy))
}

/// What the report says of the machine and the guest.
fn machine_notes(lab: &Lab) -> Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let first_line = |program: &str, args: &[&str]| -> String {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_default()
    };
    let qemu = first_line("qemu-system-x86_64", &["--version"]);
    let root = workspace_root()?;
    let root = root.display().to_string();
    let mut commit = first_line("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
    let changed =
        first_line("git", &["-C", &root, "status", "--porcelain", "--untracked-files=no"]);
    if !changed.is_empty() {
        commit.push_str(" with uncommitted changes (the figures are not that commit's)");
    }
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    Ok(format!(
        "- Host: {model}, {cores} logical CPUs (shared with other work; load average {} at \
         the end), the project at commit {commit}, {date}.\n\
         - Guests: {} under {qemu}, software emulation (`-accel tcg,thread=multi -cpu max`; \
         this machine's nested KVM cannot boot a distribution kernel), 512 MiB; one vCPU for \
         the device transfers, {LOOPBACK_CPUS} for the loopback guest.\n",
        load.join(" "),
        lab.kernel().package,
    ))
}

fn gbps(cell: Option<Cell>, pick: fn(&Cell) -> f64) -> String {
    cell.map_or("failed".into(), |c| format!("{:.2}", pick(&c)))
}

fn ratio(copy: Option<Cell>, zerocopy: Option<Cell>) -> String {
    match (copy, zerocopy) {
        (Some(c), Some(z)) if c.send_gbps > 0.0 => format!("{:.2}x", z.send_gbps / c.send_gbps),
        _ => "-".into(),
    }
}

fn copied(cell: Option<Cell>) -> String {
    match cell.and_then(|c| c.copied) {
        Some(share) => format!("{:.0}%", share * 100.0),
        None => "-".into(),
    }
}

fn device_table(title: &str, series: &Series, rfc: &[(f64, f64); 5]) -> String {
    let mut t = format!(
        "## {title}\n\n\
         | size | bytes | copy send | zerocopy send | zerocopy/copy | copy rx | zerocopy rx | \
         zerocopy COPIED | RFC (i7) copy / zerocopy | RFC zerocopy/copy |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for ((size, &(copy, zerocopy)), &(rfc_copy, rfc_zc)) in SIZES.iter().zip(series).zip(rfc) {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {rfc_copy} / {rfc_zc} | {:.2}x |\n",
            size.label,
            size.total,
            gbps(copy, |c| c.send_gbps),
            gbps(zerocopy, |c| c.send_gbps),
            ratio(copy, zerocopy),
            gbps(copy, |c| c.e2e_gbps),
            gbps(zerocopy, |c| c.e2e_gbps),
            copied(zerocopy),
            rfc_zc / rfc_copy,
        ));
    }
    t
}

fn loopback_table(rows: &[LoopbackRow]) -> String {
    let mut t = String::from(
        "## Loopback (inside one guest)\n\n\
         | size | bytes | kernel copy send | kernel zerocopy send | kernel zerocopy/copy | \
         ours copy send | ours zerocopy send | ours zerocopy/copy | kernel copy / zerocopy e2e | \
         ours copy / zerocopy e2e | memcpy | RFC (i7) copy / zerocopy | RFC zerocopy/copy |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for ((size, row), &(rfc_copy, rfc_zc)) in SIZES.iter().zip(rows).zip(&RFC_LOOPBACK) {
        let e2e = |c: Option<Cell>, z: Option<Cell>| {
            format!("{} / {}", gbps(c, |c| c.e2e_gbps), gbps(z, |c| c.e2e_gbps))
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {rfc_copy} / {rfc_zc} | {:.2}x |\n",
            size.label,
            size.total,
            gbps(row.0, |c| c.send_gbps),
            gbps(row.1, |c| c.send_gbps),
            ratio(row.0, row.1),
            gbps(row.2, |c| c.send_gbps),
            gbps(row.3, |c| c.send_gbps),
            ratio(row.2, row.3),
            e2e(row.0, row.1),
            e2e(row.2, row.3),
            row.4.map_or("-".into(), |m| format!("{m:.1}")),
            rfc_zc / rfc_copy,
        ));
    }
    t
}

/// How to read the tables: what the figures measure where they differ from the RFC's.
const NOTES: &str = "## Reading the tables\n\n\
- Host to guest, zerocopy send: on the device's native socket a zerocopy send hands the \
buffer over by reference, and the device copies it into the guest's RX buffers later, outside \
send(); no pages are pinned as the kernel does. A send that finds the guest's credit short of \
its size is copied instead (COPIED), at the cost of a copy inside send(). The send figure \
otherwise counts the socket's bookkeeping only; the rx column is what reached the guest, \
bounded by the emulated guest.\n\
- Host to guest, COPIED: the device completes a zerocopy send once its bytes are in the \
guest's RX buffers, as vhost does, before the guest's application has read them, so the \
sender moves on at once and its next send may find less credit than it needs, which the \
slow emulated reader returns late. The RFC gave its receiver a far larger buffer \
(`--vsk-size`); this bench gives four sends' worth.\n\
- Zerocopy rx below copy rx at small sizes: one zerocopy send is in flight at a time (as \
vsock_perf does), and each waits for its completion, a round trip through the emulated guest \
per send.\n\
- memcpy is measured inside the guest, under emulation: the guest's ceiling, and noisy.\n\
- The guest's figures move from run to run with the host's load (two cores shared with other \
work); compare the ratios within one run.\n";

fn markdown(
    g2h: &Series,
    h2g: &Series,
    loopback: &[LoopbackRow],
    machine: &str,
    seconds: u64,
) -> String {
    let sizes: Vec<String> = SIZES.iter().map(|s| format!("{} ({})", s.label, s.total)).collect();
    format!(
        "# The RFC's tables, made again in the VM lab\n\n\
         The MSG_ZEROCOPY RFC v3 for vsock (Arseniy Krasnov, May 2023) measured copy against \
         zerocopy with vsock_perf in three directions; its figure is the bits sent over the \
         time spent inside `send()`. These tables make the same measurement with \
         `zerovsock perf` (vsock_perf's flags and figures; one zerocopy send in flight, waited \
         for to its completion, as vsock_perf does), in Gbit/s (1e9 bits/s).\n\n\
         Made by `scripts/bench-rfc`, which runs\n\n\
         ```\ncargo run --release --locked -p zerovsock-lab -- rfc-bench --out docs/perf-rfc.md \
         --svg docs/perf-rfc.svg\n```\n\n\
         in {seconds} s. Chart: [perf-rfc.svg](perf-rfc.svg).\n\n\
         ## Machine\n\n{machine}\n\
         **Read the ratios, not the absolute figures.** The guests run under software \
         emulation: everything the guest kernel does is 10-50 times slower than on hardware, \
         while the host side (our device and its native sockets) runs at native speed. The \
         RFC's own figures (Core i7, nested guest) are beside ours for their zerocopy/copy \
         ratio.\n\n\
         ## How\n\n\
         - Sizes and bytes per transfer (fewer for small sizes, to keep the run within minutes \
         under TCG; the RFC sent 256M): {}.\n\
         - Socket buffers (SO_VM_SOCKETS_BUFFER_SIZE) of four sends, at least 256 KiB, on \
         both ends, so a whole zerocopy send fits the credit (the RFC gave the receiver \
         256M; 6.12 caps the sender's credit at its own buffer, which vsock_perf never \
         raises).\n\
         - Guest to host: `zerovsock perf --sender 2 --buf-size SIZE --bytes N --vsk-size V \
         [--zerocopy]` on the guest kernel's AF_VSOCK, through this project's \
         vhost-user-vsock device, to `zerovsock perf --transport device --vhost-socket S \
         --receiver --vsk-size V` in a host process (the device's native sockets). One \
         transfer per guest boot.\n\
         - Host to guest: `zerovsock perf --transport device --vhost-socket S --sender 3 ...` \
         on the host to `zerovsock perf --receiver --vsk-size V` on the guest kernel.\n\
         - Loopback: in one guest, per size, `zerovsock perf --transport kernel --sizes SIZE \
         --bytes N --runs {LOOPBACK_RUNS} --copy --zerocopy` (the kernel's vsock_loopback, \
         both sides in one process) and then the same with `--transport loopback` (this \
         project's userspace loopback), medians of {LOOPBACK_RUNS}.\n\
         - send = bits over the time inside send(); rx = the receiver's figure (its whole \
         read loop), e2e = first send to the last byte read; COPIED = share of zerocopy sends \
         whose completion said the kernel copied after all.\n\n\
         {}\n{}\n{}\n{NOTES}",
        sizes.join(", "),
        device_table(
            "Guest to host (guest kernel through our device, host side native)",
            g2h,
            &RFC_G2H
        ),
        device_table("Host to guest (host native through our device, guest kernel)", h2g, &RFC_H2G),
        loopback_table(loopback),
    )
}

/// Send throughput against size, one panel per table, log scale.
fn chart(path: &Path, g2h: &Series, h2g: &Series, loopback: &[LoopbackRow]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (1440, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            "zerovsock perf, the RFC's tables (TCG guest): Gbit/s inside send() (thick) and delivered (thin)",
            ("sans-serif", 20),
        )
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 3));
    let device_lines = |series: &Series| {
        vec![
            ("copy".to_owned(), series.iter().map(|p| p.0).collect::<Vec<_>>()),
            ("zerocopy".to_owned(), series.iter().map(|p| p.1).collect()),
        ]
    };
    let loopback_lines = vec![
        ("kernel copy".to_owned(), loopback.iter().map(|r| r.0).collect::<Vec<_>>()),
        ("kernel zerocopy".to_owned(), loopback.iter().map(|r| r.1).collect()),
        ("ours copy".to_owned(), loopback.iter().map(|r| r.2).collect()),
        ("ours zerocopy".to_owned(), loopback.iter().map(|r| r.3).collect()),
    ];
    let all = [
        ("guest to host", device_lines(g2h)),
        ("host to guest", device_lines(h2g)),
        ("loopback in the guest", loopback_lines),
    ];
    for (panel, (title, lines)) in panels.iter().zip(all) {
        panel_chart(panel, title, &lines).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e)).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn panel_chart(
    area: &Area<'_>,
    title: &str,
    lines: &[(String, Vec<Option<Cell>>)],
) -> Result<(), Box<dyn std::error::Error>> {
    let values = lines
        .iter()
        .flat_map(|(_, cells)| cells.iter().flatten())
        .flat_map(|c| [c.send_gbps, c.e2e_gbps])
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 { (lo / 1.5, hi * 1.5) } else { (0.01, 1.0) };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.3f64..(SIZES.len() as f64 - 0.7), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(SIZES.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            match (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < SIZES.len() {
                true => SIZES[i as usize].label.to_owned(),
                false => String::new(),
            }
        })
        .y_label_formatter(&|y| format!("{y}"))
        .x_desc("send size")
        .y_desc("Gbit/s")
        .draw()?;
    for (i, (name, cells)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points = |pick: fn(&Cell) -> f64| -> Vec<(f64, f64)> {
            cells
                .iter()
                .enumerate()
                .filter_map(|(x, c)| c.map(|c| (x as f64, pick(&c))))
                .filter(|p| p.1 > 0.0)
                .collect()
        };
        let send = points(|c| c.send_gbps);
        chart
            .draw_series(LineSeries::new(send.clone(), color.stroke_width(3)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
            });
        chart.draw_series(send.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        chart.draw_series(LineSeries::new(points(|c| c.e2e_gbps), color.stroke_width(1)))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_sizes_with_buffers_that_hold_four_sends() {
        let sizes: Vec<&str> = SIZES.iter().map(|s| s.label).collect();
        assert_eq!(sizes, ["4K", "32K", "256K", "1M", "8M"]);
        assert_eq!(vsk_size(SIZES[0]), 256 << 10, "at least Linux's default");
        assert_eq!(vsk_size(SIZES[4]), 32 << 20);
        for size in SIZES {
            assert!(crate::perf_lines::size(size.total).unwrap() >= 2 * size.bytes_per_send);
        }
    }

    #[test]
    fn device_transfers_pair_a_native_host_side_with_the_guest_kernel() {
        let socket = Path::new("/w/vhost.sock");
        let (host, guest) = device_commands(Direction::GuestToHost, SIZES[1], true, socket);
        assert_eq!(
            host,
            "zerovsock perf --transport device --vhost-socket /w/vhost.sock --guest-cid 3 \
             --receiver --vsk-size 262144 --json"
        );
        assert_eq!(
            guest,
            "/bin/zerovsock perf --sender 2 --buf-size 32K --bytes 32M --vsk-size 262144 \
             --zerocopy --wait 60 --json"
        );
        let (host, guest) = device_commands(Direction::HostToGuest, SIZES[4], false, socket);
        assert!(host.contains("--sender 3 --buf-size 8M --bytes 128M --vsk-size 33554432 --wait"));
        assert_eq!(guest, "/bin/zerovsock perf --receiver --vsk-size 33554432 --json");
    }

    #[test]
    fn a_cell_needs_every_byte_on_both_sides() {
        let sender = serde_json::json!({"bytes": 16u64 << 20, "tx_gbps": 2.0, "mode": "zerocopy",
            "zerocopy_passes": 4096, "copied_passes": 1024});
        let receiver = serde_json::json!({"bytes": 16u64 << 20, "rx_gbps": 0.5});
        let got = cell(&sender, &receiver, SIZES[0]).unwrap();
        assert_eq!((got.send_gbps, got.e2e_gbps, got.copied), (2.0, 0.5, Some(0.25)));
        let short = serde_json::json!({"bytes": 1000, "rx_gbps": 0.5});
        assert!(cell(&sender, &short, SIZES[0]).is_err());
    }

    #[test]
    fn a_loopback_run_gives_copy_zerocopy_and_memcpy() {
        let output = "=== kernel-4K\n{\"rows\": [\
            {\"size\": 4096, \"link\": \"memcpy\", \"mode\": null, \"send_gbps\": null, \"e2e_gbps\": 90.0},\
            {\"size\": 4096, \"link\": \"kernel loopback\", \"mode\": \"copy\", \"send_gbps\": 1.0, \"e2e_gbps\": 0.9},\
            {\"size\": 4096, \"link\": \"kernel loopback\", \"mode\": \"zerocopy\", \"send_gbps\": 2.0, \"e2e_gbps\": 0.5, \"copied_share\": 0.0}\
            ]}\n--- exit 0\n=== loopback-4K\n--- exit 1\n";
        let (copy, zerocopy, memcpy) = loopback_cells(output, "kernel-4K", SIZES[0]).unwrap();
        assert_eq!((copy.send_gbps, zerocopy.send_gbps, memcpy), (1.0, 2.0, 90.0));
        assert_eq!(zerocopy.copied, Some(0.0));
        assert!(loopback_cells(output, "loopback-4K", SIZES[0]).is_err());
    }
}
