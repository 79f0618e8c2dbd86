//! `dirty W R [SECONDS]`: writes every page of a W MiB working set, round and round, at R MiB/s
//! (R = 0: touches it once, then idles). Prints progress every second; runs SECONDS (0 or none:
//! forever).
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use xcloud_guest_sdk::{self as sdk, clock, println};

const PAGE: usize = 4096;
const STEP_NS: u64 = 1_000_000;

fn arg(n: usize) -> Option<u64> {
    sdk::args().nth(n).and_then(|a| a.parse().ok())
}

fn main() -> i32 {
    let (Some(mib), Some(rate)) = (arg(0), arg(1)) else {
        println!("usage: dirty WORKING_SET_MIB RATE_MIB_PER_S [SECONDS]");
        return 2;
    };
    let seconds = arg(2).unwrap_or(0);
    let bytes = (mib as usize) << 20;
    let Ok(layout) = core::alloc::Layout::from_size_align(bytes.max(PAGE), PAGE) else {
        println!("dirty: bad working set size {mib} MiB");
        return 2;
    };
    // SAFETY: non-zero size; the block is used for the whole run and never freed.
    let set = unsafe { sdk::heap::alloc::alloc(layout) };
    if set.is_null() {
        println!(
            "dirty: cannot allocate {mib} MiB (guest has {} MiB RAM)",
            sdk::ram_bytes() >> 20
        );
        return 1;
    }
    let pages = (bytes / PAGE).max(1);
    let mut written: u64 = 0;
    let mut next = 0usize;
    let mut write_page = |written: &mut u64| {
        // SAFETY: next < pages, so the write is inside the allocated working set.
        unsafe { core::ptr::write_volatile(set.add(next * PAGE) as *mut u64, *written) };
        next = (next + 1) % pages;
        *written += 1;
    };
    for _ in 0..pages {
        write_page(&mut written);
    }
    println!("dirty: working set {mib} MiB ({pages} pages) touched, rate {rate} MiB/s");
    let start = clock::now_ns();
    let end = if seconds == 0 {
        u64::MAX
    } else {
        start + seconds * 1_000_000_000
    };
    let pages_per_s = rate * (1 << 20) / PAGE as u64;
    let mut done_since_start = 0u64;
    let mut next_report = start + 1_000_000_000;
    loop {
        let now = clock::now_ns();
        if now >= end {
            println!("dirty: done, {} MiB written", (written * PAGE as u64) >> 20);
            return 0;
        }
        let due = ((now - start) as u128 * pages_per_s as u128 / 1_000_000_000) as u64;
        while done_since_start < due {
            write_page(&mut written);
            done_since_start += 1;
        }
        if now >= next_report {
            println!(
                "dirty: {} MiB written, {:.1} MiB/s",
                (written * PAGE as u64) >> 20,
                (done_since_start * PAGE as u64) as f64 / (1 << 20) as f64 / ((now - start) as f64 / 1e9)
            );
            next_report += 1_000_000_000;
        }
        clock::sleep_ns(STEP_NS);
    }
}

sdk::entry!(main);
