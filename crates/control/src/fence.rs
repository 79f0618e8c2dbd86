//! A protected VM's fence in etcd (docs/replication.md, split brain). One key per VM; its
//! value says who holds the VM (`primary`, `backup` or `alone`, and which process), and every
//! change is a compare-and-swap on the key's revision: the revision a primary wrote when it
//! protected the VM is the generation its backup may take over, and the primary may give its
//! backup up only while the key still carries the revision it wrote last. Exactly one of them
//! wins a partition; the loser stops (the primary) or runs nothing (the backup).
//!
//! The VMM process calls it from plain threads (the replication thread, the standby, the API's
//! threads): each call runs on a small runtime of its own, from a scoped thread, so that no
//! caller needs to be in (or out of) an async context.

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use xcloud_migration::{Fence, FenceError};

/// How long one call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The fence of one VM, kept in etcd under one key.
pub struct EtcdFence {
    key: String,
    endpoints: String,
    client: Client,
    runtime: tokio::runtime::Runtime,
    /// Who this is, in the values it writes: the host's name and the process.
    holder: String,
    /// The key's revision this process wrote last (None: it holds nothing).
    held: Mutex<Option<i64>>,
}

impl EtcdFence {
    /// Connects to etcd at `endpoints` (client URLs) for the fence `key`; fails if etcd does not
    /// answer.
    pub fn connect(endpoints: &[String], key: &str) -> Result<Self, FenceError> {
        let error = |detail: String| FenceError {
            key: key.to_string(),
            detail,
        };
        if key.is_empty() || key.len() > xcloud_migration::wire::MAX_FENCE_KEY {
            return Err(error(format!(
                "a fence key is 1 to {} bytes",
                xcloud_migration::wire::MAX_FENCE_KEY
            )));
        }
        let shown = endpoints.join(",");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fence")
            .enable_all()
            .build()
            .map_err(|e| error(format!("cannot start its runtime: {e}")))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        let client = on_runtime(&runtime, async {
            let mut client = Client::connect(endpoints, Some(options)).await?;
            client.status().await?;
            Ok(client)
        })
        .map_err(|e| error(format!("etcd at {shown} does not answer: {e}")))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Ok(Self {
            key: key.to_string(),
            endpoints: shown,
            client,
            runtime,
            holder: format!("{} pid {}", host.trim(), std::process::id()),
            held: Mutex::new(None),
        })
    }

    fn error(&self, detail: String) -> FenceError {
        FenceError {
            key: self.key.clone(),
            detail,
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<i64>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `role` if the key is at `revision` (0: absent). Some(new revision) if it was.
    fn swap(&self, revision: i64, role: &str) -> Result<Option<i64>, FenceError> {
        let compare = if revision == 0 {
            Compare::create_revision(self.key.as_str(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(self.key.as_str(), CompareOp::Equal, revision)
        };
        let value = format!("{role} {}", self.holder);
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(self.key.as_str(), value, None)]);
        let mut client = self.client.clone();
        let response = on_runtime(&self.runtime, async move { client.txn(txn).await })
            .map_err(|e| self.error(format!("etcd at {}: {e}", self.endpoints)))?;
        Ok(response
            .succeeded()
            .then(|| response.header().map_or(0, |h| h.revision())))
    }

    /// What the key says now, for an error.
    fn holder_now(&self) -> String {
        let mut client = self.client.clone();
        let key = self.key.clone();
        match on_runtime(&self.runtime, async move { client.get(key, None).await }) {
            Ok(response) => match response.kvs().first() {
                Some(kv) => format!(
                    "'{}' (revision {})",
                    String::from_utf8_lossy(kv.value()),
                    kv.mod_revision()
                ),
                None => "nobody".into(),
            },
            Err(e) => format!("unknown ({e})"),
        }
    }
}

impl Fence for EtcdFence {
    fn key(&self) -> &str {
        &self.key
    }

    fn claim_primary(&self) -> Result<u64, FenceError> {
        let mut held = self.held();
        let mut won = self.swap(held.unwrap_or(0), "primary")?;
        if won.is_none() && held.is_some() {
            // What this process held was deleted since (by hand): the fence is free.
            won = self.swap(0, "primary")?;
        }
        match won {
            Some(revision) => {
                *held = Some(revision);
                Ok(revision as u64)
            }
            None => Err(self.error(format!(
                "held by {}, not by this VMM; if that holder is gone for good, delete the key (etcdctl del {})",
                self.holder_now(),
                self.key
            ))),
        }
    }

    fn take_over(&self, generation: u64) -> Result<bool, FenceError> {
        let Ok(generation) = i64::try_from(generation) else {
            return Ok(false);
        };
        if generation == 0 {
            return Ok(false);
        }
        let mut held = self.held();
        let won = self.swap(generation, "backup")?;
        if let Some(revision) = won {
            *held = Some(revision);
        }
        Ok(won.is_some())
    }

    fn keep(&self) -> Result<bool, FenceError> {
        let mut held = self.held();
        let Some(revision) = *held else {
            return Ok(false);
        };
        let kept = self.swap(revision, "alone")?;
        *held = kept;
        Ok(kept.is_some())
    }

    fn release(&self) -> Result<bool, FenceError> {
        let mut held = self.held();
        let Some(revision) = *held else {
            return Ok(true);
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(self.key.as_str(), CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(self.key.as_str(), None)]);
        let mut client = self.client.clone();
        let response = on_runtime(&self.runtime, async move { client.txn(txn).await })
            .map_err(|e| self.error(format!("etcd at {}: {e}", self.endpoints)))?;
        *held = None;
        Ok(response.succeeded())
    }
}

/// Runs `call` on `runtime` from a scoped thread (any caller, in a runtime or not), bounded by
/// [`CALL_TIMEOUT`].
fn on_runtime<T: Send>(
    runtime: &tokio::runtime::Runtime,
    call: impl Future<Output = Result<T, etcd_client::Error>> + Send,
) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(
                || match runtime.block_on(async { tokio::time::timeout(CALL_TIMEOUT, call).await }) {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
                },
            )
            .join()
            .unwrap_or_else(|_| Err("the call panicked".into()))
    })
}
