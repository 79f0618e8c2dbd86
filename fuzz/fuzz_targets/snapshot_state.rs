//! A snapshot from untrusted storage: any `vm.state` bytes must be decoded or refused, never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The tree, then every section of a kind this VMM knows, as a restore decodes them.
    let _ = xcloud_vmm::fuzzing::decode_state(data);
});
