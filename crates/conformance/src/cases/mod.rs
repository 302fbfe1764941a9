//! The test cases, each written once over [`Peer`] and the control channel, so either half
//! runs against any socket family and pairs with the kernel's C `vsock_test` half of the same
//! test (same control lines in the same order, same ports, same data sizes).
//!
//! Ids 0-25 are `vsock_test.c` of Linux 6.12 in its order; later ids are tests mainline added
//! after 6.12 that apply to a userspace stack, and the io_uring cases of
//! `vsock_uring_test.c` (our own control lines where the kernel has no 6.12 version to pair
//! with).

mod later;
mod seqpacket;
mod stream;
mod zerocopy;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::control::{Control, ControlError, TIMEOUT};
use crate::list;
use crate::peer::{Addr, Cid, Conn, Feature, Peer, Port, RecvFlags, SockType};

/// One half of a test: what it runs, and what it needs of its socket family.
#[derive(Clone, Copy)]
pub struct Half {
    /// The half's code; `None`: this side does nothing (as a missing `run_client`).
    pub run: Option<fn(&mut Ctx<'_>) -> Outcome>,
    /// Features the half cannot run without.
    pub needs: &'static [Feature],
}

impl Half {
    const NONE: Half = Half { run: None, needs: &[] };

    const fn run(run: fn(&mut Ctx<'_>) -> Outcome) -> Half {
        Half { run: Some(run), needs: &[] }
    }

    const fn needing(run: fn(&mut Ctx<'_>) -> Outcome, needs: &'static [Feature]) -> Half {
        Half { run: Some(run), needs }
    }
}

/// One test: its name in the list and its two halves.
#[derive(Clone, Copy)]
pub struct Case {
    /// The name `--list` prints.
    pub name: &'static str,
    /// The half run with `--mode client`.
    pub client: Half,
    /// The half run with `--mode server`.
    pub server: Half,
}

/// Which side a process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Connects the control channel and, in most tests, the vsock connections.
    Client,
    /// Listens for both.
    Server,
}

impl Case {
    /// This side's half.
    pub fn half(&self, mode: Mode) -> Half {
        match mode {
            Mode::Client => self.client,
            Mode::Server => self.server,
        }
    }
}

/// A failed step: where, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The step that failed (`connect`, `recv`, `control read`...).
    pub step: String,
    /// What was expected and what came.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.message)
    }
}

/// What a half ended with; `Ok` carries notes (a check this family cannot make, a runtime
/// skip).
pub type Outcome = Result<Verdict, Failure>;

/// How a half that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// The half found at run time that the family cannot do what the test checks (as the C
    /// tool's EOPNOTSUPP from SIOCOUTQ); the reason.
    pub skipped: Option<String>,
    /// Checks left out on this family, each with its reason.
    pub notes: Vec<String>,
}

/// What a running half works with.
pub struct Ctx<'a> {
    /// The socket family under test.
    pub peer: &'a dyn Peer,
    /// The control channel to the other half.
    pub control: &'a mut Control,
    /// The other side's CID (`--peer-cid`).
    pub peer_cid: Cid,
    /// The test port (`--peer-port`); some tests use the next one too.
    pub peer_port: u32,
    step: Arc<Mutex<String>>,
    verdict: Verdict,
}

