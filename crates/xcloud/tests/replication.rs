//! Continuous replication (docs/replication.md): a protected guest in one namespace, its
//! backup (`xcloud receive --standby`) in another, TLS with pinned certificates between them;
//! the primary killed, the backup killed, protection ended on purpose, a hostile stream.

mod common;
use common::hosts::*;
use common::*;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use xcloud::netlab::Hosts;

const PORT: u16 = 7720;

/// `xcloud receive --standby` in namespace `ns` on `ip`, as `identity`, trusting `peer`; its
/// control socket (once it runs the VM) at `socket`.
fn standby(ns: &str, ip: &str, identity: &Path, peer: &Path, socket: &Path) -> (Proc, Receiver<String>) {
    standby_with(ns, ip, identity, peer, socket, &[])
}

/// [`standby`] with more arguments.
fn standby_with(
    ns: &str,
    ip: &str,
    identity: &Path,
    peer: &Path,
    socket: &Path,
    extra: &[&str],
) -> (Proc, Receiver<String>) {
    let listen = format!("{ip}:{PORT}");
    let mut more = vec!["--api", socket.to_str().expect("utf-8")];
    more.extend_from_slice(extra);
    let args = peer_args(&["receive", "--standby", "--listen"], &listen, identity, peer, &more);
    spawn_in(ns, &strs(&args))
}

/// `ctl SOCKET protect IP:PORT` as `identity`, trusting `peer`; asked again while the backup
/// is not listening yet.
fn protect(socket: &Path, ip: &str, identity: &Path, peer: &Path) -> (bool, String) {
    protect_with(socket, ip, identity, peer, &[])
}

