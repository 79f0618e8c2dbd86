//! What every virtio device's worker thread shares: the pause/stop gate the VM's lifecycle
//! drives, the poll-then-sleep loop, and the guard that stops the thread.
//!
//! A worker serves its queues until a pass finds nothing, keeps polling for [`SPIN`], then
//! asks for doorbells and sleeps in `poll(2)` on the device's file descriptors (its doorbell,
//! a backend such as a TAP device) and on its wake eventfd. A pause parks it between passes,
//! so a paused device has no request half done.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;
use xcloud_state::StateError;

/// How long a worker keeps polling empty queues before it sleeps.
pub const SPIN: Duration = Duration::from_micros(200);
/// How long a pause waits for the worker to finish the pass it is in.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Run {
    paused: bool,
    parked: bool,
    stop: bool,
}

/// The pause/stop gate of one worker.
pub struct Gate {
    run: Mutex<Run>,
    changed: Condvar,
    /// A worker thread runs behind this gate (a pause then waits for it to park).
    started: std::sync::atomic::AtomicBool,
    /// Wakes the worker for a status change, a pause or a stop.
    wake: EventFd,
}

/// What a device's worker does.
pub trait Serve: Send + Sync + 'static {
    /// The device's gate.
    fn gate(&self) -> &Gate;
    /// One pass over the queues: Some(number of buffers served), None when the device is not
    /// running (the worker then sleeps until woken).
    fn serve(&self) -> Option<usize>;
    /// Asks the driver for doorbells; true when work arrived meanwhile.
    fn arm(&self) -> bool;
    /// Back from sleep: stop asking for doorbells (the worker polls again).
    fn disarm(&self);
    /// The descriptors to sleep on, besides the wake eventfd (with the events to wait for).
    fn sleep_fds(&self) -> Vec<(RawFd, i16)>;
    /// Called after waking with the descriptors that were ready.
    fn woke(&self, ready: &[(RawFd, i16)]);
}

impl Gate {
    /// A gate, open.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            run: Mutex::new(Run::default()),
            changed: Condvar::new(),
            started: std::sync::atomic::AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the worker (it re-reads the device's state).
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Parks the worker; returns once it is parked (or was never started).
    pub fn pause(&self) -> Result<(), StateError> {
        let mut run = self.lock();
        run.paused = true;
        if !self.started.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.wake();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while !run.parked && !run.stop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                run.paused = false;
                return Err(StateError::Busy("a virtio device did not finish its work in 30 s"));
            }
            run = self
                .changed
                .wait_timeout(run, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets a parked worker go on.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Parks while paused; false once the worker must stop.
    fn pass(&self) -> bool {
        let mut run = self.lock();
        while run.paused && !run.stop {
            run.parked = true;
            self.changed.notify_all();
            run = self.changed.wait(run).unwrap_or_else(|p| p.into_inner());
        }
        run.parked = false;
        !run.stop
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
        self.wake();
    }
}

/// Starts `device`'s worker thread, named `name`; dropping the guard stops it.
pub fn start<D: Serve>(device: &Arc<D>, name: String) -> std::io::Result<WorkerGuard> {
    device.gate().started.store(true, std::sync::atomic::Ordering::SeqCst);
    let d = device.clone();
    let thread = std::thread::Builder::new().name(name).spawn(move || work(d.as_ref()))?;
    let stop_device = device.clone();
    Ok(WorkerGuard {
        stop: Box::new(move || stop_device.gate().stop()),
        thread: Some(thread),
    })
}

fn work<D: Serve>(d: &D) {
    let mut idle_since: Option<Instant> = None;
    while d.gate().pass() {
        match d.serve() {
            Some(n) if n > 0 => {
                idle_since = None;
                continue;
            }
            Some(_) => {
                if idle_since.get_or_insert_with(Instant::now).elapsed() < SPIN {
                    // Yield rather than spin: on this kernel (no preemption, 4 ms ticks) a
                    // spinning worker keeps a woken thread of the same core (a client, the
                    // guest's peer) off it until the next tick.
                    std::thread::yield_now();
                    continue;
                }
                if d.arm() {
                    continue;
                }
            }
            None => {}
        }
        sleep(d);
        d.disarm();
        idle_since = None;
    }
}

fn sleep<D: Serve>(d: &D) {
    let wanted = d.sleep_fds();
    let mut fds: Vec<libc::pollfd> = wanted
        .iter()
        .map(|&(fd, events)| libc::pollfd { fd, events, revents: 0 })
        .chain(std::iter::once(libc::pollfd {
            fd: d.gate().wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }))
        .collect();
    // SAFETY: poll reads and writes `fds.len()` pollfds of a live vector.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    let _ = d.gate().wake.read();
    let ready: Vec<(RawFd, i16)> = fds[..wanted.len()]
        .iter()
        .filter(|p| p.revents != 0)
        .map(|p| (p.fd, p.revents))
        .collect();
    d.woke(&ready);
}

/// What a register write asks of the worker: a doorbell (without an ioeventfd on the notify
/// port it arrives here) or a look at the new status.
pub fn deliver(effect: super::legacy::Effect, kick: &EventFd, gate: &Gate) {
    match effect {
        super::legacy::Effect::Kick(_) => {
            let _ = kick.write(1);
        }
        super::legacy::Effect::Status => gate.wake(),
        super::legacy::Effect::None => {}
    }
}

/// Stops a device's worker thread when dropped.
pub struct WorkerGuard {
    stop: Box<dyn Fn() + Send + Sync>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        (self.stop)();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
