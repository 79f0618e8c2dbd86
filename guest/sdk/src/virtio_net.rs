//! A polling virtio-net driver (docs/virtio.md) and the smoltcp device over it.
//!
//! The receive queue holds 128 posted buffers of 2 KiB (a 10-byte virtio-net header and a
//! frame of up to 1514 bytes); the transmit queue 128 slots of the same size. Frames go in
//! and out by copy into those buffers (one copy per frame, as a NIC's DMA buffers), the used
//! rings are polled, and the doorbell is rung only when the device sleeps.

use crate::hypercall::{inb, inl, inw, outb, outl, outw};
use crate::virtqueue::{alloc_pages, Desc, Virtqueue, DESC_F_WRITE};
use core::cell::RefCell;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};

const VENDOR: u16 = 0x1af4;
const NET_TYPE: u16 = 1;
const LEGACY_NET_DEVICE: u16 = 0x1000;

const REG_DEVICE_FEATURES: u16 = 0x00;
const REG_DRIVER_FEATURES: u16 = 0x04;
const REG_QUEUE_PFN: u16 = 0x08;
const REG_QUEUE_SIZE: u16 = 0x0c;
const REG_QUEUE_SELECT: u16 = 0x0e;
const REG_QUEUE_NOTIFY: u16 = 0x10;
const REG_STATUS: u16 = 0x12;
const REG_CONFIG: u16 = 0x14;
const F_MAC: u32 = 1 << 5;

const HEADER: usize = 10;
const BUF: usize = 2048;
/// The largest Ethernet frame (no FCS).
pub const MAX_FRAME: usize = 1514;
const BUFFERS: u16 = 128;

/// Why the NIC could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicError {
    /// There is no virtio-net device with that index.
    NotFound,
    /// The device has no usable queues or refused the driver.
    Refused,
}

struct Side {
    io: u16,
    queue: Virtqueue,
    bufs: *mut u8,
    /// Doorbells rung.
    kicks: u64,
}

impl Side {
    fn buf(&self, i: u16) -> *mut u8 {
        // SAFETY: i < BUFFERS: inside the BUFFERS * BUF block.
        unsafe { self.bufs.add(i as usize * BUF) }
    }

    fn push(&mut self, i: u16, queue_index: u16) {
        if self.queue.push(i) {
            outw(self.io + REG_QUEUE_NOTIFY, queue_index);
            self.kicks += 1;
        }
    }
}

struct TxSide {
    side: Side,
    free: crate::heap::vec::Vec<u16>,
}

/// An open virtio-net NIC.
pub struct Nic {
    rx: RefCell<Side>,
    tx: RefCell<TxSide>,
    mac: [u8; 6],
}

// SAFETY: the NIC owns its queues and buffers exclusively.
unsafe impl Send for Nic {}

fn setup_queue(io: u16, index: u16) -> Result<Side, NicError> {
    outw(io + REG_QUEUE_SELECT, index);
    let size = inw(io + REG_QUEUE_SIZE);
    if size < BUFFERS || !size.is_power_of_two() {
        return Err(NicError::Refused);
    }
    let queue = Virtqueue::new(size).ok_or(NicError::Refused)?;
    let bufs = alloc_pages(BUFFERS as usize * BUF).ok_or(NicError::Refused)?;
    outl(io + REG_QUEUE_PFN, queue.pfn());
    Ok(Side {
        io,
        queue,
        bufs,
        kicks: 0,
    })
}

