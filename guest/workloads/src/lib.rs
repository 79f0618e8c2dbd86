//! Pieces the built-in workloads share.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]

use xcloud_guest_sdk::{self as sdk, clock};

const PAGE: usize = 4096;
/// How often a dirtier wakes up to write the pages that are due.
const STEP_NS: u64 = 1_000_000;

/// A working set whose pages are written round and round at a steady rate.
pub struct WorkingSet {
    base: *mut u8,
    pages: usize,
    next: usize,
    /// Pages written so far.
    pub written: u64,
}

// SAFETY: the working set owns its block exclusively; moving it to another vCPU moves that
// ownership with it.
unsafe impl Send for WorkingSet {}

impl WorkingSet {
    /// Allocates `mib` MiB and writes every page once. None if the heap is too small.
    pub fn new(mib: u64) -> Option<Self> {
        let bytes = ((mib as usize) << 20).max(PAGE);
        let layout = core::alloc::Layout::from_size_align(bytes, PAGE).ok()?;
        // SAFETY: non-zero size; the block lives as long as the working set and is never freed
        // (workloads run until the VM ends).
        let base = unsafe { sdk::heap::alloc::alloc(layout) };
        if base.is_null() {
            return None;
        }
        let mut set = Self {
            base,
            pages: bytes / PAGE,
            next: 0,
            written: 0,
        };
        for _ in 0..set.pages {
            set.write_next();
        }
        Some(set)
    }

    /// Pages in the set.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Writes the next page's first word with the count of pages written so far. From the
    /// second lap on, it first checks that the page still holds what it got one lap ago: a
    /// page lost or left stale by a snapshot restore or a migration stops the guest with a
    /// panic (exit status 101) instead of going unnoticed.
    fn write_next(&mut self) {
        // SAFETY: next < pages, so the word is inside the allocated block.
        let slot = unsafe { self.base.add(self.next * PAGE) } as *mut u64;
        let lap = self.pages as u64;
        if self.written >= lap {
            let expected = self.written - lap;
            // SAFETY: `slot` is inside the block (above) and aligned (the block is page-aligned).
            let found = unsafe { core::ptr::read_volatile(slot) };
            if found != expected {
                panic!(
                    "guest memory corrupted: working-set page {} holds {found}, expected {expected}",
                    self.next
                );
            }
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(slot, self.written) };
        self.next = (self.next + 1) % self.pages;
        self.written += 1;
    }

    /// Writes pages at `rate_mib` MiB/s until `end_ns` (guest time), calling `tick(self,
    /// pages written since start, elapsed ns)` after each step.
    pub fn dirty(&mut self, rate_mib: u64, end_ns: u64, mut tick: impl FnMut(&Self, u64, u64)) {
        let start = clock::now_ns();
        let pages_per_s = rate_mib * (1 << 20) / PAGE as u64;
        let mut done = 0u64;
        loop {
            let now = clock::now_ns();
            if now >= end_ns {
                return;
            }
            let due = ((now - start) as u128 * pages_per_s as u128 / 1_000_000_000) as u64;
            while done < due {
                self.write_next();
                done += 1;
            }
            tick(self, done, now - start);
            clock::sleep_ns(STEP_NS);
        }
    }
}

/// Writes a working set at a steady rate from inside another loop: each call writes the pages
/// that are due by now, without sleeping (the caller keeps its own pace).
pub struct Pacer {
    set: WorkingSet,
    start_ns: u64,
    pages_per_s: u64,
    done: u64,
}

impl Pacer {
    /// Paces writes to `set` at `rate_mib` MiB/s, counted from now.
    pub fn new(set: WorkingSet, rate_mib: u64) -> Self {
        Self {
            set,
            start_ns: clock::now_ns(),
            pages_per_s: rate_mib * (1 << 20) / PAGE as u64,
            done: 0,
        }
    }

    /// Writes the pages due at guest time `now_ns`.
    #[inline]
    pub fn catch_up(&mut self, now_ns: u64) {
        let due = (now_ns.saturating_sub(self.start_ns) as u128 * self.pages_per_s as u128 / 1_000_000_000) as u64;
        while self.done < due {
            self.set.write_next();
            self.done += 1;
        }
    }
}

/// The paced working set that arguments `at` and `at + 1` ask for (`W R`: W MiB written at
/// R MiB/s), said on the console; `Ok(None)` if they are not given, `Err(W)` (said too) if the
/// set cannot be allocated.
pub fn paced_set_from_args(workload: &str, at: usize) -> Result<Option<Pacer>, u64> {
    let (Some(mib), Some(rate)) = (arg(at), arg(at + 1)) else {
        return Ok(None);
    };
    let Some(set) = WorkingSet::new(mib) else {
        sdk::println!("{workload}: cannot allocate {mib} MiB");
        return Err(mib);
    };
    sdk::println!("{workload}: dirtying {mib} MiB at {rate} MiB/s");
    Ok(Some(Pacer::new(set, rate)))
}

/// The `n`th command-line argument as a number.
pub fn arg(n: usize) -> Option<u64> {
    sdk::args().nth(n).and_then(|a| a.parse().ok())
}

/// The word a disk test writes at byte `offset` (a multiple of 8) for `seed`: a different
/// value at every offset, so a block written to the wrong place, lost or doubled shows.
#[inline]
pub fn disk_word(seed: u64, offset: u64) -> u64 {
    let mut z = (seed ^ offset).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf`, which goes to byte `offset` of the disk, with the pattern of `seed`.
pub fn fill_disk_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&disk_word(seed, offset + 8 * i as u64).to_le_bytes());
    }
}

/// The first byte offset in `buf` (read from byte `offset` of the disk) that does not hold
/// the pattern of `seed`.
pub fn check_disk_pattern(seed: u64, offset: u64, buf: &[u8]) -> Option<u64> {
    buf.chunks_exact(8).enumerate().find_map(|(i, word)| {
        let at = offset + 8 * i as u64;
        (word != disk_word(seed, at).to_le_bytes()).then_some(at)
    })
}

/// Virtio disk 0, or None after printing why `workload` cannot use it.
pub fn open_disk(workload: &str) -> Option<sdk::virtio_blk::Disk> {
    match sdk::virtio_blk::Disk::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            sdk::println!("{workload}: no usable virtio disk: {e:?}");
            None
        }
    }
}
