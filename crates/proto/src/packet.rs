//! Packets as the engine hands them to a transport and takes them back.

use bytes::Bytes;
use zerovsock_wire::Repr;

/// A packet payload: a list of shared buffers, never forced to be contiguous.
///
/// A segment may be the application's own buffer (a zerocopy send), an internal copy, or a view
/// into memory a transport owns. Cloning a payload clones reference counts, not bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload {
    segments: Vec<Bytes>,
    len: usize,
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
        if !bytes.is_empty() {
            self.len += bytes.len();
            self.segments.push(bytes);
        }
    }

    /// Total bytes over all segments.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments in order.
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// Copies the whole payload into one vector (for tests and small control data).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for segment in &self.segments {
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
        for segment in &self.segments {
            if want == 0 {
                break;
            }
            if skip >= segment.len() {
                skip -= segment.len();
                continue;
            }
            let take = (segment.len() - skip).min(want);
            out.push(segment.slice(skip..skip + take));
            skip = 0;
            want -= take;
        }
        out
    }

    /// Copies bytes from `start` into `dst`, returning how many were copied.
    pub fn copy_to(&self, start: usize, dst: &mut [u8]) -> usize {
        let mut skip = start;
        let mut written = 0;
        for segment in &self.segments {
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

    /// Moves every segment of `other` to the end of `self`.
    pub fn append(&mut self, other: Payload) {
        for segment in other.segments {
            self.push(segment);
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
}

impl Packet {
    /// A control packet (no payload).
    pub fn control(repr: Repr) -> Packet {
        Packet { repr: Repr { len: 0, ..repr }, payload: Payload::new() }
    }

    /// A data packet; `repr.len` is set from the payload.
    pub fn data(repr: Repr, payload: Payload) -> Packet {
        // The engine never builds a payload over MAX_PACKET_PAYLOAD (64 KiB), so this fits.
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        Packet { repr: Repr { len, ..repr }, payload }
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
