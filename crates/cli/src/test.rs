//! `zerovsock test`: the conformance suite (`zerovsock-conformance`) with the kernel
//! `vsock_test`'s command line, so either half of a run can be the kernel's C tool.
//!
//! Without `--mode`, both halves run in this process on the chosen transport (one control
//! connection per test over 127.0.0.1) and the results are checked against the expectations
//! checked in for it. With `--mode`, this process is one side of a pairing over the control
//! channel, as `vsock_test` is.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use zerovsock_conformance::cases::Mode;
use zerovsock_conformance::control::{Control, ControlListener};
use zerovsock_conformance::kernel::KernelPeer;
use zerovsock_conformance::list::{self, Select};
use zerovsock_conformance::peer::{Cid, Peer};
use zerovsock_conformance::report::{self, Expectations};
use zerovsock_conformance::runner::{self, Endpoint, Side, Status, TestResult};
use zerovsock_conformance::stack::StackPeer;
use zerovsock_conformance::targets::{self, DeviceTarget};
use zerovsock_vhost::{Device, DeviceConfig};

/// Where the sockets under test live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// The userspace stack's in-process loopback (both halves in this process).
    Loopback,
    /// The vhost-user device's native sockets: with `--mode`, the host half of a device
    /// serving a QEMU guest on `--vhost-socket`; without, against the userspace guest driver.
    Device,
    /// The kernel's AF_VSOCK (only inside a guest the project's VM lab booted).
    Kernel,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Loopback => "loopback",
            Transport::Device => "device",
            Transport::Kernel => "kernel",
        }
    }
}

/// `--mode`, as vsock_test spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Connect the control channel and, in most tests, the vsock connections.
    Client,
    /// Listen for both.
    Server,
}

/// `zerovsock test` flags.
#[derive(Args, Debug)]
pub struct TestArgs {
    /// Where the sockets under test live.
    #[arg(long, value_enum, default_value = "loopback")]
    transport: Transport,
    /// This side of a pairing; absent: both halves in this process.
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// The control server's address (the client's; the server listens on it, default 0.0.0.0).
    #[arg(long)]
    control_host: Option<String>,
    /// The control channel's TCP port.
    #[arg(long)]
    control_port: Option<u16>,
    /// The other side's CID.
    #[arg(long)]
    peer_cid: Option<u32>,
    /// The vsock port the tests use (and the next one).
    #[arg(long, default_value_t = 1234)]
    peer_port: u32,
    /// Print the test list and exit.
    #[arg(long)]
    list: bool,
    /// Skip a test (repeatable).
    #[arg(long = "skip", value_name = "ID")]
    skip: Vec<usize>,
    /// Run only the picked tests (repeatable; the first --pick skips every other test).
    #[arg(long = "pick", value_name = "ID")]
    pick: Vec<usize>,
    /// Walk exactly the kernel 6.12 list (ids 0-25, its order), to pair with its C vsock_test.
    #[arg(long = "kernel-6.12")]
    kernel_6_12: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Check the results against this expectations file instead of the checked-in one.
    #[arg(long)]
    expect: Option<PathBuf>,
    /// With --transport device --mode: serve a vhost-user-vsock device on this socket.
    #[arg(long)]
    vhost_socket: Option<PathBuf>,
    /// With --transport device --mode: the guest's CID.
    #[arg(long, default_value_t = targets::DEVICE_GUEST_CID)]
    guest_cid: u32,
    /// How long a control server waits for its client (a guest may be booting).
    #[arg(long, default_value_t = 600)]
    control_wait: u64,
    /// A control client keeps connecting for up to this many seconds until the server speaks
    /// (for a host half started before its guest's server; vsock_test connects once).
    #[arg(long, default_value_t = 0)]
    control_retry: u64,
}

