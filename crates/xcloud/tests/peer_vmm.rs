//! SDK guests boot unchanged in another PVH VMM — QEMU's microvm — falling back to the 16550
//! for the console, the PIT for the clock and QEMU's isa-debug-exit port for the exit status.

mod common;
use std::process::Command;
use std::time::{Duration, Instant};

fn qemu(guest: &str, append: &str) -> (String, Option<i32>, f64) {
    let image = xcloud::guests::builtin(guest).expect("built-in guest");
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{guest}.elf"));
    std::fs::write(&path, image).expect("write the guest image");
    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "64M",
    ])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel"])
    .arg(&path)
    .args(["-append", append]);
    let out = common::output_within(qemu, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (text, out.status.code(), start.elapsed().as_secs_f64())
}

#[test]
fn hello_boots_in_qemu_microvm_with_its_exit_status() {
    let (text, status, _) = qemu("hello", "exit 3");
    assert!(
        text.contains("Hello from xcloud guest (vcpu 0 of 1, 63 MiB RAM)"),
        "{text}"
    );
    assert!(text.contains(r#"args: ["exit", "3"]"#), "{text}");
    // isa-debug-exit turns status s into (s << 1) | 1.
    assert_eq!(status, Some(7), "{text}");
}

#[test]
fn heartbeat_keeps_time_in_qemu_microvm() {
    let (text, status, wall) = qemu("heartbeat", "1");
    assert!(text.contains("heartbeat: done"), "{text}");
    assert_eq!(status, Some(1), "{text}");
    // A 1 s run must take about 1 s of wall time: the PIT-calibrated TSC is right.
    assert!((0.9..3.0).contains(&wall), "1 s heartbeat took {wall:.2} s: {text}");
}
