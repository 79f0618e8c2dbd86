//! Live migration between "hosts": network namespaces joined by an emulated WAN link (20 ms round
//! trip, a rate limit) or a plain veth link, the source VMM in one, the destination in the
//! other, TLS with pinned certificates between them.

mod common;
use common::hosts::*;
use common::*;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use xcloud::netlab::Hosts;

fn setup(name: &str) -> Setup {
    setup_in("migration", name)
}

fn receive(hosts: &Hosts, s: &Setup, peer: &Path) -> (Proc, Receiver<String>) {
    let listen = format!("{}:7710", hosts.dst_ip);
    spawn_in(
        &hosts.dst,
        &strs(&peer_args(&["receive", "--listen"], &listen, &s.b, peer, &[])),
    )
}

fn migrate(hosts: &Hosts, s: &Setup, extra: &[&str]) -> (bool, String) {
    let to = format!("{}:7710", hosts.dst_ip);
    // ctl talks to the source over its Unix socket; the source VMM (in its namespace) dials out.
    ctl(&s.socket, &strs(&peer_args(&["migrate"], &to, &s.a, &s.b, extra)))
}

/// `migrate` on a thread, for tests that break something while it runs.
fn migrate_in_background(hosts: &Hosts, s: &Setup, extra: &[&str]) -> std::thread::JoinHandle<(bool, String)> {
    let socket = s.socket.clone();
    let to = format!("{}:7710", hosts.dst_ip);
    let args = peer_args(&["migrate"], &to, &s.a, &s.b, extra);
    std::thread::spawn(move || ctl(&socket, &strs(&args)))
}

#[test]
fn a_running_heartbeat_moves_to_another_host_and_keeps_counting() {
    let hosts = wan(1_000_000_000);
    let s = setup("heartbeat");
    let (_dst, dst_out) = receive(&hosts, &s, &s.a);
    // With a 16 MiB working set written at 64 MiB/s, whose every page the guest checks each
    // 250 ms lap: a page lost on the way stops it.
    let (mut src, _src_out, first) = start_source(
        &hosts,
        &s,
        &["--vcpus", "2", "heartbeat", "--", "0", "16", "64"],
        "heartbeat n=",
    );
    let before = count(&first, "n=");
    std::thread::sleep(Duration::from_millis(300));
    // Compressed: the heartbeat's pages are mostly zeros, so far fewer bytes cross the link.
    let (ok, text) = migrate(&hosts, &s, &["--compress"]);
    assert!(ok && text.contains("migrated to 10.231."), "{text}");
    let sent_mib = number_before(&text, " MiB sent");
    assert!(sent_mib < 1.0, "compressed pages: {text}");
    let (status, err) = wait_exit(&mut src, Duration::from_secs(10));
    assert_eq!(status, Some(0), "the source ends once the destination runs: {err}");
    assert!(err.contains("guest migrated to"), "{err}");
    let first = next_line(&dst_out, "heartbeat n=");
    let second = next_line(&dst_out, "heartbeat n=");
    assert!(
        count(&first, "n=") > before,
        "the count continues: {before} then {first}"
    );
    assert!(
        count(&second, "n=") > count(&first, "n="),
        "and never goes backwards: {first} / {second}"
    );
    // The guest-observed stall across the move stays small (the budget is 50 ms).
    assert!(count(&first, "max_gap_us=") < 250_000, "{first}");
}

