//! The core of an xcloud VM: KVM access ([`host`]), the KVM VM and its guest RAM
//! ([`machine`], [`memory`]: one memfd, so that it can be shared, snapshotted and sent), PVH
//! boot of any PVH ELF ([`boot`]), vCPUs and their state ([`vcpu`]), the in-kernel irqchip
//! ([`irqchip`]) and clock ([`clock`]), userfaultfd over guest RAM ([`memory::uffd`]), and the
//! platform probes that `xcloud doctor` reports ([`probe`]).
//!
//! Each stateful part implements [`xcloud_state::Component`] beside itself. This crate knows
//! nothing of devices, of the threads that run vCPUs, of snapshot files or migration streams:
//! those layers are above it (docs/architecture.md).
//!
//! It may depend on `xcloud-abi` and `xcloud-state` only (docs/architecture.md;
//! crates/xcloud/tests/architecture.rs checks it).

#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod boot;
pub mod clock;
pub mod host;
pub mod irqchip;
pub mod machine;
pub mod memory;
pub mod probe;
pub mod report;
pub mod vcpu;
