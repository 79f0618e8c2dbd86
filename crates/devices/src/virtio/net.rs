//! virtio-net (virtio 1.x, 5.1) over a TAP device: a receive queue (0) and a transmit queue
//! (1) of 256 entries, the MAC in the configuration, frames with the 10-byte legacy header.
//!
//! The worker moves frames between the TAP and guest buffers with one `readv`/`writev` each,
//! no copy in the VMM: it pops a receive buffer, reads a frame into it, and gives the buffer
//! back unused when the TAP had nothing. A transmit chain must be device-readable and a
//! receive chain device-writable, both in guest RAM; anything else breaks the device
//! (NEEDS_RESET), as for virtio-blk. With no receive buffer posted the device stops reading
//! the TAP (frames wait in its queue, then the kernel drops them) and asks for a doorbell.

use super::legacy::{self, Transport, F_EVENT_IDX, F_INDIRECT_DESC, ISR_QUEUE};
use super::persist::NetState;
use super::worker::{self, Gate, Serve, WorkerGuard};
use super::{gather, guest_iovecs, scatter, GuestMemoryHost, GuestRange};
use crate::bus::PortDevice;
use crate::hooks::{PacketDirection, PacketHook, PacketVerdict};
use crate::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, VNET_HDR_BYTES};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use xcloud_state::{Component, StateError, StateTree};

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX: usize = 0;
/// The transmit queue.
pub const TX: usize = 1;
/// Feature bit: the driver takes frames with a partial checksum (NEEDS_CSUM).
pub const F_GUEST_CSUM: u32 = 1 << 1;
/// Feature bit: the driver takes TCPv4 segments of up to 64 KiB.
pub const F_GUEST_TSO4: u32 = 1 << 7;
/// Feature bit: the configuration holds the MAC.
pub const F_MAC: u32 = 1 << 5;
/// Feature bit: the configuration holds the link status.
pub const F_STATUS: u32 = 1 << 16;
/// Largest frame a transmit chain may carry (a 64 KiB GSO frame and its header).
const MAX_TX_BYTES: u64 = 65_536 + VNET_HDR_BYTES as u64;
/// Most buffers served in one pass of one queue, so that neither direction starves the other.
const BATCH: usize = 64;

/// Why a chain is not a frame buffer: the driver is broken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The chain never ends within the queue's size, or is empty.
    #[error("the chain loops, is empty, is longer than the queue, or names a descriptor outside the table")]
    Chain,
    /// A buffer goes the wrong way.
    #[error("a {} buffer is device-{}", if *rx { "receive" } else { "transmit" }, if *rx { "readable" } else { "writable" })]
    Direction {
        /// A receive buffer (else transmit).
        rx: bool,
    },
    /// A buffer lies outside guest RAM.
    #[error("a buffer at {addr:#x} ({len} bytes) is outside guest RAM")]
    OutOfRange {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A transmit chain of no frame or of more than 64 KiB.
    #[error("a transmit chain of {0} bytes (a frame is 10 header bytes plus up to 64 KiB)")]
    Length(u64),
}

