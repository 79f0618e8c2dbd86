//! A guest image from an untrusted source: any bytes must be loaded or refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|image: &[u8]| {
    let _ = xcloud_vmm::fuzzing::load_image(image, 4 << 20);
});
