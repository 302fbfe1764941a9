//! `perf`: `zerovsock perf` checked in guests, against the kernel's C `vsock_perf` 6.12 (built
//! from Debian's `linux-source-6.12` beside `vsock_test`) and on every kernel path:
//!
//! * `c-receiver`: the C receiver with our sender (`zerovsock perf --sender 1`), copy and
//!   `--zerocopy`, on the guest's `vsock_loopback`;
//! * `c-sender`: our receiver (`zerovsock perf --receiver`) with the C sender, copy and
//!   `--zerocopy`, on `vsock_loopback`;
//! * `kernel`: both sides ours in one process (`zerovsock perf --transport kernel`), copy,
//!   MSG_ZEROCOPY and io_uring SEND_ZC at 4 KiB and 64 KiB, every byte verified;
//! * `device-g2h-c`, `device-g2h-ours`: the C sender (copy) and ours (`--zerocopy`) on the
//!   guest kernel's `AF_VSOCK`, through our vhost-user-vsock device to a host process
//!   `zerovsock perf --transport device --receiver` on the device's native sockets (which
//!   verifies every byte of our sender's pattern);
//! * `device-h2g-c`, `device-h2g-ours`: a host process `zerovsock perf --transport device
//!   --sender 3` (copy; `--zerocopy`) to the C receiver and to ours (`--verify`) in the guest.
//!
//! For a pair, both processes must exit 0, both sides' printed lines must parse as vsock_perf's
//! (`tx performance: X Gbits/s` and the rest), and the byte counts printed by each side must
//! be `--bytes`. When the C tool and ours both ran a side, our lines must be the C tool's,
//! numbers aside. The loopback pieces share one guest; each device piece boots its own, since
//! the host process that serves the guest's device ends with its one connection. Everything is
//! checked even when an earlier piece failed; any failure fails the command.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use zerovsock_lab::{build_host_binary, build_static_binary, Guest, Lab, Outcome, SOURCE_PACKAGE};

use crate::conformance::{finish, spawn_host};
use crate::perf_lines::{self, ReceiverFigures, SenderFigures};

/// Bytes per transfer (a few MiB: vsock moves 30-70 MiB/s in a TCG guest).
const BYTES: &str = "16M";
const BYTES_N: u64 = 16 << 20;
/// Each send(), and each read() of our receiver.
const BUF_SIZE: &str = "64K";
/// Each read() of the C receiver: its whole socket buffer (its default `--vsk-size`). The C
/// receiver stops at the first poll() that reports POLLRDHUP or POLLHUP, after one read, even
/// when more is queued: with reads shorter than what the sender has in flight it loses the
/// tail whenever the sender's shutdown arrives behind more than one read's worth (measured in
/// a guest with 64 KiB reads: C sender to C receiver lost 64-192 KiB in 3 of 8 runs, our
/// sender to it in 4 of 8, our sender to our receiver in none). A read as large as the
/// buffer takes all that can be queued, so the count is the transfer's, not the race's.
const C_RECEIVER_BUF_SIZE: &str = "256K";
/// The guest's CID on our device, and the host's.
const GUEST_CID: u32 = 3;
const HOST_CID: u32 = 2;
/// Busybox `timeout` for one side in a guest.
const SIDE_LIMIT: u32 = 120;
/// How long a host sender retries its connect while the guest boots.
const HOST_WAIT: u32 = 180;
/// How long a host side may take to finish after its guest ended.
const HOST_PATIENCE: Duration = Duration::from_secs(60);
/// The `kernel` piece's command, as a user would type it (`--json` added to read it back).
const KERNEL_BOTH: &str = "/bin/zerovsock perf --transport kernel --sizes 4K,64K --bytes 8M \
                           --runs 1 --verify --copy --zerocopy --uring";

