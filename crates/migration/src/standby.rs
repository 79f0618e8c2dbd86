//! The backup side of continuous replication (docs/replication.md): it holds the last
//! complete checkpoint of the primary's VM, and when the primary goes silent or its connection
//! breaks it builds the VM from that checkpoint for the caller to start.
//!
//! A checkpoint is applied only once all of it has arrived and its digest checks out: the pages
//! of an epoch are staged in memory until its CHECKPOINT frame, so a primary that dies in the
//! middle of one leaves the backup with the one before. A hostile or corrupt stream is refused
//! and nothing runs: the primary may well be alive, and running the VM here too would run it
//! twice.

use crate::destination::{accept_hello, apply_pages, prepare_in_background, refuse};
use crate::disks::DiskReceiver;
use crate::duplex::{readable, Duplex, Inbox};
use crate::error::MigrationError;
use crate::fence::Fence;
use crate::options::StandbyWatch;
use crate::tls::{self, Credentials};
use crate::wire::{self, CheckpointHeader, Kind, WireError, PAGE};
use sha2::{Digest, Sha256};
use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, Instant};
use xcloud_state::StateTree;
use xcloud_vm_core::report::flatten_error;
use xcloud_vmm::{Console, Vm};

/// How standing by ended.
pub enum StandbyEnd {
    /// The primary is gone: the VM, built from the last checkpoint, ready to start.
    TakeOver {
        /// The VM, not started.
        vm: Vm,
        /// The checkpoint it continues from.
        epoch: u64,
        /// Why the primary is taken for gone.
        why: String,
        /// From the primary's last sign of life to the VM built.
        since_last_word: Duration,
        /// Bytes of the epoch after it that had arrived when the primary went (whole frames
        /// and the part of one): dropped.
        unfinished_bytes: u64,
    },
    /// The primary ended protection on purpose (its VM ended, or its operator unprotected
    /// it): nothing runs here.
    Released(String),
}

/// Listens on `addr` for the primary (the handshakes bounded as for a migration) and stands by
/// for it.
pub fn listen_and_stand_by(
    addr: &str,
    creds: &Credentials,
    console: Console,
    disk_dir: Option<&Path>,
    fence: Option<&dyn Fence>,
    watch: Option<&StandbyWatch>,
) -> Result<StandbyEnd, MigrationError> {
    let stream: tls::ServerStream = crate::destination::listen_and_authenticate(addr, creds)?;
    stand_by(stream, console, disk_dir, fence, watch)
}

/// How long the backup waits between two attempts to take the fence over while its store
/// cannot be reached.
const FENCE_RETRY: Duration = Duration::from_millis(500);

/// Whether a failed read means the primary is gone (rather than that it sent garbage).
fn primary_lost(e: &WireError) -> bool {
    matches!(e, WireError::Io(io) if matches!(
        io.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::TimedOut
            | ErrorKind::NotConnected
    ))
}

/// Answers the primary, unless an earlier answer found its connection gone (`lost` says how):
/// a connection gone is noted rather than failed, since the frames the primary sent before it
/// went are still to be read.
fn reply(stream: &mut impl Duplex, lost: &mut Option<String>, kind: Kind, payload: &[u8]) -> Result<(), String> {
    if lost.is_some() {
        return Ok(());
    }
    let written = wire::write_frame(stream, kind, payload).and_then(|_| stream.flush().map_err(WireError::from));
    match written {
        Ok(()) => Ok(()),
        Err(e) if primary_lost(&e) => {
            tracing::info!("the primary's connection is gone ({e}); reading what it sent before");
            *lost = Some(flatten_error(&e));
            Ok(())
        }
        Err(e) => Err(flatten_error(&e)),
    }
}

