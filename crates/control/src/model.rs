//! The resources of the control plane as they are stored and as the API shows them
//! (docs/cloud-api.md).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, as a float (for metering).
pub fn now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, on every tenant's resources.
    Admin,
    /// Its own resources only.
    Tenant,
}

/// What a tenant may hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Quota {
    /// vCPUs over all its VMs (running or not).
    pub vcpus: u32,
    /// MiB of guest memory over all its VMs.
    pub mem_mib: u64,
    /// Number of VMs.
    pub vms: u32,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            vcpus: 8,
            mem_mib: 8192,
            vms: 16,
        }
    }
}

fn default_weight() -> u32 {
    100
}

/// A tenant: the owner of images, VMs and API keys.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    /// Its name (lower-case letters, digits and '-').
    pub name: String,
    /// What its keys may do.
    pub role: Role,
    /// What it may hold.
    pub quota: Quota,
    /// Its CPU weight against other tenants (100 by default; the provider's to set). Its VMs'
    /// weights divide its share.
    #[serde(default = "default_weight")]
    pub cpu_weight: u32,
    /// When it was made (Unix seconds).
    pub created: u64,
}

/// An API key as stored: never the secret, only a salted SHA-256 of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredKey {
    /// The key's public part (`xck_ID_SECRET`).
    pub id: String,
    /// Whose key it is.
    pub tenant: String,
    /// 16 random bytes, hex.
    pub salt: String,
    /// SHA-256(salt || secret), hex.
    pub hash: String,
    /// When it was made.
    pub created: u64,
}

/// A guest image: a PVH ELF, named by the SHA-256 of its bytes.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// `sha256:` and the hex digest of its bytes.
    pub id: String,
    /// Whose it is.
    pub tenant: String,
    /// The tenant's name for it.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was uploaded.
    pub created: u64,
}

/// A shape a VM can have, and its price (also the body that adds one: no unknown fields).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceType {
    /// Its name, e.g. `x1.small`.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// What an hour of a running VM of this type costs (any currency).
    pub price_per_hour: f64,
    /// At most this many percent of one CPU for the whole VM (none: uncapped).
    #[serde(default)]
    pub cpu_cap_percent: Option<u32>,
}

/// The instance types a new daemon starts with.
pub fn default_instance_types() -> Vec<InstanceType> {
    [
        ("x1.nano", 1, 64, 0.002),
        ("x1.small", 1, 256, 0.008),
        ("x1.medium", 2, 1024, 0.032),
        ("x1.large", 4, 4096, 0.128),
    ]
    .into_iter()
    .map(|(name, vcpus, mem_mib, price_per_hour)| InstanceType {
        name: name.into(),
        vcpus,
        mem_mib,
        price_per_hour,
        cpu_cap_percent: None,
    })
    .collect()
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined, no VMM process.
    Stopped,
    /// To run, waiting for a host (none yet: the scheduler has not found one that fits) or for
    /// its host to start it.
    Pending,
    /// Its host was lost (its lease expired) and it has no restart policy: it may come back
    /// with its host.
    Lost,
    /// Its VMM is starting.
    Starting,
    /// Its guest runs.
    Running,
    /// Its vCPUs are stopped; its VMM holds its memory.
    Paused,
    /// Its guest ended by itself (see `exit`).
    Exited,
    /// Its VMM failed (see `exit`).
    Failed,
}

impl VmState {
    /// Whether a VMM process holds the VM.
    pub fn has_vmm(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Paused)
    }
}

