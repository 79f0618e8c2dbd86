//! `kvclient [N]`: waits for the `kv` extension module (extensions/kv.wat) in the extension
//! window, stores N values (default 100) in it, reads each back, then waits until the module
//! is removed and ends. It stands for a guest that uses a device a tenant added to its own
//! VMM while the VM ran.
#![no_std]
#![no_main]

use xcloud_guest_sdk::{self as sdk, clock, ext::KvStore, println};

fn main() -> i32 {
    let count: u32 = sdk::args().next().and_then(|a| a.parse().ok()).unwrap_or(100).min(4096);
    println!("kvclient: waiting for the kv module");
    let kv = loop {
        if let Some(kv) = KvStore::find(None) {
            break kv;
        }
        clock::sleep_ms(100);
    };
    let value = |key: u32| key.wrapping_mul(7).wrapping_add(1);
    for key in 0..count {
        kv.put(key, value(key));
    }
    for key in 0..count {
        let got = kv.get(key);
        if got != value(key) {
            println!("kvclient: key {key} read {got:#x}, not {:#x}", value(key));
            return 1;
        }
    }
    println!(
        "kvclient: {count} stored, {count} read back, the module counts {}",
        kv.stores()
    );
    while kv.present() {
        clock::sleep_ms(100);
    }
    println!("kvclient: the module is gone");
    0
}

sdk::entry!(main);
