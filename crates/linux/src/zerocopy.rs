//! Keeping zerocopy buffers alive until the kernel is done with them.
//!
//! With `MSG_ZEROCOPY` the kernel takes references to the pages of the send and reads them
//! after `sendmsg` returns: on loopback until the receiving application has read the data, on
//! virtio until the device has consumed the descriptors. The pages are free again when the
//! completion for the send's id arrives on the error queue. The kernel numbers ids per socket,
//! from 0, one per transport send *pass*; the [`Tracker`] mirrors that counter and holds each
//! buffer until a completion covers its id.
//!
//! Keeping the mirror exact:
//! * STREAM sends are issued with `MSG_DONTWAIT` and the library does the waiting. Without the
//!   socket lock being dropped mid-call, the kernel makes exactly one pass per call (it takes
//!   whatever credit there is, then finds none left), so one call that moved bytes is one id.
//! * A SEQPACKET message must go in one call, so a blocking call may make several passes when
//!   the message exceeds the free credit, each with its own id. Its first pass is then a copy
//!   (COPIED); a later pass that starts exactly at an iovec boundary may be zerocopied. The
//!   tracker cannot see how many ids a call took, so on SEQPACKET it matches only completions
//!   that cannot hide one: a single id, the oldest not yet completed, without COPIED. The
//!   kernel merges consecutive completions into one range that keeps the first one's flag, so
//!   a zerocopied message followed by a copied multi-pass one arrives as one range without
//!   COPIED; matching it would release the buffers of later sends, whose kernel ids lie beyond
//!   it, while the kernel still reads them. Any other SEQPACKET completion (COPIED, a range of
//!   several ids, an id out of order) stops the matching: the buffers still held stay held until
//!   the socket is closed, and are then leaked.
//! * A completion for an id the mirror never handed out means the same; it is handled the
//!   same way.
//!
//! Closing a socket with buffers in flight: `Drop` waits up to the linger time for their
//! completions (the kernel drops notifications of a closed socket, so this is the last chance
//! to learn of them); buffers still not covered are leaked, never freed, so no freed memory is
//! ever read by the kernel. [`leaked_buffers`] counts them.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use zerovsock_proto::Completion;

static LEAKED: AtomicUsize = AtomicUsize::new(0);

/// Buffers this process leaked because their sockets (or io_uring rings) closed before the
/// kernel reported them done (see the module documentation).
pub fn leaked_buffers() -> usize {
    LEAKED.load(Ordering::Relaxed)
}

/// Gives up on memory the kernel may still read: it is counted and never freed.
pub(crate) fn leak<T: ?Sized>(owner: Box<T>) {
    LEAKED.fetch_add(1, Ordering::Relaxed);
    std::mem::forget(owner);
}

/// Anything that keeps a buffer's memory alive.
pub(crate) type Owner = Box<dyn Any + Send>;

struct Pinned {
    key: u64,
    /// Ids of the passes that carried these buffers, not yet completed.
    ids: Vec<u32>,
    /// The send is still going: more passes (ids) may come.
    open: bool,
    owners: Vec<Owner>,
}

impl Pinned {
    fn done(&self) -> bool {
        !self.open && self.ids.is_empty()
    }
}

/// A send in progress whose buffers are pinned (see [`Tracker::open`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SendKey(u64);

/// Per-socket record of ids and the buffers they pin.
#[derive(Default)]
pub(crate) struct Tracker {
    next_id: u32,
    next_key: u64,
    pinned: VecDeque<Pinned>,
    /// Completions read from the kernel, not yet handed to the application.
    queue: VecDeque<Completion>,
    /// Ids can no longer be matched to buffers: hold everything until close.
    lost_sync: bool,
    /// SEQPACKET: every id before this one has completed; the next completion must be this id.
    next_completion: u32,
}

impl Tracker {
    /// The id the next send pass will take (the kernel's `sk_zckey`, mirrored).
    pub(crate) fn next_id(&self) -> u32 {
        self.next_id
    }

    /// Records a send pass that moved bytes with SO_ZEROCOPY on: it took the next id.
    fn take_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Pins `owners` for a send about to start: they stay until the send is closed and every
    /// id recorded for it has completed.
    pub(crate) fn open(&mut self, owners: Vec<Owner>) -> SendKey {
        let key = self.next_key;
        self.next_key += 1;
        self.pinned.push_back(Pinned { key, ids: Vec::new(), open: true, owners });
        SendKey(key)
    }

    /// Records a pass of the send before it is made: it will take the next id, which pins the
    /// send's buffers from now on (so a completion can never be matched before its id is known).
    pub(crate) fn pass(&mut self, send: SendKey) -> u32 {
        let id = self.take_id();
        if let Some(pinned) = self.pinned.iter_mut().find(|p| p.key == send.0) {
            pinned.ids.push(id);
        }
        id
    }