/// A VM.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// `vm-` and 12 hex digits.
    pub id: String,
    /// Whose it is.
    pub tenant: String,
    /// The tenant's name for it (unique per tenant).
    pub name: String,
    /// The image it boots (`sha256:...`).
    pub image: String,
    /// Its instance type.
    pub instance_type: String,
    /// vCPUs (from the type).
    pub vcpus: u32,
    /// Guest memory in MiB (from the type).
    pub mem_mib: u64,
    /// The guest's command line arguments.
    pub args: Vec<String>,
    /// Its CPU weight among its tenant's VMs (100 by default).
    #[serde(default = "default_weight")]
    pub cpu_weight: u32,
    /// At most this many percent of one CPU (from its type, or lower if asked).
    #[serde(default)]
    pub cpu_cap_percent: Option<u32>,
    /// Where it is.
    pub state: VmState,
    /// How its last VMM ended, when it did.
    pub exit: Option<String>,
    /// The VMM's process id while one runs (the jail's, when jailed).
    pub pid: Option<u32>,
    /// The uid its jailed VMM runs as (given at its first start, kept).
    #[serde(default)]
    pub uid: Option<u32>,
    /// When it was made.
    pub created: u64,
    /// The host it is on (alone: this one; in a cluster: the scheduler's choice, none while
    /// it waits for one).
    #[serde(default)]
    pub host: Option<String>,
    /// Whether it should run: what the scheduler and the hosts make true.
    #[serde(default)]
    pub want: Desired,
    /// Counts its placements: a host runs it only for the placement it was given, so a host
    /// that comes back after losing it does not run it twice.
    #[serde(default)]
    pub generation: u64,
    /// Where it may run.
    #[serde(default)]
    pub placement: PlacementSpec,
    /// What happens when its host is lost.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// The snapshot its next start restores (set when it is restarted after losing its host).
    #[serde(default)]
    pub restore_from: Option<String>,
    /// Seconds it ran before its current run (metering).
    pub run_seconds: f64,
    /// When its current run began (Unix seconds, fractional).
    pub running_since: Option<f64>,
    /// The autoscaling group it belongs to, if any (the group made it and may remove it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Vm {
    /// Seconds of running so far, the current run included.
    pub fn run_seconds_now(&self) -> f64 {
        self.run_seconds + self.running_since.map(|s| (now_f64() - s).max(0.0)).unwrap_or(0.0)
    }
}

/// Whether a VM should run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    /// It should have no VMM.
    #[default]
    Stopped,
    /// It should run (or be paused) on its host.
    Running,
}

/// What happens to a VM whose host is lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// It is marked lost and waits for its host.
    #[default]
    Never,
    /// It is started again on another host, from its latest snapshot there is a copy of, or
    /// booted afresh.
    OnHostLoss,
}

/// How the scheduler orders the hosts a VM fits on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The host with the lowest price per hour (then the emptiest).
    #[default]
    Cheapest,
    /// The fullest host: fewer hosts in use.
    Pack,
    /// The emptiest host: failures hit fewer VMs.
    Spread,
}

/// Where a VM may run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// How to choose among the hosts that fit.
    #[serde(default)]
    pub strategy: Strategy,
    /// Only hosts of these providers (none: any).
    #[serde(default)]
    pub providers: Vec<String>,
    /// Only hosts in these regions (none: any).
    #[serde(default)]
    pub regions: Vec<String>,
    /// No two VMs of the tenant with the same group share a host.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// Only this host.
    #[serde(default)]
    pub host: Option<String>,
}

/// An extension module in a VM's VMM (docs/extensions.md).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Extension {
    /// Its name in the VM.
    pub name: String,
    /// Its version, as its author gave it.
    pub version: String,
    /// The SHA-256 of its code (hex), or `built-in`.
    pub digest: String,
    /// `provider` (compiled in: a tenant cannot remove it) or `tenant`.
    pub origin: String,
    /// The ports it serves, `FIRST+COUNT` (hex), if any.
    pub ports: Option<String>,
    /// Hook calls so far.
    pub calls: u64,
    /// Microseconds spent in them.
    pub busy_us: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Why it is disabled, if it is.
    pub disabled: Option<String>,
    /// The figures it exports.
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// A snapshot of a VM, kept by the daemon.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    /// `snap-` and 12 hex digits.
    pub id: String,
    /// The VM it was taken of.
    pub vm: String,
    /// Whose it is.
    pub tenant: String,
    /// Bytes written.
    pub bytes: u64,
    /// When it was taken.
    pub created: u64,
    /// The host whose disk holds it.
    #[serde(default)]
    pub host: Option<String>,
    /// Its files with their sizes and digests (a copy is checked against them).
    #[serde(default)]
    pub files: Vec<SnapshotFile>,
    /// Other hosts whose disks hold a checked copy.
    #[serde(default)]
    pub copies: Vec<String>,
    /// Hosts asked to take a copy (by the scheduler, so that no host holds the only one).
    #[serde(default)]
    pub copy_to: Vec<String>,
}

