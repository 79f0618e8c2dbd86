//! `xcloud bench net`: TCP receive throughput into a guest (netrecv, smoltcp on virtio-net over
//! a TAP device) against TCP over the host's loopback, the same client and message size in the
//! same run, netperf-style: one connection streams BYTES in 16 KiB writes and the receiver
//! throws them away. Everything runs in a network namespace the benchmark makes (needs root);
//! the guest side's rate is the client's (from connect to the receiver's close), the same
//! measure as the loopback side's, and exits per MiB are the guest's doorbells.

use crate::netlab::ip;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The message size of the seed paper's netperf runs.
const MESSAGE: usize = 16 * 1024;
pub(crate) const GUEST_IP: &str = "10.79.0.2";
pub(crate) const HOST_IP: &str = "10.79.0.1";
const PORT: u16 = 5001;

/// What to measure.
pub struct NetBench {
    /// Bytes per connection.
    pub bytes: u64,
    /// Runs of each side.
    pub runs: usize,
}

/// Streams `bytes` to `addr` in 16 KiB writes; returns the seconds from connect to the
/// receiver's close.
pub(crate) fn stream_to(addr: &str, bytes: u64) -> Result<f64> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(10))
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let block = vec![0x42u8; MESSAGE];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(MESSAGE as u64) as usize;
        s.write_all(&block[..n])?;
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut end = [0u8; 1];
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let _ = s.read(&mut end);
    Ok(start.elapsed().as_secs_f64())
}

/// Loopback: a receiver thread that discards, and the same client; with `one_core`, both on
/// that CPU (what a 2-core host whose other core runs the guest's vCPU leaves the host side).
fn loopback(bytes: u64, one_core: Option<usize>) -> Result<f64> {
    if let Some(cpu) = one_core {
        crate::bench_migrate::pin_to_cpu(cpu);
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        if let Some(cpu) = one_core {
            crate::bench_migrate::pin_to_cpu(cpu);
        }
        let (mut c, _) = listener.accept()?;
        let mut buf = vec![0u8; MESSAGE];
        let mut got = 0u64;
        loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
        }
    });
    let seconds = stream_to(&addr, bytes)?;
    let got = sink
        .join()
        .map_err(|_| anyhow::anyhow!("the loopback receiver panicked"))??;
    if got != bytes {
        bail!("loopback receiver got {got} of {bytes} bytes");
    }
    Ok(seconds)
}

struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A guest with a NIC on TAP `xcb0`, inside a network namespace of its own whose host side of
/// the TAP has `HOST_IP`; the guest's console read line by line. Dropping it ends both.
pub(crate) struct NsGuest {
    ns: Namespace,
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl NsGuest {
    /// Boots `xcloud run --mem 256M --net tap=xcb0 ARGS` in a new namespace and waits for the
    /// guest's line starting with `ready`.
    pub(crate) fn start(tag: &str, args: &[String], ready: &str) -> Result<Self> {
        let ns = Namespace(format!("xcb-{tag}-{}", std::process::id()));
        let _ = Command::new("ip")
            .args(["netns", "del", &ns.0])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &ns.0])?;
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        let exe = std::env::current_exe().context("cannot find the xcloud executable")?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(exe)
            .args(["run", "--mem", "256M", "--net", "tap=xcb0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the guest")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let guest = Self { ns, child, lines };
        guest.next(ready)?;
        ip(&[
            "-n",
            &guest.ns.0,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            "xcb0",
        ])?;
        Ok(guest)
    }

    /// The namespace's name.
    pub(crate) fn ns(&self) -> &str {
        &self.ns.0
    }

    /// What the guest printed that nobody read yet, and how its VMM ended if it did (for an
    /// error's context).
    pub(crate) fn unread(&mut self) -> String {
        let mut text = self.lines.try_iter().collect::<Vec<_>>().join("\n");
        // A VMM that just failed may take a moment to be gone.
        std::thread::sleep(Duration::from_millis(500));
        if let Ok(Some(status)) = self.child.try_wait() {
            text.push_str(&format!(" (its VMM ended: {status})"));
        }
        text
    }

    /// The guest's next line starting with `prefix` (60 s at most).
    pub(crate) fn next(&self, prefix: &str) -> Result<String> {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .with_context(|| format!("the guest printed no '{prefix}' line"))?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }
}

