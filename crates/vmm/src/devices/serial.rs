//! The 16550 UART on COM1 (ports 0x3f8-0x3ff, IRQ 4), from vm-superio, with its output on the
//! VM's console.

use crate::console::Console;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORTS: u16 = 8;
/// Its legacy interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// COM1.
pub struct SerialPort {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, Console>,
}

impl SerialPort {
    pub fn new(irq: EventFd, console: Console) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), console),
        }
    }

    /// A UART continuing from a snapshot's state.
    pub fn from_state(state: &vm_superio::serial::SerialState, irq: EventFd, console: Console) -> Result<Self, String> {
        Serial::from_state(state, IrqTrigger(irq), vm_superio::serial::NoEvents, console)
            .map(|uart| Self { uart })
            .map_err(|e| format!("the serial port's saved state is invalid: {e:?}"))
    }

    /// The UART's registers and pending input, for a snapshot.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }

    /// A guest write to `port` (inside the UART's range).
    pub fn write(&mut self, port: u16, value: u8) {
        if let Err(e) = self.uart.write((port - COM1_BASE) as u8, value) {
            tracing::debug!("serial write failed: {e:?}");
        }
    }

    /// A guest read from `port` (inside the UART's range).
    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }
}
