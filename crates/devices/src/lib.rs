//! The devices of an xcloud VM and what they are wired to: the port-I/O bus the vCPUs
//! dispatch guest `in`/`out` to ([`bus`]), the console guest output goes to ([`console`]), and
//! the COM1 UART ([`serial`]), PCI bus 0 ([`pci`]) and the virtio devices on it ([`virtio`]),
//! the disk images behind virtio-blk ([`disk`]), the hooks extensions see frames and block requests through ([`hooks`]) and the TAP devices behind virtio-net ([`tap`]), and the bridges and
//! overlays those join ([`hostnet`], rtnetlink). Each device implements [`xcloud_state::Component`] in its own
//! `persist.rs`, so snapshots and migrations carry it without knowing it.
//!
//! Devices know nothing of KVM: they raise interrupts through an eventfd the VMM wires to the
//! irqchip, and the VMM puts them on the bus.
//!
//! It may depend on `xcloud-state` only (docs/architecture.md;
//! crates/xcloud/tests/architecture.rs checks it).

#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod bus;
pub mod console;
pub mod disk;
pub mod hooks;
pub mod hostnet;
pub mod pci;
pub mod serial;
pub mod tap;
pub mod virtio;
