//! Virtio NICs: a real TCP client on the host side of a TAP device, inside a network
//! namespace the test makes, sends to the guest's smoltcp stack; every byte arrives. Bad NIC
//! configurations are refused before the guest starts.

mod common;
use common::*;
use std::io::Write;
use std::time::Duration;

fn namespace(tag: &str) -> Namespace {
    Namespace::new(&format!("xct-{tag}-{}", std::process::id()))
}

#[test]
fn a_host_client_streams_to_the_guest_over_a_tap_and_every_byte_arrives() {
    const BYTES: usize = 32 << 20;
    let ns = namespace("net");
    let (_vm, lines) = spawn_lines(xcloud_in(
        &ns.0,
        &[
            "run",
            "--net",
            "tap=xc0,mac=02:00:00:00:00:07",
            "netrecv",
            "--",
            "10.77.0.2/24",
            "5001",
        ],
    ));
    let listening = next_line(&lines, "netrecv: listening");
    assert!(
        listening.contains("mac 02:00:00:00:00:07"),
        "the MAC given is the guest's: {listening}"
    );
    // The host's side of the TAP (the product never runs ip; the test sets up its host).
    ip(&["-n", &ns.0, "addr", "add", "10.77.0.1/24", "dev", "xc0"]);
    let sent =
        send_tcp_in(&ns.0, "10.77.0.2:5001", BYTES, Duration::from_secs(10)).expect("the client sent everything");
    let result = next_line(&lines, "netrecv: connection 1:");
    assert!(result.contains(&format!(": {sent} bytes")), "{result}");
}

/// CPU time (ms) the thread named `name` of process `pid` has used.
fn thread_cpu_ms(pid: u32, name: &str) -> u64 {
    let tick_ms = 1000 / 100;
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the VMM's threads")
        .filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|stat| {
            let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
            (ticks(11) + ticks(12)) * tick_ms
        })
        .sum()
}

#[test]
fn an_idle_network_guest_gives_its_core_back() {
    let ns = namespace("idle");
    let (vm, lines) = spawn_lines(xcloud_in(
        &ns.0,
        &["run", "--net", "tap=xc0", "netrecv", "--", "10.76.0.2/24"],
    ));
    next_line(&lines, "netrecv: listening");
    let pid = vm.id();
    let before = thread_cpu_ms(pid, "vcpu0");
    std::thread::sleep(Duration::from_secs(1));
    let used = thread_cpu_ms(pid, "vcpu0") - before;
    // A spinning vCPU uses the whole second; one that waits for I/O (WaitIo) about 1%.
    assert!(used < 500, "the idle guest's vCPU used {used} ms of CPU in 1 s");
}

