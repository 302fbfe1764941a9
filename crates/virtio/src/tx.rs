//! TX chains: the driver's packets, read once and described in place.

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes as _, GuestAddress, GuestMemoryBackend};
use zerovsock_proto::{ForeignMemory, Payload};
use zerovsock_wire::{Header, HEADER_LEN};

use crate::chain::{self, ChainError};
use crate::{ChainToken, GuestMemory, Returns, Used, MAX_TX_CHAIN_LEN};

/// One packet from the driver's TX queue.
#[derive(Debug)]
pub struct TxPacket {
    /// The head index of the chain it came in.
    pub head: u16,
    /// The header bytes, copied out of guest memory once (later guest writes cannot change
    /// them). Not yet validated beyond its length: the engine parses it.
    pub header: [u8; HEADER_LEN],
    /// Exactly `hdr.len` bytes; guest memory itself unless the packet was copied.
    pub payload: Payload,
}

impl TxPacket {
    /// Parses a TX chain and holds it: the payload's segments are views of guest memory, and
    /// the chain goes back to `returns` (with used length 0, as vhost reports TX chains) when
    /// the last of them is dropped. A packet without payload holds nothing: the caller returns
    /// its chain at once ([`TxPacket::held`] says which).
    ///
    /// The rules are `vhost_vsock_alloc_skb`'s: only device-readable descriptors, at least a
    /// header and at most a header plus 64 KiB in all, and `hdr.len` no more than what follows
    /// the header. Bytes after `hdr.len` are ignored. On error the caller must still return
    /// the chain (vhost drops the skb but never returns the chain; we do not leak it).
    pub fn parse<M>(
        mem: &Arc<GuestMemory>,
        chain: DescriptorChain<M>,
        returns: &Arc<Returns>,
    ) -> Result<TxPacket, (u16, ChainError)>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let (walked, header, len) = read_header(mem, chain)?;
        let head = walked.head;
        let mut payload = Payload::new();
        if len > 0 {
            let token = returns.hold(Used { head, len: 0 });
            for (addr, piece) in chain::pieces(mem, &walked.regions, HEADER_LEN as u64, len) {
                let host = mem.get_host_address(addr).map(|p| p as usize).unwrap_or(0);
                let slice = Arc::new(GuestSlice {
                    mem: mem.clone(),
                    addr,
                    len: piece,
                    host,
                    copy: OnceLock::new(),
                    _chain: token.clone(),
                });
                returns.track(&slice);
                payload.push_foreign(slice);
            }
        }
        Ok(TxPacket { head, header, payload })
    }

    /// Parses a TX chain like [`TxPacket::parse`] but copies the payload out, so the chain can
    /// be returned at once.
    pub fn parse_copied<M>(
        mem: &GuestMemory,
        chain: DescriptorChain<M>,
    ) -> Result<TxPacket, (u16, ChainError)>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let (walked, header, len) = read_header(mem, chain)?;
        let mut bytes = vec![0u8; len as usize];
        if !chain::read(mem, &walked.regions, HEADER_LEN as u64, &mut bytes) {
            return Err((walked.head, ChainError::BadAddress { addr: 0, len: len as u32 }));
        }
        Ok(TxPacket { head: walked.head, header, payload: Payload::from_bytes(Bytes::from(bytes)) })
    }

    /// Whether the payload holds the chain (the caller must not return it itself).
    pub fn held(&self) -> bool {
        self.payload.has_foreign()
    }
}

/// Walks the chain, checks its lengths and copies the header out; returns the payload length.
fn read_header<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
) -> Result<(chain::Walked, [u8; HEADER_LEN], u64), (u16, ChainError)>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let walked = chain::walk(mem, chain, false)?;
    let head = walked.head;
    if walked.total < HEADER_LEN as u64 {
        return Err((head, ChainError::TooShort { len: walked.total }));
    }
    if walked.total > MAX_TX_CHAIN_LEN as u64 {
        return Err((head, ChainError::TooLong { len: walked.total }));
    }
    let mut header = [0u8; HEADER_LEN];
    if !chain::read(mem, &walked.regions, 0, &mut header) {
        return Err((head, ChainError::BadAddress { addr: 0, len: HEADER_LEN as u32 }));
    }
    let claimed = Header::new_checked(&header[..]).map(|view| view.len()).unwrap_or(0);
    let available = walked.total - HEADER_LEN as u64;
    if u64::from(claimed) > available {
        return Err((head, ChainError::LengthMismatch { claimed, available }));
    }
    Ok((walked, header, u64::from(claimed)))
}

/// A piece of a held TX chain's payload, inside one guest memory region.
pub(crate) struct GuestSlice {
    mem: Arc<GuestMemory>,
    addr: GuestAddress,
    len: usize,
    /// The device's address of `addr` (for iovecs), found when the chain was checked.
    host: usize,
    /// The bytes, copied out when the ring went away (`Returns::detach_all`).
    copy: OnceLock<Box<[u8]>>,
    _chain: Arc<ChainToken>,
}

impl GuestSlice {
    /// Copies the bytes out of guest memory, for good.
    pub(crate) fn detach(&self) {
        self.copy.get_or_init(|| {
            let mut bytes = vec![0u8; self.len].into_boxed_slice();
            if self.mem.read_slice(&mut bytes, self.addr).is_err() {
                bytes.fill(0);
            }
            bytes
        });
    }
}

impl ForeignMemory for GuestSlice {
    fn len(&self) -> usize {
        self.len
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len, "read past a guest slice");
        if let Some(copy) = self.copy.get() {
            dst.copy_from_slice(&copy[offset..offset + dst.len()]);
            return;
        }
        // The range was checked against this very memory map, which the slice keeps alive, so
        // the read cannot fail; should it, the reader sees zeros rather than stale bytes.
        if self.mem.read_slice(dst, self.addr.unchecked_add(offset as u64)).is_err() {
            dst.fill(0);
        }
    }

    fn as_ptr(&self) -> *const u8 {
        match self.copy.get() {
            Some(copy) => copy.as_ptr(),
            None => self.host as *const u8,
        }
    }
}
