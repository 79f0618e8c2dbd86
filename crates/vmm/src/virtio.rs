//! Puts a VM's virtio devices on its buses: PCI bus 0 on the configuration ports, each
//! device's I/O window on the port bus, its doorbell as a KVM ioeventfd (so a notify never
//! leaves the kernel) and its interrupt line as an irqfd.

use crate::error::VmError;
use crate::lifecycle::ControlBlock;
use std::sync::Arc;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use xcloud_devices::bus::{PortBus, PortDevice};
use xcloud_devices::disk::{DiskFile, DiskSpec};
use xcloud_devices::pci::{PciFunction, PciIdentity, PciResources, PciRoot, PCI_CONFIG_BASE, PCI_CONFIG_PORTS};
use xcloud_devices::tap::{NetSpec, Tap};
use xcloud_devices::virtio::block::BlockDevice;
use xcloud_devices::virtio::net::NetDevice;
use xcloud_devices::virtio::{
    legacy, GuestMemoryHost, BLOCK_DEVICE_TYPE, BLOCK_PCI_DEVICE, MAX_VIRTIO_DEVICES, NET_DEVICE_TYPE, NET_PCI_DEVICE,
    VIRTIO_IO_BASE, VIRTIO_IO_SIZE, VIRTIO_IRQS, VIRTIO_VENDOR,
};
use xcloud_vm_core::machine::Machine;

/// Guest RAM as the devices see it, with their writes recorded for a live migration.
struct VmMemory(Arc<Machine>, Arc<ControlBlock>);

impl GuestMemoryHost for VmMemory {
    fn memory(&self) -> &GuestMemoryMmap {
        self.0.ram().mem()
    }

    fn note_write(&self, gpa: u64, len: u64) {
        self.0.note_vmm_write_range(gpa, len);
    }

    fn completed(&self) {
        self.1.io_happened();
    }
}

fn device_error(device: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Device { device, source }
}

