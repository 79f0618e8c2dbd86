//! The 16550 UART on COM1 (ports 0x3f8-0x3ff, IRQ 4), from vm-superio, with its output on the
//! VM's console. Its saved state is in [`persist`].

pub mod persist;

use crate::bus::PortDevice;
use crate::console::Console;
use persist::SerialState;
use std::sync::{Mutex, MutexGuard};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;
use xcloud_state::{Component, StateError, StateTree};

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

type Uart = Serial<IrqTrigger, vm_superio::serial::NoEvents, Console>;

/// COM1.
pub struct SerialPort {
    uart: Mutex<Uart>,
    /// The interrupt eventfd (the VMM registered it as an irqfd for COM1_IRQ).
    irq: EventFd,
    console: Console,
}

impl SerialPort {
    /// A UART after reset whose interrupt is `irq` and whose output goes to `console`.
    pub fn new(irq: EventFd, console: Console) -> std::io::Result<Self> {
        let uart = Serial::new(IrqTrigger(irq.try_clone()?), console.clone());
        Ok(Self {
            uart: Mutex::new(uart),
            irq,
            console,
        })
    }

    fn uart(&self) -> MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PortDevice for SerialPort {
    fn read(&self, offset: u16, data: &mut [u8]) {
        match data {
            [byte] if offset < COM1_PORTS => *byte = self.uart().read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u16, data: &[u8]) {
        if let ([value], true) = (data, offset < COM1_PORTS) {
            if let Err(e) = self.uart().write(offset as u8, *value) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

impl Component for SerialPort {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn save(&self, into: &mut StateTree) -> Result<(), StateError> {
        into.save(0, &SerialState(self.uart().state()))
    }

    fn restore(&self, from: &mut StateTree) -> Result<(), StateError> {
        let SerialState(state) = from.require::<SerialState>(0)?;
        let irq = self
            .irq
            .try_clone()
            .map_err(|e| StateError::device("clone the serial interrupt eventfd", e))?;
        let uart = Serial::from_state(
            &state,
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            self.console.clone(),
        )
        .map_err(|e| StateError::Incompatible(format!("the serial port's saved state is invalid: {e:?}")))?;
        *self.uart() = uart;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::CaptureBuffer;

    #[test]
    fn the_uart_prints_and_its_registers_survive_a_save_and_restore() {
        let out = CaptureBuffer::default();
        let console = Console::new(Box::new(out.clone()));
        let irq = || EventFd::new(0).expect("eventfd");
        let serial = SerialPort::new(irq(), console.clone()).expect("uart");
        serial.write(7, &[0x5a]); // scratch register
        serial.write(0, b"h");
        serial.write(0, b"i");
        assert_eq!(out.text(), "hi");
        let mut tree = StateTree::new();
        serial.save(&mut tree).expect("save");
        let restored = SerialPort::new(irq(), console).expect("uart");
        restored.restore(&mut tree).expect("restore");
        tree.ensure_all_taken().expect("taken");
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        let mut wide = [0u8; 2];
        restored.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff], "only byte access");
    }
}
