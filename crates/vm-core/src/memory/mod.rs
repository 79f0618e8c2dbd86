//! Guest memory: one memfd mapped shared into the VMM and registered with KVM as slot 0.
//!
//! A memfd (rather than anonymous memory) lets later engines share the guest's pages with
//! another process, snapshot them and send them without copying through the VMM.

pub mod persist;
pub mod uffd;

use std::fs::File;
use std::os::fd::FromRawFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest pages are 4 KiB: page numbers (pfns) count in these.
pub const PAGE_BYTES: u64 = 4096;
/// Smallest guest the VMM accepts: the boot area and 1 MiB above high memory.
pub const MIN_GUEST_BYTES: u64 = 2 << 20;
/// Largest guest in this version: RAM is one region below the 32-bit device hole at 3 GiB.
pub const MAX_GUEST_BYTES: u64 = 3 << 30;

/// Guest memory failures.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {size} bytes is too small: at least {MIN_GUEST_BYTES} bytes (2 MiB) are needed")]
    /// Below the smallest guest.
    TooSmall {
        /// The size asked for.
        size: u64,
    },
    #[error(
        "guest memory of {size} bytes is too large: this version supports at most {MAX_GUEST_BYTES} bytes (3 GiB)"
    )]
    /// Above the largest guest.
    TooLarge {
        /// The size asked for.
        size: u64,
    },
    #[error("guest memory of {size} bytes exceeds this host's {host} bytes of RAM")]
    /// More than this host has.
    ExceedsHost {
        /// The size asked for.
        size: u64,
        /// The host's RAM.
        host: u64,
    },
    #[error("guest memory size {size:#x} is not a multiple of 4 KiB")]
    /// Not a whole number of pages.
    Unaligned {
        /// The size asked for.
        size: u64,
    },
    #[error("cannot create the memfd for guest memory")]
    /// The memfd cannot be made.
    Memfd(#[source] std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes")]
    /// The memfd cannot be sized.
    Resize {
        /// The size asked for.
        size: u64,
        #[source]
        /// The system's answer.
        source: std::io::Error,
    },
    #[error("cannot map guest memory")]
    /// The memfd cannot be mapped.
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// The guest's RAM and the memfd behind it.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    /// The memfd behind the mapping (a second descriptor of it).
    file: File,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM at guest-physical 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        validate_size(size, host_ram_bytes())?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"xcloud-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        let own = file.try_clone().map_err(MemoryError::Memfd)?;
        let mem =
            GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size as usize, Some(FileOffset::new(file, 0)))])
                .map_err(MemoryError::Map)?;
        Ok(Self { mem, size, file: own })
    }

    /// The vm-memory view of the RAM.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd that backs guest RAM (offset = guest-physical address). Writing pages through
    /// it fills them without a page fault per page.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest-physical 0 (the whole RAM is one contiguous mapping).
    pub fn host_base(&self) -> u64 {
        self.mem.iter().next().map(|r| r.as_ptr() as u64).unwrap_or_default()
    }

    /// Bytes of this RAM that are resident in the host (pages the guest or the loader touched).
    pub fn resident_bytes(&self) -> u64 {
        self.resident_pages().len() as u64 * 4096
    }

    /// Numbers of the 4 KiB pages that are resident in the host (every page if the kernel
    /// cannot tell).
    pub fn resident_pages(&self) -> Vec<u64> {
        let pages = self.size.div_ceil(4096);
        let mut vec = vec![0u8; pages as usize];
        // SAFETY: mincore reads the residency of [base, base+size), which is our own mapping,
        // and writes one byte per page into `vec`, which has exactly that many bytes.
        let rc = unsafe {
            libc::mincore(
                self.host_base() as *mut libc::c_void,
                self.size as usize,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return (0..pages).collect();
        }
        (0..pages).filter(|&p| vec[p as usize] & 1 != 0).collect()
    }
}

/// Runs of consecutive pages in `pfns` (increasing): (first page, count), each run at most
/// u32::MAX pages (the migration stream's run counts are u32).
pub fn page_runs(pfns: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &pfn in pfns {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == pfn && *count < u32::MAX as u64 => *count += 1,
            _ => runs.push((pfn, 1)),
        }
    }
    runs
}

/// Whether `bytes` are all zero, 16 at a time (a byte loop that stops at the first non-zero
/// byte does not vectorize, and zero pages are read to the end).
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(16);
    let wide = chunks.by_ref().fold(0u128, |acc, c| {
        acc | u128::from_ne_bytes(c.try_into().unwrap_or([0xff; 16]))
    });
    wide == 0 && chunks.remainder().iter().all(|&b| b == 0)
}

/// Checks a requested guest size against the VMM's and the host's limits.
pub fn validate_size(size: u64, host_bytes: u64) -> Result<(), MemoryError> {
    if size < MIN_GUEST_BYTES {
        return Err(MemoryError::TooSmall { size });
    }
    if size > MAX_GUEST_BYTES {
        return Err(MemoryError::TooLarge { size });
    }
    if size % 4096 != 0 {
        return Err(MemoryError::Unaligned { size });
    }
    if host_bytes != 0 && size > host_bytes {
        return Err(MemoryError::ExceedsHost { size, host: host_bytes });
    }
    Ok(())
}

/// Total RAM of this host in bytes (0 if unknown).
pub fn host_ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_told_from_others_at_every_byte() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for at in [0, 15, 16, 4000, 4095] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(is_zero(&page[..7]) && !is_zero(&[0, 0, 3]));
    }

    #[test]
    fn sizes_are_checked_against_limits() {
        assert!(matches!(validate_size(1 << 20, 0), Err(MemoryError::TooSmall { .. })));
        assert!(matches!(validate_size(4 << 30, 0), Err(MemoryError::TooLarge { .. })));
        assert!(matches!(
            validate_size((64 << 20) + 1, 0),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            validate_size(1 << 30, 512 << 20),
            Err(MemoryError::ExceedsHost { .. })
        ));
        assert!(validate_size(64 << 20, 0).is_ok());
    }

    #[test]
    fn ram_is_zeroed_and_only_touched_pages_are_resident() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20).expect("memfd-backed RAM");
        assert_eq!(ram.mem().read_obj::<u64>(GuestAddress(0x1000)).expect("read"), 0);
        ram.mem().write_obj(7u64, GuestAddress(0x10_0000)).expect("write");
        assert!(ram.resident_bytes() <= 2 * 4096, "{}", ram.resident_bytes());
    }
}
