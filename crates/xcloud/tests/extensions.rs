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

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../extensions")
        .join(name)
        .to_str()
        .expect("utf-8")
        .to_string()
}

/// The figures `ext ls` shows for module `name` (the indented line under its row).
fn figures(socket: &Path, name: &str) -> std::collections::HashMap<String, f64> {
    let listed = ok(socket, &["ext", "ls"]);
    let mut lines = listed.lines().skip_while(|l| !l.starts_with(&format!("{name} ")));
    assert!(lines.next().is_some(), "no module {name}: {listed}");
    lines
        .next()
        .filter(|l| l.starts_with("    "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.parse::<f64>().expect("a number")))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `check` holds for module `name`'s figures.
fn wait_figures(
    socket: &Path,
    name: &str,
    what: &str,
    check: impl Fn(&std::collections::HashMap<String, f64>) -> bool,
) -> std::collections::HashMap<String, f64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let f = figures(socket, name);
        if check(&f) {
            return f;
        }
        assert!(std::time::Instant::now() < deadline, "{name}: {what}: {f:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn packet_modules_count_and_filter_the_frames_of_a_running_vm() {
    let dir = scratch("packets");
    let socket = dir.join("api.sock");
    let ns = Namespace::new(&format!("xct-ext-{}", std::process::id()));
    let (_vm, lines) = spawn_lines(xcloud_in(
        &ns.0,
        &[
            "run",
            "--api",
            socket.to_str().expect("utf-8"),
            "--net",
            "tap=xc0",
            "netrecv",
            "--",
            "10.79.0.2/24",
            "5001",
            "0",
        ],
    ));
    next_line(&lines, "netrecv: listening");
    ip(&["-n", &ns.0, "addr", "add", "10.79.0.1/24", "dev", "xc0"]);
    wait_socket(&socket);
    let (counter, filter) = (example("packet-counter.wat"), example("packet-filter.wat"));

    ok(&socket, &["ext", "add", &counter, "--name", "counter"]);
    let sent = send_tcp_in(&ns.0, "10.79.0.2:5001", 1 << 20, std::time::Duration::from_secs(10)).expect("sent");
    next_line(&lines, "netrecv: connection 1:");
    let counted = figures(&socket, "counter");
    assert!(
        counted["frames_in"] >= 20.0 && counted["frames_out"] >= 10.0,
        "{counted:?}"
    );
    assert!(counted["bytes_in"] >= sent as f64, "{counted:?}");
    assert!(counted["syns_in"] >= 1.0, "{counted:?}");

    // The firewall drops what comes in to port 5001: no connection is made.
    ok(&socket, &["ext", "add", &filter, "--name", "firewall"]);
    let refused = send_tcp_in(&ns.0, "10.79.0.2:5001", 1 << 16, std::time::Duration::from_secs(2));
    assert!(refused.is_err(), "a connection was made through the firewall");
    let filtered = figures(&socket, "firewall");
    assert!(filtered["dropped"] >= 1.0, "{filtered:?}");
    let meter = figures(&socket, "meter");
    assert!(
        meter["net0_dropped"] >= 1.0,
        "the provider's meter counts the drops: {meter:?}"
    );
    // The counter, installed first, saw the SYNs the firewall then dropped.
    assert!(figures(&socket, "counter")["syns_in"] > counted["syns_in"]);

    // Removed: connections go through again, every byte arrives.
    ok(&socket, &["ext", "rm", "firewall"]);
    let sent = send_tcp_in(&ns.0, "10.79.0.2:5001", 4 << 20, std::time::Duration::from_secs(10)).expect("sent");
    let result = next_line(&lines, "netrecv: connection 2:");
    assert!(result.contains(&format!(": {sent} bytes")), "{result}");
    ok(&socket, &["ext", "rm", "counter"]);
}

#[test]
fn block_modules_audit_the_writes_of_a_running_vm_and_a_refusal_fails_the_write() {
    let dir = scratch("blocks");
    let socket = dir.join("api.sock");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(32 << 20))
        .expect("image");
    let mut cmd = xcloud();
    cmd.args([
        "run",
        "--api",
        socket.to_str().expect("utf-8"),
        "--disk",
        image.to_str().expect("utf-8"),
        // 16 MiB at 4 MiB/s: four seconds of writes.
        "diskwrite",
        "--",
        "16777216",
        "7",
        "8",
        "4",
    ]);
    let (mut vmm, lines) = spawn_lines(cmd);
    wait_socket(&socket);
    // After the first block (sectors 0-511): the audit refuses writes to the boot sectors.
    wait_figures(&socket, "meter", "the guest wrote nothing", |f| {
        f["disk0_written_bytes"] > 0.0
    });
    ok(&socket, &["ext", "add", &example("block-audit.wat"), "--name", "audit"]);
    let audited = wait_figures(&socket, "audit", "no write seen", |f| f["writes"] >= 2.0);
    assert!(audited["bytes_written"] >= 2.0 * 262_144.0, "{audited:?}");
    assert!(audited["last_sector"] >= 512.0, "{audited:?}");
    assert_eq!(audited["refused"], 0.0, "{audited:?}");
    ok(&socket, &["ext", "rm", "audit"]);

    // A module that refuses every write: the guest's next write fails, and it says so.
    let deny = dir.join("deny.wat");
    std::fs::write(
        &deny,
        r#"(module (func (export "block") (param i32 i32 i64 i64) (result i32)
             (i32.eq (local.get 1) (i32.const 1))))"#,
    )
    .expect("write");
    ok(
        &socket,
        &["ext", "add", deny.to_str().expect("utf-8"), "--name", "deny"],
    );
    let failed = next_line(&lines, "diskwrite: failed");
    assert!(failed.contains("Status(1)"), "an I/O error: {failed}");
    let status = vmm.0.wait().expect("the VMM ends");
    assert_eq!(status.code(), Some(1), "the guest's own exit status");
}

