//! `micro`: the guest half of `xcloud bench micro`. Runs the shared kernels of
//! `xcloud-bench-kernels` and prints one `micro NAME CYCLES` line per row. Argument: scale (1).
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use xcloud_bench_kernels::{run_all, Platform};
use xcloud_guest_sdk::{self as sdk, hypercall, println};

struct Guest;

impl Platform for Guest {
    fn null_call(&self) {
        if hypercall::xcloud_present() {
            hypercall::call(sdk::Op::Nop, [0; 6]);
        }
    }

    fn fresh_memory(&self, bytes: usize) -> *mut u8 {
        match core::alloc::Layout::from_size_align(bytes, 4096) {
            // SAFETY: the layout has a non-zero size; the memory is never freed (the guest
            // exits after the run), and the heap has never handed it out, so it is untouched.
            Ok(layout) => unsafe { sdk::heap::alloc::alloc(layout) },
            Err(_) => core::ptr::null_mut(),
        }
    }
}

fn main() -> i32 {
    let scale = sdk::args().next().and_then(|a| a.parse().ok()).unwrap_or(1);
    println!("micro tsc_khz {}", sdk::clock::tsc_khz());
    run_all(&Guest, scale, |row| {
        println!("micro {} {:.3}", row.name, row.cycles_per_op)
    });
    println!("micro done");
    0
}

sdk::entry!(main);
