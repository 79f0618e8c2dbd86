//! The port-I/O bus: which device answers which guest I/O port. The vCPU threads look up every
//! `in` and `out` here; a port no device claims reads as all ones and ignores writes (the VMM
//! logs it as guest noise).

use std::sync::Arc;

/// A device reached by port I/O.
pub trait PortDevice: Send + Sync {
    /// A guest read of `data.len()` bytes at `offset` inside the device's range.
    fn read(&self, offset: u16, data: &mut [u8]);
    /// A guest write at `offset` inside the device's range.
    fn write(&self, offset: u16, data: &[u8]);
}

/// Two devices claimed overlapping ports.
#[derive(Debug, thiserror::Error)]
#[error("ports {base:#x}..{end:#x} overlap a device already on the bus")]
pub struct PortConflict {
    /// First port asked for.
    pub base: u16,
    /// One past the last.
    pub end: u32,
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<dyn PortDevice>,
}

/// The devices on the port-I/O bus.
#[derive(Default)]
pub struct PortBus {
    ranges: Vec<Range>,
}

impl PortBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at ports `base..base + len`.
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<dyn PortDevice>) -> Result<(), PortConflict> {
        let end = base as u32 + len as u32;
        let overlaps = self
            .ranges
            .iter()
            .any(|r| (base as u32) < r.base as u32 + r.len as u32 && (r.base as u32) < end);
        if len == 0 || end > 0x1_0000 || overlaps {
            return Err(PortConflict { base, end });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    /// The device at `port` and the port's offset inside its range.
    pub fn find(&self, port: u16) -> Option<(&dyn PortDevice, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && ((port - r.base) as u32) < r.len as u32)
            .map(|r| (r.device.as_ref(), port - r.base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Latch(Mutex<Vec<(u16, u8)>>);

    impl PortDevice for Latch {
        fn read(&self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u16, data: &[u8]) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push((offset, data[0]));
        }
    }

    #[test]
    fn ports_reach_their_device_and_overlaps_are_refused() {
        let latch = Arc::new(Latch::default());
        let mut bus = PortBus::new();
        bus.insert(0x3f8, 8, latch.clone()).expect("free ports");
        assert!(bus.insert(0x3ff, 1, latch.clone()).is_err());
        assert!(bus.insert(0x3f0, 9, latch.clone()).is_err());
        assert!(bus.insert(0xffff, 2, latch.clone()).is_err(), "beyond the last port");
        bus.insert(0x3f0, 8, latch.clone()).expect("adjacent ports");
        let (device, offset) = bus.find(0x3fd).expect("on the bus");
        let mut data = [0u8; 1];
        device.read(offset, &mut data);
        assert_eq!(data, [5]);
        device.write(offset, &[9]);
        assert_eq!(*latch.0.lock().expect("lock"), [(5, 9)]);
        assert!(bus.find(0x400).is_none() && bus.find(0x3ef).is_none());
    }
}