/// Takes a chain apart into its buffers: all device-writable for receive, all device-readable
/// for transmit, all in guest RAM.
pub fn parse_frame_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    rx: bool,
) -> Result<Vec<GuestRange>, FrameError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut ranges = Vec::new();
    let mut unterminated = false;
    for d in chain {
        unterminated = d.has_next();
        if d.is_write_only() != rx {
            return Err(FrameError::Direction { rx });
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(FrameError::OutOfRange {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        ranges.push(GuestRange {
            addr: d.addr().0,
            len: d.len(),
        });
    }
    if unterminated || ranges.is_empty() {
        return Err(FrameError::Chain);
    }
    if !rx {
        let total: u64 = ranges.iter().map(|r| r.len as u64).sum();
        if total <= VNET_HDR_BYTES as u64 || total > MAX_TX_BYTES {
            return Err(FrameError::Length(total));
        }
    }
    Ok(ranges)
}

/// Counters a benchmark reads.
#[derive(Default)]
pub struct NetStats {
    /// Doorbells the device woke for (each one a VM exit).
    pub kicks: AtomicU64,
    /// Frames into the guest.
    pub rx_frames: AtomicU64,
    /// Frames from the guest.
    pub tx_frames: AtomicU64,
    /// Frames an extension dropped (either way).
    pub dropped_frames: AtomicU64,
    /// Frames from the guest held for output commit, then released.
    pub held_frames: AtomicU64,
}

/// Frames the guest sent that wait until the checkpoint that saw them being sent is safe at
/// a backup (output commit: docs/replication.md). Each frame carries the epoch whose
/// checkpoint covers it: the first checkpoint taken after the guest sent it.
struct HeldOutput {
    /// The epoch of the frames the guest sends from now on.
    epoch: u64,
    frames: std::collections::VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
}

/// Most bytes of frames held for output commit; past this the NIC takes no more from the
/// guest (its transmit ring fills and it waits) until a checkpoint is acknowledged.
pub const MAX_HELD_BYTES: usize = 64 << 20;

struct Inner {
    transport: Transport,
    tap: Tap,
    mac: [u8; 6],
    bridge: Option<String>,
    /// Frames (with their header) taken from the TAP for a snapshot or a migration, delivered
    /// before anything else the TAP has.
    pending: std::collections::VecDeque<Vec<u8>>,
    /// While the VM is protected: what the guest sent and the world may not see yet.
    held: Option<HeldOutput>,
}

/// Most frames a saved NIC carries (what its TAP had queued while the VM was paused).
pub const MAX_PENDING_FRAMES: usize = 256;
/// Largest frame the TAP hands over (a 64 KiB segment and its headers).
const MAX_RX_FRAME: usize = VNET_HDR_BYTES + 65_536 + 256;

/// A virtio-net NIC.
pub struct NetDevice {
    index: u32,
    inner: Mutex<Inner>,
    mem: Arc<dyn GuestMemoryHost>,
    kick: EventFd,
    irq: EventFd,
    gate: Gate,
    /// The last pass found no receive buffer.
    starved: AtomicBool,
    stats: NetStats,
    /// The extensions that see each frame (set once by the VMM).
    packet_hook: OnceLock<Arc<dyn PacketHook>>,
}

impl NetDevice {
    /// NIC `index` on `tap` (on `bridge`, if any) with address `mac`, raising `irq`.
    pub fn new(
        index: u32,
        tap: Tap,
        mac: [u8; 6],
        bridge: Option<String>,
        mem: Arc<dyn GuestMemoryHost>,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let features = F_MAC | F_STATUS | F_GUEST_CSUM | F_GUEST_TSO4 | F_EVENT_IDX | F_INDIRECT_DESC;
        let transport =
            Transport::new(features, &[QUEUE_SIZE, QUEUE_SIZE]).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(Self {
            index,
            inner: Mutex::new(Inner {
                transport,
                tap,
                mac,
                bridge,
                pending: std::collections::VecDeque::new(),
                held: None,
            }),
            mem,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            irq,
            gate: Gate::new()?,
            starved: AtomicBool::new(false),
            stats: NetStats::default(),
            packet_hook: OnceLock::new(),
        })
    }

    /// The doorbell eventfd, for the VMM to register on the notify port.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// Its counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// Hands every frame to `hook` from now on (the VMM's extensions; set once).
    pub fn set_packet_hook(&self, hook: Arc<dyn PacketHook>) {
        let _ = self.packet_hook.set(hook);
    }

    /// The hook and its snap length, when some module takes frames now.
    fn hook(&self) -> Option<(&dyn PacketHook, usize)> {
        let hook = self.packet_hook.get()?;
        let snap = hook.snap_len();
        (snap > 0).then_some((hook.as_ref(), snap))
    }

    /// Asks the hook about a frame of `len` bytes whose head is `head`.
    fn judge(&self, hook: &dyn PacketHook, direction: PacketDirection, head: &mut [u8], len: usize) -> PacketVerdict {
        let verdict = hook.packet(self.index, direction, head, len);
        if verdict == PacketVerdict::Drop {
            self.stats.dropped_frames.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// Sends the transmit chain `ranges` to the TAP, through the hook if there is one; while
    /// output is `held`, into the held frames instead.
    fn send_frame(
        &self,
        tap: &Tap,
        held: Option<&mut HeldOutput>,
        mem: &GuestMemoryMmap,
        ranges: &[GuestRange],
        head: u16,
    ) -> Result<(), String> {
        let left_ram = || format!("transmit chain {head} left guest RAM");
        let mut rewritten = None;
        if let Some((hook, snap)) = self.hook() {
            let total: u64 = ranges.iter().map(|r| r.len as u64).sum();
            let len = (total - VNET_HDR_BYTES as u64) as usize;
            let mut bytes = gather(mem, ranges, VNET_HDR_BYTES as u64, len.min(snap)).ok_or_else(left_ram)?;
            match self.judge(hook, PacketDirection::FromGuest, &mut bytes, len) {
                PacketVerdict::Drop => return Ok(()),
                PacketVerdict::Pass => {}
                PacketVerdict::Rewrite => {
                    // The guest's buffer stays as the guest wrote it: the frame goes from a copy.
                    let mut frame = gather(mem, ranges, 0, total as usize).ok_or_else(left_ram)?;
                    frame[VNET_HDR_BYTES..VNET_HDR_BYTES + bytes.len()].copy_from_slice(&bytes);
                    rewritten = Some(frame);
                }
            }
        }
        if let Some(held) = held {
            let frame = match rewritten {
                Some(frame) => frame,
                None => {
                    let total: u64 = ranges.iter().map(|r| r.len as u64).sum();
                    gather(mem, ranges, 0, total as usize).ok_or_else(left_ram)?
                }
            };
            held.bytes += frame.len();
            held.frames.push_back((held.epoch, frame));
            return Ok(());
        }
        let written = match &mut rewritten {
            Some(frame) => {
                let iov = [libc::iovec {
                    iov_base: frame.as_mut_ptr().cast(),
                    iov_len: frame.len(),
                }];
                // SAFETY: the iovec names a live local buffer.
                unsafe { tap.write_frame(&iov) }
            }
            None => {
                let iov = guest_iovecs(mem, ranges).ok_or_else(left_ram)?;
                // SAFETY: every iovec is a checked range of guest RAM, mapped while the VM lives.
                unsafe { tap.write_frame(&iov) }
            }
        };
        if let Err(e) = written {
            tracing::debug!("virtio-net{}: a frame to {} was dropped: {e}", self.index, tap.name());
        }
        Ok(())
    }

    /// Whether a frame the device just wrote into the receive chain `ranges` (`n` bytes with
    /// its header) goes to the guest, after the hook (if any) saw it and perhaps rewrote it.
    fn admit(&self, mem: &GuestMemoryMmap, ranges: &[GuestRange], n: usize, head: u16) -> Result<bool, String> {
        let Some((hook, snap)) = self.hook() else {
            return Ok(true);
        };
        let len = n.saturating_sub(VNET_HDR_BYTES);
        let left_ram = || format!("receive chain {head} left guest RAM");
        let mut bytes = gather(mem, ranges, VNET_HDR_BYTES as u64, len.min(snap)).ok_or_else(left_ram)?;
        match self.judge(hook, PacketDirection::ToGuest, &mut bytes, len) {
            PacketVerdict::Drop => Ok(false),
            PacketVerdict::Pass => Ok(true),
            PacketVerdict::Rewrite => {
                scatter(mem, self.mem.as_ref(), ranges, VNET_HDR_BYTES as u64, &bytes).ok_or_else(left_ram)?;
                Ok(true)
            }
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.inner().mac
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the worker thread; dropping the guard stops it.
    pub fn start_worker(self: &Arc<Self>) -> std::io::Result<WorkerGuard> {
        worker::start(self, format!("virtio-net{}", self.index))
    }

    fn note_used_ring(&self, queue: &virtio_queue::Queue) {
        self.mem.note_write(queue.used_ring(), 6 + 8 * queue.size() as u64);
    }

    fn transmit(&self, inner: &mut Inner, mem: &GuestMemoryMmap) -> Result<usize, String> {
        let Inner {
            transport, tap, held, ..
        } = inner;
        let queue = &mut transport.queues[TX].0;
        let mut served = 0;
        while served < BATCH {
            if held.as_ref().is_some_and(|h| h.bytes >= MAX_HELD_BYTES) {
                // The guest waits for the backup: a release kicks the device again.
                break;
            }
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(format!("its transmit ring is invalid: {e}")),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let ranges = parse_frame_chain(chain, mem, false).map_err(|e| format!("transmit chain {head}: {e}"))?;
            self.send_frame(tap, held.as_mut(), mem, &ranges, head)?;
            queue
                .add_used(mem, head, 0)
                .map_err(|e| format!("cannot complete transmit chain {head}: {e}"))?;
            served += 1;
        }
        Ok(served)
    }

    fn receive(&self, inner: &mut Inner, mem: &GuestMemoryMmap) -> Result<usize, String> {
        let Inner {
            transport,
            tap,
            pending,
            ..
        } = inner;
        let queue = &mut transport.queues[RX].0;
        let mut served = 0;
        while let Some(frame) = pending.front_mut() {
            if let Some((hook, snap)) = self.hook() {
                let len = frame.len().saturating_sub(VNET_HDR_BYTES);
                let at = VNET_HDR_BYTES.min(frame.len());
                let end = at + len.min(snap);
                if self.judge(hook, PacketDirection::ToGuest, &mut frame[at..end], len) == PacketVerdict::Drop {
                    pending.pop_front();
                    continue;
                }
            }
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(format!("its receive ring is invalid: {e}")),
            };
            let Some(chain) = chain else {
                self.starved.store(true, Ordering::Relaxed);
                return Ok(served);
            };
            let head = chain.head_index();
            let ranges = parse_frame_chain(chain, mem, true).map_err(|e| format!("receive chain {head}: {e}"))?;
            let mut at = 0usize;
            for r in &ranges {
                let n = (frame.len() - at).min(r.len as usize);
                if n == 0 {
                    break;
                }
                mem.write_slice(&frame[at..at + n], GuestAddress(r.addr))
                    .map_err(|e| format!("receive chain {head}: {e}"))?;
                self.mem.note_write(r.addr, n as u64);
                at += n;
            }
            queue
                .add_used(mem, head, at as u32)
                .map_err(|e| format!("cannot complete receive chain {head}: {e}"))?;
            pending.pop_front();
            served += 1;
        }
        // Frames an extension drops use no buffer: the looks are bounded too.
        let mut looked = 0;
        while served < BATCH && looked < 4 * BATCH {
            looked += 1;
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(format!("its receive ring is invalid: {e}")),
            };
            let Some(chain) = chain else {
                self.starved.store(true, Ordering::Relaxed);
                break;
            };
            self.starved.store(false, Ordering::Relaxed);
            let head = chain.head_index();
            let ranges = parse_frame_chain(chain, mem, true).map_err(|e| format!("receive chain {head}: {e}"))?;
            let iov = guest_iovecs(mem, &ranges).ok_or_else(|| format!("receive chain {head} left guest RAM"))?;
            // SAFETY: as for transmit; the device writes these buffers, which the driver gave it.
            match unsafe { tap.read_frame(&iov) } {
                Ok(Some(n)) => {
                    let mut left = n as u64;
                    for r in &ranges {
                        let wrote = left.min(r.len as u64);
                        self.mem.note_write(r.addr, wrote);
                        left -= wrote;
                    }
                    if !self.admit(mem, &ranges, n, head)? {
                        // Dropped: the buffer goes back for the next frame.
                        queue.go_to_previous_position();
                        continue;
                    }
                    queue
                        .add_used(mem, head, n as u32)
                        .map_err(|e| format!("cannot complete receive chain {head}: {e}"))?;
                    served += 1;
                }
                Ok(None) => {
                    // Nothing waiting: the buffer goes back for the next frame.
                    queue.go_to_previous_position();
                    break;
                }
                Err(e) => {
                    queue.go_to_previous_position();
                    tracing::warn!("virtio-net{}: reading {} failed: {e}", self.index, tap.name());
                    break;
                }
            }
        }
        Ok(served)
    }

    fn serve_queues(&self) -> Option<usize> {
        let mut guard = self.inner();
        if !guard.transport.running() {
            return None;
        }
        let mem = self.mem.memory();
        let placed = |q: usize| guard.transport.queues[q].1 != 0;
        let (tx_placed, rx_placed) = (placed(TX), placed(RX));
        let mut served = [0usize; 2];
        let mut broken = None;
        if tx_placed {
            match self.transmit(&mut guard, mem) {
                Ok(n) => served[TX] = n,
                Err(why) => broken = Some(why),
            }
        }
        if rx_placed && broken.is_none() {
            match self.receive(&mut guard, mem) {
                Ok(n) => served[RX] = n,
                Err(why) => broken = Some(why),
            }
        }
        let mut interrupt = false;
        for q in [RX, TX] {
            if served[q] > 0 {
                let queue = &mut guard.transport.queues[q].0;
                self.note_used_ring(queue);
                interrupt |= queue.needs_notification(mem).unwrap_or(true);
            }
        }
        if served[RX] + served[TX] > 0 {
            self.mem.completed();
        }
        self.stats.rx_frames.fetch_add(served[RX] as u64, Ordering::Relaxed);
        self.stats.tx_frames.fetch_add(served[TX] as u64, Ordering::Relaxed);
        if let Some(why) = &broken {
            tracing::error!(
                "virtio-net{} ({}): the driver broke the queue rules, the device needs a reset: {why}",
                self.index,
                guard.tap.name()
            );
            guard.transport.mark_broken();
            interrupt = true;
        }
        if interrupt {
            guard.transport.isr |= ISR_QUEUE;
            let _ = self.irq.write(1);
        }
        Some(served[RX] + served[TX])
    }

    fn config_bytes(&self, mac: &[u8; 6]) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(mac);
        // VIRTIO_NET_S_LINK_UP.
        c[6] = 1;
        c
    }

    /// Tells the TAP what the driver accepted, so the kernel hands over only frames it takes.
    fn apply_offloads(&self, inner: &Inner) {
        let features = inner.transport.driver_features;
        let mut flags = 0;
        if features & F_GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
        }
        if let Err(e) = inner.tap.set_offload(flags) {
            tracing::warn!(
                "virtio-net{}: cannot set the offloads of {}: {e}",
                self.index,
                inner.tap.name()
            );
        }
    }

    /// Sends a RARP from the guest's MAC through the TAP, as QEMU does after a migration or a
    /// restore: bridges, switches and an overlay's forwarding tables learn at once where the
    /// MAC is now, without waiting for the guest to send. It needs no IP address.
    pub fn announce(&self) -> std::io::Result<()> {
        let inner = self.inner();
        let mac = inner.mac;
        let mut frame = [0u8; VNET_HDR_BYTES + 60];
        let f = &mut frame[VNET_HDR_BYTES..];
        f[0..6].fill(0xff);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&[0x80, 0x35]);
        // Hardware Ethernet, protocol IPv4, lengths 6 and 4, operation 3 (reverse request).
        f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]);
        f[22..28].copy_from_slice(&mac);
        f[32..38].copy_from_slice(&mac);
        let iov = [libc::iovec {
            iov_base: frame.as_mut_ptr().cast(),
            iov_len: frame.len(),
        }];
        // SAFETY: the iovec names a live local array.
        unsafe { inner.tap.write_frame(&iov) }.map(|_| ())
    }

    /// Output commit (docs/replication.md): from now on the frames the guest sends are held
    /// as part of `epoch` (the checkpoint that will cover them), instead of going out. Called
    /// while the VM is paused for each checkpoint, with the next epoch.
    pub fn hold_output(&self, epoch: u64) {
        let mut inner = self.inner();
        match &mut inner.held {
            Some(held) => held.epoch = epoch,
            None => {
                inner.held = Some(HeldOutput {
                    epoch,
                    frames: std::collections::VecDeque::new(),
                    bytes: 0,
                })
            }
        }
    }

    /// Sends the held frames of epochs up to `epoch` (its checkpoint is safe at the backup);
    /// with None, every held frame, and stops holding (the VM is no longer protected).
    /// Returns how many frames went out.
    pub fn release_output(&self, epoch: Option<u64>) -> usize {
        let mut inner = self.inner();
        let Inner { tap, held, .. } = &mut *inner;
        let Some(queue) = held.as_mut() else {
            return 0;
        };
        let was_full = queue.bytes >= MAX_HELD_BYTES;
        let mut released = 0;
        while let Some((frame_epoch, _)) = queue.frames.front() {
            if epoch.is_some_and(|e| *frame_epoch > e) {
                break;
            }
            let Some((_, mut frame)) = queue.frames.pop_front() else {
                break;
            };
            queue.bytes -= frame.len();
            let iov = [libc::iovec {
                iov_base: frame.as_mut_ptr().cast(),
                iov_len: frame.len(),
            }];
            // SAFETY: the iovec names a live local buffer.
            if let Err(e) = unsafe { tap.write_frame(&iov) } {
                tracing::debug!(
                    "virtio-net{}: a released frame to {} was dropped: {e}",
                    self.index,
                    tap.name()
                );
            }
            released += 1;
        }
        if epoch.is_none() {
            *held = None;
        }
        self.stats.held_frames.fetch_add(released as u64, Ordering::Relaxed);
        if was_full {
            // The device stopped taking frames from the guest: let it look again.
            let _ = self.kick.write(1);
        }
        released
    }

    /// Takes what the TAP has queued (frames that arrived while the VM was paused) into the
    /// pending frames, so that a snapshot or a migration carries them instead of leaving them
    /// behind on this host.
    fn drain_tap(&self, inner: &mut Inner) {
        let mut buf = vec![0u8; MAX_RX_FRAME];
        while inner.pending.len() < MAX_PENDING_FRAMES {
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec names a live local buffer.
            match unsafe { inner.tap.read_frame(&iov) } {
                Ok(Some(n)) => inner.pending.push_back(buf[..n].to_vec()),
                _ => break,
            }
        }
    }

    fn state(&self) -> NetState {
        let mut inner = self.inner();
        self.drain_tap(&mut inner);
        NetState {
            pending: inner.pending.iter().cloned().collect(),
            tap: inner.tap.name().to_string(),
            bridge: inner.bridge.clone(),
            mac: inner.mac,
            transport: inner.transport.save_state(),
        }
    }
}

