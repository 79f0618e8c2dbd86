//! Live migration (docs/migration.md): pre-copy with KVM dirty-page logging, post-copy on
//! userfaultfd, over a mutually authenticated TLS stream.
//!
//! Source ([`source`]): send every touched page while the guest runs, then rounds of the pages
//! it dirtied, until what is left fits the downtime budget at the bandwidth measured so far;
//! then pause, send the last dirty pages and the VM's state tree, and hand over — or switch to
//! post-copy (`postcopy`). Destination ([`destination`]): check the stream and build the VM;
//! start it only when the source says so.
//!
//! Nothing is lost: until the source sends GO, any failure (the destination dies, the link
//! breaks, a refusal) leaves the source VM running as before — resumed if it was paused for
//! stop-and-copy. After GO, the source stays paused until the destination reports RUNNING; if
//! that report never comes the source stays paused (never both running) and says so.
//!
//! The VM's state travels as the same tree a snapshot writes (`xcloud_state::StateTree`): the
//! engine knows no component by name. Replication ([`replication`], [`standby`]) reuses the
//! stream, the dirty log, the page frames and the state tree.
//!
//! It may depend on `xcloud-state`, `xcloud-vm-core` and `xcloud-vmm` (docs/architecture.md;
//! crates/xcloud/tests/architecture.rs checks it).

#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod destination;
mod disks;
mod duplex;
pub mod error;
pub mod fence;
pub mod fuzzing;
mod handover;
pub mod host_cpu;
mod link;
pub mod options;
mod postcopy;
pub mod replication;
mod sender;
pub mod source;
pub mod standby;
mod throttle;
pub mod tls;
pub mod wire;

pub use destination::{listen_and_authenticate, listen_and_receive, receive, Incoming, ReceiveOptions};
pub use duplex::Duplex;
pub use error::MigrationError;
pub use fence::{Fence, FenceError};
pub use host_cpu::{cpu_features, cpu_vendor};
pub use options::{
    MigrateOptions, MigrationProgress, MigrationSummary, Outgoing, PostcopyMode, ProtectOptions, ProtectionStatus,
    StandbyStatus, StandbyWatch,
};
pub use replication::protect;
pub use source::migrate;
pub use standby::{listen_and_stand_by, stand_by, StandbyEnd};
