//! Buffers back from zerocopy sends: [`ZerocopyWriter`] matches completions to the buffers
//! that were sent and hands each one back once the transport is done with it.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use zerovsock_proto::Completion;

use crate::types::{VsockSeqpacket, VsockStream};
use zerovsock_proto::Interest;

/// A connected socket that can send with MSG_ZEROCOPY.
pub trait ZerocopySocket {
    /// See [`VsockStream::send_zerocopy`].
    fn send_zerocopy(&self, buf: Bytes) -> io::Result<usize>;
    /// See [`VsockStream::recv_completion`].
    fn recv_completion(&self) -> io::Result<Completion>;
    /// See [`VsockStream::next_completion_id`].
    fn next_completion_id(&self) -> u32;
    /// Waits until a completion (or an error) is pending or `timeout` passes.
    fn wait_completion(&self, timeout: Option<Duration>) -> io::Result<()>;
}

macro_rules! zerocopy_socket {
    ($name:ident) => {
        impl ZerocopySocket for $name {
            fn send_zerocopy(&self, buf: Bytes) -> io::Result<usize> {
                $name::send_zerocopy(self, buf)
            }
            fn recv_completion(&self) -> io::Result<Completion> {
                $name::recv_completion(self)
            }
            fn next_completion_id(&self) -> u32 {
                $name::next_completion_id(self)
            }
            fn wait_completion(&self, timeout: Option<Duration>) -> io::Result<()> {
                self.poll(Interest::NONE, timeout).map(drop)
            }
        }
    };
}

zerocopy_socket!(VsockStream);
zerocopy_socket!(VsockSeqpacket);

/// A buffer the transport is done with.
#[derive(Debug, PartialEq, Eq)]
pub struct Reclaimed<B> {
    /// The buffer, as it was handed to [`ZerocopyWriter::send`].
    pub buffer: B,
    /// Some or all of it was copied rather than sent in place (the COPIED flag).
    pub copied: bool,
}

struct Owner<B>(Arc<B>);

impl<B: AsRef<[u8]>> AsRef<[u8]> for Owner<B> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref().as_ref()
    }
}

struct InFlight<B> {
    first: u32,
    count: u32,
    copied: bool,
    buffer: Arc<B>,
}

/// Sends whole buffers with MSG_ZEROCOPY and gives each back, oldest first, once every send
/// pass that carried it has completed.
///
/// ```
/// use zerovsock::{Vsock, VsockListener, VsockStream, ZerocopyWriter};
/// use zerovsock::wire::{Addr, Cid, Port};
/// use std::io::Read;
///
/// let vsock = Vsock::loopback();
/// let listener = VsockListener::bind(&vsock, Addr::new(Cid::ANY, Port(7000)))?;
/// let client = VsockStream::connect(&vsock, Addr::new(Cid::LOCAL, Port(7000)))?;
/// let (mut server, _) = listener.accept()?;
/// client.set_zerocopy(true)?;
///
/// let mut writer = ZerocopyWriter::new(&client);
/// writer.send(vec![7u8; 4096])?;
/// let mut got = vec![0u8; 4096];
/// server.read_exact(&mut got)?;
/// let back = writer.reclaim_wait(None)?.expect("completion after the read");
/// assert_eq!((back.buffer.len(), back.copied), (4096, false));
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct ZerocopyWriter<'a, S: ZerocopySocket, B> {
    socket: &'a S,
    in_flight: VecDeque<InFlight<B>>,
    completed: Vec<Completion>,
}

impl<'a, S: ZerocopySocket, B: AsRef<[u8]> + Send + Sync + 'static> ZerocopyWriter<'a, S, B> {
    /// A writer over `socket`. SO_ZEROCOPY should be on; without it buffers come back at once.
    pub fn new(socket: &'a S) -> Self {
        ZerocopyWriter { socket, in_flight: VecDeque::new(), completed: Vec::new() }
    }

    /// Buffers not yet given back.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends all of `buffer` (waiting for credit as needed) and keeps it until completion.
    pub fn send(&mut self, buffer: B) -> io::Result<()> {
        let buffer = Arc::new(buffer);
        let bytes = Bytes::from_owner(Owner(buffer.clone()));
        let first = self.socket.next_completion_id();
        let mut sent = 0;
        while sent < bytes.len() {
            sent += self.socket.send_zerocopy(bytes.slice(sent..))?;
        }
        drop(bytes);
        let count = self.socket.next_completion_id().wrapping_sub(first);
        self.in_flight.push_back(InFlight { first, count, copied: false, buffer });
        Ok(())
    }

    /// Gives back the oldest buffer if it has completed; never waits.
    pub fn reclaim(&mut self) -> io::Result<Option<Reclaimed<B>>> {
        loop {
            match self.socket.recv_completion() {
                Ok(completion) => self.completed.push(completion),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let Some(oldest) = self.in_flight.front_mut() else { return Ok(None) };
        for offset in 0..oldest.count {
            let id = oldest.first.wrapping_add(offset);
            match self.completed.iter().find(|c| c.contains(id)) {
                Some(completion) => oldest.copied |= completion.copied,
                None => return Ok(None),
            }
        }
        let Some(done) = self.in_flight.pop_front() else { return Ok(None) };
        match self.in_flight.front() {
            None => self.completed.clear(),
            // Forget ranges that end before the next buffer's first id (wrap-aware).
            Some(next) => self.completed.retain(|c| next.first.wrapping_sub(c.hi) as i32 <= 0),
        }
        match Arc::try_unwrap(done.buffer) {
            Ok(buffer) => Ok(Some(Reclaimed { buffer, copied: done.copied || done.count == 0 })),
            Err(_) => Err(io::Error::other("zerocopy buffer still referenced after completion")),
        }
    }

    /// Waits up to `timeout` (`None`: forever) for the oldest buffer to come back.
    pub fn reclaim_wait(&mut self, timeout: Option<Duration>) -> io::Result<Option<Reclaimed<B>>> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(reclaimed) = self.reclaim()? {
                return Ok(Some(reclaimed));
            }
            if self.in_flight.is_empty() {
                return Ok(None);
            }
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            if left == Some(Duration::ZERO) {
                return Ok(None);
            }
            self.socket.wait_completion(left)?;
        }
    }
}
