//! The xcloud guest SDK: everything a freestanding unikernel needs to run at native speed inside
//! xcloud, and to boot unchanged in any other VMM that speaks PVH.
//!
//! A guest is a `#![no_std] #![no_main]` binary that calls [`entry!`] with its `main`. The SDK
//! provides the PVH boot stub (`boot`), hypercalls (`hypercall`), the console and `println!`
//! (`console`), a heap (`mem`), a calibrated clock and sleep (`clock`), the command line
//! ([`args`]), secondary vCPUs ([`start_vcpu`]), its load for autoscaling ([`report_load_milli`]), PCI bus 0 (`pci`) and a polling virtio-blk
//! driver (`virtio_blk`), a polling virtio-net driver (`virtio_net`) and a TCP/IP stack on it
//! (`net`, smoltcp), [`exit`], and a panic handler that reports the
//! panic by hypercall and ends the VM with a failure status.
//!
//! All code after the stub runs at CPL3 with IOPL=3 and interrupts off; nothing may fault.
#![no_std]

pub extern crate alloc;

mod boot;
pub mod clock;
pub mod console;
pub mod ext;
pub mod hypercall;
pub mod mem;
pub mod net;
pub mod pci;
pub mod virtio_blk;
pub mod virtio_net;
pub mod virtqueue;

use alloc::boxed::Box;
use core::sync::atomic::{AtomicUsize, Ordering};
use xcloud_abi::{pvh, HcError, PANIC_EXIT_STATUS};

/// Re-exported so that workloads can use `Vec`, `String`, `Box`.
pub use alloc as heap;
pub use xcloud_abi::Op;

const MAX_RAM_REGIONS: usize = 16;
static CMDLINE: AtomicUsize = AtomicUsize::new(0);
static CMDLINE_LEN: AtomicUsize = AtomicUsize::new(0);
static RAM_BYTES: AtomicUsize = AtomicUsize::new(0);

extern "Rust" {
    /// The workload's `main`, defined by [`entry!`].
    fn __xcloud_main() -> i32;
}

/// Declares the guest's `main` (a `fn() -> i32` whose result is the exit status).
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// The guest's entry point, called by the SDK once the guest runs at CPL3.
        #[no_mangle]
        pub fn __xcloud_main() -> i32 {
            $main()
        }
    };
}

/// First Rust code, at CPL3 on the boot stack; `start_info` is the PVH `hvm_start_info` address.
#[no_mangle]
extern "C" fn __xcloud_start(start_info: u64) -> ! {
    clock::init();
    let mut ram = [(0u64, 0u64); MAX_RAM_REGIONS];
    let regions = read_start_info(start_info, &mut ram);
    RAM_BYTES.store(ram[..regions].iter().map(|r| r.1 as usize).sum(), Ordering::Relaxed);
    mem::init_heap(&ram[..regions]);
    // SAFETY: `entry!` defines this symbol with this exact signature in the workload.
    let status = unsafe { __xcloud_main() };
    exit(status)
}

/// Reads the command line and the RAM regions from `hvm_start_info`. A guest booted by
/// something that is not PVH (bad magic) gets no arguments and no heap.
fn read_start_info(addr: u64, ram: &mut [(u64, u64); MAX_RAM_REGIONS]) -> usize {
    if addr == 0 {
        return 0;
    }
    // SAFETY: the PVH protocol passes the address of a valid hvm_start_info in RAM, which the
    // identity map covers; it is only read, before anything could reuse that memory.
    let info = unsafe { core::ptr::read_unaligned(addr as *const pvh::StartInfo) };
    if info.magic != pvh::START_MAGIC {
        return 0;
    }
    if info.cmdline_paddr != 0 {
        let start = info.cmdline_paddr as *const u8;
        let mut len = 0;
        // SAFETY: the command line is a NUL-terminated string in RAM; the scan stops at 4 KiB.
        while len < 4096 && unsafe { *start.add(len) } != 0 {
            len += 1;
        }
        CMDLINE.store(start as usize, Ordering::Relaxed);
        CMDLINE_LEN.store(len, Ordering::Relaxed);
    }
    let mut n = 0;
    for i in 0..info.memmap_entries as usize {
        if n == MAX_RAM_REGIONS {
            break;
        }
        // SAFETY: the memory map has `memmap_entries` entries at `memmap_paddr`, per PVH.
        let e = unsafe { core::ptr::read_unaligned((info.memmap_paddr as *const pvh::MemmapEntry).add(i)) };
        if e.kind == pvh::MEMMAP_RAM {
            ram[n] = (e.addr, e.size);
            n += 1;
        }
    }
    n
}

/// The whole command line the VMM passed.
pub fn cmdline() -> &'static str {
    let ptr = CMDLINE.load(Ordering::Relaxed) as *const u8;
    if ptr.is_null() {
        return "";
    }
    // SAFETY: set once at boot to a NUL-terminated string in RAM that nothing writes again.
    let bytes = unsafe { core::slice::from_raw_parts(ptr, CMDLINE_LEN.load(Ordering::Relaxed)) };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// The command-line arguments, split at whitespace.
pub fn args() -> impl Iterator<Item = &'static str> {
    cmdline().split_whitespace()
}

/// Bytes of RAM the memory map reports.
pub fn ram_bytes() -> usize {
    RAM_BYTES.load(Ordering::Relaxed)
}

