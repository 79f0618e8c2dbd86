//! The KVM VM and its guest RAM: what every other part of a VM hangs off.
//!
//! [`Machine::build`] opens KVM, creates the VM with its in-kernel irqchip, the memfd-backed
//! RAM registered as slot 0 and the vCPUs (not started). The machine also keeps the dirty log
//! of guest RAM for the engines that copy memory while the guest runs (migration, later
//! replication): KVM's log of guest writes plus the VMM's record of its own writes.

use crate::host::{self, HostError};
use crate::memory::{self, GuestRam, MemoryError, PAGE_BYTES};
use crate::vcpu::{self, VcpuError};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::sync::{Mutex, MutexGuard};
use xcloud_state::{Fields, FormatError, Persist};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: usize = 64;

/// Why a machine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// KVM is not usable here.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Guest RAM could not be made.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A vCPU count out of range.
    #[error("a VM needs 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(usize),
    /// KVM refused a VM-wide setting.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was asked.
        what: &'static str,
        /// KVM's answer.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU could not be created.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// The KVM VM, its guest RAM and what the vCPUs need to know of the host.
pub struct Machine {
    // Declared before `ram` so the VM (and its memory slot) goes before the mapping does.
    vm_fd: VmFd,
    ram: GuestRam,
    _kvm: Kvm,
    vcpu_count: usize,
    tsc_khz: u64,
    msr_indices: Vec<u32>,
    /// While dirty logging is on: the pages the VMM itself wrote (hypercall results), which
    /// KVM's dirty log does not see.
    vmm_writes: Mutex<Option<Vec<u64>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Machine {
    /// Builds a VM of `mem_bytes` of RAM and `vcpu_count` vCPUs (returned, not started).
    pub fn build(mem_bytes: u64, vcpu_count: usize) -> Result<(Self, Vec<VcpuFd>), MachineError> {
        if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
            return Err(MachineError::VcpuCount(vcpu_count));
        }
        let kvm_err = |what| move |source| MachineError::Kvm { what, source };
        let kvm = host::open_kvm()?;
        let ram = GuestRam::new(mem_bytes)?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        // KVM on Intel needs a TSS area for real-mode emulation; place it in the 32-bit hole.
        vm_fd
            .set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set the TSS address"))?;
        let region = slot0(&ram, 0);
        // SAFETY: the region is the whole mmap of `ram`; the Machine keeps `ram` alive and drops
        // the VM fd (declared first) before it.
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report supported CPUID"))?;
        let mut vcpus = Vec::with_capacity(vcpu_count);
        for index in 0..vcpu_count {
            vcpus.push(vcpu::create(&vm_fd, index, &cpuid)?);
        }
        let tsc_khz = vcpus[0]
            .get_tsc_khz()
            .map(u64::from)
            .unwrap_or_else(|_| vcpu::host_tsc_khz());
        let candidates = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let msr_indices = vcpu::readable_msrs(&vcpus[0], &candidates);
        let machine = Self {
            vm_fd,
            ram,
            _kvm: kvm,
            vcpu_count,
            tsc_khz,
            msr_indices,
            vmm_writes: Mutex::new(None),
        };
        Ok((machine, vcpus))
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpu_count
    }

    /// The guest TSC's frequency.
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// The MSRs a vCPU's saved state holds (those the vCPUs can read).
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// Records that the VMM wrote guest RAM at `gpa`, for the dirty log (while it is on).
    pub fn note_vmm_write(&self, gpa: u64) {
        if let Some(pages) = lock(&self.vmm_writes).as_mut() {
            pages.push(gpa / PAGE_BYTES);
        }
    }

    /// Records that the VMM (a device) wrote `len` bytes of guest RAM at `gpa`.
    pub fn note_vmm_write_range(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(pages) = lock(&self.vmm_writes).as_mut() {
            let last = gpa.saturating_add(len - 1) / PAGE_BYTES;
            pages.extend(gpa / PAGE_BYTES..=last);
        }
    }

