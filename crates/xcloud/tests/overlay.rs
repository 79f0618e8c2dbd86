//! The L2 overlay: three "hosts" (network namespaces) on one underlay network, each with the
//! overlay (`xcloud overlay up`, rtnetlink); httpd runs on host A behind the overlay, a real
//! HTTP client on host C keeps a keep-alive connection busy, and the VM migrates to host B in
//! the middle: no request fails, the connection survives, `/count` never goes back.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One response to `GET /count` on a keep-alive connection.
fn get_count(r: &mut BufReader<std::net::TcpStream>, w: &mut std::net::TcpStream) -> anyhow::Result<u64> {
    w.write_all(b"GET /count HTTP/1.1\r\nHost: vm\r\n\r\n")?;
    let mut status = String::new();
    r.read_line(&mut status)?;
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "status {status:?}");
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        anyhow::ensure!(!h.is_empty(), "the connection closed");
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse()?;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(String::from_utf8(body)?.trim().parse()?)
}

#[test]
fn a_client_across_the_overlay_sees_no_failed_request_while_the_vm_moves() {
    client_across_a_migration("lan", false);
}

#[test]
fn a_client_across_the_overlay_sees_no_failed_request_while_the_vm_moves_over_a_wan() {
    client_across_a_migration("wan", true);
}

/// Three hosts: A, B and a client host C, with their addresses on the underlay, and what keeps
/// them alive.
struct Topology {
    a: String,
    b: String,
    c: String,
    ips: [String; 3],
    _keep: Box<dyn std::any::Any>,
}

