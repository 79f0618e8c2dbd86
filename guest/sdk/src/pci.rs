//! PCI bus 0 through configuration mechanism #1 (ports 0xcf8/0xcfc): how a guest finds its
//! devices under xcloud and under any VMM with a PCI bus.

use crate::hypercall::{inl, outl};

const ADDRESS: u16 = 0xcf8;
const DATA: u16 = 0xcfc;

/// A function found on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct PciFunction {
    /// Its slot.
    pub slot: u8,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem ID (a virtio device's type).
    pub subsystem: u16,
    /// BAR 0 when it is an I/O window: its first port.
    pub io_base: Option<u16>,
}

/// Reads the configuration dword at `reg` of function 0 in `slot`.
pub fn config_read(slot: u8, reg: u8) -> u32 {
    outl(ADDRESS, 0x8000_0000 | (slot as u32) << 11 | (reg & 0xfc) as u32);
    inl(DATA)
}

/// Writes the configuration dword at `reg` of function 0 in `slot`.
pub fn config_write(slot: u8, reg: u8, value: u32) {
    outl(ADDRESS, 0x8000_0000 | (slot as u32) << 11 | (reg & 0xfc) as u32);
    outl(DATA, value);
}

/// Every function 0 on bus 0, in slot order (two port accesses per empty slot).
pub fn scan() -> impl Iterator<Item = PciFunction> {
    (0..32u8).filter_map(|slot| {
        let id = config_read(slot, 0);
        if id == u32::MAX || id == 0 {
            return None;
        }
        let bar0 = config_read(slot, 0x10);
        // Make sure the function decodes its I/O window (firmware may have left it off).
        let command = config_read(slot, 0x04);
        if bar0 & 1 == 1 && command & 1 == 0 {
            config_write(slot, 0x04, command | 1);
        }
        Some(PciFunction {
            slot,
            vendor: id as u16,
            device: (id >> 16) as u16,
            subsystem: (config_read(slot, 0x2c) >> 16) as u16,
            io_base: (bar0 & 1 == 1).then_some((bar0 & 0xfffc) as u16),
        })
    })
}
