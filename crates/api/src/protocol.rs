//! The wire form of the control API: requests, responses, errors, limits.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use xcloud_migration::{MigrationProgress, MigrationSummary, PostcopyMode, ProtectionStatus, StandbyStatus};

/// Version of this API.
pub const API_VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// API failures (client side, and setting up the server).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {path}")]
    /// The socket cannot be made.
    Bind {
        /// The socket path.
        path: String,
        #[source]
        /// The system's answer.
        source: std::io::Error,
    },
    #[error(
        "{path} is {found}, not a socket: refusing to replace it (name a path that is free or holds an old socket)"
    )]
    /// Something other than a socket is at the path: it is not ours to remove.
    NotASocket {
        /// The socket path.
        path: String,
        /// What is there ("a regular file", "a directory").
        found: &'static str,
    },
    #[error("{path} is in use by a running VMM")]
    /// Another VMM answers on the socket.
    InUse {
        /// The socket path.
        path: String,
    },
    #[error("cannot reach the VMM at {path}")]
    /// No VMM listens on the socket.
    Connect {
        /// The socket path.
        path: String,
        #[source]
        /// The system's answer.
        source: std::io::Error,
    },
    #[error("the VMM at {path} did not answer")]
    /// The VMM closed the connection or timed out.
    NoAnswer {
        /// The socket path.
        path: String,
        #[source]
        /// The system's answer.
        source: std::io::Error,
    },
    #[error("the VMM at {path} sent an answer that is not valid: {detail}")]
    /// The answer is not a response of this API.
    BadAnswer {
        /// The socket path.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
}

/// An operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// The VM's state and shape.
    Status,
    /// Stop every vCPU (the guest's clock keeps going).
    Pause,
    /// Let every vCPU run again.
    Resume,
    /// Write a snapshot into `dir` (a running VM is paused for it and resumed after).
    Snapshot {
        /// The snapshot directory (created if needed).
        dir: PathBuf,
    },
    /// Stop the VM for good.
    Stop,
    /// Install a tenant's extension module (docs/extensions.md) from `file` (WebAssembly or
    /// its text form, read by the VMM) as `name`, serving `port_count` ports from `port_base`
    /// in the extension window.
    ExtAdd {
        /// The module's file.
        file: PathBuf,
        /// Its name in this VM.
        name: String,
        /// Its version, as its author gives it.
        #[serde(default)]
        version: Option<String>,
        /// The first port it serves.
        #[serde(default)]
        port_base: Option<u16>,
        /// How many ports.
        #[serde(default)]
        port_count: Option<u16>,
    },
    /// The VM's extension modules, with their calls, time and failures.
    ExtList,
    /// Remove the tenant's module `name`.
    ExtRemove {
        /// Its name.
        name: String,
    },
    /// Arm or renew the controller's watchdog: pause the VM unless renewed within `ms`
    /// milliseconds (0 disarms it; at most an hour).
    Watchdog {
        /// The window, in milliseconds.
        ms: u64,
    },
    /// Live-migrate the VM to the destination at `to` (`xcloud receive`), authenticated by this
    /// host's `identity` directory and the destination's pinned `peer_cert`.
    Migrate {
        /// The destination's `HOST:PORT`.
        to: String,
        /// This host's identity directory (`xcloud keygen`).
        identity: PathBuf,
        /// The destination's certificate, pinned.
        peer_cert: PathBuf,
        #[serde(default)]
        /// The downtime budget (default 50 ms).
        max_downtime_ms: Option<u64>,
        /// How long the destination may stay silent before the migration fails.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Post-copy: "off" (default), "converge" (when pre-copy does not converge) or "now".
        #[serde(default)]
        postcopy: PostcopyMode,
        /// Compress page frames (LZ4).
        #[serde(default)]
        compress: bool,
    },
    /// Replicate the VM continuously to the backup at `to` (`xcloud receive --standby`,
    /// docs/replication.md), which takes over from the last checkpoint if this host goes away.
    /// Answers once the backup holds the first checkpoint.
    Protect {
        /// The backup's `HOST:PORT`.
        to: String,
        /// This host's identity directory (`xcloud keygen`).
        identity: PathBuf,
        /// The backup's certificate, pinned.
        peer_cert: PathBuf,
        /// How often a checkpoint is taken (default 25 ms).
        #[serde(default)]
        interval_ms: Option<u64>,
        /// The heartbeat interval (default 100 ms): the backup takes over after two of silence.
        #[serde(default)]
        heartbeat_ms: Option<u64>,
        /// How long the backup may leave checkpoints unacknowledged before it is given up
        /// (default 3 s).
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Compress page frames (LZ4).
        #[serde(default)]
        compress: bool,
    },
    /// End the VM's replication: the backup lets the VM go.
    Unprotect,
}