impl Serve for NetDevice {
    fn gate(&self) -> &Gate {
        &self.gate
    }

    fn serve(&self) -> Option<usize> {
        self.serve_queues()
    }

    fn arm(&self) -> bool {
        let mut inner = self.inner();
        if !inner.transport.running() {
            return false;
        }
        let mem = self.mem.memory();
        let mut more = false;
        if inner.transport.queues[TX].1 != 0 {
            let q = &mut inner.transport.queues[TX].0;
            more |= q.enable_notification(mem).unwrap_or(false);
            self.note_used_ring(q);
        }
        // Receive buffers are usually waiting (the driver posts them ahead); the doorbell is
        // wanted only when there are none, and frames from the TAP wake the worker otherwise.
        if self.starved.load(Ordering::Relaxed) && inner.transport.queues[RX].1 != 0 {
            let q = &mut inner.transport.queues[RX].0;
            more |= q.enable_notification(mem).unwrap_or(false);
            self.note_used_ring(q);
        }
        more
    }

    fn disarm(&self) {
        let mut inner = self.inner();
        if !inner.transport.running() {
            return;
        }
        let mem = self.mem.memory();
        for q in [RX, TX] {
            if inner.transport.queues[q].1 != 0 {
                let queue = &mut inner.transport.queues[q].0;
                let _ = queue.disable_notification(mem);
                self.note_used_ring(queue);
            }
        }
    }