/// Stands by for the primary on an authenticated `stream` until it goes away (the VM is then
/// built from the last checkpoint) or lets the VM go. The VM's disks are copied into new images
/// in `disk_dir` (None: a VM with disks is refused); they are removed unless the VM runs here.
/// With a `fence` (which the primary must hold too), the VM is built only once the fence is
/// taken over: a primary that gave this backup up first keeps the VM, and nothing runs here.
/// `watch`, if given, follows what the backup holds (for `status`).
pub fn stand_by<S: Duplex>(
    mut stream: S,
    console: Console,
    disk_dir: Option<&Path>,
    fence: Option<&dyn Fence>,
    watch: Option<&StandbyWatch>,
) -> Result<StandbyEnd, MigrationError> {
    let (hello, blank) = accept_hello(&mut stream)?;
    let pages_in_ram = hello.mem_bytes / PAGE as u64;
    let memfd = blank.ram().file();
    let mut buf = Vec::new();
    let mut kind = wire::read_frame(&mut stream, &mut buf)?;
    if kind == Kind::Modules {
        match wire::decode_modules(&buf) {
            Ok(codes) => codes.into_iter().for_each(prepare_in_background),
            Err(why) => return Err(refuse(&mut stream, why)),
        }
        kind = wire::read_frame(&mut stream, &mut buf)?;
    }
    if kind != Kind::Protect {
        return Err(refuse(
            &mut stream,
            format!("a {kind:?} frame where a replication stream begins (a migration goes to `xcloud receive` without --standby)"),
        ));
    }
    let protect = match wire::Protect::decode(&buf) {
        Ok(protect) => protect,
        Err(e) => return Err(refuse(&mut stream, e.to_string())),
    };
    let generation = match (&protect.fence, fence) {
        (None, None) => None,
        (Some((generation, key)), Some(fence)) if key == fence.key() => Some(*generation),
        (Some((_, key)), Some(fence)) => {
            return Err(refuse(
                &mut stream,
                format!(
                    "the primary is fenced through {key}, this backup through {}",
                    fence.key()
                ),
            ))
        }
        (Some((_, key)), None) => {
            return Err(refuse(
                &mut stream,
                format!("the primary is fenced through {key}: start this backup with the same fence"),
            ))
        }
        (None, Some(fence)) => {
            return Err(refuse(
                &mut stream,
                format!(
                    "this backup is fenced through {}: the primary must hold the same fence",
                    fence.key()
                ),
            ))
        }
    };
    let silence_limit = Duration::from_millis(protect.heartbeat_ms as u64) * 2;
    if let Some(watch) = watch {
        watch.update(|status| {
            status.phase = "initial copy".into();
            status.fence = protect
                .fence
                .as_ref()
                .map(|(generation, key)| format!("{key} generation {generation}"));
        });
    }
    let mut backup = Backup {
        pages_in_ram,
        memfd,
        initial: true,
        committed: None,
        staged: Vec::new(),
        staged_pages: 0,
        disks: DiskReceiver::new(disk_dir),
        staged_disk: Vec::new(),
        staged_disk_bytes: 0,
        digest: Sha256::new(),
    };
    let mut inbox = Inbox::new();
    let mut unpacked = Vec::new();
    let mut last_word = Instant::now();
    // Set once an answer found the primary's connection gone: what it sent before (an END,
    // perhaps) is still read before the backup decides anything.
    let mut answer_lost: Option<String> = None;
    let why = loop {
        let pending = inbox.pending();
        let frame = match inbox.next_frame(&mut stream, &mut buf) {
            Ok(frame) => frame,
            Err(e) if primary_lost(&e) => break format!("its connection ended ({})", flatten_error(&e)),
            Err(e) => return Err(refuse(&mut stream, flatten_error(&e))),
        };
        let Some(mut kind) = frame else {
            if inbox.pending() != pending {
                last_word = Instant::now();
            } else if last_word.elapsed() > silence_limit {
                break format!("it sent nothing for {:?} (two heartbeats)", last_word.elapsed());
            }
            let _ = readable(&[stream.poll_fd()], 5);
            continue;
        };
        last_word = Instant::now();
        if let Some(watch) = watch {
            watch.update(|status| status.bytes_received += 5 + buf.len() as u64);
        }
        if kind == Kind::PagesLz4 {
            if let Err(e) = wire::decompress_pages(&buf, &mut unpacked) {
                return Err(refuse(&mut stream, e.to_string()));
            }
            std::mem::swap(&mut buf, &mut unpacked);
            kind = Kind::Pages;
        }
        let step = match kind {
            Kind::Pages => backup.pages(&mut buf),
            Kind::DiskBegin if backup.initial => backup.disks.begin(&buf),
            Kind::DiskData => backup.disk_data(&mut buf),
            Kind::Sync if backup.initial => {
                backup.initial = false;
                reply(&mut stream, &mut answer_lost, Kind::Synced, &[])
            }
            // The checkpoint is in place before its ACK goes: a primary gone by then leaves this
            // backup on it (its output was never released: as if the network lost it).
            Kind::Checkpoint => match backup.checkpoint(&buf) {
                Ok(epoch) => {
                    if let Some(watch) = watch {
                        watch.checkpoint(epoch);
                    }
                    reply(&mut stream, &mut answer_lost, Kind::Ack, &wire::encode_ack(epoch))
                }
                Err(why) => Err(why),
            },
            Kind::Heartbeat => Ok(()),
            Kind::End => {
                let why = wire::peer_text(&buf);
                tracing::info!("the primary ended protection: {why}");
                return Ok(StandbyEnd::Released(why));
            }
            other => Err(format!("an unexpected {other:?} frame in a replication stream")),
        };
        if let Err(why) = step {
            let kept = match &backup.committed {
                Some((epoch, _)) => format!("; this backup kept checkpoint {epoch} and runs nothing"),
                None => String::new(),
            };
            return Err(refuse(&mut stream, format!("{why}{kept}")));
        }
    };
    let unfinished_bytes = (backup.staged.iter().chain(&backup.staged_disk))
        .map(|frame| frame.len() as u64)
        .sum::<u64>()
        + inbox.pending() as u64;
    let Backup {
        committed, mut disks, ..
    } = backup;
    let Some((epoch, mut state)) = committed else {
        return Err(MigrationError::Refused(format!(
            "the primary went away before its first checkpoint: {why}; nothing to run here"
        )));
    };
    if let (Some(fence), Some(generation)) = (fence, generation) {
        take_fence_over(fence, generation, &why)?;
    }
    // The staged pages and disk chunks of the unfinished epoch are dropped: the VM continues
    // from the last complete checkpoint, on this backup's copies of its disks.
    disks.finish(&mut state).map_err(MigrationError::Refused)?;
    let vm = Vm::from_state(blank, state, console)?;
    disks.keep();
    Ok(StandbyEnd::TakeOver {
        vm,
        epoch,
        why,
        since_last_word: last_word.elapsed(),
        unfinished_bytes,
    })
}

