//! The control socket under hostile and careless use: what is at the socket path is never
//! removed unless it is a dead socket, every request line is bounded in memory, a flood of
//! connections or running out of file descriptors does not take the socket down for good.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("control").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A heartbeat VMM serving its control socket at `socket`.
fn vmm(socket: &Path, wrap: &[&str]) -> Proc {
    let mut cmd = if wrap.is_empty() {
        xcloud()
    } else {
        let mut c = std::process::Command::new(wrap[0]);
        c.args(&wrap[1..]).arg(env!("CARGO_BIN_EXE_xcloud"));
        c
    };
    cmd.args(["run", "--api", socket.to_str().expect("utf-8"), "heartbeat"]);
    let (child, rx) = spawn_lines(cmd);
    next_line(&rx, "heartbeat n=");
    wait_socket(socket);
    child
}

fn status_line() -> &'static str {
    "{\"api\":1,\"op\":\"status\"}\n"
}

fn request(conn: &mut UnixStream, answers: &mut BufReader<UnixStream>, line: &[u8]) -> String {
    conn.write_all(line).expect("send");
    let mut answer = String::new();
    answers.read_line(&mut answer).expect("answer");
    answer
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// CPU time of process `pid`, user and system, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn what_is_at_the_socket_path_is_never_removed_unless_it_is_a_dead_socket() {
    let dir = scratch("path");
    let file = dir.join("notes.txt");
    std::fs::write(&file, "mine").expect("write");
    for (path, found) in [(file.clone(), "is a regular file"), (dir.clone(), "is a directory")] {
        let out = run(&["run", "--api", path.to_str().expect("utf-8"), "hello"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(found) && err.contains("not a socket"), "{err}");
    }
    assert_eq!(std::fs::read_to_string(&file).expect("still there"), "mine");
    let link = dir.join("link.sock");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    let err = stderr(&run(&["run", "--api", link.to_str().expect("utf-8"), "hello"]));
    assert!(err.contains("is a symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("still there"), "mine");

    // A socket nobody listens on is an old VMM's: it is replaced.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let out = run(&["run", "--api", stale.to_str().expect("utf-8"), "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn request_lines_are_bounded_and_a_line_of_exactly_the_limit_is_served() {
    let dir = scratch("lines");
    let socket = dir.join("vm.sock");
    let child = vmm(&socket, &[]);
    let mut conn = UnixStream::connect(&socket).expect("connect");
    let mut answers = BufReader::new(conn.try_clone().expect("clone"));

    // 65 536 bytes before the newline: the limit itself is allowed, and the request after it
    // is answered too (it used to be swallowed).
    let mut exact = status_line().trim_end().to_string();
    exact.push_str(&" ".repeat(xcloud_api::MAX_LINE - exact.len()));
    exact.push('\n');
    assert!(request(&mut conn, &mut answers, exact.as_bytes()).contains("\"ok\":true"));
    assert!(request(&mut conn, &mut answers, status_line().as_bytes()).contains("\"ok\":true"));

    // 256 MiB without a newline: refused once, and the VMM does not buffer it.
    let before = vm_rss_kib(child.id());
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..256 {
        conn.write_all(&chunk).expect("send");
    }
    let answer = request(&mut conn, &mut answers, b"\n");
    assert!(answer.contains("longer than"), "{answer}");
    let grown = vm_rss_kib(child.id()).saturating_sub(before);
    assert!(grown < 8 * 1024, "the VMM grew by {grown} KiB reading a 256 MiB line");
    assert!(request(&mut conn, &mut answers, status_line().as_bytes()).contains("\"ok\":true"));
    assert!(request(&mut conn, &mut answers, b"{\"api\":1,\"op\":0}\n").contains("must be the name"));
}

#[test]
fn a_flood_of_connections_is_turned_away_and_the_socket_answers_once_it_ebbs() {
    let dir = scratch("flood");
    let socket = dir.join("vm.sock");
    let _child = vmm(&socket, &[]);
    let held: Vec<UnixStream> = (0..xcloud_api::server::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&socket).expect("connect"))
        .collect();
    // Every held connection has been accepted once one of them answers.
    let mut first = held[0].try_clone().expect("clone");
    let mut first_answers = BufReader::new(held[0].try_clone().expect("clone"));
    assert!(request(&mut first, &mut first_answers, status_line().as_bytes()).contains("\"ok\":true"));
    std::thread::sleep(Duration::from_millis(100));
    let (ok, text) = ctl(&socket, &["status"]);
    assert!(!ok && text.contains("too many connections"), "{text}");
    drop(first);
    drop(first_answers);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ok, text) = ctl(&socket, &["status"]);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "the socket never answered again: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn running_out_of_file_descriptors_does_not_spin_and_the_socket_recovers() {
    let dir = scratch("nofile");
    let socket = dir.join("vm.sock");
    // Few descriptors: the connections below use up what the VMM has left.
    let child = vmm(&socket, &["prlimit", "--nofile=40:40", "--"]);
    let held: Vec<UnixStream> = (0..60).filter_map(|_| UnixStream::connect(&socket).ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    // One more, once every descriptor is taken: it waits in the backlog, and every accept of
    // it fails until descriptors are free again.
    let waiting = UnixStream::connect(&socket).expect("connect");
    std::thread::sleep(Duration::from_millis(300));
    let (before, t) = (cpu_ticks(child.id()), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let ticks_per_s = 100.0; // USER_HZ
    let busy = (cpu_ticks(child.id()) - before) as f64 / ticks_per_s / t.elapsed().as_secs_f64();
    // The heartbeat guest spins one vCPU (~100%); a spinning accept loop would add another core.
    assert!(
        busy < 1.5,
        "the VMM used {:.0}% CPU while out of descriptors",
        busy * 100.0
    );
    drop(held);
    drop(waiting);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ctl(&socket, &["status"]).0 {
        assert!(Instant::now() < deadline, "the socket never answered again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vmm_whose_controller_stops_renewing_its_watchdog_pauses_and_waits_for_it() {
    let dir = scratch("watchdog");
    let socket = dir.join("vm.sock");
    let mut cmd = xcloud();
    // Armed from the start with a window long enough for the guest's first heartbeat.
    cmd.args([
        "run",
        "--api",
        socket.to_str().expect("utf-8"),
        "--watchdog-ms",
        "5000",
        "heartbeat",
    ]);
    let (_child, lines) = spawn_lines(cmd);
    next_line(&lines, "heartbeat n=");
    wait_socket(&socket);
    let mut conn = UnixStream::connect(&socket).expect("connect");
    let mut answers = BufReader::new(conn.try_clone().expect("clone"));
    let renew = |conn: &mut UnixStream, answers: &mut BufReader<UnixStream>, ms: u64| {
        request(
            conn,
            answers,
            format!("{{\"api\":1,\"op\":\"watchdog\",\"ms\":{ms}}}\n").as_bytes(),
        )
    };

    // Renewed in time, it runs on: three windows long.
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        let answer = renew(&mut conn, &mut answers, 400);
        assert!(
            answer.contains("\"state\":\"running\"") && !answer.contains("fenced"),
            "{answer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Not renewed: paused once the window is over, and not before.
    let last = Instant::now();
    renew(&mut conn, &mut answers, 400);
    let paused = loop {
        let answer = request(&mut conn, &mut answers, status_line().as_bytes());
        if answer.contains("\"state\":\"paused\"") {
            break answer;
        }
        assert!(last.elapsed() < Duration::from_secs(3), "still not paused: {answer}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let waited = last.elapsed();
    assert!(waited >= Duration::from_millis(400), "paused after {waited:?}");
    assert!(paused.contains("\"fenced\":true"), "{paused}");
    let out = run(&["ctl", socket.to_str().expect("utf-8"), "status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("paused by its watchdog"));

    // Only its controller may let it run again: renew first, then resume.
    let refused = request(&mut conn, &mut answers, b"{\"api\":1,\"op\":\"resume\"}\n");
    assert!(
        refused.contains("\"ok\":false") && refused.contains("must renew the watchdog"),
        "{refused}"
    );
    let renewed = renew(&mut conn, &mut answers, 400);
    assert!(
        renewed.contains("\"state\":\"paused\"") && renewed.contains("\"fenced\":true"),
        "{renewed}"
    );
    let resumed = request(&mut conn, &mut answers, b"{\"api\":1,\"op\":\"resume\"}\n");
    assert!(
        resumed.contains("\"state\":\"running\"") && !resumed.contains("fenced"),
        "{resumed}"
    );
    next_line(&lines, "heartbeat n=");

    // Disarmed, it runs with no renewals; a window over an hour is refused.
    assert!(renew(&mut conn, &mut answers, 0).contains("\"ok\":true"));
    std::thread::sleep(Duration::from_millis(800));
    let status = request(&mut conn, &mut answers, status_line().as_bytes());
    assert!(status.contains("\"state\":\"running\""), "{status}");
    let too_long = renew(&mut conn, &mut answers, 3_600_001);
    assert!(too_long.contains("over the most"), "{too_long}");
    let bad = run(&["run", "--watchdog-ms", "100", "hello"]);
    assert_eq!(bad.status.code(), Some(2), "a watchdog needs a control socket");
}
