//! Auto-converge: a guest that dirties memory faster than the link carries is slowed down.

use std::sync::Arc;
use std::time::Duration;
use xcloud_vmm::VmHandle;

/// Most of each period a throttled guest may spend paused.
pub(crate) const MAX_THROTTLE: u32 = 90;
/// Period of the throttle's pause/run cycle.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// Slows a guest that dirties memory faster than the link carries (auto-converge): for a
/// growing share of every period its vCPUs are paused. Dropping it leaves the VM running.
pub(crate) struct Throttle {
    percent: Arc<std::sync::atomic::AtomicU32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    pub fn start(handle: VmHandle) -> Self {
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

    pub fn raise(&self) {
        use std::sync::atomic::Ordering;
        let next = (self.percent.load(Ordering::SeqCst) + 30).min(MAX_THROTTLE);
        self.percent.store(next, Ordering::SeqCst);
        tracing::info!("migration: throttling the guest to {}% of its time", 100 - next);
    }

    pub fn percent(&self) -> u32 {
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
