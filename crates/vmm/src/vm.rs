//! A VM: its machine, its components in order, its vCPU threads, and the lifecycle operations
//! on the whole of it.
//!
//! The components are walked, never named, by what operates on the whole VM: pause stops the
//! vCPUs first and then every other component; resume goes the other way; the saved state is
//! the machine's shape followed by every component's sections; a restore hands the saved
//! sections to the same components and refuses any section none of them took. A new device is
//! one more entry in `Vm::assemble`, with its state code beside the device.

use crate::context::VcpuContext;
use crate::error::VmError;
use crate::lifecycle::{Activity, ControlBlock, Request, VmExit, VmState};
use crate::vcpu_thread;
use crate::vcpus::VcpuSet;
use kvm_ioctls::VcpuFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;
use xcloud_devices::bus::PortBus;
use xcloud_devices::console::Console;
use xcloud_devices::disk::DiskSpec;
use xcloud_devices::serial::{SerialPort, COM1_BASE, COM1_IRQ, COM1_PORTS};
use xcloud_devices::tap::NetSpec;
use xcloud_devices::virtio::block::BlockDevice;
use xcloud_devices::virtio::net::NetDevice;
use xcloud_devices::virtio::persist::{BlockState, NetState};
use xcloud_state::{Component, StateError, StateTree};
use xcloud_vm_core::clock::Clock;
use xcloud_vm_core::irqchip::Irqchip;
use xcloud_vm_core::machine::{Machine, MachineConfig};
use xcloud_vm_core::memory::persist::GuestMemory;
use xcloud_vm_core::memory::{self, GuestRam};
use xcloud_vm_core::{boot, vcpu};

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs (1..=MAX_VCPUS).
    pub vcpus: usize,
    /// The guest's command line.
    pub cmdline: String,
    /// Its disks, in the order the guest finds them (virtio-blk 0, 1, ...).
    pub disks: Vec<DiskSpec>,
    /// Its NICs, in the order the guest finds them (virtio-net 0, 1, ...).
    pub nets: Vec<NetSpec>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 64 << 20,
            vcpus: 1,
            cmdline: String::new(),
            disks: Vec::new(),
            nets: Vec::new(),
        }
    }
}

/// A machine with its vCPUs, not yet a VM: what a restore or an incoming migration fills
/// (guest RAM first) before [`Vm::from_state`] makes a VM of it.
pub struct Blank {
    machine: Arc<Machine>,
    vcpus: Vec<VcpuFd>,
}

impl Blank {
    /// Builds the KVM VM, `mem_bytes` of RAM and `vcpus` vCPUs.
    pub fn build(mem_bytes: u64, vcpus: usize) -> Result<Self, VmError> {
        let (machine, vcpus) = Machine::build(mem_bytes, vcpus)?;
        Ok(Self {
            machine: Arc::new(machine),
            vcpus,
        })
    }

    /// Its guest RAM (still untouched by any guest).
    pub fn ram(&self) -> &GuestRam {
        self.machine.ram()
    }

    /// Does now, on the calling thread, what KVM otherwise does at a VM's first KVM_RUN: each
    /// vCPU enters KVM_RUN once with immediate exit, running no guest code. On this kernel the
    /// first KVM_RUN also starts the VM's NX huge page recovery thread, which was seen taking a
    /// core for a whole scheduler tick (4 ms) right when a migrated guest started; primed
    /// before the switch, that happens while the source still runs the guest, and at the
    /// priority of the thread that primes (a migration's receiver runs at background priority).
    pub fn prime(&mut self) -> Result<(), VmError> {
        for fd in &mut self.vcpus {
            xcloud_vm_core::vcpu::run_without_guest(fd).map_err(VmError::Prime)?;
        }
        Ok(())
    }
}