impl Snapshot {
    /// The hosts that hold it: where it was taken, then those with a copy.
    pub fn holders(&self) -> impl Iterator<Item = &str> {
        self.host
            .as_deref()
            .into_iter()
            .chain(self.copies.iter().map(String::as_str))
    }
}

/// The files of a snapshot (docs/snapshot-format.md).
pub const SNAPSHOT_FILES: [&str; 2] = ["vm.state", "memory.pages"];

/// One file of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotFile {
    /// `vm.state` or `memory.pages` (docs/snapshot-format.md).
    pub name: String,
    /// Its size.
    pub bytes: u64,
    /// Its SHA-256, 64 hex digits.
    pub sha256: String,
}

/// A host as it registers itself in a cluster (under its lease: the record goes when the host
/// stops renewing it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRecord {
    /// Its name.
    pub name: String,
    /// The provider it is rented from.
    pub provider: String,
    /// The provider's region.
    pub region: String,
    /// What an hour of it costs.
    pub price_per_hour: f64,
    /// Its CPUs.
    pub cpus: u32,
    /// Its memory in MiB.
    pub mem_mib: u64,
    /// Where its API answers over TLS (`HOST:PORT`).
    pub api: String,
    /// Its TLS certificate (DER, hex): what other hosts pin when they call it.
    pub cert: String,
    /// When it registered (Unix seconds).
    pub since: u64,
    /// `up`, or `draining` (no new VMs are placed on it).
    #[serde(default = "up")]
    pub state: String,
}

fn up() -> String {
    "up".into()
}

/// This host, as the control plane sees it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Host {
    /// Its name.
    pub name: String,
    /// The provider it is rented from (`local` for one's own machine).
    pub provider: String,
    /// The provider's region.
    pub region: String,
    /// What an hour of this host costs.
    pub price_per_hour: f64,
    /// Its CPUs.
    pub cpus: u32,
    /// Its memory in MiB.
    pub mem_mib: u64,
    /// vCPUs of the VMs it holds (every state).
    pub vcpus_used: u32,
    /// MiB of the VMs it holds.
    pub mem_mib_used: u64,
    /// VMs it holds.
    pub vms: u32,
    /// `up`, `draining`, or `lost` (a host that VMs are on but that no longer renews its lease).
    pub state: String,
    /// Where its API answers over TLS, in a cluster.
    #[serde(default)]
    pub api: Option<String>,
    /// Whether it is the scheduler: it places VMs and runs the autoscaler (alone: itself).
    #[serde(default)]
    pub scheduler: bool,
}

/// Something that happened, as the events stream shows it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Alone: numbered from 1 since the daemon started; in a cluster: the etcd revision of
    /// the event (increasing across the cluster).
    pub seq: u64,
    /// The host where it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Unix seconds.
    pub at: u64,
    /// The tenant it concerns.
    pub tenant: String,
    /// e.g. `vm.created`, `vm.running`, `vm.exited`.
    pub kind: String,
    /// The resource it concerns.
    pub id: String,
    /// More about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `POST /v1/tenants`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// Its name.
    pub name: String,
    /// Its quota (a default one if absent).
    #[serde(default)]
    pub quota: Option<Quota>,
    /// Its CPU weight against other tenants (default 100).
    #[serde(default)]
    pub cpu_weight: Option<u32>,
}

