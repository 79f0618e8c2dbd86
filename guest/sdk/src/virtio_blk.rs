//! A polling virtio-blk driver over the legacy virtio-pci transport (docs/virtio.md).
//!
//! The guest never takes an interrupt: it tells the device so (VRING_AVAIL_F_NO_INTERRUPT)
//! and polls the used ring. It rings the doorbell (one `out`, one VM exit) only when the
//! device says it sleeps (VRING_USED_F_NO_NOTIFY clear), so a busy device that polls its
//! queue costs no exit at all. Each request is a fixed chain of three descriptors (header,
//! data, status) in its own slot, and several can be in flight: [`Disk::write_stream`] keeps
//! the queue full the way a page cache would.
//!
//! Guest memory is identity-mapped, so a buffer's address is its guest-physical address.

use crate::heap::alloc::{alloc_zeroed, dealloc, Layout};
use crate::heap::vec::Vec;
use crate::hypercall::{inb, inl, inw, outb, outl, outw};
use crate::virtqueue::*;

const BLOCK_TYPE: u16 = 2;
const LEGACY_BLOCK_DEVICE: u16 = 0x1001;

const F_RO: u32 = 1 << 5;
const F_FLUSH: u32 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

const PAGE: usize = 4096;
/// Bytes in a sector.
pub const SECTOR: u64 = 512;
/// How long a wait goes without a completion before it checks whether the device stopped.
const STALL_CHECK_NS: u64 = 100_000_000;
/// A status byte no device writes: the request is still in flight.
const IN_FLIGHT: u8 = 0xff;

/// Why the disk could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskError {
    /// There is no virtio-blk device with that index.
    NotFound,
    /// The device has no usable queue or refused the driver.
    Refused,
    /// The device completed a request with this status (1: I/O error, 2: unsupported).
    Status(u8),
    /// A request past the end of the disk, or of a length that is not whole sectors.
    OutOfRange,
    /// A write to a read-only disk.
    ReadOnly,
    /// The device stopped (it set NEEDS_RESET: the driver broke a rule).
    Broken,
}

#[repr(C)]
struct Slot {
    header: [u8; 16],
    status: u8,
}

/// An open virtio-blk disk.
pub struct Disk {
    io: u16,
    queue: Virtqueue,
    slots: *mut Slot,
    /// Slots in use; a slot's chain is descriptors 3s, 3s+1, 3s+2.
    busy: Vec<bool>,
    sectors: u64,
    read_only: bool,
    /// Doorbells rung (each one a VM exit).
    pub kicks: u64,
}

// SAFETY: the disk owns its queue memory exclusively; moving it to another vCPU moves that
// ownership with it.
unsafe impl Send for Disk {}

