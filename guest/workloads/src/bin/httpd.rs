//! `httpd IP/PREFIX [PORT [SLOTS]]`: an HTTP/1.1 server on virtio NIC 0 (smoltcp), with
//! keep-alive and SLOTS (16) connections at once on PORT (80). `GET /count` returns the number
//! of requests served so far, this one included; any other `GET` returns a fixed body. The
//! count lives in guest memory, so a snapshot or a migration carries it: across a migration it
//! never goes backwards. Every second it reports the requests it answered per second as its
//! load (`ReportLoad`), for autoscaling groups that follow the guest's load.
//!
//! `httpd IP/PREFIX PORT SLOTS W R` also writes a W MiB working set at R MiB/s between requests
//! (each page checked against what it last wrote: a lost or stale page stops the guest), so
//! that a server under memory load can be migrated or replicated and its answers counted.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use core::fmt::Write;
use xcloud_guest_sdk::heap::{string::String, vec, vec::Vec};
use xcloud_guest_sdk::net::smoltcp::iface::SocketHandle;
use xcloud_guest_sdk::net::smoltcp::socket::tcp;
use xcloud_guest_sdk::net::Stack;
use xcloud_guest_sdk::virtio_net::Nic;
use xcloud_guest_sdk::{self as sdk, clock, println};

/// The fixed body.
const BODY: &[u8] = b"Hello from an xcloud guest\n";
/// Longest request head the server reads before it answers 431 and closes.
const MAX_HEAD: usize = 8 * 1024;

struct Slot {
    handle: SocketHandle,
    /// Bytes of the request being read.
    head: Vec<u8>,
}

enum Parsed {
    /// Not a whole head yet.
    More,
    /// A request: its path, whether the client wants the connection closed, and its length.
    Request { path: String, close: bool, len: usize },
    /// Not HTTP the server understands: this status, then close.
    Refuse(&'static str),
}

fn parse(head: &[u8]) -> Parsed {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if head.len() >= MAX_HEAD {
            Parsed::Refuse("431 Request Header Fields Too Large")
        } else {
            Parsed::More
        };
    };
    let Ok(text) = core::str::from_utf8(&head[..end]) else {
        return Parsed::Refuse("400 Bad Request");
    };
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, path, version) = (first.next(), first.next(), first.next());
    let (Some(method), Some(path), Some(version)) = (method, path, version) else {
        return Parsed::Refuse("400 Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Parsed::Refuse("505 HTTP Version Not Supported");
    }
    if method != "GET" {
        return Parsed::Refuse("405 Method Not Allowed");
    }
    let mut close = version == "HTTP/1.0";
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("connection") {
                let v = value.trim();
                close = v.eq_ignore_ascii_case("close") || (close && !v.eq_ignore_ascii_case("keep-alive"));
            }
            if name.trim().eq_ignore_ascii_case("content-length") && value.trim() != "0" {
                return Parsed::Refuse("400 Bad Request");
            }
        }
    }
    Parsed::Request {
        path: String::from(path),
        close,
        len: end + 4,
    }
}

fn respond(s: &mut tcp::Socket, status: &str, body: &[u8], close: bool) -> bool {
    let mut head = String::new();
    let _ = write!(
        head,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    // The send buffer holds a whole response (the buffers are sized for it): a client that
    // does not read gets its connection closed instead of a half response.
    if s.send_capacity() - s.send_queue() < head.len() + body.len() {
        return false;
    }
    let _ = s.send_slice(head.as_bytes());
    let _ = s.send_slice(body);
    true
}

fn main() -> i32 {
    let mut args = sdk::args();
    let Some(cidr) = args.next() else {
        println!("usage: httpd IP/PREFIX [PORT [SLOTS]]");
        return 2;
    };
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(80);
    let slots: usize = args.next().and_then(|c| c.parse().ok()).unwrap_or(16).clamp(1, 256);
    let Ok(mut pacer) = xcloud_workloads::paced_set_from_args("httpd", 3) else {
        return 1;
    };
    let nic = match Nic::open(0) {
        Ok(n) => n,
        Err(e) => {
            println!("httpd: no usable virtio NIC: {e:?}");
            return 1;
        }
    };
    let mut stack = match Stack::new(nic, cidr, None) {
        Ok(s) => s,
        Err(e) => {
            println!("httpd: {cidr}: {e:?}");
            return 2;
        }
    };
    let mut conns: Vec<Slot> = (0..slots)
        .map(|_| {
            let socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; 16 * 1024]),
                tcp::SocketBuffer::new(vec![0u8; 16 * 1024]),
            );
            Slot {
                handle: stack.sockets.add(socket),
                head: Vec::new(),
            }
        })
        .collect();
    println!("httpd: serving on {cidr} port {port}, {slots} connections at once");
    let mut served: u64 = 0;
    let mut count_body = String::new();
    let (mut window_start, mut window_served) = (clock::now_ns(), 0u64);
    loop {
        stack.poll_or_wait();
        let now = clock::now_ns();
        if let Some(pacer) = pacer.as_mut() {
            pacer.catch_up(now);
        }
        if now.saturating_sub(window_start) >= 1_000_000_000 {
            let per_second_milli =
                u128::from(served - window_served) * 1_000_000_000_000 / u128::from(now - window_start);
            sdk::report_load_milli(u64::try_from(per_second_milli).unwrap_or(u64::MAX));
            (window_start, window_served) = (now, served);
        }
        let mut answered = false;
        for slot in &mut conns {
            let s = stack.sockets.get_mut::<tcp::Socket>(slot.handle);
            if !s.is_open() {
                slot.head.clear();
                if s.listen(port).is_err() {
                    println!("httpd: cannot listen on port {port}");
                    return 1;
                }
                continue;
            }
            if s.can_recv() {
                let room = MAX_HEAD.saturating_sub(slot.head.len()).max(1);
                let _ = s.recv(|b| {
                    let n = b.len().min(room);
                    slot.head.extend_from_slice(&b[..n]);
                    (n, ())
                });
            }
            // Answer every whole request in the buffer (pipelining), in order.
            loop {
                match parse(&slot.head) {
                    Parsed::More => break,
                    Parsed::Refuse(status) => {
                        respond(s, status, b"", true);
                        s.close();
                        slot.head.clear();
                        break;
                    }
                    Parsed::Request { path, close, len } => {
                        served += 1;
                        let body: &[u8] = if path == "/count" {
                            count_body.clear();
                            let _ = writeln!(count_body, "{served}");
                            count_body.as_bytes()
                        } else {
                            BODY
                        };
                        if !respond(s, "200 OK", body, close) {
                            served -= 1;
                            break;
                        }
                        slot.head.drain(..len);
                        answered = true;
                        if close {
                            s.close();
                            slot.head.clear();
                            break;
                        }
                    }
                }
            }
            if s.state() == tcp::State::CloseWait {
                s.close();
            }
        }
        if answered {
            // Send the answers now rather than on the next turn.
            stack.poll();
        }
    }
}

sdk::entry!(main);