/// What the VM and its handles share.
struct Shared {
    ctx: Arc<VcpuContext>,
    vcpus: Arc<VcpuSet>,
    /// Every component, vCPUs included, in save and restore order.
    components: Vec<Arc<dyn Component>>,
    /// The same without the vCPUs, which pause first and resume last.
    others: Vec<Arc<dyn Component>>,
    /// Serializes pause and resume (a stop never waits for it).
    transition: Mutex<()>,
    cmdline: String,
    /// The disks, as given.
    disks: Vec<DiskSpec>,
    /// The NICs, with the MAC each got.
    nets: Vec<NetSpec>,
    /// The disk devices (a migration copies their images).
    block_devices: Vec<Arc<BlockDevice>>,
    /// The NIC devices (replication holds their output).
    net_devices: Vec<Arc<NetDevice>>,
    /// When guest RAM fills in while the guest runs (lazy restore, post-copy): turns true once
    /// every page is in.
    memory_complete: OnceLock<Arc<AtomicBool>>,
    /// The VM's extension modules.
    extensions: Arc<crate::extension::Extensions>,
}

impl Shared {
    fn control(&self) -> &ControlBlock {
        &self.ctx.control
    }
}

/// A handle that pauses, resumes, saves and stops a VM from any thread.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<Shared>,
}

impl VmHandle {
    /// The current lifecycle state.
    pub fn state(&self) -> VmState {
        self.shared.control().lock().state
    }

    fn refuse(&self, action: &'static str) -> VmError {
        VmError::InvalidTransition {
            action,
            state: self.state(),
        }
    }

    fn stopping(&self) -> bool {
        self.shared.control().lock().request == Request::Stop
    }

    /// Stops every vCPU, then every other component, and returns once none runs. The guest's
    /// clock keeps going.
    pub fn pause(&self) -> Result<(), VmError> {
        let _one_at_a_time = self.shared.transition.lock().unwrap_or_else(|p| p.into_inner());
        if self.state() != VmState::Running {
            return Err(self.refuse("pause"));
        }
        let stopped = || VmError::InvalidTransition {
            action: "pause",
            state: VmState::Stopped,
        };
        if let Err(e) = self.shared.vcpus.pause() {
            return Err(if self.stopping() { stopped() } else { e.into() });
        }
        let mut paused: Vec<&Arc<dyn Component>> = Vec::new();
        for c in self.shared.others.iter() {
            if let Err(e) = c.pause() {
                for p in paused.iter().rev() {
                    let _ = p.resume();
                }
                let _ = self.shared.vcpus.resume();
                return Err(e.into());
            }
            paused.push(c);
        }
        let mut c = self.shared.control().lock();
        if c.request == Request::Stop {
            return Err(stopped());
        }
        c.state = VmState::Paused;
        Ok(())
    }

    /// Lets every component, then every vCPU, run again.
    pub fn resume(&self) -> Result<(), VmError> {
        let _one_at_a_time = self.shared.transition.lock().unwrap_or_else(|p| p.into_inner());
        if self.state() != VmState::Paused {
            return Err(self.refuse("resume"));
        }
        for c in self.shared.others.iter().rev() {
            c.resume()?;
        }
        self.shared.vcpus.resume()?;
        let mut c = self.shared.control().lock();
        if c.request != Request::Stop {
            c.state = VmState::Running;
        }
        Ok(())
    }

    /// The whole state of a paused VM but its memory: the machine's shape, then every
    /// component's sections (each vCPU thread saves its own vCPU).
    pub fn save_state(&self) -> Result<StateTree, VmError> {
        if self.state() != VmState::Paused {
            return Err(self.refuse("save the state of"));
        }
        let machine = &self.shared.ctx.machine;
        let mut tree = StateTree::new();
        tree.save(
            0,
            &MachineConfig {
                mem_bytes: machine.ram().size(),
                vcpus: machine.vcpu_count(),
                tsc_khz: machine.tsc_khz(),
                cmdline: self.shared.cmdline.clone(),
            },
        )?;
        for c in &self.shared.components {
            c.save(&mut tree)?;
        }
        Ok(tree)
    }