/// One check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Piece {
    /// The C receiver with our sender on vsock_loopback, copy and zerocopy.
    CReceiver,
    /// Our receiver with the C sender on vsock_loopback, copy and zerocopy.
    CSender,
    /// Both sides ours on vsock_loopback: copy, zerocopy, io_uring SEND_ZC, verified.
    Kernel,
    /// The C sender in a guest, through our device, to our host receiver.
    DeviceG2hC,
    /// Our zerocopy sender in a guest, through our device, to our host receiver (verified).
    DeviceG2hOurs,
    /// Our host sender, through our device, to the C receiver in a guest.
    DeviceH2gC,
    /// Our zerocopy host sender, through our device, to our receiver in a guest (verified).
    DeviceH2gOurs,
}

impl Piece {
    pub const ALL: [Piece; 7] = [
        Piece::CReceiver,
        Piece::CSender,
        Piece::Kernel,
        Piece::DeviceG2hC,
        Piece::DeviceG2hOurs,
        Piece::DeviceH2gC,
        Piece::DeviceH2gOurs,
    ];

    fn on_loopback(self) -> bool {
        matches!(self, Piece::CReceiver | Piece::CSender | Piece::Kernel)
    }
}

/// Who runs a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    C,
    Ours,
}

/// Where a side runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In the guest, on the guest kernel's AF_VSOCK.
    Guest,
    /// On the host, on our device's native sockets.
    Host,
}

/// One transfer of a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Transfer {
    id: String,
    sender: (Tool, Place),
    receiver: (Tool, Place),
    zerocopy: bool,
}

impl Transfer {
    fn new(id: &str, sender: (Tool, Place), receiver: (Tool, Place), zerocopy: bool) -> Self {
        Transfer { id: id.to_owned(), sender, receiver, zerocopy }
    }

    /// Only our receiver checks the bytes, and only against our sender's pattern (the C
    /// sender sends zeros).
    fn verify(&self) -> bool {
        self.receiver.0 == Tool::Ours && self.sender.0 == Tool::Ours
    }

    fn title(&self) -> String {
        let side = |(tool, place): (Tool, Place)| {
            let who = if tool == Tool::C { "C vsock_perf" } else { "zerovsock perf" };
            match place {
                Place::Guest => format!("{who} (guest)"),
                Place::Host => format!("{who} (host, device)"),
            }
        };
        let mode = if self.zerocopy { "MSG_ZEROCOPY" } else { "copy" };
        format!("{} sender -> {} receiver, {mode}", side(self.sender), side(self.receiver))
    }

    /// The sender's command line.
    fn sender_command(&self, socket: &Path) -> String {
        let zerocopy = if self.zerocopy { " --zerocopy" } else { "" };
        let common = format!("--bytes {BYTES} --buf-size {BUF_SIZE}{zerocopy}");
        match self.sender {
            (Tool::C, _) => format!("/bin/vsock_perf --sender {} {common}", self.peer_cid()),
            (Tool::Ours, Place::Guest) => {
                format!("/bin/zerovsock perf --sender {} {common} --wait 60", self.peer_cid())
            }
            (Tool::Ours, Place::Host) => format!(
                "zerovsock perf --transport device --vhost-socket {} --guest-cid {GUEST_CID} \
                 --sender {GUEST_CID} {common} --wait {HOST_WAIT}",
                socket.display()
            ),
        }
    }

    /// The receiver's command line.
    fn receiver_command(&self, socket: &Path) -> String {
        let verify = if self.verify() { " --verify" } else { "" };
        match self.receiver {
            (Tool::C, _) => format!("/bin/vsock_perf --buf-size {C_RECEIVER_BUF_SIZE}"),
            (Tool::Ours, Place::Guest) => {
                format!("/bin/zerovsock perf --receiver --buf-size {BUF_SIZE}{verify}")
            }
            (Tool::Ours, Place::Host) => format!(
                "zerovsock perf --transport device --vhost-socket {} --guest-cid {GUEST_CID} \
                 --receiver --buf-size {BUF_SIZE}{verify}",
                socket.display()
            ),
        }
    }

    /// The CID the sender connects to.
    fn peer_cid(&self) -> u32 {
        match (self.sender.1, self.receiver.1) {
            (Place::Guest, Place::Guest) => 1,
            (Place::Guest, Place::Host) => HOST_CID,
            (Place::Host, _) => GUEST_CID,
        }
    }
}

