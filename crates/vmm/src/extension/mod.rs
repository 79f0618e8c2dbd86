//! The module interface (docs/extensions.md): the hook points an extension of the VMM may
//! take, and the registry that runs the VM's modules within their budgets.
//!
//! A module is a Rust value behind [`Extension`]: compiled in by the provider (immutable for
//! the tenant) or loaded while the VM runs (a tenant's WebAssembly module, `xcloud-extensions`).
//! Every hook call goes through the registry, which times it and counts it; a hook that fails
//! (a trap, its fuel spent, an answer that means nothing, more time than its budget) disables
//! its module, says why, and the guest sees what it sees with no device there. The VM goes on.
//!
//! Hook points: port I/O in the extension window ([`xcloud_abi::EXT_PORT_BASE`]), the frames
//! of every virtio NIC ([`PacketHook`]), the requests of every virtio disk ([`BlockHook`]), a
//! periodic tick with read-only, bounded access to guest RAM ([`GuestView`]), and the figures
//! a module exports. Which of them a tenant's module may take is the provider's
//! [`TenantPolicy`]; the provider's own modules take what they implement.

mod persist;

pub use persist::ModuleState;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
pub use xcloud_abi::{EXT_PORT_BASE, EXT_PORT_COUNT};
use xcloud_devices::bus::PortDevice;
pub use xcloud_devices::hooks::{BlockHook, BlockVerdict, PacketDirection, PacketHook, PacketVerdict};

/// Why one hook call failed; its module is disabled with it.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The module trapped (an access outside its memory, `unreachable`, a stack overflow).
    #[error("it trapped: {0}")]
    Trap(String),
    /// It used up the fuel one call may burn.
    #[error("it ran out of its fuel ({0} per call)")]
    OutOfFuel(u64),
    /// It answered something that means nothing for this hook.
    #[error("it answered {0}, which means nothing here")]
    BadAnswer(String),
}

/// A module's refusal to be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum ExtensionError {
    /// Another module has this name.
    #[error("a module named {0} is installed already")]
    NameTaken(String),
    /// Not a name a module can have.
    #[error("module name {0:?} is not 1-32 of a-z, 0-9, '-', '_'")]
    BadName(String),
    /// The VM has as many tenant modules, or as much of their code, as it may.
    #[error("{0}")]
    TooMany(String),
    /// No module has this name.
    #[error("no module named {0}")]
    NotFound(String),
    /// A tenant may not remove or replace a provider's module.
    #[error("module {0} is the provider's: a tenant cannot remove or replace it")]
    ProviderModule(String),
    /// The provider's policy does not let a tenant's module take this hook.
    #[error("the provider's policy does not let a tenant module take the {0} hook")]
    NotGranted(&'static str),
    /// The ports asked for are outside the extension window or taken.
    #[error("ports {base:#x}+{count} {why}")]
    Ports {
        /// First port asked for.
        base: u16,
        /// How many.
        count: u16,
        /// What is wrong with them.
        why: String,
    },
}

/// Who installed a module, and so who may remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Compiled in by the provider: a tenant cannot remove, replace or starve it.
    Provider,
    /// Loaded by the tenant while the VM runs.
    Tenant,
}

/// An extension of the VMM. Each hook has a default that takes nothing; a module implements
/// the hooks it takes. Hooks run on the vCPU thread that met the event: they must be quick.
pub trait Extension: Send + Sync {
    /// A guest read of `size` (1, 2 or 4) bytes at `offset` inside the module's ports.
    fn port_read(&self, _offset: u16, _size: u8) -> Result<u32, HookError> {
        Ok(u32::MAX)
    }

    /// A guest write of `value` (`size` bytes) at `offset` inside the module's ports.
    fn port_write(&self, _offset: u16, _size: u8, _value: u32) -> Result<(), HookError> {
        Ok(())
    }

    /// How many bytes of each frame the module's packet hook wants (0: it takes no frames).
    fn packet_snap(&self) -> usize {
        0
    }

    /// A frame `len` bytes long going `direction` on NIC `nic`, its first bytes in `head`
    /// (which the module may rewrite, answering [`PacketVerdict::Rewrite`]).
    fn packet(
        &self,
        _nic: u32,
        _direction: PacketDirection,
        _head: &mut [u8],
        _len: usize,
    ) -> Result<PacketVerdict, HookError> {
        Ok(PacketVerdict::Pass)
    }

    /// Whether the module takes block requests.
    fn takes_blocks(&self) -> bool {
        false
    }

    /// A request of virtio-blk type `kind` at `sector` with `bytes` of data on disk `disk`,
    /// before the disk does it.
    fn block(&self, _disk: u32, _kind: u32, _sector: u64, _bytes: u64) -> Result<BlockVerdict, HookError> {
        Ok(BlockVerdict::Allow)
    }

    /// Whether the module transforms the data of block reads and writes (encryption at rest).
    fn takes_block_data(&self) -> bool {
        false
    }

    /// Transforms a request's data in place: a write's before the disk gets it, a read's once
    /// the guest has it (so a cipher that is its own inverse, or that tells the kinds apart,
    /// keeps the image encrypted and the guest's view plain).
    fn block_data(&self, _disk: u32, _kind: u32, _sector: u64, _data: &mut [u8]) -> Result<(), HookError> {
        Ok(())
    }

    /// Whether the module takes the periodic tick.
    fn takes_ticks(&self) -> bool {
        false
    }

