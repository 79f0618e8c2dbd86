//! The primary side of continuous replication (docs/replication.md), Remus-style: every
//! interval the VM is paused just long enough to copy the pages it dirtied and save its state
//! into a staging buffer, runs on at once, and the checkpoint goes to the backup while it runs.
//! The backup applies a checkpoint only once it has all of it and it checks out, and takes
//! over from the last one it acknowledged when the primary goes silent.
//!
//! Output commit: from the first checkpoint on, the frames the guest sends wait in its NICs
//! until the backup has acknowledged the checkpoint that covers them, so nothing the world saw
//! can be lost at a failover.
//!
//! It shares the migration engine: the connection and HELLO ([`crate::source::open_stream`]),
//! dirty logging, the page frames, the state tree.

use crate::disks::DiskCopy;
use crate::duplex::{readable, Duplex, Inbox};
use crate::error::MigrationError;
use crate::fence::Fence;
use crate::handover::sync;
use crate::link::Link;
use crate::options::{Claim, Outgoing, ProtectOptions, ProtectionStatus};
use crate::source::{fetch_dirty_pages, open_stream, read_guest_page};
use crate::tls::{self, Credentials};
use crate::wire::{self, CheckpointHeader, Kind, WireError, MAX_PAGES_PER_FRAME, PAGE};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xcloud_vmm::{VmHandle, VmState};

/// Checkpoints sent but not acknowledged before the primary waits for the backup.
const MAX_UNACKED: u64 = 4;
/// Pre-copy rounds of the initial copy at most, before the first checkpoint takes the rest.
const INITIAL_ROUNDS: u32 = 8;
/// The initial copy's rounds end once fewer pages than this are dirty.
const INITIAL_SETTLED_PAGES: usize = 2048;
/// How long the primary waits between two attempts to keep its fence while the fence's store
/// cannot be reached.
const FENCE_RETRY: Duration = Duration::from_millis(500);
/// How long the primary waits for the backup to close after END.
const END_DRAIN: Duration = Duration::from_secs(1);

/// Starts replicating the VM behind `handle` to the backup at `addr` (`xcloud receive
/// --standby`). Returns once the backup holds the first checkpoint: from then on the VM is
/// protected, and checkpoints go on in the background until [`Outgoing::unprotect`], the VM's
/// end (the backup then lets it go), or the backup's loss (the VM runs on unprotected and
/// `status` says why).
pub fn protect(
    handle: &VmHandle,
    outgoing: &Outgoing,
    addr: &str,
    creds: &Credentials,
    options: ProtectOptions,
) -> Result<ProtectionStatus, MigrationError> {
    options.check()?;
    let claim = outgoing.claim().ok_or(MigrationError::Busy)?;
    handle.wait_for_memory()?;
    match handle.state() {
        VmState::Running | VmState::Paused => {}
        other => return Err(MigrationError::State(other)),
    }
    // A fenced protection holds a new generation of the fence before the backup hears of it:
    // the backup may take over that generation only.
    let fence = outgoing.fence();
    let generation = fence.as_ref().map(|f| f.claim_primary()).transpose()?;
    let (mut stream, link) = open_stream(handle, addr, creds, options.backup_timeout)?;
    let to_ms = |d: Duration| d.as_millis().clamp(1, 60_000) as u32;
    let announce = wire::Protect {
        heartbeat_ms: to_ms(options.heartbeat),
        interval_ms: to_ms(options.interval),
        fence: fence
            .as_ref()
            .zip(generation)
            .map(|(f, generation)| (generation, f.key().to_string())),
    };
    wire::write_frame(&mut stream, Kind::Protect, &announce.encode())?;
    let machine = handle.machine();
    machine.set_dirty_logging(true).map_err(|source| MigrationError::Kvm {
        what: "start dirty-page logging",
        source,
    })?;
    let mut replicator = Replicator {
        handle: handle.clone(),
        outgoing: outgoing.clone(),
        options,
        status: ProtectionStatus {
            backup: addr.to_string(),
            fence: announce
                .fence
                .as_ref()
                .map(|(generation, key)| format!("{key} generation {generation}")),
            ..Default::default()
        },
        epoch: 0,
        unacked: VecDeque::new(),
        acks: VecDeque::new(),
        sends: VecDeque::new(),
        pauses: 0,
        pause_total: Duration::ZERO,
        frames: Vec::new(),
        disks: None,
        disk_frames: Vec::new(),
        fence,
    };
    let first = replicator
        .initial_copy(&mut stream, &link)
        .and_then(|_| replicator.checkpoint(&mut stream))
        .and_then(|_| replicator.wait_ack(&mut stream, &mut Inbox::new(), 1));
    if let Err(e) = first {
        handle.release_output(None);
        let _ = machine.set_dirty_logging(false);
        return Err(e);
    }
    replicator.publish();
    let status = replicator.status.clone();
    let thread = std::thread::Builder::new()
        .name("replication".into())
        .spawn(move || replicator.run(stream, link, claim))
        .map_err(|e| MigrationError::Wire(WireError::Io(e)))?;
    outgoing.set_replicator(thread);
    Ok(status)
}

