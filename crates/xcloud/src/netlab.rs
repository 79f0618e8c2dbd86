//! "Other hosts" on one machine: two network namespaces, each its own network stack, joined by
//! a link that can stand for a WAN between two providers. The migration tests and `xcloud bench
//! migrate --wan` run the source VMM in one namespace and the destination in the other, so
//! every byte crosses a real TCP connection between two stacks.
//!
//! A plain link is a veth pair (optionally rate-limited by the kernel's tbf qdisc). A WAN link
//! also has a delay; this kernel has no `netem` qdisc (nor `fq`, which could delay by departure
//! time), so a delayed link is two TUN devices, one per namespace, with a relay in this process
//! between them: every IP packet waits its one-way delay, then leaves no faster than the link
//! rate, and the relay drops packets when its queue is full (twice the bandwidth-delay product),
//! as a router would. TCP in both namespaces sees the round trip, the rate and the losses.

use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What joins the two namespaces.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkSpec {
    /// Bits per second each way; None: as fast as the machine goes.
    pub rate_bits: Option<u64>,
    /// Added to every packet each way (the round trip grows by twice this).
    pub one_way_delay: Duration,
}

impl LinkSpec {
    /// A WAN between providers: `rate_bits` each way and `rtt` round trip.
    pub fn wan(rate_bits: u64, rtt: Duration) -> Self {
        Self {
            rate_bits: Some(rate_bits),
            one_way_delay: rtt / 2,
        }
    }

    /// The link in words ("1 Gbit/s, 20 ms RTT").
    pub fn describe(&self) -> String {
        let rate = self.rate_bits.map_or("unlimited".into(), format_rate);
        if self.one_way_delay.is_zero() {
            format!("{rate} veth link")
        } else {
            format!("{rate} link with {} ms RTT", (self.one_way_delay * 2).as_millis())
        }
    }
}

fn format_rate(bits: u64) -> String {
    match bits {
        b if b >= 1_000_000_000 && b % 1_000_000_000 == 0 => format!("{} Gbit/s", b / 1_000_000_000),
        b if b >= 1_000_000 => format!("{} Mbit/s", b / 1_000_000),
        b => format!("{b} bit/s"),
    }
}

