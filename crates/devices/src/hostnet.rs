//! The host's side of VM networking, configured through rtnetlink (no `ip` command): a TAP
//! joins a bridge, and an L2 overlay joins the bridges of several hosts.
//!
//! The overlay is a Linux bridge plus a VXLAN device on it whose forwarding database has an
//! all-zeros entry per peer host (head-end replication): broadcast and unknown frames go to
//! every peer, and the VXLAN device learns which host each MAC lives on from what arrives.
//! A VM that moves keeps its MAC and IP; its RARP from the new host (sent by the VMM right
//! after the switch) is flooded to every peer, and their tables learn the new place at once.
//!
//! ```text
//!   host A                     host B                     host C
//!   VM (10.74.0.2)             VM after the move          client (10.74.0.1)
//!     | virtio-net               | virtio-net               |
//!   tap xc0                    tap xc0                      |
//!     |                          |                          |
//!   bridge xo0 ---- vxlan  ====  bridge xo0 ---- vxlan ==== bridge xo0 ---- vxlan
//!                     \\__________ UDP 4789 over the providers' networks ___________/
//! ```

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWNEIGH: u16 = 28;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VXLAN_ID: u16 = 1;
const IFLA_VXLAN_LOCAL: u16 = 4;
const IFLA_VXLAN_LEARNING: u16 = 7;
const IFLA_VXLAN_PORT: u16 = 15;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;
const NTF_SELF: u8 = 0x02;

/// The standard VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;

/// A netlink request the kernel refused, or a socket failure.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}")]
pub struct NetlinkError {
    /// What was asked.
    pub what: String,
    /// The kernel's answer.
    #[source]
    pub source: std::io::Error,
}

