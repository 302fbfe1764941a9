//! Packets as the engine hands them to a transport and takes them back.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;
use zerovsock_wire::Repr;

/// Memory a payload may carry but Rust code never borrows: a guest's RAM, mapped shared with
/// the VMM and written by the guest at any time. It is only ever copied out
/// ([`ForeignMemory::read_at`]) or handed to the kernel by address ([`ForeignMemory::as_ptr`],
/// for `writev`), so no `&[u8]` into it exists.
///
/// Dropping the last reference is the owner's signal that every reader is done with it (a
/// device returns the guest's descriptor chain then).
pub trait ForeignMemory: Send + Sync + 'static {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// Whether the memory is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `dst.len()` bytes starting at `offset` into `dst`. Callers keep
    /// `offset + dst.len() <= len()`; an implementation may panic otherwise.
    fn read_at(&self, offset: usize, dst: &mut [u8]);

    /// The address of the first byte, valid for `len()` bytes while `self` lives. Only for
    /// handing to a system call (an iovec); never to be turned into a Rust reference.
    fn as_ptr(&self) -> *const u8;
}

/// A packet payload: a list of shared buffers, never forced to be contiguous.
///
/// A segment may be the application's own buffer (a zerocopy send), an internal copy, or
/// memory a transport owns ([`ForeignMemory`], e.g. a guest's TX buffer). Cloning or slicing a
/// payload clones reference counts, not bytes. Slices of one buffer that meet again (the packets
/// of one send, read back in one go) are joined into one segment, so a reader copies them with
/// one `memcpy`.
#[derive(Clone, Default)]
pub struct Payload {
    /// Most payloads are one view; keep it inline.
    parts: SmallVec<[Part; 1]>,
    len: usize,
}

#[derive(Clone)]
enum Buffer {
    Local(Bytes),
    Foreign(Arc<dyn ForeignMemory>),
}

impl Buffer {
    fn len(&self) -> usize {
        match self {
            Buffer::Local(bytes) => bytes.len(),
            Buffer::Foreign(memory) => memory.len(),
        }
    }

    fn addr(&self) -> *const u8 {
        match self {
            Buffer::Local(bytes) => bytes.as_ptr(),
            Buffer::Foreign(memory) => memory.as_ptr(),
        }
    }
}

/// `buffer[start..end]`: the whole buffer is kept so that neighbouring views can be joined.
#[derive(Clone)]
struct Part {
    buffer: Buffer,
    start: usize,
    end: usize,
}

impl Part {
    fn segment(&self) -> Segment<'_> {
        match &self.buffer {
            Buffer::Local(bytes) => Segment::Local(&bytes[self.start..self.end]),
            Buffer::Foreign(memory) => Segment::Foreign(ForeignSlice {
                memory: &**memory,
                start: self.start,
                end: self.end,
            }),
        }
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    /// Two views of the very same bytes (same address and length), so ranges may be joined.
    fn same_buffer(&self, other: &Part) -> bool {
        let local = matches!(self.buffer, Buffer::Local(_));
        local == matches!(other.buffer, Buffer::Local(_))
            && self.buffer.addr() == other.buffer.addr()
            && self.buffer.len() == other.buffer.len()
    }
}

/// One segment of a payload.
#[derive(Clone, Copy, Debug)]
pub enum Segment<'a> {
    /// Ordinary memory of this process.
    Local(&'a [u8]),
    /// Part of a [`ForeignMemory`].
    Foreign(ForeignSlice<'a>),
}

impl Segment<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Segment::Local(bytes) => bytes.len(),
            Segment::Foreign(slice) => slice.len(),
        }
    }

    /// Whether the segment is empty (payloads never keep empty segments).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`; panics past the end.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        match self {
            Segment::Local(bytes) => dst.copy_from_slice(&bytes[offset..offset + dst.len()]),
            Segment::Foreign(slice) => slice.read_at(offset, dst),
        }
    }

    /// The address of the first byte, for an iovec (see [`ForeignMemory::as_ptr`]).
    pub fn as_ptr(&self) -> *const u8 {
        match self {
            Segment::Local(bytes) => bytes.as_ptr(),
            Segment::Foreign(slice) => slice.as_ptr(),
        }
    }
}

