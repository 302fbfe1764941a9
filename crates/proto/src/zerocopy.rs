//! The MSG_ZEROCOPY ledger: completion ids, the error queue, and how buffers are tracked.
//!
//! The rules are the kernel's (`net/core/skbuff.c`, `virtio_transport_send_pkt_info()`):
//!
//! * Each socket numbers its zerocopy send passes with a `u32` that starts at 0 and wraps.
//!   One transport send pass takes one id; a pass that sends nothing takes none.
//! * A pass completes when every packet that carries its bytes has been consumed by the
//!   transport. Here that is literal: each payload segment of a zerocopy pass owns a reference to
//!   a [`PassGuard`], and the guard reports the completion when the last segment is dropped,
//!   wherever that happens (a loopback reader, a device that copied into guest memory).
//! * A completion whose `lo` directly follows the `hi` of the error queue's tail merges into
//!   the tail, which keeps the tail's COPIED flag.
//! * Outstanding and queued notifications are bounded per socket; past the bound a zerocopy
//!   send fails with ENOMEM before any data moves.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;

use crate::packet::{ForeignMemory, Payload};
use crate::SocketId;

/// One error-queue entry: the ids `lo..=hi` have completed.
///
/// This is `struct sock_extended_err` with `ee_origin = SO_EE_ORIGIN_ZEROCOPY`: `ee_info` is
/// `lo`, `ee_data` is `hi`, and `ee_code` has `SO_EE_CODE_ZEROCOPY_COPIED` when `copied`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Completion {
    /// First id in the range.
    pub lo: u32,
    /// Last id in the range (inclusive; may be below `lo` after a wrap).
    pub hi: u32,
    /// The data was copied rather than sent from the caller's buffer.
    pub copied: bool,
}

impl Completion {
    /// How many ids the range covers.
    pub fn count(&self) -> u64 {
        u64::from(self.hi.wrapping_sub(self.lo)) + 1
    }

    /// Whether `id` lies in `lo..=hi`, wrap-aware.
    pub fn contains(&self, id: u32) -> bool {
        u64::from(id.wrapping_sub(self.lo)) < self.count()
    }
}

/// Notifications one socket may hold (outstanding plus queued) before zerocopy sends fail with
/// ENOMEM. Linux bounds the same thing by `net.core.optmem_max` (128 KiB) over the ~0.6-0.8 KiB
/// each notification costs, which is in the same range.
pub const DEFAULT_NOTIFICATION_LIMIT: u32 = 128;

/// Per-socket zerocopy state.
#[derive(Debug)]
pub(crate) struct Ledger {
    next_id: u32,
    in_use: u32,
    limit: u32,
    queue: VecDeque<Completion>,
}

/// A zerocopy send was refused because the socket's notification budget is used up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BudgetExhausted;

impl Ledger {
    pub(crate) fn new(limit: u32) -> Ledger {
        Ledger { next_id: 0, in_use: 0, limit, queue: VecDeque::new() }
    }

    /// Takes the next id for a send pass.
    pub(crate) fn allocate(&mut self) -> Result<u32, BudgetExhausted> {
        if self.in_use >= self.limit {
            return Err(BudgetExhausted);
        }
        self.in_use += 1;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        Ok(id)
    }

    /// Gives back the most recent id because its pass sent nothing (`net_zcopy_put_abort`).
    pub(crate) fn abort(&mut self, id: u32) {
        if self.next_id == id.wrapping_add(1) {
            self.next_id = id;
        }
        self.in_use = self.in_use.saturating_sub(1);
    }

    /// Queues the completion of one pass, merging into the tail when the ids follow on.
    pub(crate) fn complete(&mut self, id: u32, copied: bool) {
        if let Some(tail) = self.queue.back_mut() {
            if tail.count() < u64::from(u32::MAX) && id == tail.hi.wrapping_add(1) {
                tail.hi = id;
                self.in_use = self.in_use.saturating_sub(1);
                return;
            }
        }
        self.queue.push_back(Completion { lo: id, hi: id, copied });
    }

    /// Takes the oldest queued entry (`recvmsg(MSG_ERRQUEUE)`).
    pub(crate) fn pop(&mut self) -> Option<Completion> {
        let completion = self.queue.pop_front()?;
        self.in_use = self.in_use.saturating_sub(1);
        Some(completion)
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    pub(crate) fn next_id(&self) -> u32 {
        self.next_id
    }

    pub(crate) fn set_limit(&mut self, limit: u32) {
        self.limit = limit;
    }
}

/// Told that a completion was queued (see [`crate::Engine::set_completion_notifier`]).
pub(crate) type Notifier = Arc<dyn Fn() + Send + Sync>;

/// Where guards report completions; drained by the engine.
#[derive(Default, Clone)]
pub(crate) struct CompletionSink {
    done: Arc<Mutex<Vec<(SocketId, u32, bool)>>>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl std::fmt::Debug for CompletionSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionSink").field("done", &self.done).finish_non_exhaustive()
    }
}

impl CompletionSink {
    fn push(&self, socket: SocketId, id: u32, copied: bool) {
        // A poisoned lock only means another thread panicked while pushing; the vector
        // itself is still consistent, so keep going.
        self.done.lock().unwrap_or_else(PoisonError::into_inner).push((socket, id, copied));
        if let Some(notify) = self.notifier.get() {
            notify();
        }
    }

