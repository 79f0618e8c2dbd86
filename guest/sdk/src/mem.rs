//! Memory: the C memory primitives the compiler calls, and the heap over the RAM that the PVH
//! memory map reports above the image.

use core::arch::asm;
use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __image_end: u8;
}

/// Gives the allocator every byte of RAM from the end of the image to the end of the RAM region
/// that holds the image. Returns the heap size.
pub(crate) fn init_heap(ram: &[(u64, u64)]) -> usize {
    // Only the address of the linker-defined symbol is taken, never its value.
    let start = core::ptr::addr_of!(__image_end) as u64;
    let Some(&(base, size)) = ram.iter().find(|&&(b, s)| b <= start && start < b + s) else {
        return 0;
    };
    // The identity map covers the first 4 GiB only.
    let end = (base + size).min(4 << 30);
    let len = (end - start) as usize;
    // SAFETY: [start, end) is RAM per the memory map, lies above everything the image uses, is
    // mapped by the boot page tables, and is handed to the allocator exactly once, at boot.
    unsafe { HEAP.lock().init(start as *mut u8, len) };
    len
}

/// Bytes of heap still free.
pub fn heap_free() -> usize {
    HEAP.lock().free()
}

// The primitives are written with string instructions (not loops, which the compiler could turn
// back into calls to themselves).

/// # Safety
/// `dest` and `src` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint; DF is clear (SysV ABI).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _, options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// `dest` and `src` are valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // Copying forward is safe: dest is below src or past the end of src.
        // SAFETY: as for memcpy; a forward copy never reads a byte it already overwrote here.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _, options(nostack, preserves_flags))
        };
    } else {
        // SAFETY: copies backwards from the last byte (DF set for the copy and cleared after),
        // so overlapping bytes are read before they are written.
        unsafe {
            asm!("std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                options(nostack))
        };
    }
    dest
}

/// # Safety
/// `dest` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dest` is valid for `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8, options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n and the caller guarantees both ranges are valid; volatile reads keep the
        // loop from being recognised as a call to memcmp itself.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
