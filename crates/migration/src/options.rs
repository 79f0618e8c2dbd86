//! What a migration or a replication is asked to do, what it reports while it runs and when it
//! ends, and the tracker that lets one of them at a time hold a VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long either side waits for the other's next message before giving up.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether and when a migration switches to post-copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostcopyMode {
    /// Pre-copy only; a guest that dirties faster than the link carries is throttled.
    #[default]
    Off,
    /// Pre-copy first; if it does not converge, switch to post-copy for the pages left
    /// instead of throttling the guest.
    Converge,
    /// Switch at once: every page follows the switch.
    Now,
}

/// Tuning of the source side.
#[derive(Clone, Copy, Debug)]
pub struct MigrateOptions {
    /// Stop-and-copy starts once the remaining pages can be sent in this time.
    pub max_downtime: Duration,
    /// Stop-and-copy starts after this many rounds even if the guest dirties faster than the
    /// link carries (the downtime is then longer than asked).
    pub max_rounds: u32,
    /// A destination that neither reads nor answers for this long has failed.
    pub peer_timeout: Duration,
    /// When the destination takes over before all memory is there.
    pub postcopy: PostcopyMode,
    /// Compress page frames (LZ4) when that makes them smaller: for slow links.
    pub compress: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(50),
            max_rounds: 30,
            peer_timeout: PEER_TIMEOUT,
            postcopy: PostcopyMode::Off,
            compress: false,
        }
    }
}

/// What a migration did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct MigrationSummary {
    /// The destination.
    pub to: String,
    /// From the start of the migration to its end.
    pub total_ms: f64,
    /// From pausing the source to the destination's report that the VM runs.
    pub downtime_ms: f64,
    /// Pre-copy rounds after the first full pass.
    pub rounds: u32,
    /// The largest share of time the guest was kept paused to converge (percent).
    pub throttle_percent: u32,
    /// Whether the pages followed the switch (post-copy).
    #[serde(default)]
    pub postcopy: bool,
    /// Pages sent, pre-copy and post-copy.
    pub pages_sent: u64,
    /// Of those, all-zero pages (sent as their number only).
    pub zero_pages_sent: u64,
    /// Post-copy: pages the destination's guest touched before they came, sent out of turn.
    #[serde(default)]
    pub pages_requested: u64,
    /// Bytes on the stream, framing included.
    pub bytes_sent: u64,
    /// Achieved payload bandwidth over the whole migration, MB/s.
    pub bandwidth_mbps: f64,
}

/// Progress of a running migration, for `status`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MigrationProgress {
    /// "first pass", "pre-copy", "stop-and-copy", "handover" or "post-copy".
    pub phase: String,
    /// Pre-copy rounds so far.
    pub round: u32,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Pages still to send: dirty ones in pre-copy, the ones left in post-copy.
    pub dirty_pages: u64,
}

/// The outgoing migration of one VM, if one runs: at most one at a time, and its progress for
/// `status`. The control API holds one per VM; while a migration runs it refuses what would
/// interfere (pause, resume, snapshot, another migration): a resume during the switch would
/// run the VM at both ends.
#[derive(Clone, Default)]
pub struct Outgoing {
    inner: Arc<OutgoingState>,
}

#[derive(Default)]
struct OutgoingState {
    running: AtomicBool,
    progress: Mutex<Option<MigrationProgress>>,
    /// The VM's replication to a backup: how it goes, or why it ended.
    protection: Mutex<Option<ProtectionStatus>>,
    /// Asks the replication thread to end protection (it tells the backup, which lets go).
    unprotect: AtomicBool,
    /// The replication thread, joined when protection ends.
    replicator: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The VM's fence, if its protections are fenced (docs/replication.md).
    fence: Mutex<Option<std::sync::Arc<dyn crate::fence::Fence>>>,
}

/// A running migration's hold on its VM, released when dropped.
pub(crate) struct Claim {
    outgoing: Outgoing,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.outgoing.set_progress(None);
        self.outgoing.inner.running.store(false, Ordering::SeqCst);
    }
}

