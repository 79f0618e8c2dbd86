//! `xcloudd`: the control plane of one host. Alone it needs no flags: state, images and VMs
//! under /var/lib/xcloud, the API on /var/lib/xcloud/xcloudd.sock (docs/cloud-api.md).

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "xcloudd", version, about = "The xcloud control plane daemon of one host")]
struct Args {
    /// Where state, images, VM files and snapshots live.
    #[arg(long, default_value = "/var/lib/xcloud")]
    data: PathBuf,
    /// The API's Unix socket (default: DATA/xcloudd.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The `xcloud` binary that runs each VM (default: the one beside xcloudd).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// This host's name (default: the kernel's host name).
    #[arg(long)]
    host: Option<String>,
    /// The provider this host is rented from.
    #[arg(long, default_value = "local")]
    provider: String,
    /// The provider's region.
    #[arg(long, default_value = "local")]
    region: String,
    /// What an hour of this host costs.
    #[arg(long, default_value_t = 0.0)]
    price_per_hour: f64,
    /// Run VMMs without their jail (namespaces, uid, seccomp), as xcloudd does when not root.
    #[arg(long)]
    no_jail: bool,
    /// Also serve the API over TCP with TLS on this address, e.g. 0.0.0.0:7443.
    #[arg(long, requires = "identity")]
    tls_listen: Option<String>,
    /// This host's identity directory (`xcloud keygen`) for TLS: clients pin its cert.der.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Cluster mode: etcd's client URL(s), comma-separated. Records live in etcd, the host
    /// registers under a lease, one daemon schedules. Needs --tls-listen and --identity.
    #[arg(long, value_delimiter = ',', requires_all = ["tls_listen", "identity"])]
    etcd: Vec<String>,
    /// The key prefix of this cloud in etcd (several clouds can share one etcd).
    #[arg(long, default_value = "/xcloud/v1")]
    etcd_prefix: String,
    /// Seconds this host stays registered after it stops renewing its lease: how soon its VMs
    /// are restarted elsewhere when it dies.
    #[arg(long, default_value_t = 10)]
    lease_ttl: i64,
    /// Where other hosts reach this one's API (default: --tls-listen's address).
    #[arg(long)]
    advertise: Option<String>,
    /// Follow prices: while this daemon is the scheduler, move running VMs live to hosts where
    /// their CPUs cost more than this share less (e.g. 0.2), one at a time.
    #[arg(long, requires = "etcd")]
    replace_threshold: Option<f64>,
    /// How many hosts that are up should hold a copy of each snapshot (the host it was taken
    /// on counts), so that a VM whose host is lost starts again from its latest snapshot.
    #[arg(long, default_value_t = xcloud_control::snapshots::DEFAULT_HOLDERS, requires = "etcd",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16))]
    snapshot_holders: usize,
    /// Seconds between meter readings of this host's VMs (usage is counted to the second
    /// whatever this is; a report reads this host's VMs first).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    meter_seconds: u64,
    /// Seconds between the autoscaler's looks at the groups (it reads CPU over this time).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    autoscale_seconds: u64,
    /// Days usage records are kept.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..))]
    usage_days: u64,
    /// What tenants' extension modules may do in this host's VMs (docs/extensions.md), e.g.
    /// `packets=no,guest-read=0`; given to every VMM.
    #[arg(long, value_parser = check_ext_policy)]
    ext_policy: Option<String>,
}

/// The policy as given, once the VMM would take it.
fn check_ext_policy(text: &str) -> Result<String, String> {
    xcloud_vmm::extension::TenantPolicy::parse(text).map(|_| text.to_string())
}

fn config(args: &Args) -> anyhow::Result<xcloud_control::Config> {
    std::fs::create_dir_all(&args.data)?;
    let data_dir = std::fs::canonicalize(&args.data)?;
    let vmm_binary = match &args.vmm {
        Some(p) => std::path::absolute(p)?,
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("xcloud"))
            .ok_or_else(|| anyhow::anyhow!("cannot tell where xcloudd is: give --vmm"))?,
    };
    if !vmm_binary.is_file() {
        anyhow::bail!("the VMM binary {} is missing: give --vmm", vmm_binary.display());
    }
    Ok(xcloud_control::Config {
        data_dir,
        vmm_binary,
        host_name: args.host.clone().unwrap_or_else(xcloud_control::host::hostname),
        provider: args.provider.clone(),
        region: args.region.clone(),
        price_per_hour: args.price_per_hour,
        // SAFETY: geteuid has no preconditions.
        jail: !args.no_jail && unsafe { libc::geteuid() } == 0,
        meter_period: std::time::Duration::from_secs(args.meter_seconds),
        usage_days: args.usage_days,
        autoscale_period: std::time::Duration::from_secs(args.autoscale_seconds),
        ext_policy: args.ext_policy.clone(),
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("xcloudd: stopping (VMs keep running)");
}

fn main() -> ExitCode {
    xcloud::init_log(tracing_subscriber::filter::LevelFilter::INFO);
    let args = Args::parse();
    let result = config(&args).and_then(|config| {
        let socket = args
            .socket
            .clone()
            .unwrap_or_else(|| config.data_dir.join("xcloudd.sock"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let tls = match (&args.tls_listen, &args.identity) {
            (Some(listen), Some(identity)) => Some(xcloud_control::TlsOptions {
                listen: listen.clone(),
                identity: identity.clone(),
            }),
            _ => None,
        };
        let cluster = if args.etcd.is_empty() {
            None
        } else {
            let advertise = args
                .advertise
                .clone()
                .or_else(|| args.tls_listen.clone())
                .unwrap_or_default();
            if advertise.starts_with("0.0.0.0") || advertise.starts_with("[::]") {
                anyhow::bail!("--tls-listen {advertise} is no address other hosts can reach: give --advertise");
            }
            Some(xcloud_control::cluster::ClusterConfig {
                etcd: args.etcd.clone(),
                prefix: args.etcd_prefix.clone(),
                lease_ttl: args.lease_ttl.max(2),
                advertise,
                replace_threshold: args.replace_threshold.filter(|t| (0.0..1.0).contains(t)),
                snapshot_holders: args.snapshot_holders,
            })
        };
        runtime.block_on(xcloud_control::serve(config, &socket, tls, cluster, shutdown_signal()))?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xcloudd: {e:#}");
            ExitCode::from(1)
        }
    }
}
