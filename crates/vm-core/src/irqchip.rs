//! The in-kernel irqchip (two 8259 PICs and the IOAPIC) as a component of the VM: section kind
//! `irqchip`, instances 0 (PIC master), 1 (PIC slave) and 2 (IOAPIC), each the `kvm_irqchip`
//! kernel ABI bytes (layout version 1, as snapshot format 1 wrote them).

use crate::machine::Machine;
use kvm_bindings::kvm_irqchip;
use std::sync::Arc;
use xcloud_state::{Component, StateError, StateTree};

/// The chips KVM emulates, by chip id.
const CHIPS: u32 = 3;

xcloud_state::kernel_abi_state!(
    /// One chip's saved state.
    IrqchipState(kvm_irqchip),
    "irqchip"
);

/// The in-kernel irqchip of `machine`.
pub struct Irqchip {
    machine: Arc<Machine>,
}

impl Irqchip {
    /// The irqchip KVM created with the machine.
    pub fn new(machine: Arc<Machine>) -> Self {
        Self { machine }
    }
}

impl Component for Irqchip {
    fn name(&self) -> &'static str {
        "irqchip"
    }

    fn save(&self, into: &mut StateTree) -> Result<(), StateError> {
        for chip_id in 0..CHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.machine
                .vm_fd()
                .get_irqchip(&mut chip)
                .map_err(|e| StateError::device(format!("read irqchip {chip_id}"), e))?;
            into.save(chip_id, &IrqchipState(chip))?;
        }
        Ok(())
    }

    fn restore(&self, from: &mut StateTree) -> Result<(), StateError> {
        for chip_id in 0..CHIPS {
            let chip = from.require::<IrqchipState>(chip_id)?.0;
            if chip.chip_id != chip_id {
                return Err(StateError::Incompatible(format!(
                    "irqchip {} where {chip_id} belongs",
                    chip.chip_id
                )));
            }
            self.machine
                .vm_fd()
                .set_irqchip(&chip)
                .map_err(|e| StateError::device(format!("restore irqchip {chip_id}"), e))?;
        }
        Ok(())
    }
}
