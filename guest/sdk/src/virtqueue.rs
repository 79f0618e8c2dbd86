//! A legacy split virtqueue as a polling driver sees it (docs/virtio.md): the descriptor
//! table, the available ring the driver fills, the used ring the device fills, all in one
//! page-aligned block of the driver's heap whose page frame goes to the device.

use crate::heap::alloc::{alloc_zeroed, Layout};
use core::sync::atomic::{fence, Ordering};

const PAGE: usize = 4096;

/// The virtio PCI vendor ID.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// The legacy register block at the start of a device's I/O window (docs/virtio.md).
pub const REG_DEVICE_FEATURES: u16 = 0x00;
/// Driver features.
pub const REG_DRIVER_FEATURES: u16 = 0x04;
/// Page frame number of the selected queue.
pub const REG_QUEUE_PFN: u16 = 0x08;
/// Size of the selected queue.
pub const REG_QUEUE_SIZE: u16 = 0x0c;
/// Queue select.
pub const REG_QUEUE_SELECT: u16 = 0x0e;
/// Queue notify: the doorbell.
pub const REG_QUEUE_NOTIFY: u16 = 0x10;
/// Device status.
pub const REG_STATUS: u16 = 0x12;
/// Start of the device configuration.
pub const REG_CONFIG: u16 = 0x14;
/// Status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Status: the guest has a driver for it.
pub const STATUS_DRIVER: u8 = 2;
/// Status: the driver is ready.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Status: the device needs a reset (the driver broke a rule).
pub const STATUS_NEEDS_RESET: u8 = 0x40;
/// Status: the driver gave up.
pub const STATUS_FAILED: u8 = 0x80;
/// Descriptor flag: the chain goes on at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// A descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// DESC_F_NEXT, DESC_F_WRITE.
    pub flags: u16,
    /// The next descriptor of the chain.
    pub next: u16,
}

/// Allocates `bytes` (rounded up to whole pages), page-aligned and zeroed, for the rest of the
/// guest's life.
pub fn alloc_pages(bytes: usize) -> Option<*mut u8> {
    let layout = Layout::from_size_align(bytes.div_ceil(PAGE).max(1) * PAGE, PAGE).ok()?;
    // SAFETY: non-zero size; the memory is never freed (devices live as long as the guest).
    let p = unsafe { alloc_zeroed(layout) };
    (!p.is_null()).then_some(p)
}

/// One queue.
pub struct Virtqueue {
    size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u16,
    avail_idx: u16,
    last_used: u16,
    ring: *mut u8,
}

// SAFETY: the queue owns its ring memory exclusively.
unsafe impl Send for Virtqueue {}

impl Virtqueue {
    /// A queue of `size` entries (a power of two), interrupts suppressed.
    pub fn new(size: u16) -> Option<Self> {
        let n = size as usize;
        let avail_at = 16 * n;
        let used_at = (avail_at + 6 + 2 * n).div_ceil(PAGE) * PAGE;
        let ring = alloc_pages(used_at + 6 + 8 * n)?;
        let q = Self {
            size,
            desc: ring as *mut Desc,
            // SAFETY: both offsets are inside the block just allocated.
            avail: unsafe { ring.add(avail_at) } as *mut u16,
            // SAFETY: as above.
            used: unsafe { ring.add(used_at) } as *mut u16,
            avail_idx: 0,
            last_used: 0,
            ring,
        };
        // SAFETY: the available ring's flags word is its first u16.
        unsafe { core::ptr::write_volatile(q.avail, AVAIL_F_NO_INTERRUPT) };
        Some(q)
    }

    /// The page frame number the device gets.
    pub fn pfn(&self) -> u32 {
        (self.ring as usize / PAGE) as u32
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i` (i < size).
    pub fn set_desc(&mut self, i: u16, d: Desc) {
        assert!(i < self.size);
        // SAFETY: i < size: inside the descriptor table.
        unsafe { core::ptr::write_volatile(self.desc.add(i as usize), d) };
    }

    /// Makes the chain starting at `head` available. Returns true when the device asked for a
    /// doorbell (it sleeps): the caller rings it.
    pub fn push(&mut self, head: u16) -> bool {
        // SAFETY: the ring's entries follow its flags and index words; the slot is in range.
        unsafe {
            core::ptr::write_volatile(self.avail.add(2 + (self.avail_idx % self.size) as usize), head);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            fence(Ordering::Release);
            core::ptr::write_volatile(self.avail.add(1), self.avail_idx);
            // The device may have gone to sleep just before the index moved: the full fence
            // orders the index store before the flags load (virtio 1.x, 2.7.13).
            fence(Ordering::SeqCst);
            core::ptr::read_volatile(self.used) & USED_F_NO_NOTIFY == 0
        }
    }

    /// The next used entry: (descriptor head, bytes the device wrote).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used index is the second u16 of the used ring.
        let used_idx = unsafe { core::ptr::read_volatile(self.used.add(1)) };
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let at = (self.last_used % self.size) as usize;
        // SAFETY: element `at` < size, each {id u32, len u32} after the 4-byte header.
        let (id, len) = unsafe {
            let e = (self.used.add(2) as *const u32).add(2 * at);
            (core::ptr::read_volatile(e), core::ptr::read_volatile(e.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }
}

/// Why no device could be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    /// There is no such device on PCI bus 0.
    NotFound,
    /// It has no I/O window (a modern-only device, unreachable from CPL3).
    NoIoWindow,
}

/// Finds the `index`th virtio device of `device_type` (transitional PCI ID `legacy_id`) on
/// PCI bus 0, resets it and acknowledges it with a driver; returns its I/O base and the
/// features it offers. The driver then accepts features, sets up queues and sets DRIVER_OK.
pub fn claim(legacy_id: u16, device_type: u16, index: usize) -> Result<(u16, u32), ClaimError> {
    use crate::hypercall::{inl, outb};
    let function = crate::pci::scan()
        .filter(|f| {
            f.vendor == VIRTIO_VENDOR && (f.device == legacy_id || f.subsystem == device_type && f.device < 0x1040)
        })
        .nth(index)
        .ok_or(ClaimError::NotFound)?;
    let io = function.io_base.ok_or(ClaimError::NoIoWindow)?;
    outb(io + REG_STATUS, 0);
    outb(io + REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    Ok((io, inl(io + REG_DEVICE_FEATURES)))
}
