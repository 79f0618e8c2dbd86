//! The extension host (docs/extensions.md): a tenant's WebAssembly module as an
//! [`Extension`] of the VMM, run by wasmtime in a sandbox the provider's [`Policy`] sets.
//!
//! - No imports: a module reaches nothing but its own memory and what its hooks are given
//!   (no WASI, no host functions).
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
//! | `metric_count`, `metric` | `() -> i32`, `(i32) -> i64` | the figures it exports (`metric(i)`, i < count) |

#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::sync::{Mutex, OnceLock};
use wasmtime::{Engine, Instance, Module, Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc};
use xcloud_vmm::extension::{Extension, HookError};

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
    /// It imports something: nothing is granted to tenant modules.
    #[error("it imports {0}: a module may import nothing")]
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
    /// It exports no hook.
    #[error("it exports no hook (port_read, port_write, metric_count)")]
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

struct Hooks {
    port_read: Option<TypedFunc<(i32, i32), i32>>,
    port_write: Option<TypedFunc<(i32, i32, i32), ()>>,
    metrics: Option<(TypedFunc<(), i32>, TypedFunc<i32, i64>)>,
}

/// A loaded tenant module.
pub struct WasmModule {
    store: Mutex<Store<StoreLimits>>,
    hooks: Hooks,
    fuel: u64,
    /// SHA-256 of the Wasm (hex).
    pub digest: String,
}

/// The SHA-256 of `bytes`, in hex.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    store: &mut Store<StoreLimits>,
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

impl WasmModule {
    /// Loads `bytes` (Wasm, or its text form) under `policy`.
    pub fn load(bytes: &[u8], policy: &Policy) -> Result<Self, LoadError> {
        if bytes.len() > policy.module_bytes {
            return Err(LoadError::TooLarge(bytes.len(), policy.module_bytes));
        }
        let wasm = wat::parse_bytes(bytes).map_err(|e| LoadError::NotWasm(e.to_string()))?;
        let engine = engine(policy)?;
        let module = Module::new(engine, &wasm).map_err(|e| LoadError::NotWasm(format!("{e:#}")))?;
        if let Some(import) = module.imports().next() {
            return Err(LoadError::Imports(format!("{}::{}", import.module(), import.name())));
        }
        let limits = StoreLimitsBuilder::new()
            .memory_size(policy.memory_bytes)
            .memories(1)
            .tables(1)
            .table_elements(10_000)
            .instances(1)
            .build();
        let mut store = Store::new(engine, limits);
        store.limiter(|limits| limits);
        store
            .set_fuel(policy.fuel_per_call)
            .map_err(|e| LoadError::Engine(e.to_string()))?;
        let instance = Instance::new(&mut store, &module, &[]).map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
        let hooks = Hooks {
            port_read: typed(&mut store, &instance, "port_read", "(i32, i32) -> i32")?,
            port_write: typed(&mut store, &instance, "port_write", "(i32, i32, i32)")?,
            metrics: match (
                typed(&mut store, &instance, "metric_count", "() -> i32")?,
                typed(&mut store, &instance, "metric", "(i32) -> i64")?,
            ) {
                (Some(count), Some(metric)) => Some((count, metric)),
                (None, None) => None,
                _ => {
                    return Err(LoadError::Signature {
                        name: "metric_count",
                        signature: "() -> i32, exported with metric: (i32) -> i64",
                    })
                }
            },
        };
        if hooks.port_read.is_none() && hooks.port_write.is_none() && hooks.metrics.is_none() {
            return Err(LoadError::NoHooks);
        }
        Ok(Self {
            store: Mutex::new(store),
            hooks,
            fuel: policy.fuel_per_call,
            digest: sha256_hex(&wasm),
        })
    }

    /// Runs `f` on the module's store with a fresh allowance of fuel.
    fn call<T>(&self, f: impl FnOnce(&mut Store<StoreLimits>) -> wasmtime::Result<T>) -> Result<T, HookError> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.set_fuel(self.fuel).map_err(|e| HookError::Trap(e.to_string()))?;
        f(&mut store).map_err(|e| match e.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => HookError::OutOfFuel(self.fuel),
            _ => HookError::Trap(format!("{e:#}")),
        })
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

    fn metrics(&self) -> Vec<(String, f64)> {
        let Some((count, metric)) = &self.hooks.metrics else {
            return Vec::new();
        };
        let n = self.call(|s| count.call(s, ())).unwrap_or(0).clamp(0, 64);
        (0..n)
            .filter_map(|i| {
                self.call(|s| metric.call(s, i))
                    .ok()
                    .map(|v| (format!("m{i}"), v as f64))
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
        assert_eq!(kv.metrics(), [("m0".to_string(), 3.0)]);
        assert_eq!(kv.digest.len(), 64);
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