#[test]
fn a_memory_scanner_finds_the_guests_marker_and_the_policy_bounds_tenant_modules() {
    let dir = scratch("memscan");
    let socket = dir.join("api.sock");
    let mut cmd = xcloud();
    cmd.args([
        "run",
        "--api",
        socket.to_str().expect("utf-8"),
        "--ext-policy",
        "packets=no,tick-ms=20",
        "marker",
    ]);
    let (_vm, lines) = spawn_lines(cmd);
    let placed = next_line(&lines, "marker: placed at ");
    let at = u64::from_str_radix(placed.trim_start_matches("marker: placed at 0x").trim(), 16).expect("an address");
    wait_socket(&socket);

    // The provider's policy: no packet hook for tenants here.
    let text = refused(
        &socket,
        &["ext", "add", &example("packet-counter.wat"), "--name", "counter"],
    );
    assert!(text.contains("policy") && text.contains("packet"), "{text}");

    // The provider's meter: a tenant can read it, not remove or replace it.
    assert!(refused(&socket, &["ext", "rm", "meter"]).contains("provider"));
    let text = refused(&socket, &["ext", "add", &example("memscan.wat"), "--name", "meter"]);
    assert!(text.contains("installed already"), "{text}");
    assert!(ok(&socket, &["ext", "ls"]).contains("meter "));

    ok(&socket, &["ext", "add", &example("memscan.wat"), "--name", "memscan"]);
    let found = wait_figures(&socket, "memscan", "the marker was not found", |f| f["found"] >= 1.0);
    assert_eq!(found["found_at"], at as f64, "{found:?}");
    let listed = ok(&socket, &["ext", "ls"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("memscan ") && l.contains("enabled")),
        "{listed}"
    );
    ok(&socket, &["ext", "rm", "memscan"]);

    // The provider's page scan passes over the guest's resident pages and says what sharing
    // could reclaim; the policy's tick budget is the tenant's, not its.
    let scan = wait_figures(&socket, "pagescan", "no whole pass", |f| {
        f.get("passes").is_some_and(|p| *p >= 1.0)
    });
    assert!(scan["resident_pages"] > 0.0, "{scan:?}");
    assert!(scan["resident_pages"] <= (64 << 20) as f64 / 4096.0, "{scan:?}");
    assert_eq!(
        scan["shareable_bytes"],
        (scan["zero_pages"] + scan["duplicate_pages"]) * 4096.0,
        "{scan:?}"
    );
    assert!(refused(&socket, &["ext", "rm", "pagescan"]).contains("provider"));
}