/// The transfers of a piece (none for `kernel`).
fn transfers(piece: Piece) -> Vec<Transfer> {
    let (c_guest, ours_guest) = ((Tool::C, Place::Guest), (Tool::Ours, Place::Guest));
    let ours_host = (Tool::Ours, Place::Host);
    match piece {
        Piece::CReceiver => vec![
            Transfer::new("c-receiver-copy", ours_guest, c_guest, false),
            Transfer::new("c-receiver-zerocopy", ours_guest, c_guest, true),
        ],
        Piece::CSender => vec![
            Transfer::new("c-sender-copy", c_guest, ours_guest, false),
            Transfer::new("c-sender-zerocopy", c_guest, ours_guest, true),
        ],
        Piece::Kernel => Vec::new(),
        Piece::DeviceG2hC => vec![Transfer::new("device-g2h-c", c_guest, ours_host, false)],
        Piece::DeviceG2hOurs => vec![Transfer::new("device-g2h-ours", ours_guest, ours_host, true)],
        Piece::DeviceH2gC => vec![Transfer::new("device-h2g-c", ours_host, c_guest, false)],
        Piece::DeviceH2gOurs => vec![Transfer::new("device-h2g-ours", ours_host, ours_guest, true)],
    }
}

/// What the two sides of a transfer printed, and how they exited.
#[derive(Debug, Default)]
struct Sides {
    sender: String,
    sender_exit: Option<i32>,
    receiver: String,
    receiver_exit: Option<i32>,
}

/// A checked transfer.
struct Judged {
    sent: SenderFigures,
    received: ReceiverFigures,
}

/// How one check went.
struct Ran {
    title: String,
    result: Result<String>,
    time: Duration,
}

pub fn run(guest: &Guest, only: &[Piece]) -> Result<()> {
    let pieces: Vec<Piece> =
        Piece::ALL.into_iter().filter(|p| only.is_empty() || only.contains(p)).collect();
    let lab = Lab::prepare()?;
    let c_perf = lab.vsock_perf()?;
    let ours_guest = build_static_binary("zerovsock-cli", "zerovsock")?;
    let ours_host = if pieces.iter().any(|p| !p.on_loopback()) {
        Some(build_host_binary("zerovsock-cli", "zerovsock")?)
    } else {
        None
    };
    println!(
        "perf: the kernel's vsock_perf from {SOURCE_PACKAGE} {}; guest kernel {}; {BYTES} per \
         transfer in {BUF_SIZE} sends",
        c_perf.version,
        lab.kernel().package
    );
    let binaries = [c_perf.path.clone(), ours_guest];
    let mut ran = Vec::new();
    let loopback: Vec<Piece> = pieces.iter().copied().filter(|p| p.on_loopback()).collect();
    if !loopback.is_empty() {
        ran.extend(loopback_guest(&lab, guest, &binaries, &loopback));
    }
    for piece in pieces.iter().copied().filter(|p| !p.on_loopback()) {
        let host = ours_host.as_deref().context("no host binary")?;
        for transfer in transfers(piece) {
            println!("\n== {}", transfer.title());
            let started = Instant::now();
            let result = on_device(&lab, guest, &binaries, host, &transfer);
            ran.push(report(transfer.title(), result, started.elapsed()));
        }
    }
    println!("\nperf pairings (vsock_perf from {SOURCE_PACKAGE} {}):", c_perf.version);
    for r in &ran {
        let (verdict, note) = match &r.result {
            Ok(note) => ("PASS", note.clone()),
            Err(_) => ("FAIL", String::new()),
        };
        let time = match r.time.is_zero() {
            true => "-".to_owned(),
            false => format!("{:.1?}", r.time),
        };
        println!("  {verdict:<4} {time:>6}  {}\n               {note}", r.title);
    }
    let failed: Vec<&Ran> = ran.iter().filter(|r| r.result.is_err()).collect();
    for r in &failed {
        if let Err(error) = &r.result {
            println!("\n== FAILED: {}\n{error:#}", r.title);
        }
    }
    println!("perf: {} passed, {} failed", ran.len() - failed.len(), failed.len());
    if !failed.is_empty() {
        bail!("{} of {} perf checks failed", failed.len(), ran.len());
    }
    Ok(())
}

