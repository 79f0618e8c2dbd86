//! The byte level of saved state (docs/snapshot-format.md): a magic, a version, then sections
//! of `tag u32 | length u32 | payload | crc32(tag, length, payload) u32`, ending with an `END`
//! section. All integers are little-endian. The reader checks every length against the data actually there
//! and every checksum before it hands a payload on, so a truncated, corrupted or foreign file
//! is refused with an error that names what is wrong.

use std::io::{self, Read, Write};

/// The largest section a reader accepts (a vCPU with its XSAVE area is about 8 KiB).
pub const MAX_SECTION: u32 = 16 << 20;

/// Snapshot format failures.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The data does not start with the expected magic.
    #[error("not an xcloud {what} file (its magic is {found:02x?})")]
    Magic {
        /// What was being read.
        what: &'static str,
        /// The bytes found instead.
        found: Vec<u8>,
    },
    /// A version this reader does not know.
    #[error("{what} format version {found} is not supported (this xcloud reads version {supported})")]
    Version {
        /// What was being read.
        what: &'static str,
        /// The version found.
        found: u32,
        /// The newest version this reader knows.
        supported: u32,
    },
    /// The data ends early.
    #[error("{what} is truncated: {detail}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where.
        detail: String,
    },
    /// A checksum does not match.
    #[error("{what} is corrupted: checksum of {detail} does not match")]
    Checksum {
        /// What was being read.
        what: &'static str,
        /// Of what.
        detail: String,
    },
    /// A field is out of range or inconsistent.
    #[error("{what} is malformed: {detail}")]
    Malformed {
        /// What was being read.
        what: &'static str,
        /// Which field, and why.
        detail: String,
    },
    /// Reading or writing failed.
    #[error("cannot read or write {what}")]
    Io {
        /// What was being read or written.
        what: &'static str,
        /// The system's answer.
        #[source]
        source: io::Error,
    },
}

/// The checksum of a section covers its header too, so a changed tag or length is caught.
fn section_crc(tag: u32, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&tag.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Writes sections with their checksums.
pub struct SectionWriter<W: Write> {
    out: W,
    what: &'static str,
}

impl<W: Write> SectionWriter<W> {
    /// Starts a file: magic and version.
    pub fn new(mut out: W, what: &'static str, magic: &[u8; 8], version: u32) -> Result<Self, FormatError> {
        let io = |source| FormatError::Io { what, source };
        out.write_all(magic).map_err(io)?;
        out.write_all(&version.to_le_bytes()).map_err(io)?;
        Ok(Self { out, what })
    }

    /// Appends one section.
    pub fn section(&mut self, tag: u32, payload: &[u8]) -> Result<(), FormatError> {
        let what = self.what;
        let io = |source| FormatError::Io { what, source };
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_SECTION)
            .ok_or_else(|| FormatError::Malformed {
                what,
                detail: format!("section {tag} of {} bytes is too large", payload.len()),
            })?;
        self.out.write_all(&tag.to_le_bytes()).map_err(io)?;
        self.out.write_all(&len.to_le_bytes()).map_err(io)?;
        self.out.write_all(payload).map_err(io)?;
        self.out
            .write_all(&section_crc(tag, len, payload).to_le_bytes())
            .map_err(io)
    }

    /// Finishes the file with the END section and returns the writer.
    pub fn finish(mut self, end_tag: u32) -> Result<W, FormatError> {
        self.section(end_tag, &[])?;
        self.out.flush().map_err(|source| FormatError::Io {
            what: self.what,
            source,
        })?;
        Ok(self.out)
    }
}