    fn sleep_fds(&self) -> Vec<(RawFd, i16)> {
        let mut fds = vec![(self.kick.as_raw_fd(), libc::POLLIN)];
        let inner = self.inner();
        if inner.transport.running() && !self.starved.load(Ordering::Relaxed) {
            fds.push((inner.tap.as_raw_fd(), libc::POLLIN));
        }
        fds
    }

    fn woke(&self, _ready: &[(RawFd, i16)]) {
        if let Ok(n) = self.kick.read() {
            self.stats.kicks.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl PortDevice for NetDevice {
    fn read(&self, offset: u16, data: &mut [u8]) {
        let mut inner = self.inner();
        let config = self.config_bytes(&inner.mac);
        inner.transport.read_window(offset, data, &config);
    }

    fn write(&self, offset: u16, data: &[u8]) {
        let effect = {
            let mut inner = self.inner();
            let (effect, started) =
                inner
                    .transport
                    .driver_write(offset, data, self.mem.as_ref(), ("virtio-net", self.index));
            if started {
                self.apply_offloads(&inner);
            }
            effect
        };
        worker::deliver(effect, &self.kick, &self.gate);
    }
}

impl Component for NetDevice {
    fn name(&self) -> &'static str {
        "virtio-net"
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
        let s = from.require::<NetState>(self.index)?;
        let mut inner = self.inner();
        inner.mac = s.mac;
        inner.pending = s.pending.into_iter().collect();
        inner
            .transport
            .restore_state(&s.transport, self.mem.as_ref())
            .map_err(|why| StateError::Incompatible(format!("virtio-net{}: {why}", self.index)))?;
        self.apply_offloads(&inner);
        drop(inner);
        self.gate.wake();
        Ok(())
    }
}

/// Hostile queues for tests and fuzzing.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// Guest RAM of a hostile driver laid out as for virtio-blk's harness (the available
    /// index, 16 ring entries, the descriptor table, then data); every chain the queue yields
    /// is taken apart as a receive and as a transmit chain. Neither may panic, and every range
    /// either accepts must lie in guest RAM.
    pub fn parse_hostile_chains(data: &[u8]) {
        let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]) else {
            return;
        };
        let (desc, avail, used) = legacy::queue_layout(1, QUEUE_SIZE);
        let (idx, rest) = data.split_at(data.len().min(2));
        let (ring, rest) = rest.split_at(rest.len().min(32));
        let (table, rest) = rest.split_at(rest.len().min(4096));

