//! Lazy restore: the guest runs before its memory is read. Guest RAM is registered with
//! userfaultfd (missing-page mode); a handler thread serves each first touch from the snapshot's
//! `memory.pages` (or with a zero page), and a prefetch thread streams every saved page in the
//! background, checking the file's checksum on the way.
//!
//! What is checked before the guest runs: the header, the index (page numbers in range and in
//! order) and the file's exact size. The checksum over the pages can only be checked once they
//! have all been read: if it fails, the VM is stopped with an error (the guest may have run on
//! corrupted memory until then — use an eager restore when that matters).

use super::{SnapshotError, PAGE};
use crate::snapshot::format::FormatError;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

// ioctl numbers of <linux/userfaultfd.h> (checked against the C header).
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

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
    let index = super::read_memory_index(file, file_len, size)?;
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

/// A private anonymous mapping, unmapped when dropped: memory to try userfaultfd on.
pub(crate) struct ScratchMapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl ScratchMapping {
    pub(crate) fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: asks for a fresh private anonymous mapping; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { addr, len })
    }

    pub(crate) fn base(&self) -> u64 {
        self.addr as u64
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for ScratchMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; its owner is gone.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Whether this host lets the VMM register memory with userfaultfd (lazy restore and post-copy
/// need it): registers a small anonymous mapping and lets it go.
pub fn userfaultfd_works() -> Result<(), std::io::Error> {
    let scratch = ScratchMapping::new(2 * PAGE as usize)?;
    Uffd::register(scratch.base(), scratch.len() as u64).map(|uffd| uffd.unregister())
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

/// A userfaultfd registration (missing-page mode) over guest RAM.
pub(crate) struct Uffd {
    fd: OwnedFd,
    base: u64,
    size: u64,
}

impl Uffd {
    /// Registers guest RAM [base, base + size), which must not have been touched yet.
    pub(crate) fn register(base: u64, size: u64) -> std::io::Result<Self> {
        // SAFETY: the userfaultfd syscall takes flags only and returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) } as libc::c_int;
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes the struct we pass, which lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut reg = UffdioRegister {
            range: UffdioRange { start: base, len: size },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: registers our own guest RAM mapping [base, base+size) (page-aligned, alive as
        // long as the VM that owns this registration); the struct lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd, base, size })
    }

    /// The page number of the next missing-page fault, waiting up to `timeout_ms`.
    pub(crate) fn next_fault(&self, timeout_ms: i32) -> Option<u64> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid descriptor with a timeout; `pfd` lives across the call.
        if unsafe { libc::poll(&mut pfd, 1, timeout_ms) } <= 0 {
            return None;
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes into our 32-byte buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr() as *mut libc::c_void, msg.len()) };
        if n != 32 || msg[0] != UFFD_EVENT_PAGEFAULT {
            return None;
        }
        // struct uffd_msg: event u8, 7 reserved bytes, then pagefault { flags u64, address u64 }.
        let address = u64::from_le_bytes([msg[16], msg[17], msg[18], msg[19], msg[20], msg[21], msg[22], msg[23]]);
        let pfn = address.saturating_sub(self.base) / PAGE;
        (pfn < self.size / PAGE).then_some(pfn)
    }

    /// The descriptor to poll for faults.
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Hands the range back to the kernel: pending and later faults are resolved normally.
    pub(crate) fn unregister(&self) {
        let range = UffdioRange {
            start: self.base,
            len: self.size,
        };
        // SAFETY: unregisters the range registered in `register`; the struct lives across the call.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &range) };
    }

    pub(crate) fn copy(&self, pfn: u64, data: &[u8]) -> std::io::Result<()> {
        let mut c = UffdioCopy {
            dst: self.base + pfn * PAGE,
            src: data.as_ptr() as u64,
            len: PAGE,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads PAGE bytes at `src` (our live buffer of PAGE bytes) and
        // fills the registered, page-aligned destination inside guest RAM; `c` outlives the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
        self.result(rc)
    }

    pub(crate) fn zero(&self, pfn: u64) -> std::io::Result<()> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: self.base + pfn * PAGE,
                len: PAGE,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: maps a zero page at a registered, page-aligned address inside guest RAM.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
        self.result(rc)
    }

    /// EEXIST (the other thread filled the page first) is success.
    fn result(&self, rc: libc::c_int) -> std::io::Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            Ok(())
        } else {
            Err(e)
        }
    }
}

/// Registers the guest RAM at `base` (`size` bytes, not yet touched) for lazy loading from
/// `path`, and starts the threads. `on_corrupt` is called if the checksum fails at the end.
pub fn start(
    path: &Path,
    base: u64,
    size: u64,
    on_corrupt: Box<dyn FnOnce(String) + Send>,
) -> Result<LazyMemory, SnapshotError> {
    let what = "memory.pages";
    let io = |source| SnapshotError::Format(FormatError::Io { what, source });
    let mut file = File::open(path).map_err(io)?;
    let (index, expected_crc) = read_index(&mut file, size)?;
    let uffd = Arc::new(Uffd::register(base, size).map_err(io)?);
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
