//! The saved state of a virtio-blk device: section kind `virtio-blk`, instance = the disk's
//! index on the command line. Layout version 1, little-endian:
//!
//! path (u32 length + UTF-8, at most 4096 bytes) | read_only u8 | size u64 | driver_features
//! u32 | status u8 | queue_select u32 | isr u8 | queue_pfn u32 | next_avail u32 | next_used u32
//!
//! The device is paused before it is saved, and a paused device has no request in flight
//! (the worker completes each request before it parks), so the queue's two indices are all
//! of its progress. The image's contents are not in the section: a restore opens the same
//! path, which must hold what it held when the snapshot was taken (docs/snapshot-format.md).

use super::legacy::TransportState;
use xcloud_state::format::put_blob;
use xcloud_state::{Fields, FormatError, Persist};

/// Appends the transport's part: driver_features u32 | status u8 | queue_select u32 | isr u8,
/// then per queue pfn u32 | next_avail u32 | next_used u32 (the count is the device's).
pub fn put_transport(out: &mut Vec<u8>, t: &TransportState) {
    out.extend_from_slice(&t.driver_features.to_le_bytes());
    out.push(t.status);
    out.extend_from_slice(&(t.queue_select as u32).to_le_bytes());
    out.push(t.isr);
    for &(pfn, next_avail, next_used) in &t.queues {
        out.extend_from_slice(&pfn.to_le_bytes());
        out.extend_from_slice(&(next_avail as u32).to_le_bytes());
        out.extend_from_slice(&(next_used as u32).to_le_bytes());
    }
}

fn u16_field(f: &mut Fields<'_>, what: &'static str, name: &str) -> Result<u16, FormatError> {
    u16::try_from(f.u32()?).map_err(|_| FormatError::Malformed {
        what,
        detail: format!("{name} is over 16 bits"),
    })
}

/// Reads what [`put_transport`] wrote for a device of `queues` queues.
pub fn read_transport(f: &mut Fields<'_>, what: &'static str, queues: usize) -> Result<TransportState, FormatError> {
    let driver_features = f.u32()?;
    let status = f.u8()?;
    let queue_select = u16_field(f, what, "queue_select")?;
    let isr = f.u8()?;
    let mut q = Vec::with_capacity(queues);
    for _ in 0..queues {
        let pfn = f.u32()?;
        let next_avail = u16_field(f, what, "next_avail")?;
        let next_used = u16_field(f, what, "next_used")?;
        q.push((pfn, next_avail, next_used));
    }
    Ok(TransportState {
        driver_features,
        status,
        queue_select,
        isr,
        queues: q,
    })
}

const MAX_PATH: usize = 4096;

/// What a virtio-blk device saves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    /// The image's path.
    pub path: String,
    /// A read-only disk.
    pub read_only: bool,
    /// Bytes the guest saw.
    pub size: u64,
    /// The transport and its one queue.
    pub transport: TransportState,
}

impl Persist for BlockState {
    const KIND: &'static str = "virtio-blk";
    const VERSION: u32 = 1;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_blob(&mut out, self.path.as_bytes());
        out.push(self.read_only as u8);
        out.extend_from_slice(&self.size.to_le_bytes());
        put_transport(&mut out, &self.transport);
        out
    }

    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError> {
        if version != 1 {
            return Err(xcloud_state::persist::unknown_version::<Self>(version));
        }
        let mut f = Fields::new(body, "virtio-blk");
        let malformed = |detail: &str| FormatError::Malformed {
            what: "virtio-blk",
            detail: detail.into(),
        };
        let path = String::from_utf8(f.blob(MAX_PATH)?.to_vec()).map_err(|_| malformed("the path is not UTF-8"))?;
        let read_only = match f.u8()? {
            0 => false,
            1 => true,
            _ => return Err(malformed("read_only is neither 0 nor 1")),
        };
        let size = f.u64()?;
        let transport = read_transport(&mut f, "virtio-blk", 1)?;
        f.finish()?;
        Ok(Self {
            path,
            read_only,
            size,
            transport,
        })
    }
}

