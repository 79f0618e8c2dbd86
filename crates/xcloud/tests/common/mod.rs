//! Helpers shared by the integration tests: the xcloud binary, and PVH guests written in
//! assembly and built with the system C compiler at test time.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `xcloud` binary under test.
pub fn xcloud() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xcloud"));
    cmd.env_remove("XCLOUD_KVM_DEVICE").env("XCLOUD_LOG", "warn");
    cmd
}

/// Runs `xcloud ARGS` and returns its output.
pub fn run(args: &[&str]) -> Output {
    xcloud().args(args).output().expect("cannot start xcloud")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The PVH entry note every assembly guest carries (XEN_ELFNOTE_PHYS32_ENTRY = 18).
pub const PVH_NOTE: &str = r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .balign 4
    .long _start
    .balign 4
"#;

/// Assembles and links `source` (AT&T syntax) into a static ELF at 1 MiB; returns its path.
pub fn build_asm_guest(name: &str, source: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("asm-guests");
    std::fs::create_dir_all(&dir).expect("cannot create the guest build directory");
    let src = dir.join(format!("{name}.S"));
    let elf = dir.join(name);
    std::fs::write(&src, source).expect("cannot write the guest source");
    let out = Command::new("cc")
        .args([
            "-m64",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,-Ttext-segment=0x100000",
            "-o",
        ])
        .arg(&elf)
        .arg(&src)
        .output()
        .expect("cannot run cc (the tests need a C compiler)");
    assert!(
        out.status.success(),
        "cc failed for {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elf
}
