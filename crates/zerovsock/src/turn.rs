//! One caller at a time per socket direction, for threads and tasks alike.
//!
//! A blocking send may take several passes and wait for credit in between; a blocking STREAM
//! read may gather several leases until SO_RCVLOWAT is met. Neither may interleave with another
//! call in the same direction (bytes would mix, zerocopy ids would cross). A thread waits for
//! its turn on a condition variable; a task that finds the turn taken is parked with its waker
//! instead of blocking its executor's thread, and is woken when the turn is given back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// The turn is an atomic flag, so taking and giving back a free turn costs no lock and no
/// system call (a send per message takes one); the mutex and condition variable are only for
/// callers that find it taken.
#[derive(Debug, Default)]
pub(crate) struct Turn {
    taken: AtomicBool,
    /// Threads waiting plus tasks registered; the holder looks for them only when non-zero.
    waiting: AtomicUsize,
    tasks: Mutex<Vec<Waker>>,
    free: Condvar,
}

/// Holds the turn; gives it back when dropped.
#[derive(Debug)]
pub(crate) struct Held<'a> {
    turn: &'a Turn,
}

impl Turn {
    fn tasks(&self) -> MutexGuard<'_, Vec<Waker>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_take(&self) -> Option<Held<'_>> {
        let free = self.taken.compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed);
        free.is_ok().then(|| Held { turn: self })
    }

    /// Waits (blocking the thread) for the turn.
    pub(crate) fn take(&self) -> Held<'_> {
        if let Some(held) = self.try_take() {
            return held;
        }
        let mut tasks = self.tasks();
        loop {
            // Counted before the second look, so a holder that gives the turn back after that
            // look sees the count and wakes us (both sides use SeqCst).
            self.waiting.fetch_add(1, Ordering::SeqCst);
            if let Some(held) = self.try_take() {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return held;
            }
            tasks = self.free.wait(tasks).unwrap_or_else(PoisonError::into_inner);
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Takes the turn if it is free; otherwise registers the task to be woken when it is.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Held<'_>> {
        if let Some(held) = self.try_take() {
            return Poll::Ready(held);
        }
        {
            let mut tasks = self.tasks();
            if !tasks.iter().any(|task| task.will_wake(cx.waker())) {
                tasks.push(cx.waker().clone());
                self.waiting.fetch_add(1, Ordering::SeqCst);
            }
        }
        // Registered first, then looked again: a turn given back in between is not missed (at
        // worst this task is woken once for nothing).
        match self.try_take() {
            Some(held) => Poll::Ready(held),
            None => Poll::Pending,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let turn = self.turn;
        turn.taken.store(false, Ordering::SeqCst);
        if turn.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let woken = {
            let mut tasks = turn.tasks();
            turn.waiting.fetch_sub(tasks.len(), Ordering::SeqCst);
            turn.free.notify_one();
            std::mem::take(&mut *tasks)
        };
        woken.into_iter().for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_task_waits_for_a_taken_turn_without_blocking_and_is_woken_when_it_is_free() {
        let turn = Turn::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let held = turn.take();
        assert!(turn.poll_take(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        drop(held);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(turn.poll_take(&mut cx).is_ready());
    }

    #[test]
    fn threads_take_turns_one_at_a_time_and_none_is_left_waiting() {
        let turn = Arc::new(Turn::default());
        let inside = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (turn, inside) = (turn.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let _held = turn.take();
                        assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                        inside.store(false, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(turn.waiting.load(Ordering::SeqCst), 0);
        assert!(turn.try_take().is_some());
    }
}
