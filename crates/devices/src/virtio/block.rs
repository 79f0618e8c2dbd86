//! virtio-blk (virtio 1.x, 5.2) over a raw image file: one request queue of 256 entries, read,
//! write, flush, get-ID and discard, served by a worker thread that polls the queue.
//!
//! A request is a chain: a 16-byte header the device reads (type, reserved, sector), the data
//! descriptors, and a status byte the device writes last. A chain that breaks the rules —
//! a loop, more descriptors than the queue holds, an index outside the table, a buffer outside
//! guest RAM, a header or status of the wrong size or direction — is a broken driver: the
//! device sets NEEDS_RESET, logs why, and serves nothing more until the driver resets it. A
//! well-formed request the disk cannot do (past the end, a write to a read-only disk, an I/O
//! error) completes with an error status, as on real hardware.

use super::legacy::{self, Transport, F_EVENT_IDX, F_INDIRECT_DESC, ISR_QUEUE};
use super::persist::BlockState;
use super::worker::{self, Gate, Serve, WorkerGuard};
use super::{gather, guest_iovecs, scatter, GuestMemoryHost, GuestRange};
use crate::bus::PortDevice;
use crate::disk::{DiskFile, SECTOR_BYTES};
use crate::hooks::{BlockHook, BlockVerdict};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use xcloud_state::{Component, StateError, StateTree};

/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (the header and status take two descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Request types.
pub mod request {
    /// Read sectors into the guest.
    pub const IN: u32 = 0;
    /// Write sectors from the guest.
    pub const OUT: u32 = 1;
    /// Make completed writes durable.
    pub const FLUSH: u32 = 4;
    /// The device's ID string (up to 20 bytes).
    pub const GET_ID: u32 = 8;
    /// Discard sector ranges.
    pub const DISCARD: u32 = 11;
}

/// Status byte values.
pub mod status_byte {
    /// Done.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The device does not do this request.
    pub const UNSUPP: u8 = 2;
}

/// Feature bits.
pub mod feature {
    /// `seg_max` is valid.
    pub const SEG_MAX: u32 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u32 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u32 = 1 << 6;
    /// The device takes flush requests.
    pub const FLUSH: u32 = 1 << 9;
    /// The device takes discard requests.
    pub const DISCARD: u32 = 1 << 13;
}

/// Bytes of the device configuration (capacity through the discard limits and after).
const CONFIG_BYTES: usize = 60;
const HEADER_BYTES: u32 = 16;
const DISCARD_SEGMENT_BYTES: u64 = 16;
/// Most discard segments in one request.
const MAX_DISCARD_SEGMENTS: u32 = 256;

/// Why a chain is not a request: the driver is broken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain has no descriptor (its head is outside the table).
    #[error("the chain's head descriptor is outside the descriptor table")]
    Empty,
    /// The chain never ends within the queue's size.
    #[error("the chain loops, is longer than the queue, or names a descriptor outside the table")]
    Unterminated,
    /// The first descriptor is not a readable 16-byte header.
    #[error("the request header is not a device-readable buffer of at least 16 bytes")]
    Header,
    /// There is no device-writable status byte at the end.
    #[error("the request does not end with a device-writable status byte")]
    Status,
    /// A buffer lies outside guest RAM.
    #[error("a buffer at {addr:#x} ({len} bytes) is outside guest RAM")]
    OutOfRange {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A data buffer goes the wrong way for the request.
    #[error("a data buffer of a type {kind} request is device-{} where it must be the other way", if *writable { "writable" } else { "readable" })]
    Direction {
        /// The request type.
        kind: u32,
        /// Whether the buffer was device-writable.
        writable: bool,
    },
}

/// A request taken apart.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Its type.
    pub kind: u32,
    /// First sector.
    pub sector: u64,
    /// The data buffers, in order.
    pub data: Vec<GuestRange>,
    /// Guest-physical address of the status byte.
    pub status: u64,
}

impl Request {
    /// Bytes of data the request carries.
    pub fn data_bytes(&self) -> u64 {
        self.data.iter().map(|r| r.len as u64).sum()
    }
}

