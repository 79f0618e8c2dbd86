//! xcloudd and the tenant's CLI: a real daemon on a Unix socket, real VMM processes booting
//! real guests, tenants kept apart, quotas, snapshots, a daemon restart under running VMs.

mod common;

use common::{build_asm_guest, output_within, spawn_lines, stderr, stdout, xcloud, Proc};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use xcloud_control::client::Client;

/// An xcloudd on its own data directory; its VMs are killed with it when the test ends.
struct Daemon {
    proc: Option<Proc>,
    data: PathBuf,
    sock: PathBuf,
    admin: String,
    extra: Vec<String>,
}

impl Daemon {
    fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    fn start_with(name: &str, extra: &[&str]) -> Self {
        let data = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cloud-{name}"));
        let _ = std::fs::remove_dir_all(&data);
        let mut d = Self {
            proc: None,
            sock: data.join("xcloudd.sock"),
            data,
            admin: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d.admin = std::fs::read_to_string(d.data.join("admin.key"))
            .expect("the first start writes admin.key")
            .trim()
            .to_string();
        d
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_xcloudd"))
            .arg("--data")
            .arg(&self.data)
            .args(&self.extra)
            .env("XCLOUD_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start xcloudd");
        self.proc = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "xcloudd did not listen on {}",
                self.sock.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Makes tenant `name` with the admin key: its first key.
    fn tenant(&self, name: &str) -> String {
        stdout(&self.cli(&self.admin, &["tenant", "create", name]))
            .trim()
            .to_string()
    }

    /// Stops the daemon the way an operator does (SIGTERM) and starts it again.
    fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // SAFETY: kill sends SIGTERM to the daemon this test started.
            unsafe { libc::kill(p.id() as libc::pid_t, libc::SIGTERM) };
            let status = p.0.wait().expect("wait for xcloudd");
            assert!(status.success(), "xcloudd ended with {status} on SIGTERM");
        }
        self.spawn();
    }

    fn cli(&self, key: &str, args: &[&str]) -> Output {
        let mut cmd = xcloud();
        cmd.env("XCLOUD_URL", &self.sock).env("XCLOUD_TOKEN", key).args(args);
        output_within(cmd, Duration::from_secs(60))
    }

