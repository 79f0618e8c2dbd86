//! A snapshot directory from untrusted storage: its `vm.state` (the first part of the input,
//! its length in the first two bytes) and the head of its `memory.pages` (the rest) go through
//! what a restore reads before the guest runs — the state tree, every known section, the
//! record of the memory file, the memory file's header and index — and must be accepted or
//! refused, never a panic or an allocation beyond the guest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcloud_snapshot::memory_file::{read_memory_index, MemoryFileRecord};
use xcloud_state::StateTree;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (state, memory) = rest.split_at(split);
    let _ = xcloud_vmm::fuzzing::decode_state(state);
    if let Ok(mut tree) = StateTree::decode(state) {
        let _ = tree.load::<MemoryFileRecord>(0);
    }
    // Guests from the smallest to 64 MiB; the file length as the input claims it or as it is.
    let size = (2u64 << 20) << (memory.first().copied().unwrap_or(0) % 6);
    for file_len in [memory.len() as u64, 32 + 4 + memory.len() as u64 * 4104] {
        if let Ok(index) = read_memory_index(&mut &memory[..], file_len, size) {
            assert!(index.pfns.windows(2).all(|w| w[0] < w[1]));
            assert!(index.pfns.iter().all(|&p| p < size / 4096));
        }
    }
});
