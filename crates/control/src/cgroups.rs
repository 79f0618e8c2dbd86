//! The provider's resource module: every VMM in a cgroup of its own, under its tenant's, with
//! a CPU weight, an optional CPU cap and a memory limit (cgroup v2 where the cpu and memory
//! controllers are there, v1 otherwise). Tenants choose their VMs' weights, which divide
//! their tenant's share; the tenant's weight and every cap are the provider's.
//!
//! ```text
//! <daemon's cgroup>/xcloud-<data dir hash>/<tenant>/<vm id>      (v1: under cpu/ and memory/)
//! ```
//!
//! A VMM enters its cgroup before it runs a single instruction of its own: the daemon opens
//! the cgroup's `cgroup.procs` and the child writes "0" (itself) into it between fork and exec.

use crate::ControlError;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The CFS period a cap is expressed in (100 ms, the kernel's default).
const PERIOD_US: u64 = 100_000;
/// What a VMM may hold beyond its guest's memory (its own code, heap, queues, buffers).
pub const VMM_OVERHEAD_BYTES: u64 = 64 << 20;

/// What one VMM may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Relative CPU weight (1-10000; 100 is the default).
    pub cpu_weight: u32,
    /// At most this many percent of one CPU (100 = one whole CPU), if capped.
    pub cpu_cap_percent: Option<u32>,
    /// Memory, guest and VMM together.
    pub mem_bytes: u64,
}

#[derive(Debug)]
enum Hierarchy {
    /// One tree with both controllers: the directory xcloud's cgroups go under.
    V2(PathBuf),
    /// The cpu and memory trees: the directories xcloud's cgroups go under in each.
    V1 { cpu: PathBuf, memory: PathBuf },
}

/// Where this daemon's cgroups are.
#[derive(Debug)]
pub struct Cgroups {
    hierarchy: Hierarchy,
}

/// A VM's cgroup, ready for its VMM to enter.
pub struct Placement {
    procs: Vec<OwnedFd>,
}

impl Placement {
    /// The descriptors of the `cgroup.procs` files the child writes itself into.
    pub fn procs_fds(&self) -> Vec<i32> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// The cgroup this process is in for `controller` ("" for v2), from /proc/self/cgroup.
fn own_cgroup(controller: &str) -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let matches = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        if matches {
            return path.trim_start_matches('/').to_string();
        }
    }
    String::new()
}

fn write(path: &Path, value: &str) -> Result<(), ControlError> {
    std::fs::write(path, value).map_err(|e| ControlError::io(format!("writing {value:?} to {}", path.display()), e))
}

fn mkdir(path: &Path) -> Result<(), ControlError> {
    std::fs::create_dir_all(path).map_err(|e| ControlError::io(format!("creating cgroup {}", path.display()), e))
}

impl Cgroups {
    /// Finds the cgroup hierarchy under `/sys/fs/cgroup`, None where neither version has the
    /// cpu and memory controllers (the daemon then says so and runs VMMs without limits).
    /// `name` tells apart the cgroups of daemons on different data directories.
    pub fn detect(name: &str) -> Option<Self> {
        Self::detect_at(Path::new("/sys/fs/cgroup"), name)
    }

    fn detect_at(root: &Path, name: &str) -> Option<Self> {
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("cpu") && has("memory") {
            // Under the root: a v2 cgroup with processes cannot also hand controllers down.
            let dir = root.join(name);
            let enable = |d: &Path| std::fs::write(d.join("cgroup.subtree_control"), "+cpu +memory");
            if enable(root).is_err() || mkdir(&dir).is_err() || enable(&dir).is_err() {
                return None;
            }
            return Some(Self {
                hierarchy: Hierarchy::V2(dir),
            });
        }
        let cpu = root.join("cpu");
        let memory = root.join("memory");
        if cpu.join("cpu.shares").exists() && memory.join("memory.limit_in_bytes").exists() {
            let cpu = cpu.join(own_cgroup("cpu")).join(name);
            let memory = memory.join(own_cgroup("memory")).join(name);
            if mkdir(&cpu).is_err() || mkdir(&memory).is_err() {
                return None;
            }
            return Some(Self {
                hierarchy: Hierarchy::V1 { cpu, memory },
            });
        }
        None
    }

    /// Which version this is, for the log and the host's description.
    pub fn describe(&self) -> String {
        match &self.hierarchy {
            Hierarchy::V2(d) => format!("cgroup v2 at {}", d.display()),
            Hierarchy::V1 { cpu, memory } => format!("cgroup v1 at {} and {}", cpu.display(), memory.display()),
        }
    }

