//! Live migration (docs/migration.md): pre-copy with KVM dirty-page logging over a mutually
//! authenticated TLS stream.
//!
//! Source: send every touched page while the guest runs, then rounds of the pages it dirtied,
//! until what is left fits the downtime budget at the bandwidth measured so far; then pause,
//! send the last dirty pages and the vCPU/device state, and hand over. Destination: check the
//! stream and build the VM; start it only when the source says so.
//!
//! Nothing is lost: until the source sends GO, any failure (the destination dies, the link
//! breaks, a refusal) leaves the source VM running as before — resumed if it was paused for
//! stop-and-copy. After GO, the source stays paused until the destination reports RUNNING; if
//! that report never comes the source stays paused (never both running) and says so.

mod postcopy;
pub mod tls;
pub mod wire;

pub use postcopy::Duplex;

use crate::console::Console;
use crate::snapshot::VmSnapshot;
use crate::vm::{self, Vm, VmError, VmHandle, VmState};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tls::{Credentials, TlsError};
use wire::{Hello, Kind, WireError, MAX_PAGES_PER_FRAME, PAGE};

/// How long either side waits for the other's next message before giving up.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Migration failures.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot migrate a VM that is {0:?}")]
    State(VmState),
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("refused: {0}")]
    Refused(String),
    #[error("a migration of this VM is already running")]
    Busy,
    #[error("the destination did not confirm that the VM runs ({0}); the source VM stays PAUSED so that it never runs twice: check the destination, then resume or stop the source")]
    OutcomeUnknown(String),
}

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
    pub pages_sent: u64,
    pub zero_pages_sent: u64,
    /// Post-copy: pages the destination's guest touched before they came, sent out of turn.
    #[serde(default)]
    pub pages_requested: u64,
    pub bytes_sent: u64,
    /// Achieved payload bandwidth over the whole migration, MB/s.
    pub bandwidth_mbps: f64,
}

/// Progress of a running migration, for `status`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MigrationProgress {
    pub phase: String,
    pub round: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Pages still to send: dirty ones in pre-copy, the ones left in post-copy.
    pub dirty_pages: u64,
}

/// The CPUID feature words KVM offers guests on this host (zeros where KVM cannot tell).
pub fn cpu_features() -> [u32; wire::FEATURE_WORDS.len()] {
    let mut words = [0u32; wire::FEATURE_WORDS.len()];
    let Ok(kvm) = crate::host::open_kvm() else { return words };
    let Ok(cpuid) = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES) else {
        return words;
    };
    for (word, (leaf, index, reg, _)) in words.iter_mut().zip(wire::FEATURE_WORDS.iter()) {
        if let Some(e) = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == *leaf && e.index == *index)
        {
            *word = match reg {
                'a' => e.eax,
                'b' => e.ebx,
                'c' => e.ecx,
                _ => e.edx,
            };
        }
    }
    words
}

pub(crate) fn cpu_vendor() -> [u8; 12] {
    // cpuid leaf 0 exists on every x86-64 processor and only reads registers.
    let r = core::arch::x86_64::__cpuid(0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

/// Sends pages in PAGES frames, counting what went out.
struct PageSender<'a, S: Write> {
    out: &'a mut S,
    /// Send frames LZ4-compressed when that makes them smaller.
    compress: bool,
    frame: Vec<u8>,
    in_frame: usize,
    frame_pages: usize,
    pages: u64,
    zero_pages: u64,
    bytes: u64,
}

impl<'a, S: Write> PageSender<'a, S> {
    fn new(out: &'a mut S, compress: bool) -> Self {
        Self::with_frame_pages(out, compress, MAX_PAGES_PER_FRAME)
    }

    /// A sender whose frames carry at most `frame_pages` pages (at most MAX_PAGES_PER_FRAME).
    fn with_frame_pages(out: &'a mut S, compress: bool, frame_pages: usize) -> Self {
        let frame_pages = frame_pages.clamp(1, MAX_PAGES_PER_FRAME);
        Self {
            out,
            compress,
            frame: Vec::with_capacity(4 + frame_pages * (8 + PAGE)),
            in_frame: 0,
            frame_pages,
            pages: 0,
            zero_pages: 0,
            bytes: 0,
        }
    }

    /// Adds a page; returns whether that filled a frame, which then went out.
    fn page(&mut self, pfn: u64, data: &[u8]) -> Result<bool, WireError> {
        let before = self.frame.len();
        wire::push_page(&mut self.frame, pfn, data);
        if self.frame.len() - before == 8 {
            self.zero_pages += 1;
        }
        self.pages += 1;
        self.in_frame += 1;
        if self.in_frame == self.frame_pages {
            self.flush()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn flush(&mut self) -> Result<(), WireError> {
        if self.in_frame > 0 {
            let packed = self
                .compress
                .then(|| wire::compress_pages(&self.frame))
                .filter(|p| p.len() < self.frame.len());
            let (kind, payload) = match &packed {
                Some(p) => (Kind::PagesLz4, p.as_slice()),
                None => (Kind::Pages, self.frame.as_slice()),
            };
            wire::write_frame(self.out, kind, payload)?;
            self.bytes += 5 + payload.len() as u64;
            self.frame.clear();
            self.in_frame = 0;
        }
        self.out.flush()?;
        Ok(())
    }
}

/// Most of each period a throttled guest may spend paused.
const MAX_THROTTLE: u32 = 90;
/// Period of the throttle's pause/run cycle.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// Slows a guest that dirties memory faster than the link carries (auto-converge): for a
/// growing share of every period its vCPUs are paused. Dropping it leaves the VM running.
struct Throttle {
    percent: Arc<std::sync::atomic::AtomicU32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn start(handle: VmHandle) -> Self {
        use std::sync::atomic::Ordering;
        let percent = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (percent, stop) = (percent.clone(), stop.clone());
            std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let p = percent.load(Ordering::SeqCst).min(MAX_THROTTLE);
                        let paused = THROTTLE_PERIOD * p / 100;
                        if handle.pause().is_ok() {
                            std::thread::sleep(paused);
                            let _ = handle.resume();
                        }
                        std::thread::sleep(THROTTLE_PERIOD - paused);
                    }
                })
                .ok()
        };
        Self { percent, stop, thread }
    }

    fn raise(&self) {
        use std::sync::atomic::Ordering;
        let next = (self.percent.load(Ordering::SeqCst) + 30).min(MAX_THROTTLE);
        self.percent.store(next, Ordering::SeqCst);
        tracing::info!("migration: throttling the guest to {}% of its time", 100 - next);
    }

    fn percent(&self) -> u32 {
        self.percent.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The pages set in a KVM dirty bitmap.
fn dirty_pages(bitmap: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            pages.push(w as u64 * 64 + b);
            bits &= bits - 1;
        }
    }
    pages
}

