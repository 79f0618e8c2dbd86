//! The xcloud guest ABI: the one definition shared by the VMM (host side) and the guest SDK.
//!
//! It owns the hypercall port, the layout of the hypercall block, the operation numbers, the
//! result codes, the guest memory layout the VMM promises at boot, and the PVH start-info
//! structures. `docs/hypercall-abi.md` is the prose version of this file; change both together
//! and bump [`ABI_VERSION`] on any incompatible change.
//!
//! Everything here is `no_std` and plain data so that a freestanding guest can use it.
#![no_std]

/// The I/O port that carries hypercalls.
///
/// * A 32-bit `out` writes the guest-physical address of a [`HypercallBlock`]; the VMM executes
///   the call before the vCPU continues (one exit per call).
/// * A 32-bit `in` reads [`PROBE_MAGIC`] with the ABI version in the low byte, or all ones when
///   no xcloud VMM is there (any other VMM): that is how a guest detects xcloud.
pub const HYPERCALL_PORT: u16 = 0x5843;

/// The first I/O port of the extension window: ports the VM's extension modules serve
/// (docs/extensions.md). A port no module serves reads as all ones.
pub const EXT_PORT_BASE: u16 = 0x5000;
/// How many ports the extension window has.
pub const EXT_PORT_COUNT: u16 = 0x100;

/// The value an `in` from [`HYPERCALL_PORT`] returns, ORed with [`ABI_VERSION`].
pub const PROBE_MAGIC: u32 = 0x5843_4c00;

/// Version of this ABI. Version 1 is the first.
pub const ABI_VERSION: u32 = 1;

/// Size and alignment of a hypercall block in guest memory.
pub const BLOCK_SIZE: usize = core::mem::size_of::<HypercallBlock>();

/// One hypercall: the guest fills `op` and `args`, writes the block's guest-physical address
/// to [`HYPERCALL_PORT`], and reads `result` back.
///
/// The block must be 8-byte aligned and lie entirely in guest RAM below 4 GiB. All fields are
/// little-endian.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypercallBlock {
    /// An [`Op`] number.
    pub op: u32,
    /// Must be zero (reserved for flags).
    pub flags: u32,
    /// Written by the VMM: a value `>= 0` on success, a negated [`HcError`] code on failure.
    pub result: i64,
    /// Operation arguments; unused ones should be zero.
    pub args: [u64; 6],
}

impl HypercallBlock {
    /// Builds a block for `op` with `args`.
    pub const fn new(op: Op, args: [u64; 6]) -> Self {
        Self {
            op: op as u32,
            flags: 0,
            result: 0,
            args,
        }
    }

    /// Decodes a block from its little-endian wire form.
    pub fn from_bytes(bytes: &[u8; BLOCK_SIZE]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut args = [0u64; 6];
        for (i, a) in args.iter_mut().enumerate() {
            *a = u64_at(16 + 8 * i);
        }
        Self {
            op: u32_at(0),
            flags: u32_at(4),
            result: u64_at(8) as i64,
            args,
        }
    }
}

/// Byte offset of [`HypercallBlock::result`] inside the block.
pub const RESULT_OFFSET: u64 = 8;

/// Hypercall operations. Arguments are listed as `args[0], args[1], ...`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Does nothing and returns 0: the cost of one exit (the "null call").
    Nop = 0,
    /// Writes `len = args[1]` bytes at guest-physical `args[0]` to the console. Returns `len`.
    ConsoleWrite = 1,
    /// Ends the VM with exit status `args[0] & 0xff`. Does not return.
    Exit = 2,
    /// Reports a guest panic: message of `args[1]` bytes at `args[0]`. Ends the VM with a
    /// failure status. Does not return.
    Panic = 3,
    /// Returns the guest TSC frequency in kHz.
    TscKhz = 4,
    /// Blocks the calling vCPU for `args[0]` nanoseconds (pause/stop cut it short).
    Sleep = 5,
    /// Returns the number of vCPUs the VM was created with.
    VcpuCount = 6,
    /// Starts parked vCPU `args[0]` (1..count) in 64-bit user mode with the caller's control
    /// registers, descriptor tables and segments, at `rip = args[1]`, `rsp = args[2]`,
    /// `rdi = args[3]`, `rflags = 0x3002` (IOPL 3, interrupts off).
    StartVcpu = 7,
    /// Parks the calling vCPU for good (the VM keeps running). Does not return.
    StopVcpu = 8,
    /// Returns the calling vCPU's index.
    VcpuIndex = 9,
    /// Blocks the calling vCPU until a device has completed buffers since I/O generation
    /// `args[1]`, or for at most `args[0]` nanoseconds (cut to 1 s; pause and stop cut it
    /// short). Returns the I/O generation when the vCPU goes on: pass it to the next call. A
    /// generation other than the current one returns at once, so a completion between the
    /// guest's last look at its rings and the call is never slept through.
    WaitIo = 10,
    /// Reports the guest's load: `args[0]` thousandths of a figure the guest's application
    /// chooses (requests per second, jobs queued), at most [`MAX_LOAD_MILLI`]. Returns 0. The
    /// VMM keeps the last report and when it came; autoscaling groups can follow it.
    ReportLoad = 11,
}

