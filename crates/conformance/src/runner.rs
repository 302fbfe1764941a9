//! Running the list: one side over the control channel (`run_tests` of the C tool, so the
//! other side may be the kernel's `vsock_test`), or both sides in this process, one test per
//! control connection, so that a failing test cannot leave the next one out of step.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cases::{self, Case, Ctx, Failure, Mode, Outcome};
use crate::control::{Barrier, Control, ControlListener, TIMEOUT};
use crate::list::{self, Select};
use crate::peer::{Cid, Peer};

/// How long one half may take in all before it is reported as hung. Each of its blocking
/// steps is bounded by [`TIMEOUT`] already; 100 connections under emulation take a while.
pub const HALF_LIMIT: Duration = Duration::from_secs(180);

/// The reason given for a test `--skip` or `--pick` left out.
pub const DESELECTED: &str = "skipped by --skip/--pick";

/// The reason a side gives for a test the other side skipped.
const PEER_SKIPPED: &str = "the peer skipped it";

/// How a test ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "detail", rename_all = "lowercase")]
pub enum Status {
    /// Both halves (or this side's) ran and every check held.
    Pass,
    /// Not run, with the reason: `--skip`/`--pick`, a feature a half needs, the peer's `SKIP`,
    /// or a check the family turned out not to support (EOPNOTSUPP).
    Skip(String),
    /// A step failed: which, and what it expected.
    Fail(String),
    /// Not reached: an earlier test failed, which ends a run as in the C tool.
    NotRun,
}

impl Status {
    /// The word the table prints.
    pub fn word(&self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Skip(_) => "SKIP",
            Status::Fail(_) => "FAIL",
            Status::NotRun => "NOT RUN",
        }
    }
}

/// One test's result.
#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    /// Its id in the list.
    pub id: usize,
    /// Its name.
    pub name: &'static str,
    /// How it ended.
    #[serde(flatten)]
    pub status: Status,
    /// Checks a half left out on its family, each with the reason.
    pub notes: Vec<String>,
    /// Time taken, barriers included.
    pub seconds: f64,
}

/// One side's settings, as `vsock_test`'s flags give them.
#[derive(Debug, Clone)]
pub struct Side {
    /// `--mode`.
    pub mode: Mode,
    /// `--peer-cid`.
    pub peer_cid: Cid,
    /// `--peer-port`.
    pub peer_port: u32,
    /// `--skip` and `--pick` in command-line order.
    pub select: Vec<Select>,
    /// Walk only the kernel 6.12 list (ids 0-25), to pair with the C tool.
    pub kernel_6_12_only: bool,
}

/// The tests a side walks.
pub fn cases_for(kernel_6_12_only: bool) -> Vec<Case> {
    let mut cases = cases::all();
    if kernel_6_12_only {
        cases.truncate(list::KERNEL_6_12.len());
    }
    cases
}

/// What one side saw.
#[derive(Debug)]
pub struct SideReport {
    /// Per test, in list order.
    pub results: Vec<TestResult>,
    /// The final `COMPLETED` barrier, when the run got that far.
    pub completed: Result<(), String>,
}

