//! The extension host (docs/extensions.md): a tenant's WebAssembly module as an
//! [`Extension`] of the VMM, run by wasmtime in a sandbox the provider's [`Policy`] sets.
//!
//! - Imports: only the host functions of module `xcloud` below (no WASI); anything else is
//!   refused when the module loads.
//! - Fuel: each hook call may burn [`Policy::fuel_per_call`] units (about one per
//!   instruction); an endless loop runs out and traps.
//! - Memory: its linear memory may never exceed [`Policy::memory_bytes`] (a larger declared
//!   memory is refused when it loads, a larger `memory.grow` fails).
//! - Stack: at most [`Policy::stack_bytes`] of wasm stack.
//!
//! A module that breaks any of these traps; the VMM's registry then disables it and the VM
//! goes on. Hooks a module takes are the exports it has, with their exact signatures:
//!
//! | export | signature | hook |
//! | --- | --- | --- |
//! | `port_read` | `(offset: i32, size: i32) -> i32` | a guest `in` in its ports: the value read |
//! | `port_write` | `(offset: i32, size: i32, value: i32)` | a guest `out` in its ports |
//! | `packet`, `packet_buffer`, `packet_snap` | `(nic: i32, direction: i32, len: i32) -> i32`, `() -> i32`, `() -> i32` | a frame: its first bytes are at `packet_buffer`, at most `packet_snap` of them; answers 0 pass, 1 drop, 2 pass as rewritten |
//! | `block` | `(disk: i32, kind: i32, sector: i64, bytes: i64) -> i32` | a block request: 0 allow, 1 refuse |
//! | `block_buffer`, `block_data` | `(len: i32) -> i32`, `(disk: i32, kind: i32, sector: i64, len: i32) -> i32` | a read's or write's data (encryption at rest): put at `block_buffer(len)`, transformed in place there; answers 0 (anything else fails the request and disables the module) |
//! | `tick` | `()` | the periodic tick |
//! | `phase` | `(phase: i32, round: i32, pages: i64, bytes_sent: i64)` | a phase of a snapshot or migration (1 first pass, 2 pre-copy round, 3 post-copy, 4 stop-and-copy, 5 handover, 6 migrated, 7 failed, 8 snapshot) |
//! | `pages_buffer`, `order_pages` | `(count: i32) -> i32`, `(count: i32) -> i32` | a pre-copy round's page numbers (u64 each) at `pages_buffer(count)` (negative: not this round); answers 0 to send them in the order it left there, 1 to keep the engine's |
//! | `converge` | `(round: i32, dirty_pages: i64, sent_last_round: i64, bandwidth: i64, dirty_rate: i64, rtt_us: i64, budget_us: i64, flags: i32) -> i32` | after each dirty-log fetch of a pre-copy (bytes per second; flags: 1 post-copy allowed, 2 throttle allowed, 4 throttle at its most, 8 the migration's compress option): 0 the provider's answer, 1 next round, 2 throttle, 3 stop-and-copy, 4 post-copy (one the migration cannot take disables the module) |
//! | `compress` | `(round: i32, bandwidth: i64, dirty_rate: i64, flags: i32) -> i32` | whether a pre-copy round's pages go LZ4-compressed: 0 the provider's answer, 1 plain, 2 compressed |
//! | `metric_count`, `metric` | `() -> i32`, `(i32) -> i64` | the figures it exports (`metric(i)`, i < count) |
//! | `metric_name` | `(i32) -> i64` | optional: figure i's name, `address << 32 \| length` in its memory |
//! | `state_save`, `state_buffer`, `state_load` | `() -> i64`, `(len: i32) -> i32`, `(len: i32) -> i32` | the state a snapshot or migration carries: `address << 32 \| length` of it; where to put `len` bytes of it in a fresh instance; take them (0: taken) |
//!
//! | import (`xcloud`) | signature | what |
//! | --- | --- | --- |
//! | `guest_read` | `(gpa: i64, into: i32, len: i32) -> i32` | copies guest RAM into the module's memory during a tick: 0, or -1 not guest RAM, -2 over the tick's budget, -3 `into` outside its memory, -4 not in a tick |
//! | `guest_ram_bytes` | `() -> i64` | the guest's RAM size (0 outside a tick) |

#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::sync::{Mutex, OnceLock};
use wasmtime::{
    Caller, Engine, Instance, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc,
};
use xcloud_vmm::extension::{
    BlockVerdict, Convergence, Extension, GuestView, HookError, PacketDirection, PacketVerdict, PhaseEvent, RoundFacts,
    MAX_MODULE_STATE, MAX_SNAP,
};

/// What the provider lets a tenant module use.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Fuel one hook call may burn.
    pub fuel_per_call: u64,
    /// The most linear memory the module may have.
    pub memory_bytes: usize,
    /// The largest module accepted (bytes of Wasm, or of its text form).
    pub module_bytes: usize,
    /// The most wasm stack a call may use.
    pub stack_bytes: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            fuel_per_call: 1_000_000,
            memory_bytes: 16 << 20,
            module_bytes: 4 << 20,
            stack_bytes: 256 << 10,
        }
    }
}

/// Why a module was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Over [`Policy::module_bytes`].
    #[error("the module is {0} bytes, over the {1} a module may have")]
    TooLarge(usize, usize),
    /// Neither Wasm nor its text form.
    #[error("not a WebAssembly module: {0}")]
    NotWasm(String),
    /// It imports something the host does not give.
    #[error("it imports {0}: a module may import only xcloud::guest_read and xcloud::guest_ram_bytes")]
    Imports(String),
    /// It could not be instantiated (memory over the limit, a start function that trapped).
    #[error("it cannot start: {0}")]
    Instantiate(String),
    /// An export a hook is named by has the wrong signature.
    #[error("its export {name} is not a function {signature}")]
    Signature {
        /// The export.
        name: &'static str,
        /// What it should be.
        signature: &'static str,
    },
    /// Its packet buffer is not inside its memory.
    #[error("its packet buffer ({0}) is not inside its exported memory")]
    PacketBuffer(String),
    /// It exports no hook.
    #[error("it exports no hook (port_read, port_write, packet, block, tick, phase, order_pages, converge, compress, metric_count)")]
    NoHooks,
    /// wasmtime itself refused (its configuration).
    #[error("the Wasm engine: {0}")]
    Engine(String),
}

/// The engine every module of this process shares: fuel on, no threads, no SIMD needed.
fn engine(policy: &Policy) -> Result<&'static Engine, LoadError> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut config = wasmtime::Config::new();
            config.consume_fuel(true);
            config.max_wasm_stack(policy.stack_bytes);
            Engine::new(&config).map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LoadError::Engine(e.clone()))
}

/// What a module's store holds: its limits, and guest RAM during a tick.
struct Host {
    limits: StoreLimits,
    guest: Option<GuestView>,
}

/// `block_data(disk, kind, sector, len) -> answer`.
type BlockDataFunc = TypedFunc<(i32, i32, i64, i32), i32>;

/// Where a module takes frames: its buffer and how many bytes of a frame it wants.
struct PacketHooks {
    packet: TypedFunc<(i32, i32, i32), i32>,
    buffer: usize,
    snap: usize,
}

