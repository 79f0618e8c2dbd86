//! Disk images: raw files on the host, opened once, locked against a second VMM, read and
//! written at offsets straight from and into guest memory.
//!
//! A raw file maps sector n to byte n * 512, so a sparse file stays sparse until the guest
//! writes, and discard punches the holes back. Flush is `fdatasync`: when the guest's flush
//! completes, its writes are on stable storage.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Bytes in a virtio-blk sector.
pub const SECTOR_BYTES: u64 = 512;

/// A disk as the command line names it: `PATH[,ro]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    /// The guest may read it but not write it (the file is opened read-only, with a shared lock).
    pub read_only: bool,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("a disk needs a path: PATH[,ro]")?;
        let mut read_only = false;
        for option in parts {
            match option {
                "ro" => read_only = true,
                "rw" => read_only = false,
                other => return Err(format!("unknown disk option {other:?} (PATH[,ro])")),
            }
        }
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// Why a disk cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// No file at the path.
    #[error("disk image {path} does not exist")]
    Missing {
        /// The path given.
        path: PathBuf,
    },
    /// Not a regular file.
    #[error("disk image {path} is not a regular file")]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// Another process (another VMM) holds the image.
    #[error("disk image {path} is in use: another process holds a lock on it (another VMM running this disk?)")]
    Locked {
        /// The path given.
        path: PathBuf,
    },
    /// Smaller than one sector.
    #[error("disk image {path} is {size} bytes: a disk needs at least one 512-byte sector")]
    TooSmall {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file cannot be opened for what was asked.
    #[error("cannot open disk image {path}{}", if *read_only { " for reading" } else { " for reading and writing (add ,ro for a read-only disk)" })]
    Open {
        /// The path given.
        path: PathBuf,
        /// Whether read-only access was asked.
        read_only: bool,
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
    /// Any other system failure.
    #[error("cannot {action} disk image {path}")]
    Io {
        /// What failed.
        action: &'static str,
        /// The path given.
        path: PathBuf,
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
}

/// An open, locked disk image.
pub struct DiskFile {
    file: File,
    spec: DiskSpec,
    /// Bytes the guest sees: the file's size rounded down to whole sectors.
    size: u64,
}

impl DiskFile {
    /// Opens and locks the image `spec` names: exclusive for a writable disk, shared for a
    /// read-only one, so that two VMMs never write one image and nobody writes a disk a VMM
    /// reads.
    pub fn open(spec: &DiskSpec) -> Result<Self, DiskError> {
        let path = spec.path.clone();
        let meta = std::fs::metadata(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => DiskError::Missing { path: path.clone() },
            _ => DiskError::Io {
                action: "inspect",
                path: path.clone(),
                source,
            },
        })?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile { path });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!spec.read_only)
            .open(&path)
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                read_only: spec.read_only,
                source,
            })?;
        let how = if spec.read_only { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor this function owns; it changes no memory.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DiskError::Locked { path }
            } else {
                DiskError::Io {
                    action: "lock",
                    path,
                    source,
                }
            });
        }
        let size = meta.len() / SECTOR_BYTES * SECTOR_BYTES;
        if size == 0 {
            return Err(DiskError::TooSmall { path, size: meta.len() });
        }
        Ok(Self {
            file,
            spec: spec.clone(),
            size,
        })
    }

    /// What was opened.
    pub fn spec(&self) -> &DiskSpec {
        &self.spec
    }

    /// Bytes the guest sees.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the guest may write.
    pub fn read_only(&self) -> bool {
        self.spec.read_only
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.spec.path
    }

    /// Moves all of `iov` at byte `offset` with `op` (preadv or pwritev), resuming after
    /// partial transfers and signals; `at_end` says what a transfer of 0 bytes means.
    ///
    /// # Safety
    /// Every iovec must name memory valid for what `op` does with it for its whole length.
    unsafe fn vectored_at(
        &self,
        iov: &mut [libc::iovec],
        offset: u64,
        op: unsafe extern "C" fn(libc::c_int, *const libc::iovec, libc::c_int, libc::off_t) -> libc::ssize_t,
        at_end: impl Fn(&[libc::iovec]) -> std::io::Result<u64>,
    ) -> std::io::Result<u64> {
        let mut done = 0u64;
        let mut first = 0;
        while first < iov.len() {
            // SAFETY: the caller vouches for the buffers; the slice of iovecs is live.
            let n = unsafe {
                op(
                    self.file.as_raw_fd(),
                    iov[first..].as_ptr(),
                    (iov.len() - first).min(libc::UIO_MAXIOV as usize) as i32,
                    (offset + done) as i64,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return at_end(&iov[first..]).map(|rest| done + rest);
            }
            done += n as u64;
            first = advance(iov, first, n as usize);
        }
        Ok(done)
    }

    /// Reads into `iov` from byte `offset`, all of it; past the end of the file (which another
    /// process shrank) reads zeroes.
    ///
    /// # Safety
    /// Every iovec must name memory valid for writes for its whole length, which nothing else
    /// reads or frees during the call.
    pub unsafe fn read_vectored_at(&self, iov: &mut [libc::iovec], offset: u64) -> std::io::Result<u64> {
        // End of file: the rest reads as zeroes, as a sparse tail does.
        let zero_rest = |rest: &[libc::iovec]| {
            let mut n = 0;
            for v in rest {
                // SAFETY: the caller vouches that the buffer is valid for writes.
                unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
                n += v.iov_len as u64;
            }
            Ok(n)
        };
        // SAFETY: the caller's promise is preadv's requirement.
        unsafe { self.vectored_at(iov, offset, libc::preadv, zero_rest) }
    }

    /// Writes all of `iov` at byte `offset`.
    ///
    /// # Safety
    /// Every iovec must name memory valid for reads for its whole length during the call.
    pub unsafe fn write_vectored_at(&self, iov: &mut [libc::iovec], offset: u64) -> std::io::Result<u64> {
        let took_nothing = |_: &[libc::iovec]| {
            Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "the disk took no bytes",
            ))
        };
        // SAFETY: the caller's promise is pwritev's requirement.
        unsafe { self.vectored_at(iov, offset, libc::pwritev, took_nothing) }
    }

    /// A second descriptor of the image, for reading it beside the device (a migration's copy).
    pub fn reader(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Frees the blocks behind `len` bytes at `offset` (they read back as zeroes).
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on a descriptor this struct owns; it changes no memory of ours.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// The byte ranges of `file` (of `size` bytes) that hold data, by SEEK_DATA/SEEK_HOLE: a
/// sparse image's holes need not be read or sent. A filesystem without them reports all data.
pub fn data_extents(file: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek on a descriptor the caller owns; it only moves that file's offset.
        let data = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                // No SEEK_DATA here: everything is data.
                extents.push((at, size));
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { (hole as u64).min(size) };
        if end > data as u64 {
            extents.push((data as u64, end));
        }
        at = end.max(data as u64 + 1);
    }
    extents
}

