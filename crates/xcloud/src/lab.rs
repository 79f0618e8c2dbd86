//! A cluster on one machine: etcd, and an xcloudd per host, each host its own network
//! namespace on one bridge, so that every call between hosts crosses a real TCP connection
//! with TLS between two network stacks. `xcloud lab cluster` starts one for a newcomer to try
//! the cloud on; the cluster tests start the same (docs/cloud-api.md, "A cluster on one
//! machine").
//!
//! etcd runs in this namespace on the bridge's address; the hosts' daemons run in theirs.
//! Dropping the lab kills everything in its namespaces (daemons and VMMs), etcd, and removes
//! the namespaces and the bridge.

use crate::netlab::ip;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One host of a lab.
#[derive(Clone, Debug)]
pub struct HostSpec {
    /// Its name.
    pub name: String,
    /// The provider it stands for.
    pub provider: String,
    /// The provider's region.
    pub region: String,
    /// Its price per hour.
    pub price_per_hour: f64,
}

impl HostSpec {
    /// A host named `name` at `provider`/`region` costing `price_per_hour`.
    pub fn new(name: &str, provider: &str, region: &str, price_per_hour: f64) -> Self {
        Self {
            name: name.into(),
            provider: provider.into(),
            region: region.into(),
            price_per_hour,
        }
    }
}

/// The lab `xcloud lab cluster` starts by default: two hosts at one provider, one at another.
pub fn default_hosts() -> Vec<HostSpec> {
    vec![
        HostSpec::new("host-1", "alpha", "alpha-eu", 0.12),
        HostSpec::new("host-2", "alpha", "alpha-eu", 0.10),
        HostSpec::new("host-3", "beta", "beta-us", 0.08),
    ]
}

/// A host of a running lab.
pub struct LabHost {
    /// What it is.
    pub spec: HostSpec,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the bridge.
    pub ip: String,
    /// Its data directory.
    pub data: PathBuf,
    /// Its TLS identity directory (its `cert.der` is what clients pin).
    pub identity: PathBuf,
    daemon: Option<Child>,
    args: Vec<String>,
}

/// The port every host's API listens on (each host has its own address).
pub const API_PORT: u16 = 7443;

impl LabHost {
    /// `https://IP:PORT` of its API.
    pub fn endpoint(&self) -> String {
        format!("https://{}:{API_PORT}", self.ip)
    }

    /// Its certificate, to pin.
    pub fn cert(&self) -> PathBuf {
        self.identity.join("cert.der")
    }