/// `memory[start..end]`.
#[derive(Clone, Copy)]
pub struct ForeignSlice<'a> {
    memory: &'a dyn ForeignMemory,
    start: usize,
    end: usize,
}

impl ForeignSlice<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Copies `dst.len()` bytes from `offset` (within this slice) into `dst`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        assert!(
            offset + dst.len() <= self.len(),
            "foreign read {offset}+{} beyond {}",
            dst.len(),
            self.len()
        );
        self.memory.read_at(self.start + offset, dst);
    }

    /// The address of the first byte (see [`ForeignMemory::as_ptr`]).
    pub fn as_ptr(&self) -> *const u8 {
        self.memory.as_ptr().wrapping_add(self.start)
    }
}

impl fmt::Debug for ForeignSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ForeignSlice({:p}+{}..{})", self.memory.as_ptr(), self.start, self.end)
    }
}

impl Payload {
    /// An empty payload.
    pub fn new() -> Payload {
        Payload::default()
    }

    /// A payload of one segment.
    pub fn from_bytes(bytes: Bytes) -> Payload {
        let mut payload = Payload::new();
        payload.push(bytes);
        payload
    }

    /// A payload of one foreign segment (the whole of `memory`).
    pub fn from_foreign(memory: Arc<dyn ForeignMemory>) -> Payload {
        let mut payload = Payload::new();
        payload.push_foreign(memory);
        payload
    }

    /// Appends a segment; empty segments are skipped.
    pub fn push(&mut self, bytes: Bytes) {
        let end = bytes.len();
        self.push_part(Part { buffer: Buffer::Local(bytes), start: 0, end });
    }

    /// Appends the whole of `memory` as a segment; empty memory is skipped.
    pub fn push_foreign(&mut self, memory: Arc<dyn ForeignMemory>) {
        let end = memory.len();
        self.push_part(Part { buffer: Buffer::Foreign(memory), start: 0, end });
    }

    fn push_part(&mut self, part: Part) {
        if part.len() == 0 {
            return;
        }
        self.len += part.len();
        if let Some(last) = self.parts.last_mut() {
            if last.same_buffer(&part) && last.end == part.start {
                last.end = part.end;
                return;
            }
        }
        self.parts.push(part);
    }

    /// Total bytes over all segments.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether any segment is foreign memory.
    pub fn has_foreign(&self) -> bool {
        self.parts.iter().any(|part| matches!(part.buffer, Buffer::Foreign(_)))
    }