/// Reads the sections of a file held in memory.
pub struct SectionReader<'a> {
    data: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> SectionReader<'a> {
    /// Checks magic and version and positions at the first section.
    pub fn new(data: &'a [u8], what: &'static str, magic: &[u8; 8], version: u32) -> Result<Self, FormatError> {
        if data.len() < 12 || &data[..8] != magic {
            return Err(FormatError::Magic {
                what,
                found: data[..data.len().min(8)].to_vec(),
            });
        }
        let found = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        if found != version {
            return Err(FormatError::Version {
                what,
                found,
                supported: version,
            });
        }
        Ok(Self { data, at: 12, what })
    }

    /// The next section's tag and checked payload; `None` at the end of the data.
    pub fn next_section(&mut self) -> Result<Option<(u32, &'a [u8])>, FormatError> {
        let what = self.what;
        if self.at == self.data.len() {
            return Ok(None);
        }
        let rest = &self.data[self.at..];
        if rest.len() < 8 {
            return Err(FormatError::Truncated {
                what,
                detail: format!("a section header at byte {} is cut short", self.at),
            });
        }
        let tag = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_SECTION {
            return Err(FormatError::Malformed {
                what,
                detail: format!("section {tag} claims {len} bytes (at most {MAX_SECTION})"),
            });
        }
        let len = len as usize;
        if rest.len() < 8 + len + 4 {
            return Err(FormatError::Truncated {
                what,
                detail: format!(
                    "section {tag} at byte {} needs {} bytes, {} remain",
                    self.at,
                    len + 12,
                    rest.len()
                ),
            });
        }
        let payload = &rest[8..8 + len];
        let crc = u32::from_le_bytes([rest[8 + len], rest[9 + len], rest[10 + len], rest[11 + len]]);
        if crc != section_crc(tag, len as u32, payload) {
            return Err(FormatError::Checksum {
                what,
                detail: format!("section {tag} at byte {}", self.at),
            });
        }
        self.at += 12 + len;
        Ok(Some((tag, payload)))
    }
}

/// Opens `path` for reading if it is a regular file (following symbolic links). Anything else
/// is refused before a byte is read: a FIFO or a device would be read without end (or block
/// the open itself), a directory cannot be read. The open does not block on a FIFO.
pub fn open_regular(path: &std::path::Path, what: &'static str) -> Result<std::fs::File, FormatError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        // Opening a FIFO for reading then returns at once instead of waiting for a writer (for
        // regular files it changes nothing).
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| FormatError::Io { what, source })?;
    let kind = file
        .metadata()
        .map_err(|source| FormatError::Io { what, source })?
        .file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let found = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a device"
    };
    Err(FormatError::Malformed {
        what,
        detail: format!("{} is {found}, not a regular file", path.display()),
    })
}

/// Reads a whole file into memory, refusing files larger than `limit` bytes.
pub fn read_file(path: &std::path::Path, what: &'static str, limit: u64) -> Result<Vec<u8>, FormatError> {
    let file = open_regular(path, what)?;
    let len = file
        .metadata()
        .map_err(|source| FormatError::Io { what, source })?
        .len();
    if len > limit {
        return Err(FormatError::Malformed {
            what,
            detail: format!("{len} bytes is more than the {limit} bytes it may have"),
        });
    }
    let mut data = Vec::with_capacity(len as usize);
    file.take(limit)
        .read_to_end(&mut data)
        .map_err(|source| FormatError::Io { what, source })?;
    Ok(data)
}

/// A cursor over a section payload that fails cleanly when data runs out.
pub struct Fields<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    /// A cursor at the start of `data`; errors name `what`.
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        Self { data, what }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.data.len() < n {
            return Err(FormatError::Malformed {
                what: self.what,
                detail: format!("a field of {n} bytes where only {} remain", self.data.len()),
            });
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    /// The next byte.
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.bytes(1)?[0])
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(a))
    }

    /// A length-prefixed (u32) byte string of at most `max` bytes.
    pub fn blob(&mut self, max: usize) -> Result<&'a [u8], FormatError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(FormatError::Malformed {
                what: self.what,
                detail: format!("a field of {n} bytes (at most {max})"),
            });
        }
        self.bytes(n)
    }

    /// A KVM structure stored as its kernel ABI bytes, length-prefixed.
    pub fn kvm<T: zerocopy::FromBytes>(&mut self) -> Result<T, FormatError> {
        let size = std::mem::size_of::<T>();
        let b = self.blob(size)?;
        T::read_from_bytes(b).map_err(|_| FormatError::Malformed {
            what: self.what,
            detail: format!("a KVM structure of {} bytes, expected {size}", b.len()),
        })
    }

    /// The bytes not read yet (the cursor is then at the end).
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Succeeds if every byte has been read: trailing bytes mean a layout this reader does not
    /// know.
    pub fn finish(&self) -> Result<(), FormatError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Malformed {
                what: self.what,
                detail: format!("{} bytes after the last field", self.data.len()),
            })
        }
    }
}

