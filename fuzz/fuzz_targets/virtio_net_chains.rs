//! A hostile virtio-net driver: any bytes over a queue's descriptor table, available ring and
//! data area; every chain is taken apart as a receive and as a transmit chain. It must never
//! panic, and every buffer it accepts must lie in guest RAM.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xcloud_devices::virtio::net::testing::parse_hostile_chains(data);
});
