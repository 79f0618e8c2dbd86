//! `xcloud bench api`: the control plane as a user meets it, on a lab cluster
//! (`xcloud lab cluster`: etcd and three xcloudd hosts in network namespaces, the API over
//! TLS). Each figure has a baseline measured in the same run:
//!
//! - API latency under load (wrk, from the registries' Debian package, over TLS): `GET /v1/vms`
//!   and `GET /v1/vms/{id}` on a cluster host (records in etcd) against the same calls on an
//!   xcloudd alone (records in its redb file) holding the same records.
//! - VM creation rate on one host through the API (created, booted, answering), against the
//!   same VMMs started directly with `xcloud run`; Firecracker's published 150 microVMs/s per
//!   host is the reference the issue names.
//! - Drain: `xcloud host drain` of a host running N busy guests (each writing a working set)
//!   to the other host of its provider: total time and the stall per VM, against one such VM
//!   migrated alone.

use crate::lab::{default_hosts, Lab, LabHost};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use xcloud_control::client::{Client, Endpoint};

/// What to measure.
pub struct ApiBench {
    /// VMs created for the creation rate.
    pub create: usize,
    /// VMs on the drained host.
    pub drain: usize,
    /// Seconds of load per latency figure.
    pub seconds: u64,
    /// wrk's connections.
    pub connections: u32,
}

fn client(host: &LabHost, key: &str) -> Client {
    Client::at(
        Endpoint::Tls {
            addr: format!("{}:{}", host.ip, crate::lab::API_PORT),
            server_cert: host.cert(),
        },
        Some(key.to_string()),
    )
}

fn call(c: &Client, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let body = body.map(|b| (b.to_string().into_bytes(), "application/json"));
    let a = c.call(method, path, body)?;
    if !(200..300).contains(&a.status) {
        bail!("{method} {path}: {} (HTTP {})", a.error_text(), a.status);
    }
    if a.body.is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_slice(&a.body)?)
}