/// A whole body that is one KVM structure's kernel ABI bytes, nothing more or less.
pub fn kernel_abi<T: zerocopy::FromBytes>(what: &'static str, body: &[u8]) -> Result<T, FormatError> {
    T::read_from_bytes(body).map_err(|_| FormatError::Malformed {
        what,
        detail: format!(
            "{} bytes where the structure has {}",
            body.len(),
            std::mem::size_of::<T>()
        ),
    })
}

/// Appends a length-prefixed (u32) byte string.
pub fn put_blob(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"XCTEST\0\0";

    fn sample() -> Vec<u8> {
        let mut w = SectionWriter::new(Vec::new(), "test", MAGIC, 3).expect("writer");
        w.section(1, b"hello").expect("section");
        w.section(2, &[]).expect("section");
        w.finish(0xffff).expect("finish")
    }

    #[test]
    fn sections_round_trip() {
        let data = sample();
        let mut r = SectionReader::new(&data, "test", MAGIC, 3).expect("reader");
        assert_eq!(r.next_section().expect("ok"), Some((1, &b"hello"[..])));
        assert_eq!(r.next_section().expect("ok"), Some((2, &b""[..])));
        assert_eq!(r.next_section().expect("ok"), Some((0xffff, &b""[..])));
        assert_eq!(r.next_section().expect("ok"), None);
    }

    #[test]
    fn every_truncation_and_every_flipped_bit_is_refused() {
        let data = sample();
        for cut in 0..data.len() {
            let r = SectionReader::new(&data[..cut], "test", MAGIC, 3);
            let all = r.and_then(|mut r| {
                let mut tags = Vec::new();
                while let Some((t, _)) = r.next_section()? {
                    tags.push(t);
                }
                Ok(tags)
            });
            assert!(
                all.map_or(true, |tags| !tags.contains(&0xffff)),
                "cut at {cut} must lose the END section or fail"
            );
        }
        for byte in 12..data.len() {
            let mut bad = data.clone();
            bad[byte] ^= 0x10;
            let mut r = SectionReader::new(&bad, "test", MAGIC, 3).expect("header intact");
            let mut failed = false;
            for _ in 0..4 {
                match r.next_section() {
                    Err(_) => {
                        failed = true;
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(_)) => {}
                }
            }
            assert!(failed, "flipping byte {byte} went unnoticed");
        }
    }

    #[test]
    fn foreign_and_future_files_are_refused() {
        assert!(matches!(
            SectionReader::new(b"\x7fELF\x02\x01\x01\0\0\0\0\0", "test", MAGIC, 3),
            Err(FormatError::Magic { .. })
        ));
        let mut data = sample();
        data[8] = 9;
        assert!(matches!(
            SectionReader::new(&data, "test", MAGIC, 3),
            Err(FormatError::Version { found: 9, .. })
        ));
    }

    #[test]
    fn fields_fail_cleanly_when_data_runs_out() {
        let mut f = Fields::new(&[1, 0, 0], "test");
        assert!(f.u32().is_err());
        let mut f = Fields::new(&[0xff, 0xff, 0xff, 0x7f, 1], "test");
        assert!(f.blob(100).is_err());
    }
}
