//! The source's page frames.

use crate::wire::{self, Kind, WireError, MAX_PAGES_PER_FRAME, PAGE};
use std::io::Write;

/// Sends pages in PAGES frames, counting what went out.
pub(crate) struct PageSender<'a, S: Write> {
    pub out: &'a mut S,
    /// Send frames LZ4-compressed when that makes them smaller.
    compress: bool,
    frame: Vec<u8>,
    in_frame: usize,
    frame_pages: usize,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

impl<'a, S: Write> PageSender<'a, S> {
    pub fn new(out: &'a mut S, compress: bool) -> Self {
        Self::with_frame_pages(out, compress, MAX_PAGES_PER_FRAME)
    }

    /// A sender whose frames carry at most `frame_pages` pages (at most MAX_PAGES_PER_FRAME).
    pub fn with_frame_pages(out: &'a mut S, compress: bool, frame_pages: usize) -> Self {
        let frame_pages = frame_pages.clamp(1, MAX_PAGES_PER_FRAME);
        Self {
            out,
            compress,
            frame: Vec::with_capacity(4 + frame_pages * (8 + PAGE)),
            in_frame: 0,
            frame_pages,
            pages: 0,
            zero_pages: 0,
            bytes: 0,
        }
    }

    /// Whether the frames from now on go compressed (when that makes them smaller).
    pub fn set_compress(&mut self, compress: bool) {
        self.compress = compress;
    }

    /// Adds a page; returns whether that filled a frame, which then went out.
    pub fn page(&mut self, pfn: u64, data: &[u8]) -> Result<bool, WireError> {
        let before = self.frame.len();
        wire::push_page(&mut self.frame, pfn, data);
        if self.frame.len() - before == 8 {
            self.zero_pages += 1;
        }
        self.pages += 1;
        self.in_frame += 1;
        if self.in_frame == self.frame_pages {
            self.flush()?;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        if self.in_frame > 0 {
            let packed = self
                .compress
                .then(|| wire::compress_pages(&self.frame))
                .filter(|p| p.len() < self.frame.len());
            let (kind, payload) = match &packed {
                Some(p) => (Kind::PagesLz4, p.as_slice()),
                None => (Kind::Pages, self.frame.as_slice()),
            };
            wire::write_frame(self.out, kind, payload)?;
            self.bytes += 5 + payload.len() as u64;
            self.frame.clear();
            self.in_frame = 0;
        }
        self.out.flush()?;
        Ok(())
    }
}