/// An extension module as `ext_list` reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExtensionReport {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// SHA-256 of its Wasm, or `built-in`.
    pub digest: String,
    /// `provider` or `tenant`.
    pub origin: String,
    /// The ports it serves: first, count.
    pub ports: Option<(u16, u16)>,
    /// Hook calls so far.
    pub calls: u64,
    /// Microseconds spent in them.
    pub busy_us: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Why it is disabled, if it is.
    pub disabled: Option<String>,
    /// The figures it exports.
    pub metrics: Vec<(String, f64)>,
}

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Must be [`API_VERSION`].
    pub api: u32,
    #[serde(flatten)]
    /// What to do.
    pub command: Command,
}

/// Parses a request line. The operation must be named: serde would also take a number as
/// the position of a variant in [`Command`], which nobody means and which changes whenever a
/// command is added.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))?;
    match value.get("op") {
        Some(serde_json::Value::String(_)) | None => {}
        Some(other) => {
            return Err(format!(
                "malformed request: \"op\" must be the name of an operation, not {other}"
            ))
        }
    }
    serde_json::from_value(value).map_err(|e| format!("malformed request: {e}"))
}

/// A response line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the command succeeded.
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Why it failed.
    pub error: Option<String>,
    /// `created`, `running`, `paused` or `stopped`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// For `status`: the number of vCPUs.
    pub vcpus: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// For `status`: bytes of guest RAM.
    pub mem_bytes: Option<u64>,
    /// For `status`: the last load figure the guest reported, if it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_load: Option<f64>,
    /// For `status`: milliseconds since that report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_load_age_ms: Option<u64>,
    /// For `status` and `watchdog`: true when the watchdog paused the VM and nothing has
    /// resumed it since (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced: Option<bool>,
    /// For `snapshot`: pages and bytes written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// For `snapshot`: bytes written.
    pub snapshot_bytes: Option<u64>,
    /// For `status` during a migration: its progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
    /// For `migrate`: what it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrated: Option<MigrationSummary>,
    /// For `status` and `protect`: the VM's replication, or why it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protection: Option<ProtectionStatus>,
    /// For `ext_list`: the modules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Vec<ExtensionReport>>,
    /// For `status` of a VMM that stands by as a backup: what it holds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub standby: Option<StandbyStatus>,
    /// For `stop`: the server stops the VM once this answer is written (never on the wire).
    #[serde(skip)]
    pub stopping: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request {
            api: 1,
            command: Command::Snapshot { dir: "/tmp/s".into() },
        };
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            r#"{"api":1,"op":"snapshot","dir":"/tmp/s"}"#
        );
        let r: Request = serde_json::from_str(r#"{"api":1,"op":"status"}"#).expect("parse");
        assert_eq!(r.command, Command::Status);
    }

    #[test]
    fn operations_are_named_never_numbered() {
        for bad in [r#"{"api":1,"op":0}"#, r#"{"api":1,"op":2}"#, r#"{"api":1,"op":null}"#] {
            let err = parse_request(bad).expect_err(bad);
            assert!(err.contains("must be the name of an operation"), "{err}");
        }
        assert_eq!(
            parse_request(r#"{"api":1,"op":"pause"}"#).expect("named").command,
            Command::Pause
        );
    }

    #[test]
    fn hostile_requests_do_not_parse() {
        for bad in [
            "",
            "{",
            "null",
            r#"{"api":1}"#,
            r#"{"api":1,"op":"reboot"}"#,
            r#"{"api":"1","op":"status"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
