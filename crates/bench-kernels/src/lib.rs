//! Microbenchmark kernels that run unchanged natively (in the `xcloud` process) and inside an
//! xcloud guest (the `micro` workload), in the spirit of lmbench's table of basic operations.
//!
//! Both sides time with the TSC and report cycles per operation, so the native/guest ratio does
//! not depend on how either side calibrated its clock. What differs between the sides — the
//! "null call" (a system call natively, a hypercall exit in a guest) and where fresh memory
//! comes from — is supplied by a [`Platform`].
#![no_std]

use core::hint::black_box;

/// What a side provides to the kernels.
pub trait Platform {
    /// The cheapest call into the layer below: `getppid()` natively, a null hypercall in a guest.
    fn null_call(&self);
    /// `bytes` of memory never touched before (page-aligned); null when none is available.
    fn fresh_memory(&self, bytes: usize) -> *mut u8;
}

/// One measurement: TSC cycles per operation.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub name: &'static str,
    pub cycles_per_op: f64,
}

/// The rows, in table order: name and what one operation is.
pub const ROWS: &[(&str, &str)] = &[
    ("double_div", "dependent double-precision division"),
    ("int_mul", "dependent 64-bit multiply, x = x * (x | 1)"),
    ("mem_write", "8-byte store, sequential over 16 MiB"),
    ("mem_chase", "dependent load, random over 16 MiB"),
    ("page_touch", "first write to a fresh 4 KiB page"),
    (
        "null_call",
        "null call (native: getppid syscall; guest: null hypercall)",
    ),
];

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads a counter into registers; it is available at any privilege.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Best (lowest) cycles per op over `reps` runs of `f`, which performs `ops` operations.
fn best_of(reps: u32, ops: u64, mut f: impl FnMut()) -> f64 {
    let mut best = u64::MAX;
    for _ in 0..reps {
        let t0 = rdtsc();
        f();
        best = best.min(rdtsc().wrapping_sub(t0));
    }
    best as f64 / ops as f64
}

const BUF_BYTES: usize = 16 << 20;
const PAGE: usize = 4096;

/// Runs every kernel and hands each row to `report`, in [`ROWS`] order.
pub fn run_all(platform: &impl Platform, scale: u64, mut report: impl FnMut(Row)) {
    let scale = scale.max(1);
    let div_ops = 2_000_000 * scale;
    report(Row {
        name: "double_div",
        cycles_per_op: best_of(5, div_ops, || {
            let mut x = black_box(1.0e300f64);
            let d = black_box(1.000_000_1f64);
            for _ in 0..div_ops {
                x /= d;
            }
            black_box(x);
        }),
    });
    let mul_ops = 5_000_000 * scale;
    report(Row {
        name: "int_mul",
        cycles_per_op: best_of(5, mul_ops, || {
            let mut x = black_box(0x9e37_79b9_7f4a_7c15u64);
            for _ in 0..mul_ops {
                x = x.wrapping_mul(x | 1);
            }
            black_box(x);
        }),
    });

    let buf = platform.fresh_memory(BUF_BYTES + PAGE * 1024);
    if buf.is_null() {
        return;
    }
    // Page touch first, on memory nobody touched yet: 1024 pages past the working buffer.
    let fresh = buf.wrapping_add(BUF_BYTES);
    let t0 = rdtsc();
    for page in 0..1024 {
        // SAFETY: `fresh` has 1024 pages from `fresh_memory`; each write stays inside one.
        unsafe { core::ptr::write_volatile(fresh.add(page * PAGE), 1u8) };
    }
    let touch = rdtsc().wrapping_sub(t0) as f64 / 1024.0;

    let words = BUF_BYTES / 8;
    let words_ptr = buf as *mut u64;
    report(Row {
        name: "mem_write",
        cycles_per_op: best_of(5, words as u64, || {
            for i in 0..words {
                // SAFETY: i < words, so the store stays inside the BUF_BYTES buffer.
                unsafe { core::ptr::write_volatile(words_ptr.add(i), i as u64) };
            }
        }),
    });

    // A random single-cycle permutation (Sattolo) so each load depends on the previous one.
    let slots = BUF_BYTES / 64;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..slots {
        // SAFETY: slot i's first word lies inside the buffer (i < slots).
        unsafe { *words_ptr.add(i * 8) = i as u64 };
    }
    for i in (1..slots).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let j = (seed % i as u64) as usize;
        // SAFETY: i and j are both below `slots`.
        unsafe { core::ptr::swap(words_ptr.add(i * 8), words_ptr.add(j * 8)) };
    }
    let chase_ops = 2_000_000 * scale;
    report(Row {
        name: "mem_chase",
        cycles_per_op: best_of(3, chase_ops, || {
            let mut at = 0usize;
            for _ in 0..chase_ops {
                // SAFETY: every stored value is a slot index below `slots`.
                at = unsafe { core::ptr::read_volatile(words_ptr.add(at * 8)) } as usize;
            }
            black_box(at);
        }),
    });
    report(Row {
        name: "page_touch",
        cycles_per_op: touch,
    });

    let calls = 2_000 * scale;
    report(Row {
        name: "null_call",
        cycles_per_op: best_of(3, calls, || {
            for _ in 0..calls {
                platform.null_call();
            }
        }),
    });
}
