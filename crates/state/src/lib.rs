//! The state of a VM as a tree of its components' states, and how it is written down.
//!
//! Every part of a VM that holds state — vCPUs, the irqchip and clock, guest memory, each
//! device — implements [`Component`]: it can be paused and resumed, saves its state into
//! versioned sections of a [`StateTree`] and restores itself from them. A snapshot, a
//! migration's handover and (later) a replication checkpoint are the same walk over the
//! components; adding a device means implementing its part beside the device, not editing
//! the engines.
//!
//! The state of each component is a plain structure implementing [`Persist`]: a section kind,
//! the version of the layout written now, and a decoder that reads every version it knows.
//! [`mod@format`] is the byte level: checksummed sections, and cursors that fail cleanly on short
//! or hostile input.
//!
//! This crate depends on nothing of the VMM (no KVM): it sits at the bottom of the workspace,
//! so that every layer above can implement its components' parts.
//!
//! It depends on no other crate of the workspace (docs/architecture.md;
//! crates/xcloud/tests/architecture.rs checks it).

#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod component;
pub mod error;
pub mod format;
pub mod persist;
pub mod tree;

pub use component::Component;
pub use error::StateError;
pub use format::{Fields, FormatError};
pub use persist::Persist;
pub use tree::{Section, StateTree};
