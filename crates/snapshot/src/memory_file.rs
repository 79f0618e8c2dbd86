//! `memory.pages` (docs/snapshot-format.md): the guest pages that were ever touched and are
//! not all zero, with an index, checksummed. Written from guest RAM by [`write_memory`], read
//! back eagerly by [`read_memory`] (one thread reads and checksums, another writes runs of
//! pages into the memfd) or on demand by the lazy restore.

use crate::error::SnapshotError;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};
use xcloud_state::{Fields, FormatError, Persist};
use xcloud_vm_core::memory::{self, GuestRam, PAGE_BYTES as PAGE};

/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.pages";
/// Format version of the memory file.
pub const VERSION: u32 = 1;
const MEMORY_MAGIC: &[u8; 8] = b"XCLDMEM\0";

/// What `vm.state` records of the `memory.pages` it was written with (section kind
/// `memory-file`, owned by the snapshot engine): a restore refuses a memory file that is not
/// that one, before reading it. Layout version 1: bytes u64, pages u64, checksum u32 (the
/// file's trailer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFileRecord {
    /// The file's size.
    pub bytes: u64,
    /// Pages in it.
    pub pages: u64,
    /// Its CRC-32 over index and data (its last four bytes).
    pub crc: u32,
}

impl Persist for MemoryFileRecord {
    const KIND: &'static str = "memory-file";
    const VERSION: u32 = 1;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        out.extend_from_slice(&self.bytes.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
        out
    }

    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError> {
        if version != 1 {
            return Err(xcloud_state::persist::unknown_version::<Self>(version));
        }
        let mut f = Fields::new(body, "memory-file");
        let record = Self {
            bytes: f.u64()?,
            pages: f.u64()?,
            crc: f.u32()?,
        };
        f.finish()?;
        Ok(record)
    }
}

impl MemoryFileRecord {
    /// Checks that the memory file at `path` is the one recorded: its size and its trailer.
    pub fn check(&self, path: &Path) -> Result<(), SnapshotError> {
        use std::os::unix::fs::FileExt;
        let what = "memory.pages";
        let io = |source| SnapshotError::Format(FormatError::Io { what, source });
        let file = xcloud_state::format::open_regular(path, what)?;
        let len = file.metadata().map_err(io)?.len();
        let mut trailer = [0u8; 4];
        if len >= 4 {
            file.read_exact_at(&mut trailer, len - 4).map_err(io)?;
        }
        if len < self.bytes {
            return Err(FormatError::Truncated {
                what,
                detail: format!(
                    "{len} bytes where vm.state recorded {} (cut short, or the memory.pages of another snapshot)",
                    self.bytes
                ),
            }
            .into());
        }
        if len != self.bytes || u32::from_le_bytes(trailer) != self.crc {
            return Err(SnapshotError::Mismatch {
                detail: format!(
                    "vm.state was written with a memory.pages of {} bytes (checksum {:08x}); this one has {len} bytes (checksum {:08x})",
                    self.bytes,
                    self.crc,
                    u32::from_le_bytes(trailer)
                ),
            });
        }
        Ok(())
    }
}

