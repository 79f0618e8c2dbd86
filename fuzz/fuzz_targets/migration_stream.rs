//! A hostile migration source: the destination reads arbitrary bytes as the (already
//! authenticated) stream and must refuse or accept them without panicking; nothing may run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};

/// The stream: reads come from the fuzz input, writes go nowhere.
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

fuzz_target!(|data: &[u8]| {
    let console = xcloud_vmm::Console::new(Box::new(std::io::sink()));
    // An odd first byte: the stream starts with a HELLO this host accepts (a 4 MiB guest) and
    // the rest is fuzzed, so that the frames after it get explored; otherwise all of it is.
    let stream = match data.split_first() {
        Some((&first, rest)) if first & 1 == 1 => {
            [xcloud_migration::fuzzing::migration_hello(4 << 20), rest.to_vec()].concat()
        }
        _ => data.to_vec(),
    };
    // A received VM is dropped unstarted: `start` would wait for GO.
    let _ = xcloud_migration::receive(Feed(&stream), console, &Default::default());
});
