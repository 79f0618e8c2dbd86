//! What every vCPU thread of a VM shares: the machine, the control block, the console and the
//! port-I/O bus.

use crate::lifecycle::ControlBlock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use xcloud_devices::bus::PortBus;
use xcloud_devices::console::Console;
use xcloud_vm_core::machine::Machine;

/// How many ignored guest accesses are logged at warn level before the rest go to debug.
const NOISE_WARNINGS: u64 = 10;

pub(crate) struct VcpuContext {
    pub machine: Arc<Machine>,
    pub control: Arc<ControlBlock>,
    pub console: Console,
    pub bus: PortBus,
    /// The guest's last `ReportLoad`.
    pub load: GuestLoad,
    noise: AtomicU64,
}

/// The last load figure the guest reported, and when. Not part of a snapshot: a figure from
/// before a restore or a migration says nothing of the guest's load now, and the guest
/// reports again.
#[derive(Default)]
pub(crate) struct GuestLoad(std::sync::Mutex<Option<(u64, std::time::Instant)>>);

impl GuestLoad {
    pub fn report(&self, milli: u64) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((milli, std::time::Instant::now()));
    }

    /// The figure (in units) and how long ago it came.
    pub fn last(&self) -> Option<(f64, std::time::Duration)> {
        let last = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        last.map(|(milli, at)| (milli as f64 / 1000.0, at.elapsed()))
    }
}

impl VcpuContext {
    pub fn new(machine: Arc<Machine>, control: Arc<ControlBlock>, console: Console, bus: PortBus) -> Self {
        Self {
            machine,
            control,
            console,
            bus,
            load: GuestLoad::default(),
            noise: AtomicU64::new(0),
        }
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
}
