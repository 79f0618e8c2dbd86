//! The hook ABI as the host decodes it: a module whose answers come from the input — its
//! packet buffer and snap, its packet and block verdicts, the name it gives a figure, the
//! arguments of its `guest_read` — called with a frame from the same input. The host must
//! refuse the module, or decode every answer into a verdict or an error, with no panic, no
//! access outside the module's or the guest's memory, and never past the read budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcloud_vmm::extension::{Extension, GuestView, PacketDirection};

fn word(data: &[u8], at: usize) -> i32 {
    i32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

fn long(data: &[u8], at: usize) -> i64 {
    (i64::from(word(data, at + 4)) << 32) | i64::from(word(data, at) as u32)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 40 {
        return;
    }
    let (buffer, snap, verdict) = (word(data, 0), word(data, 4), word(data, 8));
    let (name, gpa) = (long(data, 12), long(data, 20));
    let (into, len, block) = (word(data, 28), word(data, 32), word(data, 36));
    let frame = &data[40..];
    let text = format!(
        r#"(module
             (import "xcloud" "guest_read" (func $read (param i64 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "packet_buffer") (result i32) i32.const {buffer})
             (func (export "packet_snap") (result i32) i32.const {snap})
             (func (export "packet") (param i32 i32 i32) (result i32) i32.const {verdict})
             (func (export "block") (param i32 i32 i64 i64) (result i32) i32.const {block})
             (func (export "tick") (drop (call $read (i64.const {gpa}) (i32.const {into}) (i32.const {len}))))
             (func (export "metric_count") (result i32) i32.const 1)
             (func (export "metric") (param i32) (result i64) i64.const 1)
             (func (export "metric_name") (param i32) (result i64) i64.const {name}))"#
    );
    let Ok(module) = xcloud_extensions::WasmModule::load(text.as_bytes(), &xcloud_extensions::Policy::default()) else {
        return;
    };
    for direction in [PacketDirection::FromGuest, PacketDirection::ToGuest] {
        let mut head = frame[..frame.len().min(module.packet_snap())].to_vec();
        let shown = head.len();
        let _ = module.packet(0, direction, &mut head, frame.len());
        assert_eq!(head.len(), shown);
    }
    let _ = module.block(0, 1, 0, 4096);
    let Ok(ram) = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]) else {
        return;
    };
    let mut view = GuestView::new(ram, 65_536);
    let _ = module.tick(&mut view);
    assert!(view.left() <= 65_536);
    for (name, _) in module.metrics() {
        assert!((1..=32).contains(&name.len()));
    }
});
