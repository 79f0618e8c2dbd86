//! Snapshots of a whole VM: [`save`] pauses it, walks its components into `vm.state` and writes
//! its memory into `memory.pages`; [`restore`] and [`restore_lazy`] build a VM from both.

use crate::error::SnapshotError;
use crate::lazy;
use crate::memory_file::{read_memory, write_memory, MemoryFileRecord, MEMORY_FILE};
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
    // One snapshot at a time in this process (one VM): two into the same directory would share
    // its partial sibling, and a second one of a VM the first has paused would not resume it.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
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
    handle.extensions().phase(xcloud_vmm::extension::PhaseEvent {
        phase: xcloud_vmm::extension::Phase::Snapshot,
        round: 0,
        pages: 0,
        bytes_sent: 0,
    });
    let result = handle
        .save_state()
        .map_err(SnapshotError::from)
        .and_then(|state| write_dir(dir, state, handle));
    if was_running {
        // The VM may have been stopped meanwhile; then there is nothing to resume.
        let _ = handle.resume();
    }
    result
}

/// The files of a snapshot: all a snapshot directory may hold.
const FILES: [&str; 2] = [STATE_FILE, MEMORY_FILE];

/// Whether the process should stop dead at `point` (tests simulate a crash there):
/// `XCLOUD_FAILPOINT=snapshot-before-rename` stops it after both files are written, before the
/// directory takes their place; `snapshot-write-fails` fails the write with an error there.
fn failpoint(point: &str) -> bool {
    std::env::var("XCLOUD_FAILPOINT").is_ok_and(|p| p == point)
}

/// Removes what a snapshot writes in `dir` (only its own files), then `dir` if that leaves it
/// empty.
fn remove_snapshot_dir(dir: &Path) {
    for file in FILES {
        let _ = std::fs::remove_file(dir.join(file));
    }
    let _ = std::fs::remove_dir(dir);
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `state` and the VM's memory as the snapshot directory `dir`, which is complete or
/// untouched whatever happens: both files are written and synced in a hidden sibling
/// directory, which then takes `dir`'s place in one rename (an atomic exchange when `dir`
/// holds an older snapshot, which is removed after). `vm.state` records the memory file it
/// belongs to. A `dir` that holds anything but a snapshot is refused.
fn write_dir(dir: &Path, mut state: StateTree, handle: &VmHandle) -> Result<SnapshotSummary, SnapshotError> {
    let shown = || dir.display().to_string();
    let unusable = |why: String| SnapshotError::Unusable { path: shown(), why };
    let name = dir
        .file_name()
        .ok_or_else(|| unusable("it names no directory".into()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let exists = match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            let entries =
                std::fs::read_dir(dir).map_err(|source| SnapshotError::Directory { path: shown(), source })?;
            for entry in entries.flatten() {
                let file = entry.file_name();
                if !FILES.iter().any(|f| file == *f) {
                    return Err(unusable(format!(
                        "it holds {} besides a snapshot (name a new or empty directory)",
                        file.to_string_lossy()
                    )));
                }
            }
            true
        }
        Ok(_) => return Err(unusable("it exists and is not a directory".into())),
        Err(_) => false,
    };
    std::fs::create_dir_all(&parent).map_err(|source| SnapshotError::Directory {
        path: parent.display().to_string(),
        source,
    })?;
    let partial = parent.join(format!(".{name}.partial"));
    // A crash during an earlier snapshot leaves this behind; it is ours.
    remove_snapshot_dir(&partial);
    std::fs::create_dir(&partial).map_err(|source| SnapshotError::Directory {
        path: partial.display().to_string(),
        source,
    })?;
    let io = |source| xcloud_state::FormatError::Io {
        what: "vm.state",
        source,
    };
    let written = (|| -> Result<SnapshotSummary, SnapshotError> {
        let record = write_memory(&partial.join(MEMORY_FILE), handle.machine().ram())?;
        state.save(0, &record)?;
        let bytes = state.encode()?;
        if failpoint("snapshot-write-fails") {
            return Err(io(std::io::Error::other("failpoint snapshot-write-fails")).into());
        }
        let mut file = std::fs::File::create(partial.join(STATE_FILE)).map_err(io)?;
        std::io::Write::write_all(&mut file, &bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        sync_dir(&partial).map_err(io)?;
        if failpoint("snapshot-before-rename") {
            std::process::abort();
        }
        if exists {
            exchange(&partial, dir).map_err(io)?;
            // `partial` now holds the older snapshot.
            remove_snapshot_dir(&partial);
        } else {
            std::fs::rename(&partial, dir).map_err(io)?;
        }
        sync_dir(&parent).map_err(io)?;
        Ok(SnapshotSummary {
            pages: record.pages,
            bytes: record.bytes + bytes.len() as u64,
        })
    })();
    if written.is_err() {
        remove_snapshot_dir(&partial);
    }
    written
}

/// Swaps two directories in one step (renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are NUL-terminated strings that live across the call; renameat2 only
    // reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads and checks the framing of `dir/vm.state` (version 1 or 2), and that `memory.pages`
/// is the file it was written with (snapshots of format 1 did not record it).
pub fn read_state(dir: &Path) -> Result<StateTree, SnapshotError> {
    let data = read_file(&dir.join(STATE_FILE), "vm.state", MAX_STATE_FILE)?;
    let mut state = StateTree::decode(&data)?;
    if let Some(record) = state.load::<MemoryFileRecord>(0)? {
        record.check(&dir.join(MEMORY_FILE))?;
    }
    Ok(state)
}

/// The machine the saved state needs, built (its RAM still empty).
fn blank_for(state: &StateTree) -> Result<Blank, SnapshotError> {
    // Left in the tree: the VM takes the machine section when it restores.
    let config = state.peek::<MachineConfig>(0)?;
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