/// The primary's side of one replication.
struct Replicator {
    handle: VmHandle,
    outgoing: Outgoing,
    options: ProtectOptions,
    status: ProtectionStatus,
    /// The last epoch sent.
    epoch: u64,
    /// Epochs sent and not yet acknowledged, with when their pause began.
    unacked: VecDeque<(u64, Instant)>,
    /// When the acknowledgements of the last second came.
    acks: VecDeque<Instant>,
    /// What was sent in the last second: when, how many bytes.
    sends: VecDeque<(Instant, u64)>,
    pauses: u64,
    pause_total: Duration,
    /// The staging buffer: the epoch's pages as PAGES payloads, copied during the pause.
    frames: Vec<Vec<u8>>,
    /// The disks' copy (from the initial copy on): it tracks the chunks the guest writes.
    disks: Option<DiskCopy>,
    /// The staging buffer of the disks: the chunks written in the epoch, as DISK_DATA payloads.
    disk_frames: Vec<Vec<u8>>,
    /// The VM's fence, if the protection is fenced.
    fence: Option<Arc<dyn Fence>>,
}

impl Replicator {
    /// Every touched page while the guest runs, then rounds of what it dirtied meanwhile until
    /// little is left, then SYNC: the backup has applied it all. The first checkpoint takes
    /// the rest.
    fn initial_copy(&mut self, stream: &mut tls::ClientStream, link: &Link) -> Result<(), MigrationError> {
        let machine = self.handle.machine();
        // The disks first, while the guest runs (as a migration does); from here on the
        // chunks it writes are tracked for the checkpoints.
        self.disks = Some(DiskCopy::start(&self.handle, stream)?);
        let mut sender = crate::sender::PageSender::new(stream, self.options.compress);
        let mut page = vec![0u8; PAGE];
        for pfn in machine.ram().resident_pages() {
            read_guest_page(machine, pfn, &mut page)?;
            if !xcloud_vm_core::memory::is_zero(&page) {
                sender.page(pfn, &page)?;
            }
        }
        sender.flush()?;
        for _ in 0..INITIAL_ROUNDS {
            // Reading the log clears it: every page fetched is sent, and what the guest
            // writes after the fetch is logged again for the next round or the checkpoint.
            let dirty = fetch_dirty_pages(machine)?;
            for &pfn in &dirty {
                read_guest_page(machine, pfn, &mut page)?;
                sender.page(pfn, &page)?;
            }
            sender.flush()?;
            if dirty.len() < INITIAL_SETTLED_PAGES {
                break;
            }
        }
        sender.flush()?;
        tracing::info!(
            "replication: initial copy of {} pages ({} MiB, {} KiB in flight)",
            sender.pages,
            sender.bytes >> 20,
            link.in_flight() >> 10
        );
        self.record_send(sender.bytes);
        sync(stream)
    }