/// Parses a rate like "1gbit", "200mbit" or "500kbit" into bits per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (digits, unit) = lower.split_at(lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a rate like 1gbit"))?;
    let scale = match unit {
        "gbit" => 1_000_000_000,
        "mbit" => 1_000_000,
        "kbit" => 1_000,
        "bit" | "" => 1,
        _ => return Err(format!("'{text}': the unit must be gbit, mbit, kbit or bit")),
    };
    match n.checked_mul(scale) {
        Some(bits) if bits > 0 => Ok(bits),
        _ => Err(format!("'{text}' is not a usable rate")),
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, `src` (at `src_ip`) and `dst` (at `dst_ip`), joined by one link. Dropping it
/// removes both namespaces and stops the relay.
pub struct Hosts {
    /// The source host's namespace.
    pub src: String,
    /// The destination host's namespace.
    pub dst: String,
    /// The source host's address.
    pub src_ip: String,
    /// The destination host's address.
    pub dst_ip: String,
    /// The link between them.
    pub link: LinkSpec,
    src_dev: String,
    tag: String,
    relay: Option<Relay>,
}

/// A command that runs `program` inside network namespace `ns` (`ip netns exec`), or here.
pub fn command_in(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// `ip ARGS` (iproute2), which must succeed: how the benchmarks and tests set up their hosts
/// (the product configures host networking through rtnetlink, never with `ip`).
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Hosts {
    /// Makes the namespaces and the link (needs root).
    pub fn new(link: LinkSpec) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}x{n}", std::process::id());
        let mut hosts = Self {
            src: format!("xc{tag}s"),
            dst: format!("xc{tag}d"),
            src_ip: "10.231.0.1".into(),
            dst_ip: "10.231.0.2".into(),
            link,
            src_dev: format!("xc{tag}s"),
            tag: tag.clone(),
            relay: None,
        };
        // From here on, Drop cleans up whatever was made.
        ip(&["netns", "add", &hosts.src])?;
        ip(&["netns", "add", &hosts.dst])?;
        let dst_dev = format!("xc{tag}d");
        if link.one_way_delay.is_zero() {
            ip(&[
                "link",
                "add",
                &hosts.src_dev,
                "netns",
                &hosts.src,
                "type",
                "veth",
                "peer",
                "name",
                &dst_dev,
                "netns",
                &hosts.dst,
            ])?;
            for (ns, dev, addr) in [
                (&hosts.src, &hosts.src_dev, &hosts.src_ip),
                (&hosts.dst, &dst_dev, &hosts.dst_ip),
            ] {
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                if let Some(rate) = link.rate_bits {
                    let rate = format!("{rate}bit");
                    ip(&[
                        "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                        "256kb", "latency", "50ms",
                    ])?;
                }
            }
        } else {
            let src_tun = open_tun_in(&hosts.src, &hosts.src_dev)?;
            let dst_tun = open_tun_in(&hosts.dst, &dst_dev)?;
            for (ns, dev, addr, peer) in [
                (&hosts.src, &hosts.src_dev, &hosts.src_ip, &hosts.dst_ip),
                (&hosts.dst, &dst_dev, &hosts.dst_ip, &hosts.src_ip),
            ] {
                ip(&["-n", ns, "addr", "add", addr, "peer", peer, "dev", dev])?;
                ip(&["-n", ns, "link", "set", dev, "mtu", "1500", "up"])?;
            }
            hosts.relay = Some(Relay::start(src_tun, dst_tun, link)?);
        }
        for ns in [&hosts.src, &hosts.dst] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// Takes the source's end of the link down: from then on nothing crosses, as when a
    /// provider's network fails.
    pub fn cut(&self) -> Result<()> {
        ip(&["-n", &self.src, "link", "set", &self.src_dev, "down"])
    }

    /// Brings the source's end of the link up again after [`Hosts::cut`].
    pub fn heal(&self) -> Result<()> {
        ip(&["-n", &self.src, "link", "set", &self.src_dev, "up"])
    }

    /// Adds a third host that both hosts reach over links of their own, not over theirs: where
    /// a store both consult runs (a fence's etcd), so that cutting the hosts' link leaves each
    /// able to ask it.
    pub fn add_witness(&self) -> Result<Witness> {
        let witness = Witness {
            ns: format!("xc{}w", self.tag),
            ip_from_src: "10.232.1.2".into(),
            ip_from_dst: "10.232.2.2".into(),
            ends: Vec::new(),
        };
        ip(&["netns", "add", &witness.ns])?;
        let mut witness = witness;
        for (side, host_ip, witness_ip, letter) in [
            (&self.src, "10.232.1.1", witness.ip_from_src.clone(), 's'),
            (&self.dst, "10.232.2.1", witness.ip_from_dst.clone(), 'd'),
        ] {
            let host_dev = format!("xc{}w{letter}", self.tag);
            let witness_dev = format!("xc{}{letter}w", self.tag);
            ip(&[
                "link",
                "add",
                &host_dev,
                "netns",
                side,
                "type",
                "veth",
                "peer",
                "name",
                &witness_dev,
                "netns",
                &witness.ns,
            ])?;
            ip(&["-n", side, "addr", "add", &format!("{host_ip}/24"), "dev", &host_dev])?;
            ip(&[
                "-n",
                &witness.ns,
                "addr",
                "add",
                &format!("{witness_ip}/24"),
                "dev",
                &witness_dev,
            ])?;
            ip(&["-n", side, "link", "set", &host_dev, "up"])?;
            ip(&["-n", &witness.ns, "link", "set", &witness_dev, "up"])?;
            witness.ends.push((side.clone(), witness_dev));
        }
        ip(&["-n", &witness.ns, "link", "set", "lo", "up"])?;
        Ok(witness)
    }

    /// Runs `f` on a new thread that has joined namespace `ns` (sockets it opens live there).
    pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> JoinHandle<Result<T>> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            enter_ns(&path)?;
            f()
        })
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // The relay's threads go first; closing its descriptors removes the TUN devices.
        self.relay.take();
        let _ = Command::new("ip").args(["netns", "del", &self.src]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.dst]).status();
    }
}

/// A third host joined to both of [`Hosts`] by links of their own. Dropping it removes its
/// namespace (and so its links).
pub struct Witness {
    /// Its namespace.
    pub ns: String,
    /// Its address as the source host reaches it.
    pub ip_from_src: String,
    /// Its address as the destination host reaches it.
    pub ip_from_dst: String,
    /// For each host's namespace, the witness's end of the link to it.
    ends: Vec<(String, String)>,
}

impl Witness {
    /// Takes the link between the witness and the host in namespace `side` down (`up`: false)
    /// or up again.
    pub fn link_to(&self, side: &str, up: bool) -> Result<()> {
        let Some((_, dev)) = self.ends.iter().find(|(ns, _)| ns == side) else {
            bail!("the witness has no link to {side}");
        };
        ip(&["-n", &self.ns, "link", "set", dev, if up { "up" } else { "down" }])
    }
}

/// etcd (Debian's etcd-server) on a [`Witness`], listening where each host reaches it;
/// killed when dropped.
pub struct WitnessEtcd {
    child: std::process::Child,
    /// Its client URL as the source host reaches it.
    pub url_from_src: String,
    /// Its client URL as the destination host reaches it.
    pub url_from_dst: String,
}

