//! A vCPU's saved state: section kind `vcpu`, one instance per vCPU (docs/snapshot-format.md).
//!
//! Layout version 1 (the only one so far, also what snapshot format 1 wrote): index u32,
//! activity u8, has_state u8, then if has_state each KVM structure as u32 length + its kernel
//! ABI bytes (`kvm_regs`, `kvm_sregs`, the 4 KiB XSAVE region, `kvm_xcrs`, `kvm_lapic_state`,
//! `kvm_vcpu_events`, `kvm_mp_state`), then the MSR count u32 and (index u32, value u64) each.

use kvm_bindings::{
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use xcloud_state::format::put_blob;
use xcloud_state::{Fields, FormatError, Persist};
use zerocopy::IntoBytes;

/// Most MSRs a saved vCPU may carry (KVM lists a few hundred).
const MAX_MSRS: usize = 4096;

/// One vCPU's full architectural state.
pub struct VcpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Every readable MSR, the TSC among them.
    pub msrs: Vec<kvm_msr_entry>,
}

/// What a vCPU was doing when it was saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuActivity {
    /// Never started (a secondary vCPU that waits for a StartVcpu hypercall): no state.
    Parked,
    /// Running guest code, or ready to.
    Runnable,
    /// Stopped by its own StopVcpu hypercall.
    Halted,
}

/// A saved vCPU.
pub struct VcpuSnapshot {
    /// Its index.
    pub index: u32,
    /// What it was doing.
    pub activity: VcpuActivity,
    /// Its state, unless it never ran.
    pub state: Option<Box<VcpuState>>,
}

fn malformed(detail: String) -> FormatError {
    FormatError::Malformed { what: "vcpu", detail }
}

impl Persist for VcpuSnapshot {
    const KIND: &'static str = "vcpu";
    const VERSION: u32 = 1;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.index.to_le_bytes());
        out.push(match self.activity {
            VcpuActivity::Parked => 0,
            VcpuActivity::Runnable => 1,
            VcpuActivity::Halted => 2,
        });
        out.push(u8::from(self.state.is_some()));
        if let Some(s) = &self.state {
            put_blob(&mut out, s.regs.as_bytes());
            put_blob(&mut out, s.sregs.as_bytes());
            put_blob(&mut out, s.xsave.region.as_bytes());
            put_blob(&mut out, s.xcrs.as_bytes());
            put_blob(&mut out, s.lapic.as_bytes());
            put_blob(&mut out, s.events.as_bytes());
            put_blob(&mut out, s.mp_state.as_bytes());
            out.extend_from_slice(&(s.msrs.len() as u32).to_le_bytes());
            for m in &s.msrs {
                out.extend_from_slice(&m.index.to_le_bytes());
                out.extend_from_slice(&m.data.to_le_bytes());
            }
        }
        out
    }

    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError> {
        if version != 1 {
            return Err(xcloud_state::persist::unknown_version::<Self>(version));
        }
        let mut f = Fields::new(body, "vcpu");
        let index = f.u32()?;
        let activity = match f.u8()? {
            0 => VcpuActivity::Parked,
            1 => VcpuActivity::Runnable,
            2 => VcpuActivity::Halted,
            other => return Err(malformed(format!("vCPU activity {other}"))),
        };
        let state = if f.u8()? != 0 {
            let regs = f.kvm::<kvm_regs>()?;
            let sregs = f.kvm::<kvm_sregs>()?;
            let region = f.kvm::<[u32; 1024]>()?;
            let xsave = kvm_xsave {
                region,
                ..Default::default()
            };
            let xcrs = f.kvm::<kvm_xcrs>()?;
            let lapic = f.kvm::<kvm_lapic_state>()?;
            let events = f.kvm::<kvm_vcpu_events>()?;
            let mp_state = f.kvm::<kvm_mp_state>()?;
            let count = f.u32()? as usize;
            if count > MAX_MSRS {
                return Err(malformed(format!("{count} MSRs")));
            }
            let mut msrs = Vec::with_capacity(count);
            for _ in 0..count {
                msrs.push(kvm_msr_entry {
                    index: f.u32()?,
                    reserved: 0,
                    data: f.u64()?,
                });
            }
            Some(Box::new(VcpuState {
                regs,
                sregs,
                xsave,
                xcrs,
                lapic,
                events,
                mp_state,
                msrs,
            }))
        } else {
            None
        };
        f.finish()?;
        if state.is_none() && activity != VcpuActivity::Parked {
            return Err(malformed(format!("vCPU {index} ran but has no state")));
        }
        Ok(Self { index, activity, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state() -> VcpuState {
        VcpuState {
            regs: kvm_regs {
                rip: 0x10_0000,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                reserved: 0,
                data: 42,
            }],
        }
    }

    #[test]
    fn a_vcpu_round_trips() {
        let saved = VcpuSnapshot {
            index: 3,
            activity: VcpuActivity::Halted,
            state: Some(Box::new(sample_state())),
        };
        let back = VcpuSnapshot::decode(1, &saved.encode()).expect("decode");
        assert_eq!((back.index, back.activity), (3, VcpuActivity::Halted));
        let s = back.state.expect("state");
        assert_eq!((s.regs.rip, s.msrs[0].index, s.msrs[0].data), (0x10_0000, 0x10, 42));
        let parked = VcpuSnapshot {
            index: 1,
            activity: VcpuActivity::Parked,
            state: None,
        };
        assert!(VcpuSnapshot::decode(1, &parked.encode())
            .expect("decode")
            .state
            .is_none());
    }

    #[test]
    fn every_cut_and_a_later_layout_are_refused() {
        let bytes = VcpuSnapshot {
            index: 0,
            activity: VcpuActivity::Runnable,
            state: Some(Box::new(sample_state())),
        }
        .encode();
        for cut in 0..bytes.len() {
            assert!(VcpuSnapshot::decode(1, &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(VcpuSnapshot::decode(1, &longer).is_err());
        assert!(VcpuSnapshot::decode(2, &bytes).is_err());
        let mut no_state = bytes[..6].to_vec();
        no_state[5] = 0;
        assert!(
            VcpuSnapshot::decode(1, &no_state).is_err(),
            "a runnable vCPU without state"
        );
    }
}
