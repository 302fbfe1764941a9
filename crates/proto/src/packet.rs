//! Packets as the engine hands them to a transport and takes them back.

use bytes::Bytes;
use smallvec::SmallVec;
use zerovsock_wire::Repr;

/// A packet payload: a list of shared buffers, never forced to be contiguous.
///
/// A segment may be the application's own buffer (a zerocopy send), an internal copy, or a view
/// into memory a transport owns. Cloning or slicing a payload clones reference counts, not bytes.
/// Slices of one buffer that meet again (the packets of one send, read back in one go) are
/// joined into one segment, so a reader copies them with one `memcpy`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload {
    /// Most payloads are one view; keep it inline.
    parts: SmallVec<[Part; 1]>,
    len: usize,
}

/// `buffer[start..end]`: the whole buffer is kept so that neighbouring views can be joined.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Part {
    buffer: Bytes,
    start: usize,
    end: usize,
}

impl Part {
    fn bytes(&self) -> &[u8] {
        &self.buffer[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    /// Two views of the very same bytes (same address and length), so ranges may be joined.
    fn same_buffer(&self, other: &Part) -> bool {
        self.buffer.as_ptr() == other.buffer.as_ptr() && self.buffer.len() == other.buffer.len()
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

    /// Appends a segment; empty segments are skipped.
    pub fn push(&mut self, bytes: Bytes) {
        let end = bytes.len();
        self.push_part(Part { buffer: bytes, start: 0, end });
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

    /// The segments in order, as byte slices.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.parts.iter().map(Part::bytes)
    }

    /// The segments in order, as shared buffers (for a transport that keeps them).
    pub fn to_bytes_segments(&self) -> impl ExactSizeIterator<Item = Bytes> + '_ {
        self.parts.iter().map(|part| part.buffer.slice(part.start..part.end))
    }

    /// Copies the whole payload into one vector (for tests and small control data).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for segment in self.segments() {
            out.extend_from_slice(segment);
        }
        out
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
            dst[written..written + take].copy_from_slice(&segment[skip..skip + take]);
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
mod tests {
    use super::*;

    fn three_segments() -> Payload {
        let mut payload = Payload::new();
        payload.push(Bytes::from_static(b"abc"));
        payload.push(Bytes::from_static(b""));
        payload.push(Bytes::from_static(b"defg"));
        payload.push(Bytes::from_static(b"h"));
        payload
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
