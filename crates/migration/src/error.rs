//! Why a migration failed.

use crate::tls::TlsError;
use crate::wire::WireError;
use xcloud_state::StateError;
use xcloud_vmm::{VmError, VmState};

/// Migration failures.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The TLS layer failed (handshake, certificates).
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    /// The stream is broken or hostile.
    Wire(#[from] WireError),
    #[error(transparent)]
    /// The VM could not be paused, saved, built or started.
    Vm(#[from] VmError),
    #[error(transparent)]
    /// The VM's state tree does not encode or decode.
    SavedState(#[from] StateError),
    #[error(transparent)]
    /// The VM's fence (docs/replication.md) could not be held.
    Fence(#[from] crate::fence::FenceError),
    #[error("cannot connect to {addr}")]
    /// The destination cannot be reached.
    Connect {
        /// The destination.
        addr: String,
        #[source]
        /// The system's answer.
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    /// The destination cannot listen.
    Listen {
        /// The address to listen on.
        addr: String,
        #[source]
        /// The system's answer.
        source: std::io::Error,
    },
    #[error("cannot migrate a VM with disks ({0}) by post-copy yet: its disks move with pre-copy only (leave out --postcopy)")]
    /// The VM has virtio disks, which only a pre-copy migration carries.
    HasDisks(String),
    #[error("cannot migrate a VM that is {0:?}")]
    /// The VM is in a state that cannot migrate (created, stopped).
    State(VmState),
    #[error("KVM refused to {what}")]
    /// KVM refused something the migration needs.
    Kvm {
        /// What was asked.
        what: &'static str,
        #[source]
        /// KVM's answer.
        source: kvm_ioctls::Error,
    },
    #[error("refused: {0}")]
    /// The other end refused, with its reason.
    Refused(String),
    #[error("a migration or replication of this VM is already running")]
    /// Another migration or a replication of this VM runs.
    Busy,
    #[error("invalid protection options: {0}")]
    /// Options of `protect` that do not make sense.
    Options(String),
    #[error("{0}")]
    /// What this VM has that the operation cannot take yet.
    Unsupported(String),
    #[error("the destination did not confirm that the VM runs ({0}); the source VM stays PAUSED so that it never runs twice: check the destination, then resume or stop the source")]
    /// After GO, the destination never confirmed that the VM runs.
    OutcomeUnknown(String),
}