/// Largest load a guest may report, in thousandths (a billion units).
pub const MAX_LOAD_MILLI: u64 = 1_000_000_000_000;

impl Op {
    /// Decodes an operation number from the wire.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Op::Nop,
            1 => Op::ConsoleWrite,
            2 => Op::Exit,
            3 => Op::Panic,
            4 => Op::TscKhz,
            5 => Op::Sleep,
            6 => Op::VcpuCount,
            7 => Op::StartVcpu,
            8 => Op::StopVcpu,
            9 => Op::VcpuIndex,
            10 => Op::WaitIo,
            11 => Op::ReportLoad,
            _ => return None,
        })
    }
}

/// Hypercall failure codes; `result` holds the negated value.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HcError {
    /// Unknown operation or non-zero flags.
    BadOp = 1,
    /// An argument is out of range.
    BadArg = 2,
    /// A guest address range is not guest RAM.
    BadAddress = 3,
    /// The target is in the wrong state (for example a vCPU that already runs).
    BadState = 4,
}

/// Largest console write the VMM accepts in one call; longer writes are cut to this size.
pub const MAX_CONSOLE_WRITE: u64 = 64 * 1024;

/// Guest exit status the VMM uses when the guest panicked.
pub const PANIC_EXIT_STATUS: i32 = 101;

/// The guest-physical layout the xcloud VMM sets up for PVH boot. Other PVH VMMs choose other
/// addresses; a guest must only rely on what `hvm_start_info` tells it.
pub mod layout {
    /// Boot GDT (flat 32-bit code and data, and a TSS descriptor).
    pub const GDT: u64 = 0x1000;
    /// `hvm_start_info` (its address is passed in `%ebx`).
    pub const START_INFO: u64 = 0x2000;
    /// The PVH memory map.
    pub const MEMMAP: u64 = 0x2100;
    /// Most memory map entries the VMM writes.
    pub const MEMMAP_MAX_ENTRIES: usize = 8;
    /// The NUL-terminated command line.
    pub const CMDLINE: u64 = 0x3000;
    /// Largest command line, NUL included.
    pub const CMDLINE_MAX: usize = 0x1000;
    /// A 32-bit TSS whose I/O permission bitmap allows every port, so that port I/O from
    /// user mode works even on hosts whose emulation consults the bitmap (see platform notes).
    pub const TSS: u64 = 0x5000;
    /// Byte size of that TSS, I/O bitmap and its terminating byte included.
    pub const TSS_SIZE: u64 = 0x68 + 0x2000 + 1;
    /// End of the region the VMM reserves for boot structures.
    pub const BOOT_END: u64 = 0x8000;
    /// The start of high memory: ELF segments must load at or above this address.
    pub const HIGHMEM_START: u64 = 0x10_0000;
}

/// PVH boot structures (Xen's `hvm_start_info` ABI, version 1).
pub mod pvh {
    /// `hvm_start_info.magic`.
    pub const START_MAGIC: u32 = 0x336e_c578;
    /// Memory map entry type: usable RAM.
    pub const MEMMAP_RAM: u32 = 1;
    /// Memory map entry type: reserved.
    pub const MEMMAP_RESERVED: u32 = 2;
    /// ELF note type of the 32-bit physical entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
    pub const NOTE_PHYS32_ENTRY: u32 = 18;

    /// `struct hvm_start_info`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct StartInfo {
        pub magic: u32,
        pub version: u32,
        pub flags: u32,
        pub nr_modules: u32,
        pub modlist_paddr: u64,
        pub cmdline_paddr: u64,
        pub rsdp_paddr: u64,
        pub memmap_paddr: u64,
        pub memmap_entries: u32,
        pub reserved: u32,
    }

    /// `struct hvm_memmap_table_entry`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct MemmapEntry {
        pub addr: u64,
        pub size: u64,
        pub kind: u32,
        pub reserved: u32,
    }

    const _: () = assert!(core::mem::size_of::<StartInfo>() == 56);
    const _: () = assert!(core::mem::size_of::<MemmapEntry>() == 24);
}

const _: () = assert!(BLOCK_SIZE == 64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_round_trips_through_wire_form() {
        let b = HypercallBlock::new(Op::StartVcpu, [1, 2, 3, 4, 5, 6]);
        // SAFETY: HypercallBlock is repr(C), 64 bytes, made only of integers (no padding), so
        // viewing it as bytes is sound; on x86-64 the in-memory form is the little-endian wire form.
        let bytes: [u8; BLOCK_SIZE] = unsafe { core::mem::transmute(b) };
        assert_eq!(HypercallBlock::from_bytes(&bytes), b);
    }

    #[test]
    fn every_op_decodes_to_itself() {
        for v in 0..=11 {
            assert_eq!(Op::from_u32(v).map(|o| o as u32), Some(v));
        }
        assert_eq!(Op::from_u32(12), None);
        assert_eq!(Op::from_u32(u32::MAX), None);
    }
}
