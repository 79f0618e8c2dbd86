//! `gauge LOAD [SECONDS]`: reports LOAD (a decimal figure, such as `12` or `2.5`) as its load
//! every 500 ms and otherwise sleeps, for SECONDS (0 or none: forever). It stands for an
//! application whose load is its own figure (jobs waiting, sessions open) and does not show
//! in its CPU use: an autoscaling group that follows `guest_load` grows for it while one that
//! follows CPU would shrink.
#![no_std]
#![no_main]

use xcloud_guest_sdk::{self as sdk, clock, println};

/// `text` as thousandths: `12` is 12000, `2.5` is 2500; at most three decimals.
fn parse_milli(text: &str) -> Option<u64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || (whole.is_empty() && fraction.is_empty()) {
        return None;
    }
    let digits = |s: &str| s.is_empty() || s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) {
        return None;
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let mut milli: u64 = if fraction.is_empty() { 0 } else { fraction.parse().ok()? };
    for _ in fraction.len()..3 {
        milli *= 10;
    }
    whole.checked_mul(1000)?.checked_add(milli)
}

fn main() -> i32 {
    let mut args = sdk::args();
    let Some(load) = args.next().and_then(parse_milli) else {
        println!("usage: gauge LOAD [SECONDS]  (LOAD a decimal figure, such as 12 or 2.5)");
        return 2;
    };
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    println!("gauge: reporting a load of {}.{:03}", load / 1000, load % 1000);
    let end = clock::now_ns().saturating_add(seconds.saturating_mul(1_000_000_000));
    while seconds == 0 || clock::now_ns() < end {
        sdk::report_load_milli(load);
        clock::sleep_ms(500);
    }
    println!("gauge: done");
    0
}

sdk::entry!(main);
