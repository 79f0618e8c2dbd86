//! `xcloud`: run guests, check the host, measure.

use xcloud::{bench, doctor, guests, run};

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use xcloud_migration::PostcopyMode;

#[derive(Parser)]
#[command(
    name = "xcloud",
    version,
    about = "The tenant's own hypervisor layer",
    after_help = "Exit status of the commands that call xcloudd: 0 done, 1 failed, 2 wrong usage, 3 not found, 4 refused, 5 conflict, 6 unreachable, 7 partly done (docs/cloud-api.md). `xcloud run` exits with its guest's status."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A VMM's control socket and its watchdog.
#[derive(clap::Args)]
struct ControlSocketArgs {
    /// Serve the control API on this Unix socket (see `xcloud ctl`).
    #[arg(long)]
    api: Option<PathBuf>,
    /// Arm the controller's watchdog from the start: the VM is paused unless `xcloud ctl SOCK
    /// watchdog MS` renews it within this many milliseconds (xcloudd in a cluster does).
    #[arg(long, requires = "api", value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    watchdog_ms: Option<u64>,
    /// What tenants' extension modules may do (docs/extensions.md), e.g.
    /// `packets=no,blocks=yes,guest-read=512K,tick-ms=100,budget-ms=50`.
    #[arg(long, requires = "api", value_parser = xcloud_vmm::extension::TenantPolicy::parse)]
    ext_policy: Option<xcloud_vmm::extension::TenantPolicy>,
    /// Fence the VM's protections (`ctl SOCK protect`, `receive --standby`) through etcd at
    /// these client URLs (comma-separated), so that a partition never runs it twice
    /// (docs/replication.md). Both ends of a protection name the same key.
    #[arg(long, requires_all = ["api", "fence_key"], value_delimiter = ',', value_name = "URL")]
    fence_etcd: Vec<String>,
    /// The fence's key in etcd, one per VM (e.g. /xcloud/fence/web).
    #[arg(long, requires = "fence_etcd")]
    fence_key: Option<String>,
}

