//! `GET /metrics`: this host's figures in Prometheus' text format, for a Prometheus server to
//! scrape with the admin key (`Authorization: Bearer KEY`): per VM on this host its
//! CPU seconds and resident memory (from /proc), seconds run, vCPUs, memory and whether it
//! runs; the host's VMs by state and its price; the live migrations it sent.

use crate::model::Vm;
use crate::store::Table;
use crate::{ControlError, Daemon};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

/// The live migrations this host sent, since the daemon started.
#[derive(Default)]
pub struct MigrationCounters {
    /// That moved their VM.
    pub moved: AtomicU64,
    /// That failed (the VM stayed).
    pub failed: AtomicU64,
    /// Bytes on their streams.
    pub bytes: AtomicU64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
    tenant: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn family<L, M>(registry: &mut Registry, name: &str, help: &str) -> Family<L, M>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let f = Family::<L, M>::default();
    registry.register(name, help, f.clone());
    f
}

/// The exposition of this host's figures now.
pub async fn render(d: &Daemon) -> Result<String, ControlError> {
    let vms: Vec<Vm> = d.store.list(Table::Vms).await?;
    let mut registry = Registry::with_prefix("xcloud");
    let cpu: Family<VmLabels, FloatGauge> = family(&mut registry, "vm_cpu_seconds", "CPU seconds its VMM used");
    let rss: Family<VmLabels, Gauge> = family(&mut registry, "vm_resident_bytes", "Resident memory of its VMM");
    let run: Family<VmLabels, FloatGauge> = family(&mut registry, "vm_run_seconds", "Seconds it ran, all its runs");
    let up: Family<VmLabels, Gauge> = family(&mut registry, "vm_up", "1 while a VMM holds it");
    let vcpus: Family<VmLabels, Gauge> = family(&mut registry, "vm_vcpus", "Its vCPUs");
    let mem: Family<VmLabels, Gauge> = family(&mut registry, "vm_memory_bytes", "Its guest memory");
    let load: Family<VmLabels, FloatGauge> = family(
        &mut registry,
        "vm_guest_load",
        "The load its guest reported last (ReportLoad)",
    );
    let load_age: Family<VmLabels, FloatGauge> = family(
        &mut registry,
        "vm_guest_load_age_seconds",
        "Seconds since its guest reported its load",
    );
    let states: Family<StateLabels, Gauge> = family(&mut registry, "host_vms", "VMs on this host by state");
    let price = FloatGauge::default();
    registry.register("host_price_per_hour", "What an hour of this host costs", price.clone());
    let migrations: Family<ResultLabels, Gauge> = family(
        &mut registry,
        "migrations_sent",
        "Live migrations this host sent, by result",
    );
    let migrated = Gauge::<i64>::default();
    registry.register(
        "migrated_bytes",
        "Bytes this host's live migrations sent",
        migrated.clone(),
    );
    for vm in vms.iter().filter(|v| d.is_mine(v)) {
        let labels = VmLabels {
            vm: vm.id.clone(),
            tenant: vm.tenant.clone(),
            name: vm.name.clone(),
        };
        let pid = vm.pid.filter(|_| vm.state.has_vmm()).map(|p| d.vmm_pid(p));
        cpu.get_or_create(&labels)
            .set(pid.and_then(crate::host::cpu_seconds).unwrap_or(0.0));
        rss.get_or_create(&labels)
            .set(pid.and_then(crate::host::rss_bytes).unwrap_or(0) as i64);
        run.get_or_create(&labels).set(vm.run_seconds_now());
        up.get_or_create(&labels).set(i64::from(vm.state.has_vmm()));
        vcpus.get_or_create(&labels).set(i64::from(vm.vcpus));
        mem.get_or_create(&labels).set((vm.mem_mib << 20) as i64);
        // Only guests that report one have a load.
        if vm.state == crate::model::VmState::Running {
            if let Some((figure, age)) = d.vmm_status(&vm.id).await.and_then(|s| s.guest_load) {
                load.get_or_create(&labels).set(figure);
                load_age.get_or_create(&labels).set(age.as_secs_f64());
            }
        }
        let state = serde_json::to_value(vm.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        states.get_or_create(&StateLabels { state }).inc();
    }
    let host_price = match &d.cluster {
        Some(_) => crate::cluster::hosts(d)
            .await?
            .into_iter()
            .find(|h| h.name == d.config.host_name)
            .map(|h| h.price_per_hour)
            .unwrap_or(d.config.price_per_hour),
        None => d.config.price_per_hour,
    };
    price.set(host_price);
    let counted = &d.migrations;
    for (result, n) in [("moved", &counted.moved), ("failed", &counted.failed)] {
        migrations
            .get_or_create(&ResultLabels { result: result.into() })
            .set(n.load(Ordering::Relaxed) as i64);
    }
    migrated.set(counted.bytes.load(Ordering::Relaxed) as i64);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| ControlError::Store(format!("encoding the metrics: {e}")))?;
    Ok(text)
}
