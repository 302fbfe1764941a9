//! The virtio half of a virtio-vsock device, over guest memory: no sockets, no threads.
//!
//! * TX (driver to device): [`TxPacket::parse`] copies the 44-byte header out of a descriptor
//!   chain once (it may be split over descriptors) and describes the payload as guest-memory
//!   segments of a [`Payload`], over any number of descriptors (Linux sends one per page for
//!   MSG_ZEROCOPY and for writes over 32 KiB) and through indirect tables. Nothing is copied:
//!   the chain is given back ([`Returns`]) when the last view of the payload is dropped, by
//!   whoever consumed it. [`TxPacket::parse_copied`] copies the payload instead and gives the
//!   chain back at once, for when a device must not hold more chains.
//! * RX (device to driver): [`RxBuffer`] is one chain of device-writable descriptors; it takes
//!   one chunk of a packet, header and payload, and splits the way `vhost_transport_do_send_pkt`
//!   does: each chunk has its own header with its own length, and SEQ_EOM / SEQ_EOR only on the
//!   last chunk.
//!
//! Guest memory is hostile: every descriptor is checked against the guest's memory map, every
//! length against its bounds, before anything is read; a chain that fails is described by a
//! [`ChainError`] and must still be returned to the used ring by the caller (with length 0).
//! Rust code never holds a reference into guest memory: bytes are copied with vm-memory's
//! volatile accessors or handed to the kernel by address.

#![forbid(unsafe_code)]

mod chain;
mod rx;
mod tx;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

pub use chain::ChainError;
pub use rx::{RxBuffer, RxChunk};
pub use tx::TxPacket;
pub use zerovsock_proto::Payload;

/// Guest memory as the device maps it (shared with the VMM, written by the guest at any time).
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// The largest TX chain a device accepts: a 64 KiB payload and its header
/// (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE + VIRTIO_VSOCK_SKB_HEADROOM` in `vhost_vsock_alloc_skb`).
pub const MAX_TX_CHAIN_LEN: usize =
    zerovsock_wire::MAX_PACKET_PAYLOAD as usize + zerovsock_wire::HEADER_LEN;

/// One chain to put on the used ring: its head index and the bytes the device wrote into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The head descriptor's index.
    pub head: u16,
    /// Bytes written (0 for TX chains, as vhost reports them).
    pub len: u32,
}

/// Chains whose payload has been consumed, waiting to go back on the used ring.
///
/// A [`TxPacket`]'s payload holds a token; when its last view is dropped (on whichever thread
/// consumed it) the token files the chain here and calls the wake-up given at construction, so
/// the queue's owner can return it. [`Returns::outstanding`] counts chains still held, for a
/// device that bounds them.
pub struct Returns {
    done: Mutex<Vec<Used>>,
    outstanding: AtomicUsize,
    wake: Box<dyn Fn() + Send + Sync>,
    /// Bumped by [`Returns::detach_all`]: tokens of an earlier generation return nothing.
    generation: AtomicU64,
    /// The guest slices handed out, to copy out when the ring goes away under them.
    live: Mutex<Vec<Weak<tx::GuestSlice>>>,
}

impl Returns {
    /// A queue that calls `wake` when a held chain is given back.
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Arc<Returns> {
        Arc::new(Returns {
            done: Mutex::new(Vec::new()),
            outstanding: AtomicUsize::new(0),
            wake: Box::new(wake),
            generation: AtomicU64::new(0),
            live: Mutex::new(Vec::new()),
        })
    }

    /// Chains handed out in payloads and not yet given back.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Whether chains were given back and not taken yet.
    pub fn has_returned(&self) -> bool {
        !self.done.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }

    /// Takes every chain given back so far.
    pub fn take(&self) -> Vec<Used> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Appends the chains given back so far to `out`.
    pub fn take_into(&self, out: &mut Vec<Used>) {
        out.append(&mut self.done.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn hold(self: &Arc<Returns>, used: Used) -> Arc<ChainToken> {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let generation = self.generation.load(Ordering::Acquire);
        Arc::new(ChainToken { used, generation, returns: self.clone() })
    }

    fn track(&self, slice: &Arc<tx::GuestSlice>) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget the dead now and then, so the list stays near the number held.
        if live.len() >= 64 && live.len() >= 4 * self.outstanding().max(1) {
            live.retain(|weak| weak.strong_count() > 0);
        }
        live.push(Arc::downgrade(slice));
    }

    /// The ring the chains came from is going away (the driver stops or resets the queue,
    /// `GET_VRING_BASE`): every held payload is copied out of guest memory now, so it no
    /// longer needs its chain, and no held chain will be given back (its head may mean
    /// another buffer in the next ring). Returns how many chains were held. Linux never
    /// holds a chain past its TX handler, so it has nothing to do here.
    pub fn detach_all(&self) -> usize {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let live = std::mem::take(&mut *self.live.lock().unwrap_or_else(PoisonError::into_inner));
        for slice in live.iter().filter_map(Weak::upgrade) {
            slice.detach();
        }
        self.done.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.outstanding.swap(0, Ordering::AcqRel)
    }
}

impl std::fmt::Debug for Returns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Returns").field("outstanding", &self.outstanding()).finish_non_exhaustive()
    }
}

/// One held chain; dropping the last reference gives it back.
struct ChainToken {
    used: Used,
    generation: u64,
    returns: Arc<Returns>,
}

impl Drop for ChainToken {
    fn drop(&mut self) {
        let returns = &self.returns;
        {
            let mut done = returns.done.lock().unwrap_or_else(PoisonError::into_inner);
            // Checked under the lock `detach_all` clears, so a chain is never filed into
            // the next ring's returns.
            if returns.generation.load(Ordering::Acquire) != self.generation {
                return;
            }
            done.push(self.used);
            returns.outstanding.fetch_sub(1, Ordering::AcqRel);
        }
        (returns.wake)();
    }
}

#[cfg(test)]
mod tests;