impl Outgoing {
    /// A tracker with no migration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a migration runs.
    pub fn running(&self) -> bool {
        self.inner.running.load(Ordering::SeqCst)
    }

    /// The running migration's progress.
    pub fn progress(&self) -> Option<MigrationProgress> {
        self.inner.progress.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Claims the VM for one migration: None if one already runs.
    pub(crate) fn claim(&self) -> Option<Claim> {
        self.inner
            .running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Claim { outgoing: self.clone() })
    }

    /// Publishes the progress (None: no migration runs).
    pub(crate) fn set_progress(&self, progress: Option<MigrationProgress>) {
        *self.inner.progress.lock().unwrap_or_else(|p| p.into_inner()) = progress;
    }

    /// The VM's replication: how it goes, or why it ended (None: it was never protected).
    pub fn protection(&self) -> Option<ProtectionStatus> {
        self.inner.protection.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the VM is being replicated now.
    pub fn protected(&self) -> bool {
        self.protection().is_some_and(|p| p.ended.is_none())
    }

    pub(crate) fn set_protection(&self, status: ProtectionStatus) {
        *self.inner.protection.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    pub(crate) fn unprotect_asked(&self) -> bool {
        self.inner.unprotect.load(Ordering::SeqCst)
    }

    pub(crate) fn set_replicator(&self, thread: std::thread::JoinHandle<()>) {
        self.inner.unprotect.store(false, Ordering::SeqCst);
        *self.inner.replicator.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
    }

    /// Fences every protection of this VM from now on through `fence` (docs/replication.md):
    /// the backup takes over, and the primary gives its backup up, only through it.
    pub fn set_fence(&self, fence: std::sync::Arc<dyn crate::fence::Fence>) {
        *self.inner.fence.lock().unwrap_or_else(|p| p.into_inner()) = Some(fence);
    }

    /// The VM's fence, if it has one.
    pub fn fence(&self) -> Option<std::sync::Arc<dyn crate::fence::Fence>> {
        self.inner.fence.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ends the VM's replication, if it runs: the backup is told and lets the VM go (it does
    /// not take over). Returns once the replication has ended; false if none ran.
    pub fn unprotect(&self) -> bool {
        let thread = self.inner.replicator.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(thread) = thread else {
            return false;
        };
        self.inner.unprotect.store(true, Ordering::SeqCst);
        let _ = thread.join();
        true
    }
}

/// Tuning of the primary side of replication (docs/replication.md).
#[derive(Clone, Copy, Debug)]
pub struct ProtectOptions {
    /// How often a checkpoint is taken.
    pub interval: Duration,
    /// The primary sends something at least this often; the backup takes over after two
    /// heartbeats of silence.
    pub heartbeat: Duration,
    /// A backup that acknowledges nothing for this long is given up: the VM runs on
    /// unprotected (and says so) rather than stall.
    pub backup_timeout: Duration,
    /// Compress page frames (LZ4) when that makes them smaller: for slow links.
    pub compress: bool,
}

impl ProtectOptions {
    /// Whether these options make sense together: a heartbeat the backup can tell from a
    /// pause, and a primary that waits longer for its backup than the backup waits for it.
    pub fn check(&self) -> Result<(), crate::error::MigrationError> {
        let bad = |why: String| Err(crate::error::MigrationError::Options(why));
        let least = Duration::from_millis(crate::wire::MIN_HEARTBEAT_MS as u64);
        let most = Duration::from_secs(60);
        if self.heartbeat < least || self.heartbeat > most {
            return bad(format!("a heartbeat of {:?} (10 ms to 60 s)", self.heartbeat));
        }
        if self.interval.is_zero() || self.interval > most {
            return bad(format!("a checkpoint interval of {:?} (1 ms to 60 s)", self.interval));
        }
        if self.backup_timeout <= self.heartbeat * 2 {
            return bad(format!(
                "a backup timeout of {:?}: it must be longer than two heartbeats ({:?}), after which the backup takes over",
                self.backup_timeout,
                self.heartbeat * 2
            ));
        }
        Ok(())
    }
}

impl Default for ProtectOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(25),
            heartbeat: Duration::from_millis(100),
            backup_timeout: Duration::from_secs(3),
            compress: false,
        }
    }
}

