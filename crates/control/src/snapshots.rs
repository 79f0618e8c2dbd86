//! Copies of snapshots on other hosts (docs/cloud-api.md, "Snapshot copies"): in a cluster no
//! host holds the only copy of a snapshot, so a VM whose host is lost starts again from its
//! latest snapshot rather than from its image.
//!
//! - A snapshot's record lists its files with their sizes and SHA-256 digests.
//! - The scheduler asks hosts to take copies (`copy_to`) until enough hosts that are up hold
//!   one or are asked to: a host of another provider first, then of another region, then the
//!   cheapest.
//! - Each host fetches what it is asked for from a host that holds it, checks every byte
//!   against the digests, moves the copy into place in one rename and adds itself to
//!   `copies`. A host that starts a VM from a snapshot it has no copy of fetches one first.
//! - Each host removes the snapshots whose record is gone.

use crate::client::{Client, Endpoint};
use crate::model::{HostRecord, Snapshot, SnapshotFile, Vm, SNAPSHOT_FILES};
use crate::snapshot_files::Arriving;
use crate::store::Table;
use crate::{ControlError, Daemon};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What copying needs of the cluster: the hosts that are up, and the key hosts call each
/// other with.
#[derive(Clone)]
pub struct Peers {
    /// The hosts registered now.
    pub hosts: Vec<HostRecord>,
    /// The hosts' own key.
    pub key: String,
}

impl Peers {
    fn client(&self, host: &HostRecord) -> Result<Client, ControlError> {
        Ok(Client::at(Endpoint::of_host(host)?, Some(self.key.clone())))
    }
}

/// The snapshots a host is copying to itself now.
#[derive(Default)]
pub struct Copying(Mutex<HashSet<String>>);