struct Hooks {
    port_read: Option<TypedFunc<(i32, i32), i32>>,
    port_write: Option<TypedFunc<(i32, i32, i32), ()>>,
    packet: Option<PacketHooks>,
    block: Option<TypedFunc<(i32, i32, i64, i64), i32>>,
    block_data: Option<(TypedFunc<i32, i32>, BlockDataFunc)>,
    tick: Option<TypedFunc<(), ()>>,
    metrics: Option<(TypedFunc<(), i32>, TypedFunc<i32, i64>)>,
    metric_name: Option<TypedFunc<i32, i64>>,
    state: Option<StateHooks>,
    phase: Option<TypedFunc<(i32, i32, i64, i64), ()>>,
    page_order: Option<(TypedFunc<i32, i32>, TypedFunc<i32, i32>)>,
    converge: Option<ConvergeFunc>,
    compress: Option<TypedFunc<(i32, i64, i64, i32), i32>>,
}

/// `converge(round, dirty_pages, sent_last_round, bandwidth, dirty_rate, rtt_us, budget_us, flags)`.
type ConvergeFunc = TypedFunc<(i32, i64, i64, i64, i64, i64, i64, i32), i32>;

/// The flags a convergence or compression hook gets.
fn round_flags(facts: &RoundFacts) -> i32 {
    i32::from(facts.postcopy_allowed)
        | i32::from(facts.throttle_allowed) << 1
        | i32::from(facts.throttle_maxed) << 2
        | i32::from(facts.compress_option) << 3
}

/// A figure of bytes or microseconds as a hook argument.
fn as_i64(value: f64) -> i64 {
    // `as` saturates, and NaN becomes 0.
    value as i64
}

/// How a module exports its state.
struct StateHooks {
    save: TypedFunc<(), i64>,
    buffer: TypedFunc<i32, i32>,
    load: TypedFunc<i32, i32>,
}

/// A loaded tenant module.
pub struct WasmModule {
    store: Mutex<Store<Host>>,
    memory: Option<Memory>,
    hooks: Hooks,
    /// Fuel per call: the load policy's, then the provider's policy's (`set_limits`).
    fuel: std::sync::atomic::AtomicU64,
    /// SHA-256 of the Wasm (hex).
    pub digest: String,
}

/// The SHA-256 of `bytes`, in hex.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    store: &mut Store<Host>,
    instance: &Instance,
    name: &'static str,
    signature: &'static str,
) -> Result<Option<TypedFunc<P, R>>, LoadError> {
    if instance.get_export(&mut *store, name).is_none() {
        return Ok(None);
    }
    instance
        .get_typed_func::<P, R>(&mut *store, name)
        .map(Some)
        .map_err(|_| LoadError::Signature { name, signature })
}

/// Both of a pair of exports, or neither.
fn pair<A, B>(
    a: Option<A>,
    b: Option<B>,
    name: &'static str,
    signature: &'static str,
) -> Result<Option<(A, B)>, LoadError> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some((a, b))),
        (None, None) => Ok(None),
        _ => Err(LoadError::Signature { name, signature }),
    }
}

/// `guest_read`'s answers.
mod guest_read {
    pub const OUTSIDE_RAM: i32 = -1;
    pub const OVER_BUDGET: i32 = -2;
    pub const OUTSIDE_MODULE: i32 = -3;
    pub const NOT_IN_TICK: i32 = -4;
}

/// The host functions a module may import.
fn linker(engine: &Engine) -> Result<Linker<Host>, LoadError> {
    let mut linker = Linker::new(engine);
    let engine_error = |e: wasmtime::Error| LoadError::Engine(e.to_string());
    linker
        .func_wrap(
            "xcloud",
            "guest_read",
            |mut caller: Caller<'_, Host>, gpa: i64, into: i32, len: i32| -> i32 {
                let Some(mut guest) = caller.data_mut().guest.take() else {
                    return guest_read::NOT_IN_TICK;
                };
                let answer = (|| {
                    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
                        return guest_read::OUTSIDE_MODULE;
                    };
                    let (Ok(at), Ok(len)) = (usize::try_from(into), usize::try_from(len)) else {
                        return guest_read::OUTSIDE_MODULE;
                    };
                    let inside = at.checked_add(len).is_some_and(|end| end <= memory.data_size(&caller));
                    if !inside {
                        return guest_read::OUTSIDE_MODULE;
                    }
                    let mut bytes = vec![0u8; len];
                    if let Err(e) = guest.read(gpa as u64, &mut bytes) {
                        return match e {
                            xcloud_vmm::extension::GuestReadError::OutsideRam { .. } => guest_read::OUTSIDE_RAM,
                            xcloud_vmm::extension::GuestReadError::OverBudget { .. } => guest_read::OVER_BUDGET,
                        };
                    }
                    memory.data_mut(&mut caller)[at..at + len].copy_from_slice(&bytes);
                    0
                })();
                caller.data_mut().guest = Some(guest);
                answer
            },
        )
        .map_err(engine_error)?;
    linker
        .func_wrap("xcloud", "guest_ram_bytes", |caller: Caller<'_, Host>| -> i64 {
            caller.data().guest.as_ref().map_or(0, |g| g.ram_bytes() as i64)
        })
        .map_err(engine_error)?;
    Ok(linker)
}

/// How many compiled modules a process keeps for the next load of the same bytes.
const COMPILED_KEPT: usize = 16;

/// A module compiled in this process: the SHA-256 of the bytes it came from (text or Wasm),
/// the module, the SHA-256 of its Wasm.
type Compiled = (String, Module, String);

/// Modules compiled in this process, newest last: a migration's destination compiles the
/// modules the VM brings while its memory arrives, and their load at the switch finds them
/// here.
static COMPILED: Mutex<std::collections::VecDeque<Compiled>> = Mutex::new(std::collections::VecDeque::new());

/// `bytes` (Wasm or its text form) compiled by `engine`, and the SHA-256 of the Wasm.
fn compile(bytes: &[u8], engine: &Engine) -> Result<(Module, String), LoadError> {
    let key = sha256_hex(bytes);
    let kept = |c: &std::collections::VecDeque<Compiled>| {
        c.iter()
            .find(|(k, m, _)| *k == key && Engine::same(m.engine(), engine))
            .map(|(_, m, d)| (m.clone(), d.clone()))
    };
    if let Some(hit) = kept(&COMPILED.lock().unwrap_or_else(|p| p.into_inner())) {
        return Ok(hit);
    }
    let wasm = wat::parse_bytes(bytes).map_err(|e| LoadError::NotWasm(e.to_string()))?;
    let module = Module::new(engine, &wasm).map_err(|e| LoadError::NotWasm(format!("{e:#}")))?;
    let digest = sha256_hex(&wasm);
    let mut compiled = COMPILED.lock().unwrap_or_else(|p| p.into_inner());
    if kept(&compiled).is_none() {
        if compiled.len() == COMPILED_KEPT {
            compiled.pop_front();
        }
        compiled.push_back((key, module.clone(), digest.clone()));
    }
    Ok((module, digest))
}

/// Makes this process's VMs load the tenant modules that snapshots and migrations carry with
/// this host, under the default [`Policy`].
pub fn register_loader() {
    xcloud_vmm::extension::set_module_loader(Box::new(|code: &[u8]| {
        let module = WasmModule::load(code, &Policy::default()).map_err(|e| e.to_string())?;
        Ok(std::sync::Arc::new(module) as std::sync::Arc<dyn Extension>)
    }));
    xcloud_vmm::extension::set_module_preparer(Box::new(|code: &[u8]| {
        let policy = Policy::default();
        if code.len() <= policy.module_bytes {
            // A module that does not compile is refused when it is loaded, with the reason.
            let _ = engine(&policy).and_then(|e| compile(code, e));
        }
    }));
}