impl<'a> Ctx<'a> {
    /// A context; `step` is where the half reports the step it is in (read by a watchdog).
    pub fn new(
        peer: &'a dyn Peer,
        control: &'a mut Control,
        peer_cid: Cid,
        peer_port: u32,
        step: Arc<Mutex<String>>,
    ) -> Ctx<'a> {
        Ctx { peer, control, peer_cid, peer_port, step, verdict: Verdict::default() }
    }

    /// Runs `half` to its end: its verdict with the notes and skip it recorded on the way.
    pub fn run(mut self, half: fn(&mut Ctx<'_>) -> Outcome) -> Outcome {
        let mut verdict = half(&mut self)?;
        verdict.notes.append(&mut self.verdict.notes);
        verdict.skipped = verdict.skipped.or(self.verdict.skipped);
        Ok(verdict)
    }

    /// Names the step being taken, for a failure or a timeout.
    fn step(&self, step: &str) {
        if let Ok(mut current) = self.step.lock() {
            step.clone_into(&mut current);
        }
    }

    fn current(&self) -> String {
        self.step.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A failure at the current step.
    fn fail(&self, message: impl Into<String>) -> Failure {
        Failure { step: self.current(), message: message.into() }
    }

    /// A failure unless `ok`.
    fn check(&self, ok: bool, message: impl FnOnce() -> String) -> Result<(), Failure> {
        if ok {
            Ok(())
        } else {
            Err(self.fail(message()))
        }
    }

    /// Records a check this family cannot make.
    fn note(&mut self, note: impl Into<String>) {
        self.verdict.notes.push(note.into());
    }

    /// Records that the test could not be made on this family after all.
    fn skip(&mut self, reason: impl Into<String>) {
        self.verdict.skipped = Some(reason.into());
    }

    /// The `io::Result` of the current step as an outcome.
    fn io<T>(&self, result: io::Result<T>) -> Result<T, Failure> {
        result.map_err(|e| self.fail(describe(&e)))
    }

    /// `control_writeln`.
    fn writeln(&mut self, line: &str) -> Result<(), Failure> {
        self.step(&format!("control write {line}"));
        self.control.writeln(line).map_err(control_failure)
    }

    /// `control_expectln`.
    fn expectln(&mut self, line: &str) -> Result<(), Failure> {
        self.step(&format!("control expect {line}"));
        self.control.expectln(line).map_err(control_failure)
    }

    /// `control_writeulong`.
    fn write_ulong(&mut self, value: u64) -> Result<(), Failure> {
        self.step("control write number");
        self.control.write_ulong(value).map_err(control_failure)
    }

    /// `control_readulong`.
    fn read_ulong(&mut self) -> Result<u64, Failure> {
        self.step("control read number");
        self.control.read_ulong().map_err(control_failure)
    }

    fn peer_addr(&self) -> Addr {
        Addr::new(self.peer_cid, Port(self.peer_port))
    }

    /// `vsock_connect`: waits for the server's `LISTENING`, then connects to
    /// `peer_cid:peer_port`; the connection's blocking steps are bounded by [`TIMEOUT`].
    fn connect(&mut self, ty: SockType) -> Result<Box<dyn Conn>, Failure> {
        self.expectln("LISTENING")?;
        self.step("connect");
        let conn = self.io(self.peer.connect(ty, self.peer_addr(), None))?;
        self.bound(conn)
    }

    /// `vsock_bind_connect`: binds to `bind_port`, then connects.
    fn bind_connect(&mut self, ty: SockType, bind_port: u32) -> Result<Box<dyn Conn>, Failure> {
        self.step("bind and connect");
        let conn = self.io(self.peer.connect(ty, self.peer_addr(), Some(Port(bind_port))))?;
        self.bound(conn)
    }

    /// `vsock_accept`: listens on `ANY:peer_port` (backlog 1), says `LISTENING`, accepts one
    /// connection and closes the listener.
    fn accept(&mut self, ty: SockType) -> Result<Box<dyn Conn>, Failure> {
        self.step("listen");
        let listener = self.io(self.peer.listen(ty, self.any_port(), 1))?;
        self.writeln("LISTENING")?;
        self.step("accept");
        let (conn, _) = self.io(listener.accept(TIMEOUT))?;
        self.bound(conn)
    }

    fn any_port(&self) -> Addr {
        Addr::new(Cid::ANY, Port(self.peer_port))
    }

    /// Bounds a connection's blocking reads and writes by [`TIMEOUT`], as the C tool's alarm
    /// bounds each step.
    fn bound(&self, conn: Box<dyn Conn>) -> Result<Box<dyn Conn>, Failure> {
        self.io(conn.set_read_timeout(Some(TIMEOUT)))?;
        self.io(conn.set_write_timeout(Some(TIMEOUT)))?;
        Ok(conn)
    }

    /// `setsockopt_int_check(SO_RCVLOWAT)`: sets it and reads it back.
    fn set_rcvlowat(&self, conn: &dyn Conn, bytes: u32) -> Result<(), Failure> {
        self.step("setsockopt(SO_RCVLOWAT)");
        self.io(conn.set_rcvlowat(bytes))?;
        let got = self.io(conn.rcvlowat())?;
        self.check(got == bytes, || format!("value mismatch: set {bytes} got {got}"))
    }

    /// `setsockopt_ull_check(SO_VM_SOCKETS_BUFFER_SIZE)`: sets it and reads it back.
    fn set_buffer_size(&self, conn: &dyn Conn, bytes: u64) -> Result<(), Failure> {
        self.step("setsockopt(SO_VM_SOCKETS_BUFFER_SIZE)");
        self.io(conn.set_buffer_size(bytes))?;
        let got = self.io(conn.buffer_size())?;
        self.check(got == bytes, || format!("value mismatch: set {bytes} got {got}"))
    }

    /// `setsockopt_ull_check(SO_VM_SOCKETS_BUFFER_MAX_SIZE)`: sets it and reads it back.
    fn set_buffer_max_size(&self, conn: &dyn Conn, bytes: u64) -> Result<(), Failure> {
        self.step("setsockopt(SO_VM_SOCKETS_BUFFER_MAX_SIZE)");
        self.io(conn.set_buffer_max_size(bytes))?;
        let got = self.io(conn.buffer_max_size())?;
        self.check(got == bytes, || format!("value mismatch: set {bytes} got {got}"))
    }

    /// `send_buf`: sends all of `buf` (several calls for STREAM) and checks the result:
    /// `Ok(n)` bytes, or the errno.
    fn send_buf(
        &self,
        conn: &dyn Conn,
        buf: &[u8],
        eor: bool,
        expected: Expect,
    ) -> Result<(), Failure> {
        self.step("send");
        let mut written = 0;
        let result = loop {
            match conn.send(&buf[written..], eor) {
                Ok(0) => break Ok(0),
                Ok(n) => {
                    written += n;
                    if written >= buf.len() {
                        break Ok(n);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.expect("send", result.map(|_| written), expected)
    }

    /// `recv_buf`: receives until `buf` is full (several calls for STREAM), end of stream or
    /// an error, and checks the result.
    fn recv_buf(
        &self,
        conn: &dyn Conn,
        buf: &mut [u8],
        flags: RecvFlags,
        expected: Expect,
    ) -> Result<(), Failure> {
        self.step(if flags.peek { "recv (MSG_PEEK)" } else { "recv" });
        let mut read = 0;
        let result = loop {
            match conn.recv(&mut buf[read..], flags) {
                Ok(meta) if meta.len == 0 => break Ok(0),
                Ok(meta) => {
                    read += meta.len;
                    if read >= buf.len() {
                        break Ok(meta.len);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.expect("recv", result.map(|_| read), expected)
    }

    fn expect(&self, op: &str, got: io::Result<usize>, expected: Expect) -> Result<(), Failure> {
        match (got, expected) {
            (Ok(n), Expect::Bytes(want)) if n == want => Ok(()),
            (Ok(n), Expect::Bytes(want)) => {
                Err(self.fail(format!("bogus {op}(2) bytes {n} (expected {want})")))
            }
            (Err(e), Expect::Errno(errno)) if e.raw_os_error() == Some(errno) => Ok(()),
            (Err(e), Expect::Errno(errno)) => Err(self.fail(format!(
                "{op}(2) failed with {} (expected {})",
                describe(&e),
                name(errno)
            ))),
            (Ok(n), Expect::Errno(errno)) => {
                Err(self.fail(format!("bogus {op}(2) return value {n} (expected {})", name(errno))))
            }
            (Err(e), Expect::Bytes(want)) => {
                Err(self
                    .fail(format!("{op}(2) failed with {} (expected {want} bytes)", describe(&e))))
            }
        }
    }

    /// `send_byte`: one `'A'`.
    fn send_byte(&self, conn: &dyn Conn, expected: Expect) -> Result<(), Failure> {
        self.send_buf(conn, b"A", false, expected)
    }

    /// `recv_byte`: one byte, which must be `'A'` when one comes.
    fn recv_byte(&self, conn: &dyn Conn, expected: Expect) -> Result<(), Failure> {
        let mut byte = [0u8; 1];
        self.recv_buf(conn, &mut byte, RecvFlags::NONE, expected)?;
        self.check(expected != Expect::Bytes(1) || byte[0] == b'A', || {
            format!("unexpected byte read {:?}", char::from(byte[0]))
        })
    }

    /// `vsock_wait_remote_close`.
    fn wait_remote_close(&self, conn: &dyn Conn) -> Result<(), Failure> {
        self.step("wait for the remote close (EPOLLRDHUP | EPOLLHUP)");
        let closed = self.io(conn.wait_remote_close(TIMEOUT))?;
        self.check(closed, || "epoll_wait timed out".into())
    }
}

/// What a send or receive must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// This many bytes (0: end of stream).
    Bytes(usize),
    /// Failure with this errno.
    Errno(i32),
}

/// Linux errno values the tests expect.
pub mod errno {
    /// EPIPE.
    pub const EPIPE: i32 = 32;
    /// EAGAIN.
    pub const EAGAIN: i32 = 11;
    /// ENOMEM.
    pub const ENOMEM: i32 = 12;
    /// EFAULT.
    pub const EFAULT: i32 = 14;
    /// EMSGSIZE.
    pub const EMSGSIZE: i32 = 90;
    /// EOPNOTSUPP.
    pub const EOPNOTSUPP: i32 = 95;
    /// ECONNRESET.
    pub const ECONNRESET: i32 = 104;
    /// ENOTTY.
    pub const ENOTTY: i32 = 25;
}

fn name(errno: i32) -> String {
    let known = [
        (errno::EPIPE, "EPIPE"),
        (errno::EAGAIN, "EAGAIN"),
        (errno::ENOMEM, "ENOMEM"),
        (errno::EFAULT, "EFAULT"),
        (errno::EMSGSIZE, "EMSGSIZE"),
        (errno::EOPNOTSUPP, "EOPNOTSUPP"),
        (errno::ECONNRESET, "ECONNRESET"),
        (errno::ENOTTY, "ENOTTY"),
    ];
    match known.iter().find(|(n, _)| *n == errno) {
        Some((_, name)) => (*name).to_owned(),
        None => format!("errno {errno}"),
    }
}

/// An error with its errno's name when it has one.
fn describe(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(errno) => format!("{} ({error})", name(errno)),
        None => error.to_string(),
    }
}

fn control_failure(error: ControlError) -> Failure {
    let step = match &error {
        ControlError::TimedOut { step }
        | ControlError::Eof { step }
        | ControlError::Io { step, .. } => step.clone(),
        ControlError::Unexpected { .. } | ControlError::NotANumber { .. } => "control read".into(),
    };
    Failure { step, message: error.to_string() }
}

/// `hash_djb2` of the kernel tool (`unsigned long` arithmetic on a 64-bit machine).
pub use zerovsock_testkit::suite::djb2;

/// Pseudo-random bytes for a test's payload; each call moves `seed` on. The seed varies per
/// run as the C tool's `srand(time(NULL))` does; only the hash crosses the control channel.
pub fn random_bytes(len: usize, seed: &mut u64) -> Vec<u8> {
    *seed = seed.wrapping_add(1);
    zerovsock_testkit::suite::pattern(len, *seed)
}

/// A seed that differs between runs.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x2545_f491_4f6c_dd1d);
    nanos | 1
}

/// How long the poll waits of the zerocopy cases and others give a completion or event.
const SHORT: Duration = Duration::from_millis(100);

/// Every test, in list order: the kernel 6.12 list (ids 0-25), then the later ones.
pub fn all() -> Vec<Case> {
    let kernel = [
        stream::CONNECTION_RESET,
        stream::BIND_ONLY,
        stream::CLIENT_CLOSE,
        stream::SERVER_CLOSE,
        stream::MULTIPLE_CONNECTIONS,
        stream::MSG_PEEK,
        seqpacket::MSG_BOUNDS,
        seqpacket::MSG_TRUNC,
        seqpacket::TIMEOUT,
        seqpacket::INVALID_RECEIVE_BUFFER,
        stream::POLL_RCVLOWAT,
        seqpacket::BIG_MESSAGE,
        stream::INVALID_BUFFER,
        seqpacket::INVALID_BUFFER,
        stream::SKB_MERGE,
        seqpacket::MSG_PEEK,
        stream::SHUT_WR,
        stream::SHUT_RD,
        zerocopy::STREAM,
        zerocopy::SEQPACKET,
        zerocopy::EMPTY_ERRQUEUE,
        stream::DOUBLE_BIND_CONNECT,
        stream::CREDIT_UPDATE_SET_RCVLOWAT,
        stream::CREDIT_UPDATE_LOW_RX_BYTES,
        stream::UNSENT_BYTES,
        seqpacket::UNSENT_BYTES,
    ];
    let cases: Vec<Case> = kernel.into_iter().chain(later::CASES).collect();
    debug_assert!(cases.iter().map(|c| c.name).eq(list::all().map(|t| t.name)));
    cases
}
