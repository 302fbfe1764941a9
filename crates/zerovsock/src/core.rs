//! The driver: one engine behind a mutex, its transport, and the threads that wait on it.
//!
//! Every call locks the engine, does its step, then *pumps*: hands the engine's packets to the
//! transport, feeds back what the transport returns (loopback returns them all), fires due
//! timers, and wakes the sockets whose readiness changed. Copies of payload bytes happen
//! outside the lock, so a sender and a receiver copy in parallel.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
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
/// sleeps; `spin_ns` is how long the next wait spins, adapted to what spinning wins (see
/// [`Waiter::learn`]): 0 while spins have stopped catching wake-ups, and then `unspun` counts
/// the waits since, so that every `probe_every`th one tries again, for twice `slept_ns`, how
/// long the last wait that slept took.
#[derive(Debug)]
pub(crate) struct Waiter {
    ready: Condvar,
    generation: AtomicU64,
    sleepers: AtomicUsize,
    spin_ns: AtomicU64,
    unspun: AtomicU32,
    probe_every: AtomicU32,
    slept_ns: AtomicU64,
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
            unspun: AtomicU32::new(0),
            probe_every: AtomicU32::new(1),
            slept_ns: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
            has_tasks: AtomicBool::new(false),
        }
    }
}

impl Waiter {
    /// Wakes spinning threads now; sleeping threads and waiting tasks are left in `deferred`,
    /// to be woken once the engine lock is released: a task's waker may call back into the
    /// stack (an executor that polls inline, a task that drops a socket), and a thread woken
    /// while the lock is held would run only to block on it (on a single free core the
    /// scheduler switches to the woken thread at once, and back, and to it again).
    fn wake(self: &Arc<Self>, deferred: &mut Deferred) {
        self.generation.fetch_add(1, Ordering::Release);
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            deferred.sleepers.push(self.clone());
        }
        if self.has_tasks.swap(false, Ordering::AcqRel) {
            deferred.tasks.append(&mut self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    fn register(&self, waker: &Waker) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if !tasks.iter().any(|task| task.will_wake(waker)) {
            tasks.push(waker.clone());
        }
        self.has_tasks.store(true, Ordering::Release);
    }

    /// How long the next wait spins: the learnt budget; while spinning does not pay, nothing but
    /// a probe every `probe_every`th wait, as long as would have caught the last wait that slept
    /// (with margin), so that waits longer than [`SPIN_MIN`] are caught by spinning again once
    /// the machine is idle, while a probe on a loaded one costs about what waits take. The
    /// first probe is the very next wait (a lone miss on an idle machine costs one sleep); each
    /// probe that misses doubles the interval, up to [`PROBE_EVERY`].
    fn spin_budget(&self) -> Duration {
        match self.spin_ns.load(Ordering::Relaxed) {
            0 if self.unspun.fetch_add(1, Ordering::Relaxed) + 1
                >= self.probe_every.load(Ordering::Relaxed) =>
            {
                self.unspun.store(0, Ordering::Relaxed);
                let slept = Duration::from_nanos(self.slept_ns.load(Ordering::Relaxed));
                (slept * 2).clamp(SPIN_MIN, SPIN_MAX)
            }
            ns => Duration::from_nanos(ns),
        }
    }

    /// A spin of `budget` ended: `Caught` after how long, when it saw the wake-up; `Missed`
    /// when the budget ran out first; `Preempted` when the spinning thread was descheduled
    /// (another thread wanted this core: on an oversubscribed machine, spinning only delays the
    /// thread that would wake us). A catch sets the next budget to twice what it took; a miss
    /// halves the budget, and below [`SPIN_MIN`] (or on preemption) stops spinning until a probe
    /// catches again. A miss never grows the budget: all the time it took was the spin's own.
    fn learn(&self, budget: Duration, outcome: Spun) {
        let probing = self.spin_ns.load(Ordering::Relaxed) == 0;
        let every = match outcome {
            Spun::Caught(_) => 1,
            _ if probing => (self.probe_every.load(Ordering::Relaxed) * 2).min(PROBE_EVERY),
            _ => 1,
        };
        self.probe_every.store(every, Ordering::Relaxed);
        let next = match outcome {
            Spun::Caught(waited) => (waited * 2).clamp(SPIN_MIN, SPIN_MAX),
            Spun::Missed if !probing && budget / 2 >= SPIN_MIN => budget / 2,
            Spun::Missed | Spun::Preempted => Duration::ZERO,
        };
        self.spin_ns.store(next.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// How a spin ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spun {
    /// The wake-up came after this long.
    Caught(Duration),
    /// The budget ran out first.
    Missed,
    /// The spinning thread was descheduled mid-spin: the core has other work.
    Preempted,
}

/// Bounds of the spin before a waiter sleeps. Waking a sleeping thread costs tens to hundreds of
/// microseconds on a VM (the idle vCPU must be woken too), while the peer thread on the other
/// core usually answers sooner; spins that miss shrink the budget, down to no spin at all.
const SPIN_MIN: Duration = Duration::from_micros(20);
const SPIN_MAX: Duration = Duration::from_micros(300);
/// While spinning does not pay, at least one wait in this many still spins (a probe), to notice
/// when it pays again: the machine is idle again, or the peer answers sooner.
const PROBE_EVERY: u32 = 16;
/// A gap this long between two looks at the clock in a spin means the thread was descheduled.
const PREEMPTED: Duration = Duration::from_micros(50);

/// Wake-ups made under the engine lock, done once it is released (see [`Waiter::wake`]).
#[derive(Default)]
struct Deferred {
    /// Waiters with sleeping threads. A thread sleeps on its condition variable only after
    /// reading, under the lock, the variable's state, so a notification made after the lock
    /// is released still reaches it.
    sleepers: Vec<Arc<Waiter>>,
    tasks: Vec<Waker>,
}

impl Deferred {
    fn is_empty(&self) -> bool {
        self.sleepers.is_empty() && self.tasks.is_empty()
    }

    fn wake(self) {
        self.sleepers.iter().for_each(|waiter| waiter.ready.notify_all());
        self.tasks.into_iter().for_each(Waker::wake);
    }
}

pub(crate) struct Core {
    pub(crate) engine: Engine,
    transport: Box<dyn Transport>,
    waiters: HashMap<SocketId, Arc<Waiter>>,
    inbound: VecDeque<Packet>,
    /// Threads and tasks to wake once the lock is released (see [`Locked`]).
    deferred: Deferred,
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
        // `poll_wakeup` moves queued completions first: nothing is owed any more.
        OWED.with(|owed| owed.set(false));
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
    /// Wakes the clock thread: a timer may have moved earlier, or a zerocopy completion was
    /// queued outside the engine.
    clock: Arc<Kick>,
    pool: Arc<BufferPool>,
    /// Whether blocked callers spin before they sleep ([`crate::Vsock::set_spin`]).
    pub(crate) spin: AtomicBool,
}

/// The engine lock. Dropping it releases the lock first, then wakes the threads and tasks the
/// locked steps made ready, so no waker ever runs with the engine locked.
pub(crate) struct Locked<'a> {
    mutex: &'a Mutex<Core>,
    clock: &'a Kick,
    guard: Option<MutexGuard<'a, Core>>,
}

impl<'a> Locked<'a> {
    fn acquired(
        mutex: &'a Mutex<Core>,
        clock: &'a Kick,
        guard: MutexGuard<'a, Core>,
    ) -> Locked<'a> {
        HOLDING.with(|holding| holding.set(engine_key(mutex)));
        Locked { mutex, clock, guard: Some(guard) }
    }

    /// Bookkeeping for a release of the lock (the guard is about to go): a completion queued
    /// meanwhile on this thread, and not yet pumped, is handed to the clock thread.
    fn releasing(&self) {
        HOLDING.with(|holding| holding.set(0));
        if OWED.with(|owed| owed.replace(false)) {
            self.clock.kick();
        }
    }

    fn inner(&mut self) -> &mut MutexGuard<'a, Core> {
        // Only `wait_on` takes the guard out, and it puts it back before returning.
        self.guard.as_mut().expect("the engine lock is held")
    }