/// Migrates the VM behind `handle` to the destination at `addr`. On success the source VM is
/// paused for good and the caller ends it with [`VmHandle::end_migrated`] once it has reported
/// the result (the process may exit as soon as the VM ends).
pub fn migrate(
    handle: &VmHandle,
    addr: &str,
    creds: &Credentials,
    options: MigrateOptions,
) -> Result<MigrationSummary, MigrationError> {
    let started = Instant::now();
    let _claim = handle.claim_migration().ok_or(MigrationError::Busy)?;
    handle.wait_for_memory()?;
    let was_running = match handle.state() {
        VmState::Running => true,
        VmState::Paused => false,
        other => return Err(MigrationError::State(other)),
    };
    let shared = &handle.shared;
    let connect_err = |source| MigrationError::Connect {
        addr: addr.to_string(),
        source,
    };
    let target = addr
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| connect_err(std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))?;
    let tcp = TcpStream::connect_timeout(&target, Duration::from_secs(10)).map_err(connect_err)?;
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(options.peer_timeout)).map_err(connect_err)?;
    tcp.set_write_timeout(Some(options.peer_timeout)).map_err(connect_err)?;
    // The stream owns the socket for as long as `link` is used.
    let link = Link(std::os::fd::AsRawFd::as_raw_fd(&tcp));
    let mut stream = tls::connect(tcp, creds)?;
    let hello = Hello {
        mem_bytes: shared.ram.size(),
        vcpus: shared.vcpu_count as u32,
        tsc_khz: shared.tsc_khz,
        cpu_vendor: cpu_vendor(),
        cpu_features: cpu_features(),
    };
    wire::write_frame(&mut stream, Kind::Hello, &hello.encode())?;
    stream.flush().map_err(WireError::from)?;
    let mut buf = Vec::new();
    // The destination answers only after it checked our certificate: no guest state before.
    wire::expect_frame(&mut stream, &mut buf, Kind::Accept, "ACCEPT")?;
    if options.postcopy == PostcopyMode::Now {
        let result = postcopy::switch(
            handle,
            &mut stream,
            was_running,
            options.compress,
            started,
            options.peer_timeout,
            || Ok(shared.ram.resident_pages()),
            MigrationSummary::default(),
            &link,
        );
        shared.set_progress(None);
        return result.map(|mut summary| {
            summary.to = addr.to_string();
            summary
        });
    }
    shared.set_dirty_logging(true).map_err(|source| MigrationError::Kvm {
        what: "start dirty-page logging",
        source,
    })?;
    let result = precopy_and_switch(handle, &mut stream, options, was_running, started, &link);
    if !matches!(result, Err(MigrationError::OutcomeUnknown(_))) {
        let _ = shared.set_dirty_logging(false);
    }
    shared.set_progress(None);
    result.map(|mut summary| {
        summary.to = addr.to_string();
        summary
    })
}

/// What the kernel knows of the migration's TCP connection, and how it queues.
pub(crate) struct Link(std::os::fd::RawFd);

