//! The legacy virtio-pci register block (virtio 1.x, 4.1.4.10) at the start of a device's I/O
//! window, and the split virtqueues it configures.
//!
//! | offset | width | register |
//! | --- | --- | --- |
//! | 0x00 | 4 | device features (bits 0-31), read-only |
//! | 0x04 | 4 | driver features |
//! | 0x08 | 4 | queue address: page frame number of the selected queue (0 detaches it) |
//! | 0x0c | 2 | queue size, read-only (legacy queues have the device's size) |
//! | 0x0e | 2 | queue select |
//! | 0x10 | 2 | queue notify (the index of the queue with new buffers) |
//! | 0x12 | 1 | device status |
//! | 0x13 | 1 | ISR status, cleared by reading |
//! | 0x14 | - | device-specific configuration |
//!
//! A legacy queue of size N at page frame P lays out the descriptor table at P * 4096, the
//! available ring right after it (16 * N bytes on), and the used ring at the next 4096-byte
//! boundary after the available ring's 6 + 2 * N bytes.

use super::{status, GuestMemoryHost};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

/// Device features (read-only, 32 bits).
pub const DEVICE_FEATURES: u16 = 0x00;
/// Driver features.
pub const DRIVER_FEATURES: u16 = 0x04;
/// Queue page frame number.
pub const QUEUE_PFN: u16 = 0x08;
/// Queue size (read-only).
pub const QUEUE_SIZE: u16 = 0x0c;
/// Queue select.
pub const QUEUE_SELECT: u16 = 0x0e;
/// Queue notify.
pub const QUEUE_NOTIFY: u16 = 0x10;
/// Device status.
pub const STATUS: u16 = 0x12;
/// ISR status.
pub const ISR: u16 = 0x13;
/// Start of the device-specific configuration.
pub const CONFIG: u16 = 0x14;

/// Alignment of a legacy queue's used ring and of its page frame.
pub const QUEUE_ALIGN: u64 = 4096;

/// ISR bit: a queue has new used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the configuration (or the device status) changed.
pub const ISR_CONFIG: u8 = 2;

/// Feature bit: the driver may chain descriptors through indirect tables.
pub const F_INDIRECT_DESC: u32 = 1 << 28;
/// Feature bit: notifications are suppressed with event indices.
pub const F_EVENT_IDX: u32 = 1 << 29;

/// Where a legacy queue's parts are, given its page frame and size.
pub fn queue_layout(pfn: u32, size: u16) -> (u64, u64, u64) {
    let desc = pfn as u64 * QUEUE_ALIGN;
    let avail = desc + 16 * size as u64;
    let used = (avail + 6 + 2 * size as u64).div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN;
    (desc, avail, used)
}

/// What a register write asks of the device.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the register.
    None,
    /// The driver notified queue n.
    Kick(u16),
    /// The status changed (the driver may have started or reset the device).
    Status,
}

/// The transport's part of a device's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportState {
    /// The driver's accepted features.
    pub driver_features: u32,
    /// Device status.
    pub status: u8,
    /// The selected queue.
    pub queue_select: u16,
    /// ISR status.
    pub isr: u8,
    /// Per queue: page frame (0: not placed), next available entry, next used entry.
    pub queues: Vec<(u32, u16, u16)>,
}

/// The registers and queues of one device.
pub struct Transport {
    /// What the device offers.
    pub device_features: u32,
    /// What the driver accepted.
    pub driver_features: u32,
    /// Device status.
    pub status: u8,
    /// The queue the queue registers address.
    pub queue_select: u16,
    /// The queues, with the page frame the driver gave each (0: none yet).
    pub queues: Vec<(Queue, u32)>,
    /// ISR status.
    pub isr: u8,
}

impl Transport {
    /// A device after reset offering `device_features`, with one queue per entry of `sizes`.
    pub fn new(device_features: u32, sizes: &[u16]) -> Result<Self, virtio_queue::Error> {
        let queues = sizes
            .iter()
            .map(|&n| Queue::new(n).map(|q| (q, 0)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            device_features,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
            isr: 0,
        })
    }

    /// Back to the state after power-on (status 0 written, or a new driver).
    pub fn reset(&mut self) {
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.isr = 0;
        for (q, pfn) in &mut self.queues {
            q.reset();
            *pfn = 0;
        }
    }

