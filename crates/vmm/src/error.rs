//! Why a VM could not be built, restored, run or changed.

use crate::lifecycle::VmState;
use xcloud_state::StateError;
use xcloud_vm_core::boot::BootError;
use xcloud_vm_core::machine::MachineError;
use xcloud_vm_core::memory::MemoryError;
use xcloud_vm_core::vcpu::VcpuError;

/// VM failures.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM, RAM or vCPUs could not be set up.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The requested RAM size is not possible.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest image cannot be booted.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU refused its boot state.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A device could not be wired up.
    #[error("cannot set up the {device}")]
    Device {
        /// Which device.
        device: &'static str,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] xcloud_devices::disk::DiskError),
    /// A TAP device cannot be used.
    #[error(transparent)]
    Tap(#[from] xcloud_devices::tap::TapError),
    /// The host's network (a bridge) refused a NIC's setup.
    #[error(transparent)]
    HostNet(xcloud_devices::hostnet::NetlinkError),
    /// More devices than the VM has room for.
    #[error("a VM takes at most {max} virtio devices; {asked} were asked for")]
    TooManyDevices {
        /// The limit.
        max: usize,
        /// How many were asked for.
        asked: usize,
    },
    /// A vCPU could not be entered once before the guest runs ([`crate::Blank::prime`]).
    #[error("cannot prime the vCPUs: {0}")]
    Prime(String),
    /// A vCPU thread could not be started.
    #[error("cannot start the vCPU thread {index}")]
    Thread {
        /// Which vCPU.
        index: usize,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A component's state could not be saved or restored.
    #[error(transparent)]
    State(#[from] StateError),
    /// Guest RAM that fills in while the guest runs never finished.
    #[error("the VM's memory did not finish arriving (lazy restore or post-copy)")]
    MemoryNotLoaded,
    /// The lifecycle does not allow this now.
    #[error("cannot {action} a VM that is {state:?}")]
    InvalidTransition {
        /// What was asked.
        action: &'static str,
        /// The state the VM is in.
        state: VmState,
    },
}