/// Ends the VM with `status` (0-255). Under another VMM: writes it to QEMU's isa-debug-exit
/// port (0xf4), prints it, and spins.
pub fn exit(status: i32) -> ! {
    if hypercall::xcloud_present() {
        hypercall::call(Op::Exit, [status as u64, 0, 0, 0, 0, 0]);
    } else {
        hypercall::outb(0xf4, status as u8);
        println!("xcloud-guest: exit status {status}");
    }
    loop {
        core::hint::spin_loop();
    }
}

static IO_GENERATION: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static WAIT_IO_MISSING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Gives the host CPU back until a device completes buffers (a frame arrived, a request is
/// done), or `timeout_ns` passes (at most 1 s): one exit instead of a spinning vCPU. Under a
/// VMM without the `WaitIo` hypercall it returns at once and the caller spins on.
pub fn wait_io(timeout_ns: u64) {
    if !hypercall::xcloud_present() || WAIT_IO_MISSING.load(Ordering::Relaxed) {
        return;
    }
    let seen = IO_GENERATION.load(Ordering::Relaxed);
    let generation = hypercall::call(Op::WaitIo, [timeout_ns, seen, 0, 0, 0, 0]);
    if generation < 0 {
        WAIT_IO_MISSING.store(true, Ordering::Relaxed);
    } else {
        IO_GENERATION.store(generation as u64, Ordering::Relaxed);
    }
}

/// Tells the VMM the guest's load, in thousandths of a figure the application chooses
/// (requests per second, jobs waiting): what an autoscaling group with `metric: guest_load`
/// follows. Cut to the ABI's largest figure; does nothing when not under xcloud.
pub fn report_load_milli(milli: u64) {
    if hypercall::xcloud_present() {
        hypercall::call(Op::ReportLoad, [milli.min(xcloud_abi::MAX_LOAD_MILLI), 0, 0, 0, 0, 0]);
    }
}

/// Number of vCPUs the VM has (1 when not under xcloud: secondaries need xcloud's StartVcpu).
pub fn vcpu_count() -> usize {
    if hypercall::xcloud_present() {
        hypercall::call(Op::VcpuCount, [0; 6]).max(1) as usize
    } else {
        1
    }
}

/// Index of the calling vCPU (0 is the boot vCPU).
pub fn vcpu_index() -> usize {
    if hypercall::xcloud_present() {
        hypercall::call(Op::VcpuIndex, [0; 6]).max(0) as usize
    } else {
        0
    }
}

/// Why a secondary vCPU could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuError {
    /// The VMM has no xcloud hypercalls.
    Unsupported,
    /// The VMM refused (no such vCPU, or it already runs).
    Refused(i64),
}

const AP_STACK_BYTES: usize = 64 * 1024;

type ApTask = Box<dyn FnOnce() + Send + 'static>;

/// Runs `task` on secondary vCPU `index` (1..vcpu_count()); the vCPU parks when `task` returns.
pub fn start_vcpu(index: usize, task: impl FnOnce() + Send + 'static) -> Result<(), VcpuError> {
    extern "C" {
        fn __xcloud_ap_entry();
    }
    if !hypercall::xcloud_present() {
        return Err(VcpuError::Unsupported);
    }
    let stack = alloc::vec![0u8; AP_STACK_BYTES].leak();
    let stack_top = (stack.as_mut_ptr() as u64 + AP_STACK_BYTES as u64) & !0xf;
    let arg = Box::into_raw(Box::new(Box::new(task) as ApTask));
    let rip = __xcloud_ap_entry as *const () as usize as u64;
    let result = hypercall::call(Op::StartVcpu, [index as u64, rip, stack_top, arg as u64, 0, 0]);
    if result < 0 {
        // SAFETY: the VMM refused, so no vCPU will ever read `arg`; take it back to free it.
        drop(unsafe { Box::from_raw(arg) });
        return Err(VcpuError::Refused(result));
    }
    Ok(())
}

/// First Rust code of a secondary vCPU.
#[no_mangle]
extern "C" fn __xcloud_ap_start(arg: *mut ApTask) -> ! {
    // SAFETY: `arg` came from Box::into_raw in start_vcpu and is consumed exactly once, here.
    let task = unsafe { Box::from_raw(arg) };
    task();
    hypercall::call(Op::StopVcpu, [0; 6]);
    loop {
        core::hint::spin_loop();
    }
}

/// The code a hypercall error maps to, for printing.
pub fn describe_error(code: i64) -> &'static str {
    match -code {
        x if x == HcError::BadOp as i64 => "bad operation",
        x if x == HcError::BadArg as i64 => "bad argument",
        x if x == HcError::BadAddress as i64 => "bad address",
        x if x == HcError::BadState as i64 => "bad state",
        _ => "unknown error",
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    struct Buf {
        bytes: [u8; 512],
        len: usize,
    }
    impl Write for Buf {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let n = s.len().min(self.bytes.len() - self.len);
            self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut buf = Buf {
        bytes: [0; 512],
        len: 0,
    };
    let _ = write!(buf, "{info}");
    if hypercall::xcloud_present() {
        hypercall::call(Op::Panic, [buf.bytes.as_ptr() as u64, buf.len as u64, 0, 0, 0, 0]);
    } else {
        console::write_bytes(b"guest panicked: ");
        console::write_bytes(&buf.bytes[..buf.len]);
        console::write_bytes(b"\n");
    }
    exit(PANIC_EXIT_STATUS)
}
