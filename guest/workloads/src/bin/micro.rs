#![no_std]
#![no_main]
use xcloud_guest_sdk::{self as sdk, println};
fn main() -> i32 {
    println!("todo");
    0
}
sdk::entry!(main);
