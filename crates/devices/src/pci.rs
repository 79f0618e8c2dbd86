//! PCI bus 0 behind configuration mechanism #1 (the address register at port 0xcf8, the data
//! window at 0xcfc-0xcff): a host bridge at slot 0 and one function per virtio device.
//!
//! Every function's resources are assigned by the VMM and fixed: BAR 0 is an I/O window at a
//! port the VMM chose, and the interrupt line is the legacy IRQ the VMM wired. A driver may
//! size a BAR (write all ones, read the size mask back) as Linux does, but cannot move it:
//! other writes to a BAR are ignored, which PCI allows for a BAR whose firmware assignment
//! stands. Guests built with the SDK find their devices by scanning bus 0 through the same two
//! ports (docs/virtio.md), so one transport serves them and Linux.

use crate::bus::PortDevice;
use std::sync::Mutex;

/// The configuration-address port.
pub const PCI_CONFIG_BASE: u16 = 0xcf8;
/// The address register and the four-byte data window.
pub const PCI_CONFIG_PORTS: u16 = 8;
/// Slots on bus 0 (slot 0 is the host bridge).
pub const PCI_SLOTS: u8 = 32;

const ENABLE: u32 = 1 << 31;
const HEADER_BYTES: usize = 256;

/// Offsets into a type-0 configuration header.
pub mod reg {
    /// Vendor ID (u16).
    pub const VENDOR: usize = 0x00;
    /// Device ID (u16).
    pub const DEVICE: usize = 0x02;
    /// Command (u16).
    pub const COMMAND: usize = 0x04;
    /// Status (u16).
    pub const STATUS: usize = 0x06;
    /// Revision (u8), then programming interface, subclass, class.
    pub const REVISION: usize = 0x08;
    /// Cache line size (u8).
    pub const CACHE_LINE: usize = 0x0c;
    /// Latency timer (u8).
    pub const LATENCY: usize = 0x0d;
    /// Header type (u8).
    pub const HEADER_TYPE: usize = 0x0e;
    /// BAR 0 (u32).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (u16).
    pub const SUBSYSTEM_VENDOR: usize = 0x2c;
    /// Subsystem ID (u16).
    pub const SUBSYSTEM: usize = 0x2e;
    /// Interrupt line (u8).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (u8, 1 = INTA#).
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register bit: the function decodes its I/O BARs.
pub const COMMAND_IO: u16 = 1 << 0;
/// BAR bit 0: the BAR is an I/O window.
pub const BAR_IO: u32 = 1;

/// The identity of a function: what a driver matches on.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: [u8; 3],
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID (for a virtio device: its device type).
    pub subsystem: u16,
}

/// An I/O window a function decodes, and the interrupt it raises.
#[derive(Clone, Copy, Debug)]
pub struct PciResources {
    /// First port of BAR 0 (aligned to its size).
    pub io_base: u16,
    /// Its size in ports: a power of two from 4 to 256.
    pub io_size: u16,
    /// The legacy IRQ the function's INTA# is wired to.
    pub irq: u8,
}

/// One function's configuration header.
pub struct PciFunction {
    config: [u8; HEADER_BYTES],
    /// Size of BAR 0 when it is an I/O window.
    io_size: Option<u16>,
    /// The driver wrote all ones to BAR 0: the next read returns the size mask.
    sizing: bool,
}

impl PciFunction {
    fn with_identity(id: PciIdentity) -> Self {
        let mut f = Self {
            config: [0; HEADER_BYTES],
            io_size: None,
            sizing: false,
        };
        f.put16(reg::VENDOR, id.vendor);
        f.put16(reg::DEVICE, id.device);
        f.config[reg::REVISION + 1..reg::REVISION + 4].copy_from_slice(&[id.class[2], id.class[1], id.class[0]]);
        f.put16(reg::SUBSYSTEM_VENDOR, id.subsystem_vendor);
        f.put16(reg::SUBSYSTEM, id.subsystem);
        f
    }

