//! Snapshots (docs/snapshot-format.md): everything needed to continue a VM exactly, in two
//! files of a directory.
//!
//! - `vm.state`: the VM's state tree (`xcloud_state::StateTree`): the machine's shape and every
//!   component's sections — each vCPU, the irqchip, the clock, guest memory's layout, each
//!   device — versioned and checksummed; version 1 files (written before the component split)
//!   are read too;
//! - `memory.pages`: the guest pages that were ever touched and are not all zero, with an index
//!   ([`memory_file`]).
//!
//! A reader refuses truncated, corrupted or foreign files before anything runs. The engine
//! ([`engine`]) knows no component by name: a device added to the VM is snapshotted with it.
//!
//! It may depend on `xcloud-state`, `xcloud-vm-core` and `xcloud-vmm` (docs/architecture.md;
//! crates/xcloud/tests/architecture.rs checks it).

#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod engine;
pub mod error;
pub mod lazy;
pub mod memory_file;

pub use engine::{read_state, restore, restore_lazy, save, SnapshotSummary, STATE_FILE};
pub use error::SnapshotError;
pub use memory_file::MEMORY_FILE;