    /// The periodic tick: the module may read guest RAM through `guest`, up to its budget.
    fn tick(&self, _guest: &mut GuestView) -> Result<(), HookError> {
        Ok(())
    }

    /// Whether the module takes the phases of the VM's snapshots and migrations.
    fn takes_phases(&self) -> bool {
        false
    }

    /// A phase of a snapshot or a migration of the VM (on the engine's thread).
    fn phase(&self, _event: &PhaseEvent) -> Result<(), HookError> {
        Ok(())
    }

    /// Whether the module orders the pages each pre-copy round sends.
    fn takes_page_order(&self) -> bool {
        false
    }

    /// Reorders the guest page numbers a pre-copy round is about to send (the same pages,
    /// in the order they should go: a page likely to be written again is best sent last).
    fn order_pages(&self, _pfns: &mut [u64]) -> Result<(), HookError> {
        Ok(())
    }

    /// Whether the module decides when a pre-copy ends (a convergence policy).
    fn takes_convergence(&self) -> bool {
        false
    }

    /// What the migration does after the dirty-log fetch `facts` describes (None: the next
    /// policy decides; the provider's built-in `precopy` policy always answers).
    fn converge(&self, _facts: &RoundFacts) -> Result<Option<Convergence>, HookError> {
        Ok(None)
    }

    /// Whether the module decides if a round's pages go compressed (a compression policy).
    fn takes_compression(&self) -> bool {
        false
    }

    /// Whether the round `facts` describes sends its pages LZ4-compressed (None: the next
    /// policy decides; the provider's built-in follows the migration's own option).
    fn compress(&self, _facts: &RoundFacts) -> Result<Option<bool>, HookError> {
        Ok(None)
    }

    /// The state the module exports, for a snapshot or a migration to carry (None: it exports
    /// none, and starts afresh wherever the VM goes on). At most [`MAX_MODULE_STATE`] bytes.
    fn save_state(&self) -> Result<Option<Vec<u8>>, HookError> {
        Ok(None)
    }

    /// Takes back the state [`Extension::save_state`] gave, in the module just loaded where
    /// the VM goes on.
    fn restore_state(&self, _state: &[u8]) -> Result<(), HookError> {
        Ok(())
    }

    /// The figures the module exports, by name.
    fn metrics(&self) -> Vec<(String, f64)> {
        Vec::new()
    }

    /// Takes the limits a tenant module runs under from the provider's policy (when it is
    /// installed or carried here, and whenever the policy changes).
    fn set_limits(&self, _policy: &TenantPolicy) {}
}

/// A phase of a snapshot or a migration, as the engines announce it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A migration starts its first pass over guest RAM (the guest runs).
    FirstPass,
    /// A pre-copy round of the pages dirtied since the last (the guest runs).
    PreCopy,
    /// The guest goes on at the destination and its pages follow (post-copy).
    PostCopy,
    /// The guest is paused for the last pages.
    StopAndCopy,
    /// The VM's state goes to the destination.
    Handover,
    /// The migration ended: the VM runs at the destination.
    Migrated,
    /// The migration failed: the VM goes on here.
    MigrationFailed,
    /// A snapshot is taken (the VM is paused).
    Snapshot,
}

impl Phase {
    /// Its number in the hook ABI.
    pub fn code(self) -> i32 {
        match self {
            Self::FirstPass => 1,
            Self::PreCopy => 2,
            Self::PostCopy => 3,
            Self::StopAndCopy => 4,
            Self::Handover => 5,
            Self::Migrated => 6,
            Self::MigrationFailed => 7,
            Self::Snapshot => 8,
        }
    }

    /// Its name, as a migration's progress shows it.
    pub fn name(self) -> &'static str {
        match self {
            Self::FirstPass => "first pass",
            Self::PreCopy => "pre-copy",
            Self::PostCopy => "post-copy",
            Self::StopAndCopy => "stop-and-copy",
            Self::Handover => "handover",
            Self::Migrated => "migrated",
            Self::MigrationFailed => "failed",
            Self::Snapshot => "snapshot",
        }
    }
}

/// One phase with where the engine is.
#[derive(Clone, Copy, Debug)]
pub struct PhaseEvent {
    /// The phase.
    pub phase: Phase,
    /// Pre-copy rounds so far.
    pub round: u32,
    /// Pages this phase starts with (dirty or to send).
    pub pages: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
}

/// Where a pre-copy stands after a fetch of the dirty log: what a convergence or compression
/// policy decides from.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundFacts {
    /// Pre-copy rounds sent so far (0: only the first pass).
    pub round: u32,
    /// Pages dirtied since the last fetch: what the next round, or stop-and-copy, sends.
    pub dirty_pages: u64,
    /// Pages the last round (or the first pass) sent.
    pub sent_last_round: u64,
    /// What the link delivered, bytes per second, as last measured.
    pub bandwidth: f64,
    /// How fast the guest dirties memory, bytes per second (over at least 100 ms).
    pub dirty_rate: f64,
    /// The link's round-trip time.
    pub rtt: Duration,
    /// Bytes sent but not yet delivered (in socket buffers and on the wire).
    pub in_flight: u64,
    /// The downtime the migration was asked to stay within.
    pub max_downtime: Duration,
    /// The provider's bound on rounds: the engine stops the pre-copy there whatever the answer.
    pub max_rounds: u32,
    /// How much the guest's vCPUs are slowed down now, percent.
    pub throttle_percent: u32,
    /// The throttle can go no higher.
    pub throttle_maxed: bool,
    /// [`Convergence::PostCopy`] may be answered (the migration allows it, the guest runs).
    pub postcopy_allowed: bool,
    /// [`Convergence::Throttle`] may be answered (the guest runs).
    pub throttle_allowed: bool,
    /// The migration's own compression option.
    pub compress_option: bool,
}

