//! What cannot run is refused with one clear line and a non-zero status.

mod common;
use common::*;

fn fails_with(args: &[&str], status: i32, needle: &str) {
    let out = run(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: expected '{needle}' in: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

#[test]
fn no_kvm_device_says_so_and_what_to_do() {
    let mut cmd = xcloud();
    cmd.env("XCLOUD_KVM_DEVICE", "/nonexistent/kvm").args(["run", "hello"]);
    let out = output_within(cmd, std::time::Duration::from_secs(60));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("/nonexistent/kvm does not exist") && err.contains("modprobe"),
        "{err}"
    );
}

#[test]
fn no_permission_on_kvm_says_so_and_what_to_do() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test drops from root to nobody; run the suite as root");
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        env!("CARGO_BIN_EXE_xcloud"),
        "run",
        "hello",
    ]);
    let out = output_within(cmd, std::time::Duration::from_secs(60));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no permission to open /dev/kvm") && err.contains("kvm"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_an_elf_is_refused() {
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("not-an-elf");
    std::fs::write(&path, b"#!/bin/sh\necho this is a shell script\n").expect("write");
    fails_with(&["run", path.to_str().expect("utf-8")], 1, "not an ELF file");
}

#[test]
fn an_elf_without_pvh_note_is_refused() {
    let elf = build_asm_guest("no-note", ".text\n.globl _start\n_start: hlt\n");
    fails_with(&["run", elf.to_str().expect("utf-8")], 1, "no PVH entry note");
}

#[test]
fn segments_outside_guest_memory_are_refused() {
    // A 4 MiB bss does not fit in a 4 MiB guest whose RAM above 1 MiB is 3 MiB.
    let source = format!("{PVH_NOTE}\n.text\n.globl _start\n_start: hlt\n.bss\n.skip 4 << 20\n");
    let elf = build_asm_guest("too-big", &source);
    fails_with(
        &["run", "--mem", "4M", elf.to_str().expect("utf-8")],
        1,
        "lies outside guest RAM",
    );
}

#[test]
fn guest_memory_too_small_or_too_large_is_refused() {
    fails_with(&["run", "--mem", "1M", "hello"], 1, "too small");
    fails_with(&["run", "--mem", "8G", "hello"], 1, "too large");
    fails_with(&["run", "--mem", "64M", "--vcpus", "0", "hello"], 1, "1 to 64 vCPUs");
}

#[test]
fn an_unknown_guest_name_lists_the_built_in_ones() {
    fails_with(&["run", "nosuchguest"], 1, "hello, heartbeat, dirty, micro");
}

#[test]
fn a_missing_file_is_named() {
    fails_with(
        &["run", "/nonexistent/guest.elf"],
        1,
        "cannot read guest image /nonexistent/guest.elf",
    );
}

#[test]
fn keygen_keeps_an_identity_that_is_there_and_never_exposes_the_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("keygen");
    let _ = std::fs::remove_dir_all(&dir);
    let id = dir.to_str().expect("utf-8");
    assert!(run(&["keygen", id]).status.success());
    let (cert, key) = (dir.join("cert.der"), dir.join("key.der"));
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key mode {mode:o}");
    let pinned = std::fs::read(&cert).expect("cert");

    let out = run(&["keygen", id]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(&cert).expect("cert"),
        pinned,
        "the pinned certificate stays"
    );

    assert!(run(&["keygen", id, "--force"]).status.success());
    assert_ne!(std::fs::read(&cert).expect("cert"), pinned, "replaced on request");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key mode {mode:o}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn a_guest_image_that_is_not_a_regular_file_or_too_large_is_refused_before_it_is_read() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("images");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let fifo = dir.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    let link = dir.join("zero.elf");
    std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
    let huge = dir.join("huge.elf");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(1 << 30))
        .expect("a sparse 1 GiB file");
    for (image, needle) in [
        ("/dev/zero".to_string(), "is a device, not a regular file"),
        (fifo.display().to_string(), "is a FIFO, not a regular file"),
        (link.display().to_string(), "is a device, not a regular file"),
        (dir.display().to_string(), "is a directory, not a regular file"),
        (
            huge.display().to_string(),
            "1073741824 bytes is more than the 67108864 bytes",
        ),
    ] {
        let t = std::time::Instant::now();
        let out = run(&["run", "--mem", "64M", &image]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{image}: {err}");
        assert!(err.contains(needle), "{image}: {err}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{image} was read");
    }
}
