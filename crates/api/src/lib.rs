//! The VMM's control API (docs/control-api.md): one JSON object per line over a Unix socket,
//! each request answered by one JSON line. Versioned by the `api` field of every request.
//!
//! Input is untrusted: a line longer than [`MAX_LINE`], malformed JSON, an unknown operation or
//! a wrong version gets an error response and the connection stays usable.
//!
//! The API drives one VM ([`xcloud_vmm::VmHandle`]) and the engines that operate on it
//! (`xcloud-snapshot`, `xcloud-migration`); nothing below it knows the API exists.
//!
//! It may depend on `xcloud-vm-core`, `xcloud-vmm`, `xcloud-snapshot` and `xcloud-migration`
//! (docs/architecture.md; crates/xcloud/tests/architecture.rs checks it).

#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod execute;
pub mod extensions;
pub mod protocol;
pub mod server;
pub mod watchdog;

pub use client::call;
pub use execute::execute;
pub use protocol::ExtensionReport;
pub use protocol::{ApiError, Command, Request, Response, API_VERSION, MAX_LINE};
pub use server::{serve, serve_standby, ApiServer, StandbyServer};
pub use watchdog::Watchdog;
