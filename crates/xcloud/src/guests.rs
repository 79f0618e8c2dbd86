//! The built-in guests, compiled from guest/ by build.rs and embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The image of built-in guest `name`.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, image)| *image)
}

/// Names of all built-in guests.
pub fn names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}
