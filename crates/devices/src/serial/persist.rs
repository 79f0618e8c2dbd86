//! The UART's saved state: section kind `serial`, instance 0. Layout version 1 (as snapshot
//! format 1 wrote it): the 16550's registers DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR (9
//! bytes), then its input FIFO (u32 length + bytes, at most 64).

use xcloud_state::format::put_blob;
use xcloud_state::{Fields, FormatError, Persist};

/// The UART's FIFO depth.
const FIFO: usize = 64;

/// The UART's registers and pending input.
pub struct SerialState(pub vm_superio::serial::SerialState);

impl Persist for SerialState {
    const KIND: &'static str = "serial";
    const VERSION: u32 = 1;

    fn encode(&self) -> Vec<u8> {
        let s = &self.0;
        let mut out = vec![
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ];
        put_blob(&mut out, &s.in_buffer);
        out
    }

    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError> {
        if version != 1 {
            return Err(xcloud_state::persist::unknown_version::<Self>(version));
        }
        let mut f = Fields::new(body, "serial");
        let mut regs = [0u8; 9];
        regs.copy_from_slice(f.bytes(9)?);
        let in_buffer = f.blob(FIFO)?.to_vec();
        f.finish()?;
        Ok(Self(vm_superio::serial::SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer,
        }))
    }
}
