//! The daemon's records: a table per kind of resource, each record JSON (docs/cloud-api.md,
//! "State"). Alone, in one redb file; in a cluster, in etcd, which every host's daemon shares.
//! Every write is one transaction, durable when it returns.

use crate::ControlError;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// A kind of record.
#[derive(Clone, Copy, Debug)]
pub enum Table {
    /// Tenants by name.
    Tenants,
    /// API keys by id.
    Keys,
    /// Images by `tenant/id`.
    Images,
    /// Instance types by name.
    InstanceTypes,
    /// VMs by id.
    Vms,
    /// Snapshots by id.
    Snapshots,
    /// A cluster's hosts by name, each under its lease (etcd only).
    Hosts,
    /// A cluster's own records by name (etcd only): the hosts' key.
    Cluster,
    /// A cluster's events by time and host (etcd only; kept an hour).
    Events,
    /// Usage by hour, VM and host (`HOUR/VM/HOST`, the hour as 10 decimal digits).
    Usage,
    /// Per VM, how much of its running has been metered.
    Meter,
    /// Autoscaling groups by `tenant/name`.
    Groups,
}

pub(crate) const ALL: [Table; 12] = [
    Table::Tenants,
    Table::Keys,
    Table::Images,
    Table::InstanceTypes,
    Table::Vms,
    Table::Snapshots,
    Table::Hosts,
    Table::Cluster,
    Table::Events,
    Table::Usage,
    Table::Meter,
    Table::Groups,
];

impl Table {
    pub(crate) fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(match self {
            Self::Tenants => "tenants",
            Self::Keys => "keys",
            Self::Images => "images",
            Self::InstanceTypes => "instance_types",
            Self::Vms => "vms",
            Self::Snapshots => "snapshots",
            Self::Hosts => "hosts",
            Self::Cluster => "cluster",
            Self::Events => "events",
            Self::Usage => "usage",
            Self::Meter => "meter",
            Self::Groups => "groups",
        })
    }

    /// Whether a daemon's copy of the records holds this table (usage and events grow with
    /// time: they are read from etcd when asked for).
    fn kept_in_copy(self) -> bool {
        !matches!(self, Self::Usage | Self::Events)
    }

    /// Whether a change to this table wakes the loops that follow the records (metering and
    /// events change all the time and decide nothing).
    fn wakes(self) -> bool {
        !matches!(self, Self::Usage | Self::Events | Self::Meter)
    }
}

/// Where the records are: one redb file (a daemon alone), or etcd (a cluster's daemons all
/// see the same records).
pub enum Store {
    /// The daemon's own file.
    Local(Database),
    /// An etcd cluster, every record under `prefix/TABLE/KEY`.
    Etcd {
        /// A client (cheap to clone: calls share its channel); boxed, as it is large.
        client: Box<etcd_client::Client>,
        /// The key prefix of this cloud.
        prefix: String,
        /// This daemon's copy of the records, which reads are served from.
        cache: std::sync::Arc<crate::etcd_cache::Cache>,
    },
}

/// What a table holds. The state file and etcd are written only by daemons, but a record is
/// still input when it is read back (a damaged disk, an older daemon, a host with the cluster's
/// etcd keys): `check` refuses what would make the daemon act outside its own files, such as an
/// id that becomes a path.
pub trait Record: Serialize + DeserializeOwned {
    /// Why this record cannot be one the daemon wrote, if it cannot.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A record read as plain JSON, whatever its table (the store's own tests; nothing the daemon
/// acts on is read this way).
impl Record for serde_json::Value {}

fn decode<T: Record>(table: Table, key: &str, bytes: &[u8]) -> Result<T, ControlError> {
    let unreadable = |why: String| ControlError::Store(format!("record {key:?} of {table:?} is unreadable: {why}"));
    let value: T = serde_json::from_slice(bytes).map_err(|e| unreadable(e.to_string()))?;
    value.check().map_err(unreadable)?;
    Ok(value)
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map(|h| h.revision()).unwrap_or(0)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ControlError> {
    serde_json::to_vec(value).map_err(|e| ControlError::Store(e.to_string()))
}

/// How often an idle connection to etcd is pinged: not more often than etcd's gRPC server
/// allows (5 s by default; more often and it closes the connection, "too many pings").
pub const ETCD_PING: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dead.
pub const ETCD_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many times a read-modify-write is tried against concurrent writers before it gives up.
const UPDATE_TRIES: usize = 64;

impl Store {
    /// Opens the state file at `path`, making it (and its tables) if needed.
    ///
    /// A damaged file is refused and left as it is. redb checks every page's checksum first
    /// (repairing only its own allocation records), but a damaged table definition can still
    /// make it panic rather than answer an error: that panic is caught here and becomes the
    /// refusal, so that xcloudd says what is wrong instead of dying with a redb backtrace.
    pub fn open(path: &Path) -> Result<Self, ControlError> {
        let shown = path.display().to_string();
        let damaged = |why: String| ControlError::Store(format!("{shown}: {why}"));
        let open = || -> Result<Database, ControlError> {
            let mut db = Database::create(path).map_err(|e| damaged(e.to_string()))?;
            match db.check_integrity() {
                Ok(true) => {}
                Ok(false) => tracing::warn!("{shown}: redb repaired its allocation records after a crash"),
                Err(e) => return Err(damaged(format!("damaged ({e}); left as it is"))),
            }
            let txn = db.begin_write()?;
            for table in ALL {
                txn.open_table(table.definition())?;
            }
            txn.commit()?;
            Ok(db)
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)) {
            Ok(db) => Ok(Self::Local(db?)),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(damaged(format!(
                    "damaged (redb failed reading it: {what}); left as it is"
                )))
            }
        }
    }

