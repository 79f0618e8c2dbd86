//! Where a VM goes: the hosts it fits on and is allowed on, ordered by its strategy. Pure, so
//! that the scheduler's choices can be tested without a cluster (docs/cloud-api.md,
//! "Placement").

use crate::model::{HostRecord, PlacementSpec, Strategy, Vm};

/// vCPUs a host offers per CPU it has: VMs rarely use all of theirs at once.
pub const VCPU_OVERCOMMIT: u32 = 4;
/// Memory a VMM needs beside its guest's (the cgroup limit allows the same).
pub const VMM_OVERHEAD_MIB: u64 = 64;
/// Memory a host keeps for itself and xcloudd.
pub const HOST_RESERVE_MIB: u64 = 512;

/// What a host holds: the VMs placed on it that run or are to run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Load {
    /// vCPUs of those VMs.
    pub vcpus: u32,
    /// MiB they need (guest and VMM).
    pub mem_mib: u64,
    /// How many.
    pub vms: u32,
}

/// Whether `vm` counts against its host's capacity: it runs, is about to, or was lost with
/// its host (and may come back with it).
pub fn holds_capacity(vm: &Vm) -> bool {
    use crate::model::VmState;
    vm.host.is_some() && (vm.state.has_vmm() || matches!(vm.state, VmState::Pending | VmState::Lost))
}

/// What `host` holds among `vms`, leaving out `except` (the VM being placed).
pub fn load_of(host: &str, vms: &[Vm], except: &str) -> Load {
    let mut load = Load::default();
    for v in vms {
        if v.id != except && v.host.as_deref() == Some(host) && holds_capacity(v) {
            load.vcpus += v.vcpus;
            load.mem_mib += v.mem_mib + VMM_OVERHEAD_MIB;
            load.vms += 1;
        }
    }
    load
}

/// Why `vm` may not go on `host` given what it holds, or None if it may.
pub fn refusal(vm: &Vm, spec: &PlacementSpec, host: &HostRecord, load: &Load, vms: &[Vm]) -> Option<String> {
    if host.state != "up" {
        return Some(format!("{} is {}", host.name, host.state));
    }
    if let Some(only) = &spec.host {
        if *only != host.name {
            return Some(format!("{} is not the host asked for", host.name));
        }
    }
    if !spec.providers.is_empty() && !spec.providers.contains(&host.provider) {
        return Some(format!("{} is at provider {}", host.name, host.provider));
    }
    if !spec.regions.is_empty() && !spec.regions.contains(&host.region) {
        return Some(format!("{} is in region {}", host.name, host.region));
    }
    if load.vcpus + vm.vcpus > host.cpus * VCPU_OVERCOMMIT {
        return Some(format!("{} has no {} vCPUs free", host.name, vm.vcpus));
    }
    let mem_free = host
        .mem_mib
        .saturating_sub(HOST_RESERVE_MIB)
        .saturating_sub(load.mem_mib);
    if vm.mem_mib + VMM_OVERHEAD_MIB > mem_free {
        return Some(format!("{} has {mem_free} MiB free", host.name));
    }
    if let Some(group) = &spec.anti_affinity {
        let clash = vms.iter().find(|v| {
            v.id != vm.id
                && v.tenant == vm.tenant
                && v.host.as_deref() == Some(host.name.as_str())
                && holds_capacity(v)
                && v.placement.anti_affinity.as_ref() == Some(group)
        });
        if let Some(other) = clash {
            return Some(format!(
                "{} holds {} of anti-affinity group {group}",
                host.name, other.name
            ));
        }
    }
    None
}