    /// Starts its daemon (again) and waits for its API.
    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.join("xcloudd.log"))
            .context("opening the daemon's log")?;
        // nsenter joins only the network namespace; `ip netns exec` would also remount /sys,
        // hiding the cgroup hierarchies the daemon puts VMMs in.
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .arg("--")
            .args(&self.args)
            .env(
                "XCLOUD_LOG",
                std::env::var("XCLOUD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting xcloudd")?;
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let sock = self.data.join("xcloudd.sock");
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Some(status) = self.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "xcloudd on {} ended with {status}: see {}",
                    self.spec.name,
                    self.log().display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "xcloudd on {} did not start: see {}",
                    self.spec.name,
                    self.log().display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Its daemon's log.
    pub fn log(&self) -> PathBuf {
        self.data.join("xcloudd.log")
    }

    /// Kills its daemon only (its VMMs run on, as after a crash of xcloudd).
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills everything that runs in its namespace: the host is gone.
    pub fn kill_all(&mut self) {
        self.kill_daemon();
        for _ in 0..10 {
            let pids = ns_pids(&self.ns);
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill sends a signal to a process of this lab's own namespace.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The processes in network namespace `ns`.
pub fn ns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A running lab.
pub struct Lab {
    /// Its directory (etcd's data, the hosts' data and identities).
    pub dir: PathBuf,
    /// etcd's client URL.
    pub etcd_url: String,
    /// Its hosts.
    pub hosts: Vec<LabHost>,
    bridge: String,
    etcd: Option<Child>,
}

impl Lab {
    /// Starts etcd and one daemon per host in `dir` (emptied first). `xcloudd` is the daemon's
    /// binary; `lease_ttl` how many seconds a dead host stays registered.
    pub fn up(dir: &Path, hosts: &[HostSpec], xcloudd: &Path, lease_ttl: u32) -> Result<Self> {
        Self::up_with(dir, hosts, xcloudd, lease_ttl, &[])
    }

    /// As [`Lab::up`], every daemon also given `extra` flags.
    pub fn up_with(dir: &Path, hosts: &[HostSpec], xcloudd: &Path, lease_ttl: u32, extra: &[&str]) -> Result<Self> {
        if hosts.is_empty() || hosts.len() > 200 {
            bail!("a lab has 1 to 200 hosts");
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = std::fs::canonicalize(dir)?;
        // Names and addresses of its own, even beside another lab of this process or another.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 10;
        let pid = std::process::id() % 100_000;
        let tag = format!("{pid}{n}");
        let subnet = format!("10.{}.{}", 200 + (pid % 50), ((pid / 50) + n * 25) % 250);
        let mut lab = Self {
            etcd_url: format!("http://{subnet}.1:2379"),
            dir: dir.clone(),
            hosts: Vec::new(),
            bridge: format!("xclab{tag}"),
            etcd: None,
        };
        // From here on, Drop cleans up whatever was made.
        ip(&["link", "add", &lab.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &lab.bridge])?;
        ip(&["link", "set", &lab.bridge, "up"])?;
        lab.start_etcd(&format!("{subnet}.1"))?;
        for (i, spec) in hosts.iter().enumerate() {
            let ns = format!("xclab{tag}h{i}");
            let host_ip = format!("{subnet}.{}", 10 + i);
            let outer = format!("xcl{tag}v{i}");
            ip(&["netns", "add", &ns])?;
            let data = dir.join(&spec.name);
            let identity = data.join("identity");
            std::fs::create_dir_all(&data)?;
            lab.hosts.push(LabHost {
                spec: spec.clone(),
                ns: ns.clone(),
                ip: host_ip.clone(),
                data: data.clone(),
                identity: identity.clone(),
                daemon: None,
                args: Vec::new(),
            });
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &outer, "master", &lab.bridge, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{host_ip}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            xcloud_migration::tls::Identity::generate(&identity, &spec.name, true)
                .map_err(|e| anyhow::anyhow!("making {}'s identity: {e}", spec.name))?;
            let vmm = xcloudd.with_file_name("xcloud");
            let host = &mut lab.hosts[i];
            host.args = vec![
                xcloudd.display().to_string(),
                "--data".into(),
                data.display().to_string(),
                "--vmm".into(),
                vmm.display().to_string(),
                "--host".into(),
                spec.name.clone(),
                "--provider".into(),
                spec.provider.clone(),
                "--region".into(),
                spec.region.clone(),
                "--price-per-hour".into(),
                spec.price_per_hour.to_string(),
                "--tls-listen".into(),
                format!("{host_ip}:{API_PORT}"),
                "--identity".into(),
                identity.display().to_string(),
                "--etcd".into(),
                lab.etcd_url.clone(),
                "--lease-ttl".into(),
                lease_ttl.to_string(),
            ];
            host.args.extend(extra.iter().map(|a| a.to_string()));
            // The first host makes the admin tenant; the others find it.
            host.start()?;
        }
        Ok(lab)
    }

    fn start_etcd(&mut self, addr: &str) -> Result<()> {
        let data = self.dir.join("etcd");
        let log = std::fs::File::create(self.dir.join("etcd.log"))?;
        let child = Command::new("etcd")
            .arg("--name")
            .arg("lab")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&self.etcd_url)
            .arg("--advertise-client-urls")
            .arg(&self.etcd_url)
            .arg("--listen-peer-urls")
            .arg(format!("http://{addr}:2380"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{addr}:2380"))
            .arg("--initial-cluster")
            .arg(format!("lab=http://{addr}:2380"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start etcd (Debian's etcd-server: scripts/setup installs it)")?;
        self.etcd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(format!("{addr}:2379")).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "etcd did not listen on {addr}:2379: see {}",
                    self.dir.join("etcd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The admin key the first host wrote.
    pub fn admin_key(&self) -> Result<String> {
        let first = self.hosts.first().context("a lab has hosts")?;
        let path = first.data.join("admin.key");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string())
    }

    /// Kills etcd's process (the cloud's records are then out of reach).
    fn stop_etcd(&mut self) {
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            host.kill_all();
            let _ = ip(&["netns", "del", &host.ns]);
        }
        self.stop_etcd();
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// `xcloud lab cluster`: starts a lab and keeps it until Ctrl-C, saying how to use it.
pub fn run_cluster(dir: &Path, lease_ttl: u32) -> Result<()> {
    let xcloudd = std::env::current_exe()?
        .parent()
        .map(|d| d.join("xcloudd"))
        .context("cannot tell where xcloud is")?;
    if !xcloudd.is_file() {
        bail!("{} is missing: build it (cargo build --release)", xcloudd.display());
    }
    let lab = Lab::up(dir, &default_hosts(), &xcloudd, lease_ttl)?;
    let first = &lab.hosts[0];
    println!("etcd: {}", lab.etcd_url);
    for h in &lab.hosts {
        println!(
            "{}: {} provider {} region {} at {}/h, namespace {} (log {})",
            h.spec.name,
            h.endpoint(),
            h.spec.provider,
            h.spec.region,
            h.spec.price_per_hour,
            h.ns,
            h.log().display()
        );
    }
    println!();
    println!("To use it (any host answers for the whole cloud):");
    println!("  export XCLOUD_URL={}", first.endpoint());
    println!("  export XCLOUD_SERVER_CERT={}", first.cert().display());
    println!(
        "  export XCLOUD_TOKEN=$(cat {})",
        first.data.join("admin.key").display()
    );
    println!("  xcloud hosts; xcloud image push heartbeat; xcloud vm create web heartbeat");
    println!();
    println!("Ctrl-C ends the lab (its VMs, daemons, etcd and namespaces).");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<(), std::io::Error>(())
    })?;
    drop(lab);
    println!("lab ended");
    Ok(())
}
