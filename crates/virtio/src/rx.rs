//! RX chains: the driver's empty buffers, filled one packet chunk at a time.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;
use zerovsock_proto::{Payload, Segment};
use zerovsock_wire::{Repr, SeqFlags, HEADER_LEN, MAX_PACKET_PAYLOAD};

use crate::chain::{self, ChainError, Region};
use crate::{GuestMemory, Used};

/// One RX chain: device-writable descriptors, checked, with room for at least a header.
#[derive(Debug)]
pub struct RxBuffer {
    head: u16,
    regions: smallvec::SmallVec<[Region; 4]>,
    capacity: u64,
}

/// What [`RxBuffer::fill`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxChunk {
    /// The chain to put on the used ring, with header plus payload bytes as its length.
    pub used: Used,
    /// Payload bytes taken from the packet.
    pub payload_len: usize,
}

impl RxBuffer {
    /// Checks an RX chain: every descriptor device-writable and in guest memory, at least 44
    /// bytes in all (`vhost_transport_do_send_pkt`). On error the caller returns the chain with
    /// used length 0 (vhost stops and leaks it; we do not).
    pub fn new<M>(
        mem: &GuestMemory,
        chain: DescriptorChain<M>,
    ) -> Result<RxBuffer, (u16, ChainError)>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let walked = chain::walk(mem, chain, true)?;
        if walked.total < HEADER_LEN as u64 {
            return Err((walked.head, ChainError::TooShort { len: walked.total }));
        }
        Ok(RxBuffer { head: walked.head, regions: walked.regions, capacity: walked.total })
    }

    /// The head index of the chain.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Payload bytes this buffer can take after its header.
    pub fn payload_capacity(&self) -> usize {
        usize::try_from(self.capacity - HEADER_LEN as u64).unwrap_or(usize::MAX)
    }

    /// Writes one chunk of a packet: the payload bytes from `offset` that fit, behind a copy of
    /// `header` whose length is the chunk's. SEQ_EOM and SEQ_EOR stay only on the chunk that ends
    /// the packet, as `vhost_transport_do_send_pkt` clears them on the others. Returns `None` if
    /// guest memory could not be written (the map changed under us); the chain is then returned
    /// empty by the caller.
    pub fn fill(
        &self,
        mem: &GuestMemory,
        header: &Repr,
        payload: &Payload,
        offset: usize,
    ) -> Option<RxChunk> {
        let remaining = payload.len().saturating_sub(offset);
        // Never an RW payload over 64 KiB, however large the guest's buffer.
        let chunk = remaining.min(self.payload_capacity()).min(MAX_PACKET_PAYLOAD as usize);
        let mut repr = *header;
        repr.len = chunk as u32;
        if chunk < remaining && repr.flags & SeqFlags::EOM.bits() != 0 {
            // Whatever the socket type, as vhost does: it tests the bits, not the type.
            repr.flags &= !(SeqFlags::EOM | SeqFlags::EOR).bits();
        }
        if !chain::write(mem, &self.regions, 0, &repr.to_bytes()) {
            return None;
        }
        if !write_payload(mem, &self.regions, payload, offset, chunk) {
            return None;
        }
        let used = Used { head: self.head, len: (HEADER_LEN + chunk) as u32 };
        Some(RxChunk { used, payload_len: chunk })
    }

    /// Payload bytes one packet in this buffer may carry: its room after the header, at most
    /// one RW payload (64 KiB).
    pub fn packet_room(&self) -> usize {
        self.payload_capacity().min(MAX_PACKET_PAYLOAD as usize)
    }

    /// Appends the device's addresses of the first `len` bytes of the payload area (after the
    /// header, at most [`RxBuffer::packet_room`]) to `out`, as `(address, length)` pieces, each
    /// contiguous, for a `readv` straight into the buffer; returns the bytes described. Only
    /// for a system call, while `mem` is held.
    pub fn payload_iovecs(
        &self,
        mem: &GuestMemory,
        len: usize,
        out: &mut Vec<(usize, usize)>,
    ) -> usize {
        let len = len.min(self.packet_room());
        let mut described = 0;
        for (addr, piece) in chain::pieces(mem, &self.regions, HEADER_LEN as u64, len as u64) {
            // Checked when the chain was walked; a map that lost the range stops here.
            let Ok(host) = mem.get_host_address(addr) else { break };
            out.push((host as usize, piece));
            described += piece;
        }
        described
    }

    /// Writes a header for `len` payload bytes already placed in the payload area (by a `readv`
    /// into [`RxBuffer::payload_iovecs`]).
    pub fn finish_in_place(&self, mem: &GuestMemory, header: &Repr, len: usize) -> Option<Used> {
        if len > self.payload_capacity() || len > MAX_PACKET_PAYLOAD as usize {
            return None;
        }
        let repr = Repr { len: len as u32, ..*header };
        chain::write(mem, &self.regions, 0, &repr.to_bytes())
            .then_some(Used { head: self.head, len: (HEADER_LEN + len) as u32 })
    }
}

/// Copies `len` payload bytes from `offset` into the regions after the header.
fn write_payload(
    mem: &GuestMemory,
    regions: &[Region],
    payload: &Payload,
    offset: usize,
    len: usize,
) -> bool {
    let mut at = HEADER_LEN as u64;
    let mut bounce = [0u8; 4096];
    let part = payload.slice(offset, len);
    for segment in part.segments() {
        match segment {
            Segment::Local(bytes) => {
                if !chain::write(mem, regions, at, bytes) {
                    return false;
                }
            }
            Segment::Foreign(slice) => {
                // Another guest's memory (a sibling VM): through a small bounce buffer, as
                // guest memory is never borrowed.
                let mut done = 0;
                while done < slice.len() {
                    let n = (slice.len() - done).min(bounce.len());
                    slice.read_at(done, &mut bounce[..n]);
                    if !chain::write(mem, regions, at + done as u64, &bounce[..n]) {
                        return false;
                    }
                    done += n;
                }
            }
        }
        at += segment.len() as u64;
    }
    true
}