#[test]
fn a_snapshot_carries_a_tenant_module_and_its_state() {
    let dir = scratch("snapshot");
    let socket = dir.join("api.sock");
    let snap = dir.join("snap");
    let mut cmd = xcloud();
    cmd.args(["run", "--api", socket.to_str().expect("utf-8"), "kvclient", "--", "100"]);
    let (mut vmm, lines) = spawn_lines(cmd);
    next_line(&lines, "kvclient: waiting for the kv module");
    wait_socket(&socket);
    ok(
        &socket,
        &["ext", "add", &example("kv.wat"), "--name", "kv", "--ports", "0x5000+16"],
    );
    next_line(&lines, "kvclient: 100 stored");
    ok(&socket, &["snapshot", snap.to_str().expect("utf-8")]);
    assert_eq!(
        figures(&socket, "meter").get("snapshots"),
        Some(&1.0),
        "the provider's meter counts it"
    );
    ok(&socket, &["stop"]);
    let _ = vmm.0.wait();

    // Restored under a policy that grants no ports: it comes back disabled (the log says
    // why), so the guest finds no module and ends.
    let mut cmd = xcloud();
    cmd.args([
        "restore",
        snap.to_str().expect("utf-8"),
        "--api",
        socket.to_str().expect("utf-8"),
        "--ext-policy",
        "ports=no",
    ]);
    let (mut denied, lines) = spawn_lines(cmd);
    next_line(&lines, "kvclient: the module is gone");
    assert!(denied.0.wait().expect("the VMM ends").success());

    let mut cmd = xcloud();
    cmd.args([
        "restore",
        snap.to_str().expect("utf-8"),
        "--api",
        socket.to_str().expect("utf-8"),
    ]);
    let (mut restored, lines) = spawn_lines(cmd);
    wait_socket(&socket);
    let f = figures(&socket, "kv");
    assert_eq!(f.get("m0"), Some(&100.0), "its state came back: {f:?}");
    ok(&socket, &["ext", "rm", "kv"]);
    next_line(&lines, "kvclient: the module is gone");
    let status = restored.0.wait().expect("the VMM ends");
    assert!(status.success(), "{status}");
}

#[test]
fn a_cipher_module_keeps_the_image_encrypted_and_the_guest_reads_its_own_bytes() {
    use std::sync::Arc;
    use xcloud_vmm::extension::{ModuleSpec, Origin, TenantPolicy};
    use xcloud_vmm::{CaptureBuffer, Console, DiskSpec, Vm, VmConfig, VmExit};
    let dir = scratch("cipher");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(8 << 20))
        .expect("image");
    let code = std::fs::read(example("disk-cipher.wat")).expect("the example");
    // A 256 KiB request needs more fuel than the default: the provider grants it.
    let policy = TenantPolicy::parse("fuel=4M").expect("policy");
    let run = |guest: &str, cmdline: &str, cipher: bool| -> (VmExit, String) {
        let capture = CaptureBuffer::default();
        let config = VmConfig {
            mem_bytes: 64 << 20,
            vcpus: 1,
            cmdline: cmdline.into(),
            disks: vec![DiskSpec {
                path: image.clone(),
                read_only: false,
            }],
            nets: Vec::new(),
        };
        let elf = xcloud::guests::builtin(guest).expect("built-in guest");
        let mut vm = Vm::new(&config, elf, Console::new(Box::new(capture.clone()))).expect("VM");
        if cipher {
            let extensions = vm.handle().extensions().clone();
            extensions.set_policy(policy.clone());
            let module =
                xcloud_extensions::WasmModule::load(&code, &xcloud_extensions::Policy::default()).expect("loads");
            let spec = ModuleSpec {
                name: "cipher".into(),
                version: "1".into(),
                digest: module.digest.clone(),
                origin: Origin::Tenant,
                ports: None,
                call_budget: std::time::Duration::from_millis(50),
                code: Some(Arc::from(code.as_slice())),
            };
            extensions
                .add(spec, Arc::new(module))
                .expect("installed before the first write");
        }
        vm.start().expect("start");
        let exit = vm.wait();
        (exit, capture.text())
    };
    let (exit, text) = run("diskwrite", "4194304 7", true);
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}: {text}");
    // Without the module the image's bytes are not what the guest wrote.
    let (_, text) = run("diskread", "4194304 7", false);
    assert!(text.contains("does not hold what diskwrite"), "{text}");
    // With it, every byte reads back.
    let (exit, text) = run("diskread", "4194304 7", true);
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}: {text}");
    assert!(!text.contains("does not hold"), "{text}");
}
