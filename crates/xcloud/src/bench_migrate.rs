//! `xcloud bench migrate`: live migration of real guests over loopback, as a table — total
//! time, downtime seen by the VMM, the stall seen by the guest (heartbeat's largest gap over the
//! whole migration, pre-copy and switch-over), bytes sent — next to the bandwidth of a plain TCP
//! stream and of a TLS stream measured in the same run. Each cell runs several times; the table
//! gives the median and the worst run.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use xcloud_api::{call, Command as Op};
use xcloud_migration::{MigrationSummary, PostcopyMode};

use crate::netlab::{Hosts, LinkSpec};

/// Working set of the "hot" cells: 64 MiB touched, the rest of the guest's RAM never touched.
const HOT_SET_MIB: u64 = 64;
/// Largest working set of the "full" cells: 7/8 of a small guest's RAM, at most this much.
const FULL_SET_MAX_MIB: u64 = 256;

/// How much of its memory the guest keeps touched.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WorkingSet {
    /// 64 MiB, whatever the guest's size.
    Hot,
    /// Memory full: 7/8 of the guest's RAM, at most 256 MiB.
    Full,
}

impl WorkingSet {
    /// MiB the heartbeat prefills (and then dirties within) in a guest of `mem` bytes.
    pub fn mib(self, mem: u64) -> u64 {
        match self {
            Self::Hot => HOT_SET_MIB,
            Self::Full => ((mem >> 20) * 7 / 8).min(FULL_SET_MAX_MIB),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Hot => "hot",
            Self::Full => "full",
        }
    }
}

/// What one cell migrates: a guest of `mem` bytes with `set` touched, dirtying `rate` MiB/s.
#[derive(Clone, Copy)]
struct Workload {
    mem: u64,
    set: WorkingSet,
    rate: u64,
}

impl Workload {
    /// The heartbeat's arguments: run forever, the working set, the rate.
    fn guest_args(&self) -> String {
        format!("0 {} {}", self.set.mib(self.mem), self.rate)
    }
}

/// One xcloud migration: what the source reported and what the guest saw.
struct XcloudRun {
    summary: MigrationSummary,
    guest_stall_ms: f64,
}

struct Cell {
    load: Workload,
    runs: Vec<XcloudRun>,
    /// The same migrations with the bench's tenant module installed on the source.
    with_ext: Vec<XcloudRun>,
    /// QEMU (microvm) migrating the same guest: default configuration (once) and tuned.
    qemu_default: Option<QemuRun>,
    qemu_tuned: Vec<QemuRun>,
}

/// One QEMU migration: total time and downtime as QEMU reports them, the guest's stall.
#[derive(Clone, Copy)]
struct QemuRun {
    total_ms: f64,
    downtime_ms: f64,
    guest_stall_ms: f64,
}

/// A QMP connection.
struct Qmp {
    out: std::os::unix::net::UnixStream,
    input: BufReader<std::os::unix::net::UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e).context("cannot reach QEMU's QMP socket"),
            }
        };
        let mut qmp = Self {
            out: stream.try_clone()?,
            input: BufReader::new(stream),
        };
        let mut greeting = String::new();
        qmp.input.read_line(&mut greeting)?;
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn execute(&mut self, command: &str, arguments: serde_json::Value) -> Result<serde_json::Value> {
        let request = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.out, "{request}")?;
        loop {
            let mut line = String::new();
            if self.input.read_line(&mut line)? == 0 {
                bail!("QEMU closed QMP");
            }
            let reply: serde_json::Value = serde_json::from_str(&line)?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                bail!("QMP {command}: {e}");
            }
        }
    }
}

