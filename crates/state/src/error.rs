//! Why a part's state could not be saved or restored.

use crate::format::FormatError;

/// Why a component's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state file or stream itself is broken.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// One section's body does not decode.
    #[error("the saved {kind} {instance} state is invalid")]
    Section {
        /// The section's kind.
        kind: String,
        /// Which instance of the kind.
        instance: u32,
        /// What is wrong with it.
        #[source]
        source: FormatError,
    },
    /// A section this VM needs is not there.
    #[error("the saved state has no {kind} {instance} section")]
    Missing {
        /// The section's kind.
        kind: &'static str,
        /// Which instance of the kind.
        instance: u32,
    },
    /// A section no component of this VM took: restoring without it would lose state.
    #[error("the saved state holds a {kind} {instance} section that no part of this VM takes")]
    Unclaimed {
        /// The section's kind.
        kind: String,
        /// Which instance of the kind.
        instance: u32,
    },
    /// The same section twice.
    #[error("the saved state holds the {kind} {instance} section twice")]
    Duplicate {
        /// The section's kind.
        kind: String,
        /// Which instance of the kind.
        instance: u32,
    },
    /// The hypervisor or the component refused to hand over or take back its state.
    #[error("cannot {action}")]
    Device {
        /// What was being done ("restore the MSRs of vCPU 1").
        action: String,
        /// The refusal.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The state is well formed but does not fit this VM or host.
    #[error("the saved state does not fit this VM: {0}")]
    Incompatible(String),
    /// The component was not in a state in which it can save (it must be paused).
    #[error("the VM changed while its state was being saved: {0}")]
    Busy(&'static str),
}

impl StateError {
    /// A refusal by the hypervisor or a device while doing `action`.
    pub fn device(action: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        StateError::Device {
            action: action.into(),
            source: Box::new(source),
        }
    }
}
