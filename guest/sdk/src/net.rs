//! A TCP/IP stack for SDK guests: smoltcp over the virtio-net driver, on the guest's clock.
//!
//! `Stack::new(nic, "10.0.0.2/24")` makes an interface with that address; the guest adds
//! sockets to `stack.sockets` and calls [`Stack::poll`] in its loop (there are no interrupts:
//! the loop is the stack's only driver).

use crate::virtio_net::Nic;
pub use smoltcp;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

/// The stack's time: the guest's clock.
pub fn now() -> Instant {
    Instant::from_micros((crate::clock::now_ns() / 1000) as i64)
}

/// An interface, its NIC and its sockets.
pub struct Stack {
    /// The interface.
    pub iface: Interface,
    /// The NIC under it.
    pub nic: Nic,
    /// The sockets the guest added.
    pub sockets: SocketSet<'static>,
}

/// Why a stack could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackError {
    /// The address is not `a.b.c.d/prefix`.
    BadAddress,
}

impl Stack {
    /// A stack on `nic` with address `cidr` (`a.b.c.d/prefix`) and, optionally, a default
    /// gateway.
    pub fn new(mut nic: Nic, cidr: &str, gateway: Option<Ipv4Address>) -> Result<Self, StackError> {
        let cidr: IpCidr = cidr.parse().map_err(|_| StackError::BadAddress)?;
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(nic.mac())));
        config.random_seed = crate::clock::rdtsc();
        let mut iface = Interface::new(config, &mut nic, now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(cidr);
        });
        if let Some(gw) = gateway {
            let _ = iface.routes_mut().add_default_ipv4_route(gw);
        }
        Ok(Self {
            iface,
            nic,
            sockets: SocketSet::new(crate::heap::vec::Vec::new()),
        })
    }

    /// Moves every frame that can move now; true when some socket's state may have changed.
    pub fn poll(&mut self) -> bool {
        self.iface.poll(now(), &mut self.nic, &mut self.sockets) == smoltcp::iface::PollResult::SocketStateChanged
    }
}