impl Copying {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How many hosts that are up should hold each snapshot, unless the daemon is told otherwise.
pub const DEFAULT_HOLDERS: usize = 2;

/// A copy must arrive at least this fast (bytes per second), after [`COPY_SLACK`].
const MIN_COPY_RATE: u64 = 4 << 20;
/// What a copy of any size may take beyond its size at [`MIN_COPY_RATE`].
const COPY_SLACK: Duration = Duration::from_secs(60);

/// The name of the directory a copy is written in before it takes its place.
fn partial_name(id: &str) -> String {
    format!(".{id}.copy")
}

/// For each snapshot whose hosts should change, the hosts to ask for a copy now: those asked
/// before that are up and have no copy yet, and as many more as it takes for `wanted` hosts
/// that are up to hold it or be asked to (fewer when there are not so many hosts).
pub fn plan_copies(snaps: &[Snapshot], hosts: &[HostRecord], wanted: usize) -> Vec<(String, Vec<String>)> {
    let up = |name: &str| hosts.iter().find(|h| h.name == name);
    let mut plan = Vec::new();
    for snap in snaps {
        // A record of an xcloudd before copies has no digests to check a copy against.
        if snap.files.is_empty() {
            continue;
        }
        let holders: Vec<&HostRecord> = snap.holders().filter_map(up).collect();
        if holders.is_empty() {
            continue;
        }
        let mut asked: Vec<&HostRecord> = snap
            .copy_to
            .iter()
            .filter(|h| !snap.holders().any(|held| held == h.as_str()))
            .filter_map(|h| up(h))
            .collect();
        let mut candidates: Vec<&HostRecord> = hosts
            .iter()
            .filter(|h| !snap.holders().any(|held| held == h.name) && !asked.iter().any(|a| a.name == h.name))
            .collect();
        // One at a time, so that each choice sees the providers and regions of those before.
        while holders.len() + asked.len() < wanted && !candidates.is_empty() {
            let chosen: Vec<&HostRecord> = holders.iter().chain(&asked).copied().collect();
            let key = |h: &HostRecord| {
                (
                    h.state != "up",
                    chosen.iter().any(|c| c.provider == h.provider),
                    chosen.iter().any(|c| c.region == h.region),
                )
            };
            candidates.sort_by(|a, b| {
                key(a)
                    .cmp(&key(b))
                    .then(a.price_per_hour.total_cmp(&b.price_per_hour))
                    .then(a.name.cmp(&b.name))
            });
            asked.push(candidates.remove(0));
        }
        let copy_to: Vec<String> = asked.iter().map(|h| h.name.clone()).collect();
        if copy_to != snap.copy_to {
            plan.push((snap.id.clone(), copy_to));
        }
    }
    plan
}

/// The scheduler's part: asks hosts for the copies that [`plan_copies`] wants.
pub async fn ask_for_copies(daemon: &Daemon, hosts: &[HostRecord], wanted: usize) -> Result<(), ControlError> {
    let snaps: Vec<Snapshot> = daemon.store.list(Table::Snapshots).await?;
    for (id, copy_to) in plan_copies(&snaps, hosts, wanted) {
        daemon
            .store
            .update(Table::Snapshots, &id, |s: &mut Snapshot| {
                s.copy_to = copy_to.clone();
                Ok(())
            })
            .await?;
    }
    Ok(())
}

/// A host's part: the snapshots this host is asked to copy that it is not copying now.
pub async fn newly_asked(daemon: &Daemon, copying: &Copying) -> Result<Vec<Snapshot>, ControlError> {
    let me = &daemon.config.host_name;
    let snaps: Vec<Snapshot> = daemon.store.list(Table::Snapshots).await?;
    let busy = copying.set();
    Ok(snaps
        .into_iter()
        .filter(|s| s.copy_to.contains(me) && !s.holders().any(|h| h == me) && !busy.contains(&s.id))
        .collect())
}

/// Fetches each of `snaps` here in the background, each once at a time.
pub fn copy_in_background(daemon: &Arc<Daemon>, peers: Peers, copying: &Arc<Copying>, snaps: Vec<Snapshot>) {
    for snap in snaps {
        if !copying.set().insert(snap.id.clone()) {
            continue;
        }
        let (daemon, peers, copying) = (daemon.clone(), peers.clone(), copying.clone());
        tokio::spawn(async move {
            if let Err(e) = fetch(&daemon, &peers, &snap).await {
                tracing::warn!("cluster: copying snapshot {} here failed: {e}", snap.id);
            }
            copying.set().remove(&snap.id);
        });
    }
}

/// Makes sure this host holds snapshot `snap`: fetches a checked copy from a host that is up
/// and holds it, unless this host has it already, and says so in its record.
pub async fn fetch(daemon: &Daemon, peers: &Peers, snap: &Snapshot) -> Result<(), ControlError> {
    let dir = daemon.snapshot_dir(&snap.vm, &snap.id);
    let me = daemon.config.host_name.clone();
    if !dir.is_dir() {
        if snap.files.is_empty() {
            return Err(ControlError::Conflict(format!(
                "snapshot {} has no digests of its files (an older xcloudd took it): it cannot be copied",
                snap.id
            )));
        }
        let mut why = Vec::new();
        let mut fetched = false;
        for holder in snap.holders().filter(|h| *h != me) {
            let Some(host) = peers.hosts.iter().find(|h| h.name == holder) else {
                why.push(format!("{holder} is not up"));
                continue;
            };
            match fetch_from(peers, host, snap, &dir).await {
                Ok(()) => {
                    fetched = true;
                    break;
                }
                Err(e) => why.push(format!("{holder}: {e}")),
            }
        }
        if !fetched {
            return Err(ControlError::Cluster(format!(
                "no host could give snapshot {}: {}",
                snap.id,
                if why.is_empty() {
                    "no other host holds it".to_string()
                } else {
                    why.join("; ")
                }
            )));
        }
        tracing::info!("cluster: snapshot {} copied here", snap.id);
    }
    if snap.holders().any(|h| h == me) {
        return Ok(());
    }
    let recorded = daemon
        .store
        .update(Table::Snapshots, &snap.id, |s: &mut Snapshot| {
            if !s.holders().any(|h| h == me) {
                s.copies.push(me.clone());
            }
            s.copy_to.retain(|h| *h != me);
            Ok(())
        })
        .await?;
    if recorded.is_none() {
        // Deleted meanwhile.
        let _ = std::fs::remove_dir_all(&dir);
        return Err(ControlError::NotFound(format!("snapshot {} was deleted", snap.id)));
    }
    daemon.emit(&snap.tenant, "snapshot.copied", &snap.id, Some(me));
    Ok(())
}

/// Fetches every file of `snap` from `host` into a directory beside `dir` that takes `dir`'s
/// place once all of it is checked; removes what it wrote when it fails.
async fn fetch_from(peers: &Peers, host: &HostRecord, snap: &Snapshot, dir: &Path) -> Result<(), ControlError> {
    let parent = dir
        .parent()
        .ok_or_else(|| ControlError::Cluster(format!("{} has no parent directory", dir.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| ControlError::io(format!("making {}", parent.display()), e))?;
    let partial = parent.join(partial_name(&snap.id));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir(&partial).map_err(|e| ControlError::io(format!("making {}", partial.display()), e))?;
    let result = async {
        for file in &snap.files {
            fetch_file(peers, host, snap, file, &partial.join(&file.name)).await?;
        }
        std::fs::rename(&partial, dir)
            .map_err(|e| ControlError::io(format!("moving the copy to {}", dir.display()), e))?;
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| ControlError::io(format!("syncing {}", parent.display()), e))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    result
}

/// Fetches one file of `snap` from `host` to `path`, checking its size and digest, within a
/// time its size allows.
async fn fetch_file(
    peers: &Peers,
    host: &HostRecord,
    snap: &Snapshot,
    file: &SnapshotFile,
    path: &Path,
) -> Result<(), ControlError> {
    if !SNAPSHOT_FILES.contains(&file.name.as_str()) {
        return Err(ControlError::Cluster(format!("a snapshot has no file {:?}", file.name)));
    }
    let out = std::fs::File::create(path).map_err(|e| ControlError::io(format!("making {}", path.display()), e))?;
    let client = peers.client(host)?;
    let route = format!("/v1/vms/{}/snapshots/{}/files/{}", snap.vm, snap.id, file.name);
    let mut arriving = Arriving::new(file, out);
    let mut failure = None;
    let allowed = COPY_SLACK + Duration::from_secs(file.bytes / MIN_COPY_RATE);
    let sent = tokio::time::timeout(
        allowed,
        client.send("GET", &route, &[], None, |chunk| match arriving.take(chunk) {
            Ok(()) => true,
            Err(why) => {
                failure = Some(why);
                false
            }
        }),
    )
    .await;
    let fail = |why: String| Err(ControlError::Cluster(why));
    match sent {
        Err(_) => return fail(format!("{} did not arrive within {} s", file.name, allowed.as_secs())),
        Ok(Err(e)) => return fail(e.to_string()),
        Ok(Ok((status, _))) if status != 200 => return fail(format!("it answered {status} for {}", file.name)),
        Ok(Ok(_)) => {}
    }
    if let Some(why) = failure {
        return fail(why);
    }
    arriving
        .finish()
        .map_err(ControlError::Cluster)?
        .sync_all()
        .map_err(|e| ControlError::io(format!("syncing {}", path.display()), e))
}

/// Removes the snapshots on this host whose record is gone, the copies that broke off, and
/// the directories of VMs that are gone that held nothing else.
pub async fn collect_garbage(daemon: &Daemon, copying: &Copying) -> Result<(), ControlError> {
    let Ok(entries) = std::fs::read_dir(daemon.config.data_dir.join("vms")) else {
        return Ok(());
    };
    for vm_dir in entries.flatten() {
        let vm = vm_dir.file_name().to_string_lossy().into_owned();
        // A snapshot being taken has its files before its record: skip a VM that is busy.
        let lock = daemon.op_lock(&vm);
        let Ok(_op) = lock.try_lock() else {
            continue;
        };
        let snaps: HashSet<String> = daemon
            .store
            .list::<Snapshot>(Table::Snapshots)
            .await?
            .into_iter()
            .filter(|s| s.vm == vm)
            .map(|s| s.id)
            .collect();
        let snapshots = vm_dir.path().join("snapshots");
        for entry in std::fs::read_dir(&snapshots).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = match name.strip_prefix('.').and_then(|n| n.strip_suffix(".copy")) {
                Some(id) => !copying.set().contains(id),
                None if name.starts_with("snap-") => !snaps.contains(&name),
                // The VMM's own partial snapshots and anything else are not the daemon's.
                None => false,
            };
            if orphan {
                tracing::info!(
                    "cluster: removing {} (its snapshot's record is gone)",
                    entry.path().display()
                );
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        // The directory of a VM that is gone, which only held copies of its snapshots.
        let gone = daemon.store.get::<Vm>(Table::Vms, &vm).await?.is_none() && !daemon.running_ids().contains(&vm);
        let only_empty_snapshots = std::fs::read_dir(vm_dir.path()).is_ok_and(|mut e| {
            e.all(|x| x.is_ok_and(|x| x.file_name() == "snapshots"))
                && std::fs::read_dir(&snapshots).is_ok_and(|mut s| s.next().is_none())
        });
        if gone && only_empty_snapshots {
            let _ = std::fs::remove_dir_all(vm_dir.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, provider: &str, region: &str, price: f64) -> HostRecord {
        HostRecord {
            name: name.into(),
            provider: provider.into(),
            region: region.into(),
            price_per_hour: price,
            cpus: 2,
            mem_mib: 1024,
            api: "127.0.0.1:1".into(),
            cert: String::new(),
            since: 0,
            state: "up".into(),
        }
    }

    fn snap(host: &str, copies: &[&str], copy_to: &[&str]) -> Snapshot {
        Snapshot {
            id: "snap-1".into(),
            vm: "vm-1".into(),
            tenant: "t".into(),
            bytes: 1,
            created: 0,
            host: Some(host.into()),
            files: vec![SnapshotFile {
                name: "vm.state".into(),
                bytes: 1,
                sha256: "0".repeat(64),
            }],
            copies: copies.iter().map(|s| s.to_string()).collect(),
            copy_to: copy_to.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn asked(plan: &[(String, Vec<String>)]) -> Vec<String> {
        plan.first().map(|(_, to)| to.clone()).unwrap_or_default()
    }

    #[test]
    fn a_copy_goes_to_another_provider_first_then_another_region_then_the_cheapest() {
        let hosts = [
            host("a1", "alpha", "eu", 0.01),
            host("a2", "alpha", "us", 0.02),
            host("b1", "beta", "eu", 0.09),
            host("b2", "beta", "eu", 0.05),
        ];
        let plan = plan_copies(&[snap("a1", &[], &[])], &hosts, 2);
        assert_eq!(asked(&plan), ["b2"], "another provider, its cheapest host");
        let plan = plan_copies(&[snap("a1", &[], &[])], &hosts, 3);
        assert_eq!(asked(&plan), ["b2", "a2"]);
        let only_alpha = [hosts[0].clone(), hosts[1].clone()];
        assert_eq!(asked(&plan_copies(&[snap("a1", &[], &[])], &only_alpha, 2)), ["a2"]);
    }

    #[test]
    fn enough_holders_need_nothing_and_lost_ones_are_replaced() {
        let hosts = [
            host("a1", "alpha", "eu", 0.01),
            host("b1", "beta", "eu", 0.05),
            host("c1", "gamma", "eu", 0.07),
        ];
        assert!(plan_copies(&[snap("a1", &["b1"], &[])], &hosts, 2).is_empty());
        assert!(
            plan_copies(&[snap("a1", &[], &["b1"])], &hosts, 2).is_empty(),
            "asked already"
        );
        // The original's host is gone: the copy on b1 is copied on.
        let without_a1 = [hosts[1].clone(), hosts[2].clone()];
        assert_eq!(asked(&plan_copies(&[snap("a1", &["b1"], &[])], &without_a1, 2)), ["c1"]);
        // A host asked that went away is asked no more.
        let without_b1 = [hosts[0].clone(), hosts[2].clone()];
        assert_eq!(asked(&plan_copies(&[snap("a1", &[], &["b1"])], &without_b1, 2)), ["c1"]);
        // No holder up: nothing to copy from.
        assert!(plan_copies(&[snap("zz", &[], &[])], &hosts, 2).is_empty());
        // Alone in the cluster: nobody to ask.
        assert!(plan_copies(&[snap("a1", &[], &[])], &hosts[..1], 2).is_empty());
    }

    #[test]
    fn a_snapshot_without_digests_is_not_copied() {
        let hosts = [host("a1", "alpha", "eu", 0.01), host("b1", "beta", "eu", 0.05)];
        let mut old = snap("a1", &[], &[]);
        old.files.clear();
        assert!(plan_copies(&[old], &hosts, 2).is_empty());
    }
}