fn report(title: String, result: Result<String>, time: Duration) -> Ran {
    match &result {
        Ok(note) => println!("== PASS in {time:.1?}: {note}"),
        Err(error) => println!("== FAIL in {time:.1?}: {error:#}"),
    }
    Ran { title, result, time }
}

/// The loopback pieces in one guest: each pair's receiver in the background, then its sender.
fn loopback_guest(lab: &Lab, guest: &Guest, binaries: &[PathBuf], pieces: &[Piece]) -> Vec<Ran> {
    let all: Vec<Transfer> = pieces.iter().flat_map(|&p| transfers(p)).collect();
    let none = Path::new("");
    let mut script = String::new();
    for transfer in &all {
        script.push_str(&pair_script(
            &transfer.id,
            &transfer.receiver_command(none),
            &transfer.sender_command(none),
        ));
    }
    if pieces.contains(&Piece::Kernel) {
        script.push_str(&kernel_script());
    }
    script.push_str("exit 0\n");
    println!("\n== vsock_loopback in one guest: {}", names(pieces));
    let started = Instant::now();
    let outcome = match lab.run(binaries, &script, guest) {
        Ok(outcome) => outcome,
        Err(error) => {
            let error = format!("{error:#}");
            let mut ran: Vec<Ran> = all
                .iter()
                .map(|t| Ran {
                    title: t.title(),
                    result: Err(anyhow::anyhow!("{error}")),
                    time: started.elapsed(),
                })
                .collect();
            if pieces.contains(&Piece::Kernel) {
                ran.push(Ran {
                    title: kernel_title(),
                    result: Err(anyhow::anyhow!("{error}")),
                    time: started.elapsed(),
                });
            }
            return ran;
        }
    };
    crate::conformance::print_outcome(&outcome);
    // One guest ran them all: each gets its share of the guest's run.
    let time = outcome.total_time.saturating_sub(outcome.boot_time) / (all.len() as u32 + 1);
    let mut ran = Vec::new();
    let mut seen: Vec<(&Transfer, Sides)> = Vec::new();
    for transfer in &all {
        let result = section(&outcome.output, &transfer.id).and_then(|text| {
            let sides = sides_in_guest(text)?;
            let note = judge(transfer, &sides).map(|j| note(&j));
            seen.push((transfer, sides));
            note
        });
        ran.push(report(transfer.title(), result, time));
    }
    if let Some(result) = compare_lines(&seen) {
        ran.push(report("zerovsock perf prints vsock_perf's lines".into(), result, Duration::ZERO));
    }
    if pieces.contains(&Piece::Kernel) {
        let result = section(&outcome.output, "kernel").and_then(judge_kernel);
        ran.push(report(kernel_title(), result, time));
    }
    ran
}

fn names(pieces: &[Piece]) -> String {
    let names: Vec<String> = pieces
        .iter()
        .filter_map(|p| p.to_possible_value().map(|v| v.get_name().to_owned()))
        .collect();
    names.join(", ")
}

fn kernel_title() -> String {
    format!("{} (ours, both sides, vsock_loopback)", KERNEL_BOTH.trim_start_matches("/bin/"))
}

/// The script for one pair in one guest: the receiver in the background, then the sender,
/// which the C tool's is tried again while its connect is refused (the receiver may not
/// listen yet; ours waits with --wait). Prints both outputs and both exit statuses.
fn pair_script(id: &str, receiver: &str, sender: &str) -> String {
    format!(
        "echo '=== {id}'\n\
         timeout {SIDE_LIMIT} {receiver} > /tmp/{id}.r 2>&1 &\n\
         r=$!\n\
         i=0\n\
         while :; do\n\
         \x20 timeout {SIDE_LIMIT} {sender} > /tmp/{id}.s 2>&1\n\
         \x20 s=$?\n\
         \x20 if [ $s -ne 0 ] && [ $i -lt 100 ] && grep -q '^connect: ' /tmp/{id}.s; then\n\
         \x20   i=$((i+1)); sleep 0.1; continue\n\
         \x20 fi\n\
         \x20 break\n\
         done\n\
         wait $r\n\
         rs=$?\n\
         echo '--- sender: {sender}'\n\
         cat /tmp/{id}.s\n\
         echo '--- receiver: {receiver}'\n\
         cat /tmp/{id}.r\n\
         echo \"--- exit sender=$s receiver=$rs\"\n"
    )
}