    /// Takes and sends one checkpoint: pause, copy the dirty pages and the state into the
    /// staging buffer, resume; then send it while the guest runs.
    fn checkpoint(&mut self, stream: &mut tls::ClientStream) -> Result<(), MigrationError> {
        let machine = self.handle.machine();
        let pause_start = Instant::now();
        let was_running = self.handle.state() == VmState::Running;
        if was_running {
            self.handle.pause()?;
        }
        let mut pages = 0u64;
        let epoch = self.epoch + 1;
        let copied = (|| -> Result<Vec<u8>, MigrationError> {
            let dirty = fetch_dirty_pages(machine)?;
            pages = dirty.len() as u64;
            stage(machine, &dirty, &mut self.frames)?;
            if let Some(disks) = &mut self.disks {
                disks.stage_dirty(&mut self.disk_frames)?;
            }
            let state = self.handle.save_state()?.encode()?;
            // Output commit: what the guest sends from here on is covered by the next
            // checkpoint, and the world sees it only once the backup has that one.
            self.handle.hold_output(epoch + 1);
            Ok(state)
        })();
        if was_running {
            self.handle.resume()?;
        }
        let pause = pause_start.elapsed();
        let state = copied?;
        self.epoch = epoch;
        let mut digest = Sha256::new();
        let mut bytes = 0u64;
        for frame in &self.frames {
            digest.update(frame);
            let packed = self
                .options
                .compress
                .then(|| wire::compress_pages(frame))
                .filter(|p| p.len() < frame.len());
            let (kind, payload) = match &packed {
                Some(p) => (Kind::PagesLz4, p.as_slice()),
                None => (Kind::Pages, frame.as_slice()),
            };
            wire::write_frame(stream, kind, payload)?;
            bytes += 5 + payload.len() as u64;
        }
        // The disks' chunks of the epoch: the backup writes them at the checkpoint too.
        for frame in &self.disk_frames {
            digest.update(frame);
            wire::write_frame(stream, Kind::DiskData, frame)?;
            bytes += 5 + frame.len() as u64;
        }
        digest.update(&state);
        let header = CheckpointHeader {
            epoch: self.epoch,
            pages,
            digest: digest.finalize().into(),
        };
        let payload = header.encode(&state);
        wire::write_frame(stream, Kind::Checkpoint, &payload)?;
        stream.flush().map_err(WireError::from)?;
        bytes += 5 + payload.len() as u64;
        self.unacked.push_back((self.epoch, pause_start));
        self.record_send(bytes);
        self.pauses += 1;
        self.pause_total += pause;
        self.status.last_pages = pages;
        self.status.last_bytes = bytes;
        self.status.pause_us = pause.as_micros() as u64;
        self.status.max_pause_us = self.status.max_pause_us.max(self.status.pause_us);
        self.status.mean_pause_us = (self.pause_total / self.pauses as u32).as_micros() as u64;
        Ok(())
    }

    fn record_send(&mut self, bytes: u64) {
        let now = Instant::now();
        self.sends.push_back((now, bytes));
        while self
            .sends
            .front()
            .is_some_and(|(t, _)| now - *t > Duration::from_secs(1))
        {
            self.sends.pop_front();
        }
    }

    /// Takes an ACK: it must acknowledge the oldest epoch not yet acknowledged.
    fn acknowledged(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let epoch = wire::decode_ack(payload)?;
        let Some((expected, paused_at)) = self.unacked.pop_front() else {
            return Err(MigrationError::Refused(format!(
                "the backup acknowledged epoch {epoch}, which was not sent"
            )));
        };
        if epoch != expected {
            return Err(MigrationError::Refused(format!(
                "the backup acknowledged epoch {epoch} where {expected} was due"
            )));
        }
        // The frames the guest sent before this checkpoint can be seen now.
        self.handle.release_output(Some(epoch));
        let now = Instant::now();
        self.status.acked_epoch = epoch;
        self.status.commit_ms = (now - paused_at).as_secs_f64() * 1e3;
        self.acks.push_back(now);
        while self.acks.front().is_some_and(|t| now - *t > Duration::from_secs(1)) {
            self.acks.pop_front();
        }
        Ok(())
    }

    /// Reads the acknowledgements that have arrived, without waiting.
    fn take_acks(&mut self, stream: &mut tls::ClientStream, inbox: &mut Inbox) -> Result<(), MigrationError> {
        let mut buf = Vec::new();
        while let Some(kind) = inbox.next_frame(stream, &mut buf)? {
            match kind {
                Kind::Ack => self.acknowledged(&buf)?,
                other => return Err(MigrationError::Refused(format!("the backup sent a {other:?} frame"))),
            }
        }
        Ok(())
    }

