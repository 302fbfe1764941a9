//! What the two socket families' [`crate::peer::Conn`] implementations share: the
//! `zerovsock` and `zerovsock-linux` socket types have the same shape (`std::net` names,
//! the same options), so one connection type and one set of forwarding methods, written as
//! macros, serve both.

/// Declares `Kind` (the family's STREAM or SEQPACKET socket) and the connection type `$conn`
/// over it, with MSG_DONTWAIT emulated by O_NONBLOCK for one call.
macro_rules! family_conn {
    ($conn:ident, $stream:ty, $seqpacket:ty) => {
        enum Kind {
            Stream($stream),
            Seqpacket($seqpacket),
        }

        struct $conn {
            socket: Kind,
            /// O_NONBLOCK as the test set it; MSG_DONTWAIT sets it for one call only.
            nonblocking: std::sync::atomic::AtomicBool,
        }

        impl $conn {
            fn new(socket: Kind) -> $conn {
                $conn { socket, nonblocking: std::sync::atomic::AtomicBool::new(false) }
            }

            /// Runs `call` non-blocking when `dontwait`, as MSG_DONTWAIT does.
            fn dontwait<T>(&self, dontwait: bool, call: impl FnOnce() -> T) -> io::Result<T> {
                if !dontwait || self.nonblocking.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(call());
                }
                either!(self, s => s.set_nonblocking(true))?;
                let result = call();
                either!(self, s => s.set_nonblocking(false))?;
                Ok(result)
            }
        }
    };
}

/// Calls the same method on whichever socket type `$conn` holds.
macro_rules! either {
    ($conn:expr, $s:ident => $call:expr) => {
        match &$conn.socket {
            Kind::Stream($s) => $call,
            Kind::Seqpacket($s) => $call,
        }
    };
}

/// The [`crate::peer::Conn`] methods whose system call has the same name and shape in both
/// families.
macro_rules! forward_conn_methods {
    () => {
        fn send(&self, buf: &[u8], eor: bool) -> io::Result<usize> {
            match &self.socket {
                Kind::Stream(s) => (&*s).write(buf),
                Kind::Seqpacket(s) if eor => s.send_eor(buf),
                Kind::Seqpacket(s) => s.send(buf),
            }
        }

        fn recv(&self, buf: &mut [u8], flags: RecvFlags) -> io::Result<RecvMeta> {
            self.dontwait(flags.dontwait, || match &self.socket {
                Kind::Stream(s) => {
                    let len = if flags.peek { s.peek(buf)? } else { (&*s).read(buf)? };
                    Ok(RecvMeta { len, message_len: len, eor: false, truncated: false })
                }
                Kind::Seqpacket(s) if flags.peek => s.peek(buf),
                Kind::Seqpacket(s) => s.recv(buf),
            })?
        }

        fn shutdown(&self, how: Shutdown) -> io::Result<()> {
            either!(self, s => s.shutdown(how))
        }

        fn poll(&self, interest: Interest, timeout: Option<Duration>) -> io::Result<Readiness> {
            either!(self, s => s.poll(interest, timeout))
        }

        fn set_rcvlowat(&self, bytes: u32) -> io::Result<()> {
            either!(self, s => s.set_rcvlowat(bytes))
        }

        fn rcvlowat(&self) -> io::Result<u32> {
            either!(self, s => s.rcvlowat())
        }

        fn set_buffer_size(&self, bytes: u64) -> io::Result<()> {
            either!(self, s => s.set_buffer_size(bytes)).map(drop)
        }

        fn set_buffer_max_size(&self, bytes: u64) -> io::Result<()> {
            either!(self, s => s.set_buffer_max_size(bytes)).map(drop)
        }

        fn buffer_size(&self) -> io::Result<u64> {
            either!(self, s => s.buffer_size())
        }

        fn buffer_max_size(&self) -> io::Result<u64> {
            either!(self, s => s.buffer_max_size())
        }

        fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
            either!(self, s => s.set_read_timeout(timeout))
        }

        fn read_timeout(&self) -> io::Result<Option<Duration>> {
            either!(self, s => s.read_timeout())
        }

        fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
            either!(self, s => s.set_write_timeout(timeout))
        }

        fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
            either!(self, s => s.set_nonblocking(nonblocking))?;
            self.nonblocking.store(nonblocking, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }

        fn set_zerocopy(&self, enabled: bool) -> io::Result<()> {
            either!(self, s => s.set_zerocopy(enabled))
        }

        fn zerocopy(&self) -> io::Result<bool> {
            either!(self, s => s.zerocopy())
        }

        fn recv_completion(&self) -> io::Result<Completion> {
            either!(self, s => s.recv_completion())
        }
    };
}
