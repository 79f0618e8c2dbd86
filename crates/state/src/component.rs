//! The interface every stateful part of a VM implements.

use crate::format::FormatError;
use crate::tree::StateTree;

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

/// A stateful part of a VM: the vCPUs, the irqchip, the clock, guest memory, each device.
///
/// The VM walks its components in a fixed order: pause (vCPUs first, so that no guest code
/// feeds a device that is pausing), save, restore, and resume in the reverse order. A
/// component is shared between the VM and its users, so the methods take `&self` and the
/// component guards its own state.
pub trait Component: Send + Sync {
    /// A short name for logs and errors ("vcpus", "serial").
    fn name(&self) -> &'static str;

    /// Stops the component's own activity (a device's worker threads, a vCPU's guest code).
    /// A component with no activity of its own has nothing to do.
    fn pause(&self) -> Result<(), StateError> {
        Ok(())
    }

    /// Lets it go on after [`Component::pause`].
    fn resume(&self) -> Result<(), StateError> {
        Ok(())
    }

    /// Writes its state (while paused) into `into`, as one or more sections of its kinds.
    fn save(&self, into: &mut StateTree) -> Result<(), StateError>;

    /// Takes its sections out of `from` and continues from them. Called before the VM first
    /// runs; a section it needs that is missing is an error, unless an older format did not
    /// have it and the component's fresh state is the right one then.
    fn restore(&self, from: &mut StateTree) -> Result<(), StateError>;
}

/// A component's saved state: how it is written into a section and read back.
///
/// `decode` must read every `version` from 1 to `VERSION` (a snapshot made by an older
/// xcloud) and refuse the rest with a clear error; it sees untrusted bytes and must never
/// panic.
pub trait Persist: Sized {
    /// The section kind ("vcpu", "irqchip", "serial"): at most 32 ASCII bytes.
    const KIND: &'static str;
    /// The version of the body layout that `encode` writes.
    const VERSION: u32;

    /// The section body.
    fn encode(&self) -> Vec<u8>;

    /// Reads a body written with layout `version`.
    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError>;
}

/// The error a [`Persist::decode`] returns for a layout version it does not know.
pub fn unknown_version<T: Persist>(version: u32) -> FormatError {
    FormatError::Version {
        what: T::KIND,
        found: version,
        supported: T::VERSION,
    }
}
