//! How much of anything a request may carry, and how slowly: shared by the API's handlers
//! and by the cluster's calls between hosts (docs/cloud-api.md, "Limits").

/// How long a request's body may take to arrive (an image upload: each piece of it).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest body of any request but an image upload.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The largest image an upload may carry.
pub const MAX_IMAGE_BYTES: u64 = 128 << 20;
/// The most of a console log one request returns.
pub const MAX_CONSOLE_BYTES: u64 = 1 << 20;
