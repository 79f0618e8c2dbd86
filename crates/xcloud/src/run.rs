//! `xcloud run`: boots a guest with its console on stdout; the guest's status becomes ours.

use crate::guests;
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::path::Path;
use xcloud_vmm::{Console, Vm, VmConfig, VmExit};

/// Parses a size such as `64M`, `1G`, `512MiB`, `4096`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (try 64M or 1G)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit '{other}' in '{text}' (use K, M or G)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{text}' is too large"))
}

/// Loads GUEST: a built-in name or a path to a PVH ELF, which must be a regular file no larger
/// than the guest's RAM (`mem` bytes: a larger image cannot be loaded into it). It is checked
/// before a byte is read, so a FIFO, a device or a huge file costs nothing.
pub fn load_image(guest: &str, mem: u64) -> Result<Cow<'static, [u8]>> {
    if let Some(image) = guests::builtin(guest) {
        return Ok(Cow::Borrowed(image));
    }
    if !guest.contains('/') && !std::path::Path::new(guest).exists() {
        bail!(
            "'{guest}' is neither a built-in guest ({}) nor a file",
            guests::names().join(", ")
        );
    }
    let bytes = xcloud_state::format::read_file(std::path::Path::new(guest), "guest image", mem)
        .with_context(|| format!("cannot read guest image {guest}"))?;
    Ok(Cow::Owned(bytes))
}

/// Where a termination signal goes: to the VM once there is one (it stops, and the process
/// ends with the VM's status), before that (waiting for a migration source, reading a
/// snapshot) straight to the process's end with status 130.
type SignalTarget = std::sync::Arc<std::sync::Mutex<SignalState>>;

