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

/// Runs `cmd` with its stdout read line by line on a thread.
pub fn spawn_lines(mut cmd: Command) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start the command");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The next line that starts with `prefix` (20 s at most).
pub fn next_line(rx: &std::sync::mpsc::Receiver<String>, prefix: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line starting with '{prefix}'"));
        if line.starts_with(prefix) {
            return line;
        }
    }
}

/// `xcloud ctl SOCKET ARGS`: success and everything it printed.
pub fn ctl(socket: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = xcloud().arg("ctl").arg(socket).args(args).output().expect("xcloud ctl");
    (out.status.success(), format!("{}{}", stdout(&out), stderr(&out)))
}

/// Waits (10 s at most) for a control socket to appear.
pub fn wait_socket(socket: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no control socket at {}",
            socket.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