/// A message under construction: header, fixed part, attributes.
struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Self {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(fixed);
        Self { buf, nests: Vec::new() }
    }

    fn align(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        self.align();
        self.buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self
    }

    fn begin(&mut self, kind: u16) -> &mut Self {
        self.align();
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    fn end(&mut self) -> &mut Self {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        self.align();
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// ifinfomsg: family, type, index, flags, change.
fn ifinfo(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

fn name_attr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

/// An rtnetlink socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket (in the calling thread's network namespace).
    pub fn open() -> Result<Self, NetlinkError> {
        // SAFETY: socket() returns a new descriptor or -1; it is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(NetlinkError {
                what: "open a netlink socket".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 1 })
    }

    /// Sends `m` and waits for the kernel's acknowledgement.
    fn request(&mut self, m: Message, what: impl Into<String>) -> Result<(), NetlinkError> {
        let what = what.into();
        self.seq += 1;
        let bytes = m.finish(self.seq);
        let fail = |source| NetlinkError {
            what: what.clone(),
            source,
        };
        // SAFETY: sends a live buffer of its length on our socket (to the kernel: no address).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: receives into a live buffer of its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(fail(e));
            }
            let mut at = 0usize;
            let n = n as usize;
            while at + 16 <= n {
                let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = u32::from_ne_bytes([buf[at + 8], buf[at + 9], buf[at + 10], buf[at + 11]]);
                if len < 16 || at + len > n {
                    break;
                }
                if kind == NLMSG_ERROR && seq == self.seq && len >= 20 {
                    let code = i32::from_ne_bytes([buf[at + 16], buf[at + 17], buf[at + 18], buf[at + 19]]);
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(fail(std::io::Error::from_raw_os_error(-code)))
                    };
                }
                at += len.div_ceil(4) * 4;
            }
        }
    }

    /// Creates bridge `name`.
    pub fn create_bridge(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut m = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &ifinfo(0, 0, 0));
        m.attr(IFLA_IFNAME, &name_attr(name))
            .begin(IFLA_LINKINFO)
            .attr(IFLA_INFO_KIND, b"bridge")
            .end();
        self.request(m, format!("create bridge {name}"))
    }

    /// Creates VXLAN device `name` with network identifier `vni`, sending from `local` on UDP
    /// `port`, learning where MACs live from what arrives.
    pub fn create_vxlan(&mut self, name: &str, vni: u32, local: Ipv4Addr, port: u16) -> Result<(), NetlinkError> {
        let mut m = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &ifinfo(0, 0, 0));
        // A 1500-byte MTU for the guests whatever the underlay's: the outer packets may then
        // be fragmented on a 1500-byte underlay (the kernel sets no DF on VXLAN by default),
        // which is slower but never drops a guest's full-size frame.
        m.attr(IFLA_IFNAME, &name_attr(name))
            .attr(IFLA_MTU, &1500u32.to_ne_bytes())
            .begin(IFLA_LINKINFO)
            .attr(IFLA_INFO_KIND, b"vxlan")
            .begin(IFLA_INFO_DATA)
            .attr(IFLA_VXLAN_ID, &vni.to_ne_bytes())
            .attr(IFLA_VXLAN_LOCAL, &local.octets())
            .attr(IFLA_VXLAN_PORT, &port.to_be_bytes())
            .attr(IFLA_VXLAN_LEARNING, &[1])
            .end()
            .end();
        self.request(m, format!("create VXLAN device {name} (VNI {vni})"))
    }

    /// Puts interface `name` on bridge `bridge`.
    pub fn set_master(&mut self, name: &str, bridge: &str) -> Result<(), NetlinkError> {
        let index = index_of(name)?;
        let master = index_of(bridge)?;
        let mut m = Message::new(RTM_NEWLINK, 0, &ifinfo(index, 0, 0));
        m.attr(IFLA_MASTER, &master.to_ne_bytes());
        self.request(m, format!("put {name} on bridge {bridge}"))
    }

    /// Brings interface `name` up.
    pub fn set_up(&mut self, name: &str) -> Result<(), NetlinkError> {
        let index = index_of(name)?;
        let up = libc::IFF_UP as u32;
        let m = Message::new(RTM_NEWLINK, 0, &ifinfo(index, up, up));
        self.request(m, format!("bring {name} up"))
    }

    /// Sends broadcast and unknown frames of VXLAN device `name` to `peer` as well.
    pub fn add_peer(&mut self, name: &str, peer: Ipv4Addr) -> Result<(), NetlinkError> {
        let index = index_of(name)?;
        let mut ndm = [0u8; 12];
        ndm[0] = libc::AF_BRIDGE as u8;
        ndm[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
        ndm[8..10].copy_from_slice(&NUD_PERMANENT.to_ne_bytes());
        ndm[10] = NTF_SELF;
        let mut m = Message::new(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND, &ndm);
        m.attr(NDA_LLADDR, &[0u8; 6]).attr(NDA_DST, &peer.octets());
        match self.request(m, format!("add peer {peer} to {name}")) {
            Err(e) if e.source.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Deletes interface `name`.
    pub fn delete_link(&mut self, name: &str) -> Result<(), NetlinkError> {
        let index = index_of(name)?;
        let m = Message::new(RTM_DELLINK, 0, &ifinfo(index, 0, 0));
        self.request(m, format!("delete {name}"))
    }
}

/// The index of interface `name`.
pub fn index_of(name: &str) -> Result<u32, NetlinkError> {
    let c = std::ffi::CString::new(name).map_err(|_| NetlinkError {
        what: format!("find interface {name:?}"),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(NetlinkError {
            what: format!("find interface {name}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(index)
}

/// An overlay on this host: its bridge and VXLAN device names.
pub struct Overlay {
    /// The bridge VMs' TAPs join.
    pub bridge: String,
    /// The VXLAN device on it.
    pub vxlan: String,
}

/// The VXLAN device's name for the overlay whose bridge is `bridge`.
pub fn vxlan_name(bridge: &str) -> String {
    let mut base: String = bridge.chars().take(12).collect();
    base.push_str("-vx");
    base
}

/// Sets up (or extends) overlay `bridge` on this host: the bridge, a VXLAN device `vni` on it
/// from `local`, every peer in its flood list, all up. An existing bridge and VXLAN device are
/// kept and only get the peers added, so `up` can be run again when a host joins.
pub fn overlay_up(
    bridge: &str,
    vni: u32,
    local: Ipv4Addr,
    port: u16,
    peers: &[Ipv4Addr],
) -> Result<Overlay, NetlinkError> {
    let mut nl = Netlink::open()?;
    let vxlan = vxlan_name(bridge);
    if index_of(bridge).is_err() {
        nl.create_bridge(bridge)?;
    }
    if index_of(&vxlan).is_err() {
        nl.create_vxlan(&vxlan, vni, local, port)?;
        nl.set_master(&vxlan, bridge)?;
    }
    for peer in peers {
        nl.add_peer(&vxlan, *peer)?;
    }
    nl.set_up(&vxlan)?;
    nl.set_up(bridge)?;
    Ok(Overlay {
        bridge: bridge.into(),
        vxlan,
    })
}

/// Removes overlay `bridge` from this host.
pub fn overlay_down(bridge: &str) -> Result<(), NetlinkError> {
    let mut nl = Netlink::open()?;
    let vxlan = vxlan_name(bridge);
    if index_of(&vxlan).is_ok() {
        nl.delete_link(&vxlan)?;
    }
    nl.delete_link(bridge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_aligned_and_nests_carry_their_length() {
        let mut m = Message::new(RTM_NEWLINK, NLM_F_CREATE, &ifinfo(7, 1, 1));
        m.attr(IFLA_IFNAME, &name_attr("br"))
            .begin(IFLA_LINKINFO)
            .attr(IFLA_INFO_KIND, b"vxlan")
            .end();
        let b = m.finish(9);
        assert_eq!(b.len() % 4, 0);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().expect("4")) as usize, b.len());
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().expect("4")), 9);
        // ifname attribute at 32: length 4 + 3 ("br\0"), padded to 8.
        assert_eq!(u16::from_ne_bytes([b[32], b[33]]), 7);
        // The nest starts at 40 and holds the kind attribute (4 + 5, padded to 12).
        assert_eq!(u16::from_ne_bytes([b[40], b[41]]), 4 + 9);
        assert_eq!(vxlan_name("a-very-long-bridge"), "a-very-long--vx");
    }
}