impl Drop for NsGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark and prints its table.
pub fn net(b: &NetBench) -> Result<()> {
    let runs = b.runs.max(1);
    let guest = NsGuest::start(
        "net",
        &[
            "netrecv".into(),
            "--".into(),
            format!("{GUEST_IP}/24"),
            PORT.to_string(),
            runs.to_string(),
        ],
        "netrecv: listening",
    )?;
    let ns = &guest.ns;
    let next = |prefix: &str| guest.next(prefix);
    let result = (|| -> Result<()> {
        let bar = ProgressBar::new(2 * runs as u64 + runs as u64).with_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let bytes = b.bytes;
        let mut rows = Vec::new();
        let mut last_doorbells = 0u64;
        for run in 0..runs {
            let mut lo = 0.0;
            let mut vm = 0.0;
            let ns_name = ns.0.clone();
            bar.set_message(format!("run {}: loopback on one core", run + 1));
            let lo1 = crate::netlab::Hosts::in_ns(&ns_name, move || loopback(bytes, Some(0)))
                .join()
                .map_err(|_| anyhow::anyhow!("the loopback client panicked"))??;
            for side in [run % 2, 1 - run % 2] {
                let ns_name = ns.0.clone();
                if side == 0 {
                    bar.set_message(format!("run {}: loopback", run + 1));
                    lo = crate::netlab::Hosts::in_ns(&ns_name, move || loopback(bytes, None))
                        .join()
                        .map_err(|_| anyhow::anyhow!("the loopback client panicked"))??;
                } else {
                    bar.set_message(format!("run {}: guest", run + 1));
                    bar.inc(1);
                    let addr = format!("{GUEST_IP}:{PORT}");
                    vm = crate::netlab::Hosts::in_ns(&ns_name, move || stream_to(&addr, bytes))
                        .join()
                        .map_err(|_| anyhow::anyhow!("the client panicked"))??;
                    let line = next(&format!("netrecv: connection {}:", run + 1))?;
                    if !line.contains(&format!(": {bytes} bytes")) {
                        bail!("the guest did not get every byte: {line}");
                    }
                    let doorbells: u64 = line
                        .rsplit(", ")
                        .next()
                        .and_then(|t| t.split_whitespace().next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    rows.push((lo, lo1, vm, doorbells - last_doorbells));
                    last_doorbells = doorbells;
                }
                bar.inc(1);
            }
            if let Some(r) = rows.last_mut() {
                r.0 = lo;
                r.2 = vm;
            }
        }
        bar.finish_and_clear();
        let mib = bytes as f64 / (1 << 20) as f64;
        println!("TCP receive: {bytes} bytes ({mib:.0} MiB) per connection in 16 KiB writes; guest: smoltcp on virtio-net over a TAP; baseline: TCP over loopback, same namespace");
        println!(
            "{:>4} {:>14} {:>13} {:>11} {:>10} {:>12} {:>10} {:>10}",
            "run", "loopback MB/s", "1-core MB/s", "guest MB/s", "guest/lo", "guest/1-core", "doorbells", "exits/MiB"
        );
        let mut ratios = Vec::new();
        let mut one_core_ratios = Vec::new();
        for (i, &(lo, lo1, vm, doorbells)) in rows.iter().enumerate() {
            let rate = |s: f64| bytes as f64 / 1e6 / s;
            ratios.push(rate(vm) / rate(lo));
            one_core_ratios.push(rate(vm) / rate(lo1));
            println!(
                "{:>4} {:>14.1} {:>13.1} {:>11.1} {:>9.1}% {:>11.1}% {:>10} {:>10.3}",
                i + 1,
                rate(lo),
                rate(lo1),
                rate(vm),
                100.0 * rate(vm) / rate(lo),
                100.0 * rate(vm) / rate(lo1),
                doorbells,
                doorbells as f64 / mib
            );
        }
        let ratio = median(ratios);
        println!(
            "median guest/loopback {:.1}%, target >= 80%: {}; guest/one-core loopback {:.1}%",
            100.0 * ratio,
            if ratio >= 0.8 { "met" } else { "MISSED" },
            100.0 * median(one_core_ratios)
        );
        Ok(())
    })();
    result
}