    /// The host bridge at slot 0 (Intel 440FX's IDs, which every OS knows needs no driver).
    pub fn host_bridge() -> Self {
        Self::with_identity(PciIdentity {
            vendor: 0x8086,
            device: 0x1237,
            class: [0x06, 0x00, 0x00],
            subsystem_vendor: 0,
            subsystem: 0,
        })
    }

    /// A function with I/O BAR 0 and INTA# on `res.irq`.
    pub fn with_io_window(id: PciIdentity, res: PciResources) -> Self {
        debug_assert!(res.io_size.is_power_of_two() && (4..=256).contains(&res.io_size));
        debug_assert_eq!(res.io_base % res.io_size, 0);
        let mut f = Self::with_identity(id);
        f.put32(reg::BAR0, res.io_base as u32 | BAR_IO);
        f.io_size = Some(res.io_size);
        f.put16(reg::COMMAND, COMMAND_IO);
        f.config[reg::INTERRUPT_LINE] = res.irq;
        f.config[reg::INTERRUPT_PIN] = 1;
        f
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.config[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, at: usize, v: u32) {
        self.config[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// The dword at `offset & !3`, as the data window shows it.
    pub fn read_dword(&self, offset: u8) -> u32 {
        let at = (offset & !3) as usize;
        if at == reg::BAR0 && self.sizing {
            if let Some(size) = self.io_size {
                return !(size as u32 - 1) | BAR_IO;
            }
        }
        u32::from_le_bytes([
            self.config[at],
            self.config[at + 1],
            self.config[at + 2],
            self.config[at + 3],
        ])
    }

    /// A driver's write of `data` at byte `offset`: only the registers a driver may change
    /// take it; the rest of the header is read-only.
    pub fn write(&mut self, offset: u8, data: &[u8]) {
        let at = offset as usize;
        if at + data.len() > HEADER_BYTES {
            return;
        }
        if (reg::BAR0..reg::BAR0 + 4).contains(&at) {
            // Sizing is always a whole-dword write of all ones; anything else keeps the BAR.
            self.sizing = at == reg::BAR0 && data == [0xff; 4] && self.io_size.is_some();
            return;
        }
        for (i, &byte) in data.iter().enumerate() {
            let r = at + i;
            let writable = matches!(r, reg::CACHE_LINE | reg::LATENCY | reg::INTERRUPT_LINE)
                || r == reg::COMMAND
                || r == reg::COMMAND + 1;
            if writable {
                self.config[r] = byte;
            }
        }
    }
}

/// Bus 0 and its configuration ports.
pub struct PciRoot {
    address: Mutex<u32>,
    slots: Vec<Option<Mutex<PciFunction>>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// Bus 0 with only the host bridge.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Mutex<PciFunction>>> = (0..PCI_SLOTS).map(|_| None).collect();
        slots[0] = Some(Mutex::new(PciFunction::host_bridge()));
        Self {
            address: Mutex::new(0),
            slots,
        }
    }

    /// Puts `function` in the first free slot and returns the slot, or None when the bus is full.
    pub fn add(&mut self, function: PciFunction) -> Option<u8> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(Mutex::new(function));
        Some(slot as u8)
    }

    /// The function the address register selects and the register offset, if any: bus 0,
    /// function 0 of an occupied slot, with the enable bit set.
    fn selected(&self) -> Option<(&Mutex<PciFunction>, u8)> {
        let address = *self.address.lock().unwrap_or_else(|p| p.into_inner());
        let (bus, slot, function) = ((address >> 16) & 0xff, (address >> 11) & 0x1f, (address >> 8) & 0x7);
        if address & ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        let f = self.slots.get(slot as usize)?.as_ref()?;
        Some((f, (address & 0xfc) as u8))
    }
}

fn lock(f: &Mutex<PciFunction>) -> std::sync::MutexGuard<'_, PciFunction> {
    f.lock().unwrap_or_else(|p| p.into_inner())
}

