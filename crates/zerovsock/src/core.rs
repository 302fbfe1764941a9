//! The driver: one engine behind a mutex, its transport, and the threads that wait on it.
//!
//! Every call locks the engine, does its step, then *pumps*: hands the engine's packets to the
//! transport, feeds back what the transport returns (loopback returns them all), fires due
//! timers, and wakes the sockets whose readiness changed. Copies of payload bytes happen
//! outside the lock, so a sender and a receiver copy in parallel.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use zerovsock_proto::{Engine, EngineConfig, Packet, SocketId};
use zerovsock_wire::{Addr, Cid};

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

    /// Drops packets from `local` to `remote` still waiting to be sent (a connect timed out:
    /// Linux's `cancel_pkt`). Transports that send at once have nothing to drop.
    fn cancel(&mut self, local: Addr, remote: Addr) {
        let _ = (local, remote);
    }

    /// Payload bytes of packets from `local` to `remote` the transport still holds, not yet
    /// handed on whole (SIOCOUTQ; Linux counts a packet until `virtio_transport_consume_skb_sent`).
    /// Transports that send at once hold none.
    fn unsent_bytes(&self, local: Addr, remote: Addr) -> usize {
        let _ = (local, remote);
        0
    }
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
    /// Wakes blocked threads now, and moves waiting tasks to `deferred`: a task's waker may
    /// call back into the stack (an executor that polls inline, a task that drops a socket),
    /// so tasks are woken only once the engine lock is released.
    fn wake(&self, deferred: &mut Vec<Waker>) {
        self.generation.fetch_add(1, Ordering::Release);
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            self.ready.notify_all();
        }
        if self.has_tasks.swap(false, Ordering::AcqRel) {
            deferred.append(&mut self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
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
    /// Task wakers to call once the lock is released (see [`Locked`]).
    deferred: Vec<Waker>,
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
            while let Some((local, remote)) = self.engine.poll_cancel() {
                self.transport.cancel(local, remote);
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
                waiter.wake(&mut self.deferred);
            }
        }
    }

    /// SIOCOUTQ of connection `id`: what its transport still holds of it.
    pub(crate) fn unsent_bytes(&self, id: SocketId) -> usize {
        let (Some(local), Some(remote)) = (self.engine.local_addr(id), self.engine.peer_addr(id))
        else {
            return 0;
        };
        // Packets carry the endpoint's own CID even from a socket bound to CID ANY.
        let local = Addr::new(self.engine.config().local_cid, local.port);
        self.transport.unsent_bytes(local, remote)
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
    /// Whether blocked callers spin before they sleep ([`crate::Vsock::set_spin`]).
    pub(crate) spin: AtomicBool,
}

/// The engine lock. Dropping it releases the lock first, then wakes the tasks the locked
/// steps made ready, so no waker ever runs with the engine locked.
pub(crate) struct Locked<'a> {
    mutex: &'a Mutex<Core>,
    guard: Option<MutexGuard<'a, Core>>,
}

