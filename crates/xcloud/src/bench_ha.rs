//! `xcloud bench ha`: continuous replication (docs/replication.md) of a real guest between two
//! namespaces, over a plain veth and over an emulated 1 Gbit/s, 20 ms WAN: the checkpoints per
//! second it sustains, what the guest loses to them (its loop rate protected against the same
//! guest unprotected, alternating, in the same run), how long a failover takes (primary killed,
//! link cut, link cut with both ends fenced through etcd on a third host), and what output
//! commit adds to a request (an HTTP server's answers, protected against unprotected).

use crate::bench_migrate::{field, line_with, spawn, wait_for_socket};
use crate::netlab::{Hosts, LinkSpec, WitnessEtcd};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use xcloud_api::{call, Command as Op, Response};

/// What `xcloud bench ha` runs.
pub struct HaBench {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// The working set the guest writes, MiB.
    pub set_mib: u64,
    /// How fast it writes it, MiB/s.
    pub rate: u64,
    /// Checkpoint interval.
    pub interval_ms: u64,
    /// Heartbeat interval.
    pub heartbeat_ms: u64,
    /// How long each run is measured.
    pub seconds: u64,
    /// Runs per link, protected and unprotected each.
    pub runs: usize,
}

const PORT: u16 = 7730;

/// One measured run of the heartbeat guest.
#[derive(Default, Clone)]
struct GuestRun {
    /// The guest's loop iterations per second over the measured window.
    iterations_per_s: f64,
    /// Protected runs: checkpoints acknowledged per second, the guest's pause per checkpoint
    /// (mean and largest, µs), checkpoint to acknowledgement (mean ms), MB/s on the link.
    checkpoints_per_s: f64,
    mean_pause_us: f64,
    max_pause_us: f64,
    commit_ms: f64,
    mb_per_s: f64,
    mean_pages: f64,
    /// From the primary's death to the guest running at the backup, ms.
    failover_ms: Option<f64>,
}

/// How the primary goes away at the end of a protected run.
#[derive(Clone, Copy, PartialEq)]
enum Failure {
    Killed,
    LinkCut,
}

