//! Fencing a protected VM (docs/replication.md, split brain): who may run it is decided by a
//! store that both hosts reach (the control plane's etcd), not by either host's view of the
//! link between them. The backup takes over, and the primary gives its backup up, only through
//! the fence; whoever loses stops. This crate knows the rule, not the store: the store's side
//! is the caller's ([`Fence`] is implemented over etcd by `xcloud_control::fence`).

/// A fence could not be asked (unreachable, or in a state this host may not change).
#[derive(Debug, thiserror::Error)]
#[error("fence {key}: {detail}")]
pub struct FenceError {
    /// The fence's key.
    pub key: String,
    /// What went wrong.
    pub detail: String,
}

/// The fence of one protected VM. Each protection holds a new generation of it; the backup may
/// take over only the generation its primary announced, the primary keeps the VM only while
/// that generation is still its own.
pub trait Fence: Send + Sync {
    /// Which fence this is (the key in the store): both ends of a protection must name the same.
    fn key(&self) -> &str;

    /// The primary, at `protect`: holds a new generation of the fence and returns it, for the
    /// backup. Fails if the fence is held by anything but this process.
    fn claim_primary(&self) -> Result<u64, FenceError>;

    /// The backup, once the primary is taken for gone: takes the VM over if `generation` is
    /// still the fence's. `Ok(false)`: the primary kept it (it gave its backup up first).
    fn take_over(&self, generation: u64) -> Result<bool, FenceError>;

    /// The primary, when protection ends while the VM runs (its backup lost, or let go): keeps
    /// the VM alone if this process still holds the fence. `Ok(false)`: the backup took it over,
    /// and this VM must never be seen again.
    fn keep(&self) -> Result<bool, FenceError>;

    /// The VM ended here: frees the fence if this process holds it. `Ok(false)`: the backup
    /// had taken it over (and runs the VM).
    fn release(&self) -> Result<bool, FenceError>;
}
