//! The provider's metering module: a built-in extension (docs/extensions.md) that exports what
//! the VM's devices moved — frames and bytes per NIC, requests and bytes per disk, and what
//! tenant modules dropped or refused — and the snapshots and migrations the VM went through,
//! for the provider's accounting. It is installed in every VM as a provider module, so a
//! tenant can read it with `ext ls` but never remove or replace it; it takes the metrics and
//! phase hooks only, and costs the data path nothing.

use crate::extension::{Extension, HookError, Phase, PhaseEvent};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use xcloud_devices::virtio::block::BlockDevice;
use xcloud_devices::virtio::net::NetDevice;

/// The module's name in every VM.
pub const NAME: &str = "meter";

/// Reads the devices' counters. It holds them weakly: the devices hold the registry the
/// meter is in (their hooks), and a strong cycle would keep a disk open after its VM.
pub struct DeviceMeter {
    nics: Vec<Weak<NetDevice>>,
    disks: Vec<Weak<BlockDevice>>,
    snapshots: AtomicU64,
    migrations: AtomicU64,
    failed_migrations: AtomicU64,
    precopy_rounds: AtomicU64,
}

impl DeviceMeter {
    /// The meter of these devices.
    pub fn new(nics: &[Arc<NetDevice>], disks: &[Arc<BlockDevice>]) -> Self {
        Self {
            nics: nics.iter().map(Arc::downgrade).collect(),
            disks: disks.iter().map(Arc::downgrade).collect(),
            snapshots: AtomicU64::new(0),
            migrations: AtomicU64::new(0),
            failed_migrations: AtomicU64::new(0),
            precopy_rounds: AtomicU64::new(0),
        }
    }
}

impl Extension for DeviceMeter {
    fn takes_phases(&self) -> bool {
        true
    }

    fn phase(&self, event: &PhaseEvent) -> Result<(), HookError> {
        let counter = match event.phase {
            Phase::Snapshot => &self.snapshots,
            Phase::Migrated => &self.migrations,
            Phase::MigrationFailed => &self.failed_migrations,
            Phase::PreCopy => &self.precopy_rounds,
            _ => return Ok(()),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn metrics(&self) -> Vec<(String, f64)> {
        let mut figures = vec![
            ("snapshots".to_string(), self.snapshots.load(Ordering::Relaxed) as f64),
            ("migrations".to_string(), self.migrations.load(Ordering::Relaxed) as f64),
            (
                "failed_migrations".to_string(),
                self.failed_migrations.load(Ordering::Relaxed) as f64,
            ),
            (
                "precopy_rounds".to_string(),
                self.precopy_rounds.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (i, nic) in self.nics.iter().enumerate() {
            let Some(nic) = nic.upgrade() else { continue };
            let s = nic.stats();
            figures.push((format!("net{i}_rx_frames"), s.rx_frames.load(Ordering::Relaxed) as f64));
            figures.push((format!("net{i}_tx_frames"), s.tx_frames.load(Ordering::Relaxed) as f64));
            figures.push((
                format!("net{i}_dropped"),
                s.dropped_frames.load(Ordering::Relaxed) as f64,
            ));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let Some(disk) = disk.upgrade() else { continue };
            let s = disk.stats();
            figures.push((format!("disk{i}_requests"), s.requests.load(Ordering::Relaxed) as f64));
            figures.push((
                format!("disk{i}_read_bytes"),
                s.read_bytes.load(Ordering::Relaxed) as f64,
            ));
            figures.push((
                format!("disk{i}_written_bytes"),
                s.written_bytes.load(Ordering::Relaxed) as f64,
            ));
            figures.push((format!("disk{i}_refused"), s.refused.load(Ordering::Relaxed) as f64));
        }
        figures
    }
}