/// The host `vm` should go on among `hosts`, or why none will do. `vms` is every VM of the
/// cloud (their hosts' loads and the anti-affinity groups come from them).
pub fn choose(vm: &Vm, hosts: &[HostRecord], vms: &[Vm]) -> Result<String, String> {
    let spec = &vm.placement;
    let mut fits = Vec::new();
    let mut why = Vec::new();
    for host in hosts {
        let load = load_of(&host.name, vms, &vm.id);
        match refusal(vm, spec, host, &load, vms) {
            None => fits.push((host, load)),
            Some(reason) => why.push(reason),
        }
    }
    let used = |h: &HostRecord, l: &Load| {
        // The fuller resource decides how full a host is.
        let cpu = l.vcpus as f64 / (h.cpus * VCPU_OVERCOMMIT).max(1) as f64;
        let mem = l.mem_mib as f64 / h.mem_mib.max(1) as f64;
        cpu.max(mem)
    };
    fits.sort_by(|(a, la), (b, lb)| {
        let by_use = used(a, la).total_cmp(&used(b, lb));
        let order = match spec.strategy {
            Strategy::Cheapest => a.price_per_hour.total_cmp(&b.price_per_hour).then(by_use),
            Strategy::Pack => by_use.reverse(),
            Strategy::Spread => by_use,
        };
        order.then_with(|| a.name.cmp(&b.name))
    });
    match fits.first() {
        Some((host, _)) => Ok(host.name.clone()),
        None if hosts.is_empty() => Err("no host is up".into()),
        None => Err(format!("no host fits: {}", why.join("; "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Desired, RestartPolicy, VmState};

    fn host(name: &str, provider: &str, price: f64) -> HostRecord {
        HostRecord {
            name: name.into(),
            provider: provider.into(),
            region: format!("{provider}-1"),
            price_per_hour: price,
            cpus: 2,
            mem_mib: 4096,
            api: String::new(),
            cert: String::new(),
            since: 0,
            state: "up".into(),
        }
    }

    fn vm(id: &str, host: Option<&str>, mem_mib: u64) -> Vm {
        Vm {
            id: id.into(),
            tenant: "t".into(),
            name: id.into(),
            image: String::new(),
            instance_type: "x".into(),
            vcpus: 1,
            mem_mib,
            args: vec![],
            cpu_weight: 100,
            cpu_cap_percent: None,
            state: if host.is_some() {
                VmState::Running
            } else {
                VmState::Pending
            },
            exit: None,
            pid: None,
            uid: None,
            created: 0,
            host: host.map(String::from),
            want: Desired::Running,
            generation: 0,
            placement: PlacementSpec::default(),
            restart: RestartPolicy::Never,
            restore_from: None,
            run_seconds: 0.0,
            running_since: None,
            group: None,
        }
    }

    #[test]
    fn strategies_order_the_hosts_that_fit() {
        let hosts = [host("a", "p1", 0.30), host("b", "p2", 0.10), host("c", "p2", 0.20)];
        let vms = vec![
            vm("v1", Some("b"), 1024),
            vm("v2", Some("c"), 64),
            vm("v3", Some("c"), 64),
        ];
        let mut new = vm("new", None, 64);
        assert_eq!(choose(&new, &hosts, &vms), Ok("b".into()), "cheapest");
        new.placement.strategy = Strategy::Spread;
        assert_eq!(choose(&new, &hosts, &vms), Ok("a".into()), "spread: a is empty");
        new.placement.strategy = Strategy::Pack;
        assert_eq!(
            choose(&new, &hosts, &vms),
            Ok("b".into()),
            "pack: b holds the most memory"
        );
    }

    #[test]
    fn constraints_and_capacity_refuse_hosts() {
        let hosts = [host("a", "p1", 0.30), host("b", "p2", 0.10)];
        let mut new = vm("new", None, 64);
        new.placement.providers = vec!["p1".into()];
        assert_eq!(choose(&new, &hosts, &[]), Ok("a".into()));
        new.placement.providers.clear();
        new.placement.regions = vec!["p2-1".into()];
        assert_eq!(choose(&new, &hosts, &[]), Ok("b".into()));
        new.placement.regions = vec!["nowhere".into()];
        let err = choose(&new, &hosts, &[]).unwrap_err();
        assert!(
            err.contains("a is in region p1-1") && err.contains("b is in region p2-1"),
            "{err}"
        );
        new.placement.regions.clear();
        let big = vm("big", None, 4096);
        assert!(choose(&big, &hosts, &[]).unwrap_err().contains("MiB free"));
        let full: Vec<Vm> = (0..8).map(|i| vm(&format!("f{i}"), Some("b"), 64)).collect();
        assert_eq!(choose(&new, &hosts, &full), Ok("a".into()), "b's 8 vCPUs are taken");
        assert_eq!(choose(&new, &[], &[]), Err("no host is up".into()));
        let mut draining = host("d", "p1", 0.0);
        draining.state = "draining".into();
        assert!(choose(&new, &[draining], &[]).unwrap_err().contains("d is draining"));
    }

    #[test]
    fn anti_affinity_keeps_a_group_apart() {
        let hosts = [host("a", "p1", 0.10), host("b", "p1", 0.20)];
        let mut first = vm("v1", Some("a"), 64);
        first.placement.anti_affinity = Some("web".into());
        let mut second = vm("v2", None, 64);
        second.placement.anti_affinity = Some("web".into());
        assert_eq!(choose(&second, &hosts, &[first.clone()]), Ok("b".into()));
        let mut other_tenant = first.clone();
        other_tenant.tenant = "u".into();
        assert_eq!(choose(&second, &hosts, &[other_tenant]), Ok("a".into()));
        let mut stopped = first;
        stopped.state = VmState::Stopped;
        stopped.want = Desired::Stopped;
        assert_eq!(
            choose(&second, &hosts, &[stopped]),
            Ok("a".into()),
            "a stopped VM holds no place"
        );
    }
}
