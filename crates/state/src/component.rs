//! The interface every stateful part of a VM implements.

use crate::error::StateError;
use crate::tree::StateTree;

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
