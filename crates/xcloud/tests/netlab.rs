//! The emulated WAN between two namespaces really has its round trip and its rate: a TCP
//! connection across it takes one round trip to open, and a bulk transfer does not outrun the
//! rate.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use xcloud::netlab::{Hosts, LinkSpec};

/// Opens `connections` TCP connections from src to dst, sends `bytes` on the last one, and
/// returns the shortest connect time and the transfer's bytes per second.
fn measure(hosts: &Hosts, connections: usize, bytes: usize) -> (Duration, f64) {
    let addr = format!("{}:7000", hosts.dst_ip);
    let listen = addr.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = Hosts::in_ns(&hosts.dst, move || {
        let listener = TcpListener::bind(&listen)?;
        let _ = ready_tx.send(());
        let mut received = 0;
        for _ in 0..connections {
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    n => received += n,
                }
            }
            s.write_all(b"k")?;
        }
        Ok(received)
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("server up");
    let client = Hosts::in_ns(&hosts.src, move || {
        let mut fastest = Duration::MAX;
        let mut rate = 0.0;
        for i in 0..connections {
            let start = Instant::now();
            let mut s = TcpStream::connect(&addr)?;
            fastest = fastest.min(start.elapsed());
            if i + 1 == connections {
                let chunk = vec![0x5a; 1 << 16];
                let start = Instant::now();
                for _ in 0..bytes / chunk.len() {
                    s.write_all(&chunk)?;
                }
                s.shutdown(std::net::Shutdown::Write)?;
                let mut ack = [0u8; 1];
                s.read_exact(&mut ack)?;
                rate = bytes as f64 / start.elapsed().as_secs_f64();
            } else {
                s.shutdown(std::net::Shutdown::Write)?;
                let mut ack = [0u8; 1];
                s.read_exact(&mut ack)?;
            }
        }
        Ok((fastest, rate))
    });
    let result = client.join().expect("client thread").expect("client");
    let received = server.join().expect("server thread").expect("server");
    assert_eq!(received, bytes / (1 << 16) * (1 << 16), "every byte arrives");
    result
}

#[test]
fn a_wan_link_has_its_round_trip_and_its_rate() {
    let link = LinkSpec::wan(100_000_000, Duration::from_millis(20));
    let hosts = Hosts::new(link).expect("namespaces (run the tests as root)");
    let (connect, rate) = measure(&hosts, 3, 8 << 20);
    assert!(
        connect >= Duration::from_millis(19) && connect < Duration::from_millis(60),
        "a TCP handshake takes one 20 ms round trip, took {connect:?}"
    );
    let mbit = rate * 8.0 / 1e6;
    eprintln!("100 Mbit/s, 20 ms RTT: connect {connect:?}, 8 MiB at {mbit:.1} Mbit/s");
    assert!(
        mbit <= 105.0 && mbit > 30.0,
        "8 MiB over a 100 Mbit/s link went at {mbit:.1} Mbit/s"
    );
}

#[test]
fn a_rate_limited_link_without_delay_keeps_its_rate() {
    let link = LinkSpec {
        rate_bits: Some(100_000_000),
        one_way_delay: Duration::ZERO,
    };
    let hosts = Hosts::new(link).expect("namespaces (run the tests as root)");
    let (connect, rate) = measure(&hosts, 2, 8 << 20);
    let mbit = rate * 8.0 / 1e6;
    assert!(connect < Duration::from_millis(5), "{connect:?}");
    assert!(
        mbit <= 105.0 && mbit > 30.0,
        "8 MiB over a 100 Mbit/s link went at {mbit:.1} Mbit/s"
    );
}

#[test]
fn a_plain_link_has_no_added_delay() {
    let hosts = Hosts::new(LinkSpec::default()).expect("namespaces (run the tests as root)");
    let (connect, _) = measure(&hosts, 3, 1 << 20);
    assert!(connect < Duration::from_millis(5), "{connect:?}");
}

#[test]
#[ignore = "a measurement, not a check: cargo test --release --test netlab -- --ignored --nocapture"]
fn gigabit_wan_throughput() {
    let hosts = Hosts::new(LinkSpec::wan(1_000_000_000, Duration::from_millis(20))).expect("namespaces");
    let (connect, rate) = measure(&hosts, 2, 256 << 20);
    eprintln!(
        "1 Gbit/s, 20 ms RTT: connect {connect:?}, 256 MiB at {:.1} Mbit/s",
        rate * 8.0 / 1e6
    );
}