    /// Makes (or updates) the cgroup of `vm` under `tenant`'s, with its limits and the
    /// tenant's weight, and opens it for the VMM to enter.
    pub fn prepare(
        &self,
        tenant: &str,
        tenant_weight: u32,
        vm: &str,
        limits: &Limits,
    ) -> Result<Placement, ControlError> {
        let open = |dir: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map(OwnedFd::from)
                .map_err(|e| ControlError::io(format!("opening {}/cgroup.procs", dir.display()), e))
        };
        let cap = |percent: Option<u32>| match percent {
            Some(p) => (PERIOD_US * u64::from(p.max(1)) / 100).max(1000),
            None => 0,
        };
        match &self.hierarchy {
            Hierarchy::V2(base) => {
                let t = base.join(tenant);
                mkdir(&t)?;
                write(&t.join("cgroup.subtree_control"), "+cpu +memory")?;
                write(&t.join("cpu.weight"), &tenant_weight.clamp(1, 10_000).to_string())?;
                let v = t.join(vm);
                mkdir(&v)?;
                write(&v.join("cpu.weight"), &limits.cpu_weight.clamp(1, 10_000).to_string())?;
                let max = match limits.cpu_cap_percent {
                    Some(p) => format!("{} {PERIOD_US}", cap(Some(p))),
                    None => format!("max {PERIOD_US}"),
                };
                write(&v.join("cpu.max"), &max)?;
                write(&v.join("memory.max"), &limits.mem_bytes.to_string())?;
                Ok(Placement { procs: vec![open(&v)?] })
            }
            Hierarchy::V1 { cpu, memory } => {
                // cpu.shares: 1024 is weight 100.
                let shares = |w: u32| (u64::from(w.clamp(1, 10_000)) * 1024 / 100).max(2).to_string();
                let t = cpu.join(tenant);
                mkdir(&t)?;
                write(&t.join("cpu.shares"), &shares(tenant_weight))?;
                let v = t.join(vm);
                mkdir(&v)?;
                write(&v.join("cpu.shares"), &shares(limits.cpu_weight))?;
                write(&v.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                let quota = match limits.cpu_cap_percent {
                    Some(p) => cap(Some(p)).to_string(),
                    None => "-1".into(),
                };
                write(&v.join("cpu.cfs_quota_us"), &quota)?;
                let m = memory.join(tenant).join(vm);
                mkdir(&m)?;
                write(&m.join("memory.limit_in_bytes"), &limits.mem_bytes.to_string())?;
                Ok(Placement {
                    procs: vec![open(&v)?, open(&m)?],
                })
            }
        }
    }

    /// The directories of `vm`'s cgroup (one per hierarchy).
    pub fn dirs(&self, tenant: &str, vm: &str) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V2(base) => vec![base.join(tenant).join(vm)],
            Hierarchy::V1 { cpu, memory } => vec![cpu.join(tenant).join(vm), memory.join(tenant).join(vm)],
        }
    }

    /// Removes `vm`'s cgroup once its VMM has ended (a cgroup with a process stays).
    pub fn remove(&self, tenant: &str, vm: &str) {
        for dir in self.dirs(tenant, vm) {
            let _ = std::fs::remove_dir(&dir);
            // The tenant's cgroup goes with its last VMM (it is made again with the next).
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// Moves the calling process into the cgroups behind `fds`. Runs in the child between fork
/// and exec, so it only writes to descriptors opened before the fork.
pub fn enter(fds: &[i32]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: write(2) of a two-byte static buffer to a descriptor the parent opened and
        // keeps open until the child has been spawned; async-signal-safe.
        let n = unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_hierarchy_gets_weights_caps_and_limits() {
        let root = std::env::temp_dir().join(format!("xcloud-cgroups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (dir, file) in [("cpu", "cpu.shares"), ("memory", "memory.limit_in_bytes")] {
            std::fs::create_dir_all(root.join(dir)).expect("mkdir");
            std::fs::write(root.join(dir).join(file), "0").expect("write");
        }
        let cg = Cgroups::detect_at(&root, "xcloud-test").expect("a v1 tree");
        // A plain directory stands in for cgroupfs: the files the kernel would make are made.
        let own = |c| root.join(c).join(own_cgroup(c)).join("xcloud-test");
        for d in [own("cpu").join("acme/vm-1"), own("memory").join("acme/vm-1")] {
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("cgroup.procs"), "").expect("procs");
        }
        let limits = Limits {
            cpu_weight: 300,
            cpu_cap_percent: Some(25),
            mem_bytes: 128 << 20,
        };
        let placement = cg.prepare("acme", 100, "vm-1", &limits).expect("prepare");
        assert_eq!(placement.procs_fds().len(), 2);
        let read = |p: PathBuf| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(own("cpu").join("acme/cpu.shares")), "1024");
        assert_eq!(read(own("cpu").join("acme/vm-1/cpu.shares")), "3072");
        assert_eq!(read(own("cpu").join("acme/vm-1/cpu.cfs_quota_us")), "25000");
        assert_eq!(
            read(own("memory").join("acme/vm-1/memory.limit_in_bytes")),
            (128u64 << 20).to_string()
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
