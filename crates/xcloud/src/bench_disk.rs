//! `xcloud bench disk`: the seed paper's dd, native and in a guest, in the same run. The guest
//! (`diskwrite`) writes BYTES to a virtio disk in 256 KiB blocks with 8 in flight and flushes;
//! the baseline is `dd if=/dev/zero bs=256K conv=fdatasync` into a file in the same directory.
//! Both write a fresh file (the guest's image is sparse, as a new raw image is), the order
//! alternates from run to run, and the host's dirty pages are synced before each, so neither
//! pays for the other's writeback. Each run's ratio is guest / dd of that run.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use xcloud_vmm::{CaptureBuffer, Console, DiskSpec, Vm, VmConfig, VmExit};

/// The seed paper's block size.
const BLOCK: u64 = 256 * 1024;

/// What to measure.
pub struct DiskBench {
    /// Bytes each side writes (rounded down to whole blocks).
    pub bytes: u64,
    /// Runs of each side.
    pub runs: usize,
    /// Where the files go (the filesystem under test).
    pub dir: PathBuf,
    /// Requests the guest keeps in flight.
    pub depth: usize,
}

/// One run of both sides.
struct Run {
    dd_mb_s: f64,
    guest_mb_s: f64,
    doorbells: u64,
    wall_ms: f64,
}

fn sync_host() {
    // SAFETY: sync takes no arguments and only schedules and waits for writeback.
    unsafe { libc::sync() };
}

/// `dd` into a fresh file; its rate from its own report.
fn dd(path: &Path, bytes: u64) -> Result<f64> {
    let _ = std::fs::remove_file(path);
    sync_host();
    let start = Instant::now();
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .arg("bs=256K")
        .arg(format!("count={}", bytes / BLOCK))
        .arg("conv=fdatasync")
        .output()
        .context("cannot run dd")?;
    let seconds = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    if !out.status.success() {
        bail!("dd failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // dd's own figure ("... copied, 0.96 s, 1.7 GB/s") leaves out its process start.
    let reported = String::from_utf8_lossy(&out.stderr)
        .split("copied, ")
        .nth(1)
        .and_then(|t| t.split(" s").next())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(seconds);
    Ok(bytes as f64 / 1e6 / reported)
}

/// The guest's dd into a fresh sparse image; its rate from its own clock.
fn guest(path: &Path, bytes: u64, depth: usize) -> Result<(f64, u64, f64)> {
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(bytes + (1 << 20)).context("cannot size the image")?;
    drop(f);
    sync_host();
    let image = crate::guests::builtin("diskwrite").context("the diskwrite guest is not built in")?;
    let capture = CaptureBuffer::default();
    let config = VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        cmdline: format!("{bytes} 0 {depth}"),
        disks: vec![DiskSpec {
            path: path.to_path_buf(),
            read_only: false,
        }],
        nets: Vec::new(),
    };
    let start = Instant::now();
    let mut vm = Vm::new(&config, image, Console::new(Box::new(capture.clone())))?;
    vm.start()?;
    let exit = vm.wait();
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(path);
    let text = capture.text();
    if exit != VmExit::Exited(0) {
        bail!("the diskwrite guest failed: {exit}; its output:\n{text}");
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("diskwrite:"))
        .context("diskwrite printed no result")?;
    let number_before = |suffix: &str| -> Option<f64> {
        let head = line.split(suffix).next()?;
        head.rsplit([' ', ',']).find(|w| !w.is_empty())?.parse().ok()
    };
    let mb_s = number_before(" MB/s").context("no MB/s in diskwrite's line")?;
    let doorbells = number_before(" doorbells").unwrap_or(0.0) as u64;
    Ok((mb_s, doorbells, wall_ms))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark and prints its table.
pub fn disk(b: &DiskBench) -> Result<()> {
    let bytes = b.bytes / BLOCK * BLOCK;
    if bytes == 0 {
        bail!("--bytes must be at least one 256 KiB block");
    }
    let runs = b.runs.max(1);
    let dd_path = b.dir.join(format!("xcloud-bench-dd-{}.img", std::process::id()));
    let guest_path = b.dir.join(format!("xcloud-bench-guest-{}.img", std::process::id()));
    let bar = ProgressBar::new(2 * runs as u64).with_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut results = Vec::new();
    for run in 0..runs {
        let mut dd_rate = 0.0;
        let mut guest_result = (0.0, 0, 0.0);
        // Alternate which side goes first.
        for side in [run % 2, 1 - run % 2] {
            if side == 0 {
                bar.set_message(format!("run {}: dd", run + 1));
                dd_rate = dd(&dd_path, bytes)?;
            } else {
                bar.set_message(format!("run {}: guest", run + 1));
                guest_result = guest(&guest_path, bytes, b.depth)?;
            }
            bar.inc(1);
        }
        results.push(Run {
            dd_mb_s: dd_rate,
            guest_mb_s: guest_result.0,
            doorbells: guest_result.1,
            wall_ms: guest_result.2,
        });
    }
    bar.finish_and_clear();
    let mib = bytes as f64 / (1 << 20) as f64;
    println!(
        "disk write: {bytes} bytes ({mib:.0} MiB) in 256 KiB blocks, then flush; guest: virtio-blk, {} in flight; files in {}",
        b.depth,
        b.dir.display()
    );
    println!(
        "{:>4} {:>10} {:>12} {:>9} {:>10} {:>12} {:>13}",
        "run", "dd MB/s", "guest MB/s", "guest/dd", "doorbells", "exits/MiB", "VM wall ms"
    );
    for (i, r) in results.iter().enumerate() {
        println!(
            "{:>4} {:>10.1} {:>12.1} {:>8.1}% {:>10} {:>12.3} {:>13.1}",
            i + 1,
            r.dd_mb_s,
            r.guest_mb_s,
            100.0 * r.guest_mb_s / r.dd_mb_s,
            r.doorbells,
            r.doorbells as f64 / mib,
            r.wall_ms
        );
    }
    let ratio = median(results.iter().map(|r| r.guest_mb_s / r.dd_mb_s).collect());
    let worst = results
        .iter()
        .map(|r| r.guest_mb_s / r.dd_mb_s)
        .fold(f64::INFINITY, f64::min);
    println!(
        "median guest/dd {:.1}% (worst run {:.1}%), target >= 95%: {}; doorbell exits per MiB, median {:.3}",
        100.0 * ratio,
        100.0 * worst,
        if ratio >= 0.95 { "met" } else { "MISSED" },
        median(results.iter().map(|r| r.doorbells as f64 / mib).collect())
    );
    Ok(())
}
