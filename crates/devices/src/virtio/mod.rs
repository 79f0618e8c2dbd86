//! Virtio devices on the legacy virtio-pci transport (virtio 1.x, section 4.1.4.10): each
//! device is a PCI function whose BAR 0 is an I/O window holding the legacy register block,
//! so a driver reaches it with `in`/`out` only. That is the one transport an SDK guest can
//! use here (no MMIO and no interrupts at CPL3, ../shared/docs/platform.md), and Linux's
//! virtio-pci driver knows it too. Split virtqueues come from the virtio-queue crate.
//!
//! Notifications cost a VM exit each, so the device side polls: a worker thread per device
//! drains its queue, spins a bounded time for more, then asks for a kick (virtio event index)
//! and sleeps on it. The kick is a KVM ioeventfd, answered inside the kernel. SDK guests
//! poll the used ring and never take an interrupt; for drivers that want interrupts the device
//! raises its INTx line through an irqfd. docs/virtio.md has the layout.

pub mod block;
pub mod legacy;
pub mod net;
pub mod persist;
pub mod worker;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The virtio PCI vendor ID.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// The transitional device ID of a block device (legacy drivers match it).
pub const BLOCK_PCI_DEVICE: u16 = 0x1001;
/// The virtio device type of a block device (the PCI subsystem ID).
pub const BLOCK_DEVICE_TYPE: u16 = 2;
/// The transitional device ID of a network device.
pub const NET_PCI_DEVICE: u16 = 0x1000;
/// The virtio device type of a network device.
pub const NET_DEVICE_TYPE: u16 = 1;

/// First port of the I/O windows of virtio devices: device n has 0x100 ports from
/// `VIRTIO_IO_BASE + n * 0x100`.
pub const VIRTIO_IO_BASE: u16 = 0xc000;
/// Ports in one device's window.
pub const VIRTIO_IO_SIZE: u16 = 0x100;
/// The legacy IRQs devices are wired to, in turn.
pub const VIRTIO_IRQS: [u8; 4] = [5, 9, 10, 11];
/// Most virtio devices one VM has (the windows end below 0xd000).
pub const MAX_VIRTIO_DEVICES: usize = 16;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: the device may use its queues.
    pub const DRIVER_OK: u8 = 4;
    /// (Modern only) the driver accepted the features.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from until the driver resets it.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// The guest's RAM as a device sees it: the mapping, and a record of what the device wrote
/// (KVM logs only the guest's own writes, so a live migration must learn of the device's).
pub trait GuestMemoryHost: Send + Sync {
    /// Guest RAM.
    fn memory(&self) -> &GuestMemoryMmap;
    /// The device wrote `len` bytes at guest-physical `gpa`.
    fn note_write(&self, gpa: u64, len: u64);
    /// The device completed buffers: a vCPU waiting for I/O (the `WaitIo` hypercall) goes on.
    fn completed(&self) {}
}

/// Guest RAM ranges as iovecs for `readv`/`writev` straight to and from guest memory (None
/// when a range is not entirely RAM). The pointers stay valid while the VM's memory is mapped,
/// which outlives every device.
pub(crate) fn guest_iovecs(mem: &GuestMemoryMmap, ranges: &[GuestRange]) -> Option<Vec<libc::iovec>> {
    use vm_memory::GuestMemoryBackend;
    ranges
        .iter()
        .map(|r| {
            let slice = mem.get_slice(GuestAddress(r.addr), r.len as usize).ok()?;
            Some(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: r.len as usize,
            })
        })
        .collect()
}

/// Copies `len` bytes from `skip` bytes into the buffers `ranges` (None if they are not RAM).
pub(crate) fn gather(mem: &GuestMemoryMmap, ranges: &[GuestRange], mut skip: u64, mut len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    for r in ranges {
        if len == 0 {
            break;
        }
        let r_len = r.len as u64;
        if skip >= r_len {
            skip -= r_len;
            continue;
        }
        let n = ((r_len - skip) as usize).min(len);
        let at = out.len();
        out.resize(at + n, 0);
        mem.read_slice(&mut out[at..], GuestAddress(r.addr + skip)).ok()?;
        len -= n;
        skip = 0;
    }
    Some(out)
}

/// Writes `bytes` from `skip` bytes into the buffers `ranges`, noting what it wrote.
pub(crate) fn scatter(
    mem: &GuestMemoryMmap,
    host: &dyn GuestMemoryHost,
    ranges: &[GuestRange],
    mut skip: u64,
    mut bytes: &[u8],
) -> Option<()> {
    for r in ranges {
        if bytes.is_empty() {
            break;
        }
        let r_len = r.len as u64;
        if skip >= r_len {
            skip -= r_len;
            continue;
        }
        let n = ((r_len - skip) as usize).min(bytes.len());
        mem.write_slice(&bytes[..n], GuestAddress(r.addr + skip)).ok()?;
        host.note_write(r.addr + skip, n as u64);
        bytes = &bytes[n..];
        skip = 0;
    }
    Some(())
}

/// A guest-physical range of a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    /// Guest-physical address.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
}
