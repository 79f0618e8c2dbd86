//! The provider's page scan: a built-in extension (docs/extensions.md) that walks guest RAM a
//! few pages per tick and finds how much of it memory sharing could reclaim — pages that are
//! all zeros, and pages with the same contents as another page of the VM — the first step of
//! sharing memory between VMs. It reads only pages the guest has in host memory (so it never
//! makes a VM bigger or pulls a lazily restored page in), through the same read-only,
//! bounded [`GuestView`] a tenant's tick gets, and exports what its last whole pass found.
//! Pages are compared by a 64-bit hash of their contents: the figures are an estimate, and
//! sharing itself must compare the bytes before it merges two pages.

use crate::extension::{Extension, GuestView, HookError};
use std::sync::Mutex;

/// The module's name in every VM.
pub const NAME: &str = "pagescan";

/// Pages read per tick: at the default tick of 100 ms, 2.5 MiB/s, a few hundred microseconds
/// of one core per second.
pub const PAGES_PER_TICK: usize = 64;

/// Pages whose residency one tick looks up at most (one mincore call).
const WINDOW: usize = 4096;

const PAGE: usize = 4096;

/// What one whole pass over guest RAM found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassFigures {
    /// Pages the guest had in host memory.
    pub resident: u64,
    /// Of them, pages of zeros.
    pub zero: u64,
    /// Of the others, pages with the same contents as another page scanned before them.
    pub duplicate: u64,
}

impl PassFigures {
    /// Bytes sharing could give back: zero pages and duplicates.
    pub fn shareable_bytes(&self) -> u64 {
        (self.zero + self.duplicate) * PAGE as u64
    }
}

#[derive(Default)]
struct Scan {
    /// The next page to look at.
    next_pfn: u64,
    /// Hashes of this pass's non-zero pages.
    hashes: Vec<u64>,
    /// This pass so far.
    current: PassFigures,
    /// The last whole pass.
    last: Option<PassFigures>,
    passes: u64,
}

/// The scan of one VM's RAM.
pub struct PageScan {
    scan: Mutex<Scan>,
    pages_per_tick: usize,
}

impl Default for PageScan {
    fn default() -> Self {
        Self::new(PAGES_PER_TICK)
    }
}

/// A fast 64-bit hash of a page, word by word (multiply and rotate, as FxHash does).
fn page_hash(page: &[u8]) -> u64 {
    page.chunks_exact(8).fold(0u64, |h, word| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        (h.rotate_left(5) ^ u64::from_le_bytes(bytes)).wrapping_mul(0x517c_c1b7_2722_0a95)
    })
}

impl PageScan {
    /// A scan that reads at most `pages_per_tick` pages each tick.
    pub fn new(pages_per_tick: usize) -> Self {
        Self {
            scan: Mutex::new(Scan::default()),
            pages_per_tick: pages_per_tick.max(1),
        }
    }

    /// What the last whole pass found (None before one ends).
    pub fn last_pass(&self) -> Option<PassFigures> {
        self.scan.lock().unwrap_or_else(|p| p.into_inner()).last
    }

    /// Scans on from where the last tick stopped.
    fn step(&self, guest: &mut GuestView) {
        let mut scan = self.scan.lock().unwrap_or_else(|p| p.into_inner());
        let total = guest.ram_bytes() / PAGE as u64;
        let mut read = 0;
        let mut page = vec![0u8; PAGE];
        while read < self.pages_per_tick {
            if scan.next_pfn >= total {
                finish_pass(&mut scan);
                break;
            }
            let window = (total - scan.next_pfn).min(WINDOW as u64) as usize;
            let first = scan.next_pfn;
            // A window that is not one run of RAM (a hole below 4 GiB) is passed over.
            let resident = guest.resident(first * PAGE as u64, window).unwrap_or_default();
            let mut advanced = window as u64;
            for (i, _) in resident.iter().enumerate().filter(|(_, r)| **r) {
                if read == self.pages_per_tick {
                    advanced = i as u64;
                    break;
                }
                if guest.read((first + i as u64) * PAGE as u64, &mut page).is_err() {
                    continue;
                }
                read += 1;
                scan.current.resident += 1;
                if xcloud_vm_core::memory::is_zero(&page) {
                    scan.current.zero += 1;
                } else {
                    scan.hashes.push(page_hash(&page));
                }
            }
            scan.next_pfn = first + advanced;
        }
    }
}

/// Ends a pass: counts the duplicates among its hashes and starts the next one.
fn finish_pass(scan: &mut Scan) {
    let mut hashes = std::mem::take(&mut scan.hashes);
    hashes.sort_unstable();
    let distinct = {
        let mut h = hashes.clone();
        h.dedup();
        h.len() as u64
    };
    scan.current.duplicate = hashes.len() as u64 - distinct;
    scan.last = Some(scan.current);
    scan.current = PassFigures::default();
    scan.next_pfn = 0;
    scan.passes += 1;
    // Keep the allocation for the next pass.
    hashes.clear();
    scan.hashes = hashes;
}

impl Extension for PageScan {
    fn takes_ticks(&self) -> bool {
        true
    }

    fn tick(&self, guest: &mut GuestView) -> Result<(), HookError> {
        self.step(guest);
        Ok(())
    }

    fn metrics(&self) -> Vec<(String, f64)> {
        let scan = self.scan.lock().unwrap_or_else(|p| p.into_inner());
        let last = scan.last.unwrap_or_default();
        vec![
            ("passes".into(), scan.passes as f64),
            ("resident_pages".into(), last.resident as f64),
            ("zero_pages".into(), last.zero as f64),
            ("duplicate_pages".into(), last.duplicate as f64),
            ("shareable_bytes".into(), last.shareable_bytes() as f64),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn a_pass_counts_zero_and_duplicate_pages_among_the_resident_ones() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("guest RAM");
        // Pages 0-9 hold one pattern (9 duplicates), 10-14 distinct ones, 20-22 are written
        // with zeros (resident, zero); the other 2,026 pages were never touched.
        for pfn in 0..10u64 {
            memory
                .write_slice(&[0xab; PAGE], GuestAddress(pfn * PAGE as u64))
                .expect("write");
        }
        for pfn in 10..15u64 {
            memory
                .write_slice(&[pfn as u8; PAGE], GuestAddress(pfn * PAGE as u64))
                .expect("write");
        }
        for pfn in 20..23u64 {
            memory
                .write_slice(&[0; PAGE], GuestAddress(pfn * PAGE as u64))
                .expect("write");
        }
        let scan = PageScan::new(4);
        let mut ticks = 0;
        while scan.last_pass().is_none() {
            let mut view = GuestView::new(memory.clone(), 1 << 20);
            scan.tick(&mut view).expect("tick");
            assert!(view.left() >= (1 << 20) - 4 * PAGE as u64, "at most 4 pages a tick");
            ticks += 1;
            assert!(ticks < 100, "the pass never ended");
        }
        let pass = scan.last_pass().expect("a pass");
        assert_eq!(
            pass,
            PassFigures {
                resident: 18,
                zero: 3,
                duplicate: 9
            }
        );
        assert_eq!(pass.shareable_bytes(), 12 * PAGE as u64);
        let figures = scan.metrics();
        assert!(figures.contains(&("duplicate_pages".into(), 9.0)), "{figures:?}");
    }
}