/// Writes the non-zero resident pages of `ram` to `path` and syncs it to disk; returns what
/// `vm.state` records of it.
pub fn write_memory(path: &Path, ram: &GuestRam) -> Result<MemoryFileRecord, SnapshotError> {
    let what = "memory.pages";
    let io = |source| SnapshotError::Format(FormatError::Io { what, source });
    let mem = ram.mem();
    let size = ram.size();
    let mut page = vec![0u8; PAGE as usize];
    let mut index = Vec::new();
    for pfn in ram.resident_pages() {
        mem.read_slice(&mut page, GuestAddress(pfn * PAGE))
            .map_err(|_| SnapshotError::Busy("guest memory unreadable"))?;
        if !memory::is_zero(&page) {
            index.push(pfn);
        }
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut crc = crc32fast::Hasher::new();
    out.write_all(MEMORY_MAGIC).map_err(io)?;
    out.write_all(&VERSION.to_le_bytes()).map_err(io)?;
    out.write_all(&(PAGE as u32).to_le_bytes()).map_err(io)?;
    out.write_all(&size.to_le_bytes()).map_err(io)?;
    out.write_all(&(index.len() as u64).to_le_bytes()).map_err(io)?;
    for pfn in &index {
        let b = pfn.to_le_bytes();
        crc.update(&b);
        out.write_all(&b).map_err(io)?;
    }
    for pfn in &index {
        mem.read_slice(&mut page, GuestAddress(pfn * PAGE))
            .map_err(|_| SnapshotError::Busy("guest memory unreadable"))?;
        crc.update(&page);
        out.write_all(&page).map_err(io)?;
    }
    let crc = crc.finalize();
    out.write_all(&crc.to_le_bytes()).map_err(io)?;
    out.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    Ok(MemoryFileRecord {
        bytes: 32 + index.len() as u64 * (8 + PAGE) + 4,
        pages: index.len() as u64,
        crc,
    })
}

/// The checked header and index of a `memory.pages` file: the page numbers (in range, strictly
/// increasing) and the file's exact size matched against them.
pub struct MemoryIndex {
    /// The saved pages' numbers.
    pub pfns: Vec<u64>,
    /// Where the first page's data starts in the file.
    pub data_start: u64,
}

/// Reads and checks the header and index of the memory file `input` (of `file_len` bytes) for
/// a guest of `size` bytes, leaving `input` at the first page's data.
pub fn read_memory_index(input: &mut impl Read, file_len: u64, size: u64) -> Result<MemoryIndex, SnapshotError> {
    let what = "memory.pages";
    let io = |source| SnapshotError::Format(FormatError::Io { what, source });
    let truncated = |detail: String| SnapshotError::Format(FormatError::Truncated { what, detail });
    let malformed = |detail: String| SnapshotError::Format(FormatError::Malformed { what, detail });
    let mut header = [0u8; 32];
    input
        .read_exact(&mut header)
        .map_err(|_| truncated("the header is cut short".into()))?;
    if &header[..8] != MEMORY_MAGIC {
        return Err(FormatError::Magic {
            what,
            found: header[..8].to_vec(),
        }
        .into());
    }
    let mut f = Fields::new(&header[8..], what);
    let version = f.u32()?;
    if version != VERSION {
        return Err(FormatError::Version {
            what,
            found: version,
            supported: VERSION,
        }
        .into());
    }
    let (page_size, mem_bytes, count) = (f.u32()? as u64, f.u64()?, f.u64()?);
    if page_size != PAGE || mem_bytes != size {
        return Err(malformed(format!(
            "pages of {page_size} bytes for {mem_bytes} bytes of RAM; the VM has {size} bytes"
        )));
    }
    if count > size / PAGE {
        return Err(malformed(format!("{count} pages for a {size}-byte guest")));
    }
    let expected = 32 + count * (8 + PAGE) + 4;
    if file_len != expected {
        return Err(truncated(format!(
            "{file_len} bytes where {count} pages need {expected}"
        )));
    }
    let mut raw = vec![0u8; count as usize * 8];
    input.read_exact(&mut raw).map_err(io)?;
    let mut pfns = Vec::with_capacity(count as usize);
    for chunk in raw.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let pfn = u64::from_le_bytes(b);
        if pfn >= size / PAGE || pfns.last().is_some_and(|&last| pfn <= last) {
            return Err(malformed(format!("page number {pfn} is out of range or out of order")));
        }
        pfns.push(pfn);
    }
    Ok(MemoryIndex {
        pfns,
        data_start: 32 + count * 8,
    })
}

/// Reads `path` into `ram` (a fresh, zeroed guest), checking everything; on error the caller
/// discards the guest.
pub fn read_memory(path: &Path, ram: &GuestRam) -> Result<u64, SnapshotError> {
    let size = ram.size();
    let what = "memory.pages";
    let io = |source| SnapshotError::Format(FormatError::Io { what, source });
    let malformed = |detail: String| SnapshotError::Format(FormatError::Malformed { what, detail });
    let file = xcloud_state::format::open_regular(path, what)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut input = BufReader::with_capacity(1 << 20, file);
    let index = read_memory_index(&mut input, file_len, size)?.pfns;
    let count = index.len() as u64;
    let mut crc = crc32fast::Hasher::new();
    for pfn in &index {
        crc.update(&pfn.to_le_bytes());
    }
    // Two stages that overlap: this thread reads chunks of pages and checksums them, a writer
    // puts each run of consecutive pages into the memfd with one pwritev (the kernel fills them
    // without a page fault per page). Buffers go back and forth, so none is allocated twice.
    const CHUNK: usize = 1024;
    let memfd = ram.file();
    let (to_writer, chunks) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(2);
    let (recycle, spare) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| -> Result<(), SnapshotError> {
        let index = &index;
        let writer = scope.spawn(move || -> Result<(), SnapshotError> {
            for (first, chunk) in chunks {
                let pfns = &index[first..first + chunk.len() / PAGE as usize];
                write_runs(memfd, pfns, &chunk)
                    .map_err(|e| malformed(format!("cannot put pages from {} into guest RAM: {e}", pfns[0])))?;
                let _ = recycle.send(chunk);
            }
            Ok(())
        });
        let read = (|| -> Result<(), SnapshotError> {
            for first in (0..index.len()).step_by(CHUNK) {
                let pages = CHUNK.min(index.len() - first);
                let mut chunk = spare.try_recv().unwrap_or_default();
                chunk.resize(pages * PAGE as usize, 0);
                input.read_exact(&mut chunk).map_err(io)?;
                crc.update(&chunk);
                if to_writer.send((first, chunk)).is_err() {
                    break; // the writer failed: its error is the one to report
                }
            }
            Ok(())
        })();
        drop(to_writer);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(malformed("the page writer panicked".into())));
        read.and(written)
    })?;
    let mut trailer = [0u8; 4];
    input.read_exact(&mut trailer).map_err(io)?;
    if u32::from_le_bytes(trailer) != crc.finalize() {
        return Err(FormatError::Checksum {
            what,
            detail: "the pages".into(),
        }
        .into());
    }
    Ok(count)
}

/// Writes `data` (the pages `pfns`, increasing, in order) into guest RAM through its memfd, one
/// write per run of consecutive pages.
fn write_runs(memfd: &std::fs::File, pfns: &[u64], data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut at = 0;
    for (first, count) in memory::page_runs(pfns) {
        let bytes = count as usize * PAGE as usize;
        memfd.write_all_at(&data[at..at + bytes], first * PAGE)?;
        at += bytes;
    }
    Ok(())
}