    /// Waits until the backup has acknowledged `epoch`.
    fn wait_ack(
        &mut self,
        stream: &mut tls::ClientStream,
        inbox: &mut Inbox,
        epoch: u64,
    ) -> Result<(), MigrationError> {
        let deadline = Instant::now() + self.options.backup_timeout;
        while self.status.acked_epoch < epoch {
            self.take_acks(stream, inbox)?;
            if self.status.acked_epoch >= epoch {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrationError::Refused(format!(
                    "the backup did not acknowledge checkpoint {epoch} within {:?}",
                    self.options.backup_timeout
                )));
            }
            readable(&[stream.poll_fd()], left.as_millis().clamp(1, 50) as i32).map_err(WireError::from)?;
        }
        Ok(())
    }

    /// Publishes the figures for `status`.
    fn publish(&mut self) {
        let now = Instant::now();
        while self.acks.front().is_some_and(|t| now - *t > Duration::from_secs(1)) {
            self.acks.pop_front();
        }
        self.status.epochs_per_s = self.acks.len() as f64;
        self.status.bytes_per_s = self
            .sends
            .iter()
            .filter(|(t, _)| now - *t <= Duration::from_secs(1))
            .map(|(_, b)| *b as f64)
            .sum();
        self.outgoing.set_protection(self.status.clone());
    }

    /// The checkpoints after the first, until protection ends; then the VM runs on unprotected,
    /// or, if its fence went to the backup meanwhile, stops.
    fn run(mut self, mut stream: tls::ClientStream, _link: Link, claim: Claim) {
        let ended = self.epochs(&mut stream);
        let why = match ended {
            Ok(why) => why,
            Err(e) => format!(
                "the backup at {} was lost: {}",
                self.status.backup,
                xcloud_vm_core::report::flatten_error(&e)
            ),
        };
        let why = if self.settle_fence(&why) {
            // Unprotected from here on: what the guest sent goes out, and it sends freely.
            self.handle.release_output(None);
            let _ = self.handle.machine().set_dirty_logging(false);
            if self.handle.state() == VmState::Stopped {
                tracing::info!("replication to {} ended: {why}", self.status.backup);
            } else {
                tracing::warn!(
                    "replication to {} ended: {why}; the VM runs on UNPROTECTED",
                    self.status.backup
                );
            }
            why
        } else if self.handle.state() == VmState::Stopped {
            // The VM ended here, but its fence was the backup's by then, or out of reach:
            // what it held may be the backup's to send, so it stays unsent.
            format!("{why}; the VM ended without sending what it held (its fence was not this VMM's to free)")
        } else {
            // The backup runs the VM from its last checkpoint: this one must never be seen
            // again, so what it held stays unsent.
            self.handle.stop();
            let fenced = format!(
                "{why}; the backup took the VM over (its fence is theirs now): this VM stopped without sending what it held"
            );
            eprintln!("xcloud: FENCED: {fenced}");
            fenced
        };
        self.status.ended = Some(why);
        self.status.epochs_per_s = 0.0;
        self.status.bytes_per_s = 0.0;
        self.outgoing.set_protection(self.status.clone());
        drop(claim);
    }

    /// Whether the VM may go on here, with its output released, once protection has ended for
    /// `why`: without a fence it may; with one, only if this process still holds it (asked again
    /// while the fence cannot be reached: meanwhile the guest runs and its output stays held).
    fn settle_fence(&mut self, why: &str) -> bool {
        let Some(fence) = self.fence.clone() else {
            return true;
        };
        let mut attempts = 0u64;
        loop {
            let stopped = self.handle.state() == VmState::Stopped;
            let answer = if stopped { fence.release() } else { fence.keep() };
            match answer {
                Ok(ours) => return ours,
                // A VM that ended with the fence out of reach sends nothing more: what it held
                // may be the backup's to send.
                Err(e) if stopped => {
                    tracing::warn!("the VM ended but its fence could not be freed: {e}");
                    return false;
                }
                Err(e) => {
                    if attempts < 3 || attempts % 10 == 0 {
                        tracing::warn!("{why}, and the fence cannot be asked whether the VM may go on here: {e}; its output stays held");
                    }
                    attempts += 1;
                    self.status.ended = Some(format!(
                        "{why}; waiting for the fence {} (output held): {e}",
                        fence.key()
                    ));
                    self.outgoing.set_protection(self.status.clone());
                    std::thread::sleep(FENCE_RETRY);
                }
            }
        }
    }

    /// Returns why protection ended on purpose, or the error that lost the backup.
    fn epochs(&mut self, stream: &mut tls::ClientStream) -> Result<String, MigrationError> {
        let mut inbox = Inbox::new();
        let mut last_sent = Instant::now();
        let mut next_checkpoint = Instant::now() + self.options.interval;
        let mut last_progress = Instant::now();
        loop {
            let ending = if self.handle.state() == VmState::Stopped {
                Some("the VM ended at the primary")
            } else if self.outgoing.unprotect_asked() {
                Some("protection was ended at the primary")
            } else {
                None
            };
            if let Some(why) = ending {
                // The backup lets the VM go instead of running it.
                wire::write_frame(stream, Kind::End, why.as_bytes())?;
                stream.flush().map_err(WireError::from)?;
                await_close(stream, &mut inbox);
                return Ok(why.into());
            }
            let acked_before = self.status.acked_epoch;
            self.take_acks(stream, &mut inbox)?;
            let now = Instant::now();
            if self.status.acked_epoch != acked_before || self.unacked.is_empty() {
                last_progress = now;
            } else if now - last_progress > self.options.backup_timeout {
                return Err(MigrationError::Refused(format!(
                    "no acknowledgement for {:?}",
                    self.options.backup_timeout
                )));
            }
            let room = (self.unacked.len() as u64) < MAX_UNACKED;
            if room && now >= next_checkpoint {
                match self.checkpoint(stream) {
                    Ok(()) => {}
                    // The VM ended under the checkpoint: the next turn tells the backup.
                    Err(_) if self.handle.state() == VmState::Stopped => continue,
                    Err(e) => return Err(e),
                }
                last_sent = Instant::now();
                // On time if it can be; a late checkpoint does not make the next ones rush.
                next_checkpoint = (next_checkpoint + self.options.interval).max(last_sent);
                self.publish();
                continue;
            }
            if now - last_sent >= self.options.heartbeat {
                wire::write_frame(stream, Kind::Heartbeat, &[])?;
                stream.flush().map_err(WireError::from)?;
                last_sent = now;
            }
            let wait = next_checkpoint
                .saturating_duration_since(now)
                .min(Duration::from_millis(5));
            readable(&[stream.poll_fd()], wait.as_millis().max(1) as i32).map_err(WireError::from)?;
        }
    }
}