impl ControlSocketArgs {
    /// The control socket asked for, with its fence connected.
    fn socket(&self) -> anyhow::Result<Option<run::ControlSocket>> {
        let Some(path) = self.api.clone() else {
            return Ok(None);
        };
        let fence = match &self.fence_key {
            Some(key) => Some(
                std::sync::Arc::new(xcloud_control::fence::EtcdFence::connect(&self.fence_etcd, key)?)
                    as std::sync::Arc<dyn xcloud_migration::Fence>,
            ),
            None => None,
        };
        Ok(Some(run::ControlSocket {
            path,
            watchdog: self.watchdog_ms.map(std::time::Duration::from_millis),
            ext_policy: self.ext_policy.clone().unwrap_or_default(),
            fence,
        }))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (a built-in name or a PVH ELF path) with its console on stdout.
    Run {
        /// Guest RAM, e.g. 64M or 1G.
        #[arg(long, default_value = "64M", value_parser = run::parse_size)]
        mem: u64,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// A raw disk image for a virtio-blk disk, `PATH` or `PATH,ro` (repeat for more).
        #[arg(long = "disk", value_name = "PATH[,ro]")]
        disks: Vec<xcloud_vmm::DiskSpec>,
        /// A virtio-net NIC on a TAP device (created if missing), `tap=NAME[,mac=MAC]` (repeat
        /// for more).
        #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
        nets: Vec<xcloud_vmm::NetSpec>,
        /// Built-in guest name (hello, heartbeat, dirty, micro, diskwrite, diskread, netrecv, httpd, gauge, kvclient, marker) or path to a PVH ELF.
        guest: String,
        /// Arguments passed to the guest on its command line.
        #[arg(last = true)]
        args: Vec<String>,
        #[command(flatten)]
        api: ControlSocketArgs,
    },
    /// An L2 overlay between hosts (a bridge and a VXLAN device, set up by rtnetlink): VMs
    /// whose NICs join it (`--net tap=T,bridge=NAME`) keep their MAC and IP when they move.
    Overlay {
        #[command(subcommand)]
        action: OverlayAction,
    },
    /// Continue a VM from a snapshot directory.
    Restore {
        /// The directory `xcloud ctl PATH snapshot DIR` wrote.
        dir: PathBuf,
        /// Run the guest at once and load its memory on demand (userfaultfd).
        #[arg(long)]
        lazy: bool,
        #[command(flatten)]
        api: ControlSocketArgs,
    },
    /// Receive a live-migrating VM and run it here.
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:7700.
        #[arg(long)]
        listen: String,
        /// This host's identity directory (`xcloud keygen`).
        #[arg(long)]
        identity: PathBuf,
        /// The source host's certificate (its identity's cert.der): the only one accepted.
        #[arg(long)]
        peer: PathBuf,
        #[command(flatten)]
        api: ControlSocketArgs,
        /// Copy the VM's disks into new images in this directory (named as at the source;
        /// an image already there is never overwritten). Without it a VM with disks is refused.
        #[arg(long)]
        disk_dir: Option<PathBuf>,
        /// Be the backup of a protected VM (`xcloud ctl SOCK protect`): hold its last
        /// checkpoint and run it from there only if the primary goes away.
        #[arg(long)]
        standby: bool,
    },
    /// Make this host's migration identity (a self-signed certificate and key) in DIR.
    Keygen {
        dir: PathBuf,
        /// The name in the certificate.
        #[arg(long, default_value = "xcloud-host")]
        name: String,
        /// Replace an identity that is there (every peer that pinned its certificate must pin
        /// the new one).
        #[arg(long)]
        force: bool,
    },
    /// Drive a running VMM through its control socket.
    Ctl {
        /// The VMM's control socket (`xcloud run --api PATH`).
        socket: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// List the built-in guests.
    Guests,
    /// Try things out on this machine (needs root).
    Lab {
        #[command(subcommand)]
        what: LabCommand,
    },
    /// Report what virtualization this host offers and what guests can run here, with measured costs.
    Doctor,
    /// Benchmarks that print their figures as a table, with targets.
    #[command(subcommand)]
    Bench(BenchCommand),
    #[command(flatten)]
    Cloud(Box<xcloud::cloud::CloudCommand>),
    /// Run a VMM jailed (namespaces, root = DIR, an unprivileged uid, seccomp); xcloudd
    /// starts every VMM this way when it runs as root.
    #[command(hide = true)]
    Jail {
        /// The VM's directory, the VMM's root.
        #[arg(long)]
        root: PathBuf,
        /// The uid to run as.
        #[arg(long)]
        uid: u32,
        /// The gid to run as.
        #[arg(long)]
        gid: u32,
        /// The VMM's command line: `run ...` or `restore ...`.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// A three-host cluster: etcd and an xcloudd per host, each host its own network
    /// namespace (two hosts at provider alpha, one at beta), until Ctrl-C.
    Cluster {
        /// Where etcd's data and the hosts' data go (emptied first).
        #[arg(long, default_value = "/tmp/xcloud-lab")]
        dir: PathBuf,
        /// Seconds a dead host stays registered before its VMs are given to others.
        #[arg(long, default_value_t = 5)]
        lease_ttl: u32,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Print the VM's state.
    Status,
    /// Stop every vCPU.
    Pause,
    /// Let every vCPU run again.
    Resume,
    /// Write a snapshot of the VM into DIR.
    Snapshot { dir: PathBuf },
    /// Stop the VM.
    Stop,
    /// Arm or renew the controller's watchdog: the VM is paused unless renewed within MS
    /// milliseconds (0 disarms it).
    Watchdog { ms: u64 },
    /// The VM's extension modules (docs/extensions.md).
    Ext {
        #[command(subcommand)]
        action: ExtAction,
    },
    /// Live-migrate the VM to a destination running `xcloud receive`.
    Migrate {
        /// The destination, HOST:PORT.
        to: String,
        /// This host's identity directory (`xcloud keygen`).
        #[arg(long)]
        identity: PathBuf,
        /// The destination's certificate: the only one accepted.
        #[arg(long)]
        peer: PathBuf,
        /// Downtime budget in milliseconds.
        #[arg(long, default_value_t = 50)]
        max_downtime: u64,
        /// Milliseconds the destination may stay silent before the migration fails.
        #[arg(long, default_value_t = 30_000)]
        timeout: u64,
        /// Converge by post-copy: if pre-copy cannot catch up with the guest, hand the VM over
        /// and send the pages left after (the destination runs it meanwhile, asking for pages
        /// it touches before they arrive) instead of throttling the guest.
        #[arg(long, conflicts_with = "postcopy_now")]
        postcopy: bool,
        /// Post-copy at once: hand the VM over first and send all of its memory after.
        #[arg(long)]
        postcopy_now: bool,
        /// Compress page frames with LZ4 (worth it on slow links).
        #[arg(long)]
        compress: bool,
    },
    /// Replicate the VM continuously to a backup running `xcloud receive --standby`, which
    /// takes over from the last checkpoint if this host goes away (docs/replication.md).
    Protect {
        /// The backup, HOST:PORT.
        to: String,
        /// This host's identity directory (`xcloud keygen`).
        #[arg(long)]
        identity: PathBuf,
        /// The backup's certificate: the only one accepted.
        #[arg(long)]
        peer: PathBuf,
        /// Milliseconds between checkpoints.
        #[arg(long, default_value_t = 25)]
        interval_ms: u64,
        /// Heartbeat interval in milliseconds: the backup takes over after two of silence.
        #[arg(long, default_value_t = 100)]
        heartbeat_ms: u64,
        /// Milliseconds the backup may leave checkpoints unacknowledged before it is given up
        /// (the VM then runs on unprotected).
        #[arg(long, default_value_t = 3000)]
        timeout: u64,
        /// Compress page frames with LZ4 (worth it on slow links).
        #[arg(long)]
        compress: bool,
    },
    /// End the replication: the backup lets the VM go.
    Unprotect,
}

#[derive(Subcommand)]
enum ExtAction {
    /// Install a module (WebAssembly, or its text form) into the running VM.
    Add {
        /// The module's file (the VMM reads it).
        file: PathBuf,
        /// Its name in this VM.
        #[arg(long)]
        name: String,
        /// Its version.
        #[arg(long)]
        version: Option<String>,
        /// The ports it serves, FIRST+COUNT in the extension window, e.g. 0x5000+16.
        #[arg(long, value_parser = xcloud_api::extensions::parse_ports)]
        ports: Option<(u16, u16)>,
    },
    /// List the modules: calls, time spent, failures, why one is disabled.
    Ls,
    /// Remove a module.
    Rm { name: String },
}

#[derive(Subcommand)]
enum OverlayAction {
    /// Creates (or extends) the overlay on this host.
    Up {
        /// The bridge's name (the VXLAN device is NAME-vx).
        name: String,
        /// The VXLAN network identifier, the same on every host of the overlay.
        #[arg(long)]
        vni: u32,
        /// This host's address on the network between the hosts.
        #[arg(long)]
        local: std::net::Ipv4Addr,
        /// Another host of the overlay (repeat for each).
        #[arg(long = "peer")]
        peers: Vec<std::net::Ipv4Addr>,
        /// The UDP port of VXLAN.
        #[arg(long, default_value_t = xcloud_vmm::hostnet::VXLAN_PORT)]
        port: u16,
    },
    /// Removes the overlay from this host.
    Down {
        /// The bridge's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Snapshot a guest, then restore it eagerly and lazily.
    Snapshot {
        /// Guest RAM.
        #[arg(long, default_value = "1G", value_parser = run::parse_size)]
        mem: u64,
        /// MiB of it the guest keeps touched.
        #[arg(long, default_value_t = 512)]
        working_set: u64,
    },
    /// Continuous replication (high availability) over a veth and an emulated 1 Gbit/s WAN:
    /// checkpoints per second, the guest's slowdown against the same guest unprotected,
    /// failover time, the latency output commit adds to a request (needs root).
    Ha {
        /// Guest RAM.
        #[arg(long, default_value = "1G", value_parser = run::parse_size)]
        mem: u64,
        /// MiB the guest writes, round and round.
        #[arg(long, default_value_t = 256)]
        working_set: u64,
        /// How fast it writes them, MiB/s.
        #[arg(long, default_value_t = 16)]
        rate: u64,
        /// Milliseconds between checkpoints.
        #[arg(long, default_value_t = 25)]
        interval_ms: u64,
        /// Heartbeat interval in milliseconds.
        #[arg(long, default_value_t = 100)]
        heartbeat_ms: u64,
        /// Seconds each run is measured.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Runs per link (protected and unprotected each).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Live migration over loopback or an emulated WAN: total time, downtime, guest-observed
    /// stall, bytes.
    Migrate {
        /// Guest sizes, e.g. 256M,1G.
        #[arg(long, default_value = "256M,1G", value_parser = xcloud::bench_migrate::parse_sizes)]
        sizes: std::vec::Vec<u64>,
        /// Working sets: hot (64 MiB touched), full (7/8 of the guest, at most 256 MiB).
        #[arg(long, default_value = "hot,full", value_parser = xcloud::bench_migrate::parse_sets)]
        sets: std::vec::Vec<xcloud::bench_migrate::WorkingSet>,
        /// Dirtying rates in MiB/s.
        #[arg(long, default_value = "0,16,64", value_parser = xcloud::bench_migrate::parse_rates)]
        rates: std::vec::Vec<u64>,
        /// Runs per cell (xcloud and tuned QEMU each).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Skip the QEMU comparison.
        #[arg(long)]
        no_qemu: bool,
        /// Migrate between two network namespaces over a link of this rate each way (e.g.
        /// 1gbit) instead of loopback (needs root).
        #[arg(long, value_parser = xcloud::netlab::parse_rate)]
        wan: Option<u64>,
        /// The WAN link's round-trip time in milliseconds (0: a plain veth link).
        #[arg(long, default_value_t = 20, requires = "wan")]
        rtt_ms: u64,
        /// xcloud converges by post-copy (`ctl migrate --postcopy`) instead of throttling.
        #[arg(long)]
        postcopy: bool,
        /// Also migrate each cell with this tenant module installed on the source (a migration
        /// policy such as extensions/hot-last.wat), alternating with runs without it, and
        /// compare the two.
        #[arg(long)]
        ext: Option<PathBuf>,
    },
    /// The seed paper's dd: a guest writes to a virtio disk and flushes, vs dd on the host.
    Disk {
        /// Bytes each side writes (the seed paper: 1.6 GB).
        #[arg(long, default_value = "1600M", value_parser = run::parse_size)]
        bytes: u64,
        /// Runs of each side (alternating).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Directory for the files (the filesystem under test).
        #[arg(long, default_value = "/var/tmp")]
        dir: PathBuf,
        /// Requests the guest keeps in flight.
        #[arg(long, default_value_t = 8)]
        depth: usize,
        /// Compare the host-side ways to issue the writes (one thread, a pool, io_uring)
        /// instead of guest vs dd.
        #[arg(long)]
        backends: bool,
    },
    /// TCP receive into a guest (virtio-net, smoltcp) vs TCP over the host's loopback.
    Net {
        /// Bytes per connection.
        #[arg(long, default_value = "512M", value_parser = run::parse_size)]
        bytes: u64,
        /// Runs of each side (alternating).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Tenant extensions: a Wasm module's hook calls, port-I/O round trips from a guest and a
    /// packet filter's cost to TCP throughput, each against the same logic in native Rust.
    Ext {
        /// Hook calls per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        calls: u64,
        /// Rounds of 4096 keys the guest stores and reads back.
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        /// Bytes per TCP connection.
        #[arg(long, default_value = "256M", value_parser = run::parse_size)]
        bytes: u64,
        /// Runs of each side (alternating).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// HTTP request rate and latency of the httpd guest under wrk vs a host-native server.
    Httpd {
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Connections wrk keeps open.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Runs of each side (alternating).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The control plane on a lab cluster: API latency under load (cluster vs alone), VM
    /// creation rate (API vs xcloud run), and a drain of busy guests (vs one migrated alone).
    Api {
        /// VMs created for the creation rate (at most 8 at once fit a two-CPU host).
        #[arg(long, default_value_t = 8)]
        create: usize,
        /// Busy VMs on the drained host (at most 8: two CPUs, four vCPUs each).
        #[arg(long, default_value_t = 8)]
        drain: usize,
        /// Seconds of load per latency figure.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// wrk's connections.
        #[arg(long, default_value_t = 16)]
        connections: u32,
    },
    /// CPU fairness of VMMs jailed by xcloudd: weights 1:3 on one core, and a CPU cap.
    Fair {
        /// Seconds per window.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Windows.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The capped VM's cap, in percent of one CPU.
        #[arg(long, default_value_t = 30)]
        cap: u32,
    },
    /// Basic operations native vs in a guest, start time, VMM memory overhead.
    Micro {
        /// Multiplies the iteration counts (longer, steadier runs).
        #[arg(long, default_value_t = 1)]
        scale: u64,
        /// How many times to measure the start time.
        #[arg(long, default_value_t = 10)]
        startup_runs: usize,
    },
}

/// `xcloud ctl`: one request, its answer on stdout; a refused request fails the command.
fn ctl(socket: &std::path::Path, action: CtlAction) -> anyhow::Result<i32> {
    use xcloud_api::{call, Command as Op};
    let op = match action {
        CtlAction::Status => Op::Status,
        CtlAction::Pause => Op::Pause,
        CtlAction::Resume => Op::Resume,
        CtlAction::Snapshot { dir } => Op::Snapshot {
            dir: std::path::absolute(&dir)?,
        },
        CtlAction::Stop => Op::Stop,
        CtlAction::Watchdog { ms } => Op::Watchdog { ms },
        CtlAction::Ext {
            action:
                ExtAction::Add {
                    file,
                    name,
                    version,
                    ports,
                },
        } => Op::ExtAdd {
            file: std::path::absolute(&file)?,
            name,
            version,
            port_base: ports.map(|p| p.0),
            port_count: ports.map(|p| p.1),
        },
        CtlAction::Protect {
            to,
            identity,
            peer,
            interval_ms,
            heartbeat_ms,
            timeout,
            compress,
        } => Op::Protect {
            to,
            identity: std::path::absolute(&identity)?,
            peer_cert: std::path::absolute(&peer)?,
            interval_ms: Some(interval_ms),
            heartbeat_ms: Some(heartbeat_ms),
            timeout_ms: Some(timeout),
            compress,
        },
        CtlAction::Unprotect => Op::Unprotect,
        CtlAction::Ext { action: ExtAction::Ls } => Op::ExtList,
        CtlAction::Ext {
            action: ExtAction::Rm { name },
        } => Op::ExtRemove { name },
        CtlAction::Migrate {
            to,
            identity,
            peer,
            max_downtime,
            timeout,
            postcopy,
            postcopy_now,
            compress,
        } => {
            return run::migrate(
                socket,
                to,
                std::path::absolute(&identity)?,
                std::path::absolute(&peer)?,
                run::MigrateFlags {
                    max_downtime_ms: max_downtime,
                    timeout_ms: timeout,
                    postcopy: match (postcopy, postcopy_now) {
                        (_, true) => PostcopyMode::Now,
                        (true, false) => PostcopyMode::Converge,
                        (false, false) => PostcopyMode::Off,
                    },
                    compress,
                },
            )
        }
    };
    let answer = call(socket, op)?;
    if !answer.ok {
        anyhow::bail!("{}", answer.error.unwrap_or_else(|| "the VMM refused".into()));
    }
    if let Some(modules) = &answer.extensions {
        println!("NAME  VERSION  ORIGIN  PORTS  CALLS  BUSY_US  FAILURES  STATE  DIGEST");
        for m in modules {
            let ports = m.ports.map_or("-".to_string(), |(b, c)| format!("{b:#x}+{c}"));
            let state = m
                .disabled
                .as_deref()
                .map_or("enabled".to_string(), |why| format!("disabled: {why}"));
            println!(
                "{}  {}  {}  {ports}  {}  {}  {}  {state}  {}",
                m.name,
                m.version,
                m.origin,
                m.calls,
                m.busy_us,
                m.failures,
                m.digest.get(..12).unwrap_or(&m.digest)
            );
            if !m.metrics.is_empty() {
                let figures: Vec<String> = m
                    .metrics
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                println!("    {}", figures.join(" "));
            }
        }
        return Ok(0);
    }
    let mut line = format!("state: {}", answer.state.as_deref().unwrap_or("unknown"));
    if let (Some(vcpus), Some(mem)) = (answer.vcpus, answer.mem_bytes) {
        line.push_str(&format!(", {vcpus} vCPUs, {} MiB", mem >> 20));
    }
    if let (Some(pages), Some(bytes)) = (answer.snapshot_pages, answer.snapshot_bytes) {
        line.push_str(&format!(
            ", snapshot: {pages} pages, {:.1} MiB written",
            bytes as f64 / (1 << 20) as f64
        ));
    }
    if let (Some(load), Some(age)) = (answer.guest_load, answer.guest_load_age_ms) {
        line.push_str(&format!(", guest load {load} ({:.1} s ago)", age as f64 / 1000.0));
    }
    if let Some(p) = answer.migration {
        line.push_str(&format!(", migrating: {}", run::describe_progress(&p)));
    }
    if let Some(p) = &answer.protection {
        line.push_str(&format!(", {}", run::describe_protection(p)));
    }
    if let Some(s) = &answer.standby {
        line.push_str(&format!(", {}", run::describe_standby(s)));
    }
    if answer.fenced == Some(true) {
        line.push_str(", paused by its watchdog");
    }
    println!("{line}");
    Ok(0)
}

fn main() -> ExitCode {
    xcloud::init_log(tracing_subscriber::filter::LevelFilter::WARN);
    // Tenant modules that snapshots and migrations carry load with this host's Wasm host.
    xcloud_extensions::register_loader();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            mem,
            vcpus,
            disks,
            nets,
            guest,
            args,
            api,
        } => api.socket().and_then(|socket| {
            run::run(
                xcloud_vmm::VmConfig {
                    mem_bytes: mem,
                    vcpus,
                    cmdline: args.join(" "),
                    disks,
                    nets,
                },
                &guest,
                socket.as_ref(),
            )
        }),
        Command::Restore { dir, lazy, api } => api
            .socket()
            .and_then(|socket| run::restore(&dir, lazy, socket.as_ref())),
        Command::Ctl { socket, action } => ctl(&socket, action),
        Command::Receive {
            listen,
            identity,
            peer,
            api,
            disk_dir,
            standby: true,
        } => api
            .socket()
            .and_then(|socket| run::stand_by(&listen, &identity, &peer, socket.as_ref(), disk_dir.as_deref())),
        Command::Receive {
            listen,
            identity,
            peer,
            api,
            disk_dir,
            standby: false,
        } => api.socket().and_then(|socket| {
            run::receive(
                &listen,
                &identity,
                &peer,
                socket.as_ref(),
                &xcloud_migration::ReceiveOptions { disk_dir },
            )
        }),
        Command::Overlay { action } => match action {
            OverlayAction::Up {
                name,
                vni,
                local,
                peers,
                port,
            } => xcloud_vmm::hostnet::overlay_up(&name, vni, local, port, &peers)
                .map(|o| {
                    println!(
                        "overlay {} up: VNI {vni}, {} via {local}, {} peers",
                        o.bridge,
                        o.vxlan,
                        peers.len()
                    );
                    0
                })
                .map_err(Into::into),
            OverlayAction::Down { name } => xcloud_vmm::hostnet::overlay_down(&name).map(|_| 0).map_err(Into::into),
        },
        Command::Keygen { dir, name, force } => xcloud_migration::tls::Identity::generate(&dir, &name, force)
            .map(|_| {
                println!(
                    "identity written to {} (give {} to the peer)",
                    dir.display(),
                    dir.join("cert.der").display()
                );
                0
            })
            .map_err(Into::into),
        Command::Bench(BenchCommand::Disk {
            bytes,
            runs,
            dir,
            depth,
            backends,
        }) => {
            let b = xcloud::bench_disk::DiskBench {
                bytes,
                runs,
                dir,
                depth,
            };
            if backends {
                xcloud::bench_disk::backends(&b)
            } else {
                xcloud::bench_disk::disk(&b)
            }
            .map(|_| 0)
        }
        Command::Bench(BenchCommand::Ext {
            calls,
            rounds,
            bytes,
            runs,
        }) => xcloud::bench_ext::ext(&xcloud::bench_ext::ExtBench {
            calls,
            rounds,
            bytes,
            runs,
        })
        .map(|_| 0),
        Command::Bench(BenchCommand::Net { bytes, runs }) => {
            xcloud::bench_net::net(&xcloud::bench_net::NetBench { bytes, runs }).map(|_| 0)
        }
        Command::Bench(BenchCommand::Httpd {
            seconds,
            connections,
            runs,
        }) => xcloud::bench_http::httpd(&xcloud::bench_http::HttpBench {
            seconds,
            connections,
            runs,
        })
        .map(|_| 0),
        Command::Bench(BenchCommand::Api {
            create,
            drain,
            seconds,
            connections,
        }) => xcloud::bench_api::api(&xcloud::bench_api::ApiBench {
            create,
            drain,
            seconds,
            connections,
        })
        .map(|_| 0),
        Command::Bench(BenchCommand::Fair { seconds, runs, cap }) => {
            xcloud::bench_fair::fair(&xcloud::bench_fair::FairBench { seconds, runs, cap }).map(|_| 0)
        }
        Command::Bench(BenchCommand::Micro { scale, startup_runs }) => bench::micro(scale, startup_runs).map(|_| 0),
        Command::Bench(BenchCommand::Migrate {
            sizes,
            sets,
            rates,
            runs,
            no_qemu,
            wan,
            rtt_ms,
            postcopy,
            ext,
        }) => {
            let link = wan.map(|rate| xcloud::netlab::LinkSpec::wan(rate, Duration::from_millis(rtt_ms)));
            let mode = if postcopy {
                PostcopyMode::Converge
            } else {
                PostcopyMode::Off
            };
            xcloud::bench_migrate::migrate(&xcloud::bench_migrate::MigrateBench {
                sizes,
                sets,
                rates,
                runs,
                with_qemu: !no_qemu,
                wan_link: link,
                postcopy: mode,
                ext,
            })
            .map(|_| 0)
        }
        Command::Bench(BenchCommand::Ha {
            mem,
            working_set,
            rate,
            interval_ms,
            heartbeat_ms,
            seconds,
            runs,
        }) => xcloud::bench_ha::ha(&xcloud::bench_ha::HaBench {
            mem,
            set_mib: working_set,
            rate,
            interval_ms,
            heartbeat_ms,
            seconds,
            runs,
        })
        .map(|_| 0),
        Command::Bench(BenchCommand::Snapshot { mem, working_set }) => {
            xcloud::bench_snapshot::snapshot(mem, working_set).map(|_| 0)
        }
        Command::Doctor => doctor::doctor(),
        Command::Cloud(command) => xcloud::cloud::run(*command),
        Command::Jail { root, uid, gid, args } => xcloud::jail::jail(&xcloud::jail::JailSpec { root, uid, gid, args }),
        Command::Lab {
            what: LabCommand::Cluster { dir, lease_ttl },
        } => xcloud::lab::run_cluster(&dir, lease_ttl).map(|()| 0),
        Command::Guests => {
            for name in guests::names() {
                println!("{name}");
            }
            Ok(0)
        }
    };
    match result {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("xcloud: {e:#}");
            ExitCode::from(xcloud::exit::of(&e))
        }
    }
}