/// Migrates a guest dirtying 256 MiB/s over a 1 Gbit/s link with `flags`; checks that it
/// counts on at the destination and returns the summary.
fn migrate_a_fast_dirtier(name: &str, flags: &[&str]) -> String {
    let hosts = wan(1_000_000_000);
    let s = setup(name);
    let (mut dst, dst_out) = receive(&hosts, &s, &s.a);
    let (mut src, _src_out, first) = start_source(
        &hosts,
        &s,
        &["--mem", "256M", "heartbeat", "--", "0", "64", "256"],
        "heartbeat n=",
    );
    let before = count(&first, "n=");
    let (ok, text) = migrate(&hosts, &s, flags);
    assert!(ok && text.contains("migrated to"), "{text}");
    eprintln!("{text}");
    assert!(
        count(&next_line(&dst_out, "heartbeat n="), "n=") > before,
        "the guest counts on at the destination"
    );
    // Three more reports: several laps of the working set, each page checked by the guest
    // against what it wrote before the move (a lost or stale page would stop it, status 101).
    for _ in 0..3 {
        next_line(&dst_out, "heartbeat n=");
    }
    assert!(dst.try_wait().expect("wait").is_none(), "the guest still runs");
    let (status, err) = wait_exit(&mut src, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
    text
}

/// The number in `text` right before `key` (after the last space before it).
fn number_before(text: &str, key: &str) -> f64 {
    text.split(key)
        .next()
        .filter(|_| text.contains(key))
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before '{key}' in {text}"))
}

/// The number in `text` right after `key` and before `end`.
fn number_after(text: &str, key: &str, end: char) -> f64 {
    text.split(key)
        .nth(1)
        .and_then(|t| t.split(end).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}' in {text}"))
}

#[test]
fn a_guest_that_dirties_faster_than_the_link_is_throttled_until_it_converges() {
    // 256 MiB/s of dirtying against a 1 Gbit/s link: without throttling no round gets smaller.
    let text = migrate_a_fast_dirtier("throttle", &[]);
    assert!(
        number_after(&text, "throttled up to ", '%') > 0.0,
        "the guest had to be throttled: {text}"
    );
}

#[test]
fn a_guest_that_dirties_faster_than_the_link_converges_by_post_copy_when_asked() {
    let text = migrate_a_fast_dirtier("converge", &["--postcopy"]);
    assert!(text.contains("by post-copy"), "{text}");
    assert_eq!(number_after(&text, "throttled up to ", '%'), 0.0, "{text}");
    // At the switch the whole 64 MiB working set is dirty again (it is rewritten every 250 ms,
    // a round takes seconds), and 64 MiB need at least 537 ms at 1 Gbit/s: a downtime well
    // under that shows the pages follow the switch. (It is 30-37 ms on a quiet host; a busy
    // shared one saw 71 ms, and CI 164 ms, so the bound is the physics, not the typical run.)
    assert!(
        number_after(&text, "downtime ", ' ') < 400.0,
        "the switch does not wait for the pages left: {text}"
    );
}

#[test]
fn post_copy_hands_the_guest_over_at_once_and_its_pages_follow() {
    let hosts = wan(1_000_000_000);
    let s = setup("postcopy");
    let (_dst, dst_out) = receive(&hosts, &s, &s.a);
    let (mut src, _src_out, first) = start_source(
        &hosts,
        &s,
        &["--mem", "256M", "--vcpus", "2", "heartbeat", "--", "0", "64", "64"],
        "heartbeat n=",
    );
    let before = count(&first, "n=");
    let (ok, text) = migrate(&hosts, &s, &["--postcopy-now"]);
    assert!(ok && text.contains("by post-copy"), "{text}");
    let downtime = number_after(&text, "downtime ", ' ');
    // Waiting for memory would take the whole transfer (about 1300 ms here). Alone this switch
    // takes 28-32 ms; beside the other tests of this file on 2 cores it took 50.9 and 53.6 ms
    // in two clean CI runs, so the bound leaves room for a busy host, as the converge test's.
    assert!(downtime < 150.0, "the switch does not wait for memory: {text}");
    let first = count(&next_line(&dst_out, "heartbeat n="), "n=");
    let second = count(&next_line(&dst_out, "heartbeat n="), "n=");
    assert!(first > before && second > first, "{before} -> {first} -> {second}");
    let (status, err) = wait_exit(&mut src, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
}

#[test]
fn post_copy_sends_the_pages_the_guest_waits_for_first() {
    // The guest writes its 48 MiB working set at 200 MiB/s; the link carries ~12 MB/s, so in
    // post-copy the guest soon touches pages the stream has not brought yet and must ask.
    let hosts = wan(100_000_000);
    let s = setup("postcopy-requests");
    let (_dst, dst_out) = receive(&hosts, &s, &s.a);
    let (mut src, _src_out, _) = start_source(
        &hosts,
        &s,
        &["--mem", "128M", "dirty", "--", "48", "200"],
        "dirty: working set",
    );
    let (ok, text) = migrate(&hosts, &s, &["--postcopy-now"]);
    assert!(ok, "{text}");
    let asked = number_before(&text, " asked for by the guest");
    assert!(asked > 0.0, "the guest never had to ask: {text}");
    eprintln!("{text}");
    // The guest goes on writing at the destination once its memory is all there.
    let line = next_line(&dst_out, "dirty: ");
    assert!(line.contains("MiB written"), "{line}");
    let (status, err) = wait_exit(&mut src, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
}

#[test]
fn post_copy_keeps_the_source_paused_with_its_state_when_the_destination_dies() {
    // 128 MiB over 100 Mbit/s: the pages take about 10 s to follow the switch.
    let hosts = wan(100_000_000);
    let s = setup("postcopy-dst-dies");
    let (mut dst, dst_out) = receive(&hosts, &s, &s.a);
    let (mut src, src_out, _) = start_source(
        &hosts,
        &s,
        &["--mem", "256M", "dirty", "--", "128", "1"],
        "dirty: working set",
    );
    let migration = migrate_in_background(&hosts, &s, &["--postcopy-now"]);
    // The destination runs the guest while its pages are still coming (the source's status
    // says how many are left); then it dies.
    next_line(&dst_out, "dirty:");
    let status = ctl(&s.socket, &["status"]).1;
    assert!(
        status.contains("migrating: post-copy") && status.contains(" left"),
        "{status}"
    );
    let _ = dst.kill();
    let _ = dst.wait();
    let (ok, text) = migration.join().expect("ctl thread");
    assert!(!ok && text.contains("stays PAUSED"), "{text}");
    // The source kept the whole guest as of the switch: resumed, it goes on from there.
    assert!(ctl(&s.socket, &["status"]).1.starts_with("state: paused"));
    let written = |line: &str| number_before(line, " MiB written");
    std::thread::sleep(Duration::from_millis(300));
    let before = src_out
        .try_iter()
        .filter(|l| l.contains("MiB written"))
        .map(|l| written(&l))
        .last()
        .unwrap_or(0.0);
    let (resumed, answer) = ctl(&s.socket, &["resume"]);
    assert!(resumed, "{answer}");
    let after = written(&next_line(&src_out, "dirty: "));
    assert!(
        after > before,
        "the guest writes on after the resume: {before} -> {after} MiB"
    );
    ctl(&s.socket, &["stop"]);
    wait_exit(&mut src, Duration::from_secs(10));
}

#[test]
fn a_snapshot_at_the_destination_during_post_copy_has_all_the_memory() {
    // The destination runs the guest while pages still arrive (64 MiB over 100 Mbit/s: ~5 s);
    // a snapshot asked of it then waits for them all (the restored working set checks every
    // page within a lap).
    let hosts = wan(100_000_000);
    let s = setup("postcopy-snapshot");
    let dst_socket = s.dir.join("dst.sock");
    let api = ["--api", dst_socket.to_str().expect("utf-8")];
    let listen = format!("{}:7710", hosts.dst_ip);
    let args = peer_args(&["receive", "--listen"], &listen, &s.b, &s.a, &api);
    let (mut dst, _) = spawn_in(&hosts.dst, &strs(&args));
    let (mut src, _src_out, _) = start_source(
        &hosts,
        &s,
        &["--mem", "128M", "dirty", "--", "64", "64"],
        "dirty: working set",
    );
    let migration = migrate_in_background(&hosts, &s, &["--postcopy-now"]);
    // At once when it runs there, long before its pages are all in.
    wait_socket(&dst_socket);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctl(&dst_socket, &["status"]).1.starts_with("state: running") {
        assert!(Instant::now() < deadline, "the destination never ran the guest");
        std::thread::sleep(Duration::from_millis(5));
    }
    let snap = s.dir.join("snap");
    let (ok, text) = ctl(&dst_socket, &["snapshot", snap.to_str().expect("utf-8")]);
    assert!(ok, "{text}");
    let (ok, text) = migration.join().expect("ctl thread");
    assert!(ok && text.contains("by post-copy"), "{text}");
    wait_exit(&mut src, Duration::from_secs(10));
    let _ = dst.kill();

    let mut cmd = xcloud();
    cmd.arg("restore").arg(&snap);
    let (mut restored, out) = spawn_lines(cmd);
    assert_keeps_running(&mut restored, &out, Duration::from_millis(2500), "MiB written");
}

#[test]
fn post_copy_stops_the_destination_when_the_source_dies() {
    // 128 MiB over 100 Mbit/s: the pages take about 10 s to follow the switch.
    let hosts = wan(100_000_000);
    let s = setup("postcopy-broken");
    let (mut dst, dst_out) = receive(&hosts, &s, &s.a);
    let (mut src, _src_out, _) = start_source(
        &hosts,
        &s,
        &["--mem", "256M", "dirty", "--", "128", "1"],
        "dirty: working set",
    );
    let migration = migrate_in_background(&hosts, &s, &["--postcopy-now"]);
    // The destination runs the guest (it prints) while its pages are still coming; then the
    // source dies.
    next_line(&dst_out, "dirty:");
    let _ = src.kill();
    let _ = src.wait();
    let (ok, text) = migration.join().expect("ctl thread");
    assert!(!ok, "{text}");
    let (status, err) = wait_exit(&mut dst, Duration::from_secs(40));
    assert_eq!(status, Some(126), "{err}");
    assert!(err.contains("post-copy stream broke"), "{err}");
}

#[test]
fn wrong_credentials_are_refused_and_the_source_keeps_running() {
    let hosts = lan();
    let s = setup("credentials");
    let stranger = keygen(&s.dir, "stranger");
    // The destination pins a certificate that is not the source's.
    let (_dst, _) = receive(&hosts, &s, &stranger);
    let (mut src, src_out, first) = start_source(&hosts, &s, &["heartbeat"], "heartbeat n=");
    let before = count(&first, "n=");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, text) = migrate(&hosts, &s, &[]);
    assert!(
        !ok && text.contains("migration to") && text.contains("failed"),
        "{text}"
    );
    assert_eq!(ctl(&s.socket, &["status"]).1, "state: running, 1 vCPUs, 64 MiB\n");
    assert!(
        count(&next_line(&src_out, "heartbeat n="), "n=") > before,
        "the source runs on"
    );

    // The source pins a certificate the destination does not have: refused at the handshake.
    let to = format!("{}:7710", hosts.dst_ip);
    let wrong_peer = stranger.join("cert.der");
    let args = [
        "migrate",
        &to,
        "--identity",
        s.a.to_str().expect("utf-8"),
        "--peer",
        wrong_peer.to_str().expect("utf-8"),
    ];
    let (ok, text) = ctl(&s.socket, &args);
    assert!(!ok && text.contains("TLS handshake"), "{text}");
    assert_eq!(ctl(&s.socket, &["status"]).1, "state: running, 1 vCPUs, 64 MiB\n");
    ctl(&s.socket, &["stop"]);
    wait_exit(&mut src, Duration::from_secs(10));
}

/// A 128 MiB working set over a 100 Mbit/s link: the migration takes seconds.
fn slow_migration(name: &str) -> (Hosts, Setup, Proc, Receiver<String>, Proc) {
    let hosts = wan(100_000_000);
    let s = setup(name);
    let (dst, _) = receive(&hosts, &s, &s.a);
    let (src, src_out, _) = start_source(
        &hosts,
        &s,
        &["--mem", "256M", "dirty", "--", "128", "8"],
        "dirty: working set",
    );
    (hosts, s, src, src_out, dst)
}

fn assert_source_runs_on(s: &Setup, src_out: &Receiver<String>) {
    assert_eq!(ctl(&s.socket, &["status"]).1, "state: running, 1 vCPUs, 256 MiB\n");
    let written = |line: &str| -> u64 { line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0) };
    let a = next_line(src_out, "dirty:");
    let b = next_line(src_out, "dirty:");
    assert!(written(&b) > written(&a), "the guest still works: {a} / {b}");
}

#[test]
fn the_source_keeps_running_when_the_destination_dies_mid_stream() {
    let (hosts, s, mut src, src_out, mut dst) = slow_migration("killed");
    let migration = migrate_in_background(&hosts, &s, &[]);
    std::thread::sleep(Duration::from_millis(700));
    // Nothing may pause, resume, snapshot or migrate the VM under a running migration (a
    // resume during the switch would run it at both ends); status still answers.
    for request in [
        &["pause"][..],
        &["resume"],
        &["snapshot", "/tmp/xcloud-no-snapshot"],
        &["migrate", "10.0.0.9:1", "--identity", "x", "--peer", "y"],
    ] {
        let (ok, text) = ctl(&s.socket, request);
        assert!(
            !ok && text.contains("a migration of this VM is running"),
            "{request:?}: {text}"
        );
    }
    assert!(ctl(&s.socket, &["status"]).1.contains("migrating: "));
    std::thread::sleep(Duration::from_millis(800));
    let _ = dst.kill();
    let _ = dst.wait();
    let (ok, text) = migration.join().expect("ctl thread");
    assert!(!ok && text.contains("failed"), "{text}");
    assert_source_runs_on(&s, &src_out);
    ctl(&s.socket, &["stop"]);
    wait_exit(&mut src, Duration::from_secs(10));
}

#[test]
fn the_source_keeps_running_when_the_link_is_cut() {
    let (hosts, s, mut src, src_out, _dst) = slow_migration("cut");
    let migration = migrate_in_background(&hosts, &s, &["--timeout", "2000"]);
    std::thread::sleep(Duration::from_millis(1500));
    hosts.cut().expect("cut the link");
    let (ok, text) = migration.join().expect("ctl thread");
    assert!(!ok && text.contains("failed"), "{text}");
    assert_source_runs_on(&s, &src_out);
    ctl(&s.socket, &["stop"]);
    wait_exit(&mut src, Duration::from_secs(10));
}

#[test]
fn a_hostile_stream_is_refused_and_nothing_runs_at_the_destination() {
    use std::io::Write;
    use xcloud_migration::wire;
    let hosts = lan();
    let s = setup("hostile");
    let (mut dst, dst_out) = receive(&hosts, &s, &s.a);
    // The test itself is the source here, from the source namespace: right credentials, then
    // a stream of lies.
    let result = {
        let mut stream = connect_as_source(&hosts, &s, 7710);
        let hello = wire::Hello {
            mem_bytes: 16 << 20,
            vcpus: 1,
            tsc_khz: 1,
            cpu_vendor: xcloud_cpu_vendor(),
            cpu_features: xcloud_migration::cpu_features(),
        };
        wire::write_frame(&mut stream, wire::Kind::Hello, &hello.encode()).expect("hello");
        stream.flush().expect("flush");
        let mut buf = Vec::new();
        assert_eq!(
            wire::read_frame(&mut stream, &mut buf).expect("accept"),
            wire::Kind::Accept
        );
        // A page far outside the announced 16 MiB.
        let mut pages = Vec::new();
        wire::push_page(&mut pages, 1 << 40, &[1u8; wire::PAGE]);
        wire::write_frame(&mut stream, wire::Kind::Pages, &pages).expect("pages");
        stream.flush().expect("flush");
        wire::read_frame(&mut stream, &mut buf)
    };
    assert!(
        matches!(result, Err(wire::WireError::Refused(ref r)) if r.contains("outside")),
        "{result:?}"
    );
    let (status, err) = wait_exit(&mut dst, Duration::from_secs(10));
    assert_eq!(status, Some(1), "{err}");
    assert!(
        err.contains("cannot receive the VM") && err.contains("outside"),
        "{err}"
    );
    assert!(dst_out.try_recv().is_err(), "no guest output at the destination");
}

fn xcloud_cpu_vendor() -> [u8; 12] {
    let r = core::arch::x86_64::__cpuid(0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

#[test]
fn a_destination_waiting_for_its_source_ends_on_every_termination_signal() {
    let dir = scratch("migration", "signals");
    let (a, b) = (keygen(&dir, "host-a"), keygen(&dir, "host-b"));
    for (signal, name) in [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        let mut cmd = xcloud();
        cmd.args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--identity",
            b.to_str().expect("utf-8"),
            "--peer",
            a.join("cert.der").to_str().expect("utf-8"),
        ]);
        let mut child = Proc(cmd.stderr(std::process::Stdio::piped()).spawn().expect("spawn"));
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: sends a signal to our own child, which is alive (Proc kills it on drop).
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} did not end the waiting destination"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(130), "{name}");
    }
}

