//! Autoscaling groups: every period, the daemon that decides (alone: this one; in a cluster:
//! the scheduler) looks at each group, reads its metric for each running VM — the CPU its
//! VMM used since the last look, or the load its guest last reported — on the VM's own host,
//! and adds VMs to it or removes its newest to keep the average near the target, within min
//! and max; changes the metric asks for
//! wait out the cooldown, keeping to min and max does not. A VM whose guest ended, whose
//! VMM failed or whose host was lost (and that was not restarted elsewhere) is removed and
//! replaced (docs/cloud-api.md, "Autoscaling groups").

use crate::daemon::Daemon;
use crate::model::{
    now, CreateGroup, CreateVm, Group, GroupMetric, PlacementSpec, Strategy, Tenant, Vm, VmMetrics, VmState,
};
use crate::store::Table;
use crate::ControlError;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a group's look decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Nothing to do.
    Keep,
    /// Add this many VMs, for this reason.
    Add(u32, String),
    /// Remove this many (the newest), for this reason.
    Remove(u32, String),
}

/// How many VMs `group` wants and what to change, given its `members` (those whose guest has
/// not ended), the `readings` of its metric for those of them measured over the last period
/// (CPU: percent of vCPUs; guest load: the figure), and the time `now`. The metric wants enough VMs that the measured ones would sit
/// at the target, plus the ones not yet measured (booting: counting them as idle would shrink
/// the group under a load it has just grown for).
pub fn decide(group: &Group, members: u32, readings: &[f64], now: u64) -> (u32, Change) {
    let unmeasured = members.saturating_sub(readings.len() as u32);
    let wanted = if readings.is_empty() {
        members
    } else {
        let load: f64 = readings.iter().sum();
        ((load / group.target).ceil() as u32).max(1) + unmeasured
    };
    let desired = wanted.clamp(group.min, group.max);
    let cooled = now.saturating_sub(group.last_scaled) >= group.cooldown_seconds;
    let average = || readings.iter().sum::<f64>() / readings.len().max(1) as f64;
    let change = if members < group.min {
        Change::Add(group.min - members, format!("below its min of {}", group.min))
    } else if members > group.max {
        Change::Remove(members - group.max, format!("above its max of {}", group.max))
    } else if desired > members && cooled {
        Change::Add(
            desired - members,
            format!(
                "{} over its target of {}",
                group.metric.show(average()),
                group.metric.show(group.target)
            ),
        )
    } else if desired < members && cooled {
        // One at a time: a load that dips for a period costs one VM, not all of them.
        Change::Remove(
            1,
            format!(
                "{} under its target of {}",
                group.metric.show(average()),
                group.metric.show(group.target)
            ),
        )
    } else {
        Change::Keep
    };
    (desired, change)
}

/// The CPU seconds each running VM's VMM had used at a time, from the last look.
type Samples = HashMap<String, (f64, Instant)>;

/// Looks at every group every `period` for as long as the daemon runs.
pub fn spawn(daemon: Arc<Daemon>, period: Duration) {
    tokio::spawn(async move {
        let mut samples = Samples::new();
        loop {
            tokio::time::sleep(period).await;
            if daemon.cluster.as_ref().is_some_and(|c| !c.is_scheduler()) {
                samples.clear();
                continue;
            }
            if let Err(e) = round(&daemon, &mut samples).await {
                tracing::warn!("autoscaling: {e}");
            }
        }
    });
}

/// One look at every group.
async fn round(d: &Arc<Daemon>, samples: &mut Samples) -> Result<(), ControlError> {
    let groups: Vec<Group> = d.store.list(Table::Groups).await?;
    if groups.is_empty() {
        samples.clear();
        return Ok(());
    }
    let vms: Vec<Vm> = d.store.list(Table::Vms).await?;
    samples.retain(|id, _| vms.iter().any(|v| &v.id == id));
    for group in groups {
        if let Err(e) = scale(d, &group, &vms, samples).await {
            tracing::warn!("autoscaling group {}: {e}", group.key());
            note_error(d, &group, e.to_string()).await;
        }
    }
    Ok(())
}

