//! A tenant's extension module of any bytes: loaded under the default policy, then, if it
//! loads, each hook called with offsets, sizes, values and a frame from the same input. Loading must
//! refuse or succeed, and every call return or fail, without a panic or a hang (fuel bounds
//! every call).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcloud_vmm::extension::Extension;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes drive the calls; the rest is the module (binary or text).
    if data.len() < 8 {
        return;
    }
    let (calls, module) = data.split_at(8);
    let Ok(module) = xcloud_extensions::WasmModule::load(module, &xcloud_extensions::Policy::default()) else {
        return;
    };
    let offset = u16::from_le_bytes([calls[0], calls[1]]);
    let size = [1, 2, 4][usize::from(calls[2]) % 3];
    let value = u32::from_le_bytes([calls[3], calls[4], calls[5], calls[6]]);
    let _ = module.port_write(offset, size, value);
    let _ = module.port_read(offset, size);
    let mut head = vec![calls[7]; module.packet_snap().min(1514)];
    let _ = module.packet(0, xcloud_vmm::extension::PacketDirection::ToGuest, &mut head, 1514);
    let _ = module.block(0, u32::from(calls[7]), u64::from(value), 4096);
    let _ = module.metrics();
});
