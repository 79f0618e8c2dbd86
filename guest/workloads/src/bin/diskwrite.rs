//! `diskwrite BYTES [SEED [DEPTH [RATE]]]`: the seed paper's dd. Writes BYTES to virtio disk 0
//! from sector 0 in 256 KiB blocks with DEPTH (8) in flight, flushes, and prints the rate.
//! SEED 0 (the default) writes zeroes, as `dd if=/dev/zero` does; any other seed writes a
//! pattern that `diskread BYTES SEED` checks. RATE (MiB/s, 0: as fast as it goes) paces the
//! writes, so that they last long enough for a migration to happen in the middle.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use xcloud_guest_sdk::{self as sdk, clock, println};
use xcloud_workloads::{arg, fill_disk_pattern, open_disk};

const BLOCK: usize = 256 * 1024;

fn main() -> i32 {
    let Some(bytes) = arg(0) else {
        println!("usage: diskwrite BYTES [SEED [DEPTH [RATE_MIB_PER_S]]]");
        return 2;
    };
    let seed = arg(1).unwrap_or(0);
    let depth = arg(2).unwrap_or(8) as usize;
    let rate = arg(3).unwrap_or(0);
    let Some(mut disk) = open_disk("diskwrite") else {
        return 1;
    };
    if bytes > disk.capacity() {
        println!("diskwrite: {bytes} bytes do not fit the {}-byte disk", disk.capacity());
        return 1;
    }
    let bytes = bytes / 512 * 512;
    let start = clock::now_ns();
    let written = disk.write_stream(0, bytes, BLOCK, depth, |offset, buf| {
        if rate != 0 {
            let due = start + offset * 1_000_000_000 / (rate << 20);
            let now = clock::now_ns();
            if due > now {
                clock::sleep_ns(due - now);
            }
        }
        if seed != 0 {
            fill_disk_pattern(seed, offset, buf);
        }
    });
    let wrote = clock::now_ns();
    let flushed = written.and_then(|_| disk.flush());
    let end = clock::now_ns();
    if let Err(e) = flushed {
        println!("diskwrite: failed: {e:?}");
        return 1;
    }
    let seconds = (end - start) as f64 / 1e9;
    println!(
        "diskwrite: {bytes} bytes in 256 KiB blocks, {} in flight: write {:.1} ms, flush {:.1} ms, {:.1} MB/s, {} doorbells",
        depth.clamp(1, disk.depth()),
        (wrote - start) as f64 / 1e6,
        (end - wrote) as f64 / 1e6,
        bytes as f64 / 1e6 / seconds,
        disk.kicks
    );
    0
}

sdk::entry!(main);