impl<'a> Locked<'a> {
    fn inner(&mut self) -> &mut MutexGuard<'a, Core> {
        // Only `wait_on` takes the guard out, and it puts it back before returning.
        self.guard.as_mut().expect("the engine lock is held")
    }

    /// Waits on `condvar` (which releases the lock while waiting), after waking deferred tasks.
    fn wait_on(mut self, condvar: &Condvar, timeout: Option<Duration>) -> Self {
        self.wake_deferred_unlocked();
        let guard = self.guard.take().expect("the engine lock is held");
        let guard = match timeout {
            Some(timeout) => {
                condvar.wait_timeout(guard, timeout).unwrap_or_else(PoisonError::into_inner).0
            }
            None => condvar.wait(guard).unwrap_or_else(PoisonError::into_inner),
        };
        Locked { mutex: self.mutex, guard: Some(guard) }
    }

    /// Wakes deferred tasks with the lock released for the moment, then takes it again.
    fn wake_deferred_unlocked(&mut self) {
        if self.inner().deferred.is_empty() {
            return;
        }
        let tasks = std::mem::take(&mut self.inner().deferred);
        drop(self.guard.take());
        tasks.into_iter().for_each(Waker::wake);
        self.guard = Some(self.mutex.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

impl Deref for Locked<'_> {
    type Target = Core;

    fn deref(&self) -> &Core {
        self.guard.as_ref().expect("the engine lock is held")
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Core {
        self.inner()
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else { return };
        let tasks = std::mem::take(&mut guard.deferred);
        drop(guard);
        tasks.into_iter().for_each(Waker::wake);
    }
}

impl Shared {
    pub(crate) fn new(
        transport: Box<dyn Transport>,
        tune: impl FnOnce(&mut EngineConfig),
    ) -> Arc<Shared> {
        let mut config = EngineConfig::new(transport.local_cid());
        tune(&mut config);
        config.local_cid = transport.local_cid();
        config.zerocopy = transport.supports_zerocopy();
        config.seqpacket = transport.supports_seqpacket();
        let core = Core {
            engine: Engine::new(config),
            transport,
            waiters: HashMap::new(),
            inbound: VecDeque::new(),
            deferred: Vec::new(),
        };
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            clock: Condvar::new(),
            pool: Arc::default(),
            spin: AtomicBool::new(true),
        });
        spawn_clock(&shared);
        shared
    }

    pub(crate) fn lock(&self) -> Locked<'_> {
        // The engine is left consistent between calls; a panic elsewhere does not poison it.
        let guard = self.core.lock().unwrap_or_else(PoisonError::into_inner);
        Locked { mutex: &self.core, guard: Some(guard) }
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
                Ok(None) if nonblocking => return Err(io::Error::from_raw_os_error(libc::EAGAIN)),
                Ok(None) => {}
            }
            let mut wait_for = deadline.map(|d| d.saturating_duration_since(now));
            if wait_for == Some(Duration::ZERO) {
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
            let seen = waiter.generation.load(Ordering::Acquire);
            drop(core);
            let started = Instant::now();
            let budget = if self.spin.load(Ordering::Relaxed) {
                waiter.spin_budget()
            } else {
                Duration::ZERO
            };
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
            core = core.wait_on(&waiter.ready, wait_for);
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
        let mut core = self.lock();
        match self.step(&mut core, Instant::now(), attempt) {
            Ok(Some(value)) => Poll::Ready(Ok(value)),
            Err(error) => Poll::Ready(Err(error)),
            Ok(None) => {
                // Still under the lock, so the event that makes the attempt succeed comes after.
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

/// Fires close and connect timers while nobody is calling in.
///
/// The thread holds the stack only weakly while no timer is armed, so an idle stack goes away
/// at most a second after its last handle. While timers are armed it keeps the stack alive,
/// even with no handle left: connections closed last still get their forced RST when the close
/// timeout passes, as Linux sends it after the application has exited.
fn spawn_clock(stack: &Arc<Shared>) {
    let shared = Arc::downgrade(stack);
    // Held from the start, so that a thread scheduled late still finds the stack.
    let mut keep = Some(stack.clone());
    let spawned = thread::Builder::new().name("zerovsock-clock".into()).spawn(move || loop {
        let Some(strong) = keep.take().or_else(|| shared.upgrade()) else { return };
        let mut core = strong.lock();
        let now = Instant::now();
        core.pump(now);
        core.wake_deferred_unlocked();
        let timer = core.engine.poll_timeout();
        let idle = Duration::from_secs(1);
        let wait = timer.map_or(idle, |t| t.saturating_duration_since(now).min(idle));
        drop(core.wait_on(&strong.clock, Some(wait)));
        if strong.lock().engine.poll_timeout().is_some() {
            keep = Some(strong);
        }
    });
    // Without the clock thread, timers still fire on every call into the stack; only
    // connections closed while the stack is otherwise idle wait longer for their final RST.
    drop(spawned);
}