/// How a VM's replication goes, for `status` (docs/replication.md).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProtectionStatus {
    /// The backup's `HOST:PORT`.
    pub backup: String,
    /// The last checkpoint the backup acknowledged (0: none yet).
    pub acked_epoch: u64,
    /// Checkpoints acknowledged in the last second.
    pub epochs_per_s: f64,
    /// Pages in the last checkpoint.
    pub last_pages: u64,
    /// Bytes of the last checkpoint on the stream (pages and state).
    pub last_bytes: u64,
    /// The guest's pause for the last checkpoint, microseconds.
    pub pause_us: u64,
    /// The longest pause so far, microseconds.
    pub max_pause_us: u64,
    /// The mean pause, microseconds.
    pub mean_pause_us: u64,
    /// From a checkpoint's pause to the backup's acknowledgement, the last one, ms: how long
    /// output would be held (docs/replication.md).
    pub commit_ms: f64,
    /// Bytes sent in the last second.
    pub bytes_per_s: f64,
    /// Why protection ended (None: it runs).
    #[serde(default)]
    pub ended: Option<String>,
    /// The fence this protection holds, `KEY generation N` (None: not fenced).
    #[serde(default)]
    pub fence: Option<String>,
}

/// What a backup holds while it stands by, for `status` (docs/replication.md).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StandbyStatus {
    /// `waiting` (for a primary), `initial copy`, or `holding` (a checkpoint in place).
    pub phase: String,
    /// The last checkpoint in place (0: none yet).
    pub epoch: u64,
    /// How long ago it was put in place, ms (0: none yet).
    pub checkpoint_age_ms: f64,
    /// Bytes received from the primary so far.
    pub bytes_received: u64,
    /// The fence the primary announced, `KEY generation N` (None: not fenced).
    #[serde(default)]
    pub fence: Option<String>,
}

/// A standby's status as it goes, shared with whatever reports it (the control socket).
#[derive(Clone)]
pub struct StandbyWatch {
    inner: Arc<Mutex<(StandbyStatus, Option<std::time::Instant>)>>,
}

impl Default for StandbyWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl StandbyWatch {
    /// A standby waiting for its primary.
    pub fn new() -> Self {
        let waiting = StandbyStatus {
            phase: "waiting".into(),
            ..Default::default()
        };
        Self {
            inner: Arc::new(Mutex::new((waiting, None))),
        }
    }

    /// The status now.
    pub fn report(&self) -> StandbyStatus {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut status = inner.0.clone();
        status.checkpoint_age_ms = inner.1.map_or(0.0, |at| at.elapsed().as_secs_f64() * 1e3);
        status
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut StandbyStatus)) {
        change(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()).0);
    }

    /// Checkpoint `epoch` is in place.
    pub(crate) fn checkpoint(&self, epoch: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0.epoch = epoch;
        inner.0.phase = "holding".into();
        inner.1 = Some(std::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_options_that_would_mistake_a_pause_for_a_death_are_refused() {
        assert!(ProtectOptions::default().check().is_ok());
        let ms = Duration::from_millis;
        let with = |heartbeat, interval, timeout| ProtectOptions {
            heartbeat: ms(heartbeat),
            interval: ms(interval),
            backup_timeout: ms(timeout),
            compress: false,
        };
        for (options, why) in [
            (with(5, 25, 3000), "a heartbeat of 5ms"),
            (with(100, 0, 3000), "a checkpoint interval of 0ns"),
            (with(100, 25, 200), "longer than two heartbeats"),
            (with(100, 25, 120_000), ""),
        ] {
            match options.check() {
                Err(e) => assert!(!why.is_empty() && e.to_string().contains(why), "{e}"),
                Ok(()) => assert!(why.is_empty(), "accepted, expected: {why}"),
            }
        }
    }
}
