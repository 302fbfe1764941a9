//! The vhost-user backend: rust-vmm's `VhostUserBackend` over the queue work in `worker.rs`.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;
use zerovsock_virtio::{GuestMemory, Returns, Used};
use zerovsock_wire::Features;

use crate::worker::{DeviceStats, Progress, Worker};

/// Queue indexes (virtio 1.3 §5.10.2).
pub(crate) const RX_QUEUE: u16 = 0;
pub(crate) const TX_QUEUE: u16 = 1;
/// The event queue exists (QEMU and crosvm expect three) but the VMM owns it, as with
/// in-kernel vhost-vsock.
pub(crate) const NUM_QUEUES: usize = 3;
/// Custom epoll events, after the queues and the exit event (`data > num_queues`).
pub(crate) const OUTBOUND_EVENT: u16 = 4;
pub(crate) const RETURNS_EVENT: u16 = 5;

/// One session's backend: the queue work behind a lock (the vring worker is its only user).
pub(crate) struct Backend {
    guest_cid: u64,
    queue_size: u16,
    state: Mutex<State>,
    pub(crate) returns_kick: Arc<EventFd>,
    exit: Mutex<Option<(EventConsumer, EventNotifier)>>,
}

struct State {
    worker: Worker,
    mem: Option<GuestMemoryAtomic<GuestMemory>>,
    event_idx: bool,
    used: Vec<Used>,
}

impl Backend {
    pub(crate) fn new(
        guest_cid: u64,
        queue_size: u16,
        worker: Worker,
        returns_kick: Arc<EventFd>,
    ) -> io::Result<Backend> {
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(Backend {
            guest_cid,
            queue_size,
            state: Mutex::new(State { worker, mem: None, event_idx: false, used: Vec::new() }),
            returns_kick,
            exit: Mutex::new(Some(exit)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn stats(&self) -> DeviceStats {
        self.lock().worker.stats
    }

    /// Ends the session's packets: nothing more will reach this guest, and no held chain
    /// is given back.
    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        state.worker.reset();
        state.worker.returns.detach_all();
    }

    /// Stops the session's vring worker threads.
    pub(crate) fn exit(&self) {
        let exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, notifier)) = exit.as_ref() {
            let _ = notifier.notify();
        }
    }

    /// One round of work: return released TX chains, take TX, fill RX, and come back for more
    /// only through another event, so the worker stays fair.
    fn run(&self, vrings: &[VringRwLock<GuestMemoryAtomic<GuestMemory>>]) -> io::Result<()> {
        let mut state = self.lock();
        let Some(atomic) = state.mem.clone() else { return Ok(()) };
        let mem = atomic.memory().into_inner();
        let event_idx = state.event_idx;
        let (rx, tx) = (&vrings[usize::from(RX_QUEUE)], &vrings[usize::from(TX_QUEUE)]);
        let state = &mut *state;

        // TX first: the guest's packets, and whatever their answers are.
        let mut tx_progress = Progress::default();
        loop {
            if event_idx {
                let _ = tx.disable_notification();
            }
            let round = {
                let mut guard = tx.get_mut();
                state.worker.process_tx(&mem, guard.get_queue_mut(), &mut state.used)
            };
            tx_progress.more |= round.more;
            tx_progress.blocked |= round.blocked;
            if round.more || round.blocked || !event_idx {
                break;
            }
            // Re-arm, then look once more: a chain added meanwhile would get no kick.
            if !tx.enable_notification().unwrap_or(false) {
                break;
            }
        }
        state.worker.returns.take_into(&mut state.used);
        complete(tx, &mut state.used, event_idx)?;

        // RX: the engine's packets into the guest's buffers.
        let mut rx_more = false;
        loop {
            if event_idx {
                let _ = rx.disable_notification();
            }
            let round = {
                let mut guard = rx.get_mut();
                state.worker.process_rx(&mem, guard.get_queue_mut(), &mut state.used)
            };
            rx_more |= round.more;
            if round.more || !state.worker.rx_pending() || !event_idx {
                break;
            }
            if !rx.enable_notification().unwrap_or(false) {
                break;
            }
        }
        complete(rx, &mut state.used, event_idx)?;

        // RX buffers freed room for replies: TX may go on. Either way, come back later rather
        // than loop here.
        let again =
            rx_more || tx_progress.more || (tx_progress.blocked && !state.worker.rx_pending());
        if again {
            let _ = state.worker.outbound.kick.write(1);
        }
        Ok(())
    }
}

/// Puts `used` on the ring and signals the driver if it wants to hear (EVENT_IDX).
fn complete(
    vring: &VringRwLock<GuestMemoryAtomic<GuestMemory>>,
    used: &mut Vec<Used>,
    event_idx: bool,
) -> io::Result<()> {
    if used.is_empty() {
        return Ok(());
    }
    for entry in used.drain(..) {
        // Only fails for a head index beyond the queue, which a parsed chain never has.
        let _ = vring.add_used(entry.head, entry.len);
    }
    if !event_idx || vring.needs_notification().unwrap_or(true) {
        vring.signal_used_queue()?;
    }
    Ok(())
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | Features::SEQPACKET.bits()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.lock().event_idx = enabled;
    }

    fn acked_features(&self, features: u64) {
        // `vhost_vsock_set_features`: SEQPACKET is allowed only if the driver acked it.
        let seqpacket = features & Features::SEQPACKET.bits() != 0;
        self.lock().worker.vsock.set_seqpacket(seqpacket);
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the driver takes the ring back (a reset, a stop, a migration). The
        // payloads still holding its TX chains are copied out, and those chains are never
        // returned: their heads may mean other buffers in the next ring.
        if queue_index == u32::from(TX_QUEUE) {
            self.lock().worker.returns.detach_all();
        }
        if queue_index == u32::from(RX_QUEUE) {
            self.lock().worker.drop_rx_buffers();
        }
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // `struct virtio_vsock_config { le64 guest_cid; }`; out-of-range reads get nothing.
        let config = self.guest_cid.to_le_bytes();
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        config.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        self.lock().mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << RX_QUEUE) | (1 << TX_QUEUE)]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        let (consumer, notifier) = exit.as_ref()?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            OUTBOUND_EVENT => {
                let _ = self.lock().worker.outbound.kick.read();
            }
            RETURNS_EVENT => {
                let _ = self.returns_kick.read();
            }
            _ => {}
        }
        self.run(vrings)
    }
}

/// A `Returns` whose wake-up writes `kick`.
pub(crate) fn returns_with(kick: &Arc<EventFd>) -> Arc<Returns> {
    let kick = kick.clone();
    Returns::new(move || {
        // The vring worker collects returned chains right after it runs the bridge's tasks;
        // only a chain given back on another thread needs to wake it.
        if !crate::bridge::is_helping() {
            let _ = kick.write(1);
        }
    })
}
