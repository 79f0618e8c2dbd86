//! `xcloud bench fair`: CPU fairness of the VMMs xcloudd jails. A real xcloudd (the binary
//! beside this one) on a fresh data directory boots CPU-bound guests (`heartbeat` spins)
//! through its API: two with CPU weights 100 and 300 sharing one core, and one capped at
//! `--cap` percent of a CPU on the other core. Each VMM's CPU time over the window comes from
//! the API's metrics (its process's /proc figures).

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use xcloud_control::client::Client;

/// What to measure.
pub struct FairBench {
    /// Seconds per measuring window.
    pub seconds: u64,
    /// Windows.
    pub runs: usize,
    /// The capped VM's cap, in percent of one CPU.
    pub cap: u32,
}

struct Daemon {
    child: Child,
    data: PathBuf,
    client: Client,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(a) = self.client.call("GET", "/v1/vms", None) {
            let vms: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
            for vm in vms.as_array().into_iter().flatten() {
                let _ = self
                    .client
                    .call("DELETE", &format!("/v1/vms/{}", vm["id"].as_str().unwrap_or("")), None);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn start_daemon() -> Result<Daemon> {
    let exe = std::env::current_exe()?;
    let xcloudd = exe.with_file_name("xcloudd");
    if !xcloudd.is_file() {
        bail!(
            "{} is missing: build the workspace (cargo build --release)",
            xcloudd.display()
        );
    }
    let data = std::env::temp_dir().join(format!("xcloud-bench-fair-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let child = Command::new(&xcloudd)
        .arg("--data")
        .arg(&data)
        .arg("--vmm")
        .arg(&exe)
        .env("XCLOUD_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", xcloudd.display()))?;
    let sock = data.join("xcloudd.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if Instant::now() > deadline {
            bail!("xcloudd did not listen on {}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let key = std::fs::read_to_string(data.join("admin.key"))?.trim().to_string();
    Ok(Daemon {
        child,
        client: Client::new(sock, Some(key)),
        data,
    })
}

fn call(d: &Daemon, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let body = body.map(|b| (b.to_string().into_bytes(), "application/json"));
    let a = d.client.call(method, path, body)?;
    if !(200..300).contains(&a.status) {
        bail!("{method} {path}: {} (HTTP {})", a.error_text(), a.status);
    }
    Ok(serde_json::from_slice(&a.body)?)
}

/// Pins every thread of process `pid` to CPU `cpu`.
fn pin(pid: u64, cpu: usize) -> Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: libc::pid_t = task?.file_name().to_string_lossy().parse()?;
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `cpu` is below CPU_SETSIZE (this machine's CPUs).
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: sched_setaffinity reads a cpu_set_t of the size given.
        if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
            bail!("pinning thread {tid}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn cpu_seconds(d: &Daemon, vm: &str) -> Result<f64> {
    call(d, "GET", &format!("/v1/vms/{vm}/metrics"), None)?["cpu_seconds"]
        .as_f64()
        .context("metrics without cpu_seconds")
}

/// Runs the benchmark and prints its table.
pub fn fair(b: &FairBench) -> Result<()> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let d = start_daemon()?;
    let image = crate::guests::builtin("heartbeat").context("no built-in heartbeat")?;
    let a = d.client.call(
        "POST",
        "/v1/images?name=heartbeat",
        Some((image.to_vec(), "application/octet-stream")),
    )?;
    if a.status != 201 {
        bail!("uploading heartbeat: {}", a.error_text());
    }
    let mut pids = Vec::new();
    for (name, body) in [
        (
            "w100",
            serde_json::json!({"name": "w100", "image": "heartbeat", "cpu_weight": 100}),
        ),
        (
            "w300",
            serde_json::json!({"name": "w300", "image": "heartbeat", "cpu_weight": 300}),
        ),
        (
            "capped",
            serde_json::json!({"name": "capped", "image": "heartbeat", "cpu_cap_percent": b.cap}),
        ),
    ] {
        let vm = call(&d, "POST", "/v1/vms", Some(body))?;
        if vm["state"] != "running" {
            bail!("{name} did not start: {vm}");
        }
        let metrics = call(&d, "GET", &format!("/v1/vms/{name}/metrics"), None)?;
        pids.push(metrics["vmm_pid"].as_u64().context("no VMM pid")?);
    }
    // The weighted pair shares CPU 0; the capped VM has the last CPU to itself (on a
    // one-CPU host it competes too, and its figure is only an upper bound).
    pin(pids[0], 0)?;
    pin(pids[1], 0)?;
    pin(pids[2], cpus - 1)?;
    std::thread::sleep(Duration::from_millis(500));
    let bar = ProgressBar::new(b.runs as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("fair");
    let mut rows = Vec::new();
    for _ in 0..b.runs {
        let before: Vec<f64> = ["w100", "w300", "capped"]
            .iter()
            .map(|vm| cpu_seconds(&d, vm))
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(b.seconds));
        let after: Vec<f64> = ["w100", "w300", "capped"]
            .iter()
            .map(|vm| cpu_seconds(&d, vm))
            .collect::<Result<_>>()?;
        let wall = t0.elapsed().as_secs_f64();
        let used: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        rows.push((used[0], used[1], used[2], wall));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("| run | w100 CPU s | w300 CPU s | w100 share | w300 share | core busy | capped CPU s | capped % of a CPU (cap {}%) |", b.cap);
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut shares = Vec::new();
    let mut capped = Vec::new();
    for (i, (a, w, c, wall)) in rows.iter().enumerate() {
        let share = a / (a + w) * 100.0;
        let cap_pct = c / wall * 100.0;
        shares.push(share);
        capped.push(cap_pct);
        println!(
            "| {} | {a:.2} | {w:.2} | {share:.1}% | {:.1}% | {:.0}% | {c:.2} | {cap_pct:.1}% |",
            i + 1,
            100.0 - share,
            (a + w) / wall * 100.0
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let share = median(&mut shares);
    let cap_pct = median(&mut capped);
    let fair_ok = (share - 25.0).abs() <= 3.0;
    let cap_ok = cap_pct <= f64::from(b.cap) + 2.0;
    println!();
    println!(
        "weights 1:3 on one core: median {share:.1}% / {:.1}% (target 25% / 75% within 3 points: {})",
        100.0 - share,
        if fair_ok { "met" } else { "MISSED" }
    );
    println!(
        "cap {}%: median {cap_pct:.1}% of a CPU (target <= cap: {})",
        b.cap,
        if cap_ok { "met" } else { "MISSED" }
    );
    Ok(())
}
