//! Guest memory as a component: section kind `memory`, instance 0. The pages themselves are
//! bulk data that the engines move on their own paths (the snapshot's `memory.pages`, the
//! migration's page frames); this section records the layout they fill, so that a state is
//! never applied to RAM of another shape.
//!
//! Layout version 1: region count u32, then (guest-physical start u64, bytes u64) each.
//! Snapshots of format 1 have no memory section: the machine section's size stands for it.

use xcloud_state::{Component, Fields, FormatError, Persist, StateError, StateTree};

/// Most regions a saved layout may list.
const MAX_REGIONS: u32 = 64;

/// The regions of guest RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    /// (guest-physical start, bytes) of each region, in address order.
    pub regions: Vec<(u64, u64)>,
}

impl Persist for RamLayout {
    const KIND: &'static str = "memory";
    const VERSION: u32 = 1;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (start, bytes) in &self.regions {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&bytes.to_le_bytes());
        }
        out
    }

    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError> {
        if version != 1 {
            return Err(xcloud_state::persist::unknown_version::<Self>(version));
        }
        let mut f = Fields::new(body, "memory");
        let count = f.u32()?;
        if count > MAX_REGIONS {
            return Err(FormatError::Malformed {
                what: "memory",
                detail: format!("{count} regions"),
            });
        }
        let mut regions = Vec::with_capacity(count as usize);
        for _ in 0..count {
            regions.push((f.u64()?, f.u64()?));
        }
        f.finish()?;
        Ok(Self { regions })
    }
}

/// The guest RAM part of a VM: one region at guest-physical 0 in this version.
pub struct GuestMemory {
    layout: RamLayout,
}

impl GuestMemory {
    /// RAM of `bytes` at guest-physical 0.
    pub fn new(bytes: u64) -> Self {
        Self {
            layout: RamLayout {
                regions: vec![(0, bytes)],
            },
        }
    }
}

impl Component for GuestMemory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn save(&self, into: &mut StateTree) -> Result<(), StateError> {
        into.save(0, &self.layout)
    }

    fn restore(&self, from: &mut StateTree) -> Result<(), StateError> {
        match from.load::<RamLayout>(0)? {
            Some(saved) if saved != self.layout => Err(StateError::Incompatible(format!(
                "guest RAM was {:x?}, this VM has {:x?}",
                saved.regions, self.layout.regions
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_of_another_shape_is_refused() {
        let mut tree = StateTree::new();
        GuestMemory::new(64 << 20).save(&mut tree).expect("save");
        let mut copy = tree.clone();
        GuestMemory::new(64 << 20).restore(&mut copy).expect("same shape");
        copy.ensure_all_taken().expect("taken");
        assert!(matches!(
            GuestMemory::new(32 << 20).restore(&mut tree),
            Err(StateError::Incompatible(_))
        ));
        GuestMemory::new(32 << 20)
            .restore(&mut StateTree::new())
            .expect("an old snapshot without the section");
    }
}