fn spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(what.to_string());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// wrk's p50 and p99 (ms) and requests/s for `url` with `key`.
fn wrk(url: &str, key: &str, seconds: u64, connections: u32) -> Result<(f64, f64, f64)> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .arg("-H")
        .arg(format!("Authorization: Bearer {key}"))
        .arg(url)
        .output()
        .context("cannot run wrk (Debian's wrk: scripts/setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") {
        bail!("wrk {url}: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let ms = |label: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
        let v = line.split_whitespace().nth(1)?;
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = num.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let rate = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("wrk printed no Requests/sec")?;
    Ok((ms("50%").context("no p50")?, ms("99%").context("no p99")?, rate))
}

fn wait_socket(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while xcloud_api::client::call(path, xcloud_api::Command::Status).is_err() {
        if Instant::now() > deadline {
            bail!("no VMM answered on {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Runs the benchmark and prints its tables.
pub fn api(b: &ApiBench) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("xcloud bench api makes network namespaces: run it as root");
    }
    let exe = std::env::current_exe()?;
    let xcloudd = exe.with_file_name("xcloudd");
    if !xcloudd.is_file() {
        bail!(
            "{} is missing: build the workspace (cargo build --release)",
            xcloudd.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("xcloud-bench-api-{}", std::process::id()));
    let bar = spinner("starting etcd and three hosts");
    let lab = Lab::up(&dir, &default_hosts(), &xcloudd, 5)?;
    let admin = lab.admin_key()?;
    let (h1, h2, h3) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    let a1 = client(h1, &admin);
    let quota = serde_json::json!({"vcpus": 256, "mem_mib": 1 << 20, "vms": 256});
    let key = call(
        &a1,
        "POST",
        "/v1/tenants",
        Some(serde_json::json!({"name": "bench", "quota": quota})),
    )?["key"]
        .as_str()
        .context("no key")?
        .to_string();
    let t1 = client(h1, &key);
    let image = crate::guests::builtin("heartbeat").context("no built-in heartbeat")?;
    let a = t1.call(
        "POST",
        "/v1/images?name=heartbeat",
        Some((image.to_vec(), "application/octet-stream")),
    )?;
    if !(200..300).contains(&a.status) {
        bail!("uploading heartbeat: {}", a.error_text());
    }
    bar.finish_and_clear();

    // Creation rate: through the API on host-1, then the same VMMs by hand.
    let bar = spinner(&format!("creating {} VMs through the API", b.create));
    let started = Instant::now();
    for i in 0..b.create {
        let body = serde_json::json!({"name": format!("c-{i}"), "image": "heartbeat", "args": ["2"],
            "placement": {"host": "host-1"}});
        let vm = call(&t1, "POST", "/v1/vms", Some(body))?;
        if vm["state"] != "running" && vm["state"] != "exited" {
            bail!("VM c-{i} did not start: {vm}");
        }
    }
    let api_rate = b.create as f64 / started.elapsed().as_secs_f64();
    bar.set_message(format!("starting {} VMMs with xcloud run", b.create));
    let direct = dir.join("direct");
    std::fs::create_dir_all(&direct)?;
    let started = Instant::now();
    let mut children = Vec::new();
    for i in 0..b.create {
        let sock = direct.join(format!("{i}.sock"));
        let child = Command::new(&exe)
            .args(["run", "--api"])
            .arg(&sock)
            .args(["heartbeat", "--", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        children.push(child);
        wait_socket(&sock)?;
    }
    let direct_rate = b.create as f64 / started.elapsed().as_secs_f64();
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    for i in 0..b.create {
        call(&t1, "DELETE", &format!("/v1/vms/c-{i}"), None)?;
    }
    bar.finish_and_clear();

    // Latency under load: the same records in etcd (a cluster host) and in redb (alone).
    let bar = spinner("API latency under wrk");
    for i in 0..20 {
        let body = serde_json::json!({"name": format!("idle-{i}"), "image": "heartbeat", "start": false});
        call(&t1, "POST", "/v1/vms", Some(body))?;
    }
    let one = call(&t1, "GET", "/v1/vms/idle-7", None)?["id"]
        .as_str()
        .context("no id")?
        .to_string();
    let cluster_url = format!("https://{}:{}", h1.ip, crate::lab::API_PORT);
    let cluster_list = wrk(&format!("{cluster_url}/v1/vms"), &key, b.seconds, b.connections)?;
    let cluster_get = wrk(&format!("{cluster_url}/v1/vms/{one}"), &key, b.seconds, b.connections)?;
    let alone = Alone::start(&xcloudd, &dir.join("alone"), &h1.identity)?;
    let alone_admin = Client::new(alone.data.join("xcloudd.sock"), Some(alone.admin.clone()));
    let alone_key = call(
        &alone_admin,
        "POST",
        "/v1/tenants",
        Some(serde_json::json!({"name": "bench", "quota": quota})),
    )?["key"]
        .as_str()
        .context("no key")?
        .to_string();
    let alone_tenant = Client::new(alone.data.join("xcloudd.sock"), Some(alone_key.clone()));
    let a = alone_tenant.call(
        "POST",
        "/v1/images?name=heartbeat",
        Some((image.to_vec(), "application/octet-stream")),
    )?;
    if !(200..300).contains(&a.status) {
        bail!("uploading heartbeat: {}", a.error_text());
    }
    for i in 0..20 {
        let body = serde_json::json!({"name": format!("idle-{i}"), "image": "heartbeat", "start": false});
        call(&alone_tenant, "POST", "/v1/vms", Some(body))?;
    }
    let alone_one = call(&alone_tenant, "GET", "/v1/vms/idle-7", None)?["id"]
        .as_str()
        .context("no id")?
        .to_string();
    let alone_url = format!("https://127.0.0.1:{}", alone.port);
    let alone_list = wrk(&format!("{alone_url}/v1/vms"), &alone_key, b.seconds, b.connections)?;
    let alone_get = wrk(
        &format!("{alone_url}/v1/vms/{alone_one}"),
        &alone_key,
        b.seconds,
        b.connections,
    )?;
    drop(alone);
    bar.finish_and_clear();

    // Drain: busy guests packed on host-1 (kept at provider alpha, so they go to host-2).
    let bar = spinner(&format!("booting {} busy guests on host-1", b.drain + 1));
    let busy = |name: &str, placement: Value| {
        serde_json::json!({"name": name, "image": "heartbeat", "instance_type": "x1.small",
            "args": ["0", "32", "16"], "placement": placement})
    };
    let solo = call(
        &t1,
        "POST",
        "/v1/vms",
        Some(busy("solo", serde_json::json!({"strategy": "cheapest"}))),
    )?;
    if solo["host"] != "host-3" {
        bail!("the baseline VM went to {} instead of host-3", solo["host"]);
    }
    for i in 0..b.drain {
        let vm = call(
            &t1,
            "POST",
            "/v1/vms",
            Some(busy(
                &format!("d-{i}"),
                serde_json::json!({"strategy": "pack", "providers": ["alpha"]}),
            )),
        )?;
        if vm["host"] != "host-1" {
            bail!("d-{i} went to {} instead of host-1 (is host-1 full?)", vm["host"]);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    bar.set_message("one VM migrated alone (host-3 to host-2)");
    let single = call(
        &client(h3, &key),
        "POST",
        "/v1/vms/solo/migrate",
        Some(serde_json::json!({"host": "host-2"})),
    )?;
    // Its place on host-2 is the drained VMs'.
    call(&t1, "DELETE", "/v1/vms/solo", None)?;
    bar.set_message(format!("xcloud host drain host-1 ({} VMs)", b.drain));
    let drained = Command::new(&exe)
        .args(["host", "drain", "host-1", "--json"])
        .env("XCLOUD_URL", h2.endpoint())
        .env("XCLOUD_SERVER_CERT", h2.cert())
        .env("XCLOUD_TOKEN", &admin)
        .output()?;
    bar.finish_and_clear();
    let summary: Value = serde_json::from_slice(&drained.stdout).with_context(|| {
        format!(
            "xcloud host drain printed no summary: {}",
            String::from_utf8_lossy(&drained.stderr)
        )
    })?;
    let rows = summary["vms"].as_array().cloned().unwrap_or_default();
    let mut stalls: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["report"]["downtime_ms"].as_f64())
        .collect();
    stalls.sort_by(f64::total_cmp);
    let moved = stalls.len();
    let drain_total = summary["total_ms"].as_f64().unwrap_or(0.0);
    let single_total = single["total_ms"].as_f64().unwrap_or(0.0);
    let single_stall = single["downtime_ms"].as_f64().unwrap_or(0.0);

    println!(
        "API latency under load (wrk -c{} -d{}s over TLS; a cluster host vs xcloudd alone):",
        b.connections, b.seconds
    );
    println!(
        "{:<22} {:>9} {:>9} {:>10}   {:>9} {:>9} {:>10}   {:>9}",
        "route", "p50 ms", "p99 ms", "req/s", "alone p50", "alone p99", "alone r/s", "p99 ratio"
    );
    for (route, c, a) in [
        ("GET /v1/vms (20 VMs)", cluster_list, alone_list),
        ("GET /v1/vms/{id}", cluster_get, alone_get),
    ] {
        println!(
            "{route:<22} {:>9.2} {:>9.2} {:>10.0}   {:>9.2} {:>9.2} {:>10.0}   {:>8.2}x",
            c.0,
            c.1,
            c.2,
            a.0,
            a.1,
            a.2,
            c.1 / a.1.max(1e-9)
        );
    }
    println!();
    println!(
        "VM creation on one host ({} VMs, one after another, each booted and answering):",
        b.create
    );
    println!("  through the API: {api_rate:.1} VMs/s; xcloud run by hand: {direct_rate:.1} VMs/s ({:.0}% of it); Firecracker's published 150/s", 100.0 * api_rate / direct_rate.max(1e-9));
    println!();
    println!(
        "Drain of host-1 ({} busy guests, x1.small writing 32 MiB at 16 MiB/s) to host-2:",
        b.drain
    );
    println!(
        "  {moved} of {} moved in {:.0} ms; stall per VM: median {:.1} ms, worst {:.1} ms",
        b.drain,
        drain_total,
        stalls.get(moved / 2).copied().unwrap_or(0.0),
        stalls.last().copied().unwrap_or(0.0)
    );
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / (1u64 << 20) as f64;
    let drained_mib: f64 = rows.iter().map(|r| mib(&r["report"]["bytes_sent"])).sum();
    println!("  {drained_mib:.0} MiB sent in all");
    println!(
        "  one such VM alone: {single_total:.0} ms, stall {single_stall:.1} ms, {:.0} MiB in {} rounds; drain total / ({} x alone) = {:.2}",
        mib(&single["bytes_sent"]),
        single["rounds"],
        b.drain,
        drain_total / (b.drain as f64 * single_total).max(1e-9)
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    if moved < b.drain {
        bail!("{} VMs did not move: {summary}", b.drain - moved);
    }
    Ok(())
}

/// An xcloudd alone (records in redb) with the API over TLS on loopback, for the baseline.
struct Alone {
    child: std::process::Child,
    data: std::path::PathBuf,
    admin: String,
    port: u16,
}

impl Alone {
    fn start(xcloudd: &Path, data: &Path, identity: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(xcloudd)
            .arg("--data")
            .arg(data)
            .args(["--tls-listen", &format!("127.0.0.1:{port}"), "--identity"])
            .arg(identity)
            .env("XCLOUD_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()?;
        let sock = data.join("xcloudd.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if Instant::now() > deadline {
                bail!("xcloudd alone did not listen on {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let admin = std::fs::read_to_string(data.join("admin.key"))?.trim().to_string();
        Ok(Self {
            child,
            data: data.to_path_buf(),
            admin,
            port,
        })
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