    /// `xcloud ARGS --json` that must succeed, as JSON (`--json` goes before the guest's
    /// arguments, if any).
    fn json(&self, key: &str, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.insert(args.iter().position(|a| *a == "--").unwrap_or(args.len()), "--json");
        let out = self.cli(key, &all);
        assert!(out.status.success(), "xcloud {args:?}: {}", stderr(&out));
        serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("xcloud {args:?} printed no JSON ({e}): {}", stdout(&out)))
    }

    /// `xcloud ARGS` that must fail; its error line.
    fn fails(&self, key: &str, args: &[&str]) -> String {
        let out = self.cli(key, args);
        assert!(!out.status.success(), "xcloud {args:?} succeeded: {}", stdout(&out));
        stderr(&out)
    }

    fn http(&self, key: Option<&str>, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let client = Client::new(self.sock.clone(), key.map(String::from));
        let answer = client
            .call(method, path, body.map(|b| (b.as_bytes().to_vec(), "application/json")))
            .expect("xcloudd answers");
        (answer.status, String::from_utf8_lossy(&answer.body).into_owned())
    }

    fn console(&self, key: &str, vm: &str) -> String {
        let out = self.cli(key, &["vm", "console", vm]);
        assert!(out.status.success(), "console: {}", stderr(&out));
        stdout(&out)
    }

    /// Waits until VM `vm`'s console holds `lines` lines starting with `prefix`.
    fn wait_console(&self, key: &str, vm: &str, prefix: &str, lines: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.console(key, vm);
            if text.lines().filter(|l| l.starts_with(prefix)).count() >= lines {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{vm}'s console never showed {lines} x {prefix:?}: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_state(&self, key: &str, vm: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.json(key, &["vm", "show", vm]);
            if v["state"] == state {
                return v;
            }
            assert!(Instant::now() < deadline, "{vm} never became {state}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The VMs outlive their daemon by design: end them with the test.
        if let Ok(answer) = Client::new(self.sock.clone(), Some(self.admin.clone())).call("GET", "/v1/vms", None) {
            let vms: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
            for vm in vms.as_array().into_iter().flatten() {
                if let Some(pid) = vm["pid"].as_u64() {
                    // SAFETY: kill sends a signal to a VMM this test's daemon started.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
    }
}

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z"))
}

fn wait_gone(pid: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "VMM {pid} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tenants_run_vms_from_their_images_within_their_quotas() {
    let d = Daemon::start("tenants");
    let admin = d.admin.clone();
    let acme = stdout(&d.cli(&admin, &["tenant", "create", "acme", "--vcpus", "2", "--vms", "2"]))
        .trim()
        .to_string();
    let other = d.tenant("other");
    assert!(
        acme.starts_with("xck_") && other.starts_with("xck_"),
        "{acme} / {other}"
    );
    assert!(d
        .fails(&admin, &["tenant", "create", "acme"])
        .contains("tenant acme exists"));
    assert!(d.fails(&acme, &["tenant", "ls"]).contains("only an admin"));
    assert_eq!(d.json(&acme, &["whoami"])["tenant"], "acme");

    // Images: content-addressed, per tenant, checked.
    let image = d.json(&acme, &["image", "push", "heartbeat"]);
    let id = image["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("sha256:") && id.len() == 7 + 64, "{id}");
    assert_eq!(
        d.json(&acme, &["image", "push", "heartbeat"])["id"],
        id.as_str(),
        "the same bytes, the same image"
    );
    let junk = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("not-an-elf");
    std::fs::write(&junk, b"#!/bin/sh\necho not a guest\n".repeat(8)).expect("write");
    assert!(d
        .fails(&acme, &["image", "push", junk.to_str().expect("path")])
        .contains("not a PVH ELF image"));
    assert_eq!(
        d.json(&other, &["image", "ls"]),
        Value::Array(vec![]),
        "another tenant's images are not listed"
    );

    // A VM boots and runs its guest; its console and metrics are there.
    let vm = d.json(&acme, &["vm", "create", "web", "--image", "heartbeat"]);
    assert_eq!(vm["state"], "running", "{vm}");
    let pid = vm["pid"].as_u64().expect("a VMM pid");
    d.wait_console(&acme, "web", "heartbeat n=", 2);
    let m = d.json(&acme, &["vm", "metrics", "web"]);
    assert!(
        m["cpu_seconds"].as_f64().unwrap_or(0.0) > 0.0 && m["rss_bytes"].as_u64().unwrap_or(0) > 1 << 20,
        "{m}"
    );

    // Tenants are kept apart: another tenant finds neither the name nor the id.
    let vm_id = vm["id"].as_str().expect("id").to_string();
    assert!(d.fails(&other, &["vm", "show", "web"]).contains("no VM web"));
    assert!(d.fails(&other, &["vm", "stop", &vm_id]).contains("404"));
    assert_eq!(d.json(&other, &["vm", "ls"]), Value::Array(vec![]));
    assert!(d
        .fails(&other, &["vm", "create", "x", "--image", &id])
        .contains("no image"));

    // Quotas: acme has 2 vCPUs, web holds 1.
    let err = d.fails(
        &acme,
        &["vm", "create", "big", "--image", "heartbeat", "--type", "x1.medium"],
    );
    assert!(err.contains("quota: 3 vCPUs") && err.contains("403"), "{err}");
    assert!(d
        .fails(&acme, &["vm", "create", "web", "--image", "heartbeat"])
        .contains("a VM named web exists"));

    // Pause holds the guest: its console does not grow; resume lets it go on.
    assert_eq!(d.json(&acme, &["vm", "pause", "web"])["state"], "paused");
    let before = d.console(&acme, "web");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(d.console(&acme, "web"), before, "a paused guest printed");
    assert!(d.fails(&acme, &["vm", "pause", "web"]).contains("409"));
    let snap = d.json(&acme, &["vm", "snapshot", "web"]);
    assert!(snap["bytes"].as_u64().unwrap_or(0) > 0, "{snap}");
    assert_eq!(d.json(&acme, &["vm", "resume", "web"])["state"], "running");
    let n = before.lines().filter(|l| l.starts_with("heartbeat n=")).count();
    d.wait_console(&acme, "web", "heartbeat n=", n + 2);

    // Restore replaces the VMM with one from the snapshot; the guest goes on from there.
    let snap_id = snap["id"].as_str().expect("id");
    let restored = d.json(&acme, &["vm", "restore", "web", snap_id]);
    assert_eq!(restored["state"], "running", "{restored}");
    wait_gone(pid);
    let pid = restored["pid"].as_u64().expect("pid");
    let n = d
        .console(&acme, "web")
        .lines()
        .filter(|l| l.starts_with("heartbeat n="))
        .count();
    d.wait_console(&acme, "web", "heartbeat n=", n + 2);
    assert!(d.fails(&other, &["vm", "restore", "web", snap_id]).contains("404"));

    // A snapshot's files, as another host copies them: to its own tenant, byte for byte.
    let vm_id = vm["id"].as_str().expect("id");
    let on_disk = d.data.join("vms").join(vm_id).join("snapshots").join(snap_id);
    let client = Client::new(d.sock.clone(), Some(acme.clone()));
    for file in ["vm.state", "memory.pages"] {
        let path = format!("/v1/vms/web/snapshots/{snap_id}/files/{file}");
        let answer = client.call("GET", &path, None).expect("xcloudd answers");
        assert_eq!(answer.status, 200, "{file}");
        assert_eq!(
            answer.body,
            std::fs::read(on_disk.join(file)).expect("the file"),
            "{file}"
        );
    }
    for (key, file) in [
        (&other, "vm.state"),
        (&acme, "..%2F..%2F..%2Fadmin.key"),
        (&acme, "console.log"),
    ] {
        let path = format!("/v1/vms/{vm_id}/snapshots/{snap_id}/files/{file}");
        let (status, body) = d.http(Some(key), "GET", &path, None);
        assert_eq!(status, 404, "{file}: {body}");
    }
    // Deleting it removes its record and its files; a second time it is not found.
    assert!(d.fails(&other, &["vm", "snapshot-rm", vm_id, snap_id]).contains("404"));
    assert!(d.cli(&acme, &["vm", "snapshot-rm", "web", snap_id]).status.success());
    assert_eq!(d.json(&acme, &["vm", "snapshots", "web"]), Value::Array(vec![]));
    assert!(!on_disk.exists(), "{} is still there", on_disk.display());
    assert!(d.fails(&acme, &["vm", "snapshot-rm", "web", snap_id]).contains("404"));

    // Stop ends the VMM; the VM stays, and its running time is metered.
    assert_eq!(d.json(&acme, &["vm", "stop", "web"])["state"], "stopped");
    wait_gone(pid);
    let usage = d.json(&acme, &["usage"]);
    let line = &usage["lines"][0];
    let figure = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let run = figure(line, "run_seconds");
    assert!(run > 2.0 && figure(&usage["total"], "cost") > 0.0, "{usage}");
    assert_eq!(line["key"], vm["id"], "{usage}");
    assert!((figure(line, "vcpu_seconds") - run).abs() < 1e-6, "one vCPU: {usage}");
    assert!(
        (figure(line, "mem_mib_seconds") - 64.0 * run).abs() < 1e-3,
        "64 MiB: {usage}"
    );
    assert!(figure(line, "cpu_seconds") > 0.0, "{usage}");
    // Metering stopped with the VMM: a second report says the same.
    let again = d.json(&acme, &["usage", "--by", "tenant"]);
    assert_eq!(again["lines"][0]["key"], "acme", "{again}");
    assert!(
        (figure(&again["lines"][0], "run_seconds") - run).abs() < 1e-6,
        "{again}"
    );
    assert_eq!(
        d.json(&other, &["usage"])["lines"],
        Value::Array(vec![]),
        "another tenant sees none"
    );
    assert!(d.fails(&acme, &["usage", "--by", "colour"]).contains("400"));
    assert!(d.fails(&acme, &["usage", "--since", "yesterday"]).contains("time ago"));
    assert!(d.fails(&acme, &["vm", "stop", "web"]).contains("not running"));
    assert!(d
        .fails(&acme, &["image", "rm", "heartbeat"])
        .contains("used by VMs web"));
    assert!(d.cli(&acme, &["vm", "rm", "web"]).status.success());
    let kept = d.json(&acme, &["usage"]);
    assert!(
        (figure(&kept["total"], "run_seconds") - run).abs() < 1e-6,
        "usage outlives the VM: {kept}"
    );
    assert!(d.cli(&acme, &["image", "rm", "heartbeat"]).status.success());
    assert_eq!(d.json(&acme, &["vm", "ls"]), Value::Array(vec![]));

    // Wrong calls get a status and one JSON error line, never a hang or a crash.
    let (status, body) = d.http(None, "GET", "/v1/vms", None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = d.http(
        Some("xck_000000000000_0000000000000000000000000000000000000000000000000000000000000000"),
        "GET",
        "/v1/vms",
        None,
    );
    assert_eq!(status, 401, "{body}");
    for bad in [
        "{",
        "[]",
        r#"{"name":"a","image":"x","cores":4}"#,
        r#"{"name":"../x","image":"x"}"#,
    ] {
        let (status, body) = d.http(Some(&acme), "POST", "/v1/vms", Some(bad));
        assert_eq!(status, 400, "{bad}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{bad}: not JSON: {body}"));
        assert!(v["error"].is_string(), "{body}");
    }
    let (status, _) = d.http(Some(&acme), "GET", "/v2/vms", None);
    assert_eq!(status, 404);
    let (status, doc) = d.http(None, "GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).expect("OpenAPI JSON");
    assert!(doc["paths"]["/v1/vms/{vm}/snapshots"]["post"].is_object(), "{doc}");
    assert!(d
        .fails(&admin, &["tenant", "rm", "admin"])
        .contains("cannot be removed"));
    assert!(d.cli(&admin, &["tenant", "rm", "other"]).status.success());
    assert!(
        d.fails(&other, &["vm", "ls"]).contains("401"),
        "a removed tenant's key is dead"
    );
}

#[test]
fn vms_outlive_a_daemon_restart_and_their_ends_are_recorded() {
    let mut d = Daemon::start("restart");
    let admin = d.admin.clone();
    let mut events = xcloud();
    events
        .env("XCLOUD_URL", &d.sock)
        .env("XCLOUD_TOKEN", &admin)
        .args(["events", "--count", "3"]);
    let (_events, lines) = spawn_lines(events);
    std::thread::sleep(Duration::from_millis(300));
    d.json(&admin, &["image", "push", "heartbeat"]);
    let vm = d.json(&admin, &["vm", "create", "hb", "--image", "heartbeat"]);
    let pid = vm["pid"].as_u64().expect("pid");
    let kinds: Vec<String> = (0..3)
        .map(|_| {
            let line = lines.recv_timeout(Duration::from_secs(10)).expect("an event");
            let e: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("event line {line}"));
            e["kind"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(kinds, ["image.created", "vm.created", "vm.running"]);

    // The daemon goes away and comes back: the VM ran on and is watched again.
    d.wait_console(&admin, "hb", "heartbeat n=", 1);
    d.restart();
    assert!(alive(pid), "the VM's VMM ended with its daemon");
    assert_eq!(d.json(&admin, &["vm", "show", "hb"])["state"], "running");
    let n = d
        .console(&admin, "hb")
        .lines()
        .filter(|l| l.starts_with("heartbeat n="))
        .count();
    d.wait_console(&admin, "hb", "heartbeat n=", n + 1);
    assert_eq!(d.json(&admin, &["vm", "stop", "hb"])["state"], "stopped");
    wait_gone(pid);

    // A VMM killed behind the daemon's back: recorded as failed, with why.
    let vm = d.json(&admin, &["vm", "start", "hb"]);
    let pid = vm["pid"].as_u64().expect("pid");
    let vmm = d.json(&admin, &["vm", "metrics", "hb"])["vmm_pid"]
        .as_u64()
        .expect("vmm pid");
    // SAFETY: kill sends SIGKILL to the VMM this test's daemon started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let v = d.wait_state(&admin, "hb", "failed");
    assert!(v["exit"].as_str().unwrap_or("").contains("signal 9"), "{v}");
    wait_gone(vmm);

    // A guest that ends by itself is recorded as exited.
    d.json(&admin, &["image", "push", "hello"]);
    d.json(&admin, &["vm", "create", "once", "--image", "hello"]);
    let v = d.wait_state(&admin, "once", "exited");
    assert!(v["exit"].as_str().unwrap_or("").contains("exit status 0"), "{v}");
    assert!(d.console(&admin, "once").contains("Hello from xcloud guest"));

    // An ELF the VMM cannot boot: one clear error, the VM recorded as failed.
    let elf = build_asm_guest("cloud-no-note", ".text\n.globl _start\n_start: hlt\n");
    d.json(&admin, &["image", "push", elf.to_str().expect("path"), "--name", "bad"]);
    let err = d.fails(&admin, &["vm", "create", "broken", "--image", "bad"]);
    assert!(err.contains("did not start") && err.contains("PVH"), "{err}");
    assert_eq!(d.json(&admin, &["vm", "show", "broken"])["state"], "failed");

    // A second daemon on the same data refuses at once.
    let mut second = Command::new(env!("CARGO_BIN_EXE_xcloudd"));
    second
        .arg("--data")
        .arg(&d.data)
        .arg("--socket")
        .arg(d.data.join("second.sock"));
    let out = output_within(second, Duration::from_secs(10));
    assert!(
        !out.status.success() && stderr(&out).contains("another xcloudd uses"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn each_vmm_runs_in_its_own_cgroup_with_its_weight_cap_and_memory_limit() {
    let d = Daemon::start("cgroups");
    let admin = d.admin.clone();
    d.json(&admin, &["image", "push", "heartbeat"]);
    let (status, body) = d.http(
        Some(&admin),
        "POST",
        "/v1/vms",
        Some(r#"{"name":"capped","image":"heartbeat","cpu_weight":300,"cpu_cap_percent":20}"#),
    );
    assert_eq!(status, 201, "{body}");
    let vm: Value = serde_json::from_str(&body).expect("json");
    let pid = vm["pid"].as_u64().expect("pid");
    let m = d.json(&admin, &["vm", "metrics", "capped"]);
    let dirs: Vec<PathBuf> = m["cgroups"]
        .as_array()
        .expect("cgroups")
        .iter()
        .map(|p| PathBuf::from(p.as_str().expect("path")))
        .collect();
    assert!(!dirs.is_empty(), "this host has cgroups: the VMM must be in one: {m}");
    let read = |name: &str| {
        dirs.iter()
            .map(|d| d.join(name))
            .find(|p| p.exists())
            .map(|p| std::fs::read_to_string(p).expect("read").trim().to_string())
    };
    let limit = ((64u64 + 64) << 20).to_string();
    match read("cpu.shares") {
        Some(shares) => {
            assert_eq!(shares, "3072");
            assert_eq!(read("cpu.cfs_quota_us").as_deref(), Some("20000"));
            assert_eq!(read("memory.limit_in_bytes"), Some(limit));
        }
        None => {
            assert_eq!(read("cpu.weight").as_deref(), Some("300"));
            assert_eq!(read("cpu.max").as_deref(), Some("20000 100000"));
            assert_eq!(read("memory.max"), Some(limit));
        }
    }
    let vmm = m["vmm_pid"].as_u64().expect("the VMM's pid");
    let own = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).expect("cgroup");
    assert!(
        own.contains(vm["id"].as_str().expect("id")),
        "the VMM is not in its cgroup: {own}"
    );

    // The jail: an unprivileged uid, no new privileges, a seccomp filter, namespaces of its
    // own, and a root that holds only the VM's own files.
    assert_ne!(vmm, pid, "xcloudd runs as root here, so the VMM runs under its jail");
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert!(field("Uid:").parse::<u32>().expect("uid") >= 200_000, "{status}");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "no seccomp filter");
    for ns in ["pid", "mnt"] {
        let theirs = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).expect("ns");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
        assert_ne!(theirs, ours, "the VMM shares our {ns} namespace");
    }
    let mut seen: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/root"))
        .expect("the VMM's root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        ["api.sock", "console.log", "dev", "image", "proc", "vmm.log"],
        "the VMM sees more than its own files"
    );

    // The cap holds: a guest that spins gets at most 20% of a CPU (plus one period of slack).
    let cpu = || {
        d.json(&admin, &["vm", "metrics", "capped"])["cpu_seconds"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let (c0, t0) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (used, wall) = (cpu() - c0, t0.elapsed().as_secs_f64());
    assert!(
        used <= 0.2 * wall + 0.12,
        "a VM capped at 20% used {used:.2} CPU s in {wall:.2} s"
    );
    assert!(used > 0.05, "the capped VM did not run at all: {used:.2} CPU s");

    d.json(&admin, &["vm", "stop", "capped"]);
    wait_gone(pid);
    wait_gone(vmm);
    let deadline = Instant::now() + Duration::from_secs(5);
    while dirs.iter().any(|d| d.exists()) {
        assert!(
            Instant::now() < deadline,
            "the cgroups of a stopped VM stayed: {dirs:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_api_is_served_over_tls_to_clients_that_pin_its_certificate() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (identity, stranger) = (tmp.join("cloud-tls-identity"), tmp.join("cloud-tls-stranger"));
    for dir in [&identity, &stranger] {
        let _ = std::fs::remove_dir_all(dir);
        let out = common::run(&["keygen", dir.to_str().expect("path")]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let addr = format!("127.0.0.1:{}", 20_000 + std::process::id() % 20_000);
    let d = Daemon::start_with(
        "tls",
        &["--tls-listen", &addr, "--identity", identity.to_str().expect("path")],
    );
    let endpoint = format!("https://{addr}");
    let over_tls = |cert: &PathBuf, key: Option<&str>| {
        let mut cmd = xcloud();
        cmd.env("XCLOUD_URL", &endpoint)
            .env("XCLOUD_SERVER_CERT", cert.join("cert.der"))
            .args(["whoami", "--json"]);
        if let Some(key) = key {
            cmd.env("XCLOUD_TOKEN", key);
        }
        output_within(cmd, Duration::from_secs(30))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = over_tls(&identity, Some(&d.admin));
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(out.status.success(), "whoami over TLS: {}", stderr(&out));
    assert!(stdout(&out).contains("\"admin\""), "{}", stdout(&out));

    // Another certificate pinned: the handshake fails, nothing is sent.
    let out = over_tls(&stranger, Some(&d.admin));
    assert!(
        !out.status.success() && stderr(&out).contains("TLS handshake failed"),
        "{}",
        stderr(&out)
    );
    // TLS without a key: 401, as on the socket.
    let out = over_tls(&identity, None);
    assert!(
        !out.status.success() && stderr(&out).contains("401"),
        "{}",
        stderr(&out)
    );
    // Plain HTTP to the TLS port gets no answer, and the daemon goes on serving.
    use std::io::{Read, Write};
    let mut plain = std::net::TcpStream::connect(&addr).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let _ = plain.write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "plain HTTP was served"
    );
    assert!(over_tls(&identity, Some(&d.admin)).status.success());
}

/// `xcloud ARGS` with only the config file at `config` to say where the daemon is.
fn with_config(config: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = xcloud();
    cmd.env("XCLOUD_CONFIG", config).args(args);
    output_within(cmd, Duration::from_secs(30))
}

#[test]
fn the_cli_finds_daemons_and_keys_through_profiles_and_exits_with_what_went_wrong() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let identity = tmp.join("cloud-profile-identity");
    let _ = std::fs::remove_dir_all(&identity);
    assert!(common::run(&["keygen", identity.to_str().expect("path")])
        .status
        .success());
    let addr = format!("127.0.0.1:{}", 20_000 + (std::process::id() + 7) % 20_000);
    let d = Daemon::start_with(
        "profiles",
        &["--tls-listen", &addr, "--identity", identity.to_str().expect("path")],
    );
    let acme = d.tenant("acme");
    let config = tmp.join("cloud-profile-config/config.toml");
    let _ = std::fs::remove_dir_all(config.parent().expect("dir"));
    let key_file = tmp.join("cloud-profile-acme.key");
    std::fs::write(&key_file, format!("{acme}\n")).expect("key file");
    let set = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = xcloud();
        cmd.env("XCLOUD_CONFIG", &config).args(["config", "set"]).args(args);
        let out = match stdin {
            Some(text) => {
                use std::io::Write;
                cmd.stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                let mut child = cmd.spawn().expect("xcloud config set");
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(text.as_bytes())
                    .expect("key");
                child.wait_with_output().expect("wait")
            }
            None => output_within(cmd, Duration::from_secs(30)),
        };
        assert!(out.status.success(), "config set {args:?}: {}", stderr(&out));
    };
    // acme over TLS with its key in a file, the default; admin on the socket, key typed in.
    let cert = identity.join("cert.der");
    let url = format!("https://{addr}");
    let key_path = key_file.to_str().expect("path");
    set(
        &[
            "acme",
            "--url",
            &url,
            "--server-cert",
            cert.to_str().expect("path"),
            "--token-file",
            key_path,
        ],
        None,
    );
    set(
        &["ops", "--url", d.sock.to_str().expect("path"), "--token-stdin"],
        Some(&format!("{}\n", d.admin)),
    );
    let mode = std::fs::metadata(&config).expect("written").permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);

    let deadline = Instant::now() + Duration::from_secs(10);
    let whoami = loop {
        let out = with_config(&config, &["whoami", "--json"]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(whoami.status.success(), "{}", stderr(&whoami));
    assert!(
        stdout(&whoami).contains("\"acme\""),
        "the default profile: {}",
        stdout(&whoami)
    );
    let out = with_config(&config, &["whoami", "--json", "--profile", "ops"]);
    assert!(stdout(&out).contains("\"admin\""), "{}", stderr(&out));
    let shown = with_config(&config, &["config", "show", "--json"]);
    let shown: Value = serde_json::from_str(&stdout(&shown)).expect("config show --json");
    assert_eq!(
        (shown["profile"].as_str(), shown["url"].as_str()),
        (Some("acme"), Some(url.as_str()))
    );
    assert!(
        !stdout(&with_config(&config, &["config", "show"])).contains(&acme),
        "the key is never shown"
    );

    // Exit statuses a script can rely on.
    let status = |args: &[&str]| with_config(&config, args).status.code();
    assert_eq!(status(&["vm", "show", "nope"]), Some(3), "not found");
    assert_eq!(status(&["tenant", "ls"]), Some(4), "a tenant on an admin route");
    assert_eq!(
        status(&["tenant", "create", "acme", "--profile", "ops"]),
        Some(5),
        "a name taken"
    );
    assert_eq!(status(&["whoami", "--profile", "nope"]), Some(2), "no such profile");
    assert_eq!(
        status(&["whoami", "--url", "http://127.0.0.1:1"]),
        Some(2),
        "plain http"
    );
    assert_eq!(status(&["vm", "bogus"]), Some(2), "a wrong command");
    let gone = tmp.join("cloud-profile-nothing.sock");
    assert_eq!(
        status(&["whoami", "--url", gone.to_str().expect("path")]),
        Some(6),
        "no daemon"
    );
    // Another daemon named by a flag: the profile's key is not sent there.
    let out = with_config(&config, &["whoami", "--url", gone.to_str().expect("path"), "--json"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let out = with_config(
        &config,
        &["config", "show", "--url", gone.to_str().expect("path"), "--json"],
    );
    let shown: Value = serde_json::from_str(&stdout(&out)).expect("config show --json");
    assert_eq!(shown["token"], Value::Null, "{shown}");
    // Profiles are removed; the default goes with its profile.
    assert!(with_config(&config, &["config", "rm", "acme"]).status.success());
    assert_eq!(status(&["config", "rm", "acme"]), Some(2));
    let out = with_config(&config, &["config", "ls", "--json"]);
    let profiles: Value = serde_json::from_str(&stdout(&out)).expect("config ls --json");
    assert_eq!(profiles.as_array().map(Vec::len), Some(1), "{profiles}");
}

#[test]
fn slow_clients_are_cut_off_and_hold_nobody_up() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let d = Daemon::start("slow");
    let started = Instant::now();
    // Headers that never end, and a body that never comes.
    let mut trickle = UnixStream::connect(&d.sock).expect("connect");
    trickle
        .write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let mut stalled = UnixStream::connect(&d.sock).expect("connect");
    let head = format!(
        "POST /v1/vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"na",
        d.admin
    );
    stalled.write_all(head.as_bytes()).expect("write");
    // Meanwhile the daemon answers everyone else at once.
    let t = Instant::now();
    assert_eq!(d.json(&d.admin, &["whoami"])["tenant"], "admin");
    assert!(t.elapsed() < Duration::from_secs(5), "a slow client held up another");
    for s in [&trickle, &stalled] {
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    }
    let mut answer = Vec::new();
    let _ = stalled.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("did not arrive"),
        "{answer}"
    );
    let mut rest = Vec::new();
    let n = trickle.read_to_end(&mut rest).unwrap_or(0);
    assert!(
        n == 0 || !String::from_utf8_lossy(&rest).contains("200 OK"),
        "trickled headers were served"
    );
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(25), "slow clients were held {waited:?}");
}

#[test]
fn prometheus_scrapes_each_vms_figures_with_the_admin_key() {
    let d = Daemon::start("metrics");
    let admin = d.admin.clone();
    let acme = d.tenant("acme");
    d.json(&acme, &["image", "push", "heartbeat"]);
    let vm = d.json(&acme, &["vm", "create", "web", "--image", "heartbeat"]);
    let id = vm["id"].as_str().expect("id").to_string();
    d.wait_console(&acme, "web", "heartbeat n=", 1);
    let (status, text) = d.http(Some(&admin), "GET", "/metrics", None);
    assert_eq!(status, 200, "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("vm=\"{id}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} for {id} in:\n{text}"))
    };
    assert!(line("xcloud_vm_cpu_seconds") > 0.0);
    assert!(line("xcloud_vm_resident_bytes") > 1e6);
    assert_eq!(line("xcloud_vm_up"), 1.0);
    assert_eq!(line("xcloud_vm_memory_bytes"), (64u64 << 20) as f64);
    assert!(text.contains("xcloud_host_vms{state=\"running\"} 1"), "{text}");
    assert!(text.contains("# TYPE xcloud_vm_cpu_seconds gauge"), "{text}");
    assert_eq!(d.http(Some(&acme), "GET", "/metrics", None).0, 403);
    assert_eq!(d.http(None, "GET", "/metrics", None).0, 401);
}

/// The names of group `group`'s VMs once it has `count` of them (45 s at most).
fn wait_group(d: &Daemon, key: &str, group: &str, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let g = d.json(key, &["group", "show", group]);
        let now: Vec<String> = g["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        if now.len() == count {
            return now;
        }
        assert!(Instant::now() < deadline, "{group} never had {count} VMs: {g}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_group_follows_the_load_its_guests_report_whatever_their_cpu() {
    let d = Daemon::start_with("guest-load", &["--autoscale-seconds", "1"]);
    let acme = d.tenant("acme");
    d.json(&acme, &["image", "push", "gauge"]);
    // Each gauge reports 25 and sleeps: at a target of 10 the group grows to its max.
    let created = d.json(
        &acme,
        &[
            "group",
            "create",
            "jobs",
            "--image",
            "gauge",
            "--max",
            "4",
            "--target-load",
            "10",
            "--cooldown",
            "1",
            "--",
            "25",
        ],
    );
    assert_eq!(created["metric"], "guest_load", "{created}");
    assert_eq!(wait_group(&d, &acme, "jobs", 4).len(), 4);
    let metrics = d.json(&acme, &["vm", "metrics", "jobs-1"]);
    assert_eq!(metrics["guest_load"].as_f64(), Some(25.0), "{metrics}");
    assert!(metrics["cpu_seconds"].as_f64().unwrap_or(f64::MAX) < 2.0, "{metrics}");
    // Prometheus sees each guest's load too.
    let (status, scraped) = d.http(Some(&d.admin), "GET", "/metrics", None);
    assert_eq!(status, 200, "{scraped}");
    let loads: Vec<&str> = scraped
        .lines()
        .filter(|l| l.starts_with("xcloud_vm_guest_load{"))
        .collect();
    assert_eq!(loads.len(), 4, "{scraped}");
    assert!(loads.iter().all(|l| l.ends_with(" 25.0")), "{loads:?}");
    // A target of 100: one VM does.
    d.json(&acme, &["group", "set", "jobs", "--target-load", "100"]);
    assert_eq!(wait_group(&d, &acme, "jobs", 1), ["jobs-1"]);
    let shown = d.json(&acme, &["group", "show", "jobs"]);
    assert_eq!(shown["reading"].as_f64(), Some(25.0), "{shown}");
    // Bad targets and metrics.
    assert!(d
        .fails(&acme, &["group", "set", "jobs", "--target-load", "0"])
        .contains("guest_load target"));
    let (status, body) = d.http(Some(&acme), "PATCH", "/v1/groups/jobs", Some(r#"{"metric":"cpu"}"#));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("target"), "{body}");
    let (status, body) = d.http(
        Some(&acme),
        "PATCH",
        "/v1/groups/jobs",
        Some(r#"{"metric":"disk","target":5}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(d.json(&acme, &["group", "show", "jobs"])["metric"], "guest_load");

    // A group whose VMs cannot start replaces them ever more slowly (2, 4, 8 s...), not at
    // every look, and says why.
    let elf = build_asm_guest("group-no-note", ".text\n.globl _start\n_start: hlt\n");
    d.json(&acme, &["image", "push", elf.to_str().expect("path"), "--name", "bad"]);
    d.json(
        &acme,
        &[
            "group",
            "create",
            "doomed",
            "--image",
            "bad",
            "--max",
            "1",
            "--target-cpu",
            "50",
        ],
    );
    std::thread::sleep(Duration::from_secs(8));
    let g = d.json(&acme, &["group", "show", "doomed"]);
    let made = g["next_index"].as_u64().unwrap_or(0).saturating_sub(1);
    assert!((2..=4).contains(&made), "{made} VMs in 8 s: {g}");
    assert!(
        g["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("failed to start one after another"),
        "{g}"
    );
}

#[test]
fn an_autoscaling_group_grows_under_load_and_shrinks_when_its_target_rises() {
    let d = Daemon::start_with("groups", &["--autoscale-seconds", "1"]);
    let acme = d.tenant("acme");
    let other = d.tenant("other");
    d.json(&acme, &["image", "push", "heartbeat"]);
    // heartbeat spins; capped at 40% of a CPU it sits above a 30% target until there are 3.
    let args = [
        "group",
        "create",
        "web",
        "--image",
        "heartbeat",
        "--max",
        "3",
        "--target-cpu",
        "30",
        "--cooldown",
        "2",
        "--cpu-cap",
        "40",
    ];
    let created = d.json(&acme, &args);
    assert_eq!(
        (created["min"].as_u64(), created["max"].as_u64()),
        (Some(1), Some(3)),
        "{created}"
    );
    assert_eq!(wait_group(&d, &acme, "web", 3), ["web-1", "web-2", "web-3"]);
    for vm in ["web-1", "web-2", "web-3"] {
        d.wait_state(&acme, vm, "running");
    }
    let table = stdout(&d.cli(&acme, &["group", "ls"]));
    let row: Vec<&str> = table.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    // NAME METRIC MIN MAX DESIRED VMS ...: the desired count moves with each look.
    assert_eq!(row.get(..4), Some(&["web", "cpu", "1", "3"][..]), "{table}");
    assert_eq!(row.get(5), Some(&"3"), "{table}");
    // A target of 90%: one VM at 40% does; the newest go first, one per cooldown.
    d.json(&acme, &["group", "set", "web", "--target-cpu", "90"]);
    assert_eq!(wait_group(&d, &acme, "web", 1), ["web-1"]);
    // Bad input, another tenant's group.
    assert!(d
        .fails(&acme, &["group", "set", "web", "--min", "5"])
        .contains("min <= max"));
    assert!(d.fails(&acme, &args).contains("exists"));
    assert!(d.fails(&other, &["group", "show", "web"]).contains("no group web"));
    assert!(d.fails(&other, &["group", "rm", "web"]).contains("404"));
    let (status, body) = d.http(
        Some(&acme),
        "POST",
        "/v1/groups",
        Some(r#"{"name":"x","image":"heartbeat","min":1,"max":2,"target":50,"bogus":1}"#),
    );
    assert_eq!(status, 400, "{body}");
    // A CPU share no VM could have is refused when the group is made, not at each VM.
    for share in [r#""cpu_weight":0"#, r#""cpu_weight":10001"#, r#""cpu_cap_percent":0"#] {
        let body = format!(r#"{{"name":"x","image":"heartbeat","min":0,"max":2,"target":50,{share}}}"#);
        let (status, answer) = d.http(Some(&acme), "POST", "/v1/groups", Some(&body));
        assert_eq!(status, 400, "{share}: {answer}");
    }
    assert!(d.fails(&acme, &["group", "show", "x"]).contains("no group x"));
    // Removing the group removes its VMs.
    assert!(d.cli(&acme, &["group", "rm", "web"]).status.success());
    assert_eq!(d.json(&acme, &["vm", "ls"]), Value::Array(vec![]));
}

#[test]
fn a_tenant_installs_uses_and_removes_a_module_in_its_jailed_vm_through_the_api() {
    let d = Daemon::start_with("extensions", &["--ext-policy", "blocks=no"]);
    let acme = d.tenant("acme");
    let other = d.tenant("other");
    d.json(&acme, &["image", "push", "kvclient"]);
    d.json(&acme, &["vm", "create", "kv-user", "--image", "kvclient", "--", "200"]);
    d.wait_console(&acme, "kv-user", "kvclient: waiting for the kv module", 1);
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../extensions");
    let kv = examples.join("kv.wat");
    let kv = kv.to_str().expect("utf-8");

    // What cannot go in: nothing changes.
    let junk = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("junk.wasm");
    std::fs::write(&junk, b"\0asm garbage").expect("write");
    let err = d.fails(
        &acme,
        &[
            "vm",
            "ext-add",
            "kv-user",
            junk.to_str().expect("utf-8"),
            "--name",
            "junk",
        ],
    );
    assert!(err.contains("400") && err.contains("not a WebAssembly module"), "{err}");
    let audit = examples.join("block-audit.wat");
    let err = d.fails(
        &acme,
        &[
            "vm",
            "ext-add",
            "kv-user",
            audit.to_str().expect("utf-8"),
            "--name",
            "audit",
        ],
    );
    assert!(
        err.contains("403") && err.contains("block hook"),
        "the provider's policy: {err}"
    );
    let err = d.fails(&other, &["vm", "ext-add", "kv-user", kv, "--name", "kv"]);
    assert!(err.contains("404"), "another tenant's VM: {err}");
    let (status, body) = d.http(Some(&acme), "POST", "/v1/vms/kv-user/extensions", Some("(module)"));
    assert_eq!(status, 400, "no name: {body}");

    // In, used by the guest in its jail (seccomp and all), listed with its figures.
    let added = d.json(
        &acme,
        &[
            "vm",
            "ext-add",
            "kv-user",
            kv,
            "--name",
            "kv",
            "--version",
            "1.0",
            "--ports",
            "0x5000+16",
        ],
    );
    assert_eq!(
        (added["name"].as_str(), added["origin"].as_str()),
        (Some("kv"), Some("tenant")),
        "{added}"
    );
    assert_eq!(added["digest"].as_str().map(str::len), Some(64), "{added}");
    d.wait_console(&acme, "kv-user", "kvclient: 200 stored", 1);
    let listed = d.json(&acme, &["vm", "extensions", "kv-user"]);
    let modules = listed.as_array().expect("a list");
    let kv_row = modules.iter().find(|m| m["name"] == "kv").expect("kv listed");
    assert_eq!(kv_row["metrics"]["m0"].as_f64(), Some(200.0), "{listed}");
    assert_eq!(kv_row["ports"], "0x5000+16", "{listed}");
    assert!(
        modules
            .iter()
            .any(|m| m["name"] == "meter" && m["origin"] == "provider"),
        "{listed}"
    );
    assert!(d
        .fails(&acme, &["vm", "ext-add", "kv-user", kv, "--name", "kv"])
        .contains("409"));
    assert!(d.fails(&acme, &["vm", "ext-rm", "kv-user", "meter"]).contains("403"));
    assert!(d.fails(&acme, &["vm", "ext-rm", "kv-user", "nothing"]).contains("404"));
    assert!(d.fails(&other, &["vm", "ext-rm", "kv-user", "kv"]).contains("404"));

    // Out: the guest sees it go and ends.
    let out = d.cli(&acme, &["vm", "ext-rm", "kv-user", "kv"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_console(&acme, "kv-user", "kvclient: the module is gone", 1);
    d.wait_state(&acme, "kv-user", "exited");
    let err = d.fails(&acme, &["vm", "extensions", "kv-user"]);
    assert!(err.contains("409") && err.contains("no running VMM"), "{err}");
}
