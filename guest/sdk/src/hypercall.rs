//! Hypercalls to the xcloud VMM over port I/O (see docs/hypercall-abi.md), and raw port access.

use core::sync::atomic::{AtomicU8, Ordering};
use xcloud_abi::{HypercallBlock, Op, ABI_VERSION, HYPERCALL_PORT, PROBE_MAGIC};

const UNKNOWN: u8 = 0;
const PRESENT: u8 = 1;
const ABSENT: u8 = 2;
static HOST: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Writes a byte to an I/O port.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: the SDK runs with IOPL=3, so port I/O is allowed at CPL3; `out` touches no memory.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
#[inline]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; `in` only writes the output register.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Writes a 16-bit word to an I/O port.
#[inline]
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe { core::arch::asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes a 32-bit word to an I/O port.
#[inline]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a 16-bit word from an I/O port.
#[inline]
pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as for `inb`.
    unsafe { core::arch::asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads a 32-bit word from an I/O port.
#[inline]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `inb`.
    unsafe { core::arch::asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// True when an xcloud VMM answers hypercalls (probed once, on first use).
pub fn xcloud_present() -> bool {
    match HOST.load(Ordering::Relaxed) {
        PRESENT => true,
        ABSENT => false,
        _ => {
            let answer = inl(HYPERCALL_PORT);
            let present = answer & 0xffff_ff00 == PROBE_MAGIC && answer & 0xff >= ABI_VERSION;
            HOST.store(if present { PRESENT } else { ABSENT }, Ordering::Relaxed);
            present
        }
    }
}

/// Performs one hypercall and returns its result (negative: an `HcError` code).
///
/// Callers must have checked [`xcloud_present`]; on another VMM the write goes nowhere and the
/// result reads back as 0.
pub fn call(op: Op, args: [u64; 6]) -> i64 {
    let mut block = HypercallBlock::new(op, args);
    let addr = &mut block as *mut HypercallBlock as u64;
    // All guest memory is identity-mapped and below 4 GiB, so the virtual address of the block
    // is its guest-physical address and fits the 32-bit port write.
    // SAFETY: `block` lives on this stack frame for the whole call and the VMM writes only its
    // `result` field; the asm has no `nomem` option, so the compiler keeps the block's stores
    // before the `out` and re-reads `result` after it.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") HYPERCALL_PORT, in("eax") addr as u32, options(nostack, preserves_flags));
    }
    // SAFETY: reads a field of a live local through a volatile read because the VMM wrote it
    // behind the compiler's back.
    unsafe { core::ptr::read_volatile(&block.result) }
}
