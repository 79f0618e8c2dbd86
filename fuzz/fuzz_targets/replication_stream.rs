//! A hostile primary: the backup (`stand_by`) reads arbitrary bytes as the (already
//! authenticated) replication stream and must refuse them, let the VM go, or build it from a
//! checkpoint that checked out, without panicking; nothing may run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcloud_migration::fuzzing::MemoryStream;

fuzz_target!(|data: &[u8]| {
    let console = xcloud_vmm::Console::new(Box::new(std::io::sink()));
    // An odd first byte: the stream starts with HELLO, PROTECT and SYNC this host accepts and
    // the epochs are fuzzed; otherwise all of it is.
    let stream = match data.split_first() {
        Some((&first, rest)) if first & 1 == 1 => [xcloud_migration::fuzzing::replication_prelude(), rest.to_vec()].concat(),
        _ => data.to_vec(),
    };
    // A VM built from a checkpoint is dropped unstarted.
    let _ = xcloud_migration::stand_by(MemoryStream::new(stream), console, None, None, None);
});