/// A new API key: shown once, stored only hashed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NewKey {
    /// The tenant.
    pub tenant: String,
    /// The key, to send as `Authorization: Bearer KEY`.
    pub key: String,
}

/// Who the caller is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// Its tenant.
    pub tenant: String,
    /// Its role.
    pub role: Role,
    /// Its quota.
    pub quota: Quota,
}

/// `POST /v1/vms`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Its name.
    pub name: String,
    /// An image id (`sha256:...`) or the name of one of the tenant's images.
    pub image: String,
    /// The instance type (default `x1.nano`).
    #[serde(default)]
    pub instance_type: Option<String>,
    /// The guest's arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Boot it at once (default true).
    #[serde(default)]
    pub start: Option<bool>,
    /// Its CPU weight among the tenant's VMs, 1-10000 (default 100).
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// A CPU cap in percent of one CPU, below its type's if the type has one.
    #[serde(default)]
    pub cpu_cap_percent: Option<u32>,
    /// Where it may run (in a cluster).
    #[serde(default)]
    pub placement: Option<PlacementSpec>,
    /// What happens when its host is lost (default never).
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
}

/// `POST /v1/vms/{vm}/restore`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreVm {
    /// A snapshot of this VM.
    pub snapshot: String,
}

/// What an autoscaling group follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupMetric {
    /// The CPU its running VMs' VMMs use, in percent of their vCPUs, averaged over them.
    #[default]
    Cpu,
    /// The load figure its running VMs' guests report (the `ReportLoad` hypercall: requests
    /// per second, jobs waiting), averaged over them.
    GuestLoad,
}

impl GroupMetric {
    /// How a reading of it reads: `45%`, `12.5`.
    pub fn show(self, value: f64) -> String {
        match self {
            GroupMetric::Cpu => format!("cpu {value:.0}%"),
            GroupMetric::GuestLoad => format!("guest load {value:.1}"),
        }
    }
}

/// Largest guest-load target (the ABI's largest figure).
pub const MAX_LOAD_TARGET: f64 = 1e9;

/// An autoscaling group: VMs made from one template, between `min` and `max` of them, as
/// many as keep `metric` near `target` (docs/cloud-api.md, "Autoscaling groups").
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Group {
    /// Whose it is.
    pub tenant: String,
    /// Its name (unique per tenant); its VMs are named `NAME-N`.
    pub name: String,
    /// The image its VMs boot (`sha256:...`).
    pub image: String,
    /// Their instance type.
    pub instance_type: String,
    /// Their guest arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Their CPU weight.
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// Their CPU cap in percent of one CPU.
    #[serde(default)]
    pub cpu_cap_percent: Option<u32>,
    /// Where they may run (by default spread, apart from each other).
    #[serde(default)]
    pub placement: PlacementSpec,
    /// What happens to them when their host is lost.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// The fewest VMs it has.
    pub min: u32,
    /// The most.
    pub max: u32,
    /// What it follows.
    pub metric: GroupMetric,
    /// The metric's target (for `cpu`: percent; for `guest_load`: the figure each VM's guest
    /// should report).
    pub target: f64,
    /// Seconds after a change before the metric may change it again.
    pub cooldown_seconds: u64,
    /// When it was made.
    pub created: u64,
    /// When it last added or removed VMs (Unix seconds; 0: never).
    #[serde(default)]
    pub last_scaled: u64,
    /// The number its next VM's name ends with.
    #[serde(default)]
    pub next_index: u64,
    /// Its VMs that failed to start one after another, with none running since.
    #[serde(default)]
    pub failures: u32,
    /// While its VMs keep failing: no VM is added before this (Unix seconds).
    #[serde(default)]
    pub retry_after: u64,
    /// How many VMs it wanted at its last look.
    #[serde(default)]
    pub desired: u32,
    /// The metric at its last look, averaged over the VMs measured (none while none is: CPU
    /// takes two looks at a running VM, a guest load one fresh report).
    #[serde(default)]
    pub reading: Option<f64>,
    /// Why its last change failed, if it did.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// `POST /v1/groups`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    /// Its name.
    pub name: String,
    /// An image id or the name of one of the tenant's images.
    pub image: String,
    /// The instance type (default `x1.nano`).
    #[serde(default)]
    pub instance_type: Option<String>,
    /// The guest's arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// CPU weight of each VM, 1-10000.
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// CPU cap of each VM in percent of one CPU.
    #[serde(default)]
    pub cpu_cap_percent: Option<u32>,
    /// Where its VMs may run (default: spread, in an anti-affinity group named after it).
    #[serde(default)]
    pub placement: Option<PlacementSpec>,
    /// What happens to its VMs when their host is lost.
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
    /// The fewest VMs (0-100).
    pub min: u32,
    /// The most (at least min, at most 100).
    pub max: u32,
    /// What it follows (default `cpu`).
    #[serde(default)]
    pub metric: Option<GroupMetric>,
    /// The metric's target (for `cpu`: percent, above 0, at most 100; for `guest_load`: the
    /// figure each VM's guest should report, above 0).
    pub target: f64,
    /// Seconds between changes the metric makes (default 60, at most 86400).
    #[serde(default)]
    pub cooldown_seconds: Option<u64>,
}