impl Link {
    /// Makes writes wait while more than `bytes` are queued but not yet sent (TCP_NOTSENT_LOWAT),
    /// so that what the sender chooses to send next does not queue behind megabytes of stream.
    /// Best effort: without it, requests just wait longer.
    fn limit_unsent(&self, bytes: u32) {
        let value = bytes as libc::c_int;
        // SAFETY: TCP_NOTSENT_LOWAT reads one int from `value`, which lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                self.0,
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!("TCP_NOTSENT_LOWAT: {}", std::io::Error::last_os_error());
        }
    }

    /// The smoothed round-trip time (zero if the kernel cannot tell).
    fn rtt(&self) -> Duration {
        // SAFETY: tcp_info is plain old data; all zeros is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: TCP_INFO writes at most `len` bytes into `info`, which is that large and
        // lives across the call; the socket stays open while the migration's stream lives.
        let rc = unsafe {
            libc::getsockopt(
                self.0,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                &mut info as *mut libc::tcp_info as *mut libc::c_void,
                &mut len,
            )
        };
        if rc == 0 {
            Duration::from_micros(info.tcpi_rtt as u64)
        } else {
            Duration::ZERO
        }
    }

    /// Bytes written but not yet acknowledged by the peer (SIOCOUTQ): still on their way.
    fn in_flight(&self) -> u64 {
        let mut bytes: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int into `bytes`, which lives across the call.
        if unsafe { libc::ioctl(self.0, libc::TIOCOUTQ, &mut bytes) } == 0 {
            bytes.max(0) as u64
        } else {
            0
        }
    }
}

/// Whether stop-and-copy may start with `dirty_bytes` left: sending them must fit the budget,
/// and so must what the switch will then take with the guest paused — the pages it dirties
/// while those and the bytes still in flight go out and the SYNC is answered, then one round
/// trip for the handover.
fn fits_downtime(
    dirty_bytes: f64,
    in_flight: f64,
    bandwidth: f64,
    dirty_rate: f64,
    rtt: Duration,
    budget: Duration,
) -> bool {
    let (rtt, budget) = (rtt.as_secs_f64(), budget.as_secs_f64());
    let last_pass = dirty_bytes / bandwidth;
    // Of the bytes in flight, a round trip's worth is on the wire; the rest waits in queues.
    let queued = (in_flight - bandwidth * rtt).max(0.0);
    let synced = (queued + dirty_bytes) / bandwidth + rtt;
    let paused = dirty_rate * synced / bandwidth + rtt;
    last_pass <= budget && paused <= budget
}

/// How fast the guest dirties memory, over the latest rounds that span at least 100 ms (single
/// rounds can last microseconds: too short to tell a rate).
#[derive(Default)]
struct DirtyRate {
    samples: std::collections::VecDeque<(f64, f64)>,
}

impl DirtyRate {
    /// Records `bytes` dirtied over `seconds`; returns the rate in bytes per second.
    fn add(&mut self, seconds: f64, bytes: f64) -> f64 {
        self.samples.push_front((seconds, bytes));
        let (mut time, mut dirtied, mut keep) = (0.0, 0.0, 0);
        for &(t, b) in &self.samples {
            time += t;
            dirtied += b;
            keep += 1;
            if time >= 0.1 {
                break;
            }
        }
        self.samples.truncate(keep);
        dirtied / time.max(1e-6)
    }
}

