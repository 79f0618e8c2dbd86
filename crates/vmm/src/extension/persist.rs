//! Tenant modules carried by snapshots and migrations: section kind `extension`, one instance
//! per tenant module in the order they were installed. Layout version 1: name, version and
//! digest (blobs of at most 32, 64 and 64 bytes), whether it serves ports (u8) then its first
//! port and count (u32 each), its call budget (u64 microseconds), its calls, busy nanoseconds
//! and failures (u64 each), why it is disabled (a blob of at most 1024 bytes, empty when it is
//! not), its code (a blob of at most [`MAX_TENANT_CODE`]), whether it exported state (u8) and
//! the state (a blob of at most [`MAX_MODULE_STATE`]).
//!
//! The provider's built-ins are not carried: every VMM has its own. Where the VM goes on, each
//! module is loaded again from its code by the process's loader ([`super::set_module_loader`]),
//! checked against its digest's length and name rules like any module, and given its state;
//! a module whose state it refuses goes on disabled, saying why, and the VM goes on.

use super::{Extensions, Installed, ModuleSpec, Origin, LOADER, MAX_MODULE_STATE, MAX_TENANT_CODE};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use xcloud_state::format::put_blob;
use xcloud_state::{Component, Fields, FormatError, Persist, StateError, StateTree};

/// One tenant module as a snapshot or a migration carries it.
pub struct ModuleState {
    name: String,
    version: String,
    digest: String,
    ports: Option<(u16, u16)>,
    call_budget: Duration,
    calls: u64,
    busy_nanos: u64,
    failures: u64,
    disabled: Option<String>,
    code: Vec<u8>,
    state: Option<Vec<u8>>,
}

impl Persist for ModuleState {
    const KIND: &'static str = "extension";
    const VERSION: u32 = 1;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_blob(&mut out, self.name.as_bytes());
        put_blob(&mut out, self.version.as_bytes());
        put_blob(&mut out, self.digest.as_bytes());
        let (has_ports, (base, count)) = (self.ports.is_some(), self.ports.unwrap_or((0, 0)));
        out.push(u8::from(has_ports));
        out.extend_from_slice(&u32::from(base).to_le_bytes());
        out.extend_from_slice(&u32::from(count).to_le_bytes());
        let budget_us = u64::try_from(self.call_budget.as_micros()).unwrap_or(u64::MAX);
        for n in [budget_us, self.calls, self.busy_nanos, self.failures] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        put_blob(&mut out, self.disabled.as_deref().unwrap_or("").as_bytes());
        put_blob(&mut out, &self.code);
        out.push(u8::from(self.state.is_some()));
        put_blob(&mut out, self.state.as_deref().unwrap_or(&[]));
        out
    }

    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError> {
        if version != 1 {
            return Err(xcloud_state::persist::unknown_version::<Self>(version));
        }
        let mut f = Fields::new(body, "extension");
        let text = |f: &mut Fields, max: usize, what: &str| -> Result<String, FormatError> {
            String::from_utf8(f.blob(max)?.to_vec()).map_err(|_| FormatError::Malformed {
                what: "extension",
                detail: format!("its {what} is not UTF-8"),
            })
        };
        let name = text(&mut f, 32, "name")?;
        let version = text(&mut f, 64, "version")?;
        let digest = text(&mut f, 64, "digest")?;
        let has_ports = f.u8()? != 0;
        let (base, count) = (f.u32()?, f.u32()?);
        let port = |n: u32| {
            u16::try_from(n).map_err(|_| FormatError::Malformed {
                what: "extension",
                detail: format!("port {n} is not a 16-bit port"),
            })
        };
        let ports = if has_ports {
            Some((port(base)?, port(count)?))
        } else {
            None
        };
        let call_budget = Duration::from_micros(f.u64()?);
        let (calls, busy_nanos, failures) = (f.u64()?, f.u64()?, f.u64()?);
        let disabled = Some(text(&mut f, 1024, "reason")?).filter(|r| !r.is_empty());
        let code = f.blob(MAX_TENANT_CODE)?.to_vec();
        let has_state = f.u8()? != 0;
        let state = f.blob(MAX_MODULE_STATE)?.to_vec();
        f.finish()?;
        Ok(Self {
            name,
            version,
            digest,
            ports,
            call_budget,
            calls,
            busy_nanos,
            failures,
            disabled,
            code,
            state: has_state.then_some(state),
        })
    }
}

