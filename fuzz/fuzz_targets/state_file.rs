//! xcloudd starting on a state file that holds anything: records of every table with any
//! bytes (beside an admin key the harness knows), or the redb file itself damaged. It must
//! refuse with a reason and leave the file, or start and answer its listings by the API's
//! rules; a record naming a path outside the daemon's directories must not be read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xcloud_control::fuzzing::open_state(data);
});
