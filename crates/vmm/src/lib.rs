//! The xcloud VMM library: one VM per process, on whatever KVM the host offers.
//!
//! It owns KVM access ([`host`]), guest memory backed by a memfd ([`memory`]), PVH boot of any
//! PVH ELF ([`boot`]), vCPU threads (`vcpu`), devices ([`devices`]), the host side of the guest
//! hypercall ABI (`hypercall`), the VM lifecycle ([`vm`]), the control socket ([`api`]),
//! snapshots ([`snapshot`]), live migration ([`migration`]) and the platform probes that
//! `xcloud doctor` reports ([`probe`]). It knows nothing of tenants or clusters.

pub mod api;
pub mod boot;
pub mod console;
pub mod devices;
pub mod fuzzing;
pub mod host;
mod hypercall;
pub mod memory;
pub mod migration;
pub mod probe;
pub mod snapshot;
mod vcpu;
pub mod vm;

pub use console::{CaptureBuffer, Console};
pub use vm::{Vm, VmConfig, VmError, VmExit, VmHandle, VmState};
