//! Puts a VM's virtio devices on its buses: PCI bus 0 on the configuration ports, each
//! device's I/O window on the port bus, its doorbell as a KVM ioeventfd (so a notify never
//! leaves the kernel) and its interrupt line as an irqfd.

use crate::error::VmError;
use std::sync::Arc;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use xcloud_devices::bus::PortBus;
use xcloud_devices::disk::{DiskFile, DiskSpec};
use xcloud_devices::pci::{PciFunction, PciIdentity, PciResources, PciRoot, PCI_CONFIG_BASE, PCI_CONFIG_PORTS};
use xcloud_devices::virtio::block::BlockDevice;
use xcloud_devices::virtio::{
    legacy, GuestMemoryHost, BLOCK_DEVICE_TYPE, BLOCK_PCI_DEVICE, MAX_VIRTIO_DEVICES, VIRTIO_IO_BASE, VIRTIO_IO_SIZE,
    VIRTIO_IRQS, VIRTIO_VENDOR,
};
use xcloud_vm_core::machine::Machine;

/// Guest RAM as the devices see it, with their writes recorded for a live migration.
struct VmMemory(Arc<Machine>);

impl GuestMemoryHost for VmMemory {
    fn memory(&self) -> &GuestMemoryMmap {
        self.0.ram().mem()
    }

    fn note_write(&self, gpa: u64, len: u64) {
        self.0.note_vmm_write_range(gpa, len);
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

/// Opens every disk (so a missing, locked or unusable image fails before anything else is
/// built), then wires a virtio-blk device for each onto `bus`, with PCI bus 0 in front.
pub(crate) fn attach_disks(
    machine: &Arc<Machine>,
    bus: &mut PortBus,
    disks: &[DiskSpec],
) -> Result<Vec<Arc<BlockDevice>>, VmError> {
    if disks.len() > MAX_VIRTIO_DEVICES {
        return Err(VmError::TooManyDevices {
            max: MAX_VIRTIO_DEVICES,
            asked: disks.len(),
        });
    }
    let files = disks.iter().map(DiskFile::open).collect::<Result<Vec<_>, _>>()?;
    let mut pci = PciRoot::new();
    let memory: Arc<dyn GuestMemoryHost> = Arc::new(VmMemory(machine.clone()));
    let mut devices = Vec::new();
    for (index, file) in files.into_iter().enumerate() {
        let io_base = VIRTIO_IO_BASE + index as u16 * VIRTIO_IO_SIZE;
        let irq_line = VIRTIO_IRQS[index % VIRTIO_IRQS.len()];
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(device_error("virtio-blk interrupt"))?;
        machine
            .vm_fd()
            .register_irqfd(&irq, irq_line as u32)
            .map_err(kvm_error("virtio-blk irqfd"))?;
        let device = Arc::new(
            BlockDevice::new(index as u32, file, memory.clone(), irq).map_err(device_error("virtio-blk device"))?,
        );
        machine
            .vm_fd()
            .register_ioevent(
                device.kick_fd(),
                &kvm_ioctls::IoEventAddress::Pio((io_base + legacy::QUEUE_NOTIFY) as u64),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(kvm_error("virtio-blk doorbell (ioeventfd)"))?;
        bus.insert(io_base, VIRTIO_IO_SIZE, device.clone())
            .map_err(|e| VmError::Device {
                device: "virtio-blk ports",
                source: std::io::Error::other(e),
            })?;
        let function = PciFunction::with_io_window(
            PciIdentity {
                vendor: VIRTIO_VENDOR,
                device: BLOCK_PCI_DEVICE,
                class: [0x01, 0x80, 0x00],
                subsystem_vendor: VIRTIO_VENDOR,
                subsystem: BLOCK_DEVICE_TYPE,
            },
            PciResources {
                io_base,
                io_size: VIRTIO_IO_SIZE,
                irq: irq_line,
            },
        );
        if pci.add(function).is_none() {
            return Err(VmError::TooManyDevices {
                max: MAX_VIRTIO_DEVICES,
                asked: disks.len(),
            });
        }
        devices.push(device);
    }
    bus.insert(PCI_CONFIG_BASE, PCI_CONFIG_PORTS, Arc::new(pci))
        .map_err(|e| VmError::Device {
            device: "PCI configuration ports",
            source: std::io::Error::other(e),
        })?;
    Ok(devices)
}
