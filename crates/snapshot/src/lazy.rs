//! Lazy restore: the guest runs before its memory is read. Guest RAM is registered with
//! userfaultfd (missing-page mode); a handler thread serves each first touch from the snapshot's
//! `memory.pages` (or with a zero page), and a prefetch thread streams every saved page in the
//! background, checking the file's checksum on the way.
//!
//! What is checked before the guest runs: the header, the index (page numbers in range and in
//! order) and the file's exact size. The checksum over the pages can only be checked once they
//! have all been read: if it fails, the VM is stopped with an error (the guest may have run on
//! corrupted memory until then — use an eager restore when that matters).

use crate::error::SnapshotError;
use crate::memory_file::read_memory_index;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use xcloud_state::FormatError;
use xcloud_vm_core::memory::uffd::Uffd;
use xcloud_vm_core::memory::PAGE_BYTES as PAGE;

/// Where a saved page's data is in the memory file.
struct Index {
    pfns: Vec<u64>,
    data_start: u64,
}

impl Index {
    fn offset(&self, pfn: u64) -> Option<u64> {
        self.pfns
            .binary_search(&pfn)
            .ok()
            .map(|i| self.data_start + i as u64 * PAGE)
    }
}

fn read_index(file: &mut File, size: u64) -> Result<(Index, u32), SnapshotError> {
    let io = |source| {
        SnapshotError::Format(FormatError::Io {
            what: "memory.pages",
            source,
        })
    };
    let file_len = file.metadata().map_err(io)?.len();
    let index = read_memory_index(file, file_len, size)?;
    let mut crc = [0u8; 4];
    file.read_exact_at(&mut crc, file_len - 4).map_err(io)?;
    Ok((
        Index {
            pfns: index.pfns,
            data_start: index.data_start,
        },
        u32::from_le_bytes(crc),
    ))
}

/// Serves guest RAM from a snapshot on demand; stops its threads when dropped.
pub struct LazyMemory {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    loaded: Arc<AtomicBool>,
}

impl LazyMemory {
    /// Turns true once every saved page is in guest RAM and the checksum matched. Until then
    /// guest RAM is incomplete: what reads it all (a snapshot, a migration) must wait.
    pub fn loaded_flag(&self) -> Arc<AtomicBool> {
        self.loaded.clone()
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Registers the guest RAM at `base` (`size` bytes, not yet touched) for lazy loading from
/// `path`, and starts the threads. `on_corrupt` is called if the checksum fails at the end.
///
/// # Safety
///
/// [base, base + size) must be guest RAM that no guest has run on yet and that stays mapped
/// until the returned `LazyMemory` is dropped (see [`Uffd::register`]).
pub unsafe fn start(
    path: &Path,
    base: u64,
    size: u64,
    on_corrupt: Box<dyn FnOnce(String) + Send>,
) -> Result<LazyMemory, SnapshotError> {
    let what = "memory.pages";
    let io = |source| SnapshotError::Format(FormatError::Io { what, source });
    let mut file = xcloud_state::format::open_regular(path, what)?;
    let (index, expected_crc) = read_index(&mut file, size)?;
    // SAFETY: this function's own contract is Uffd::register's.
    let uffd = Arc::new(unsafe { Uffd::register(base, size) }.map_err(io)?);
    let index = Arc::new(index);
    let file = Arc::new(file);
    let stop = Arc::new(AtomicBool::new(false));
    let prefetch_done = Arc::new(AtomicBool::new(false));

    let handler = {
        let (uffd, index, file, stop, done) = (
            uffd.clone(),
            index.clone(),
            file.clone(),
            stop.clone(),
            prefetch_done.clone(),
        );
        std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || serve_faults(&uffd, &index, &file, &stop, &done))
            .map_err(io)?
    };
    let loaded = Arc::new(AtomicBool::new(false));
    let prefetcher = {
        let (uffd, stop, done, loaded) = (uffd.clone(), stop.clone(), prefetch_done, loaded.clone());
        std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                match prefetch(&uffd, &index, &file, &stop, expected_crc) {
                    Ok(true) if !stop.load(Ordering::SeqCst) => loaded.store(true, Ordering::SeqCst),
                    Ok(true) => {}
                    Ok(false) => {
                        on_corrupt("memory.pages is corrupted: the checksum of the pages does not match".into())
                    }
                    // Pages that cannot be read would be zero pages to the guest: stop it.
                    Err(e) => on_corrupt(format!("memory.pages could not be read to the end: {e}")),
                }
                done.store(true, Ordering::SeqCst);
            })
            .map_err(io)?
    };
    Ok(LazyMemory {
        stop,
        threads: vec![handler, prefetcher],
        loaded,
    })
}

fn serve_faults(uffd: &Uffd, index: &Index, file: &File, stop: &AtomicBool, prefetch_done: &AtomicBool) {
    let mut page = vec![0u8; PAGE as usize];
    while !stop.load(Ordering::SeqCst) {
        let Some(pfn) = uffd.next_fault(50) else {
            if prefetch_done.load(Ordering::SeqCst) {
                // Every saved page is in place; the rest are zero: hand faults back to the kernel.
                uffd.unregister();
                return;
            }
            continue;
        };
        let served = match index.offset(pfn) {
            Some(offset) => file
                .read_exact_at(&mut page, offset)
                .and_then(|_| uffd.copy(pfn, &page)),
            None => uffd.zero(pfn),
        };
        if let Err(e) = served {
            tracing::warn!("lazy restore: cannot serve guest page {pfn}: {e}");
        }
    }
}

/// Streams every saved page into guest RAM and returns whether the checksum matched.
fn prefetch(uffd: &Uffd, index: &Index, file: &File, stop: &AtomicBool, expected_crc: u32) -> std::io::Result<bool> {
    let mut crc = crc32fast::Hasher::new();
    for pfn in &index.pfns {
        crc.update(&pfn.to_le_bytes());
    }
    const CHUNK: usize = 256;
    let mut buf = vec![0u8; CHUNK * PAGE as usize];
    for (chunk_no, chunk) in index.pfns.chunks(CHUNK).enumerate() {
        if stop.load(Ordering::SeqCst) {
            return Ok(true);
        }
        let bytes = &mut buf[..chunk.len() * PAGE as usize];
        file.read_exact_at(bytes, index.data_start + (chunk_no * CHUNK) as u64 * PAGE)?;
        crc.update(bytes);
        for (i, &pfn) in chunk.iter().enumerate() {
            uffd.copy(pfn, &bytes[i * PAGE as usize..(i + 1) * PAGE as usize])?;
        }
    }
    Ok(crc.finalize() == expected_crc)
}