    /// The driver set DRIVER_OK and nothing has gone wrong since.
    pub fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & (status::NEEDS_RESET | status::FAILED) == 0
    }

    /// The device cannot go on: the driver must reset it (virtio 1.x, 2.1.2).
    pub fn mark_broken(&mut self) {
        self.status |= status::NEEDS_RESET;
        self.isr |= ISR_CONFIG;
    }

    /// Starts the queues when the driver sets DRIVER_OK: every queue the driver gave a page
    /// must lie in guest RAM. Returns false (and marks the device broken) when one does not.
    pub fn activate(&mut self, mem: &dyn GuestMemoryHost) -> bool {
        let event_idx = self.driver_features & F_EVENT_IDX != 0;
        let mut ok = true;
        for (q, pfn) in &mut self.queues {
            q.set_event_idx(event_idx);
            if *pfn != 0 && !q.is_valid(mem.memory()) {
                ok = false;
            }
        }
        if !ok {
            self.mark_broken();
        }
        ok
    }

    /// What a snapshot keeps (the device is paused: no buffer is half served).
    pub fn save_state(&self) -> TransportState {
        TransportState {
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            isr: self.isr,
            queues: self
                .queues
                .iter()
                .map(|(q, pfn)| (*pfn, q.next_avail(), q.next_used()))
                .collect(),
        }
    }

    /// Continues from `s`: the queues are placed where the driver had them, and a running
    /// device is activated again (its queues must lie in guest RAM).
    pub fn restore_state(&mut self, s: &TransportState, mem: &dyn GuestMemoryHost) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        self.reset();
        self.driver_features = s.driver_features & self.device_features;
        self.isr = s.isr;
        for (i, &(pfn, next_avail, next_used)) in s.queues.iter().enumerate() {
            self.queue_select = i as u16;
            if pfn != 0 {
                self.write(QUEUE_PFN, &pfn.to_le_bytes());
            }
            let q = &mut self.queues[i].0;
            q.set_next_avail(next_avail);
            q.set_next_used(next_used);
        }
        self.queue_select = s.queue_select;
        self.status = s.status;
        if self.running() && !self.activate(mem) {
            return Err("a saved queue lies outside guest RAM".into());
        }
        Ok(())
    }

    fn selected(&mut self) -> Option<&mut (Queue, u32)> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn register_bytes(&mut self) -> [u8; CONFIG as usize] {
        let mut r = [0u8; CONFIG as usize];
        r[0..4].copy_from_slice(&self.device_features.to_le_bytes());
        r[4..8].copy_from_slice(&self.driver_features.to_le_bytes());
        let (pfn, size) = self.selected().map(|(q, pfn)| (*pfn, q.max_size())).unwrap_or((0, 0));
        r[8..12].copy_from_slice(&pfn.to_le_bytes());
        r[12..14].copy_from_slice(&size.to_le_bytes());
        r[14..16].copy_from_slice(&self.queue_select.to_le_bytes());
        r[18] = self.status;
        r[19] = self.isr;
        r
    }

    /// A driver's read of the register block (`offset` < CONFIG). Reading the ISR clears it.
    pub fn read(&mut self, offset: u16, data: &mut [u8]) {
        let regs = self.register_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0xff);
        }
        if (offset..offset + data.len() as u16).contains(&ISR) {
            self.isr = 0;
        }
    }

    /// A driver's read anywhere in the device's window: the register block, then the device
    /// configuration `config` (bytes past it read as zero).
    pub fn read_window(&mut self, offset: u16, data: &mut [u8], config: &[u8]) {
        if offset < CONFIG {
            self.read(offset, data);
        } else {
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get((offset - CONFIG) as usize + i).copied().unwrap_or(0);
            }
        }
    }

    /// A driver's write through a device's port: the register, and when it starts the device
    /// (DRIVER_OK), the queues' activation. Returns the effect, and whether the device just
    /// started with its queues in guest RAM; a queue outside it breaks the device (logged).
    pub fn driver_write(
        &mut self,
        offset: u16,
        data: &[u8],
        mem: &dyn GuestMemoryHost,
        (device, index): (&str, u32),
    ) -> (Effect, bool) {
        let was_running = self.running();
        let effect = self.write(offset, data);
        if effect != Effect::Status || was_running || !self.running() {
            return (effect, false);
        }
        let started = self.activate(mem);
        if !started {
            tracing::error!("{device}{index}: the driver placed a queue outside guest RAM; the device needs a reset");
        }
        (effect, started)
    }

    /// A driver's write to the register block. Writes of the wrong width are ignored.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Effect {
        let value = match *data {
            [a] => a as u32,
            [a, b] => u16::from_le_bytes([a, b]) as u32,
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
            _ => return Effect::None,
        };
        match (offset, data.len()) {
            (DRIVER_FEATURES, 4) if self.status & status::DRIVER_OK == 0 => {
                self.driver_features = value & self.device_features;
            }
            (QUEUE_PFN, 4) if self.status & status::DRIVER_OK == 0 => {
                if let Some((q, pfn)) = self.selected() {
                    if value == 0 {
                        q.reset();
                        *pfn = 0;
                    } else {
                        let size = q.max_size();
                        let (desc, avail, used) = queue_layout(value, size);
                        q.set_size(size);
                        let placed = q
                            .try_set_desc_table_address(GuestAddress(desc))
                            .and_then(|_| q.try_set_avail_ring_address(GuestAddress(avail)))
                            .and_then(|_| q.try_set_used_ring_address(GuestAddress(used)));
                        q.set_ready(placed.is_ok());
                        *pfn = value;
                    }
                }
            }
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_NOTIFY, 2) => return Effect::Kick(value as u16),
            (STATUS, 1) => {
                if value == 0 {
                    self.reset();
                } else {
                    // A driver never clears NEEDS_RESET but by a reset.
                    self.status = value as u8 | (self.status & status::NEEDS_RESET);
                }
                return Effect::Status;
            }
            _ => {}
        }
        Effect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(t: &mut Transport, offset: u16) -> u32 {
        let mut d = [0u8; 4];
        t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn the_legacy_layout_puts_the_used_ring_on_the_next_page() {
        assert_eq!(queue_layout(1, 256), (4096, 4096 + 4096, 3 * 4096));
        assert_eq!(queue_layout(2, 16), (8192, 8192 + 256, 3 * 4096));
    }

    #[test]
    fn registers_negotiate_features_place_queues_and_reset() {
        let mut t = Transport::new(F_EVENT_IDX | 1 << 9, &[256]).expect("queue");
        assert_eq!(read32(&mut t, DEVICE_FEATURES), F_EVENT_IDX | 1 << 9);
        t.write(DRIVER_FEATURES, &(u32::MAX).to_le_bytes());
        assert_eq!(t.driver_features, F_EVENT_IDX | 1 << 9, "only offered features stick");
        t.write(QUEUE_SELECT, &0u16.to_le_bytes());
        let mut size = [0u8; 2];
        t.read(QUEUE_SIZE, &mut size);
        assert_eq!(u16::from_le_bytes(size), 256);
        t.write(QUEUE_PFN, &5u32.to_le_bytes());
        assert_eq!(read32(&mut t, QUEUE_PFN), 5);
        let q = &t.queues[0].0;
        assert!(q.ready());
        assert_eq!(
            (q.desc_table(), q.avail_ring(), q.used_ring()),
            (5 * 4096, 6 * 4096, 7 * 4096)
        );
        // A queue the device does not have reads as size 0 and takes no address.
        t.write(QUEUE_SELECT, &3u16.to_le_bytes());
        t.read(QUEUE_SIZE, &mut size);
        assert_eq!(size, [0, 0]);
        t.write(QUEUE_PFN, &9u32.to_le_bytes());
        assert_eq!(t.write(QUEUE_NOTIFY, &0u16.to_le_bytes()), Effect::Kick(0));
        assert_eq!(t.write(QUEUE_NOTIFY, &[0]), Effect::None, "a notify of the wrong width");
        assert_eq!(
            t.write(STATUS, &[status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK]),
            Effect::Status
        );
        assert!(t.running());
        // Features and queues are frozen once the driver is running.
        t.write(DRIVER_FEATURES, &0u32.to_le_bytes());
        assert_eq!(t.driver_features, F_EVENT_IDX | 1 << 9);
        t.mark_broken();
        assert!(!t.running());
        let mut isr = [0u8];
        t.read(ISR, &mut isr);
        assert_eq!(isr[0], ISR_CONFIG);
        t.read(ISR, &mut isr);
        assert_eq!(isr[0], 0, "reading the ISR clears it");
        t.write(STATUS, &[status::DRIVER_OK]);
        assert!(!t.running(), "only a reset clears NEEDS_RESET");
        t.write(STATUS, &[0]);
        assert_eq!((t.status, t.driver_features, t.queues[0].1), (0, 0, 0));
        assert!(!t.queues[0].0.ready());
    }
}