/// What a convergence policy answers after a dirty-log fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convergence {
    /// Send the dirty pages in another round, the guest running.
    NextRound,
    /// Slow the guest's vCPUs down one step, then another round.
    Throttle,
    /// Pause the guest and send what is left (stop-and-copy).
    StopAndCopy,
    /// Start the guest at the destination and let its pages follow (post-copy).
    PostCopy,
}

impl Convergence {
    /// Its number in the hook ABI.
    pub fn code(self) -> i32 {
        match self {
            Self::NextRound => 1,
            Self::Throttle => 2,
            Self::StopAndCopy => 3,
            Self::PostCopy => 4,
        }
    }

    /// The answer numbered `code` in the hook ABI.
    pub fn from_code(code: i32) -> Option<Self> {
        [Self::NextRound, Self::Throttle, Self::StopAndCopy, Self::PostCopy]
            .into_iter()
            .find(|c| c.code() == code)
    }

    /// Why it cannot be the answer to `facts`, if it cannot.
    fn refused_by(self, facts: &RoundFacts) -> Option<&'static str> {
        match self {
            Self::PostCopy if !facts.postcopy_allowed => Some("post-copy, which this migration does not allow"),
            Self::Throttle if !facts.throttle_allowed || facts.throttle_maxed => {
                Some("throttle, which this migration cannot do (the guest is paused or throttled all it may be)")
            }
            _ => None,
        }
    }
}

/// The most pages a round hands a page-order hook (more go in the engine's order).
pub const MAX_ORDERED_PAGES: usize = 1 << 20;

/// Why a read of guest RAM by a module was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestReadError {
    /// The range is not all guest RAM.
    #[error("{len} bytes at {gpa:#x} are not all guest RAM")]
    OutsideRam {
        /// First guest-physical byte.
        gpa: u64,
        /// Bytes asked for.
        len: usize,
    },
    /// The tick's budget of bytes is spent.
    #[error("{asked} bytes asked, {left} left of this tick's budget")]
    OverBudget {
        /// Bytes asked for.
        asked: usize,
        /// Bytes left.
        left: u64,
    },
}

/// Guest RAM as one tick of a module sees it: read-only, and at most a budget of bytes.
pub struct GuestView {
    memory: GuestMemoryMmap,
    left: u64,
}

impl GuestView {
    /// A view of `memory` that reads at most `budget` bytes.
    pub fn new(memory: GuestMemoryMmap, budget: u64) -> Self {
        Self { memory, left: budget }
    }

    /// Bytes of guest RAM (the highest address a read may reach, plus one).
    pub fn ram_bytes(&self) -> u64 {
        self.memory.last_addr().0.saturating_add(1)
    }

    /// Bytes this tick may still read.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Which of the `pages` 4 KiB pages from the page-aligned `gpa` the guest has in host
    /// memory (None: the range is not one run of guest RAM). It reads no guest data, so it
    /// takes nothing from the budget; a scan that reads only resident pages never makes the
    /// VM bigger, nor pulls a lazily restored page in.
    pub fn resident(&self, gpa: u64, pages: usize) -> Option<Vec<bool>> {
        let len = pages.checked_mul(4096)?;
        if gpa % 4096 != 0 || len == 0 || !GuestMemoryBackend::check_range(&self.memory, GuestAddress(gpa), len) {
            return None;
        }
        let first = self.memory.get_host_address(GuestAddress(gpa)).ok()?;
        let last = self.memory.get_host_address(GuestAddress(gpa + len as u64 - 1)).ok()?;
        if last as usize != first as usize + len - 1 {
            return None;
        }
        let mut vec = vec![0u8; pages];
        // SAFETY: [first, first + len) is one mapping of guest RAM (checked above: both ends
        // map to host addresses exactly len - 1 apart), page-aligned because gpa is and guest
        // RAM regions are; mincore writes one byte per page into `vec`, which has `pages`.
        let rc = unsafe { libc::mincore(first.cast::<libc::c_void>(), len, vec.as_mut_ptr()) };
        (rc == 0).then(|| vec.iter().map(|b| b & 1 != 0).collect())
    }

    /// Copies guest RAM at `gpa` into `into`, from the budget.
    pub fn read(&mut self, gpa: u64, into: &mut [u8]) -> Result<(), GuestReadError> {
        if into.len() as u64 > self.left {
            return Err(GuestReadError::OverBudget {
                asked: into.len(),
                left: self.left,
            });
        }
        let outside = GuestReadError::OutsideRam { gpa, len: into.len() };
        if !GuestMemoryBackend::check_range(&self.memory, GuestAddress(gpa), into.len()) {
            return Err(outside);
        }
        self.memory.read_slice(into, GuestAddress(gpa)).map_err(|_| outside)?;
        self.left -= into.len() as u64;
        Ok(())
    }
}

/// What a tenant's module may do, as the provider sets it (xcloud run's `--ext-policy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantPolicy {
    /// It may serve ports in the extension window.
    pub ports: bool,
    /// It may see (and drop, and rewrite) the VM's frames.
    pub packets: bool,
    /// It may see (and refuse) the VM's block requests.
    pub blocks: bool,
    /// It may see the phases of the VM's snapshots and migrations and order their pages.
    pub migration: bool,
    /// Bytes of guest RAM one tick may read (0: no tick).
    pub guest_read_per_tick: u64,
    /// Time between ticks.
    pub tick_interval: Duration,
    /// Wall time one hook call may take.
    pub call_budget: Duration,
    /// Fuel (about one unit per Wasm instruction) one hook call of a Wasm module may burn.
    pub fuel_per_call: u64,
}

