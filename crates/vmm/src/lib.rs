//! The xcloud VMM library: one VM per process, composed of its components.
//!
//! It builds a VM out of the core ([`xcloud_vm_core`]: KVM, memory, vCPUs, boot) and the
//! devices ([`xcloud_devices`]), runs one thread per vCPU, serves the guest's hypercalls, and
//! owns the VM's lifecycle ([`vm`]): pause, resume, stop, and the VM's whole state as the walk
//! over its components ([`xcloud_state`]). The engines that operate on a whole VM — snapshots
//! (`xcloud-snapshot`), live migration (`xcloud-migration`) — and the control API
//! (`xcloud-api`) are built on [`VmHandle`] and [`Blank`], above this crate. It knows nothing
//! of tenants or clusters.
//!
//! It may depend on `xcloud-abi`, `xcloud-state`, `xcloud-vm-core` and `xcloud-devices`
//! (docs/architecture.md; crates/xcloud/tests/architecture.rs checks it).

#![deny(clippy::unwrap_used, clippy::expect_used)]

mod context;
pub mod convergence;
pub mod error;
pub mod extension;
pub mod fuzzing;
mod hypercall;
pub mod lifecycle;
pub mod meter;
pub mod page_scan;
mod vcpu_thread;
mod vcpus;
mod virtio;
pub mod vm;

pub use error::VmError;
pub use lifecycle::{VmExit, VmState};
pub use vm::{Blank, Vm, VmConfig, VmHandle};
pub use xcloud_devices::console::{CaptureBuffer, Console};
pub use xcloud_devices::disk::{data_extents as disk_extents, DiskSpec};
pub use xcloud_devices::hostnet;
pub use xcloud_devices::tap::NetSpec;
pub use xcloud_devices::virtio::block::{BlockDevice, DIRTY_CHUNK};
pub use xcloud_devices::virtio::persist::BlockState;
