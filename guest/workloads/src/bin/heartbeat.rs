//! `heartbeat`: counts loop iterations in a page of guest memory and tracks the largest gap
//! between consecutive iterations — the stall the guest itself observes when it is paused,
//! migrated or descheduled. Prints a line every 500 ms. Argument: seconds to run (0 or none:
//! forever). With several vCPUs, every secondary vCPU spins too, counting in its own slot of
//! the same page, so that pause and migration can be checked on every vCPU.
//!
//! `heartbeat SECONDS W R` also writes a W MiB working set at R MiB/s from the same loop (one
//! vCPU, so it runs in any PVH VMM), so that the stall of a migration can be measured under
//! memory load: the pages written between two iterations count in the gap.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use core::ptr::{addr_of_mut, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};
use xcloud_guest_sdk::{self as sdk, clock, println};

/// The heartbeat's state, alone in one page so that it is one dirty page per update.
#[repr(C, align(4096))]
struct Beat {
    magic: u64,
    count: u64,
    max_gap_ticks: u64,
    /// Iterations of each secondary vCPU (index 1..), at byte offset 24 + 8 * index.
    secondary: [AtomicU64; MAX_VCPUS],
}

const MAX_VCPUS: usize = 64;
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

static mut BEAT: Beat = Beat {
    magic: 0x7863_6c64_6265_6174,
    count: 0,
    max_gap_ticks: 0,
    secondary: [ZERO; MAX_VCPUS],
};

const REPORT_NS: u64 = 500_000_000;

fn main() -> i32 {
    let seconds: u64 = sdk::args().next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let beat = addr_of_mut!(BEAT);
    let report_ticks = clock::ns_to_ticks(REPORT_NS);
    let end = if seconds == 0 {
        u64::MAX
    } else {
        clock::rdtsc() + clock::ns_to_ticks(seconds * 1_000_000_000)
    };
    let vcpus = sdk::vcpu_count().min(MAX_VCPUS);
    let Ok(mut pacer) = xcloud_workloads::paced_set_from_args("heartbeat", 1) else {
        return 1;
    };
    for index in 1..vcpus {
        // SAFETY: the secondary slots are atomics that live for the whole run; sharing a
        // reference to one with another vCPU is sound.
        let slot = unsafe { &(*beat).secondary[index] };
        let started = sdk::start_vcpu(index, move || loop {
            slot.fetch_add(1, Ordering::Relaxed);
        });
        if started.is_err() {
            println!("heartbeat: cannot start vcpu {index}");
            return 1;
        }
    }
    println!(
        "heartbeat: start, page at {:#x}, {vcpus} vcpus, tsc {} kHz",
        beat as usize,
        clock::tsc_khz()
    );
    let mut last = clock::rdtsc();
    let mut next_report = last + report_ticks;
    let mut window_max = 0u64;
    let mut count = 0u64;
    let mut max_gap = 0u64;
    loop {
        let now = clock::rdtsc();
        let gap = now.wrapping_sub(last);
        last = now;
        count += 1;
        if count.is_multiple_of(1024) {
            if let Some(pacer) = pacer.as_mut() {
                pacer.catch_up(clock::now_ns());
            }
        }
        if gap > window_max {
            window_max = gap;
            if gap > max_gap {
                max_gap = gap;
            }
        }
        // SAFETY: `count` and `max_gap_ticks` are written only by this vCPU, through this raw
        // pointer (secondaries touch only their atomics); the volatile writes keep the page
        // really written every iteration.
        unsafe {
            write_volatile(addr_of_mut!((*beat).count), count);
            write_volatile(addr_of_mut!((*beat).max_gap_ticks), max_gap);
        }
        if now >= next_report || now >= end {
            println!(
                "heartbeat n={count} max_gap_us={} window_max_us={} uptime_ms={}",
                clock::ticks_to_ns(max_gap) / 1000,
                clock::ticks_to_ns(window_max) / 1000,
                clock::now_ns() / 1_000_000
            );
            window_max = 0;
            next_report = clock::rdtsc() + report_ticks;
            // The report itself is an exit; do not count it as a stall.
            last = clock::rdtsc();
            if now >= end {
                println!("heartbeat: done");
                return 0;
            }
        }
    }
}

sdk::entry!(main);
