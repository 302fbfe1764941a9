//! Hybrid Unix-socket endpoints (the protocol of Firecracker and vhost-device-vsock), on a
//! thread of their own so that no connect ever runs on the vring worker.
//!
//! * Host to guest: a host program connects to `uds_path` and writes `CONNECT <port>\n`; once
//!   the guest accepts, it reads `OK <host port>\n` and the stream is the connection.
//! * Guest to host: a guest connect to host port P reaches `<uds_path>_P`. The engine holds the
//!   guest's REQUEST unanswered (an unclaimed-port listener) until the Unix connect is made: on
//!   success the guest gets RESPONSE, otherwise RST, so its `connect()` fails with ECONNRESET at
//!   once, as against a Linux host with no listener.
//!
//! Data moves without a userspace copy either way. Towards the host, what the guest sent is
//! `writev`n from guest memory into the Unix socket and consumed only as far as the socket took
//! it. Towards the guest, the vring worker `readv`s the Unix socket straight into the guest's
//! RX buffers ([`crate::direct`]), never more than the guest's credit, so a slow guest pushes
//! back on the host socket and nothing is buffered in between.
//!
//! The thread is a small executor: every connection is a task woken by epoll (its Unix socket,
//! edge-triggered) or by the socket layer's wakers (through an eventfd), and a task does a
//! bounded amount of work per turn, so one busy connection cannot starve the others.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use zerovsock::wire::{Addr, Cid, Port};
use zerovsock::{Vsock, VsockListener, VsockStream};

use crate::direct::HostReader;
use crate::sys;
use crate::worker::Outbound;

const LISTENER: u64 = 0;
const WAKE: u64 = 1;
const FIRST_TASK: u64 = 16;
/// The send buffer of the device's end of each Unix socket (the kernel doubles it for its
/// bookkeeping): four times a guest's usual credit window (256 KiB), so `writev` rarely
/// finds the socket full and a guest writer rarely waits for credit on a slow reader. The
/// default (`net.core.wmem_default`, 208 KiB) cost a quarter of guest-to-host throughput at
/// 64 KiB writes in the device bench.
const SEND_BUFFER: usize = 1 << 20;
/// Most bytes lent to one `writev` towards the host.
const WRITE_SIZE: usize = 1 << 20;
/// Rounds of work per turn before a task yields to the others.
const TURN: usize = 16;
/// A `CONNECT <port>\n` line longer than this is refused.
const MAX_LINE: usize = 64;
/// Guest connections waiting for their Unix connect.
const BACKLOG: u32 = 128;

/// The running bridge; dropping it stops the thread.
pub(crate) struct Bridge {
    stop: Arc<AtomicBool>,
    ready: Arc<Ready>,
    executor: Arc<Mutex<Executor>>,
    thread: Option<JoinHandle<()>>,
}

