//! A VM: its memory, devices and vCPU threads, and its lifecycle.
//!
//! The lifecycle is an explicit state machine — `Created -> Running <-> Paused -> Stopped` —
//! and an illegal transition is an error. Every vCPU is a thread with its own activity
//! (`Parked` until started, `Running`, `Paused`, `Halted`, `Exited`); pause waits until no
//! vCPU is `Running`, kicking threads out of `KVM_RUN` with a signal until each acknowledges.

use crate::boot::{self, BootError};
use crate::console::Console;
use crate::devices::serial::{SerialPort, COM1_IRQ};
use crate::host::{self, HostError};
use crate::memory::{GuestRam, MemoryError};
use crate::snapshot::{self, SnapshotError, SnapshotSummary};
use crate::vcpu::{self, ApStart};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: usize = 64;

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs (1..=MAX_VCPUS).
    pub vcpus: usize,
    /// The guest's command line.
    pub cmdline: String,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 64 << 20,
            vcpus: 1,
            cmdline: String::new(),
        }
    }
}

/// The VM's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Stopped,
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked to exit with this status.
    Exited(i32),
    /// The guest panicked with this message.
    Panicked(String),
    /// The guest crashed (triple fault, failed entry, ...).
    Crashed { vcpu: usize, reason: String, rip: u64 },
    /// The host stopped it.
    Stopped,
    /// It was migrated away and runs at this destination now.
    Migrated(String),
    /// The VMM failed while running it.
    Failed(String),
}

impl VmExit {
    /// The process exit status that stands for this end.
    pub fn status(&self) -> i32 {
        match self {
            VmExit::Exited(s) => *s,
            VmExit::Panicked(_) => xcloud_abi::PANIC_EXIT_STATUS,
            VmExit::Crashed { .. } => 125,
            VmExit::Stopped => 130,
            VmExit::Migrated(_) => 0,
            VmExit::Failed(_) => 126,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Exited(s) => write!(f, "guest exited with status {s}"),
            VmExit::Panicked(m) => write!(f, "guest panicked: {m}"),
            VmExit::Crashed { vcpu, reason, rip } => {
                write!(f, "guest crashed: vCPU {vcpu} {reason} at RIP {rip:#x}")
            }
            VmExit::Stopped => write!(f, "guest stopped by the host"),
            VmExit::Migrated(to) => write!(f, "guest migrated to {to}"),
            VmExit::Failed(m) => write!(f, "VMM failure: {m}"),
        }
    }
}

/// VM failures.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("a VM needs 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(usize),
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU {index}: {what}")]
    Vcpu {
        index: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the vCPU thread {index}")]
    Thread {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("the VM's memory did not finish arriving (lazy restore or post-copy)")]
    MemoryNotLoaded,
    #[error("cannot {action} a VM that is {state:?}")]
    InvalidTransition { action: &'static str, state: VmState },
}

/// What the VMM asks of every vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Run,
    Pause,
    Stop,
}

/// What one vCPU thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activity {
    /// Created, never started (secondary vCPUs wait for a StartVcpu hypercall).
    Parked,
    /// In or about to enter KVM_RUN, or serving an exit.
    Running,
    /// Acknowledged a pause and waits.
    Paused,
    /// Stopped by its own StopVcpu hypercall; waits for the VM's end.
    Halted,
    /// Its thread has left the run loop.
    Exited,
}

pub(crate) struct Control {
    pub state: VmState,
    pub request: Request,
    pub vcpus: Vec<Activity>,
    pub starts: Vec<Option<ApStart>>,
    pub exit: Option<VmExit>,
    pub threads: Vec<libc::pthread_t>,
    /// Per vCPU: a state save was asked of its thread.
    pub save_requested: Vec<bool>,
    /// Per vCPU: the state its thread saved.
    pub saved: Vec<Option<Result<crate::snapshot::VcpuState, String>>>,
}