impl Default for TenantPolicy {
    fn default() -> Self {
        Self {
            ports: true,
            packets: true,
            blocks: true,
            migration: true,
            guest_read_per_tick: 1 << 20,
            tick_interval: Duration::from_millis(100),
            call_budget: Duration::from_millis(50),
            fuel_per_call: 1_000_000,
        }
    }
}

impl TenantPolicy {
    /// Reads a policy from `key=value` pairs separated by commas: `ports`, `packets`, `blocks`,
    /// `migration` (`yes` or `no`), `guest-read` (bytes per tick, with an optional K or M), `tick-ms`,
    /// `budget-ms`, `fuel` (per call, with an optional K or M). What is not named keeps its
    /// default.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut policy = Self::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            let yes_no = |v: &str| match v {
                "yes" => Ok(true),
                "no" => Ok(false),
                _ => Err(format!("{key} is yes or no, not {v:?}")),
            };
            let number = |v: &str| -> Result<u64, String> {
                let (digits, unit) = match v.strip_suffix(['K', 'k']) {
                    Some(d) => (d, 1 << 10),
                    None => match v.strip_suffix(['M', 'm']) {
                        Some(d) => (d, 1 << 20),
                        None => (v, 1),
                    },
                };
                digits
                    .parse::<u64>()
                    .ok()
                    .and_then(|n| n.checked_mul(unit))
                    .ok_or_else(|| format!("{key}={v} is not a number"))
            };
            match key {
                "ports" => policy.ports = yes_no(value)?,
                "packets" => policy.packets = yes_no(value)?,
                "blocks" => policy.blocks = yes_no(value)?,
                "migration" => policy.migration = yes_no(value)?,
                "guest-read" => policy.guest_read_per_tick = number(value)?.min(1 << 30),
                "tick-ms" => policy.tick_interval = Duration::from_millis(number(value)?.clamp(10, 60_000)),
                "budget-ms" => policy.call_budget = Duration::from_millis(number(value)?.clamp(1, 10_000)),
                "fuel" => policy.fuel_per_call = number(value)?.clamp(1_000, 1 << 30),
                _ => {
                    return Err(format!(
                    "no policy key {key:?} (ports, packets, blocks, migration, guest-read, tick-ms, budget-ms, fuel)"
                ))
                }
            }
        }
        Ok(policy)
    }

    /// The hook of `module` this policy does not grant, if any.
    fn refused_hook(&self, spec: &ModuleSpec, module: &dyn Extension) -> Option<&'static str> {
        if spec.ports.is_some() && !self.ports {
            Some("port-I/O")
        } else if module.packet_snap() > 0 && !self.packets {
            Some("packet")
        } else if (module.takes_blocks() || module.takes_block_data()) && !self.blocks {
            Some("block")
        } else if module.takes_ticks() && self.guest_read_per_tick == 0 {
            Some("tick")
        } else if (module.takes_phases()
            || module.takes_page_order()
            || module.takes_convergence()
            || module.takes_compression())
            && !self.migration
        {
            Some("migration")
        } else {
            None
        }
    }
}

/// The most state one module may export.
pub const MAX_MODULE_STATE: usize = 256 << 10;
/// The most tenant modules one VM may have.
pub const MAX_TENANT_MODULES: usize = 8;
/// The most code all of a VM's tenant modules may have together: with their state they must
/// fit a migration's state frame beside the devices.
pub const MAX_TENANT_CODE: usize = 4 << 20;

/// Loads a tenant module's code where a VM goes on from a snapshot or a migration.
pub type ModuleLoader = dyn Fn(&[u8]) -> Result<Arc<dyn Extension>, String> + Send + Sync;

static LOADER: std::sync::OnceLock<Box<ModuleLoader>> = std::sync::OnceLock::new();

/// Sets how this process loads tenant modules that snapshots and migrations carry (the
/// WebAssembly host sets it; the first call wins).
pub fn set_module_loader(loader: Box<ModuleLoader>) {
    let _ = LOADER.set(loader);
}

/// Compiles a tenant module's code ahead of its load, so that the load is quick.
pub type ModulePreparer = dyn Fn(&[u8]) + Send + Sync;

static PREPARER: std::sync::OnceLock<Box<ModulePreparer>> = std::sync::OnceLock::new();

/// Sets how this process compiles tenant modules ahead of their load (the WebAssembly host
/// sets it; the first call wins).
pub fn set_module_preparer(preparer: Box<ModulePreparer>) {
    let _ = PREPARER.set(preparer);
}

/// Compiles `code` ahead of its load, if this process can load modules (a migration's
/// destination does it while the memory arrives).
pub fn prepare_module(code: &[u8]) {
    if let Some(prepare) = PREPARER.get() {
        prepare(code);
    }
}

/// What a module is installed as.
#[derive(Clone, Debug)]
pub struct ModuleSpec {
    /// Its name in this VM (1-32 of a-z, 0-9, '-', '_').
    pub name: String,
    /// Its version, as its author gave it.
    pub version: String,
    /// The SHA-256 of its code (hex), or `built-in`.
    pub digest: String,
    /// Who installed it.
    pub origin: Origin,
    /// The ports it serves (`base`, `count`), inside the extension window.
    pub ports: Option<(u16, u16)>,
    /// The wall time one hook call may take before the module is disabled (its fuel bounds
    /// its instructions; this bounds everything else).
    pub call_budget: Duration,
    /// Its code, for a snapshot or a migration to carry (None for the provider's built-ins,
    /// which every VMM has).
    pub code: Option<Arc<[u8]>>,
}

