//! The daemon: its state, and the life of each VM as one VMM process (`xcloud run` or
//! `xcloud restore`) that it starts, drives through the VMM's control socket, and watches.
//!
//! VMM processes run in their own process group, so they outlive a restart of xcloudd: a new
//! daemon finds them by their pid and control socket and watches them again.

use crate::auth;
use crate::model::{self, now, now_f64, Desired, Event, Image, InstanceType, Snapshot, Tenant, Vm, VmState};
use crate::store::{Store, Table};
use crate::ControlError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch, Mutex};
use xcloud_api::{Command as VmmCommand, Response as VmmResponse};

/// How long a new VMM may take to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped VMM may take to end before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a VMM found after a restart (not a child of this daemon) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// How the daemon is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the state file, images, VM directories and snapshots live (absolute).
    pub data_dir: PathBuf,
    /// The `xcloud` binary that runs each VM.
    pub vmm_binary: PathBuf,
    /// This host's name.
    pub host_name: String,
    /// The provider this host is rented from.
    pub provider: String,
    /// The provider's region.
    pub region: String,
    /// What an hour of this host costs.
    pub price_per_hour: f64,
    /// Run each VMM jailed (`xcloud jail`: namespaces, its directory as root, an unprivileged
    /// uid, seccomp); needs root.
    pub jail: bool,
    /// How often this host meters its VMs (usage records are to the second whatever it is).
    pub meter_period: Duration,
    /// How many days usage records are kept.
    pub usage_days: u64,
    /// How often autoscaling groups are looked at (by the scheduler, in a cluster).
    pub autoscale_period: Duration,
    /// What tenants' extension modules may do (`--ext-policy` of every VMM; None: the VMM's
    /// default).
    pub ext_policy: Option<String>,
}

impl Config {
    /// A daemon alone on this host, named after it, with VMMs jailed when run as root.
    pub fn alone(data_dir: PathBuf, vmm_binary: PathBuf) -> Self {
        Self {
            data_dir,
            vmm_binary,
            host_name: crate::host::hostname(),
            provider: "local".into(),
            region: "local".into(),
            price_per_hour: 0.0,
            // SAFETY: geteuid has no preconditions.
            jail: unsafe { libc::geteuid() } == 0,
            meter_period: Duration::from_secs(10),
            usage_days: 400,
            autoscale_period: Duration::from_secs(5),
            ext_policy: None,
        }
    }
}

/// How many events may wait on their way to etcd before new ones stay on this host.
const EVENT_BACKLOG: usize = 1024;

/// A VMM this daemon watches.
struct Runtime {
    /// The VMM's process (the jail's, when jailed).
    pid: u32,
    /// Set when the daemon asked the VMM to stop (its end is then no failure).
    stopping: Arc<AtomicBool>,
    /// Set while the VM migrates away: its VMM's end is the handover, not the VM's.
    handing_off: Arc<AtomicBool>,
    /// Becomes true once the VMM has ended and its record says so.
    ended: watch::Receiver<bool>,
}

/// The daemon's state, shared by its request handlers.
pub struct Daemon {
    /// How it is set up.
    pub config: Config,
    /// The state file.
    pub store: Store,
    events: broadcast::Sender<Event>,
    seq: AtomicU64,
    /// Held while a VM record is read, changed and written, and while quotas are checked.
    records: Mutex<()>,
    /// One lock per VM, held for a whole lifecycle operation (start, stop, snapshot...).
    ops: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    running: std::sync::Mutex<HashMap<String, Runtime>>,
    /// Where VMMs get their CPU and memory limits (None: the host has no usable cgroups).
    cgroups: Option<crate::cgroups::Cgroups>,
    /// Its part in a cluster (None: alone, records in its own file).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The live migrations this host sent (for `/metrics`).
    pub migrations: crate::prometheus::MigrationCounters,
    /// In a cluster: where events go on their way to etcd.
    event_writer: Option<tokio::sync::mpsc::Sender<Event>>,
    /// Held by a meter reading (two readings at once would count the same seconds twice).
    pub meter_lock: Mutex<()>,
    /// VMs migrating in: their VMMs run here before their records name this host.
    incoming: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// How long a call waits for another host to release the records' lock.
const RECORDS_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The records' lock (see [`Daemon::lock_records`]); released when dropped.
pub struct RecordsLock<'a> {
    _local: tokio::sync::MutexGuard<'a, ()>,
    etcd: Option<(etcd_client::Client, Vec<u8>)>,
}

impl Drop for RecordsLock<'_> {
    fn drop(&mut self) {
        if let Some((mut client, key)) = self.etcd.take() {
            tokio::spawn(async move {
                if let Err(e) = client.unlock(key).await {
                    tracing::warn!("cluster: releasing the records' lock failed ({e}); it goes with the lease");
                }
            });
        }
    }
}

/// What a VMM starts from.
enum Launch {
    Boot(PathBuf),
    Restore(PathBuf),
    /// A VM migrating in: `xcloud receive` on `listen`, with the migration's identity and the
    /// source's pinned certificate.
    Receive {
        listen: String,
        identity: PathBuf,
        peer: PathBuf,
    },
}

impl Daemon {
    /// Opens the state in `config.data_dir` (making it on first use, with an admin tenant
    /// whose key is written to `admin.key`), and watches the VMMs that still run.
    pub async fn open(config: Config) -> Result<Arc<Self>, ControlError> {
        Self::open_with(config, true, None).await
    }

    /// As [`Daemon::open`], with VMMs left out of cgroups (the fuzzing harness: nothing boots).
    pub async fn open_without_cgroups(config: Config) -> Result<Arc<Self>, ControlError> {
        Self::open_with(config, false, None).await
    }

    /// As [`Daemon::open`], with the records in the cluster's etcd; the daemon joins the
    /// cluster when [`crate::cluster::join`] is called.
    pub async fn open_in_cluster(config: Config, cluster: crate::cluster::Cluster) -> Result<Arc<Self>, ControlError> {
        Self::open_with(config, true, Some(cluster)).await
    }

