//! A VM's extension modules through the REST API (docs/extensions.md, docs/cloud-api.md): the
//! daemon hands a tenant's module to the VM's VMM over its control socket, as `xcloud ctl SOCK
//! ext` does, through a file in the VM's directory (where its jailed VMM can read it).

use crate::daemon::{ctl, ctl_ok, Daemon};
use crate::model::{Extension, Vm, VmState};
use crate::ControlError;
use std::sync::Arc;
use xcloud_api::protocol::{Command as VmmCommand, ExtensionReport};

/// The largest module the API takes (the VMM's own limit).
pub const MAX_MODULE_BYTES: usize = 4 << 20;

impl From<ExtensionReport> for Extension {
    fn from(r: ExtensionReport) -> Self {
        Self {
            name: r.name,
            version: r.version,
            digest: r.digest,
            origin: r.origin,
            ports: r.ports.map(|(base, count)| format!("{base:#x}+{count}")),
            calls: r.calls,
            busy_us: r.busy_us,
            failures: r.failures,
            disabled: r.disabled,
            metrics: r.metrics.into_iter().collect(),
        }
    }
}

/// What the VMM's refusal means for the caller: a module of that name is there already
/// (409), the provider's module or policy (403), no such module (404), or a module or ports
/// the VMM will not take (400).
fn refusal(why: String) -> ControlError {
    if why.contains("installed already") {
        ControlError::Conflict(why)
    } else if why.contains("the provider's") {
        ControlError::Forbidden(why)
    } else if why.starts_with("no module named") {
        ControlError::NotFound(why)
    } else {
        ControlError::BadRequest(why)
    }
}

impl Daemon {
    fn with_vmm(&self, vm: &Vm) -> Result<(), ControlError> {
        if matches!(vm.state, VmState::Running | VmState::Paused) && self.is_mine(vm) {
            Ok(())
        } else {
            Err(ControlError::Conflict(format!(
                "VM {} has no running VMM to hold extension modules",
                vm.name
            )))
        }
    }

    /// The modules in VM `id`'s VMM.
    pub async fn extensions(&self, id: &str) -> Result<Vec<Extension>, ControlError> {
        let vm = self.vm(id).await?;
        self.with_vmm(&vm)?;
        let answer = ctl_ok(&self.api_socket(id), VmmCommand::ExtList).await?;
        Ok(answer
            .extensions
            .unwrap_or_default()
            .into_iter()
            .map(Extension::from)
            .collect())
    }

    /// Installs `module` (Wasm or its text form) in VM `id`'s VMM as `name`.
    pub async fn add_extension(
        self: &Arc<Self>,
        id: &str,
        name: &str,
        version: Option<String>,
        ports: Option<(u16, u16)>,
        module: &[u8],
    ) -> Result<Extension, ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let vm = self.vm(id).await?;
        self.with_vmm(&vm)?;
        let dir = self.vm_dir(id).join("extensions");
        let file = dir.join(format!(
            ".{}.wasm",
            crate::auth::hex(&crate::auth::random_bytes::<8>()?)
        ));
        let written = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&file, module))
            .map_err(|e| ControlError::io(format!("writing {}", file.display()), e));
        let owned = match (written, self.config.jail, vm.uid) {
            (Err(e), _, _) => Err(e),
            (Ok(()), true, Some(uid)) => [&dir, &file].into_iter().try_for_each(|path| {
                std::os::unix::fs::chown(path, Some(uid), Some(uid))
                    .map_err(|e| ControlError::io(format!("giving {} to the VM's uid", path.display()), e))
            }),
            (Ok(()), _, _) => Ok(()),
        };
        let answer = match owned {
            Ok(()) => {
                let command = VmmCommand::ExtAdd {
                    file: self.vmm_path(id, &file),
                    name: name.to_string(),
                    version,
                    port_base: ports.map(|p| p.0),
                    port_count: ports.map(|p| p.1),
                };
                ctl(&self.api_socket(id), command).await
            }
            Err(e) => Err(e),
        };
        // The VMM holds the module's code once it has it: the file is not kept either way.
        let _ = std::fs::remove_file(&file);
        let answer = answer?;
        if !answer.ok {
            return Err(refusal(answer.error.unwrap_or_else(|| "the VMM refused".into())));
        }
        self.emit(&vm.tenant, "extension.added", &vm.id, Some(name.to_string()));
        let listed = ctl_ok(&self.api_socket(id), VmmCommand::ExtList).await?;
        listed
            .extensions
            .unwrap_or_default()
            .into_iter()
            .find(|m| m.name == name)
            .map(Extension::from)
            .ok_or_else(|| ControlError::Vmm(format!("the VMM took module {name} and lists no such module")))
    }

    /// Removes module `name` from VM `id`'s VMM (never the provider's).
    pub async fn remove_extension(self: &Arc<Self>, id: &str, name: &str) -> Result<(), ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let vm = self.vm(id).await?;
        self.with_vmm(&vm)?;
        let answer = ctl(&self.api_socket(id), VmmCommand::ExtRemove { name: name.to_string() }).await?;
        if !answer.ok {
            return Err(refusal(answer.error.unwrap_or_else(|| "the VMM refused".into())));
        }
        self.emit(&vm.tenant, "extension.removed", &vm.id, Some(name.to_string()));
        Ok(())
    }
}
