//! A hostile client on the control socket: any bytes, cut into reads anywhere, must be split
//! into bounded lines and each line parsed into a request or refused, never a panic and never
//! more memory than the line limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Read;
use std::time::Duration;
use xcloud_api::server::{Line, LineReader};

/// Hands out the input in reads whose sizes the input's first bytes choose.
struct Reads<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    at: usize,
}

impl Read for Reads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.sizes.get(self.at % self.sizes.len().max(1)).map_or(64, |&s| s as usize + 1);
        self.at += 1;
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let (sizes, rest) = data.split_at(data.len().min(8));
    // A small limit, so that the over-long path is reached.
    let limit = 256;
    let mut lines = LineReader::new(Reads { data: rest, sizes, at: 0 }, limit, Duration::from_secs(60));
    while let Ok(line) = lines.next_line() {
        match line {
            Line::Request(bytes) => {
                assert!(bytes.len() <= limit);
                if let Ok(text) = std::str::from_utf8(bytes) {
                    let _ = xcloud_api::protocol::parse_request(text.trim());
                }
            }
            Line::TooLong => {}
            Line::End => break,
        }
    }
});