    async fn open_with(
        config: Config,
        use_cgroups: bool,
        cluster: Option<crate::cluster::Cluster>,
    ) -> Result<Arc<Self>, ControlError> {
        for sub in ["images", "vms"] {
            let d = config.data_dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| ControlError::io(format!("creating {}", d.display()), e))?;
        }
        let store = match &cluster {
            None => Store::open(&config.data_dir.join("state.redb"))?,
            Some(c) => Store::connect(&c.config.etcd, &c.config.prefix).await?,
        };
        let (events, _) = broadcast::channel(1024);
        let tag =
            auth::hex(&<sha2::Sha256 as sha2::Digest>::digest(config.data_dir.as_os_str().as_encoded_bytes())[..4]);
        let cgroups = if use_cgroups {
            crate::cgroups::Cgroups::detect(&format!("xcloud-{tag}"))
        } else {
            None
        };
        match &cgroups {
            Some(c) => tracing::info!("VMMs run in their own cgroups: {}", c.describe()),
            None => tracing::warn!(
                "no cgroup hierarchy with cpu and memory controllers: VMMs run without CPU and memory limits"
            ),
        }
        let (event_writer, outgoing_events) = match &cluster {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BACKLOG);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let daemon = Arc::new(Self {
            event_writer,
            migrations: Default::default(),
            meter_lock: Mutex::new(()),
            incoming: Default::default(),
            cluster: cluster.map(Arc::new),
            cgroups,
            config,
            store,
            events,
            seq: AtomicU64::new(0),
            records: Mutex::new(()),
            ops: Default::default(),
            running: Default::default(),
        });
        if let Some(outgoing) = outgoing_events {
            daemon.relay_cluster_events(outgoing);
        }
        daemon.bootstrap().await?;
        daemon.adopt().await?;
        Ok(daemon)
    }

    async fn bootstrap(&self) -> Result<(), ControlError> {
        if self.store.list::<InstanceType>(Table::InstanceTypes).await?.is_empty() {
            for t in model::default_instance_types() {
                self.store.put(Table::InstanceTypes, &t.name.clone(), &t).await?;
            }
        }
        if self.store.get::<Tenant>(Table::Tenants, "admin").await?.is_some() {
            return Ok(());
        }
        let admin = Tenant {
            name: "admin".into(),
            role: model::Role::Admin,
            quota: model::Quota {
                vcpus: 1024,
                mem_mib: 1 << 22,
                vms: 4096,
            },
            cpu_weight: 100,
            created: now(),
        };
        // In a cluster the first daemon to get here makes the admin tenant; the others leave it.
        if !self.store.put_new(Table::Tenants, "admin", &admin).await? {
            return Ok(());
        }
        let (stored, key) = auth::new_key("admin")?;
        let path = self.admin_key_path();
        write_private(&path, format!("{key}\n").as_bytes())
            .map_err(|e| ControlError::io(format!("writing {}", path.display()), e))?;
        self.store.put(Table::Keys, &stored.id.clone(), &stored).await?;
        tracing::info!("first start: the admin key is in {}", path.display());
        Ok(())
    }

    /// The file the first admin key is written to.
    pub fn admin_key_path(&self) -> PathBuf {
        self.config.data_dir.join("admin.key")
    }

    /// Finds the VMMs that ran before this daemon started and watches them again; records of
    /// VMMs that ended meanwhile are brought up to date.
    async fn adopt(self: &Arc<Self>) -> Result<(), ControlError> {
        let vms = self.store.list::<Vm>(Table::Vms).await?;
        self.kill_strays(&vms);
        for vm in vms {
            // A VM marked lost may still run here: this host was cut off, not dead.
            if !(vm.state.has_vmm() || vm.state == VmState::Lost) || !self.is_mine(&vm) {
                continue;
            }
            let sock = self.api_socket(&vm.id);
            let alive = match vm.pid {
                Some(pid) if crate::host::process_is(pid, &self.vm_dir(&vm.id)) => {
                    ctl(&sock, VmmCommand::Status).await.ok().map(|status| (status, pid))
                }
                _ => None,
            };
            // Only if the record is still as read: the scheduler may give the VM away meanwhile.
            let unchanged = |v: &Vm| v.generation == vm.generation && v.host == vm.host;
            match alive {
                Some((status, pid)) => {
                    // Paused by its watchdog while no daemon renewed it: it is to run (alone it
                    // is resumed now; in a cluster once this host's lease is fresh again).
                    let fenced = status.fenced == Some(true);
                    if fenced && self.cluster.is_none() {
                        self.resume_fenced(&vm.id).await;
                    }
                    let state = match vmm_state(&status) {
                        Some(VmState::Paused) if fenced => VmState::Running,
                        other => other.unwrap_or(VmState::Running),
                    };
                    let kept = self
                        .update_if(&vm.id, unchanged, |v| {
                            if v.state == VmState::Lost {
                                v.exit = None;
                                v.running_since = Some(now_f64());
                            }
                            v.state = state;
                        })
                        .await?;
                    if kept.is_some() {
                        self.watch(vm.id.clone(), vm.tenant.clone(), None, pid);
                        tracing::info!("{}: its VMM (pid {pid}) still runs; watching it again", vm.id);
                    } else {
                        tracing::warn!("{}: given to another host meanwhile: killing its VMM here", vm.id);
                        self.kill(&vm.id, pid).await;
                    }
                }
                None => {
                    self.update_if(&vm.id, unchanged, |v| {
                        v.state = VmState::Exited;
                        v.exit = Some("its VMM ended while xcloudd was not running".into());
                        close_run(v);
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Whether `vm` is this host's (alone: every VM is).
    pub fn is_mine(&self, vm: &Vm) -> bool {
        match &vm.host {
            Some(h) => *h == self.config.host_name,
            None => self.cluster.is_none(),
        }
    }

    /// Kills every VMM on this host that its VM's record does not name: one whose VM was given
    /// to another host while this daemon was down (fencing), or one left by a crash.
    fn kill_strays(&self, vms: &[Vm]) {
        let Ok(dirs) = std::fs::read_dir(self.config.data_dir.join("vms")) else {
            return;
        };
        for entry in dirs.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let record = vms.iter().find(|v| v.id == id);
            for pid in crate::host::processes_marked(&entry.path()) {
                let keep = record.is_some_and(|v| {
                    (v.state.has_vmm() || v.state == VmState::Lost) && self.is_mine(v) && v.pid == Some(pid)
                });
                if !keep {
                    tracing::warn!("{id}: a VMM (pid {pid}) runs here that its record does not name: killing it");
                    // SAFETY: kill sends a signal to a process whose command line names this VM's directory.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
    }

    /// Whether VM `id` is migrating in to this host.
    pub fn is_incoming(&self, id: &str) -> bool {
        self.incoming.lock().unwrap_or_else(|p| p.into_inner()).contains(id)
    }

    /// Whether VM `id` is migrating away from this host (its record may name the destination
    /// before the source's VMM has finished).
    pub fn is_leaving(&self, id: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|r| r.handing_off.load(Ordering::SeqCst))
    }

    /// The VMs whose VMMs this daemon watches.
    pub fn running_ids(&self) -> Vec<String> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Kills VM `id`'s VMM here, if this daemon watches one (its record is not touched: it
    /// may be another host's now).
    pub async fn kill_local(&self, id: &str) {
        let pid = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|r| (r.pid, r.stopping.clone()));
        if let Some((pid, stopping)) = pid {
            stopping.store(true, Ordering::SeqCst);
            self.kill(id, pid).await;
        }
    }

    /// Changes VM `id`'s record by `change` if `applies` holds for it; None if it did not
    /// (another writer got there first) or there is no record.
    async fn update_if(
        &self,
        id: &str,
        applies: impl Fn(&Vm) -> bool,
        mut change: impl FnMut(&mut Vm),
    ) -> Result<Option<Vm>, ControlError> {
        let result = self
            .store
            .update(Table::Vms, id, |vm: &mut Vm| {
                if !applies(vm) {
                    return Err(ControlError::Conflict(String::new()));
                }
                change(vm);
                Ok(())
            })
            .await;
        match result {
            Err(ControlError::Conflict(why)) if why.is_empty() => Ok(None),
            other => other,
        }
    }

    /// The scheduler's choice: VM `id` (still waiting at `generation`) goes on `host`.
    pub async fn assign(&self, id: &str, generation: u64, host: &str) -> Result<Option<Vm>, ControlError> {
        self.update_if(
            id,
            |v| v.host.is_none() && v.generation == generation && v.state == VmState::Pending,
            |v| {
                v.host = Some(host.to_string());
                v.generation += 1;
                v.exit = None;
            },
        )
        .await
    }

    /// Says on a waiting VM's record why it waits.
    pub async fn note(&self, id: &str, why: &str) -> Result<(), ControlError> {
        self.update_if(id, |v| v.state == VmState::Pending, |v| v.exit = Some(why.to_string()))
            .await
            .map(|_| ())
    }

    /// VM `id` lost its host `host`: it waits for another (restored from `snapshot` there when
    /// that host has it).
    pub async fn requeue(
        &self,
        id: &str,
        generation: u64,
        host: &str,
        snapshot: Option<Snapshot>,
    ) -> Result<Option<Vm>, ControlError> {
        self.update_if(
            id,
            |v| v.generation == generation && v.host.as_deref() == Some(host),
            |v| {
                v.host = None;
                v.state = VmState::Pending;
                v.generation += 1;
                v.restore_from = snapshot.as_ref().map(|s| s.id.clone());
                v.exit = Some(format!("its host {host} was lost; restarting it on another host"));
                close_run(v);
            },
        )
        .await
    }

    /// VM `id` lost its host `host` and has no restart policy.
    pub async fn mark_lost(&self, id: &str, generation: u64, host: &str) -> Result<Option<Vm>, ControlError> {
        self.update_if(
            id,
            |v| v.generation == generation && v.host.as_deref() == Some(host),
            |v| {
                v.state = VmState::Lost;
                v.exit = Some(format!("its host {host} was lost"));
                // Metering stops; the pid stays, for the host to know its VMM if it comes back.
                v.run_seconds = v.run_seconds_now();
                v.running_since = None;
            },
        )
        .await
    }

    /// A VM marked lost whose VMM still runs here (its host came back in time).
    pub async fn mark_found(&self, id: &str) -> Result<Option<Vm>, ControlError> {
        let me = self.config.host_name.clone();
        self.update_if(
            id,
            |v| v.state == VmState::Lost && v.host.as_deref() == Some(me.as_str()),
            |v| {
                v.state = VmState::Running;
                v.exit = None;
                v.running_since = Some(now_f64());
            },
        )
        .await
    }

    /// Records that VM `id`'s placement `generation` could not start here.
    pub async fn mark_failed(&self, id: &str, generation: u64, why: &str) -> Result<Option<Vm>, ControlError> {
        self.update_if(
            id,
            |v| v.generation == generation && !v.state.has_vmm(),
            |v| {
                v.state = VmState::Failed;
                v.exit = Some(why.to_string());
            },
        )
        .await
    }

    /// Starts VM `id`, which the scheduler gave this host at `generation`: from the snapshot
    /// its record names when this host has it, from its image otherwise.
    pub async fn start_placed(self: &Arc<Self>, id: &str, generation: u64) -> Result<Vm, ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let vm = self.vm(id).await?;
        if vm.generation != generation || vm.state != VmState::Pending || !self.is_mine(&vm) {
            return Ok(vm);
        }
        let snapshot = vm
            .restore_from
            .as_ref()
            .map(|s| self.snapshot_dir(id, s))
            .filter(|d| d.is_dir());
        let how = match snapshot {
            Some(dir) => Launch::Restore(dir),
            None => Launch::Boot(self.image_path(&vm.image)),
        };
        self.launch(vm, how).await
    }

    /// Where a VM's migration credentials go (inside its directory: its jailed VMM reads them).
    fn migration_dir(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("migration")
    }

    /// Makes a one-time identity for a migration of VM `vm` in `name` under its migration
    /// directory, and writes `peer` (the other end's one-time certificate) beside it; both
    /// readable by the VM's jailed VMM. The identity's certificate.
    fn migration_credentials(
        &self,
        vm: &Vm,
        name: &str,
        peer: &[u8],
    ) -> Result<(PathBuf, PathBuf, Vec<u8>), ControlError> {
        let dir = self.migration_dir(&vm.id).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let identity = xcloud_migration::tls::Identity::generate(&dir, &vm.id, true)
            .map_err(|e| ControlError::Vmm(format!("cannot make the migration's identity: {e}")))?;
        let peer_path = dir.join("peer.der");
        std::fs::write(&peer_path, peer)
            .map_err(|e| ControlError::io(format!("writing {}", peer_path.display()), e))?;
        if self.config.jail {
            if let Some(uid) = vm.uid {
                for path in [
                    self.migration_dir(&vm.id),
                    dir.clone(),
                    dir.join(xcloud_migration::tls::KEY_FILE),
                    dir.join(xcloud_migration::tls::CERT_FILE),
                    peer_path.clone(),
                ] {
                    std::os::unix::fs::chown(&path, Some(uid), Some(uid))
                        .map_err(|e| ControlError::io(format!("giving {} to the VM's uid", path.display()), e))?;
                }
            }
        }
        Ok((dir, peer_path, identity.cert.to_vec()))
    }

    /// Starts a VMM that waits for VM `id` to migrate in from its host, on `ip`, accepting
    /// only `peer_cert`: where it listens and its one-time certificate. Once the VM runs here
    /// its record is changed to name this host (if it still names the source and the same
    /// placement).
    pub async fn receive_incoming(
        self: &Arc<Self>,
        id: &str,
        ip: &str,
        peer_cert: &[u8],
    ) -> Result<(String, Vec<u8>), ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let vm = self.vm(id).await?;
        if self.is_mine(&vm) || self.runtime(id).is_some() {
            return Err(ControlError::Conflict(format!(
                "VM {} is on this host already",
                vm.name
            )));
        }
        let (dir, peer, cert) = self.migration_credentials(&vm, "in", peer_cert)?;
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| ControlError::io(format!("finding a free port on {ip}"), e))?
            .port();
        let listen = format!("{ip}:{port}");
        let launch = Launch::Receive {
            listen: listen.clone(),
            identity: dir,
            peer,
        };
        self.incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
        let (child, vmm_log) = match self.spawn_vmm(&vm, launch).await {
            Ok(spawned) => spawned,
            Err(e) => {
                self.incoming.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        let mut ended = self.watch(vm.id.clone(), vm.tenant.clone(), Some(child), pid);
        // Listening once a connection is taken (the VMM drops one that does not authenticate).
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while tokio::net::TcpStream::connect(&listen).await.is_err() {
            if *ended.borrow() || tokio::time::Instant::now() > deadline {
                self.kill(id, pid).await;
                return Err(ControlError::Vmm(format!(
                    "the receiving VMM of {} did not listen: {}",
                    vm.name,
                    tail(&vmm_log)
                )));
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), ended.changed()).await;
        }
        let daemon = self.clone();
        let sock = self.api_socket(id);
        let (source, generation, id) = (vm.host.clone(), vm.generation, id.to_string());
        tokio::spawn(async move {
            // The control socket answers once the VM was handed over and runs here.
            loop {
                if *ended.borrow() {
                    return;
                }
                if let Ok(status) = ctl(&sock, VmmCommand::Status).await {
                    let state = vmm_state(&status).unwrap_or(VmState::Running);
                    let me = daemon.config.host_name.clone();
                    let taken = daemon
                        .update_if(
                            &id,
                            |v| v.host == source && v.generation == generation,
                            |v| {
                                v.host = Some(me.clone());
                                v.pid = Some(pid);
                                v.state = state;
                                v.exit = None;
                            },
                        )
                        .await;
                    daemon.incoming.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    // The source says `vm.migrated` once its side is done too.
                    match taken {
                        Ok(Some(_)) => {}
                        _ => {
                            tracing::warn!("{id}: migrated in, but its record changed meanwhile: killing it here");
                            daemon.kill(&id, pid).await;
                        }
                    }
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), ended.changed()).await;
            }
        });
        Ok((listen, cert))
    }

    /// Kills the receiving VMM of VM `id` if it has not taken over (its migration failed).
    pub async fn abort_incoming(&self, id: &str) {
        if self.is_incoming(id) {
            self.kill_local(id).await;
        }
    }

    /// Migrates VM `id` live to the VMM listening on `to` with certificate `peer_cert`, using
    /// a one-time identity whose certificate `prepare` is given first (to send to the
    /// destination, which answers where it listens and its certificate).
    pub async fn migrate_out<F, Fut>(
        self: &Arc<Self>,
        id: &str,
        prepare: F,
    ) -> Result<xcloud_migration::MigrationSummary, ControlError>
    where
        F: FnOnce(Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = Result<(String, Vec<u8>), ControlError>>,
    {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let vm = self.vm(id).await?;
        if vm.state != VmState::Running || !self.is_mine(&vm) {
            return Err(ControlError::Conflict(
                format!("VM {} is {:?}: only a running VM migrates", vm.name, vm.state).to_lowercase(),
            ));
        }
        let handing_off = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|r| r.handing_off.clone())
            .ok_or_else(|| ControlError::Conflict(format!("VM {} has no VMM here", vm.name)))?;
        // The destination's certificate is not known before the destination answers: make
        // the identity first with a placeholder peer, then write the real one.
        let (dir, peer_path, cert) = self.migration_credentials(&vm, "out", &[])?;
        let (to, peer_cert) = prepare(cert).await?;
        std::fs::write(&peer_path, &peer_cert)
            .map_err(|e| ControlError::io(format!("writing {}", peer_path.display()), e))?;
        let command = VmmCommand::Migrate {
            to,
            identity: self.vmm_path(id, &dir),
            peer_cert: self.vmm_path(id, &peer_path),
            max_downtime_ms: None,
            timeout_ms: None,
            postcopy: Default::default(),
            compress: false,
        };
        // Its CPU seconds here are readable only while its VMM lives here.
        if let Err(e) = crate::meter::read_one(self, &vm).await {
            tracing::warn!("{id}: metering it before it migrates failed: {e}");
        }
        handing_off.store(true, Ordering::SeqCst);
        match ctl_ok(&self.api_socket(id), command).await {
            Ok(answer) => {
                let summary = answer
                    .migrated
                    .ok_or_else(|| ControlError::Vmm("the VMM said the migration ended but not how".into()))?;
                if let Err(e) = crate::meter::migrated(self, &vm, summary.bytes_sent).await {
                    tracing::warn!("{id}: metering its migration failed: {e}");
                }
                if let Err(e) = crate::meter::handed_over(self, id).await {
                    tracing::warn!("{id}: metering its last seconds here failed: {e}");
                }
                Ok(summary)
            }
            Err(e) => {
                handing_off.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// What VM `id`'s VMM here says of itself: the outgoing migration under way, if one is,
    /// and its guest's last load report.
    pub async fn vmm_status(&self, id: &str) -> Option<VmmStatus> {
        let status = ctl(&self.api_socket(id), VmmCommand::Status).await.ok()?;
        Some(VmmStatus {
            migration: status.migration.map(|p| crate::model::MigrationPhase {
                phase: p.phase,
                round: p.round,
                bytes_sent: p.bytes_sent,
                dirty_pages: p.dirty_pages,
            }),
            guest_load: status
                .guest_load
                .zip(status.guest_load_age_ms)
                .map(|(load, age)| (load, std::time::Duration::from_millis(age))),
        })
    }

    /// Publishes an event to the stream: alone, to this daemon's; in a cluster, to etcd, from
    /// where every daemon's stream has it.
    pub fn emit(&self, tenant: &str, kind: &str, id: &str, detail: Option<String>) {
        let event = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            host: Some(self.config.host_name.clone()),
            at: now(),
            tenant: tenant.into(),
            kind: kind.into(),
            id: id.into(),
            detail,
        };
        let unsent = match &self.event_writer {
            Some(writer) => match writer.try_send(event) {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!("cluster: the event writer is behind: an event stays on this host");
                    e.into_inner()
                }
            },
            None => event,
        };
        let _ = self.events.send(unsent);
    }

    /// In a cluster: writes this daemon's events to etcd, in order, and passes every host's
    /// events from etcd to this daemon's stream.
    fn relay_cluster_events(&self, mut outgoing: tokio::sync::mpsc::Receiver<Event>) {
        let (Some((mut client, prefix)), Some(mut incoming)) = (self.store.etcd(), self.store.news(Table::Events))
        else {
            return;
        };
        let prefix = prefix.to_string();
        let local = self.events.clone();
        tokio::spawn(async move {
            while let Some(event) = outgoing.recv().await {
                let key = format!(
                    "{:016}-{}-{:010}",
                    (now_f64() * 1000.0) as u64,
                    event.host.as_deref().unwrap_or(""),
                    event.seq
                );
                let stored = match serde_json::to_vec(&event) {
                    Ok(bytes) => client
                        .put(Store::etcd_key(&prefix, Table::Events, &key), bytes, None)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = stored {
                    tracing::warn!("cluster: an event could not go to etcd ({e}); it stays on this host");
                    let _ = local.send(event);
                }
            }
        });
        let local = self.events.clone();
        tokio::spawn(async move {
            loop {
                match incoming.recv().await {
                    Ok((revision, bytes)) => match serde_json::from_slice::<Event>(&bytes) {
                        Ok(mut event) => {
                            event.seq = u64::try_from(revision).unwrap_or(0);
                            let _ = local.send(event);
                        }
                        Err(e) => tracing::warn!("cluster: an unreadable event in etcd: {e}"),
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("cluster: {n} events went by unseen by this host's stream");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The lock of the records (quota checks and record updates hold it).
    /// In a cluster it is also an etcd lock under this host's lease, so that quotas hold across
    /// hosts (a host that dies holding it frees it when its lease expires).
    pub async fn lock_records(&self) -> Result<RecordsLock<'_>, ControlError> {
        let local = self.records.lock().await;
        let etcd = match (self.store.etcd(), &self.cluster) {
            (Some((mut client, prefix)), Some(cluster)) => {
                let options = etcd_client::LockOptions::new().with_lease(cluster.lease());
                let name = format!("{prefix}/locks/records");
                let held = tokio::time::timeout(RECORDS_LOCK_TIMEOUT, client.lock(name, Some(options)))
                    .await
                    .map_err(|_| ControlError::Cluster("another host holds the records' lock".into()))??;
                // What the lock's last holder wrote is in this daemon's copy before it counts.
                self.store
                    .catch_up(held.header().map(|h| h.revision()).unwrap_or(0))
                    .await;
                Some((client, held.key().to_vec()))
            }
            _ => None,
        };
        Ok(RecordsLock { _local: local, etcd })
    }

    pub(crate) fn op_lock(&self, id: &str) -> Arc<Mutex<()>> {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.entry(id.to_string()).or_default().clone()
    }

    /// Where VM `id`'s files (control socket, console log, VMM log) live.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("vms").join(id)
    }

    pub(crate) fn api_socket(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("api.sock")
    }

    /// VM `id`'s console log.
    pub fn console_log(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }

    /// Where image `id`'s bytes are.
    pub fn image_path(&self, id: &str) -> PathBuf {
        self.config
            .data_dir
            .join("images")
            .join(id.trim_start_matches("sha256:"))
    }

    /// Where snapshot `id` of VM `vm` is (in the VM's directory, so that its jailed VMM
    /// reaches it).
    pub fn snapshot_dir(&self, vm: &str, id: &str) -> PathBuf {
        self.vm_dir(vm).join("snapshots").join(id)
    }

    /// The name the VMM of VM `vm` knows `path` by (its root is the VM's directory when jailed).
    pub(crate) fn vmm_path(&self, vm: &str, path: &Path) -> PathBuf {
        if !self.config.jail {
            return path.to_path_buf();
        }
        match path.strip_prefix(self.vm_dir(vm)) {
            Ok(inside) => Path::new("/").join(inside),
            Err(_) => path.to_path_buf(),
        }
    }

    /// The VMM process of a VM whose daemon-side process is `pid` (jailed: the jail's child).
    pub fn vmm_pid(&self, pid: u32) -> u32 {
        if !self.config.jail {
            return pid;
        }
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(pid)
    }

    /// Gives VM `id` its own uid (kept in its record) and its directory to that uid.
    async fn prepare_jail(&self, vm: &Vm, image: Option<&Path>) -> Result<(u32, Option<PathBuf>), ControlError> {
        let uid = match vm.uid {
            Some(uid) => uid,
            None => {
                let _records = self.lock_records().await?;
                let taken: Vec<u32> = self
                    .store
                    .list::<Vm>(Table::Vms)
                    .await?
                    .iter()
                    .filter_map(|v| v.uid)
                    .collect();
                let uid = (model::FIRST_VM_UID..)
                    .find(|u| !taken.contains(u))
                    .unwrap_or(model::FIRST_VM_UID);
                let mut record: Vm = self
                    .store
                    .get(Table::Vms, &vm.id)
                    .await?
                    .ok_or_else(|| ControlError::NotFound(format!("no VM {}", vm.id)))?;
                record.uid = Some(uid);
                self.store.put(Table::Vms, &vm.id, &record).await?;
                uid
            }
        };
        let dir = self.vm_dir(&vm.id);
        let io = |what: &str, e| ControlError::io(format!("{what} {}", dir.display()), e);
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).map_err(|e| io("giving the VMM", e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io("closing", e))?;
        let linked = match image {
            Some(image) => {
                // The image enters the jail as a hard link (the same file, read-only to the VMM).
                let inside = dir.join("image");
                let _ = std::fs::remove_file(&inside);
                if std::fs::hard_link(image, &inside).is_err() {
                    std::fs::copy(image, &inside).map_err(|e| io("copying the image into", e))?;
                }
                Some(inside)
            }
            None => None,
        };
        Ok((uid, linked))
    }

    async fn update_vm(&self, id: &str, mut change: impl FnMut(&mut Vm)) -> Result<Vm, ControlError> {
        self.store
            .update(Table::Vms, id, |vm: &mut Vm| {
                change(vm);
                Ok(())
            })
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("no VM {id}")))
    }

    /// Boots `vm` from its image (it must have no VMM).
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Vm, ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let vm = self.vm(id).await?;
        if vm.state.has_vmm() {
            return Err(ControlError::Conflict(
                format!("VM {} is {:?} already", vm.name, vm.state).to_lowercase(),
            ));
        }
        let image = self.image_path(&vm.image);
        self.launch(vm, Launch::Boot(image)).await
    }

    /// The record of VM `id`.
    pub async fn vm(&self, id: &str) -> Result<Vm, ControlError> {
        self.store
            .get(Table::Vms, id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("no VM {id}")))
    }

    /// Starts the VMM process of `vm` (its directory, console, cgroup and jail made ready);
    /// the child and where its log goes.
    async fn spawn_vmm(&self, vm: &Vm, how: Launch) -> Result<(tokio::process::Child, PathBuf), ControlError> {
        let dir = self.vm_dir(&vm.id);
        std::fs::create_dir_all(&dir).map_err(|e| ControlError::io(format!("creating {}", dir.display()), e))?;
        let sock = self.api_socket(&vm.id);
        let _ = std::fs::remove_file(&sock);
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.console_log(&vm.id))
            .map_err(|e| ControlError::io("opening the console log", e))?;
        let vmm_log_path = dir.join("vmm.log");
        let vmm_log = std::fs::File::create(&vmm_log_path).map_err(|e| ControlError::io("creating the VMM log", e))?;
        let placement = match &self.cgroups {
            Some(cg) => {
                let tenant: Tenant = self
                    .store
                    .get(Table::Tenants, &vm.tenant)
                    .await?
                    .ok_or_else(|| ControlError::NotFound(format!("no tenant {}", vm.tenant)))?;
                let limits = crate::cgroups::Limits {
                    cpu_weight: vm.cpu_weight,
                    cpu_cap_percent: vm.cpu_cap_percent,
                    mem_bytes: (vm.mem_mib << 20) + crate::cgroups::VMM_OVERHEAD_BYTES,
                };
                Some(cg.prepare(&vm.tenant, tenant.cpu_weight, &vm.id, &limits)?)
            }
            None => None,
        };
        let mut cmd = tokio::process::Command::new(&self.config.vmm_binary);
        let how = if self.config.jail {
            let image = match &how {
                Launch::Boot(image) => Some(image.as_path()),
                Launch::Restore(_) | Launch::Receive { .. } => None,
            };
            let (uid, linked) = self.prepare_jail(vm, image).await?;
            cmd.arg("jail")
                .arg("--root")
                .arg(&dir)
                .arg("--uid")
                .arg(uid.to_string())
                .arg("--gid")
                .arg(uid.to_string())
                .arg("--");
            match how {
                Launch::Boot(image) => Launch::Boot(self.vmm_path(&vm.id, &linked.unwrap_or(image))),
                Launch::Restore(dir) => Launch::Restore(self.vmm_path(&vm.id, &dir)),
                Launch::Receive { listen, identity, peer } => Launch::Receive {
                    listen,
                    identity: self.vmm_path(&vm.id, &identity),
                    peer: self.vmm_path(&vm.id, &peer),
                },
            }
        } else {
            how
        };
        let sock_arg = self.vmm_path(&vm.id, &sock);
        // In a cluster the VMM is fenced if this daemon stops renewing it (cluster::keep_fences).
        let mut api_options: Vec<String> = match &self.cluster {
            Some(c) => vec!["--watchdog-ms".into(), c.fence_window().as_millis().to_string()],
            None => Vec::new(),
        };
        // The provider's policy for tenant modules goes with the control socket's options.
        if let Some(policy) = &self.config.ext_policy {
            api_options.extend(["--ext-policy".to_string(), policy.clone()]);
        }
        match &how {
            Launch::Boot(image) => {
                cmd.arg("run")
                    .arg("--vcpus")
                    .arg(vm.vcpus.to_string())
                    .arg("--mem")
                    .arg(format!("{}M", vm.mem_mib))
                    .arg("--api")
                    .arg(&sock_arg)
                    .args(&api_options)
                    .arg(image)
                    .arg("--")
                    .args(&vm.args);
            }
            Launch::Restore(snapshot) => {
                cmd.arg("restore")
                    .arg(snapshot)
                    .arg("--api")
                    .arg(&sock_arg)
                    .args(&api_options);
            }
            Launch::Receive { listen, identity, peer } => {
                cmd.arg("receive")
                    .arg("--listen")
                    .arg(listen)
                    .arg("--identity")
                    .arg(identity)
                    .arg("--peer")
                    .arg(peer)
                    .arg("--api")
                    .arg(&sock_arg)
                    .args(&api_options);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(console)
            .stderr(vmm_log)
            .env("XCLOUD_LOG", "warn")
            .process_group(0);
        if let Some(p) = &placement {
            let fds = p.procs_fds();
            // SAFETY: the hook runs between fork and exec and only calls write(2) on
            // descriptors `placement` keeps open until spawn returns.
            unsafe {
                cmd.pre_exec(move || crate::cgroups::enter(&fds));
            }
        }
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                if let Some(cg) = &self.cgroups {
                    cg.remove(&vm.tenant, &vm.id);
                }
                return Err(ControlError::Vmm(format!(
                    "cannot start the VMM {}: {e}",
                    self.config.vmm_binary.display()
                )));
            }
        };
        drop(placement);
        Ok((child, vmm_log_path))
    }

    async fn launch(self: &Arc<Self>, vm: Vm, how: Launch) -> Result<Vm, ControlError> {
        let sock = self.api_socket(&vm.id);
        let (child, vmm_log_path) = self.spawn_vmm(&vm, how).await?;
        let pid = child.id().unwrap_or(0);
        let vm = self
            .update_vm(&vm.id, |v| {
                v.state = VmState::Starting;
                v.exit = None;
                v.pid = Some(pid);
                v.want = Desired::Running;
                v.restore_from = None;
                v.running_since = Some(now_f64());
            })
            .await?;
        let mut ended = self.watch(vm.id.clone(), vm.tenant.clone(), Some(child), pid);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if *ended.borrow() {
                break;
            }
            if let Ok(status) = ctl(&sock, VmmCommand::Status).await {
                let state = vmm_state(&status).unwrap_or(VmState::Running);
                let vm = self
                    .update_vm(&vm.id, |v| {
                        if v.state == VmState::Starting {
                            v.state = state;
                        }
                    })
                    .await?;
                self.emit(&vm.tenant, "vm.running", &vm.id, None);
                return Ok(vm);
            }
            if tokio::time::Instant::now() > deadline {
                self.kill(&vm.id, pid).await;
                return Err(ControlError::Vmm(format!(
                    "the VMM of {} did not answer within {} s: {}",
                    vm.name,
                    START_TIMEOUT.as_secs(),
                    tail(&vmm_log_path)
                )));
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), ended.changed()).await;
        }
        // It ended before it answered: a guest that ran to its end, or a VMM that refused it.
        let vm = self.vm(&vm.id).await?;
        if vm.state == VmState::Failed {
            return Err(ControlError::Vmm(format!(
                "VM {} did not start: {}",
                vm.name,
                tail(&vmm_log_path)
            )));
        }
        Ok(vm)
    }

    /// Watches VMM `pid` of VM `id` until it ends, then brings the record up to date.
    fn watch(
        self: &Arc<Self>,
        id: String,
        tenant: String,
        child: Option<tokio::process::Child>,
        pid: u32,
    ) -> watch::Receiver<bool> {
        let (ended_tx, ended_rx) = watch::channel(false);
        let stopping = Arc::new(AtomicBool::new(false));
        let handing_off = Arc::new(AtomicBool::new(false));
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id.clone(),
            Runtime {
                pid,
                handing_off: handing_off.clone(),
                stopping: stopping.clone(),
                ended: ended_rx.clone(),
            },
        );
        let daemon = self.clone();
        tokio::spawn(async move {
            let how = match child {
                Some(mut child) => match child.wait().await {
                    Ok(status) => Some(status),
                    Err(e) => {
                        tracing::error!("{id}: waiting for its VMM failed: {e}");
                        None
                    }
                },
                None => {
                    let dir = daemon.vm_dir(&id);
                    while crate::host::process_is(pid, &dir) {
                        tokio::time::sleep(ADOPTED_POLL).await;
                    }
                    None
                }
            };
            let asked = stopping.load(Ordering::SeqCst);
            let (state, exit) = ended_state(how, asked);
            let kind = match state {
                VmState::Stopped => "vm.stopped",
                VmState::Failed => "vm.failed",
                _ => "vm.exited",
            };
            // The record is this VMM's to change only while it names this host and this
            // process: not after the VM migrated away, nor for a VMM that never took over.
            let handed_off = handing_off.load(Ordering::SeqCst);
            let result = daemon
                .update_if(
                    &id,
                    |v| !handed_off && daemon.is_mine(v) && v.pid == Some(pid),
                    |v| {
                        v.state = state;
                        v.exit = Some(exit.clone());
                        close_run(v);
                    },
                )
                .await;
            let recorded = match result {
                Ok(r) => r.is_some(),
                Err(e) => {
                    tracing::warn!("{id}: cannot record the end of its VMM: {e}");
                    false
                }
            };
            {
                let mut running = daemon.running.lock().unwrap_or_else(|p| p.into_inner());
                if running.get(&id).is_some_and(|r| r.pid == pid) {
                    running.remove(&id);
                }
            }
            daemon.incoming.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            if let Some(cg) = &daemon.cgroups {
                cg.remove(&tenant, &id);
            }
            if recorded {
                daemon.emit(&tenant, kind, &id, Some(exit));
            }
            let _ = ended_tx.send(true);
        });
        ended_rx
    }

    fn runtime(&self, id: &str) -> Option<(Arc<AtomicBool>, watch::Receiver<bool>)> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get(id).map(|r| (r.stopping.clone(), r.ended.clone()))
    }

    /// Stops VM `id`'s VMM (through its control socket; killed if it does not end in time).
    pub async fn stop(self: &Arc<Self>, id: &str) -> Result<Vm, ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let vm = self.update_vm(id, |v| v.want = Desired::Stopped).await?;
        if self.runtime(id).is_none() && matches!(vm.state, VmState::Pending | VmState::Lost) {
            // No VMM here to stop: a VM that waits for a host, or whose host is gone.
            return self
                .update_vm(id, |v| {
                    v.state = VmState::Stopped;
                    close_run(v);
                })
                .await;
        }
        self.stop_locked(id).await
    }

    async fn stop_locked(&self, id: &str) -> Result<Vm, ControlError> {
        let vm = self.vm(id).await?;
        let Some((stopping, mut ended)) = self.runtime(id) else {
            return Err(ControlError::Conflict(format!("VM {} is not running", vm.name)));
        };
        // The VMM's CPU seconds are readable only while it lives.
        if let Err(e) = crate::meter::read_one(self, &vm).await {
            tracing::warn!("{id}: metering it before it stops failed: {e}");
        }
        stopping.store(true, Ordering::SeqCst);
        if let Err(e) = ctl(&self.api_socket(id), VmmCommand::Stop).await {
            tracing::warn!("{id}: stop through the control socket failed ({e}); killing its VMM");
            if let Some(pid) = vm.pid {
                self.kill(id, pid).await;
            }
        }
        if tokio::time::timeout(STOP_TIMEOUT, ended.wait_for(|e| *e))
            .await
            .is_err()
        {
            if let Some(pid) = vm.pid {
                self.kill(id, pid).await;
            }
            let _ = tokio::time::timeout(STOP_TIMEOUT, ended.wait_for(|e| *e)).await;
        }
        self.vm(id).await
    }

    async fn kill(&self, id: &str, pid: u32) {
        if pid == 0 || !crate::host::process_is(pid, &self.vm_dir(id)) {
            return;
        }
        // SAFETY: kill sends a signal; the pid was checked to be this VM's VMM just now.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }

    /// Renews the watchdog of VM `id`'s VMM for `window`: whether the watchdog had paused it.
    pub async fn renew_watchdog(&self, id: &str, window: Duration) -> Result<bool, ControlError> {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let answer = ctl_ok(&self.api_socket(id), VmmCommand::Watchdog { ms }).await?;
        Ok(answer.fenced == Some(true))
    }

    /// Resumes VM `id`, which its watchdog paused, if its record still wants it running on this
    /// host (not given away, not paused by its tenant, not leaving).
    pub async fn resume_fenced(&self, id: &str) {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let Ok(vm) = self.vm(id).await else {
            return;
        };
        let ours = self.is_mine(&vm) && vm.want == Desired::Running && vm.state == VmState::Running;
        if !ours || self.is_leaving(id) {
            return;
        }
        let sock = self.api_socket(id);
        if self.cluster.is_none() {
            // Alone nothing can run it elsewhere: no watchdog is needed any more.
            let _ = ctl_ok(&sock, VmmCommand::Watchdog { ms: 0 }).await;
        }
        match ctl_ok(&sock, VmmCommand::Resume).await {
            Ok(_) => tracing::info!("{id}: its watchdog had paused it while this host's daemon was away: resumed"),
            Err(e) => tracing::warn!("{id}: its watchdog paused it, and it cannot be resumed: {e}"),
        }
    }

    /// Pauses or resumes VM `id`.
    pub async fn set_paused(self: &Arc<Self>, id: &str, pause: bool) -> Result<Vm, ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let vm = self.vm(id).await?;
        let (from, to, command, kind) = if pause {
            (VmState::Running, VmState::Paused, VmmCommand::Pause, "vm.paused")
        } else {
            (VmState::Paused, VmState::Running, VmmCommand::Resume, "vm.resumed")
        };
        if vm.state != from {
            return Err(ControlError::Conflict(
                format!("VM {} is {:?}, not {:?}", vm.name, vm.state, from).to_lowercase(),
            ));
        }
        ctl_ok(&self.api_socket(id), command).await?;
        let vm = self.update_vm(id, |v| v.state = to).await?;
        self.emit(&vm.tenant, kind, &vm.id, None);
        Ok(vm)
    }

    /// Takes a snapshot of VM `id` (running or paused; a running one is paused for it).
    pub async fn snapshot(self: &Arc<Self>, id: &str) -> Result<Snapshot, ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let vm = self.vm(id).await?;
        if !matches!(vm.state, VmState::Running | VmState::Paused) {
            return Err(ControlError::Conflict(format!(
                "VM {} has no running VMM to snapshot",
                vm.name
            )));
        }
        let snap_id = format!("snap-{}", auth::hex(&auth::random_bytes::<6>()?));
        let dir = self.snapshot_dir(id, &snap_id);
        let inside = self.vmm_path(id, &dir);
        let answer = match ctl_ok(&self.api_socket(id), VmmCommand::Snapshot { dir: inside }).await {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // Its digests, for the copies other hosts will take of it.
        let described = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || crate::snapshot_files::describe(&dir))
                .await
                .map_err(|e| ControlError::Vmm(format!("describing snapshot {snap_id}: {e}")))
                .and_then(|r| r)
        };
        let files = match described {
            Ok(files) => files,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let snapshot = Snapshot {
            id: snap_id.clone(),
            vm: vm.id.clone(),
            tenant: vm.tenant.clone(),
            bytes: answer.snapshot_bytes.unwrap_or(0),
            created: now(),
            host: Some(self.config.host_name.clone()),
            files,
            copies: Vec::new(),
            copy_to: Vec::new(),
        };
        self.store.put(Table::Snapshots, &snap_id, &snapshot).await?;
        self.emit(&vm.tenant, "snapshot.created", &snap_id, Some(vm.id.clone()));
        Ok(snapshot)
    }

    /// Runs VM `id` from snapshot `snap` (stopping the VMM it has first).
    pub async fn restore(self: &Arc<Self>, id: &str, snap: &Snapshot) -> Result<Vm, ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        if self.runtime(id).is_some() {
            self.stop_locked(id).await?;
        }
        let vm = self.vm(id).await?;
        self.launch(vm, Launch::Restore(self.snapshot_dir(id, &snap.id))).await
    }

    /// Deletes VM `id`: stops its VMM, removes its files, its snapshots and its record.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), ControlError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        if self.runtime(id).is_some() {
            self.stop_locked(id).await?;
        }
        let vm = self.vm(id).await?;
        if let Err(e) = crate::meter::last_reading(self, &vm).await {
            tracing::warn!("{id}: metering its last seconds failed: {e}");
        }
        for snap in self.store.list::<Snapshot>(Table::Snapshots).await? {
            if snap.vm == vm.id {
                self.store.delete(Table::Snapshots, &snap.id).await?;
            }
        }
        let _ = std::fs::remove_dir_all(self.vm_dir(id));
        {
            let _records = self.lock_records().await?;
            self.store.delete(Table::Vms, id).await?;
        }
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.emit(&vm.tenant, "vm.deleted", &vm.id, None);
        Ok(())
    }

    /// The cgroup directories of `vm`'s VMM.
    pub fn cgroup_dirs(&self, vm: &Vm) -> Vec<PathBuf> {
        self.cgroups
            .as_ref()
            .map(|c| c.dirs(&vm.tenant, &vm.id))
            .unwrap_or_default()
    }

    /// The images of `tenant`.
    pub async fn images_of(&self, tenant: &str) -> Result<Vec<Image>, ControlError> {
        Ok(self
            .store
            .list::<Image>(Table::Images)
            .await?
            .into_iter()
            .filter(|i| i.tenant == tenant)
            .collect())
    }
}

