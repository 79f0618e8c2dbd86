//! `xcloud bench migrate`: live migration of real guests over loopback, as a table — total
//! time, downtime seen by the VMM, the stall seen by the guest (heartbeat's largest gap in the
//! window that contains the move), bytes sent — next to the bandwidth of a plain TCP stream
//! measured in the same run.

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

/// Hot working set every guest keeps touched (the rest of its RAM stays untouched).
const WORKING_SET_MIB: u64 = 64;

struct Cell {
    mem: u64,
    rate: u64,
    summary: MigrationSummary,
    guest_stall_ms: f64,
    /// QEMU (microvm) migrating the same guest: default and tuned configuration.
    qemu_default: Option<QemuRun>,
    qemu_tuned: Option<QemuRun>,
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
    mem: u64,
    rate: u64,
    port: u16,
    tuned: bool,
    wan: Option<&Hosts>,
) -> Result<QemuRun> {
    let dst_ip = wan.map_or("127.0.0.1", |w| w.dst_ip.as_str());
    let tag = format!("{}-{rate}-{tuned}", mem >> 20);
    let (src_serial, dst_serial, qmp_path) = (
        dir.join(format!("qsrc-{tag}.out")),
        dir.join(format!("qdst-{tag}.out")),
        dir.join(format!("qmp-{tag}.sock")),
    );
    let append = format!("0 {WORKING_SET_MIB} {rate}");
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
        Ok(QemuRun {
            total_ms: number("total-time"),
            downtime_ms: number("downtime"),
            guest_stall_ms: field(&first, "window_max_us=").unwrap_or(0) as f64 / 1e3,
        })
    })();
    let _ = src.kill();
    let _ = src.wait();
    let _ = dst.kill();
    let _ = dst.wait();
    result
}

