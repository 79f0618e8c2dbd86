//! The `xcloud` command's library half: the built-in guests and the commands, so that the
//! integration tests can drive them in-process as well as through the binary.

pub mod bench;
pub mod bench_disk;
pub mod bench_fair;
pub mod bench_http;
pub mod bench_migrate;
pub mod bench_net;
pub mod bench_snapshot;
pub mod cloud;
pub mod doctor;
pub mod guests;
pub mod jail;
pub mod netlab;
pub mod run;
