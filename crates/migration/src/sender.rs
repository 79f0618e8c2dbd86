//! The source's page frames, sent straight from guest memory.

use crate::error::MigrationError;
use crate::wire::{self, Kind, WireError, MAX_PAGES_PER_FRAME, PAGE, ZERO_PAGE};
use std::io::{ErrorKind, IoSlice, Write};
use std::marker::PhantomData;
use xcloud_vm_core::memory::GuestRam;

/// Guest RAM as the source reads it: in place, 4 KiB at a time, while the guest may be writing.
///
/// A page read while the guest writes it can be torn; that is harmless because the write also
/// marks the page dirty, so it goes again in a later round or in stop-and-copy, when the guest
/// is paused (every VMM copies pages this way).
#[derive(Clone, Copy)]
pub(crate) struct GuestPages<'g> {
    base: *const u8,
    pages: u64,
    ram: PhantomData<&'g GuestRam>,
}

impl<'g> GuestPages<'g> {
    pub fn new(ram: &'g GuestRam) -> Self {
        Self {
            base: ram.host_base() as *const u8,
            pages: ram.size() / PAGE as u64,
            ram: PhantomData,
        }
    }

    /// The 4 KiB of guest page `pfn`.
    pub fn page(&self, pfn: u64) -> Result<&'g [u8], OutsideRam> {
        if pfn >= self.pages {
            return Err(OutsideRam(pfn));
        }
        // SAFETY: pfn < pages, so [base + pfn * 4096, +4096) lies inside the guest RAM mapping,
        // which the `&'g GuestRam` this view borrows keeps mapped for 'g. The guest may write
        // these bytes meanwhile (it is another agent, like a process sharing the memfd): the
        // slice only ever goes to code that copies or encrypts it once (the zero check, the
        // TLS record), never to code that relies on it staying the same.
        Ok(unsafe { std::slice::from_raw_parts(self.base.add(pfn as usize * PAGE), PAGE) })
    }
}

/// A page number beyond guest RAM: the source's own page lists are wrong.
#[derive(Debug, thiserror::Error)]
#[error("guest page {0} is outside guest RAM")]
pub(crate) struct OutsideRam(u64);

impl From<OutsideRam> for MigrationError {
    fn from(e: OutsideRam) -> Self {
        MigrationError::Refused(e.to_string())
    }
}

impl From<OutsideRam> for WireError {
    fn from(e: OutsideRam) -> Self {
        WireError::Io(std::io::Error::new(ErrorKind::InvalidInput, e))
    }
}

/// One page of the frame being built: its word on the wire and its bytes (None: a zero page).
type Entry<'g> = ([u8; 8], Option<&'g [u8]>);

/// IoSlices handed to the TLS writer per call: about 128 KiB, a few records' worth (the writer
/// takes what its buffer limit allows and is called again for the rest).
const SLICES_PER_WRITE: usize = 64;

/// Sends pages in PAGES frames, counting what went out. Without compression a frame goes out
/// as one vectored write of its header, page words and the pages themselves, so a page's
/// bytes are copied once, into the TLS record that encrypts them.
pub(crate) struct PageSender<'a, 'g, S: Write> {
    pub out: &'a mut S,
    /// Send frames LZ4-compressed when that makes them smaller.
    compress: bool,
    entries: Vec<Entry<'g>>,
    frame_pages: usize,
    /// The contiguous payload, built only to compress it.
    packed: Vec<u8>,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

impl<'a, 'g, S: Write> PageSender<'a, 'g, S> {
    pub fn new(out: &'a mut S, compress: bool) -> Self {
        Self::with_frame_pages(out, compress, MAX_PAGES_PER_FRAME)
    }

    /// A sender whose frames carry at most `frame_pages` pages (at most MAX_PAGES_PER_FRAME).
    pub fn with_frame_pages(out: &'a mut S, compress: bool, frame_pages: usize) -> Self {
        let frame_pages = frame_pages.clamp(1, MAX_PAGES_PER_FRAME);
        Self {
            out,
            compress,
            entries: Vec::with_capacity(frame_pages),
            frame_pages,
            packed: Vec::new(),
            pages: 0,
            zero_pages: 0,
            bytes: 0,
        }
    }

