//! The records in a real etcd (Debian's etcd-server, started here) as two daemons share them:
//! each reads its own watch-fed copy, sees its own writes at once and the other's without a
//! "not found", and concurrent compare-and-swap updates lose nothing. And a protected VM's
//! fence (docs/replication.md) as its primary and backup race for it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use xcloud_control::store::{Store, Table};

struct Etcd {
    child: Child,
    dir: std::path::PathBuf,
    url: String,
    // One etcd at a time: free ports are picked by binding and letting go, which two etcds
    // starting side by side could both pick.
    _alone: std::sync::MutexGuard<'static, ()>,
}

static ONE_ETCD: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn etcd() -> Etcd {
    let alone = ONE_ETCD.lock().unwrap_or_else(|p| p.into_inner());
    let (client, peer) = (free_port(), free_port());
    // One directory per etcd: the tests of this file run side by side.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("etcd-store-{}-{client}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let url = format!("http://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(&dir)
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd runs (scripts/setup installs etcd-server)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Etcd {
        child,
        dir,
        url,
        _alone: alone,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_records_through_their_copies_and_lose_no_update() {
    let etcd = etcd();
    let connect = || Store::connect(std::slice::from_ref(&etcd.url), "/test/v1");
    let a = std::sync::Arc::new(connect().await.expect("a connects"));
    let b = std::sync::Arc::new(connect().await.expect("b connects"));

    // Read-your-writes on a; the other daemon finds a record made a moment ago.
    a.put(Table::Vms, "vm-1", &serde_json::json!({"n": 0}))
        .await
        .expect("put");
    let mine: Option<serde_json::Value> = a.get(Table::Vms, "vm-1").await.expect("get");
    assert_eq!(mine, Some(serde_json::json!({"n": 0})));
    let theirs: Option<serde_json::Value> = b.get(Table::Vms, "vm-1").await.expect("get");
    assert_eq!(theirs, Some(serde_json::json!({"n": 0})));
    assert!(!b
        .put_new(Table::Vms, "vm-1", &serde_json::json!({}))
        .await
        .expect("put_new"));

    // Concurrent read-modify-writes from both: every increment counts.
    let bump = |s: std::sync::Arc<Store>| {
        tokio::spawn(async move {
            for _ in 0..40 {
                s.update(Table::Vms, "vm-1", |v: &mut serde_json::Value| {
                    v["n"] = serde_json::json!(v["n"].as_u64().unwrap_or(0) + 1);
                    Ok(())
                })
                .await
                .expect("update");
            }
        })
    };
    let (ta, tb) = (bump(a.clone()), bump(b.clone()));
    ta.await.expect("a's updates");
    tb.await.expect("b's updates");
    // A copy may trail the other daemon's last write by a watch event (reads are local; only
    // compare-and-swap reads etcd), so both copies must come to 80, and never pass it.
    let n = |v: Option<serde_json::Value>| v.and_then(|v| v["n"].as_u64());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (na, nb) = (
            n(a.get(Table::Vms, "vm-1").await.expect("get")),
            n(b.get(Table::Vms, "vm-1").await.expect("get")),
        );
        assert!(
            na <= Some(80) && nb <= Some(80),
            "more increments than made: {na:?} {nb:?}"
        );
        if na == Some(80) && nb == Some(80) {
            break;
        }
        assert!(Instant::now() < deadline, "an update was lost: a sees {na:?}, b {nb:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The other daemon's copy follows writes and deletes through its watch.
    a.put(Table::Vms, "vm-2", &serde_json::json!({"n": 2}))
        .await
        .expect("put");
    a.delete(Table::Vms, "vm-1").await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all: Vec<serde_json::Value> = b.list(Table::Vms).await.expect("list");
        if all == [serde_json::json!({"n": 2})] {
            break;
        }
        assert!(Instant::now() < deadline, "b's copy never caught up: {all:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.get::<serde_json::Value>(Table::Vms, "vm-1").await.expect("get"), None);
}

#[test]
fn a_fence_goes_to_exactly_one_side_of_a_protection() {
    use xcloud_control::fence::EtcdFence;
    use xcloud_migration::Fence;
    let etcd = etcd();
    let urls = [etcd.url.clone()];
    let connect = || EtcdFence::connect(&urls, "/xcloud/fence/web").expect("connects");
    let (primary, backup, stranger) = (connect(), connect(), connect());
    let first = primary.claim_primary().expect("a free fence");
    // A generation that is not the fence's is never taken over.
    assert!(!backup.take_over(first + 1).expect("asked"));
    assert!(!backup.take_over(0).expect("asked"));
    // Another VMM cannot claim a held fence, and is told who holds it.
    let held = stranger.claim_primary().expect_err("held");
    assert!(held.to_string().contains("held by 'primary"), "{held}");
    // Protected again: a new generation, and the old one is dead.
    let second = primary.claim_primary().expect("its own fence");
    assert!(second > first);
    assert!(!backup.take_over(first).expect("asked"));
    // A partition the backup wins: the primary may not keep the VM.
    assert!(backup.take_over(second).expect("taken over"));
    assert!(!primary.keep().expect("asked"));
    // The survivor protects it back; this time the primary (the survivor) keeps it first.
    let third = backup.claim_primary().expect("the survivor's fence");
    assert!(backup.keep().expect("kept"));
    assert!(!primary.take_over(third).expect("asked"));
    // The VM ends: the fence is free for anyone.
    assert!(backup.release().expect("released"));
    let fourth = stranger.claim_primary().expect("a free fence again");
    // A fence deleted behind its holder's back (here: taken over, then freed) is free for it
    // too.
    assert!(backup.take_over(fourth).expect("taken over"));
    assert!(backup.release().expect("released"));
    stranger
        .claim_primary()
        .expect("free again, though it held an older revision");
    // No etcd there: a clear error, not a hang.
    let nowhere = [format!("http://127.0.0.1:{}", free_port())];
    let err = EtcdFence::connect(&nowhere, "/xcloud/fence/web")
        .err()
        .expect("no etcd");
    assert!(err.to_string().contains("does not answer"), "{err}");
}
