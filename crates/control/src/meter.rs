//! Metering: every host reads what its VMs ran (every `meter_seconds`, and before each usage
//! report) and adds it, to the second, to one usage record per VM, host and hour: run
//! seconds, vCPU-seconds, MiB-seconds, CPU seconds used, bytes migrated away, and the cost at
//! the prices of the moment (the type's, for the tenant; the host's share, for the provider).
//! `GET /v1/usage` adds the records up by VM, tenant, provider, region, host, type or hour.
//!
//! A reading takes what the VM ran since the last one from its meter mark (table `meter`),
//! by compare-and-swap, so two readers never count the same second twice: a daemon that was
//! down meters the gap when it comes back, and after a live migration the destination meters
//! what the source had not (so up to one period lands on the destination's record).

use crate::model::{InstanceType, MeterMark, Usage, UsageBy, UsageLine, UsageQuery, UsageRecord, Vm};
use crate::store::Table;
use crate::{ControlError, Daemon};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Seconds in an hour: usage records are hourly.
pub const HOUR: u64 = 3600;
/// How many usage records a report reads from the store at a time.
const PAGE: usize = 4096;

/// The key of the usage record of `vm` on `host` in the hour beginning at `hour`.
pub fn usage_key(hour: u64, vm: &str, host: &str) -> String {
    format!("{hour:010}/{vm}/{host}")
}

/// The prices and capacity of this host at a reading.
struct Prices {
    types: Vec<InstanceType>,
    host_price_per_hour: f64,
    host_vcpus: f64,
}

async fn prices(d: &Daemon) -> Result<Prices, ControlError> {
    let types = d.store.list(Table::InstanceTypes).await?;
    let (price, cpus) = match &d.cluster {
        Some(_) => crate::cluster::hosts(d)
            .await?
            .into_iter()
            .find(|h| h.name == d.config.host_name)
            .map(|h| (h.price_per_hour, h.cpus))
            .unwrap_or((d.config.price_per_hour, crate::host::cpus())),
        None => (d.config.price_per_hour, crate::host::cpus()),
    };
    Ok(Prices {
        types,
        host_price_per_hour: price,
        host_vcpus: f64::from(cpus.max(1) * crate::placement::VCPU_OVERCOMMIT),
    })
}

/// Meters every VM of this host.
pub async fn read(d: &Daemon) -> Result<(), ControlError> {
    let _one_reader = d.meter_lock.lock().await;
    let prices = prices(d).await?;
    let vms: Vec<Vm> = d.store.list(Table::Vms).await?;
    for vm in vms.iter().filter(|v| d.is_mine(v)) {
        meter(d, vm, &prices, Cpu::Read).await?;
    }
    Ok(())
}

/// Meters `vm`, which has just migrated away from this host, up to now: what it ran until
/// the handover is this host's. Its CPU seconds went with its VMM.
pub async fn handed_over(d: &Daemon, id: &str) -> Result<(), ControlError> {
    let _one_reader = d.meter_lock.lock().await;
    let Some(vm) = d.store.get::<Vm>(Table::Vms, id).await? else {
        return Ok(());
    };
    let prices = prices(d).await?;
    meter(d, &vm, &prices, Cpu::Gone).await
}

/// Meters `vm` now (before its VMM is stopped: its CPU seconds go with it).
pub async fn read_one(d: &Daemon, vm: &Vm) -> Result<(), ControlError> {
    let _one_reader = d.meter_lock.lock().await;
    if d.is_mine(vm) {
        let prices = prices(d).await?;
        meter(d, vm, &prices, Cpu::Read).await?;
    }
    Ok(())
}

/// Meters `vm` (whose VMM has just ended: its last seconds), then forgets its mark.
pub async fn last_reading(d: &Daemon, vm: &Vm) -> Result<(), ControlError> {
    read_one(d, vm).await?;
    d.store.delete(Table::Meter, &vm.id).await?;
    Ok(())
}