fn precopy_and_switch<S: Duplex>(
    handle: &VmHandle,
    stream: &mut S,
    options: MigrateOptions,
    was_running: bool,
    started: Instant,
    link: &Link,
) -> Result<MigrationSummary, MigrationError> {
    // Dirty logging was turned on just before this call.
    let mut last_fetch = Instant::now();
    let mut dirty_rates = DirtyRate::default();
    let shared = &handle.shared;
    let size = shared.ram.size();
    let mut page = vec![0u8; PAGE];
    let mut sender = PageSender::new(stream, options.compress);
    let host_base = shared.ram.host_base() as *const u8;
    let pages_in_ram = size / PAGE as u64;
    // Pages are copied with a plain memcpy while the guest may be writing them (as every VMM
    // does): a torn copy is harmless because the write also marks the page dirty, so it is
    // sent again in a later round or in stop-and-copy, when the guest is paused.
    let read_page = |pfn: u64, page: &mut [u8]| {
        if pfn >= pages_in_ram || page.len() != PAGE {
            return Err(MigrationError::Refused(format!(
                "guest page {pfn} is outside guest RAM"
            )));
        }
        // SAFETY: pfn < pages_in_ram, so [host_base + pfn * 4096, +4096) lies inside the guest
        // RAM mapping, which `shared` keeps alive for this whole call; `page` is a distinct
        // 4096-byte buffer of ours, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(host_base.add(pfn as usize * PAGE), page.as_mut_ptr(), PAGE) };
        Ok(())
    };
    let progress = |phase: &str, round: u32, pages_sent: u64, bytes_sent: u64, dirty_pages: u64| {
        shared.set_progress(Some(MigrationProgress {
            phase: phase.into(),
            round,
            pages_sent,
            bytes_sent,
            dirty_pages,
        }))
    };

    // First pass: every page that was ever touched and is not zero.
    let resident = shared.ram.resident_pages();
    progress("first pass", 0, 0, 0, resident.len() as u64);
    let pass_start = Instant::now();
    for &pfn in &resident {
        read_page(pfn, &mut page)?;
        if !crate::memory::is_zero(&page) {
            sender.page(pfn, &page)?;
        }
    }
    sender.flush()?;
    tracing::debug!(
        "first pass: {} pages, {} MiB in {:?}",
        sender.pages,
        sender.bytes >> 20,
        pass_start.elapsed()
    );
    let delivered = sender.bytes.saturating_sub(link.in_flight()).max(1);
    let mut bandwidth = delivered as f64 / pass_start.elapsed().as_secs_f64().max(1e-6);

    // Rounds of dirtied pages until the rest fits the downtime budget.
    let mut rounds = 0;
    let mut best_dirty = u64::MAX;
    let mut rounds_without_progress = 0;
    let mut throttle: Option<Throttle> = None;
    let mut max_throttle = 0;
    let (last_pass, to_postcopy) = loop {
        let dirty = fetch_dirty_pages(handle)?;
        let remaining_bytes = dirty.len() as f64 * (8 + PAGE) as f64;
        let dirty_rate = dirty_rates.add(last_fetch.elapsed().as_secs_f64(), remaining_bytes);
        last_fetch = Instant::now();
        let (rtt, in_flight) = (link.rtt(), link.in_flight());
        let fits = fits_downtime(
            remaining_bytes,
            in_flight as f64,
            bandwidth,
            dirty_rate,
            rtt,
            options.max_downtime,
        );
        tracing::debug!(
            "round {rounds}: {} dirty pages, {} KiB in flight, link {:.0} MB/s, guest dirties {:.0} MB/s, RTT {rtt:?}, fits: {fits}",
            dirty.len(),
            in_flight >> 10,
            bandwidth / 1e6,
            dirty_rate / 1e6
        );
        if dirty.len() as u64 >= best_dirty {
            rounds_without_progress += 1;
        } else {
            best_dirty = dirty.len() as u64;
            rounds_without_progress = 0;
        }
        // Stuck: the dirty set stopped shrinking, or the guest dirties more than half of what
        // the link carries (pre-copy would take many rounds and still leave much behind).
        let stuck = !fits && (rounds_without_progress >= 2 || (rounds >= 1 && dirty_rate > bandwidth / 2.0));
        if stuck && was_running && options.postcopy == PostcopyMode::Converge {
            break (dirty, true);
        }
        let throttled_out = throttle.as_ref().is_some_and(|t| t.percent() >= MAX_THROTTLE);
        if fits || rounds >= options.max_rounds || (rounds_without_progress >= 3 && throttled_out) {
            break (dirty, false);
        }
        // The guest dirties faster than the link carries: slow its vCPUs down, step by step.
        if rounds_without_progress >= 2 && was_running && !throttled_out {
            let t = throttle.get_or_insert_with(|| Throttle::start(handle.clone()));
            t.raise();
            max_throttle = max_throttle.max(t.percent());
            rounds_without_progress = 0;
            best_dirty = u64::MAX;
        }
        rounds += 1;
        progress("pre-copy", rounds, sender.pages, sender.bytes, dirty.len() as u64);
        let round_start = Instant::now();
        let (bytes_before, in_flight_before) = (sender.bytes, link.in_flight());
        for &pfn in &dirty {
            read_page(pfn, &mut page)?;
            sender.page(pfn, &page)?;
        }
        sender.flush()?;
        let elapsed = round_start.elapsed().as_secs_f64();
        // What left this host, not what went into the socket buffers.
        let delivered = (sender.bytes - bytes_before + in_flight_before).saturating_sub(link.in_flight());
        if elapsed > 0.005 && delivered > 0 {
            bandwidth = delivered as f64 / elapsed;
        }
    };

    if to_postcopy {
        // Wait until everything in flight is applied (the guest still runs), then switch: the
        // pages left are those of the last dirty fetch and whatever the guest dirtied since.
        sync(sender.out)?;
        progress("post-copy", rounds, sender.pages, sender.bytes, last_pass.len() as u64);
        let before = MigrationSummary {
            rounds,
            throttle_percent: max_throttle,
            pages_sent: sender.pages,
            zero_pages_sent: sender.zero_pages,
            bytes_sent: sender.bytes,
            ..Default::default()
        };
        let pages_left = || {
            let mut pages = fetch_dirty_pages(handle)?;
            pages.extend_from_slice(&last_pass);
            pages.sort_unstable();
            pages.dedup();
            Ok(pages)
        };
        drop(throttle);
        return postcopy::switch(
            handle,
            sender.out,
            was_running,
            options.compress,
            started,
            options.peer_timeout,
            pages_left,
            before,
            link,
        );
    }

    // The last pre-copy pass, sent while the guest still runs; then wait until the destination
    // has applied everything in flight, so that the downtime does not include draining the
    // socket buffers.
    for &pfn in &last_pass {
        read_page(pfn, &mut page)?;
        sender.page(pfn, &page)?;
    }
    sender.flush()?;
    sync(sender.out)?;

    // Stop-and-copy: only what the guest dirtied since the last dirty-log fetch.
    drop(throttle);
    let pause_start = Instant::now();
    let fail = pause_for_switch(handle, was_running)?;
    progress("stop-and-copy", rounds, sender.pages, sender.bytes, 0);
    let pending = fetch_dirty_pages(handle).map_err(fail)?;
    let paused_at = pause_start.elapsed();
    let state = handle
        .collect_state()
        .and_then(|s| Ok(s.encode()?))
        .map_err(|e| fail(e.into()))?;
    let state_at = pause_start.elapsed();
    for &pfn in &pending {
        read_page(pfn, &mut page).map_err(fail)?;
        sender.page(pfn, &page).map_err(|e| fail(e.into()))?;
    }
    sender.flush().map_err(|e| fail(e.into()))?;
    let (pages_sent, zero_pages_sent, page_bytes) = (sender.pages, sender.zero_pages, sender.bytes);
    let stream = sender.out;
    let sent_at = pause_start.elapsed();
    progress("handover", rounds, pages_sent, page_bytes, 0);
    hand_over(stream, &state).map_err(|h| h.into_error(fail))?;
    let downtime = pause_start.elapsed();
    tracing::debug!(
        "stop-and-copy: paused after {paused_at:?}, state saved at {state_at:?}, {} pages sent at {sent_at:?}, running at {downtime:?}",
        pending.len()
    );
    let total = started.elapsed();
    let bytes_sent = page_bytes + 5 + state.len() as u64;
    Ok(MigrationSummary {
        to: String::new(),
        postcopy: false,
        throttle_percent: max_throttle,
        total_ms: total.as_secs_f64() * 1e3,
        downtime_ms: downtime.as_secs_f64() * 1e3,
        rounds,
        pages_sent,
        zero_pages_sent,
        pages_requested: 0,
        bytes_sent,
        bandwidth_mbps: bytes_sent as f64 / total.as_secs_f64() / 1e6,
    })
}

