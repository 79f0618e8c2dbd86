//! A polling virtio-net driver (docs/virtio.md) and the smoltcp device over it.
//!
//! The receive queue holds 128 posted buffers of 2 KiB (a 10-byte virtio-net header and a
//! frame of up to 1514 bytes), or of 68 KiB when the device offers 64 KiB TCP segments
//! (GUEST_TSO4 with GUEST_CSUM: the host's kernel then need not cut a stream into 1514-byte
//! frames, nor finish its checksums); the transmit queue 128 slots of 2 KiB. Frames go in
//! and out by copy into those buffers (one copy per frame, as a NIC's DMA buffers), the used
//! rings are polled, and the doorbell is rung only when the device sleeps.

use crate::hypercall::{inb, inw, outb, outl, outw};
use crate::virtqueue::*;
use core::cell::RefCell;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};

const NET_TYPE: u16 = 1;
const LEGACY_NET_DEVICE: u16 = 0x1000;

const F_GUEST_CSUM: u32 = 1 << 1;
const F_GUEST_TSO4: u32 = 1 << 7;
const F_MAC: u32 = 1 << 5;
/// Header flag: the checksum is partial (the sender's host will not finish it; it is valid).
const HDR_F_NEEDS_CSUM: u8 = 1;
/// Header flag: the device checked the checksums.
const HDR_F_DATA_VALID: u8 = 2;

const HEADER: usize = 10;
const BUF: usize = 2048;
/// A receive buffer when the device may hand over 64 KiB TCP segments: header, 64 KiB, and
/// the Ethernet, IP and TCP headers in front of them.
const BIG_BUF: usize = 68 * 1024;
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
    buf_size: usize,
    /// Doorbells rung.
    kicks: u64,
}