/// What a reading found: seconds run and CPU seconds used since the last one.
#[derive(Default)]
struct Claimed {
    run: f64,
    cpu: f64,
}

/// Whether a reading reads the VMM's CPU seconds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cpu {
    /// From /proc: the VMM runs here.
    Read,
    /// Not: the VMM is not here (its pid is another host's).
    Gone,
}

async fn meter(d: &Daemon, vm: &Vm, prices: &Prices, cpu: Cpu) -> Result<(), ControlError> {
    let pid = vm
        .pid
        .filter(|_| vm.state.has_vmm() && cpu == Cpu::Read)
        .map(|p| d.vmm_pid(p));
    let cpu_now = pid.and_then(crate::host::cpu_seconds);
    let run_now = vm.run_seconds_now();
    let read_mark = |mark: &mut MeterMark, claimed: &mut Claimed| {
        claimed.run = (run_now - mark.run_seconds).max(0.0);
        mark.run_seconds = mark.run_seconds.max(run_now);
        if cpu == Cpu::Gone {
            // The CPU figures are the VMM's host's to keep.
            claimed.cpu = 0.0;
            return;
        }
        claimed.cpu = match cpu_now {
            Some(used) if mark.pid == pid && used >= mark.cpu_seconds => used - mark.cpu_seconds,
            Some(used) => used,
            None => 0.0,
        };
        mark.cpu_seconds = cpu_now.unwrap_or(0.0);
        mark.pid = pid.filter(|_| cpu_now.is_some());
    };
    let before: Option<MeterMark> = d.store.get(Table::Meter, &vm.id).await?;
    if let Some(mark) = &before {
        // Nothing ran since (a stopped VM): no write at all.
        if run_now - mark.run_seconds < 1e-3 && cpu_now.is_none() {
            return Ok(());
        }
    }
    let mut claimed = Claimed::default();
    let updated = d
        .store
        .update(Table::Meter, &vm.id, |mark: &mut MeterMark| {
            read_mark(mark, &mut claimed);
            Ok(())
        })
        .await?;
    if updated.is_none() {
        let mut mark = MeterMark::default();
        read_mark(&mut mark, &mut claimed);
        if !d.store.put_new(Table::Meter, &vm.id, &mark).await? {
            // Another reader made the mark a moment ago: it took these seconds.
            return Ok(());
        }
    }
    if claimed.run <= 0.0 && claimed.cpu <= 0.0 {
        return Ok(());
    }
    let type_price = prices
        .types
        .iter()
        .find(|t| t.name == vm.instance_type)
        .map(|t| t.price_per_hour)
        .unwrap_or(0.0);
    let share = f64::from(vm.vcpus) / prices.host_vcpus;
    let hours = claimed.run / HOUR as f64;
    add(d, vm, |r| {
        r.run_seconds += claimed.run;
        r.vcpu_seconds += claimed.run * f64::from(vm.vcpus);
        r.mem_mib_seconds += claimed.run * vm.mem_mib as f64;
        r.cpu_seconds += claimed.cpu;
        r.cost += hours * type_price;
        r.provider_cost += hours * prices.host_price_per_hour * share;
    })
    .await
}

/// Counts `bytes` of a live migration of `vm` away from this host.
pub async fn migrated(d: &Daemon, vm: &Vm, bytes: u64) -> Result<(), ControlError> {
    add(d, vm, |r| r.migrated_bytes += bytes).await
}

/// Adds `change` to this hour's record of `vm` on this host.
async fn add(d: &Daemon, vm: &Vm, mut change: impl FnMut(&mut UsageRecord)) -> Result<(), ControlError> {
    let hour = crate::model::now() / HOUR * HOUR;
    let key = usage_key(hour, &vm.id, &d.config.host_name);
    for _ in 0..3 {
        let updated = d
            .store
            .update(Table::Usage, &key, |r: &mut UsageRecord| {
                change(r);
                Ok(())
            })
            .await?;
        if updated.is_some() {
            return Ok(());
        }
        let mut record = UsageRecord {
            hour,
            vm: vm.id.clone(),
            tenant: vm.tenant.clone(),
            instance_type: vm.instance_type.clone(),
            host: d.config.host_name.clone(),
            provider: d.config.provider.clone(),
            region: d.config.region.clone(),
            ..Default::default()
        };
        change(&mut record);
        if d.store.put_new(Table::Usage, &key, &record).await? {
            return Ok(());
        }
    }
    Err(ControlError::Conflict(format!("the usage record {key} kept changing")))
}

