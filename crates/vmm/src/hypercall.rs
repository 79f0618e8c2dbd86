//! The host side of the hypercall ABI (`xcloud-abi`, docs/hypercall-abi.md).
//!
//! Every block comes from the guest and is checked before use: its address, its operation,
//! every address range it names. A malformed call is refused with an error code in `result`
//! (or, when the block itself is unreadable, logged and ignored); it never ends the VMM.

use crate::context::VcpuContext;
use crate::lifecycle::{Activity, VmExit};
use kvm_ioctls::VcpuFd;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use xcloud_abi::{HcError, HypercallBlock, Op, BLOCK_SIZE, MAX_CONSOLE_WRITE, MAX_LOAD_MILLI, RESULT_OFFSET};
use xcloud_vm_core::vcpu::ApStart;

/// Longest panic message read from the guest.
const MAX_PANIC_MESSAGE: u64 = 4096;
/// Longest single sleep (a guest asking for more is cut to this, then may ask again).
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// Longest single wait for I/O.
const MAX_WAIT_IO: Duration = Duration::from_secs(1);

/// What the vCPU does after a hypercall.
pub(crate) enum Outcome {
    Continue,
    /// Keep the vCPU out of the guest until this instant (the `Sleep` hypercall).
    Sleep(std::time::Instant),
    /// Keep the vCPU out of the guest until the I/O generation moves from `seen` or the
    /// deadline passes, then write the generation into the block's result at `result_gpa`.
    WaitIo {
        seen: u64,
        deadline: std::time::Instant,
        result_gpa: u64,
    },
    End(VmExit),
    Halt,
}

/// Serves the hypercall whose block is at guest-physical `gpa`, issued by vCPU `index`.
pub(crate) fn handle(index: usize, fd: &VcpuFd, ctx: &VcpuContext, gpa: u64) -> Outcome {
    let mem = ctx.machine.ram().mem();
    let mut bytes = [0u8; BLOCK_SIZE];
    if gpa % 8 != 0 || mem.read_slice(&mut bytes, GuestAddress(gpa)).is_err() {
        ctx.guest_noise(format_args!(
            "vCPU {index}: hypercall block at {gpa:#x} is unaligned or not in RAM"
        ));
        return Outcome::Continue;
    }
    let block = HypercallBlock::from_bytes(&bytes);
    let (result, outcome) = match Op::from_u32(block.op).filter(|_| block.flags == 0) {
        None => {
            ctx.guest_noise(format_args!(
                "vCPU {index}: unknown hypercall op {} flags {:#x}",
                block.op, block.flags
            ));
            (Err(HcError::BadOp), Outcome::Continue)
        }
        Some(Op::WaitIo) => {
            let now = ctx.control.io_generation();
            if now != block.args[1] {
                (Ok(now as i64), Outcome::Continue)
            } else {
                let wait = Duration::from_nanos(block.args[0]).min(MAX_WAIT_IO);
                let outcome = Outcome::WaitIo {
                    seen: now,
                    deadline: std::time::Instant::now() + wait,
                    result_gpa: gpa + RESULT_OFFSET,
                };
                (Ok(now as i64), outcome)
            }
        }
        Some(op) => serve(index, fd, ctx, op, &block.args),
    };
    let value = match result {
        Ok(v) => v,
        Err(e) => -(e as i64),
    };
    if mem.write_obj(value, GuestAddress(gpa + RESULT_OFFSET)).is_err() {
        ctx.guest_noise(format_args!(
            "vCPU {index}: cannot write the hypercall result at {gpa:#x}"
        ));
    } else {
        // A live migration must resend this page: KVM logs only the guest's own writes.
        ctx.machine.note_vmm_write(gpa + RESULT_OFFSET);
    }
    outcome
}