fn kernel_script() -> String {
    format!(
        "echo '=== kernel'\n\
         echo '--- {KERNEL_BOTH} --json'\n\
         timeout 300 {KERNEL_BOTH} --json > /tmp/kernel.json 2> /tmp/kernel.err\n\
         k=$?\n\
         cat /tmp/kernel.json /tmp/kernel.err\n\
         echo \"--- exit $k\"\n"
    )
}

/// The lines between `=== id` and the next `=== ` line.
fn section<'a>(output: &'a str, id: &str) -> Result<&'a str> {
    let mark = format!("=== {id}\n");
    let start = output.find(&mark).with_context(|| format!("the guest never started {id}"))?;
    let body = &output[start + mark.len()..];
    let end = body.find("\n=== ").map_or(body.len(), |i| i + 1);
    Ok(&body[..end])
}

/// The two outputs and exit statuses of a pair that ran in one guest.
fn sides_in_guest(text: &str) -> Result<Sides> {
    let sender_at = text.find("--- sender: ").context("no sender output")?;
    let receiver_at = text.find("--- receiver: ").context("no receiver output")?;
    let exit_at = text.find("--- exit sender=").context("no exit statuses: the guest stopped")?;
    let body = |from: usize, to: usize| {
        let part = &text[from..to];
        part.split_once('\n').map_or("", |(_, rest)| rest).to_owned()
    };
    let statuses = text[exit_at..].lines().next().unwrap_or_default();
    let status = |key: &str| {
        statuses
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse::<i32>().ok())
    };
    Ok(Sides {
        sender: body(sender_at, receiver_at),
        sender_exit: status("sender="),
        receiver: body(receiver_at, exit_at),
        receiver_exit: status("receiver="),
    })
}

/// Both sides exited 0, printed vsock_perf's figures, and counted `--bytes` each.
fn judge(transfer: &Transfer, sides: &Sides) -> Result<Judged> {
    let mut problems = Vec::new();
    for (side, exit) in [("sender", sides.sender_exit), ("receiver", sides.receiver_exit)] {
        if exit != Some(0) {
            problems.push(format!("the {side} exited {}", describe(exit)));
        }
    }
    let sent = perf_lines::sender(&sides.sender);
    let received = perf_lines::receiver(&sides.receiver);
    if let Err(error) = &sent {
        problems.push(format!("the sender's lines: {error:#}"));
    }
    if let Err(error) = &received {
        problems.push(format!("the receiver's lines: {error:#}"));
    }
    if let (Ok(sent), Ok(received)) = (&sent, &received) {
        if sent.bytes != BYTES_N || received.bytes != BYTES_N {
            problems.push(format!(
                "--bytes {BYTES} is {BYTES_N}: the sender counted {}, the receiver {}",
                sent.bytes, received.bytes
            ));
        }
        if transfer.verify() && !received.verified {
            problems.push("our receiver ran with --verify but did not report it".into());
        }
        match (transfer.sender.0, transfer.zerocopy, sent.completions) {
            (Tool::Ours, true, None) => {
                problems.push("our zerocopy sender printed no completion count".into())
            }
            (Tool::Ours, true, Some((0, _))) => {
                problems.push("our zerocopy sender counted no completion".into())
            }
            _ => {}
        }
    }
    if !problems.is_empty() {
        bail!(
            "{}\n--- sender printed:\n{}--- receiver printed:\n{}",
            problems.join("; "),
            sides.sender,
            sides.receiver
        );
    }
    Ok(Judged { sent: sent?, received: received? })
}

fn describe(exit: Option<i32>) -> String {
    match exit {
        Some(124) | Some(143) => "at its timeout (killed)".into(),
        Some(code) => code.to_string(),
        None => "without a status".into(),
    }
}

