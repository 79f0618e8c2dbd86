//! The body of each vCPU thread: the gate, `KVM_RUN`, and the exits it serves. Exits are
//! classified while `kvm_run` is borrowed (port reads are answered there) and served after.

use crate::context::VcpuContext;
use crate::hypercall::{self, Outcome};
use crate::lifecycle::{Gate, VmExit};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::Arc;
use xcloud_abi::{ABI_VERSION, HYPERCALL_PORT, PROBE_MAGIC};
use xcloud_vm_core::vcpu;

/// The POST-code port that firmware and kernels write progress to; silently ignored.
const POST_PORT: u16 = 0x80;

/// An exit whose data was copied out of `kvm_run`, so the vCPU fd is free again.
enum Pending {
    None,
    Hypercall(u64),
    /// A port write of up to 4 bytes, for the device on the bus.
    PortWrite(u16, [u8; 4], usize),
    End(VmExit),
    Halted,
}

/// The body of vCPU thread `index`.
pub(crate) fn run(index: usize, mut fd: VcpuFd, ctx: Arc<VcpuContext>) {
    let mut sleep_until: Option<std::time::Instant> = None;
    let mut waiting_io: Option<(u64, std::time::Instant, u64)> = None;
    loop {
        match ctx.control.gate(index) {
            Gate::Stop => break,
            Gate::Save => {
                let state =
                    vcpu::complete_pending_io(&mut fd).and_then(|_| vcpu::save_state(&fd, ctx.machine.msr_indices()));
                // A saved vCPU continues from its saved state: an interrupted sleep ends.
                sleep_until = None;
                if let Some((_, _, result_gpa)) = waiting_io.take() {
                    hypercall::finish_wait_io(&ctx, result_gpa);
                }
                ctx.control.saved(index, state);
                continue;
            }
            Gate::Start(start) => {
                if let Err(e) = vcpu::apply_start(&fd, &start) {
                    ctx.control
                        .finish(VmExit::Failed(format!("cannot start vCPU {index}: {e}")));
                }
                continue;
            }
            Gate::Run => {}
        }
        if let Some(deadline) = sleep_until {
            if !ctx.control.sleep_until(deadline) {
                continue;
            }
            sleep_until = None;
        }
        if let Some((seen, deadline, result_gpa)) = waiting_io {
            if !ctx.control.wait_io(seen, deadline) {
                continue;
            }
            hypercall::finish_wait_io(&ctx, result_gpa);
            waiting_io = None;
        }
        let pending = match fd.run() {
            Ok(exit) => classify(index, exit, &ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Pending::None,
            Err(e) => Pending::End(VmExit::Failed(format!("KVM_RUN on vCPU {index} failed: {e}"))),
        };
        match pending {
            Pending::None => {}
            Pending::PortWrite(port, data, len) => match ctx.bus.find(port) {
                Some((device, offset)) => device.write(offset, &data[..len]),
                None if port == POST_PORT => {}
                None => ctx.guest_noise(format_args!("vCPU {index} wrote {len} bytes to port {port:#x}")),
            },
            Pending::Hypercall(gpa) => match hypercall::handle(index, &fd, &ctx, gpa) {
                Outcome::Continue => {}
                Outcome::Sleep(deadline) => sleep_until = Some(deadline),
                Outcome::WaitIo {
                    seen,
                    deadline,
                    result_gpa,
                } => waiting_io = Some((seen, deadline, result_gpa)),
                Outcome::End(exit) => ctx.control.finish(exit),
                Outcome::Halt => ctx.control.halt(index),
            },
            Pending::Halted => ctx.control.halt(index),
            Pending::End(exit) => {
                let exit = match exit {
                    VmExit::Crashed { vcpu, reason, .. } => VmExit::Crashed {
                        vcpu,
                        reason,
                        rip: fd.get_regs().map(|r| r.rip).unwrap_or(0),
                    },
                    other => other,
                };
                ctx.control.finish(exit);
            }
        }
    }
    ctx.control.exited(index);
}

/// Serves what can be served while `kvm_run` is borrowed (port reads) and copies the rest out.
fn classify(index: usize, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Pending {
    let crash = |reason: String| {
        Pending::End(VmExit::Crashed {
            vcpu: index,
            reason,
            rip: 0,
        })
    };
    match exit {
        VcpuExit::IoOut(port, data) => {
            if port == HYPERCALL_PORT && data.len() == 4 {
                return Pending::Hypercall(u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as u64);
            }
            let mut copy = [0u8; 4];
            let len = data.len().min(4);
            copy[..len].copy_from_slice(&data[..len]);
            Pending::PortWrite(port, copy, len)
        }
        VcpuExit::IoIn(port, data) => {
            if port == HYPERCALL_PORT && data.len() == 4 {
                data.copy_from_slice(&(PROBE_MAGIC | ABI_VERSION).to_le_bytes());
            } else if let Some((device, offset)) = ctx.bus.find(port) {
                device.read(offset, data);
            } else {
                data.fill(0xff);
                ctx.guest_noise(format_args!(
                    "vCPU {index} read {} bytes from port {port:#x}",
                    data.len()
                ));
            }
            Pending::None
        }
        VcpuExit::MmioRead(addr, data) => {
            data.fill(0xff);
            ctx.guest_noise(format_args!("vCPU {index} read MMIO {addr:#x}"));
            Pending::None
        }
        VcpuExit::MmioWrite(addr, _) => {
            ctx.guest_noise(format_args!("vCPU {index} wrote MMIO {addr:#x}"));
            Pending::None
        }
        VcpuExit::Hlt => {
            tracing::info!("vCPU {index} halted with interrupts off; it stays halted");
            Pending::Halted
        }
        VcpuExit::Shutdown => crash("triple-faulted (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::FailEntry(reason, cpu) => crash(format!(
            "could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
        )),
        VcpuExit::InternalError => crash("hit a KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into()),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Pending::End(VmExit::Exited(0)),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => crash("requested a reset".into()),
            other => crash(format!("raised system event {other}")),
        },
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => Pending::None,
        other => crash(format!("stopped with an unexpected exit {other:?}")),
    }
}