async fn scale(d: &Arc<Daemon>, group: &Group, vms: &[Vm], samples: &mut Samples) -> Result<(), ControlError> {
    let mut members: Vec<&Vm> = vms.iter().filter(|v| group.has(v)).collect();
    members.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let (ended, members): (Vec<&Vm>, Vec<&Vm>) = members
        .into_iter()
        .partition(|v| matches!(v.state, VmState::Exited | VmState::Failed | VmState::Lost));
    let failed = ended.iter().filter(|v| v.state == VmState::Failed).count() as u32;
    for vm in ended {
        tracing::info!(
            "autoscaling group {}: replacing {} ({:?})",
            group.key(),
            vm.name,
            vm.state
        );
        remove_vm(d, vm).await?;
    }
    // VMs that fail to start one after another (an image that does not boot) are replaced
    // ever more slowly; a VM that runs ends the streak.
    let now = now();
    let (failures, retry_after) = if failed > 0 {
        let failures = group.failures.saturating_add(failed);
        (failures, now + retry_delay(failures))
    } else if members.iter().any(|v| v.state == VmState::Running) {
        (0, 0)
    } else {
        (group.failures, group.retry_after)
    };
    let mut readings = Vec::new();
    for vm in members.iter().filter(|v| v.state == VmState::Running) {
        let reading = match group.metric {
            GroupMetric::Cpu => cpu_percent(d, vm, samples).await,
            GroupMetric::GuestLoad => guest_load(d, vm).await,
        };
        readings.extend(reading);
    }
    let (desired, mut change) = decide(group, members.len() as u32, &readings, now);
    let mut error = None;
    if matches!(change, Change::Add(..)) && now < retry_after {
        error = Some(format!(
            "{failures} of its VMs failed to start one after another: it waits {} s before it adds another",
            retry_delay(failures)
        ));
        change = Change::Keep;
    }
    let reading = (!readings.is_empty()).then(|| readings.iter().sum::<f64>() / readings.len() as f64);
    let mut added = 0;
    let mut next_index = group.next_index;
    match &change {
        Change::Keep => {}
        Change::Add(count, why) => {
            let tenant: Tenant = d
                .store
                .get(Table::Tenants, &group.tenant)
                .await?
                .ok_or_else(|| ControlError::NotFound(format!("no tenant {}", group.tenant)))?;
            for _ in 0..*count {
                let name = format!("{}-{next_index}", group.name);
                next_index += 1;
                match add_vm(d, group, &tenant, &name).await {
                    Ok(()) => added += 1,
                    Err(e) => {
                        error = Some(format!("adding {name}: {e}"));
                        break;
                    }
                }
            }
            if added > 0 {
                d.emit(
                    &group.tenant,
                    "group.scaled",
                    &group.name,
                    Some(format!("{} -> {} VMs: {why}", members.len(), members.len() + added)),
                );
            }
        }
        Change::Remove(count, why) => {
            let newest: Vec<&&Vm> = members.iter().rev().take(*count as usize).collect();
            for vm in &newest {
                remove_vm(d, vm).await?;
            }
            d.emit(
                &group.tenant,
                "group.scaled",
                &group.name,
                Some(format!(
                    "{} -> {} VMs: {why}",
                    members.len(),
                    members.len() - newest.len()
                )),
            );
        }
    }
    let scaled = matches!(change, Change::Remove(..)) || added > 0;
    let new_error = error.clone();
    d.store
        .update(Table::Groups, &group.key(), |g: &mut Group| {
            g.desired = desired;
            g.reading = reading;
            g.next_index = g.next_index.max(next_index);
            g.failures = failures;
            g.retry_after = retry_after;
            if scaled {
                g.last_scaled = now;
            }
            if scaled || new_error.is_some() {
                g.last_error = new_error.clone();
            }
            Ok(())
        })
        .await?;
    if let Some(e) = error {
        if group.last_error.as_deref() != Some(e.as_str()) {
            d.emit(&group.tenant, "group.failed", &group.name, Some(e));
        }
    }
    Ok(())
}

/// How long a group waits before it adds a VM after `failures` of its VMs failed to start
/// one after another: 2 s, doubling, at most 5 minutes.
fn retry_delay(failures: u32) -> u64 {
    (1u64 << failures.min(9)).min(300)
}

async fn note_error(d: &Daemon, group: &Group, error: String) {
    let _ = d
        .store
        .update(Table::Groups, &group.key(), |g: &mut Group| {
            g.last_error = Some(error.clone());
            Ok(())
        })
        .await;
}

