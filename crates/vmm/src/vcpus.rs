//! The VM's vCPUs as one component: pausing them (a kick out of `KVM_RUN` until every thread
//! acknowledges), saving each one's state (its own thread reads it, through the gate), and
//! restoring them into the vCPUs before their threads start. The saved form of one vCPU is
//! `xcloud_vm_core::vcpu::persist`.
//!
//! Pause sets the request and kicks vCPU threads out of `KVM_RUN` with a real-time signal (no
//! `SA_RESTART`, so `KVM_RUN` returns `EINTR`) every millisecond until none is `Running` — the
//! retry closes the race of a signal that lands just before `KVM_RUN`. A vCPU sleeping in a
//! hypercall acknowledges pause in the VMM.

use crate::lifecycle::{kick, Activity, ControlBlock, Request};
use kvm_ioctls::VcpuFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use xcloud_state::{Component, StateError, StateTree};
use xcloud_vm_core::vcpu::persist::{VcpuActivity, VcpuSnapshot};
use xcloud_vm_core::vcpu::{self};

/// All vCPUs of a VM.
pub(crate) struct VcpuSet {
    control: Arc<ControlBlock>,
    /// The vCPUs until their threads start (a restore writes into them first).
    unstarted: Mutex<Vec<VcpuFd>>,
}

impl VcpuSet {
    pub fn new(control: Arc<ControlBlock>, vcpus: Vec<VcpuFd>) -> Self {
        Self {
            control,
            unstarted: Mutex::new(vcpus),
        }
    }

    /// The vCPUs, for their threads (empty once taken).
    pub fn take_unstarted(&self) -> Vec<VcpuFd> {
        std::mem::take(&mut *self.unstarted.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs `f` on the boot vCPU before it starts.
    pub fn with_unstarted<T>(&self, f: impl FnOnce(&[VcpuFd]) -> T) -> T {
        f(&self.unstarted.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn saved_activity(a: Activity) -> VcpuActivity {
    match a {
        Activity::Parked => VcpuActivity::Parked,
        Activity::Halted => VcpuActivity::Halted,
        Activity::Running | Activity::Paused | Activity::Exited => VcpuActivity::Runnable,
    }
}

impl Component for VcpuSet {
    fn name(&self) -> &'static str {
        "vcpus"
    }

    /// Returns once no vCPU runs guest code; fails if the VM stops meanwhile.
    fn pause(&self) -> Result<(), StateError> {
        let control = &self.control;
        let mut c = control.lock();
        if c.request == Request::Stop {
            return Err(StateError::Busy("the VM stopped"));
        }
        c.request = Request::Pause;
        control.changed.notify_all();
        while c.request == Request::Pause && c.vcpus.contains(&Activity::Running) {
            kick(&c);
            c = control.wait(c, Some(Duration::from_millis(1)));
        }
        if c.request == Request::Stop {
            return Err(StateError::Busy("the VM stopped"));
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), StateError> {
        let mut c = self.control.lock();
        if c.request == Request::Pause {
            c.request = Request::Run;
            self.control.changed.notify_all();
        }
        Ok(())
    }

    /// Each paused vCPU's thread saves its own vCPU (after completing any pending port exit).
    fn save(&self, into: &mut StateTree) -> Result<(), StateError> {
        let control = &self.control;
        let mut c = control.lock();
        // A secondary vCPU whose start is still pending is not paused yet: wait for it.
        while c.starts.iter().any(Option::is_some) && c.request == Request::Pause {
            c = control.wait(c, Some(Duration::from_millis(1)));
        }
        let needs_state: Vec<bool> = c
            .vcpus
            .iter()
            .map(|a| matches!(a, Activity::Paused | Activity::Halted))
            .collect();
        for (i, &needed) in needs_state.iter().enumerate() {
            c.save_requested[i] = needed;
            c.saved[i] = None;
        }
        control.changed.notify_all();
        while needs_state
            .iter()
            .zip(&c.saved)
            .any(|(&needed, saved)| needed && saved.is_none())
        {
            if c.request != Request::Pause {
                return Err(StateError::Busy("the VM stopped while its vCPUs were saved"));
            }
            c = control.wait(c, None);
        }
        let activities = c.vcpus.clone();
        for (index, activity) in activities.into_iter().enumerate() {
            let state = match c.saved[index].take() {
                Some(Ok(state)) => Some(Box::new(state)),
                Some(Err(what)) => {
                    return Err(StateError::device(
                        format!("read the state of vCPU {index}"),
                        std::io::Error::other(what),
                    ))
                }
                None => None,
            };
            let saved = VcpuSnapshot {
                index: index as u32,
                activity: saved_activity(activity),
                state,
            };
            into.save(index as u32, &saved)?;
        }
        Ok(())
    }

    /// Puts each saved vCPU into its (not yet started) vCPU.
    fn restore(&self, from: &mut StateTree) -> Result<(), StateError> {
        let fds = self.unstarted.lock().unwrap_or_else(|p| p.into_inner());
        let mut activities = Vec::with_capacity(fds.len());
        for (index, fd) in fds.iter().enumerate() {
            let saved = from.require::<VcpuSnapshot>(index as u32)?;
            if saved.index as usize != index {
                return Err(StateError::Incompatible(format!(
                    "vCPU {} saved where vCPU {index} belongs",
                    saved.index
                )));
            }
            if let Some(state) = &saved.state {
                vcpu::restore_state(index, fd, state)?;
            }
            activities.push(match saved.activity {
                VcpuActivity::Parked => Activity::Parked,
                VcpuActivity::Runnable => Activity::Paused,
                VcpuActivity::Halted => Activity::Halted,
            });
        }
        // A vCPU that never started waits for another to start it, a halted one for nothing:
        // without a runnable vCPU the guest would never run again and nothing would end it.
        if !activities.contains(&Activity::Paused) {
            return Err(StateError::Incompatible(format!(
                "none of its {} vCPUs can run (each is parked or halted): the guest could never continue",
                activities.len()
            )));
        }
        self.control.lock().vcpus = activities;
        Ok(())
    }
}