fn kvm_error(device: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Device {
        device,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// A device's place: its I/O window, its interrupt, its PCI identity.
struct Placement {
    io_base: u16,
    irq_line: u8,
    irq: EventFd,
}

/// Allocates device `n`'s window and interrupt (its irqfd registered).
fn place(machine: &Machine, n: usize, what: &'static str) -> Result<Placement, VmError> {
    let io_base = VIRTIO_IO_BASE + n as u16 * VIRTIO_IO_SIZE;
    let irq_line = VIRTIO_IRQS[n % VIRTIO_IRQS.len()];
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(device_error(what))?;
    machine
        .vm_fd()
        .register_irqfd(&irq, irq_line as u32)
        .map_err(kvm_error(what))?;
    Ok(Placement { io_base, irq_line, irq })
}

/// What kind of virtio device: its PCI identity and its name in errors.
struct DeviceKind {
    pci_device: u16,
    subsystem: u16,
    class: [u8; 3],
    what: &'static str,
}

const BLOCK: DeviceKind = DeviceKind {
    pci_device: BLOCK_PCI_DEVICE,
    subsystem: BLOCK_DEVICE_TYPE,
    class: [0x01, 0x80, 0x00],
    what: "virtio-blk device",
};

const NET: DeviceKind = DeviceKind {
    pci_device: NET_PCI_DEVICE,
    subsystem: NET_DEVICE_TYPE,
    class: [0x02, 0x00, 0x00],
    what: "virtio-net device",
};

/// Puts a placed device on the buses: its doorbell as an ioeventfd on the notify port, its
/// window on the port bus, its function on PCI bus 0.
fn plug(
    machine: &Machine,
    bus: &mut PortBus,
    pci: &mut PciRoot,
    at: &Placement,
    device: Arc<dyn PortDevice>,
    kick: &EventFd,
    kind: &DeviceKind,
) -> Result<(), VmError> {
    let what = kind.what;
    machine
        .vm_fd()
        .register_ioevent(
            kick,
            &kvm_ioctls::IoEventAddress::Pio((at.io_base + legacy::QUEUE_NOTIFY) as u64),
            kvm_ioctls::NoDatamatch,
        )
        .map_err(kvm_error(what))?;
    bus.insert(at.io_base, VIRTIO_IO_SIZE, device)
        .map_err(|e| VmError::Device {
            device: what,
            source: std::io::Error::other(e),
        })?;
    let function = PciFunction::with_io_window(
        PciIdentity {
            vendor: VIRTIO_VENDOR,
            device: kind.pci_device,
            class: kind.class,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: kind.subsystem,
        },
        PciResources {
            io_base: at.io_base,
            io_size: VIRTIO_IO_SIZE,
            irq: at.irq_line,
        },
    );
    pci.add(function).map(|_| ()).ok_or(VmError::TooManyDevices {
        max: MAX_VIRTIO_DEVICES,
        asked: MAX_VIRTIO_DEVICES + 1,
    })
}

/// A MAC address no other NIC is likely to have: locally administered, unicast, random.
fn random_mac() -> [u8; 6] {
    let mut tail = [0u8; 3];
    // SAFETY: getrandom writes at most `tail.len()` bytes into the live array.
    let n = unsafe { libc::getrandom(tail.as_mut_ptr().cast(), tail.len(), 0) };
    if n != tail.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        tail.copy_from_slice(&t.to_le_bytes()[..3]);
    }
    [0x02, 0x78, 0x63, tail[0], tail[1], tail[2]]
}

/// The virtio devices of a VM.
pub(crate) struct Devices {
    pub disks: Vec<Arc<BlockDevice>>,
    pub nics: Vec<Arc<NetDevice>>,
}

/// Opens every disk image and TAP device (so a missing, locked or unusable one fails before
/// anything else is built), then wires a virtio device for each onto `bus`: disks first,
/// then NICs, with PCI bus 0 in front.
pub(crate) fn attach(
    machine: &Arc<Machine>,
    control: &Arc<ControlBlock>,
    bus: &mut PortBus,
    disks: &[DiskSpec],
    nets: &[NetSpec],
) -> Result<Devices, VmError> {
    let asked = disks.len() + nets.len();
    if asked > MAX_VIRTIO_DEVICES {
        return Err(VmError::TooManyDevices {
            max: MAX_VIRTIO_DEVICES,
            asked,
        });
    }
    let files = disks.iter().map(DiskFile::open).collect::<Result<Vec<_>, _>>()?;
    let taps = nets.iter().map(|n| Tap::open(&n.tap)).collect::<Result<Vec<_>, _>>()?;
    let mut pci = PciRoot::new();
    let memory: Arc<dyn GuestMemoryHost> = Arc::new(VmMemory(machine.clone(), control.clone()));
    let mut devices = Devices {
        disks: Vec::new(),
        nics: Vec::new(),
    };
    for (index, file) in files.into_iter().enumerate() {
        let at = place(machine, index, "virtio-blk interrupt")?;
        let irq = at.irq.try_clone().map_err(device_error("virtio-blk interrupt"))?;
        let device = Arc::new(
            BlockDevice::new(index as u32, file, memory.clone(), irq).map_err(device_error("virtio-blk device"))?,
        );
        plug(machine, bus, &mut pci, &at, device.clone(), device.kick_fd(), &BLOCK)?;
        devices.disks.push(device);
    }
    for (index, (tap, spec)) in taps.into_iter().zip(nets).enumerate() {
        let at = place(machine, disks.len() + index, "virtio-net interrupt")?;
        let irq = at.irq.try_clone().map_err(device_error("virtio-net interrupt"))?;
        if let Some(bridge) = &spec.bridge {
            xcloud_devices::hostnet::Netlink::open()
                .and_then(|mut nl| nl.set_master(&spec.tap, bridge))
                .map_err(VmError::HostNet)?;
        }
        let mac = spec.mac.unwrap_or_else(random_mac);
        let device = Arc::new(
            NetDevice::new(index as u32, tap, mac, spec.bridge.clone(), memory.clone(), irq)
                .map_err(device_error("virtio-net device"))?,
        );
        plug(machine, bus, &mut pci, &at, device.clone(), device.kick_fd(), &NET)?;
        devices.nics.push(device);
    }
    bus.insert(PCI_CONFIG_BASE, PCI_CONFIG_PORTS, Arc::new(pci))
        .map_err(|e| VmError::Device {
            device: "PCI configuration ports",
            source: std::io::Error::other(e),
        })?;
    Ok(devices)
}