/// Writes a new VM of `group` and, alone, starts it (in a cluster the scheduler places it).
async fn add_vm(d: &Arc<Daemon>, group: &Group, tenant: &Tenant, name: &str) -> Result<(), ControlError> {
    let req = CreateVm {
        name: name.to_string(),
        image: group.image.clone(),
        instance_type: Some(group.instance_type.clone()),
        args: group.args.clone(),
        start: Some(true),
        cpu_weight: group.cpu_weight,
        cpu_cap_percent: group.cpu_cap_percent,
        placement: Some(group.placement.clone()),
        restart: Some(group.restart),
    };
    let vm = crate::provision::create_vm(d, tenant, &req, Some(&group.name)).await?;
    if d.cluster.is_none() {
        let d = d.clone();
        tokio::spawn(async move {
            if let Err(e) = d.start(&vm.id).await {
                tracing::warn!("autoscaling: starting {} failed: {e}", vm.name);
            }
        });
    }
    Ok(())
}

/// Removes `vm` where it is: here, or through its host's API.
async fn remove_vm(d: &Arc<Daemon>, vm: &Vm) -> Result<(), ControlError> {
    match (&vm.host, d.cluster.is_some() && !d.is_mine(vm)) {
        (Some(host), true) if host != &d.config.host_name => {
            match crate::cluster::call_host(d, host, "DELETE", &format!("/v1/vms/{}", vm.id), None).await {
                Ok(_) => Ok(()),
                // Its host is gone: the record goes, as `DELETE /v1/vms` does for such a VM.
                Err(ControlError::Cluster(why)) if why.ends_with("is not up") => d.delete(&vm.id).await,
                Err(e) => Err(e),
            }
        }
        _ => d.delete(&vm.id).await,
    }
}

/// The CPU `vm`'s VMM used since the last look, in percent of its vCPUs (none at the first).
async fn cpu_percent(d: &Daemon, vm: &Vm, samples: &mut Samples) -> Option<f64> {
    let cpu = if d.cluster.is_none() || d.is_mine(vm) {
        crate::host::cpu_seconds(d.vmm_pid(vm.pid?))?
    } else {
        let metrics = metrics_from_host(d, vm).await?;
        metrics.vmm_pid?;
        metrics.cpu_seconds
    };
    let at = Instant::now();
    let (before, then) = samples.insert(vm.id.clone(), (cpu, at))?;
    let wall = at.duration_since(then).as_secs_f64();
    (wall > 0.1 && cpu >= before).then(|| (cpu - before) / wall / f64::from(vm.vcpus.max(1)) * 100.0)
}

/// The load `vm`'s guest last reported, unless that report is stale: a guest that stopped
/// reporting (hung, or never did) counts as not measured, neither idle nor busy.
async fn guest_load(d: &Daemon, vm: &Vm) -> Option<f64> {
    let fresh = (d.config.autoscale_period * 3).max(Duration::from_secs(10));
    if d.cluster.is_none() || d.is_mine(vm) {
        let (load, age) = d.vmm_status(&vm.id).await?.guest_load?;
        return (age <= fresh).then_some(load);
    }
    let metrics = metrics_from_host(d, vm).await?;
    let age = Duration::try_from_secs_f64(metrics.guest_load_age_seconds?).ok()?;
    metrics.guest_load.filter(|_| age <= fresh)
}

/// `vm`'s metrics, asked of its host.
async fn metrics_from_host(d: &Daemon, vm: &Vm) -> Option<VmMetrics> {
    let host = vm.host.as_deref()?;
    let answer = crate::cluster::call_host(d, host, "GET", &format!("/v1/vms/{}/metrics", vm.id), None)
        .await
        .ok()?;
    serde_json::from_value(answer).ok()
}

/// Makes `tenant`'s group as `req` asks; its VMs come at the next look.
pub async fn create_group(d: &Daemon, tenant: &Tenant, req: CreateGroup) -> Result<Group, ControlError> {
    crate::model::check_name("group", &req.name)?;
    crate::provision::check_args(&req.args)?;
    crate::provision::check_cpu_share(req.cpu_weight, req.cpu_cap_percent)?;
    let image = crate::provision::find_image(d, &tenant.name, &req.image).await?;
    let instance_type = crate::provision::find_instance_type(d, req.instance_type.as_deref())
        .await?
        .name;
    let placement = req.placement.unwrap_or_else(|| PlacementSpec {
        strategy: Strategy::Spread,
        anti_affinity: Some(req.name.clone()),
        ..PlacementSpec::default()
    });
    let group = Group {
        tenant: tenant.name.clone(),
        name: req.name,
        image: image.id,
        instance_type,
        args: req.args,
        cpu_weight: req.cpu_weight,
        cpu_cap_percent: req.cpu_cap_percent,
        placement,
        restart: req.restart.unwrap_or_default(),
        min: req.min,
        max: req.max,
        metric: req.metric.unwrap_or(GroupMetric::Cpu),
        target: req.target,
        cooldown_seconds: req.cooldown_seconds.unwrap_or(60),
        created: now(),
        last_scaled: 0,
        next_index: 1,
        failures: 0,
        retry_after: 0,
        desired: req.min,
        reading: None,
        last_error: None,
    };
    group.check()?;
    if !d.store.put_new(Table::Groups, &group.key(), &group).await? {
        return Err(ControlError::Conflict(format!("a group named {} exists", group.name)));
    }
    d.emit(&group.tenant, "group.created", &group.name, None);
    Ok(group)
}