/// What every vCPU thread shares.
pub(crate) struct Shared {
    // Declared before `ram` so the VM (and its memory slot) goes before the mapping does.
    pub vm_fd: VmFd,
    pub ram: GuestRam,
    pub console: Console,
    pub serial: Mutex<SerialPort>,
    pub control: Mutex<Control>,
    pub changed: Condvar,
    pub vcpu_count: usize,
    pub tsc_khz: u64,
    /// MSRs a snapshot saves (those the vCPUs can read).
    pub msr_indices: Vec<u32>,
    /// The outgoing migration's progress, while one runs.
    pub progress: Mutex<Option<crate::migration::MigrationProgress>>,
    /// Whether an outgoing migration runs (see [`VmHandle::claim_migration`]).
    migrating: AtomicBool,
    /// When guest RAM fills in while the guest runs (lazy restore, post-copy): turns true once
    /// every page is in.
    pub(crate) memory_complete: std::sync::OnceLock<Arc<AtomicBool>>,
    /// While dirty logging is on: the pages the VMM itself wrote (hypercall results), which
    /// KVM's dirty log does not see.
    vmm_writes: Mutex<Option<Vec<u64>>>,
    noise: AtomicU64,
}

/// What a vCPU thread does next, decided under the control lock.
pub(crate) enum Gate {
    Run,
    Start(Box<ApStart>),
    /// Save the vCPU's state for a snapshot (asked only while it is not running guest code).
    Save,
    Stop,
}

/// How many ignored guest accesses are logged at warn level before the rest go to debug.
const NOISE_WARNINGS: u64 = 10;

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs a guest access the VMM ignores (unknown port, MMIO, malformed hypercall).
    pub fn guest_noise(&self, what: std::fmt::Arguments<'_>) {
        let n = self.noise.fetch_add(1, Ordering::Relaxed);
        if n < NOISE_WARNINGS {
            tracing::warn!("ignored guest access: {what}");
        } else {
            tracing::debug!("ignored guest access: {what}");
        }
    }

    /// Blocks vCPU `index` until it may run, must apply a start, or must stop.
    pub fn gate(&self, index: usize) -> Gate {
        let mut c = self.lock();
        loop {
            if c.request == Request::Stop {
                return Gate::Stop;
            }
            if c.save_requested[index] && matches!(c.vcpus[index], Activity::Paused | Activity::Halted) {
                c.save_requested[index] = false;
                return Gate::Save;
            }
            match c.vcpus[index] {
                Activity::Parked => {
                    if let Some(start) = c.starts[index].take() {
                        c.vcpus[index] = Activity::Paused;
                        return Gate::Start(Box::new(start));
                    }
                }
                Activity::Running | Activity::Paused => match c.request {
                    Request::Run => {
                        if c.vcpus[index] == Activity::Paused {
                            c.vcpus[index] = Activity::Running;
                            self.changed.notify_all();
                        }
                        return Gate::Run;
                    }
                    _ => {
                        if c.vcpus[index] == Activity::Running {
                            c.vcpus[index] = Activity::Paused;
                            self.changed.notify_all();
                        }
                    }
                },
                Activity::Halted => {}
                Activity::Exited => return Gate::Stop,
            }
            c = self.changed.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks vCPU `index` until `deadline` while the VM runs. Returns true when the deadline
    /// passed, false when pause or stop was asked first (the run loop then goes through its
    /// gate, where pause is acknowledged and state can be saved, and sleeps on afterwards).
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        let mut c = self.lock();
        loop {
            if c.request != Request::Run {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            c = self
                .changed
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Ends the VM with `exit` (the first end recorded wins) and stops every vCPU.
    pub fn finish(&self, exit: VmExit) {
        let mut c = self.lock();
        if c.exit.is_none() {
            c.exit = Some(exit);
        }
        c.request = Request::Stop;
        self.changed.notify_all();
        kick(&c);
    }

    /// Publishes the outgoing migration's progress (None: no migration runs).
    pub fn set_progress(&self, progress: Option<crate::migration::MigrationProgress>) {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = progress;
    }

    /// Records that the VMM wrote guest RAM at `gpa`, for the dirty log (while it is on).
    pub fn note_vmm_write(&self, gpa: u64) {
        if let Some(pages) = self.vmm_writes.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            pages.push(gpa / crate::memory::PAGE_BYTES);
        }
    }

    /// The pages the VMM wrote since the last call (empty when dirty logging is off).
    pub fn take_vmm_writes(&self) -> Vec<u64> {
        self.vmm_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Turns KVM dirty-page logging of guest RAM on or off, and the VMM's record of its own
    /// writes with it.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), kvm_ioctls::Error> {
        *self.vmm_writes.lock().unwrap_or_else(|p| p.into_inner()) = on.then(Vec::new);
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: self.ram.size(),
            userspace_addr: self.ram.host_base(),
        };
        // SAFETY: the same slot, address and size as registered at build time (the mapping is
        // alive as long as `self`); only the logging flag changes.
        unsafe { self.vm_fd.set_user_memory_region(region) }
    }

    /// Hands over the state vCPU `index` saved.
    pub fn saved(&self, index: usize, state: Result<crate::snapshot::VcpuState, String>) {
        let mut c = self.lock();
        c.saved[index] = Some(state);
        self.changed.notify_all();
    }

    /// Marks vCPU `index` as halted by its own request.
    pub fn halt(&self, index: usize) {
        let mut c = self.lock();
        c.vcpus[index] = Activity::Halted;
        self.changed.notify_all();
    }

    /// Marks vCPU `index`'s thread as gone.
    pub fn exited(&self, index: usize) {
        let mut c = self.lock();
        c.vcpus[index] = Activity::Exited;
        self.changed.notify_all();
    }
}

/// Sends the kick signal to every vCPU thread that has not exited. Called with the control
/// lock held, so no thread can be joined (and its id reused) while it is signalled.
fn kick(c: &Control) {
    for (i, &tid) in c.threads.iter().enumerate() {
        if c.vcpus.get(i).is_some_and(|a| *a != Activity::Exited) {
            // SAFETY: `tid` is a vCPU thread of this VM that has not been joined (threads are
            // joined only after every vCPU is Exited, under this same lock); the signal's
            // handler is installed before any thread starts and does nothing.
            unsafe { libc::pthread_kill(tid, vcpu::kick_signal()) };
        }
    }
}

/// An error and its sources on one line (for logs and API answers).
pub fn flatten_error(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A handle that pauses, resumes and stops a VM from any thread.
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) shared: Arc<Shared>,
}

