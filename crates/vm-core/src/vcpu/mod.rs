//! vCPUs: creation with the host's CPUID, the boot state, the start of a secondary vCPU, and
//! reading and writing a vCPU's whole architectural state (its saved form is in [`persist`]).
//! The threads that run vCPUs belong to the VMM above; this module only touches a `VcpuFd`.

pub mod persist;

use crate::boot::{self, BootInfo};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, CpuId};
use kvm_ioctls::{VcpuFd, VmFd};
use persist::VcpuState;
use xcloud_state::StateError;

/// A vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up vCPU {index}: {what}")]
pub struct VcpuError {
    /// Which vCPU.
    pub index: usize,
    /// What KVM refused.
    pub what: &'static str,
    /// KVM's answer.
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Registers a parked secondary vCPU starts with (see `Op::StartVcpu`).
#[derive(Clone, Copy)]
pub struct ApStart {
    /// Segments, descriptor tables and control registers (the starting vCPU's).
    pub sregs: kvm_sregs,
    /// Where it starts.
    pub rip: u64,
    /// Its stack.
    pub rsp: u64,
    /// Its first argument.
    pub rdi: u64,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick handler (without SA_RESTART, so KVM_RUN returns EINTR).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

/// Creates vCPU `index` with the host's CPUID, its APIC ID patched in.
pub fn create(vm: &VmFd, index: usize, supported: &CpuId) -> Result<VcpuFd, VcpuError> {
    let err = |what| move |source| VcpuError { index, what, source };
    let fd = vm.create_vcpu(index as u64).map_err(err("create"))?;
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | ((index as u32) << 24),
            0xb | 0x1f => entry.edx = index as u32,
            _ => {}
        }
    }
    fd.set_cpuid2(&cpuid).map_err(err("set CPUID"))?;
    fd.set_fpu(&default_fpu()).map_err(err("set the FPU"))?;
    Ok(fd)
}

/// The FPU state of a processor after reset (x87 control word, SSE control/status).
fn default_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Puts the boot vCPU at the PVH entry.
pub fn set_boot_state(fd: &VcpuFd, info: &BootInfo) -> Result<(), VcpuError> {
    let err = |what| move |source| VcpuError { index: 0, what, source };
    let sregs = fd.get_sregs().map_err(err("read segment registers"))?;
    fd.set_sregs(&boot::boot_sregs(sregs))
        .map_err(err("set segment registers"))?;
    fd.set_regs(&boot::boot_regs(info)).map_err(err("set registers"))?;
    Ok(())
}

/// Makes a parked secondary vCPU runnable at `start`.
pub fn apply_start(fd: &VcpuFd, start: &ApStart) -> Result<(), kvm_ioctls::Error> {
    // With an in-kernel irqchip a secondary vCPU waits for INIT/SIPI until made runnable.
    fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })?;
    fd.set_sregs(&start.sregs)?;
    fd.set_regs(&kvm_regs {
        rip: start.rip,
        rsp: start.rsp,
        rdi: start.rdi,
        rflags: 0x3002,
        ..Default::default()
    })
}

/// The host's TSC frequency from the kernel's view, for KVMs without KVM_GET_TSC_KHZ.
pub fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(1_000_000)
}

/// MSRs this vCPU can read, out of the list KVM reports (some are write-only or absent).
pub fn readable_msrs(fd: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    let mut indices: Vec<u32> = candidates.to_vec();
    // Each failed read stops at the first unreadable MSR; drop it and try the rest.
    for _ in 0..candidates.len() {
        match read_msrs(fd, &indices) {
            Ok(entries) if entries.len() == indices.len() => return indices,
            Ok(entries) => {
                indices.remove(entries.len());
            }
            Err(_) => return Vec::new(),
        }
    }
    indices
}

fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_bindings::kvm_msr_entry>, String> {
    let entries: Vec<kvm_bindings::kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|e| format!("{e:?}"))?;
    let read = fd.get_msrs(&mut msrs).map_err(|e| e.to_string())?;
    Ok(msrs.as_slice()[..read].to_vec())
}

/// Lets KVM finish an exit the VMM already served (a port read's data, the instruction pointer
/// past a port write) without running guest code, so that the saved state is consistent: an
/// `in` or `out` is never executed twice after a restore.
pub fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), String> {
    run_without_guest(fd).map_err(|e| format!("cannot complete the pending exit: {e}"))
}

/// Enters KVM_RUN with immediate exit: KVM does its entry work (completing a served exit, the
/// first run's setup) and returns without running guest code.
pub fn run_without_guest(fd: &mut VcpuFd) -> Result<(), String> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(()) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Reads the vCPU's whole state (the thread that owns the vCPU calls this while it is paused).
pub fn save_state(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let msrs = read_msrs(fd, msr_indices)?;
    if msrs.len() != msr_indices.len() {
        return Err(format!("read {} of {} MSRs", msrs.len(), msr_indices.len()));
    }
    Ok(VcpuState {
        regs: fd.get_regs().map_err(e("registers"))?,
        sregs: fd.get_sregs().map_err(e("segment registers"))?,
        xsave: fd.get_xsave().map_err(e("XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(e("XCRs"))?,
        lapic: fd.get_lapic().map_err(e("LAPIC"))?,
        events: fd.get_vcpu_events().map_err(e("events"))?,
        mp_state: fd.get_mp_state().map_err(e("MP state"))?,
        msrs,
    })
}

/// Puts a saved state into a fresh vCPU (before its thread starts).
pub fn restore_state(index: usize, fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let err =
        |what: &'static str| move |source| StateError::device(format!("restore the {what} of vCPU {index}"), source);
    fd.set_sregs(&s.sregs).map_err(err("segment registers"))?;
    fd.set_regs(&s.regs).map_err(err("registers"))?;
    // SAFETY: `s.xsave` is a complete 4 KiB legacy XSAVE area read from KVM by save_state (or
    // decoded to exactly that size); no extended (XSAVE2) area follows it.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(err("XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(err("XCRs"))?;
    let msrs =
        kvm_bindings::Msrs::from_entries(&s.msrs).map_err(|_| err("MSRs")(kvm_ioctls::Error::new(libc::E2BIG)))?;
    let written = fd.set_msrs(&msrs).map_err(err("MSRs"))?;
    if written != s.msrs.len() {
        return Err(StateError::Incompatible(format!(
            "vCPU {index}: this host accepts only {written} of the {} saved MSRs (first refused: {:#x})",
            s.msrs.len(),
            s.msrs[written].index
        )));
    }
    fd.set_lapic(&s.lapic).map_err(err("LAPIC"))?;
    fd.set_vcpu_events(&s.events).map_err(err("events"))?;
    fd.set_mp_state(s.mp_state).map_err(err("MP state"))?;
    Ok(())
}