/// The pages the guest dirtied since the last fetch (KVM clears the log as it hands it over),
/// and those the VMM wrote itself (hypercall results), in order.
fn fetch_dirty_pages(handle: &VmHandle) -> Result<Vec<u64>, MigrationError> {
    let shared = &handle.shared;
    // The VMM's record first: a write between the two reads then shows up in the next fetch.
    let mut by_vmm = shared.take_vmm_writes();
    let bitmap = shared
        .vm_fd
        .get_dirty_log(0, shared.ram.size() as usize)
        .map_err(|source| MigrationError::Kvm {
            what: "read the dirty log",
            source,
        })?;
    let mut pages = dirty_pages(&bitmap);
    if !by_vmm.is_empty() {
        let limit = shared.ram.size() / PAGE as u64;
        by_vmm.retain(|&pfn| pfn < limit);
        pages.append(&mut by_vmm);
        pages.sort_unstable();
        pages.dedup();
    }
    Ok(pages)
}

/// SYNC: returns once the destination has applied every frame sent before it.
fn sync<S: Read + Write>(stream: &mut S) -> Result<(), MigrationError> {
    wire::write_frame(stream, Kind::Sync, &[])?;
    stream.flush().map_err(WireError::from)?;
    let mut buf = Vec::new();
    wire::expect_frame(stream, &mut buf, Kind::Synced, "SYNCED")?;
    Ok(())
}

/// Pauses a running source for the switch and returns what every failure before the handover
/// goes through: it resumes the source (when it was running) and passes the error on.
fn pause_for_switch(
    handle: &VmHandle,
    was_running: bool,
) -> Result<impl Fn(MigrationError) -> MigrationError + Copy + '_, MigrationError> {
    if was_running {
        handle.pause()?;
    }
    Ok(move |e: MigrationError| {
        if was_running {
            let _ = handle.resume();
        }
        e
    })
}

/// How a handover failed.
enum HandoverError {
    /// The destination refused or could not be reached before it could start the VM: the
    /// source may run it again.
    NotStarted(MigrationError),
    /// The destination may run the VM: the source must not.
    Unknown(String),
}

impl HandoverError {
    fn into_error(self, resume_source: impl FnOnce(MigrationError) -> MigrationError) -> MigrationError {
        match self {
            HandoverError::NotStarted(e) => resume_source(e),
            HandoverError::Unknown(why) => MigrationError::OutcomeUnknown(why),
        }
    }
}

/// Sends the STATE and, right behind it, GO ("start it once the state is applied"), then waits
/// for RUNNING: one round trip of downtime. A REFUSE means the destination did not start the
/// VM; silence or a broken link after GO leave the outcome unknown.
fn hand_over<S: Read + Write>(stream: &mut S, state: &[u8]) -> Result<(), HandoverError> {
    wire::write_frame(stream, Kind::State, state)
        .and_then(|_| stream.flush().map_err(WireError::from))
        .map_err(|e| HandoverError::NotStarted(e.into()))?;
    // From here on the destination may run the VM: the source must never run it again unless
    // the destination says it did not start it.
    let mut buf = Vec::new();
    let answer = wire::write_frame(stream, Kind::Go, &[])
        .and_then(|_| stream.flush().map_err(WireError::from))
        .and_then(|_| wire::read_frame(stream, &mut buf));
    match answer {
        Ok(Kind::Running) => Ok(()),
        Err(WireError::Refused(why)) => Err(HandoverError::NotStarted(MigrationError::Refused(why))),
        Ok(other) => Err(HandoverError::Unknown(format!("it sent {other:?}"))),
        Err(e) => Err(HandoverError::Unknown(vm::flatten_error(&e))),
    }
}

/// A VM received from a source, built and checked but not started.
pub struct Incoming<S: Read + Write> {
    vm: Vm,
    stream: S,
    /// Set in post-copy: the pages still to come, and the userfaultfd that holds them back.
    postcopy: Option<(crate::snapshot::lazy::Uffd, Vec<u64>)>,
}

impl<S: Read + Write> Incoming<S> {
    /// A handle to the received VM (for the control socket and signals).
    pub fn handle(&self) -> VmHandle {
        self.vm.handle()
    }
}

