//! `xcloud bench micro`: the lmbench-style table (each row native vs inside an xcloud guest),
//! the time from process start to the guest's first console line, and the VMM's resident memory
//! beyond the guest's own pages. Every figure is measured in the same run as its baseline.

use crate::guests;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use xcloud_bench_kernels::{run_all, Platform, Row, ROWS};
use xcloud_vmm::{CaptureBuffer, Console, Vm, VmConfig, VmExit};

/// The native side of the kernels.
struct Native;

impl Platform for Native {
    fn null_call(&self) {
        // SAFETY: getppid has no arguments and no side effects; the raw syscall avoids any
        // caching a libc wrapper might do.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }

    fn fresh_memory(&self, bytes: usize) -> *mut u8 {
        // SAFETY: an anonymous private mapping of `bytes`; never unmapped (the process exits
        // soon after the benchmark), so the pointer stays valid for the kernels.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            p as *mut u8
        }
    }
}

/// Runs the `micro` guest and parses its `micro NAME CYCLES` lines.
fn guest_rows(scale: u64) -> Result<(Vec<Row>, u64)> {
    let image = guests::builtin("micro").context("the micro guest is not built in")?;
    let capture = CaptureBuffer::default();
    let config = VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        cmdline: scale.to_string(),
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let mut vm = Vm::new(&config, image, Console::new(Box::new(capture.clone())))?;
    vm.start()?;
    let exit = vm.wait();
    if exit != VmExit::Exited(0) {
        bail!("the micro guest failed: {exit}; its output:\n{}", capture.text());
    }
    let mut rows = Vec::new();
    let mut tsc_khz = 0;
    for line in capture.text().lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("micro") {
            continue;
        }
        match (words.next(), words.next().and_then(|v| v.parse::<f64>().ok())) {
            (Some("tsc_khz"), Some(v)) => tsc_khz = v as u64,
            (Some(name), Some(v)) => {
                if let Some((known, _)) = ROWS.iter().find(|(n, _)| *n == name) {
                    rows.push(Row {
                        name: known,
                        cycles_per_op: v,
                    });
                }
            }
            _ => {}
        }
    }
    Ok((rows, tsc_khz))
}

/// Time from spawning `xcloud ARGS` to its first line on stdout, and the child's status file
/// read at that moment.
fn first_line(args: &[&str]) -> Result<(Duration, String)> {
    let exe = std::env::current_exe().context("cannot find the xcloud executable")?;
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start xcloud")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("cannot read the child's output")?;
    let elapsed = start.elapsed();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    if line.is_empty() {
        bail!("xcloud {} printed nothing", args.join(" "));
    }
    Ok((elapsed, status))
}

fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// Runs the whole micro benchmark and prints its table.
pub fn micro(scale: u64, startup_runs: usize) -> Result<()> {
    let startup_runs = startup_runs.max(1);
    let steps = 3 + 2 * startup_runs as u64;
    let bar = ProgressBar::new(steps).with_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("native kernels");
    let mut native = Vec::new();
    run_all(&Native, scale, |row| native.push(row));
    bar.inc(1);
    bar.set_message("guest kernels");
    let (guest, tsc_khz) = guest_rows(scale)?;
    bar.inc(1);
    bar.set_message("startup");
    let mut boots = Vec::new();
    let mut baseline = Vec::new();
    for _ in 0..startup_runs {
        boots.push(first_line(&["run", "hello"])?.0);
        bar.inc(1);
        baseline.push(first_line(&["guests"])?.0);
        bar.inc(1);
    }
    bar.set_message("memory");
    let (_, status) = first_line(&["run", "--mem", "64M", "heartbeat"])?;
    bar.finish_and_clear();

    let ghz = tsc_khz.max(1) as f64 / 1e6;
    println!(
        "xcloud bench micro: native vs inside an xcloud guest (scale {scale}, TSC {:.3} GHz, best of several runs)",
        ghz
    );
    println!();
    println!(
        "{:<11} {:<58} {:>11} {:>11} {:>8}",
        "row", "one operation", "native ns", "guest ns", "ratio"
    );
    for (name, what) in ROWS {
        let n = native.iter().find(|r| r.name == *name);
        let g = guest.iter().find(|r| r.name == *name);
        let ns = |r: Option<&Row>| {
            r.map(|r| format!("{:.2}", r.cycles_per_op / ghz))
                .unwrap_or_else(|| "-".into())
        };
        let ratio = match (n, g) {
            (Some(n), Some(g)) if n.cycles_per_op > 0.0 => {
                format!("{:.3}", g.cycles_per_op / n.cycles_per_op)
            }
            _ => "-".into(),
        };
        println!("{name:<11} {what:<58} {:>11} {:>11} {ratio:>8}", ns(n), ns(g));
    }
    println!();
    let div_ratio = match (
        native.iter().find(|r| r.name == "double_div"),
        guest.iter().find(|r| r.name == "double_div"),
    ) {
        (Some(n), Some(g)) => g.cycles_per_op / n.cycles_per_op,
        _ => f64::NAN,
    };
    let boot = median(boots.clone());
    let boot_min = boots.iter().min().copied().unwrap_or_default();
    let base = median(baseline);
    let vmm_kib = status_kib(&status, "RssAnon:") + status_kib(&status, "RssFile:");
    let guest_kib = status_kib(&status, "RssShmem:");
    println!("{:<58} {:>16} {:>14} {:>8}", "target", "measured", "limit", "");
    println!(
        "{:<58} {:>16} {:>14} {:>8}",
        "double division inside the guest vs native",
        format!("{:+.2}%", (div_ratio - 1.0) * 100.0),
        "+3%",
        verdict(div_ratio <= 1.03)
    );
    println!(
        "{:<58} {:>16} {:>14} {:>8}",
        format!("process start to first guest console line (median of {startup_runs})"),
        format!("{:.2} ms", boot.as_secs_f64() * 1e3),
        "10 ms",
        verdict(boot < Duration::from_millis(10))
    );
    println!(
        "{:<58} {:>16} {:>14} {:>8}",
        "VMM resident memory beyond guest pages (RssAnon+RssFile)",
        format!("{:.2} MiB", vmm_kib as f64 / 1024.0),
        "4 MiB",
        verdict(vmm_kib < 4096)
    );
    println!();
    println!(
        "startup: min {:.2} ms; baseline in the same run: `xcloud guests` start to first line {:.2} ms (median)",
        boot_min.as_secs_f64() * 1e3,
        base.as_secs_f64() * 1e3
    );
    println!(
        "memory: 64 MiB heartbeat guest; VMM anon {} KiB + file {} KiB; guest pages resident (RssShmem) {} KiB",
        status_kib(&status, "RssAnon:"),
        status_kib(&status, "RssFile:"),
        guest_kib
    );
    Ok(())
}
