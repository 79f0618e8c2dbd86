//! A hostile primary: the backup (`stand_by`) reads arbitrary bytes as the (already
//! authenticated) replication stream and must refuse them, let the VM go, or build it from a
//! checkpoint that checked out, without panicking; nothing may run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};

/// The stream: reads come from the fuzz input (then its end), writes go nowhere.
struct Feed<'a>(&'a [u8]);

impl Read for Feed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Feed<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl xcloud_migration::Duplex for Feed<'_> {
    fn read_arrived(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
    fn poll_fd(&self) -> std::os::fd::RawFd {
        -1
    }
}

fuzz_target!(|data: &[u8]| {
    let console = xcloud_vmm::Console::new(Box::new(std::io::sink()));
    // An odd first byte: the stream starts with HELLO, PROTECT and SYNC this host accepts and
    // the epochs are fuzzed; otherwise all of it is.
    let stream = match data.split_first() {
        Some((&first, rest)) if first & 1 == 1 => [xcloud_migration::fuzzing::replication_prelude(), rest.to_vec()].concat(),
        _ => data.to_vec(),
    };
    // A VM built from a checkpoint is dropped unstarted.
    let _ = xcloud_migration::stand_by(Feed(&stream), console, None);
});