impl Drop for WitnessEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Witness {
    /// Starts etcd here, its data and log in `dir`; returns once it listens.
    pub fn start_etcd(&self, dir: &std::path::Path) -> Result<WitnessEtcd> {
        let url = |ip: &str| format!("http://{ip}:2379");
        let (from_src, from_dst) = (url(&self.ip_from_src), url(&self.ip_from_dst));
        let log = std::fs::File::create(dir.join("etcd.log")).context("etcd's log")?;
        let mut cmd = command_in(Some(&self.ns), "etcd");
        cmd.args(["--name", "witness", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &format!("{from_src},{from_dst}"),
                "--advertise-client-urls",
                &from_src,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "witness=http://127.0.0.1:2380",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().context("etcd's log")?)
            .stderr(log);
        let etcd = WitnessEtcd {
            child: cmd
                .spawn()
                .context("cannot start etcd (Debian's etcd-server: scripts/setup installs it)")?,
            url_from_src: from_src,
            url_from_dst: from_dst,
        };
        let addr = format!("{}:2379", self.ip_from_src);
        Hosts::in_ns(&self.ns, move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(&addr).is_err() {
                if Instant::now() > deadline {
                    bail!("etcd did not listen on {addr}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread waiting for etcd panicked"))??;
        Ok(etcd)
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn enter_ns(path: &str) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: setns moves only the calling thread into the namespace `file` refers to.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

// <linux/if_tun.h>
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates TUN device `name` inside namespace `ns` (on a thread that enters it, so that this
/// thread stays where it is) and returns its descriptor.
fn open_tun_in(ns: &str, name: &str) -> Result<OwnedFd> {
    let path = format!("/var/run/netns/{ns}");
    let name = name.to_string();
    std::thread::spawn(move || -> Result<OwnedFd> {
        enter_ns(&path)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("cannot open /dev/net/tun")?;
        let fd = OwnedFd::from(file);
        // struct ifreq: the name (16 bytes, NUL-terminated), then the flags (a short).
        let mut ifreq = [0u8; 40];
        if name.len() >= 16 {
            bail!("interface name {name} is too long");
        }
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        ifreq[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes), which `ifreq` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
        }
        Ok(fd)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the TUN set-up thread panicked"))?
}

/// Carries packets between two TUN devices with delay, rate and a bounded queue.
struct Relay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Packets in flight one way: (when each arrived, its bytes).
struct Line {
    queue: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
    limit: usize,
}

impl Relay {
    fn start(a: OwnedFd, b: OwnedFd, link: LinkSpec) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b) = (Arc::new(a), Arc::new(b));
        // Twice the bandwidth-delay product in 1500-byte packets, and never under 1000 packets.
        let bdp_packets = link.rate_bits.map_or(0, |r| {
            (r as f64 / 8.0 * link.one_way_delay.as_secs_f64() / 1500.0) as usize
        });
        let limit = (2 * bdp_packets).max(1000);
        let mut threads = Vec::new();
        for (from, to, name) in [(a.clone(), b.clone(), "ab"), (b, a, "ba")] {
            let line = Arc::new(Line {
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                limit,
            });
            let (l, s) = (line.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wan-in-{name}"))
                    .spawn(move || take_packets(&from, &l, &s))?,
            );
            let s = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wan-out-{name}"))
                    .spawn(move || deliver_packets(&to, &line, link, &s))?,
            );
        }
        Ok(Self { stop, threads })
    }
}

/// Reads packets from `from` into the line until stopped; a full line drops them.
fn take_packets(from: &OwnedFd, line: &Line, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid descriptor; `pfd` lives across the call.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: reads at most buf.len() bytes into `buf`.
        let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n <= 0 {
            continue;
        }
        let arrived = Instant::now();
        let mut queue = line.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() < line.limit {
            queue.push_back((arrived, buf[..n as usize].to_vec()));
            line.ready.notify_one();
        }
    }
}

/// Writes each packet to `to` once its delay has passed and the link is free.
fn deliver_packets(to: &OwnedFd, line: &Line, link: LinkSpec, stop: &AtomicBool) {
    let mut link_free_at = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let packet = {
            let mut queue = line.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.is_empty() {
                queue = line
                    .ready
                    .wait_timeout(queue, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            queue.pop_front()
        };
        let Some((arrived, bytes)) = packet else { continue };
        let departs = (arrived + link.one_way_delay).max(link_free_at);
        if let Some(rate) = link.rate_bits {
            link_free_at = departs + Duration::from_nanos(bytes.len() as u64 * 8 * 1_000_000_000 / rate);
        }
        // Sleeps shorter than the timer's slack would slow the link down: packets due within
        // 200 us leave at once (a burst of at most 200 us of the rate, as tbf allows).
        let now = Instant::now();
        if departs > now + Duration::from_micros(200) {
            std::thread::sleep(departs - now);
        }
        // SAFETY: writes `bytes.len()` bytes from our buffer; a refused packet is a lost packet.
        unsafe { libc::write(to.as_raw_fd(), bytes.as_ptr() as *const libc::c_void, bytes.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units() {
        assert_eq!(parse_rate("1gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("200Mbit"), Ok(200_000_000));
        assert_eq!(parse_rate("64kbit"), Ok(64_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0mbit").is_err());
        assert!(parse_rate("99999999999gbit").is_err());
        assert!(parse_rate("1gbyte").is_err());
    }
}
