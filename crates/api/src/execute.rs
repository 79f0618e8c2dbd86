//! What each request does to the VM.

use crate::protocol::{parse_request, Command, Request, Response, API_VERSION};
use crate::watchdog::Watchdog;
use xcloud_migration::{MigrateOptions, Outgoing, ProtectOptions};
use xcloud_vm_core::report::flatten_error;
use xcloud_vmm::{VmError, VmHandle, VmState};

fn state_name(s: VmState) -> String {
    match s {
        VmState::Created => "created",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopped => "stopped",
    }
    .to_string()
}

pub(crate) fn failure(error: String) -> Response {
    Response {
        ok: false,
        error: Some(error),
        ..Default::default()
    }
}

/// The request on `line`, or why it is malformed or of another API version.
fn checked_request(line: &str) -> Result<Request, String> {
    let request: Request = parse_request(line)?;
    if request.api != API_VERSION {
        return Err(format!(
            "API version {} is not supported (this VMM speaks {API_VERSION})",
            request.api
        ));
    }
    Ok(request)
}

/// Executes one request line for a VMM that stands by as a backup (it has no VM yet): only
/// `status` is served, with what it holds.
pub fn execute_standby(watch: &xcloud_migration::StandbyWatch, line: &str) -> Response {
    match checked_request(line).map(|r| r.command) {
        Err(why) => failure(why),
        Ok(Command::Status) => Response {
            ok: true,
            state: Some("standby".into()),
            standby: Some(watch.report()),
            ..Default::default()
        },
        Ok(_) => failure(
            "this VMM stands by as a backup (docs/replication.md): it has no VM to drive until it takes over; only status is served"
                .into(),
        ),
    }
}

/// Executes one request line against the VM; `outgoing` tracks its outgoing migration,
/// `watchdog` its controller's watchdog.
pub fn execute(handle: &VmHandle, outgoing: &Outgoing, watchdog: &Watchdog, line: &str) -> Response {
    let request = match checked_request(line) {
        Ok(r) => r,
        Err(why) => return failure(why),
    };
    // While a migration runs, only what cannot disturb it is served (stop ends the VM, and the
    // migration with it, before the switch; after it the source never runs again anyway).
    // Protection pauses and resumes the VM for every checkpoint: the same holds while it runs.
    let disturbs_migration = matches!(
        request.command,
        Command::Pause | Command::Resume | Command::Snapshot { .. } | Command::Migrate { .. } | Command::Protect { .. }
    );
    if disturbs_migration && outgoing.running() {
        let why = if outgoing.protected() {
            "this VM is protected (replicated to a backup): unprotect it first"
        } else {
            "a migration of this VM is running: wait until it ends (status shows it)"
        };
        let mut r = failure(why.into());
        r.state = Some(state_name(handle.state()));
        return r;
    }
    let with_state = |mut r: Response| {
        r.state = Some(state_name(handle.state()));
        r.fenced = watchdog.fenced().then_some(true);
        r
    };
    let done = |result: Result<(), String>| match result {
        Ok(()) => with_state(Response {
            ok: true,
            ..Default::default()
        }),
        Err(e) => with_state(failure(e)),
    };
    let vm_error = |e: VmError| flatten_error(&e);
    match request.command {
        Command::Status => {
            let load = handle.guest_load();
            with_state(Response {
                ok: true,
                vcpus: Some(handle.vcpu_count()),
                mem_bytes: Some(handle.mem_bytes()),
                migration: outgoing.progress(),
                protection: outgoing.protection(),
                guest_load: load.map(|(figure, _)| figure),
                guest_load_age_ms: load.map(|(_, age)| age.as_millis() as u64),
                ..Default::default()
            })
        }
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
        Command::Protect {
            to,
            identity,
            peer_cert,
            interval_ms,
            heartbeat_ms,
            timeout_ms,
            compress,
        } => {
            let creds = match xcloud_migration::tls::Credentials::load(&identity, &peer_cert) {
                Ok(c) => c,
                Err(e) => return with_state(failure(flatten_error(&e))),
            };
            let mut options = ProtectOptions {
                compress,
                ..Default::default()
            };
            let ms = |ms: u64| std::time::Duration::from_millis(ms.clamp(1, 60_000));
            if let Some(v) = interval_ms {
                options.interval = ms(v);
            }
            if let Some(v) = heartbeat_ms {
                options.heartbeat = ms(v);
            }
            if let Some(v) = timeout_ms {
                options.backup_timeout = ms(v);
            }
            match xcloud_migration::protect(handle, outgoing, &to, &creds, options) {
                Ok(status) => with_state(Response {
                    ok: true,
                    protection: Some(status),
                    ..Default::default()
                }),
                Err(e) => with_state(failure(flatten_error(&e))),
            }
        }
        Command::Unprotect => {
            if outgoing.unprotect() {
                with_state(Response {
                    ok: true,
                    protection: outgoing.protection(),
                    ..Default::default()
                })
            } else {
                with_state(failure("this VM is not protected".into()))
            }
        }
        Command::Pause => done(handle.pause().map_err(vm_error)),
        Command::Resume if watchdog.expired() => with_state(failure(
            "the watchdog paused this VM: its controller must renew the watchdog before it may run".into(),
        )),
        Command::Resume => {
            let resumed = handle.resume();
            if resumed.is_ok() {
                watchdog.resumed();
            }
            done(resumed.map_err(vm_error))
        }
        Command::Watchdog { ms } => done(watchdog.renew(handle, outgoing, std::time::Duration::from_millis(ms))),
        // The VM is stopped once this answer is out (serve_connection): stopping it ends the
        // process, which could otherwise exit before the client hears back.
        Command::Stop => with_state(Response {
            ok: true,
            stopping: true,
            ..Default::default()
        }),
        Command::ExtAdd {
            file,
            name,
            version,
            port_base,
            port_count,
        } => done(crate::extensions::add(
            handle, &file, name, version, port_base, port_count,
        )),
        Command::ExtList => with_state(Response {
            ok: true,
            extensions: Some(crate::extensions::list(handle)),
            ..Default::default()
        }),
        Command::ExtRemove { name } => done(
            handle
                .extensions()
                .remove(&name, xcloud_vmm::extension::Origin::Tenant)
                .map_err(|e| e.to_string()),
        ),
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