/// QEMU for the guest `image`, inside network namespace `ns` if given.
fn qemu_command(ns: Option<&str>, image: &Path, mem: u64, append: &str) -> Command {
    let mut cmd = crate::netlab::command_in(ns, "qemu-system-x86_64");
    cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m"])
        .arg(format!("{}M", mem >> 20))
        .args(["-nodefaults", "-no-user-config", "-nographic", "-kernel"])
        .arg(image)
        .args(["-append", append])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Migrates the heartbeat guest between two QEMUs over loopback.
fn qemu_migration(
    dir: &Path,
    image: &Path,
    load: Workload,
    port: u16,
    tuned: bool,
    wan: Option<&Hosts>,
) -> Result<QemuRun> {
    let dst_ip = wan.map_or("127.0.0.1", |w| w.dst_ip.as_str());
    let mem = load.mem;
    let tag = format!("{}-{}-{}-{tuned}-{port}", mem >> 20, load.set.name(), load.rate);
    let (src_serial, dst_serial, qmp_path) = (
        dir.join(format!("qsrc-{tag}.out")),
        dir.join(format!("qdst-{tag}.out")),
        dir.join(format!("qmp-{tag}.sock")),
    );
    let append = load.guest_args();
    let mut dst = qemu_command(wan.map(|w| w.dst.as_str()), image, mem, &append)
        .arg("-serial")
        .arg(format!("file:{}", dst_serial.display()))
        .arg("-incoming")
        .arg(format!("tcp:{dst_ip}:{port}"))
        .spawn()
        .context("cannot start qemu-system-x86_64 (scripts/setup installs it)")?;
    let mut src = qemu_command(wan.map(|w| w.src.as_str()), image, mem, &append)
        .arg("-serial")
        .arg(format!("file:{}", src_serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let result = (|| -> Result<QemuRun> {
        let mut qmp = Qmp::connect(&qmp_path)?;
        // Same warm-up as the xcloud run: the working set is touched and the dirtier at rate.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&src_serial)
            .unwrap_or_default()
            .contains("heartbeat n=")
        {
            if Instant::now() > deadline {
                bail!("the guest in QEMU did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(700));
        // Every report from here on covers part of the migration.
        let reports_before = std::fs::read_to_string(&src_serial).unwrap_or_default().len();
        if tuned {
            qmp.execute(
                "migrate-set-parameters",
                serde_json::json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 50 }),
            )?;
        }
        qmp.execute("migrate", serde_json::json!({ "uri": format!("tcp:{dst_ip}:{port}") }))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let info = loop {
            let info = qmp.execute("query-migrate", serde_json::json!({}))?;
            match info.get("status").and_then(|s| s.as_str()) {
                Some("completed") => break info,
                Some("failed") | Some("cancelled") => bail!("QEMU's migration failed: {info}"),
                _ if Instant::now() > deadline => bail!("QEMU's migration did not finish"),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let first = loop {
            let text = std::fs::read_to_string(&dst_serial).unwrap_or_default();
            if let Some(line) = text
                .lines()
                .find(|l| l.starts_with("heartbeat n=") && l.contains("uptime_ms"))
            {
                break line.to_string();
            }
            if Instant::now() > deadline {
                bail!("the migrated guest printed nothing in QEMU");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let number = |key: &str| info.get(key).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        let source_text = std::fs::read_to_string(&src_serial).unwrap_or_default();
        let during = source_text.get(reports_before..).unwrap_or_default();
        Ok(QemuRun {
            total_ms: number("total-time"),
            downtime_ms: number("downtime"),
            guest_stall_ms: largest_window_ms(during.lines().chain([first.as_str()])),
        })
    })();
    let _ = src.kill();
    let _ = src.wait();
    let _ = dst.kill();
    let _ = dst.wait();
    result
}

/// Starts `xcloud ARGS`, inside network namespace `ns` if given.
pub(crate) fn spawn(ns: Option<&str>, args: &[&str]) -> Result<(Child, Receiver<String>)> {
    let exe = std::env::current_exe().context("cannot find the xcloud executable")?;
    let mut cmd = crate::netlab::command_in(ns, exe);
    // With XCLOUD_LOG set, the VMMs' logs show on the bench's stderr.
    let logs = if std::env::var_os("XCLOUD_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    let mut child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(logs)
        .spawn()
        .context("cannot start xcloud")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok((child, rx))
}

pub(crate) fn line_with(rx: &Receiver<String>, prefix: &str, limit: Duration) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => return Ok(line),
            Ok(_) => {}
            Err(_) => bail!("no '{prefix}' line within {limit:?}"),
        }
    }
}

/// The largest `window_max_us` among heartbeat reports, in ms.
fn largest_window_ms<'a>(lines: impl Iterator<Item = &'a str>) -> f64 {
    lines
        .filter(|l| l.starts_with("heartbeat n="))
        .filter_map(|l| field(l, "window_max_us="))
        .max()
        .unwrap_or(0) as f64
        / 1e3
}

pub(crate) fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

pub(crate) fn wait_for_socket(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("no control socket at {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Reads `s` to its end (a TLS peer that closes without close_notify counts as the end) and
/// returns the bytes read.
fn drain(s: &mut impl Read) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}

/// Writes `bytes` of filler to `s` in 1 MiB chunks.
fn fill(s: &mut impl Write, bytes: usize) -> std::io::Result<()> {
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..bytes / chunk.len() {
        s.write_all(&chunk)?;
    }
    s.flush()
}

/// Bandwidth of one plain TCP stream across the WAN link, bytes per second.
fn wan_tcp_baseline(wan: &Hosts, bytes: usize) -> Result<f64> {
    let addr = format!("{}:17999", wan.dst_ip);
    let listen = addr.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = Hosts::in_ns(&wan.dst, move || -> Result<usize> {
        let listener = std::net::TcpListener::bind(&listen)?;
        let _ = ready_tx.send(());
        let (mut s, _) = listener.accept()?;
        Ok(drain(&mut s)?)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the baseline receiver did not start")?;
    let writer = Hosts::in_ns(&wan.src, move || -> Result<f64> {
        let start = Instant::now();
        let mut s = std::net::TcpStream::connect(&addr)?;
        fill(&mut s, bytes)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        Ok(start.elapsed().as_secs_f64())
    });
    let elapsed = writer.join().map_err(|_| anyhow::anyhow!("baseline writer failed"))??;
    let got = reader.join().map_err(|_| anyhow::anyhow!("baseline reader failed"))??;
    Ok(got as f64 / elapsed)
}

/// Bandwidth of one plain TCP stream over loopback, bytes per second.
fn tcp_baseline(bytes: usize) -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        drain(&mut s)
    });
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    fill(&mut s, bytes)?;
    drop(s);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader thread failed"))??;
    Ok(got as f64 / start.elapsed().as_secs_f64())
}

/// Pins the calling thread to `cpu`. Best effort: a failure leaves it where it was.
pub(crate) fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data that CPU_ZERO and CPU_SET only write inside;
    // sched_setaffinity(0, ..) reads the set and changes the calling thread's affinity only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Bandwidth of one TLS stream (the migration's own transport and cipher) over loopback; with
/// `one_core`, both ends share one CPU, as a migration's two ends share the core a running
/// guest leaves them on a 2-core host.
fn tls_baseline(dir: &Path, bytes: usize, one_core: Option<usize>) -> Result<f64> {
    use xcloud_migration::tls::{accept, connect, Credentials};
    let server_creds = Credentials::load(&dir.join("b"), &dir.join("a").join("cert.der"))?;
    let client_creds = Credentials::load(&dir.join("a"), &dir.join("b").join("cert.der"))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> Result<usize> {
        if let Some(cpu) = one_core {
            pin_to_cpu(cpu);
        }
        let (tcp, _) = listener.accept()?;
        let mut s = accept(tcp, &server_creds)?;
        Ok(drain(&mut s)?)
    });
    // The writer runs on a thread of its own, so that pinning it leaves the bench's as it was.
    let writer = std::thread::spawn(move || -> Result<Instant> {
        if let Some(cpu) = one_core {
            pin_to_cpu(cpu);
        }
        let start = Instant::now();
        let mut s = connect(std::net::TcpStream::connect(addr)?, &client_creds)?;
        fill(&mut s, bytes)?;
        s.conn.send_close_notify();
        let _ = s.flush();
        Ok(start)
    });
    let start = writer.join().map_err(|_| anyhow::anyhow!("writer thread failed"))??;
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader thread failed"))??;
    Ok(got as f64 / start.elapsed().as_secs_f64())
}

fn one_migration(
    dir: &Path,
    load: Workload,
    port: u16,
    wan: Option<&Hosts>,
    postcopy: PostcopyMode,
    ext: Option<&Path>,
) -> Result<XcloudRun> {
    let socket = dir.join(format!("src-{port}.sock"));
    let dst_socket = dir.join(format!("dst-{port}.sock"));
    let (a, b) = (dir.join("a"), dir.join("b"));
    let listen = format!("{}:{port}", wan.map_or("127.0.0.1", |w| w.dst_ip.as_str()));
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (mut dst, dst_out) = spawn(
        wan.map(|w| w.dst.as_str()),
        &[
            "receive",
            "--listen",
            &listen,
            "--identity",
            &path(&b),
            "--peer",
            &path(&a.join("cert.der")),
            "--api",
            &path(&dst_socket),
        ],
    )?;
    let mem_arg = format!("{}M", load.mem >> 20);
    let ws = load.set.mib(load.mem).to_string();
    let rate_arg = load.rate.to_string();
    let (mut src, src_out) = spawn(
        wan.map(|w| w.src.as_str()),
        &[
            "run",
            "--mem",
            &mem_arg,
            "--api",
            &path(&socket),
            "heartbeat",
            "--",
            "0",
            &ws,
            &rate_arg,
        ],
    )?;
    let result = (|| -> Result<XcloudRun> {
        line_with(&src_out, "heartbeat n=", Duration::from_secs(30))?;
        wait_for_socket(&socket)?;
        if let Some(file) = ext {
            let name = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("module")
                .to_string();
            let answer = call(
                &socket,
                Op::ExtAdd {
                    file: file.to_path_buf(),
                    name,
                    version: None,
                    port_base: None,
                    port_count: None,
                },
            )?;
            if !answer.ok {
                bail!(
                    "cannot install {}: {}",
                    file.display(),
                    answer.error.unwrap_or_default()
                );
            }
        }
        // Let the dirtier reach its rate before the move.
        std::thread::sleep(Duration::from_millis(700));
        // Every report from here on covers part of the migration.
        while src_out.try_recv().is_ok() {}
        let answer = call(
            &socket,
            Op::Migrate {
                to: listen.clone(),
                identity: a.clone(),
                peer_cert: b.join("cert.der"),
                max_downtime_ms: Some(50),
                timeout_ms: None,
                postcopy,
                compress: false,
            },
        )?;
        if !answer.ok {
            bail!("migration failed: {}", answer.error.unwrap_or_default());
        }
        let summary = answer.migrated.unwrap_or_default();
        // The source's reports during pre-copy, and the destination's first one, which covers
        // the window with the switch in it.
        let first = line_with(&dst_out, "heartbeat n=", Duration::from_secs(10))?;
        field(&first, "window_max_us=").context("no window_max_us")?;
        let during: Vec<String> = src_out.try_iter().collect();
        if std::env::var_os("XCLOUD_LOG").is_some() {
            for line in &during {
                eprintln!("source guest: {line}");
            }
            eprintln!("destination guest: {first}");
        }
        Ok(XcloudRun {
            summary,
            guest_stall_ms: largest_window_ms(during.iter().map(String::as_str).chain([first.as_str()])),
        })
    })();
    let _ = call(&dst_socket, Op::Stop);
    let _ = src.kill();
    let _ = src.wait();
    let _ = dst.kill();
    let _ = dst.wait();
    result
}

/// What `xcloud bench migrate` runs.
pub struct MigrateBench {
    /// Guest sizes in bytes.
    pub sizes: Vec<u64>,
    /// Working sets to try in every guest size.
    pub sets: Vec<WorkingSet>,
    /// Dirtying rates in MiB/s.
    pub rates: Vec<u64>,
    /// Runs per cell (xcloud and tuned QEMU each; QEMU's defaults once).
    pub runs: usize,
    /// Compare with QEMU in the same run.
    pub with_qemu: bool,
    /// Between two namespaces over this link instead of loopback.
    pub wan_link: Option<LinkSpec>,
    /// How xcloud converges.
    pub postcopy: PostcopyMode,
    /// A tenant module to compare with: each run is repeated with it installed on the source.
    pub ext: Option<std::path::PathBuf>,
}

/// Runs the matrix and prints the table.
pub fn migrate(bench: &MigrateBench) -> Result<()> {
    let wan = bench
        .wan_link
        .map(Hosts::new)
        .transpose()
        .context("cannot set up the WAN namespaces (needs root)")?;
    let dir = std::env::temp_dir().join(format!("xcloud-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    xcloud_migration::tls::Identity::generate(&dir.join("a"), "bench-a", true)?;
    xcloud_migration::tls::Identity::generate(&dir.join("b"), "bench-b", true)?;
    let image = dir.join("heartbeat.elf");
    std::fs::write(
        &image,
        crate::guests::builtin("heartbeat").context("no heartbeat guest")?,
    )?;
    let loads: Vec<Workload> = bench
        .sizes
        .iter()
        .flat_map(|&mem| {
            bench
                .sets
                .iter()
                .flat_map(move |&set| bench.rates.iter().map(move |&rate| Workload { mem, set, rate }))
        })
        .collect();
    let runs = bench.runs.max(1);
    let ext = match &bench.ext {
        Some(file) => Some(std::fs::canonicalize(file).with_context(|| format!("no module at {}", file.display()))?),
        None => None,
    };
    let per_cell =
        runs * (1 + usize::from(bench.with_qemu) + usize::from(ext.is_some())) + usize::from(bench.with_qemu);
    let bar = ProgressBar::new((loads.len() * per_cell + 1) as u64).with_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("plain TCP and TLS baselines");
    let baselines = match &wan {
        // On a rate-limited link the cipher is not the bottleneck: TCP is the baseline for both.
        Some(w) => {
            let tcp = wan_tcp_baseline(w, 64 << 20).context("the WAN TCP baseline")?;
            Baselines {
                tcp,
                tls: tcp,
                tls_one_core: None,
            }
        }
        None => {
            let last_cpu = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
            Baselines {
                tcp: tcp_baseline(1 << 30).context("the TCP baseline")?,
                tls: tls_baseline(&dir, 512 << 20, None).context("the TLS baseline")?,
                tls_one_core: Some(tls_baseline(&dir, 512 << 20, Some(last_cpu)).context("the one-core TLS baseline")?),
            }
        }
    };
    bar.inc(1);
    let mut cells = Vec::new();
    let mut port = 17_800 + (std::process::id() % 1000) as u16;
    for load in loads {
        let what = format!(
            "{} MiB guest, {} MiB touched, dirtying {} MiB/s",
            load.mem >> 20,
            load.set.mib(load.mem),
            load.rate
        );
        let mut cell = Cell {
            load,
            runs: Vec::new(),
            with_ext: Vec::new(),
            qemu_default: None,
            qemu_tuned: Vec::new(),
        };
        // xcloud and QEMU alternate, so that a noisy minute hits both.
        for run in 0..runs {
            bar.set_message(format!("xcloud: {what} ({}/{runs})", run + 1));
            port += 1;
            cell.runs
                .push(one_migration(&dir, load, port, wan.as_ref(), bench.postcopy, None)?);
            bar.inc(1);
            if let Some(file) = &ext {
                bar.set_message(format!("xcloud with {}: {what} ({}/{runs})", file.display(), run + 1));
                port += 1;
                cell.with_ext.push(one_migration(
                    &dir,
                    load,
                    port,
                    wan.as_ref(),
                    bench.postcopy,
                    Some(file),
                )?);
                bar.inc(1);
            }
            if bench.with_qemu {
                bar.set_message(format!("QEMU tuned: {what} ({}/{runs})", run + 1));
                port += 1;
                cell.qemu_tuned
                    .push(qemu_migration(&dir, &image, load, port, true, wan.as_ref())?);
                bar.inc(1);
            }
        }
        if bench.with_qemu {
            bar.set_message(format!("QEMU default: {what}"));
            port += 1;
            cell.qemu_default = Some(qemu_migration(&dir, &image, load, port, false, wan.as_ref())?);
            bar.inc(1);
        }
        cells.push(cell);
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&dir);
    print_table(&cells, &baselines, wan.as_ref().map(|w| w.link.describe()), runs);
    if let Some(file) = &ext {
        print_module_table(&cells, file);
    }
    Ok(())
}

/// The same cells with and without the tenant module: what it changed.
fn print_module_table(cells: &[Cell], module: &Path) {
    println!();
    println!(
        "with the tenant module {} on the source vs without, runs alternating (medians; ratio: with / without)",
        module.display()
    );
    println!(
        "{:>6} {:>7} {:>6} {:>22} {:>24} {:>22} {:>12}",
        "guest", "touched", "dirty", "pages sent", "downtime ms", "total ms", "rounds"
    );
    let median = |runs: &[XcloudRun], f: fn(&XcloudRun) -> f64| median_max(runs.iter().map(f).collect()).0;
    for c in cells.iter().filter(|c| !c.with_ext.is_empty()) {
        let column = |f: fn(&XcloudRun) -> f64, digits: usize| {
            let (without, with) = (median(&c.runs, f), median(&c.with_ext, f));
            format!("{without:.digits$} / {with:.digits$} {:.2}x", with / without.max(1e-9))
        };
        println!(
            "{:>5}M {:>6}M {:>4}/s {:>22} {:>24} {:>22} {:>12}",
            c.load.mem >> 20,
            c.load.set.mib(c.load.mem),
            format!("{}M", c.load.rate),
            column(|r| r.summary.pages_sent as f64, 0),
            column(|r| r.summary.downtime_ms, 1),
            column(|r| r.summary.total_ms, 0),
            format!(
                "{} / {}",
                median(&c.runs, |r| f64::from(r.summary.rounds)),
                median(&c.with_ext, |r| f64::from(r.summary.rounds))
            ),
        );
    }
}

/// Median and largest of some figures.
fn median_max(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (values[values.len() / 2], values[values.len() - 1])
}

/// Streams measured in the same run, bytes per second.
struct Baselines {
    tcp: f64,
    tls: f64,
    /// Both ends of the TLS stream on one CPU (loopback only).
    tls_one_core: Option<f64>,
}

fn print_table(cells: &[Cell], baselines: &Baselines, wan: Option<String>, runs: usize) {
    let (tcp, tls) = (baselines.tcp, baselines.tls);
    let link = wan.map_or("loopback".to_string(), |link| format!("two namespaces over a {link}"));
    println!(
        "xcloud bench migrate: {link}, TLS 1.3 with pinned certificates, downtime budget 50 ms, {runs} runs per cell"
    );
    println!(
        "baselines in the same run: plain TCP stream {:.0} MB/s; TLS stream (same transport and cipher) {:.0} MB/s",
        tcp / 1e6,
        tls / 1e6
    );
    if let Some(one_core) = baselines.tls_one_core {
        println!(
            "and the TLS stream with both ends on one CPU {:.0} MB/s (\"1-core\": a running guest leaves a 2-core host's migration one core)",
            one_core / 1e6
        );
    }
    println!("touched: MiB of guest RAM the heartbeat keeps written (it dirties within it at the rate)");
    println!("guest gap: the guest's own largest gap between two loop iterations over the whole migration");
    println!("figures: median (worst) of the runs; MiB sent and rounds of the median run");
    if cells.iter().any(|c| c.runs.iter().any(|r| r.summary.postcopy)) {
        println!("rounds \"N+pc\": N pre-copy rounds, then post-copy for the pages left");
    }
    println!();
    println!(
        "{:>6} {:>7} {:>6} {:>16} {:>14} {:>14} {:>7} {:>8} {:>6} {:>7} {:>7}",
        "guest",
        "touched",
        "dirty",
        "total ms",
        "downtime ms",
        "guest gap ms",
        "rounds",
        "MiB sent",
        "MB/s",
        "vs TLS",
        "1-core"
    );
    for c in cells {
        let (total, total_max) = median_max(c.runs.iter().map(|r| r.summary.total_ms).collect());
        let (down, down_max) = median_max(c.runs.iter().map(|r| r.summary.downtime_ms).collect());
        let (gap, gap_max) = median_max(c.runs.iter().map(|r| r.guest_stall_ms).collect());
        let Some(median_run) = c.runs.iter().find(|r| r.summary.total_ms == total) else {
            continue;
        };
        let s = &median_run.summary;
        // Time taken against the time the same bytes take in the TLS stream alone.
        let over = |stream: f64| s.total_ms / (s.bytes_sent as f64 / stream * 1e3).max(1e-3);
        let over_tls = over(tls);
        let over_one_core = baselines
            .tls_one_core
            .map_or_else(|| "-".to_string(), |b| format!("{:.2}x", over(b)));
        println!(
            "{:>5}M {:>6}M {:>4}/s {:>16} {:>14} {:>14} {:>7} {:>8.1} {:>6.0} {:>6.2}x {:>7}",
            c.load.mem >> 20,
            c.load.set.mib(c.load.mem),
            format!("{}M", c.load.rate),
            format!("{total:.0} ({total_max:.0})"),
            format!("{down:.1} ({down_max:.1})"),
            format!("{gap:.1} ({gap_max:.1})"),
            if s.postcopy {
                format!("{}+pc", s.rounds)
            } else {
                s.rounds.to_string()
            },
            s.bytes_sent as f64 / (1 << 20) as f64,
            s.bandwidth_mbps,
            over_tls,
            over_one_core
        );
    }
    let with_qemu = cells.iter().any(|c| !c.qemu_tuned.is_empty());
    if with_qemu {
        println!();
        println!("QEMU (microvm, KVM, plain TCP) migrating the same guest over the same link in the same run;");
        println!("default: QEMU's defaults, once; tuned: max-bandwidth unlimited, downtime-limit 50 ms, {runs} runs");
        println!(
            "{:>6} {:>7} {:>6} | {:>24} | {:>24} | {:>24}",
            "guest", "touched", "dirty", "xcloud total/down/gap", "QEMU default", "QEMU tuned"
        );
        for c in cells {
            let (total, _) = median_max(c.runs.iter().map(|r| r.summary.total_ms).collect());
            let (down, _) = median_max(c.runs.iter().map(|r| r.summary.downtime_ms).collect());
            let (_, gap_max) = median_max(c.runs.iter().map(|r| r.guest_stall_ms).collect());
            let (q_total, _) = median_max(c.qemu_tuned.iter().map(|r| r.total_ms).collect());
            let (q_down, _) = median_max(c.qemu_tuned.iter().map(|r| r.downtime_ms).collect());
            let (_, q_gap_max) = median_max(c.qemu_tuned.iter().map(|r| r.guest_stall_ms).collect());
            println!(
                "{:>5}M {:>6}M {:>4}/s | {:>24} | {:>24} | {:>24}",
                c.load.mem >> 20,
                c.load.set.mib(c.load.mem),
                format!("{}M", c.load.rate),
                format!("{total:.0} / {down:.1} / {gap_max:.1}"),
                c.qemu_default
                    .map(|r| format!("{:.0} / {:.1} / {:.1}", r.total_ms, r.downtime_ms, r.guest_stall_ms))
                    .unwrap_or_else(|| "-".into()),
                format!("{q_total:.0} / {q_down:.1} / {q_gap_max:.1}")
            );
        }
        println!("(total and downtime: medians; gap: the worst run)");
    }
    println!();
    let worst_gap = cells
        .iter()
        .flat_map(|c| c.runs.iter().map(|r| r.guest_stall_ms))
        .fold(0.0, f64::max);
    let gap_limit = 5.0;
    println!(
        "target: the guest's largest gap <= {gap_limit} ms in every cell, worst run: {worst_gap:.1} ms: {}",
        if worst_gap <= gap_limit { "met" } else { "MISSED" }
    );
    let worst_tls = cells
        .iter()
        .flat_map(|c| c.runs.iter())
        .map(|r| r.summary.total_ms / (r.summary.bytes_sent as f64 / tls * 1e3).max(1e-3))
        .fold(0.0, f64::max);
    println!(
        "target: total <= 2x of bytes sent / the TLS stream in every run: worst {worst_tls:.2}x: {}",
        if worst_tls <= 2.0 { "met" } else { "MISSED" }
    );
    if with_qemu {
        let slower: Vec<String> = cells
            .iter()
            .filter_map(|c| {
                let (total, _) = median_max(c.runs.iter().map(|r| r.summary.total_ms).collect());
                let (q_total, _) = median_max(c.qemu_tuned.iter().map(|r| r.total_ms).collect());
                (total > q_total).then(|| {
                    format!(
                        "{}M/{}M/{}M/s {total:.0} vs {q_total:.0} ms",
                        c.load.mem >> 20,
                        c.load.set.mib(c.load.mem),
                        c.load.rate
                    )
                })
            })
            .collect();
        println!(
            "target: total <= QEMU tuned's in every cell (medians): {}",
            if slower.is_empty() {
                "met".to_string()
            } else {
                format!("MISSED in {} of {}: {}", slower.len(), cells.len(), slower.join(", "))
            }
        );
    }
}

/// Parses "hot,full" into working sets.
pub fn parse_sets(text: &str) -> Result<Vec<WorkingSet>, String> {
    text.split(',')
        .map(|s| match s.trim() {
            "hot" => Ok(WorkingSet::Hot),
            "full" => Ok(WorkingSet::Full),
            other => Err(format!("'{other}' is not a working set (hot or full)")),
        })
        .collect()
}

/// Parses "256M,1G" into byte sizes.
pub fn parse_sizes(text: &str) -> Result<Vec<u64>, String> {
    text.split(',').map(crate::run::parse_size).collect()
}

/// Parses "0,16,64" into MiB/s rates.
pub fn parse_rates(text: &str) -> Result<Vec<u64>, String> {
    text.split(',')
        .map(|r| {
            r.trim()
                .parse::<u64>()
                .map_err(|_| format!("'{r}' is not a rate in MiB/s"))
        })
        .collect()
}
