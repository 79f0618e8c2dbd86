//! `xcloud bench snapshot`: snapshot a guest with a large touched working set, then restore it
//! eagerly and lazily, next to a plain read of the same file measured in the same run.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::time::{Duration, Instant};
use xcloud_vmm::{CaptureBuffer, Console, Vm, VmConfig, VmHandle};

fn heartbeat_count(handle: &VmHandle, page: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    handle
        .read_guest(page + 8, &mut b)
        .context("cannot read the heartbeat page")?;
    Ok(u64::from_le_bytes(b))
}

fn wait_for_text(capture: &CaptureBuffer, needle: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = capture.text();
        if text.contains(needle) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!("the guest did not print '{needle}': {text}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Time until the restored guest's heartbeat counter moves.
fn time_to_progress(start: Instant, handle: &VmHandle, page: u64) -> Result<Duration> {
    let first = heartbeat_count(handle, page)?;
    loop {
        if heartbeat_count(handle, page)? != first {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the restored guest makes no progress");
        }
        std::hint::spin_loop();
    }
}

/// `xcloud bench snapshot`: snapshot, eager and lazy restore of a `mem`-byte guest with a working set of `working_set_mib`, against a plain read of the same file.
pub fn snapshot(mem: u64, working_set_mib: u64) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("xcloud-bench-snapshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let image = crate::guests::builtin("heartbeat").context("no heartbeat guest")?;
    let capture = CaptureBuffer::default();
    let config = VmConfig {
        mem_bytes: mem,
        vcpus: 1,
        cmdline: format!("0 {working_set_mib} 0"),
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let mut vm = Vm::new(&config, image, Console::new(Box::new(capture.clone())))?;
    vm.start()?;
    let text = wait_for_text(&capture, "heartbeat n=")?;
    let page = text
        .lines()
        .find_map(|l| l.split("page at ").nth(1))
        .and_then(|a| a.split(',').next())
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .context("no heartbeat page address")?;
    let handle = vm.handle();
    let t = Instant::now();
    let summary = xcloud_snapshot::save(&handle, &dir)?;
    let snapshot_time = t.elapsed();
    handle.stop();
    vm.wait();

    let file = dir.join(xcloud_snapshot::MEMORY_FILE);
    // Both the baseline read and the eager restore start from disk: drop this file's pages
    // from the page cache (this file's only) first.
    let drop_cache = || -> Result<()> {
        let f = std::fs::File::open(&file)?;
        use std::os::fd::AsRawFd;
        f.sync_all()?;
        // SAFETY: advises the kernel about our own open file; no memory is involved.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    };
    drop_cache()?;
    let t = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    let mut f = std::fs::File::open(&file)?;
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    let read_rate = total as f64 / t.elapsed().as_secs_f64();

    let sink = || Console::new(Box::new(std::io::sink()));
    drop_cache()?;
    let t = Instant::now();
    let mut eager = xcloud_snapshot::restore(&dir, sink())?;
    let eager_loaded = t.elapsed();
    eager.start()?;
    let eager_runs = time_to_progress(t, &eager.handle(), page)?;
    eager.handle().stop();
    eager.wait();

    drop_cache()?;
    let t = Instant::now();
    let mut lazy = xcloud_snapshot::restore_lazy(&dir, sink())?;
    lazy.start()?;
    let lazy_runs = time_to_progress(t, &lazy.handle(), page)?;
    lazy.handle().stop();
    lazy.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "xcloud bench snapshot: {} MiB guest, {working_set_mib} MiB touched working set",
        mem >> 20
    );
    println!(
        "snapshot: {:.1} ms, {} pages, {:.1} MiB ({:.0} MiB/s)",
        snapshot_time.as_secs_f64() * 1e3,
        summary.pages,
        mib(summary.bytes as f64),
        mib(summary.bytes as f64) / snapshot_time.as_secs_f64()
    );
    println!(
        "baseline in the same run: plain read of memory.pages from disk {:.0} MiB/s",
        mib(read_rate)
    );
    let eager_rate = total as f64 / eager_loaded.as_secs_f64();
    println!(
        "eager restore: memory loaded in {:.1} ms ({:.0} MiB/s, {:.2}x the plain read), guest runs after {:.1} ms",
        eager_loaded.as_secs_f64() * 1e3,
        mib(eager_rate),
        eager_rate / read_rate,
        eager_runs.as_secs_f64() * 1e3
    );
    println!("lazy restore: guest runs after {:.1} ms", lazy_runs.as_secs_f64() * 1e3);
    println!(
        "target: lazy restore runs the guest in under 20 ms: {}",
        if lazy_runs < Duration::from_millis(20) {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "target: eager restore at least at read speed: {}",
        if eager_rate >= read_rate { "met" } else { "MISSED" }
    );
    Ok(())
}