impl WasmModule {
    /// Loads `bytes` (Wasm, or its text form) under `policy`.
    pub fn load(bytes: &[u8], policy: &Policy) -> Result<Self, LoadError> {
        if bytes.len() > policy.module_bytes {
            return Err(LoadError::TooLarge(bytes.len(), policy.module_bytes));
        }
        let engine = engine(policy)?;
        let (module, digest) = compile(bytes, engine)?;
        let linker = linker(engine)?;
        for import in module.imports() {
            let known = import.module() == "xcloud" && matches!(import.name(), "guest_read" | "guest_ram_bytes");
            if !known {
                return Err(LoadError::Imports(format!("{}::{}", import.module(), import.name())));
            }
        }
        let limits = StoreLimitsBuilder::new()
            .memory_size(policy.memory_bytes)
            .memories(1)
            .tables(1)
            .table_elements(10_000)
            .instances(1)
            .build();
        let mut store = Store::new(engine, Host { limits, guest: None });
        store.limiter(|host| &mut host.limits);
        store
            .set_fuel(policy.fuel_per_call)
            .map_err(|e| LoadError::Engine(e.to_string()))?;
        // A wrong signature of an import is refused here too.
        let instance = linker
            .instantiate(&mut store, &module)
            .map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
        let memory = instance.get_memory(&mut store, "memory");
        let packet = pair(
            typed::<(i32, i32, i32), i32>(&mut store, &instance, "packet", "(i32, i32, i32) -> i32")?,
            pair(
                typed::<(), i32>(&mut store, &instance, "packet_buffer", "() -> i32")?,
                typed::<(), i32>(&mut store, &instance, "packet_snap", "() -> i32")?,
                "packet_buffer",
                "() -> i32, exported with packet_snap: () -> i32",
            )?,
            "packet",
            "(i32, i32, i32) -> i32, exported with packet_buffer and packet_snap",
        )?;
        let packet = match packet {
            None => None,
            Some((packet, (buffer, snap))) => {
                let bad = |why: String| LoadError::PacketBuffer(why);
                let buffer = buffer
                    .call(&mut store, ())
                    .map_err(|e| bad(format!("packet_buffer failed: {e:#}")))?;
                let snap = snap
                    .call(&mut store, ())
                    .map_err(|e| bad(format!("packet_snap failed: {e:#}")))?;
                let (Ok(buffer), Ok(snap)) = (usize::try_from(buffer), usize::try_from(snap)) else {
                    return Err(bad(format!("at {buffer}, {snap} bytes")));
                };
                let size = memory.map_or(0, |m| m.data_size(&store));
                if snap == 0 || snap > MAX_SNAP || buffer.saturating_add(snap) > size {
                    return Err(bad(format!(
                        "at {buffer}, {snap} bytes: 1 to {MAX_SNAP} bytes inside its {size} bytes of memory"
                    )));
                }
                Some(PacketHooks { packet, buffer, snap })
            }
        };
        let hooks = Hooks {
            port_read: typed(&mut store, &instance, "port_read", "(i32, i32) -> i32")?,
            port_write: typed(&mut store, &instance, "port_write", "(i32, i32, i32)")?,
            packet,
            block: typed(&mut store, &instance, "block", "(i32, i32, i64, i64) -> i32")?,
            block_data: pair(
                typed(&mut store, &instance, "block_buffer", "(i32) -> i32")?,
                typed(&mut store, &instance, "block_data", "(i32, i32, i64, i32) -> i32")?,
                "block_buffer",
                "(i32) -> i32, exported with block_data: (i32, i32, i64, i32) -> i32",
            )?,
            tick: typed(&mut store, &instance, "tick", "()")?,
            metrics: pair(
                typed(&mut store, &instance, "metric_count", "() -> i32")?,
                typed(&mut store, &instance, "metric", "(i32) -> i64")?,
                "metric_count",
                "() -> i32, exported with metric: (i32) -> i64",
            )?,
            metric_name: typed(&mut store, &instance, "metric_name", "(i32) -> i64")?,
            state: pair(
                typed::<(), i64>(&mut store, &instance, "state_save", "() -> i64")?,
                pair(
                    typed::<i32, i32>(&mut store, &instance, "state_buffer", "(i32) -> i32")?,
                    typed::<i32, i32>(&mut store, &instance, "state_load", "(i32) -> i32")?,
                    "state_buffer",
                    "(i32) -> i32, exported with state_load: (i32) -> i32",
                )?,
                "state_save",
                "() -> i64, exported with state_buffer and state_load",
            )?
            .map(|(save, (buffer, load))| StateHooks { save, buffer, load }),
            phase: typed(&mut store, &instance, "phase", "(i32, i32, i64, i64)")?,
            page_order: pair(
                typed(&mut store, &instance, "pages_buffer", "(i32) -> i32")?,
                typed(&mut store, &instance, "order_pages", "(i32) -> i32")?,
                "pages_buffer",
                "(i32) -> i32, exported with order_pages: (i32) -> i32",
            )?,
            converge: typed(
                &mut store,
                &instance,
                "converge",
                "(i32, i64, i64, i64, i64, i64, i64, i32) -> i32",
            )?,
            compress: typed(&mut store, &instance, "compress", "(i32, i64, i64, i32) -> i32")?,
        };
        let takes_nothing = hooks.port_read.is_none()
            && hooks.port_write.is_none()
            && hooks.packet.is_none()
            && hooks.block.is_none()
            && hooks.block_data.is_none()
            && hooks.tick.is_none()
            && hooks.phase.is_none()
            && hooks.page_order.is_none()
            && hooks.converge.is_none()
            && hooks.compress.is_none()
            && hooks.metrics.is_none();
        if takes_nothing {
            return Err(LoadError::NoHooks);
        }
        Ok(Self {
            store: Mutex::new(store),
            memory,
            hooks,
            fuel: std::sync::atomic::AtomicU64::new(policy.fuel_per_call),
            digest,
        })
    }

    /// Runs `f` on the module's store with a fresh allowance of fuel.
    fn call<T>(&self, f: impl FnOnce(&mut Store<Host>) -> wasmtime::Result<T>) -> Result<T, HookError> {
        let fuel = self.fuel.load(std::sync::atomic::Ordering::Relaxed);
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.set_fuel(fuel).map_err(|e| HookError::Trap(e.to_string()))?;
        f(&mut store).map_err(|e| match e.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => HookError::OutOfFuel(fuel),
            _ => HookError::Trap(format!("{e:#}")),
        })
    }

    /// Figure `index`'s name, if the module names it well (1-32 of a-z, 0-9, '_').
    fn metric_name(&self, index: i32) -> Option<String> {
        let f = self.hooks.metric_name.as_ref()?;
        let memory = self.memory?;
        let packed = self.call(|s| f.call(s, index)).ok()? as u64;
        let (at, len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
        if !(1..=32).contains(&len) {
            return None;
        }
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let name = memory.data(&*store).get(at..at.checked_add(len)?)?;
        name.iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
            .then(|| String::from_utf8_lossy(name).into_owned())
    }
}

