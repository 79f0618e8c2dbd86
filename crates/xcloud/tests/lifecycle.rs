//! The VM lifecycle: pause and resume really stop and restart every vCPU, illegal transitions
//! are refused, and Ctrl-C stops a VM cleanly.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};
use xcloud_vmm::{CaptureBuffer, Console, Vm, VmConfig, VmExit, VmHandle, VmState};

fn wait_for(capture: &CaptureBuffer, needle: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = capture.text();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < limit,
            "'{needle}' did not appear within {limit:?}: {text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_u64(handle: &VmHandle, addr: u64) -> u64 {
    let mut b = [0u8; 8];
    handle.read_guest(addr, &mut b).expect("guest RAM");
    u64::from_le_bytes(b)
}

/// Largest `max_gap_us` reported so far.
fn max_gap_us(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("max_gap_us=")))
        .filter_map(|v| v.parse().ok())
        .max()
        .unwrap_or(0)
}

fn boot(guest: &str, cmdline: &str, vcpus: usize) -> (Vm, CaptureBuffer) {
    let capture = CaptureBuffer::default();
    let image = xcloud::guests::builtin(guest).expect("built-in guest");
    let config = VmConfig {
        mem_bytes: 64 << 20,
        vcpus,
        cmdline: cmdline.into(),
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let mut vm = Vm::new(&config, image, Console::new(Box::new(capture.clone()))).expect("VM");
    vm.start().expect("start");
    (vm, capture)
}

#[test]
fn pause_stops_the_heartbeat_and_its_gap_matches_the_pause() {
    const VCPUS: u64 = 4;
    let (vm, capture) = boot("heartbeat", "", VCPUS as usize);
    let handle = vm.handle();
    let text = wait_for(&capture, "heartbeat n=", Duration::from_secs(5));
    let page = text
        .lines()
        .find_map(|l| l.split("page at ").nth(1))
        .and_then(|a| a.split(',').next())
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .expect("the heartbeat prints its page address");
    let count_addr = page + 8;
    // Every vCPU's counter: the boot vCPU's, then each secondary's slot.
    let counters: Vec<u64> = std::iter::once(count_addr)
        .chain((1..VCPUS).map(|i| page + 24 + 8 * i))
        .collect();
    let read_all = |h: &VmHandle| counters.iter().map(|&a| read_u64(h, a)).collect::<Vec<u64>>();
    let gap_before = max_gap_us(&text);

    let pause = Duration::from_millis(600);
    handle.pause().expect("pause");
    assert_eq!(handle.state(), VmState::Paused);
    let frozen = read_all(&handle);
    assert!(frozen.iter().all(|&c| c > 0), "every vCPU was running: {frozen:?}");
    std::thread::sleep(pause);
    assert_eq!(read_all(&handle), frozen, "no progress on any vCPU while paused");
    let lines_while_paused = capture.text().lines().count();
    handle.resume().expect("resume");
    assert_eq!(handle.state(), VmState::Running);

    let start = Instant::now();
    let mut gap = 0;
    while start.elapsed() < Duration::from_secs(5) {
        gap = max_gap_us(&capture.text());
        if gap > gap_before && capture.text().lines().count() > lines_while_paused {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Four vCPU threads share two host cores with the other tests: give each a moment.
    let resumed = Instant::now();
    let mut after = read_all(&handle);
    while !after.iter().zip(&frozen).all(|(a, f)| a > f) && resumed.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
        after = read_all(&handle);
    }
    assert!(
        after.iter().zip(&frozen).all(|(a, f)| a > f),
        "every vCPU runs again: {frozen:?} -> {after:?}"
    );
    let pause_us = pause.as_micros() as u64;
    assert!(gap >= pause_us, "gap {gap} us covers the {pause_us} us pause");
    assert!(
        gap < pause_us + 250_000,
        "gap {gap} us is the pause ({pause_us} us), not much more"
    );
    handle.stop();
    assert_eq!(vm.wait(), VmExit::Stopped);
    assert_eq!(handle.state(), VmState::Stopped);
}

#[test]
fn pause_and_resume_reach_every_vcpu_and_sleeping_ones() {
    // `dirty` sleeps in 1 ms hypercalls between writes: pause must catch it in the VMM too.
    let (vm, capture) = boot("dirty", "8 16", 1);
    let handle = vm.handle();
    wait_for(&capture, "touched", Duration::from_secs(5));
    for _ in 0..5 {
        handle.pause().expect("pause");
        handle.resume().expect("resume");
    }
    handle.stop();
    assert_eq!(vm.wait(), VmExit::Stopped);

    let (vm, capture) = boot("hello", "", 4);
    let handle = vm.handle();
    wait_for(&capture, "said hello", Duration::from_secs(5));
    assert_eq!(vm.wait(), VmExit::Exited(0));
    assert!(handle.pause().is_err(), "a stopped VM cannot be paused");
}

#[test]
fn illegal_transitions_are_errors() {
    let (vm, capture) = boot("heartbeat", "", 2);
    let handle = vm.handle();
    wait_for(&capture, "heartbeat n=", Duration::from_secs(5));
    let err = handle.resume().expect_err("resume while running");
    assert!(err.to_string().contains("cannot resume a VM that is Running"), "{err}");
    handle.pause().expect("pause");
    assert!(handle.pause().is_err(), "pause while paused");
    handle.stop();
    assert_eq!(vm.wait(), VmExit::Stopped);
}

#[test]
fn ctrl_c_stops_the_vm_cleanly() {
    let mut child = xcloud()
        .args(["run", "heartbeat"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("xcloud");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    assert!(first.starts_with("heartbeat: start"), "{first}");
    // SAFETY: kill sends SIGINT to our own child, whose pid is valid until we wait for it.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "xcloud did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(130));
}

#[test]
fn doctor_tells_the_truth_about_this_host() {
    let out = run(&["doctor"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(text.contains("virtualization: PVM"), pvm, "{text}");
    assert!(text.contains("KVM_CAP_IRQCHIP                      yes"), "{text}");
    assert!(text.contains("port-I/O exit from CPL3"), "{text}");
    assert!(text.contains("userfaultfd                          yes"), "{text}");
    if pvm {
        assert!(text.contains("Linux guests: no"), "{text}");
    }
}
