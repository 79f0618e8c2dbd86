//! `xcloud bench httpd`: HTTP/1.1 keep-alive request rate and latency of the `httpd` guest
//! (smoltcp on virtio-net) under wrk, against a host-native server of the same simplicity
//! (std threads, one per connection, the same request parsing and the same fixed body) under
//! the same wrk in the same run and namespace. The sides alternate.

use crate::bench_net::{NsGuest, GUEST_IP};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

/// The body both servers send (the guest's `httpd` sends the same).
const BODY: &[u8] = b"Hello from an xcloud guest\n";

/// What to measure.
pub struct HttpBench {
    /// Seconds per wrk run.
    pub seconds: u64,
    /// Connections wrk keeps open.
    pub connections: usize,
    /// Runs of each side.
    pub runs: usize,
}

/// wrk's figures.
struct Load {
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn parse_latency(v: &str) -> Option<f64> {
    let (n, scale) = if let Some(x) = v.strip_suffix("us") {
        (x, 1.0)
    } else if let Some(x) = v.strip_suffix("ms") {
        (x, 1e3)
    } else if let Some(x) = v.strip_suffix('s') {
        (x, 1e6)
    } else {
        (v, 1.0)
    };
    n.parse::<f64>().ok().map(|x| x * scale)
}

fn wrk(ns: &str, url: &str, b: &HttpBench) -> Result<Load> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "wrk", "-t1"])
        .arg(format!("-c{}", b.connections))
        .arg(format!("-d{}s", b.seconds))
        .args(["--latency", url])
        .output()
        .context("cannot run wrk (Debian package wrk; scripts/setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw failed requests:\n{text}");
    }
    let field = |prefix: &str| -> Option<&str> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
    };
    Ok(Load {
        requests_per_s: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .context("no Requests/sec in wrk's output")?,
        p50_us: field("50%").and_then(parse_latency).context("no 50% latency")?,
        p99_us: field("99%").and_then(parse_latency).context("no 99% latency")?,
    })
}

/// The host-native server: a thread per connection, keep-alive, the fixed body.
fn native_server(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut buf = vec![0u8; 8192];
            let mut have = 0;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                BODY.len()
            );
            let mut whole = response.into_bytes();
            whole.extend_from_slice(BODY);
            loop {
                let n = match conn.read(&mut buf[have..]) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                have += n;
                while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                    if conn.write_all(&whole).is_err() {
                        return;
                    }
                    buf.copy_within(end + 4..have, 0);
                    have -= end + 4;
                }
                if have == buf.len() {
                    return;
                }
            }
        });
    }
}

/// Runs the benchmark and prints its table.
pub fn httpd(b: &HttpBench) -> Result<()> {
    let runs = b.runs.max(1);
    let guest = NsGuest::start(
        "http",
        &[
            "httpd".into(),
            "--".into(),
            format!("{GUEST_IP}/24"),
            "80".into(),
            "64".into(),
        ],
        "httpd: serving",
    )?;
    let ns = guest.ns().to_string();
    let listener = crate::netlab::Hosts::in_ns(&ns, || Ok(TcpListener::bind("127.0.0.1:0")?))
        .join()
        .map_err(|_| anyhow::anyhow!("cannot bind the native server"))??;
    let native_url = format!("http://{}/", listener.local_addr()?);
    std::thread::spawn(move || native_server(listener));
    let guest_url = format!("http://{GUEST_IP}/");
    let bar = ProgressBar::new(2 * runs as u64).with_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for run in 0..runs {
        let (mut native, mut vm) = (None, None);
        for side in [run % 2, 1 - run % 2] {
            if side == 0 {
                bar.set_message(format!("run {}: native", run + 1));
                native = Some(wrk(&ns, &native_url, b)?);
            } else {
                bar.set_message(format!("run {}: guest", run + 1));
                vm = Some(wrk(&ns, &guest_url, b)?);
            }
            bar.inc(1);
        }
        if let (Some(n), Some(g)) = (native, vm) {
            rows.push((n, g));
        }
    }
    bar.finish_and_clear();
    println!(
        "HTTP/1.1 keep-alive GET of a {}-byte body, wrk -t1 -c{} -d{}s; guest: httpd (smoltcp, virtio-net); native: std threads on loopback, same namespace",
        BODY.len(),
        b.connections,
        b.seconds
    );
    println!(
        "{:>4} {:>12} {:>11} {:>9} {:>10} {:>9} {:>10} {:>9} {:>10}",
        "run",
        "native req/s",
        "guest req/s",
        "guest/nat",
        "nat p50us",
        "guest p50",
        "nat p99us",
        "guest p99",
        "p99 ratio"
    );
    let mut rate_ratios = Vec::new();
    let mut p99_ratios = Vec::new();
    for (i, (n, g)) in rows.iter().enumerate() {
        rate_ratios.push(g.requests_per_s / n.requests_per_s);
        p99_ratios.push(g.p99_us / n.p99_us);
        println!(
            "{:>4} {:>12.0} {:>11.0} {:>8.1}% {:>10.0} {:>9.0} {:>10.0} {:>9.0} {:>9.2}x",
            i + 1,
            n.requests_per_s,
            g.requests_per_s,
            100.0 * g.requests_per_s / n.requests_per_s,
            n.p50_us,
            g.p50_us,
            n.p99_us,
            g.p99_us,
            g.p99_us / n.p99_us
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (rate, p99) = (median(rate_ratios), median(p99_ratios));
    println!(
        "median guest/native requests/s {:.1}% (target >= 70%: {}), p99 {:.2}x native (target <= 2x: {})",
        100.0 * rate,
        if rate >= 0.7 { "met" } else { "MISSED" },
        p99,
        if p99 <= 2.0 { "met" } else { "MISSED" }
    );
    Ok(())
}
