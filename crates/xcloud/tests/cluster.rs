//! A cluster: real etcd and three xcloudd hosts, each in its own network namespace, the API
//! over TLS between them. VMs are placed by the elected scheduler, reached through any host,
//! kept apart by tenant, restarted elsewhere when their host dies, and never run twice when a
//! host comes back.

mod common;

use common::{output_within, stderr, stdout, xcloud};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use xcloud::lab::{default_hosts, Lab, LabHost};

/// Seconds a dead host stays registered in these tests.
const LEASE_TTL: u32 = 3;

/// One lab at a time: each boots several guests, and two cores are all there is.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lab(name: &str) -> (Lab, std::sync::MutexGuard<'static, ()>) {
    lab_with(name, &[])
}

fn lab_with(name: &str, extra: &[&str]) -> (Lab, std::sync::MutexGuard<'static, ()>) {
    let guard = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lab-{name}"));
    let xcloudd = Path::new(env!("CARGO_BIN_EXE_xcloudd"));
    let lab = Lab::up_with(&dir, &default_hosts(), xcloudd, LEASE_TTL, extra).expect("the lab starts");
    (lab, guard)
}

/// `xcloud ARGS` against `host`'s API with `key`.
fn cli(host: &LabHost, key: &str, args: &[&str]) -> Output {
    let mut cmd = xcloud();
    cmd.env("XCLOUD_URL", host.endpoint())
        .env("XCLOUD_SERVER_CERT", host.cert())
        .env("XCLOUD_TOKEN", key)
        .args(args);
    output_within(cmd, Duration::from_secs(60))
}

fn ok(host: &LabHost, key: &str, args: &[&str]) -> String {
    let out = cli(host, key, args);
    assert!(
        out.status.success(),
        "xcloud {args:?} on {}: {}",
        host.spec.name,
        stderr(&out)
    );
    stdout(&out)
}

fn json(host: &LabHost, key: &str, args: &[&str]) -> Value {
    // Before a guest's arguments, which follow `--`.
    let mut all = args.to_vec();
    let at = all.iter().position(|a| *a == "--").unwrap_or(all.len());
    all.insert(at, "--json");
    let text = ok(host, key, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("xcloud {args:?} printed no JSON ({e}): {text}"))
}

fn fails(host: &LabHost, key: &str, args: &[&str]) -> String {
    let out = cli(host, key, args);
    assert!(
        !out.status.success(),
        "xcloud {args:?} on {} succeeded: {}",
        host.spec.name,
        stdout(&out)
    );
    stderr(&out)
}