    /// The pass recorded as `id` moved no bytes, so the kernel took no id: give it back. Sends
    /// are serialised, so it is still the newest id.
    pub(crate) fn unpass(&mut self, send: SendKey, id: u32) {
        if self.next_id == id.wrapping_add(1) {
            self.next_id = id;
        }
        if let Some(pinned) = self.pinned.iter_mut().find(|p| p.key == send.0) {
            pinned.ids.retain(|i| *i != id);
        }
    }

    /// The send is over: no more passes.
    pub(crate) fn close(&mut self, send: SendKey) {
        if let Some(pinned) = self.pinned.iter_mut().find(|p| p.key == send.0) {
            pinned.open = false;
        }
        self.release();
    }

    fn release(&mut self) {
        if !self.lost_sync {
            self.pinned.retain(|pinned| !pinned.done());
        }
    }

    /// Takes a completion read from the error queue: releases what it covers and keeps it for
    /// the application. `seqpacket` marks the socket type (see the module documentation).
    pub(crate) fn completed(&mut self, completion: Completion, seqpacket: bool) {
        self.queue.push_back(completion);
        let beyond = (completion.hi.wrapping_sub(self.next_id) as i32) >= 0;
        if beyond || (seqpacket && !self.unambiguous(completion)) {
            self.lost_sync = true;
        }
        if self.lost_sync {
            return;
        }
        if seqpacket {
            self.next_completion = completion.hi.wrapping_add(1);
        }
        for pinned in &mut self.pinned {
            pinned.ids.retain(|id| !completion.contains(*id));
        }
        self.release();
    }

    /// A SEQPACKET completion that cannot hide a pass the tracker never saw: one id, the oldest
    /// outstanding, zerocopied (so its message went in that one pass).
    fn unambiguous(&self, completion: Completion) -> bool {
        !completion.copied
            && completion.lo == completion.hi
            && completion.lo == self.next_completion
    }

