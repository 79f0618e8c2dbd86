//! The controller's watchdog (docs/control-api.md, "Watchdog").
//!
//! A controller that may be replaced while its VMs run — a cluster host's daemon, whose VMs
//! the cluster starts elsewhere once that host's lease has lapsed — arms it with a window
//! and renews it well within that window. When a renewal does not come in time the VM is
//! paused (fenced): a daemon that died or was cut off cannot leave a guest running that now
//! runs on another host too. Expiry sticks until the next renewal: a VM that was not running
//! at that moment (booting, receiving a migration, or resumed by a failed migration) is paused
//! as soon as it runs, and a `resume` is refused. A renewal alone does not resume a fenced VM:
//! the controller decides that, once it knows the VM is still its own.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use xcloud_migration::Outgoing;
use xcloud_vmm::{VmHandle, VmState};

/// The longest window a controller may ask for.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// How often an expired watchdog looks whether its VM has begun to run.
const EXPIRED_POLL: Duration = Duration::from_millis(10);

#[derive(Default)]
struct State {
    /// When the VM is fenced unless renewed (None: not armed).
    deadline: Option<Instant>,
    /// The window it was last renewed with.
    window: Duration,
    /// Whether the watchdog paused the VM and nothing has resumed it since.
    fenced: bool,
    /// Whether its thread was started.
    started: bool,
}

/// One VM's watchdog, shared by the control socket's connections.
#[derive(Clone, Default)]
pub struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Watchdog {
    /// A watchdog that is not armed.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms or renews it: the VM is fenced unless renewed within `window` (zero disarms it).
    /// The first arming starts the thread that watches `handle`.
    pub fn renew(&self, handle: &VmHandle, outgoing: &Outgoing, window: Duration) -> Result<(), String> {
        if window > MAX_WINDOW {
            return Err(format!(
                "a watchdog window of {} ms is over the most, {} ms",
                window.as_millis(),
                MAX_WINDOW.as_millis()
            ));
        }
        let mut s = self.lock();
        if window.is_zero() {
            s.deadline = None;
        } else {
            s.deadline = Some(Instant::now() + window);
            s.window = window;
        }
        if !s.started && s.deadline.is_some() {
            let (me, handle, outgoing) = (self.clone(), handle.clone(), outgoing.clone());
            std::thread::Builder::new()
                .name("watchdog".into())
                .stack_size(128 * 1024)
                .spawn(move || me.watch(&handle, &outgoing))
                .map_err(|e| format!("cannot start the watchdog thread: {e}"))?;
            s.started = true;
        }
        self.shared.1.notify_all();
        Ok(())
    }

    /// Whether its window ran out with no renewal since.
    pub fn expired(&self) -> bool {
        self.lock().deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Whether it paused the VM, and nothing has resumed it since.
    pub fn fenced(&self) -> bool {
        self.lock().fenced
    }

    /// Tells it that the VM was resumed.
    pub fn resumed(&self) {
        self.lock().fenced = false;
    }

    fn watch(&self, handle: &VmHandle, outgoing: &Outgoing) {
        let mut s = self.lock();
        loop {
            if handle.state() == VmState::Stopped {
                return;
            }
            let Some(deadline) = s.deadline else {
                s = self.shared.1.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let now = Instant::now();
            if now < deadline {
                s = self
                    .shared
                    .1
                    .wait_timeout(s, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            // A running outgoing migration pauses, stops or resumes the VM itself; once it
            // ends, a VM it resumed is fenced here.
            if handle.state() == VmState::Running && !outgoing.running() {
                match handle.pause() {
                    Ok(()) => {
                        s.fenced = true;
                        tracing::warn!(
                            "the controller did not renew the watchdog within {} ms: the VM is paused",
                            s.window.as_millis()
                        );
                    }
                    Err(e) => tracing::warn!("the watchdog cannot pause the VM: {e}"),
                }
            }
            s = self
                .shared
                .1
                .wait_timeout(s, EXPIRED_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