impl Extension for WasmModule {
    fn port_read(&self, offset: u16, size: u8) -> Result<u32, HookError> {
        match &self.hooks.port_read {
            Some(f) => self
                .call(|s| f.call(s, (i32::from(offset), i32::from(size))))
                .map(|v| v as u32),
            None => Ok(u32::MAX),
        }
    }

    fn port_write(&self, offset: u16, size: u8, value: u32) -> Result<(), HookError> {
        match &self.hooks.port_write {
            Some(f) => self.call(|s| f.call(s, (i32::from(offset), i32::from(size), value as i32))),
            None => Ok(()),
        }
    }

    fn packet_snap(&self) -> usize {
        self.hooks.packet.as_ref().map_or(0, |p| p.snap)
    }

    fn packet(
        &self,
        nic: u32,
        direction: PacketDirection,
        head: &mut [u8],
        len: usize,
    ) -> Result<PacketVerdict, HookError> {
        let (Some(hooks), Some(memory)) = (&self.hooks.packet, self.memory) else {
            return Ok(PacketVerdict::Pass);
        };
        let shown = head.len().min(hooks.snap);
        let at = hooks.buffer;
        let outside = || HookError::Trap("its packet buffer left its memory".into());
        let verdict = self.call(|s| {
            memory
                .data_mut(&mut *s)
                .get_mut(at..at + shown)
                .ok_or_else(|| wasmtime::Error::msg("its packet buffer left its memory"))?
                .copy_from_slice(&head[..shown]);
            hooks.packet.call(&mut *s, (nic as i32, direction.code(), len as i32))
        })?;
        match verdict {
            0 => Ok(PacketVerdict::Pass),
            1 => Ok(PacketVerdict::Drop),
            2 => {
                let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
                let bytes = memory.data(&*store).get(at..at + shown).ok_or_else(outside)?;
                head[..shown].copy_from_slice(bytes);
                Ok(PacketVerdict::Rewrite)
            }
            other => Err(HookError::BadAnswer(format!(
                "packet verdict {other} (0 pass, 1 drop, 2 rewrite)"
            ))),
        }
    }

    fn takes_blocks(&self) -> bool {
        self.hooks.block.is_some()
    }

    fn block(&self, disk: u32, kind: u32, sector: u64, bytes: u64) -> Result<BlockVerdict, HookError> {
        let Some(f) = &self.hooks.block else {
            return Ok(BlockVerdict::Allow);
        };
        match self.call(|s| f.call(s, (disk as i32, kind as i32, sector as i64, bytes as i64)))? {
            0 => Ok(BlockVerdict::Allow),
            1 => Ok(BlockVerdict::Refuse),
            other => Err(HookError::BadAnswer(format!(
                "block verdict {other} (0 allow, 1 refuse)"
            ))),
        }
    }

    fn set_limits(&self, policy: &xcloud_vmm::extension::TenantPolicy) {
        self.fuel
            .store(policy.fuel_per_call, std::sync::atomic::Ordering::Relaxed);
    }

    fn takes_block_data(&self) -> bool {
        self.hooks.block_data.is_some() && self.memory.is_some()
    }

    fn block_data(&self, disk: u32, kind: u32, sector: u64, data: &mut [u8]) -> Result<(), HookError> {
        let (Some((buffer, transform)), Some(memory)) = (&self.hooks.block_data, self.memory) else {
            return Ok(());
        };
        let len = i32::try_from(data.len()).map_err(|_| HookError::BadAnswer("a request too large".into()))?;
        let (at, answer) = self.call(|s| {
            let at = usize::try_from(buffer.call(&mut *s, len)?)
                .map_err(|_| wasmtime::Error::msg("it has no room for the request's data"))?;
            at.checked_add(data.len())
                .and_then(|end| memory.data_mut(&mut *s).get_mut(at..end))
                .ok_or_else(|| wasmtime::Error::msg("its block buffer is outside its memory"))?
                .copy_from_slice(data);
            Ok((
                at,
                transform.call(&mut *s, (disk as i32, kind as i32, sector as i64, len))?,
            ))
        })?;
        if answer != 0 {
            return Err(HookError::BadAnswer(format!("block_data answered {answer}")));
        }
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let out = memory
            .data(&*store)
            .get(at..at + data.len())
            .ok_or_else(|| HookError::Trap("its block buffer left its memory".into()))?;
        data.copy_from_slice(out);
        Ok(())
    }

    fn takes_ticks(&self) -> bool {
        self.hooks.tick.is_some()
    }

    fn tick(&self, guest: &mut GuestView) -> Result<(), HookError> {
        let Some(f) = &self.hooks.tick else {
            return Ok(());
        };
        // The view lives in the store for the call (guest_read reaches it there) and comes back.
        let placeholder = GuestView::new(Default::default(), 0);
        let view = std::mem::replace(guest, placeholder);
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.data_mut().guest = Some(view);
        drop(store);
        let result = self.call(|s| f.call(s, ()));
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(view) = store.data_mut().guest.take() {
            *guest = view;
        }
        result
    }

    fn takes_phases(&self) -> bool {
        self.hooks.phase.is_some()
    }

    fn phase(&self, event: &PhaseEvent) -> Result<(), HookError> {
        let Some(f) = &self.hooks.phase else {
            return Ok(());
        };
        let round = i32::try_from(event.round).unwrap_or(i32::MAX);
        let args = (event.phase.code(), round, event.pages as i64, event.bytes_sent as i64);
        self.call(|s| f.call(s, args))
    }

    fn takes_page_order(&self) -> bool {
        self.hooks.page_order.is_some() && self.memory.is_some()
    }

    fn order_pages(&self, pfns: &mut [u64]) -> Result<(), HookError> {
        let (Some((buffer, order)), Some(memory)) = (&self.hooks.page_order, self.memory) else {
            return Ok(());
        };
        let count = i32::try_from(pfns.len()).map_err(|_| HookError::BadAnswer("too many pages".into()))?;
        let bytes = pfns.len() * 8;
        let (at, answer) = self.call(|s| {
            // No room (a negative address): the engine's order, this round.
            let Ok(at) = usize::try_from(buffer.call(&mut *s, count)?) else {
                return Ok((0, 1));
            };
            let room = at
                .checked_add(bytes)
                .and_then(|end| memory.data_mut(&mut *s).get_mut(at..end))
                .ok_or_else(|| wasmtime::Error::msg("its page buffer is outside its memory"))?;
            for (slot, pfn) in room.chunks_exact_mut(8).zip(pfns.iter()) {
                slot.copy_from_slice(&pfn.to_le_bytes());
            }
            Ok((at, order.call(&mut *s, count)?))
        })?;
        match answer {
            0 => {
                let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
                let room = memory
                    .data(&*store)
                    .get(at..at + bytes)
                    .ok_or_else(|| HookError::Trap("its page buffer left its memory".into()))?;
                for (pfn, slot) in pfns.iter_mut().zip(room.chunks_exact(8)) {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(slot);
                    *pfn = u64::from_le_bytes(word);
                }
                Ok(())
            }
            1 => Ok(()),
            other => Err(HookError::BadAnswer(format!(
                "order_pages answered {other} (0 its order, 1 the engine's)"
            ))),
        }
    }

    fn takes_convergence(&self) -> bool {
        self.hooks.converge.is_some()
    }