/// Removes `group` and then its VMs.
pub async fn delete_group(d: &Arc<Daemon>, group: &Group) -> Result<(), ControlError> {
    d.store.delete(Table::Groups, &group.key()).await?;
    let vms: Vec<Vm> = d.store.list(Table::Vms).await?;
    for vm in vms.iter().filter(|v| group.has(v)) {
        remove_vm(d, vm).await?;
    }
    d.emit(&group.tenant, "group.deleted", &group.name, None);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(min: u32, max: u32, target: f64) -> Group {
        Group {
            tenant: "t".into(),
            name: "g".into(),
            image: "sha256:x".into(),
            instance_type: "x1.nano".into(),
            args: vec![],
            cpu_weight: None,
            cpu_cap_percent: None,
            placement: PlacementSpec::default(),
            restart: Default::default(),
            min,
            max,
            metric: GroupMetric::Cpu,
            target,
            cooldown_seconds: 60,
            created: 0,
            last_scaled: 1000,
            next_index: 1,
            failures: 0,
            retry_after: 0,
            desired: min,
            reading: None,
            last_error: None,
        }
    }

    #[test]
    fn failing_vms_are_replaced_ever_more_slowly() {
        let delays: Vec<u64> = (1..=10).map(retry_delay).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(retry_delay(u32::MAX), 300);
    }

    #[test]
    fn bounds_come_first_and_ignore_the_cooldown() {
        let g = group(2, 4, 50.0);
        assert!(matches!(decide(&g, 0, &[], 1001), (2, Change::Add(2, _))));
        assert!(matches!(decide(&g, 6, &[], 1001), (4, Change::Remove(2, _))));
    }

    #[test]
    fn the_metric_tracks_its_target_after_the_cooldown() {
        let g = group(1, 10, 50.0);
        // Two VMs at 100%: four would sit at 50%.
        assert!(matches!(decide(&g, 2, &[100.0, 100.0], 1060), (4, Change::Add(2, _))));
        assert_eq!(decide(&g, 2, &[100.0, 100.0], 1059).1, Change::Keep, "cooling down");
        // Four at 10%: one would do; they go one at a time.
        assert!(matches!(decide(&g, 4, &[10.0; 4], 1060), (1, Change::Remove(1, _))));
        // A VM still booting counts as wanted.
        assert_eq!(decide(&g, 3, &[50.0, 50.0], 1060), (3, Change::Keep));
        // No reading yet: the group stays as it is.
        assert_eq!(decide(&g, 3, &[], 1060), (3, Change::Keep));
        // Never above max, never below min.
        assert!(matches!(
            decide(&group(1, 3, 10.0), 2, &[100.0, 100.0], 1060),
            (3, Change::Add(1, _))
        ));
        assert_eq!(decide(&group(2, 3, 90.0), 2, &[1.0, 1.0], 1060), (2, Change::Keep));
    }

    #[test]
    fn bad_groups_are_refused() {
        assert!(group(3, 2, 50.0).check().is_err());
        assert!(group(0, 101, 50.0).check().is_err());
        assert!(group(0, 1, 0.0).check().is_err());
        assert!(group(0, 1, f64::NAN).check().is_err());
        assert!(group(0, 1, 100.5).check().is_err());
        assert!(group(0, 0, 100.0).check().is_ok());
        let load = |target| Group {
            metric: GroupMetric::GuestLoad,
            ..group(0, 1, target)
        };
        assert!(load(500.0).check().is_ok(), "a load is not a percentage");
        assert!(load(0.0).check().is_err());
        assert!(load(f64::INFINITY).check().is_err());
    }
}