impl Side {
    fn buf(&self, i: u16) -> *mut u8 {
        // SAFETY: i < BUFFERS: inside the BUFFERS * buf_size block.
        unsafe { self.bufs.add(i as usize * self.buf_size) }
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
    /// Slots the device has given back.
    reaped: u64,
}

/// An open virtio-net NIC.
pub struct Nic {
    rx: RefCell<Side>,
    tx: RefCell<TxSide>,
    mac: [u8; 6],
    /// The device may hand over partial checksums: the driver checks the rest itself and
    /// smoltcp checks none.
    csum_offload: bool,
    received: u64,
}

// SAFETY: the NIC owns its queues and buffers exclusively.
unsafe impl Send for Nic {}

fn setup_queue(io: u16, index: u16, buf_size: usize) -> Result<Side, NicError> {
    outw(io + REG_QUEUE_SELECT, index);
    let size = inw(io + REG_QUEUE_SIZE);
    if size < BUFFERS || !size.is_power_of_two() {
        return Err(NicError::Refused);
    }
    let queue = Virtqueue::new(size).ok_or(NicError::Refused)?;
    let bufs = alloc_pages(BUFFERS as usize * buf_size).ok_or(NicError::Refused)?;
    outl(io + REG_QUEUE_PFN, queue.pfn());
    Ok(Side {
        io,
        queue,
        bufs,
        buf_size,
        kicks: 0,
    })
}

impl Nic {
    /// Opens the `index`th virtio-net NIC on PCI bus 0.
    pub fn open(index: usize) -> Result<Self, NicError> {
        let (io, offered) = claim(LEGACY_NET_DEVICE, NET_TYPE, index).map_err(|e| match e {
            ClaimError::NotFound => NicError::NotFound,
            ClaimError::NoIoWindow => NicError::Refused,
        })?;
        if offered & F_MAC == 0 {
            outb(io + REG_STATUS, STATUS_FAILED);
            return Err(NicError::Refused);
        }
        let mut accepted = F_MAC;
        if offered & F_GUEST_CSUM != 0 {
            accepted |= F_GUEST_CSUM | (offered & F_GUEST_TSO4);
        }
        outl(io + REG_DRIVER_FEATURES, accepted);
        let rx_buf = if accepted & F_GUEST_TSO4 != 0 { BIG_BUF } else { BUF };
        let mut rx = setup_queue(io, 0, rx_buf)?;
        let tx = setup_queue(io, 1, BUF)?;
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
                    len: rx_buf as u32,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
            rx.queue.push(i);
        }
        outb(io + REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
        if inb(io + REG_STATUS) & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 {
            return Err(NicError::Refused);
        }
        // The device may have slept before the buffers were there.
        outw(io + REG_QUEUE_NOTIFY, 0);
        Ok(Self {
            rx: RefCell::new(rx),
            tx: RefCell::new(TxSide {
                side: tx,
                free: (0..BUFFERS).collect(),
                reaped: 0,
            }),
            received: 0,
            mac,
            csum_offload: accepted & F_GUEST_CSUM != 0,
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

    /// A count that moves whenever the device hands something back (a frame, a sent slot).
    pub fn activity(&self) -> u64 {
        self.received + self.tx.borrow().reaped
    }

    /// Takes back the transmit slots the device is done with.
    fn reap_tx(tx: &mut TxSide) {
        while let Some((id, _)) = tx.side.queue.pop_used() {
            if id < BUFFERS {
                tx.free.push(id);
                tx.reaped += 1;
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

/// Whether an IPv4 frame's IP and TCP/UDP checksums hold (anything else passes: smoltcp
/// checks what it parses).
fn checksums_hold(frame: &[u8]) -> bool {
    fn sum(data: &[u8], mut acc: u32) -> u32 {
        let mut chunks = data.chunks_exact(2);
        for c in &mut chunks {
            acc += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        if let [last] = chunks.remainder() {
            acc += (*last as u32) << 8;
        }
        acc
    }
    fn fold(mut acc: u32) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return true;
    }
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || ip.len() < ihl || total < ihl || total > ip.len() {
        return false;
    }
    if fold(sum(&ip[..ihl], 0)) != 0xffff {
        return false;
    }
    let proto = ip[9];
    if proto != 6 && proto != 17 {
        return true;
    }
    let segment = &ip[ihl..total];
    if proto == 17 && segment.len() >= 8 && segment[6..8] == [0, 0] {
        return true;
    }
    let pseudo = sum(&ip[12..20], proto as u32 + segment.len() as u32);
    fold(sum(segment, pseudo)) == 0xffff
}

/// A transmit slot.
pub struct NicTx<'a> {
    tx: &'a RefCell<TxSide>,
}

impl RxToken for NicRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let (buf, size) = {
            let rx = self.rx.borrow();
            (rx.buf(self.id), rx.buf_size)
        };
        let len = self.len.clamp(HEADER, size);
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
        let (id, len) = loop {
            let rx = self.rx.get_mut();
            let (id, len) = rx.queue.pop_used()?;
            if id >= BUFFERS {
                return None;
            }
            let len = (len as usize).clamp(HEADER, rx.buf_size);
            if !self.csum_offload {
                break (id, len);
            }
            // SAFETY: buffer `id` has buf_size bytes, of which the device wrote `len`.
            let whole = unsafe { core::slice::from_raw_parts(rx.buf(id), len) };
            if whole[0] & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 || checksums_hold(&whole[HEADER..]) {
                break (id, len);
            }
            self.received += 1;
            // A corrupted frame is dropped, as a NIC drops it.
            rx.push(id, 0);
        };
        self.received += 1;
        let tx = self.tx.get_mut();
        Self::reap_tx(tx);
        Some((NicRx { rx: &self.rx, id, len }, NicTx { tx: &self.tx }))
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
        if self.csum_offload {
            // The driver checked every frame whose checksum the device left complete.
            caps.checksum.ipv4 = smoltcp::phy::Checksum::Tx;
            caps.checksum.tcp = smoltcp::phy::Checksum::Tx;
            caps.checksum.udp = smoltcp::phy::Checksum::Tx;
        }
        caps
    }
}
