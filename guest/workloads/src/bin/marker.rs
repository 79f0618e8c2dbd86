//! `marker [SECONDS]`: puts the string `xcloud_memscan_marker` in a page of guest RAM, prints
//! its guest-physical address, and idles for SECONDS (0 or none: forever). It stands for a
//! guest whose memory an introspection module (extensions/memscan.wat) searches from outside.
//! The string is built at run time from an upper-case copy, so that the guest's image holds
//! it nowhere else.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use core::ptr::{addr_of_mut, write_volatile};
use xcloud_guest_sdk::{self as sdk, clock, println};

#[repr(C, align(64))]
struct Page([u8; 64]);

static mut MARKER: Page = Page([0; 64]);

fn main() -> i32 {
    let seconds: u64 = sdk::args().next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let shouted: &[u8] = core::hint::black_box(b"XCLOUD_MEMSCAN_MARKER");
    let marker = addr_of_mut!(MARKER);
    for (i, byte) in shouted.iter().enumerate() {
        // SAFETY: `i` is below 21, inside the 64-byte static, which nothing else touches.
        unsafe { write_volatile(addr_of_mut!((*marker).0[i]), byte.to_ascii_lowercase()) };
    }
    // The SDK's page tables map guest RAM one to one: the address is guest-physical.
    println!("marker: placed at {:#x}", marker as usize);
    let end = clock::now_ns().saturating_add(seconds.saturating_mul(1_000_000_000));
    while seconds == 0 || clock::now_ns() < end {
        clock::sleep_ms(100);
    }
    println!("marker: done");
    0
}

sdk::entry!(main);