/// Takes `chain` apart and checks it against the rules (see the module documentation).
pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Result<Request, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut descs = Vec::new();
    let mut unterminated = false;
    for d in chain {
        unterminated = d.has_next();
        descs.push(d);
    }
    if unterminated {
        return Err(ChainError::Unterminated);
    }
    let (Some(header), Some(last)) = (descs.first(), descs.last()) else {
        return Err(ChainError::Empty);
    };
    if header.is_write_only() || header.len() < HEADER_BYTES {
        return Err(ChainError::Header);
    }
    if descs.len() < 2 || !last.is_write_only() || last.len() == 0 {
        return Err(ChainError::Status);
    }
    for d in &descs {
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(ChainError::OutOfRange {
                addr: d.addr().0,
                len: d.len(),
            });
        }
    }
    let mut raw = [0u8; HEADER_BYTES as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| ChainError::OutOfRange {
            addr: header.addr().0,
            len: header.len(),
        })?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]]);
    let middle = &descs[1..descs.len() - 1];
    let must_write = match kind {
        request::IN | request::GET_ID => Some(true),
        request::OUT | request::DISCARD => Some(false),
        _ => None,
    };
    if let Some(writable) = must_write {
        if let Some(d) = middle.iter().find(|d| d.is_write_only() != writable) {
            return Err(ChainError::Direction {
                kind,
                writable: d.is_write_only(),
            });
        }
    }
    Ok(Request {
        kind,
        sector,
        data: middle
            .iter()
            .map(|d| GuestRange {
                addr: d.addr().0,
                len: d.len(),
            })
            .collect(),
        status: last.addr().0 + last.len() as u64 - 1,
    })
}

/// Counters a benchmark reads.
#[derive(Default)]
pub struct BlockStats {
    /// Doorbell writes the device woke for (each one a VM exit).
    pub kicks: AtomicU64,
    /// Requests completed.
    pub requests: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub written_bytes: AtomicU64,
    /// Requests an extension refused.
    pub refused: AtomicU64,
}

struct Inner {
    transport: Transport,
    disk: DiskFile,
}

/// A virtio-blk device.
pub struct BlockDevice {
    index: u32,
    inner: Mutex<Inner>,
    mem: Arc<dyn GuestMemoryHost>,
    /// The doorbell: the VMM registers it as a KVM ioeventfd on the notify port.
    kick: EventFd,
    /// The interrupt line's irqfd.
    irq: EventFd,
    gate: Gate,
    stats: BlockStats,
    /// While a migration copies the image: the chunks the guest wrote since the last look.
    dirty: Mutex<Option<std::collections::BTreeSet<u64>>>,
    /// The extensions that see each request (set once by the VMM).
    block_hook: OnceLock<Arc<dyn BlockHook>>,
}

/// The unit a migration tracks and copies an image in.
pub const DIRTY_CHUNK: u64 = 256 * 1024;

fn device_features(disk: &DiskFile) -> u32 {
    let mut f = feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH | F_EVENT_IDX | F_INDIRECT_DESC;
    f |= if disk.read_only() {
        feature::RO
    } else {
        feature::DISCARD
    };
    f
}

impl BlockDevice {
    /// Device `index` (its state section's instance) over `disk`, raising `irq`.
    pub fn new(index: u32, disk: DiskFile, mem: Arc<dyn GuestMemoryHost>, irq: EventFd) -> std::io::Result<Self> {
        let transport = Transport::new(device_features(&disk), &[QUEUE_SIZE])
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(Self {
            index,
            inner: Mutex::new(Inner { transport, disk }),
            mem,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            irq,
            gate: Gate::new()?,
            stats: BlockStats::default(),
            dirty: Mutex::new(None),
            block_hook: OnceLock::new(),
        })
    }

    /// The doorbell eventfd, for the VMM to register on the notify port.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// Hands every request to `hook` before doing it, from now on (the VMM's extensions; set
    /// once).
    pub fn set_block_hook(&self, hook: Arc<dyn BlockHook>) {
        let _ = self.block_hook.set(hook);
    }

    /// Its counters.
    pub fn stats(&self) -> &BlockStats {
        &self.stats
    }

    /// Its image's size, path, and a descriptor to read it with.
    pub fn image(&self) -> std::io::Result<(u64, std::path::PathBuf, std::fs::File)> {
        let inner = self.inner();
        Ok((inner.disk.size(), inner.disk.path().to_path_buf(), inner.disk.reader()?))
    }

    /// Starts recording which chunks the guest writes (a migration copies them again).
    pub fn start_tracking(&self) {
        *self.dirty.lock().unwrap_or_else(|p| p.into_inner()) = Some(Default::default());
    }

