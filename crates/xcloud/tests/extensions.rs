//! Tenant extensions in a running VM (docs/extensions.md): a module installed, used by the
//! guest, listed and removed through the control socket; hostile modules contained while the
//! VM goes on.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("extensions").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn kv_example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../extensions/kv.wat")
}

fn ok(socket: &Path, args: &[&str]) -> String {
    let (success, text) = ctl(socket, args);
    assert!(success, "ctl {args:?}: {text}");
    text
}

fn refused(socket: &Path, args: &[&str]) -> String {
    let (success, text) = ctl(socket, args);
    assert!(!success, "ctl {args:?} succeeded: {text}");
    text
}

#[test]
fn a_tenant_module_serves_the_guest_and_a_hostile_one_is_contained() {
    let dir = scratch("kv");
    let socket = dir.join("api.sock");
    let mut cmd = xcloud();
    cmd.args(["run", "--api", socket.to_str().expect("utf-8"), "kvclient", "--", "200"]);
    let (mut vmm, lines) = spawn_lines(cmd);
    next_line(&lines, "kvclient: waiting for the kv module");
    wait_socket(&socket);

    // Modules that cannot be installed: nothing changes.
    let not_wasm = dir.join("not.wasm");
    std::fs::write(&not_wasm, b"\x7fELF garbage").expect("write");
    let text = refused(
        &socket,
        &["ext", "add", not_wasm.to_str().expect("utf-8"), "--name", "junk"],
    );
    assert!(text.contains("not a WebAssembly module"), "{text}");
    let kv = kv_example();
    let kv = kv.to_str().expect("utf-8");
    let text = refused(&socket, &["ext", "add", kv, "--name", "kv", "--ports", "0x3f8+8"]);
    assert!(text.contains("extension window"), "{text}");
    let text = refused(&socket, &["ext", "add", "/nonexistent/kv.wat", "--name", "kv"]);
    assert!(text.contains("cannot read"), "{text}");
    assert!(refused(&socket, &["ext", "rm", "kv"]).contains("no module named kv"));

    // A module that loops where the guest reads: its fuel runs out, it is disabled, the
    // guest reads no device and goes on waiting.
    let looping = dir.join("loop.wat");
    std::fs::write(
        &looping,
        r#"(module (func (export "port_read") (param i32 i32) (result i32) (loop br 0) i32.const 0))"#,
    )
    .expect("write");
    ok(
        &socket,
        &[
            "ext",
            "add",
            looping.to_str().expect("utf-8"),
            "--name",
            "spin",
            "--ports",
            "0x5000+16",
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed = ok(&socket, &["ext", "ls"]);
        if listed.contains("disabled") {
            assert!(listed.contains("fuel"), "{listed}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the looping module still runs: {listed}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(ok(&socket, &["status"]).contains("state: running"));
    ok(&socket, &["ext", "rm", "spin"]);

    // The real one: the guest finds it, stores and reads back 200 values.
    ok(
        &socket,
        &[
            "ext",
            "add",
            kv,
            "--name",
            "kv",
            "--version",
            "1.0",
            "--ports",
            "0x5000+16",
        ],
    );
    let done = next_line(&lines, "kvclient: 200 stored");
    assert!(done.contains("200 read back, the module counts 200"), "{done}");
    let listed = ok(&socket, &["ext", "ls"]);
    let row = listed
        .lines()
        .find(|l| l.starts_with("kv "))
        .unwrap_or_else(|| panic!("{listed}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&fields[..4], ["kv", "1.0", "tenant", "0x5000+16"], "{listed}");
    let calls: u64 = fields[4].parse().expect("calls");
    assert!(calls >= 200 * 4, "{listed}");
    assert_eq!(fields[6], "0", "no failure: {listed}");
    assert_eq!(fields[7], "enabled", "{listed}");
    assert!(refused(&socket, &["ext", "add", kv, "--name", "kv"]).contains("installed already"));

    // Removed while the VM runs: the guest sees it go and ends.
    ok(&socket, &["ext", "rm", "kv"]);
    next_line(&lines, "kvclient: the module is gone");
    let status = vmm.0.wait().expect("the VMM ends");
    assert!(status.success(), "{status}");
}