fn note(judged: &Judged) -> String {
    let mut note = format!(
        "{} bytes each side; tx {:.3} Gbit/s (in send), rx {:.3} Gbit/s",
        judged.sent.bytes, judged.sent.tx_gbps, judged.received.rx_gbps
    );
    if let Some((ids, copied)) = judged.sent.completions {
        note.push_str(&format!(", {ids} zerocopy completion ids ({copied} COPIED)"));
    }
    if judged.received.verified {
        note.push_str(", every byte verified");
    }
    note
}

/// Our lines against the C tool's, for each side and mode both printed in this run.
fn compare_lines(seen: &[(&Transfer, Sides)]) -> Option<Result<String>> {
    let find = |sender: bool, tool: Tool, zerocopy: bool| {
        seen.iter().find_map(|(t, sides)| {
            let side = if sender { t.sender.0 } else { t.receiver.0 };
            let ok = if sender { sides.sender_exit } else { sides.receiver_exit } == Some(0);
            (side == tool && t.zerocopy == zerocopy && ok).then(|| {
                if sender {
                    sides.sender.clone()
                } else {
                    sides.receiver.clone()
                }
            })
        })
    };
    let mut compared = Vec::new();
    let mut problems = Vec::new();
    for (sender, zerocopy, what) in
        [(true, false, "sender"), (true, true, "zerocopy sender"), (false, false, "receiver")]
    {
        if let (Some(c), Some(ours)) =
            (find(sender, Tool::C, zerocopy), find(sender, Tool::Ours, zerocopy))
        {
            match perf_lines::same_lines(&c, &ours) {
                Ok(()) => compared.push(what),
                Err(error) => problems.push(format!("{what}: {error:#}")),
            }
        }
    }
    if compared.is_empty() && problems.is_empty() {
        return None;
    }
    Some(if problems.is_empty() {
        Ok(format!("same lines as vsock_perf, numbers aside: {}", compared.join(", ")))
    } else {
        Err(anyhow::anyhow!("{}", problems.join("; ")))
    })
}

/// The `kernel` piece: exit 0, and a row for each size and mode, verified, none skipped.
fn judge_kernel(text: &str) -> Result<String> {
    let status = text
        .lines()
        .find_map(|l| l.strip_prefix("--- exit "))
        .and_then(|s| s.trim().parse::<i32>().ok());
    if status != Some(0) {
        bail!("{KERNEL_BOTH} exited {}:\n{text}", describe(status));
    }
    let json_start = text.find('{').context("no JSON report")?;
    let json_end = text.rfind('}').context("no JSON report")?;
    let report: serde_json::Value = serde_json::from_str(&text[json_start..=json_end])
        .with_context(|| format!("the JSON report does not parse:\n{text}"))?;
    if report["verify"] != true {
        bail!("the report says the bytes were not verified");
    }
    if report["skipped"].as_array().is_some_and(|s| !s.is_empty()) {
        bail!("modes were skipped: {}", report["skipped"]);
    }
    let rows = report["rows"].as_array().context("no rows")?;
    let mut cells = Vec::new();
    for size in [4096u64, 65536] {
        for mode in ["copy", "zerocopy", "uring-zc"] {
            let row = rows
                .iter()
                .find(|r| r["size"] == size && r["mode"] == mode && r["link"] == "kernel loopback")
                .with_context(|| format!("no row for {mode} at {size} bytes"))?;
            let send = row["send_gbps"].as_f64().unwrap_or(0.0);
            let e2e = row["e2e_gbps"].as_f64().unwrap_or(0.0);
            if send <= 0.0 || e2e <= 0.0 {
                bail!("{mode} at {size} bytes: send {send}, e2e {e2e} Gbit/s");
            }
            cells.push(format!("{}K {mode} {send:.2}/{e2e:.2}", size / 1024));
        }
    }
    Ok(format!("rows (send/e2e Gbit/s): {}", cells.join(", ")))
}

