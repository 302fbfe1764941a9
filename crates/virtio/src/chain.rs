//! Walking a descriptor chain and checking every descriptor against guest memory.

use std::ops::Deref;

use smallvec::SmallVec;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemory;

/// What is wrong with a chain. The chain must still go back on the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// A TX chain had a device-writable descriptor (vhost: "Expected 0 input buffers").
    #[error("TX chain has a device-writable descriptor")]
    WritableInTx,
    /// An RX chain had a device-readable descriptor (vhost: "Expected 0 output buffers").
    #[error("RX chain has a device-readable descriptor")]
    ReadableInRx,
    /// Fewer bytes than a header.
    #[error("chain of {len} bytes cannot hold the 44-byte header")]
    TooShort {
        /// The chain's total length.
        len: u64,
    },
    /// More than a header and a 64 KiB payload (TX).
    #[error("TX chain of {len} bytes exceeds the 64 KiB payload limit")]
    TooLong {
        /// The chain's total length.
        len: u64,
    },
    /// A descriptor points outside guest memory, or its end overflows.
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    BadAddress {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The header's length field exceeds the payload the chain carries.
    #[error("header says {claimed} payload bytes, the chain carries {available}")]
    LengthMismatch {
        /// `hdr.len`.
        claimed: u32,
        /// Chain bytes after the header.
        available: u64,
    },
    /// The chain has no descriptor at all (a broken table or indirect descriptor).
    #[error("chain has no usable descriptor")]
    Empty,
}

/// One descriptor, checked: `len` bytes at `addr` lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
}

/// A chain's descriptors, all of one direction, each checked against guest memory.
#[derive(Debug)]
pub(crate) struct Walked {
    pub(crate) head: u16,
    pub(crate) regions: SmallVec<[Region; 4]>,
    pub(crate) total: u64,
}

/// Walks `chain` (the iterator follows indirect tables and stops after the queue size, so a loop
/// ends), requiring every descriptor to be writable (`writable`) or readable, and in memory.
/// Zero-length descriptors are skipped.
pub(crate) fn walk<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    writable: bool,
) -> Result<Walked, (u16, ChainError)>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let mut regions = SmallVec::new();
    let mut total = 0u64;
    let mut seen = false;
    for descriptor in chain {
        seen = true;
        if descriptor.is_write_only() != writable {
            let error = if writable { ChainError::ReadableInRx } else { ChainError::WritableInTx };
            return Err((head, error));
        }
        if descriptor.len() == 0 {
            continue;
        }
        let region = Region { addr: descriptor.addr(), len: descriptor.len() };
        if !in_memory(mem, region) {
            return Err((head, ChainError::BadAddress { addr: region.addr.0, len: region.len }));
        }
        total += u64::from(region.len);
        regions.push(region);
    }
    if !seen {
        return Err((head, ChainError::Empty));
    }
    Ok(Walked { head, regions, total })
}

/// Whether all of `region` is guest memory (possibly over several memory regions).
fn in_memory(mem: &GuestMemory, region: Region) -> bool {
    region.addr.checked_add(u64::from(region.len)).is_some()
        && GuestMemoryBackend::check_range(mem, region.addr, region.len as usize)
}

/// Guest-memory pieces covering `len` bytes from `offset` into `regions`, each inside one
/// memory region (so contiguous in the device's address space too).
pub(crate) fn pieces<'a>(
    mem: &'a GuestMemory,
    regions: &'a [Region],
    offset: u64,
    len: u64,
) -> impl Iterator<Item = (GuestAddress, usize)> + 'a {
    let mut skip = offset;
    let mut want = len;
    regions
        .iter()
        .filter_map(move |region| {
            let region_len = u64::from(region.len);
            if want == 0 || skip >= region_len {
                skip = skip.saturating_sub(region_len);
                return None;
            }
            let take = (region_len - skip).min(want);
            let start = region.addr.unchecked_add(skip);
            skip = 0;
            want -= take;
            Some((start, take))
        })
        .flat_map(move |(start, take)| split_by_memory_region(mem, start, take))
}

/// Splits `len` bytes at `addr` where guest memory regions meet. The range was checked.
fn split_by_memory_region(
    mem: &GuestMemory,
    addr: GuestAddress,
    len: u64,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut at = addr;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let (region, offset) = mem.to_region_addr(at)?;
        let take = (region.len() - offset.raw_value()).min(left);
        let piece = (at, take as usize);
        at = at.unchecked_add(take);
        left -= take;
        Some(piece)
    })
}

/// Copies `dst.len()` bytes from `offset` into the chain's regions out of guest memory.
pub(crate) fn read(mem: &GuestMemory, regions: &[Region], offset: u64, dst: &mut [u8]) -> bool {
    let mut at = 0;
    for (addr, len) in pieces(mem, regions, offset, dst.len() as u64) {
        if mem.read_slice(&mut dst[at..at + len], addr).is_err() {
            return false;
        }
        at += len;
    }
    at == dst.len()
}

/// Copies `src` into the chain's regions at `offset`.
pub(crate) fn write(mem: &GuestMemory, regions: &[Region], offset: u64, src: &[u8]) -> bool {
    let mut at = 0;
    for (addr, len) in pieces(mem, regions, offset, src.len() as u64) {
        if mem.write_slice(&src[at..at + len], addr).is_err() {
            return false;
        }
        at += len;
    }
    at == src.len()
}