/// `PATCH /v1/groups/{group}`: what changes.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateGroup {
    /// What it follows (give `target` with it).
    #[serde(default)]
    pub metric: Option<GroupMetric>,
    /// The fewest VMs.
    #[serde(default)]
    pub min: Option<u32>,
    /// The most.
    #[serde(default)]
    pub max: Option<u32>,
    /// The metric's target.
    #[serde(default)]
    pub target: Option<f64>,
    /// Seconds between changes the metric makes.
    #[serde(default)]
    pub cooldown_seconds: Option<u64>,
}

/// The most VMs one group may have.
pub const MAX_GROUP_VMS: u32 = 100;

impl Group {
    /// Whether its bounds, target and cooldown make sense.
    pub fn check(&self) -> Result<(), crate::ControlError> {
        let bad = |why: String| Err(crate::ControlError::BadRequest(why));
        if self.min > self.max || self.max > MAX_GROUP_VMS {
            return bad(format!(
                "a group has 0 <= min <= max <= {MAX_GROUP_VMS} VMs (min {}, max {})",
                self.min, self.max
            ));
        }
        match self.metric {
            GroupMetric::Cpu if !(self.target > 0.0 && self.target <= 100.0) => {
                return bad(format!(
                    "a cpu target is a percentage above 0 and at most 100 (not {})",
                    self.target
                ))
            }
            GroupMetric::GuestLoad if !(self.target > 0.0 && self.target <= MAX_LOAD_TARGET) => {
                return bad(format!(
                    "a guest_load target is a figure above 0 and at most {MAX_LOAD_TARGET} (not {})",
                    self.target
                ))
            }
            _ => {}
        }
        if self.cooldown_seconds > 86_400 {
            return bad("cooldown_seconds is at most 86400".into());
        }
        Ok(())
    }

    /// Its key in the records.
    pub fn key(&self) -> String {
        group_key(&self.tenant, &self.name)
    }

    /// Whether `vm` is one of its VMs.
    pub fn has(&self, vm: &Vm) -> bool {
        vm.tenant == self.tenant && vm.group.as_deref() == Some(self.name.as_str())
    }
}

/// The records' key of `tenant`'s group `name`.
pub fn group_key(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

/// `GET /v1/groups/{group}`: the group and its VMs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupStatus {
    /// The group.
    #[serde(flatten)]
    pub group: Group,
    /// Its VMs' names, oldest first.
    pub vms: Vec<String>,
}

