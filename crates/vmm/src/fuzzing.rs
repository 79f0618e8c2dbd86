//! Entry points for the fuzz targets (fuzz/) and the robustness tests: the parsers of
//! untrusted input, driven with arbitrary bytes against real KVM objects.

use crate::boot::{self, BootInfo};
use crate::console::Console;
use crate::hypercall;
use crate::memory::GuestRam;
use crate::vm::{Request, Vm, VmConfig, VmError};
use vm_memory::{Bytes, GuestAddress};

/// Loads `image` as a PVH ELF into fresh guest RAM of `mem_bytes`.
pub fn load_image(image: &[u8], mem_bytes: u64) -> Result<BootInfo, VmError> {
    let ram = GuestRam::new(mem_bytes)?;
    Ok(boot::load_pvh(ram.mem(), ram.size(), image, "fuzz")?)
}

/// A HELLO frame this host accepts (its CPU vendor, no CPU features asked for) for a 1-vCPU
/// guest of `mem_bytes`: fuzzing what follows the HELLO needs one, and random bytes rarely
/// make one.
pub fn migration_hello(mem_bytes: u64) -> Vec<u8> {
    use crate::migration::wire;
    let hello = wire::Hello {
        mem_bytes,
        vcpus: 1,
        tsc_khz: 1_000_000,
        cpu_vendor: crate::migration::cpu_vendor(),
        cpu_features: [0; wire::FEATURE_WORDS.len()],
    };
    let mut frame = Vec::new();
    // Writing into a Vec cannot fail, and the payload is far below the frame limit.
    let _ = wire::write_frame(&mut frame, wire::Kind::Hello, &hello.encode());
    frame
}

/// A VM that is built but never started, whose boot vCPU serves hypercalls from blocks that
/// the caller writes into guest memory.
pub struct HypercallHarness {
    vm: Vm,
}

impl HypercallHarness {
    /// A 4 MiB, 2-vCPU VM. Its control state is "stopping", so `Sleep` returns at once.
    pub fn new() -> Result<Self, VmError> {
        let image = boot::minimal_elf(0x10_0000, &[0xf4], true);
        let config = VmConfig {
            mem_bytes: 4 << 20,
            vcpus: 2,
            cmdline: String::new(),
        };
        let vm = Vm::new(&config, &image, Console::new(Box::new(std::io::sink())))?;
        vm.shared.lock().request = Request::Stop;
        Ok(Self { vm })
    }

    /// A handle to the harness VM.
    pub fn handle(&self) -> crate::vm::VmHandle {
        self.vm.handle()
    }

    /// Bytes of guest RAM.
    pub fn ram_size(&self) -> u64 {
        self.vm.shared.ram.size()
    }

    /// Writes `bytes` at `gpa` (ignored where they fall outside RAM), serves the hypercall
    /// whose block is at `gpa`, and returns the result the VMM wrote back, if it could.
    pub fn call(&self, gpa: u64, bytes: &[u8]) -> Option<i64> {
        let mem = self.vm.shared.ram.mem();
        let _ = mem.write_slice(bytes, GuestAddress(gpa));
        let _ = hypercall::handle(0, &self.vm.vcpus[0], &self.vm.shared, gpa);
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
    fn the_fuzzing_hello_is_accepted_so_the_frames_after_it_get_explored() {
        // The source side of the stream: the HELLO, then nothing. Accepted, the destination
        // waits for the next frame and meets the end; refused, it would say why.
        struct Feed(std::io::Cursor<Vec<u8>>, Vec<u8>);
        impl std::io::Read for Feed {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.0.read(buf)
            }
        }
        impl std::io::Write for Feed {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.1.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let feed = Feed(std::io::Cursor::new(migration_hello(4 << 20)), Vec::new());
        let result = crate::migration::receive(feed, Console::new(Box::new(std::io::sink())));
        match result {
            Err(crate::migration::MigrationError::Wire(crate::migration::wire::WireError::Io(e))) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof)
            }
            Err(other) => panic!("the HELLO was not accepted: {other}"),
            Ok(_) => panic!("a VM without a state"),
        }
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