impl Extensions {
    /// The module as it is carried: its state asked of it now (a module whose state hook
    /// fails or exports too much is carried disabled, with no state).
    fn carried(m: &Installed, code: &[u8]) -> ModuleState {
        let state = match m.call("state_save", |e| e.save_state()) {
            Some(Some(state)) if state.len() > MAX_MODULE_STATE => {
                m.disable(format!(
                    "it exported {} bytes of state, over the {MAX_MODULE_STATE} a module may",
                    state.len()
                ));
                None
            }
            Some(state) => state,
            None => None,
        };
        ModuleState {
            name: m.spec.name.clone(),
            version: m.spec.version.clone(),
            digest: m.spec.digest.clone(),
            ports: m.spec.ports,
            call_budget: m.spec.call_budget,
            calls: m.calls.load(Ordering::Relaxed),
            busy_nanos: m.busy_nanos.load(Ordering::Relaxed),
            failures: m.failures.load(Ordering::Relaxed),
            disabled: m.disabled.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            code: code.to_vec(),
            state,
        }
    }

    /// Loads a carried module and gives it its state.
    fn bring_back(&self, saved: ModuleState) -> Result<(), StateError> {
        let loader = LOADER.get().ok_or_else(|| {
            StateError::Incompatible(format!(
                "it carries the tenant module {}, and this VMM has no module loader",
                saved.name
            ))
        })?;
        let module = loader(&saved.code)
            .map_err(|why| StateError::Incompatible(format!("its module {} does not load here: {why}", saved.name)))?;
        let mut disabled = saved.disabled;
        if disabled.is_none() {
            if let Some(state) = &saved.state {
                if let Err(e) = module.restore_state(state) {
                    disabled = Some(format!("it refused its state where the VM went on: {e}"));
                }
            }
        }
        let spec = ModuleSpec {
            name: saved.name,
            version: saved.version,
            digest: saved.digest,
            origin: Origin::Tenant,
            ports: saved.ports,
            call_budget: saved.call_budget,
            code: Some(Arc::from(saved.code)),
        };
        let name = spec.name.clone();
        self.add_granted(spec, module, disabled)
            .map_err(|e| StateError::Incompatible(format!("its module {name}: {e}")))?;
        if let Some(m) = self.read().iter().find(|m| m.spec.name == name) {
            m.calls.store(saved.calls, Ordering::Relaxed);
            m.busy_nanos.store(saved.busy_nanos, Ordering::Relaxed);
            m.failures.store(saved.failures, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Component for Extensions {
    fn name(&self) -> &'static str {
        "extensions"
    }

    fn save(&self, into: &mut StateTree) -> Result<(), StateError> {
        let carried: Vec<ModuleState> = self
            .read()
            .iter()
            .filter(|m| m.spec.origin == Origin::Tenant)
            .filter_map(|m| m.spec.code.as_ref().map(|code| Self::carried(m, code)))
            .collect();
        for (instance, module) in carried.iter().enumerate() {
            into.save(instance as u32, module)?;
        }
        Ok(())
    }

    fn restore(&self, from: &mut StateTree) -> Result<(), StateError> {
        let mut instance = 0;
        while let Some(saved) = from.load::<ModuleState>(instance)? {
            self.bring_back(saved)?;
            instance += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extension::{Extension, HookError, TenantPolicy};
    use std::sync::Mutex;

    /// Holds a number, exports it as its state; refuses a state of the wrong size.
    #[derive(Default)]
    struct Counter(Mutex<u32>);

    impl Extension for Counter {
        fn port_write(&self, _offset: u16, _size: u8, value: u32) -> Result<(), HookError> {
            *self.0.lock().expect("lock") = value;
            Ok(())
        }
        fn port_read(&self, _offset: u16, _size: u8) -> Result<u32, HookError> {
            Ok(*self.0.lock().expect("lock"))
        }
        fn save_state(&self) -> Result<Option<Vec<u8>>, HookError> {
            Ok(Some(self.0.lock().expect("lock").to_le_bytes().to_vec()))
        }
        fn restore_state(&self, state: &[u8]) -> Result<(), HookError> {
            let bytes: [u8; 4] = state.try_into().map_err(|_| HookError::BadAnswer("size".into()))?;
            *self.0.lock().expect("lock") = u32::from_le_bytes(bytes);
            Ok(())
        }
    }

    fn spec(name: &str, code: &[u8]) -> ModuleSpec {
        ModuleSpec {
            name: name.into(),
            version: "2.1".into(),
            digest: "d".repeat(64),
            origin: Origin::Tenant,
            ports: Some((xcloud_abi::EXT_PORT_BASE, 8)),
            call_budget: Duration::from_millis(20),
            code: Some(Arc::from(code)),
        }
    }

    #[test]
    fn tenant_modules_travel_with_their_state_and_the_providers_stay() {
        crate::extension::set_module_loader(Box::new(|code: &[u8]| match code {
            b"counter" => Ok(Arc::new(Counter::default()) as Arc<dyn Extension>),
            _ => Err("not a module this loader knows".into()),
        }));
        let source = Extensions::new();
        let counter = Arc::new(Counter::default());
        counter.port_write(0, 4, 41).expect("write");
        source.add(spec("counter", b"counter"), counter).expect("added");
        let mut provider = spec("meter", b"");
        provider.origin = Origin::Provider;
        provider.ports = None;
        provider.code = None;
        source.add(provider, Arc::new(Counter::default())).expect("provider");
        let mut tree = StateTree::new();
        source.save(&mut tree).expect("saved");
        assert_eq!(tree.sections().len(), 1, "the provider's module is not carried");
        // Through the file form, as a snapshot or a migration carries it.
        let mut tree = StateTree::decode(&tree.encode().expect("encoded")).expect("decoded");

        let here = Extensions::new();
        here.restore(&mut tree).expect("restored");
        tree.ensure_all_taken().expect("every section taken");
        let listed = here.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].spec.name.as_str(), listed[0].spec.version.as_str()),
            ("counter", "2.1")
        );
        assert_eq!(listed[0].spec.ports, Some((xcloud_abi::EXT_PORT_BASE, 8)));
        assert!(listed[0].disabled.is_none());
        let ports = crate::extension::ExtensionPorts::new(Arc::new(here));
        let mut word = [0u8; 4];
        xcloud_devices::bus::PortDevice::read(&ports, 0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 41, "its state came along");
    }

    #[test]
    fn a_policy_that_does_not_grant_a_carried_modules_hook_disables_it() {
        let here = Extensions::new();
        here.add(spec("counter", b"x"), Arc::new(Counter::default()))
            .expect("added");
        here.set_policy(TenantPolicy {
            ports: false,
            ..TenantPolicy::default()
        });
        let why = here.list()[0].disabled.clone().expect("disabled");
        assert!(why.contains("port-I/O"), "{why}");
    }

    #[test]
    fn damaged_sections_are_refused() {
        let saved = ModuleState {
            name: "kv".into(),
            version: "1".into(),
            digest: "ab".into(),
            ports: Some((0x5000, 16)),
            call_budget: Duration::from_millis(50),
            calls: 3,
            busy_nanos: 4,
            failures: 0,
            disabled: None,
            code: b"(module)".to_vec(),
            state: Some(vec![1, 2, 3]),
        };
        let body = saved.encode();
        let back = ModuleState::decode(1, &body).expect("decoded");
        assert_eq!(
            (back.name.as_str(), back.ports, back.state.as_deref()),
            ("kv", Some((0x5000, 16)), Some(&[1u8, 2, 3][..]))
        );
        for cut in [0, 5, body.len() - 1] {
            assert!(ModuleState::decode(1, &body[..cut]).is_err(), "cut at {cut}");
        }
        assert!(ModuleState::decode(2, &body).is_err());
        let mut wide_port = body.clone();
        // The first port, after three blobs (4-byte lengths) and the ports flag.
        let at = 4 + 2 + 4 + 1 + 4 + 2 + 1;
        wide_port[at..at + 4].copy_from_slice(&0x1_0000u32.to_le_bytes());
        assert!(ModuleState::decode(1, &wide_port).is_err());
    }
}