/// A device transfer: our host side serving the guest's `vhost-user-vsock-pci`, the other
/// side in the guest.
fn on_device(
    lab: &Lab,
    guest: &Guest,
    binaries: &[PathBuf],
    host_binary: &Path,
    transfer: &Transfer,
) -> Result<String> {
    let dir = lab.workdir()?;
    let socket = dir.join("vhost.sock");
    let host_sends = transfer.sender.1 == Place::Host;
    let (host_command, guest_command) = if host_sends {
        (transfer.sender_command(&socket), transfer.receiver_command(&socket))
    } else {
        (transfer.receiver_command(&socket), transfer.sender_command(&socket))
    };
    let host_args: Vec<String> =
        host_command.split_whitespace().skip(1).map(str::to_owned).collect();
    println!("--- host: {host_command}");
    let script = if host_sends {
        format!(
            "timeout {SIDE_LIMIT} {guest_command} > /tmp/side 2>&1\n\
             g=$?\ncat /tmp/side\necho \"--- exit guest=$g\"\n"
        )
    } else {
        pair_script(&transfer.id, "true", &guest_command)
    };
    let run = serve_guest(lab, guest, binaries, host_binary, host_args, &dir, &script)?;
    println!("--- guest: {guest_command}");
    print!("{}", run.outcome.output);
    let (outcome, host_out, host_exit) = (run.outcome, run.host_out, run.host_exit);
    let sides = if host_sends {
        let guest_exit = outcome
            .output
            .lines()
            .find_map(|l| l.strip_prefix("--- exit guest="))
            .and_then(|v| v.trim().parse().ok());
        let guest_out = outcome.output.split("--- exit guest=").next().unwrap_or_default();
        Sides {
            sender: host_out,
            sender_exit: host_exit,
            receiver: guest_out.to_owned(),
            receiver_exit: guest_exit,
        }
    } else {
        let guest_side = sides_in_guest(section(&outcome.output, &transfer.id)?)?;
        Sides {
            sender: guest_side.sender,
            sender_exit: guest_side.sender_exit,
            receiver: host_out,
            receiver_exit: host_exit,
        }
    };
    let judged = judge(transfer, &sides)
        .with_context(|| format!("the guest's console:\n{}", outcome.console))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(note(&judged))
}

/// What a host process serving a guest's device and the guest printed.
pub(crate) struct DeviceRun {
    pub host_out: String,
    pub host_exit: Option<i32>,
    pub outcome: Outcome,
}

