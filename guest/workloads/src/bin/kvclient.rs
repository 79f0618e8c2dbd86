//! `kvclient [N [ROUNDS]]`: waits for the `kv` extension module (extensions/kv.wat) in the
//! extension window, stores N values (default 100) in it and reads each back, ROUNDS times
//! (default 1), prints the time per port access (each a VM exit served by the module), then
//! waits until the module is removed and ends. It stands for a guest that uses a device a
//! tenant added to its own VMM while the VM ran.
#![no_std]
#![no_main]

use xcloud_guest_sdk::{self as sdk, clock, ext::KvStore, println};

fn main() -> i32 {
    let mut args = sdk::args();
    let count: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100).min(4096);
    let rounds: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1).max(1);
    println!("kvclient: waiting for the kv module");
    let kv = loop {
        if let Some(kv) = KvStore::find(None) {
            break kv;
        }
        clock::sleep_ms(100);
    };
    let value = |key: u32, round: u32| key.wrapping_mul(7).wrapping_add(1).wrapping_add(round);
    let start = clock::now_ns();
    for round in 0..rounds {
        for key in 0..count {
            kv.put(key, value(key, round));
        }
        for key in 0..count {
            let got = kv.get(key);
            if got != value(key, round) {
                println!("kvclient: key {key} read {got:#x}, not {:#x}", value(key, round));
                return 1;
            }
        }
    }
    // A put is two port writes, a get a write and a read.
    let accesses = u64::from(count) * u64::from(rounds) * 4;
    let ns = (clock::now_ns() - start) / accesses.max(1);
    println!(
        "kvclient: {count} stored, {count} read back, the module counts {}, {ns} ns per port access",
        kv.stores()
    );
    while kv.present() {
        clock::sleep_ms(100);
    }
    println!("kvclient: the module is gone");
    0
}

sdk::entry!(main);