    /// Sets the notifier, once: later calls are ignored.
    pub(crate) fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    pub(crate) fn drain(&self) -> Vec<(SocketId, u32, bool)> {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *done)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.done.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }
}

/// Tracks one zerocopy send pass; reports its completion when dropped.
#[derive(Debug)]
pub(crate) struct PassGuard {
    sink: CompletionSink,
    socket: SocketId,
    id: u32,
    copied: bool,
}

impl Drop for PassGuard {
    fn drop(&mut self) {
        self.sink.push(self.socket, self.id, self.copied);
    }
}

/// A segment that keeps its pass open for as long as it (or any slice of it) lives.
struct Guarded {
    bytes: Bytes,
    _guard: Arc<PassGuard>,
}

impl AsRef<[u8]> for Guarded {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Ties every segment of `payload` to a new guard for pass `id` of `socket`.
pub(crate) fn guard_payload(
    sink: &CompletionSink,
    socket: SocketId,
    id: u32,
    copied: bool,
    payload: Payload,
) -> Payload {
    let guard = Arc::new(PassGuard { sink: sink.clone(), socket, id, copied });
    payload.map_buffers(
        |bytes| Bytes::from_owner(Guarded { bytes, _guard: guard.clone() }),
        |memory| Arc::new(GuardedForeign { memory, _guard: guard.clone() }),
    )
}

/// Foreign memory (say, another guest's TX buffer forwarded as it is) that keeps its pass open.
struct GuardedForeign {
    memory: Arc<dyn ForeignMemory>,
    _guard: Arc<PassGuard>,
}

impl ForeignMemory for GuardedForeign {
    fn len(&self) -> usize {
        self.memory.len()
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) {
        self.memory.read_at(offset, dst);
    }

    fn as_ptr(&self) -> *const u8 {
        self.memory.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_start_at_zero_and_count_up() {
        let mut ledger = Ledger::new(8);
        assert_eq!((ledger.allocate(), ledger.allocate()), (Ok(0), Ok(1)));
    }

    #[test]
    fn abort_reuses_the_id() {
        let mut ledger = Ledger::new(8);
        let id = ledger.allocate().unwrap();
        ledger.abort(id);
        assert_eq!(ledger.allocate(), Ok(id));
    }

    #[test]
    fn consecutive_completions_merge_and_keep_tail_flag() {
        let mut ledger = Ledger::new(8);
        for _ in 0..3 {
            ledger.allocate().unwrap();
        }
        ledger.complete(0, false);
        ledger.complete(1, true);
        ledger.complete(2, true);
        assert_eq!(ledger.pop(), Some(Completion { lo: 0, hi: 2, copied: false }));
        assert_eq!(ledger.pop(), None);
    }

    #[test]
    fn gap_starts_a_new_entry() {
        let mut ledger = Ledger::new(8);
        ledger.complete(0, false);
        ledger.complete(2, true);
        assert_eq!(ledger.pop(), Some(Completion { lo: 0, hi: 0, copied: false }));
        assert_eq!(ledger.pop(), Some(Completion { lo: 2, hi: 2, copied: true }));
    }

    #[test]
    fn merge_wraps_past_u32_max() {
        let mut ledger = Ledger::new(8);
        ledger.complete(u32::MAX, false);
        ledger.complete(0, false);
        let merged = ledger.pop().unwrap();
        assert_eq!((merged.lo, merged.hi, merged.count()), (u32::MAX, 0, 2));
        assert!(merged.contains(u32::MAX) && merged.contains(0) && !merged.contains(1));
    }

    #[test]
    fn budget_exhaustion_is_reported_and_freed_by_reading() {
        let mut ledger = Ledger::new(2);
        ledger.allocate().unwrap();
        ledger.allocate().unwrap();
        assert_eq!(ledger.allocate(), Err(BudgetExhausted));
        ledger.complete(0, false);
        ledger.complete(1, false); // merges: frees one slot
        assert!(ledger.allocate().is_ok());
        assert_eq!(ledger.allocate(), Err(BudgetExhausted));
        ledger.pop();
        assert!(ledger.allocate().is_ok());
    }

    #[test]
    fn guard_reports_once_every_slice_is_dropped() {
        let sink = CompletionSink::default();
        let payload = guard_payload(
            &sink,
            SocketId(7),
            3,
            false,
            Payload::from_bytes(Bytes::from_static(b"hello world")),
        );
        let slice = payload.slice(6, 5);
        drop(payload);
        assert!(sink.is_empty());
        drop(slice);
        assert_eq!(sink.drain(), vec![(SocketId(7), 3, false)]);
    }

    proptest! {
        /// Against a model that keeps every completion apart: reading the merged queue yields
        /// the same ids, in order, each exactly once.
        #[test]
        fn merged_queue_covers_exactly_the_completed_ids(
            start in any::<u32>(),
            steps in proptest::collection::vec((1u32..4, any::<bool>()), 1..64),
        ) {
            let mut ledger = Ledger::new(u32::MAX);
            let mut model = Vec::new();
            let mut id = start;
            for (gap, copied) in steps {
                ledger.complete(id, copied);
                model.push(id);
                id = id.wrapping_add(gap);
            }
            let mut seen = Vec::new();
            while let Some(entry) = ledger.pop() {
                let mut id = entry.lo;
                for _ in 0..entry.count() {
                    seen.push(id);
                    id = id.wrapping_add(1);
                }
            }
            prop_assert_eq!(seen, model);
        }
    }
}
