//! A hostile client of xcloudd's REST API: any method, path and body, with the admin key, a
//! tenant's key, an empty one or a forged one, against a real daemon's router and state file.
//! It must never panic, never answer 500, and answer every error with a JSON error body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static HARNESS: OnceLock<xcloud_control::fuzzing::Harness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    HARNESS.get_or_init(xcloud_control::fuzzing::Harness::new).request(data);
});
