//! The control plane (layer 2 of docs/architecture.md): `xcloudd`'s tenants and API keys,
//! images, instance types, VMs, snapshots, metering and events, behind a versioned REST API
//! (docs/cloud-api.md), with state in one embedded file.
//!
//! Each VM is its own VMM process (`xcloud run`), driven through the VMM's control socket
//! (crates/api): this crate knows VMs only from outside, and the VMM knows nothing of tenants.

#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod autoscale;
pub mod cgroups;
pub mod client;
pub mod cluster;
pub mod daemon;
pub mod error;
pub mod etcd_cache;
pub mod extensions;
pub mod fence;
pub mod fuzzing;
pub mod host;
pub mod http;
pub mod limits;
pub mod meter;
pub mod model;
pub mod placement;
pub mod prometheus;
pub mod provision;
pub mod snapshot_files;
pub mod snapshots;
pub mod store;
pub mod tls;

pub use daemon::{Config, Daemon};
pub use error::ControlError;

use std::os::fd::AsRawFd;
use std::path::Path;

/// Serves the API on the Unix socket `socket` until `shutdown` completes. VMs keep running
/// after the daemon ends; the next daemon on the same data directory watches them again.
pub async fn serve(
    config: Config,
    socket: &Path,
    tls: Option<TlsOptions>,
    cluster: Option<cluster::ClusterConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    let data = &config.data_dir;
    std::fs::create_dir_all(data).map_err(|e| ControlError::io(format!("creating {}", data.display()), e))?;
    let lock_path = data.join("xcloudd.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| ControlError::io(format!("opening {}", lock_path.display()), e))?;
    // SAFETY: flock on a descriptor this function owns (kept open for the daemon's life).
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(ControlError::Conflict(format!(
            "another xcloudd uses {} (it holds {})",
            data.display(),
            lock_path.display()
        )));
    }
    let tls_identity = match &tls {
        Some(t) => Some(
            xcloud_migration::tls::Identity::load(&t.identity)
                .map_err(|e| ControlError::Conflict(format!("the TLS identity {}: {e}", t.identity.display())))?,
        ),
        None => None,
    };
    let daemon = match (cluster, &tls_identity) {
        (None, _) => Daemon::open(config).await?,
        (Some(c), Some(identity)) => {
            Daemon::open_in_cluster(config, cluster::Cluster::new(c, identity.cert.to_vec())).await?
        }
        (Some(_), None) => {
            return Err(ControlError::BadRequest(
                "a host of a cluster serves its API over TLS: give --tls-listen and --identity".into(),
            ))
        }
    };
    let listener = bind(socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tcp = match (&tls, &tls_identity) {
        (Some(t), Some(identity)) => {
            let listener = tls::bind(&t.listen, identity).await?;
            tracing::info!("xcloudd: serving API v1 over TLS on {}", listener.local_addr());
            let router = http::router(daemon.clone());
            let stop = stopped(stop_rx.clone());
            Some(tokio::spawn(serve_on(listener, router, stop)))
        }
        _ => None,
    };
    cluster::join(daemon.clone()).await?;
    meter::spawn(daemon.clone(), daemon.config.meter_period, daemon.config.usage_days);
    autoscale::spawn(daemon.clone(), daemon.config.autoscale_period);
    tracing::info!("xcloudd: serving API v1 on {}", socket.display());
    serve_on(listener, http::router(daemon), stopped(stop_rx)).await;
    if let Some(tcp) = tcp {
        let _ = tcp.await;
    }
    let _ = std::fs::remove_file(socket);
    drop(lock);
    Ok(())
}

/// How long a client may take to send a request's headers (also: how long an idle
/// keep-alive connection stays open). axum's own `serve` sets no timer, so a client that
/// trickles its headers would hold its connection for ever.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How many connections are served at once on one listener; the next waits to be accepted.
pub const MAX_CONNECTIONS: usize = 256;

/// Serves `router` on `listener` until `stop` completes: HTTP/1.1 with [`HEADER_TIMEOUT`],
/// at most [`MAX_CONNECTIONS`] connections.
async fn serve_on<L: axum::serve::Listener>(
    mut listener: L,
    router: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            _ = &mut stop => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let io = tokio::select! {
            _ = &mut stop => return,
            (io, _) = listener.accept() => io,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("an API connection ended: {e}");
            }
        });
    }
}

/// The API over TCP with TLS.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// The address to listen on, e.g. `0.0.0.0:7443`.
    pub listen: String,
    /// The host's identity directory (`xcloud keygen`): its certificate is what clients pin.
    pub identity: std::path::PathBuf,
}

/// Binds `path`, replacing a socket left by a daemon that died, never anything else.
fn bind(path: &Path) -> Result<tokio::net::UnixListener, ControlError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::Conflict(format!(
                "{} exists and is not a socket: refusing to replace it",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::Conflict(format!(
                "a server already listens on {}",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let listener =
        tokio::net::UnixListener::bind(path).map_err(|e| ControlError::io(format!("binding {}", path.display()), e))?;
    // Keys authenticate every call; the mode keeps other local users from even trying.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    Ok(listener)
}
