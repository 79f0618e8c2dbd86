//! `diskread BYTES [SEED]`: reads BYTES of virtio disk 0 from sector 0 in 256 KiB blocks and
//! prints the rate; with a SEED, checks every byte against the pattern `diskwrite BYTES SEED`
//! wrote and fails (status 1) at the first difference.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use xcloud_guest_sdk::{self as sdk, clock, println};
use xcloud_workloads::{arg, check_disk_pattern, open_disk};

const BLOCK: usize = 256 * 1024;

fn main() -> i32 {
    let Some(bytes) = arg(0) else {
        println!("usage: diskread BYTES [SEED]");
        return 2;
    };
    let seed = arg(1).unwrap_or(0);
    let Some(mut disk) = open_disk("diskread") else {
        return 1;
    };
    let bytes = (bytes / 512 * 512).min(disk.capacity());
    let mut buf = sdk::heap::vec![0u8; BLOCK];
    let start = clock::now_ns();
    let mut offset = 0u64;
    while offset < bytes {
        let len = (bytes - offset).min(BLOCK as u64) as usize;
        if let Err(e) = disk.read(offset / 512, &mut buf[..len]) {
            println!("diskread: read at byte {offset} failed: {e:?}");
            return 1;
        }
        if seed != 0 {
            if let Some(at) = check_disk_pattern(seed, offset, &buf[..len]) {
                println!("diskread: byte {at} does not hold what diskwrite {bytes} {seed} wrote");
                return 1;
            }
        }
        offset += len as u64;
    }
    let seconds = (clock::now_ns() - start) as f64 / 1e9;
    println!(
        "diskread: {bytes} bytes{}, {:.1} MB/s, {} doorbells",
        if seed != 0 { " verified" } else { "" },
        bytes as f64 / 1e6 / seconds,
        disk.kicks
    );
    0
}

sdk::entry!(main);
