//! `xcloud doctor`: what virtualization this host offers, the KVM capabilities xcloud uses,
//! which guest kinds can run here and why, and the measured costs that decide it.

use anyhow::Result;
use xcloud_vm_core::host::{self, Virtualization, REQUIRED_CAPS, USEFUL_CAPS};
use xcloud_vm_core::probe;

/// Prints the report; returns 0 when xcloud can run guests here, 1 otherwise.
pub fn doctor() -> Result<i32> {
    let virt = host::detect_virtualization();
    println!("virtualization: {virt}");
    let kvm = match host::open_kvm() {
        Ok(kvm) => kvm,
        Err(e) => {
            println!("KVM: unusable: {e}");
            println!("guests: none can run here until KVM is usable");
            return Ok(1);
        }
    };
    println!(
        "KVM: {} (API version {})",
        host::kvm_device_path(),
        kvm.get_api_version()
    );
    for (cap, name) in REQUIRED_CAPS {
        println!(
            "  {:<36} {:<4} required",
            name,
            if kvm.check_extension(*cap) { "yes" } else { "NO" }
        );
    }
    for (cap, name, why) in USEFUL_CAPS {
        let have = kvm.check_extension_raw(*cap as libc::c_ulong) > 0;
        println!("  {:<36} {:<4} {}", name, if have { "yes" } else { "no" }, why);
    }
    println!("  max vCPUs per VM: {}", kvm.get_max_vcpus());
    match xcloud_vm_core::memory::uffd::userfaultfd_works() {
        Ok(()) => println!("  userfaultfd                          yes  lazy restore and post-copy migration"),
        Err(e) => {
            println!("  userfaultfd                          NO   lazy restore and post-copy cannot work here: {e}")
        }
    }

    println!("measured (tiny probe guests, 64-bit mode):");
    let costs = match probe::measure() {
        Ok(c) => c,
        Err(e) => {
            println!("  probe failed: {e}");
            return Ok(1);
        }
    };
    let cpl0_penalty = costs.cpl0.loop_ns / costs.cpl3.loop_ns.max(1e-3);
    println!("  CPL3 (user mode) loop:   {:>10.3} ns/iteration", costs.cpl3.loop_ns);
    println!(
        "  CPL0 (kernel mode) loop: {:>10.3} ns/iteration ({cpl0_penalty:.0}x CPL3)",
        costs.cpl0.loop_ns
    );
    println!("  port-I/O exit from CPL3: {:>10.1} us", costs.cpl3.port_exit_us);
    println!("  port-I/O exit from CPL0: {:>10.1} us", costs.cpl0.port_exit_us);

    // A kernel-mode loop far slower than user mode means kernel mode is emulated.
    let kernel_mode_emulated = cpl0_penalty > 20.0;
    println!("guests:");
    println!("  xcloud SDK unikernels (PVH, CPL3 after a short boot stub): yes, at native speed in user mode");
    if kernel_mode_emulated {
        println!("  other PVH ELF guests: boot, but their kernel-mode code runs {cpl0_penalty:.0}x slower (emulated)");
        println!(
            "  Linux guests: no: kernel mode is emulated here ({cpl0_penalty:.0}x slower) and a stock kernel's user processes die on their first system call{}",
            if virt == Virtualization::Pvm { " under PVM" } else { "" }
        );
    } else {
        println!("  other PVH ELF guests: yes, kernel mode runs at hardware speed");
        println!(
            "  Linux guests: {}",
            if virt.runs_linux_guests() {
                "the host can run them (hardware virtualization); this xcloud version boots PVH guests only"
            } else {
                "kernel mode is fast here, but the virtualization kind is unknown; this xcloud version boots PVH guests only"
            }
        );
    }
    Ok(0)
}