    /// Adds a page (`data` is read when the frame goes out); returns whether that filled a
    /// frame, which then went out.
    pub fn page(&mut self, pfn: u64, data: &'g [u8]) -> Result<bool, WireError> {
        debug_assert_eq!(data.len(), PAGE);
        if xcloud_vm_core::memory::is_zero(data) {
            self.entries.push(((pfn | ZERO_PAGE).to_le_bytes(), None));
            self.zero_pages += 1;
        } else {
            self.entries.push((pfn.to_le_bytes(), Some(data)));
        }
        self.pages += 1;
        if self.entries.len() == self.frame_pages {
            self.flush()?;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        if !self.entries.is_empty() {
            let count = self.entries.len() as u32;
            let payload_len = 4 + self
                .entries
                .iter()
                .map(|(_, d)| 8 + d.map_or(0, <[u8]>::len))
                .sum::<usize>();
            let packed = self.compress.then(|| self.pack()).filter(|p| p.len() < payload_len);
            match packed {
                Some(p) => {
                    wire::write_frame(self.out, Kind::PagesLz4, &p)?;
                    self.bytes += 5 + p.len() as u64;
                }
                None => {
                    let mut header = [0u8; 9];
                    header[0] = Kind::Pages as u8;
                    header[1..5].copy_from_slice(&(payload_len as u32).to_le_bytes());
                    header[5..].copy_from_slice(&count.to_le_bytes());
                    let mut slices = Vec::with_capacity(1 + 2 * self.entries.len());
                    slices.push(IoSlice::new(&header));
                    for (word, data) in &self.entries {
                        slices.push(IoSlice::new(word));
                        if let Some(data) = data {
                            slices.push(IoSlice::new(data));
                        }
                    }
                    write_all_vectored(self.out, &mut slices)?;
                    self.bytes += 5 + payload_len as u64;
                }
            }
            self.entries.clear();
        }
        self.out.flush()?;
        Ok(())
    }

    /// The frame's pages as one LZ4-compressed PAGES_LZ4 payload.
    fn pack(&mut self) -> Vec<u8> {
        self.packed.clear();
        for (word, data) in &self.entries {
            let pfn = u64::from_le_bytes(*word) & !ZERO_PAGE;
            wire::push_page(&mut self.packed, pfn, data.unwrap_or(&ZEROS));
        }
        wire::compress_pages(&self.packed)
    }
}

static ZEROS: [u8; PAGE] = [0; PAGE];

/// Writes every byte of `slices`, a window of them per call.
fn write_all_vectored(out: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        let window = slices.len().min(SLICES_PER_WRITE);
        match out.write_vectored(&slices[..window]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `limit` bytes per call, as the TLS writer does.
    struct Trickle {
        taken: Vec<u8>,
        limit: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.limit);
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pages_of(frames: &[u8]) -> Vec<(u64, Option<Vec<u8>>)> {
        let mut input = frames;
        let (mut buf, mut seen) = (Vec::new(), Vec::new());
        while !input.is_empty() {
            match wire::read_frame(&mut input, &mut buf).expect("a frame") {
                Kind::Pages => {}
                Kind::PagesLz4 => {
                    let mut plain = Vec::new();
                    wire::decompress_pages(&buf, &mut plain).expect("LZ4 pages");
                    buf = plain;
                }
                other => panic!("unexpected {other:?}"),
            }
            wire::for_each_page(&buf, 1 << 20, |pfn, data| {
                seen.push((pfn, data.map(<[u8]>::to_vec)));
                Ok(())
            })
            .expect("pages");
        }
        seen
    }

    #[test]
    fn frames_written_in_pieces_decode_to_the_pages_sent() {
        let data: Vec<Vec<u8>> = (0..5u8).map(|i| vec![if i == 2 { 0 } else { i + 1 }; PAGE]).collect();
        for compress in [false, true] {
            let mut out = Trickle {
                taken: Vec::new(),
                limit: 1000,
            };
            let mut sender = PageSender::with_frame_pages(&mut out, compress, 2);
            for (i, page) in data.iter().enumerate() {
                sender.page(10 + i as u64, page).expect("sent");
            }
            sender.flush().expect("flushed");
            let (zero_pages, bytes) = (sender.zero_pages, sender.bytes);
            assert_eq!(zero_pages, 1);
            assert_eq!(bytes, out.taken.len() as u64);
            let seen = pages_of(&out.taken);
            assert_eq!(seen.len(), 5);
            for (i, (pfn, page)) in seen.into_iter().enumerate() {
                assert_eq!(pfn, 10 + i as u64);
                assert_eq!(page, (i != 2).then(|| data[i].clone()), "page {i}, compress {compress}");
            }
        }
    }
}
