//! userfaultfd over guest RAM (missing-page mode): guest memory that fills in while the guest
//! runs. A vCPU touching a page that is not there yet waits until the VMM places it
//! ([`Uffd::copy`], [`Uffd::zero`]); lazy restore and post-copy migration are built on it.

use super::PAGE_BYTES as PAGE;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

/// A private anonymous mapping, unmapped when dropped: memory to try userfaultfd on.
pub struct ScratchMapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl ScratchMapping {
    /// `len` bytes of fresh private anonymous memory.
    pub fn new(len: usize) -> std::io::Result<Self> {
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

    /// Its address.
    pub fn base(&self) -> u64 {
        self.addr as u64
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes (never: mmap refuses an empty mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
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
    // SAFETY: the scratch mapping is ours, page-aligned, outlives the registration (which
    // ends in this statement) and is referred to by nothing else.
    unsafe { Uffd::register(scratch.base(), scratch.len() as u64) }.map(|uffd| uffd.unregister())
}

/// A userfaultfd registration (missing-page mode) over guest RAM.
pub struct Uffd {
    fd: OwnedFd,
    base: u64,
    size: u64,
}

impl Uffd {
    /// Registers guest RAM [base, base + size), which must not have been touched yet.
    ///
    /// # Safety
    ///
    /// [base, base + size) must be a page-aligned mapping of the caller's that stays mapped as
    /// long as this registration lives, and that no Rust reference expects to stay unchanged:
    /// [`Uffd::copy`] and [`Uffd::zero`] fill its missing pages behind the compiler's back
    /// (guest RAM, a [`ScratchMapping`]).
    pub unsafe fn register(base: u64, size: u64) -> std::io::Result<Self> {
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
        // SAFETY: registers [base, base+size), which the caller vouches for (see the contract
        // above); the struct lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd, base, size })
    }

    /// The page number of the next missing-page fault, waiting up to `timeout_ms`.
    pub fn next_fault(&self, timeout_ms: i32) -> Option<u64> {
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
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Hands the range back to the kernel: pending and later faults are resolved normally.
    pub fn unregister(&self) {
        let range = UffdioRange {
            start: self.base,
            len: self.size,
        };
        // SAFETY: unregisters the range registered in `register`; the struct lives across the call.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &range) };
    }

    /// Places `data` (one page) at page `pfn` of the registered range and wakes whoever waits
    /// for it; a page already there is left alone.
    pub fn copy(&self, pfn: u64, data: &[u8]) -> std::io::Result<()> {
        self.check(pfn)?;
        if data.len() != PAGE as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a page of {} bytes", data.len()),
            ));
        }
        let mut c = UffdioCopy {
            dst: self.base + pfn * PAGE,
            src: data.as_ptr() as u64,
            len: PAGE,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads PAGE bytes at `src` (`data`, checked to be that long, alive
        // across the call) and fills the page-aligned destination inside the registered range
        // (pfn checked), which `register`'s contract lets it write; `c` outlives the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
        self.result(rc)
    }

    /// Maps a zero page at page `pfn` of the registered range (unless one is there already).
    pub fn zero(&self, pfn: u64) -> std::io::Result<()> {
        self.check(pfn)?;
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: self.base + pfn * PAGE,
                len: PAGE,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: maps a zero page at a page-aligned address inside the registered range (pfn
        // checked), which `register`'s contract lets it write; `z` outlives the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
        self.result(rc)
    }

    fn check(&self, pfn: u64) -> std::io::Result<()> {
        if pfn < self.size / PAGE {
            Ok(())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("page {pfn} is outside the registered range"),
            ))
        }
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