impl<S: Duplex + Send + 'static> Incoming<S> {
    /// Waits for the source's GO, starts the VM and reports RUNNING. Without a GO nothing
    /// runs (the source keeps the VM). In post-copy, the pages then keep arriving on a
    /// background thread while the guest runs, which asks for the pages the guest waits on.
    pub fn start(mut self) -> Result<Vm, MigrationError> {
        let mut buf = Vec::new();
        wire::expect_frame(&mut self.stream, &mut buf, Kind::Go, "GO")?;
        self.vm.start()?;
        wire::write_frame(&mut self.stream, Kind::Running, &[])?;
        self.stream.flush().map_err(WireError::from)?;
        if let Some((uffd, pfns)) = self.postcopy.take() {
            let handle = self.vm.handle();
            let complete = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let _ = handle.shared.memory_complete.set(complete.clone());
            let mut stream = self.stream;
            std::thread::Builder::new()
                .name("postcopy".into())
                .spawn(move || {
                    match postcopy::receive_pages(&mut stream, &uffd, &pfns, handle.mem_bytes()) {
                        Ok(arrivals) => {
                            complete.store(true, std::sync::atomic::Ordering::SeqCst);
                            tracing::info!(
                                "post-copy complete: {} pages, {} asked for by the guest, longest wait {:?}",
                                pfns.len(),
                                arrivals.requested,
                                arrivals.longest_wait
                            )
                        }
                        Err(e) => {
                            // Without its pages the guest cannot go on: stop it, then release
                            // vCPUs blocked on missing pages (below) so that they see the stop.
                            handle.shared.finish(vm::VmExit::Failed(format!(
                                "the post-copy stream broke: {}",
                                vm::flatten_error(&e)
                            )));
                        }
                    }
                    uffd.unregister();
                })
                .map_err(|e| MigrationError::Wire(WireError::Io(e)))?;
        }
        Ok(self.vm)
    }
}

