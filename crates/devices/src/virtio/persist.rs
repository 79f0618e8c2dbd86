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

use xcloud_state::format::put_blob;
use xcloud_state::{Fields, FormatError, Persist};

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
    /// The driver's accepted features.
    pub driver_features: u32,
    /// Device status.
    pub status: u8,
    /// The selected queue.
    pub queue_select: u16,
    /// ISR status.
    pub isr: u8,
    /// The request queue's page frame (0: not placed).
    pub queue_pfn: u32,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

impl Persist for BlockState {
    const KIND: &'static str = "virtio-blk";
    const VERSION: u32 = 1;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_blob(&mut out, self.path.as_bytes());
        out.push(self.read_only as u8);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.driver_features.to_le_bytes());
        out.push(self.status);
        out.extend_from_slice(&(self.queue_select as u32).to_le_bytes());
        out.push(self.isr);
        out.extend_from_slice(&self.queue_pfn.to_le_bytes());
        out.extend_from_slice(&(self.next_avail as u32).to_le_bytes());
        out.extend_from_slice(&(self.next_used as u32).to_le_bytes());
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
        let driver_features = f.u32()?;
        let status = f.u8()?;
        let queue_select = u16::try_from(f.u32()?).map_err(|_| malformed("queue_select is over 16 bits"))?;
        let isr = f.u8()?;
        let queue_pfn = f.u32()?;
        let next_avail = u16::try_from(f.u32()?).map_err(|_| malformed("next_avail is over 16 bits"))?;
        let next_used = u16::try_from(f.u32()?).map_err(|_| malformed("next_used is over 16 bits"))?;
        f.finish()?;
        Ok(Self {
            path,
            read_only,
            size,
            driver_features,
            status,
            queue_select,
            isr,
            queue_pfn,
            next_avail,
            next_used,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_and_damage_is_refused() {
        let s = BlockState {
            path: "/var/lib/xcloud/a.img".into(),
            read_only: false,
            size: 1 << 30,
            driver_features: 0x3000_0244,
            status: 7,
            queue_select: 0,
            isr: 1,
            queue_pfn: 0x1234,
            next_avail: 65535,
            next_used: 3,
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
