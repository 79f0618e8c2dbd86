//! Why a snapshot could not be written or restored.

use xcloud_state::{FormatError, StateError};
use xcloud_vmm::VmError;

/// Snapshot failures.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file is broken or cannot be read or written.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The saved state does not decode or does not fit.
    #[error(transparent)]
    State(#[from] StateError),
    /// The VM could not be paused, saved, built or restored.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The snapshot's directory cannot be made.
    #[error("cannot create the snapshot directory {path}")]
    Directory {
        /// The directory.
        path: String,
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
    /// The two files are not of the same snapshot.
    #[error("memory.pages does not belong to this vm.state (it is the memory.pages of another snapshot): {detail}")]
    Mismatch {
        /// How they differ.
        detail: String,
    },
    /// The snapshot directory cannot be used as it is.
    #[error("cannot write a snapshot into {path}: {why}")]
    Unusable {
        /// The directory.
        path: String,
        /// Why not.
        why: String,
    },
    /// Guest memory changed shape while it was being written.
    #[error("the VM changed while it was being snapshotted: {0}")]
    Busy(&'static str),
}
