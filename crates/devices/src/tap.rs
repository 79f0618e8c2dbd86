//! TAP devices: the host end of a virtio-net NIC. Frames cross with their virtio-net header
//! (IFF_VNET_HDR, 10 bytes), so the device moves them between the TAP and guest buffers with
//! one `readv`/`writev` and no copy. The TAP is opened (created if it does not exist) with
//! TUNSETIFF and brought up with SIOCSIFFLAGS: ioctls, no `ip` command.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Bytes of the legacy virtio-net header every frame carries on the TAP.
pub const VNET_HDR_BYTES: usize = 10;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// Offload flag: frames to the guest may carry a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM).
pub const TUN_F_CSUM: u32 = 0x01;
/// Offload flag: frames to the guest may be TCPv4 segments of up to 64 KiB (GSO).
pub const TUN_F_TSO4: u32 = 0x02;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// A NIC as the command line names it: `tap=NAME[,mac=02:00:00:12:34:56][,bridge=BR]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The TAP device's name (at most 15 bytes).
    pub tap: String,
    /// The guest's MAC address; None: one is made up (locally administered, random).
    pub mac: Option<[u8; 6]>,
    /// A bridge the TAP joins (an overlay's, `xcloud overlay up`).
    pub bridge: Option<String>,
}

fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains('\0')
        || name.contains(char::is_whitespace)
    {
        return Err(format!("{name:?} is not a network interface name (1-15 bytes)"));
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{text} is a multicast address, not a NIC's"));
    }
    Ok(mac)
}

/// Writes a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl std::str::FromStr for NetSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        let mut bridge = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) => tap = Some(name.to_string()),
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                Some(("bridge", b)) => {
                    check_ifname(b)?;
                    bridge = Some(b.to_string());
                }
                _ => return Err(format!("unknown NIC option {part:?} (tap=NAME[,mac=MAC][,bridge=BR])")),
            }
        }
        let tap = tap.ok_or("a NIC needs a TAP device: tap=NAME[,mac=MAC][,bridge=BR]")?;
        check_ifname(&tap)?;
        Ok(Self { tap, mac, bridge })
    }
}

/// Why a TAP device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun is missing or not accessible.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and are you root?)")]
    Tun(#[source] std::io::Error),
    /// TUNSETIFF refused.
    #[error("cannot attach to TAP device {name} (in use by another process, not a TAP, or no permission)")]
    Attach {
        /// The name.
        name: String,
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
    /// Another setup step failed.
    #[error("cannot {action} TAP device {name}")]
    Setup {
        /// What failed.
        action: &'static str,
        /// The name.
        name: String,
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_short) -> IfReq {
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

/// An open TAP device, nonblocking.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens TAP `name` (creating it if there is none), with virtio-net headers, and brings it
    /// up. One process at a time: a TAP another process holds is refused.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Tun)?;
        let mut req = ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (same layout and size).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let hdr = VNET_HDR_BYTES as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(TapError::Setup {
                action: "set the virtio header size of",
                name: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        bring_up(name).map_err(|source| TapError::Setup {
            action: "bring up",
            name: name.into(),
            source,
        })?;
        Ok(Self {
            file,
            name: name.into(),
        })
    }

    /// Sets what the kernel may hand the guest unfinished (TUN_F_*): a driver that took
    /// GUEST_CSUM and GUEST_TSO4 gets 64 KiB segments with partial checksums, 40 times fewer
    /// frames than at the MTU.
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; it changes no memory of ours.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its header) into `iov`: Ok(None) when none is waiting.
    ///
    /// # Safety
    /// Every iovec must name memory valid for writes for its whole length during the call.
    pub unsafe fn read_frame(&self, iov: &[libc::iovec]) -> std::io::Result<Option<usize>> {
        loop {
            // SAFETY: the caller vouches for the buffers.
            let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// Writes one frame (with its header) from `iov`; false when the TAP's queue is full (the
    /// frame is dropped, as a full NIC queue drops it).
    ///
    /// # Safety
    /// Every iovec must name memory valid for reads for its whole length during the call.
    pub unsafe fn write_frame(&self, iov: &[libc::iovec]) -> std::io::Result<bool> {
        loop {
            // SAFETY: the caller vouches for the buffers.
            let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n >= 0 {
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Ok(false),
                _ => return Err(e),
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Sets IFF_UP on interface `name`.
fn bring_up(name: &str) -> std::io::Result<()> {
    // SAFETY: socket() returns a new descriptor or -1; it is owned at once below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new, valid descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name, 0);
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of an ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads an ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_specs_parse_and_bad_ones_are_refused() {
        let s: NetSpec = "tap=xc0,mac=02:00:00:aa:bb:cc".parse().expect("spec");
        assert_eq!(s.tap, "xc0");
        assert_eq!(s.mac, Some([2, 0, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(format_mac(&[2, 0, 0, 0xaa, 0xbb, 0xcc]), "02:00:00:aa:bb:cc");
        assert!("tap=xc0".parse::<NetSpec>().expect("no mac").mac.is_none());
        assert!("mac=02:00:00:00:00:01".parse::<NetSpec>().is_err(), "no tap");
        assert!("tap=a-name-longer-than-15".parse::<NetSpec>().is_err());
        assert!("tap=x,mac=01:00:00:00:00:01".parse::<NetSpec>().is_err(), "multicast");
        assert!("tap=x,mac=zz:00:00:00:00:01".parse::<NetSpec>().is_err());
        assert!("tap=x,queues=4".parse::<NetSpec>().is_err());
        assert_eq!(
            "tap=x,bridge=xo0".parse::<NetSpec>().expect("bridge").bridge.as_deref(),
            Some("xo0")
        );
        assert!("tap=x,bridge=".parse::<NetSpec>().is_err());
    }
}
