//! Two "hosts" for the tests that move or replicate a VM between them: network namespaces
//! joined by an emulated WAN or a plain veth, each with an identity, and the VMMs run in them.

use super::*;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use xcloud::netlab::{Hosts, LinkSpec};

/// Two namespaces joined by a WAN link: `rate_bits` each way, 20 ms round trip.
pub fn wan(rate_bits: u64) -> Hosts {
    Hosts::new(LinkSpec::wan(rate_bits, Duration::from_millis(20))).expect("namespaces (run the tests as root)")
}

/// Two namespaces joined by a plain veth link.
pub fn lan() -> Hosts {
    Hosts::new(LinkSpec::default()).expect("namespaces (run the tests as root)")
}

/// A fresh scratch directory for test `name` of `suite`.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(suite).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}

/// Makes the identity of host `name` in `dir`.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let id = dir.join(name);
    let out = run(&["keygen", id.to_str().expect("utf-8"), "--name", name]);
    assert!(out.status.success(), "{}", stderr(&out));
    id
}

/// Runs `xcloud ARGS` inside namespace `ns`, its stdout read line by line.
pub fn spawn_in(ns: &str, args: &[&str]) -> (Proc, Receiver<String>) {
    let mut cmd = xcloud::netlab::command_in(Some(ns), env!("CARGO_BIN_EXE_xcloud"));
    cmd.args(args);
    spawn_lines(cmd)
}

/// Starts `xcloud run --api SOCKET RUN_ARGS...` in the source namespace; returns it once it has
/// printed a line starting with `first_line` (returned too) and its control socket is up.
pub fn start_source(hosts: &Hosts, s: &Setup, run_args: &[&str], first_line: &str) -> (Proc, Receiver<String>, String) {
    let mut args = vec!["run", "--api", s.socket.to_str().expect("utf-8")];
    args.extend_from_slice(run_args);
    let (src, src_out) = spawn_in(&hosts.src, &args);
    let first = next_line(&src_out, first_line);
    wait_socket(&s.socket);
    (src, src_out, first)
}

/// The number after `key` in a guest's report line.
pub fn count(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// Waits up to `limit` for `child` to end: its exit code and its stderr.
pub fn wait_exit(child: &mut std::process::Child, limit: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two hosts' identities and the source's control socket.
pub struct Setup {
    pub dir: PathBuf,
    pub a: PathBuf,
    pub b: PathBuf,
    pub socket: PathBuf,
}

/// Identities for two hosts, and where the source's control socket goes, under the scratch
/// directory of test `name` of `suite`.
pub fn setup_in(suite: &str, name: &str) -> Setup {
    let dir = scratch(suite, name);
    let a = keygen(&dir, "host-a");
    let b = keygen(&dir, "host-b");
    let socket = dir.join("src.sock");
    Setup { dir, a, b, socket }
}

/// Gives each host a TAP `xc0` for the VM, with the address 10.74.0.1/24 beside the VM's
/// 10.74.0.2 (the same on both: wherever the VM runs, its host's clients reach it the same way).
pub fn add_vm_taps(hosts: &Hosts) {
    for ns in [&hosts.src, &hosts.dst] {
        for args in [
            &["-n", ns, "tuntap", "add", "xc0", "mode", "tap", "vnet_hdr"][..],
            &["-n", ns, "addr", "add", "10.74.0.1/24", "dev", "xc0"],
        ] {
            let ok = std::process::Command::new("ip").args(args).status().expect("ip");
            assert!(ok.success(), "ip {args:?}");
        }
    }
}

/// A 64 MiB image for the source's VM and an empty disk directory for the other host.
pub fn disk_dirs(s: &Setup) -> (PathBuf, PathBuf) {
    let (src_dir, dst_dir) = (s.dir.join("src-disks"), s.dir.join("dst-disks"));
    std::fs::create_dir_all(&src_dir).expect("dir");
    std::fs::create_dir_all(&dst_dir).expect("dir");
    let image = src_dir.join("data.img");
    std::fs::File::create(&image)
        .expect("image")
        .set_len(64 << 20)
        .expect("size");
    (image, dst_dir)
}

/// Runs `diskwrite BYTES 77 8 16` (seed 77's pattern at 16 MiB/s) on `image` in the source
/// namespace; returns once its control socket is up (it prints only at its end).
pub fn start_diskwriter(hosts: &Hosts, s: &Setup, image: &Path, bytes: u64) -> Proc {
    let (disk, bytes) = (image.to_str().expect("utf-8"), bytes.to_string());
    let (src, _) = spawn_in(
        &hosts.src,
        &[
            "run",
            "--api",
            s.socket.to_str().expect("utf-8"),
            "--disk",
            disk,
            "diskwrite",
            "--",
            &bytes,
            "77",
            "8",
            "16",
        ],
    );
    wait_socket(&s.socket);
    src
}

/// The test as the source host: a TLS stream with host A's credentials from the source
/// namespace to `port` at the destination, asked again while nothing listens there yet. (The
/// socket stays in the namespace it was made in, whichever thread uses it.)
pub fn connect_as_source(hosts: &Hosts, s: &Setup, port: u16) -> xcloud_migration::tls::ClientStream {
    let ns = std::fs::File::open(format!("/var/run/netns/{}", hosts.src)).expect("netns file");
    let to = format!("{}:{port}", hosts.dst_ip);
    let creds = xcloud_migration::tls::Credentials::load(&s.a, &s.b.join("cert.der")).expect("credentials");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns moves only this new thread into the namespace that `ns` refers to.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let tcp = loop {
            match std::net::TcpStream::connect(&to) {
                Ok(t) => break t,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("connect: {e}"),
            }
        };
        xcloud_migration::tls::connect(tcp, &creds).expect("TLS")
    })
    .join()
    .expect("connecting thread")
}

/// `COMMAND... TARGET --identity IDENTITY --peer PEER/cert.der EXTRA...`: how a test addresses
/// the other host (`migrate` and `protect` toward it, `receive --listen` from it).
pub fn peer_args(command: &[&str], target: &str, identity: &Path, peer: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = command.iter().map(|c| c.to_string()).collect();
    args.push(target.into());
    args.extend([
        "--identity".into(),
        identity.to_str().expect("utf-8").into(),
        "--peer".into(),
        peer.join("cert.der").to_str().expect("utf-8").into(),
    ]);
    args.extend(extra.iter().map(|e| e.to_string()));
    args
}

/// `args` as the `&str`s `ctl` and `spawn_in` take.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `run` arguments for an httpd guest on TAP xc0 (made by [`add_vm_taps`]) as NIC `nic`
/// (`tap=xc0,mac=...`), serving at 10.74.0.2 port 80, with `more` httpd arguments (its
/// connection slots, a working set).
pub fn httpd_on_tap(nic: &'static str, more: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec!["--net", nic, "httpd", "--", "10.74.0.2/24", "80"];
    args.extend_from_slice(more);
    args
}
