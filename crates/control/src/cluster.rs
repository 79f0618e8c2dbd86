//! Cluster mode: many hosts' daemons sharing their records in etcd (docs/cloud-api.md,
//! "Cluster").
//!
//! - Each host registers itself under an etcd lease that it renews; a host that stops renewing
//!   it (dead, cut off) drops out when the lease expires.
//! - A VM's record says whether it should run (`want`) and where (`host`). One daemon, elected
//!   through etcd's election API, is the scheduler: it gives each VM that should run and has
//!   no host the host [`crate::placement`] chooses, and handles VMs whose host was lost.
//! - Every host watches the VM records and makes true what is assigned to it: starts what it
//!   was given, and kills a VMM of its own whose VM was given to another host since (fencing:
//!   a host that comes back never runs a VM a second time).
//! - Calls for a VM's VMM (pause, console, snapshot...) that reach another host are forwarded
//!   to the VM's host over TLS, pinned to the certificate in its record.

use crate::client::{Client, Endpoint};
use crate::model::{
    now, Desired, HostRecord, IncomingAnswer, MigrateVm, MigrationReport, PlannedMove, RestartPolicy, Snapshot, Vm,
    VmState,
};
use crate::store::Table;
use crate::{ControlError, Daemon};
use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a daemon joins a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// etcd's client URLs.
    pub etcd: Vec<String>,
    /// The key prefix of this cloud in etcd.
    pub prefix: String,
    /// Seconds a host stays registered after its last renewal.
    pub lease_ttl: i64,
    /// Where other hosts reach this one's API (`HOST:PORT` of its TLS listener).
    pub advertise: String,
    /// When this daemon is the scheduler: move running VMs live to hosts where their CPUs
    /// cost more than this share less, one at a time, as prices change (None: only when asked).
    pub replace_threshold: Option<f64>,
    /// How many hosts that are up should hold each snapshot (1: only the one it was taken on).
    pub snapshot_holders: usize,
}

/// The name the scheduler is elected under.
fn election(prefix: &str) -> String {
    format!("{prefix}/scheduler")
}

/// How often the loops look again even when etcd's watch says nothing.
const RESYNC: Duration = Duration::from_secs(1);

/// The record of the hosts' own key for calling each other.
#[derive(serde::Serialize, serde::Deserialize)]
struct HostKey {
    key: String,
}

impl crate::store::Record for HostKey {}

/// A daemon's part in a cluster.
pub struct Cluster {
    /// How it joined.
    pub config: ClusterConfig,
    /// Its TLS certificate (DER), as other hosts pin it.
    cert: Vec<u8>,
    /// Its current lease.
    lease: AtomicI64,
    /// The key hosts call each other with (an admin key, kept in etcd: whoever can read etcd
    /// runs the cloud anyway).
    host_key: Mutex<String>,
    /// VMs this host is starting now.
    starting: Mutex<HashSet<String>>,
    /// Snapshots this host is copying here now.
    copying: Arc<crate::snapshots::Copying>,
    /// When this host last looked for copies of snapshots to remove.
    garbage_collected: Mutex<Option<std::time::Instant>>,
    /// Whether this host is the scheduler now.
    leading: std::sync::atomic::AtomicBool,
    /// When the last grant or renewal of its lease that etcd confirmed was sent: etcd keeps
    /// the lease at least a TTL from then.
    lease_confirmed: Mutex<Option<std::time::Instant>>,
}

impl Cluster {
    /// A daemon's cluster part, before it joins.
    pub fn new(config: ClusterConfig, cert: Vec<u8>) -> Self {
        Self {
            config,
            cert,
            lease: AtomicI64::new(0),
            host_key: Mutex::new(String::new()),
            starting: Mutex::new(HashSet::new()),
            copying: Arc::default(),
            garbage_collected: Mutex::new(None),
            leading: std::sync::atomic::AtomicBool::new(false),
            lease_confirmed: Mutex::new(None),
        }
    }

    /// The window this host's VMMs are fenced after when its daemon stops renewing their
    /// watchdogs: half the lease, so that they are paused before the lease can lapse and the
    /// scheduler start their VMs elsewhere (the lease was renewed at most a third of a TTL
    /// before the daemon's last renewal of theirs).
    pub fn fence_window(&self) -> Duration {
        Duration::from_millis((self.config.lease_ttl.max(2) as u64) * 500)
    }