/// Runs this side's halves in list order over `control`: for each test the `NEXT`/`SKIP`
/// barrier, then this side's half (a half that needs a feature `peer` lacks is skipped),
/// then the final `COMPLETED` barrier. The first failure ends the run, as it ends the C
/// tool, and leaves the rest [`Status::NotRun`].
pub fn run_side(peer: Arc<dyn Peer>, control: Control, side: &Side) -> Result<SideReport, String> {
    let cases = cases_for(side.kernel_6_12_only);
    let skipped = list::skipped(cases.len(), &side.select)?;
    let mut control = Some(control);
    let mut results = Vec::with_capacity(cases.len());
    for (id, case) in cases.iter().enumerate() {
        let started = Instant::now();
        let result = |status, notes| TestResult {
            id,
            name: case.name,
            status,
            notes,
            seconds: started.elapsed().as_secs_f64(),
        };
        let Some(mut channel) = control.take() else {
            results.push(result(Status::NotRun, Vec::new()));
            continue;
        };
        let half = case.half(side.mode);
        let local = if skipped[id] {
            Some(DESELECTED.to_owned())
        } else {
            half.needs
                .iter()
                .find_map(|&f| peer.lacks(f))
                .map(|why| format!("{}: {why}", peer.name()))
        };
        match channel.barrier(local.is_some()) {
            Err(e) => {
                results.push(result(Status::Fail(format!("barrier: {e}")), Vec::new()));
                continue;
            }
            Ok(Barrier::Skip) => {
                let why = local.unwrap_or_else(|| PEER_SKIPPED.into());
                results.push(result(Status::Skip(why), Vec::new()));
                control = Some(channel);
                continue;
            }
            Ok(Barrier::Run) => {}
        }
        let Some(run) = half.run else {
            results.push(result(Status::Pass, Vec::new()));
            control = Some(channel);
            continue;
        };
        let (outcome, channel) = run_half(peer.clone(), channel, side, run);
        let (status, notes) = match outcome {
            Ok(verdict) => match verdict.skipped {
                Some(why) => (Status::Skip(why), verdict.notes),
                None => (Status::Pass, verdict.notes),
            },
            Err(failure) => (Status::Fail(failure.to_string()), Vec::new()),
        };
        let failed = matches!(status, Status::Fail(_));
        results.push(result(status, notes));
        if !failed {
            control = channel;
        }
    }
    let completed = match control {
        Some(mut channel) => channel.completed().map_err(|e| e.to_string()),
        None => Err("not reached: a test failed".into()),
    };
    Ok(SideReport { results, completed })
}

