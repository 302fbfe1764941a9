//! The driver: one engine behind a mutex, its transport, and the threads that wait on it.
//!
//! Every call locks the engine, does its step, then *pumps*: hands the engine's packets to the
//! transport, feeds back what the transport returns (loopback returns them all), fires due
//! timers, and wakes the sockets whose readiness changed. Copies of payload bytes happen
//! outside the lock, so a sender and a receiver copy in parallel.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use zerovsock_proto::{Engine, EngineConfig, Packet, SocketId};
use zerovsock_wire::Cid;

use crate::pool::BufferPool;

/// Moves packets between an engine and whatever is on the other side of it.
///
/// The loopback transport is the first; the vhost-user device will be another.
pub trait Transport: Send + 'static {
    /// The CID of the endpoint the engine plays.
    fn local_cid(&self) -> Cid;
    /// Whether MSG_ZEROCOPY is supported (Linux's `msgzerocopy_allow`).
    fn supports_zerocopy(&self) -> bool;
    /// Whether SEQPACKET is supported (the negotiated feature bit).
    fn supports_seqpacket(&self) -> bool;
    /// Takes one packet the engine wants sent. Packets for the engine itself (loopback, or a
    /// reply the transport makes up, such as RST for an unreachable CID) go into `inbound`.
    fn transmit(&mut self, packet: Packet, inbound: &mut VecDeque<Packet>);
}

/// What waits on one socket.
///
/// `generation` counts wake-ups, so a waiter can spin briefly without the lock before it
/// sleeps; `sleepers` (changed only under the engine lock) spares the futex call when nobody
/// sleeps; `spin_ns` is how long the next wait spins, adapted to how long waits turn out to be.
#[derive(Debug)]
pub(crate) struct Waiter {
    ready: Condvar,
    generation: AtomicU64,
    sleepers: AtomicUsize,
    spin_ns: AtomicU64,
    /// Tasks waiting on this socket; registered and woken under the engine lock.
    tasks: Mutex<Vec<Waker>>,
    /// Whether `tasks` may be non-empty, so that waking skips its lock in blocking-only use.
    has_tasks: AtomicBool,
}

impl Default for Waiter {
    fn default() -> Waiter {
        Waiter {
            ready: Condvar::new(),
            generation: AtomicU64::new(0),
            sleepers: AtomicUsize::new(0),
            spin_ns: AtomicU64::new(SPIN_MIN.as_nanos() as u64),
            tasks: Mutex::new(Vec::new()),
            has_tasks: AtomicBool::new(false),
        }
    }
}