    fn converge(&self, facts: &RoundFacts) -> Result<Option<Convergence>, HookError> {
        let Some(f) = &self.hooks.converge else {
            return Ok(None);
        };
        let args = (
            i32::try_from(facts.round).unwrap_or(i32::MAX),
            facts.dirty_pages as i64,
            facts.sent_last_round as i64,
            as_i64(facts.bandwidth),
            as_i64(facts.dirty_rate),
            i64::try_from(facts.rtt.as_micros()).unwrap_or(i64::MAX),
            i64::try_from(facts.max_downtime.as_micros()).unwrap_or(i64::MAX),
            round_flags(facts),
        );
        match self.call(|s| f.call(s, args))? {
            0 => Ok(None),
            code => Convergence::from_code(code).map(Some).ok_or_else(|| {
                HookError::BadAnswer(format!(
                    "converge answered {code} (0 the provider's, 1 next round, 2 throttle, 3 stop-and-copy, 4 post-copy)"
                ))
            }),
        }
    }

    fn takes_compression(&self) -> bool {
        self.hooks.compress.is_some()
    }

    fn compress(&self, facts: &RoundFacts) -> Result<Option<bool>, HookError> {
        let Some(f) = &self.hooks.compress else {
            return Ok(None);
        };
        let args = (
            i32::try_from(facts.round).unwrap_or(i32::MAX),
            as_i64(facts.bandwidth),
            as_i64(facts.dirty_rate),
            round_flags(facts),
        );
        match self.call(|s| f.call(s, args))? {
            0 => Ok(None),
            1 => Ok(Some(false)),
            2 => Ok(Some(true)),
            other => Err(HookError::BadAnswer(format!(
                "compress answered {other} (0 the provider's, 1 plain, 2 compressed)"
            ))),
        }
    }