    /// The segments in order.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = Segment<'_>> + '_ {
        self.parts.iter().map(Part::segment)
    }

    /// Copies the whole payload into one vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        self.extend_vec(&mut out);
        out
    }

    /// Appends every byte to `out`.
    pub fn extend_vec(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.resize(at + self.len, 0);
        self.copy_to(0, &mut out[at..]);
    }

    /// The bytes `start..start + len` as a new payload sharing the same buffers.
    ///
    /// Panics if the range is out of bounds; callers slice within lengths they computed.
    pub fn slice(&self, start: usize, len: usize) -> Payload {
        assert!(start + len <= self.len, "payload slice {start}+{len} beyond {}", self.len);
        let mut out = Payload::new();
        let mut skip = start;
        let mut want = len;
        for part in &self.parts {
            if want == 0 {
                break;
            }
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            let take = (part.len() - skip).min(want);
            let from = part.start + skip;
            out.push_part(Part { buffer: part.buffer.clone(), start: from, end: from + take });
            skip = 0;
            want -= take;
        }
        out
    }

    /// Copies bytes from `start` into `dst`, returning how many were copied.
    pub fn copy_to(&self, start: usize, dst: &mut [u8]) -> usize {
        let mut skip = start;
        let mut written = 0;
        for segment in self.segments() {
            if written == dst.len() {
                break;
            }
            if skip >= segment.len() {
                skip -= segment.len();
                continue;
            }
            let take = (segment.len() - skip).min(dst.len() - written);
            segment.read_at(skip, &mut dst[written..written + take]);
            written += take;
            skip = 0;
        }
        written
    }

    /// Moves every segment of `other` to the end of `self`, joining neighbouring views.
    pub fn append(&mut self, other: Payload) {
        for part in other.parts {
            self.push_part(part);
        }
    }

    /// Rebuilds the payload with every segment's buffer wrapped by `local` or `foreign` (which
    /// must keep the length), keeping the views. Used to tie a guard to each buffer.
    pub(crate) fn map_buffers(
        self,
        mut local: impl FnMut(Bytes) -> Bytes,
        mut foreign: impl FnMut(Arc<dyn ForeignMemory>) -> Arc<dyn ForeignMemory>,
    ) -> Payload {
        let mut out = Payload::new();
        for part in self.parts {
            let len = part.len();
            let (buffer, start, end) = match part.buffer {
                Buffer::Local(bytes) => {
                    (Buffer::Local(local(bytes.slice(part.start..part.end))), 0, len)
                }
                Buffer::Foreign(memory) => (Buffer::Foreign(foreign(memory)), part.start, part.end),
            };
            debug_assert!(end <= buffer.len(), "a wrapped buffer keeps its length");
            out.push_part(Part { buffer, start, end });
        }
        out
    }
}

/// Payloads are equal when they hold the same bytes, however they are cut into segments.
impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.len == other.len && self.to_vec() == other.to_vec()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for segment in self.segments() {
            match segment {
                Segment::Local(bytes) if bytes.len() <= 32 => list.entry(&bytes),
                Segment::Local(bytes) => list.entry(&format_args!("{} bytes", bytes.len())),
                Segment::Foreign(slice) => list.entry(&slice),
            };
        }
        list.finish()
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Payload {
        Payload::from_bytes(bytes)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Payload {
        Payload::from_bytes(Bytes::from(bytes))
    }
}

/// A header and its payload. For every packet the engine emits, `repr.len == payload.len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// The typed header.
    pub repr: Repr,
    /// The payload (empty for control packets).
    pub payload: Payload,
    /// The payload is the sending application's own memory (a zerocopy pass). A receiver must
    /// not copy it into another packet when queueing (Linux merges only linear skbs), so the
    /// sender's completion still waits for the reader. Never on the wire.
    pub pinned: bool,
}

impl Packet {
    /// A control packet (no payload).
    pub fn control(repr: Repr) -> Packet {
        Packet { repr: Repr { len: 0, ..repr }, payload: Payload::new(), pinned: false }
    }

