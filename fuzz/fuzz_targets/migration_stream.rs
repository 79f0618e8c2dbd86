//! A hostile migration source: the destination reads arbitrary bytes as the (already
//! authenticated) stream and must refuse or accept them without panicking; nothing may run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcloud_migration::fuzzing::MemoryStream;

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
    let _ = xcloud_migration::receive(MemoryStream::new(stream), console, &Default::default());
});
