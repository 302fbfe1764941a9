//! One caller at a time per socket direction, for threads and tasks alike.
//!
//! A blocking send may take several passes and wait for credit in between; a blocking STREAM
//! read may gather several leases until SO_RCVLOWAT is met. Neither may interleave with another
//! call in the same direction (bytes would mix, zerocopy ids would cross). A thread waits for
//! its turn on a condition variable; a task that finds the turn taken is parked with its waker
//! instead of blocking its executor's thread, and is woken when the turn is given back.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
pub(crate) struct Turn {
    state: Mutex<State>,
    free: Condvar,
}

#[derive(Debug, Default)]
struct State {
    taken: bool,
    tasks: Vec<Waker>,
}

/// Holds the turn; gives it back when dropped.
#[derive(Debug)]
pub(crate) struct Held<'a> {
    turn: &'a Turn,
}

impl Turn {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits (blocking the thread) for the turn.
    pub(crate) fn take(&self) -> Held<'_> {
        let mut state = self.state();
        while state.taken {
            state = self.free.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.taken = true;
        Held { turn: self }
    }

    /// Takes the turn if it is free; otherwise registers the task to be woken when it is.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Held<'_>> {
        let mut state = self.state();
        if state.taken {
            if !state.tasks.iter().any(|task| task.will_wake(cx.waker())) {
                state.tasks.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        state.taken = true;
        Poll::Ready(Held { turn: self })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let tasks = {
            let mut state = self.turn.state();
            state.taken = false;
            std::mem::take(&mut state.tasks)
        };
        self.turn.free.notify_one();
        tasks.into_iter().for_each(Waker::wake);
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
}