    /// The oldest completion read but not yet handed out.
    pub(crate) fn pop(&mut self) -> Option<Completion> {
        self.queue.pop_front()
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Buffers still pinned.
    pub(crate) fn pinned(&self) -> usize {
        self.pinned.len()
    }

    /// Whether every buffer could still be released by a completion.
    pub(crate) fn in_sync(&self) -> bool {
        !self.lost_sync
    }

    /// Gives up on the buffers still pinned: they are leaked, never freed.
    pub(crate) fn leak_pinned(&mut self) {
        for pinned in self.pinned.drain(..) {
            pinned.owners.into_iter().for_each(leak);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn owner(buffer: &Arc<Vec<u8>>) -> Vec<Owner> {
        vec![Box::new(buffer.clone())]
    }

    impl Tracker {
        /// One send of one pass.
        fn sent(&mut self, owners: Vec<Owner>) -> u32 {
            let id = self.next_id;
            let send = self.open(owners);
            self.pass(send);
            self.close(send);
            id
        }
    }

    #[test]
    fn a_buffer_sent_in_several_passes_waits_for_all_of_them() {
        let buffer = Arc::new(vec![0u8]);
        let mut tracker = Tracker::default();
        let send = tracker.open(owner(&buffer));
        tracker.pass(send);
        tracker.pass(send);
        tracker.close(send);
        tracker.completed(Completion { lo: 1, hi: 1, copied: true }, false);
        assert_eq!(Arc::strong_count(&buffer), 2);
        tracker.completed(Completion { lo: 0, hi: 0, copied: true }, false);
        assert_eq!(Arc::strong_count(&buffer), 1);
    }

    #[test]
    fn a_completion_releases_the_buffers_it_covers() {
        let (a, b) = (Arc::new(vec![1u8]), Arc::new(vec![2u8]));
        let mut tracker = Tracker::default();
        assert_eq!(tracker.sent(owner(&a)), 0);
        assert_eq!(tracker.sent(owner(&b)), 1);
        tracker.completed(Completion { lo: 0, hi: 0, copied: false }, false);
        assert_eq!((Arc::strong_count(&a), Arc::strong_count(&b)), (1, 2));
        tracker.completed(Completion { lo: 1, hi: 1, copied: false }, false);
        assert_eq!(Arc::strong_count(&b), 1);
        assert_eq!(tracker.pop().map(|c| c.lo), Some(0));
    }

    #[test]
    fn a_send_still_going_keeps_its_buffers_even_when_its_passes_completed() {
        let buffer = Arc::new(vec![0u8]);
        let mut tracker = Tracker::default();
        let send = tracker.open(owner(&buffer));
        tracker.pass(send);
        tracker.completed(Completion { lo: 0, hi: 0, copied: true }, false);
        assert_eq!(Arc::strong_count(&buffer), 2, "more passes may still use it");
        let id = tracker.pass(send);
        tracker.unpass(send, id);
        assert_eq!(tracker.next_id(), 1, "a pass that moved nothing gives its id back");
        tracker.close(send);
        assert_eq!(Arc::strong_count(&buffer), 1);
    }

    #[test]
    fn a_send_that_took_no_id_releases_at_close() {
        let buffer = Arc::new(vec![0u8]);
        let mut tracker = Tracker::default();
        let send = tracker.open(owner(&buffer));
        tracker.close(send);
        assert_eq!(Arc::strong_count(&buffer), 1);
    }

    #[test]
    fn merged_ranges_release_every_buffer_inside() {
        let buffers: Vec<_> = (0..3).map(|i| Arc::new(vec![i as u8])).collect();
        let mut tracker = Tracker::default();
        for buffer in &buffers {
            tracker.sent(owner(buffer));
        }
        tracker.completed(Completion { lo: 0, hi: 2, copied: false }, false);
        assert!(buffers.iter().all(|b| Arc::strong_count(b) == 1));
        assert_eq!(tracker.pinned(), 0);
    }

    #[test]
    fn an_unexpected_id_stops_matching_and_holds_everything() {
        let buffer = Arc::new(vec![0u8]);
        let mut tracker = Tracker::default();
        tracker.sent(owner(&buffer));
        tracker.completed(Completion { lo: 0, hi: 1, copied: true }, false);
        assert!(!tracker.in_sync());
        assert_eq!(Arc::strong_count(&buffer), 2, "held: id 0 might not be the send we think");
    }

    #[test]
    fn copied_seqpacket_completion_stops_matching() {
        let buffer = Arc::new(vec![0u8]);
        let mut tracker = Tracker::default();
        tracker.sent(owner(&buffer));
        tracker.sent(owner(&buffer));
        tracker.completed(Completion { lo: 0, hi: 0, copied: true }, true);
        assert!(!tracker.in_sync());
        assert_eq!(tracker.pinned(), 2);
    }

    /// Z (zerocopied, id 0), then M, one SEQPACKET message bigger than the free credit that the
    /// kernel copied in two passes (ids 1 and 2; the tracker saw one call, id 1), then N
    /// (zerocopied, kernel id 3, tracker id 2). The kernel merges 0, 1 and 2 into one range that
    /// keeps id 0's flag: no COPIED, nothing beyond the ids handed out.
    #[test]
    fn a_merged_seqpacket_range_does_not_release_a_later_send() {
        let (z, m, n) = (Arc::new(vec![0u8]), Arc::new(vec![1u8]), Arc::new(vec![2u8]));
        let mut tracker = Tracker::default();
        tracker.sent(owner(&z));
        tracker.sent(owner(&m));
        assert_eq!(tracker.sent(owner(&n)), 2);
        tracker.completed(Completion { lo: 0, hi: 2, copied: false }, true);
        assert_eq!(Arc::strong_count(&n), 2, "id 2 may be M's second pass; N's may be 3");
    }

    #[test]
    fn single_seqpacket_completions_in_order_release_their_buffers() {
        let (a, b) = (Arc::new(vec![1u8]), Arc::new(vec![2u8]));
        let mut tracker = Tracker::default();
        tracker.sent(owner(&a));
        tracker.sent(owner(&b));
        tracker.completed(Completion { lo: 0, hi: 0, copied: false }, true);
        tracker.completed(Completion { lo: 1, hi: 1, copied: false }, true);
        assert!(tracker.in_sync());
        assert_eq!((Arc::strong_count(&a), Arc::strong_count(&b)), (1, 1));
    }

    #[test]
    fn a_seqpacket_completion_out_of_order_stops_matching() {
        let (a, b) = (Arc::new(vec![1u8]), Arc::new(vec![2u8]));
        let mut tracker = Tracker::default();
        tracker.sent(owner(&a));
        tracker.sent(owner(&b));
        tracker.completed(Completion { lo: 1, hi: 1, copied: false }, true);
        assert!(!tracker.in_sync());
        assert_eq!(Arc::strong_count(&b), 2, "id 1 may be the first message's second pass");
    }

    #[test]
    fn leaking_never_frees() {
        let buffer = Arc::new(vec![0u8]);
        let mut tracker = Tracker::default();
        tracker.sent(owner(&buffer));
        let before = leaked_buffers();
        tracker.leak_pinned();
        assert_eq!(Arc::strong_count(&buffer), 2);
        assert_eq!(leaked_buffers(), before + 1);
    }

    #[test]
    fn ids_wrap_like_the_kernel_counter() {
        let mut tracker = Tracker { next_id: u32::MAX, ..Tracker::default() };
        let buffer = Arc::new(vec![0u8]);
        assert_eq!(tracker.sent(owner(&buffer)), u32::MAX);
        assert_eq!(tracker.sent(owner(&buffer)), 0);
        tracker.completed(Completion { lo: u32::MAX, hi: 0, copied: false }, false);
        assert!(tracker.in_sync());
        assert_eq!(Arc::strong_count(&buffer), 1);
    }
}