/// Waits until `check` holds for VM `vm` as host `host` shows it.
fn wait_vm(host: &LabHost, key: &str, vm: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = json(host, key, &["vm", "show", vm]);
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{vm} never became {what}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn heartbeats(host: &LabHost, key: &str, vm: &str) -> usize {
    ok(host, key, &["vm", "console", vm])
        .lines()
        .filter(|l| l.starts_with("heartbeat n="))
        .count()
}

/// Waits until VM `vm`'s console, read through `host`, shows more heartbeats than `than`.
fn wait_heartbeats(host: &LabHost, key: &str, vm: &str, than: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = heartbeats(host, key, vm);
        if n > than {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{vm} shows no new heartbeat through {}",
            host.spec.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The heartbeat numbers on VM `vm`'s console, read through `host`.
fn beats(host: &LabHost, key: &str, vm: &str) -> Vec<u64> {
    ok(host, key, &["vm", "console", vm])
        .lines()
        .filter_map(|l| l.strip_prefix("heartbeat n="))
        .filter_map(|l| l.split_whitespace().next().and_then(|n| n.parse().ok()))
        .collect()
}

fn first_beat(host: &LabHost, key: &str, vm: &str) -> u64 {
    beats(host, key, vm).first().copied().unwrap_or(0)
}

fn last_beat(host: &LabHost, key: &str, vm: &str) -> u64 {
    beats(host, key, vm).last().copied().unwrap_or(0)
}

/// Waits until `check` holds for snapshot `id` of VM `vm` as host `host` lists it.
fn wait_snapshot(host: &LabHost, key: &str, vm: &str, id: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = json(host, key, &["vm", "snapshots", vm]);
        let snap = all
            .as_array()
            .and_then(|a| a.iter().find(|s| s["id"] == id).cloned())
            .unwrap_or(Value::Null);
        if check(&snap) {
            return snap;
        }
        assert!(Instant::now() < deadline, "snapshot {id} never got there: {snap}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

#[test]
fn a_cluster_places_vms_serves_them_from_any_host_and_restarts_them_when_a_host_dies() {
    let (mut lab, _one) = lab("main");
    let admin = lab.admin_key().expect("admin key");
    let [h1, h2, h3] = [0, 1, 2];

    // Every host registered; any host answers for the whole cloud.
    let hosts = json(&lab.hosts[h2], &admin, &["hosts"]);
    let names: Vec<&str> = hosts
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, ["host-1", "host-2", "host-3"], "{hosts}");
    assert!(
        hosts.as_array().expect("hosts").iter().all(|h| h["state"] == "up"),
        "{hosts}"
    );

    let acme = ok(&lab.hosts[h1], &admin, &["tenant", "create", "acme"])
        .trim()
        .to_string();
    let globex = ok(&lab.hosts[h1], &admin, &["tenant", "create", "globex"])
        .trim()
        .to_string();
    // Images are uploaded to one host; the others fetch them when they boot a VM from one.
    json(&lab.hosts[h2], &acme, &["image", "push", "heartbeat"]);
    json(&lab.hosts[h3], &globex, &["image", "push", "heartbeat"]);

    // Spread with anti-affinity: one web VM per host, a fourth has nowhere to go.
    let spread = [
        "--strategy",
        "spread",
        "--anti-affinity",
        "web",
        "--restart",
        "on_host_loss",
    ];
    let mut web_hosts = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        let mut args = vec!["vm", "create", name, "--image", "heartbeat"];
        args.extend(spread);
        let vm = json(&lab.hosts[h3], &acme, &args);
        assert_eq!(vm["state"], "running", "{vm}");
        web_hosts.push(vm["host"].as_str().expect("host").to_string());
    }
    assert_eq!(web_hosts, ["host-1", "host-2", "host-3"], "spread, by name on a tie");
    let mut args = vec!["vm", "create", "web-4", "--image", "heartbeat"];
    args.extend(spread);
    let waiting = json(&lab.hosts[h1], &acme, &args);
    assert_eq!(waiting["state"], "pending", "{waiting}");
    let why = waiting["exit"].as_str().unwrap_or_default();
    assert!(why.contains("anti-affinity group web"), "{why}");
    ok(&lab.hosts[h2], &acme, &["vm", "rm", "web-4"]);

    // Cheapest host that fits, and provider constraints.
    let batch = json(
        &lab.hosts[h1],
        &acme,
        &[
            "vm",
            "create",
            "batch",
            "--image",
            "heartbeat",
            "--restart",
            "on_host_loss",
        ],
    );
    assert_eq!(batch["host"], "host-3", "host-3 is the cheapest: {batch}");
    let g1 = json(
        &lab.hosts[h2],
        &globex,
        &["vm", "create", "g-1", "--image", "heartbeat", "--provider", "beta"],
    );
    assert_eq!(g1["host"], "host-3", "{g1}");
    let nowhere = json(
        &lab.hosts[h2],
        &globex,
        &["vm", "create", "g-2", "--image", "heartbeat", "--region", "mars-1"],
    );
    assert_eq!(nowhere["state"], "pending", "{nowhere}");
    assert!(
        nowhere["exit"].as_str().unwrap_or_default().contains("region"),
        "{nowhere}"
    );
    ok(&lab.hosts[h2], &globex, &["vm", "rm", "g-2"]);

    // A VM's console, pause and metrics through hosts it is not on (forwarded to its host).
    wait_heartbeats(&lab.hosts[h2], &acme, "web-1", 0);
    wait_heartbeats(&lab.hosts[h1], &acme, "web-3", 0);
    assert_eq!(
        json(&lab.hosts[h3], &acme, &["vm", "pause", "web-2"])["state"],
        "paused"
    );
    assert_eq!(json(&lab.hosts[h1], &acme, &["vm", "show", "web-2"])["state"], "paused");
    assert_eq!(
        json(&lab.hosts[h1], &acme, &["vm", "resume", "web-2"])["state"],
        "running"
    );
    let metrics = json(&lab.hosts[h1], &acme, &["vm", "metrics", "web-3"]);
    assert!(metrics["cpu_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{metrics}");

    // Tenants stay apart on every host, forwarded routes included: another's VM is not found.
    let web1 = json(&lab.hosts[h1], &acme, &["vm", "show", "web-1"]);
    let web1_id = web1["id"].as_str().expect("id").to_string();
    for host in &lab.hosts {
        assert_eq!(json(host, &globex, &["vm", "ls"]).as_array().map(|a| a.len()), Some(1));
        for action in ["show", "console", "pause", "stop", "metrics", "rm"] {
            let err = fails(host, &globex, &["vm", action, &web1_id]);
            assert!(
                err.contains(&format!("no VM {web1_id}")),
                "{action} on {}: {err}",
                host.spec.name
            );
        }
        assert!(fails(host, "xck_bad_key", &["vm", "ls"]).contains("valid API key"));
    }
    assert_eq!(
        json(&lab.hosts[h2], &acme, &["vm", "show", "web-1"])["state"],
        "running"
    );

    // A snapshot of batch, taken on host-3 (provider beta), is copied to a host of the other
    // provider, checked against its digests.
    wait_heartbeats(&lab.hosts[h1], &acme, "batch", 2);
    let beats_before_snapshot = last_beat(&lab.hosts[h1], &acme, "batch");
    let snap = json(&lab.hosts[h2], &acme, &["vm", "snapshot", "batch"]);
    let snap_id = snap["id"].as_str().expect("snapshot id").to_string();
    assert_eq!(snap["host"], "host-3", "{snap}");
    assert_eq!(snap["files"].as_array().map(|f| f.len()), Some(2), "{snap}");
    let copied = wait_snapshot(&lab.hosts[h1], &acme, "batch", &snap_id, |s| {
        s["copies"].as_array().is_some_and(|c| !c.is_empty())
    });
    assert_eq!(
        copied["copies"],
        serde_json::json!(["host-2"]),
        "the cheapest host of alpha: {copied}"
    );
    let batch_id = batch["id"].as_str().expect("id");
    let copy = lab.hosts[h2]
        .data
        .join("vms")
        .join(batch_id)
        .join("snapshots")
        .join(&snap_id);
    for file in ["vm.state", "memory.pages"] {
        assert!(copy.join(file).is_file(), "no {file} in {}", copy.display());
    }
    let listed = ok(&lab.hosts[h1], &acme, &["vm", "snapshots", "batch"]);
    assert!(listed.contains("host-3,host-2"), "{listed}");
    // Another tenant does not see it.
    let found = fails(&lab.hosts[h1], &globex, &["vm", "snapshots", batch_id]);
    assert!(found.contains("no VM"), "{found}");

    // host-3 dies (its daemon and its VMMs): batch restarts on the next cheapest host from
    // its snapshot there, not from its image; g-1, with no restart policy, is marked lost.
    let old_batch_pid = batch["pid"].as_u64().expect("pid");
    lab.hosts[h3].kill_all();
    let moved = wait_vm(&lab.hosts[h1], &acme, "batch", "restarted on another host", |v| {
        v["state"] == "running" && v["host"] == "host-2"
    });
    assert_ne!(moved["pid"].as_u64(), Some(old_batch_pid));
    wait_heartbeats(&lab.hosts[h1], &acme, "batch", 0);
    let first = first_beat(&lab.hosts[h1], &acme, "batch");
    assert!(
        first > beats_before_snapshot,
        "batch booted afresh (first heartbeat n={first}) instead of going on from its snapshot (n>={beats_before_snapshot})"
    );
    // The snapshot lost its original's host: the scheduler has host-1 take a copy from host-2.
    wait_snapshot(&lab.hosts[h1], &acme, "batch", &snap_id, |s| {
        s["copies"] == serde_json::json!(["host-2", "host-1"])
    });
    let lost = wait_vm(&lab.hosts[h1], &globex, "g-1", "lost", |v| v["state"] == "lost");
    assert!(
        lost["exit"].as_str().unwrap_or_default().contains("host-3 was lost"),
        "{lost}"
    );
    let hosts = json(&lab.hosts[h1], &admin, &["hosts"]);
    let host3 = hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == "host-3"))
        .cloned();
    assert_eq!(host3.map(|h| h["state"].clone()), Some(Value::from("lost")), "{hosts}");
    assert!(fails(&lab.hosts[h1], &globex, &["vm", "console", "g-1"]).contains("not up"));

    // host-3 comes back: g-1's VMM died with it, so g-1 is not running, and nothing runs twice.
    lab.hosts[h3].start().expect("host-3 starts again");
    wait_vm(&lab.hosts[h2], &globex, "g-1", "exited", |v| v["state"] == "exited");
    assert_eq!(json(&lab.hosts[h3], &acme, &["vm", "show", "batch"])["host"], "host-2");

    // host-2's daemon dies but its VMMs run on (cut off, not dead): their watchdogs pause them
    // within half a lease, before the lease expires and batch starts on host-3 (cheapest
    // again), so batch never runs twice; when host-2's daemon comes back it kills its own copy.
    // keep (no restart policy) goes to host-2 as well, the cheapest of provider alpha.
    let keep = json(
        &lab.hosts[h1],
        &globex,
        &["vm", "create", "keep", "--image", "heartbeat", "--provider", "alpha"],
    );
    assert_eq!(keep["host"], "host-2", "{keep}");
    wait_heartbeats(&lab.hosts[h1], &globex, "keep", 0);
    let stale_pid = moved["pid"].as_u64().expect("pid");
    let batch_id = moved["id"].as_str().expect("id").to_string();
    let stale_socket = lab.hosts[h2].data.join("vms").join(&batch_id).join("api.sock");
    lab.hosts[h2].kill_daemon();
    assert!(alive(stale_pid), "the VMM outlives its daemon");
    let killed = Instant::now();
    let fenced = loop {
        let out = xcloud()
            .args(["ctl", stale_socket.to_str().expect("utf-8"), "status"])
            .output()
            .expect("xcloud ctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("paused by its watchdog") {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(u64::from(LEASE_TTL)),
            "the VMM of a dead daemon still runs: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let again = wait_vm(&lab.hosts[h1], &acme, "batch", "restarted on host-3", |v| {
        v["state"] == "running" && v["host"] == "host-3"
    });
    let restarted = killed.elapsed();
    assert!(
        fenced < restarted,
        "fenced after {fenced:?}, restarted after {restarted:?}"
    );
    assert!(alive(stale_pid), "paused, not killed: its memory is kept");
    wait_vm(&lab.hosts[h1], &globex, "keep", "lost", |v| v["state"] == "lost");
    lab.hosts[h2].start().expect("host-2 starts again");
    // keep's VMM was paused, not gone: host-2 takes it back and lets it run on.
    let back = wait_vm(&lab.hosts[h1], &globex, "keep", "running again", |v| {
        v["state"] == "running"
    });
    assert_eq!(back["pid"], keep["pid"], "the same VMM: {back}");
    let n = heartbeats(&lab.hosts[h2], &globex, "keep");
    wait_heartbeats(&lab.hosts[h2], &globex, "keep", n);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(stale_pid) {
        assert!(Instant::now() < deadline, "host-2 left its stale copy of batch running");
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = heartbeats(&lab.hosts[h2], &acme, "batch");
    wait_heartbeats(&lab.hosts[h2], &acme, "batch", n);
    assert_eq!(
        json(&lab.hosts[h2], &acme, &["vm", "show", "batch"])["pid"],
        again["pid"]
    );

    // A deleted snapshot goes from every host that held it.
    assert!(fails(&lab.hosts[h1], &globex, &["vm", "snapshot-rm", &batch_id, &snap_id]).contains("no VM"));
    ok(&lab.hosts[h1], &acme, &["vm", "snapshot-rm", "batch", &snap_id]);
    assert_eq!(
        json(&lab.hosts[h2], &acme, &["vm", "snapshots", "batch"]),
        serde_json::json!([])
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for host in &lab.hosts {
        let dir = host.data.join("vms").join(&batch_id).join("snapshots").join(&snap_id);
        while dir.exists() {
            assert!(Instant::now() < deadline, "{} still holds {snap_id}", host.spec.name);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The guest's own uptime in its last heartbeat line on the console read through `host`.
fn uptime_ms(host: &LabHost, key: &str, vm: &str) -> u64 {
    ok(host, key, &["vm", "console", vm])
        .lines()
        .rev()
        .find_map(|l| l.split("uptime_ms=").nth(1).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Waits until VM `vm`'s guest, read through `host`, reports an uptime above `than`: the same
/// guest runs on (a fresh boot would start again from 0).
fn wait_uptime_above(host: &LabHost, key: &str, vm: &str, than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = uptime_ms(host, key, vm);
        if up > than {
            return up;
        }
        assert!(
            Instant::now() < deadline,
            "{vm}'s guest shows no uptime above {than} ms (now {up})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn draining_a_host_and_evacuating_a_provider_move_running_vms_live() {
    // Metered every second, so that usage is up to date within the test.
    let (lab, _one) = lab_with("drain", &["--meter-seconds", "1"]);
    let admin = lab.admin_key().expect("admin key");
    let (h1, h2, h3) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    let acme = ok(h1, &admin, &["tenant", "create", "acme"]).trim().to_string();
    json(h1, &acme, &["image", "push", "heartbeat"]);

    // Packed on host-1, kept at provider alpha.
    let pinned = ["--strategy", "pack", "--provider", "alpha"];
    for name in ["a-1", "a-2", "a-3"] {
        let mut args = vec!["vm", "create", name, "--image", "heartbeat"];
        args.extend(pinned);
        assert_eq!(json(h3, &acme, &args)["host"], "host-1");
    }
    let mut before = Vec::new();
    for name in ["a-1", "a-2", "a-3"] {
        before.push(wait_uptime_above(h2, &acme, name, 0));
    }

    // One VM moved by hand, to a host named.
    let moved = json(h2, &acme, &["vm", "migrate", "a-1", "--host", "host-2"]);
    assert_eq!(
        (moved["from"].as_str(), moved["to"].as_str()),
        (Some("host-1"), Some("host-2")),
        "{moved}"
    );
    assert!(moved["downtime_ms"].as_f64().unwrap_or(f64::MAX) < 1000.0, "{moved}");
    assert_eq!(json(h3, &acme, &["vm", "show", "a-1"])["host"], "host-2");
    before[0] = wait_uptime_above(h3, &acme, "a-1", before[0]);
    let err = fails(h1, &acme, &["vm", "migrate", "a-2", "--provider", "beta"]);
    assert!(err.contains("nowhere to go") && err.contains("provider"), "{err}");

    // Draining host-1: the rest go to host-2 (the only other alpha host), the guests run on.
    let out = cli(h1, &admin, &["host", "drain", "host-1"]);
    let table = stdout(&out);
    assert!(out.status.success(), "drain: {}\n{table}", stderr(&out));
    assert!(table.contains("2 of 2 running VMs moved"), "{table}");
    for (i, name) in ["a-1", "a-2", "a-3"].iter().enumerate() {
        assert_eq!(json(h1, &acme, &["vm", "show", name])["host"], "host-2", "{name}");
        wait_uptime_above(h1, &acme, name, before[i]);
    }
    let hosts = json(h3, &admin, &["hosts"]);
    let state = |name: &str| {
        hosts
            .as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == name))
            .map(|h| h["state"].clone())
    };
    assert_eq!(state("host-1"), Some(Value::from("draining")), "{hosts}");
    // Nothing new goes to a drained host. Events are the cluster's: a VM made through host-1
    // shows in the stream of host-3.
    let (created, event) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| cli(h3, &acme, &["events", "--count", "1"]));
        std::thread::sleep(Duration::from_millis(1500));
        let created = json(
            h1,
            &acme,
            &["vm", "create", "b-1", "--image", "heartbeat", "--host", "host-1"],
        );
        (created, watcher.join().expect("the event watcher"))
    });
    assert_eq!(created["state"], "pending", "{created}");
    let event: Value = serde_json::from_str(stdout(&event).trim()).expect("an event as JSON");
    assert_eq!(
        (event["kind"].as_str(), event["host"].as_str(), &event["id"]),
        (Some("vm.created"), Some("host-1"), &created["id"]),
        "{event}"
    );
    ok(h1, &acme, &["vm", "rm", "b-1"]);

    // Evacuating alpha: the free VM leaves for beta; the ones kept at alpha cannot, stay
    // running where they are, and say so (exit status 7).
    let free = json(
        h2,
        &acme,
        &["vm", "create", "free", "--image", "heartbeat", "--strategy", "pack"],
    );
    assert_eq!(free["host"], "host-2", "{free}");
    let free_up = wait_uptime_above(h2, &acme, "free", 0);
    let out = cli(h3, &admin, &["provider", "evacuate", "alpha", "--json"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let summary: Value = serde_json::from_str(&stdout(&out)).expect("the summary is JSON");
    let rows = summary["vms"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "{summary}");
    for row in rows {
        let moved = row["moved"].as_bool() == Some(true);
        assert_eq!(moved, row["vm"] == "free", "{row}");
        if moved {
            assert_eq!(row["report"]["to"], "host-3", "{row}");
        } else {
            assert!(
                row["error"].as_str().unwrap_or_default().contains("nowhere to go"),
                "{row}"
            );
        }
    }
    assert_eq!(json(h1, &acme, &["vm", "show", "free"])["host"], "host-3");
    wait_uptime_above(h1, &acme, "free", free_up);
    for name in ["a-1", "a-2", "a-3"] {
        let vm = json(h3, &acme, &["vm", "show", name]);
        assert_eq!(
            (vm["state"].as_str(), vm["host"].as_str()),
            (Some("running"), Some("host-2")),
            "{vm}"
        );
    }
    assert_eq!(json(h3, &acme, &["vm", "ls"]).as_array().map(|a| a.len()), Some(4));

    // host-1 comes back into service and its price drops: the dry run plans every VM onto it
    // (alpha's VMs from host-2, the free one from host-3) and moves nothing; the real run
    // moves them live.
    ok(h2, &admin, &["host", "undrain", "host-1"]);
    ok(h2, &admin, &["host", "price", "host-1", "0.02"]);
    assert!(fails(h2, &acme, &["replace", "--dry-run"]).contains("only an admin"));
    let plan = json(h3, &admin, &["replace", "--dry-run"]);
    let moves = plan["moves"].as_array().expect("moves");
    assert_eq!(moves.len(), 4, "{plan}");
    assert!(moves.iter().all(|m| m["to"] == "host-1"), "{plan}");
    // A CPU of host-2 costs 0.05 an hour, of host-3 0.04, of host-1 now 0.01.
    let saving = plan["saving_per_hour"].as_f64().unwrap_or(0.0);
    assert!((saving - (3.0 * 0.04 + 0.03)).abs() < 1e-9, "{plan}");
    assert_eq!(
        json(h1, &acme, &["vm", "show", "free"])["host"],
        "host-3",
        "a dry run moves nothing"
    );
    let mut up = Vec::new();
    for name in ["a-1", "a-2", "a-3", "free"] {
        up.push(uptime_ms(h1, &acme, name));
    }
    let done = json(h1, &admin, &["replace"]);
    assert_eq!(
        done["results"],
        serde_json::json!(["moved", "moved", "moved", "moved"]),
        "{done}"
    );
    for (i, name) in ["a-1", "a-2", "a-3", "free"].iter().enumerate() {
        assert_eq!(json(h2, &acme, &["vm", "show", name])["host"], "host-1", "{name}");
        wait_uptime_above(h3, &acme, name, up[i]);
    }
    assert_eq!(
        json(h1, &admin, &["replace", "--dry-run"])["moves"],
        serde_json::json!([])
    );

    // Usage by provider and by host: both providers ran acme's VMs, and the hosts the VMs
    // left sent their migrations' bytes.
    std::thread::sleep(Duration::from_millis(1500));
    let usage = json(h2, &admin, &["usage", "--by", "provider"]);
    let line = |u: &Value, key: &str| {
        u["lines"]
            .as_array()
            .and_then(|a| a.iter().find(|l| l["key"] == key).cloned())
            .unwrap_or_else(|| panic!("no line {key} in {u}"))
    };
    for provider in ["alpha", "beta"] {
        let l = line(&usage, provider);
        assert!(l["run_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{usage}");
        assert!(l["provider_cost"].as_f64().unwrap_or(0.0) > 0.0, "{usage}");
    }
    let by_host = json(h3, &acme, &["usage", "--by", "host"]);
    for host in ["host-1", "host-2", "host-3"] {
        let sent = line(&by_host, host)["migrated_bytes"].as_u64().unwrap_or(0);
        assert!(sent > 64 << 10, "{host} sent {sent} bytes: {by_host}");
    }
    let by_tenant = json(h1, &acme, &["usage", "--by", "tenant"]);
    assert_eq!(by_tenant["lines"].as_array().map(|a| a.len()), Some(1), "{by_tenant}");
}

#[test]
fn a_scheduler_that_follows_prices_moves_a_vm_live_when_another_host_gets_cheaper() {
    let (lab, _one) = lab_with("prices", &["--replace-threshold", "0.2"]);
    let admin = lab.admin_key().expect("admin key");
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let acme = ok(h1, &admin, &["tenant", "create", "acme"]).trim().to_string();
    json(h1, &acme, &["image", "push", "heartbeat"]);
    let vm = json(h2, &acme, &["vm", "create", "web", "--image", "heartbeat"]);
    assert_eq!(vm["host"], "host-3", "the cheapest: {vm}");
    let up = wait_uptime_above(h1, &acme, "web", 0);
    // host-3's CPU costs 0.04 an hour: 0.035 is not 20% less, 0.01 is.
    ok(h1, &admin, &["host", "price", "host-2", "0.07"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        json(h1, &acme, &["vm", "show", "web"])["host"],
        "host-3",
        "under the threshold it stays"
    );
    ok(h1, &admin, &["host", "price", "host-2", "0.02"]);
    wait_vm(h1, &acme, "web", "moved to host-2", |v| {
        v["host"] == "host-2" && v["state"] == "running"
    });
    wait_uptime_above(h2, &acme, "web", up);
}

/// The routes only an admin may call.
fn admin_only(method: &str, route: &str) -> bool {
    matches!(
        (method, route),
        ("get" | "post", "/v1/tenants" | "/v1/replacement")
            | ("delete", "/v1/tenants/{tenant}")
            | ("post", "/v1/instance-types")
            | ("post" | "delete", "/v1/vms/{vm}/incoming")
            | (
                "post",
                "/v1/hosts/{host}/drain" | "/v1/hosts/{host}/undrain" | "/v1/hosts/{host}/price"
            )
            | ("get", "/metrics")
    )
}

/// A body a route takes (its caller may still not be allowed to call it), for the routes
/// whose body is JSON.
fn good_body(method: &str, route: &str, snapshot: &str) -> Option<Value> {
    Some(match (method, route) {
        ("post", "/v1/tenants") => serde_json::json!({"name": "newco"}),
        ("post", "/v1/instance-types") => {
            serde_json::json!({"name": "x9.test", "vcpus": 1, "mem_mib": 64, "price_per_hour": 0.01})
        }
        ("post", "/v1/vms") => serde_json::json!({"name": "new", "image": "heartbeat", "start": false}),
        ("post", "/v1/vms/{vm}/restore") => serde_json::json!({ "snapshot": snapshot }),
        ("post", "/v1/vms/{vm}/migrate") => serde_json::json!({"host": "host-1"}),
        ("post", "/v1/vms/{vm}/incoming") => serde_json::json!({"peer_cert": "00"}),
        ("post", "/v1/groups") => {
            serde_json::json!({"name": "g2", "image": "heartbeat", "min": 0, "max": 1, "target": 50})
        }
        ("patch", "/v1/groups/{group}") => serde_json::json!({"max": 2}),
        ("post", "/v1/hosts/{host}/price") => serde_json::json!({"price_per_hour": 1.0}),
        _ => return None,
    })
}

/// What the records say, as an admin reads them through `host`: everything a wrong call
/// could change.
fn records(host: &LabHost, admin: &str) -> Value {
    let pick = |v: Value, fields: &[&str]| -> Value {
        let mut rows: Vec<Value> = v
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| fields.iter().map(|f| r[*f].clone()).collect())
            .collect();
        rows.sort_by_key(|r| r.to_string());
        Value::Array(rows)
    };
    serde_json::json!({
        "tenants": pick(json(host, admin, &["tenant", "ls"]), &["name", "quota"]),
        "types": pick(json(host, admin, &["type", "ls"]), &["name", "vcpus", "mem_mib", "price_per_hour"]),
        "images": pick(json(host, admin, &["image", "ls"]), &["id", "name", "tenant"]),
        "vms": pick(json(host, admin, &["vm", "ls"]), &["id", "name", "state", "host", "pid", "generation", "want"]),
        "groups": pick(json(host, admin, &["group", "ls"]), &["name", "min", "max", "target", "metric"]),
        "hosts": pick(json(host, admin, &["hosts"]), &["name", "state", "price_per_hour"]),
    })
}

#[test]
fn every_route_answers_wrong_calls_alike_on_every_host_and_nothing_changes() {
    use xcloud_control::client::{Client, Endpoint};
    let (lab, _one) = lab("routes");
    let admin = lab.admin_key().expect("admin key");
    let h1 = &lab.hosts[0];
    let acme = ok(h1, &admin, &["tenant", "create", "acme"]).trim().to_string();
    let globex = ok(h1, &admin, &["tenant", "create", "globex"]).trim().to_string();
    let image = json(h1, &acme, &["image", "push", "heartbeat"]);
    let vm = json(
        h1,
        &acme,
        &["vm", "create", "web", "--image", "heartbeat", "--host", "host-2"],
    );
    assert_eq!(vm["state"], "running", "{vm}");
    let snap = json(h1, &acme, &["vm", "snapshot", "web"]);
    let snap_id = snap["id"].as_str().expect("snapshot id");
    wait_snapshot(h1, &acme, "web", snap_id, |s| {
        s["copies"].as_array().is_some_and(|c| !c.is_empty())
    });
    ok(
        h1,
        &acme,
        &[
            "group",
            "create",
            "pool",
            "--image",
            "heartbeat",
            "--min",
            "0",
            "--max",
            "1",
            "--target-cpu",
            "50",
        ],
    );
    let before = records(h1, &admin);

    let client = |host: &LabHost, key: Option<&str>| {
        let addr = host.endpoint().trim_start_matches("https://").to_string();
        Client::at(
            Endpoint::Tls {
                addr,
                server_cert: host.cert(),
            },
            key.map(String::from),
        )
    };
    let doc = client(h1, None)
        .call("GET", "/v1/openapi.json", None)
        .expect("the OpenAPI document");
    let doc: Value = serde_json::from_slice(&doc.body).expect("OpenAPI JSON");
    let mut routes = Vec::new();
    for (route, methods) in doc["paths"].as_object().expect("paths") {
        for (method, spec) in methods.as_object().expect("methods") {
            routes.push((method.clone(), route.clone(), spec["requestBody"].is_object()));
        }
    }
    assert!(routes.len() >= 40, "{routes:?}");
    let vm_id = vm["id"].as_str().expect("id");
    let image_id = image["id"].as_str().expect("image id");
    let fill = |route: &str| {
        route
            .replace("{vm}", vm_id)
            .replace("{snapshot}", snap_id)
            .replace("{file}", "vm.state")
            .replace("{image}", image_id)
            .replace("{group}", "pool")
            .replace("{tenant}", "acme")
            .replace("{host}", "host-2")
            .replace("{name}", "kv")
    };
    let mut calls = 0;
    for host in &lab.hosts {
        let name = &host.spec.name;
        let expect = |key: Option<&str>, method: &str, path: &str, body: Option<(Vec<u8>, &str)>, status: u16| {
            let answer = client(host, key)
                .call(&method.to_uppercase(), path, body)
                .unwrap_or_else(|e| panic!("{method} {path} on {name}: {e}"));
            let text = String::from_utf8_lossy(&answer.body).into_owned();
            assert_eq!(answer.status, status, "{method} {path} on {name}: {text}");
            let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            assert!(
                error["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{method} {path} on {name}: not one JSON error: {text}"
            );
        };
        for (method, route, takes_body) in &routes {
            let path = fill(route);
            let good = good_body(method, route, snap_id).map(|b| (b.to_string().into_bytes(), "application/json"));
            // Images and extension modules are raw bodies, checked below.
            assert!(
                !takes_body || good.is_some() || route == "/v1/images" || route.ends_with("/extensions"),
                "{method} {route} takes a body this test does not know"
            );
            // No key, or one that is not known: 401 everywhere but the OpenAPI document.
            if route != "/v1/openapi.json" {
                expect(None, method, &path, good.clone(), 401);
                expect(Some("xck_000000000000_bad"), method, &path, good.clone(), 401);
                calls += 2;
            }
            // Another tenant naming acme's things: not found (ids do not leak); an admin's
            // route: forbidden.
            let names_something = ["{vm}", "{image}", "{group}", "{tenant}", "{host}"]
                .iter()
                .any(|p| route.contains(p));
            if admin_only(method, route) {
                expect(Some(&globex), method, &path, good.clone(), 403);
                calls += 1;
            } else if names_something {
                expect(Some(&globex), method, &path, good.clone(), 404);
                calls += 1;
            }
            // Bodies that are not what the route takes, from a caller who may call it.
            let Some((good, _)) = good else {
                continue;
            };
            let key = if admin_only(method, route) { &admin } else { &acme };
            let mut unknown: Value = serde_json::from_slice(&good).expect("JSON");
            unknown["colour"] = Value::from("blue");
            for (body, content_type, status) in [
                (b"{".to_vec(), "application/json", 400),
                (b"[]".to_vec(), "application/json", 400),
                (unknown.to_string().into_bytes(), "application/json", 400),
                (good.clone(), "text/plain", 415),
                (vec![b' '; 2 << 20], "application/json", 413),
            ] {
                expect(Some(key), method, &path, Some((body, content_type)), status);
                calls += 1;
            }
        }
        // Queries, names that are paths, methods and routes that do not exist.
        let elf = std::fs::read(lab.hosts[0].data.join("images").read_dir().map_or_else(
            |_| PathBuf::new(),
            |mut d| d.next().and_then(|e| e.ok()).map(|e| e.path()).unwrap_or_default(),
        ))
        .unwrap_or_default();
        for (key, method, path, body, status) in [
            (&acme, "GET", "/v1/usage?by=colour".to_string(), None, 400),
            (&acme, "GET", format!("/v1/vms/{vm_id}/console?bytes=x"), None, 400),
            (&admin, "GET", "/v1/replacement?threshold=x".to_string(), None, 400),
            (
                &acme,
                "DELETE",
                "/v1/images/..%2F..%2Fstate.redb".to_string(),
                None,
                404,
            ),
            (&acme, "GET", "/v1/vms/..%2F..%2Fetc/console".to_string(), None, 404),
            (
                &acme,
                "GET",
                format!("/v1/vms/{vm_id}/snapshots/{snap_id}/files/..%2F..%2F..%2Fadmin.key"),
                None,
                404,
            ),
            (
                &acme,
                "POST",
                "/v1/images?name=..%2Fx".to_string(),
                Some((elf.clone(), "application/octet-stream")),
                400,
            ),
            (
                &acme,
                "POST",
                "/v1/images?name=junk".to_string(),
                Some((b"MZ not an ELF".to_vec(), "application/octet-stream")),
                400,
            ),
            (
                &acme,
                "POST",
                format!("/v1/vms/{vm_id}/extensions?name=junk"),
                Some((b"MZ not a module".to_vec(), "application/wasm")),
                400,
            ),
            (
                &acme,
                "POST",
                format!("/v1/vms/{vm_id}/extensions?name=junk&colour=blue"),
                Some((b"(module)".to_vec(), "application/wasm")),
                400,
            ),
            (&acme, "DELETE", format!("/v1/vms/{vm_id}/extensions/meter"), None, 403),
            (&acme, "PUT", "/v1/vms".to_string(), None, 405),
            (&acme, "GET", "/v1/nothing".to_string(), None, 404),
        ] {
            expect(Some(key), method, &path, body, status);
            calls += 1;
        }
    }
    assert!(calls > 300, "{calls} calls");
    assert_eq!(records(&lab.hosts[2], &admin), before, "a wrong call changed something");
    // The VM ran on through all of it.
    let n = heartbeats(h1, &acme, "web");
    wait_heartbeats(&lab.hosts[2], &acme, "web", n);
}

/// Waits until `check` holds for group `group` as `host` shows it (VMs with their records).
fn wait_group(
    host: &LabHost,
    key: &str,
    group: &str,
    what: &str,
    check: impl Fn(&Value, &[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let g = json(host, key, &["group", "show", group]);
        // One listing: a VM the group drops meanwhile is missing from it, not an error.
        let all = json(host, key, &["vm", "ls"]);
        let vms: Vec<Value> = g["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|name| all.as_array()?.iter().find(|v| v["name"] == *name).cloned())
            .collect();
        if check(&g, &vms) {
            return vms;
        }
        assert!(Instant::now() < deadline, "{group} never became {what}: {g} {vms:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_autoscaling_group_spreads_over_hosts_and_replaces_what_a_lost_host_held() {
    let (mut lab, _one) = lab_with("scale", &["--autoscale-seconds", "1"]);
    let admin = lab.admin_key().expect("admin key");
    let acme = ok(&lab.hosts[0], &admin, &["tenant", "create", "acme"])
        .trim()
        .to_string();
    json(&lab.hosts[0], &acme, &["image", "push", "gauge"]);
    // Each gauge reports 25: at a target of 10 the group grows to its max, one VM per host.
    let args = [
        "group",
        "create",
        "jobs",
        "--image",
        "gauge",
        "--max",
        "2",
        "--target-load",
        "10",
        "--cooldown",
        "1",
        "--",
        "25",
    ];
    json(&lab.hosts[1], &acme, &args);
    let running = |vms: &[Value]| vms.iter().all(|v| v["state"] == "running");
    let vms = wait_group(&lab.hosts[2], &acme, "jobs", "two running VMs", |_, vms| {
        vms.len() == 2 && running(vms)
    });
    let hosts: Vec<String> = vms
        .iter()
        .filter_map(|v| v["host"].as_str().map(String::from))
        .collect();
    assert_ne!(hosts[0], hosts[1], "a group's VMs are kept apart: {vms:?}");
    // The scheduler reads each guest's load on the guest's own host.
    wait_group(&lab.hosts[0], &acme, "jobs", "read", |g, _| {
        g["reading"].as_f64() == Some(25.0)
    });

    // The scheduler's host dies (or, if it holds none of the group, a host that does): a host
    // that is left takes over, removes the VM that was lost with it and adds one on the host
    // that had none.
    let listed = json(&lab.hosts[0], &admin, &["hosts"]);
    let scheduler: Vec<String> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["scheduler"] == true)
        .filter_map(|h| h["name"].as_str().map(String::from))
        .collect();
    assert_eq!(scheduler.len(), 1, "one scheduler: {listed}");
    let victim = if hosts.contains(&scheduler[0]) {
        scheduler[0].clone()
    } else {
        hosts[0].clone()
    };
    let lost_vm = vms
        .iter()
        .find(|v| v["host"] == victim.as_str())
        .and_then(|v| v["name"].as_str())
        .expect("a VM on the victim")
        .to_string();
    let victim_at = lab
        .hosts
        .iter()
        .position(|h| h.spec.name == victim)
        .expect("a lab host");
    let survivor = lab
        .hosts
        .iter()
        .position(|h| h.spec.name != victim)
        .expect("a host left");
    lab.hosts[victim_at].kill_all();
    let vms = wait_group(
        &lab.hosts[survivor],
        &acme,
        "jobs",
        "whole again elsewhere",
        |_, vms| {
            vms.len() == 2
                && running(vms)
                && vms
                    .iter()
                    .all(|v| v["host"] != victim.as_str() && v["name"] != lost_vm.as_str())
        },
    );
    let hosts: Vec<&str> = vms.iter().filter_map(|v| v["host"].as_str()).collect();
    assert_ne!(hosts[0], hosts[1], "{vms:?}");
    let listed = json(&lab.hosts[survivor], &admin, &["hosts"]);
    let now_scheduling = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["scheduler"] == true)
        .and_then(|h| h["name"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(!now_scheduling.is_empty() && now_scheduling != victim, "{listed}");

    // A target of 100: one VM does; the newest goes.
    json(
        &lab.hosts[survivor],
        &acme,
        &["group", "set", "jobs", "--target-load", "100"],
    );
    let left = wait_group(&lab.hosts[survivor], &acme, "jobs", "one VM", |_, vms| vms.len() == 1);
    let oldest = vms
        .iter()
        .min_by_key(|v| v["created"].as_u64())
        .and_then(|v| v["name"].as_str());
    assert_eq!(left[0]["name"].as_str(), oldest, "{left:?}");
}
