//! The VMM's control API (docs/control-api.md): one JSON object per line over a Unix socket,
//! each request answered by one JSON line. Versioned by the `api` field of every request.
//!
//! Input is untrusted: a line longer than [`MAX_LINE`], malformed JSON, an unknown operation or
//! a wrong version gets an error response and the connection stays usable.
//!
//! The API drives one VM ([`xcloud_vmm::VmHandle`]) and the engines that operate on it
//! (`xcloud-snapshot`, `xcloud-migration`); nothing below it knows the API exists.
//!
//! It may depend on `xcloud-vm-core`, `xcloud-vmm`, `xcloud-snapshot` and `xcloud-migration`
//! (docs/architecture.md; crates/xcloud/tests/architecture.rs checks it).

#![deny(clippy::unwrap_used, clippy::expect_used)]

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use xcloud_migration::{MigrateOptions, MigrationProgress, MigrationSummary, Outgoing, PostcopyMode};
use xcloud_vm_core::report::flatten_error;
use xcloud_vmm::{VmError, VmHandle, VmState};

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
}

fn state_name(s: VmState) -> String {
    match s {
        VmState::Created => "created",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopped => "stopped",
    }
    .to_string()
}

fn failure(error: String) -> Response {
    Response {
        ok: false,
        error: Some(error),
        ..Default::default()
    }
}

/// Executes one request line against the VM; `outgoing` tracks its outgoing migration.
pub fn execute(handle: &VmHandle, outgoing: &Outgoing, line: &str) -> Response {
    let request: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return failure(format!("malformed request: {e}")),
    };
    if request.api != API_VERSION {
        return failure(format!(
            "API version {} is not supported (this VMM speaks {API_VERSION})",
            request.api
        ));
    }
    // While a migration runs, only what cannot disturb it is served (stop ends the VM, and the
    // migration with it, before the switch; after it the source never runs again anyway).
    let disturbs_migration = matches!(
        request.command,
        Command::Pause | Command::Resume | Command::Snapshot { .. } | Command::Migrate { .. }
    );
    if disturbs_migration && outgoing.running() {
        let mut r = failure("a migration of this VM is running: wait until it ends (status shows it)".into());
        r.state = Some(state_name(handle.state()));
        return r;
    }
    let with_state = |mut r: Response| {
        r.state = Some(state_name(handle.state()));
        r
    };
    let done = |result: Result<(), VmError>| match result {
        Ok(()) => with_state(Response {
            ok: true,
            ..Default::default()
        }),
        Err(e) => with_state(failure(flatten_error(&e))),
    };
    match request.command {
        Command::Status => with_state(Response {
            ok: true,
            vcpus: Some(handle.vcpu_count()),
            mem_bytes: Some(handle.mem_bytes()),
            migration: outgoing.progress(),
            ..Default::default()
        }),
        Command::Migrate {
            to,
            identity,
            peer_cert,
            max_downtime_ms,
            timeout_ms,
            postcopy,
            compress,
        } => {
            let creds = match xcloud_migration::tls::Credentials::load(&identity, &peer_cert) {
                Ok(c) => c,
                Err(e) => return with_state(failure(flatten_error(&e))),
            };
            let mut options = MigrateOptions::default();
            if let Some(ms) = max_downtime_ms {
                options.max_downtime = std::time::Duration::from_millis(ms);
            }
            options.postcopy = postcopy;
            options.compress = compress;
            if let Some(ms) = timeout_ms {
                options.peer_timeout = std::time::Duration::from_millis(ms.max(1));
            }
            match xcloud_migration::migrate(handle, outgoing, &to, &creds, options) {
                Ok(summary) => with_state(Response {
                    ok: true,
                    migrated: Some(summary),
                    ..Default::default()
                }),
                Err(e) => with_state(failure(flatten_error(&e))),
            }
        }
        Command::Pause => done(handle.pause()),
        Command::Resume => done(handle.resume()),
        Command::Stop => {
            handle.stop();
            with_state(Response {
                ok: true,
                ..Default::default()
            })
        }
        Command::Snapshot { dir } => match xcloud_snapshot::save(handle, &dir) {
            Ok(summary) => with_state(Response {
                ok: true,
                snapshot_pages: Some(summary.pages),
                snapshot_bytes: Some(summary.bytes),
                ..Default::default()
            }),
            Err(e) => with_state(failure(flatten_error(&e))),
        },
    }
}

/// A listening API socket; the socket file is removed when this is dropped.
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` and serves requests for the VM behind `handle` on a background thread.
pub fn serve(path: &Path, handle: VmHandle) -> Result<ApiServer, ApiError> {
    let shown = path.display().to_string();
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse { path: shown });
        }
        // A socket left behind by a VMM that is gone.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: shown.clone(),
        source,
    })?;
    std::thread::Builder::new()
        .name("api".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let outgoing = Outgoing::new();
            for stream in listener.incoming().flatten() {
                let (handle, outgoing) = (handle.clone(), outgoing.clone());
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .stack_size(256 * 1024)
                    .spawn(move || serve_connection(stream, &handle, &outgoing));
            }
        })
        .map_err(|source| ApiError::Bind { path: shown, source })?;
    Ok(ApiServer {
        path: path.to_path_buf(),
    })
}

fn serve_connection(stream: UnixStream, handle: &VmHandle, outgoing: &Outgoing) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut input = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut input).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line);
        let response = match read {
            Ok(0) | Err(_) => return,
            Ok(_) if line.len() > MAX_LINE => {
                // Skip the rest of the over-long line before answering.
                let mut rest = Vec::new();
                if input.read_until(b'\n', &mut rest).is_err() {
                    return;
                }
                failure(format!("request longer than {MAX_LINE} bytes"))
            }
            Ok(_) => match std::str::from_utf8(&line) {
                Ok(text) => execute(handle, outgoing, text.trim()),
                Err(_) => failure("request is not UTF-8".into()),
            },
        };
        let Ok(mut text) = serde_json::to_string(&response) else {
            return;
        };
        text.push('\n');
        let written = out.write_all(text.as_bytes()).and_then(|_| out.flush());
        // A migrated VM ends only after its answer went out: ending it lets the process exit.
        if let Some(summary) = &response.migrated {
            handle.end_migrated(&summary.to);
        }
        if written.is_err() {
            return;
        }
    }
}

/// Sends one command to the VMM at `path` and returns its answer.
pub fn call(path: &Path, command: Command) -> Result<Response, ApiError> {
    let shown = path.display().to_string();
    let mut stream = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: shown.clone(),
        source,
    })?;
    let request = Request {
        api: API_VERSION,
        command,
    };
    let mut text = serde_json::to_string(&request).map_err(|e| ApiError::BadAnswer {
        path: shown.clone(),
        detail: e.to_string(),
    })?;
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(|source| ApiError::NoAnswer {
        path: shown.clone(),
        source,
    })?;
    let mut answer = String::new();
    BufReader::new((&stream).take(MAX_LINE as u64))
        .read_line(&mut answer)
        .map_err(|source| ApiError::NoAnswer {
            path: shown.clone(),
            source,
        })?;
    serde_json::from_str(&answer).map_err(|e| ApiError::BadAnswer {
        path: shown,
        detail: e.to_string(),
    })
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