    /// Waits on `condvar` (which releases the lock while waiting), after the deferred wake-ups.
    fn wait_on(mut self, condvar: &Condvar, timeout: Option<Duration>) -> Self {
        self.wake_deferred_unlocked();
        self.releasing();
        let guard = self.guard.take().expect("the engine lock is held");
        let guard = match timeout {
            Some(timeout) => {
                condvar.wait_timeout(guard, timeout).unwrap_or_else(PoisonError::into_inner).0
            }
            None => condvar.wait(guard).unwrap_or_else(PoisonError::into_inner),
        };
        Locked::acquired(self.mutex, self.clock, guard)
    }

    /// Does the deferred wake-ups with the lock released for the moment, then takes it again.
    fn wake_deferred_unlocked(&mut self) {
        if self.inner().deferred.is_empty() {
            return;
        }
        let deferred = std::mem::take(&mut self.inner().deferred);
        self.releasing();
        drop(self.guard.take());
        deferred.wake();
        let guard = self.mutex.lock().unwrap_or_else(PoisonError::into_inner);
        HOLDING.with(|holding| holding.set(engine_key(self.mutex)));
        self.guard = Some(guard);
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
        let deferred = std::mem::take(&mut guard.deferred);
        self.releasing();
        drop(guard);
        deferred.wake();
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
            deferred: Deferred::default(),
        };
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            clock: Arc::default(),
            pool: Arc::default(),
            spin: AtomicBool::new(true),
        });
        // A zerocopy payload is often dropped outside the engine, on whichever thread consumed
        // it (a transport's): its completion then waits in the engine's sink for the next call.
        // Linux wakes the socket from the skb's destructor (`sk_error_report`); here the clock
        // thread is kicked to make that call. A drop inside this engine's lock needs no kick
        // when a pump follows before the lock is let go (every step ends with one), so it is
        // only noted, and kicked for at the release if no pump came.
        let (clock, key) = (shared.clock.clone(), engine_key(&shared.core));
        shared.lock().engine.set_completion_notifier(move || {
            if HOLDING.with(Cell::get) == key {
                OWED.with(|owed| owed.set(true));
            } else {
                clock.kick();
            }
        });
        spawn_clock(&shared);
        shared
    }

    pub(crate) fn lock(&self) -> Locked<'_> {
        // The engine is left consistent between calls; a panic elsewhere does not poison it.
        let guard = self.core.lock().unwrap_or_else(PoisonError::into_inner);
        Locked::acquired(&self.core, &self.clock, guard)
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
            self.clock.kick();
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
            let limit = wait_for.map_or(budget, |w| w.min(budget));
            let spun = spin(waiter, seen, limit);
            // A spin the caller's deadline cut short says nothing about the next one.
            if !budget.is_zero() && (limit == budget || spun != Spun::Missed) {
                waiter.learn(budget, spun);
            }
            core = self.lock();
            if waiter.generation.load(Ordering::Acquire) != seen {
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
            waiter.slept_ns.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
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
fn spin(waiter: &Waiter, seen: u64, limit: Duration) -> Spun {
    if limit.is_zero() {
        return Spun::Missed;
    }
    let start = Instant::now();
    let mut looked = start;
    loop {
        for _ in 0..64 {
            if waiter.generation.load(Ordering::Acquire) != seen {
                return Spun::Caught(start.elapsed());
            }
            std::hint::spin_loop();
        }
        let now = Instant::now();
        if now.duration_since(looked) >= PREEMPTED {
            return Spun::Preempted;
        }
        if now.duration_since(start) >= limit {
            return Spun::Missed;
        }
        looked = now;
    }
}

/// Fires close and connect timers while nobody is calling in.
///
/// Wakes the clock thread. A kick made while the thread is awake is kept, so its next wait
/// returns at once: no kick is lost between the thread's last look at the engine and its sleep.
#[derive(Default)]
struct Kick {
    kicked: Mutex<bool>,
    ready: Condvar,
}

impl Kick {
    fn kick(&self) {
        *self.kicked.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.ready.notify_one();
    }

    /// Waits up to `timeout` for a kick, and takes it.
    fn wait(&self, timeout: Duration) {
        let kicked = self.kicked.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut kicked, _) = self
            .ready
            .wait_timeout_while(kicked, timeout, |kicked| !*kicked)
            .unwrap_or_else(PoisonError::into_inner);
        *kicked = false;
    }
}

