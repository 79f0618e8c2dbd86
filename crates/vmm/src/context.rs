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
    noise: AtomicU64,
}

impl VcpuContext {
    pub fn new(machine: Arc<Machine>, control: Arc<ControlBlock>, console: Console, bus: PortBus) -> Self {
        Self {
            machine,
            control,
            console,
            bus,
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
