//! Making a VM's record: the checks of a create request (name, arguments, type, image,
//! weight, cap), the tenant's quota under the records' lock, and the record itself, for the
//! API's `POST /v1/vms` and for autoscaling groups alike.

use crate::auth;
use crate::daemon::Daemon;
use crate::model::{check_name, now, CreateVm, Desired, Image, InstanceType, Quota, Tenant, Vm, VmState};
use crate::store::Table;
use crate::ControlError;

/// The most arguments a guest's command line may hold, and the longest one.
pub const MAX_ARGS: usize = 32;
/// The longest argument.
pub const MAX_ARG_BYTES: usize = 256;

/// The instance type of a request that names none.
pub const DEFAULT_INSTANCE_TYPE: &str = "x1.nano";

type Res<T> = Result<T, ControlError>;

/// Instance type `name` (by default [`DEFAULT_INSTANCE_TYPE`]); a bad request if there is none.
pub async fn find_instance_type(d: &Daemon, name: Option<&str>) -> Res<InstanceType> {
    let name = name.unwrap_or(DEFAULT_INSTANCE_TYPE);
    d.store
        .get(Table::InstanceTypes, name)
        .await?
        .ok_or_else(|| ControlError::BadRequest(format!("no instance type {name}")))
}

/// `tenant`'s image with id or name `key`; a bad request if it has none.
pub async fn find_image(d: &Daemon, tenant: &str, key: &str) -> Res<Image> {
    d.images_of(tenant)
        .await?
        .into_iter()
        .find(|i| i.id == key || i.name == key)
        .ok_or_else(|| ControlError::BadRequest(format!("no image {key}")))
}

/// Checks a VM's CPU weight and cap as asked (none: the defaults), for a VM or a group's VMs.
pub fn check_cpu_share(weight: Option<u32>, cap_percent: Option<u32>) -> Res<()> {
    if weight.is_some_and(|w| !(1..=10_000).contains(&w)) {
        return Err(ControlError::BadRequest("cpu_weight is 1-10000".into()));
    }
    if cap_percent == Some(0) {
        return Err(ControlError::BadRequest("cpu_cap_percent is at least 1".into()));
    }
    Ok(())
}

/// Checks `req` and writes the new VM's record for `tenant` (a member of autoscaling group
/// `group`, if any); it waits for a host (cluster) or for its start (alone, `start`), which
/// the caller does. Alone, it is placed on this host.
pub async fn create_vm(d: &Daemon, tenant: &Tenant, req: &CreateVm, group: Option<&str>) -> Res<Vm> {
    check_name("VM", &req.name)?;
    check_args(&req.args)?;
    let itype = find_instance_type(d, req.instance_type.as_deref()).await?;
    let image = find_image(d, &tenant.name, &req.image).await?;
    check_cpu_share(req.cpu_weight, req.cpu_cap_percent)?;
    let cpu_weight = req.cpu_weight.unwrap_or(100);
    let cpu_cap_percent = match (itype.cpu_cap_percent, req.cpu_cap_percent) {
        (Some(t), Some(r)) => Some(t.min(r)),
        (t, r) => t.or(r),
    };
    let id = format!("vm-{}", auth::hex(&auth::random_bytes::<6>()?));
    let start = req.start.unwrap_or(true);
    let clustered = d.cluster.is_some();
    let mut vm = Vm {
        id: id.clone(),
        tenant: tenant.name.clone(),
        name: req.name.clone(),
        image: image.id,
        instance_type: itype.name.clone(),
        vcpus: itype.vcpus,
        mem_mib: itype.mem_mib,
        args: req.args.clone(),
        cpu_weight,
        cpu_cap_percent,
        state: VmState::Stopped,
        exit: None,
        pid: None,
        uid: None,
        created: now(),
        host: None,
        want: if start { Desired::Running } else { Desired::Stopped },
        generation: 0,
        placement: req.placement.clone().unwrap_or_default(),
        restart: req.restart.unwrap_or_default(),
        restore_from: None,
        run_seconds: 0.0,
        running_since: None,
        group: group.map(String::from),
    };
    {
        let _records = d.lock_records().await?;
        let mine: Vec<Vm> = d
            .store
            .list::<Vm>(Table::Vms)
            .await?
            .into_iter()
            .filter(|v| v.tenant == tenant.name)
            .collect();
        if mine.iter().any(|v| v.name == req.name) {
            return Err(ControlError::Conflict(format!("a VM named {} exists", req.name)));
        }
        check_quota(&tenant.name, &tenant.quota, &mine, &itype)?;
        if !clustered {
            vm.host = Some(d.config.host_name.clone());
        } else if start {
            vm.state = VmState::Pending;
        }
        d.store.put(Table::Vms, &id, &vm).await?;
    }
    d.emit(&tenant.name, "vm.created", &id, Some(req.name.clone()));
    Ok(vm)
}

/// A guest's command line: at most [`MAX_ARGS`] arguments of at most [`MAX_ARG_BYTES`]
/// bytes, none with a space or a NUL (the VMM joins them with spaces).
pub fn check_args(args: &[String]) -> Res<()> {
    if args.len() > MAX_ARGS
        || args
            .iter()
            .any(|a| a.len() > MAX_ARG_BYTES || a.contains('\0') || a.contains(char::is_whitespace))
    {
        return Err(ControlError::BadRequest(format!(
            "a guest takes at most {MAX_ARGS} arguments of at most {MAX_ARG_BYTES} bytes, without spaces or NULs"
        )));
    }
    Ok(())
}

/// Whether one more VM of type `adding` fits `tenant`'s quota beside its `vms`.
pub fn check_quota(tenant: &str, quota: &Quota, vms: &[Vm], adding: &InstanceType) -> Res<()> {
    let count = vms.len() as u32 + 1;
    let vcpus: u32 = vms.iter().map(|v| v.vcpus).sum::<u32>() + adding.vcpus;
    let mem: u64 = vms.iter().map(|v| v.mem_mib).sum::<u64>() + adding.mem_mib;
    let over = if count > quota.vms {
        Some(format!("{count} VMs"))
    } else if vcpus > quota.vcpus {
        Some(format!("{vcpus} vCPUs"))
    } else if mem > quota.mem_mib {
        Some(format!("{mem} MiB of memory"))
    } else {
        None
    };
    match over {
        Some(what) => Err(ControlError::Quota(format!(
            "quota: {what} would exceed tenant {tenant}'s quota ({} VMs, {} vCPUs, {} MiB)",
            quota.vms, quota.vcpus, quota.mem_mib
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_count_every_vm() {
        let quota = Quota {
            vcpus: 2,
            mem_mib: 512,
            vms: 2,
        };
        let t = |vcpus, mem_mib| InstanceType {
            name: "t".into(),
            vcpus,
            mem_mib,
            price_per_hour: 0.0,
            cpu_cap_percent: None,
        };
        assert!(check_quota("a", &quota, &[], &t(2, 512)).is_ok());
        assert!(check_quota("a", &quota, &[], &t(3, 64)).is_err());
        assert!(check_quota("a", &quota, &[], &t(1, 513)).is_err());
    }
}
