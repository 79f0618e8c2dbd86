//! A hostile virtio-blk driver: any bytes over the request queue's descriptor table, its
//! available ring and the data area, then one pass of the device over the queue. The device
//! must mark itself broken or answer with an error status, never panic, and never touch
//! memory outside guest RAM (the sanitizer would see it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xcloud_devices::virtio::block::testing::serve_hostile_queue(data);
});