    fn save_state(&self) -> Result<Option<Vec<u8>>, HookError> {
        let (Some(hooks), Some(memory)) = (&self.hooks.state, self.memory) else {
            return Ok(None);
        };
        let packed = self.call(|s| hooks.save.call(s, ()))? as u64;
        let (at, len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
        if len > MAX_MODULE_STATE {
            return Err(HookError::BadAnswer(format!(
                "a state of {len} bytes (at most {MAX_MODULE_STATE})"
            )));
        }
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = at
            .checked_add(len)
            .and_then(|end| memory.data(&*store).get(at..end))
            .ok_or_else(|| HookError::BadAnswer(format!("a state at {at}, {len} bytes, outside its memory")))?;
        Ok(Some(bytes.to_vec()))
    }

    fn restore_state(&self, state: &[u8]) -> Result<(), HookError> {
        let (Some(hooks), Some(memory)) = (&self.hooks.state, self.memory) else {
            return Err(HookError::BadAnswer(
                "it exports no state hooks to take its state".into(),
            ));
        };
        let len = i32::try_from(state.len()).map_err(|_| HookError::BadAnswer("a state too large".into()))?;
        let answer = self.call(|s| {
            let at = usize::try_from(hooks.buffer.call(&mut *s, len)?)
                .map_err(|_| wasmtime::Error::msg("it has no room for its state"))?;
            at.checked_add(state.len())
                .and_then(|end| memory.data_mut(&mut *s).get_mut(at..end))
                .ok_or_else(|| wasmtime::Error::msg("its state buffer is outside its memory"))?
                .copy_from_slice(state);
            hooks.load.call(&mut *s, len)
        })?;
        match answer {
            0 => Ok(()),
            other => Err(HookError::BadAnswer(format!(
                "state_load answered {other}: it refused its state"
            ))),
        }
    }

    fn metrics(&self) -> Vec<(String, f64)> {
        let Some((count, metric)) = &self.hooks.metrics else {
            return Vec::new();
        };
        let n = self.call(|s| count.call(s, ())).unwrap_or(0).clamp(0, 64);
        (0..n)
            .filter_map(|i| {
                let value = self.call(|s| metric.call(s, i)).ok()?;
                let name = self.metric_name(i).unwrap_or_else(|| format!("m{i}"));
                Some((name, value as f64))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<WasmModule, LoadError> {
        WasmModule::load(text.as_bytes(), &Policy::default())
    }

    #[test]
    fn the_key_value_example_stores_and_reads_back() {
        let kv = WasmModule::load(include_bytes!("../../../extensions/kv.wat"), &Policy::default())
            .expect("the example loads");
        assert_eq!(kv.port_read(0, 4).expect("magic"), 0x6b76_0001);
        for key in [0u32, 7, 4095] {
            kv.port_write(4, 4, key).expect("key");
            kv.port_write(8, 4, key * 3 + 1).expect("value");
        }
        kv.port_write(4, 4, 7).expect("key");
        assert_eq!(kv.port_read(8, 4).expect("value"), 22);
        assert_eq!(kv.port_read(12, 4).expect("count"), 3);
        kv.port_write(4, 4, 5000).expect("a key out of range");
        assert_eq!(kv.port_read(8, 4).expect("value"), u32::MAX);
        assert_eq!(kv.metrics(), [("m0".to_string(), 3.0)], "kv names no figure");
        assert_eq!(kv.digest.len(), 64);
    }

    fn example(name: &str) -> WasmModule {
        let path = format!("{}/../../extensions/{name}.wat", env!("CARGO_MANIFEST_DIR"));
        WasmModule::load(&std::fs::read(&path).expect("example"), &Policy::default()).expect("the example loads")
    }

    fn figure(module: &WasmModule, name: &str) -> f64 {
        let metrics = module.metrics();
        metrics
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no figure {name}: {metrics:?}"))
            .1
    }

    /// An Ethernet frame carrying an IPv4 TCP segment to `port` with `flags`, 60 bytes.
    fn tcp_frame(port: u16, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[23] = 6;
        f[34..36].copy_from_slice(&40000u16.to_be_bytes());
        f[36..38].copy_from_slice(&port.to_be_bytes());
        f[47] = flags;
        f
    }

    fn judge(module: &WasmModule, direction: PacketDirection, frame: &[u8]) -> PacketVerdict {
        let mut head = frame[..frame.len().min(module.packet_snap())].to_vec();
        module.packet(0, direction, &mut head, frame.len()).expect("verdict")
    }

    #[test]
    fn the_packet_examples_count_and_filter() {
        let counter = example("packet-counter");
        assert_eq!(counter.packet_snap(), 64);
        assert_eq!(
            judge(&counter, PacketDirection::ToGuest, &tcp_frame(80, 0x02)),
            PacketVerdict::Pass
        );
        assert_eq!(
            judge(&counter, PacketDirection::ToGuest, &tcp_frame(80, 0x12)),
            PacketVerdict::Pass
        );
        assert_eq!(
            judge(&counter, PacketDirection::FromGuest, &[0u8; 1514]),
            PacketVerdict::Pass
        );
        assert_eq!(figure(&counter, "frames_in"), 2.0);
        assert_eq!(figure(&counter, "bytes_in"), 120.0);
        assert_eq!(figure(&counter, "frames_out"), 1.0);
        assert_eq!(figure(&counter, "bytes_out"), 1514.0);
        assert_eq!(figure(&counter, "syns_in"), 1.0, "a SYN-ACK opens nothing");

        let filter = example("packet-filter");
        assert_eq!(
            judge(&filter, PacketDirection::ToGuest, &tcp_frame(5001, 0x02)),
            PacketVerdict::Drop
        );
        assert_eq!(
            judge(&filter, PacketDirection::ToGuest, &tcp_frame(23, 0x10)),
            PacketVerdict::Drop
        );
        assert_eq!(
            judge(&filter, PacketDirection::ToGuest, &tcp_frame(5002, 0x02)),
            PacketVerdict::Pass
        );
        assert_eq!(
            judge(&filter, PacketDirection::FromGuest, &tcp_frame(5001, 0x02)),
            PacketVerdict::Pass
        );
        let mut udp = tcp_frame(6379, 0);
        udp[23] = 17;
        assert_eq!(judge(&filter, PacketDirection::ToGuest, &udp), PacketVerdict::Drop);
        let mut fragment = tcp_frame(5001, 0x02);
        fragment[21] = 8;
        assert_eq!(
            judge(&filter, PacketDirection::ToGuest, &fragment),
            PacketVerdict::Pass,
            "no ports in a later fragment"
        );
        assert_eq!(
            judge(&filter, PacketDirection::ToGuest, &[0xffu8; 20]),
            PacketVerdict::Pass,
            "a runt"
        );
        assert_eq!((figure(&filter, "dropped"), figure(&filter, "passed")), (3.0, 4.0));
    }

    #[test]
    fn a_packet_module_may_rewrite_and_garbage_verdicts_are_errors() {
        let rewriter = load(
            r#"(module (memory (export "memory") 1)
                 (func (export "packet_buffer") (result i32) i32.const 16)
                 (func (export "packet_snap") (result i32) i32.const 4)
                 (func (export "packet") (param i32 i32 i32) (result i32)
                   i32.const 16 i32.const 0x01020304 i32.store i32.const 2))"#,
        )
        .expect("loads");
        let mut head = vec![0u8; 4];
        assert_eq!(
            rewriter
                .packet(0, PacketDirection::FromGuest, &mut head, 1000)
                .expect("verdict"),
            PacketVerdict::Rewrite
        );
        assert_eq!(head, [4, 3, 2, 1]);
        let garbage = load(
            r#"(module (memory (export "memory") 1)
                 (func (export "packet_buffer") (result i32) i32.const 0)
                 (func (export "packet_snap") (result i32) i32.const 64)
                 (func (export "packet") (param i32 i32 i32) (result i32) i32.const 7))"#,
        )
        .expect("loads");
        assert!(matches!(
            garbage.packet(0, PacketDirection::ToGuest, &mut [0u8; 64], 64),
            Err(HookError::BadAnswer(_))
        ));
        // A buffer outside its memory, or a snap of nothing, is refused at load.
        for (buffer, snap) in [(65530, 64), (0, 0), (-1, 64), (0, 70000)] {
            let text = format!(
                r#"(module (memory (export "memory") 1)
                     (func (export "packet_buffer") (result i32) i32.const {buffer})
                     (func (export "packet_snap") (result i32) i32.const {snap})
                     (func (export "packet") (param i32 i32 i32) (result i32) i32.const 0))"#
            );
            assert!(
                matches!(load(&text), Err(LoadError::PacketBuffer(_))),
                "{buffer} {snap}"
            );
        }
        assert!(
            matches!(
                load(r#"(module (func (export "packet") (param i32 i32 i32) (result i32) i32.const 0))"#),
                Err(LoadError::Signature { .. })
            ),
            "packet without its buffer"
        );
    }

    #[test]
    fn the_block_audit_example_logs_writes_and_guards_the_boot_sectors() {
        let audit = example("block-audit");
        assert!(audit.takes_blocks());
        assert_eq!(audit.block(0, 1, 100, 4096).expect("verdict"), BlockVerdict::Allow);
        assert_eq!(audit.block(0, 1, 2048, 512).expect("verdict"), BlockVerdict::Allow);
        assert_eq!(
            audit.block(0, 0, 0, 512).expect("verdict"),
            BlockVerdict::Allow,
            "reads pass"
        );
        assert_eq!(audit.block(0, 1, 7, 512).expect("verdict"), BlockVerdict::Refuse);
        assert_eq!(
            audit.block(0, 4, 0, 0).expect("verdict"),
            BlockVerdict::Allow,
            "a flush"
        );
        assert_eq!(figure(&audit, "writes"), 2.0);
        assert_eq!(figure(&audit, "bytes_written"), 4608.0);
        assert_eq!(figure(&audit, "refused"), 1.0);
        assert_eq!(figure(&audit, "reads"), 1.0);
        assert_eq!(figure(&audit, "last_sector"), 2048.0);
        let garbage = load(r#"(module (func (export "block") (param i32 i32 i64 i64) (result i32) i32.const -5))"#)
            .expect("loads");
        assert!(matches!(garbage.block(0, 1, 0, 0), Err(HookError::BadAnswer(_))));
    }

    fn guest_ram(bytes: usize) -> vm_memory::GuestMemoryMmap {
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), bytes)]).expect("guest RAM")
    }

    #[test]
    fn the_memory_scanner_finds_the_marker_within_its_budget() {
        use vm_memory::Bytes;
        let ram = guest_ram(4 << 20);
        ram.write_slice(b"xcloud_memscan_marker", vm_memory::GuestAddress(0x12_3458))
            .expect("marker");
        // A marker across the line between two chunks is seen too.
        ram.write_slice(b"xcloud_memscan_marker", vm_memory::GuestAddress(0x7_fff8))
            .expect("marker");
        let scanner = example("memscan");
        assert!(scanner.takes_ticks());
        for _ in 0..10 {
            scanner.tick(&mut GuestView::new(ram.clone(), 1 << 20)).expect("tick");
        }
        assert_eq!(figure(&scanner, "found_at"), 0x12_3458 as f64);
        assert_eq!(figure(&scanner, "found"), 2.0);
        assert_eq!(figure(&scanner, "sweeps"), 1.0);
        // Within a budget too small for its chunk, it reads nothing.
        let starved = example("memscan");
        let mut view = GuestView::new(ram.clone(), 4096);
        starved.tick(&mut view).expect("tick");
        assert_eq!(view.left(), 4096);
        assert_eq!(figure(&starved, "scanned_kib"), 0.0);
    }

    #[test]
    fn guest_reads_are_bounded_and_only_in_a_tick() {
        let ram = guest_ram(1 << 20);
        // Tries a read the test names by the global's value and keeps the answer at 0.
        let probe = |gpa: i64, into: i32, len: i32| {
            load(&format!(
                r#"(module (import "xcloud" "guest_read" (func $r (param i64 i32 i32) (result i32)))
                     (memory (export "memory") 1)
                     (func (export "tick") (i32.store (i32.const 0) (call $r (i64.const {gpa}) (i32.const {into}) (i32.const {len}))))
                     (func (export "port_read") (param i32 i32) (result i32) (call $r (i64.const 0) (i32.const 0) (i32.const 4)))
                     (func (export "metric_count") (result i32) i32.const 1)
                     (func (export "metric") (param i32) (result i64) (i64.load32_s (i32.const 0))))"#
            ))
            .expect("loads")
        };
        for (gpa, into, len, answer) in [
            (0, 16, 4096, 0.0),
            ((1 << 20) - 8, 16, 16, -1.0),
            (-1, 16, 8, -1.0),
            (0, 65000, 4096, -3.0),
            (0, -8, 8, -3.0),
            (0, 16, 70000, -3.0),
            (0, 16, 8192, -2.0),
        ] {
            let module = probe(gpa, into, len);
            module.tick(&mut GuestView::new(ram.clone(), 4096)).expect("tick");
            assert_eq!(module.metrics()[0].1, answer, "{gpa} {into} {len}");
        }
        assert_eq!(
            probe(0, 0, 4).port_read(0, 4).expect("read") as i32,
            -4,
            "not in a tick"
        );
        assert!(matches!(
            load(r#"(module (import "xcloud" "guest_read" (func (param i32))) (func (export "tick")))"#),
            Err(LoadError::Instantiate(_))
        ));
        assert!(matches!(
            load(r#"(module (import "xcloud" "guest_write" (func)) (func (export "tick")))"#),
            Err(LoadError::Imports(_))
        ));
    }

    #[test]
    fn the_key_value_store_carries_its_state_to_a_fresh_instance() {
        let kv = example("kv");
        for key in [1u32, 7, 4095] {
            kv.port_write(4, 4, key).expect("key");
            kv.port_write(8, 4, key * 5).expect("value");
        }
        let state = kv.save_state().expect("saved").expect("kv exports its state");
        assert_eq!(state.len(), 20_488);
        let moved = example("kv");
        moved.restore_state(&state).expect("taken");
        moved.port_write(4, 4, 7).expect("key");
        assert_eq!(moved.port_read(8, 4).expect("value"), 35);
        assert_eq!(moved.port_read(12, 4).expect("count"), 3);
        moved.port_write(4, 4, 8).expect("key");
        assert_eq!(moved.port_read(8, 4).expect("value"), u32::MAX, "never stored");
        assert!(
            example("kv").restore_state(&state[..100]).is_err(),
            "a state of the wrong length"
        );
        assert!(
            matches!(
                example("packet-counter").restore_state(&state),
                Err(HookError::BadAnswer(_))
            ),
            "no state hooks"
        );
        assert!(example("packet-counter").save_state().expect("none").is_none());
        let outside = load(
            r#"(module (memory (export "memory") 1)
                 (func (export "state_save") (result i64) i64.const 0x0000fff000001000)
                 (func (export "state_buffer") (param i32) (result i32) i32.const 0)
                 (func (export "state_load") (param i32) (result i32) i32.const 0)
                 (func (export "tick")))"#,
        )
        .expect("loads");
        assert!(matches!(outside.save_state(), Err(HookError::BadAnswer(_))));
        assert!(matches!(outside.restore_state(&[0u8; 70_000]), Err(HookError::Trap(_))));
    }

    #[test]
    fn the_hot_last_policy_sends_pages_dirtied_before_last() {
        use xcloud_vmm::extension::{Phase, PhaseEvent};
        let policy = example("hot-last");
        assert!(policy.takes_page_order() && policy.takes_phases());
        let event = |phase| PhaseEvent {
            phase,
            round: 1,
            pages: 0,
            bytes_sent: 0,
        };
        policy.phase(&event(Phase::FirstPass)).expect("phase");
        let mut first = vec![5u64, 9, 2, 7];
        policy.order_pages(&mut first).expect("ordered");
        assert_eq!(first, [5, 9, 2, 7], "nothing seen yet: the engine's order");
        let mut second = vec![1u64, 9, 3, 5, 8, 1 << 40];
        policy.order_pages(&mut second).expect("ordered");
        assert_eq!(second, [1, 3, 8, 1 << 40, 9, 5], "9 and 5 were dirty before: last");
        let mut huge = (0..20_000u64).rev().collect::<Vec<_>>();
        let before = huge.clone();
        policy.order_pages(&mut huge).expect("not this round");
        assert_eq!(huge, before, "a round too large keeps the engine's order");
        policy.phase(&event(Phase::Migrated)).expect("phase");
        assert_eq!(figure(&policy, "rounds"), 2.0);
        assert_eq!(figure(&policy, "hot_pages"), 2.0);
        assert_eq!(figure(&policy, "ordered_pages"), 10.0);
        assert_eq!(figure(&policy, "migrations"), 1.0);
        // A new migration forgets what was seen.
        policy.phase(&event(Phase::FirstPass)).expect("phase");
        let mut again = vec![9u64, 5, 4];
        policy.order_pages(&mut again).expect("ordered");
        assert_eq!(again, [9, 5, 4]);
    }

    #[test]
    fn a_page_order_that_is_not_the_same_pages_is_refused_by_the_registry() {
        use std::sync::Arc;
        use xcloud_vmm::extension::{Extensions, ModuleSpec, Origin};
        let liar = load(
            r#"(module (memory (export "memory") 1)
                 (func (export "pages_buffer") (param i32) (result i32) i32.const 0)
                 (func (export "order_pages") (param i32) (result i32) (i64.store (i32.const 0) (i64.const 999)) i32.const 0))"#,
        )
        .expect("loads");
        let registry = Extensions::new();
        let spec = ModuleSpec {
            name: "liar".into(),
            version: "1".into(),
            digest: "x".into(),
            origin: Origin::Tenant,
            ports: None,
            call_budget: std::time::Duration::from_secs(1),
            code: None,
        };
        registry.add(spec, Arc::new(liar)).expect("added");
        let mut pfns = vec![1u64, 2, 3];
        registry.order_pages(&mut pfns);
        assert_eq!(pfns, [1, 2, 3], "the engine's order stands");
        let why = registry.list()[0].disabled.clone().expect("disabled");
        assert!(why.contains("not the same pages"), "{why}");
    }

    #[test]
    fn a_tenant_convergence_policy_replaces_the_providers_answers_within_the_migrations_bounds() {
        use std::sync::Arc;
        use xcloud_vmm::convergence::PrecopyPolicy;
        use xcloud_vmm::extension::{Convergence, Extensions, ModuleSpec, Origin, RoundFacts};
        let spec = |name: &str, origin| ModuleSpec {
            name: name.into(),
            version: "1".into(),
            digest: "x".into(),
            origin,
            ports: None,
            call_budget: std::time::Duration::from_secs(1),
            code: None,
        };
        let registry = Extensions::new();
        registry
            .add(spec("precopy", Origin::Provider), Arc::new(PrecopyPolicy::new()))
            .expect("added");
        // A dirty set that does not fit: the provider's policy sends another round.
        let facts = |round, bandwidth: f64, postcopy_allowed| RoundFacts {
            round,
            dirty_pages: 50_000,
            sent_last_round: 60_000,
            bandwidth,
            dirty_rate: 1e6,
            max_downtime: std::time::Duration::from_millis(50),
            max_rounds: 30,
            throttle_allowed: true,
            postcopy_allowed,
            ..RoundFacts::default()
        };
        assert_eq!(registry.converge(&facts(0, 1e9, false)), Some(Convergence::NextRound));
        assert!(!registry.compress(&facts(0, 1e9, false)), "the migration's option");
        registry
            .add(spec("quick-switch", Origin::Tenant), Arc::new(example("quick-switch")))
            .expect("added");
        // Rounds 0 and 1: the tenant leaves it to the provider; from round 2 it switches.
        assert_eq!(registry.converge(&facts(1, 1e9, true)), Some(Convergence::NextRound));
        assert_eq!(registry.converge(&facts(2, 1e9, true)), Some(Convergence::PostCopy));
        assert_eq!(registry.converge(&facts(2, 1e9, false)), Some(Convergence::StopAndCopy));
        // Compressed on a 50 MB/s link, plain on a 1 GB/s one (over the option).
        assert!(registry.compress(&facts(1, 50e6, false)));
        let mut compressing = facts(1, 1e9, false);
        compressing.compress_option = true;
        assert!(!registry.compress(&compressing));
        let qs = registry
            .list()
            .into_iter()
            .find(|m| m.spec.name == "quick-switch")
            .expect("listed");
        assert!(qs.metrics.contains(&("switches".into(), 2.0)), "{:?}", qs.metrics);
        assert!(
            qs.metrics.contains(&("compressed_rounds".into(), 1.0)),
            "{:?}",
            qs.metrics
        );

        // A policy that answers post-copy where the migration does not allow it, or garbage,
        // is disabled, and the provider's answer stands.
        for (name, answer) in [("eager", 4), ("garbage", 17)] {
            let registry = Extensions::new();
            registry
                .add(spec("precopy", Origin::Provider), Arc::new(PrecopyPolicy::new()))
                .expect("added");
            let hostile = load(&format!(
                r#"(module (func (export "converge") (param i32 i64 i64 i64 i64 i64 i64 i32) (result i32) i32.const {answer}))"#
            ))
            .expect("loads");
            registry
                .add(spec(name, Origin::Tenant), Arc::new(hostile))
                .expect("added");
            assert_eq!(registry.converge(&facts(0, 1e9, false)), Some(Convergence::NextRound));
            let why = registry.list()[1].disabled.clone().expect("disabled");
            assert!(why.contains("converge"), "{why}");
        }
        assert!(matches!(
            load(r#"(module (func (export "converge") (param i32 i64) (result i32) i32.const 0))"#),
            Err(LoadError::Signature { .. })
        ));
        // A tenant's policy needs the migration grant.
        let registry = Extensions::new();
        registry.set_policy(xcloud_vmm::extension::TenantPolicy::parse("migration=no").expect("policy"));
        assert!(registry
            .add(spec("quick-switch", Origin::Tenant), Arc::new(example("quick-switch")))
            .is_err());
    }

    #[test]
    fn a_module_prepared_ahead_is_loaded_from_what_was_compiled() {
        super::register_loader();
        // Bytes of their own, so that no other test compiled them.
        let text = br#"(module (func (export "port_read") (param i32 i32) (result i32) i32.const 424242))"#;
        let key = sha256_hex(text);
        let compiled = || COMPILED.lock().unwrap().iter().any(|(k, _, _)| *k == key);
        assert!(!compiled());
        xcloud_vmm::extension::prepare_module(text);
        assert!(compiled(), "prepared");
        let module = load(std::str::from_utf8(text).unwrap()).expect("loads");
        assert_eq!(module.port_read(0, 4).expect("read"), 424242);
        assert_eq!(module.digest, sha256_hex(&wat::parse_bytes(text).unwrap()));
        // Garbage prepared is only refused when it is loaded.
        xcloud_vmm::extension::prepare_module(b"not wasm");
        assert!(matches!(load("not wasm"), Err(LoadError::NotWasm(_))));
    }

    #[test]
    fn the_disk_cipher_example_is_its_own_inverse_per_word_of_the_disk() {
        let cipher = example("disk-cipher");
        assert!(cipher.takes_block_data());
        // A 256 KiB request takes more than the default fuel: the provider grants more.
        let needy = xcloud_vmm::extension::TenantPolicy::default();
        cipher.set_limits(&needy);
        assert!(matches!(
            cipher.block_data(0, 1, 0, &mut vec![0u8; 262_144]),
            Err(HookError::OutOfFuel(_))
        ));
        cipher.set_limits(&xcloud_vmm::extension::TenantPolicy {
            fuel_per_call: 4 << 20,
            ..needy
        });
        let plain: Vec<u8> = (0..262_144u32).map(|i| (i * 7) as u8).collect();
        let mut data = plain.clone();
        cipher.block_data(0, 1, 100, &mut data).expect("encrypted");
        assert_ne!(data, plain);
        assert!(data.windows(8).step_by(8).all(|w| w != [0u8; 8]), "no word left as is");
        // The keystream depends on where: the same bytes elsewhere differ.
        let mut elsewhere = plain.clone();
        cipher.block_data(0, 1, 101, &mut elsewhere).expect("encrypted");
        assert_ne!(elsewhere, data);
        cipher.block_data(0, 0, 100, &mut data).expect("decrypted");
        assert_eq!(data, plain);
        assert_eq!(
            figure(&cipher, "bytes_encrypted"),
            524_288.0,
            "the first, out of fuel, counted nothing"
        );
        assert_eq!(figure(&cipher, "bytes_decrypted"), 262_144.0);
        // Not whole words: refused, as garbage.
        assert!(matches!(
            cipher.block_data(0, 1, 0, &mut [0u8; 12]),
            Err(HookError::BadAnswer(_))
        ));
        // Over its buffer: no room, a failure (the request fails, the module is disabled).
        assert!(cipher.block_data(0, 1, 0, &mut vec![0u8; 2 << 20]).is_err());
    }

    #[test]
    fn hostile_modules_are_refused_or_trap_and_never_hang() {
        // Refused when they load.
        let refused = [
            ("not wasm", "\u{7f}ELF"),
            (
                "an import",
                r#"(module (import "wasi" "fd_write" (func)) (func (export "port_read") (param i32 i32) (result i32) i32.const 0))"#,
            ),
            (
                "a huge memory",
                r#"(module (memory 1000) (func (export "port_read") (param i32 i32) (result i32) i32.const 0))"#,
            ),
            (
                "a wrong signature",
                r#"(module (func (export "port_read") (param i64) (result i32) i32.const 0))"#,
            ),
            ("no hook", r#"(module (func (export "main")))"#),
            (
                "a start that loops",
                r#"(module (func $s (loop br 0)) (start $s) (func (export "port_read") (param i32 i32) (result i32) i32.const 0))"#,
            ),
        ];
        for (what, text) in refused {
            assert!(load(text).is_err(), "{what} was loaded");
        }
        let big = vec![b' '; Policy::default().module_bytes + 1];
        assert!(matches!(
            WasmModule::load(&big, &Policy::default()),
            Err(LoadError::TooLarge(..))
        ));

        // Trap at the call, and the next call traps again rather than hanging.
        let looping =
            load(r#"(module (func (export "port_read") (param i32 i32) (result i32) (loop br 0) i32.const 0))"#)
                .expect("loads");
        let started = std::time::Instant::now();
        assert!(matches!(looping.port_read(0, 4), Err(HookError::OutOfFuel(_))));
        assert!(matches!(looping.port_read(0, 4), Err(HookError::OutOfFuel(_))));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let out_of_bounds = load(
            r#"(module (memory 1) (func (export "port_read") (param i32 i32) (result i32) i32.const 0x7ffffff0 i32.load))"#,
        )
        .expect("loads");
        assert!(matches!(out_of_bounds.port_read(0, 4), Err(HookError::Trap(_))));
        let recursing = load(
            r#"(module (func $f (export "port_write") (param i32 i32 i32) local.get 0 local.get 1 local.get 2 call $f))"#,
        )
        .expect("loads");
        assert!(recursing.port_write(0, 4, 0).is_err());
        // Growing past the limit fails inside the module (memory.grow answers -1).
        let grower = load(
            r#"(module (memory 1) (func (export "port_read") (param i32 i32) (result i32) i32.const 1000 memory.grow))"#,
        )
        .expect("loads");
        assert_eq!(grower.port_read(0, 4).expect("no trap"), u32::MAX);
    }
}