/// Starts `xcloud ARGS`, inside network namespace `ns` if given.
fn spawn(ns: Option<&str>, args: &[&str]) -> Result<(Child, Receiver<String>)> {
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

fn line_with(rx: &Receiver<String>, prefix: &str, limit: Duration) -> Result<String> {
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

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

fn wait_for_socket(path: &Path) -> Result<()> {
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

/// Bandwidth of one TLS stream (the migration's own transport and cipher) over loopback.
fn tls_baseline(dir: &Path, bytes: usize) -> Result<f64> {
    use xcloud_migration::tls::{accept, connect, Credentials};
    let server_creds = Credentials::load(&dir.join("b"), &dir.join("a").join("cert.der"))?;
    let client_creds = Credentials::load(&dir.join("a"), &dir.join("b").join("cert.der"))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> Result<usize> {
        let (tcp, _) = listener.accept()?;
        let mut s = accept(tcp, &server_creds)?;
        Ok(drain(&mut s)?)
    });
    let start = Instant::now();
    let mut s = connect(std::net::TcpStream::connect(addr)?, &client_creds)?;
    fill(&mut s, bytes)?;
    s.conn.send_close_notify();
    let _ = s.flush();
    drop(s);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader thread failed"))??;
    Ok(got as f64 / start.elapsed().as_secs_f64())
}

fn one_migration(
    dir: &Path,
    mem: u64,
    rate: u64,
    port: u16,
    wan: Option<&Hosts>,
    postcopy: PostcopyMode,
) -> Result<Cell> {
    let socket = dir.join(format!("src-{mem}-{rate}.sock"));
    let dst_socket = dir.join(format!("dst-{mem}-{rate}.sock"));
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
    let mem_arg = format!("{}M", mem >> 20);
    let ws = WORKING_SET_MIB.to_string();
    let rate_arg = rate.to_string();
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
    let result = (|| -> Result<Cell> {
        line_with(&src_out, "heartbeat n=", Duration::from_secs(30))?;
        wait_for_socket(&socket)?;
        // Let the dirtier reach its rate before the move.
        std::thread::sleep(Duration::from_millis(700));
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
        // The first report at the destination covers the window with the move in it.
        let first = line_with(&dst_out, "heartbeat n=", Duration::from_secs(10))?;
        let stall_us = field(&first, "window_max_us=").context("no window_max_us")?;
        Ok(Cell {
            mem,
            rate,
            summary,
            guest_stall_ms: stall_us as f64 / 1e3,
            qemu_default: None,
            qemu_tuned: None,
        })
    })();
    let _ = call(&dst_socket, Op::Stop);
    let _ = src.kill();
    let _ = src.wait();
    let _ = dst.kill();
    let _ = dst.wait();
    result
}

/// Runs the matrix and prints the table.
pub fn migrate(
    sizes: &[u64],
    rates: &[u64],
    with_qemu: bool,
    wan_link: Option<LinkSpec>,
    postcopy: PostcopyMode,
) -> Result<()> {
    let wan = wan_link
        .map(Hosts::new)
        .transpose()
        .context("cannot set up the WAN namespaces (needs root)")?;
    let dir = std::env::temp_dir().join(format!("xcloud-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    xcloud_migration::tls::Identity::generate(&dir.join("a"), "bench-a", true)?;
    xcloud_migration::tls::Identity::generate(&dir.join("b"), "bench-b", true)?;
    let bar = ProgressBar::new((sizes.len() * rates.len() + 1) as u64).with_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("plain TCP and TLS baselines");
    let (tcp, tls) = match &wan {
        // On a rate-limited link the cipher is not the bottleneck: TCP is the baseline for both.
        Some(w) => {
            let tcp = wan_tcp_baseline(w, 64 << 20).context("the WAN TCP baseline")?;
            (tcp, tcp)
        }
        None => (
            tcp_baseline(1 << 30).context("the TCP baseline")?,
            tls_baseline(&dir, 512 << 20).context("the TLS baseline")?,
        ),
    };
    bar.inc(1);
    let mut cells = Vec::new();
    let mut port = 17_800 + (std::process::id() % 1000) as u16;
    for &mem in sizes {
        for &rate in rates {
            bar.set_message(format!("{} MiB guest dirtying {rate} MiB/s", mem >> 20));
            port += 1;
            let mut cell = one_migration(&dir, mem, rate, port, wan.as_ref(), postcopy)?;
            if with_qemu {
                let image = dir.join("heartbeat.elf");
                std::fs::write(
                    &image,
                    crate::guests::builtin("heartbeat").context("no heartbeat guest")?,
                )?;
                bar.set_message(format!("QEMU: {} MiB guest dirtying {rate} MiB/s", mem >> 20));
                port += 1;
                cell.qemu_default = Some(qemu_migration(&dir, &image, mem, rate, port, false, wan.as_ref())?);
                port += 1;
                cell.qemu_tuned = Some(qemu_migration(&dir, &image, mem, rate, port, true, wan.as_ref())?);
            }
            cells.push(cell);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&dir);
    print_table(&cells, tcp, tls, wan.as_ref().map(|w| w.link.describe()));
    Ok(())
}

fn print_table(cells: &[Cell], tcp: f64, tls: f64, wan: Option<String>) {
    let link = wan.map_or("loopback".to_string(), |link| format!("two namespaces over a {link}"));
    println!(
        "xcloud bench migrate: {link}, TLS 1.3 with pinned certificates, {WORKING_SET_MIB} MiB hot working set, downtime budget 50 ms"
    );
    println!(
        "baselines in the same run: plain TCP stream {:.0} MB/s; TLS stream (same transport and cipher) {:.0} MB/s",
        tcp / 1e6,
        tls / 1e6
    );
    if cells.iter().any(|c| c.summary.postcopy) {
        println!("rounds \"N+pc\": N pre-copy rounds, then post-copy for the pages left");
    }
    println!();
    println!(
        "{:>6} {:>6} {:>9} {:>10} {:>12} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "guest", "dirty", "total ms", "downtime", "guest stall", "rounds", "MiB sent", "MB/s", "vs TCP", "vs TLS"
    );
    for c in cells {
        let s = &c.summary;
        let over = |bw: f64| s.total_ms / (s.bytes_sent as f64 / bw * 1e3).max(1e-3);
        println!(
            "{:>5}M {:>4}/s {:>9.1} {:>8.1}ms {:>10.1}ms {:>7} {:>9.1} {:>9.0} {:>8.2}x {:>8.2}x",
            c.mem >> 20,
            format!("{}M", c.rate),
            s.total_ms,
            s.downtime_ms,
            c.guest_stall_ms,
            if s.postcopy {
                format!("{}+pc", s.rounds)
            } else {
                s.rounds.to_string()
            },
            s.bytes_sent as f64 / (1 << 20) as f64,
            s.bandwidth_mbps,
            over(tcp),
            over(tls)
        );
    }
    if cells.iter().any(|c| c.qemu_default.is_some()) {
        println!();
        println!("QEMU (microvm, KVM, plain TCP) migrating the same guest over the same link in the same run;");
        println!("default: QEMU's defaults; tuned: max-bandwidth unlimited, downtime-limit 50 ms");
        println!(
            "{:>6} {:>6} | {:>26} | {:>26} | {:>26}",
            "guest", "dirty", "xcloud total/down/stall ms", "QEMU default", "QEMU tuned"
        );
        for c in cells {
            let q = |r: &Option<QemuRun>| {
                r.map(|r| format!("{:.0} / {:.1} / {:.1}", r.total_ms, r.downtime_ms, r.guest_stall_ms))
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "{:>5}M {:>4}/s | {:>26} | {:>26} | {:>26}",
                c.mem >> 20,
                format!("{}M", c.rate),
                format!(
                    "{:.0} / {:.1} / {:.1}",
                    c.summary.total_ms, c.summary.downtime_ms, c.guest_stall_ms
                ),
                q(&c.qemu_default),
                q(&c.qemu_tuned)
            );
        }
    }
    println!();
    let worst_stall = cells.iter().map(|c| c.guest_stall_ms).fold(0.0, f64::max);
    println!(
        "target: guest stall <= 5 ms in every cell: worst {worst_stall:.1} ms: {}",
        if worst_stall <= 5.0 { "met" } else { "MISSED" }
    );
    let idle: Vec<&Cell> = cells.iter().filter(|c| c.rate == 0).collect();
    for c in idle {
        let ratio = c.summary.total_ms / (c.summary.bytes_sent as f64 / tcp * 1e3).max(1e-3);
        let ratio_tls = c.summary.total_ms / (c.summary.bytes_sent as f64 / tls * 1e3).max(1e-3);
        println!(
            "target: idle {} MiB guest within 1.2x of bytes / plain TCP bandwidth: {ratio:.2}x: {} ({ratio_tls:.2}x of the TLS stream)",
            c.mem >> 20,
            if ratio <= 1.2 { "met" } else { "MISSED" }
        );
    }
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