/// `GET /v1/vms/{vm}/metrics`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmMetrics {
    /// Its state.
    pub state: VmState,
    /// CPU seconds its VMM process used (guest and VMM, user and system).
    pub cpu_seconds: f64,
    /// Resident memory of its VMM process, guest memory included.
    pub rss_bytes: u64,
    /// Seconds it ran, over all its runs.
    pub run_seconds: f64,
    /// The VMM process itself (inside its jail, when jailed).
    pub vmm_pid: Option<u32>,
    /// The cgroup directories its VMM runs in (none where the host has no cgroups).
    pub cgroups: Vec<String>,
    /// The outgoing live migration under way, if one is.
    #[serde(default)]
    pub migration: Option<MigrationPhase>,
    /// The last load figure its guest reported (the `ReportLoad` hypercall), if it has.
    #[serde(default)]
    pub guest_load: Option<f64>,
    /// Seconds since that report.
    #[serde(default)]
    pub guest_load_age_seconds: Option<f64>,
}

/// How far an outgoing live migration is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MigrationPhase {
    /// "first pass", "pre-copy", "stop-and-copy", "handover" or "post-copy".
    pub phase: String,
    /// Pre-copy rounds so far.
    pub round: u32,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Pages still to send.
    pub dirty_pages: u64,
}

/// `POST /v1/vms/{vm}/migrate`: where to (none given: the best other host by the VM's
/// placement).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// This host.
    #[serde(default)]
    pub host: Option<String>,
    /// A host of this provider.
    #[serde(default)]
    pub provider: Option<String>,
    /// A host of any provider but this one (how a provider is evacuated).
    #[serde(default)]
    pub avoid_provider: Option<String>,
}

/// What a live migration through the API did.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MigrationReport {
    /// The VM.
    pub vm: String,
    /// The host it left.
    pub from: String,
    /// The host it runs on now.
    pub to: String,
    /// From the start to the end of the migration, ms.
    pub total_ms: f64,
    /// How long the guest did not run (the stall), ms.
    pub downtime_ms: f64,
    /// Bytes on the migration stream.
    pub bytes_sent: u64,
    /// Pre-copy rounds after the first pass.
    pub rounds: u32,
}

/// `POST /v1/vms/{vm}/incoming` (between hosts): the source's one-time certificate.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// The source's certificate for this migration (DER, hex).
    pub peer_cert: String,
}

/// The answer to `POST /v1/vms/{vm}/incoming`: where the destination listens and its
/// one-time certificate.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IncomingAnswer {
    /// `IP:PORT` the destination's VMM listens on.
    pub listen: String,
    /// Its certificate for this migration (DER, hex).
    pub cert: String,
}

/// One move of a re-placement plan: a VM to a cheaper host.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PlannedMove {
    /// The VM.
    pub vm: String,
    /// Its name.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// Where it runs.
    pub from: String,
    /// Where it would run.
    pub to: String,
    /// The price per hour of a CPU of `from` (the host's price over its CPUs).
    pub from_cpu_price: f64,
    /// The same of `to`.
    pub to_cpu_price: f64,
    /// What the move saves an hour: the difference times the VM's vCPUs.
    pub saving_per_hour: f64,
}

/// `GET /v1/replacement` (the plan) and `POST /v1/replacement` (the plan carried out).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Replacement {
    /// A move is planned when the VM's CPU price drops by more than this share (0.2: 20%).
    pub threshold: f64,
    /// The moves.
    pub moves: Vec<PlannedMove>,
    /// Their saving per hour in all.
    pub saving_per_hour: f64,
    /// When carried out: what each move did (`moved`, or why not), in the order of `moves`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<String>,
}

/// `POST /v1/hosts/{host}/price`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPrice {
    /// The host's new price per hour.
    pub price_per_hour: f64,
}