    /// Connects to etcd at `endpoints`; records live under `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, ControlError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10))
            .with_keep_alive(ETCD_PING, ETCD_PING_TIMEOUT);
        let client = etcd_client::Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| ControlError::Store(format!("cannot reach etcd at {}: {e}", endpoints.join(","))))?;
        let mut probe = client.clone();
        probe
            .status()
            .await
            .map_err(|e| ControlError::Store(format!("etcd at {} does not answer: {e}", endpoints.join(","))))?;
        let prefix = prefix.trim_end_matches('/').to_string();
        let dirs = |keep: fn(Table) -> bool| {
            ALL.iter()
                .filter(|t| !keep(**t))
                .map(|t| Self::etcd_key(&prefix, *t, ""))
                .collect::<Vec<_>>()
        };
        let cache = crate::etcd_cache::Cache::start(
            client.clone(),
            format!("{prefix}/"),
            crate::etcd_cache::Dirs {
                unkept: dirs(Table::kept_in_copy),
                quiet: dirs(Table::wakes),
            },
        );
        cache.wait_for(1).await;
        Ok(Self::Etcd {
            client: Box::new(client),
            prefix,
            cache,
        })
    }

    /// The etcd client and key prefix, in a cluster.
    pub fn etcd(&self) -> Option<(etcd_client::Client, &str)> {
        match self {
            Self::Local(_) => None,
            Self::Etcd { client, prefix, .. } => Some((client.as_ref().clone(), prefix)),
        }
    }

    /// The etcd key of record `key` of `table` (the prefix of them all when `key` is empty).
    pub fn etcd_key(prefix: &str, table: Table, key: &str) -> String {
        format!("{prefix}/{}/{key}", table.definition().name())
    }

    /// The record `key` of `table`.
    pub async fn get<T: Record>(&self, table: Table, key: &str) -> Result<Option<T>, ControlError> {
        match self {
            Self::Local(db) => {
                let txn = db.begin_read()?;
                let t = txn.open_table(table.definition())?;
                let found = match t.get(key)? {
                    Some(v) => Some(decode(table, key, v.value())?),
                    None => None,
                };
                Ok(found)
            }
            Self::Etcd { client, prefix, cache } => {
                let k = Self::etcd_key(prefix, table, key);
                if let Some(Some(bytes)) = cache.get(&k) {
                    return Ok(Some(decode(table, key, &bytes)?));
                }
                // Not in the copy: maybe made a moment ago on another host.
                let resp = client.clone().get(k, None).await?;
                match resp.kvs().first() {
                    Some(kv) => Ok(Some(decode(table, key, kv.value())?)),
                    None => Ok(None),
                }
            }
        }
    }

    /// Every record of `table`, in key order.
    pub async fn list<T: Record>(&self, table: Table) -> Result<Vec<T>, ControlError> {
        match self {
            Self::Local(db) => {
                let txn = db.begin_read()?;
                let t = txn.open_table(table.definition())?;
                let mut out = Vec::new();
                for row in t.iter()? {
                    let (k, v) = row?;
                    out.push(decode(table, k.value(), v.value())?);
                }
                Ok(out)
            }
            Self::Etcd { client, prefix, cache } => {
                let dir = Self::etcd_key(prefix, table, "");
                if table.kept_in_copy() {
                    if let Some(rows) = cache.list(&dir) {
                        return rows.iter().map(|(k, v)| decode(table, k, v)).collect();
                    }
                }
                let resp = client
                    .clone()
                    .get(dir.clone(), Some(etcd_client::GetOptions::new().with_prefix()))
                    .await?;
                resp.kvs()
                    .iter()
                    .map(|kv| decode(table, &String::from_utf8_lossy(kv.key()), kv.value()))
                    .collect()
            }
        }
    }

    /// Writes `value` as the record `key` of `table`.
    pub async fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), ControlError> {
        let bytes = encode(value)?;
        match self {
            Self::Local(db) => {
                let txn = db.begin_write()?;
                txn.open_table(table.definition())?.insert(key, bytes.as_slice())?;
                txn.commit()?;
            }
            Self::Etcd { client, prefix, cache } => {
                let resp = client
                    .clone()
                    .put(Self::etcd_key(prefix, table, key), bytes, None)
                    .await?;
                cache.wait_for(revision_of(resp.header())).await;
            }
        }
        Ok(())
    }

    /// Writes `value` as the record `key` of `table` unless there is one; false if there was.
    pub async fn put_new<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<bool, ControlError> {
        let bytes = encode(value)?;
        match self {
            Self::Local(db) => {
                let txn = db.begin_write()?;
                {
                    let mut t = txn.open_table(table.definition())?;
                    if t.get(key)?.is_some() {
                        return Ok(false);
                    }
                    t.insert(key, bytes.as_slice())?;
                }
                txn.commit()?;
                Ok(true)
            }
            Self::Etcd { client, prefix, cache } => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let k = Self::etcd_key(prefix, table, key);
                let txn = Txn::new()
                    .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(k, bytes, None)]);
                let resp = client.clone().txn(txn).await?;
                cache.wait_for(revision_of(resp.header())).await;
                Ok(resp.succeeded())
            }
        }
    }

    /// Changes the record `key` of `table` by `change`, atomically against other writers (in
    /// etcd: compare-and-swap on the record's revision, tried again on a conflict). `change`
    /// may refuse by returning an error; nothing is written then. None: there is no record.
    pub async fn update<T, F>(&self, table: Table, key: &str, mut change: F) -> Result<Option<T>, ControlError>
    where
        T: Record,
        F: FnMut(&mut T) -> Result<(), ControlError>,
    {
        match self {
            Self::Local(db) => {
                let txn = db.begin_write()?;
                let value = {
                    let mut t = txn.open_table(table.definition())?;
                    let current = match t.get(key)? {
                        Some(v) => decode::<T>(table, key, v.value())?,
                        None => return Ok(None),
                    };
                    let mut value = current;
                    change(&mut value)?;
                    t.insert(key, encode(&value)?.as_slice())?;
                    value
                };
                txn.commit()?;
                Ok(Some(value))
            }
            Self::Etcd { client, prefix, cache } => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let k = Self::etcd_key(prefix, table, key);
                // Read etcd itself: the compare must be against the record as it is.
                for _ in 0..UPDATE_TRIES {
                    let resp = client.clone().get(k.clone(), None).await?;
                    let Some(kv) = resp.kvs().first() else {
                        return Ok(None);
                    };
                    let mut value: T = decode(table, key, kv.value())?;
                    change(&mut value)?;
                    let txn = Txn::new()
                        .when([Compare::mod_revision(k.clone(), CompareOp::Equal, kv.mod_revision())])
                        .and_then([TxnOp::put(k.clone(), encode(&value)?, None)]);
                    let resp = client.clone().txn(txn).await?;
                    if resp.succeeded() {
                        cache.wait_for(revision_of(resp.header())).await;
                        return Ok(Some(value));
                    }
                }
                Err(ControlError::Conflict(format!(
                    "record {key} of {table:?} kept changing under {UPDATE_TRIES} tries to update it"
                )))
            }
        }
    }

    /// A receiver told of every change to the records that decide something (not metering,
    /// not events) this daemon's copy takes in (alone: none; the loops that use it run only in
    /// a cluster).
    pub fn changes(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        match self {
            Self::Local(_) => None,
            Self::Etcd { cache, .. } => Some(cache.subscribe()),
        }
    }

    /// Every record written to `table` from now on, as (etcd revision, value), in order
    /// (alone: none). For the tables a copy does not keep: events.
    pub fn news(&self, table: Table) -> Option<tokio::sync::broadcast::Receiver<(i64, Vec<u8>)>> {
        match self {
            Self::Local(_) => None,
            Self::Etcd { cache, prefix, .. } => Some(cache.news(&Self::etcd_key(prefix, table, ""))),
        }
    }

    /// The records of `table` with keys in `from..to`, in key order, with their keys; at most
    /// `limit` of them.
    pub async fn list_range<T: Record>(
        &self,
        table: Table,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, T)>, ControlError> {
        match self {
            Self::Local(db) => {
                let txn = db.begin_read()?;
                let t = txn.open_table(table.definition())?;
                let mut out = Vec::new();
                for row in t.range(from..to)?.take(limit) {
                    let (k, v) = row?;
                    out.push((k.value().to_string(), decode(table, k.value(), v.value())?));
                }
                Ok(out)
            }
            Self::Etcd { client, prefix, .. } => {
                let dir = Self::etcd_key(prefix, table, "");
                let options = etcd_client::GetOptions::new()
                    .with_range(Self::etcd_key(prefix, table, to))
                    .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
                let resp = client
                    .clone()
                    .get(Self::etcd_key(prefix, table, from), Some(options))
                    .await?;
                resp.kvs()
                    .iter()
                    .map(|kv| {
                        let key = String::from_utf8_lossy(kv.key());
                        let key = key.strip_prefix(&dir).unwrap_or(&key).to_string();
                        let value = decode(table, &key, kv.value())?;
                        Ok((key, value))
                    })
                    .collect()
            }
        }
    }

    /// Removes the records of `table` with keys in `from..to`; how many there were.
    pub async fn delete_range(&self, table: Table, from: &str, to: &str) -> Result<u64, ControlError> {
        match self {
            Self::Local(db) => {
                let txn = db.begin_write()?;
                let removed = {
                    let mut t = txn.open_table(table.definition())?;
                    let keys: Vec<String> = t
                        .range(from..to)?
                        .map(|row| row.map(|(k, _)| k.value().to_string()))
                        .collect::<Result<_, _>>()?;
                    for k in &keys {
                        t.remove(k.as_str())?;
                    }
                    keys.len() as u64
                };
                txn.commit()?;
                Ok(removed)
            }
            Self::Etcd { client, prefix, cache } => {
                let options = etcd_client::DeleteOptions::new().with_range(Self::etcd_key(prefix, table, to));
                let resp = client
                    .clone()
                    .delete(Self::etcd_key(prefix, table, from), Some(options))
                    .await?;
                cache.wait_for(revision_of(resp.header())).await;
                Ok(u64::try_from(resp.deleted()).unwrap_or(0))
            }
        }
    }

    /// Waits until this daemon's copy of the records holds every change up to etcd revision
    /// `revision` (alone: at once).
    pub async fn catch_up(&self, revision: i64) {
        if let Self::Etcd { cache, .. } = self {
            cache.wait_for(revision).await;
        }
    }

    /// Writes `value` as record `key` of `table` under etcd lease `lease` (alone: as `put`).
    pub async fn put_leased<T: Serialize>(
        &self,
        table: Table,
        key: &str,
        value: &T,
        lease: i64,
    ) -> Result<(), ControlError> {
        match self {
            Self::Local(_) => self.put(table, key, value).await,
            Self::Etcd { client, prefix, cache } => {
                let options = etcd_client::PutOptions::new().with_lease(lease);
                let resp = client
                    .clone()
                    .put(Self::etcd_key(prefix, table, key), encode(value)?, Some(options))
                    .await?;
                cache.wait_for(revision_of(resp.header())).await;
                Ok(())
            }
        }
    }

    /// Removes the record `key` of `table`; whether there was one.
    pub async fn delete(&self, table: Table, key: &str) -> Result<bool, ControlError> {
        match self {
            Self::Local(db) => {
                let txn = db.begin_write()?;
                let existed = txn.open_table(table.definition())?.remove(key)?.is_some();
                txn.commit()?;
                Ok(existed)
            }
            Self::Etcd { client, prefix, cache } => {
                let resp = client.clone().delete(Self::etcd_key(prefix, table, key), None).await?;
                cache.wait_for(revision_of(resp.header())).await;
                Ok(resp.deleted() > 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_survive_a_reopen() {
        let path = std::env::temp_dir().join(format!("xcloud-store-{}.redb", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let s = Store::open(&path).expect("open");
            s.put(Table::Vms, "vm-1", &serde_json::json!({"a": 1}))
                .await
                .expect("put");
            assert!(!s
                .put_new(Table::Vms, "vm-1", &serde_json::json!({"a": 2}))
                .await
                .expect("put_new"));
            assert!(s
                .put_new(Table::Vms, "vm-2", &serde_json::json!({"a": 3}))
                .await
                .expect("put_new"));
        }
        let s = Store::open(&path).expect("reopen");
        let v: Option<serde_json::Value> = s.get(Table::Vms, "vm-1").await.expect("get");
        assert_eq!(v, Some(serde_json::json!({"a": 1})));
        assert_eq!(s.list::<serde_json::Value>(Table::Vms).await.expect("list").len(), 2);
        assert!(s.delete(Table::Vms, "vm-1").await.expect("delete"));
        assert!(!s.delete(Table::Vms, "vm-1").await.expect("delete again"));
        let _ = std::fs::remove_file(&path);
    }
}
