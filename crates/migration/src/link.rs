//! What the kernel knows of the migration's TCP connection.

use std::time::Duration;

/// What the kernel knows of the migration's TCP connection, and how it queues.
pub(crate) struct Link(std::os::fd::RawFd);

impl Link {
    /// The connection on socket `fd`, which must stay open while the `Link` is used.
    pub fn new(fd: std::os::fd::RawFd) -> Self {
        Self(fd)
    }

    /// Makes writes wait while more than `bytes` are queued but not yet sent (TCP_NOTSENT_LOWAT),
    /// so that what the sender chooses to send next does not queue behind megabytes of stream.
    /// Best effort: without it, requests just wait longer.
    pub fn limit_unsent(&self, bytes: u32) {
        let value = bytes as libc::c_int;
        // SAFETY: TCP_NOTSENT_LOWAT reads one int from `value`, which lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                self.0,
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!("TCP_NOTSENT_LOWAT: {}", std::io::Error::last_os_error());
        }
    }

    /// The smoothed round-trip time (zero if the kernel cannot tell).
    pub fn rtt(&self) -> Duration {
        // SAFETY: tcp_info is plain old data; all zeros is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: TCP_INFO writes at most `len` bytes into `info`, which is that large and
        // lives across the call; the socket stays open while the migration's stream lives.
        let rc = unsafe {
            libc::getsockopt(
                self.0,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                &mut info as *mut libc::tcp_info as *mut libc::c_void,
                &mut len,
            )
        };
        if rc == 0 {
            Duration::from_micros(info.tcpi_rtt as u64)
        } else {
            Duration::ZERO
        }
    }

    /// Bytes written but not yet acknowledged by the peer (SIOCOUTQ): still on their way.
    pub fn in_flight(&self) -> u64 {
        let mut bytes: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int into `bytes`, which lives across the call.
        if unsafe { libc::ioctl(self.0, libc::TIOCOUTQ, &mut bytes) } == 0 {
            bytes.max(0) as u64
        } else {
            0
        }
    }
}