impl PortDevice for PciRoot {
    fn read(&self, offset: u16, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => {
                let address = *self.address.lock().unwrap_or_else(|p| p.into_inner());
                data.copy_from_slice(&address.to_le_bytes());
            }
            4..=7 => {
                let within = (offset - 4) as usize;
                // An absent function reads as all ones: that is how a scan sees an empty slot.
                let dword = match self.selected() {
                    Some((f, reg)) => lock(f).read_dword(reg),
                    None => u32::MAX,
                };
                let bytes = dword.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(within + i).copied().unwrap_or(0xff);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u16, data: &[u8]) {
        match (offset, data) {
            (0, &[a, b, c, d]) => {
                *self.address.lock().unwrap_or_else(|p| p.into_inner()) = u32::from_le_bytes([a, b, c, d]);
            }
            (4..=7, _) => {
                let within = (offset - 4) as u8;
                if within as usize + data.len() > 4 {
                    return;
                }
                if let Some((f, reg)) = self.selected() {
                    lock(f).write(reg + within, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(root: &PciRoot, slot: u32, reg: u32) {
        root.write(0, &(ENABLE | slot << 11 | reg).to_le_bytes());
    }

    fn read32(root: &PciRoot, slot: u32, reg: u32) -> u32 {
        select(root, slot, reg);
        let mut d = [0u8; 4];
        root.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn virtio_blk_like() -> PciFunction {
        PciFunction::with_io_window(
            PciIdentity {
                vendor: 0x1af4,
                device: 0x1001,
                class: [0x01, 0x80, 0x00],
                subsystem_vendor: 0x1af4,
                subsystem: 2,
            },
            PciResources {
                io_base: 0xc000,
                io_size: 0x100,
                irq: 5,
            },
        )
    }

    #[test]
    fn a_scan_finds_the_bridge_and_the_device_and_empty_slots_read_all_ones() {
        let mut root = PciRoot::new();
        assert_eq!(root.add(virtio_blk_like()), Some(1));
        assert_eq!(read32(&root, 0, 0), 0x1237_8086);
        assert_eq!(read32(&root, 1, 0), 0x1001_1af4);
        assert_eq!(read32(&root, 2, 0), u32::MAX);
        assert_eq!(read32(&root, 1, 0x08) >> 8, 0x01_80_00, "class, subclass, interface");
        assert_eq!(read32(&root, 1, 0x2c), 0x0002_1af4);
        assert_eq!(read32(&root, 1, 0x10), 0xc001);
        assert_eq!(read32(&root, 1, 0x3c) & 0xffff, 0x0105, "INTA# on IRQ 5");
        // Function 1 and other buses are empty; with the enable bit clear nothing answers.
        root.write(0, &(ENABLE | 1 << 11 | 1 << 8).to_le_bytes());
        let mut d = [0u8; 4];
        root.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        root.write(0, &(1u32 << 11).to_le_bytes());
        root.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Byte and word reads through the window.
        select(&root, 1, 0);
        let mut w = [0u8; 2];
        root.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1001);
    }

    #[test]
    fn a_bar_can_be_sized_but_not_moved_and_the_identity_is_read_only() {
        let mut root = PciRoot::new();
        root.add(virtio_blk_like());
        select(&root, 1, 0x10);
        root.write(4, &[0xff; 4]);
        assert_eq!(read32(&root, 1, 0x10), 0xffff_ff01, "256 ports, I/O");
        select(&root, 1, 0x10);
        root.write(4, &0xd001u32.to_le_bytes());
        assert_eq!(read32(&root, 1, 0x10), 0xc001, "the BAR stays where the VMM put it");
        select(&root, 1, 0);
        root.write(4, &0xdead_beefu32.to_le_bytes());
        assert_eq!(read32(&root, 1, 0), 0x1001_1af4);
        // Interrupt line and command are the driver's to write.
        select(&root, 1, 0x3c);
        root.write(4, &[11]);
        assert_eq!(read32(&root, 1, 0x3c) & 0xffff, 0x010b);
        select(&root, 1, 0x04);
        root.write(4, &[0x05, 0x00]);
        assert_eq!(read32(&root, 1, 0x04) & 0xffff, 0x0005);
        // A write running past the window is dropped.
        select(&root, 1, 0x3c);
        root.write(7, &[1, 2]);
        assert_eq!(read32(&root, 1, 0x3c) & 0xffff, 0x010b);
    }
}
