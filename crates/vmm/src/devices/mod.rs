//! Emulated devices and the port-I/O dispatch of the VMM.

pub mod serial;
