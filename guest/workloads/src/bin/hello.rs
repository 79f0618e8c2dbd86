//! `hello`: greets from every vCPU, then exits 0. Arguments are echoed; two are understood:
//! `panic` makes the guest panic (to test panic reporting) and `exit N` makes it exit with N.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use core::sync::atomic::{AtomicUsize, Ordering};
use xcloud_guest_sdk::{self as sdk, println};

static GREETED: AtomicUsize = AtomicUsize::new(0);

fn main() -> i32 {
    let vcpus = sdk::vcpu_count();
    println!(
        "Hello from xcloud guest (vcpu 0 of {vcpus}, {} MiB RAM)",
        sdk::ram_bytes() >> 20
    );
    for index in 1..vcpus {
        if let Err(e) = sdk::start_vcpu(index, move || {
            println!("Hello from vcpu {} of {vcpus}", sdk::vcpu_index());
            GREETED.fetch_add(1, Ordering::SeqCst);
        }) {
            println!("cannot start vcpu {index}: {e:?}");
            return 1;
        }
    }
    while GREETED.load(Ordering::SeqCst) < vcpus - 1 {
        core::hint::spin_loop();
    }
    let args: sdk::heap::vec::Vec<&str> = sdk::args().collect();
    if !args.is_empty() {
        println!("args: {args:?}");
    }
    match args.as_slice() {
        ["panic", ..] => panic!("asked to panic"),
        ["exit", n, ..] => return n.parse().unwrap_or(255),
        _ => {}
    }
    println!("all {vcpus} vcpus said hello");
    0
}

sdk::entry!(main);
