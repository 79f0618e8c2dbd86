//! A connection that both ends of post-copy read and write from one thread, and the frames
//! reassembled from whatever has arrived on it.

use crate::wire::{self, Kind, WireError};
use std::io::{ErrorKind, Read, Write};
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// A connection both ends of post-copy read and write from one thread.
pub trait Duplex: Read + Write {
    /// Reads what has already arrived: Ok(n > 0) bytes, Ok(0) the peer closed, an error of
    /// kind WouldBlock when nothing has arrived yet.
    fn read_arrived(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// The descriptor to poll for more input.
    fn poll_fd(&self) -> RawFd;
}

impl<C, D> Duplex for rustls::StreamOwned<C, crate::tls::Socket>
where
    C: DerefMut + Deref<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    fn read_arrived(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => return other,
            }
            // Nothing decrypted is waiting: take what the socket holds, if anything.
            if !self.sock.has_buffered() && !readable(&[self.sock.tcp().as_raw_fd()], 0)? {
                return Err(ErrorKind::WouldBlock.into());
            }
            if self.conn.read_tls(&mut self.sock)? == 0 {
                return Ok(0);
            }
            self.conn
                .process_new_packets()
                .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
        }
    }

    fn poll_fd(&self) -> RawFd {
        self.sock.tcp().as_raw_fd()
    }
}

/// Whether any of `fds` (one or two: the connection, the userfaultfd) has input, waiting up to
/// `timeout_ms` (an interrupted wait is "no"). Called for every frame: nothing is allocated.
pub(crate) fn readable(fds: &[RawFd], timeout_ms: i32) -> std::io::Result<bool> {
    let mut polled = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 2];
    let count = fds.len().min(polled.len());
    for (slot, &fd) in polled.iter_mut().zip(fds) {
        slot.fd = fd;
    }
    // SAFETY: polls the first `count` entries of `polled` (descriptors the caller owns); the
    // array lives across the call.
    match unsafe { libc::poll(polled.as_mut_ptr(), count as libc::nfds_t, timeout_ms) } {
        n if n < 0 => {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        n => Ok(n > 0),
    }
}

/// Frames reassembled from whatever has arrived, without waiting for the rest.
pub(crate) struct Inbox {
    bytes: Vec<u8>,
    chunk: Vec<u8>,
}

impl Inbox {
    pub fn new() -> Self {
        Self {
            bytes: Vec::new(),
            chunk: vec![0u8; 256 * 1024],
        }
    }

    /// Bytes received and not yet handed out as frames: it grows while a frame arrives.
    pub fn pending(&self) -> usize {
        self.bytes.len()
    }

    /// The next whole frame (its payload in `out`), or None if it has not all arrived.
    pub fn next_frame(&mut self, stream: &mut impl Duplex, out: &mut Vec<u8>) -> Result<Option<Kind>, WireError> {
        loop {
            if self.bytes.len() >= 5 {
                let len = u32::from_le_bytes([self.bytes[1], self.bytes[2], self.bytes[3], self.bytes[4]]);
                if len > wire::MAX_FRAME {
                    return Err(WireError::TooLarge(len));
                }
                let end = 5 + len as usize;
                if self.bytes.len() >= end {
                    // read_frame checks the kind and turns REFUSE into an error.
                    let kind = wire::read_frame(&mut &self.bytes[..end], out)?;
                    self.bytes.drain(..end);
                    return Ok(Some(kind));
                }
            }
            match stream.read_arrived(&mut self.chunk) {
                Ok(0) => return Err(WireError::Io(ErrorKind::UnexpectedEof.into())),
                Ok(n) => self.bytes.extend_from_slice(&self.chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next whole frame, waiting up to `timeout` for it.
    pub fn wait_frame(
        &mut self,
        stream: &mut impl Duplex,
        out: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Kind, WireError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(kind) = self.next_frame(stream, out)? {
                return Ok(kind);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WireError::Io(ErrorKind::TimedOut.into()));
            }
            readable(&[stream.poll_fd()], left.as_millis().clamp(1, 1000) as i32)?;
        }
    }
}
