//! `xcloud host drain` and `xcloud provider evacuate`: mark hosts drained, then live-migrate
//! every VM running on them elsewhere through the API, a few at a time, a progress bar per
//! VM, and a table at the end: what moved where, each VM's stall, the bytes moved, the time.
//! A VM that cannot move runs on where it was and is reported.

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How one VM fared.
struct Outcome {
    name: String,
    from: String,
    result: Result<Value, String>,
}

/// The API as these commands call it: `method path [body]`, the JSON of a success.
pub trait Api: Sync {
    /// One call.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value>;
    /// Whether the caller wants JSON rather than bars and a table.
    fn json(&self) -> bool;
}

/// Moves every running VM off `hosts` (already drained); with `avoid_provider`, to hosts of
/// other providers only. Exit status 0 when every running VM moved, [`crate::exit::PARTIAL`] when some stayed.
pub fn move_off(api: &dyn Api, hosts: &[String], avoid_provider: Option<&str>, parallel: usize) -> Result<i32> {
    let started = Instant::now();
    let vms = api.call("GET", "/v1/vms", None)?;
    let mut queue = VecDeque::new();
    let mut left = Vec::new();
    for vm in vms.as_array().into_iter().flatten() {
        let Some(host) = vm["host"].as_str() else { continue };
        if !hosts.iter().any(|h| h == host) {
            continue;
        }
        let name = vm["name"].as_str().unwrap_or("?").to_string();
        if vm["state"] == "running" {
            queue.push_back((
                vm["id"].as_str().unwrap_or_default().to_string(),
                name,
                host.to_string(),
            ));
        } else {
            left.push(Outcome {
                name,
                from: host.to_string(),
                result: Err(format!(
                    "not moved: {} (only a running VM migrates live)",
                    vm["state"].as_str().unwrap_or("?")
                )),
            });
        }
    }
    let total = queue.len();
    let queue = Mutex::new(queue);
    let outcomes = Mutex::new(left);
    let bars = MultiProgress::new();
    if api.json() {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{spinner} {prefix:<16} {wide_msg} {elapsed:>4}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    std::thread::scope(|scope| {
        for _ in 0..parallel.clamp(1, 16) {
            let (queue, outcomes, bars, style) = (&queue, &outcomes, &bars, &style);
            scope.spawn(move || loop {
                let Some((id, name, from)) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
                    return;
                };
                let bar = bars.add(
                    ProgressBar::new_spinner()
                        .with_style(style.clone())
                        .with_prefix(name.clone()),
                );
                bar.set_message(format!("leaving {from}"));
                bar.enable_steady_tick(Duration::from_millis(120));
                let result = move_one(api, &id, avoid_provider, &bar);
                match &result {
                    Ok(r) => bar.finish_with_message(format!(
                        "{from} -> {}: stalled {:.1} ms",
                        r["to"].as_str().unwrap_or("?"),
                        r["downtime_ms"].as_f64().unwrap_or(0.0)
                    )),
                    Err(why) => bar.abandon_with_message(format!("stays on {from}: {why}")),
                }
                outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Outcome { name, from, result });
            });
        }
    });
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|p| p.into_inner()));
    let stayed = outcomes.iter().filter(|o| o.result.is_err()).count();
    report(api.json(), &outcomes, total, started.elapsed());
    Ok(if stayed == 0 { 0 } else { crate::exit::PARTIAL })
}

/// Migrates VM `id`, showing its progress on `bar` (read from its metrics while it moves).
fn move_one(api: &dyn Api, id: &str, avoid_provider: Option<&str>, bar: &ProgressBar) -> Result<Value, String> {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if let Ok(m) = api.call("GET", &format!("/v1/vms/{id}/metrics"), None) {
                    let p = &m["migration"];
                    if p.is_object() {
                        bar.set_message(format!(
                            "{} round {}: {:.1} MiB sent, {} pages dirty",
                            p["phase"].as_str().unwrap_or("?"),
                            p["round"],
                            p["bytes_sent"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                            p["dirty_pages"]
                        ));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let body = serde_json::json!({ "avoid_provider": avoid_provider });
        let result = api
            .call("POST", &format!("/v1/vms/{id}/migrate"), Some(body))
            .map_err(|err| err.to_string());
        done.store(true, Ordering::SeqCst);
        result
    })
}

fn report(json: bool, outcomes: &[Outcome], total: usize, elapsed: Duration) {
    if json {
        let rows: Vec<Value> = outcomes
            .iter()
            .map(|o| match &o.result {
                Ok(r) => serde_json::json!({"vm": o.name, "from": o.from, "moved": true, "report": r}),
                Err(why) => serde_json::json!({"vm": o.name, "from": o.from, "moved": false, "error": why}),
            })
            .collect();
        let summary = serde_json::json!({"vms": rows, "total_ms": elapsed.as_secs_f64() * 1000.0});
        println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
        return;
    }
    println!(
        "{:<16} {:<10} {:<10} {:>10} {:>10} {:>10}  RESULT",
        "VM", "FROM", "TO", "STALL_MS", "MIB", "TOTAL_MS"
    );
    let mut bytes = 0u64;
    for o in outcomes {
        match &o.result {
            Ok(r) => {
                bytes += r["bytes_sent"].as_u64().unwrap_or(0);
                println!(
                    "{:<16} {:<10} {:<10} {:>10.1} {:>10.1} {:>10.0}  moved",
                    o.name,
                    o.from,
                    r["to"].as_str().unwrap_or("?"),
                    r["downtime_ms"].as_f64().unwrap_or(0.0),
                    r["bytes_sent"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                    r["total_ms"].as_f64().unwrap_or(0.0)
                );
            }
            Err(why) => println!(
                "{:<16} {:<10} {:<10} {:>10} {:>10} {:>10}  {why}",
                o.name, o.from, "-", "-", "-", "-"
            ),
        }
    }
    let moved = outcomes.iter().filter(|o| o.result.is_ok()).count();
    println!(
        "{moved} of {total} running VMs moved, {:.1} MiB in {:.1} s; {} stayed",
        bytes as f64 / (1u64 << 20) as f64,
        elapsed.as_secs_f64(),
        outcomes.len() - moved
    );
}