/// Takes the primary's `generation` of `fence` over, asking again while the fence's store
/// cannot be reached: without the fence the VM may not run here, and no one else can run it
/// from this checkpoint. A primary that kept the fence keeps the VM.
fn take_fence_over(fence: &dyn Fence, generation: u64, why: &str) -> Result<(), MigrationError> {
    let mut attempts = 0u64;
    loop {
        match fence.take_over(generation) {
            Ok(true) => return Ok(()),
            Ok(false) => {
                return Err(MigrationError::Refused(format!(
                    "the primary looked gone ({why}) but kept the fence {}: it runs the VM, which does not run here",
                    fence.key()
                )))
            }
            Err(e) => {
                // Every attempt's failure is worth a line at first, then every tenth.
                if attempts < 3 || attempts % 10 == 0 {
                    tracing::warn!(
                        "the primary looks gone ({why}), but the fence cannot be taken over yet: {e}; asking again"
                    );
                }
                attempts += 1;
                std::thread::sleep(FENCE_RETRY);
            }
        }
    }
}

/// What the backup holds.
struct Backup<'a> {
    pages_in_ram: u64,
    memfd: &'a std::fs::File,
    /// Until the primary's SYNC: its pages are the initial copy, written straight into guest
    /// RAM (there is no checkpoint yet to keep).
    initial: bool,
    /// The last complete checkpoint: its epoch and the VM's state (its pages are in RAM).
    committed: Option<(u64, StateTree)>,
    /// The current epoch's PAGES payloads, applied at its CHECKPOINT.
    staged: Vec<Vec<u8>>,
    staged_pages: u64,
    /// The copies of the VM's disks.
    disks: DiskReceiver,
    /// The current epoch's DISK_DATA payloads, written at its CHECKPOINT.
    staged_disk: Vec<Vec<u8>>,
    staged_disk_bytes: u64,
    /// Of the current epoch's payloads so far, in stream order.
    digest: Sha256,
}