/// [`Daemon::vmm_status`].
pub struct VmmStatus {
    /// The outgoing live migration under way.
    pub migration: Option<crate::model::MigrationPhase>,
    /// The guest's last load figure and how long ago it came.
    pub guest_load: Option<(f64, std::time::Duration)>,
}

/// The VMM's answer to `command` on `sock` (the client is blocking: it runs off the runtime).
pub(crate) async fn ctl(sock: &Path, command: VmmCommand) -> Result<VmmResponse, ControlError> {
    let sock = sock.to_path_buf();
    tokio::task::spawn_blocking(move || xcloud_api::client::call(&sock, command))
        .await
        .map_err(|e| ControlError::Vmm(format!("the control call failed: {e}")))?
        .map_err(|e| ControlError::Vmm(e.to_string()))
}

/// As [`ctl`], and an answer that says the command failed is an error.
pub(crate) async fn ctl_ok(sock: &Path, command: VmmCommand) -> Result<VmmResponse, ControlError> {
    let answer = ctl(sock, command).await?;
    if answer.ok {
        Ok(answer)
    } else {
        Err(ControlError::Vmm(format!(
            "the VMM refused: {}",
            answer.error.unwrap_or_else(|| "no reason given".into())
        )))
    }
}

fn vmm_state(status: &VmmResponse) -> Option<VmState> {
    match status.state.as_deref()? {
        "paused" => Some(VmState::Paused),
        "running" | "created" => Some(VmState::Running),
        _ => None,
    }
}

