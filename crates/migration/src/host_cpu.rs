//! What the destination compares of the two hosts' CPUs.

use crate::wire;

/// The CPUID feature words KVM offers guests on this host (zeros where KVM cannot tell).
pub fn cpu_features() -> [u32; wire::FEATURE_WORDS.len()] {
    let mut words = [0u32; wire::FEATURE_WORDS.len()];
    let Ok(kvm) = xcloud_vm_core::host::open_kvm() else {
        return words;
    };
    let Ok(cpuid) = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES) else {
        return words;
    };
    for (word, (leaf, index, reg, _)) in words.iter_mut().zip(wire::FEATURE_WORDS.iter()) {
        if let Some(e) = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == *leaf && e.index == *index)
        {
            *word = match reg {
                'a' => e.eax,
                'b' => e.ebx,
                'c' => e.ecx,
                _ => e.edx,
            };
        }
    }
    words
}

/// This host's CPU vendor string ("AuthenticAMD", "GenuineIntel").
pub fn cpu_vendor() -> [u8; 12] {
    // cpuid leaf 0 exists on every x86-64 processor and only reads registers.
    let r = core::arch::x86_64::__cpuid(0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    v
}
