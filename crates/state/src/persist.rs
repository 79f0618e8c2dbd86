//! How a saved structure is written into a section body and read back.

use crate::format::FormatError;

/// A component's saved state: how it is written into a section and read back.
///
/// `decode` must read every `version` from 1 to `VERSION` (a snapshot made by an older
/// xcloud) and refuse the rest with a clear error; it sees untrusted bytes and must never
/// panic.
pub trait Persist: Sized {
    /// The section kind ("vcpu", "irqchip", "serial"): at most 32 ASCII bytes.
    const KIND: &'static str;
    /// The version of the body layout that `encode` writes.
    const VERSION: u32;

    /// The section body.
    fn encode(&self) -> Vec<u8>;

    /// Reads a body written with layout `version`.
    fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError>;
}

/// The error a [`Persist::decode`] returns for a layout version it does not know.
pub fn unknown_version<T: Persist>(version: u32) -> FormatError {
    FormatError::Version {
        what: T::KIND,
        found: version,
        supported: T::VERSION,
    }
}