    /// The chunks written since tracking started or since the last call, in order.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        dirty
            .as_mut()
            .map(|d| std::mem::take(d).into_iter().collect())
            .unwrap_or_default()
    }

    /// Stops recording.
    pub fn stop_tracking(&self) {
        *self.dirty.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Records a completed write of `len` bytes at `offset` (after it reached the image, so
    /// that a copy of the chunk read before this is sent again).
    fn wrote(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(d) = self.dirty.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            d.extend(offset / DIRTY_CHUNK..=(offset + len - 1) / DIRTY_CHUNK);
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn config_bytes(&self, disk: &DiskFile) -> [u8; CONFIG_BYTES] {
        let mut c = [0u8; CONFIG_BYTES];
        c[0..8].copy_from_slice(&(disk.size() / SECTOR_BYTES).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_BYTES as u32).to_le_bytes());
        if !disk.read_only() {
            c[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes());
        }
        c
    }

    /// Starts the worker thread; dropping the guard stops it.
    pub fn start_worker(self: &Arc<Self>) -> std::io::Result<WorkerGuard> {
        worker::start(self, format!("virtio-blk{}", self.index))
    }

    fn note_used_ring(&self, queue: &virtio_queue::Queue) {
        self.mem.note_write(queue.used_ring(), 6 + 8 * queue.size() as u64);
    }

    /// Serves every request in the queue: None when the device is not running.
    fn serve_queue(&self) -> Option<usize> {
        let mut guard = self.inner();
        let Inner { transport, disk } = &mut *guard;
        if !transport.running() || transport.queues[0].1 == 0 {
            return None;
        }
        let mem = self.mem.memory();
        let mut served = 0;
        let broken = loop {
            let queue = &mut transport.queues[0].0;
            let chain = match queue.iter(mem) {
                Ok(mut requests) => requests.next(),
                Err(e) => break Some(format!("its available ring is invalid: {e}")),
            };
            let Some(chain) = chain else { break None };
            let head = chain.head_index();
            let request = match parse(chain, mem) {
                Ok(r) => r,
                Err(e) => break Some(format!("request {head}: {e}")),
            };
            let used = self.execute(disk, mem, &request);
            if let Err(e) = queue.add_used(mem, head, used) {
                break Some(format!("cannot complete request {head}: {e}"));
            }
            served += 1;
        };
        let queue = &mut transport.queues[0].0;
        if served > 0 {
            self.note_used_ring(queue);
            self.stats.requests.fetch_add(served as u64, Ordering::Relaxed);
            self.mem.completed();
            if queue.needs_notification(mem).unwrap_or(true) {
                transport.isr |= ISR_QUEUE;
                let _ = self.irq.write(1);
            }
        }
        if let Some(why) = broken {
            tracing::error!(
                "virtio-blk{} ({}): the driver broke the queue rules, the device needs a reset: {why}",
                self.index,
                disk.path().display()
            );
            transport.mark_broken();
            let _ = self.irq.write(1);
        }
        Some(served)
    }

    /// Does `r` and writes its status; returns the bytes the device wrote into the chain.
    fn execute(&self, disk: &DiskFile, mem: &GuestMemoryMmap, r: &Request) -> u32 {
        let refused = self
            .block_hook
            .get()
            .filter(|hook| hook.active())
            .is_some_and(|hook| hook.request(self.index, r.kind, r.sector, r.data_bytes()) == BlockVerdict::Refuse);
        if refused {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = if refused {
            Err(status_byte::IOERR)
        } else {
            self.perform(disk, mem, r)
        };
        let (status, written) = match outcome {
            Ok(written) => (status_byte::OK, written),
            Err(status) => (status, 0),
        };
        if mem.write_obj(status, GuestAddress(r.status)).is_ok() {
            self.mem.note_write(r.status, 1);
        }
        written + 1
    }

    fn perform(&self, disk: &DiskFile, mem: &GuestMemoryMmap, r: &Request) -> Result<u32, u8> {
        let io_error = |what: &str, e: std::io::Error| {
            tracing::warn!(
                "virtio-blk{} ({}): {what} failed: {e}",
                self.index,
                disk.path().display()
            );
            status_byte::IOERR
        };
        match r.kind {
            request::IN | request::OUT => {
                let bytes = r.data_bytes();
                let offset = r.sector.checked_mul(SECTOR_BYTES).ok_or(status_byte::IOERR)?;
                let in_disk = offset.checked_add(bytes).is_some_and(|end| end <= disk.size());
                if bytes % SECTOR_BYTES != 0 || !in_disk {
                    return Err(status_byte::IOERR);
                }
                let mut iov = guest_iovecs(mem, &r.data).ok_or(status_byte::IOERR)?;
                // A module that transforms the data (encryption at rest) sees it here.
                let transformer = self.block_hook.get().filter(|hook| hook.transforms_data());
                if r.kind == request::IN {
                    // SAFETY: every iovec is a checked range of guest RAM, which stays mapped
                    // while the VM (which owns this device) lives.
                    unsafe { disk.read_vectored_at(&mut iov, offset) }.map_err(|e| io_error("a read", e))?;
                    for d in &r.data {
                        self.mem.note_write(d.addr, d.len as u64);
                    }
                    if let Some(hook) = transformer {
                        let mut data = gather(mem, &r.data, 0, bytes as usize).ok_or(status_byte::IOERR)?;
                        if !hook.transform(self.index, r.kind, r.sector, &mut data) {
                            return Err(status_byte::IOERR);
                        }
                        scatter(mem, self.mem.as_ref(), &r.data, 0, &data).ok_or(status_byte::IOERR)?;
                    }
                    self.stats.read_bytes.fetch_add(bytes, Ordering::Relaxed);
                    Ok(bytes as u32)
                } else {
                    if disk.read_only() {
                        return Err(status_byte::IOERR);
                    }
                    // Transformed, the data goes to the disk from a copy: the guest's buffers
                    // stay as it wrote them.
                    let mut copy = None;
                    if let Some(hook) = transformer {
                        let mut data = gather(mem, &r.data, 0, bytes as usize).ok_or(status_byte::IOERR)?;
                        if !hook.transform(self.index, r.kind, r.sector, &mut data) {
                            return Err(status_byte::IOERR);
                        }
                        copy = Some(data);
                    }
                    if let Some(data) = copy.as_mut() {
                        iov = vec![libc::iovec {
                            iov_base: data.as_mut_ptr().cast(),
                            iov_len: data.len(),
                        }];
                    }
                    // SAFETY: as for reads (the device only reads these buffers), or one iovec
                    // naming `copy`, which lives to the end of this block.
                    unsafe { disk.write_vectored_at(&mut iov, offset) }.map_err(|e| io_error("a write", e))?;
                    self.wrote(offset, bytes);
                    self.stats.written_bytes.fetch_add(bytes, Ordering::Relaxed);
                    Ok(0)
                }
            }
            request::FLUSH => {
                if !disk.read_only() {
                    disk.flush().map_err(|e| io_error("a flush", e))?;
                }
                Ok(0)
            }
            request::GET_ID => {
                let id = format!("xcloud-disk{}", self.index);
                let Some(first) = r.data.first() else {
                    return Err(status_byte::IOERR);
                };
                let n = id.len().min(first.len as usize).min(20);
                mem.write_slice(&id.as_bytes()[..n], GuestAddress(first.addr))
                    .map_err(|_| status_byte::IOERR)?;
                self.mem.note_write(first.addr, n as u64);
                Ok(n as u32)
            }
            request::DISCARD if !disk.read_only() => {
                let mut segments = Vec::new();
                for d in &r.data {
                    let mut at = d.addr;
                    let end = d.addr + d.len as u64;
                    while at + DISCARD_SEGMENT_BYTES <= end {
                        let mut raw = [0u8; DISCARD_SEGMENT_BYTES as usize];
                        mem.read_slice(&mut raw, GuestAddress(at))
                            .map_err(|_| status_byte::IOERR)?;
                        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
                        let count = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()) as u64;
                        segments.push((sector, count));
                        at += DISCARD_SEGMENT_BYTES;
                    }
                }
                if segments.is_empty() || segments.len() > MAX_DISCARD_SEGMENTS as usize {
                    return Err(status_byte::IOERR);
                }
                for (sector, count) in segments {
                    let offset = sector.checked_mul(SECTOR_BYTES).ok_or(status_byte::IOERR)?;
                    let len = count.checked_mul(SECTOR_BYTES).ok_or(status_byte::IOERR)?;
                    if offset.checked_add(len).is_none_or(|end| end > disk.size()) {
                        return Err(status_byte::IOERR);
                    }
                    disk.discard(offset, len).map_err(|e| io_error("a discard", e))?;
                    self.wrote(offset, len);
                }
                Ok(0)
            }
            _ => Err(status_byte::UNSUPP),
        }
    }

    /// The device's state for a snapshot (taken while paused).
    fn state(&self) -> BlockState {
        let inner = self.inner();
        BlockState {
            path: inner.disk.path().to_string_lossy().into_owned(),
            read_only: inner.disk.read_only(),
            size: inner.disk.size(),
            transport: inner.transport.save_state(),
        }
    }
}

impl Serve for BlockDevice {
    fn gate(&self) -> &Gate {
        &self.gate
    }

    fn serve(&self) -> Option<usize> {
        self.serve_queue()
    }

    fn arm(&self) -> bool {
        let mut inner = self.inner();
        if !inner.transport.running() {
            return false;
        }
        let queue = &mut inner.transport.queues[0].0;
        let more = queue.enable_notification(self.mem.memory()).unwrap_or(false);
        self.note_used_ring(queue);
        more
    }

    fn disarm(&self) {
        let mut inner = self.inner();
        if inner.transport.running() {
            let queue = &mut inner.transport.queues[0].0;
            let _ = queue.disable_notification(self.mem.memory());
            self.note_used_ring(queue);
        }
    }

    fn sleep_fds(&self) -> Vec<(std::os::fd::RawFd, i16)> {
        vec![(std::os::fd::AsRawFd::as_raw_fd(&self.kick), libc::POLLIN)]
    }

    fn woke(&self, _ready: &[(std::os::fd::RawFd, i16)]) {
        if let Ok(n) = self.kick.read() {
            self.stats.kicks.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl PortDevice for BlockDevice {
    fn read(&self, offset: u16, data: &mut [u8]) {
        let mut inner = self.inner();
        let config = self.config_bytes(&inner.disk);
        inner.transport.read_window(offset, data, &config);
    }

    fn write(&self, offset: u16, data: &[u8]) {
        let (effect, _) =
            self.inner()
                .transport
                .driver_write(offset, data, self.mem.as_ref(), ("virtio-blk", self.index));
        worker::deliver(effect, &self.kick, &self.gate);
    }
}

impl Component for BlockDevice {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn pause(&self) -> Result<(), StateError> {
        self.gate.pause()
    }

    fn resume(&self) -> Result<(), StateError> {
        self.gate.resume();
        Ok(())
    }

    fn save(&self, into: &mut StateTree) -> Result<(), StateError> {
        into.save(self.index, &self.state())
    }

    fn restore(&self, from: &mut StateTree) -> Result<(), StateError> {
        let s = from.require::<BlockState>(self.index)?;
        let mut inner = self.inner();
        let disk = &inner.disk;
        if s.read_only != disk.read_only() || s.size != disk.size() {
            return Err(StateError::Incompatible(format!(
                "disk {} was {} bytes{} when saved and is {} bytes{} now",
                s.path,
                s.size,
                if s.read_only { " read-only" } else { "" },
                disk.size(),
                if disk.read_only() { " read-only" } else { "" },
            )));
        }
        inner
            .transport
            .restore_state(&s.transport, self.mem.as_ref())
            .map_err(|why| StateError::Incompatible(format!("virtio-blk{}: {why}", self.index)))?;
        drop(inner);
        self.gate.wake();
        Ok(())
    }
}

/// A guest driver for tests and fuzzing: guest RAM, a block device on it, and a queue placed
/// at page frame 1 the way the SDK's driver places it.
#[doc(hidden)]
pub mod testing {
    use super::*;
    use crate::disk::DiskSpec;
    use crate::virtio::legacy::queue_layout;

    /// Guest RAM that records the device's writes.
    pub struct Ram {
        /// The mapping.
        pub mem: GuestMemoryMmap,
        /// Every (gpa, len) the device noted.
        pub noted: Mutex<Vec<(u64, u64)>>,
    }

    impl GuestMemoryHost for Ram {
        fn memory(&self) -> &GuestMemoryMmap {
            &self.mem
        }
        fn note_write(&self, gpa: u64, len: u64) {
            self.noted.lock().unwrap_or_else(|p| p.into_inner()).push((gpa, len));
        }
    }

    /// The queue's page frame.
    pub const PFN: u32 = 1;
    /// Where test data buffers start.
    pub const DATA: u64 = 0x10000;

    /// A device over `disk`, started by a driver that accepted `features`.
    pub fn device(disk: DiskFile, ram_bytes: usize, features: u32) -> (Arc<BlockDevice>, Arc<Ram>) {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram_bytes)]).unwrap_or_else(|e| panic!("guest RAM: {e}"));
        let ram = Arc::new(Ram {
            mem,
            noted: Mutex::new(Vec::new()),
        });
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap_or_else(|e| panic!("eventfd: {e}"));
        let dev = Arc::new(BlockDevice::new(0, disk, ram.clone(), irq).unwrap_or_else(|e| panic!("device: {e}")));
        dev.write(legacy::DRIVER_FEATURES, &features.to_le_bytes());
        dev.write(legacy::QUEUE_SELECT, &0u16.to_le_bytes());
        dev.write(legacy::QUEUE_PFN, &PFN.to_le_bytes());
        dev.write(
            legacy::STATUS,
            &[super::super::status::ACKNOWLEDGE | super::super::status::DRIVER | super::super::status::DRIVER_OK],
        );
        (dev, ram)
    }

    /// The ring addresses of the test queue.
    pub fn rings() -> (u64, u64, u64) {
        queue_layout(PFN, QUEUE_SIZE)
    }

    /// Serves the queue once, as the worker would.
    pub fn serve(dev: &BlockDevice) -> Option<usize> {
        dev.serve_queue()
    }

    /// A scratch image file of `len` bytes, unique to this process and `name`.
    pub fn scratch_disk(name: &str, len: u64, read_only: bool) -> DiskFile {
        let path = std::env::temp_dir().join(format!("xcloud-blk-{}-{name}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        f.set_len(len).unwrap_or_else(|e| panic!("size: {e}"));
        drop(f);
        let disk = DiskFile::open(&DiskSpec {
            path: path.clone(),
            read_only,
        })
        .unwrap_or_else(|e| panic!("open: {e}"));
        // The open descriptor keeps the file; the name can go now.
        let _ = std::fs::remove_file(&path);
        disk
    }

    /// Guest RAM of a hostile driver, laid out so that short inputs reach the device: the
    /// first 2 bytes are the available index, the next 32 the first 16 available-ring
    /// entries, the next 4096 the descriptor table, the rest the data area (the request
    /// headers and buffers the descriptors may point at). Then the device serves the queue.
    /// It must neither panic nor touch anything outside guest RAM.
    pub fn serve_hostile_queue(data: &[u8]) {
        thread_local! {
            static DEVICE: (Arc<BlockDevice>, Arc<Ram>) = device(scratch_disk("fuzz", 1 << 20, false), 1 << 20, F_INDIRECT_DESC);
        }
        DEVICE.with(|(dev, ram)| {
            // A fresh start each time: reset, clean rings, place the queue, run.
            dev.write(legacy::STATUS, &[0]);
            let (desc, avail, used) = rings();
            let _ = ram.mem.write_slice(&[0u8; 3 * 4096], GuestAddress(desc));
            dev.write(legacy::QUEUE_PFN, &PFN.to_le_bytes());
            dev.write(legacy::STATUS, &[super::super::status::DRIVER_OK]);
            let (idx, rest) = data.split_at(data.len().min(2));
            let (ring, rest) = rest.split_at(rest.len().min(32));
            let (table, rest) = rest.split_at(rest.len().min(4096));
            let _ = ram.mem.write_slice(idx, GuestAddress(avail + 2));
            let _ = ram.mem.write_slice(ring, GuestAddress(avail + 4));
            let _ = ram.mem.write_slice(table, GuestAddress(desc));
            let data_len = rest.len().min(0x8000);
            let _ = ram.mem.write_slice(&rest[..data_len], GuestAddress(DATA));
            let _ = used;
            let _ = dev.serve_queue();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::time::{Duration, Instant};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    /// Puts a chain of (addr, len, device-writable) buffers at descriptor `first` and makes it
    /// available.
    fn submit(ram: &Ram, first: u16, buffers: &[(u64, u32, bool)]) {
        let (desc, avail, _) = rings();
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = first + i as u16;
            let more = i + 1 < buffers.len();
            let flags = if writable { WRITE } else { 0 } | if more { NEXT } else { 0 };
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, index + 1));
            ram.mem
                .write_obj(d, GuestAddress(desc + 16 * index as u64))
                .expect("descriptor");
        }
        let idx: u16 = ram.mem.read_obj(GuestAddress(avail + 2)).expect("avail idx");
        ram.mem
            .write_obj(first, GuestAddress(avail + 4 + 2 * (idx % QUEUE_SIZE) as u64))
            .expect("ring");
        ram.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .expect("avail idx");
    }

    fn header(ram: &Ram, at: u64, kind: u32, sector: u64) -> (u64, u32, bool) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        ram.mem.write_slice(&h, GuestAddress(at)).expect("header");
        (at, 16, false)
    }

    fn used(ram: &Ram, n: u16) -> (u32, u32) {
        let (_, _, used) = rings();
        let at = used + 4 + 8 * n as u64;
        (
            ram.mem.read_obj(GuestAddress(at)).expect("id"),
            ram.mem.read_obj(GuestAddress(at + 4)).expect("len"),
        )
    }

    fn status_at(ram: &Ram, at: u64) -> u8 {
        ram.mem.read_obj(GuestAddress(at)).expect("status")
    }

    const STATUS_AT: u64 = 0xf000;

    #[test]
    fn writes_reach_the_image_and_reads_bring_them_back() {
        let (dev, ram) = device(scratch_disk("rw", 1 << 20, false), 1 << 20, 0);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        ram.mem.write_slice(&pattern, GuestAddress(DATA)).expect("data");
        let h = header(&ram, 0xe000, request::OUT, 8);
        submit(
            &ram,
            0,
            &[h, (DATA, 4096, false), (DATA + 4096, 4096, false), (STATUS_AT, 1, true)],
        );
        let h = header(&ram, 0xe100, request::FLUSH, 0);
        submit(&ram, 4, &[h, (STATUS_AT + 1, 1, true)]);
        assert_eq!(serve(&dev), Some(2));
        assert_eq!((used(&ram, 0), used(&ram, 1)), ((0, 1), (4, 1)));
        assert_eq!((status_at(&ram, STATUS_AT), status_at(&ram, STATUS_AT + 1)), (0, 0));
        let h = header(&ram, 0xe200, request::IN, 8);
        submit(&ram, 6, &[h, (DATA + 0x8000, 8192, true), (STATUS_AT + 2, 1, true)]);
        assert_eq!(serve(&dev), Some(1));
        assert_eq!(used(&ram, 2), (6, 8193));
        let mut back = vec![0u8; 8192];
        ram.mem
            .read_slice(&mut back, GuestAddress(DATA + 0x8000))
            .expect("read back");
        assert_eq!(back, pattern);
        let noted = ram.noted.lock().expect("noted").clone();
        assert!(
            noted.contains(&(DATA + 0x8000, 8192)),
            "the read's buffer was recorded as written"
        );
        assert_eq!(dev.stats().written_bytes.load(Ordering::Relaxed), 8192);
        // The ID, an unknown request, and I/O past the end of the disk.
        let h = header(&ram, 0xe300, request::GET_ID, 0);
        submit(&ram, 9, &[h, (DATA, 20, true), (STATUS_AT + 3, 1, true)]);
        let h = header(&ram, 0xe400, 99, 0);
        submit(&ram, 12, &[h, (STATUS_AT + 4, 1, true)]);
        let h = header(&ram, 0xe500, request::IN, (1 << 20) / 512 - 1);
        submit(&ram, 14, &[h, (DATA, 1024, true), (STATUS_AT + 5, 1, true)]);
        let h = header(&ram, 0xe600, request::OUT, 0);
        submit(&ram, 17, &[h, (DATA, 100, false), (STATUS_AT + 6, 1, true)]);
        assert_eq!(serve(&dev), Some(4));
        let mut id = [0u8; 12];
        ram.mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(&id, b"xcloud-disk0");
        assert_eq!(
            (3..7).map(|i| status_at(&ram, STATUS_AT + i)).collect::<Vec<_>>(),
            [
                status_byte::OK,
                status_byte::UNSUPP,
                status_byte::IOERR,
                status_byte::IOERR
            ]
        );
        assert!(
            dev.inner().transport.running(),
            "bad requests are errors, not a broken driver"
        );
    }

    #[test]
    fn a_read_only_disk_refuses_writes_but_serves_reads() {
        let (dev, ram) = device(scratch_disk("ro", 1 << 20, true), 1 << 20, 0);
        assert_ne!(dev.inner().transport.device_features & feature::RO, 0);
        let h = header(&ram, 0xe000, request::OUT, 0);
        submit(&ram, 0, &[h, (DATA, 512, false), (STATUS_AT, 1, true)]);
        let h = header(&ram, 0xe100, request::IN, 0);
        submit(&ram, 3, &[h, (DATA, 512, true), (STATUS_AT + 1, 1, true)]);
        assert_eq!(serve(&dev), Some(2));
        assert_eq!((status_at(&ram, STATUS_AT), status_at(&ram, STATUS_AT + 1)), (1, 0));
    }

    fn broken_by(setup: impl FnOnce(&Ram)) -> Arc<BlockDevice> {
        let (dev, ram) = device(scratch_disk("hostile", 1 << 20, false), 1 << 20, 0);
        setup(&ram);
        assert_eq!(serve(&dev), Some(0));
        assert_ne!(dev.inner().transport.status & super::super::status::NEEDS_RESET, 0);
        assert_eq!(serve(&dev), None, "a broken device serves nothing more");
        dev
    }

    #[test]
    fn hostile_chains_break_the_device_and_a_reset_recovers_it() {
        // A loop: descriptor 1 points back at 0.
        broken_by(|ram| {
            let h = header(ram, 0xe000, request::IN, 0);
            submit(ram, 0, &[h, (DATA, 512, true)]);
            let (desc, _, _) = rings();
            let d = RawDescriptor::from(Descriptor::new(DATA, 512, WRITE | NEXT, 0));
            ram.mem.write_obj(d, GuestAddress(desc + 16)).expect("loop");
        });
        // A buffer beyond guest RAM.
        broken_by(|ram| {
            let h = header(ram, 0xe000, request::IN, 0);
            submit(ram, 0, &[h, (0xfff_0000, 512, true), (STATUS_AT, 1, true)]);
        });
        // A header the device would have to write, a chain with no status, a write whose
        // data the device would have to write.
        broken_by(|ram| submit(ram, 0, &[(0xe000, 16, true), (STATUS_AT, 1, true)]));
        broken_by(|ram| {
            let h = header(ram, 0xe000, request::FLUSH, 0);
            submit(ram, 0, &[h]);
        });
        broken_by(|ram| {
            let h = header(ram, 0xe000, request::OUT, 0);
            submit(ram, 0, &[h, (DATA, 512, true), (STATUS_AT, 1, true)]);
        });
        // A head index outside the table, and an available index far ahead of the device.
        broken_by(|ram| {
            let (_, avail, _) = rings();
            ram.mem.write_obj(300u16, GuestAddress(avail + 4)).expect("ring");
            ram.mem.write_obj(1u16, GuestAddress(avail + 2)).expect("idx");
        });
        let dev = broken_by(|ram| {
            let (_, avail, _) = rings();
            ram.mem.write_obj(1000u16, GuestAddress(avail + 2)).expect("idx");
        });
        dev.write(legacy::STATUS, &[0]);
        dev.write(legacy::QUEUE_PFN, &PFN.to_le_bytes());
        dev.write(legacy::STATUS, &[super::super::status::DRIVER_OK]);
        assert!(dev.inner().transport.running(), "a reset brings the device back");
    }

    #[test]
    fn a_queue_outside_guest_ram_is_refused_at_driver_ok() {
        let (dev, _ram) = device(scratch_disk("farq", 1 << 20, false), 1 << 20, 0);
        dev.write(legacy::STATUS, &[0]);
        dev.write(legacy::QUEUE_PFN, &0x10_0000u32.to_le_bytes());
        dev.write(legacy::STATUS, &[super::super::status::DRIVER_OK]);
        assert!(!dev.inner().transport.running());
        assert_eq!(serve(&dev), None);
    }

    #[test]
    fn a_paused_device_parks_and_its_state_restores_into_a_new_one() {
        let (dev, ram) = device(scratch_disk("pause", 1 << 20, false), 1 << 20, F_EVENT_IDX);
        let worker = dev.start_worker().expect("worker");
        let h = header(&ram, 0xe000, request::OUT, 0);
        submit(&ram, 0, &[h, (DATA, 512, false), (STATUS_AT, 1, true)]);
        let _ = dev.kick.write(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while dev.stats().requests.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the worker served the request");
            std::thread::sleep(Duration::from_millis(1));
        }
        dev.pause().expect("pause");
        let mut tree = StateTree::new();
        dev.save(&mut tree).expect("save");
        dev.resume().expect("resume");
        drop(worker);
        let saved = tree.peek::<BlockState>(0).expect("saved");
        assert_eq!(saved.transport.queues, [(PFN, 1, 1)]);
        let (copy, _) = device(scratch_disk("pause2", 1 << 20, false), 1 << 20, 0);
        copy.restore(&mut tree).expect("restore");
        let t = &copy.inner().transport;
        assert!(t.running());
        assert_eq!((t.queues[0].0.next_avail(), t.driver_features), (1, F_EVENT_IDX));
        let (other, _) = device(scratch_disk("pause3", 2 << 20, false), 1 << 20, 0);
        let mut tree2 = StateTree::new();
        tree2.save(0, &saved).expect("save");
        assert!(matches!(other.restore(&mut tree2), Err(StateError::Incompatible(_))));
    }

    #[test]
    fn hostile_queue_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200 {
            let data: Vec<u8> = (0..0x5000)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            serve_hostile_queue(&data);
        }
    }
}
