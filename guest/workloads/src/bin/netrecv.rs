//! `netrecv IP/PREFIX [PORT [CONNECTIONS]]`: a TCP sink on virtio NIC 0 (smoltcp). Listens on
//! PORT (5001), takes CONNECTIONS (1; 0: forever) connections one after another, throws the
//! bytes away, and prints each connection's bytes and rate on the guest's clock (from its
//! first byte to its FIN), and the NIC's doorbells.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]
#![no_main]

use xcloud_guest_sdk::net::smoltcp::socket::tcp;
use xcloud_guest_sdk::net::Stack;
use xcloud_guest_sdk::virtio_net::Nic;
use xcloud_guest_sdk::{self as sdk, clock, heap::vec, println};

const RX_BUFFER: usize = 1 << 20;

fn main() -> i32 {
    let mut args = sdk::args();
    let Some(cidr) = args.next() else {
        println!("usage: netrecv IP/PREFIX [PORT [CONNECTIONS]]");
        return 2;
    };
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(5001);
    let connections: u64 = args.next().and_then(|c| c.parse().ok()).unwrap_or(1);
    let nic = match Nic::open(0) {
        Ok(n) => n,
        Err(e) => {
            println!("netrecv: no usable virtio NIC: {e:?}");
            return 1;
        }
    };
    let mac = nic.mac();
    let mut stack = match Stack::new(nic, cidr, None) {
        Ok(s) => s,
        Err(e) => {
            println!("netrecv: {cidr}: {e:?}");
            return 2;
        }
    };
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; RX_BUFFER]),
        tcp::SocketBuffer::new(vec![0u8; 4096]),
    );
    let handle = stack.sockets.add(socket);
    println!(
        "netrecv: listening on {cidr} port {port}, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    let mut served = 0u64;
    while connections == 0 || served < connections {
        let s = stack.sockets.get_mut::<tcp::Socket>(handle);
        if !s.is_open() && s.listen(port).is_err() {
            println!("netrecv: cannot listen on port {port}");
            return 1;
        }
        let mut bytes = 0u64;
        let mut first_ns = 0u64;
        let mut idle_ns = 0u64;
        loop {
            let t0 = clock::now_ns();
            let before = bytes;
            stack.poll_or_wait();
            let s = stack.sockets.get_mut::<tcp::Socket>(handle);
            while s.can_recv() {
                let got = s.recv(|b| (b.len(), b.len())).unwrap_or(0);
                if got == 0 {
                    break;
                }
                if bytes == 0 {
                    first_ns = clock::now_ns();
                }
                bytes += got as u64;
            }
            if bytes == before && bytes > 0 {
                idle_ns += clock::now_ns() - t0;
            }
            if s.state() == tcp::State::CloseWait || (bytes > 0 && !s.is_active()) {
                s.close();
                break;
            }
        }
        let seconds = (clock::now_ns() - first_ns) as f64 / 1e9;
        // Let the FIN and the last ACKs go out.
        let until = clock::now_ns() + 50_000_000;
        while clock::now_ns() < until {
            stack.poll();
        }
        stack.sockets.get_mut::<tcp::Socket>(handle).abort();
        stack.poll();
        served += 1;
        println!(
            "netrecv: connection {served}: {bytes} bytes in {:.1} ms ({:.1} ms idle), {:.1} MB/s, {} doorbells",
            seconds * 1e3,
            idle_ns as f64 / 1e6,
            bytes as f64 / 1e6 / seconds.max(1e-9),
            stack.nic.kicks()
        );
    }
    0
}

sdk::entry!(main);