/// `POST /v1/replacement`.
#[derive(Debug, Default, Deserialize, ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReplacementQuery {
    /// The share the price must drop by (default 0.2).
    #[serde(default)]
    pub threshold: Option<f64>,
}

/// What one VM used on one host in one hour (table `usage`, key `HOUR/VM/HOST`), metered to
/// the second: the host adds what the VM ran since its last meter reading.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct UsageRecord {
    /// The hour's first second (Unix).
    pub hour: u64,
    /// The VM.
    pub vm: String,
    /// Its tenant.
    pub tenant: String,
    /// Its instance type.
    pub instance_type: String,
    /// The host it ran on.
    pub host: String,
    /// The host's provider.
    pub provider: String,
    /// The host's region.
    pub region: String,
    /// Seconds it held a VMM (running or paused: it holds its memory).
    pub run_seconds: f64,
    /// run seconds times its vCPUs.
    pub vcpu_seconds: f64,
    /// run seconds times its memory in MiB.
    pub mem_mib_seconds: f64,
    /// CPU seconds its VMM used (from /proc).
    pub cpu_seconds: f64,
    /// Bytes its live migrations away from this host sent.
    pub migrated_bytes: u64,
    /// What the tenant pays: run seconds at its type's price then.
    pub cost: f64,
    /// Its share of what the host costs: the host's price then, times the share of the
    /// host's vCPU capacity it holds.
    pub provider_cost: f64,
}

/// How much of a VM's running has gone into usage records (table `meter`, key: the VM).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MeterMark {
    /// The VM's run seconds at the last reading.
    pub run_seconds: f64,
    /// Its VMM's CPU seconds at the last reading.
    pub cpu_seconds: f64,
    /// That VMM's process (a new VMM's CPU seconds start from 0).
    pub pid: Option<u32>,
}

/// What `GET /v1/usage` adds up by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageBy {
    /// One line per VM.
    #[default]
    Vm,
    /// Per tenant.
    Tenant,
    /// Per provider.
    Provider,
    /// Per region.
    Region,
    /// Per host.
    Host,
    /// Per instance type.
    Type,
    /// Per hour.
    Hour,
}

/// `GET /v1/usage?by=&since=&until=`.
#[derive(Debug, Default, Deserialize, ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// What to add up by (default: vm).
    #[serde(default)]
    pub by: UsageBy,
    /// From this Unix second (rounded down to its hour; default: the beginning).
    #[serde(default)]
    pub since: Option<u64>,
    /// Until this Unix second (rounded up to its hour; default: now).
    #[serde(default)]
    pub until: Option<u64>,
}

/// One line of `GET /v1/usage`: the sum of the usage records with the same `key`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct UsageLine {
    /// The VM, tenant, provider, region, host, type or hour (as Unix seconds) it adds up.
    pub key: String,
    /// Seconds of running.
    pub run_seconds: f64,
    /// vCPU-seconds.
    pub vcpu_seconds: f64,
    /// MiB-seconds of memory.
    pub mem_mib_seconds: f64,
    /// CPU seconds used.
    pub cpu_seconds: f64,
    /// Bytes of live migration.
    pub migrated_bytes: u64,
    /// What the tenant pays.
    pub cost: f64,
    /// The hosts' cost behind it.
    pub provider_cost: f64,
}

impl UsageLine {
    /// Adds `r` in.
    pub fn add(&mut self, r: &UsageRecord) {
        self.run_seconds += r.run_seconds;
        self.vcpu_seconds += r.vcpu_seconds;
        self.mem_mib_seconds += r.mem_mib_seconds;
        self.cpu_seconds += r.cpu_seconds;
        self.migrated_bytes += r.migrated_bytes;
        self.cost += r.cost;
        self.provider_cost += r.provider_cost;
    }
}

