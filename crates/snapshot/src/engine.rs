//! Snapshots of a whole VM: [`save`] pauses it, walks its components into `vm.state` and writes
//! its memory into `memory.pages`; [`restore`] and [`restore_lazy`] build a VM from both.

use crate::error::SnapshotError;
use crate::lazy;
use crate::memory_file::{read_memory, write_memory, MEMORY_FILE};
use std::path::Path;
use std::sync::{Arc, Mutex};
use xcloud_state::format::read_file;
use xcloud_state::StateTree;
use xcloud_vm_core::machine::MachineConfig;
use xcloud_vmm::{Blank, Console, Vm, VmError, VmHandle, VmState};

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// The largest `vm.state` a restore reads.
const MAX_STATE_FILE: u64 = 64 << 20;

/// What a snapshot wrote.
#[derive(Clone, Debug, Default)]
pub struct SnapshotSummary {
    /// Pages written (touched and not all zero).
    pub pages: u64,
    /// Bytes of both files.
    pub bytes: u64,
}

/// Writes a snapshot of the VM into `dir`. A running VM is paused for the snapshot and resumed
/// after it; a paused VM stays paused.
pub fn save(handle: &VmHandle, dir: &Path) -> Result<SnapshotSummary, SnapshotError> {
    handle.wait_for_memory()?;
    let was_running = match handle.state() {
        VmState::Running => true,
        VmState::Paused => false,
        state => {
            return Err(VmError::InvalidTransition {
                action: "snapshot",
                state,
            }
            .into())
        }
    };
    if was_running {
        handle.pause()?;
    }
    let result = handle
        .save_state()
        .map_err(SnapshotError::from)
        .and_then(|state| write_dir(dir, &state, handle));
    if was_running {
        // The VM may have been stopped meanwhile; then there is nothing to resume.
        let _ = handle.resume();
    }
    result
}

/// Writes `state` and the VM's memory into `dir` (created if needed). Files are written under
/// temporary names and renamed, so a failed snapshot never leaves a half-written one behind.
fn write_dir(dir: &Path, state: &StateTree, handle: &VmHandle) -> Result<SnapshotSummary, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Directory {
        path: dir.display().to_string(),
        source,
    })?;
    let io = |source| xcloud_state::FormatError::Io {
        what: "vm.state",
        source,
    };
    let state = state.encode()?;
    let tmp_mem = dir.join(format!("{MEMORY_FILE}.tmp"));
    let (pages, mem_bytes) = write_memory(&tmp_mem, handle.machine().ram())?;
    let tmp_state = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp_state, &state).map_err(io)?;
    std::fs::rename(&tmp_mem, dir.join(MEMORY_FILE)).map_err(io)?;
    std::fs::rename(&tmp_state, dir.join(STATE_FILE)).map_err(io)?;
    Ok(SnapshotSummary {
        pages,
        bytes: mem_bytes + state.len() as u64,
    })
}

/// Reads and checks the framing of `dir/vm.state` (version 1 or 2).
pub fn read_state(dir: &Path) -> Result<StateTree, SnapshotError> {
    let data = read_file(&dir.join(STATE_FILE), "vm.state", MAX_STATE_FILE)?;
    Ok(StateTree::decode(&data)?)
}

/// The machine the saved state needs, built (its RAM still empty).
fn blank_for(state: &StateTree) -> Result<Blank, SnapshotError> {
    // Read from a copy: the VM takes the machine section again when it restores.
    let config = state.clone().require::<MachineConfig>(0)?;
    Ok(Blank::build(config.mem_bytes, config.vcpus)?)
}

/// Rebuilds a VM from the snapshot in `dir`; `start` then continues it where it was.
/// Everything is read and checked before the VM can run; on any error nothing runs.
pub fn restore(dir: &Path, console: Console) -> Result<Vm, SnapshotError> {
    let state = read_state(dir)?;
    let blank = blank_for(&state)?;
    read_memory(&dir.join(MEMORY_FILE), blank.ram())?;
    Ok(Vm::from_state(blank, state, console)?)
}

/// Where a lazy restore's checksum verdict goes: to the VM once it exists, kept until then.
enum CorruptionSlot {
    NoVmYet(Option<String>),
    Vm(VmHandle),
}

/// Like [`restore`], but the guest runs before its memory is read: pages are loaded on first
/// touch (userfaultfd) and streamed in the background (see [`crate::lazy`]).
pub fn restore_lazy(dir: &Path, console: Console) -> Result<Vm, SnapshotError> {
    let state = read_state(dir)?;
    let blank = blank_for(&state)?;
    // The prefetcher may find the pages corrupt before the VM exists (a small snapshot is
    // read in a few milliseconds): the verdict then waits in the slot for the VM.
    let slot: Arc<Mutex<CorruptionSlot>> = Arc::new(Mutex::new(CorruptionSlot::NoVmYet(None)));
    let on_corrupt = {
        let slot = slot.clone();
        Box::new(move |why: String| {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            match &mut *slot {
                CorruptionSlot::Vm(h) => h.fail(why),
                CorruptionSlot::NoVmYet(verdict) => *verdict = Some(why),
            }
        })
    };
    let ram = blank.ram();
    // SAFETY: the blank's RAM is untouched (no guest ran on it) and stays mapped while the VM
    // lives; the VM keeps the loader until its vCPU threads are gone (keep_until_stopped).
    let loader = unsafe { lazy::start(&dir.join(MEMORY_FILE), ram.host_base(), ram.size(), on_corrupt) }?;
    let loaded = loader.loaded_flag();
    let mut vm = Vm::from_state(blank, state, console)?;
    vm.handle().set_memory_arriving(loaded);
    vm.keep_until_stopped(Box::new(loader));
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let CorruptionSlot::NoVmYet(Some(why)) = &*slot {
        vm.handle().fail(why.clone());
    }
    *slot = CorruptionSlot::Vm(vm.handle());
    drop(slot);
    Ok(vm)
}
