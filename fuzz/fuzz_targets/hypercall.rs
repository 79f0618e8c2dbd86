//! Hypercalls from a hostile guest: the first 8 bytes choose the block's guest-physical address,
//! the rest is written there as the block (and what follows it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use xcloud_vmm::fuzzing::HypercallHarness;

static HARNESS: OnceLock<HypercallHarness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let harness = HARNESS.get_or_init(|| HypercallHarness::new().expect("KVM for the harness VM"));
    if data.len() < 8 {
        return;
    }
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&data[..8]);
    let raw = u64::from_le_bytes(addr);
    // Mostly addresses inside RAM, sometimes anything at all.
    let gpa = if raw >> 63 == 1 { raw } else { raw % harness.ram_size() };
    let _ = harness.call(gpa, &data[8..]);
});