/// `GET /v1/usage`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// What the lines add up by.
    pub by: UsageBy,
    /// The first hour counted (Unix seconds).
    pub since: u64,
    /// The end of the last hour counted.
    pub until: u64,
    /// The lines, by key.
    pub lines: Vec<UsageLine>,
    /// All of them added up (its key: `total`).
    pub total: UsageLine,
}

/// The first uid (and gid) given to a jailed VMM; each VM has its own above it.
pub const FIRST_VM_UID: u32 = 200_000;

/// Whether `id` is an image id as the daemon makes them: `sha256:` and 64 lower-case hex
/// digits (it names the image's file).
pub fn is_image_id(id: &str) -> bool {
    id.strip_prefix("sha256:").is_some_and(is_hex_digest)
}

/// Whether `hex` is a SHA-256 digest in lowercase hex.
pub fn is_hex_digest(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A name read back from the records: one that [`check_name`] would have let in.
fn stored_name(what: &str, name: &str) -> Result<(), String> {
    check_name(what, name).map_err(|e| e.to_string())
}

// What the records may hold: every name that becomes a path (a VM's directory, its
// snapshots', an image's file, a tenant's cgroup) is a name, and a jailed VMM never gets a
// uid below the VMs' own.
impl crate::store::Record for Tenant {
    fn check(&self) -> Result<(), String> {
        stored_name("tenant", &self.name)
    }
}

impl crate::store::Record for StoredKey {
    fn check(&self) -> Result<(), String> {
        stored_name("tenant", &self.tenant)
    }
}

impl crate::store::Record for Image {
    fn check(&self) -> Result<(), String> {
        stored_name("tenant", &self.tenant)?;
        if is_image_id(&self.id) {
            Ok(())
        } else {
            Err(format!("image id {:?} is not sha256: and 64 hex digits", self.id))
        }
    }
}

impl crate::store::Record for InstanceType {}

impl crate::store::Record for Vm {
    fn check(&self) -> Result<(), String> {
        stored_name("VM", &self.id)?;
        stored_name("tenant", &self.tenant)?;
        if let Some(snapshot) = &self.restore_from {
            stored_name("snapshot", snapshot)?;
        }
        match self.uid {
            Some(uid) if uid < FIRST_VM_UID => Err(format!("uid {uid} is below the VMs' first, {FIRST_VM_UID}")),
            _ => Ok(()),
        }
    }
}

impl crate::store::Record for Snapshot {
    fn check(&self) -> Result<(), String> {
        stored_name("snapshot", &self.id)?;
        stored_name("VM", &self.vm)?;
        stored_name("tenant", &self.tenant)?;
        for file in &self.files {
            if !SNAPSHOT_FILES.contains(&file.name.as_str()) {
                return Err(format!(
                    "snapshot {} names a file {:?} that no snapshot has",
                    self.id, file.name
                ));
            }
            if !is_hex_digest(&file.sha256) {
                return Err(format!(
                    "the digest of {} of snapshot {} is not 64 hex digits",
                    file.name, self.id
                ));
            }
        }
        Ok(())
    }
}

impl crate::store::Record for HostRecord {}

impl crate::store::Record for Event {}

impl crate::store::Record for Group {
    fn check(&self) -> Result<(), String> {
        stored_name("group", &self.name)?;
        stored_name("tenant", &self.tenant)
    }
}

impl crate::store::Record for UsageRecord {}

impl crate::store::Record for MeterMark {}

/// Whether `name` is a good resource name: 1 to 63 of `a-z`, `0-9`, `-`, `.`, `_`, starting
/// with a letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<(), crate::ControlError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(crate::ControlError::BadRequest(format!(
            "{what} name {name:?} is not 1-63 of a-z, 0-9, '-', '.', '_' starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "web-1", "x1.small", "a_b"] {
            assert!(check_name("vm", good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "A", "a/b", "../x", "a b", &"a".repeat(64)] {
            assert!(check_name("vm", bad).is_err(), "{bad}");
        }
    }
}
