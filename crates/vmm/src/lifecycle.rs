//! The VM's lifecycle and the control block its vCPU threads obey.
//!
//! The VM is an explicit state machine — `Created -> Running <-> Paused -> Stopped` — and an
//! illegal transition is an error. Every vCPU thread has its own activity (`Parked` until
//! started, `Running`, `Paused`, `Halted`, `Exited`) and passes through a gate before each
//! entry into the guest, where it learns whether to run, apply a start, save its state or stop.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;
use xcloud_vm_core::vcpu::persist::VcpuState;
use xcloud_vm_core::vcpu::ApStart;

/// The VM's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Built, never started.
    Created,
    /// Its vCPUs run.
    Running,
    /// No vCPU runs guest code; the guest's clock keeps going.
    Paused,
    /// Ended.
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
    Crashed {
        /// The vCPU that crashed.
        vcpu: usize,
        /// What happened.
        reason: String,
        /// Where.
        rip: u64,
    },
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

/// The lifecycle state and every vCPU's, under one lock.
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
    pub saved: Vec<Option<Result<VcpuState, String>>>,
}

/// What a vCPU thread does next, decided under the control lock.
pub(crate) enum Gate {
    Run,
    Start(Box<ApStart>),
    /// Save the vCPU's state (asked only while it is not running guest code).
    Save,
    Stop,
}

/// The control lock and the condition its waiters sleep on.
pub(crate) struct ControlBlock {
    control: Mutex<Control>,
    pub changed: Condvar,
    /// Bumped whenever a device completes buffers (the `WaitIo` hypercall waits on it).
    io_generation: std::sync::atomic::AtomicU64,
    /// vCPUs in `WaitIo` now: devices lock and notify only when there are some.
    io_waiters: std::sync::atomic::AtomicUsize,
}

impl ControlBlock {
    /// A VM in `Created` whose vCPUs start with `activity`.
    pub fn new(activity: Vec<Activity>) -> Self {
        let count = activity.len();
        Self {
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
            io_generation: std::sync::atomic::AtomicU64::new(0),
            io_waiters: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The current I/O generation.
    pub fn io_generation(&self) -> u64 {
        self.io_generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A device completed buffers: wakes the vCPUs waiting for I/O.
    pub fn io_happened(&self) {
        use std::sync::atomic::Ordering;
        self.io_generation.fetch_add(1, Ordering::SeqCst);
        if self.io_waiters.load(Ordering::SeqCst) > 0 {
            let _c = self.lock();
            self.changed.notify_all();
        }
    }

    /// Blocks a vCPU until the I/O generation is no longer `seen`, or `deadline`, while the
    /// VM runs. Returns false when pause or stop was asked first.
    pub fn wait_io(&self, seen: u64, deadline: Instant) -> bool {
        use std::sync::atomic::Ordering;
        self.io_waiters.fetch_add(1, Ordering::SeqCst);
        let mut c = self.lock();
        let result = loop {
            if c.request != Request::Run {
                break false;
            }
            let now = Instant::now();
            if self.io_generation() != seen || now >= deadline {
                break true;
            }
            c = self.wait(c, Some(deadline - now));
        };
        drop(c);
        self.io_waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }

    pub fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on the condition (at most `timeout`, if given).
    pub fn wait<'a>(
        &self,
        guard: MutexGuard<'a, Control>,
        timeout: Option<std::time::Duration>,
    ) -> MutexGuard<'a, Control> {
        match timeout {
            None => self.changed.wait(guard).unwrap_or_else(|p| p.into_inner()),
            Some(t) => self.changed.wait_timeout(guard, t).unwrap_or_else(|p| p.into_inner()).0,
        }
    }

    /// Blocks vCPU `index` until it may run, must apply a start, save its state, or stop.
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
            c = self.wait(c, None);
        }
    }

    /// Blocks a vCPU until `deadline` while the VM runs. Returns true when the deadline passed,
    /// false when pause or stop was asked first (the run loop then goes through its gate,
    /// where pause is acknowledged and state can be saved, and sleeps on afterwards).
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
            c = self.wait(c, Some(deadline - now));
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

    /// Hands over the state vCPU `index` saved.
    pub fn saved(&self, index: usize, state: Result<VcpuState, String>) {
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
pub(crate) fn kick(c: &Control) {
    for (i, &tid) in c.threads.iter().enumerate() {
        if c.vcpus.get(i).is_some_and(|a| *a != Activity::Exited) {
            // SAFETY: `tid` is a vCPU thread of this VM that has not been joined (threads are
            // joined only after every vCPU is Exited, under this same lock); the signal's
            // handler is installed before any thread starts and does nothing.
            unsafe { libc::pthread_kill(tid, xcloud_vm_core::vcpu::kick_signal()) };
        }
    }
}
