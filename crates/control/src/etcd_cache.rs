//! A daemon's copy of the cloud's records in etcd, kept current by a watch, so that reads
//! cost no round trip to etcd (what Kubernetes' informers do): the whole prefix is read once
//! at a revision, then every change after that revision comes through the watch, in order.
//!
//! - A read of a key the copy lacks goes to etcd (a record another host made a moment ago is
//!   never "not found").
//! - A daemon's own write is in its copy before the write returns: the writer waits until the
//!   copy has reached the write's revision (read-your-writes).
//! - Another daemon's change to a key the copy holds reaches it with the watch (milliseconds);
//!   until then a read sees the value before it. Anything that decides on a record's value
//!   (compare-and-swap updates) reads etcd itself, never the copy.
//! - Some directories are not kept (usage and events grow with time): their writes come
//!   through as news to whoever listens, and reads of them go to etcd. Changes to the quiet
//!   directories (those and metering) do not wake the loops that follow the records.
//! - While the copy is being rebuilt (the watch broke, or etcd compacted past it) every read
//!   goes to etcd.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How long a writer waits for its write to reach the copy before it goes on anyway.
const CATCH_UP: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    records: BTreeMap<String, Vec<u8>>,
    /// The etcd revision the copy is at (0: not usable).
    revision: i64,
}

/// The directories (key prefixes) the copy treats apart.
#[derive(Clone, Debug, Default)]
pub struct Dirs {
    /// Not kept: their writes are news.
    pub unkept: Vec<String>,
    /// Their changes wake nobody.
    pub quiet: Vec<String>,
}

/// How many writes to the unkept directories a slow listener may fall behind by.
const NEWS_BACKLOG: usize = 1024;

/// The copy.
pub struct Cache {
    state: RwLock<State>,
    dirs: Dirs,
    /// The revision the copy is at, after every change.
    applied: tokio::sync::watch::Sender<i64>,
    /// The revision the copy is at, after every change outside the quiet directories.
    changed: tokio::sync::watch::Sender<i64>,
    /// Writes to the unkept directories: (key, revision, value).
    news: tokio::sync::broadcast::Sender<(String, i64, Vec<u8>)>,
}

impl Cache {
    /// Starts keeping a copy of everything under `prefix` but `dirs.unkept`.
    pub fn start(client: etcd_client::Client, prefix: String, dirs: Dirs) -> Arc<Self> {
        let (applied, _) = tokio::sync::watch::channel(0);
        let (changed, _) = tokio::sync::watch::channel(0);
        let (news, _) = tokio::sync::broadcast::channel(NEWS_BACKLOG);
        let cache = Arc::new(Self {
            state: RwLock::new(State::default()),
            dirs,
            applied,
            changed,
            news,
        });
        tokio::spawn(keep(cache.clone(), client, prefix));
        cache
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `key`: Some(Some) held, Some(None) not held though the copy is usable
    /// (ask etcd), None the copy is not usable.
    pub fn get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        let state = self.read();
        (state.revision > 0).then(|| state.records.get(key).cloned())
    }

    /// Every key and value under `dir`, in key order (None: the copy is not usable).
    pub fn list(&self, dir: &str) -> Option<Vec<(String, Vec<u8>)>> {
        let state = self.read();
        if state.revision == 0 {
            return None;
        }
        Some(
            state
                .records
                .range(dir.to_string()..)
                .take_while(|(k, _)| k.starts_with(dir))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// A receiver told of every change the copy takes in outside the quiet directories (its
    /// value: the copy's revision).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.changed.subscribe()
    }

    /// The writes to unkept directory `dir` from now on: (revision, value).
    pub fn news(&self, dir: &str) -> tokio::sync::broadcast::Receiver<(i64, Vec<u8>)> {
        let (tx, rx) = tokio::sync::broadcast::channel(NEWS_BACKLOG);
        let mut all = self.news.subscribe();
        let dir = dir.to_string();
        tokio::spawn(async move {
            loop {
                match all.recv().await {
                    Ok((key, revision, value)) if key.starts_with(&dir) => {
                        if tx.send((revision, value)).is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        rx
    }

    fn unkept(&self, key: &str) -> bool {
        self.dirs.unkept.iter().any(|d| key.starts_with(d.as_str()))
    }

    fn quiet(&self, key: &str) -> bool {
        self.dirs.quiet.iter().any(|d| key.starts_with(d.as_str()))
    }

    /// Waits until the copy holds every change up to `revision` (or [`CATCH_UP`] passes).
    pub async fn wait_for(&self, revision: i64) {
        let mut applied = self.applied.subscribe();
        let _ = tokio::time::timeout(CATCH_UP, applied.wait_for(|r| *r >= revision)).await;
    }
}

/// Reads the prefix, then follows the watch; starts over when the watch breaks.
async fn keep(cache: Arc<Cache>, mut client: etcd_client::Client, prefix: String) {
    loop {
        if let Err(e) = follow(&cache, &mut client, &prefix).await {
            tracing::warn!("cluster: the copy of etcd's records is rebuilt: {e}");
        }
        cache.write().revision = 0;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn follow(cache: &Cache, client: &mut etcd_client::Client, prefix: &str) -> Result<(), String> {
    let all = client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    let revision = all
        .header()
        .map(|h| h.revision())
        .ok_or("etcd's answer has no revision")?;
    {
        let mut state = cache.write();
        state.records = all
            .kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()))
            .filter(|(k, _)| !cache.unkept(k))
            .collect();
        state.revision = revision;
    }
    cache.applied.send_replace(revision);
    cache.changed.send_replace(revision);
    let options = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client.watch(prefix, Some(options)).await.map_err(|e| e.to_string())?;
    while let Some(answer) = stream.message().await.map_err(|e| e.to_string())? {
        if answer.canceled() || answer.compact_revision() > 0 {
            return Err(format!("the watch ended: {}", answer.cancel_reason()));
        }
        // A response's header may be ahead of its events; only a progress notice (no events)
        // promises that nothing older is still to come.
        let mut newest = if answer.events().is_empty() {
            answer.header().map(|h| h.revision()).unwrap_or(0)
        } else {
            0
        };
        let mut wake = false;
        let mut news = Vec::new();
        {
            let mut state = cache.write();
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                newest = newest.max(kv.mod_revision());
                wake |= !cache.quiet(&key);
                if cache.unkept(&key) {
                    if event.event_type() == etcd_client::EventType::Put {
                        news.push((key, kv.mod_revision(), kv.value().to_vec()));
                    }
                    continue;
                }
                match event.event_type() {
                    etcd_client::EventType::Put => {
                        state.records.insert(key, kv.value().to_vec());
                    }
                    etcd_client::EventType::Delete => {
                        state.records.remove(&key);
                    }
                }
            }
            state.revision = state.revision.max(newest);
            newest = state.revision;
        }
        for item in news {
            let _ = cache.news.send(item);
        }
        cache.applied.send_replace(newest);
        if wake {
            cache.changed.send_replace(newest);
        }
    }
    Err("the watch stream closed".into())
}