/// The usage the caller may see (`visible` tells by tenant), added up as `query` asks.
pub async fn report(d: &Daemon, query: &UsageQuery, visible: impl Fn(&str) -> bool) -> Result<Usage, ControlError> {
    if let Err(e) = read(d).await {
        tracing::warn!("metering before a usage report failed: {e}");
    }
    let now = crate::model::now();
    let since = query.since.unwrap_or(0) / HOUR * HOUR;
    let until = query.until.unwrap_or(now).div_ceil(HOUR).max(1) * HOUR;
    if since >= until {
        return Err(ControlError::BadRequest(format!(
            "since ({since}) must come before until ({until})"
        )));
    }
    let mut lines: BTreeMap<String, UsageLine> = BTreeMap::new();
    let mut total = UsageLine {
        key: "total".into(),
        ..Default::default()
    };
    let end = format!("{until:010}");
    let mut from = format!("{since:010}");
    loop {
        let page: Vec<(String, UsageRecord)> = d.store.list_range(Table::Usage, &from, &end, PAGE).await?;
        let full = page.len() == PAGE;
        for (_, r) in page.iter().filter(|(_, r)| visible(&r.tenant)) {
            let key = match query.by {
                UsageBy::Vm => r.vm.clone(),
                UsageBy::Tenant => r.tenant.clone(),
                UsageBy::Provider => r.provider.clone(),
                UsageBy::Region => r.region.clone(),
                UsageBy::Host => r.host.clone(),
                UsageBy::Type => r.instance_type.clone(),
                UsageBy::Hour => r.hour.to_string(),
            };
            let line = lines.entry(key.clone()).or_insert_with(|| UsageLine {
                key,
                ..Default::default()
            });
            line.add(r);
            total.add(r);
        }
        match page.last() {
            Some((last, _)) if full => from = format!("{last}\0"),
            _ => break,
        }
    }
    Ok(Usage {
        by: query.by,
        since,
        until,
        lines: lines.into_values().collect(),
        total,
    })
}

/// Meters this host's VMs every `period`, and once an hour drops usage records older than
/// `keep_days` and events older than an hour.
pub fn spawn(d: Arc<Daemon>, period: Duration, keep_days: u64) {
    tokio::spawn(async move {
        let mut last_cleanup = 0;
        loop {
            tokio::time::sleep(period).await;
            if let Err(e) = read(&d).await {
                tracing::warn!("metering failed: {e}");
            }
            let now = crate::model::now();
            if now >= last_cleanup + HOUR {
                last_cleanup = now;
                let cutoff = now.saturating_sub(keep_days * 24 * HOUR) / HOUR * HOUR;
                match d.store.delete_range(Table::Usage, "", &format!("{cutoff:010}")).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("metering: dropped {n} usage records older than {keep_days} days"),
                    Err(e) => tracing::warn!("dropping old usage records failed: {e}"),
                }
                if d.cluster.is_some() {
                    let cutoff_ms = now.saturating_sub(HOUR) * 1000;
                    if let Err(e) = d
                        .store
                        .delete_range(Table::Events, "", &format!("{cutoff_ms:016}"))
                        .await
                    {
                        tracing::warn!("dropping old events failed: {e}");
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_hour_then_vm() {
        let a = usage_key(3600, "vm-b", "h1");
        let b = usage_key(7200, "vm-a", "h1");
        assert!(a < b);
        assert_eq!(a, "0000003600/vm-b/h1");
    }
}
