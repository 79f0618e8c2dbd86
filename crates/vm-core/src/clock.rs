//! The VM's kvmclock as a component: section kind `clock`, instance 0, layout version 1 (the
//! `kvm_clock_data` kernel ABI bytes). SDK guests keep time by the TSC (saved with each vCPU's
//! MSRs); Linux guests read kvmclock, which must continue where it was, not jump by the time
//! between save and restore or between two hosts.
//!
//! Snapshots of format 1 have no clock section: the clock then starts fresh, as it did then.

use crate::machine::Machine;
use kvm_bindings::kvm_clock_data;
use std::sync::Arc;
use xcloud_state::{Component, StateError, StateTree};

xcloud_state::kernel_abi_state!(
    /// The saved kvmclock.
    ClockState(kvm_clock_data),
    "clock"
);

/// The kvmclock of `machine`.
pub struct Clock {
    machine: Arc<Machine>,
}

impl Clock {
    /// The machine's clock.
    pub fn new(machine: Arc<Machine>) -> Self {
        Self { machine }
    }
}

impl Component for Clock {
    fn name(&self) -> &'static str {
        "clock"
    }

    fn save(&self, into: &mut StateTree) -> Result<(), StateError> {
        let mut clock = self
            .machine
            .vm_fd()
            .get_clock()
            .map_err(|e| StateError::device("read the kvmclock", e))?;
        // Only the value travels: the flags say how this host read it (TSC-stable, realtime),
        // which the restoring host decides for itself.
        clock.flags = 0;
        into.save(0, &ClockState(clock))
    }

    fn restore(&self, from: &mut StateTree) -> Result<(), StateError> {
        let Some(ClockState(mut clock)) = from.load::<ClockState>(0)? else {
            return Ok(());
        };
        clock.flags = 0;
        self.machine
            .vm_fd()
            .set_clock(&clock)
            .map_err(|e| StateError::device("restore the kvmclock", e))
    }
}