/// What a virtio-net NIC saves: section kind `virtio-net`, instance = the NIC's index on the
/// command line. Layout version 3: tap name (u32 length + bytes, at most 15) | bridge (u32
/// length + bytes, at most 15; empty: none) | mac [6] | the transport with its two queues
/// (receive, transmit) | pending frames: u32 count (at most 256), each u32 length + bytes (at
/// most 65,802: header and a 64 KiB segment) — what the TAP had queued while the VM was
/// paused, delivered first where it continues. Version 2 had no pending frames, version 1 no
/// bridge either. The MAC is part of the VM's identity: a
/// restored or migrated VM keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    /// The TAP device's name on the host it was saved on.
    pub tap: String,
    /// The bridge the TAP joined, if any.
    pub bridge: Option<String>,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The transport and its queues.
    pub transport: TransportState,
    /// Frames for the guest, with their virtio-net header, not delivered yet.
    pub pending: Vec<Vec<u8>>,
}

const MAX_PENDING: usize = 256;
const MAX_PENDING_FRAME: usize = 10 + 65_536 + 256;

impl Persist for NetState {
    const KIND: &'static str = "virtio-net";
    const VERSION: u32 = 3;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_blob(&mut out, self.tap.as_bytes());
        put_blob(&mut out, self.bridge.as_deref().unwrap_or("").as_bytes());
        out.extend_from_slice(&self.mac);
        put_transport(&mut out, &self.transport);
        out.extend_from_slice(&(self.pending.len() as u32).to_le_bytes());
        for frame in &self.pending {
            put_blob(&mut out, frame);
        }
        out
    }

    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError> {
        if !(1..=3).contains(&version) {
            return Err(xcloud_state::persist::unknown_version::<Self>(version));
        }
        let mut f = Fields::new(body, "virtio-net");
        let name = |f: &mut Fields<'_>, what: &str| {
            String::from_utf8(f.blob(15)?.to_vec()).map_err(|_| FormatError::Malformed {
                what: "virtio-net",
                detail: format!("the {what} name is not UTF-8"),
            })
        };
        let tap = name(&mut f, "TAP")?;
        let bridge = if version >= 2 {
            Some(name(&mut f, "bridge")?).filter(|b| !b.is_empty())
        } else {
            None
        };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(f.bytes(6)?);
        let transport = read_transport(&mut f, "virtio-net", 2)?;
        let mut pending = Vec::new();
        if version >= 3 {
            let count = f.u32()? as usize;
            if count > MAX_PENDING {
                return Err(FormatError::Malformed {
                    what: "virtio-net",
                    detail: format!("{count} pending frames (at most {MAX_PENDING})"),
                });
            }
            for _ in 0..count {
                pending.push(f.blob(MAX_PENDING_FRAME)?.to_vec());
            }
        }
        f.finish()?;
        Ok(Self {
            tap,
            bridge,
            mac,
            transport,
            pending,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nic_state_round_trips_and_damage_is_refused() {
        let s = NetState {
            tap: "xc0".into(),
            bridge: Some("xo0".into()),
            mac: [2, 0x78, 0x63, 1, 2, 3],
            transport: TransportState {
                driver_features: 0x20,
                status: 7,
                queue_select: 1,
                isr: 0,
                queues: vec![(0x100, 256, 0), (0x104, 7, 7)],
            },
            pending: vec![vec![1, 2, 3], vec![0; 70]],
        };
        let body = s.encode();
        assert_eq!(NetState::decode(3, &body).expect("decode"), s);
        for cut in 0..body.len() {
            assert!(NetState::decode(3, &body[..cut]).is_err(), "cut at {cut}");
        }
        // Version 1: no bridge field.
        let mut v1 = Vec::new();
        put_blob(&mut v1, b"xc0");
        v1.extend_from_slice(&s.mac);
        put_transport(&mut v1, &s.transport);
        let old = NetState::decode(1, &v1).expect("version 1");
        assert_eq!((old.bridge, old.mac), (None, s.mac));
        assert!(NetState::decode(4, &body).is_err());
    }

    #[test]
    fn the_state_round_trips_and_damage_is_refused() {
        let s = BlockState {
            path: "/var/lib/xcloud/a.img".into(),
            read_only: false,
            size: 1 << 30,
            transport: TransportState {
                driver_features: 0x3000_0244,
                status: 7,
                queue_select: 0,
                isr: 1,
                queues: vec![(0x1234, 65535, 3)],
            },
        };
        let body = s.encode();
        assert_eq!(BlockState::decode(1, &body).expect("decode"), s);
        assert!(BlockState::decode(2, &body).is_err());
        for cut in 0..body.len() {
            assert!(BlockState::decode(1, &body[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = body.clone();
        long.push(0);
        assert!(BlockState::decode(1, &long).is_err());
        let mut bad = body;
        let ro_at = 4 + s.path.len();
        bad[ro_at] = 7;
        assert!(BlockState::decode(1, &bad).is_err());
    }
}