/// Runs one half on a thread of its own and waits at most [`HALF_LIMIT`]; a hung half is a
/// failure at the step it was in, and its control channel is lost with it.
fn run_half(
    peer: Arc<dyn Peer>,
    mut control: Control,
    side: &Side,
    run: fn(&mut Ctx<'_>) -> Outcome,
) -> (Outcome, Option<Control>) {
    let step = Arc::new(Mutex::new(String::from("start")));
    let (tx, rx) = std::sync::mpsc::channel();
    let (peer_cid, peer_port, at) = (side.peer_cid, side.peer_port, step.clone());
    let spawned = thread::Builder::new().name("conformance-half".into()).spawn(move || {
        let outcome = Ctx::new(&*peer, &mut control, peer_cid, peer_port, at).run(run);
        let _ = tx.send((outcome, control));
    });
    if let Err(e) = spawned {
        let failure = Failure { step: "start".into(), message: format!("spawning: {e}") };
        return (Err(failure), None);
    }
    match rx.recv_timeout(HALF_LIMIT) {
        Ok((outcome, control)) => (outcome, Some(control)),
        Err(_) => {
            let step = step.lock().map(|s| s.clone()).unwrap_or_default();
            let message = format!("timed out after {HALF_LIMIT:?}");
            (Err(Failure { step, message }), None)
        }
    }
}

/// One endpoint of an in-process pairing: its family and the CID the other side reaches it
/// at.
#[derive(Clone)]
pub struct Endpoint {
    /// The socket family.
    pub peer: Arc<dyn Peer>,
    /// This endpoint's CID as the other side addresses it.
    pub cid: Cid,
}

/// Runs `ids` with both halves in this process: for each test a fresh TCP control channel on
/// 127.0.0.1, the server half on `server`, the client half on `client`, and ports of its own
/// (`base_port + 2 * id`), so one test's failure or leftovers cannot disturb the next.
pub fn run_pair(
    client: &Endpoint,
    server: &Endpoint,
    base_port: u32,
    ids: &[usize],
    kernel_6_12_only: bool,
) -> Vec<TestResult> {
    ids.iter().map(|&id| pair_one(client, server, base_port, id, kernel_6_12_only)).collect()
}

fn pair_one(
    client: &Endpoint,
    server: &Endpoint,
    base_port: u32,
    id: usize,
    kernel_6_12_only: bool,
) -> TestResult {
    let started = Instant::now();
    let name = cases_for(kernel_6_12_only).get(id).map_or("?", |c| c.name);
    let side = |mode, peer_cid: Cid| Side {
        mode,
        peer_cid,
        peer_port: base_port + 2 * id as u32,
        select: vec![Select::Pick(id)],
        kernel_6_12_only,
    };
    let report = |status, notes| TestResult {
        id,
        name,
        status,
        notes,
        seconds: started.elapsed().as_secs_f64(),
    };
    let listener = match ControlListener::bind("127.0.0.1", 0) {
        Ok(listener) => listener,
        Err(e) => return report(Status::Fail(format!("control listen: {e}")), Vec::new()),
    };
    let port = listener.port();
    let (server_peer, server_side) = (server.peer.clone(), side(Mode::Server, client.cid));
    let server_thread = thread::spawn(move || {
        let control = listener.accept(TIMEOUT).map_err(|e| e.to_string())?;
        run_side(server_peer, control, &server_side)
    });
    let client_report =
        Control::connect("127.0.0.1", port).map_err(|e| e.to_string()).and_then(|control| {
            run_side(client.peer.clone(), control, &side(Mode::Client, server.cid))
        });
    let server_report = server_thread.join().unwrap_or_else(|_| Err("server half panicked".into()));
    let (status, notes) = combine(client_report, server_report, id);
    report(status, notes)
}

/// One status for a test from both sides' reports: a failure on either side (named), else
/// a skip, else a pass; notes from both, each with its side.
fn combine(
    client: Result<SideReport, String>,
    server: Result<SideReport, String>,
    id: usize,
) -> (Status, Vec<String>) {
    let mut notes = Vec::new();
    let mut failures = Vec::new();
    // A side that lost the channel after the other side's failure never reaches COMPLETED:
    // that counts only when neither half failed.
    let mut barriers = Vec::new();
    let mut skip = None;
    for (side, report) in [("client", client), ("server", server)] {
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                failures.push(format!("{side}: {e}"));
                continue;
            }
        };
        match report.results.into_iter().nth(id) {
            Some(result) => {
                notes.extend(result.notes.into_iter().map(|n| format!("{side}: {n}")));
                match result.status {
                    Status::Fail(why) => failures.push(format!("{side}: {why}")),
                    // The side that decided to skip knows why; the other only saw `SKIP`.
                    Status::Skip(why) if why == PEER_SKIPPED => skip = skip.or(Some(why)),
                    Status::Skip(why) => skip = Some(why),
                    Status::NotRun => failures.push(format!("{side}: not run")),
                    Status::Pass => {}
                }
            }
            None => failures.push(format!("{side}: no result")),
        }
        if let Err(e) = report.completed {
            barriers.push(format!("{side}: COMPLETED barrier: {e}"));
        }
    }
    if failures.is_empty() {
        failures = barriers;
    }
    if !failures.is_empty() {
        (Status::Fail(failures.join("; ")), notes)
    } else if let Some(why) = skip {
        (Status::Skip(why), notes)
    } else {
        (Status::Pass, notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(status: Status, completed: Result<(), String>) -> Result<SideReport, String> {
        let result = TestResult { id: 0, name: "t", status, notes: Vec::new(), seconds: 0.0 };
        Ok(SideReport { results: vec![result], completed })
    }

    #[test]
    fn a_failed_half_is_reported_alone_not_behind_the_other_sides_lost_barrier() {
        // The server's half failed and dropped the control channel; the client passed its
        // half and then lost the channel at the next barrier, so it never reached COMPLETED.
        let client = side(Status::Pass, Err("not reached: a test failed".into()));
        let server = side(
            Status::Fail("recv: MSG_TRUNC doesn't work".into()),
            Err("not reached: a test failed".into()),
        );
        let (status, _) = combine(client, server, 0);
        assert_eq!(status, Status::Fail("server: recv: MSG_TRUNC doesn't work".into()));
    }

    #[test]
    fn a_lost_final_barrier_fails_a_test_both_halves_passed() {
        let client = side(Status::Pass, Ok(()));
        let server = side(Status::Pass, Err("unexpected EOF on control socket".into()));
        let (status, _) = combine(client, server, 0);
        assert_eq!(
            status,
            Status::Fail("server: COMPLETED barrier: unexpected EOF on control socket".into())
        );
    }
}