    /// Turns KVM dirty-page logging of guest RAM on or off, and the VMM's record of its own
    /// writes with it.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), kvm_ioctls::Error> {
        *lock(&self.vmm_writes) = on.then(Vec::new);
        let flags = if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        // SAFETY: the same slot, address and size as registered at build time (the mapping is
        // alive as long as `self`); only the logging flag changes.
        unsafe { self.vm_fd.set_user_memory_region(slot0(&self.ram, flags)) }
    }

    /// The pages written since the last fetch (KVM clears its log as it hands it over), the
    /// guest's and the VMM's own, in order and each once.
    pub fn fetch_dirty_pages(&self) -> Result<Vec<u64>, kvm_ioctls::Error> {
        // The VMM's record first: a write between the two reads then shows up in the next fetch.
        let mut by_vmm = lock(&self.vmm_writes).as_mut().map(std::mem::take).unwrap_or_default();
        let bitmap = self.vm_fd.get_dirty_log(0, self.ram.size() as usize)?;
        let mut pages = dirty_pages(&bitmap);
        if !by_vmm.is_empty() {
            let limit = self.ram.size() / PAGE_BYTES;
            by_vmm.retain(|&pfn| pfn < limit);
            pages.append(&mut by_vmm);
            pages.sort_unstable();
            pages.dedup();
        }
        Ok(pages)
    }
}

fn slot0(ram: &GuestRam, flags: u32) -> kvm_bindings::kvm_userspace_memory_region {
    kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base(),
    }
}

/// The pages set in a KVM dirty bitmap.
fn dirty_pages(bitmap: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            pages.push(w as u64 * 64 + b);
            bits &= bits - 1;
        }
    }
    pages
}

/// The VM's shape, the first section of its saved state (kind `machine`): what a restore must
/// build before any component can take its state.
///
/// Layout version 1: mem_bytes u64, vcpus u32, tsc_khz u64, cmdline (u32 length + bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// Bytes of guest RAM.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// The guest TSC's frequency where it was saved.
    pub tsc_khz: u64,
    /// The guest's command line.
    pub cmdline: String,
}

impl Persist for MachineConfig {
    const KIND: &'static str = "machine";
    const VERSION: u32 = 1;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.mem_bytes.to_le_bytes());
        out.extend_from_slice(&(self.vcpus as u32).to_le_bytes());
        out.extend_from_slice(&self.tsc_khz.to_le_bytes());
        xcloud_state::format::put_blob(&mut out, self.cmdline.as_bytes());
        out
    }

    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError> {
        if version != 1 {
            return Err(xcloud_state::persist::unknown_version::<Self>(version));
        }
        let malformed = |detail: String| FormatError::Malformed {
            what: "machine",
            detail,
        };
        let mut f = Fields::new(body, "machine");
        let mem_bytes = f.u64()?;
        let vcpus = f.u32()? as usize;
        let tsc_khz = f.u64()?;
        let cmdline = String::from_utf8(f.blob(xcloud_abi::layout::CMDLINE_MAX)?.to_vec())
            .map_err(|_| malformed("the command line is not UTF-8".into()))?;
        f.finish()?;
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(malformed(format!("{vcpus} vCPUs")));
        }
        memory::validate_size(mem_bytes, 0).map_err(|e| malformed(e.to_string()))?;
        Ok(Self {
            mem_bytes,
            vcpus,
            tsc_khz,
            cmdline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_config_round_trips_and_bad_shapes_are_refused() {
        let config = MachineConfig {
            mem_bytes: 64 << 20,
            vcpus: 2,
            tsc_khz: 2_600_000,
            cmdline: "a b".into(),
        };
        assert_eq!(MachineConfig::decode(1, &config.encode()).expect("decode"), config);
        for bad in [
            MachineConfig {
                vcpus: 0,
                ..config.clone()
            },
            MachineConfig {
                vcpus: MAX_VCPUS + 1,
                ..config.clone()
            },
            MachineConfig {
                mem_bytes: 1 << 20,
                ..config.clone()
            },
        ] {
            assert!(MachineConfig::decode(1, &bad.encode()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dirty_bitmaps_become_page_numbers() {
        assert_eq!(dirty_pages(&[0b1001, 0, 1 << 63]), [0, 3, 191]);
        assert!(dirty_pages(&[0, 0]).is_empty());
    }
}