/// [`protect`] with more arguments.
fn protect_with(socket: &Path, ip: &str, identity: &Path, peer: &Path, extra: &[&str]) -> (bool, String) {
    let args = peer_args(&["protect"], &format!("{ip}:{PORT}"), identity, peer, extra);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, text) = ctl(socket, &strs(&args));
        if ok || Instant::now() > deadline || !text.contains("cannot connect") {
            return (ok, text);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A heartbeat guest writing a 16 MiB working set at 16 MiB/s (every page checked by the
/// guest each lap: a lost or stale page stops it), protected from the source namespace to a
/// backup in the other one.
fn protected_heartbeat(hosts: &Hosts, name: &str) -> (Setup, Proc, Receiver<String>, Proc, Receiver<String>) {
    let s = setup_in("replication", name);
    let backup_socket = s.dir.join("backup.sock");
    let (backup, backup_out) = standby(&hosts.dst, &hosts.dst_ip, &s.b, &s.a, &backup_socket);
    let (primary, primary_out, _) = start_source(hosts, &s, &["heartbeat", "--", "0", "16", "16"], "heartbeat n=");
    let (ok, text) = protect(&s.socket, &hosts.dst_ip, &s.a, &s.b);
    assert!(ok && text.contains("protected by"), "{text}");
    (s, primary, primary_out, backup, backup_out)
}

/// Waits until the primary behind `socket` says it gave its backup up.
fn wait_unprotected(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = ctl(socket, &["status"]).1;
        if status.contains("UNPROTECTED: the backup at") {
            return;
        }
        assert!(Instant::now() < deadline, "still protected: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The status line's figure right after `key`.
fn figure(status: &str, key: &str) -> f64 {
    status
        .split(key)
        .nth(1)
        .and_then(|t| t.split([',', ' ', '/']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}' figure in {status}"))
}

#[test]
fn the_backup_takes_over_from_the_last_checkpoint_when_the_primary_dies_and_can_be_protected_again() {
    let hosts = wan(1_000_000_000);
    let (s, mut primary, primary_out, mut backup, backup_out) = protected_heartbeat(&hosts, "kill-primary");
    std::thread::sleep(Duration::from_millis(1000));
    let status = ctl(&s.socket, &["status"]).1;
    assert!(status.contains("protected by"), "{status}");
    assert!(figure(&status, "checkpoint ") >= 10.0, "checkpoints go on: {status}");
    // Protection pauses and resumes the guest for every checkpoint: nothing else may.
    for request in [&["pause"][..], &["snapshot", "/tmp/xcloud-no-snapshot"]] {
        let (ok, text) = ctl(&s.socket, request);
        assert!(!ok && text.contains("this VM is protected"), "{request:?}: {text}");
    }
    // The backup's control socket says what it holds, and drives nothing until it takes over.
    let backup_socket = s.dir.join("backup.sock");
    let held = ctl(&backup_socket, &["status"]).1;
    assert!(
        held.starts_with("state: standby") && held.contains("standing by (holding): checkpoint "),
        "{held}"
    );
    let (ok, text) = ctl(&backup_socket, &["pause"]);
    assert!(!ok && text.contains("stands by as a backup"), "{text}");
    let seen = count(&next_line(&primary_out, "heartbeat n="), "n=");
    // Several checkpoints after that report, the primary dies without a word.
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    primary.0.kill().expect("kill the primary");
    let _ = primary.0.wait();
    let first = next_line(&backup_out, "heartbeat n=");
    assert!(count(&first, "n=") > seen, "the backup continues past {seen}: {first}");
    eprintln!(
        "first report at the backup {:?} after the kill: {first}",
        killed.elapsed()
    );
    // Laps of the working set, each page checked against what the guest wrote before.
    for _ in 0..3 {
        next_line(&backup_out, "heartbeat n=");
    }
    assert!(
        backup.0.try_wait().expect("wait").is_none(),
        "the guest runs at the backup"
    );
    // The survivor is protected again, by a new backup where the primary was.
    let again = s.dir.join("again.sock");
    let (mut second, second_out) = standby(&hosts.src, &hosts.src_ip, &s.a, &s.b, &again);
    let (ok, text) = protect(&backup_socket, &hosts.src_ip, &s.b, &s.a);
    assert!(ok && text.contains("protected by"), "{text}");
    // Stopping the VM on purpose: the new backup lets it go instead of taking over.
    ctl(&backup_socket, &["stop"]);
    let (status, err) = wait_exit(&mut backup.0, Duration::from_secs(10));
    assert!(err.contains("the primary is gone"), "{err}");
    assert_eq!(status, Some(130), "{err}");
    let (status, err) = wait_exit(&mut second.0, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("let the VM go") && err.contains("the VM ended"), "{err}");
    assert!(second_out.try_recv().is_err(), "the second backup never ran the guest");
}

#[test]
fn no_answer_a_client_saw_is_lost_or_repeated_when_the_primary_of_a_server_dies() {
    let hosts = lan();
    add_vm_taps(&hosts);
    let s = setup_in("replication", "output-commit");
    let (mut backup, _backup_out) = standby(&hosts.dst, &hosts.dst_ip, &s.b, &s.a, &s.dir.join("backup.sock"));
    let (mut primary, _, _) = start_source(
        &hosts,
        &s,
        &httpd_on_tap("tap=xc0,mac=02:00:00:00:00:43", &["4"]),
        "httpd: serving",
    );
    let (ok, text) = protect(&s.socket, &hosts.dst_ip, &s.a, &s.b);
    assert!(ok && text.contains("protected by"), "{text}");
    // Each answer carries the count of requests served, this one included: the client saw it,
    // so the checkpoint that counted it must be at the backup.
    let mut seen = get_count(&hosts.src, "10.74.0.2:80");
    for _ in 0..20 {
        let count = get_count(&hosts.src, "10.74.0.2:80");
        assert_eq!(count, seen + 1);
        seen = count;
    }
    let status = ctl(&s.socket, &["status"]).1;
    assert!(
        figure(&status, "commit ") > 0.0,
        "answers wait for their checkpoint: {status}"
    );
    primary.0.kill().expect("kill the primary");
    let _ = primary.0.wait();
    // At the backup: not less (an answer the client saw was lost), not the same (an answer
    // repeated: the client's request counted twice).
    assert_eq!(
        get_count_within(&hosts.dst, "10.74.0.2:80", Duration::from_secs(10)),
        seen + 1
    );
    let _ = backup.0.kill();
}

#[test]
fn a_primary_cut_off_is_taken_for_gone_after_two_heartbeats_of_silence() {
    let hosts = lan();
    let (s, mut primary, _primary_out, mut backup, backup_out) = protected_heartbeat(&hosts, "cut");
    std::thread::sleep(Duration::from_millis(300));
    // No connection ends: the backup hears nothing more. (On a partition like this the primary
    // runs on too once it gives the backup up: docs/replication.md, split brain.)
    hosts.cut().expect("cut the link");
    let cut = Instant::now();
    next_line(&backup_out, "heartbeat n=");
    let taken_over = cut.elapsed();
    assert!(taken_over < Duration::from_secs(5), "{taken_over:?}");
    wait_unprotected(&s.socket);
    let _ = backup.0.kill();
    let (_, err) = wait_exit(&mut backup.0, Duration::from_secs(10));
    assert!(err.contains("sent nothing for"), "{err}");
    ctl(&s.socket, &["stop"]);
    wait_exit(&mut primary.0, Duration::from_secs(10));
}

#[test]
fn a_guest_writing_its_disk_fails_over_and_the_backups_image_ends_byte_for_byte() {
    const BYTES: u64 = 32 << 20;
    let hosts = lan();
    let s = setup_in("replication", "disk");
    let (image, dst_dir) = disk_dirs(&s);
    let listen = format!("{}:{PORT}", hosts.dst_ip);
    let disk_dir = ["--disk-dir", dst_dir.to_str().expect("utf-8")];
    let args = peer_args(&["receive", "--standby", "--listen"], &listen, &s.b, &s.a, &disk_dir);
    let (mut backup, backup_out) = spawn_in(&hosts.dst, &strs(&args));
    // 32 MiB at 16 MiB/s: the primary dies in the middle, the backup writes the rest from
    // where its checkpoint left the guest, onto its own copy of the image.
    let mut primary = start_diskwriter(&hosts, &s, &image, BYTES);
    let (ok, text) = protect(&s.socket, &hosts.dst_ip, &s.a, &s.b);
    assert!(ok && text.contains("protected by"), "{text}");
    std::thread::sleep(Duration::from_millis(700));
    primary.0.kill().expect("kill the primary");
    let _ = primary.0.wait();
    let (status, err) = wait_exit(&mut backup.0, Duration::from_secs(60));
    assert_eq!(status, Some(0), "the guest finished at the backup: {err}");
    let done: Vec<String> = backup_out.try_iter().filter(|l| l.starts_with("diskwrite:")).collect();
    assert!(done.iter().any(|l| l.contains("MB/s")), "{done:?}: {err}");
    assert!(err.contains("the primary is gone"), "{err}");
    assert_image_holds(&dst_dir.join("data.img"), 77, BYTES);
}

#[test]
fn a_primary_whose_backup_dies_runs_on_unprotected_and_says_so() {
    let hosts = lan();
    let (s, mut primary, primary_out, mut backup, _) = protected_heartbeat(&hosts, "kill-backup");
    std::thread::sleep(Duration::from_millis(500));
    backup.0.kill().expect("kill the backup");
    let _ = backup.0.wait();
    wait_unprotected(&s.socket);
    let a = count(&next_line(&primary_out, "heartbeat n="), "n=");
    let b = count(&next_line(&primary_out, "heartbeat n="), "n=");
    assert!(b > a, "the guest runs on");
    // The VM is the operator's again: pause and resume work.
    assert!(ctl(&s.socket, &["pause"]).0);
    assert!(ctl(&s.socket, &["resume"]).0);
    ctl(&s.socket, &["stop"]);
    wait_exit(&mut primary.0, Duration::from_secs(10));
}

#[test]
fn unprotect_lets_the_backup_go_without_running_the_guest() {
    let hosts = lan();
    let (s, mut primary, primary_out, mut backup, backup_out) = protected_heartbeat(&hosts, "unprotect");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, text) = ctl(&s.socket, &["unprotect"]);
    assert!(
        ok && text.contains("UNPROTECTED: protection was ended at the primary"),
        "{text}"
    );
    let (status, err) = wait_exit(&mut backup.0, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("let the VM go"), "{err}");
    assert!(backup_out.try_recv().is_err(), "the backup never ran the guest");
    next_line(&primary_out, "heartbeat n=");
    assert!(ctl(&s.socket, &["unprotect"]).1.contains("not protected"));
    ctl(&s.socket, &["stop"]);
    wait_exit(&mut primary.0, Duration::from_secs(10));
}

#[test]
fn a_checkpoint_that_does_not_check_out_is_refused_and_the_backup_runs_nothing() {
    use sha2::Digest;
    use std::io::Write;
    use xcloud_migration::wire;
    let hosts = lan();
    let s = setup_in("replication", "hostile");
    let (mut backup, backup_out) = standby(&hosts.dst, &hosts.dst_ip, &s.b, &s.a, &s.dir.join("b.sock"));
    // The test is the primary: right credentials, one good checkpoint, then a forged one.
    let result = {
        let mut stream = connect_as_source(&hosts, &s, PORT);
        let mut buf = Vec::new();
        let hello = wire::Hello {
            mem_bytes: 16 << 20,
            vcpus: 1,
            tsc_khz: 1,
            cpu_vendor: xcloud_migration::cpu_vendor(),
            cpu_features: xcloud_migration::cpu_features(),
        };
        for (kind, payload) in [
            (wire::Kind::Hello, hello.encode()),
            (
                wire::Kind::Protect,
                wire::Protect {
                    heartbeat_ms: 1000,
                    interval_ms: 25,
                    fence: None,
                }
                .encode(),
            ),
            (wire::Kind::Sync, Vec::new()),
        ] {
            wire::write_frame(&mut stream, kind, &payload).expect("write");
        }
        stream.flush().expect("flush");
        assert_eq!(
            wire::read_frame(&mut stream, &mut buf).expect("accept"),
            wire::Kind::Accept
        );
        assert_eq!(
            wire::read_frame(&mut stream, &mut buf).expect("synced"),
            wire::Kind::Synced
        );
        let state = xcloud_state::StateTree::new().encode().expect("state");
        let mut pages = Vec::new();
        wire::push_page(&mut pages, 7, &[7u8; wire::PAGE]);
        let mut digest = sha2::Sha256::new();
        digest.update(&pages);
        digest.update(&state);
        let good = wire::CheckpointHeader {
            epoch: 1,
            pages: 1,
            digest: digest.finalize().into(),
        };
        wire::write_frame(&mut stream, wire::Kind::Pages, &pages).expect("pages");
        wire::write_frame(&mut stream, wire::Kind::Checkpoint, &good.encode(&state)).expect("checkpoint");
        stream.flush().expect("flush");
        assert_eq!(wire::read_frame(&mut stream, &mut buf).expect("ack"), wire::Kind::Ack);
        assert_eq!(wire::decode_ack(&buf).expect("epoch"), 1);
        // Epoch 2: a page altered on the way (the digest is of the page before).
        let forged = wire::CheckpointHeader { epoch: 2, ..good };
        let mut altered = pages.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        wire::write_frame(&mut stream, wire::Kind::Pages, &altered).expect("pages");
        wire::write_frame(&mut stream, wire::Kind::Checkpoint, &forged.encode(&state)).expect("checkpoint");
        stream.flush().expect("flush");
        wire::read_frame(&mut stream, &mut buf)
    };
    assert!(
        matches!(result, Err(wire::WireError::Refused(ref r)) if r.contains("does not match its digest")),
        "{result:?}"
    );
    let (status, err) = wait_exit(&mut backup.0, Duration::from_secs(10));
    assert_eq!(status, Some(1), "{err}");
    assert!(err.contains("kept checkpoint 1 and runs nothing"), "{err}");
    assert!(backup_out.try_recv().is_err(), "no guest output at the backup");
}

/// A heartbeat guest protected as [`protected_heartbeat`], both ends fenced through etcd on a
/// witness host that each reaches over a link of its own; the backup gives up after 1 s.
struct Fenced {
    s: Setup,
    primary: Proc,
    primary_out: Receiver<String>,
    backup: Proc,
    backup_out: Receiver<String>,
    // Dropped in this order: etcd, then the witness's namespace.
    etcd: xcloud::netlab::WitnessEtcd,
    witness: xcloud::netlab::Witness,
}

fn fenced_heartbeat(hosts: &Hosts, name: &str) -> Fenced {
    fenced(hosts, name, &["heartbeat", "--", "0", "16", "16"], "heartbeat n=")
}

/// `xcloud run RUN_ARGS` (its first line `first_line`), protected and fenced as above.
fn fenced(hosts: &Hosts, name: &str, run_args: &[&str], first_line: &str) -> Fenced {
    let s = setup_in("replication", name);
    let witness = hosts.add_witness().expect("witness host");
    let etcd = witness.start_etcd(&s.dir).expect("etcd on the witness");
    let key = format!("/xcloud/fence/{name}");
    let (backup, backup_out) = standby_with(
        &hosts.dst,
        &hosts.dst_ip,
        &s.b,
        &s.a,
        &s.dir.join("backup.sock"),
        &["--fence-etcd", &etcd.url_from_dst, "--fence-key", &key],
    );
    let mut args = vec!["--fence-etcd", &etcd.url_from_src, "--fence-key", &key];
    args.extend_from_slice(run_args);
    let (primary, primary_out, _) = start_source(hosts, &s, &args, first_line);
    let (ok, text) = protect_with(&s.socket, &hosts.dst_ip, &s.a, &s.b, &["--timeout", "1000"]);
    assert!(ok && text.contains(&format!("fenced by {key} generation")), "{text}");
    Fenced {
        s,
        primary,
        primary_out,
        backup,
        backup_out,
        etcd,
        witness,
    }
}

#[test]
fn a_fenced_primary_cut_off_from_its_backup_stops_and_the_backup_runs_on_and_is_protected_again() {
    let hosts = lan();
    let mut f = fenced_heartbeat(&hosts, "fenced-primary");
    std::thread::sleep(Duration::from_millis(300));
    // A partition between the two hosts; each still reaches the fence. The backup hears nothing
    // for two heartbeats and takes the fence over; the primary gives its backup up a second
    // later, finds the fence gone and stops instead of running on.
    hosts.cut().expect("cut the link");
    let first = next_line(&f.backup_out, "heartbeat n=");
    let (status, err) = wait_exit(&mut f.primary.0, Duration::from_secs(20));
    assert!(
        err.contains("FENCED") && err.contains("the backup took the VM over"),
        "{err}"
    );
    assert_ne!(status, Some(0), "{err}");
    let next = next_line(&f.backup_out, "heartbeat n=");
    assert!(
        count(&next, "n=") > count(&first, "n="),
        "the guest runs on at the backup"
    );
    // The survivor holds the fence: once the link is back it is protected again, fenced, by a
    // new backup where the primary was; stopping it frees the fence and lets that backup go.
    hosts.heal().expect("heal the link");
    let survivor = f.s.dir.join("backup.sock");
    let (mut second, second_out) = standby_with(
        &hosts.src,
        &hosts.src_ip,
        &f.s.a,
        &f.s.b,
        &f.s.dir.join("again.sock"),
        &[
            "--fence-etcd",
            &f.etcd.url_from_src,
            "--fence-key",
            "/xcloud/fence/fenced-primary",
        ],
    );
    let (ok, text) = protect_with(&survivor, &hosts.src_ip, &f.s.b, &f.s.a, &[]);
    assert!(ok && text.contains("protected by"), "{text}");
    ctl(&survivor, &["stop"]);
    wait_exit(&mut f.backup.0, Duration::from_secs(10));
    let (status, err) = wait_exit(&mut second.0, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{err}");
    assert!(second_out.try_recv().is_err(), "the second backup never ran the guest");
}

#[test]
fn a_fenced_backup_cut_off_from_everything_never_runs_the_vm_and_the_primary_keeps_it() {
    let hosts = lan();
    let mut f = fenced_heartbeat(&hosts, "fenced-backup");
    std::thread::sleep(Duration::from_millis(300));
    // The backup's host loses every link: it takes the primary for gone but cannot reach the
    // fence. The primary gives it up after a second, keeps the fence and runs on.
    f.witness
        .link_to(&hosts.dst, false)
        .expect("cut the backup from the witness");
    hosts.cut().expect("cut the link");
    wait_unprotected(&f.s.socket);
    let a = count(&next_line(&f.primary_out, "heartbeat n="), "n=");
    let b = count(&next_line(&f.primary_out, "heartbeat n="), "n=");
    assert!(b > a, "the guest runs on at the primary");
    // Back in reach of the fence, the backup finds the primary kept the VM: it runs nothing.
    f.witness
        .link_to(&hosts.dst, true)
        .expect("reconnect the backup to the witness");
    let (status, err) = wait_exit(&mut f.backup.0, Duration::from_secs(30));
    assert_eq!(status, Some(1), "{err}");
    assert!(err.contains("kept the fence"), "{err}");
    assert!(f.backup_out.try_recv().is_err(), "the backup never ran the guest");
    ctl(&f.s.socket, &["stop"]);
    wait_exit(&mut f.primary.0, Duration::from_secs(10));
}

#[test]
fn clients_beside_a_fenced_primary_cut_off_from_its_backup_never_hear_from_it_again() {
    let hosts = lan();
    add_vm_taps(&hosts);
    let mut f = fenced(
        &hosts,
        "fenced-server",
        &httpd_on_tap("tap=xc0,mac=02:00:00:00:00:44", &["4"]),
        "httpd: serving",
    );
    let mut seen = get_count(&hosts.src, "10.74.0.2:80");
    for _ in 0..5 {
        seen = get_count(&hosts.src, "10.74.0.2:80");
    }
    // The partition: a client on the primary's side asks again. Without the fence the primary
    // would give its backup up after a second and answer, while the backup runs the same VM:
    // two servers, two counts. Fenced, it stops without a word out.
    hosts.cut().expect("cut the link");
    let beside_primary = std::thread::spawn({
        let ns = hosts.src.clone();
        move || try_get_count(&ns, "10.74.0.2:80")
    });
    let (_, err) = wait_exit(&mut f.primary.0, Duration::from_secs(20));
    assert!(err.contains("FENCED"), "{err}");
    let answer = beside_primary.join().expect("client");
    assert!(answer.is_err(), "the fenced primary answered: {answer:?}");
    // The backup serves from the last checkpoint a client saw answers of.
    assert_eq!(
        get_count_within(&hosts.dst, "10.74.0.2:80", Duration::from_secs(10)),
        seen + 1
    );
    let _ = f.backup.0.kill();
}

/// A link (200 Mbit/s, 20 ms round trip) that a server guest writing a 32 MiB set at 20 MiB/s
/// keeps busy most of the time: an epoch of 25 ms sends about 512 KiB, 21 ms of the link's time.
/// Protected with a long `--timeout` (the initial copy takes seconds).
fn slow_protected_server(hosts: &Hosts, name: &str) -> (Setup, Proc, Proc, Receiver<String>) {
    add_vm_taps(hosts);
    let s = setup_in("replication", name);
    let (backup, backup_out) = standby(&hosts.dst, &hosts.dst_ip, &s.b, &s.a, &s.dir.join("backup.sock"));
    let (primary, _, _) = start_source(
        hosts,
        &s,
        &[
            &["--mem", "128M"][..],
            &httpd_on_tap("tap=xc0,mac=02:00:00:00:00:45", &["16", "32", "20"]),
        ]
        .concat(),
        "httpd: serving",
    );
    let (ok, text) = protect_with(&s.socket, &hosts.dst_ip, &s.a, &s.b, &["--timeout", "10000"]);
    assert!(ok && text.contains("protected by"), "{text}");
    (s, primary, backup, backup_out)
}

#[test]
fn a_server_on_a_slow_link_whose_primary_dies_loses_and_repeats_no_answer() {
    let hosts = wan(200_000_000);
    let (s, mut primary, mut backup, backup_out) = slow_protected_server(&hosts, "slow-link-server");
    let mut seen = get_count(&hosts.src, "10.74.0.2:80");
    for _ in 0..4 {
        let count = get_count(&hosts.src, "10.74.0.2:80");
        assert_eq!(count, seen + 1);
        seen = count;
    }
    primary.0.kill().expect("kill the primary");
    let _ = primary.0.wait();
    // Not one answer the client saw is lost, none is given twice.
    assert_eq!(
        get_count_within(&hosts.dst, "10.74.0.2:80", Duration::from_secs(20)),
        seen + 1
    );
    // Two laps of the working set at the backup, every page checked against what the guest
    // wrote before: a stale or torn page would stop it.
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        backup.0.try_wait().expect("wait").is_none(),
        "the guest runs at the backup"
    );
    ctl(&s.dir.join("backup.sock"), &["stop"]);
    let (_, err) = wait_exit(&mut backup.0, Duration::from_secs(10));
    assert!(err.contains("the primary is gone"), "{err}");
    assert!(
        backup_out.try_iter().all(|line| !line.contains("panicked")),
        "the working set checks out"
    );
}

#[test]
fn a_primary_killed_in_the_middle_of_a_checkpoint_leaves_the_backup_on_the_one_before() {
    // A guest writing a 4 MiB set at 32 MiB/s over 100 Mbit/s: each checkpoint carries most
    // of the set and takes about a third of a second, one after the other. The link always
    // has one on its way, so the kill lands in one.
    let hosts = wan(100_000_000);
    let s = setup_in("replication", "kill-mid-checkpoint");
    let (mut backup, backup_out) = standby(&hosts.dst, &hosts.dst_ip, &s.b, &s.a, &s.dir.join("backup.sock"));
    let (mut primary, primary_out, _) = start_source(&hosts, &s, &["heartbeat", "--", "0", "4", "32"], "heartbeat n=");
    let (ok, text) = protect_with(&s.socket, &hosts.dst_ip, &s.a, &s.b, &["--timeout", "10000"]);
    assert!(ok && text.contains("protected by"), "{text}");
    std::thread::sleep(Duration::from_millis(1000));
    let seen = count(&next_line(&primary_out, "heartbeat n="), "n=");
    primary.0.kill().expect("kill the primary");
    let _ = primary.0.wait();
    // Laps of the working set at the backup, each page checked against what the guest wrote
    // before: a page of the dropped checkpoint applied would stop it.
    let mut last = 0;
    for _ in 0..4 {
        last = count(&next_line(&backup_out, "heartbeat n="), "n=");
    }
    assert!(last > seen, "the guest went on at the backup");
    ctl(&s.dir.join("backup.sock"), &["stop"]);
    let (_, err) = wait_exit(&mut backup.0, Duration::from_secs(10));
    let dropped = err
        .split(" bytes of the unfinished checkpoint")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no dropped bytes in {err}"));
    assert!(dropped > 0, "the primary died between checkpoints, not in one: {err}");
    eprintln!("{dropped} bytes of the unfinished checkpoint dropped");
}

#[test]
fn a_backup_killed_in_the_middle_of_a_checkpoint_leaves_the_primary_serving_unprotected() {
    let hosts = wan(200_000_000);
    let (s, mut primary, mut backup, _) = slow_protected_server(&hosts, "kill-backup-mid-checkpoint");
    let seen = get_count(&hosts.src, "10.74.0.2:80");
    backup.0.kill().expect("kill the backup");
    let _ = backup.0.wait();
    wait_unprotected(&s.socket);
    // What the primary held went out, and it answers at once now: nothing waits for a backup.
    let started = Instant::now();
    assert_eq!(get_count(&hosts.src, "10.74.0.2:80"), seen + 1);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(primary.0.try_wait().expect("wait").is_none(), "the primary runs on");
    ctl(&s.socket, &["stop"]);
    wait_exit(&mut primary.0, Duration::from_secs(10));
}

#[test]
fn a_primary_killed_during_the_initial_copy_leaves_a_backup_that_runs_nothing() {
    // 100 Mbit/s: the initial copy of a 32 MiB working set takes about three seconds.
    let hosts = wan(100_000_000);
    let s = setup_in("replication", "kill-initial-copy");
    let (mut backup, backup_out) = standby(&hosts.dst, &hosts.dst_ip, &s.b, &s.a, &s.dir.join("b.sock"));
    let (mut primary, _, _) = start_source(&hosts, &s, &["heartbeat", "--", "0", "32", "16"], "heartbeat n=");
    let protecting = std::thread::spawn({
        let (socket, ip, a, b) = (s.socket.clone(), hosts.dst_ip.clone(), s.a.clone(), s.b.clone());
        move || protect(&socket, &ip, &a, &b)
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!protecting.is_finished(), "the initial copy is still on its way");
    primary.0.kill().expect("kill the primary");
    let _ = primary.0.wait();
    let (ok, text) = protecting.join().expect("protect");
    assert!(!ok, "protect cannot succeed: {text}");
    // The VM was never protected: the backup has no checkpoint and runs nothing.
    let (status, err) = wait_exit(&mut backup.0, Duration::from_secs(10));
    assert_eq!(status, Some(1), "{err}");
    assert!(err.contains("before its first checkpoint"), "{err}");
    assert!(backup_out.try_recv().is_err(), "the backup never ran the guest");
}
