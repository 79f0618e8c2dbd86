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
    /// Since when (guest ns) no frame has moved; 0: something just did.
    idle_since: u64,
}

/// How long the stack polls a quiet NIC before it gives the host CPU back (`wait_io`): long
/// enough that a stream's next segment is usually there first, short next to a timer tick.
const IDLE_SPIN_NS: u64 = 1_000_000;
/// Longest wait for a frame when no socket timer is due sooner.
const MAX_WAIT_NS: u64 = 100_000_000;

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
            idle_since: 0,
        })
    }

    /// Moves every frame that can move now; true when some socket's state may have changed.
    pub fn poll(&mut self) -> bool {
        self.iface.poll(now(), &mut self.nic, &mut self.sockets) == smoltcp::iface::PollResult::SocketStateChanged
    }

    /// [`Stack::poll`], and when the NIC has been quiet for a while, waits for it (or for the
    /// next socket timer) without spinning: the guest's loop calls this instead of `poll` when
    /// it has nothing else to do.
    pub fn poll_or_wait(&mut self) -> bool {
        let before = self.nic.activity();
        let changed = self.poll();
        let t = crate::clock::now_ns();
        if changed || self.nic.activity() != before {
            self.idle_since = 0;
        } else if self.idle_since == 0 {
            self.idle_since = t;
        } else if t - self.idle_since > IDLE_SPIN_NS {
            let timer = self
                .iface
                .poll_delay(now(), &self.sockets)
                .map_or(MAX_WAIT_NS, |d| d.total_micros() * 1000);
            crate::wait_io(timer.min(MAX_WAIT_NS));
            self.idle_since = 0;
        }
        changed
    }
}