    /// Returns once all of guest RAM is in place: at once, except after a lazy restore or a
    /// post-copy migration whose pages are still arriving (a snapshot or migration started
    /// then would miss them).
    pub fn wait_for_memory(&self) -> Result<(), VmError> {
        let Some(loaded) = self.shared.memory_complete.get() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !loaded.load(Ordering::SeqCst) {
            if self.stopping() || Instant::now() > deadline {
                return Err(VmError::MemoryNotLoaded);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Declares that guest RAM fills in while the guest runs, until `complete` turns true.
    pub fn set_memory_arriving(&self, complete: Arc<AtomicBool>) {
        let _ = self.shared.memory_complete.set(complete);
    }

    /// Ends a VM that was migrated away (its source copy, which must never run again).
    pub fn end_migrated(&self, to: &str) {
        yield_to_the_destination();
        self.shared.control().finish(VmExit::Migrated(to.to_string()));
    }

    /// Ends the VM because the VMM cannot go on with it (its memory cannot be completed).
    pub fn fail(&self, why: String) {
        self.shared.control().finish(VmExit::Failed(why));
    }

    /// Stops the VM; `Vm::wait` then returns `VmExit::Stopped` unless the guest ended first.
    pub fn stop(&self) {
        self.shared.control().finish(VmExit::Stopped);
    }

    /// The machine: guest RAM, its dirty log, the KVM VM.
    pub fn machine(&self) -> &Machine {
        &self.shared.ctx.machine
    }

    /// Reads guest RAM at guest-physical `addr` (for inspection; the guest may be running).
    pub fn read_guest(&self, addr: u64, buf: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
        use vm_memory::Bytes;
        self.machine()
            .ram()
            .mem()
            .read_slice(buf, vm_memory::GuestAddress(addr))
    }

    /// The VM's disks, in the order the guest finds them.
    pub fn disks(&self) -> &[DiskSpec] {
        &self.shared.disks
    }

    /// The VM's disk devices, in the order the guest finds them.
    pub fn block_devices(&self) -> &[Arc<BlockDevice>] {
        &self.shared.block_devices
    }

    /// The VM's NICs, each with its MAC, in the order the guest finds them.
    pub fn nets(&self) -> &[NetSpec] {
        &self.shared.nets
    }

    /// Output commit (docs/replication.md): from now on every NIC holds the frames the guest
    /// sends as part of `epoch` instead of sending them. Called while the VM is paused for a
    /// checkpoint, with the epoch of the next one.
    pub fn hold_output(&self, epoch: u64) {
        for nic in &self.shared.net_devices {
            nic.hold_output(epoch);
        }
    }

    /// Sends the held frames of the epochs up to `epoch`, whose checkpoint is safe; with None,
    /// every held frame, and the NICs stop holding. Returns how many frames went out.
    pub fn release_output(&self, epoch: Option<u64>) -> usize {
        self.shared
            .net_devices
            .iter()
            .map(|nic| nic.release_output(epoch))
            .sum()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.machine().vcpu_count()
    }

    /// Bytes of guest RAM.
    pub fn mem_bytes(&self) -> u64 {
        self.machine().ram().size()
    }

    /// The last load figure the guest reported (`ReportLoad`) and how long ago, if it has.
    pub fn guest_load(&self) -> Option<(f64, std::time::Duration)> {
        self.shared.ctx.load.last()
    }

    /// The VM's extension modules (docs/extensions.md).
    pub fn extensions(&self) -> &Arc<crate::extension::Extensions> {
        &self.shared.extensions
    }
}

/// A VM built and ready to start.
pub struct Vm {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Dropped after the vCPU threads are joined: what serves guest pages (a vCPU may be
    /// waiting for a page it serves), and the devices' worker threads.
    keep: Vec<Box<dyn Send + Sync>>,
    /// The disks and NICs, whose workers start with the VM.
    disks: Vec<Arc<BlockDevice>>,
    nics: Vec<Arc<NetDevice>>,
    /// The VM continues a saved one (restored or migrated in): its NICs announce its MAC when
    /// it starts.
    announce: bool,
}

static KICK_HANDLER: Once = Once::new();

impl Vm {
    fn assemble(
        blank: Blank,
        console: Console,
        activity: Vec<Activity>,
        cmdline: String,
        disks: &[DiskSpec],
        nets: &[NetSpec],
    ) -> Result<Self, VmError> {
        let Blank { machine, vcpus } = blank;
        let control = Arc::new(ControlBlock::new(activity));
        let mut bus = PortBus::new();
        // Disks first: an image that cannot be used is the likeliest error, and nothing else
        // should be set up for a VM that cannot have it.
        let crate::virtio::Devices {
            disks: disk_devices,
            nics,
        } = crate::virtio::attach(&machine, &control, &mut bus, disks, nets)?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Device {
            device: "serial port's interrupt",
            source,
        })?;
        machine
            .vm_fd()
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|e| VmError::Device {
                device: "serial port's irqfd",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        let serial = Arc::new(
            SerialPort::new(serial_irq, console.clone()).map_err(|source| VmError::Device {
                device: "serial port",
                source,
            })?,
        );
        bus.insert(COM1_BASE, COM1_PORTS, serial.clone())
            .map_err(|e| VmError::Device {
                device: "serial port",
                source: std::io::Error::other(e),
            })?;
        let extensions = Arc::new(crate::extension::Extensions::new());
        for nic in &nics {
            nic.set_packet_hook(extensions.clone());
        }
        for disk in &disk_devices {
            disk.set_block_hook(extensions.clone());
        }
        // The provider's built-in modules, on the same interface as a tenant's.
        let built_ins: [(&str, Arc<dyn crate::extension::Extension>); 3] = [
            (
                crate::meter::NAME,
                Arc::new(crate::meter::DeviceMeter::new(&nics, &disk_devices)),
            ),
            (
                crate::convergence::NAME,
                Arc::new(crate::convergence::PrecopyPolicy::new()),
            ),
            (crate::page_scan::NAME, Arc::new(crate::page_scan::PageScan::default())),
        ];
        for (name, module) in built_ins {
            let spec = crate::extension::ModuleSpec {
                name: name.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                digest: "built-in".into(),
                origin: crate::extension::Origin::Provider,
                ports: None,
                call_budget: std::time::Duration::from_millis(50),
                code: None,
            };
            extensions.add(spec, module).map_err(|e| VmError::Device {
                device: "provider's built-in module",
                source: std::io::Error::other(e),
            })?;
        }
        bus.insert(
            xcloud_abi::EXT_PORT_BASE,
            xcloud_abi::EXT_PORT_COUNT,
            Arc::new(crate::extension::ExtensionPorts::new(extensions.clone())),
        )
        .map_err(|e| VmError::Device {
            device: "extension window",
            source: std::io::Error::other(e),
        })?;
        let vcpu_set = Arc::new(VcpuSet::new(control.clone(), vcpus));
        // Save and restore order: the VM-wide parts, the vCPUs (their LAPICs after the
        // irqchip), then the devices.
        let vm_wide: [Arc<dyn Component>; 3] = [
            Arc::new(GuestMemory::new(machine.ram().size())),
            Arc::new(Irqchip::new(machine.clone())),
            Arc::new(Clock::new(machine.clone())),
        ];
        // The extensions last: a module's state is saved after the devices it sees are paused.
        let devices: Vec<Arc<dyn Component>> = std::iter::once(serial as Arc<dyn Component>)
            .chain(disk_devices.iter().map(|d| d.clone() as Arc<dyn Component>))
            .chain(nics.iter().map(|d| d.clone() as Arc<dyn Component>))
            .chain(std::iter::once(extensions.clone() as Arc<dyn Component>))
            .collect();
        let nets: Vec<NetSpec> = nics
            .iter()
            .zip(nets)
            .map(|(nic, spec)| NetSpec {
                tap: spec.tap.clone(),
                mac: Some(nic.mac()),
                bridge: spec.bridge.clone(),
            })
            .collect();
        let vcpu_part: Arc<dyn Component> = vcpu_set.clone();
        let components = vm_wide
            .iter()
            .cloned()
            .chain([vcpu_part])
            .chain(devices.iter().cloned())
            .collect();
        let others = vm_wide.into_iter().chain(devices).collect();
        let ctx = Arc::new(VcpuContext::new(machine, control, console, bus));
        Ok(Self {
            shared: Arc::new(Shared {
                ctx,
                vcpus: vcpu_set,
                components,
                others,
                transition: Mutex::new(()),
                cmdline,
                disks: disks.to_vec(),
                nets,
                block_devices: disk_devices.clone(),
                net_devices: nics.clone(),
                memory_complete: OnceLock::new(),
                extensions,
            }),
            threads: Vec::new(),
            keep: Vec::new(),
            disks: disk_devices,
            nics,
            announce: false,
        })
    }

    /// Builds a VM: KVM, memfd RAM, in-kernel irqchip, COM1, vCPUs, and the PVH image loaded.
    pub fn new(config: &VmConfig, image: &[u8], console: Console) -> Result<Self, VmError> {
        // A bad size is refused before KVM is opened, so the error names the size even on a
        // host without KVM.
        memory::validate_size(config.mem_bytes, memory::host_ram_bytes())?;
        let blank = Blank::build(config.mem_bytes, config.vcpus)?;
        let boot = boot::load_pvh(blank.ram().mem(), blank.ram().size(), image, &config.cmdline)?;
        vcpu::set_boot_state(&blank.vcpus[0], &boot)?;
        let mut activity = vec![Activity::Parked; config.vcpus];
        activity[0] = Activity::Paused;
        Self::assemble(
            blank,
            console,
            activity,
            config.cmdline.clone(),
            &config.disks,
            &config.nets,
        )
    }

    /// Makes a VM of `blank` (its memory already in place, or arriving) that continues from
    /// `state`: every component takes its sections, and a section none takes is an error.
    /// Nothing runs until [`Vm::start`]; on any error nothing ever runs.
    pub fn from_state(blank: Blank, mut state: StateTree, console: Console) -> Result<Self, VmError> {
        let config = state.require::<MachineConfig>(0)?;
        let (mem_bytes, vcpus) = (blank.ram().size(), blank.vcpus.len());
        if config.mem_bytes != mem_bytes || config.vcpus != vcpus {
            return Err(StateError::Incompatible(format!(
                "it is of a VM with {} bytes of RAM and {} vCPUs, this one has {mem_bytes} and {vcpus}",
                config.mem_bytes, config.vcpus
            ))
            .into());
        }
        let tsc_khz = blank.machine.tsc_khz();
        if tsc_khz != config.tsc_khz {
            tracing::warn!(
                "the saved TSC ran at {} kHz, this host's at {tsc_khz} kHz: guest time will run at this host's rate",
                config.tsc_khz
            );
        }
        let (disks, nets) = saved_devices(&state)?;
        let mut vm = Self::assemble(
            blank,
            console,
            vec![Activity::Parked; vcpus],
            config.cmdline,
            &disks,
            &nets,
        )?;
        vm.announce = true;
        for c in &vm.shared.components {
            c.restore(&mut state)?;
        }
        state.ensure_all_taken()?;
        Ok(vm)
    }

    /// A handle for pause, resume, save and stop.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
        }
    }

    /// Keeps `thing` alive until the vCPU threads have ended (a lazy restore's page server).
    pub fn keep_until_stopped(&mut self, thing: Box<dyn Send + Sync>) {
        self.keep.push(thing);
    }

    /// Starts one thread per vCPU; the boot vCPU begins at the PVH entry.
    pub fn start(&mut self) -> Result<(), VmError> {
        let control = self.shared.control();
        if control.lock().state != VmState::Created {
            return Err(self.handle().refuse("start"));
        }
        let mut install = Ok(());
        KICK_HANDLER.call_once(|| install = vcpu::install_kick_handler());
        install.map_err(|e| VmError::Thread {
            index: 0,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        for disk in &self.disks {
            let worker = disk.start_worker().map_err(|source| VmError::Device {
                device: "virtio-blk worker thread",
                source,
            })?;
            self.keep.push(Box::new(worker));
        }
        for nic in &self.nics {
            let worker = nic.start_worker().map_err(|source| VmError::Device {
                device: "virtio-net worker thread",
                source,
            })?;
            self.keep.push(Box::new(worker));
        }
        let ticker = self
            .shared
            .extensions
            .start_ticker(self.shared.ctx.machine.ram().mem().clone())
            .map_err(|source| VmError::Device {
                device: "extension tick thread",
                source,
            })?;
        self.keep.push(Box::new(ticker));
        let mut c = control.lock();
        for (index, fd) in self.shared.vcpus.take_unstarted().into_iter().enumerate() {
            let ctx = self.shared.ctx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .stack_size(256 * 1024)
                .spawn(move || vcpu_thread::run(index, fd, ctx));
            let thread = match thread {
                Ok(t) => t,
                Err(source) => {
                    drop(c);
                    control.finish(VmExit::Failed(format!("cannot start vCPU thread {index}")));
                    return Err(VmError::Thread { index, source });
                }
            };
            use std::os::unix::thread::JoinHandleExt;
            c.threads.push(thread.as_pthread_t());
            self.threads.push(thread);
        }
        c.state = VmState::Running;
        control.changed.notify_all();
        drop(c);
        if self.announce && !self.nics.is_empty() {
            announce(self.nics.clone());
        }
        Ok(())
    }

    /// Waits for the VM to end and returns how it ended.
    pub fn wait(mut self) -> VmExit {
        let control = self.shared.ctx.control.clone();
        {
            let mut c = control.lock();
            while c.vcpus.iter().any(|a| *a != Activity::Exited) {
                if self.threads.is_empty() {
                    break;
                }
                c = control.wait(c, None);
            }
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                control.finish(VmExit::Failed("a vCPU thread panicked".into()));
            }
        }
        let mut c = control.lock();
        c.state = VmState::Stopped;
        c.exit.clone().unwrap_or(VmExit::Stopped)
    }

    /// What the hypercall harness drives by hand (fuzzing.rs).
    pub(crate) fn parts_for_harness(&self) -> (Arc<VcpuContext>, Arc<VcpuSet>) {
        (self.shared.ctx.clone(), self.shared.vcpus.clone())
    }
}

/// Announces the NICs' MACs now and twice more (50 and 200 ms later), on a thread of its own:
/// one frame can be lost while a bridge or an overlay is still catching up.
fn announce(nics: Vec<Arc<NetDevice>>) {
    let spawned = std::thread::Builder::new().name("announce".into()).spawn(move || {
        for pause in [0, 50, 150] {
            std::thread::sleep(Duration::from_millis(pause));
            for (i, nic) in nics.iter().enumerate() {
                if let Err(e) = nic.announce() {
                    tracing::warn!("virtio-net{i}: cannot announce the MAC: {e}");
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the thread that announces the NICs: {e}");
    }
}

/// The disks and NICs a saved VM had, in order: their sections name their images and TAPs.
fn saved_devices(state: &StateTree) -> Result<(Vec<DiskSpec>, Vec<NetSpec>), VmError> {
    use xcloud_state::Persist;
    let count = |kind: &str| state.sections().iter().filter(|s| s.kind == kind).count() as u32;
    let disks = (0..count(BlockState::KIND))
        .map(|i| {
            let s = state.peek::<BlockState>(i)?;
            Ok(DiskSpec {
                path: s.path.into(),
                read_only: s.read_only,
            })
        })
        .collect::<Result<_, VmError>>()?;
    let nets = (0..count(NetState::KIND))
        .map(|i| {
            let s = state.peek::<NetState>(i)?;
            Ok(NetSpec {
                tap: s.tap,
                mac: Some(s.mac),
                bridge: s.bridge,
            })
        })
        .collect::<Result<_, VmError>>()?;
    Ok((disks, nets))
}

/// Lowers every thread of this process to the lowest CPU priority (nice 19). Called once the
/// guest runs elsewhere: tearing the source down (unmapping and freeing guest RAM takes
/// milliseconds of CPU) must not take a core from the guest's new home when both share a host.
fn yield_to_the_destination() {
    xcloud_vm_core::host::lower_threads_named("");
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.control().finish(VmExit::Stopped);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
        // The page server goes after the vCPUs: a vCPU may be waiting for a page it serves.
        self.keep.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xcloud_state::Section;

    fn sink() -> Console {
        Console::new(Box::new(std::io::sink()))
    }

    #[test]
    fn the_saved_state_holds_every_component_and_a_restore_takes_every_section() {
        // hlt; jmp back to it.
        let image = boot::minimal_elf(0x10_0000, &[0xf4, 0xeb, 0xfd], true);
        let config = VmConfig {
            mem_bytes: 4 << 20,
            vcpus: 2,
            cmdline: "walk".into(),
            disks: Vec::new(),
            nets: Vec::new(),
        };
        let mut vm = Vm::new(&config, &image, sink()).expect("a KVM VM");
        let handle = vm.handle();
        assert!(matches!(handle.save_state(), Err(VmError::InvalidTransition { .. })));
        vm.start().expect("start");
        handle.pause().expect("pause");
        let saved = handle.save_state().expect("save");
        let parts: Vec<(&str, u32)> = saved.sections().iter().map(|s| (s.kind.as_str(), s.instance)).collect();
        assert_eq!(
            parts,
            [
                ("machine", 0),
                ("memory", 0),
                ("irqchip", 0),
                ("irqchip", 1),
                ("irqchip", 2),
                ("clock", 0),
                ("vcpu", 0),
                ("vcpu", 1),
                ("serial", 0),
            ]
        );
        let back = StateTree::decode(&saved.encode().expect("encode")).expect("decode");
        let blank = || Blank::build(4 << 20, 2).expect("a blank machine");
        Vm::from_state(blank(), back.clone(), sink()).expect("every section taken");

        let mut extra = back.clone();
        extra
            .put(Section {
                kind: "virtio-gpu".into(),
                instance: 0,
                version: 1,
                body: Vec::new(),
            })
            .expect("put");
        let err = Vm::from_state(blank(), extra, sink()).err();
        assert!(
            matches!(err, Some(VmError::State(StateError::Unclaimed { ref kind, .. })) if kind == "virtio-gpu"),
            "{err:?}"
        );

        let mut missing = back.clone();
        missing.take("vcpu", 1).expect("vCPU 1 was saved");
        let err = Vm::from_state(blank(), missing, sink()).err();
        assert!(
            matches!(
                err,
                Some(VmError::State(StateError::Missing {
                    kind: "vcpu",
                    instance: 1
                }))
            ),
            "{err:?}"
        );

        let mut stuck = back.clone();
        stuck.take("vcpu", 0).expect("vCPU 0 was saved");
        stuck
            .save(
                0,
                &xcloud_vm_core::vcpu::persist::VcpuSnapshot {
                    index: 0,
                    activity: xcloud_vm_core::vcpu::persist::VcpuActivity::Parked,
                    state: None,
                },
            )
            .expect("save");
        let err = Vm::from_state(blank(), stuck, sink()).err();
        assert!(
            matches!(err, Some(VmError::State(StateError::Incompatible(ref why))) if why.contains("none of its 2 vCPUs can run")),
            "{err:?}"
        );

        let other_shape = Blank::build(8 << 20, 2).expect("a blank machine");
        let err = Vm::from_state(other_shape, back, sink()).err();
        assert!(
            matches!(err, Some(VmError::State(StateError::Incompatible(_)))),
            "{err:?}"
        );
        handle.stop();
        vm.wait();
    }
}