#[test]
fn clients_that_stall_their_handshake_do_not_keep_the_source_out() {
    let hosts = lan();
    let s = setup("stallers");
    let (_dst, dst_out) = receive(&hosts, &s, &s.a);
    std::thread::sleep(Duration::from_millis(300));
    // Four peers that connect first and never finish a handshake: one silent, three that
    // trickle a TLS record a byte a second (each read alone is well inside any timeout).
    let script = format!(
        "exec 3<>/dev/tcp/{}/7710; [ \"$1\" = silent ] || {{ printf '\\x16\\x03\\x01\\x00\\xff' >&3; \
         while sleep 1; do printf 'a' >&3 || exit; done; }}; sleep 120",
        hosts.dst_ip
    );
    let stallers: Vec<Proc> = ["silent", "slow", "slow", "slow"]
        .iter()
        .map(|mode| {
            let mut cmd = xcloud::netlab::command_in(Some(&hosts.src), "bash");
            cmd.args(["-c", &script, "staller", mode]);
            Proc(cmd.spawn().expect("bash"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (mut src, _src_out, _) = start_source(&hosts, &s, &["heartbeat"], "heartbeat n=");
    let t = Instant::now();
    let (ok, text) = migrate(&hosts, &s, &[]);
    assert!(ok, "{text}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the source waited {:?}",
        t.elapsed()
    );
    next_line(&dst_out, "heartbeat n=");
    let (status, _) = wait_exit(&mut src, Duration::from_secs(10));
    assert_eq!(status, Some(0));
    drop(stallers);
}

/// Waits (up to 10 s) on a packet socket bound to `dev` in namespace `ns` for a RARP frame
/// from `mac`.
fn watch_for_rarp(ns: &str, dev: &'static str, mac: [u8; 6]) -> std::thread::JoinHandle<anyhow::Result<bool>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let watcher = Hosts::in_ns(ns, move || {
        let name = std::ffi::CString::new(dev)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(index != 0, "no {dev}");
        let proto = (0x8035u16).to_be();
        // SAFETY: socket() returns a new descriptor or -1.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
        anyhow::ensure!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: binds fd to a live, correctly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        anyhow::ensure!(r == 0, "bind: {}", std::io::Error::last_os_error());
        let _ = ready_tx.send(());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 128];
        while Instant::now() < deadline {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            if unsafe { libc::poll(&mut p, 1, 200) } <= 0 {
                continue;
            }
            // SAFETY: reads into a live buffer of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[6..12] == mac && buf[12..14] == [0x80, 0x35] {
                // SAFETY: fd is ours.
                unsafe { libc::close(fd) };
                return Ok(true);
            }
        }
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        Ok(false)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the RARP watcher is ready");
    watcher
}

#[test]
fn httpd_with_its_nic_moves_keeps_its_mac_announces_it_and_counts_on() {
    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
    let hosts = lan();
    let s = setup("nic");
    add_vm_taps(&hosts);
    let (_dst, _dst_out) = receive(&hosts, &s, &s.a);
    let (mut src, _src_out, first) = start_source(
        &hosts,
        &s,
        &httpd_on_tap("tap=xc0,mac=02:00:00:00:00:42", &["4"]),
        "httpd: serving",
    );
    assert!(first.contains("10.74.0.2"), "{first}");
    let before = get_count(&hosts.src, "10.74.0.2:80");
    assert_eq!(get_count(&hosts.src, "10.74.0.2:80"), before + 1);
    let rarp = watch_for_rarp(&hosts.dst, "xc0", MAC);
    let (ok, text) = migrate(&hosts, &s, &[]);
    assert!(ok && text.contains("migrated to"), "{text}");
    let (status, err) = wait_exit(&mut src, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
    assert!(
        rarp.join().expect("watcher").expect("watching"),
        "the destination announced the VM's MAC"
    );
    // The same server, its count carried: one more than the last answer, never less.
    assert_eq!(get_count(&hosts.dst, "10.74.0.2:80"), before + 2);
}

#[test]
fn a_guest_writing_its_disk_moves_with_it_and_the_image_ends_byte_for_byte() {
    const BYTES: u64 = 32 << 20;
    let hosts = lan();
    let s = setup("disk");
    let (image, dst_dir) = disk_dirs(&s);
    // A destination without a disk directory refuses the VM, and the source goes on.
    let (_refuser, _) = receive(&hosts, &s, &s.a);
    let disk = image.to_str().expect("utf-8").to_string();
    let (mut src, src_out, _) = start_source(&hosts, &s, &["--disk", &disk, "heartbeat"], "heartbeat n=");
    let (ok, text) = migrate(&hosts, &s, &[]);
    assert!(!ok && text.contains("no disk directory"), "{text}");
    assert!(next_line(&src_out, "heartbeat n=").contains("n="), "the source runs on");
    let _ = ctl(&s.socket, &["stop"]);
    let _ = wait_exit(&mut src, Duration::from_secs(10));
    drop(_refuser);

    // The guest writes 32 MiB at 16 MiB/s; the VM moves after half a second, the writes go on
    // at the destination, which holds every byte of them in the end.
    let listen = format!("{}:7710", hosts.dst_ip);
    let disk_dir = ["--disk-dir", dst_dir.to_str().expect("utf-8")];
    let args = peer_args(&["receive", "--listen"], &listen, &s.b, &s.a, &disk_dir);
    let (mut dst, dst_out) = spawn_in(&hosts.dst, &strs(&args));
    let mut src = start_diskwriter(&hosts, &s, &image, BYTES);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, text) = migrate(&hosts, &s, &[]);
    assert!(ok && text.contains("migrated to"), "{text}");
    let (status, err) = wait_exit(&mut src, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
    let done = next_line(&dst_out, "diskwrite:");
    assert!(done.contains("MB/s"), "{done}");
    let (status, err) = wait_exit(&mut dst, Duration::from_secs(20));
    assert_eq!(status, Some(0), "the guest finished at the destination: {err}");
    let moved = dst_dir.join("data.img");
    assert_eq!(
        std::fs::metadata(&moved).expect("the destination's image").len(),
        64 << 20
    );
    assert_image_holds(&moved, 77, BYTES);
}

#[test]
fn a_tenant_module_moves_with_its_vm_and_keeps_its_state() {
    let hosts = lan();
    let s = setup("extension");
    let dst_socket = s.dir.join("dst.sock");
    let listen = format!("{}:7710", hosts.dst_ip);
    let peer = s.a.join("cert.der");
    let (mut dst, dst_out) = spawn_in(
        &hosts.dst,
        &[
            "receive",
            "--listen",
            &listen,
            "--identity",
            s.b.to_str().expect("utf-8"),
            "--peer",
            peer.to_str().expect("utf-8"),
            "--api",
            dst_socket.to_str().expect("utf-8"),
        ],
    );
    let (mut src, src_out, _) = start_source(&hosts, &s, &["kvclient", "--", "300"], "kvclient: waiting");
    let kv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../extensions/kv.wat");
    let (ok, text) = ctl(
        &s.socket,
        &[
            "ext",
            "add",
            kv.to_str().expect("utf-8"),
            "--name",
            "kv",
            "--version",
            "1.2",
            "--ports",
            "0x5000+16",
        ],
    );
    assert!(ok, "{text}");
    // A page-ordering policy sees the migration's phases and rounds.
    let hot_last = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../extensions/hot-last.wat");
    let (ok, text) = ctl(
        &s.socket,
        &["ext", "add", hot_last.to_str().expect("utf-8"), "--name", "hot-last"],
    );
    assert!(ok, "{text}");
    next_line(&src_out, "kvclient: 300 stored");
    let (ok, text) = migrate(&hosts, &s, &[]);
    assert!(ok, "{text}");
    let (status, err) = wait_exit(&mut src.0, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");

    // The module runs at the destination with its version, its values and its figures.
    wait_socket(&dst_socket);
    let (ok, listed) = ctl(&dst_socket, &["ext", "ls"]);
    assert!(ok, "{listed}");
    let row = listed
        .lines()
        .find(|l| l.starts_with("kv "))
        .unwrap_or_else(|| panic!("the module did not come along: {listed}"));
    assert!(
        row.contains(" 1.2 ") && row.contains(" tenant ") && row.contains("enabled"),
        "{listed}"
    );
    assert!(listed.contains("m0=300"), "its state came along: {listed}");
    // The policy's figures as they were when the state left: the first pass and the
    // stop-and-copy at least.
    let phases: f64 = listed
        .split_whitespace()
        .find_map(|w| w.strip_prefix("phases="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no phases figure: {listed}"));
    assert!(phases >= 2.0, "{listed}");
    let (ok, text) = ctl(&dst_socket, &["ext", "rm", "kv"]);
    assert!(ok, "{text}");
    next_line(&dst_out, "kvclient: the module is gone");
    let (status, err) = wait_exit(&mut dst.0, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
}

#[test]
fn a_tenant_convergence_policy_ends_the_pre_copy_where_the_providers_would_not() {
    let hosts = lan();
    let s = setup("quick-switch");
    let (mut dst, dst_out) = receive(&hosts, &s, &s.a);
    // A guest dirtying 256 MiB/s of a 64 MiB working set, and a 1 ms downtime budget: the
    // provider's policy would go on for round after round (throttling the guest) before a
    // dirty set fits. The tenant's policy pauses the guest after 2 rounds.
    let (mut src, _src_out, _) = start_source(
        &hosts,
        &s,
        &["--mem", "128M", "dirty", "--", "64", "256"],
        "dirty: working set",
    );
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../extensions/quick-switch.wat");
    let (ok, text) = ctl(
        &s.socket,
        &["ext", "add", policy.to_str().expect("utf-8"), "--name", "quick-switch"],
    );
    assert!(ok, "{text}");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, text) = migrate(&hosts, &s, &["--max-downtime", "1"]);
    assert!(ok, "{text}");
    assert!(text.contains(", 2 rounds "), "{text}");
    let (status, err) = wait_exit(&mut src, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
    // The guest goes on at the destination.
    next_line(&dst_out, "dirty:");
    let _ = dst.kill();
    let _ = dst.wait();
}