/// Frees the pages `pfns` (increasing) of the guest RAM file, a run of consecutive pages at a
/// time: reading them afterwards finds them missing.
fn punch_holes(memfd: &std::fs::File, pfns: &[u64]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for (first, count) in crate::memory::page_runs(pfns) {
        // SAFETY: fallocate on our own memfd with a range inside it (the page numbers were
        // checked against the RAM size); it touches no memory of ours.
        let rc = unsafe {
            libc::fallocate(
                memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (first * PAGE as u64) as libc::off_t,
                (count * PAGE as u64) as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes the pages of one PAGES frame into guest RAM through its memfd: each run of
/// consecutive pages is one `pwritev`, so the kernel fills them without a fault per page.
fn apply_pages(payload: &[u8], pages: u64, memfd: &std::fs::File) -> Result<u64, WireError> {
    use std::os::fd::AsRawFd;
    static ZERO: [u8; PAGE] = [0u8; PAGE];
    let mut run: Vec<libc::iovec> = Vec::new();
    let mut run_start = 0u64;
    let flush = |run: &mut Vec<libc::iovec>, start: u64| -> Result<(), WireError> {
        let mut done = 0usize;
        let total = run.len() * PAGE;
        while done < total {
            let first = done / PAGE;
            let batch = &run[first..run.len().min(first + 1024)];
            // SAFETY: every iovec points at PAGE bytes of `payload` or of ZERO, both alive for
            // this call; the file offset is inside guest RAM (page numbers were checked against
            // `pages`), and pwritev only reads the buffers.
            let n = unsafe {
                libc::pwritev(
                    memfd.as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as libc::c_int,
                    ((start + first as u64) * PAGE as u64) as libc::off_t,
                )
            };
            if n <= 0 || n as usize % PAGE != 0 {
                return Err(WireError::Io(std::io::Error::last_os_error()));
            }
            done += n as usize;
        }
        run.clear();
        Ok(())
    };
    let count = wire::for_each_page(payload, pages, |pfn, data| {
        if !run.is_empty() && run_start + run.len() as u64 != pfn {
            flush(&mut run, run_start)?;
        }
        if run.is_empty() {
            run_start = pfn;
        }
        let bytes = data.unwrap_or(&ZERO);
        run.push(libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: PAGE,
        });
        Ok(())
    })?;
    flush(&mut run, run_start)?;
    Ok(count)
}

/// Refuses the stream with `reason` (best effort) and returns the error.
fn refuse<S: Write>(stream: &mut S, reason: String) -> MigrationError {
    let _ = wire::write_frame(stream, Kind::Refuse, reason.as_bytes());
    let _ = stream.flush();
    MigrationError::Refused(reason)
}

/// Receives a VM over an authenticated `stream`. On any error nothing runs.
pub fn receive<S: Read + Write>(mut stream: S, console: Console) -> Result<Incoming<S>, MigrationError> {
    let mut buf = Vec::new();
    wire::expect_frame(&mut stream, &mut buf, Kind::Hello, "HELLO")?;
    let hello = match Hello::decode(&buf) {
        Ok(h) => h,
        Err(e) => return Err(refuse(&mut stream, e.to_string())),
    };
    if hello.cpu_vendor != cpu_vendor() {
        let theirs = String::from_utf8_lossy(&hello.cpu_vendor).into_owned();
        let ours = String::from_utf8_lossy(&cpu_vendor()).into_owned();
        return Err(refuse(
            &mut stream,
            format!("the source CPU is {theirs}, this host's is {ours}"),
        ));
    }
    let missing = wire::missing_features(&hello.cpu_features, &cpu_features());
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(word, bits)| format!("{word} bits {bits:#x}"))
            .collect();
        return Err(refuse(
            &mut stream,
            format!("this host lacks CPU features the guest may use: {}", list.join(", ")),
        ));
    }
    if let Err(e) = crate::memory::validate_size(hello.mem_bytes, crate::memory::host_ram_bytes()) {
        return Err(refuse(&mut stream, e.to_string()));
    }
    let parts = match vm::build(hello.mem_bytes, hello.vcpus as usize) {
        Ok(p) => p,
        Err(e) => return Err(refuse(&mut stream, vm::flatten_error(&e))),
    };
    wire::write_frame(&mut stream, Kind::Accept, &[])?;
    stream.flush().map_err(WireError::from)?;
    let pages = hello.mem_bytes / PAGE as u64;
    let receiving = Instant::now();
    let memfd = parts.ram.file();
    let (ram_base, ram_size) = (parts.ram.host_base(), parts.ram.size());
    let mut postcopy: Option<(crate::snapshot::lazy::Uffd, Vec<u64>)> = None;
    let mut pages_seen = false;
    let mut unpacked = Vec::new();
    // Two stages: this thread reads and decrypts frames, an applier writes their pages into
    // guest RAM, so that the two overlap. SYNC and STATE wait until the applier has caught up.
    enum ToApplier {
        Pages(Vec<u8>),
        Barrier,
    }
    let received: Result<(Vec<u8>, Instant, Duration), MigrationError> = std::thread::scope(|scope| {
        let (to_applier, inbox) = std::sync::mpsc::sync_channel::<ToApplier>(4);
        let (reply, replies) = std::sync::mpsc::channel::<Result<Duration, WireError>>();
        // Frame buffers go back to the reader once applied: a fresh 4 MiB buffer per frame
        // costs page faults and zeroing on the receiving side.
        let (recycle, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        scope.spawn(move || {
            let mut applying = Duration::ZERO;
            let mut failed = None;
            for message in inbox {
                match message {
                    ToApplier::Pages(frame) if failed.is_none() => {
                        let t = Instant::now();
                        if let Err(e) = apply_pages(&frame, pages, memfd) {
                            failed = Some(e);
                        }
                        applying += t.elapsed();
                        let _ = recycle.send(frame);
                    }
                    ToApplier::Pages(_) => {}
                    ToApplier::Barrier => {
                        let _ = reply.send(failed.take().map_or(Ok(applying), Err));
                    }
                }
            }
        });
        let applier_gone = || WireError::Io(std::io::Error::other("the page applier stopped"));
        let caught_up = || -> Result<Duration, WireError> {
            to_applier.send(ToApplier::Barrier).map_err(|_| applier_gone())?;
            replies.recv().map_err(|_| applier_gone())?
        };
        loop {
            match wire::read_frame(&mut stream, &mut buf)? {
                Kind::Postcopy => {
                    if postcopy.is_some() {
                        return Err(refuse(&mut stream, "a second POSTCOPY".into()));
                    }
                    let pfns = match wire::decode_pfns(&buf, pages) {
                        Ok(p) => p,
                        Err(e) => return Err(refuse(&mut stream, e.to_string())),
                    };
                    // After pre-copy, the pages still to come hold stale copies: drop them, so
                    // that they are missing (and fault) until they arrive, as the pages never
                    // sent are.
                    if pages_seen {
                        let dropped = caught_up().map_err(|e| e.to_string()).and_then(|_| {
                            punch_holes(memfd, &pfns).map_err(|e| format!("cannot drop stale pages: {e}"))
                        });
                        if let Err(why) = dropped {
                            return Err(refuse(&mut stream, why));
                        }
                    }
                    match crate::snapshot::lazy::Uffd::register(ram_base, ram_size) {
                        Ok(uffd) => postcopy = Some((uffd, pfns)),
                        Err(e) => return Err(refuse(&mut stream, format!("cannot set up post-copy here: {e}"))),
                    }
                }
                kind @ (Kind::Pages | Kind::PagesLz4) => {
                    pages_seen = true;
                    if kind == Kind::PagesLz4 {
                        if let Err(e) = wire::decompress_pages(&buf, &mut unpacked) {
                            return Err(refuse(&mut stream, e.to_string()));
                        }
                        std::mem::swap(&mut buf, &mut unpacked);
                    }
                    if postcopy.is_some() {
                        return Err(refuse(
                            &mut stream,
                            "pages before the switch in a post-copy stream".into(),
                        ));
                    }
                    // The frame's shape and page numbers are checked here, so that a hostile
                    // frame is refused at once; the applier only writes.
                    if let Err(e) = wire::for_each_page(&buf, pages, |_, _| Ok(())) {
                        return Err(refuse(&mut stream, e.to_string()));
                    }
                    let next = spare.try_recv().unwrap_or_default();
                    if to_applier
                        .send(ToApplier::Pages(std::mem::replace(&mut buf, next)))
                        .is_err()
                    {
                        return Err(applier_gone().into());
                    }
                }
                Kind::Sync => {
                    if let Err(e) = caught_up() {
                        return Err(refuse(&mut stream, e.to_string()));
                    }
                    wire::write_frame(&mut stream, Kind::Synced, &[])?;
                    stream.flush().map_err(WireError::from)?;
                }
                Kind::State => {
                    let arrived = Instant::now();
                    return match caught_up() {
                        Ok(applying) => Ok((std::mem::take(&mut buf), arrived, applying)),
                        Err(e) => Err(refuse(&mut stream, e.to_string())),
                    };
                }
                other => return Err(refuse(&mut stream, format!("unexpected {other:?} frame"))),
            }
        }
    });
    let (state, state_arrived, applying) = received?;
    let snap = match VmSnapshot::decode(&state) {
        Ok(s) => s,
        Err(e) => return Err(refuse(&mut stream, vm::flatten_error(&e))),
    };
    if snap.config.mem_bytes != hello.mem_bytes || snap.config.vcpus != hello.vcpus as usize {
        return Err(refuse(&mut stream, "the state does not match the announced VM".into()));
    }
    let vm = match Vm::resume_from(parts, snap, console) {
        Ok(vm) => vm,
        Err(e) => return Err(refuse(&mut stream, vm::flatten_error(&e))),
    };
    tracing::debug!(
        "destination: {:?} receiving, {applying:?} of it writing pages; state applied {:?} after it arrived",
        state_arrived - receiving,
        state_arrived.elapsed()
    );
    Ok(Incoming { vm, stream, postcopy })
}

/// Listens on `addr`, accepts one authenticated source and receives its VM.
pub fn listen_and_receive(
    addr: &str,
    creds: &Credentials,
    console: Console,
) -> Result<Incoming<tls::ServerStream>, MigrationError> {
    let listener = TcpListener::bind(addr).map_err(|source| MigrationError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    loop {
        let (tcp, peer) = listener.accept().map_err(|source| MigrationError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_read_timeout(Some(PEER_TIMEOUT));
        match tls::accept(tcp, creds) {
            Ok(stream) => return receive(stream, console),
            // A peer without the right credentials is turned away; keep waiting for the source.
            Err(e) => tracing::warn!("refused a migration connection from {peer}: {}", vm::flatten_error(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_downtime_budget_counts_the_round_trip_and_what_the_guest_dirties_meanwhile() {
        let mb = 1e6;
        let budget = Duration::from_millis(50);
        let wan = Duration::from_millis(20);
        // 3 MB at 80 MB/s is 37.5 ms: enough on a local link with an idle guest.
        assert!(fits_downtime(3.0 * mb, 0.0, 80.0 * mb, 0.0, Duration::ZERO, budget));
        // Over 20 ms RTT with a guest dirtying 64 MB/s, the pause would take ~66 ms.
        assert!(!fits_downtime(3.0 * mb, 0.0, 80.0 * mb, 64.0 * mb, wan, budget));
        // 1 MB left: ~46 ms...
        assert!(fits_downtime(1.0 * mb, 0.0, 80.0 * mb, 64.0 * mb, wan, budget));
        // ...unless 2 MB beyond what the link holds are queued: the guest dirties more
        // pages while they drain.
        assert!(!fits_downtime(1.0 * mb, 3.6 * mb, 80.0 * mb, 64.0 * mb, wan, budget));
        assert!(fits_downtime(1.0 * mb, 1.6 * mb, 80.0 * mb, 64.0 * mb, wan, budget));
        // A round trip longer than the budget never fits (the throttle and the round limit end
        // the pre-copy then).
        assert!(!fits_downtime(
            0.0,
            0.0,
            80.0 * mb,
            0.0,
            Duration::from_millis(60),
            budget
        ));
    }

    #[test]
    fn pages_the_vmm_writes_are_resent_though_kvm_does_not_log_them() {
        let harness = crate::fuzzing::HypercallHarness::new().expect("a KVM VM");
        let handle = harness.handle();
        handle.shared.set_dirty_logging(true).expect("dirty logging");
        fetch_dirty_pages(&handle).expect("fetch");
        // The block goes in and the result comes back by the VMM's own writes: KVM logs none.
        let mut block = [0u8; xcloud_abi::BLOCK_SIZE];
        block[..4].copy_from_slice(&(xcloud_abi::Op::TscKhz as u32).to_le_bytes());
        assert!(harness.call(0x20_0000, &block).is_some_and(|khz| khz > 0));
        assert_eq!(fetch_dirty_pages(&handle).expect("fetch"), [0x200]);
        assert!(fetch_dirty_pages(&handle).expect("fetch").is_empty(), "taken once");
        handle.shared.set_dirty_logging(false).expect("dirty logging off");
        harness.call(0x20_0000, &block);
        assert!(
            handle.shared.take_vmm_writes().is_empty(),
            "not recorded when no log is kept"
        );
    }

    #[test]
    fn the_dirty_rate_spans_at_least_100_ms() {
        let mut rate = DirtyRate::default();
        assert_eq!(rate.add(0.2, 20e6), 100e6);
        // A 1 ms round with 1 MB does not make it 1 GB/s: the 200 ms before still count.
        let r = rate.add(0.001, 1e6);
        assert!((r - 21e6 / 0.201).abs() < 1.0, "{r}");
        // Once 100 ms of newer rounds exist, the old one drops out.
        assert_eq!(rate.add(0.1, 1e6), 1e6 / 0.1);
    }
}