        let _ = mem.write_slice(idx, GuestAddress(avail + 2));
        let _ = mem.write_slice(ring, GuestAddress(avail + 4));
        let _ = mem.write_slice(table, GuestAddress(desc));
        let _ = mem.write_slice(&rest[..rest.len().min(0x8000)], GuestAddress(0x10000));
        let Ok(mut queue) = virtio_queue::Queue::new(QUEUE_SIZE) else {
            return;
        };
        queue.set_size(QUEUE_SIZE);
        let placed = queue
            .try_set_desc_table_address(GuestAddress(desc))
            .and_then(|_| queue.try_set_avail_ring_address(GuestAddress(avail)))
            .and_then(|_| queue.try_set_used_ring_address(GuestAddress(used)));
        if placed.is_err() {
            return;
        }
        queue.set_ready(true);
        for _ in 0..QUEUE_SIZE {
            let chain = match queue.iter(&mem) {
                Ok(mut it) => it.next(),
                Err(_) => return,
            };
            let Some(chain) = chain else { return };
            for rx in [true, false] {
                if let Ok(ranges) = parse_frame_chain(chain.clone(), &mem, rx) {
                    for r in ranges {
                        assert!(GuestMemoryBackend::check_range(
                            &mem,
                            GuestAddress(r.addr),
                            r.len as usize
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::parse_hostile_chains;

    #[test]
    fn hostile_chains_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let data: Vec<u8> = (0..0x1200)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            parse_hostile_chains(&data);
        }
    }
}