impl VmHandle {
    /// The current lifecycle state.
    pub fn state(&self) -> VmState {
        self.shared.lock().state
    }

    /// Stops every vCPU and returns once none runs guest code. The guest's clock keeps going.
    pub fn pause(&self) -> Result<(), VmError> {
        let mut c = self.shared.lock();
        if c.state != VmState::Running {
            return Err(VmError::InvalidTransition {
                action: "pause",
                state: c.state,
            });
        }
        c.request = Request::Pause;
        self.shared.changed.notify_all();
        while c.request == Request::Pause && c.vcpus.contains(&Activity::Running) {
            kick(&c);
            c = self
                .shared
                .changed
                .wait_timeout(c, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if c.request == Request::Stop {
            return Err(VmError::InvalidTransition {
                action: "pause",
                state: VmState::Stopped,
            });
        }
        c.state = VmState::Paused;
        Ok(())
    }

    /// Lets every paused vCPU run again.
    pub fn resume(&self) -> Result<(), VmError> {
        let mut c = self.shared.lock();
        if c.state != VmState::Paused {
            return Err(VmError::InvalidTransition {
                action: "resume",
                state: c.state,
            });
        }
        c.request = Request::Run;
        c.state = VmState::Running;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Returns once all of guest RAM is in place: at once, except after a lazy restore or a
    /// post-copy migration whose pages are still arriving (a snapshot or migration started
    /// then would miss them).
    pub fn wait_for_memory(&self) -> Result<(), VmError> {
        let Some(loaded) = self.shared.memory_complete.get() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !loaded.load(Ordering::SeqCst) {
            if self.shared.lock().request == Request::Stop || Instant::now() > deadline {
                return Err(VmError::MemoryNotLoaded);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Claims the VM for one outgoing migration: None if one already runs. While the claim is
    /// held, the control API refuses what would interfere (pause, resume, snapshot, another
    /// migration): a resume during the switch would run the VM at both ends.
    pub fn claim_migration(&self) -> Option<MigrationClaim> {
        self.shared
            .migrating
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| MigrationClaim {
                shared: self.shared.clone(),
            })
    }

    /// Whether an outgoing migration runs.
    pub fn migrating(&self) -> bool {
        self.shared.migrating.load(Ordering::SeqCst)
    }

    /// Ends a VM that was migrated away (its source copy, which must never run again).
    pub fn end_migrated(&self, to: &str) {
        yield_to_the_destination();
        self.shared.finish(VmExit::Migrated(to.to_string()));
    }

    /// Stops the VM; `Vm::wait` then returns `VmExit::Stopped` unless the guest ended first.
    pub fn stop(&self) {
        self.shared.finish(VmExit::Stopped);
    }

    /// Writes a snapshot of the VM into `dir`. A running VM is paused for the snapshot and
    /// resumed after it; a paused VM stays paused.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<SnapshotSummary, VmError> {
        self.wait_for_memory()?;
        let was_running = match self.state() {
            VmState::Running => true,
            VmState::Paused => false,
            state => {
                return Err(VmError::InvalidTransition {
                    action: "snapshot",
                    state,
                })
            }
        };
        if was_running {
            self.pause()?;
        }
        let result = self.capture(dir);
        if was_running {
            // The VM may have been stopped meanwhile; then there is nothing to resume.
            let _ = self.resume();
        }
        result
    }

    fn capture(&self, dir: &std::path::Path) -> Result<SnapshotSummary, VmError> {
        let snap = self.collect_state()?;
        let shared = &self.shared;
        Ok(snapshot::write_dir(dir, &snap, &shared.ram)?)
    }

    /// The vCPU and device state of a paused VM (each vCPU thread saves its own vCPU).
    pub(crate) fn collect_state(&self) -> Result<snapshot::VmSnapshot, VmError> {
        let shared = &self.shared;
        let mut c = shared.lock();
        // A secondary vCPU whose start is still pending is not paused yet: wait for it.
        while c.starts.iter().any(Option::is_some) && c.request == Request::Pause {
            c = shared
                .changed
                .wait_timeout(c, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let needs_state: Vec<bool> = c
            .vcpus
            .iter()
            .map(|a| matches!(a, Activity::Paused | Activity::Halted))
            .collect();
        for (i, &needed) in needs_state.iter().enumerate() {
            c.save_requested[i] = needed;
            c.saved[i] = None;
        }
        shared.changed.notify_all();
        while needs_state
            .iter()
            .zip(&c.saved)
            .any(|(&needed, saved)| needed && saved.is_none())
        {
            if c.request != Request::Pause {
                return Err(SnapshotError::Busy("the VM stopped during the snapshot").into());
            }
            c = shared.changed.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        let mut vcpus = Vec::with_capacity(c.vcpus.len());
        for (index, activity) in c.vcpus.clone().into_iter().enumerate() {
            let state = match c.saved[index].take() {
                Some(Ok(state)) => Some(Box::new(state)),
                Some(Err(what)) => return Err(SnapshotError::SaveVcpu { index, what }.into()),
                None => None,
            };
            vcpus.push(snapshot::VcpuSnapshot { activity, state });
        }
        drop(c);
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            shared
                .vm_fd
                .get_irqchip(&mut chip)
                .map_err(|source| SnapshotError::Kvm {
                    what: "read the irqchip",
                    source,
                })?;
            irqchips.push(chip);
        }
        let serial = shared.serial.lock().unwrap_or_else(|p| p.into_inner()).state();
        Ok(snapshot::VmSnapshot {
            config: snapshot::SnapshotConfig {
                mem_bytes: shared.ram.size(),
                vcpus: shared.vcpu_count,
                tsc_khz: shared.tsc_khz,
                cmdline: String::new(),
            },
            vcpus,
            irqchips,
            serial,
        })
    }

    /// Reads guest RAM at guest-physical `addr` (for inspection; the guest may be running).
    pub fn read_guest(&self, addr: u64, buf: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
        use vm_memory::Bytes;
        self.shared.ram.mem().read_slice(buf, vm_memory::GuestAddress(addr))
    }

    /// The outgoing migration's progress, while one runs.
    pub fn migration_progress(&self) -> Option<crate::migration::MigrationProgress> {
        self.shared.progress.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.shared.vcpu_count
    }

    /// Bytes of guest RAM.
    pub fn mem_bytes(&self) -> u64 {
        self.shared.ram.size()
    }
}

/// A VM built and ready to start.
pub struct Vm {
    _kvm: Kvm,
    /// Serves guest RAM on demand after a lazy restore.
    lazy: Option<snapshot::lazy::LazyMemory>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) vcpus: Vec<VcpuFd>,
    threads: Vec<JoinHandle<()>>,
}

static KICK_HANDLER: Once = Once::new();

/// The KVM objects and memory of a VM before its vCPU threads exist.
pub(crate) struct Parts {
    kvm: Kvm,
    vm_fd: VmFd,
    pub(crate) ram: GuestRam,
    serial_irq: EventFd,
    vcpus: Vec<VcpuFd>,
    pub(crate) tsc_khz: u64,
    msr_indices: Vec<u32>,
}

pub(crate) fn build(mem_bytes: u64, vcpu_count: usize) -> Result<Parts, VmError> {
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(VmError::VcpuCount(vcpu_count));
    }
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let kvm = host::open_kvm()?;
    let ram = GuestRam::new(mem_bytes)?;
    let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    // KVM on Intel needs a TSS area for real-mode emulation; place it in the 32-bit hole.
    vm_fd
        .set_tss_address(0xfffb_d000)
        .map_err(kvm_err("set the TSS address"))?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base(),
    };
    // SAFETY: the region is the whole mmap of `ram`; `Shared` keeps `ram` alive and drops the
    // VM fd (declared first) before it.
    unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("register the serial irqfd"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report supported CPUID"))?;
    let mut vcpus = Vec::with_capacity(vcpu_count);
    for index in 0..vcpu_count {
        vcpus.push(vcpu::create(&vm_fd, index, &cpuid)?);
    }
    let tsc_khz = vcpus[0]
        .get_tsc_khz()
        .map(u64::from)
        .unwrap_or_else(|_| vcpu::host_tsc_khz());
    let candidates = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();
    let msr_indices = vcpu::readable_msrs(&vcpus[0], &candidates);
    Ok(Parts {
        kvm,
        vm_fd,
        ram,
        serial_irq,
        vcpus,
        tsc_khz,
        msr_indices,
    })
}

impl Vm {
    fn assemble(parts: Parts, console: Console, activity: Vec<Activity>, serial: SerialPort) -> Self {
        let count = parts.vcpus.len();
        let shared = Arc::new(Shared {
            vm_fd: parts.vm_fd,
            serial: Mutex::new(serial),
            console,
            ram: parts.ram,
            control: Mutex::new(Control {
                state: VmState::Created,
                request: Request::Run,
                vcpus: activity,
                starts: (0..count).map(|_| None).collect(),
                exit: None,
                threads: Vec::new(),
                save_requested: vec![false; count],
                saved: (0..count).map(|_| None).collect(),
            }),
            changed: Condvar::new(),
            vcpu_count: count,
            tsc_khz: parts.tsc_khz,
            msr_indices: parts.msr_indices,
            progress: Mutex::new(None),
            migrating: AtomicBool::new(false),
            memory_complete: std::sync::OnceLock::new(),
            vmm_writes: Mutex::new(None),
            noise: AtomicU64::new(0),
        });
        Self {
            _kvm: parts.kvm,
            lazy: None,
            shared,
            vcpus: parts.vcpus,
            threads: Vec::new(),
        }
    }

    /// Builds a VM: KVM, memfd RAM, in-kernel irqchip, COM1, vCPUs, and the PVH image loaded.
    pub fn new(config: &VmConfig, image: &[u8], console: Console) -> Result<Self, VmError> {
        // A bad size is refused before KVM is opened, so the error names the size even on a
        // host without KVM.
        crate::memory::validate_size(config.mem_bytes, crate::memory::host_ram_bytes())?;
        let parts = build(config.mem_bytes, config.vcpus)?;
        let boot = boot::load_pvh(parts.ram.mem(), parts.ram.size(), image, &config.cmdline)?;
        vcpu::set_boot_state(&parts.vcpus[0], &boot)?;
        let mut activity = vec![Activity::Parked; config.vcpus];
        activity[0] = Activity::Paused;
        let serial = SerialPort::new(parts.serial_irq.try_clone().map_err(VmError::EventFd)?, console.clone());
        Ok(Self::assemble(parts, console, activity, serial))
    }

    /// Rebuilds a VM from the snapshot in `dir`; `start` then continues it where it was.
    /// Everything is read and checked before the VM can run; on any error nothing runs.
    pub fn restore(dir: &std::path::Path, console: Console) -> Result<Self, VmError> {
        let snap = snapshot::read_state(dir)?;
        let parts = build(snap.config.mem_bytes, snap.config.vcpus)?;
        snapshot::read_memory(&dir.join(snapshot::MEMORY_FILE), &parts.ram)?;
        Self::resume_from(parts, snap, console)
    }

    /// Like [`Vm::restore`], but the guest runs before its memory is read: pages are loaded on
    /// first touch (userfaultfd) and streamed in the background (see `snapshot::lazy`).
    pub fn restore_lazy(dir: &std::path::Path, console: Console) -> Result<Self, VmError> {
        let snap = snapshot::read_state(dir)?;
        let parts = build(snap.config.mem_bytes, snap.config.vcpus)?;
        // The prefetcher may find the pages corrupt before the VM exists (a small snapshot is
        // read in a few milliseconds): the verdict then waits in the slot for the VM.
        let slot: Arc<Mutex<CorruptionSlot>> = Arc::new(Mutex::new(CorruptionSlot::NoVmYet(None)));
        let on_corrupt = {
            let slot = slot.clone();
            Box::new(move |why: String| {
                let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
                match &mut *slot {
                    CorruptionSlot::Vm(h) => h.shared.finish(VmExit::Failed(why)),
                    CorruptionSlot::NoVmYet(verdict) => *verdict = Some(why),
                }
            })
        };
        let lazy = snapshot::lazy::start(
            &dir.join(snapshot::MEMORY_FILE),
            parts.ram.host_base(),
            parts.ram.size(),
            on_corrupt,
        )?;
        let mut vm = Self::resume_from(parts, snap, console)?;
        let _ = vm.shared.memory_complete.set(lazy.loaded_flag());
        vm.lazy = Some(lazy);
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let CorruptionSlot::NoVmYet(Some(why)) = &*slot {
            vm.handle().shared.finish(VmExit::Failed(why.clone()));
        }
        *slot = CorruptionSlot::Vm(vm.handle());
        drop(slot);
        Ok(vm)
    }

    /// Completes a restore whose memory is already in `parts`.
    pub(crate) fn resume_from(parts: Parts, snap: snapshot::VmSnapshot, console: Console) -> Result<Self, VmError> {
        if parts.tsc_khz != snap.config.tsc_khz {
            tracing::warn!(
                "the snapshot's TSC ran at {} kHz, this host's at {} kHz: guest time will run at this host's rate",
                snap.config.tsc_khz,
                parts.tsc_khz
            );
        }
        for (chip_state, chip_id) in snap.irqchips.iter().zip(0u32..) {
            if chip_state.chip_id != chip_id {
                return Err(SnapshotError::Incompatible(format!(
                    "irqchip {} where {chip_id} belongs",
                    chip_state.chip_id
                ))
                .into());
            }
            parts
                .vm_fd
                .set_irqchip(chip_state)
                .map_err(|source| SnapshotError::Kvm {
                    what: "restore the irqchip",
                    source,
                })?;
        }
        let mut activity = Vec::with_capacity(snap.vcpus.len());
        for (index, (v, fd)) in snap.vcpus.iter().zip(&parts.vcpus).enumerate() {
            if let Some(state) = &v.state {
                vcpu::restore_state(index, fd, state)?;
            }
            activity.push(v.activity);
        }
        let serial = SerialPort::from_state(
            &snap.serial,
            parts.serial_irq.try_clone().map_err(VmError::EventFd)?,
            console.clone(),
        )
        .map_err(SnapshotError::Incompatible)?;
        Ok(Self::assemble(parts, console, activity, serial))
    }

    /// A handle for pause, resume and stop.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
        }
    }

    /// Starts one thread per vCPU; the boot vCPU begins at the PVH entry.
    pub fn start(&mut self) -> Result<(), VmError> {
        {
            let c = self.shared.lock();
            if c.state != VmState::Created {
                return Err(VmError::InvalidTransition {
                    action: "start",
                    state: c.state,
                });
            }
        }
        let mut install = Ok(());
        KICK_HANDLER.call_once(|| install = vcpu::install_kick_handler());
        install.map_err(|e| VmError::Thread {
            index: 0,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let mut c = self.shared.lock();
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let shared = self.shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .stack_size(256 * 1024)
                .spawn(move || vcpu::run(index, fd, shared));
            let thread = match thread {
                Ok(t) => t,
                Err(source) => {
                    drop(c);
                    self.shared
                        .finish(VmExit::Failed(format!("cannot start vCPU thread {index}")));
                    return Err(VmError::Thread { index, source });
                }
            };
            use std::os::unix::thread::JoinHandleExt;
            c.threads.push(thread.as_pthread_t());
            self.threads.push(thread);
        }
        c.state = VmState::Running;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits for the VM to end and returns how it ended.
    pub fn wait(mut self) -> VmExit {
        {
            let mut c = self.shared.lock();
            while c.vcpus.iter().any(|a| *a != Activity::Exited) {
                if self.threads.is_empty() {
                    break;
                }
                c = self.shared.changed.wait(c).unwrap_or_else(|p| p.into_inner());
            }
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                self.shared.finish(VmExit::Failed("a vCPU thread panicked".into()));
            }
        }
        let mut c = self.shared.lock();
        c.state = VmState::Stopped;
        c.exit.clone().unwrap_or(VmExit::Stopped)
    }
}

/// Lowers every thread of this process to the lowest CPU priority (nice 19). Called once the
/// guest runs elsewhere: tearing the source down (unmapping and freeing guest RAM takes
/// milliseconds of CPU) must not take a core from the guest's new home when both share a host.
fn yield_to_the_destination() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<libc::id_t>().ok()) {
            // SAFETY: setpriority only changes the scheduling priority of thread `tid` of this
            // process; it touches no memory.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) };
        }
    }
}

/// An outgoing migration's hold on its VM, released when dropped.
pub struct MigrationClaim {
    shared: Arc<Shared>,
}

impl Drop for MigrationClaim {
    fn drop(&mut self) {
        self.shared.migrating.store(false, Ordering::SeqCst);
    }
}

/// Where a lazy restore's checksum verdict goes: to the VM once it exists, kept until then.
enum CorruptionSlot {
    NoVmYet(Option<String>),
    Vm(VmHandle),
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.finish(VmExit::Stopped);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
        // The loader goes after the vCPUs: a vCPU may be waiting for a page it serves.
        self.lazy.take();
    }
}
