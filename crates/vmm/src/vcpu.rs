//! vCPUs: creation, boot state, the run loop of each vCPU thread, and the exits it serves.

use crate::boot::{self, BootInfo};
use crate::devices::serial::{COM1_BASE, COM1_PORTS};
use crate::hypercall::{self, Outcome};
use crate::vm::{Gate, Shared, VmError, VmExit};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::sync::Arc;
use xcloud_abi::{ABI_VERSION, HYPERCALL_PORT, PROBE_MAGIC};

/// Registers a parked secondary vCPU starts with (see `Op::StartVcpu`).
#[derive(Clone, Copy)]
pub(crate) struct ApStart {
    pub sregs: kvm_sregs,
    pub rip: u64,
    pub rsp: u64,
    pub rdi: u64,
}

/// The POST-code port that firmware and kernels write progress to; silently ignored.
const POST_PORT: u16 = 0x80;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick handler (without SA_RESTART, so KVM_RUN returns EINTR).
pub(crate) fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

/// Creates vCPU `index` with the host's CPUID, its APIC ID patched in.
pub(crate) fn create(vm: &VmFd, index: usize, supported: &CpuId) -> Result<VcpuFd, VmError> {
    let err = |what| move |source| VmError::Vcpu { index, what, source };
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
pub(crate) fn set_boot_state(fd: &VcpuFd, info: &BootInfo) -> Result<(), VmError> {
    let err = |what| move |source| VmError::Vcpu { index: 0, what, source };
    let sregs = fd.get_sregs().map_err(err("read segment registers"))?;
    fd.set_sregs(&boot::boot_sregs(sregs))
        .map_err(err("set segment registers"))?;
    fd.set_regs(&boot::boot_regs(info)).map_err(err("set registers"))?;
    Ok(())
}

fn apply_start(fd: &VcpuFd, start: &ApStart) -> Result<(), kvm_ioctls::Error> {
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
pub(crate) fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(1_000_000)
}

/// An exit whose data was copied out of `kvm_run`, so the vCPU fd is free again.
enum Pending {
    None,
    Hypercall(u64),
    Serial(u16, u8),
    End(VmExit),
    Halted,
}

/// The body of vCPU thread `index`.
pub(crate) fn run(index: usize, mut fd: VcpuFd, shared: Arc<Shared>) {
    let mut sleep_until: Option<std::time::Instant> = None;
    loop {
        match shared.gate(index) {
            Gate::Stop => break,
            Gate::Save => {
                let state = complete_pending_io(&mut fd).and_then(|_| save_state(&fd, &shared.msr_indices));
                // A saved vCPU continues from its saved state: an interrupted sleep ends.
                sleep_until = None;
                shared.saved(index, state);
                continue;
            }
            Gate::Start(start) => {
                if let Err(e) = apply_start(&fd, &start) {
                    shared.finish(VmExit::Failed(format!("cannot start vCPU {index}: {e}")));
                }
                continue;
            }
            Gate::Run => {}
        }
        if let Some(deadline) = sleep_until {
            if !shared.sleep_until(deadline) {
                continue;
            }
            sleep_until = None;
        }
        let pending = match fd.run() {
            Ok(exit) => classify(index, exit, &shared),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Pending::None,
            Err(e) => Pending::End(VmExit::Failed(format!("KVM_RUN on vCPU {index} failed: {e}"))),
        };
        match pending {
            Pending::None => {}
            Pending::Serial(port, value) => shared
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(port, value),
            Pending::Hypercall(gpa) => match hypercall::handle(index, &fd, &shared, gpa) {
                Outcome::Continue => {}
                Outcome::Sleep(deadline) => sleep_until = Some(deadline),
                Outcome::End(exit) => shared.finish(exit),
                Outcome::Halt => shared.halt(index),
            },
            Pending::Halted => shared.halt(index),
            Pending::End(exit) => {
                let exit = match exit {
                    VmExit::Crashed { vcpu, reason, .. } => VmExit::Crashed {
                        vcpu,
                        reason,
                        rip: fd.get_regs().map(|r| r.rip).unwrap_or(0),
                    },
                    other => other,
                };
                shared.finish(exit);
            }
        }
    }
    shared.exited(index);
}

/// Serves what can be served while `kvm_run` is borrowed (port reads) and copies the rest out.
fn classify(index: usize, exit: VcpuExit<'_>, shared: &Shared) -> Pending {
    let crash = |reason: String| {
        Pending::End(VmExit::Crashed {
            vcpu: index,
            reason,
            rip: 0,
        })
    };
    match exit {
        VcpuExit::IoOut(port, data) => {
            if port == HYPERCALL_PORT && data.len() == 4 {
                return Pending::Hypercall(u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as u64);
            }
            if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port) && data.len() == 1 {
                return Pending::Serial(port, data[0]);
            }
            if port != POST_PORT {
                shared.guest_noise(format_args!(
                    "vCPU {index} wrote {} bytes to port {port:#x}",
                    data.len()
                ));
            }
            Pending::None
        }
        VcpuExit::IoIn(port, data) => {
            if port == HYPERCALL_PORT && data.len() == 4 {
                data.copy_from_slice(&(PROBE_MAGIC | ABI_VERSION).to_le_bytes());
            } else if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port) && data.len() == 1 {
                data[0] = shared.serial.lock().unwrap_or_else(|p| p.into_inner()).read(port);
            } else {
                data.fill(0xff);
                shared.guest_noise(format_args!(
                    "vCPU {index} read {} bytes from port {port:#x}",
                    data.len()
                ));
            }
            Pending::None
        }
        VcpuExit::MmioRead(addr, data) => {
            data.fill(0xff);
            shared.guest_noise(format_args!("vCPU {index} read MMIO {addr:#x}"));
            Pending::None
        }
        VcpuExit::MmioWrite(addr, _) => {
            shared.guest_noise(format_args!("vCPU {index} wrote MMIO {addr:#x}"));
            Pending::None
        }
        VcpuExit::Hlt => {
            tracing::info!("vCPU {index} halted with interrupts off; it stays halted");
            Pending::Halted
        }
        VcpuExit::Shutdown => crash("triple-faulted (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::FailEntry(reason, cpu) => crash(format!(
            "could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
        )),
        VcpuExit::InternalError => crash("hit a KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into()),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Pending::End(VmExit::Exited(0)),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => crash("requested a reset".into()),
            other => crash(format!("raised system event {other}")),
        },
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => Pending::None,
        other => crash(format!("stopped with an unexpected exit {other:?}")),
    }
}

/// MSRs this vCPU can read, out of the list KVM reports (some are write-only or absent).
pub(crate) fn readable_msrs(fd: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
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
fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), String> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(()) => Ok(()),
        Err(e) => Err(format!("cannot complete the pending exit: {e}")),
    }
}

/// Reads the vCPU's whole state (the thread that owns the vCPU calls this while it is paused).
pub(crate) fn save_state(fd: &VcpuFd, msr_indices: &[u32]) -> Result<crate::snapshot::VcpuState, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let msrs = read_msrs(fd, msr_indices)?;
    if msrs.len() != msr_indices.len() {
        return Err(format!("read {} of {} MSRs", msrs.len(), msr_indices.len()));
    }
    Ok(crate::snapshot::VcpuState {
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
pub(crate) fn restore_state(
    index: usize,
    fd: &VcpuFd,
    s: &crate::snapshot::VcpuState,
) -> Result<(), crate::snapshot::SnapshotError> {
    use crate::snapshot::SnapshotError;
    let err = |what| move |source| SnapshotError::RestoreVcpu { index, what, source };
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
        return Err(SnapshotError::Incompatible(format!(
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
