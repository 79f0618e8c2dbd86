//! A hostile migration destination during post-copy: the source decodes its REQUEST frames
//! (and the page lists it announces are decoded the same way by destinations), and the module
//! code a source sends ahead (MODULES), and a primary's PROTECT (with its fence); each must be
//! refused or bounded, never a panic or an allocation beyond the guest's or the VM's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcloud_migration::wire;

fuzz_target!(|data: &[u8]| {
    // Guest sizes from tiny to the largest xcloud allows (3 GiB of 4 KiB pages).
    let limit = data.first().map_or(1, |&b| 1u64 << (b % 20)).min(786_432);
    let rest = data.get(1..).unwrap_or_default();
    if let Ok(pfns) = wire::decode_request(rest, limit) {
        assert!(pfns.len() <= wire::MAX_REQUEST && pfns.iter().all(|&p| p < limit));
    }
    if let Ok(pfns) = wire::decode_pfns(rest, limit) {
        assert!(pfns.windows(2).all(|w| w[0] < w[1]) && pfns.iter().all(|&p| p < limit));
    }
    if let Ok(codes) = wire::decode_modules(rest) {
        assert!(codes.len() <= xcloud_vmm::extension::MAX_TENANT_MODULES);
        assert!(codes.iter().map(|c| c.len()).sum::<usize>() <= xcloud_vmm::extension::MAX_TENANT_CODE);
    }
    if let Ok(protect) = wire::Protect::decode(rest) {
        if let Some((_, key)) = &protect.fence {
            assert!(!key.is_empty() && key.len() <= wire::MAX_FENCE_KEY);
        }
        assert_eq!(wire::Protect::decode(&protect.encode()).ok(), Some(protect));
    }
});