impl Backup<'_> {
    /// Takes a PAGES payload (uncompressed) of the initial copy or of the current epoch.
    fn pages(&mut self, payload: &mut Vec<u8>) -> Result<(), String> {
        let count = wire::for_each_page(payload, self.pages_in_ram, |_, _| Ok(())).map_err(|e| e.to_string())?;
        if self.initial {
            apply_pages(payload, self.pages_in_ram, self.memfd).map_err(|e| format!("cannot write guest RAM: {e}"))?;
            return Ok(());
        }
        // An epoch sends each dirty page once: more pages than the guest has is not an epoch.
        if count == 0 || self.staged_pages + count > self.pages_in_ram {
            return Err(format!(
                "an epoch of over {} pages (the guest has {})",
                self.staged_pages + count.max(1) - 1,
                self.pages_in_ram
            ));
        }
        self.digest.update(&payload[..]);
        self.staged_pages += count;
        self.staged.push(std::mem::take(payload));
        Ok(())
    }

    /// Takes a DISK_DATA payload of the initial copy (written at once) or of the current epoch
    /// (staged: an epoch writes at most every disk once over).
    fn disk_data(&mut self, payload: &mut Vec<u8>) -> Result<(), String> {
        if self.initial {
            return self.disks.data(payload);
        }
        let bytes = self.disks.check(payload)?;
        if self.staged_disk_bytes + bytes > self.disks.total_size() {
            return Err("an epoch writes more than the VM's disks hold".into());
        }
        self.digest.update(&payload[..]);
        self.staged_disk_bytes += bytes;
        self.staged_disk.push(std::mem::take(payload));
        Ok(())
    }

    /// Closes the current epoch: checks it, applies its pages and disk chunks and keeps its
    /// state. Returns the epoch to acknowledge.
    fn checkpoint(&mut self, payload: &[u8]) -> Result<u64, String> {
        if self.initial {
            return Err("a CHECKPOINT before the initial copy was synced".into());
        }
        let (header, state) = CheckpointHeader::decode(payload).map_err(|e| e.to_string())?;
        let expected = self.committed.as_ref().map_or(1, |(epoch, _)| epoch + 1);
        if header.epoch != expected {
            return Err(format!("checkpoint {} where {expected} was due", header.epoch));
        }
        if header.pages != self.staged_pages {
            return Err(format!(
                "checkpoint {} claims {} pages, {} arrived",
                header.epoch, header.pages, self.staged_pages
            ));
        }
        let mut digest = std::mem::take(&mut self.digest);
        digest.update(state);
        if digest.finalize()[..] != header.digest[..] {
            return Err(format!("checkpoint {} does not match its digest", header.epoch));
        }
        let tree =
            StateTree::decode(state).map_err(|e| format!("checkpoint {}: {}", header.epoch, flatten_error(&e)))?;
        for frame in self.staged.drain(..) {
            // Checked on arrival; a failure here is this host's (guest RAM cannot be written),
            // and the checkpoint half in place cannot be run.
            apply_pages(&frame, self.pages_in_ram, self.memfd)
                .map_err(|e| format!("cannot write checkpoint {} into guest RAM: {e}", header.epoch))?;
        }
        for chunk in self.staged_disk.drain(..) {
            self.disks
                .data(&chunk)
                .map_err(|e| format!("checkpoint {}: {e}", header.epoch))?;
        }
        self.staged_pages = 0;
        self.staged_disk_bytes = 0;
        self.committed = Some((header.epoch, tree));
        Ok(header.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{replication_prelude, MemoryStream};

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_frame(&mut out, kind, payload).expect("frame");
        out
    }

    /// One epoch: a page of `byte`s at page 3 and an empty state, with the digest given or the
    /// right one.
    fn epoch(number: u64, byte: u8, digest: Option<[u8; 32]>) -> Vec<u8> {
        let mut pages = Vec::new();
        wire::push_page(&mut pages, 3, &[byte; PAGE]);
        let state = StateTree::new().encode().expect("state");
        let right: [u8; 32] = Sha256::new()
            .chain_update(&pages)
            .chain_update(&state)
            .finalize()
            .into();
        let header = CheckpointHeader {
            epoch: number,
            pages: 1,
            digest: digest.unwrap_or(right),
        };
        [
            frame(Kind::Pages, &pages),
            frame(Kind::Checkpoint, &header.encode(&state)),
        ]
        .concat()
    }

    fn plain_protect(heartbeat_ms: u32) -> Vec<u8> {
        wire::Protect {
            heartbeat_ms,
            interval_ms: 25,
            fence: None,
        }
        .encode()
    }

    fn stand_by_on(stream: Vec<u8>) -> Result<StandbyEnd, MigrationError> {
        stand_by(
            MemoryStream::new(stream),
            Console::new(Box::new(std::io::sink())),
            None,
            None,
            None,
        )
    }

    fn refusal(stream: Vec<u8>) -> String {
        match stand_by_on(stream) {
            Err(MigrationError::Refused(why)) => why,
            Err(other) => panic!("not a refusal: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn an_end_lets_the_vm_go() {
        let stream = [
            replication_prelude(),
            epoch(1, 1, None),
            frame(Kind::End, b"unprotected"),
        ]
        .concat();
        match stand_by_on(stream) {
            Ok(StandbyEnd::Released(why)) => assert_eq!(why, "unprotected"),
            Ok(StandbyEnd::TakeOver { .. }) => panic!("took over"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn checkpoints_that_do_not_check_out_are_refused_and_the_last_good_one_is_named() {
        let good = [replication_prelude(), epoch(1, 1, None)].concat();
        let why = refusal([good.clone(), epoch(2, 2, Some([0; 32]))].concat());
        assert!(
            why.contains("checkpoint 2 does not match its digest") && why.contains("kept checkpoint 1"),
            "{why}"
        );
        let why = refusal([good.clone(), epoch(3, 2, None)].concat());
        assert!(why.contains("checkpoint 3 where 2 was due"), "{why}");
        // A CHECKPOINT claiming a page that never came.
        let state = StateTree::new().encode().expect("state");
        let lying = CheckpointHeader {
            epoch: 2,
            pages: 1,
            digest: [0; 32],
        };
        let why = refusal([good.clone(), frame(Kind::Checkpoint, &lying.encode(&state))].concat());
        assert!(why.contains("claims 1 pages, 0 arrived"), "{why}");
        let why = refusal([good, frame(Kind::Go, &[])].concat());
        assert!(why.contains("unexpected Go"), "{why}");
    }

    #[test]
    fn a_migration_or_a_checkpoint_before_the_initial_copy_is_not_a_replication() {
        let hello = crate::fuzzing::migration_hello(4 << 20);
        let why = refusal([hello.clone(), frame(Kind::Pages, &[0, 0, 0, 0])].concat());
        assert!(why.contains("--standby"), "{why}");
        let protect = frame(Kind::Protect, &plain_protect(100));
        let why = refusal([hello.clone(), protect.clone(), epoch(1, 1, None)].concat());
        assert!(why.contains("before the initial copy"), "{why}");
        let why = refusal([hello, frame(Kind::Protect, &plain_protect(0))].concat());
        assert!(why.contains("heartbeat of 0 ms"), "{why}");
    }

    #[test]
    fn a_primary_gone_when_its_ack_is_written_leaves_the_backup_on_that_checkpoint() {
        // ACCEPT and SYNCED go out (empty frames, 5 bytes each); the ACK of checkpoint 1 meets a
        // broken pipe.
        let stream = MemoryStream::closing_after([replication_prelude(), epoch(1, 1, None)].concat(), 10);
        let watch = StandbyWatch::new();
        let end = stand_by(
            stream,
            Console::new(Box::new(std::io::sink())),
            None,
            None,
            Some(&watch),
        );
        let held = watch.report();
        assert_eq!((held.phase.as_str(), held.epoch), ("holding", 1), "{held:?}");
        assert!(held.bytes_received > 4096, "{held:?}");
        // Taking over builds the VM from checkpoint 1 (whose empty state makes no VM here):
        // what matters is that the broken pipe was taken for the primary's end, not a failure.
        match end {
            Err(MigrationError::Wire(e)) => panic!("the broken pipe failed the backup: {e}"),
            Err(MigrationError::Refused(why)) => panic!("refused: {why}"),
            Ok(StandbyEnd::Released(why)) => panic!("released: {why}"),
            Ok(StandbyEnd::TakeOver { epoch, .. }) => assert_eq!(epoch, 1),
            Err(_) => {}
        }
    }

    #[test]
    fn a_primary_gone_before_its_first_checkpoint_leaves_nothing_to_run() {
        match stand_by_on(replication_prelude()) {
            Err(MigrationError::Refused(why)) => assert!(why.contains("before its first checkpoint"), "{why}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("ran something"),
        }
    }

    /// A fence in memory, for the rule's side of it: whether the primary kept it.
    struct KeptFence {
        primary_kept: bool,
        asked: std::sync::Mutex<Option<u64>>,
    }

    impl Fence for KeptFence {
        fn key(&self) -> &str {
            "/fence/a"
        }
        fn claim_primary(&self) -> Result<u64, crate::fence::FenceError> {
            Ok(1)
        }
        fn take_over(&self, generation: u64) -> Result<bool, crate::fence::FenceError> {
            *self.asked.lock().expect("lock") = Some(generation);
            Ok(!self.primary_kept)
        }
        fn keep(&self) -> Result<bool, crate::fence::FenceError> {
            Ok(true)
        }
        fn release(&self) -> Result<bool, crate::fence::FenceError> {
            Ok(true)
        }
    }

    /// HELLO, a PROTECT fenced through `key` at generation 7 (or not fenced), SYNC.
    fn fenced_prelude(key: Option<&str>) -> Vec<u8> {
        let protect = wire::Protect {
            heartbeat_ms: 100,
            interval_ms: 25,
            fence: key.map(|k| (7, k.to_string())),
        };
        [
            crate::fuzzing::migration_hello(4 << 20),
            frame(Kind::Protect, &protect.encode()),
            frame(Kind::Sync, &[]),
        ]
        .concat()
    }

    fn stand_by_fenced(stream: Vec<u8>, fence: Option<&dyn Fence>) -> String {
        match stand_by(
            MemoryStream::new(stream),
            Console::new(Box::new(std::io::sink())),
            None,
            fence,
            None,
        ) {
            Err(MigrationError::Refused(why)) => why,
            Err(other) => panic!("not a refusal: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn both_ends_must_hold_the_same_fence() {
        let fence = KeptFence {
            primary_kept: false,
            asked: Default::default(),
        };
        let why = stand_by_fenced(fenced_prelude(None), Some(&fence));
        assert!(why.contains("the primary must hold the same fence"), "{why}");
        let why = stand_by_fenced(fenced_prelude(Some("/fence/a")), None);
        assert!(why.contains("start this backup with the same fence"), "{why}");
        let why = stand_by_fenced(fenced_prelude(Some("/fence/b")), Some(&fence));
        assert!(
            why.contains("fenced through /fence/b, this backup through /fence/a"),
            "{why}"
        );
        assert_eq!(*fence.asked.lock().expect("lock"), None, "no fence was asked");
    }

    #[test]
    fn a_backup_whose_primary_kept_the_fence_runs_nothing() {
        let fence = KeptFence {
            primary_kept: true,
            asked: Default::default(),
        };
        // One checkpoint, then the stream ends: the primary looks gone.
        let stream = [fenced_prelude(Some("/fence/a")), epoch(1, 1, None)].concat();
        let why = stand_by_fenced(stream, Some(&fence));
        assert!(why.contains("kept the fence /fence/a"), "{why}");
        assert_eq!(
            *fence.asked.lock().expect("lock"),
            Some(7),
            "the generation the primary announced"
        );
    }

    #[test]
    fn checkpoint_and_protect_payloads_round_trip() {
        let header = CheckpointHeader {
            epoch: 7,
            pages: 9,
            digest: [5; 32],
        };
        let payload = header.encode(b"state");
        assert_eq!(
            CheckpointHeader::decode(&payload).expect("decode"),
            (header, &b"state"[..])
        );
        assert!(CheckpointHeader::decode(&payload[..10]).is_err());
        let fenced = wire::Protect {
            heartbeat_ms: 100,
            interval_ms: 25,
            fence: Some((42, "/xcloud/fence/web".into())),
        };
        assert_eq!(wire::Protect::decode(&fenced.encode()).expect("protect"), fenced);
        let plain = wire::Protect { fence: None, ..fenced };
        assert_eq!(wire::Protect::decode(&plain.encode()).expect("protect"), plain);
        assert!(wire::Protect::decode(&[1, 2, 3]).is_err());
        // A generation with no key, and a key that is not UTF-8.
        assert!(wire::Protect::decode(&[plain.encode(), vec![0; 8]].concat()).is_err());
        assert!(wire::Protect::decode(&[plain.encode(), vec![0; 8], vec![0xff]].concat()).is_err());
        assert_eq!(wire::decode_ack(&wire::encode_ack(4)).expect("ack"), 4);
        assert!(wire::decode_ack(&[1]).is_err());
    }
}
