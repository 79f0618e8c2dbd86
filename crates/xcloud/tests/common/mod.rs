//! Helpers shared by the integration tests: the xcloud binary, and PVH guests written in
//! assembly and built with the system C compiler at test time.

#![allow(dead_code)]

pub mod hosts;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `xcloud` binary under test.
pub fn xcloud() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xcloud"));
    cmd.env_remove("XCLOUD_KVM_DEVICE").env("XCLOUD_LOG", "warn");
    // Not the developer's own CLI settings: no config file, no daemon named.
    for var in [
        "XCLOUD_URL",
        "XCLOUD_TOKEN",
        "XCLOUD_SERVER_CERT",
        "XCLOUD_PROFILE",
        "XCLOUD_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("XDG_CONFIG_HOME", "/nonexistent/xcloud-tests");
    cmd
}

/// Runs `xcloud ARGS` and returns its output (60 s at most).
pub fn run(args: &[&str]) -> Output {
    let mut cmd = xcloud();
    cmd.args(args);
    output_within(cmd, std::time::Duration::from_secs(60))
}

/// Runs `cmd` to its end and returns its output; kills it and fails the test if it is still
/// running after `limit`, so that a hang fails one test instead of stalling the whole suite.
pub fn output_within(mut cmd: Command, limit: std::time::Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the command") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!("{cmd:?} still ran after {limit:?}; killed it. stderr: {err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
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

/// A process the test started: killed when the test ends, also when it fails, so that a
/// failed test leaves no VM spinning under the tests that follow.
pub struct Proc(pub std::process::Child);

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` with its stdout read line by line on a thread.
pub fn spawn_lines(mut cmd: Command) -> (Proc, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start the command");
    let stdout = child.stdout.take().expect("stdout");
    let child = Proc(child);
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
    let mut cmd = xcloud();
    cmd.arg("ctl").arg(socket).args(args);
    let out = output_within(cmd, std::time::Duration::from_secs(60));
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

/// Lets `child` run for `period` and checks that it did not end (a guest whose working set
/// finds a lost page ends with status 101) and printed a line containing `needle`.
pub fn assert_keeps_running(
    child: &mut Proc,
    out: &std::sync::mpsc::Receiver<String>,
    period: std::time::Duration,
    needle: &str,
) {
    let deadline = std::time::Instant::now() + period;
    while std::time::Instant::now() < deadline && child.try_wait().expect("wait").is_none() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if let Some(status) = child.try_wait().expect("wait") {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        panic!("the guest ended ({status}): {err}");
    }
    assert!(out.try_iter().any(|l| l.contains(needle)), "no '{needle}' printed");
}

/// A network namespace a test made (with its loopback up); deleted when dropped.
pub struct Namespace(pub String);

impl Namespace {
    /// Namespace `name`, made afresh (a leftover of that name is deleted first).
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Self(name.to_string())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `ip ARGS`, which must succeed (tests set up their hosts with it; the product never does).
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `xcloud ARGS` inside namespace `ns`.
pub fn xcloud_in(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_xcloud"))
        .args(args)
        .env("XCLOUD_LOG", "warn");
    cmd
}

/// httpd's `GET /count` at `addr` from inside namespace `ns`, on a connection of its own.
pub fn get_count(ns: &str, addr: &'static str) -> u64 {
    try_get_count(ns, addr).expect("httpd answered /count")
}

/// `get_count`, asking again for up to `limit` while the server is not there yet.
pub fn get_count_within(ns: &str, addr: &'static str, limit: std::time::Duration) -> u64 {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match try_get_count(ns, addr) {
            Ok(count) => return count,
            Err(e) if std::time::Instant::now() > deadline => panic!("httpd did not answer /count: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// `get_count` once: Err if no answer comes within 10 s.
pub fn try_get_count(ns: &str, addr: &'static str) -> anyhow::Result<u64> {
    xcloud::netlab::Hosts::in_ns(ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr.parse()?, std::time::Duration::from_secs(10))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        s.write_all(b"GET /count HTTP/1.1\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_string();
        Ok(body.parse::<u64>()?)
    })
    .join()
    .expect("client thread")
}

/// Connects to `addr` inside network namespace `ns`, sends `bytes` in 16 KiB writes, shuts
/// its side and waits for the receiver's close; Err if the connection cannot be made within
/// `timeout`. The bytes sent.
pub fn send_tcp_in(ns: &str, addr: &'static str, bytes: usize, timeout: std::time::Duration) -> std::io::Result<usize> {
    xcloud::netlab::Hosts::in_ns(ns, move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect_timeout(&addr.parse().map_err(std::io::Error::other)?, timeout)?;
        s.set_write_timeout(Some(std::time::Duration::from_secs(20)))?;
        let block = vec![0x5au8; 16 * 1024];
        let mut sent = 0;
        while sent < bytes {
            s.write_all(&block)?;
            sent += block.len();
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut end = [0u8; 1];
        let _ = std::io::Read::read(&mut s, &mut end);
        Ok(sent)
    })
    .join()
    .map_err(|_| std::io::Error::other("the client thread panicked"))?
    .map_err(|e| std::io::Error::other(e.to_string()))
}

/// The word `diskwrite SEED` writes at byte `offset` (the guest SDK's disk pattern).
pub fn disk_word(seed: u64, offset: u64) -> u64 {
    let mut z = (seed ^ offset).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fails unless the image holds seed's pattern for `bytes` and zeroes after.
pub fn assert_image_holds(path: &std::path::Path, seed: u64, bytes: u64) {
    let data = std::fs::read(path).expect("read the image");
    for (i, word) in data.chunks_exact(8).enumerate() {
        let at = 8 * i as u64;
        let want = if at < bytes { disk_word(seed, at) } else { 0 };
        assert_eq!(
            u64::from_le_bytes(word.try_into().expect("8 bytes")),
            want,
            "byte {at} of {}",
            path.display()
        );
    }
}