    /// Whether a watchdog renewed now with [`Cluster::fence_window`] would run out before the
    /// lease can lapse (with a twelfth of a TTL to spare): only then are VMs still surely
    /// this host's while they run.
    pub fn lease_is_fresh(&self) -> bool {
        let ttl = Duration::from_secs(self.config.lease_ttl.max(2) as u64);
        self.lease_confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|sent| sent.elapsed() + self.fence_window() + ttl / 12 < ttl)
    }

    fn lease_confirmed_at(&self, sent: std::time::Instant) {
        *self.lease_confirmed.lock().unwrap_or_else(|p| p.into_inner()) = Some(sent);
    }

    /// Whether this host is the scheduler now (the cluster-wide loops run there only).
    pub fn is_scheduler(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// This host's current lease.
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    fn host_key(&self) -> String {
        self.host_key.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Makes (or reads) the hosts' key: the first daemon of a cloud makes it.
pub async fn bootstrap_host_key(daemon: &Daemon, cluster: &Cluster) -> Result<(), ControlError> {
    let found: Option<HostKey> = daemon.store.get(Table::Cluster, "host-key").await?;
    let key = match found {
        Some(k) => k.key,
        None => {
            let (stored, key) = crate::auth::new_key("admin")?;
            daemon.store.put(Table::Keys, &stored.id.clone(), &stored).await?;
            let record = HostKey { key: key.clone() };
            if daemon.store.put_new(Table::Cluster, "host-key", &record).await? {
                key
            } else {
                // Another daemon made one first: use that, forget this one.
                daemon.store.delete(Table::Keys, &stored.id).await?;
                let theirs: Option<HostKey> = daemon.store.get(Table::Cluster, "host-key").await?;
                theirs
                    .map(|k| k.key)
                    .ok_or_else(|| ControlError::Cluster("the hosts' key vanished".into()))?
            }
        }
    };
    *cluster.host_key.lock().unwrap_or_else(|p| p.into_inner()) = key;
    Ok(())
}

fn record_of(daemon: &Daemon, cluster: &Cluster) -> HostRecord {
    let c = &daemon.config;
    HostRecord {
        name: c.host_name.clone(),
        provider: c.provider.clone(),
        region: c.region.clone(),
        price_per_hour: c.price_per_hour,
        cpus: crate::host::cpus(),
        mem_mib: crate::host::mem_mib(),
        api: cluster.config.advertise.clone(),
        cert: crate::auth::hex(&cluster.cert),
        since: now(),
        state: "up".into(),
    }
}

/// Registers this host under a new lease.
async fn register(daemon: &Daemon, cluster: &Cluster) -> Result<i64, ControlError> {
    let (mut client, _) = daemon
        .store
        .etcd()
        .ok_or_else(|| ControlError::Cluster("not in a cluster".into()))?;
    let sent = std::time::Instant::now();
    let lease = client.lease_grant(cluster.config.lease_ttl, None).await?.id();
    let record = record_of(daemon, cluster);
    daemon
        .store
        .put_leased(Table::Hosts, &record.name.clone(), &record, lease)
        .await?;
    cluster.lease.store(lease, Ordering::SeqCst);
    cluster.lease_confirmed_at(sent);
    tracing::info!(
        "cluster: host {} registered (lease {lease:x}, {} s)",
        record.name,
        cluster.config.lease_ttl
    );
    Ok(lease)
}

/// Joins the cluster: registers this host and starts its lease keeper, its agent and its
/// candidacy for scheduler.
pub async fn join(daemon: Arc<Daemon>) -> Result<(), ControlError> {
    let Some(cluster) = daemon.cluster.clone() else {
        return Ok(());
    };
    bootstrap_host_key(&daemon, &cluster).await?;
    register(&daemon, &cluster).await?;
    tokio::spawn(keep_lease(daemon.clone(), cluster.clone()));
    tokio::spawn(keep_fences(daemon.clone(), cluster.clone()));
    tokio::spawn(agent(daemon.clone(), cluster.clone()));
    tokio::spawn(scheduler(daemon, cluster));
    Ok(())
}

/// Renews the watchdog of every VMM this host runs (docs/control-api.md, "Watchdog") while
/// its lease is fresh, four times a window; a VMM its watchdog paused while the lease was not
/// (this daemon was down or cut off) is resumed if its VM is still this host's to run.
async fn keep_fences(daemon: Arc<Daemon>, cluster: Arc<Cluster>) {
    let window = cluster.fence_window();
    loop {
        tokio::time::sleep(window / 4).await;
        if !cluster.lease_is_fresh() {
            continue;
        }
        for id in daemon.running_ids() {
            match daemon.renew_watchdog(&id, window).await {
                Ok(true) => daemon.resume_fenced(&id).await,
                Ok(false) => {}
                // A VMM that is ending, or one that does not answer (its watcher sees to it).
                Err(e) => tracing::debug!("{id}: renewing its watchdog: {e}"),
            }
        }
    }
}

/// Renews the lease; registers again under a new one when it expired (the host was cut off
/// longer than the lease: its VMs may be elsewhere now, which the agent then sees).
async fn keep_lease(daemon: Arc<Daemon>, cluster: Arc<Cluster>) {
    let period = Duration::from_millis((cluster.config.lease_ttl.max(1) as u64) * 1000 / 3);
    loop {
        let Some((mut client, _)) = daemon.store.etcd() else {
            return;
        };
        let lease = cluster.lease.load(Ordering::SeqCst);
        let renewed = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            loop {
                let sent = std::time::Instant::now();
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(answer) if answer.ttl() > 0 => cluster.lease_confirmed_at(sent),
                    _ => return Ok::<(), etcd_client::Error>(()),
                }
                tokio::time::sleep(period).await;
            }
        }
        .await;
        match renewed {
            Ok(()) => tracing::warn!("cluster: the lease expired; registering again"),
            Err(e) => tracing::warn!("cluster: renewing the lease failed ({e}); registering again"),
        }
        loop {
            match register(&daemon, &cluster).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!("cluster: cannot register: {e}");
                    tokio::time::sleep(period).await;
                }
            }
        }
    }
}