struct Paths {
    dir: PathBuf,
    a: PathBuf,
    b: PathBuf,
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Kills and reaps `child` (a VMM the run is done with).
fn end(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `xcloud receive --standby` in the destination namespace, with `extra` arguments.
fn start_backup(paths: &Paths, hosts: &Hosts, socket: &Path, extra: &[String]) -> Result<(Child, Receiver<String>)> {
    let listen = format!("{}:{PORT}", hosts.dst_ip);
    let mut args = vec![
        "receive".to_string(),
        "--standby".into(),
        "--listen".into(),
        listen,
        "--identity".into(),
        path(&paths.b),
        "--peer".into(),
        path(&paths.a.join("cert.der")),
        "--api".into(),
        path(socket),
    ];
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn(Some(&hosts.dst), &args)
}

/// The fence arguments of a VMM that reaches `etcd` at `url`, for run `tag`.
fn fence_args(url: &str, tag: &str) -> Vec<String> {
    vec![
        "--fence-etcd".into(),
        url.into(),
        "--fence-key".into(),
        format!("/xcloud/fence/bench-{tag}"),
    ]
}

/// `ctl protect` toward the backup, asking again while it is not listening yet.
fn protect(paths: &Paths, hosts: &Hosts, socket: &Path, bench: &HaBench) -> Result<Response> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = call(
            socket,
            Op::Protect {
                to: format!("{}:{PORT}", hosts.dst_ip),
                identity: paths.a.clone(),
                peer_cert: paths.b.join("cert.der"),
                interval_ms: Some(bench.interval_ms),
                heartbeat_ms: Some(bench.heartbeat_ms),
                timeout_ms: None,
                compress: false,
            },
        )?;
        let error = answer.error.clone().unwrap_or_default();
        if answer.ok {
            return Ok(answer);
        }
        if !error.contains("cannot connect") || Instant::now() > deadline {
            bail!("protect failed: {error}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the VMM behind `socket` runs its VM; returns how long that took from `since`.
fn running_at(socket: &Path, since: Instant, limit: Duration) -> Result<f64> {
    loop {
        if let Ok(answer) = call(socket, Op::Status) {
            if answer.state.as_deref() == Some("running") {
                return Ok(since.elapsed().as_secs_f64() * 1e3);
            }
        }
        if since.elapsed() > limit {
            bail!("the backup did not run the VM within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The guest's iterations per second between the first and the last of `lines`.
fn loop_rate(lines: &[String]) -> Result<f64> {
    let points: Vec<(u64, u64)> = lines
        .iter()
        .filter(|l| l.starts_with("heartbeat n="))
        .filter_map(|l| Some((field(l, "n=")?, field(l, "uptime_ms=")?)))
        .collect();
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        bail!("no heartbeat reports");
    };
    if last.1 <= first.1 {
        bail!("too few heartbeat reports");
    }
    Ok((last.0 - first.0) as f64 / ((last.1 - first.1) as f64 / 1e3))
}

/// One run of the heartbeat guest, protected (and then failed over as `failure` says) or not;
/// both ends fenced through `fence` if given.
fn guest_run(
    paths: &Paths,
    hosts: &Hosts,
    bench: &HaBench,
    protected: Option<Failure>,
    tag: &str,
    fence: Option<&WitnessEtcd>,
) -> Result<GuestRun> {
    let socket = paths.dir.join(format!("primary-{tag}.sock"));
    let backup_socket = paths.dir.join(format!("backup-{tag}.sock"));
    let backup_fence = fence.map_or(Vec::new(), |etcd| fence_args(&etcd.url_from_dst, tag));
    let mut backup = match protected {
        Some(_) => Some(start_backup(paths, hosts, &backup_socket, &backup_fence)?),
        None => None,
    };
    let mem = format!("{}M", bench.mem >> 20);
    let (set, rate) = (bench.set_mib.to_string(), bench.rate.to_string());
    let mut args = vec!["run".to_string(), "--mem".into(), mem, "--api".into(), path(&socket)];
    if let Some(etcd) = fence {
        args.extend(fence_args(&etcd.url_from_src, tag));
    }
    args.extend(["heartbeat".into(), "--".into(), "0".into(), set, rate]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut primary, out) = spawn(Some(&hosts.src), &args)?;
    let result = (|| -> Result<GuestRun> {
        line_with(&out, "heartbeat n=", Duration::from_secs(30))?;
        wait_for_socket(&socket)?;
        if protected.is_some() {
            protect(paths, hosts, &socket, bench)?;
        }
        // The dirtier at its rate, the initial copy behind.
        std::thread::sleep(Duration::from_millis(1000));
        while out.try_recv().is_ok() {}
        let status = |socket: &Path| -> Result<xcloud_migration::ProtectionStatus> {
            call(socket, Op::Status)?.protection.context("no protection in status")
        };
        let started = Instant::now();
        let first = match protected {
            Some(_) => Some(status(&socket)?),
            None => None,
        };
        let (mut commit, mut pages, mut samples) = (0.0, 0.0, 0u32);
        let mut lines = Vec::new();
        while started.elapsed() < Duration::from_secs(bench.seconds) {
            std::thread::sleep(Duration::from_millis(250));
            lines.extend(out.try_iter());
            if protected.is_some() {
                let s = status(&socket)?;
                if let Some(why) = &s.ended {
                    bail!("protection ended during the run: {why}");
                }
                commit += s.commit_ms;
                pages += s.last_pages as f64;
                samples += 1;
            }
        }
        let mut run = GuestRun {
            iterations_per_s: loop_rate(&lines)?,
            ..Default::default()
        };
        if let (Some(first), Some(failure)) = (first, protected) {
            let last = status(&socket)?;
            let elapsed = started.elapsed().as_secs_f64();
            run.checkpoints_per_s = (last.acked_epoch - first.acked_epoch) as f64 / elapsed;
            run.mean_pause_us = last.mean_pause_us as f64;
            run.max_pause_us = last.max_pause_us as f64;
            run.commit_ms = commit / samples.max(1) as f64;
            run.mean_pages = pages / samples.max(1) as f64;
            run.mb_per_s = last.bytes_per_s / 1e6;
            let died = Instant::now();
            match failure {
                Failure::Killed => end(&mut primary),
                Failure::LinkCut => hosts.cut()?,
            }
            run.failover_ms = Some(running_at(&backup_socket, died, Duration::from_secs(10))?);
            if let Some((_, backup_out)) = &backup {
                line_with(backup_out, "heartbeat n=", Duration::from_secs(5)).context("the guest at the backup")?;
            }
        }
        Ok(run)
    })();
    end(&mut primary);
    if let Some((child, _)) = &mut backup {
        end(child);
    }
    result
}

/// Median of `values` (0 for none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The rows of one link: unprotected and protected runs, alternating.
struct LinkRows {
    name: String,
    plain: Vec<GuestRun>,
    protected: Vec<GuestRun>,
    cut_failover_ms: Option<f64>,
    fenced_cut_failover_ms: Option<f64>,
    request: Option<(f64, f64)>,
}

/// The median GET latency (ms) of `count` requests to the httpd guest at 10.74.0.2 from
/// namespace `ns`, one connection each (as `get_count` clients do).
fn request_latency(ns: &str, count: usize) -> Result<f64> {
    let times = Hosts::in_ns(ns, move || {
        use std::io::{Read, Write};
        let mut times = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            let mut s = std::net::TcpStream::connect_timeout(&"10.74.0.2:80".parse()?, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /count HTTP/1.1\r\nConnection: close\r\n\r\n")?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(times)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread failed"))??;
    Ok(median(times))
}

/// Request latency to the httpd guest, unprotected then protected (median ms each).
fn request_run(paths: &Paths, hosts: &Hosts, bench: &HaBench) -> Result<(f64, f64)> {
    for ns in [&hosts.src, &hosts.dst] {
        for args in [
            &["-n", ns, "tuntap", "add", "xc0", "mode", "tap", "vnet_hdr"][..],
            &["-n", ns, "addr", "add", "10.74.0.1/24", "dev", "xc0"],
        ] {
            let ok = std::process::Command::new("ip").args(args).status()?;
            if !ok.success() {
                bail!("ip {args:?} failed");
            }
        }
    }
    let socket = paths.dir.join("httpd.sock");
    let backup_socket = paths.dir.join("httpd-backup.sock");
    let (mut backup, _) = start_backup(paths, hosts, &backup_socket, &[])?;
    let (mut primary, out) = spawn(
        Some(&hosts.src),
        &[
            "run",
            "--api",
            &path(&socket),
            "--net",
            "tap=xc0,mac=02:00:00:00:00:44",
            "httpd",
            "--",
            "10.74.0.2/24",
            "80",
            "4",
        ],
    )?;
    let result = (|| -> Result<(f64, f64)> {
        line_with(&out, "httpd: serving", Duration::from_secs(30))?;
        wait_for_socket(&socket)?;
        request_latency(&hosts.src, 20)?;
        let plain = request_latency(&hosts.src, 200)?;
        protect(paths, hosts, &socket, bench)?;
        let protected = request_latency(&hosts.src, 200)?;
        Ok((plain, protected))
    })();
    end(&mut primary);
    end(&mut backup);
    result
}

/// Runs the benchmark and prints its tables.
pub fn ha(bench: &HaBench) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("xcloud-bench-ha-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let paths = Paths {
        a: dir.join("a"),
        b: dir.join("b"),
        dir: dir.clone(),
    };
    xcloud_migration::tls::Identity::generate(&paths.a, "bench-a", true)?;
    xcloud_migration::tls::Identity::generate(&paths.b, "bench-b", true)?;
    let links = [
        ("veth".to_string(), LinkSpec::default()),
        (
            "1 Gbit/s, 20 ms".to_string(),
            LinkSpec::wan(1_000_000_000, Duration::from_millis(20)),
        ),
    ];
    let runs = bench.runs.max(1);
    let bar = ProgressBar::new((links.len() * (2 * runs + 3)) as u64).with_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for (name, spec) in links {
        let hosts = Hosts::new(spec).context("cannot set up the namespaces (needs root)")?;
        let mut row = LinkRows {
            name: name.clone(),
            plain: Vec::new(),
            protected: Vec::new(),
            cut_failover_ms: None,
            fenced_cut_failover_ms: None,
            request: None,
        };
        for run in 0..runs {
            bar.set_message(format!("{name}: run {} unprotected", run + 1));
            row.plain
                .push(guest_run(&paths, &hosts, bench, None, &format!("p{run}"), None)?);
            bar.inc(1);
            bar.set_message(format!("{name}: run {} protected", run + 1));
            row.protected.push(guest_run(
                &paths,
                &hosts,
                bench,
                Some(Failure::Killed),
                &format!("r{run}"),
                None,
            )?);
            bar.inc(1);
        }
        bar.set_message(format!("{name}: request latency"));
        row.request = Some(request_run(&paths, &hosts, bench)?);
        bar.inc(1);
        drop(hosts);
        // A cut link cannot be mended for the next run: this one gets namespaces of its own.
        bar.set_message(format!("{name}: link cut"));
        let hosts = Hosts::new(spec).context("cannot set up the namespaces (needs root)")?;
        let cut = guest_run(&paths, &hosts, bench, Some(Failure::LinkCut), "cut", None)?;
        row.cut_failover_ms = cut.failover_ms;
        bar.inc(1);
        drop(hosts);
        // Fenced: etcd on a third host that each reaches over its own link; the backup takes
        // over only once it holds the fence.
        bar.set_message(format!("{name}: link cut, fenced"));
        let hosts = Hosts::new(spec).context("cannot set up the namespaces (needs root)")?;
        let witness = hosts.add_witness()?;
        let etcd_dir = dir.join("etcd");
        let _ = std::fs::remove_dir_all(&etcd_dir);
        std::fs::create_dir_all(&etcd_dir)?;
        let etcd = witness.start_etcd(&etcd_dir)?;
        let fenced = guest_run(&paths, &hosts, bench, Some(Failure::LinkCut), "fenced", Some(&etcd))?;
        row.fenced_cut_failover_ms = fenced.failover_ms;
        drop(etcd);
        drop(witness);
        bar.inc(1);
        rows.push(row);
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&dir);
    print_tables(&rows, bench);
    Ok(())
}

fn print_tables(rows: &[LinkRows], bench: &HaBench) {
    println!(
        "xcloud bench ha: {} MiB guest writing {} MiB at {} MiB/s, checkpoint every {} ms, heartbeat {} ms, {} s per run, medians of {} runs",
        bench.mem >> 20,
        bench.set_mib,
        bench.rate,
        bench.interval_ms,
        bench.heartbeat_ms,
        bench.seconds,
        rows.first().map_or(0, |r| r.protected.len())
    );
    println!();
    println!("| link | checkpoints/s | pages each | pause mean / max | commit | link MB/s | guest loop, protected / unprotected | slowdown |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in rows {
        let m = |f: fn(&GuestRun) -> f64| median(row.protected.iter().map(f).collect());
        let plain = median(row.plain.iter().map(|r| r.iterations_per_s).collect());
        let protected = m(|r| r.iterations_per_s);
        let ratio = protected / plain.max(1.0);
        println!(
            "| {} | {:.1} | {:.0} | {:.0} / {:.0} us | {:.1} ms | {:.1} | {:.3} | {:.1}% |",
            row.name,
            m(|r| r.checkpoints_per_s),
            m(|r| r.mean_pages),
            m(|r| r.mean_pause_us),
            m(|r| r.max_pause_us),
            m(|r| r.commit_ms),
            m(|r| r.mb_per_s),
            ratio,
            (1.0 - ratio) * 100.0
        );
    }
    println!();
    println!("| link | failover, primary killed | failover, link cut | link cut, fenced | 3 x heartbeat | request, unprotected | protected | added |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in rows {
        let killed = median(row.protected.iter().filter_map(|r| r.failover_ms).collect());
        let (plain, protected) = row.request.unwrap_or_default();
        println!(
            "| {} | {:.1} ms | {} | {} | {} ms | {:.0} us | {:.1} ms | {:.1} ms |",
            row.name,
            killed,
            row.cut_failover_ms.map_or("-".into(), |ms| format!("{ms:.1} ms")),
            row.fenced_cut_failover_ms
                .map_or("-".into(), |ms| format!("{ms:.1} ms")),
            3 * bench.heartbeat_ms,
            plain * 1e3,
            protected,
            protected - plain
        );
    }
}