/// A module as `ext ls` shows it.
#[derive(Clone, Debug)]
pub struct ModuleInfo {
    /// How it was installed.
    pub spec: ModuleSpec,
    /// Hook calls so far.
    pub calls: u64,
    /// Time spent in them.
    pub busy: Duration,
    /// Calls that failed (at most one: the first disables the module).
    pub failures: u64,
    /// Why it is disabled, if it is.
    pub disabled: Option<String>,
    /// The figures it exports.
    pub metrics: Vec<(String, f64)>,
}

struct Installed {
    spec: ModuleSpec,
    module: Arc<dyn Extension>,
    calls: AtomicU64,
    busy_nanos: AtomicU64,
    failures: AtomicU64,
    disabled: Mutex<Option<String>>,
}

impl Installed {
    fn new(spec: ModuleSpec, module: Arc<dyn Extension>, disabled: Option<String>) -> Self {
        Self {
            spec,
            module,
            calls: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            disabled: Mutex::new(disabled),
        }
    }

    fn disable(&self, why: String) {
        tracing::warn!("extension {}: disabled: {why}", self.spec.name);
        *self.disabled.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn is_disabled(&self) -> bool {
        self.disabled.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Runs one hook call, counts it and times it; a failure or a call over budget disables
    /// the module (None then).
    fn call<T>(&self, hook: &str, f: impl FnOnce(&dyn Extension) -> Result<T, HookError>) -> Option<T> {
        if self.is_disabled() {
            return None;
        }
        let started = Instant::now();
        let result = f(self.module.as_ref());
        let took = started.elapsed();
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.busy_nanos
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        let why = match result {
            Ok(_) if took > self.spec.call_budget => format!(
                "its {hook} hook took {took:?}, over its budget of {:?}",
                self.spec.call_budget
            ),
            Ok(value) => return Some(value),
            Err(e) => format!("its {hook} hook failed: {e}"),
        };
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.disable(why);
        None
    }
}

/// The modules of one VM.
#[derive(Default)]
pub struct Extensions {
    installed: RwLock<Vec<Arc<Installed>>>,
    policy: RwLock<TenantPolicy>,
    /// The largest snap length of the modules that take frames (0: none does).
    snap: AtomicUsize,
    /// How many installed modules take block requests.
    block_takers: AtomicUsize,
    /// How many installed modules transform block data (disabled ones too: their disk fails).
    data_takers: AtomicUsize,
}

fn good_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Extensions {
    /// No modules.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Installed>>> {
        self.installed.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Installed>>> {
        self.installed.write().unwrap_or_else(|p| p.into_inner())
    }

    /// What tenants' modules may do from now on. A tenant module installed already (or
    /// carried here by a snapshot or a migration) that takes a hook the policy does not grant
    /// is disabled, saying so.
    pub fn set_policy(&self, policy: TenantPolicy) {
        for m in self
            .read()
            .iter()
            .filter(|m| m.spec.origin == Origin::Tenant && !m.is_disabled())
        {
            if let Some(hook) = policy.refused_hook(&m.spec, m.module.as_ref()) {
                m.disable(format!("the provider's policy here does not grant its {hook} hook"));
            }
            m.module.set_limits(&policy);
        }
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// What tenants' modules may do.
    pub fn policy(&self) -> TenantPolicy {
        self.policy.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Recounts what the device hooks look at for their fast paths.
    fn recount(&self, installed: &[Arc<Installed>]) {
        let snap = installed.iter().map(|m| m.module.packet_snap()).max().unwrap_or(0);
        self.snap.store(snap.min(MAX_SNAP), Ordering::Relaxed);
        let blocks = installed.iter().filter(|m| m.module.takes_blocks()).count();
        self.block_takers.store(blocks, Ordering::Relaxed);
        let data = installed.iter().filter(|m| m.module.takes_block_data()).count();
        self.data_takers.store(data, Ordering::Relaxed);
    }

    /// Installs `module` as `spec` says: its name must be free, its ports inside the window
    /// and taken by no other module that is enabled.
    pub fn add(&self, spec: ModuleSpec, module: Arc<dyn Extension>) -> Result<(), ExtensionError> {
        if !good_name(&spec.name) {
            return Err(ExtensionError::BadName(spec.name));
        }
        if spec.origin == Origin::Tenant {
            if let Some(hook) = self.policy().refused_hook(&spec, module.as_ref()) {
                return Err(ExtensionError::NotGranted(hook));
            }
        }
        self.add_granted(spec, module, None)
    }

    /// Installs a module whose hooks were granted (or that comes disabled, `disabled` saying
    /// why).
    fn add_granted(
        &self,
        spec: ModuleSpec,
        module: Arc<dyn Extension>,
        disabled: Option<String>,
    ) -> Result<(), ExtensionError> {
        let mut installed = self.write();
        if installed.iter().any(|m| m.spec.name == spec.name) {
            return Err(ExtensionError::NameTaken(spec.name));
        }
        if spec.origin == Origin::Tenant {
            let tenant: Vec<&Arc<Installed>> = installed.iter().filter(|m| m.spec.origin == Origin::Tenant).collect();
            if tenant.len() >= MAX_TENANT_MODULES {
                return Err(ExtensionError::TooMany(format!(
                    "the VM has {MAX_TENANT_MODULES} tenant modules, as many as it may"
                )));
            }
            let code_len = |spec: &ModuleSpec| spec.code.as_ref().map_or(0, |c| c.len());
            let code = tenant.iter().map(|m| code_len(&m.spec)).sum::<usize>() + code_len(&spec);
            if code > MAX_TENANT_CODE {
                return Err(ExtensionError::TooMany(format!(
                    "the VM's tenant modules would have {code} bytes of code, over the {MAX_TENANT_CODE} they may have together"
                )));
            }
        }
        if let Some((base, count)) = spec.ports {
            let end = u32::from(base) + u32::from(count);
            let window_end = u32::from(EXT_PORT_BASE) + u32::from(EXT_PORT_COUNT);
            let bad = |why: &str| ExtensionError::Ports {
                base,
                count,
                why: why.to_string(),
            };
            if count == 0 || base < EXT_PORT_BASE || end > window_end {
                return Err(bad(&format!(
                    "are not inside the extension window {EXT_PORT_BASE:#x}+{EXT_PORT_COUNT}"
                )));
            }
            let overlaps = installed.iter().filter(|m| !m.is_disabled()).any(|m| {
                m.spec
                    .ports
                    .is_some_and(|(b, c)| u32::from(base) < u32::from(b) + u32::from(c) && u32::from(b) < end)
            });
            if overlaps {
                return Err(bad("overlap another module's"));
            }
        }
        if spec.origin == Origin::Tenant {
            module.set_limits(&self.policy());
        }
        installed.push(Arc::new(Installed::new(spec, module, disabled)));
        self.recount(&installed);
        Ok(())
    }

    /// Removes module `name`, asked by `by` (a tenant cannot remove the provider's).
    pub fn remove(&self, name: &str, by: Origin) -> Result<(), ExtensionError> {
        let mut installed = self.write();
        let at = installed
            .iter()
            .position(|m| m.spec.name == name)
            .ok_or_else(|| ExtensionError::NotFound(name.to_string()))?;
        if installed[at].spec.origin == Origin::Provider && by == Origin::Tenant {
            return Err(ExtensionError::ProviderModule(name.to_string()));
        }
        installed.remove(at);
        self.recount(&installed);
        Ok(())
    }

    /// The modules, in the order they were installed.
    pub fn list(&self) -> Vec<ModuleInfo> {
        self.read()
            .iter()
            .map(|m| {
                let disabled = m.disabled.lock().unwrap_or_else(|p| p.into_inner()).clone();
                ModuleInfo {
                    spec: m.spec.clone(),
                    calls: m.calls.load(Ordering::Relaxed),
                    busy: Duration::from_nanos(m.busy_nanos.load(Ordering::Relaxed)),
                    failures: m.failures.load(Ordering::Relaxed),
                    metrics: if disabled.is_some() {
                        Vec::new()
                    } else {
                        m.module.metrics()
                    },
                    disabled,
                }
            })
            .collect()
    }

    /// The code of the tenant modules (what a migration sends ahead for the destination to
    /// compile).
    pub fn tenant_code(&self) -> Vec<Arc<[u8]>> {
        self.read()
            .iter()
            .filter(|m| m.spec.origin == Origin::Tenant)
            .filter_map(|m| m.spec.code.clone())
            .collect()
    }

    /// The enabled module serving `port`, and the port's offset in its range.
    fn at_port(&self, port: u16) -> Option<(Arc<Installed>, u16)> {
        self.read().iter().find_map(|m| {
            let (base, count) = m.spec.ports?;
            let inside = port >= base && u32::from(port) < u32::from(base) + u32::from(count);
            (inside && !m.is_disabled()).then(|| (m.clone(), port - base))
        })
    }
}

/// The most bytes of a frame a packet hook is given.
pub const MAX_SNAP: usize = 65_536;

impl PacketHook for Extensions {
    fn snap_len(&self) -> usize {
        self.snap.load(Ordering::Relaxed)
    }

    /// Each enabled module that takes frames sees the frame in turn, in the order they were
    /// installed, with what the ones before it rewrote; the first drop ends it.
    fn packet(&self, nic: u32, direction: PacketDirection, head: &mut [u8], len: usize) -> PacketVerdict {
        let mut verdict = PacketVerdict::Pass;
        for m in self.read().iter() {
            let snap = m.module.packet_snap().min(head.len());
            if snap == 0 {
                continue;
            }
            match m.call("packet", |e| e.packet(nic, direction, &mut head[..snap], len)) {
                Some(PacketVerdict::Drop) => return PacketVerdict::Drop,
                Some(PacketVerdict::Rewrite) => verdict = PacketVerdict::Rewrite,
                Some(PacketVerdict::Pass) | None => {}
            }
        }
        verdict
    }
}

impl BlockHook for Extensions {
    fn active(&self) -> bool {
        self.block_takers.load(Ordering::Relaxed) > 0
    }

    /// Each enabled module that takes requests sees it in turn; the first refusal ends it.
    fn request(&self, disk: u32, kind: u32, sector: u64, bytes: u64) -> BlockVerdict {
        for m in self.read().iter().filter(|m| m.module.takes_blocks()) {
            if m.call("block", |e| e.block(disk, kind, sector, bytes)) == Some(BlockVerdict::Refuse) {
                return BlockVerdict::Refuse;
            }
        }
        BlockVerdict::Allow
    }

    fn transforms_data(&self) -> bool {
        self.data_takers.load(Ordering::Relaxed) > 0
    }

    /// Writes go through the modules in the order they were installed, reads the other way
    /// (as layers: the first installed is nearest the guest). A module that fails, or that
    /// failed before, fails the request: data never reaches the disk or the guest untransformed.
    fn transform(&self, disk: u32, kind: u32, sector: u64, data: &mut [u8]) -> bool {
        let installed = self.read();
        let mut takers: Vec<&Arc<Installed>> = installed.iter().filter(|m| m.module.takes_block_data()).collect();
        if kind == xcloud_devices::virtio::block::request::IN {
            takers.reverse();
        }
        takers.into_iter().all(|m| {
            m.call("block_data", |e| e.block_data(disk, kind, sector, data))
                .is_some()
        })
    }
}

impl Extensions {
    /// Tells every enabled module that takes phases about `event`.
    pub fn phase(&self, event: PhaseEvent) {
        let takers: Vec<Arc<Installed>> = self
            .read()
            .iter()
            .filter(|m| m.module.takes_phases())
            .cloned()
            .collect();
        for m in takers {
            m.call("phase", |e| e.phase(&event));
        }
    }

    /// Lets the first enabled module that orders pages order `pfns`. An answer that is not
    /// the same pages disables it, and the engine's order stands.
    pub fn order_pages(&self, pfns: &mut [u64]) {
        if pfns.len() > MAX_ORDERED_PAGES {
            return;
        }
        let Some(m) = self
            .read()
            .iter()
            .find(|m| m.module.takes_page_order() && !m.is_disabled())
            .cloned()
        else {
            return;
        };
        let mut ordered = pfns.to_vec();
        if m.call("order_pages", |e| e.order_pages(&mut ordered)).is_none() {
            return;
        }
        // Checked outside the timed call: the sorts are the engine's cost, not the module's.
        let (mut before, mut after) = (pfns.to_vec(), ordered.clone());
        before.sort_unstable();
        after.sort_unstable();
        if before == after {
            pfns.copy_from_slice(&ordered);
        } else {
            m.failures.fetch_add(1, Ordering::Relaxed);
            m.disable("its order_pages hook answered an order that is not the same pages".into());
        }
    }

    /// What the migration does after the fetch `facts` describes. Every enabled module that
    /// takes convergence is asked, so the provider's built-in policy sees every round; a
    /// tenant module's answer, if it gives one, replaces the provider's. An answer the
    /// migration cannot take (post-copy it does not allow, a throttle it cannot raise)
    /// disables the module that gave it. None: no module answered.
    pub fn converge(&self, facts: &RoundFacts) -> Option<Convergence> {
        let takers: Vec<Arc<Installed>> = self
            .read()
            .iter()
            .filter(|m| m.module.takes_convergence())
            .cloned()
            .collect();
        let (mut provider, mut tenant) = (None, None);
        for m in takers {
            let answer = m.call("converge", |e| {
                let answer = e.converge(facts)?;
                match answer.and_then(|a| a.refused_by(facts)) {
                    Some(why) => Err(HookError::BadAnswer(why.into())),
                    None => Ok(answer),
                }
            });
            let slot = match m.spec.origin {
                Origin::Provider => &mut provider,
                Origin::Tenant => &mut tenant,
            };
            if slot.is_none() {
                *slot = answer.flatten();
            }
        }
        tenant.or(provider)
    }

    /// Whether the round `facts` describes goes compressed: a tenant module's answer if one
    /// gives it, else the provider's, else the migration's own option.
    pub fn compress(&self, facts: &RoundFacts) -> bool {
        let takers: Vec<Arc<Installed>> = self
            .read()
            .iter()
            .filter(|m| m.module.takes_compression())
            .cloned()
            .collect();
        let (mut provider, mut tenant) = (None, None);
        for m in takers {
            let answer = m.call("compress", |e| e.compress(facts)).flatten();
            let slot = match m.spec.origin {
                Origin::Provider => &mut provider,
                Origin::Tenant => &mut tenant,
            };
            if slot.is_none() {
                *slot = answer;
            }
        }
        tenant.or(provider).unwrap_or(facts.compress_option)
    }

    /// Ticks every enabled module that takes ticks, each with its own view of `memory` and,
    /// for a tenant's, the policy's budget of bytes.
    pub fn tick(&self, memory: &GuestMemoryMmap) {
        let budget = self.policy().guest_read_per_tick;
        let takers: Vec<Arc<Installed>> = self.read().iter().filter(|m| m.module.takes_ticks()).cloned().collect();
        for m in takers {
            // The provider's modules bound their own reads (the tenant's policy is not theirs).
            let budget = match m.spec.origin {
                Origin::Provider => u64::MAX,
                Origin::Tenant => budget,
            };
            let mut view = GuestView::new(memory.clone(), budget);
            m.call("tick", |e| e.tick(&mut view));
        }
    }

    /// Starts the thread that ticks the modules every policy interval while the guard lives.
    pub fn start_ticker(self: &Arc<Self>, memory: GuestMemoryMmap) -> std::io::Result<Ticker> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let extensions = self.clone();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new().name("ext-tick".into()).spawn(move || {
            let (lock, wake) = &*stopped;
            let mut done = lock.lock().unwrap_or_else(|p| p.into_inner());
            while !*done {
                let interval = extensions.policy().tick_interval;
                done = wake.wait_timeout(done, interval).unwrap_or_else(|p| p.into_inner()).0;
                if !*done {
                    drop(done);
                    extensions.tick(&memory);
                    done = lock.lock().unwrap_or_else(|p| p.into_inner());
                }
            }
        })?;
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

/// The tick thread; dropping it stops the thread.
pub struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The extension window on the port-I/O bus: each access goes to the module that serves the
/// port; a port no module serves reads as all ones and drops writes, as on a bus with no
/// device there.
pub struct ExtensionPorts {
    extensions: Arc<Extensions>,
}

impl ExtensionPorts {
    /// The window of `extensions`.
    pub fn new(extensions: Arc<Extensions>) -> Self {
        Self { extensions }
    }
}

impl PortDevice for ExtensionPorts {
    fn read(&self, offset: u16, data: &mut [u8]) {
        let port = EXT_PORT_BASE.wrapping_add(offset);
        let size = data.len().min(4) as u8;
        let value = self
            .extensions
            .at_port(port)
            .and_then(|(m, at)| m.call("port_read", |e| e.port_read(at, size)))
            .unwrap_or(u32::MAX);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = value.checked_shr(8 * i as u32).unwrap_or(0) as u8;
        }
    }

    fn write(&self, offset: u16, data: &[u8]) {
        let port = EXT_PORT_BASE.wrapping_add(offset);
        let mut value = 0u32;
        for (i, byte) in data.iter().take(4).enumerate() {
            value |= u32::from(*byte) << (8 * i);
        }
        if let Some((m, at)) = self.extensions.at_port(port) {
            m.call("port_write", |e| e.port_write(at, data.len().min(4) as u8, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last value written; a read at offset 4 fails.
    #[derive(Default)]
    struct Latch(Mutex<u32>);

    impl Extension for Latch {
        fn port_read(&self, offset: u16, _size: u8) -> Result<u32, HookError> {
            match offset {
                4 => Err(HookError::Trap("out of bounds".into())),
                _ => Ok(*self.0.lock().expect("lock")),
            }
        }
        fn port_write(&self, _offset: u16, _size: u8, value: u32) -> Result<(), HookError> {
            *self.0.lock().expect("lock") = value;
            Ok(())
        }
    }

    fn spec(name: &str, origin: Origin, ports: Option<(u16, u16)>) -> ModuleSpec {
        ModuleSpec {
            name: name.into(),
            version: "1".into(),
            digest: "built-in".into(),
            origin,
            ports,
            call_budget: Duration::from_secs(1),
            code: None,
        }
    }

    #[test]
    fn ports_reach_their_module_and_a_failure_disables_only_it() {
        let ext = Arc::new(Extensions::new());
        ext.add(
            spec("latch", Origin::Tenant, Some((EXT_PORT_BASE, 8))),
            Arc::new(Latch::default()),
        )
        .expect("added");
        let window = ExtensionPorts::new(ext.clone());
        window.write(0, &[0x78, 0x56, 0x34, 0x12]);
        let mut word = [0u8; 4];
        window.read(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0x1234_5678);
        let mut byte = [0u8; 1];
        window.read(0x20, &mut byte);
        assert_eq!(byte, [0xff], "no module there");
        window.read(4, &mut word);
        assert_eq!(word, [0xff; 4], "a failed hook reads as no device");
        let info = &ext.list()[0];
        assert_eq!((info.calls, info.failures), (3, 1));
        assert!(
            info.disabled.as_deref().is_some_and(|d| d.contains("out of bounds")),
            "{info:?}"
        );
        window.read(0, &mut word);
        assert_eq!(word, [0xff; 4], "disabled");
        // Its ports are free again for another module.
        ext.add(
            spec("next", Origin::Tenant, Some((EXT_PORT_BASE, 4))),
            Arc::new(Latch::default()),
        )
        .expect("the ports of a disabled module are free");
    }

    #[test]
    fn names_ports_and_the_providers_modules_are_guarded() {
        let ext = Extensions::new();
        let latch = || Arc::new(Latch::default());
        ext.add(spec("meter", Origin::Provider, None), latch())
            .expect("provider");
        assert!(matches!(
            ext.add(spec("meter", Origin::Tenant, None), latch()),
            Err(ExtensionError::NameTaken(_))
        ));
        assert!(matches!(
            ext.remove("meter", Origin::Tenant),
            Err(ExtensionError::ProviderModule(_))
        ));
        for bad in ["", "A", "a/b", &"a".repeat(33)] {
            assert!(matches!(
                ext.add(spec(bad, Origin::Tenant, None), latch()),
                Err(ExtensionError::BadName(_))
            ));
        }
        for (base, count) in [(0x3f8, 8), (EXT_PORT_BASE, 0), (EXT_PORT_BASE + EXT_PORT_COUNT - 2, 4)] {
            assert!(
                matches!(
                    ext.add(spec("p", Origin::Tenant, Some((base, count))), latch()),
                    Err(ExtensionError::Ports { .. })
                ),
                "{base:#x}+{count}"
            );
        }
        ext.add(spec("a", Origin::Tenant, Some((EXT_PORT_BASE, 16))), latch())
            .expect("a");
        assert!(matches!(
            ext.add(spec("b", Origin::Tenant, Some((EXT_PORT_BASE + 8, 16))), latch()),
            Err(ExtensionError::Ports { .. })
        ));
        ext.remove("a", Origin::Tenant).expect("removed");
        assert!(matches!(
            ext.remove("a", Origin::Tenant),
            Err(ExtensionError::NotFound(_))
        ));
        ext.remove("meter", Origin::Provider).expect("the provider may");
    }
}
