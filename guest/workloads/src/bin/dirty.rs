//! `dirty W R [SECONDS]`: writes every page of a W MiB working set, round and round, at R MiB/s
//! (R = 0: touches it once, then idles). Prints progress every second; runs SECONDS (0 or none:
//! forever).
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use xcloud_guest_sdk::{self as sdk, clock, println};
use xcloud_workloads::{arg, WorkingSet};

const PAGE: u64 = 4096;

fn main() -> i32 {
    let (Some(mib), Some(rate)) = (arg(0), arg(1)) else {
        println!("usage: dirty WORKING_SET_MIB RATE_MIB_PER_S [SECONDS]");
        return 2;
    };
    let seconds = arg(2).unwrap_or(0);
    let Some(mut set) = WorkingSet::new(mib) else {
        println!(
            "dirty: cannot allocate {mib} MiB (guest has {} MiB RAM)",
            sdk::ram_bytes() >> 20
        );
        return 1;
    };
    println!(
        "dirty: working set {mib} MiB ({} pages) touched, rate {rate} MiB/s",
        set.pages()
    );
    let end = if seconds == 0 {
        u64::MAX
    } else {
        clock::now_ns() + seconds * 1_000_000_000
    };
    let mut next_report = 1_000_000_000;
    set.dirty(rate, end, |set, done, elapsed| {
        if elapsed >= next_report {
            println!(
                "dirty: {} MiB written, {:.1} MiB/s",
                (set.written * PAGE) >> 20,
                (done * PAGE) as f64 / (1 << 20) as f64 / (elapsed as f64 / 1e9)
            );
            next_report += 1_000_000_000;
        }
    });
    println!("dirty: done, {} MiB written", (set.written * PAGE) >> 20);
    0
}

sdk::entry!(main);