#[test]
fn bad_nics_are_refused_before_the_guest_starts() {
    for (spec, why) in [
        ("tap=", "not a network interface name"),
        ("tap=x,mac=01:00:00:00:00:01", "multicast"),
        ("mac=02:00:00:00:00:01", "needs a TAP device"),
        ("tap=x,queues=4", "unknown NIC option"),
    ] {
        let out = run(&["run", "--net", spec, "hello"]);
        assert!(
            !out.status.success() && stderr(&out).contains(why),
            "{spec}: {}",
            stderr(&out)
        );
    }
    // A TAP another process holds.
    let ns = namespace("busy");
    let (_vm, lines) = spawn_lines(xcloud_in(
        &ns.0,
        &["run", "--net", "tap=xc0", "netrecv", "--", "10.78.0.2/24"],
    ));
    next_line(&lines, "netrecv: listening");
    let out = output_within(
        xcloud_in(&ns.0, &["run", "--net", "tap=xc0", "hello"]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "a second VMM on the same TAP is refused");
    assert!(
        stderr(&out).contains("cannot attach to TAP device xc0"),
        "{}",
        stderr(&out)
    );
    assert!(!stdout(&out).contains("Hello"), "the guest never ran");
}

#[test]
fn httpd_serves_keep_alive_requests_counts_them_and_refuses_bad_ones() {
    use std::io::{BufRead, BufReader, Read};
    let ns = namespace("http");
    let (_vm, lines) = spawn_lines(xcloud_in(
        &ns.0,
        &["run", "--net", "tap=xc0", "httpd", "--", "10.75.0.2/24", "8080", "4"],
    ));
    next_line(&lines, "httpd: serving");
    ip(&["-n", &ns.0, "addr", "add", "10.75.0.1/24", "dev", "xc0"]);
    let client = xcloud::netlab::Hosts::in_ns(&ns.0, || {
        let s = std::net::TcpStream::connect_timeout(&"10.75.0.2:8080".parse()?, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        // Two requests, one connection: keep-alive, and the count goes up.
        let mut bodies = Vec::new();
        for path in ["/", "/count", "/count"] {
            write!(w, "GET {path} HTTP/1.1\r\nHost: guest\r\n\r\n")?;
            let mut status = String::new();
            r.read_line(&mut status)?;
            let mut len = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h)?;
                if h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse()?;
                }
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body)?;
            bodies.push((status.trim().to_string(), String::from_utf8(body)?));
        }
        // A method it does not serve, on a new connection: refused, then closed.
        let mut s2 = std::net::TcpStream::connect_timeout(&"10.75.0.2:8080".parse()?, Duration::from_secs(10))?;
        s2.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s2, "DELETE / HTTP/1.1\r\n\r\n")?;
        let mut answer = String::new();
        s2.read_to_string(&mut answer)?;
        Ok((bodies, answer))
    });
    let (bodies, refused) = client
        .join()
        .expect("client thread")
        .expect("the client talked to httpd");
    assert_eq!(
        bodies[0],
        (
            "HTTP/1.1 200 OK".to_string(),
            "Hello from an xcloud guest\n".to_string()
        )
    );
    assert_eq!(bodies[1].1, "2\n");
    assert_eq!(bodies[2].1, "3\n");
    assert!(refused.starts_with("HTTP/1.1 405"), "{refused}");
}

#[test]
fn a_snapshot_of_a_vm_with_a_nic_restores_with_its_mac_and_its_count() {
    let ns = namespace("snap");
    let dir = std::env::temp_dir().join(format!("xcloud-test-{}-nic-snapshot", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    let socket = dir.join("vm.sock");
    let snapshot = dir.join("snap");
    let (mut vm, lines) = spawn_lines(xcloud_in(
        &ns.0,
        &[
            "run",
            "--api",
            socket.to_str().expect("utf-8"),
            "--net",
            "tap=xc0,mac=02:00:00:00:00:55",
            "httpd",
            "--",
            "10.73.0.2/24",
        ],
    ));
    next_line(&lines, "httpd: serving");
    wait_socket(&socket);
    ip(&["-n", &ns.0, "addr", "add", "10.73.0.1/24", "dev", "xc0"]);
    let before = get_count(&ns.0, "10.73.0.2:80");
    let (ok, text) = ctl(&socket, &["snapshot", snapshot.to_str().expect("utf-8")]);
    assert!(ok, "{text}");
    let (ok, text) = ctl(&socket, &["stop"]);
    assert!(ok, "stop is answered before the VMM ends: {text}");
    let _ = vm.wait();
    let (_restored, restored_lines) = spawn_lines(xcloud_in(&ns.0, &["restore", snapshot.to_str().expect("utf-8")]));
    // The TAP went with the first VMM and comes back with the restored one (same name, same
    // MAC): the host side needs its address again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::process::Command::new("ip")
        .args(["-n", &ns.0, "link", "show", "xc0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_or(true, |s| !s.success())
    {
        assert!(std::time::Instant::now() < deadline, "the restored VMM opened no TAP");
        std::thread::sleep(Duration::from_millis(20));
    }
    ip(&["-n", &ns.0, "addr", "add", "10.73.0.1/24", "dev", "xc0"]);
    assert_eq!(
        get_count(&ns.0, "10.73.0.2:80"),
        before + 1,
        "the count continues from the snapshot"
    );
    let neigh = std::process::Command::new("ip")
        .args(["-n", &ns.0, "neigh", "show", "10.73.0.2"])
        .output()
        .expect("ip neigh");
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(
        neigh.contains("02:00:00:00:00:55"),
        "the restored guest answers with its MAC: {neigh}"
    );
    drop(restored_lines);
    let _ = std::fs::remove_dir_all(&dir);
}