impl Nic {
    /// Opens the `index`th virtio-net NIC on PCI bus 0.
    pub fn open(index: usize) -> Result<Self, NicError> {
        let function = crate::pci::scan()
            .filter(|f| {
                f.vendor == VENDOR && (f.device == LEGACY_NET_DEVICE || f.subsystem == NET_TYPE && f.device < 0x1040)
            })
            .nth(index)
            .ok_or(NicError::NotFound)?;
        let io = function.io_base.ok_or(NicError::Refused)?;
        outb(io + REG_STATUS, 0);
        outb(io + REG_STATUS, 1 | 2);
        let offered = inl(io + REG_DEVICE_FEATURES);
        if offered & F_MAC == 0 {
            outb(io + REG_STATUS, 0x80);
            return Err(NicError::Refused);
        }
        outl(io + REG_DRIVER_FEATURES, F_MAC);
        let mut rx = setup_queue(io, 0)?;
        let tx = setup_queue(io, 1)?;
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = inb(io + REG_CONFIG + i as u16);
        }
        for i in 0..BUFFERS {
            let addr = rx.buf(i) as u64;
            rx.queue.set_desc(
                i,
                Desc {
                    addr,
                    len: BUF as u32,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
            rx.queue.push(i);
        }
        outb(io + REG_STATUS, 1 | 2 | 4);
        if inb(io + REG_STATUS) & 0xc0 != 0 {
            return Err(NicError::Refused);
        }
        // The device may have slept before the buffers were there.
        outw(io + REG_QUEUE_NOTIFY, 0);
        Ok(Self {
            rx: RefCell::new(rx),
            tx: RefCell::new(TxSide {
                side: tx,
                free: (0..BUFFERS).collect(),
            }),
            mac,
        })
    }

    /// The NIC's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Doorbells rung so far (each one a VM exit).
    pub fn kicks(&self) -> u64 {
        self.rx.borrow().kicks + self.tx.borrow().side.kicks
    }

    /// Takes back the transmit slots the device is done with.
    fn reap_tx(tx: &mut TxSide) {
        while let Some((id, _)) = tx.side.queue.pop_used() {
            if id < BUFFERS {
                tx.free.push(id);
            }
        }
    }
}

/// A received frame, in its receive buffer until consumed.
pub struct NicRx<'a> {
    rx: &'a RefCell<Side>,
    id: u16,
    len: usize,
}

/// A transmit slot.
pub struct NicTx<'a> {
    tx: &'a RefCell<TxSide>,
}

impl RxToken for NicRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let buf = self.rx.borrow().buf(self.id);
        let len = self.len.clamp(HEADER, BUF);
        // SAFETY: buffer `id` has BUF bytes, of which the device wrote `len`; it is posted
        // again only when the token drops, after this read.
        let frame = unsafe { core::slice::from_raw_parts(buf.add(HEADER), len - HEADER) };
        f(frame)
    }
}

impl Drop for NicRx<'_> {
    /// The buffer goes back to the device, whether the frame was consumed or not.
    fn drop(&mut self) {
        self.rx.borrow_mut().push(self.id, 0);
    }
}

impl TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut tx = self.tx.borrow_mut();
        let len = len.min(BUF - HEADER);
        let Some(slot) = tx.free.pop() else {
            // transmit() checked for a free slot; without one the frame is dropped.
            let mut scratch = [0u8; MAX_FRAME];
            return f(&mut scratch[..len.min(MAX_FRAME)]);
        };
        let buf = tx.side.buf(slot);
        // SAFETY: slot `slot` is free (the device finished with it) and has BUF bytes.
        let whole = unsafe { core::slice::from_raw_parts_mut(buf, HEADER + len) };
        whole[..HEADER].fill(0);
        let r = f(&mut whole[HEADER..]);
        tx.side.queue.set_desc(
            slot,
            Desc {
                addr: buf as u64,
                len: (HEADER + len) as u32,
                flags: 0,
                next: 0,
            },
        );
        tx.side.push(slot, 1);
        r
    }
}

impl Device for Nic {
    type RxToken<'a> = NicRx<'a>;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, _now: smoltcp::time::Instant) -> Option<(NicRx<'_>, NicTx<'_>)> {
        let (id, len) = self.rx.get_mut().queue.pop_used()?;
        let tx = self.tx.get_mut();
        Self::reap_tx(tx);
        if id >= BUFFERS {
            return None;
        }
        Some((
            NicRx {
                rx: &self.rx,
                id,
                len: len as usize,
            },
            NicTx { tx: &self.tx },
        ))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<NicTx<'_>> {
        let tx = self.tx.get_mut();
        Self::reap_tx(tx);
        if tx.free.is_empty() {
            return None;
        }
        Some(NicTx { tx: &self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}