impl Disk {
    /// Opens the `index`th virtio-blk disk on PCI bus 0.
    pub fn open(index: usize) -> Result<Self, DiskError> {
        let (io, offered) = claim(LEGACY_BLOCK_DEVICE, BLOCK_TYPE, index).map_err(|e| match e {
            ClaimError::NotFound => DiskError::NotFound,
            ClaimError::NoIoWindow => DiskError::Refused,
        })?;
        outl(io + REG_DRIVER_FEATURES, offered & (F_RO | F_FLUSH));
        outw(io + REG_QUEUE_SELECT, 0);
        let size = inw(io + REG_QUEUE_SIZE);
        if size < 3 || !size.is_power_of_two() {
            outb(io + REG_STATUS, STATUS_FAILED);
            return Err(DiskError::Refused);
        }
        let queue = Virtqueue::new(size).ok_or(DiskError::Refused)?;
        let slot_count = size as usize / 3;
        let slots = alloc_pages(slot_count * core::mem::size_of::<Slot>()).ok_or(DiskError::Refused)? as *mut Slot;
        let sectors = inl(io + REG_CONFIG) as u64 | (inl(io + REG_CONFIG + 4) as u64) << 32;
        outl(io + REG_QUEUE_PFN, queue.pfn());
        let disk = Self {
            io,
            queue,
            slots,
            busy: alloc::vec![false; slot_count],
            sectors,
            read_only: offered & F_RO != 0,
            kicks: 0,
        };
        outb(io + REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
        if inb(io + REG_STATUS) & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 {
            return Err(DiskError::Refused);
        }
        Ok(disk)
    }

    /// Bytes on the disk.
    pub fn capacity(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// Whether the device refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Requests that can be in flight at once.
    pub fn depth(&self) -> usize {
        self.busy.len()
    }

    fn check(&self, sector: u64, len: usize, write: bool) -> Result<(), DiskError> {
        if write && self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let end = sector.checked_mul(SECTOR).and_then(|o| o.checked_add(len as u64));
        if !(len as u64).is_multiple_of(SECTOR) || end.is_none_or(|e| e > self.capacity()) || len > u32::MAX as usize {
            return Err(DiskError::OutOfRange);
        }
        Ok(())
    }

    /// Puts request `kind` on slot `s` with `len` bytes of data at `data` and makes it
    /// available; rings the doorbell if the device sleeps.
    fn submit(&mut self, s: usize, kind: u32, sector: u64, data: u64, len: u32) {
        self.busy[s] = true;
        // SAFETY: s < slot count, so the slot is inside the driver's own allocation (and its
        // three descriptors, 3s + 2 < size, inside the table); the device reads them only after
        // `push` below publishes the available index.
        unsafe {
            let slot = &mut *self.slots.add(s);
            slot.header[0..4].copy_from_slice(&kind.to_le_bytes());
            slot.header[4..8].fill(0);
            slot.header[8..16].copy_from_slice(&sector.to_le_bytes());
            core::ptr::write_volatile(&mut slot.status, IN_FLIGHT);
            let head = 3 * s as u16;
            let writable = if kind == T_IN { DESC_F_WRITE } else { 0 };
            let mut chain = [
                Desc {
                    addr: slot.header.as_ptr() as u64,
                    len: 16,
                    flags: DESC_F_NEXT,
                    next: head + 1,
                },
                Desc {
                    addr: data,
                    len,
                    flags: DESC_F_NEXT | writable,
                    next: head + 2,
                },
                Desc {
                    addr: &slot.status as *const u8 as u64,
                    len: 1,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            ];
            if len == 0 {
                // No data: the header goes straight to the status.
                chain[0].next = head + 2;
            }
            for (i, d) in chain.iter().enumerate() {
                self.queue.set_desc(head + i as u16, *d);
            }
        }
        if self.queue.push(3 * s as u16) {
            outw(self.io + REG_QUEUE_NOTIFY, 0);
            self.kicks += 1;
        }
    }

    /// Takes every completed request off the used ring; returns the first failure's status.
    fn reap(&mut self) -> Result<usize, DiskError> {
        let mut done = 0;
        let mut failure = None;
        while let Some((id, _)) = self.queue.pop_used() {
            let id = id as usize;
            let s = id / 3;
            if !id.is_multiple_of(3) || s >= self.busy.len() || !self.busy[s] {
                return Err(DiskError::Broken);
            }
            // SAFETY: s < slot count; the device wrote the status before the used entry.
            let status = unsafe { core::ptr::read_volatile(&(*self.slots.add(s)).status) };
            if status != 0 && failure.is_none() {
                failure = Some(DiskError::Status(status));
            }
            self.busy[s] = false;
            done += 1;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Waits for a free slot.
    fn free_slot(&mut self) -> Result<usize, DiskError> {
        loop {
            if let Some(s) = self.busy.iter().position(|b| !b) {
                return Ok(s);
            }
            self.poll_once()?;
        }
    }

    /// Polls until at least one request completes. Reading the status register is an exit,
    /// so it is read only when nothing has completed for a while: a device that stopped
    /// (NEEDS_RESET) ends the wait with an error instead of a hang.
    fn poll_once(&mut self) -> Result<(), DiskError> {
        let mut since = None;
        loop {
            if self.reap()? > 0 {
                return Ok(());
            }
            let now = crate::clock::now_ns();
            let start = *since.get_or_insert(now);
            if now - start > STALL_CHECK_NS {
                if inb(self.io + REG_STATUS) & STATUS_NEEDS_RESET != 0 {
                    return Err(DiskError::Broken);
                }
                since = Some(now);
            }
            core::hint::spin_loop();
        }
    }

    /// Waits until nothing is in flight.
    pub fn drain(&mut self) -> Result<(), DiskError> {
        while self.busy.iter().any(|&b| b) {
            self.poll_once()?;
        }
        Ok(())
    }

    fn one(&mut self, kind: u32, sector: u64, data: u64, len: u32) -> Result<(), DiskError> {
        self.drain()?;
        let s = self.free_slot()?;
        self.submit(s, kind, sector, data, len);
        self.drain()
    }

    /// Reads `buf.len()` bytes (whole sectors) from `sector`.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(sector, buf.len(), false)?;
        self.one(T_IN, sector, buf.as_mut_ptr() as u64, buf.len() as u32)
    }

    /// Writes `buf` (whole sectors) at `sector`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.check(sector, buf.len(), true)?;
        self.one(T_OUT, sector, buf.as_ptr() as u64, buf.len() as u32)
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        self.one(T_FLUSH, 0, 0, 0)
    }

    /// Writes `total` bytes from `start` in `block`-byte requests with up to `depth` in
    /// flight; `fill(offset, buf)` fills each block before it goes (offset in bytes from
    /// `start`). Returns once every write completed (not flushed).
    pub fn write_stream(
        &mut self,
        start: u64,
        total: u64,
        block: usize,
        depth: usize,
        mut fill: impl FnMut(u64, &mut [u8]),
    ) -> Result<(), DiskError> {
        self.check(start, total as usize, true)?;
        if block == 0 || !(block as u64).is_multiple_of(SECTOR) {
            return Err(DiskError::OutOfRange);
        }
        let depth = depth.clamp(1, self.depth());
        let layout = Layout::from_size_align(block, PAGE).map_err(|_| DiskError::OutOfRange)?;
        let mut buffers: Vec<*mut u8> = Vec::with_capacity(depth);
        for _ in 0..depth {
            // SAFETY: non-zero size; freed below with the same layout.
            let p = unsafe { alloc_zeroed(layout) };
            if p.is_null() {
                break;
            }
            buffers.push(p);
        }
        let result = self.stream(start, total, block, &buffers, &mut fill);
        for p in buffers {
            // SAFETY: allocated above with `layout`; the stream drained, so no request uses it.
            unsafe { dealloc(p, layout) };
        }
        result
    }

    fn stream(
        &mut self,
        start: u64,
        total: u64,
        block: usize,
        buffers: &[*mut u8],
        fill: &mut impl FnMut(u64, &mut [u8]),
    ) -> Result<(), DiskError> {
        if buffers.is_empty() {
            return Err(DiskError::Refused);
        }
        self.drain()?;
        let mut offset = 0u64;
        while offset < total {
            // Buffer s belongs to slot s, so a free slot below the depth has a free buffer.
            let s = self.wait_below(buffers.len())?;
            let len = (total - offset).min(block as u64) as usize;
            // SAFETY: buffer s has `block` >= len bytes and no request in flight uses it (its
            // slot is free).
            let buf = unsafe { core::slice::from_raw_parts_mut(buffers[s], len) };
            fill(offset, buf);
            self.submit(s, T_OUT, start + offset / SECTOR, buffers[s] as u64, len as u32);
            offset += len as u64;
        }
        self.drain()
    }

    /// Waits until one of the first `n` slots is free and returns it.
    fn wait_below(&mut self, n: usize) -> Result<usize, DiskError> {
        loop {
            if let Some(s) = self.busy[..n].iter().position(|b| !b) {
                return Ok(s);
            }
            self.poll_once()?;
        }
    }
}
