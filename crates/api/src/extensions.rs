//! The control socket's extension operations: a tenant's module loaded under the provider's
//! policy and installed in the VM's registry (docs/extensions.md).

use crate::protocol::ExtensionReport;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use xcloud_extensions::{Policy, WasmModule};
use xcloud_vmm::extension::{ModuleSpec, Origin};
use xcloud_vmm::VmHandle;

/// Reads ports as `FIRST+COUNT` (hex with 0x, or decimal; `FIRST` alone is 16 ports), e.g.
/// `0x5000+16`.
pub fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let number = |s: &str| match s.strip_prefix("0x") {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => s.parse(),
    };
    let (first, count) = text.split_once('+').unwrap_or((text, "16"));
    match (number(first.trim()), number(count.trim())) {
        (Ok(first), Ok(count)) => Ok((first, count)),
        _ => Err(format!("{text:?} is not FIRST+COUNT (e.g. 0x5000+16)")),
    }
}

/// Loads the module in `file` and installs it as `name` for the tenant.
pub fn add(
    handle: &VmHandle,
    file: &Path,
    name: String,
    version: Option<String>,
    port_base: Option<u16>,
    port_count: Option<u16>,
) -> Result<(), String> {
    let policy = Policy::default();
    let opened = std::fs::File::open(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let mut bytes = Vec::new();
    // One byte over the limit is enough to refuse it: a huge file is never read whole.
    opened
        .take(policy.module_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let module = WasmModule::load(&bytes, &policy).map_err(|e| format!("module {name}: {e}"))?;
    let ports = match (port_base, port_count) {
        (Some(base), count) => Some((base, count.unwrap_or(16))),
        (None, None) => None,
        (None, Some(_)) => return Err("a port count needs a first port".into()),
    };
    let spec = ModuleSpec {
        name,
        version: version.unwrap_or_else(|| "0".into()),
        digest: module.digest.clone(),
        origin: Origin::Tenant,
        ports,
        // Its fuel (the policy's, given by set_limits) bounds its work; the provider's
        // wall-time budget bounds a host that stalls it.
        call_budget: handle.extensions().policy().call_budget,
        code: Some(Arc::from(bytes)),
    };
    handle
        .extensions()
        .add(spec, Arc::new(module))
        .map_err(|e| e.to_string())
}

/// The VM's modules as `ext_list` reports them.
pub fn list(handle: &VmHandle) -> Vec<ExtensionReport> {
    handle
        .extensions()
        .list()
        .into_iter()
        .map(|m| ExtensionReport {
            name: m.spec.name,
            version: m.spec.version,
            digest: m.spec.digest,
            origin: match m.spec.origin {
                Origin::Provider => "provider",
                Origin::Tenant => "tenant",
            }
            .into(),
            ports: m.spec.ports,
            calls: m.calls,
            busy_us: u64::try_from(m.busy.as_micros()).unwrap_or(u64::MAX),
            failures: m.failures,
            disabled: m.disabled,
            metrics: m.metrics,
        })
        .collect()
}