/// The hosts that are registered now (a host being drained says `draining`).
pub async fn hosts(daemon: &Daemon) -> Result<Vec<HostRecord>, ControlError> {
    let mut hosts: Vec<HostRecord> = daemon.store.list(Table::Hosts).await?;
    for host in &mut hosts {
        if daemon
            .store
            .get::<Draining>(Table::Cluster, &drain_key(&host.name))
            .await?
            .is_some()
        {
            host.state = "draining".into();
        }
        let price = daemon
            .store
            .get::<PriceOverride>(Table::Cluster, &price_key(&host.name))
            .await?;
        if let Some(p) = price {
            host.price_per_hour = p.price_per_hour;
        }
    }
    Ok(hosts)
}

/// A host's price as the admin set it last (a provider's price change), over its own flag's.
#[derive(serde::Serialize, serde::Deserialize)]
struct PriceOverride {
    price_per_hour: f64,
}

impl crate::store::Record for PriceOverride {}

fn price_key(host: &str) -> String {
    format!("price-{host}")
}

/// Sets `host`'s price per hour (what placement and re-placement see from now on).
pub async fn set_price(daemon: &Daemon, host: &str, price_per_hour: f64) -> Result<(), ControlError> {
    daemon
        .store
        .put(Table::Cluster, &price_key(host), &PriceOverride { price_per_hour })
        .await
}

/// The re-placement plan: every running VM whose CPU would cost more than `threshold` less
/// on another host that fits it (its placement's constraints, capacity with the moves planned
/// before it), cheapest first.
pub async fn replacement_plan(daemon: &Daemon, threshold: f64) -> Result<Vec<PlannedMove>, ControlError> {
    let hosts = hosts(daemon).await?;
    let mut vms: Vec<Vm> = daemon.store.list(Table::Vms).await?;
    let cpu_price = |h: &HostRecord| h.price_per_hour / f64::from(h.cpus.max(1));
    let mut moves = Vec::new();
    for i in 0..vms.len() {
        let vm = vms[i].clone();
        let Some(from) = vm.host.as_deref().and_then(|h| hosts.iter().find(|r| r.name == h)) else {
            continue;
        };
        if vm.state != VmState::Running {
            continue;
        }
        let mut moving = vm.clone();
        moving.placement.strategy = crate::model::Strategy::Cheapest;
        let others: Vec<HostRecord> = hosts.iter().filter(|h| h.name != from.name).cloned().collect();
        let Ok(to) = crate::placement::choose(&moving, &others, &vms) else {
            continue;
        };
        let Some(to) = hosts.iter().find(|h| h.name == to) else {
            continue;
        };
        let (was, would) = (cpu_price(from), cpu_price(to));
        if would < was * (1.0 - threshold) {
            moves.push(PlannedMove {
                vm: vm.id.clone(),
                name: vm.name.clone(),
                tenant: vm.tenant.clone(),
                from: from.name.clone(),
                to: to.name.clone(),
                from_cpu_price: was,
                to_cpu_price: would,
                saving_per_hour: (was - would) * f64::from(vm.vcpus),
            });
            // Later VMs see this one where it would be.
            vms[i].host = Some(to.name.clone());
        }
    }
    Ok(moves)
}

