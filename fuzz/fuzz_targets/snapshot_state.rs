//! A snapshot from untrusted storage: any `vm.state` bytes must be decoded or refused, never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = xcloud_vmm::snapshot::VmSnapshot::decode(data);
});