impl Waiter {
    fn wake(&self) {
        self.generation.fetch_add(1, Ordering::Release);
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            self.ready.notify_all();
        }
        if self.has_tasks.swap(false, Ordering::AcqRel) {
            let tasks =
                std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
            for task in tasks {
                task.wake();
            }
        }
    }

    fn register(&self, waker: &Waker) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if !tasks.iter().any(|task| task.will_wake(waker)) {
            tasks.push(waker.clone());
        }
        self.has_tasks.store(true, Ordering::Release);
    }

    fn spin_budget(&self) -> Duration {
        Duration::from_nanos(self.spin_ns.load(Ordering::Relaxed))
    }

    /// A wait took `waited`: if spinning that long would have caught it, spin that long (with
    /// margin) next time; if not, spin less.
    fn learn(&self, waited: Duration) {
        let next = if waited <= SPIN_MAX {
            (waited * 2).clamp(SPIN_MIN, SPIN_MAX)
        } else {
            (self.spin_budget() / 2).max(SPIN_MIN)
        };
        self.spin_ns.store(next.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Bounds of the spin before a waiter sleeps. Waking a sleeping thread costs tens to hundreds of
/// microseconds on a VM (the idle vCPU must be woken too), while the peer thread on the other
/// core usually answers sooner; waits that turn out long shrink the spin back to the minimum.
const SPIN_MIN: Duration = Duration::from_micros(20);
const SPIN_MAX: Duration = Duration::from_micros(300);

pub(crate) struct Core {
    pub(crate) engine: Engine,
    transport: Box<dyn Transport>,
    waiters: HashMap<SocketId, Arc<Waiter>>,
    inbound: VecDeque<Packet>,
}

impl Core {
    /// Runs the engine until it has nothing left to say, then wakes waiters.
    pub(crate) fn pump(&mut self, now: Instant) {
        loop {
            if self.engine.poll_timeout().is_some_and(|deadline| deadline <= now) {
                self.engine.handle_timeout(now);
            }
            while let Some(packet) = self.engine.poll_transmit() {
                self.transport.transmit(packet, &mut self.inbound);
            }
            if self.inbound.is_empty() {
                break;
            }
            while let Some(packet) = self.inbound.pop_front() {
                self.engine.handle_packet(now, packet);
            }
        }
        while let Some(id) = self.engine.poll_wakeup() {
            if let Some(waiter) = self.waiters.get(&id) {
                waiter.wake();
            }
        }
    }

    pub(crate) fn register(&mut self, id: SocketId) -> Arc<Waiter> {
        self.waiters.entry(id).or_default().clone()
    }

    pub(crate) fn unregister(&mut self, id: SocketId) {
        self.waiters.remove(&id);
    }
}

/// State shared by a stack handle and every socket on it.
pub(crate) struct Shared {
    core: Mutex<Core>,
    /// Wakes the clock thread when a timer may have moved earlier.
    clock: Condvar,
    pool: Arc<BufferPool>,
}

pub(crate) type CoreGuard<'a> = MutexGuard<'a, Core>;

impl Shared {
    pub(crate) fn new(
        transport: Box<dyn Transport>,
        tune: impl FnOnce(&mut EngineConfig),
    ) -> Arc<Shared> {
        let mut config = EngineConfig::new(transport.local_cid());
        config.zerocopy = transport.supports_zerocopy();
        config.seqpacket = transport.supports_seqpacket();
        tune(&mut config);
        let core = Core {
            engine: Engine::new(config),
            transport,
            waiters: HashMap::new(),
            inbound: VecDeque::new(),
        };
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            clock: Condvar::new(),
            pool: Arc::default(),
        });
        spawn_clock(Arc::downgrade(&shared));
        shared
    }

    pub(crate) fn lock(&self) -> CoreGuard<'_> {
        // The engine is left consistent between calls; a panic elsewhere does not poison it.
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one engine step and pumps.
    pub(crate) fn with<R>(&self, step: impl FnOnce(&mut Engine, Instant) -> R) -> R {
        self.step(&mut self.lock(), Instant::now(), step)
    }

    /// One step under the lock: pump first (due timers, finished completions), run `step`, pump
    /// what it produced, and make sure the clock thread knows of any armed timer.
    fn step<R>(
        &self,
        core: &mut Core,
        now: Instant,
        step: impl FnOnce(&mut Engine, Instant) -> R,
    ) -> R {
        core.pump(now);
        let result = step(&mut core.engine, now);
        core.pump(now);
        if core.engine.poll_timeout().is_some() {
            self.clock.notify_one();
        }
        result
    }

    /// Retries `attempt` until it is ready, waiting on `waiter` in between.
    ///
    /// `attempt` returns `Ok(Some(value))` when done, `Ok(None)` to wait, `Err` to fail. With
    /// `nonblocking` or once `deadline` passes, waiting ends in [`io::ErrorKind::WouldBlock`]
    /// (EAGAIN, as Linux reports an expired SO_RCVTIMEO/SO_SNDTIMEO).
    pub(crate) fn wait<T>(
        &self,
        waiter: &Waiter,
        nonblocking: bool,
        deadline: Option<Instant>,
        mut attempt: impl FnMut(&mut Engine, Instant) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        let mut core = self.lock();
        loop {
            let now = Instant::now();
            match self.step(&mut core, now, &mut attempt) {
                Ok(Some(value)) => return Ok(value),
                Err(error) => return Err(error),
                Ok(None) if nonblocking => return Err(io::ErrorKind::WouldBlock.into()),
                Ok(None) => {}
            }
            let mut wait_for = deadline.map(|d| d.saturating_duration_since(now));
            if wait_for == Some(Duration::ZERO) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let seen = waiter.generation.load(Ordering::Acquire);
            drop(core);
            let started = Instant::now();
            let budget = waiter.spin_budget();
            let woken = spin(waiter, seen, wait_for.map_or(budget, |w| w.min(budget)));
            core = self.lock();
            if woken || waiter.generation.load(Ordering::Acquire) != seen {
                waiter.learn(started.elapsed());
                continue;
            }
            // Timers (connect, close) fire on the clock thread; cap the wait so a deadline set
            // by this very call is also honoured here.
            if let Some(timer) = core.engine.poll_timeout() {
                let until_timer = timer.saturating_duration_since(now);
                wait_for = Some(wait_for.map_or(until_timer, |w| w.min(until_timer)));
            }
            waiter.sleepers.fetch_add(1, Ordering::Relaxed);
            core = match wait_for {
                Some(duration) => {
                    waiter
                        .ready
                        .wait_timeout(core, duration)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => waiter.ready.wait(core).unwrap_or_else(PoisonError::into_inner),
            };
            waiter.sleepers.fetch_sub(1, Ordering::Relaxed);
            waiter.learn(started.elapsed());
        }
    }

    /// The asynchronous form of [`Shared::wait`]: one attempt; when it must wait, the task is
    /// registered on `waiter` under the engine lock (so no wake-up can slip between the attempt
    /// and the registration) and `Pending` is returned.
    pub(crate) fn poll_attempt<T>(
        &self,
        waiter: &Waiter,
        cx: &mut Context<'_>,
        attempt: impl FnOnce(&mut Engine, Instant) -> io::Result<Option<T>>,
    ) -> Poll<io::Result<T>> {
        match self.step(&mut self.lock(), Instant::now(), attempt) {
            Ok(Some(value)) => Poll::Ready(Ok(value)),
            Err(error) => Poll::Ready(Err(error)),
            Ok(None) => {
                waiter.register(cx.waker());
                Poll::Pending
            }
        }
    }

    pub(crate) fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }
}

/// Spins up to `limit` for the waiter's generation to move past `seen`.
fn spin(waiter: &Waiter, seen: u64, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if waiter.generation.load(Ordering::Acquire) != seen {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= limit {
            return false;
        }
    }
}

/// Fires close and connect timers while nobody is calling in. Holds the stack only while
/// waiting, so the stack goes away at most a second after its last handle.
fn spawn_clock(shared: Weak<Shared>) {
    let spawned = thread::Builder::new().name("zerovsock-clock".into()).spawn(move || loop {
        let Some(shared) = shared.upgrade() else { return };
        let mut core = shared.lock();
        let now = Instant::now();
        core.pump(now);
        let idle = Duration::from_secs(1);
        let wait =
            core.engine.poll_timeout().map_or(idle, |t| t.saturating_duration_since(now).min(idle));
        let core = shared.clock.wait_timeout(core, wait).unwrap_or_else(PoisonError::into_inner).0;
        drop(core);
    });
    // Without the clock thread, timers still fire on every call into the stack; only
    // connections closed while the stack is otherwise idle wait longer for their final RST.
    drop(spawned);
}