/// Carries out `moves` one after another, each asked of the VM's host; what each did.
pub async fn replace(daemon: &Arc<Daemon>, moves: &[PlannedMove]) -> Result<Vec<String>, ControlError> {
    let cluster = daemon
        .cluster
        .clone()
        .ok_or_else(|| ControlError::Conflict("a daemon alone has no other host".into()))?;
    let mut results = Vec::new();
    for m in moves {
        let hosts = hosts(daemon).await?;
        let result = match hosts.iter().find(|h| h.name == m.from) {
            Some(from) if from.name == daemon.config.host_name => {
                let vm = daemon.vm(&m.vm).await?;
                match hosts.iter().find(|h| h.name == m.to) {
                    Some(to) => migrate(daemon, &vm, to).await.map(|_| ()),
                    None => Err(ControlError::Conflict(format!("host {} is not up", m.to))),
                }
            }
            Some(from) => {
                let body = serde_json::json!({ "host": m.to });
                peer_json(&cluster, from, "POST", &format!("/v1/vms/{}/migrate", m.vm), Some(body))
                    .await
                    .map(|_| ())
            }
            None => Err(ControlError::Conflict(format!("host {} is not up", m.from))),
        };
        results.push(match result {
            Ok(()) => "moved".to_string(),
            Err(e) => e.to_string(),
        });
    }
    Ok(results)
}

/// A host being drained: no VM is placed on it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Draining {
    since: u64,
}

impl crate::store::Record for Draining {}

fn drain_key(host: &str) -> String {
    format!("draining-{host}")
}

/// Marks `host` drained (no VM is placed on it) or not.
pub async fn set_draining(daemon: &Daemon, host: &str, draining: bool) -> Result<(), ControlError> {
    if draining {
        daemon
            .store
            .put(Table::Cluster, &drain_key(host), &Draining { since: now() })
            .await
    } else {
        daemon.store.delete(Table::Cluster, &drain_key(host)).await.map(|_| ())
    }
}

