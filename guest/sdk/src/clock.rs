//! Time: the TSC, calibrated once at boot (by hypercall under xcloud, against the PIT elsewhere).

use crate::hypercall::{self, inb, outb};
use core::sync::atomic::{AtomicU64, Ordering};
use xcloud_abi::Op;

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc reads a counter into edx:eax and has no other effect; it runs natively at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub(crate) fn init() {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
    let khz = if hypercall::xcloud_present() {
        hypercall::call(Op::TscKhz, [0; 6]).max(0) as u64
    } else {
        calibrate_with_pit()
    };
    // A broken answer must not turn every later division into a division by zero.
    TSC_KHZ.store(if khz == 0 { 1_000_000 } else { khz }, Ordering::Relaxed);
}

/// Measures the TSC against about 10 ms of PIT channel 0, read back by latch commands (needs
/// no speaker gate port, which small machine models such as QEMU's microvm lack). Returns 0
/// when no PIT answers.
fn calibrate_with_pit() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const WINDOW_TICKS: u64 = PIT_HZ / 100;
    fn read_counter() -> u16 {
        outb(0x43, 0x00); // latch channel 0
        let lo = inb(0x40);
        let hi = inb(0x40);
        u16::from_le_bytes([lo, hi])
    }
    // Channel 0, lobyte/hibyte, mode 2 (rate generator), reload 65536 (~55 ms per wrap).
    outb(0x43, 0x34);
    outb(0x40, 0);
    outb(0x40, 0);
    let mut previous = read_counter();
    let start = rdtsc();
    let mut elapsed = 0u64;
    let mut reads = 0u32;
    while elapsed < WINDOW_TICKS {
        let now = read_counter();
        elapsed += previous.wrapping_sub(now) as u64;
        previous = now;
        reads += 1;
        if reads > 100_000 {
            return 0;
        }
    }
    (rdtsc() - start) * PIT_HZ / elapsed / 1000
}

/// The TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Converts a TSC delta to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000 / tsc_khz() as u128) as u64
}

/// Converts nanoseconds to a TSC delta.
pub fn ns_to_ticks(ns: u64) -> u64 {
    (ns as u128 * tsc_khz() as u128 / 1_000_000) as u64
}

/// Nanoseconds since the guest booted.
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed)))
}

/// Sleeps for `ns` nanoseconds: the vCPU yields its host thread under xcloud, spins elsewhere.
pub fn sleep_ns(ns: u64) {
    if hypercall::xcloud_present() {
        hypercall::call(Op::Sleep, [ns, 0, 0, 0, 0, 0]);
    } else {
        let end = rdtsc() + ns_to_ticks(ns);
        while rdtsc() < end {
            core::hint::spin_loop();
        }
    }
}

/// Sleeps for `ms` milliseconds.
pub fn sleep_ms(ms: u64) {
    sleep_ns(ms.saturating_mul(1_000_000));
}
