//! Platform probes: tiny guests, written as machine code here and started directly in 64-bit
//! mode at CPL0 or CPL3, that measure what a guest costs on this host — a loop at each
//! privilege level and a port-I/O exit from each. `xcloud doctor` reports them; they are the
//! facts that decide how guests must be built (docs/platform.md of the shared notes).

use crate::host::{self, HostError};
use crate::memory::{GuestRam, MemoryError};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuExit, VmFd};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Probe failures.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    /// KVM is not usable here.
    Host(#[from] HostError),
    #[error(transparent)]
    /// The probe guest's RAM cannot be made.
    Memory(#[from] MemoryError),
    #[error("KVM refused to {what}")]
    /// KVM refused to set the probe up.
    Kvm {
        /// What was asked.
        what: &'static str,
        #[source]
        /// KVM's answer.
        source: kvm_ioctls::Error,
    },
    #[error("cannot write the probe guest into its memory")]
    /// The probe code cannot be written into guest RAM.
    Write(#[source] vm_memory::GuestMemoryError),
    #[error("the CPL{cpl} probe guest stopped unexpectedly: {exit}")]
    /// The probe guest stopped in a way it should not.
    Unexpected {
        /// The privilege level it ran at.
        cpl: u8,
        /// How it stopped.
        exit: String,
    },
    #[error("the CPL{cpl} probe guest did not finish within {limit:?}")]
    /// The probe guest did not finish in time.
    Timeout {
        /// The privilege level it ran at.
        cpl: u8,
        /// How long it was given.
        limit: Duration,
    },
}

/// What one probe measured.
#[derive(Clone, Copy, Debug)]
pub struct LevelCosts {
    /// Nanoseconds per iteration of a `dec rcx; jnz` loop.
    pub loop_ns: f64,
    /// Microseconds per `out` to a port the VMM serves (exit to the VMM and back).
    pub port_exit_us: f64,
}

/// Measured costs at both privilege levels.
#[derive(Clone, Copy, Debug)]
pub struct PlatformCosts {
    /// Costs in kernel mode.
    pub cpl0: LevelCosts,
    /// Costs in user mode.
    pub cpl3: LevelCosts,
}

const CODE: u64 = 0x10_0000;
const GDT: u64 = 0x1000;
const PML4: u64 = 0x2000;
const TSS: u64 = 0x5000;
const TSS_LIMIT: u32 = 0x68 + 0x2000;
const PROBE_RAM: u64 = 4 << 20;
const PORT_LOOP_START: u16 = 0x10;
const PORT_LOOP_END: u16 = 0x11;
const PORT_EXIT: u16 = 0x12;
const PORT_DONE: u16 = 0x13;

/// Machine code: `out START; loop N; out END; M x out EXIT; out DONE; jmp $`.
fn probe_code(loop_iters: u64, exits: u64) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0x48, 0xb9]); // mov rcx, imm64
    c.extend_from_slice(&loop_iters.to_le_bytes());
    c.extend_from_slice(&[0xe6, PORT_LOOP_START as u8]); // out imm8, al
    c.extend_from_slice(&[0x48, 0xff, 0xc9, 0x75, 0xfb]); // 1: dec rcx; jnz 1b
    c.extend_from_slice(&[0xe6, PORT_LOOP_END as u8]);
    c.extend_from_slice(&[0x48, 0xb9]);
    c.extend_from_slice(&exits.to_le_bytes());
    c.extend_from_slice(&[0xe6, PORT_EXIT as u8, 0x48, 0xff, 0xc9, 0x75, 0xf9]); // 2: out; dec; jnz 2b
    c.extend_from_slice(&[0xe6, PORT_DONE as u8, 0xeb, 0xfe]);
    c
}

fn setup_memory(ram: &GuestRam, code: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
    let mem = ram.mem();
    // Identity map of the first 1 GiB with 2 MiB user pages.
    mem.write_obj(PML4 + 0x1000 + 7, GuestAddress(PML4))?;
    mem.write_obj(PML4 + 0x2000 + 7, GuestAddress(PML4 + 0x1000))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x87, GuestAddress(PML4 + 0x2000 + i * 8))?;
    }
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + i as u64 * 8))?;
    }
    mem.write_obj(0x68u16, GuestAddress(TSS + 0x66))?;
    mem.write_obj(0xffu8, GuestAddress(TSS + TSS_LIMIT as u64))?;
    mem.write_slice(code, GuestAddress(CODE))
}

fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn run_level(cpl: u8, loop_iters: u64, exits: u64) -> Result<LevelCosts, ProbeError> {
    let kvm = host::open_kvm()?;
    let ram = GuestRam::new(PROBE_RAM)?;
    setup_memory(&ram, &probe_code(loop_iters, exits)).map_err(ProbeError::Write)?;
    let kvm_err = |what| move |source| ProbeError::Kvm { what, source };
    let vm: VmFd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("set the TSS address"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base(),
    };
    // SAFETY: the region is `ram`'s whole mapping, which outlives `vm` (declared before it,
    // dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("register memory"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("read sregs"))?;
    let (cs, ds) = if cpl == 0 {
        (segment(0x08, true, 0), segment(0x10, false, 0))
    } else {
        (segment(0x23, true, 3), segment(0x1b, false, 3))
    };
    crate::boot::set_segments(&mut sregs, cs, ds);
    sregs.tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT,
        selector: 0x28,
        type_: 0xb,
        s: 0,
        dpl: 0,
        l: 0,
        db: 0,
        g: 0,
        ..segment(0x28, false, 0)
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20;
    sregs.cr0 = 0x8005_0033;
    sregs.efer = 0x500;
    vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    let rflags = if cpl == 0 { 0x2 } else { 0x3002 };
    vcpu.set_regs(&kvm_regs {
        rip: CODE,
        rsp: 0x20_0000,
        rflags,
        ..Default::default()
    })
    .map_err(kvm_err("set regs"))?;

    let limit = Duration::from_secs(20);
    let started = Instant::now();
    let (mut loop_start, mut loop_end, mut exits_done) = (None, None, None);
    while exits_done.is_none() {
        if started.elapsed() > limit {
            return Err(ProbeError::Timeout { cpl, limit });
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_LOOP_START, _)) => loop_start = Some(Instant::now()),
            Ok(VcpuExit::IoOut(PORT_LOOP_END, _)) => loop_end = Some(Instant::now()),
            Ok(VcpuExit::IoOut(PORT_EXIT, _)) => {}
            Ok(VcpuExit::IoOut(PORT_DONE, _)) => exits_done = Some(Instant::now()),
            Ok(other) => {
                return Err(ProbeError::Unexpected {
                    cpl,
                    exit: format!("{other:?}"),
                })
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => {
                return Err(ProbeError::Unexpected {
                    cpl,
                    exit: e.to_string(),
                })
            }
        }
    }
    let (Some(a), Some(b), Some(c)) = (loop_start, loop_end, exits_done) else {
        return Err(ProbeError::Unexpected {
            cpl,
            exit: "ports written out of order".into(),
        });
    };
    Ok(LevelCosts {
        loop_ns: (b - a).as_secs_f64() * 1e9 / loop_iters as f64,
        port_exit_us: (c - b).as_secs_f64() * 1e6 / exits as f64,
    })
}

/// Measures loop speed and port-I/O exit cost at CPL0 and CPL3 (about a quarter second).
pub fn measure() -> Result<PlatformCosts, ProbeError> {
    Ok(PlatformCosts {
        cpl0: run_level(0, 20_000, 500)?,
        cpl3: run_level(3, 50_000_000, 500)?,
    })
}

#[cfg(test)]
mod tests {
    use super::probe_code;

    #[test]
    fn probe_code_branches_land_on_their_loops() {
        let c = probe_code(1, 1);
        // The first jnz (at offset 15) jumps back 5 bytes to the dec at offset 12.
        assert_eq!(&c[12..17], &[0x48, 0xff, 0xc9, 0x75, 0xfb]);
        assert_eq!(c.len(), 2 + 8 + 2 + 5 + 2 + 2 + 8 + 7 + 4);
    }
}