/// What a termination signal acts on.
#[derive(Default)]
struct SignalState {
    /// The VM, once it exists.
    vm: Option<xcloud_vmm::VmHandle>,
    /// The control socket to remove if the process ends before the VM runs.
    socket: Option<std::path::PathBuf>,
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and so in every thread it starts) and
/// starts the thread that takes them, first of all, so that no state ignores them.
fn watch_termination_signals() -> Result<SignalTarget> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only edit it and this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let target = SignalTarget::default();
    let vm = target.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is an initialised set and `sig` a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            let state = vm.lock().unwrap_or_else(|p| p.into_inner());
            match state.vm.as_ref() {
                // A VM that never ran (a destination still waiting for GO) has nothing to lose.
                Some(handle) if handle.state() != xcloud_vmm::VmState::Created => {
                    tracing::info!("signal {sig}: stopping the VM");
                    handle.stop();
                }
                _ => {
                    if let Some(socket) = &state.socket {
                        let _ = std::fs::remove_file(socket);
                    }
                    eprintln!("xcloud: stopped by signal {sig} before the VM ran");
                    std::process::exit(130);
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(target)
}

/// Where a VMM serves its control API, and whether its watchdog is armed from the start.
pub struct ControlSocket {
    /// The Unix socket.
    pub path: std::path::PathBuf,
    /// The watchdog's window (xcloud_api::watchdog), if its controller asked for one.
    pub watchdog: Option<std::time::Duration>,
    /// What tenants' extension modules may do in this VM.
    pub ext_policy: xcloud_vmm::extension::TenantPolicy,
    /// The fence of the VM's protections (docs/replication.md), if they are fenced.
    pub fence: Option<std::sync::Arc<dyn xcloud_migration::Fence>>,
}

/// Runs the guest to its end and returns the process exit status.
pub fn run(config: VmConfig, guest: &str, api: Option<&ControlSocket>) -> Result<i32> {
    let image = load_image(guest, config.mem_bytes)?;
    let signals = watch_termination_signals()?;
    let vm = Vm::new(&config, &image, Console::stdout()).context("cannot create the VM")?;
    supervise(vm.handle(), signals, api, move || {
        let mut vm = vm;
        vm.start().context("cannot start the VM")?;
        Ok(vm)
    })
}

/// Continues the VM saved in `dir` and returns the process exit status.
pub fn restore(dir: &Path, lazy: bool, api: Option<&ControlSocket>) -> Result<i32> {
    let signals = watch_termination_signals()?;
    let vm = if lazy {
        xcloud_snapshot::restore_lazy(dir, Console::stdout())
    } else {
        xcloud_snapshot::restore(dir, Console::stdout())
    }
    .with_context(|| format!("cannot restore the snapshot in {}", dir.display()))?;
    supervise(vm.handle(), signals, api, move || {
        let mut vm = vm;
        vm.start().context("cannot start the VM")?;
        Ok(vm)
    })
}

/// Receives a migrating VM on `listen` and runs it to its end.
pub fn receive(
    listen: &str,
    identity: &Path,
    peer: &Path,
    api: Option<&ControlSocket>,
    options: &xcloud_migration::ReceiveOptions,
) -> Result<i32> {
    use xcloud_migration::{listen_and_receive, tls::Credentials};
    let signals = watch_termination_signals()?;
    let creds = Credentials::load(identity, peer).context("cannot load the migration credentials")?;
    if let Some(dir) = &options.disk_dir {
        if !dir.is_dir() {
            anyhow::bail!("the disk directory {} is not a directory", dir.display());
        }
    }
    let incoming = listen_and_receive(listen, &creds, Console::stdout(), options).context("cannot receive the VM")?;
    supervise(incoming.handle(), signals, api, move || {
        incoming.start().context("the source did not hand the VM over")
    })
}

/// Stands by as the backup of a protected VM on `listen`; runs it to its end if the primary
/// goes away, and ends without running it if the primary lets it go.
pub fn stand_by(
    listen: &str,
    identity: &Path,
    peer: &Path,
    api: Option<&ControlSocket>,
    disk_dir: Option<&Path>,
) -> Result<i32> {
    use xcloud_migration::{listen_and_stand_by, tls::Credentials, StandbyEnd};
    let signals = watch_termination_signals()?;
    let creds = Credentials::load(identity, peer).context("cannot load the replication credentials")?;
    if let Some(dir) = disk_dir {
        if !dir.is_dir() {
            anyhow::bail!("the disk directory {} is not a directory", dir.display());
        }
    }
    let fence = api.and_then(|a| a.fence.as_deref());
    // Until it takes over, the control socket reports what the backup holds.
    let watch = xcloud_migration::StandbyWatch::new();
    let status = match api {
        Some(api) => {
            Some(xcloud_api::serve_standby(&api.path, watch.clone()).context("cannot open the control socket")?)
        }
        None => None,
    };
    let end = listen_and_stand_by(listen, &creds, Console::stdout(), disk_dir, fence, Some(&watch));
    drop(status);
    match end.context("standing by failed")? {
        StandbyEnd::Released(why) => {
            eprintln!("xcloud: the primary let the VM go ({why}); it did not run here");
            Ok(0)
        }
        StandbyEnd::TakeOver {
            vm,
            epoch,
            why,
            since_last_word,
            unfinished_bytes,
        } => {
            eprintln!(
                "xcloud: the primary is gone ({why}): running the VM from checkpoint {epoch}, {:.1} ms after the primary's last word ({unfinished_bytes} bytes of the unfinished checkpoint {} dropped)",
                since_last_word.as_secs_f64() * 1e3,
                epoch + 1
            );
            supervise(vm.handle(), signals, api, move || {
                let mut vm = vm;
                vm.start().context("cannot start the VM")?;
                Ok(vm)
            })
        }
    }
}

/// One line on what a backup holds while it stands by.
pub fn describe_standby(s: &xcloud_migration::StandbyStatus) -> String {
    let fenced = s.fence.as_ref().map_or(String::new(), |f| format!(", fenced by {f}"));
    let held = match s.epoch {
        0 => String::new(),
        epoch => format!(" checkpoint {epoch} ({:.0} ms ago),", s.checkpoint_age_ms),
    };
    format!(
        "standing by ({}):{held} {:.1} MiB received{fenced}",
        s.phase,
        s.bytes_received as f64 / (1 << 20) as f64
    )
}

/// One line on a VM's replication: its figures, or why it ended.
pub fn describe_protection(p: &xcloud_migration::ProtectionStatus) -> String {
    if let Some(why) = &p.ended {
        return format!("UNPROTECTED: {why}");
    }
    let fenced = p.fence.as_ref().map_or(String::new(), |f| format!(", fenced by {f}"));
    format!(
        "protected by {}{fenced}: checkpoint {}, {:.0}/s, last {} pages ({:.1} KiB), pause {} us (mean {}, max {}), commit {:.1} ms, {:.2} MB/s",
        p.backup,
        p.acked_epoch,
        p.epochs_per_s,
        p.last_pages,
        p.last_bytes as f64 / 1024.0,
        p.pause_us,
        p.mean_pause_us,
        p.max_pause_us,
        p.commit_ms,
        p.bytes_per_s / 1e6
    )
}

/// How `xcloud ctl SOCK migrate` was asked to migrate.
pub struct MigrateFlags {
    /// The downtime budget.
    pub max_downtime_ms: u64,
    /// How long the destination may stay silent.
    pub timeout_ms: u64,
    /// Whether and when to switch to post-copy.
    pub postcopy: xcloud_migration::PostcopyMode,
    /// Whether to compress page frames.
    pub compress: bool,
}

/// One line on a running migration: phase, round, what was sent, what is left.
pub fn describe_progress(p: &xcloud_migration::MigrationProgress) -> String {
    let left = if p.phase == "post-copy" { "left" } else { "dirty" };
    format!(
        "{} round {}: {} pages ({:.1} MiB) sent, {} {left}",
        p.phase,
        p.round,
        p.pages_sent,
        p.bytes_sent as f64 / (1 << 20) as f64,
        p.dirty_pages
    )
}

/// `xcloud ctl SOCK migrate`: runs the migration, showing its progress, and prints a summary.
pub fn migrate(
    socket: &Path,
    to: String,
    identity: std::path::PathBuf,
    peer_cert: std::path::PathBuf,
    flags: MigrateFlags,
) -> Result<i32> {
    use xcloud_api::{call, Command};
    let bar = indicatif::ProgressBar::new_spinner();
    let watcher = {
        let bar = bar.clone();
        let socket = socket.to_path_buf();
        std::thread::spawn(move || {
            while !bar.is_finished() {
                if let Ok(r) = call(&socket, Command::Status) {
                    if let Some(p) = r.migration {
                        bar.set_message(describe_progress(&p));
                    }
                }
                bar.tick();
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })
    };
    let command = Command::Migrate {
        to: to.clone(),
        identity,
        peer_cert,
        max_downtime_ms: Some(flags.max_downtime_ms),
        timeout_ms: Some(flags.timeout_ms),
        postcopy: flags.postcopy,
        compress: flags.compress,
    };
    let answer = call(socket, command);
    bar.finish_and_clear();
    let _ = watcher.join();
    let answer = answer?;
    if !answer.ok {
        bail!("migration to {to} failed: {}", answer.error.unwrap_or_default());
    }
    let s = answer.migrated.unwrap_or_default();
    println!(
        "migrated to {to}{}: total {:.1} ms, downtime {:.1} ms, {} rounds (guest throttled up to {}%), {} pages ({} zero{}), {:.1} MiB sent, {:.1} MB/s",
        if s.postcopy { " by post-copy" } else { "" },
        s.total_ms,
        s.downtime_ms,
        s.rounds,
        s.throttle_percent,
        s.pages_sent,
        s.zero_pages_sent,
        if s.postcopy {
            format!(", {} asked for by the guest", s.pages_requested)
        } else {
            String::new()
        },
        s.bytes_sent as f64 / (1 << 20) as f64,
        s.bandwidth_mbps
    );
    Ok(0)
}

/// Serves the control socket and signals for the VM behind `handle`, starts it with `start`
/// and waits for its end.
fn supervise(
    handle: xcloud_vmm::VmHandle,
    signals: SignalTarget,
    api: Option<&ControlSocket>,
    start: impl FnOnce() -> Result<Vm>,
) -> Result<i32> {
    let _server = match api {
        Some(api) => {
            handle.extensions().set_policy(api.ext_policy.clone());
            let server =
                xcloud_api::serve(&api.path, handle.clone(), api.watchdog).context("cannot open the control socket")?;
            if let Some(fence) = &api.fence {
                server.set_fence(fence.clone());
            }
            Some(server)
        }
        None => None,
    };
    *signals.lock().unwrap_or_else(|p| p.into_inner()) = SignalState {
        vm: Some(handle),
        socket: api.map(|a| a.path.clone()),
    };
    let vm = start()?;
    let exit = vm.wait();
    match &exit {
        VmExit::Exited(_) => {}
        other => eprintln!("xcloud: {other}"),
    }
    drop(_server);
    Ok(exit.status())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12T").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
