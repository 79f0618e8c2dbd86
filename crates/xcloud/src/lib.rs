//! The `xcloud` command's library half: the built-in guests and the commands, so that the
//! integration tests can drive them in-process as well as through the binary.

pub mod bench;
pub mod bench_api;
pub mod bench_disk;
pub mod bench_ext;
pub mod bench_fair;
pub mod bench_ha;
pub mod bench_http;
pub mod bench_migrate;
pub mod bench_net;
pub mod bench_snapshot;
pub mod cli_config;
pub mod cloud;
pub mod doctor;
pub mod evacuate;
pub mod exit;
pub mod guests;
pub mod jail;
pub mod lab;
pub mod netlab;
pub mod run;

/// Logs to stderr at the level `XCLOUD_LOG` names (`default` without one). A plain level, not
/// an EnvFilter with its regex engine: the VMM's resident memory is a measured target, and the
/// log is per process anyway.
pub fn init_log(default: tracing_subscriber::filter::LevelFilter) {
    let level = std::env::var("XCLOUD_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .unwrap_or(default);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
}
