//! Entry points for the fuzz targets (fuzz/) and the robustness tests: the parsers of
//! untrusted input, driven with arbitrary bytes against real KVM objects.

use crate::context::VcpuContext;
use crate::error::VmError;
use crate::hypercall;
use crate::lifecycle::Request;
use crate::vcpus::VcpuSet;
use crate::vm::{Vm, VmConfig};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};
use xcloud_devices::console::Console;
use xcloud_state::{FormatError, Persist, StateTree};
use xcloud_vm_core::boot::{self, BootInfo};
use xcloud_vm_core::memory::GuestRam;

/// Loads `image` as a PVH ELF into fresh guest RAM of `mem_bytes`.
pub fn load_image(image: &[u8], mem_bytes: u64) -> Result<BootInfo, VmError> {
    let ram = GuestRam::new(mem_bytes)?;
    Ok(boot::load_pvh(ram.mem(), ram.size(), image, "fuzz")?)
}

/// Decodes `vm.state` bytes and every section of the kinds this VMM knows, as a restore
/// would before any of it reaches KVM: how many sections decoded.
pub fn decode_state(data: &[u8]) -> Result<usize, xcloud_state::StateError> {
    use xcloud_devices::serial::persist::SerialState;
    use xcloud_devices::virtio::persist::{BlockState, NetState};
    use xcloud_vm_core::clock::ClockState;
    use xcloud_vm_core::irqchip::IrqchipState;
    use xcloud_vm_core::machine::MachineConfig;
    use xcloud_vm_core::memory::persist::RamLayout;
    use xcloud_vm_core::vcpu::persist::VcpuSnapshot;
    fn check<T: Persist>(version: u32, body: &[u8]) -> Result<(), FormatError> {
        T::decode(version, body).map(|_| ())
    }
    let tree = StateTree::decode(data)?;
    for s in tree.sections() {
        let decoded = match s.kind.as_str() {
            "machine" => check::<MachineConfig>(s.version, &s.body),
            "vcpu" => check::<VcpuSnapshot>(s.version, &s.body),
            "irqchip" => check::<IrqchipState>(s.version, &s.body),
            "clock" => check::<ClockState>(s.version, &s.body),
            "memory" => check::<RamLayout>(s.version, &s.body),
            "serial" => check::<SerialState>(s.version, &s.body),
            "virtio-blk" => check::<BlockState>(s.version, &s.body),
            "virtio-net" => check::<NetState>(s.version, &s.body),
            "extension" => check::<crate::extension::ModuleState>(s.version, &s.body),
            _ => Ok(()),
        };
        decoded.map_err(|source| xcloud_state::StateError::Section {
            kind: s.kind.clone(),
            instance: s.instance,
            source,
        })?;
    }
    Ok(tree.sections().len())
}

/// A VM that is built but never started, whose boot vCPU serves hypercalls from blocks that
/// the caller writes into guest memory.
pub struct HypercallHarness {
    vm: Vm,
    ctx: Arc<VcpuContext>,
    vcpus: Arc<VcpuSet>,
}

impl HypercallHarness {
    /// A 4 MiB, 2-vCPU VM. Its control state is "stopping", so `Sleep` returns at once.
    pub fn new() -> Result<Self, VmError> {
        let image = boot::minimal_elf(0x10_0000, &[0xf4], true);
        let config = VmConfig {
            mem_bytes: 4 << 20,
            vcpus: 2,
            cmdline: String::new(),
            disks: Vec::new(),
            nets: Vec::new(),
        };
        let vm = Vm::new(&config, &image, Console::new(Box::new(std::io::sink())))?;
        let (ctx, vcpus) = vm.parts_for_harness();
        ctx.control.lock().request = Request::Stop;
        Ok(Self { vm, ctx, vcpus })
    }

    /// A handle to the harness VM.
    pub fn handle(&self) -> crate::vm::VmHandle {
        self.vm.handle()
    }