pub fn run(args: TestArgs) -> Result<()> {
    let select = selection(std::env::args(), &args);
    let count = runner::cases_for(args.kernel_6_12).len();
    // Flags are checked before anything runs, as vsock_test checks them.
    let skipped = list::skipped(count, &select).map_err(anyhow::Error::msg)?;
    if args.list {
        let tests = list::all().take(count);
        print!("{}", list::listing(tests));
        return Ok(());
    }
    let expectations = expectations(&args)?;
    let (title, results, completed) = match args.mode {
        None => in_process(&args, &skipped)?,
        Some(mode) => one_side(&args, mode, select)?,
    };
    // In a pairing an expectations file is checked only when one was given.
    let failures_only = args.mode.is_some() && args.expect.is_none();
    let unexpected = unexpected(&expectations, &results, failures_only);
    if args.json {
        let json = Json {
            target: &title,
            results: &results,
            completed: completed.is_ok(),
            completed_error: completed.as_ref().err(),
            unexpected: &unexpected,
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", report::table(&title, &results));
        if let Err(e) = &completed {
            println!("COMPLETED barrier: {e}");
        }
        for line in &unexpected {
            println!("unexpected: {line}");
        }
    }
    if !unexpected.is_empty() || completed.is_err() {
        bail!(
            "{} unexpected result(s) on {title}",
            unexpected.len() + usize::from(completed.is_err())
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct Json<'a> {
    target: &'a str,
    results: &'a [TestResult],
    /// Whether the final `COMPLETED` barrier was passed (always, in process).
    completed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    completed_error: Option<&'a String>,
    unexpected: &'a [String],
}

/// `--skip` and `--pick` in command-line order. Clap keeps each flag's values apart, so
/// their order is taken from the raw arguments `raw`.
fn selection(raw: impl IntoIterator<Item = String>, args: &TestArgs) -> Vec<Select> {
    let (mut skips, mut picks) = (args.skip.iter(), args.pick.iter());
    let mut select = Vec::new();
    let mut raw = raw.into_iter();
    while let Some(arg) = raw.next() {
        let is = |flag: &str| arg == flag || arg.starts_with(&format!("{flag}="));
        if is("--skip") {
            select.extend(skips.next().map(|&id| Select::Skip(id)));
        } else if is("--pick") {
            select.extend(picks.next().map(|&id| Select::Pick(id)));
        }
        if arg == "--skip" || arg == "--pick" {
            raw.next();
        }
    }
    // Anything the raw scan missed (an abbreviated flag) keeps clap's order.
    select.extend(skips.map(|&id| Select::Skip(id)));
    select.extend(picks.map(|&id| Select::Pick(id)));
    select
}

fn expectations(args: &TestArgs) -> Result<Expectations> {
    let text = match &args.expect {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => report::checked_in(args.transport.name()).unwrap_or_default().to_owned(),
    };
    Expectations::parse(&text).map_err(anyhow::Error::msg)
}

/// What is unexpected: with `failures_only`, only failures (a pairing whose other half may be
/// another stack, as the C tool judges it); else what `expectations` did not expect. Tests
/// left out by `--skip`/`--pick` are not judged.
fn unexpected(
    expectations: &Expectations,
    results: &[TestResult],
    failures_only: bool,
) -> Vec<String> {
    let picked: Vec<TestResult> = results
        .iter()
        .filter(|r| !matches!(&r.status, Status::Skip(why) if why == runner::DESELECTED))
        .cloned()
        .collect();
    if failures_only {
        picked
            .iter()
            .filter(|r| matches!(r.status, Status::Fail(_) | Status::NotRun))
            .map(|r| format!("{} {}: {}", r.id, r.name, r.status.word()))
            .collect()
    } else {
        expectations.unexpected(&picked)
    }
}

type Run = (String, Vec<TestResult>, Result<(), String>);

/// Both halves here: every selected test, each on a fresh control connection.
fn in_process(args: &TestArgs, skipped: &[bool]) -> Result<Run> {
    let ids: Vec<usize> = (0..skipped.len()).filter(|&id| !skipped[id]).collect();
    let pair = |client: &Endpoint, server: &Endpoint| {
        runner::run_pair(client, server, args.peer_port, &ids, args.kernel_6_12)
    };
    let (title, results) = match args.transport {
        Transport::Loopback => {
            let (client, server) = targets::loopback();
            ("loopback".to_owned(), pair(&client, &server))
        }
        Transport::Kernel => {
            let peer: Arc<dyn Peer> = Arc::new(KernelPeer::new()?);
            let end = Endpoint { peer, cid: Cid::LOCAL };
            ("kernel (vsock_loopback)".to_owned(), pair(&end, &end))
        }
        Transport::Device => {
            let target = DeviceTarget::start().context("starting the device and guest driver")?;
            let mut results = pair(&target.guest(), &target.host());
            let reverse = pair(&target.host(), &target.guest());
            // One row per test: the worse of the two directions.
            for (row, other) in results.iter_mut().zip(reverse) {
                merge(row, other);
            }
            (
                "device (guest client / host server, then host client / guest server)".to_owned(),
                results,
            )
        }
    };
    Ok((title, results, Ok(())))
}

/// Folds the other direction's result of the same test into `row`: a failure wins, then a
/// skip; notes are kept once.
fn merge(row: &mut TestResult, other: TestResult) {
    let rank = |s: &Status| match s {
        Status::Fail(_) | Status::NotRun => 2,
        Status::Skip(_) => 1,
        Status::Pass => 0,
    };
    if rank(&other.status) > rank(&row.status) {
        row.status = match other.status {
            Status::Fail(why) => Status::Fail(format!("host client / guest server: {why}")),
            status => status,
        };
    }
    for note in other.notes {
        if !row.notes.contains(&note) {
            row.notes.push(note);
        }
    }
    row.seconds += other.seconds;
}

/// One side of a pairing over the control channel.
fn one_side(args: &TestArgs, mode: ModeArg, select: Vec<Select>) -> Result<Run> {
    let port = args.control_port.context("--control-port is required with --mode")?;
    let peer_cid = match args.peer_cid {
        Some(cid) if cid != Cid::ANY.0 => Cid(cid),
        _ => bail!("--peer-cid is required with --mode"),
    };
    let (peer, title, _device): (Arc<dyn Peer>, String, Option<Arc<Device>>) =
        match args.transport {
            Transport::Kernel => (Arc::new(KernelPeer::new()?), "kernel".into(), None),
            Transport::Device => {
                let socket = args.vhost_socket.clone().context(
                    "--transport device --mode needs --vhost-socket for the guest's VMM",
                )?;
                let device = Arc::new(Device::new(DeviceConfig::new(args.guest_cid))?);
                let serving = device.clone();
                std::thread::Builder::new().name("device".into()).spawn(move || {
                    if let Err(e) = serving.serve(&socket) {
                        eprintln!("zerovsock test: the device stopped serving: {e}");
                    }
                })?;
                let peer = StackPeer::new(device.vsock().clone(), "device host");
                (Arc::new(peer), "device host".into(), Some(device))
            }
            Transport::Loopback => bail!(
                "--mode pairs with another process, which cannot reach this process's loopback: \
             use --transport kernel (in a lab guest) or device, or leave out --mode"
            ),
        };
    let mode = match mode {
        ModeArg::Client => Mode::Client,
        ModeArg::Server => Mode::Server,
    };
    let control = match mode {
        Mode::Client => {
            let host = args
                .control_host
                .as_deref()
                .context("--control-host is required with --mode client")?;
            if args.control_retry == 0 {
                Control::connect(host, port)?
            } else {
                Control::connect_retrying(host, port, Duration::from_secs(args.control_retry))?
            }
        }
        Mode::Server => {
            let host = args.control_host.as_deref().unwrap_or("0.0.0.0");
            let listener = ControlListener::bind(host, port)?;
            eprintln!("Control socket listening on {host}:{port}");
            listener.accept(Duration::from_secs(args.control_wait))?
        }
    };
    let side = Side {
        mode,
        peer_cid,
        peer_port: args.peer_port,
        select,
        kernel_6_12_only: args.kernel_6_12,
    };
    let report = runner::run_side(peer, control, &side).map_err(anyhow::Error::msg)?;
    Ok((
        format!("{title} ({})", if mode == Mode::Client { "client" } else { "server" }),
        report.results,
        report.completed,
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: TestArgs,
    }

    fn select(line: &str) -> Vec<Select> {
        let raw: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        let args = Command::try_parse_from(&raw).expect("parses").args;
        selection(raw, &args)
    }

    #[test]
    fn skip_and_pick_keep_their_command_line_order() {
        use Select::{Pick, Skip};
        assert_eq!(
            select("test --pick 3 --skip=3 --peer-port 7 --pick=4 --skip 0"),
            [Pick(3), Skip(3), Pick(4), Skip(0)]
        );
        assert_eq!(select("test --skip 2 --pick 2"), [Skip(2), Pick(2)]);
        assert_eq!(select("test --kernel-6.12"), []);
    }

    #[test]
    fn deselected_tests_are_not_judged_and_a_pairing_judges_failures_only() {
        let result =
            |id, status| TestResult { id, name: "t", status, notes: Vec::new(), seconds: 0.0 };
        let results = [
            result(0, Status::Skip(runner::DESELECTED.into())),
            result(1, Status::Skip("the peer skipped it".into())),
            result(2, Status::Fail("recv".into())),
        ];
        let expect = Expectations::parse("").expect("empty: every test must pass");
        assert_eq!(
            unexpected(&expect, &results, false),
            ["1 t: SKIP (expected PASS)", "2 t: FAIL (expected PASS)"]
        );
        assert_eq!(unexpected(&expect, &results, true), ["2 t: FAIL"]);
    }

    #[test]
    fn defaults_are_vsock_tests() {
        let args = Command::try_parse_from(["test"]).expect("parses").args;
        assert_eq!((args.transport, args.mode, args.peer_port), (Transport::Loopback, None, 1234));
        assert!(!args.kernel_6_12 && !args.list && !args.json);
        assert!(Command::try_parse_from(["test", "--mode", "both"]).is_err());
        assert!(Command::try_parse_from(["test", "--transport", "tcp"]).is_err());
    }
}