/// Writes the I/O generation into a `WaitIo` block's result once the wait is over.
pub(crate) fn finish_wait_io(ctx: &VcpuContext, result_gpa: u64) {
    let generation = ctx.control.io_generation() as i64;
    if ctx
        .machine
        .ram()
        .mem()
        .write_obj(generation, GuestAddress(result_gpa))
        .is_ok()
    {
        ctx.machine.note_vmm_write(result_gpa);
    }
}

/// Reads `len` guest bytes at `addr`, refusing ranges that are not entirely RAM.
fn read_guest(ctx: &VcpuContext, addr: u64, len: u64) -> Result<Vec<u8>, HcError> {
    let mem = ctx.machine.ram().mem();
    let end = addr.checked_add(len).ok_or(HcError::BadAddress)?;
    if len > 0 && !mem.address_in_range(GuestAddress(end - 1)) {
        return Err(HcError::BadAddress);
    }
    let mut buf = vec![0u8; len as usize];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .map_err(|_| HcError::BadAddress)?;
    Ok(buf)
}

fn serve(index: usize, fd: &VcpuFd, ctx: &VcpuContext, op: Op, args: &[u64; 6]) -> (Result<i64, HcError>, Outcome) {
    let done = |r| (r, Outcome::Continue);
    match op {
        Op::Nop => done(Ok(0)),
        Op::ConsoleWrite => {
            let len = args[1].min(MAX_CONSOLE_WRITE);
            done(read_guest(ctx, args[0], len).map(|bytes| {
                ctx.console.emit(&bytes);
                len as i64
            }))
        }
        Op::Exit => (Ok(0), Outcome::End(VmExit::Exited((args[0] & 0xff) as i32))),
        Op::Panic => {
            let message = read_guest(ctx, args[0], args[1].min(MAX_PANIC_MESSAGE))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|_| "(the panic message was not in guest RAM)".into());
            (Ok(0), Outcome::End(VmExit::Panicked(message)))
        }
        Op::TscKhz => done(Ok(ctx.machine.tsc_khz() as i64)),
        Op::Sleep => {
            let duration = Duration::from_nanos(args[0]).min(MAX_SLEEP);
            (Ok(0), Outcome::Sleep(std::time::Instant::now() + duration))
        }
        Op::VcpuCount => done(Ok(ctx.machine.vcpu_count() as i64)),
        Op::VcpuIndex => done(Ok(index as i64)),
        // Served in `handle`, which knows the block's address.
        Op::WaitIo => done(Err(HcError::BadState)),
        Op::StartVcpu => done(start_vcpu(fd, ctx, args)),
        Op::ReportLoad if args[0] > MAX_LOAD_MILLI => done(Err(HcError::BadArg)),
        Op::ReportLoad => {
            ctx.load.report(args[0]);
            done(Ok(0))
        }
        Op::StopVcpu => {
            if index == 0 {
                done(Err(HcError::BadState))
            } else {
                (Ok(0), Outcome::Halt)
            }
        }
    }
}

/// Starts parked vCPU `args[0]` at `rip = args[1]`, `rsp = args[2]`, `rdi = args[3]`, with the
/// caller's segments, descriptor tables and control registers.
fn start_vcpu(fd: &VcpuFd, ctx: &VcpuContext, args: &[u64; 6]) -> Result<i64, HcError> {
    let target = args[0];
    let (rip, rsp) = (args[1], args[2]);
    if target == 0 || target >= ctx.machine.vcpu_count() as u64 {
        return Err(HcError::BadArg);
    }
    let size = ctx.machine.ram().size();
    if rip >= size || rsp > size || rsp < 4096 {
        return Err(HcError::BadAddress);
    }
    let sregs = fd.get_sregs().map_err(|_| HcError::BadState)?;
    let mut c = ctx.control.lock();
    let target = target as usize;
    if c.vcpus[target] != Activity::Parked || c.starts[target].is_some() {
        return Err(HcError::BadState);
    }
    c.starts[target] = Some(ApStart {
        sregs,
        rip,
        rsp,
        rdi: args[3],
    });
    ctx.control.changed.notify_all();
    Ok(0)
}
