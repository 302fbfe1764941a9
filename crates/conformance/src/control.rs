//! The control channel of the kernel's `vsock_test` (`tools/testing/vsock/control.c`,
//! `util.c`), so that either half of a run can be the C tool.
//!
//! One TCP connection; the server accepts exactly one client and closes its listener; the
//! client connects once per resolved address, with no retry. Lines are ASCII ending in `\n`,
//! numbers are decimal lines. Every blocking step is bounded ([`TIMEOUT`], the tool's 10 s
//! `SIGALRM`), and every failure names the step and what it expected.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The kernel tool's `TIMEOUT`: every blocking control or socket step ends within it.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A control step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The step did not complete within its limit (`"<op> timed out"` in the C tool).
    #[error("{step} timed out")]
    TimedOut {
        /// What was being done.
        step: String,
    },
    /// The peer closed the control connection (`"unexpected EOF on control socket"`).
    #[error("unexpected EOF on control socket ({step})")]
    Eof {
        /// What was being done.
        step: String,
    },
    /// The peer sent another line than the one this side waits for.
    #[error("expected \"{expected}\" on control socket, got \"{got}\"")]
    Unexpected {
        /// The line waited for.
        expected: String,
        /// The line that came.
        got: String,
    },
    /// A number line that is not a decimal number.
    #[error("expected a number on control socket, got \"{got}\"")]
    NotANumber {
        /// The line that came.
        got: String,
    },
    /// Any other I/O failure.
    #[error("{step}: {source}")]
    Io {
        /// What was being done.
        step: String,
        /// The error.
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, ControlError>;

fn failed(step: &str) -> impl FnOnce(io::Error) -> ControlError + '_ {
    move |source| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ControlError::TimedOut { step: step.to_owned() }
        }
        _ => ControlError::Io { step: step.to_owned(), source },
    }
}

/// What the peer's barrier line said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// Both sides run the test.
    Run,
    /// This side or the peer skips it.
    Skip,
}

/// One end of the control connection.
#[derive(Debug)]
pub struct Control {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// The server's listening socket, before its one client.
#[derive(Debug)]
pub struct ControlListener {
    listener: TcpListener,
}

impl ControlListener {
    /// Listens on `host:port` (`control_init` on the server; std sets SO_REUSEADDR, as the C
    /// tool does). Port 0 picks a free one.
    pub fn bind(host: &str, port: u16) -> Result<ControlListener> {
        let listener = TcpListener::bind((host, port)).map_err(failed("control listen"))?;
        Ok(ControlListener { listener })
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Accepts exactly one client within `wait`, then closes the listener.
    pub fn accept(self, wait: Duration) -> Result<Control> {
        let step = "control accept";
        self.listener.set_nonblocking(true).map_err(failed(step))?;
        let deadline = Instant::now() + wait;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(ControlError::TimedOut { step: step.into() });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(failed(step)(e)),
            }
        };
        stream.set_nonblocking(false).map_err(failed(step))?;
        Control::over(stream)
    }
}

impl Control {
    /// The client side: one connect per address `host:port` resolves to, no retry (the C
    /// tool fails if the server is not listening yet).
    pub fn connect(host: &str, port: u16) -> Result<Control> {
        let step = "control connect";
        let mut last = None;
        for addr in (host, port).to_socket_addrs().map_err(failed(step))? {
            match TcpStream::connect_timeout(&addr, TIMEOUT) {
                Ok(stream) => return Control::over(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(failed(step)(last.unwrap_or_else(|| io::ErrorKind::NotFound.into())))
    }

    /// A client that may start before its server (the host half of a device whose guest is
    /// still booting): connects again, every 200 ms for up to `within`, until a server speaks
    /// first on the connection: both tools' servers write their first barrier word at once.
    /// A connection closed before it spoke (a forwarded port nobody listens behind yet, as
    /// QEMU's user network accepts) is taken again too. Nothing is written before the server
    /// spoke, so a retry cannot leave a server out of step. The C tool never retries.
    pub fn connect_retrying(host: &str, port: u16, within: Duration) -> Result<Control> {
        let deadline = Instant::now() + within;
        loop {
            let attempt = Control::connect(host, port).and_then(|mut control| {
                control.wait_for_peer()?;
                Ok(control)
            });
            match attempt {
                Ok(control) => return Ok(control),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Waits (within the step limit) until the peer has written something, without taking it.
    fn wait_for_peer(&mut self) -> Result<()> {
        let step = "control connect (waiting for the server to speak)";
        match self.reader.fill_buf() {
            Ok([]) => Err(ControlError::Eof { step: step.into() }),
            Ok(_) => Ok(()),
            Err(e) => Err(failed(step)(e)),
        }
    }

    /// Bounds each later blocking step by `limit` instead of [`TIMEOUT`].
    pub fn set_timeout(&mut self, limit: Duration) -> Result<()> {
        let step = "control setup";
        self.writer.set_read_timeout(Some(limit)).map_err(failed(step))?;
        self.writer.set_write_timeout(Some(limit)).map_err(failed(step))
    }

    /// Wraps an accepted or connected stream.
    pub fn over(stream: TcpStream) -> Result<Control> {
        let step = "control setup";
        stream.set_read_timeout(Some(TIMEOUT)).map_err(failed(step))?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(failed(step))?;
        stream.set_nodelay(true).map_err(failed(step))?;
        let writer = stream.try_clone().map_err(failed(step))?;
        Ok(Control { reader: BufReader::new(stream), writer })
    }

    /// `control_writeln`: `line` and a newline.
    pub fn writeln(&mut self, line: &str) -> Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(failed("control write"))
    }

    /// `control_readln`: the next line, without its newline.
    pub fn readln(&mut self) -> Result<String> {
        let mut line = Vec::new();
        let n = self.reader.read_until(b'\n', &mut line).map_err(failed("control read"))?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(ControlError::Eof { step: "control read".into() });
        }
        line.pop();
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// `control_expectln`: the next line must be `expected`.
    pub fn expectln(&mut self, expected: &str) -> Result<()> {
        let got = self.readln()?;
        if got == expected {
            Ok(())
        } else {
            Err(ControlError::Unexpected { expected: expected.into(), got })
        }
    }

    /// `control_writeulong`: a decimal number line.
    pub fn write_ulong(&mut self, value: u64) -> Result<()> {
        self.writeln(&value.to_string())
    }

    /// `control_readulong`: a decimal number line.
    pub fn read_ulong(&mut self) -> Result<u64> {
        let got = self.readln()?;
        got.parse().map_err(|_| ControlError::NotANumber { got })
    }

    /// The per-test barrier of `run_tests`: this side says `NEXT`, or `SKIP` if it skips the
    /// test, then reads the peer's word. Either side's `SKIP` skips; anything but `NEXT` or
    /// `SKIP` from the peer is an error.
    pub fn barrier(&mut self, skip: bool) -> Result<Barrier> {
        self.writeln(if skip { "SKIP" } else { "NEXT" })?;
        let got = self.readln()?;
        match got.as_str() {
            "SKIP" => Ok(Barrier::Skip),
            _ if skip => Ok(Barrier::Skip),
            "NEXT" => Ok(Barrier::Run),
            _ => Err(ControlError::Unexpected { expected: "NEXT".into(), got }),
        }
    }

    /// The final barrier after the last test: both sides say `COMPLETED` and wait for it.
    pub fn completed(&mut self) -> Result<()> {
        self.writeln("COMPLETED")?;
        self.expectln("COMPLETED")
    }
}

#[cfg(test)]
mod tests;
