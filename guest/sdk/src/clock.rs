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

/// Measures the TSC against 10 ms of PIT channel 2 (the classic method; each port access is an
/// exit, which only adds a little to the 10 ms).
fn calibrate_with_pit() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 10;
    let latch = (PIT_HZ * MS / 1000) as u16;
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, latch as u8);
    outb(0x42, (latch >> 8) as u8);
    let start = rdtsc();
    let mut polls = 0u32;
    while inb(0x61) & 0x20 == 0 {
        polls += 1;
        if polls > 1_000_000 {
            return 0;
        }
    }
    (rdtsc() - start) / MS
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
