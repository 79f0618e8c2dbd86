//! Devices that extension modules serve in the extension window (docs/extensions.md): the
//! guest reaches them by port I/O, and a port no module serves reads as all ones.

use crate::hypercall::{inl, outl};
use xcloud_abi::EXT_PORT_BASE;

/// The `kv` example module's magic, at its first port.
pub const KV_MAGIC: u32 = 0x6b76_0001;
/// Keys the `kv` module holds: 0 to this, exclusive.
pub const KV_KEYS: u32 = 4096;

/// The `kv` module (extensions/kv.wat) at the ports it was given.
pub struct KvStore {
    base: u16,
}

impl KvStore {
    /// The store at `base` (the window's first port by default), if a module answers there
    /// with its magic.
    pub fn find(base: Option<u16>) -> Option<Self> {
        let base = base.unwrap_or(EXT_PORT_BASE);
        (inl(base) == KV_MAGIC).then_some(Self { base })
    }

    /// Whether the module still answers.
    pub fn present(&self) -> bool {
        inl(self.base) == KV_MAGIC
    }

    /// Stores `value` under `key` (below [`KV_KEYS`]).
    pub fn put(&self, key: u32, value: u32) {
        outl(self.base + 4, key);
        outl(self.base + 8, value);
    }

    /// The value under `key` (all ones: none).
    pub fn get(&self, key: u32) -> u32 {
        outl(self.base + 4, key);
        inl(self.base + 8)
    }

    /// How many values the module stored.
    pub fn stores(&self) -> u32 {
        inl(self.base + 12)
    }
}