/// Drops `n` transferred bytes from the front of `iov[first..]`; returns the new first iovec.
fn advance(iov: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while n > 0 && first < iov.len() {
        let v = &mut iov[first];
        if n >= v.iov_len {
            n -= v.iov_len;
            first += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
            v.iov_len -= n;
            n = 0;
        }
    }
    while first < iov.len() && iov[first].iov_len == 0 {
        first += 1;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, len: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("xcloud-disk-{}-{name}", std::process::id()));
        let f = File::create(&path).expect("create");
        f.set_len(len).expect("size");
        path
    }

    #[test]
    fn specs_parse_and_bad_options_are_refused() {
        assert_eq!(
            "a.img,ro".parse::<DiskSpec>(),
            Ok(DiskSpec {
                path: "a.img".into(),
                read_only: true
            })
        );
        assert!(!"b.img".parse::<DiskSpec>().expect("plain").read_only);
        assert!("b.img,cache=none".parse::<DiskSpec>().is_err());
        assert!(",ro".parse::<DiskSpec>().is_err());
    }

    #[test]
    fn open_refuses_missing_small_locked_and_non_files() {
        let missing = DiskSpec {
            path: "/nonexistent/x.img".into(),
            read_only: false,
        };
        assert!(matches!(DiskFile::open(&missing), Err(DiskError::Missing { .. })));
        let dir = DiskSpec {
            path: std::env::temp_dir(),
            read_only: true,
        };
        assert!(matches!(DiskFile::open(&dir), Err(DiskError::NotAFile { .. })));
        let small = temp("small", 100);
        let spec = DiskSpec {
            path: small.clone(),
            read_only: false,
        };
        assert!(matches!(
            DiskFile::open(&spec),
            Err(DiskError::TooSmall { size: 100, .. })
        ));
        let ok = temp("locked", 4096);
        let spec = DiskSpec {
            path: ok.clone(),
            read_only: false,
        };
        let first = DiskFile::open(&spec).expect("first opener");
        assert_eq!(first.size(), 4096);
        let err = DiskFile::open(&spec).err().expect("second writer");
        assert!(matches!(err, DiskError::Locked { .. }), "{err}");
        let reader = DiskSpec {
            path: ok.clone(),
            read_only: true,
        };
        assert!(matches!(DiskFile::open(&reader), Err(DiskError::Locked { .. })));
        drop(first);
        let r1 = DiskFile::open(&reader).expect("readers share");
        let _r2 = DiskFile::open(&reader).expect("readers share");
        assert!(r1.read_only());
        for p in [small, ok] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn extents_skip_the_holes_of_a_sparse_image() {
        use std::io::{Seek, SeekFrom, Write};
        let path = temp("sparse", 16 << 20);
        let mut f = OpenOptions::new().write(true).open(&path).expect("open");
        f.seek(SeekFrom::Start(8 << 20)).expect("seek");
        f.write_all(&[7u8; 4096]).expect("write");
        f.sync_all().expect("sync");
        let f = File::open(&path).expect("open");
        let extents = data_extents(&f, 16 << 20);
        let covered: u64 = extents.iter().map(|(a, b)| b - a).sum();
        assert!(
            extents.iter().any(|&(a, b)| a <= 8 << 20 && b >= (8 << 20) + 4096),
            "{extents:?}"
        );
        assert!(covered < 4 << 20, "the holes are skipped: {extents:?}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn vectored_io_round_trips_and_discard_zeroes() {
        let path = temp("io", 64 * 1024);
        let disk = DiskFile::open(&DiskSpec {
            path: path.clone(),
            read_only: false,
        })
        .expect("open");
        let mut a = vec![1u8; 3000];
        let mut b = vec![2u8; 5192];
        let mut iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: both buffers are live locals for the call.
        assert_eq!(unsafe { disk.write_vectored_at(&mut iov, 4096) }.expect("write"), 8192);
        disk.flush().expect("flush");
        let mut back = vec![0u8; 8192];
        let mut iov = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: back.len(),
        }];
        // SAFETY: as above.
        unsafe { disk.read_vectored_at(&mut iov, 4096) }.expect("read");
        assert!(back[..3000].iter().all(|&x| x == 1) && back[3000..].iter().all(|&x| x == 2));
        disk.discard(4096, 4096).expect("punch a hole");
        let mut iov = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: back.len(),
        }];
        // SAFETY: as above.
        unsafe { disk.read_vectored_at(&mut iov, 4096) }.expect("read");
        assert!(back[..4096].iter().all(|&x| x == 0) && back[4096..].iter().all(|&x| x == 2));
        // Past the end of the file reads zeroes.
        let mut iov = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: back.len(),
        }];
        // SAFETY: as above.
        unsafe { disk.read_vectored_at(&mut iov, 60 * 1024) }.expect("read at the end");
        assert!(back[4096..].iter().all(|&x| x == 0));
        let _ = std::fs::remove_file(path);
    }
}
