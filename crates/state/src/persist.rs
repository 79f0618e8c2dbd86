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

/// Declares a saved state that is one KVM structure's kernel ABI bytes, at layout version 1:
/// `kernel_abi_state!(/** docs */ IrqchipState(kvm_irqchip), "irqchip");`. The calling crate
/// needs `zerocopy`.
#[macro_export]
macro_rules! kernel_abi_state {
    ($(#[$doc:meta])* $name:ident($ty:ty), $kind:literal) => {
        $(#[$doc])*
        pub struct $name(pub $ty);

        impl $crate::Persist for $name {
            const KIND: &'static str = $kind;
            const VERSION: u32 = 1;

            fn encode(&self) -> Vec<u8> {
                ::zerocopy::IntoBytes::as_bytes(&self.0).to_vec()
            }

            fn decode(version: u32, body: &[u8]) -> Result<Self, $crate::FormatError> {
                if version != 1 {
                    return Err($crate::persist::unknown_version::<Self>(version));
                }
                $crate::format::kernel_abi($kind, body).map($name)
            }
        }
    };
}