/// A LAN: the three hosts on one switch.
fn lan(tag: &str) -> Topology {
    let [sw, a, b, c] = ["s", "a", "b", "c"].map(|h| format!("xo{h}-{tag}"));
    let keep: Vec<Namespace> = [&sw, &a, &b, &c].iter().map(|ns| Namespace::new(ns)).collect();
    ip(&["-n", &sw, "link", "add", "u0", "type", "bridge"]);
    ip(&["-n", &sw, "link", "set", "u0", "up"]);
    let ips = ["10.80.0.1", "10.80.0.2", "10.80.0.3"].map(String::from);
    for (i, ns) in [&a, &b, &c].into_iter().enumerate() {
        let port = format!("s{i}");
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        ip(&["-n", &sw, "link", "set", &port, "master", "u0", "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{}/24", ips[i]), "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
    }
    Topology {
        a,
        b,
        c,
        ips,
        _keep: Box::new(keep),
    }
}

/// Two providers A and B joined by the emulated WAN of netlab (1 Gbit/s, 20 ms round trip),
/// and the client host C on a LAN beside B, routed to A through B.
fn wan(tag: &str) -> Topology {
    let hosts = xcloud::netlab::Hosts::new(xcloud::netlab::LinkSpec::wan(1_000_000_000, Duration::from_millis(20)))
        .expect("namespaces (run the tests as root)");
    let c = format!("xoc-{tag}");
    let keep_c = Namespace::new(&c);
    ip(&[
        "-n", &hosts.dst, "link", "add", "bc0", "type", "veth", "peer", "name", "eth0", "netns", &c,
    ]);
    ip(&["-n", &hosts.dst, "addr", "add", "10.81.0.1/24", "dev", "bc0"]);
    ip(&["-n", &hosts.dst, "link", "set", "bc0", "up"]);
    ip(&["-n", &c, "addr", "add", "10.81.0.2/24", "dev", "eth0"]);
    ip(&["-n", &c, "link", "set", "eth0", "up"]);
    ip(&["-n", &c, "route", "add", "default", "via", "10.81.0.1"]);
    ip(&["-n", &hosts.src, "route", "add", "10.81.0.0/24", "via", &hosts.dst_ip]);
    let out = Command::new("ip")
        .args(["netns", "exec", &hosts.dst, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .output()
        .expect("sysctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Topology {
        a: hosts.src.clone(),
        b: hosts.dst.clone(),
        c,
        ips: [hosts.src_ip.clone(), hosts.dst_ip.clone(), "10.81.0.2".into()],
        _keep: Box::new((keep_c, hosts)),
    }
}

/// The whole scenario over a LAN or the WAN.
fn client_across_a_migration(name: &str, over_wan: bool) {
    let tag = format!("{name}{}", std::process::id() % 100_000);
    let t = if over_wan { wan(&tag) } else { lan(&tag) };
    let (a, b, c) = (&t.a, &t.b, &t.c);
    let hosts = [(a, t.ips[0].as_str()), (b, t.ips[1].as_str()), (c, t.ips[2].as_str())];
    // The overlay on every host, each listing the other two.
    for (ns, local) in hosts {
        let mut args = vec!["overlay", "up", "xo0", "--vni", "42", "--local", local];
        for (_, peer) in hosts.iter().filter(|(_, p)| *p != local) {
            args.extend(["--peer", peer]);
        }
        let out = output_within(xcloud_in(ns, &args), Duration::from_secs(20));
        assert!(out.status.success(), "overlay up on {ns}: {}", stderr(&out));
    }
    ip(&["-n", c, "addr", "add", "10.74.0.1/24", "dev", "xo0"]);

    let dir = std::env::temp_dir().join(format!("xcloud-overlay-{tag}"));
    // On the LAN, below Linux's smallest retransmission timeout (200 ms): no request was lost
    // at the switch (a frame that reached the old host while the VM was paused moves with the
    // NIC's state; before it did, such a request waited 207 ms for its retransmission). Over
    // the WAN the move converges by post-copy, as a busy guest on a slow link should (pre-copy
    // throttled this one up to 90% and its slowest request took 227-233 ms; by post-copy it
    // took 72-122 ms, downtime 42-87 ms). A request still on the WAN when the source saved its
    // NIC reaches the old host after the save and waits for the client's retransmission (seen
    // once in five runs: 226 ms), so over the WAN the bound only catches a hang.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    for name in ["host-a", "host-b"] {
        let out = run(&["keygen", dir.join(name).to_str().expect("utf-8"), "--name", name]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let socket = dir.join("src.sock");
    let listen = format!("{}:7710", t.ips[1]);
    let (_dst, _dst_out) = spawn_lines(xcloud_in(
        b,
        &[
            "receive",
            "--listen",
            &listen,
            "--identity",
            dir.join("host-b").to_str().expect("utf-8"),
            "--peer",
            dir.join("host-a").join("cert.der").to_str().expect("utf-8"),
        ],
    ));
    let (mut src, src_out) = spawn_lines(xcloud_in(
        a,
        &[
            "run",
            "--api",
            socket.to_str().expect("utf-8"),
            "--net",
            "tap=xc0,mac=02:00:00:00:00:43,bridge=xo0",
            "httpd",
            "--",
            "10.74.0.2/24",
            "80",
            "8",
        ],
    ));
    next_line(&src_out, "httpd: serving");
    wait_socket(&socket);

    // The client on host C: one keep-alive connection, a request after another.
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = stop.clone();
    let client = xcloud::netlab::Hosts::in_ns(c, move || {
        let s = std::net::TcpStream::connect_timeout(&"10.74.0.2:80".parse()?, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut counts = Vec::new();
        let mut slowest = Duration::ZERO;
        while !client_stop.load(Ordering::SeqCst) {
            let t = Instant::now();
            counts.push(get_count(&mut r, &mut w)?);
            slowest = slowest.max(t.elapsed());
        }
        Ok((counts, slowest))
    });
    std::thread::sleep(Duration::from_millis(500));
    let peer = dir.join("host-b").join("cert.der");
    let (ok, text) = ctl(
        &socket,
        &[
            "migrate",
            &listen,
            "--identity",
            dir.join("host-a").to_str().expect("utf-8"),
            "--peer",
            peer.to_str().expect("utf-8"),
            if over_wan { "--postcopy" } else { "--compress" },
        ],
    );
    assert!(ok && text.contains("migrated to"), "{text}");
    let migrated_at = Instant::now();
    let status = src.wait().expect("the source ends");
    assert!(status.success(), "the source ends once the VM runs on B");
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    let (counts, slowest) = client
        .join()
        .expect("client thread")
        .expect("no request failed and the connection survived");
    eprintln!(
        "{} requests, slowest {slowest:?}, migration: {text}, {:?} since the switch",
        counts.len(),
        migrated_at.elapsed()
    );
    assert!(counts.len() > 20, "the client kept going: {} requests", counts.len());
    let budget = if over_wan {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(150)
    };
    assert!(
        slowest < budget,
        "the slowest request took {slowest:?} (bound {budget:?}): {text}"
    );
    for pair in counts.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "/count goes up by one per request, never back");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