/// Calls host `host`'s API with the hosts' key (it must be up); the JSON of a successful
/// answer.
pub async fn call_host(
    daemon: &Daemon,
    host: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ControlError> {
    let cluster = daemon
        .cluster
        .as_ref()
        .ok_or_else(|| ControlError::Cluster("this host is in no cluster".into()))?;
    let record = hosts(daemon)
        .await?
        .into_iter()
        .find(|h| h.name == host)
        .ok_or_else(|| ControlError::Cluster(format!("host {host} is not up")))?;
    peer_json(cluster, &record, method, path, body).await
}

/// Calls another host's API with the hosts' key; the JSON of a successful answer.
async fn peer_json(
    cluster: &Cluster,
    host: &HostRecord,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ControlError> {
    let client = peer_client(cluster, host)?;
    let mut answer = Vec::new();
    let body = body.map(|b| (b.to_string().into_bytes(), "application/json"));
    let (status, _) = client
        .send(method, path, &[], body, |chunk| {
            answer.extend_from_slice(chunk);
            answer.len() <= crate::limits::MAX_BODY_BYTES
        })
        .await
        .map_err(|e| ControlError::Cluster(format!("host {}: {e}", host.name)))?;
    if !(200..300).contains(&status) {
        let text = crate::client::Answer { status, body: answer }.error_text();
        return Err(ControlError::Cluster(format!(
            "host {} answered {status}: {text}",
            host.name
        )));
    }
    if answer.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&answer)
        .map_err(|e| ControlError::Cluster(format!("host {} answered no JSON: {e}", host.name)))
}

/// The host VM `vm` (on this host) should migrate to, as `req` asks and its placement allows.
pub async fn migration_target(daemon: &Daemon, vm: &Vm, req: &MigrateVm) -> Result<HostRecord, ControlError> {
    let me = &daemon.config.host_name;
    let hosts: Vec<HostRecord> = hosts(daemon)
        .await?
        .into_iter()
        .filter(|h| h.name != *me && req.avoid_provider.as_ref() != Some(&h.provider))
        .collect();
    // The request narrows the VM's own placement; it never widens it.
    let mut moving = vm.clone();
    if let Some(host) = &req.host {
        if moving.placement.host.as_ref().is_some_and(|h| h != host) {
            return Err(ControlError::Conflict(format!(
                "VM {} may run on its host only",
                vm.name
            )));
        }
        moving.placement.host = Some(host.clone());
    }
    if let Some(provider) = &req.provider {
        let allowed = &moving.placement.providers;
        if !allowed.is_empty() && !allowed.contains(provider) {
            return Err(ControlError::Conflict(format!(
                "VM {} has nowhere to go: its placement allows provider {} only, not {provider}",
                vm.name,
                allowed.join(", ")
            )));
        }
        moving.placement.providers = vec![provider.clone()];
    }
    let vms: Vec<Vm> = daemon.store.list(Table::Vms).await?;
    let name = crate::placement::choose(&moving, &hosts, &vms)
        .map_err(|why| ControlError::Conflict(format!("VM {} has nowhere to go: {why}", vm.name)))?;
    hosts
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(|| ControlError::Cluster(format!("host {name} vanished")))
}

/// Migrates VM `vm`, which runs on this host, live to `to`; the VM stays here if it fails.
pub async fn migrate(daemon: &Arc<Daemon>, vm: &Vm, to: &HostRecord) -> Result<MigrationReport, ControlError> {
    let cluster = daemon
        .cluster
        .clone()
        .ok_or_else(|| ControlError::BadRequest("migration between hosts needs a cluster (xcloudd --etcd)".into()))?;
    let path = format!("/v1/vms/{}/incoming", vm.id);
    let prepare = |cert: Vec<u8>| {
        let (cluster, to, path) = (cluster.clone(), to.clone(), path.clone());
        async move {
            let body = serde_json::json!({ "peer_cert": crate::auth::hex(&cert) });
            let answer: IncomingAnswer =
                serde_json::from_value(peer_json(&cluster, &to, "POST", &path, Some(body)).await?)
                    .map_err(|e| ControlError::Cluster(format!("host {} answered: {e}", to.name)))?;
            let cert = crate::auth::unhex(&answer.cert)
                .ok_or_else(|| ControlError::Cluster(format!("host {} sent no readable certificate", to.name)))?;
            Ok((answer.listen, cert))
        }
    };
    let counted = &daemon.migrations;
    let summary = match daemon.migrate_out(&vm.id, prepare).await {
        Ok(s) => {
            counted.moved.fetch_add(1, Ordering::Relaxed);
            counted.bytes.fetch_add(s.bytes_sent, Ordering::Relaxed);
            s
        }
        Err(e) => {
            counted.failed.fetch_add(1, Ordering::Relaxed);
            if let Err(abort) = peer_json(&cluster, to, "DELETE", &path, None).await {
                tracing::warn!("{}: telling {} to drop the incoming VM failed: {abort}", vm.id, to.name);
            }
            return Err(e);
        }
    };
    // The destination changes the record once the VM runs there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while daemon.vm(&vm.id).await?.host.as_deref() != Some(to.name.as_str()) {
        if tokio::time::Instant::now() > deadline {
            return Err(ControlError::Cluster(format!(
                "VM {} was handed over to {} but its record does not say so yet",
                vm.name, to.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.emit(
        &vm.tenant,
        "vm.migrated",
        &vm.id,
        Some(format!("{} -> {}", daemon.config.host_name, to.name)),
    );
    Ok(MigrationReport {
        vm: vm.id.clone(),
        from: daemon.config.host_name.clone(),
        to: to.name.clone(),
        total_ms: summary.total_ms,
        downtime_ms: summary.downtime_ms,
        bytes_sent: summary.bytes_sent,
        rounds: summary.rounds,
    })
}

/// The address this host's VMMs listen on for incoming migrations (its API's).
pub fn migration_ip(cluster: &Cluster) -> String {
    let advertise = &cluster.config.advertise;
    match advertise.rsplit_once(':') {
        Some((ip, _)) => ip.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => advertise.clone(),
    }
}

/// Waits until this daemon's copy of the records changes (it is what the loops read, so they
/// wake when there is something new to read) or [`RESYNC`] passes.
struct Changes {
    applied: Option<tokio::sync::watch::Receiver<i64>>,
}

impl Changes {
    fn new(daemon: &Daemon) -> Self {
        Self {
            applied: daemon.store.changes(),
        }
    }

    async fn next(&mut self) {
        match self.applied.as_mut() {
            Some(rx) => {
                if let Ok(Err(_)) = tokio::time::timeout(RESYNC, rx.changed()).await {
                    // The copy is gone (the daemon is stopping): do not spin.
                    tokio::time::sleep(RESYNC).await;
                }
            }
            None => tokio::time::sleep(RESYNC).await,
        }
    }
}

/// Makes true on this host what the records assign to it.
async fn agent(daemon: Arc<Daemon>, cluster: Arc<Cluster>) {
    let mut changes = Changes::new(&daemon);
    loop {
        if let Err(e) = reconcile(&daemon, &cluster).await {
            tracing::warn!("cluster: reconciling failed: {e}");
        }
        changes.next().await;
    }
}

async fn reconcile(daemon: &Arc<Daemon>, cluster: &Arc<Cluster>) -> Result<(), ControlError> {
    let me = daemon.config.host_name.clone();
    let vms: Vec<Vm> = daemon.store.list(Table::Vms).await?;
    // Fencing: a VMM here whose VM was given to another host since.
    for id in daemon.running_ids() {
        let mine = vms.iter().any(|v| v.id == id && v.host.as_deref() == Some(me.as_str()));
        if !mine && !daemon.is_incoming(&id) && !daemon.is_leaving(&id) {
            tracing::warn!("cluster: {id} is not this host's any more: killing its VMM here");
            daemon.kill_local(&id).await;
        }
    }
    for vm in vms {
        if vm.host.as_deref() != Some(me.as_str()) {
            continue;
        }
        let ours = daemon.running_ids().contains(&vm.id);
        if vm.want == Desired::Running && vm.state == VmState::Pending && !ours {
            let fresh = cluster
                .starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(vm.id.clone());
            if fresh {
                tokio::spawn(start_assigned(daemon.clone(), cluster.clone(), vm));
            }
        } else if vm.state == VmState::Lost && ours {
            // Back before the scheduler gave it away: it ran here all along.
            let _ = daemon.mark_found(&vm.id).await;
        }
    }
    // The hosts are read only when there is something to copy (a host's draining and price
    // keys are usually absent, and an absent key is asked of etcd).
    let asked = crate::snapshots::newly_asked(daemon, &cluster.copying).await?;
    if !asked.is_empty() {
        crate::snapshots::copy_in_background(daemon, peers(daemon, cluster).await?, &cluster.copying, asked);
    }
    let due = {
        let mut last = cluster.garbage_collected.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= GARBAGE_PERIOD);
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    };
    if due {
        crate::snapshots::collect_garbage(daemon, &cluster.copying).await?;
    }
    Ok(())
}

/// How often a host looks for copies of snapshots whose records are gone.
const GARBAGE_PERIOD: Duration = Duration::from_secs(10);

/// Starts a VM the scheduler gave this host: fetches its image and the snapshot it should
/// start from from hosts that have them if need be, restores the snapshot, or boots the
/// image when there is none or no host can give it (and says so).
async fn start_assigned(daemon: Arc<Daemon>, cluster: Arc<Cluster>, vm: Vm) {
    let id = vm.id.clone();
    let result = async {
        ensure_image(&daemon, &cluster, &vm.image).await?;
        if let Some(snap_id) = &vm.restore_from {
            let snap: Option<Snapshot> = daemon.store.get(Table::Snapshots, snap_id).await?;
            let fetched = match &snap {
                Some(snap) => crate::snapshots::fetch(&daemon, &peers(&daemon, &cluster).await?, snap).await,
                None => Err(ControlError::NotFound(format!("snapshot {snap_id} was deleted"))),
            };
            if let Err(e) = fetched {
                tracing::warn!("cluster: {id} boots afresh: {e}");
                daemon.emit(
                    &vm.tenant,
                    "vm.snapshot_unavailable",
                    &id,
                    Some(format!("it boots from its image: {e}")),
                );
            }
        }
        daemon.start_placed(&id, vm.generation).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!("cluster: starting {id} failed: {e}");
        let _ = daemon.mark_failed(&id, vm.generation, &e.to_string()).await;
    }
    cluster.starting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
}

/// Puts image `id` on this host's disk, from another host that has it (checked against its
/// SHA-256 before it is used).
async fn ensure_image(daemon: &Daemon, cluster: &Cluster, id: &str) -> Result<(), ControlError> {
    let path = daemon.image_path(id);
    if path.exists() {
        return Ok(());
    }
    let me = &daemon.config.host_name;
    let mut why = Vec::new();
    for host in hosts(daemon).await? {
        if host.name == *me {
            continue;
        }
        match fetch_image(cluster, &host, id, &path).await {
            Ok(()) => {
                tracing::info!("cluster: image {id} fetched from {}", host.name);
                return Ok(());
            }
            Err(e) => why.push(format!("{}: {e}", host.name)),
        }
    }
    Err(ControlError::Cluster(format!(
        "no host could give image {id}: {}",
        if why.is_empty() {
            "there is no other host".into()
        } else {
            why.join("; ")
        }
    )))
}

async fn fetch_image(
    cluster: &Cluster,
    host: &HostRecord,
    id: &str,
    path: &std::path::Path,
) -> Result<(), ControlError> {
    use sha2::Digest;
    let client = peer_client(cluster, host)?;
    let mut bytes = Vec::new();
    let mut over = false;
    let (status, _) = client
        .send("GET", &format!("/v1/images/{id}/content"), &[], None, |chunk| {
            bytes.extend_from_slice(chunk);
            over = bytes.len() as u64 > crate::limits::MAX_IMAGE_BYTES;
            !over
        })
        .await
        .map_err(|e| ControlError::Cluster(e.to_string()))?;
    if status != 200 || over {
        return Err(ControlError::Cluster(format!("it answered {status}")));
    }
    let digest = format!("sha256:{}", crate::auth::hex(&sha2::Sha256::digest(&bytes)));
    if digest != id {
        return Err(ControlError::Cluster(format!("it sent bytes whose digest is {digest}")));
    }
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, &bytes).map_err(|e| ControlError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| ControlError::io(format!("renaming {}", tmp.display()), e))
}

/// A client of another host, calling with the hosts' key.
fn peer_client(cluster: &Cluster, host: &HostRecord) -> Result<Client, ControlError> {
    Ok(Client::at(Endpoint::of_host(host)?, Some(cluster.host_key())))
}

/// What copying snapshots between hosts needs: the hosts up now and the hosts' key.
pub async fn peers(daemon: &Daemon, cluster: &Cluster) -> Result<crate::snapshots::Peers, ControlError> {
    Ok(crate::snapshots::Peers {
        hosts: hosts(daemon).await?,
        key: cluster.host_key(),
    })
}

/// The host elected scheduler now (none while there is no leader, or etcd does not say).
pub async fn scheduler_name(daemon: &Daemon) -> Option<String> {
    let (mut client, prefix) = daemon.store.etcd()?;
    let answer = client.leader(election(prefix)).await.ok()?;
    let kv = answer.kv()?;
    String::from_utf8(kv.value().to_vec()).ok()
}

/// Runs for scheduler, and schedules while elected.
async fn scheduler(daemon: Arc<Daemon>, cluster: Arc<Cluster>) {
    let Some((_, prefix)) = daemon.store.etcd() else {
        return;
    };
    let name = election(prefix);
    let me = daemon.config.host_name.clone();
    loop {
        // A campaign waits as long as another host leads: its own client, with no request
        // timeout (HTTP/2 keep-alives still notice a dead etcd).
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(crate::store::ETCD_PING, crate::store::ETCD_PING_TIMEOUT);
        let mut client = match etcd_client::Client::connect(&cluster.config.etcd, Some(options)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cluster: cannot reach etcd to campaign: {e}");
                tokio::time::sleep(RESYNC).await;
                continue;
            }
        };
        let lease = cluster.lease.load(Ordering::SeqCst);
        match client.campaign(name.clone(), me.clone(), lease).await {
            Ok(_) => {
                tracing::info!("cluster: {me} is the scheduler");
                daemon.emit("admin", "scheduler.elected", &me, None);
                cluster.leading.store(true, Ordering::SeqCst);
                schedule_while_leader(&daemon, &mut client, &name, lease).await;
                cluster.leading.store(false, Ordering::SeqCst);
                tracing::warn!("cluster: {me} is no longer the scheduler");
            }
            Err(e) => {
                tracing::warn!("cluster: campaigning for scheduler failed: {e}");
                tokio::time::sleep(RESYNC).await;
            }
        }
    }
}

async fn schedule_while_leader(daemon: &Arc<Daemon>, client: &mut etcd_client::Client, name: &str, lease: i64) {
    let mut changes = Changes::new(daemon);
    loop {
        // Leadership is the lease's: once it lapses another host may lead.
        match client.leader(name).await {
            Ok(answer) if answer.kv().is_some_and(|kv| kv.lease() == lease) => {}
            _ => return,
        }
        if let Err(e) = schedule(daemon).await {
            tracing::warn!("cluster: scheduling failed: {e}");
        }
        if let Some(threshold) = daemon.cluster.as_ref().and_then(|c| c.config.replace_threshold) {
            follow_prices(daemon, threshold).await;
        }
        changes.next().await;
    }
}

/// Starts the first move of the re-placement plan, unless one is under way.
async fn follow_prices(daemon: &Arc<Daemon>, threshold: f64) {
    static MOVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if MOVING.swap(true, Ordering::SeqCst) {
        return;
    }
    let first = match replacement_plan(daemon, threshold).await {
        Ok(moves) => moves.into_iter().next(),
        Err(e) => {
            tracing::warn!("cluster: planning the re-placement failed: {e}");
            None
        }
    };
    let Some(m) = first else {
        MOVING.store(false, Ordering::SeqCst);
        return;
    };
    let daemon = daemon.clone();
    tokio::spawn(async move {
        tracing::info!(
            "cluster: prices changed: moving {} from {} to {} saves {:.6} an hour",
            m.name,
            m.from,
            m.to,
            m.saving_per_hour
        );
        let result = replace(&daemon, std::slice::from_ref(&m)).await;
        let moved = matches!(&result, Ok(r) if r.first().map(String::as_str) == Some("moved"));
        if !moved {
            tracing::warn!(
                "cluster: re-placing {} failed ({result:?}); trying again in a while",
                m.name
            );
            tokio::time::sleep(FAILED_MOVE_PAUSE).await;
        }
        MOVING.store(false, Ordering::SeqCst);
    });
}

/// How long the scheduler waits after a re-placement move failed before planning again.
const FAILED_MOVE_PAUSE: Duration = Duration::from_secs(30);

/// One round of the scheduler: places what waits for a host; handles what lost its host.
pub async fn schedule(daemon: &Daemon) -> Result<(), ControlError> {
    let hosts = hosts(daemon).await?;
    let mut vms: Vec<Vm> = daemon.store.list(Table::Vms).await?;
    let alive: HashSet<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    for i in 0..vms.len() {
        let vm = vms[i].clone();
        match vm.host.as_deref() {
            None if vm.want == Desired::Running && vm.state == VmState::Pending => {
                match crate::placement::choose(&vm, &hosts, &vms) {
                    Ok(host) => {
                        let placed = daemon.assign(&vm.id, vm.generation, &host).await?;
                        if let Some(placed) = placed {
                            daemon.emit(&vm.tenant, "vm.placed", &vm.id, Some(host));
                            vms[i] = placed;
                        }
                    }
                    Err(why) => {
                        if vm.exit.as_deref() != Some(why.as_str()) {
                            daemon.note(&vm.id, &why).await?;
                        }
                    }
                }
            }
            // Only a VM with a VMM there (or about to have one) needs anything done.
            Some(host) if !alive.contains(host) && (vm.state.has_vmm() || vm.state == VmState::Pending) => {
                let snapshot = latest_snapshot_elsewhere(daemon, &vm, &alive).await?;
                let host = host.to_string();
                let never_ran = vm.state == VmState::Pending;
                if never_ran || (vm.restart == RestartPolicy::OnHostLoss && vm.want == Desired::Running) {
                    let from = match &snapshot {
                        Some(s) => format!("from its snapshot {}", s.id),
                        None => "from its image (no host that is up holds a snapshot of it)".to_string(),
                    };
                    if let Some(v) = daemon.requeue(&vm.id, vm.generation, &host, snapshot).await? {
                        daemon.emit(
                            &vm.tenant,
                            "vm.restarting",
                            &vm.id,
                            Some(format!(
                                "its host {host} was lost; it starts again on another host {from}"
                            )),
                        );
                        vms[i] = v;
                    }
                } else if let Some(v) = daemon.mark_lost(&vm.id, vm.generation, &host).await? {
                    daemon.emit(&vm.tenant, "vm.lost", &vm.id, Some(format!("its host {host} was lost")));
                    vms[i] = v;
                }
            }
            _ => {}
        }
    }
    if let Some(cluster) = &daemon.cluster {
        crate::snapshots::ask_for_copies(daemon, &hosts, cluster.config.snapshot_holders).await?;
    }
    Ok(())
}

/// The newest snapshot of `vm` held by a host that is up (none: it boots afresh).
async fn latest_snapshot_elsewhere(
    daemon: &Daemon,
    vm: &Vm,
    alive: &HashSet<&str>,
) -> Result<Option<Snapshot>, ControlError> {
    let snaps: Vec<Snapshot> = daemon.store.list(Table::Snapshots).await?;
    Ok(snaps
        .into_iter()
        .filter(|s| s.vm == vm.id && s.holders().any(|h| alive.contains(h)))
        .max_by_key(|s| s.created))
}

/// Forwards a request for a VM on another host to that host; the answer as it gave it.
pub async fn forward(
    daemon: &Daemon,
    host: &HostRecord,
    request: axum::extract::Request,
) -> Result<axum::response::Response, ControlError> {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, crate::limits::MAX_BODY_BYTES)
        .await
        .map_err(|e| ControlError::BadRequest(format!("the request body: {e}")))?;
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let auth = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let content_type = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    // The caller's own key goes along: the other host answers for that caller, no one else.
    let client = Client::at(Endpoint::of_host(host)?, None);
    let me = daemon.config.host_name.clone();
    let headers = [("authorization", auth), (FORWARDED_BY, me.as_str())];
    let mut answer = Vec::new();
    let (status, answer_type) = client
        .send(
            parts.method.as_str(),
            path,
            &headers,
            Some((body.to_vec(), content_type)),
            |chunk| {
                answer.extend_from_slice(chunk);
                answer.len() <= crate::limits::MAX_CONSOLE_BYTES as usize * 2
            },
        )
        .await
        .map_err(|e| ControlError::Cluster(format!("the VM's host {} did not answer: {e}", host.name)))?;
    let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
    let answer_type = answer_type.unwrap_or_else(|| "application/json".into());
    Ok((status, [(axum::http::header::CONTENT_TYPE, answer_type)], answer).into_response())
}

/// The header a forwarded request carries (the host that forwarded it): it is not forwarded
/// again.
pub const FORWARDED_BY: &str = "x-xcloud-forwarded-by";