/// After END: reads and drops what the backup still sends until it closes (at most
/// [`END_DRAIN`]), so that this end closes last. Closing first with acknowledgements unread
/// would reset the connection, and the reset could reach the backup before it has read the END.
fn await_close(stream: &mut tls::ClientStream, inbox: &mut Inbox) {
    let deadline = Instant::now() + END_DRAIN;
    let mut buf = Vec::new();
    loop {
        match inbox.next_frame(stream, &mut buf) {
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(_) => return,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let _ = readable(&[stream.poll_fd()], left.as_millis().clamp(1, 50) as i32);
    }
}

/// Copies pages `pfns` into PAGES payloads of at most [`MAX_PAGES_PER_FRAME`] pages each,
/// reusing the buffers of `frames`.
fn stage(
    machine: &xcloud_vm_core::machine::Machine,
    pfns: &[u64],
    frames: &mut Vec<Vec<u8>>,
) -> Result<(), MigrationError> {
    frames.resize_with(pfns.len().div_ceil(MAX_PAGES_PER_FRAME), Vec::new);
    let mut page = vec![0u8; PAGE];
    for (frame, chunk) in frames.iter_mut().zip(pfns.chunks(MAX_PAGES_PER_FRAME)) {
        frame.clear();
        for &pfn in chunk {
            read_guest_page(machine, pfn, &mut page)?;
            wire::push_page(frame, pfn, &page);
        }
    }
    Ok(())
}