    /// Bytes of guest RAM.
    pub fn ram_size(&self) -> u64 {
        self.ctx.machine.ram().size()
    }

    /// Writes `bytes` at `gpa` (ignored where they fall outside RAM), serves the hypercall
    /// whose block is at `gpa`, and returns the result the VMM wrote back, if it could.
    pub fn call(&self, gpa: u64, bytes: &[u8]) -> Option<i64> {
        let mem = self.ctx.machine.ram().mem();
        let _ = mem.write_slice(bytes, GuestAddress(gpa));
        self.vcpus
            .with_unstarted(|fds| fds.first().map(|fd| hypercall::handle(0, fd, &self.ctx, gpa)))?;
        mem.read_obj::<i64>(GuestAddress(gpa.checked_add(xcloud_abi::RESULT_OFFSET)?))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xcloud_abi::BLOCK_SIZE;

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_hypercall_blocks_never_panic_the_vmm() {
        let harness = HypercallHarness::new().expect("harness VM");
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let size = harness.ram_size();
        for i in 0..20_000u64 {
            let mut block = [0u8; BLOCK_SIZE];
            for chunk in block.chunks_mut(8) {
                let v = match rng.next() % 4 {
                    0 => rng.next() % size,          // plausible addresses
                    1 => rng.next() % 16,            // small values: ops, indexes
                    2 => u64::MAX - rng.next() % 16, // near overflow
                    _ => rng.next(),
                };
                chunk.copy_from_slice(&v.to_le_bytes());
            }
            block[..4].copy_from_slice(&((rng.next() % 12) as u32).to_le_bytes());
            if i % 3 != 0 {
                block[4..8].fill(0);
            }
            let gpa = match rng.next() % 4 {
                0 => rng.next(),
                1 => size - (rng.next() % 128),
                _ => (rng.next() % size) & !7,
            };
            let result = harness.call(gpa, &block);
            let served = gpa % 8 == 0 && gpa.checked_add(BLOCK_SIZE as u64).is_some_and(|e| e <= size);
            if let (true, Some(result)) = (served, result) {
                assert!(result >= -4, "result {result} is 0.. or a known error code");
            }
        }
    }

    #[test]
    fn pages_the_vmm_writes_are_resent_though_kvm_does_not_log_them() {
        let harness = HypercallHarness::new().expect("a KVM VM");
        let handle = harness.handle();
        let machine = handle.machine();
        machine.set_dirty_logging(true).expect("dirty logging");
        machine.fetch_dirty_pages().expect("fetch");
        // The block goes in and the result comes back by the VMM's own writes: KVM logs none.
        let mut block = [0u8; xcloud_abi::BLOCK_SIZE];
        block[..4].copy_from_slice(&(xcloud_abi::Op::TscKhz as u32).to_le_bytes());
        assert!(harness.call(0x20_0000, &block).is_some_and(|khz| khz > 0));
        assert_eq!(machine.fetch_dirty_pages().expect("fetch"), [0x200]);
        assert!(machine.fetch_dirty_pages().expect("fetch").is_empty(), "taken once");
        machine.set_dirty_logging(false).expect("dirty logging off");
        harness.call(0x20_0000, &block);
        machine.set_dirty_logging(true).expect("dirty logging");
        assert!(
            machine.fetch_dirty_pages().expect("fetch").is_empty(),
            "not recorded when no log is kept"
        );
    }

    #[test]
    fn mutated_elf_images_never_panic_the_loader() {
        let seed = boot::minimal_elf(0x10_0000, &[0x90; 64], true);
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..3_000 {
            let mut image = seed.clone();
            for _ in 0..(1 + rng.next() % 8) {
                let at = (rng.next() as usize) % image.len();
                image[at] = rng.next() as u8;
            }
            if rng.next() % 8 == 0 {
                image.truncate((rng.next() as usize) % seed.len());
            }
            let _ = load_image(&image, 4 << 20);
        }
    }
}