impl Bridge {
    pub(crate) fn start(
        vsock: &Vsock,
        outbound: &Arc<Outbound>,
        guest_cid: Cid,
        uds_path: &Path,
    ) -> io::Result<Bridge> {
        // Like vhost-device-vsock: a stale socket file from an earlier run is replaced.
        match std::fs::remove_file(uds_path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        let guest = VsockListener::bind_unclaimed(vsock, BACKLOG)?;
        let ready = Arc::new(Ready {
            list: Mutex::new(Vec::new()),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let epoll = Arc::new(Epoll::new()?);
        let mut exec = Executor {
            vsock: vsock.clone(),
            outbound: outbound.clone(),
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            epoll: epoll.clone(),
            listener,
            tasks: HashMap::new(),
            next: FIRST_TASK,
            ready: ready.clone(),
            due: HashSet::new(),
        };
        exec.watch(exec.listener.as_raw_fd(), LISTENER)?;
        exec.watch(ready.kick.as_raw_fd(), WAKE)?;
        let accept = exec.spawn(|_| Task::Accept(guest), None)?;
        exec.due.insert(accept);
        let executor = Arc::new(Mutex::new(exec));
        let (flag, shared) = (stop.clone(), executor.clone());
        let thread = std::thread::Builder::new()
            .name("zerovsock-bridge".into())
            .spawn(move || run(&shared, &epoll, &flag))?;
        Ok(Bridge { stop, ready, executor, thread: Some(thread) })
    }

    /// The guest went away: every connection to it ends now, its Unix socket closed (as
    /// `vhost_vsock_reset_orphans` resets the host's sockets), whatever it was waiting for.
    /// Host programs still sending their `CONNECT` line stay, for the next guest.
    pub(crate) fn reset(&self) {
        let mut exec = self.executor.lock().unwrap_or_else(PoisonError::into_inner);
        exec.tasks.retain(|_, (task, _)| matches!(task, Task::Accept(_) | Task::Handshake { .. }));
    }

    /// Runs the tasks woken so far on the calling thread, if the bridge thread is not running
    /// them already. The vring worker calls this right after handing the guest's packets to
    /// the engine ([`helping`]), so data the guest sent reaches its Unix socket without a hop
    /// to another thread; every call here is non-blocking.
    pub(crate) fn help(&self) {
        match self.executor.try_lock() {
            Ok(mut exec) => {
                exec.take_woken();
                exec.run_due();
            }
            // The bridge thread is at it; make sure it looks at what was woken.
            Err(_) => {
                let _ = self.ready.kick.write(1);
            }
        }
    }
}

thread_local! {
    /// Set while a thread is about to run woken tasks itself ([`Bridge::help`]): wakers then
    /// skip the eventfd that would wake the bridge thread for nothing.
    static HELPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside [`helping`]: it will look at what it wakes before it sleeps.
pub(crate) fn is_helping() -> bool {
    HELPING.with(std::cell::Cell::get)
}

/// Runs `work` (which may wake bridge tasks) and then the woken tasks, on this thread.
pub(crate) fn helping<R>(bridge: Option<&Bridge>, work: impl FnOnce() -> R) -> R {
    let Some(bridge) = bridge else { return work() };
    let before = HELPING.with(|h| h.replace(true));
    let result = work();
    bridge.help();
    HELPING.with(|h| h.set(before));
    result
}

/// The bridge thread: runs due tasks, then waits for events without holding the executor.
fn run(executor: &Mutex<Executor>, epoll: &Epoll, stop: &AtomicBool) {
    let mut events = vec![EpollEvent::default(); 64];
    while !stop.load(Ordering::Acquire) {
        let timeout = {
            let mut exec = executor.lock().unwrap_or_else(PoisonError::into_inner);
            exec.take_woken();
            exec.run_due();
            // With work still due, only look for new events without waiting, so a busy
            // connection cannot hide new connections or other tasks' wake-ups.
            if exec.due.is_empty() {
                1000
            } else {
                0
            }
        };
        let count = match epoll.wait(timeout, &mut events) {
            Ok(count) => count,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut exec = executor.lock().unwrap_or_else(PoisonError::into_inner);
        for event in &events[..count] {
            match event.data() {
                LISTENER => exec.accept_host(),
                WAKE => {
                    let _ = exec.ready.kick.read();
                }
                id => exec.on_event(id, event.event_set()),
            }
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.ready.kick.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Tasks woken by the socket layer.
struct Ready {
    list: Mutex<Vec<u64>>,
    kick: EventFd,
}

struct TaskWaker {
    id: u64,
    ready: Arc<Ready>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.list.lock().unwrap_or_else(PoisonError::into_inner).push(self.id);
        if !HELPING.with(std::cell::Cell::get) {
            let _ = self.ready.kick.write(1);
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<VsockStream>> + Send>>;

enum Task {
    /// Guest connections to host ports, waiting to be accepted.
    Accept(VsockListener),
    /// A host program that connected to `uds_path`, before its `CONNECT` line is complete.
    Handshake { unix: UnixStream, line: Vec<u8> },
    /// Waiting for the guest to answer the connect.
    Connecting { unix: UnixStream, connect: Connecting },
    /// An established connection.
    Pipe(Pipe),
}

struct Pipe {
    /// The Unix socket and the guest connection, shared with the vring worker, which reads
    /// the socket into the guest's RX buffers.
    reader: Arc<HostReader>,
    /// Bytes owed to the host program before any data (the `OK` line).
    prefix: Vec<u8>,
    /// The last write to the host socket would have blocked: its writability matters.
    write_blocked: bool,
    host_eof: bool,
    guest_eof: bool,
}

enum Turn {
    Pending,
    Again,
    Done,
}

struct Executor {
    vsock: Vsock,
    outbound: Arc<Outbound>,
    guest_cid: Cid,
    uds_path: PathBuf,
    epoll: Arc<Epoll>,
    listener: UnixListener,
    tasks: HashMap<u64, (Task, Waker)>,
    next: u64,
    ready: Arc<Ready>,
    /// Tasks to run next.
    due: HashSet<u64>,
}

impl Executor {
    fn watch(&self, fd: i32, token: u64) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Adds the task `make` builds with its waker, watching `fd` for it.
    fn spawn(&mut self, make: impl FnOnce(&Waker) -> Task, fd: Option<i32>) -> io::Result<u64> {
        let id = self.next;
        self.next += 1;
        if let Some(fd) = fd {
            self.watch(fd, id)?;
        }
        let waker = Waker::from(Arc::new(TaskWaker { id, ready: self.ready.clone() }));
        self.tasks.insert(id, (make(&waker), waker));
        Ok(id)
    }

    /// An epoll event for task `id`'s socket. A pipe's readable socket is the vring worker's
    /// to read; the pipe itself runs only when its socket's writability is what it waits for.
    fn on_event(&mut self, id: u64, events: EventSet) {
        let failed = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if let Some((Task::Pipe(pipe), _)) = self.tasks.get(&id) {
            if failed || events.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
                pipe.reader.request();
            }
            if !(failed || (pipe.write_blocked && events.contains(EventSet::OUT))) {
                return;
            }
        }
        self.due.insert(id);
    }

    /// Moves the tasks woken by the socket layer to the due set.
    fn take_woken(&mut self) {
        let woken =
            std::mem::take(&mut *self.ready.list.lock().unwrap_or_else(PoisonError::into_inner));
        self.due.extend(woken);
    }

    /// Runs every due task once, and those they wake, for a bounded number of rounds.
    fn run_due(&mut self) {
        for _ in 0..4 {
            if self.due.is_empty() {
                return;
            }
            let mut due = std::mem::take(&mut self.due);
            for id in due.drain() {
                self.turn(id);
            }
            self.take_woken();
        }
    }

    fn accept_host(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((unix, _)) => {
                    if unix.set_nonblocking(true).is_err() {
                        continue;
                    }
                    room_towards_host(&socket2::SockRef::from(&unix));
                    let fd = unix.as_raw_fd();
                    let handshake = |_: &Waker| Task::Handshake { unix, line: Vec::new() };
                    if let Ok(id) = self.spawn(handshake, Some(fd)) {
                        self.due.insert(id);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn turn(&mut self, id: u64) {
        let Some((task, waker)) = self.tasks.remove(&id) else { return };
        let mut cx = Context::from_waker(&waker);
        let mut spawned = Vec::new();
        let (task, outcome) = match task {
            Task::Accept(listener) => {
                let outcome = self.accept_guest(&listener, &mut cx, &mut spawned);
                (Some(Task::Accept(listener)), outcome)
            }
            Task::Handshake { mut unix, mut line } => match handshake(&mut unix, &mut line) {
                Ok(Some(port)) => {
                    let vsock = self.vsock.clone();
                    let addr = Addr::new(self.guest_cid, Port(port));
                    let connect: Connecting =
                        Box::pin(async move { VsockStream::connect_async(&vsock, addr).await });
                    (Some(Task::Connecting { unix, connect }), Turn::Again)
                }
                Ok(None) => (Some(Task::Handshake { unix, line }), Turn::Pending),
                Err(_) => (None, Turn::Done),
            },
            Task::Connecting { unix, mut connect } => match connect.as_mut().poll(&mut cx) {
                Poll::Pending => (Some(Task::Connecting { unix, connect }), Turn::Pending),
                Poll::Ready(Err(_)) => (None, Turn::Done),
                Poll::Ready(Ok(stream)) => match connection(&stream) {
                    Some(conn) => {
                        // The host-side port, as Firecracker and cloud-hypervisor answer.
                        let ok = format!("OK {}\n", conn.0.port.0).into_bytes();
                        let pipe = Pipe::new(unix, stream, conn, ok, &self.outbound, &waker);
                        (Some(Task::Pipe(pipe)), Turn::Again)
                    }
                    None => (None, Turn::Done),
                },
            },
            Task::Pipe(mut pipe) => {
                let outcome = pipe.turn(&mut cx);
                (Some(Task::Pipe(pipe)), outcome)
            }
        };
        for (unix, stream, conn) in spawned {
            let fd = unix.as_raw_fd();
            let outbound = self.outbound.clone();
            let pipe = |waker: &Waker| {
                Task::Pipe(Pipe::new(unix, stream, conn, Vec::new(), &outbound, waker))
            };
            if let Ok(id) = self.spawn(pipe, Some(fd)) {
                self.due.insert(id);
            }
        }
        let Some(task) = task else { return };
        match outcome {
            Turn::Done => {}
            Turn::Pending => {
                self.tasks.insert(id, (task, waker));
            }
            Turn::Again => {
                self.tasks.insert(id, (task, waker));
                self.due.insert(id);
            }
        }
    }

    /// Guest connects: reach `<uds_path>_<port>` now (a Unix connect does not wait), then
    /// answer the guest.
    fn accept_guest(
        &self,
        listener: &VsockListener,
        cx: &mut Context<'_>,
        spawned: &mut Vec<(UnixStream, VsockStream, (Addr, Addr))>,
    ) -> Turn {
        for _ in 0..TURN {
            let stream = match listener.poll_accept(cx) {
                Poll::Pending => return Turn::Pending,
                Poll::Ready(Ok((stream, _))) => stream,
                Poll::Ready(Err(_)) => return Turn::Pending,
            };
            let Some(conn) = connection(&stream) else { continue };
            let path = format!("{}_{}", self.uds_path.display(), conn.0.port.0);
            match connect_unix(Path::new(&path)) {
                Ok(unix) if stream.confirm().is_ok() => spawned.push((unix, stream, conn)),
                // Dropping the unanswered stream refuses it with RST.
                _ => drop(stream),
            }
        }
        Turn::Again
    }
}

/// A connection's (host, guest) addresses, as its packets carry them.
fn connection(stream: &VsockStream) -> Option<(Addr, Addr)> {
    Some((stream.local_addr().ok()?, stream.peer_addr().ok()?))
}

/// Gives the device's end of a Unix socket a send buffer of [`SEND_BUFFER`], so a guest's
/// data leaves guest memory (and its credit goes back) while the host program is still
/// reading the last batch. Capped by `net.core.wmem_max`; the default stays if it refuses.
fn room_towards_host(socket: &socket2::Socket) {
    let _ = socket.set_send_buffer_size(SEND_BUFFER);
}

/// A non-blocking Unix connect: it succeeds or fails at once (a full backlog is a refusal).
fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    room_towards_host(&socket);
    socket.connect(&socket2::SockAddr::unix(path)?)?;
    Ok(UnixStream::from(OwnedFd::from(socket)))
}

/// Reads the `CONNECT <port>\n` line; `Ok(None)` until it is complete. The keyword is matched
/// case-insensitively and words are split on whitespace, as vhost-device-vsock does.
fn handshake(unix: &mut UnixStream, line: &mut Vec<u8>) -> io::Result<Option<u32>> {
    let mut byte = [0u8; 1];
    loop {
        // A byte at a time, to read no further than the newline: what follows is data.
        let n = match unix.read(&mut byte) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        line.extend_from_slice(&byte[..n]);
        if line.last() == Some(&b'\n') {
            return parse_connect(line).map(Some).ok_or_else(|| ErrorKind::InvalidData.into());
        }
        if line.len() >= MAX_LINE {
            return Err(ErrorKind::InvalidData.into());
        }
    }
}

/// `CONNECT <port>` (any case, any whitespace) to the port.
pub(crate) fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    let keyword = words.next()?;
    let port = words.next()?.parse().ok()?;
    (keyword.eq_ignore_ascii_case("connect") && words.next().is_none()).then_some(port)
}

impl Pipe {
    fn new(
        unix: UnixStream,
        stream: VsockStream,
        conn: (Addr, Addr),
        prefix: Vec<u8>,
        outbound: &Arc<Outbound>,
        waker: &Waker,
    ) -> Pipe {
        let reader = HostReader::new(unix, stream, conn, outbound, waker.clone());
        // Whatever the host program sent already (after its CONNECT line) gets no new event.
        reader.request();
        Pipe { reader, prefix, write_blocked: false, host_eof: false, guest_eof: false }
    }

    /// Moves data towards the host until it would block, or for one turn, and takes note of
    /// what the vring worker found on the host socket.
    fn turn(&mut self, cx: &mut Context<'_>) -> Turn {
        for _ in 0..TURN {
            match self.step(cx) {
                Ok(true) => {}
                Ok(false) => return Turn::Pending,
                Err(_) => return Turn::Done,
            }
            if self.host_eof && self.guest_eof {
                return Turn::Done;
            }
        }
        Turn::Again
    }

    /// One round; whether anything moved.
    fn step(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut moved = false;
        let (unix, stream) = (&self.reader.unix, &self.reader.stream);
        self.write_blocked = false;
        // Towards the host: the line owed first, then what the guest sent.
        if !self.prefix.is_empty() {
            match (&*unix).write(&self.prefix) {
                Ok(n) => {
                    self.prefix.drain(..n);
                    moved = true;
                }
                Err(e) if would_block(&e) => self.write_blocked = true,
                Err(e) => return Err(e),
            }
        }
        if self.prefix.is_empty() && !self.guest_eof {
            let fd = unix.as_fd();
            match stream.poll_read_with(cx, WRITE_SIZE, |payload| sys::writev(fd, payload)) {
                Poll::Ready(Ok(0)) => {
                    self.guest_eof = true;
                    let _ = unix.shutdown(std::net::Shutdown::Write);
                    moved = true;
                }
                Poll::Ready(Ok(_)) => moved = true,
                Poll::Ready(Err(e)) if would_block(&e) => self.write_blocked = true,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        // Towards the guest the vring worker reads; its end of file ends this direction.
        if !self.host_eof {
            if self.reader.failed() {
                return Err(ErrorKind::BrokenPipe.into());
            }
            if self.reader.at_eof() {
                self.host_eof = true;
                let _ = stream.shutdown(std::net::Shutdown::Write);
                moved = true;
            }
            // The guest reads no more: the host program's writes fail from now on (EPIPE, as
            // against a Linux peer that shut down reading), its reads go on. What it wrote
            // before is dropped, as the guest will never read it (and a socket closed with
            // unread bytes would reset the host program's reads).
            if self.reader.refused() {
                self.host_eof = true;
                let _ = unix.shutdown(std::net::Shutdown::Read);
                let mut scratch = [0u8; 4096];
                while matches!((&*unix).read(&mut scratch), Ok(n) if n > 0) {}
                moved = true;
            }
        }
        Ok(moved)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.reader.close();
    }
}

fn would_block(error: &io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_lines_parse_as_vhost_device_vsock_reads_them() {
        assert_eq!(parse_connect(b"CONNECT 1234\n"), Some(1234));
        assert_eq!(parse_connect(b"connect\t52 \n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT\n"), None);
        assert_eq!(parse_connect(b"CONNECT x\n"), None);
        assert_eq!(parse_connect(b"CONNECT 1 2\n"), None);
        assert_eq!(parse_connect(b"OPEN 1\n"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999\n"), None);
    }
}