/// Starts `host_binary host_args`, which must serve `dir/vhost.sock` (its output goes to
/// `dir/host.log`), boots a guest with `vhost-user-vsock-pci` on that socket to run `script`,
/// and waits for both (the host side at most [`HOST_PATIENCE`] after the guest ended).
pub(crate) fn serve_guest(
    lab: &Lab,
    guest: &Guest,
    binaries: &[PathBuf],
    host_binary: &Path,
    host_args: Vec<String>,
    dir: &Path,
    script: &str,
) -> Result<DeviceRun> {
    let socket = dir.join("vhost.sock");
    let log = dir.join("host.log");
    let mut host = spawn_host(host_binary, host_args, &log)?;
    let started = Instant::now();
    while !socket.exists() {
        if let Some(status) = host.try_wait()? {
            bail!(
                "the host side exited ({status}) before serving the device:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if started.elapsed() > HOST_PATIENCE {
            let _ = host.kill();
            let _ = host.wait();
            bail!("the host side made no socket within {HOST_PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let vhost = Guest { vhost_user_vsock: Some(socket), ..guest.clone() };
    let outcome = lab.run(binaries, script, &vhost);
    let host_status = finish(&mut host, HOST_PATIENCE);
    let host_out = std::fs::read_to_string(&log).unwrap_or_default();
    print!("{host_out}");
    println!("--- host {}", status_text(&host_status));
    Ok(DeviceRun {
        host_out,
        host_exit: host_status.ok().and_then(|s| s.code()),
        outcome: outcome?,
    })
}

fn status_text(status: &Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(error) => format!("{error:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_perf_pairs_on_vsock_loopback_connect_to_cid_1_with_vsock_perf_s_flags() {
        let [ours_to_c, ours_zc_to_c] = <[Transfer; 2]>::try_from(transfers(Piece::CReceiver))
            .unwrap_or_else(|_| unreachable!());
        let none = Path::new("");
        assert_eq!(
            ours_to_c.sender_command(none),
            "/bin/zerovsock perf --sender 1 --bytes 16M --buf-size 64K --wait 60"
        );
        assert_eq!(
            ours_to_c.receiver_command(none),
            "/bin/vsock_perf --buf-size 256K",
            "the C receiver reads its whole buffer at once, or it may lose the tail"
        );
        assert!(ours_zc_to_c.sender_command(none).contains(" --zerocopy"));
        let c_to_ours = &transfers(Piece::CSender)[1];
        assert_eq!(
            c_to_ours.sender_command(none),
            "/bin/vsock_perf --sender 1 --bytes 16M --buf-size 64K --zerocopy"
        );
        assert_eq!(
            c_to_ours.receiver_command(none),
            "/bin/zerovsock perf --receiver --buf-size 64K",
            "the C sender sends zeros: nothing to verify"
        );
    }

    #[test]
    fn device_pairs_put_our_native_side_on_the_host_and_verify_our_pattern() {
        let socket = Path::new("/w/vhost.sock");
        let g2h = &transfers(Piece::DeviceG2hOurs)[0];
        assert_eq!(
            g2h.receiver_command(socket),
            "zerovsock perf --transport device --vhost-socket /w/vhost.sock --guest-cid 3 \
             --receiver --buf-size 64K --verify"
        );
        assert!(g2h.sender_command(socket).starts_with("/bin/zerovsock perf --sender 2 "));
        let h2g = &transfers(Piece::DeviceH2gC)[0];
        assert_eq!(
            h2g.sender_command(socket),
            "zerovsock perf --transport device --vhost-socket /w/vhost.sock --guest-cid 3 \
             --sender 3 --bytes 16M --buf-size 64K --wait 180"
        );
        assert_eq!(h2g.receiver_command(socket), "/bin/vsock_perf --buf-size 256K");
    }

    #[test]
    fn a_pair_s_outputs_and_statuses_are_read_from_its_section() {
        let output = "=== a\n--- sender: s\nsent\n--- receiver: r\ngot\n--- exit sender=0 \
                      receiver=124\n=== b\n--- sender: s\n";
        let sides = sides_in_guest(section(output, "a").unwrap()).unwrap();
        assert_eq!((sides.sender.as_str(), sides.receiver.as_str()), ("sent\n", "got\n"));
        assert_eq!((sides.sender_exit, sides.receiver_exit), (Some(0), Some(124)));
        assert!(sides_in_guest(section(output, "b").unwrap()).is_err(), "b never finished");
        assert!(section(output, "c").is_err());
    }

    #[test]
    fn a_pair_fails_on_a_status_a_count_or_a_missing_line() {
        let transfer = &transfers(Piece::CSender)[0];
        let sender = "total bytes sent: 16777216\ntx performance: 1.5 Gbits/s\n\
                      total time in tx loop: 0.1 sec\ntime in 'send()': 0.08 sec\n";
        let receiver = "total bytes received: 16777216\nrx performance: 1.2 Gbits/s\n\
                        total time in 'read()': 0.05 sec\naverage time in 'read()': 100.0 ns\n\
                        POLLIN wakeups: 257\n";
        let good = Sides {
            sender: sender.into(),
            sender_exit: Some(0),
            receiver: receiver.into(),
            receiver_exit: Some(0),
        };
        assert!(judge(transfer, &good).is_ok());
        let killed = Sides { receiver_exit: Some(124), ..good };
        assert!(format!("{:#}", judge(transfer, &killed).err().unwrap()).contains("timeout"));
        let short = Sides {
            receiver: receiver.replace("16777216", "16777215"),
            receiver_exit: Some(0),
            ..killed
        };
        assert!(format!("{:#}", judge(transfer, &short).err().unwrap()).contains("--bytes"));
    }

    #[test]
    fn the_pair_script_retries_only_a_refused_connect_and_reports_both_statuses() {
        let script = pair_script("x", "/bin/r", "/bin/s");
        assert!(script.contains("timeout 120 /bin/r > /tmp/x.r 2>&1 &"));
        assert!(script.contains("grep -q '^connect: ' /tmp/x.s"));
        assert!(script.ends_with("echo \"--- exit sender=$s receiver=$rs\"\n"));
    }
}