thread_local! {
    /// The engine lock this thread holds ([`engine_key`]; 0 for none).
    static HOLDING: Cell<usize> = const { Cell::new(0) };
    /// A completion was queued on this thread under the lock it holds, and no pump has taken
    /// it since.
    static OWED: Cell<bool> = const { Cell::new(false) };
}

/// An engine lock's identity: its address (the `Shared` it lives in never moves).
fn engine_key(mutex: &Mutex<Core>) -> usize {
    mutex as *const Mutex<Core> as usize
}

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
        drop(core);
        strong.clock.wait(wait);
        if strong.lock().engine.poll_timeout().is_some() {
            keep = Some(strong);
        }
    });
    // Without the clock thread, timers still fire on every call into the stack; only
    // connections closed while the stack is otherwise idle wait longer for their final RST.
    drop(spawned);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget_after(outcomes: &[Spun]) -> Duration {
        let waiter = Waiter::default();
        for &outcome in outcomes {
            waiter.learn(waiter.spin_budget(), outcome);
        }
        Duration::from_nanos(waiter.spin_ns.load(Ordering::Relaxed))
    }

    #[test]
    fn a_caught_wake_up_sets_the_budget_to_twice_its_wait_within_the_bounds() {
        let caught = |us| Spun::Caught(Duration::from_micros(us));
        assert_eq!(budget_after(&[caught(40)]), Duration::from_micros(80));
        assert_eq!(budget_after(&[caught(1)]), SPIN_MIN);
        assert_eq!(budget_after(&[caught(1000)]), SPIN_MAX);
    }

    #[test]
    fn a_missed_spin_halves_the_budget_and_never_grows_it() {
        let caught = Spun::Caught(Duration::from_micros(100));
        assert_eq!(budget_after(&[caught, Spun::Missed]), Duration::from_micros(100));
        assert_eq!(budget_after(&[caught, Spun::Missed, Spun::Missed]), Duration::from_micros(50));
    }

    #[test]
    fn spinning_stops_below_the_minimum_or_when_preempted() {
        assert_eq!(budget_after(&[Spun::Missed]), Duration::ZERO);
        assert_eq!(budget_after(&[Spun::Caught(SPIN_MAX), Spun::Preempted]), Duration::ZERO);
    }

    #[test]
    fn once_spinning_stopped_probes_spin_twice_the_last_sleep_ever_more_rarely() {
        let waiter = Waiter::default();
        waiter.learn(SPIN_MIN, Spun::Missed);
        waiter.slept_ns.store(Duration::from_micros(70).as_nanos() as u64, Ordering::Relaxed);
        // Each probe misses: the next wait probes, then the 2nd after it, the 4th, ... the 16th.
        let mut probes = Vec::new();
        for wait in 0..64 {
            let budget = waiter.spin_budget();
            if !budget.is_zero() {
                assert_eq!(budget, Duration::from_micros(140));
                probes.push(wait);
                waiter.learn(budget, Spun::Missed);
            }
        }
        assert_eq!(probes, [0, 2, 6, 14, 30, 46, 62]);
        // A probe that catches starts spinning again, and a later stop probes at once.
        waiter.unspun.store(PROBE_EVERY, Ordering::Relaxed);
        let budget = waiter.spin_budget();
        waiter.learn(budget, Spun::Caught(Duration::from_micros(30)));
        assert_eq!(waiter.spin_budget(), Duration::from_micros(60));
        waiter.learn(Duration::from_micros(60), Spun::Preempted);
        assert!(!waiter.spin_budget().is_zero());
    }

    #[test]
    fn a_spin_sees_a_wake_up_and_gives_up_after_its_limit() {
        let waiter = Arc::new(Waiter::default());
        let seen = waiter.generation.load(Ordering::Acquire);
        assert_eq!(spin(&waiter, seen, Duration::ZERO), Spun::Missed);
        let spun = spin(&waiter, seen, Duration::from_micros(30));
        assert!(matches!(spun, Spun::Missed | Spun::Preempted), "{spun:?}");
        waiter.wake(&mut Deferred::default());
        assert!(matches!(spin(&waiter, seen, SPIN_MAX), Spun::Caught(_)));
    }

    #[test]
    fn sleepers_are_notified_after_the_lock_is_released_and_only_when_there_are_any() {
        let waiter = Arc::new(Waiter::default());
        waiter.sleepers.store(1, Ordering::Relaxed);
        let mut deferred = Deferred::default();
        waiter.wake(&mut deferred);
        assert_eq!(deferred.sleepers.len(), 1, "the notification waits for the lock's release");
        waiter.sleepers.store(0, Ordering::Relaxed);
        let mut nobody = Deferred::default();
        waiter.wake(&mut nobody);
        assert!(nobody.is_empty(), "no futex call when nobody sleeps");
    }
}
