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

/// How a disk backend issues the writes of one sequential stream.
#[derive(Clone, Copy, Debug)]
enum Backend {
    /// One thread, one `pwrite` after another (the virtio-blk worker today).
    Sync,
    /// Four threads taking blocks from a shared counter, `depth` in flight at most.
    Pool,
    /// io_uring with `depth` writes in flight.
    Uring,
}

/// Writes `bytes` in 256 KiB blocks into a fresh file with `backend`, then fdatasync; MB/s.
fn backend_run(path: &Path, bytes: u64, depth: usize, backend: Backend) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let _ = std::fs::remove_file(path);
    sync_host();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let blocks = bytes / BLOCK;
    let block = vec![0u8; BLOCK as usize];
    let start = Instant::now();
    match backend {
        Backend::Sync => {
            for i in 0..blocks {
                file.write_all_at(&block, i * BLOCK)?;
            }
        }
        Backend::Pool => {
            let next = std::sync::atomic::AtomicU64::new(0);
            std::thread::scope(|scope| -> Result<()> {
                let workers: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| -> std::io::Result<()> {
                            loop {
                                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                if i >= blocks {
                                    return Ok(());
                                }
                                file.write_all_at(&block, i * BLOCK)?;
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().map_err(|_| anyhow::anyhow!("a pool thread panicked"))??;
                }
                Ok(())
            })?;
        }
        Backend::Uring => {
            use io_uring::{opcode, types, IoUring};
            use std::os::fd::AsRawFd;
            let mut ring = IoUring::new(depth.max(1) as u32).context("io_uring is not available here")?;
            let fd = types::Fd(file.as_raw_fd());
            let (mut submitted, mut done) = (0u64, 0u64);
            while done < blocks {
                while submitted < blocks && submitted - done < depth as u64 {
                    let entry = opcode::Write::new(fd, block.as_ptr(), BLOCK as u32)
                        .offset(submitted * BLOCK)
                        .build()
                        .user_data(submitted);
                    // SAFETY: `block` outlives every write in flight (they all complete below
                    // before it drops), and the ring only reads it.
                    if unsafe { ring.submission().push(&entry) }.is_err() {
                        break;
                    }
                    submitted += 1;
                }
                ring.submit_and_wait(1)?;
                for cqe in ring.completion() {
                    if cqe.result() != BLOCK as i32 {
                        bail!("an io_uring write returned {}", cqe.result());
                    }
                    done += 1;
                }
            }
        }
    }
    file.sync_data()?;
    let seconds = start.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(path);
    Ok(bytes as f64 / 1e6 / seconds)
}

/// `xcloud bench disk --backends`: the three ways the block device could issue a sequential
/// stream's writes, on the host alone, alternating, so that the choice is measured here.
pub fn backends(b: &DiskBench) -> Result<()> {
    let bytes = b.bytes / BLOCK * BLOCK;
    let path = b.dir.join(format!("xcloud-bench-backend-{}.img", std::process::id()));
    let all = [Backend::Sync, Backend::Pool, Backend::Uring];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    let bar = ProgressBar::new((b.runs.max(1) * all.len()) as u64);
    for run in 0..b.runs.max(1) {
        for k in 0..all.len() {
            let which = (k + run) % all.len();
            bar.set_message(format!("run {}: {:?}", run + 1, all[which]));
            rates[which].push(backend_run(&path, bytes, b.depth, all[which])?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    println!(
        "disk backends: {bytes} bytes in 256 KiB writes then fdatasync, {} in flight, files in {}",
        b.depth,
        b.dir.display()
    );
    let sync_median = median(rates[0].clone());
    for (backend, r) in all.iter().zip(&rates) {
        let m = median(r.clone());
        let runs: Vec<String> = r.iter().map(|x| format!("{x:.0}")).collect();
        println!(
            "{:>8?}: median {m:>7.1} MB/s ({:>5.1}% of sync), runs {}",
            backend,
            100.0 * m / sync_median,
            runs.join(" ")
        );
    }
    Ok(())
}