/// Ends the metering of the current run.
fn close_run(vm: &mut Vm) {
    vm.run_seconds = vm.run_seconds_now();
    vm.running_since = None;
    vm.pid = None;
}

/// What a VMM's end means for its VM (`xcloud run`'s exit statuses: README).
fn ended_state(status: Option<std::process::ExitStatus>, asked_to_stop: bool) -> (VmState, String) {
    use std::os::unix::process::ExitStatusExt;
    let code = status.and_then(|s| s.code());
    if asked_to_stop {
        return (VmState::Stopped, "stopped on request".into());
    }
    match (code, status.and_then(|s| s.signal())) {
        (Some(0), _) => (VmState::Exited, "the guest ended, exit status 0".into()),
        (Some(101), _) => (VmState::Failed, "the guest panicked, exit status 101".into()),
        (Some(125), _) => (VmState::Failed, "the guest crashed, exit status 125".into()),
        (Some(130), _) => (VmState::Stopped, "stopped by a signal, exit status 130".into()),
        (Some(1), _) => (VmState::Failed, "the VMM could not run the guest, exit status 1".into()),
        (Some(c), _) => (VmState::Exited, format!("the guest ended, exit status {c}")),
        (None, Some(libc::SIGSYS)) => (
            VmState::Failed,
            format!(
                "the VMM was killed by signal {} (SIGSYS: a system call outside its seccomp filter)",
                libc::SIGSYS
            ),
        ),
        (None, Some(sig)) => (VmState::Failed, format!("the VMM was killed by signal {sig}")),
        (None, None) => (VmState::Exited, "its VMM ended".into()),
    }
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(3);
    let joined = lines[start..].join(" / ");
    if joined.is_empty() {
        "its log is empty".into()
    } else {
        joined
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_vmm_end_is_read_by_its_status() {
        let st = |raw| Some(std::process::ExitStatus::from_raw(raw));
        assert_eq!(ended_state(st(0), false).0, VmState::Exited);
        assert_eq!(ended_state(st(101 << 8), false).0, VmState::Failed);
        assert_eq!(ended_state(st(1 << 8), false).0, VmState::Failed);
        assert_eq!(ended_state(st(9), false).0, VmState::Failed);
        assert_eq!(ended_state(st(9), true).0, VmState::Stopped);
        assert_eq!(ended_state(st(130 << 8), false).0, VmState::Stopped);
    }
}