    /// A data packet; `repr.len` is set from the payload.
    pub fn data(repr: Repr, payload: Payload) -> Packet {
        // The engine never builds a payload over MAX_PACKET_PAYLOAD (64 KiB), so this fits.
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        Packet { repr: Repr { len, ..repr }, payload, pinned: false }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn three_segments() -> Payload {
        let mut payload = Payload::new();
        payload.push(Bytes::from_static(b"abc"));
        payload.push(Bytes::from_static(b""));
        payload.push(Bytes::from_static(b"defg"));
        payload.push(Bytes::from_static(b"h"));
        payload
    }

    /// Foreign memory backed by a vector, counting reads and reporting its drop.
    pub(crate) struct Guest {
        bytes: Vec<u8>,
        dropped: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Guest {
        pub(crate) fn memory(
            bytes: &[u8],
        ) -> (Arc<dyn ForeignMemory>, Arc<std::sync::atomic::AtomicBool>) {
            let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            (Arc::new(Guest { bytes: bytes.to_vec(), dropped: dropped.clone() }), dropped)
        }
    }

    impl ForeignMemory for Guest {
        fn len(&self) -> usize {
            self.bytes.len()
        }
        fn read_at(&self, offset: usize, dst: &mut [u8]) {
            dst.copy_from_slice(&self.bytes[offset..offset + dst.len()]);
        }
        fn as_ptr(&self) -> *const u8 {
            self.bytes.as_ptr()
        }
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            self.dropped.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn foreign_segments_read_slice_and_join_like_local_ones() {
        let (memory, _) = Guest::memory(b"0123456789");
        let mut payload = Payload::from_bytes(Bytes::from_static(b"ab"));
        payload.push_foreign(memory.clone());
        assert_eq!(payload.len(), 12);
        assert!(payload.has_foreign());
        assert_eq!(payload.to_vec(), b"ab0123456789");
        let mut dst = [0u8; 5];
        assert_eq!(payload.copy_to(1, &mut dst), 5);
        assert_eq!(&dst, b"b0123");
        let mut joined = payload.slice(2, 3);
        joined.append(payload.slice(5, 4));
        assert_eq!(joined.segments().len(), 1, "views of one foreign buffer meet again");
        assert_eq!(joined.to_vec(), b"0123456");
        let Some(Segment::Foreign(slice)) = joined.segments().next() else { panic!("foreign") };
        assert_eq!(slice.as_ptr(), memory.as_ptr());
        // A foreign and a local buffer at the same address are never joined.
        let mut mixed = Payload::from_foreign(memory.clone());
        mixed.push(Bytes::from_static(b"z"));
        assert_eq!(mixed.segments().len(), 2);
    }

    #[test]
    fn foreign_memory_is_released_with_the_last_view() {
        let (memory, dropped) = Guest::memory(&[5u8; 64]);
        let payload = Payload::from_foreign(memory);
        let view = payload.slice(10, 10);
        drop(payload);
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst), "a slice keeps it");
        assert_eq!(view.to_vec(), vec![5u8; 10]);
        drop(view);
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn payloads_compare_by_bytes_not_by_cut() {
        let (memory, _) = Guest::memory(b"hello");
        let mut cut = Payload::from_bytes(Bytes::from_static(b"he"));
        cut.push(Bytes::from_static(b"llo"));
        assert_eq!(Payload::from_foreign(memory), cut);
        assert_ne!(cut, Payload::from_bytes(Bytes::from_static(b"hellO")));
    }

    #[test]
    fn neighbouring_slices_of_one_buffer_are_joined() {
        let buffer = Payload::from_bytes(Bytes::from(vec![1u8; 300]));
        let mut joined = buffer.slice(0, 100);
        joined.append(buffer.slice(100, 100));
        joined.append(buffer.slice(250, 50));
        assert_eq!(joined.segments().len(), 2, "a gap keeps two segments");
        assert_eq!(joined.len(), 250);
    }

    #[test]
    fn equal_contents_in_different_buffers_are_not_joined() {
        let mut payload = Payload::from_bytes(Bytes::from(vec![1u8; 10]));
        payload.push(Bytes::from(vec![1u8; 10]));
        assert_eq!(payload.segments().len(), 2);
    }

    #[test]
    fn empty_segments_are_not_kept() {
        assert_eq!(three_segments().segments().len(), 3);
        assert_eq!(three_segments().len(), 8);
    }

    #[test]
    fn slice_crosses_segments_without_copying() {
        let sliced = three_segments().slice(2, 4);
        assert_eq!(sliced.to_vec(), b"cdef");
        assert_eq!(sliced.segments().len(), 2);
    }

    #[test]
    fn copy_to_starts_at_offset_and_stops_at_destination_end() {
        let mut dst = [0u8; 3];
        assert_eq!(three_segments().copy_to(3, &mut dst), 3);
        assert_eq!(&dst, b"def");
        let mut big = [0u8; 16];
        assert_eq!(three_segments().copy_to(6, &mut big), 2);
        assert_eq!(&big[..2], b"gh");
    }
}
