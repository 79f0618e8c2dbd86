//! Fuzz targets of the daemon, on a real daemon in a scratch data directory (no VMM binary,
//! so nothing boots; no cgroups, no jail).
//!
//! - [`Harness`]: the API, called with any method, path and body by a caller that holds the
//!   admin key, a tenant's key or a broken one. Nothing may panic; every answer must be a
//!   status with, for an error, a JSON error body.
//! - [`open_state`]: a daemon starting on a state file that holds anything. It either refuses
//!   to start, saying why and leaving the file where it was, or starts and answers every
//!   listing; no record it reads may name a path outside its own directories.

use crate::daemon::{Config, Daemon};
use axum::body::Body;
use http_body_util::BodyExt;
use std::sync::Arc;
use tower::ServiceExt;

/// A directory of its own for one daemon under the system's temporary directory.
fn scratch_dir(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "xcloud-fuzz-{what}-{}-{}",
        std::process::id(),
        crate::auth::hex(&crate::auth::random_bytes::<4>().unwrap_or_default())
    ))
}

/// A daemon alone in `data_dir`, with no VMM to start.
fn scratch_config(data_dir: &std::path::Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        vmm_binary: data_dir.join("no-vmm-here"),
        host_name: "fuzz".into(),
        provider: "local".into(),
        region: "local".into(),
        price_per_hour: 0.0,
        jail: false,
        meter_period: std::time::Duration::from_secs(10),
        usage_days: 1,
        autoscale_period: std::time::Duration::from_secs(5),
        ext_policy: None,
    }
}

/// `method path` with `body` and `key`, through `router`: the status and body of its answer.
fn call(
    runtime: &tokio::runtime::Runtime,
    router: &axum::Router,
    method: &str,
    path: &str,
    body: &[u8],
    key: &str,
) -> (u16, Vec<u8>) {
    let request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body.to_vec()));
    let Ok(request) = request else {
        return (0, Vec::new());
    };
    runtime.block_on(async {
        let Ok(response) = router.clone().oneshot(request).await;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        (status, body)
    })
}

/// A daemon and the keys its callers use.
pub struct Harness {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    keys: Vec<String>,
    /// Where its state lives (removed with it).
    pub data_dir: std::path::PathBuf,
}

impl Harness {
    /// A fresh daemon in a new directory under the system's temporary directory.
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("a runtime: {e}"));
        let data_dir = scratch_dir("api");
        let daemon: Arc<Daemon> = runtime
            .block_on(Daemon::open_without_cgroups(scratch_config(&data_dir)))
            .unwrap_or_else(|e| panic!("a daemon: {e}"));
        let admin = std::fs::read_to_string(daemon.admin_key_path())
            .unwrap_or_default()
            .trim()
            .to_string();
        let router = crate::http::router(daemon);
        let mut h = Self {
            runtime,
            router,
            keys: vec![
                admin.clone(),
                String::new(),
                "xck_000000000000_".to_string() + &"0".repeat(64),
            ],
            data_dir,
        };
        let (status, body) = h.call("POST", "/v1/tenants", r#"{"name":"fuzz"}"#.as_bytes(), &admin);
        if status == 201 {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            h.keys.push(v["key"].as_str().unwrap_or("").to_string());
        }
        h
    }

    fn call(&self, method: &str, path: &str, body: &[u8], key: &str) -> (u16, Vec<u8>) {
        call(&self.runtime, &self.router, method, path, body, key)
    }

    /// One request from fuzzer bytes: a key and method byte, a path up to the first
    /// newline, the body after it. Panics if the answer breaks the API's rules.
    pub fn request(&self, data: &[u8]) {
        let Some((&selector, rest)) = data.split_first() else {
            return;
        };
        let key = &self.keys[usize::from(selector & 3) % self.keys.len()];
        let method = ["GET", "POST", "DELETE", "PUT", "PATCH"][usize::from(selector >> 2) % 5];
        let (path, body) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let path = format!("/{}", String::from_utf8_lossy(path).trim_start_matches('/'));
        let (status, answer) = self.call(method, &path, body, key);
        check_answer(method, &path, status, &answer, false);
    }
}

/// Panics unless an answer keeps the API's rules: every error a JSON error body, and no 500
/// but, where `unreadable_records` may be, one that says the state store could not be read.
fn check_answer(method: &str, path: &str, status: u16, answer: &[u8], unreadable_records: bool) {
    let text = String::from_utf8_lossy(answer);
    if status >= 400 {
        let v: Result<serde_json::Value, _> = serde_json::from_slice(answer);
        assert!(
            v.as_ref().is_ok_and(|v| v["error"].is_string()),
            "{method} {path}: {status} without a JSON error: {text}"
        );
    }
    if status == 500 {
        assert!(
            unreadable_records && text.contains("state store: record"),
            "{method} {path}: 500: {text}"
        );
    }
}

/// Record bytes from fuzzer input: (table, key, value) while whole ones are left, each as a
/// table byte, a key length byte, the key, a little-endian u16 value length and the value.
fn records(mut data: &[u8]) -> Vec<(crate::store::Table, String, &[u8])> {
    let mut out = Vec::new();
    while let [table, key_len, rest @ ..] = data {
        let Some((key, rest)) = rest.split_at_checked(usize::from(*key_len)) else {
            break;
        };
        let Some((len, rest)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let Some((value, rest)) = rest.split_at_checked(usize::from(u16::from_le_bytes(*len))) else {
            break;
        };
        let table = crate::store::ALL[usize::from(*table) % crate::store::ALL.len()];
        out.push((table, String::from_utf8_lossy(key).into_owned(), value));
        data = rest;
    }
    out
}

/// Writes `rows` as they are into the state file at `path` (made with every table if new).
fn write_records(path: &std::path::Path, rows: &[(crate::store::Table, String, Vec<u8>)]) -> Result<(), redb::Error> {
    let db = redb::Database::create(path)?;
    let txn = db.begin_write()?;
    for table in crate::store::ALL {
        txn.open_table(table.definition())?;
    }
    for (table, key, value) in rows {
        txn.open_table(table.definition())?
            .insert(key.as_str(), value.as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

/// A daemon starting on a state file made from fuzzer bytes. An even first byte: the rest are
/// records (see [`records`]) written beside an admin tenant and key the harness knows (which
/// they may overwrite); an odd one: the rest is the file itself. Panics if the daemon panics,
/// refuses to start without saying why or by removing the file, answers a listing against
/// the API's rules, or reads a record that names a VM its directories cannot hold.
pub fn open_state(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let data_dir = scratch_dir("state");
    let state = data_dir.join("state.redb");
    let _cleanup = RemoveOnDrop(data_dir.clone());
    if std::fs::create_dir_all(&data_dir).is_err() {
        return;
    }
    let (admin_key, written) = if mode & 1 == 0 {
        let Ok((stored, key)) = crate::auth::new_key("admin") else {
            return;
        };
        let admin = crate::model::Tenant {
            name: "admin".into(),
            role: crate::model::Role::Admin,
            quota: crate::model::Quota {
                vcpus: 64,
                mem_mib: 1 << 16,
                vms: 64,
            },
            cpu_weight: 100,
            created: 0,
        };
        let (Ok(admin), Ok(key_record)) = (serde_json::to_vec(&admin), serde_json::to_vec(&stored)) else {
            return;
        };
        let mut rows = vec![
            (crate::store::Table::Tenants, "admin".to_string(), admin),
            (crate::store::Table::Keys, stored.id.clone(), key_record),
        ];
        rows.extend(records(rest).into_iter().map(|(t, k, v)| (t, k, v.to_vec())));
        (key, write_records(&state, &rows).is_ok())
    } else {
        (String::new(), std::fs::write(&state, rest).is_ok())
    };
    if !written {
        return;
    }
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    let daemon = match runtime.block_on(Daemon::open_without_cgroups(scratch_config(&data_dir))) {
        Ok(daemon) => daemon,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "a refusal says why");
            assert!(
                state.exists(),
                "a state file the daemon refuses is left where it was: {e}"
            );
            return;
        }
    };
    let router = crate::http::router(daemon);
    let get = |path: &str| {
        let (status, answer) = call(&runtime, &router, "GET", path, b"", &admin_key);
        check_answer("GET", path, status, &answer, true);
        serde_json::from_slice::<serde_json::Value>(&answer).unwrap_or_default()
    };
    for path in [
        "/v1/whoami",
        "/v1/tenants",
        "/v1/instance-types",
        "/v1/images",
        "/v1/hosts",
        "/v1/usage",
        "/v1/usage?by=tenant",
        "/metrics",
    ] {
        get(path);
    }
    for group in get("/v1/groups").as_array().into_iter().flatten() {
        let name = group["name"].as_str().unwrap_or_default();
        get(&format!("/v1/groups/{name}"));
    }
    for vm in get("/v1/vms").as_array().into_iter().flatten() {
        let id = vm["id"].as_str().unwrap_or_default();
        assert!(
            crate::model::check_name("VM", id).is_ok(),
            "a VM whose id is not a name was read from the state file: {id:?}"
        );
        for what in ["", "/snapshots", "/metrics", "/console"] {
            get(&format!("/v1/vms/{id}{what}"));
        }
        // Its directory is under the daemon's (the id is a name): deleting it touches no other.
        let path = format!("/v1/vms/{id}");
        let (status, answer) = call(&runtime, &router, "DELETE", &path, b"", &admin_key);
        check_answer("DELETE", &path, status, &answer, true);
    }
}

/// Removes a directory when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A xorshift generator from `seed`: the same inputs on every run.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    #[test]
    fn hostile_requests_get_clear_answers() {
        let h = Harness::new();
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        let paths: &[&[u8]] = &[
            b"/v1/vms\n",
            b"/v1/vms/x/restore\n",
            b"/v1/tenants\n",
            b"/v1/images?name=a\n",
            b"/v1/images?name=%ff\n",
            b"/v1/instance-types\n",
            b"/v1/vms/%2e%2e/console?bytes=-1\n",
            b"/v1/tenants/fuzz/keys\n",
            b"/v1/usage\n",
            b"/v1/vms/%ff%fe\n",
            b"/v1/vms/a/metrics?x=%ff\n",
        ];
        let bodies: &[&[u8]] = &[
            b"{",
            b"{}",
            b"null",
            br#"{"name":"a","image":"x"}"#,
            br#"{"name":"t","vcpus":0,"mem_mib":1,"price_per_hour":-1}"#,
            br#"{"name":"t","vcpus":1,"mem_mib":64,"price_per_hour":1e400}"#,
            br#"{"name":"b","quota":{"vcpus":1,"mem_mib":1,"vms":1},"cpu_weight":0}"#,
            b"\x7fELF\x02\x01",
            &[0xff; 300],
        ];
        for _ in 0..400 {
            let mut input = vec![(next() & 0xff) as u8];
            input.extend_from_slice(paths[(next() % paths.len() as u64) as usize]);
            let body = bodies[(next() % bodies.len() as u64) as usize];
            let mut body = body.to_vec();
            if next() % 3 == 0 && !body.is_empty() {
                let at = (next() % body.len() as u64) as usize;
                body[at] = (next() & 0xff) as u8;
            }
            input.extend_from_slice(&body);
            h.request(&input);
        }
    }

    fn vm_record(id: &str, uid: Option<u32>) -> Vec<u8> {
        let mut vm = serde_json::json!({
            "id": id, "tenant": "admin", "name": "web", "image": format!("sha256:{}", "ab".repeat(32)),
            "instance_type": "x1.nano", "vcpus": 1, "mem_mib": 64, "args": [], "state": "running",
            "pid": 1, "created": 0, "run_seconds": 0.0, "running_since": null, "exit": null,
        });
        if let Some(uid) = uid {
            vm["uid"] = uid.into();
        }
        serde_json::to_vec(&vm).unwrap_or_default()
    }

    /// Opens a daemon on a state file holding `rows` and reads its images: the error, if any.
    fn open_with(rows: &[(crate::store::Table, String, Vec<u8>)]) -> Result<(), String> {
        let dir = scratch_dir("state-test");
        let _cleanup = RemoveOnDrop(dir.clone());
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        write_records(&dir.join("state.redb"), rows).expect("a state file");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let opened = runtime.block_on(async {
            let daemon = Daemon::open_without_cgroups(scratch_config(&dir)).await?;
            // Images are read when they are used, not at start.
            daemon
                .store
                .list::<crate::model::Image>(crate::store::Table::Images)
                .await
        });
        assert!(dir.join("state.redb").exists(), "the state file stays");
        opened.map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_record_that_would_lead_the_daemon_outside_its_files_stops_it_and_stays() {
        use crate::store::Table::Vms;
        // A VM the daemon could have written: it starts, and finds that VM's VMM gone.
        open_with(&[(
            Vms,
            "vm-0123456789ab".into(),
            vm_record("vm-0123456789ab", Some(200_001)),
        )])
        .expect("a good record is read");
        for (id, uid, why) in [
            ("/", None, "VM name \"/\""),
            ("../../etc", None, "VM name"),
            ("vm-0123456789ab", Some(0), "uid 0 is below"),
        ] {
            let err = open_with(&[(Vms, id.into(), vm_record(id, uid))]).expect_err(id);
            assert!(err.contains("is unreadable") && err.contains(why), "{id}: {err}");
        }
        let err = open_with(&[(Vms, "vm-1".into(), b"{\"id\":".to_vec())]).expect_err("cut JSON");
        assert!(err.contains("record \"vm-1\" of Vms is unreadable"), "{err}");
        let image =
            serde_json::json!({"id": "sha256:../../../bin", "tenant": "admin", "name": "x", "size": 1, "created": 0});
        let err = open_with(&[(
            crate::store::Table::Images,
            "admin/x".into(),
            image.to_string().into_bytes(),
        )])
        .expect_err("an image id that is a path");
        assert!(err.contains("is not sha256: and 64 hex digits"), "{err}");
    }

    #[test]
    fn state_files_of_anything_are_refused_or_served() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        // A real state file to damage: one with records of every kind the daemon writes.
        let dir = scratch_dir("state-seed");
        let _cleanup = RemoveOnDrop(dir.clone());
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let good: Vec<u8> = vm_record("vm-0123456789ab", Some(200_001));
        write_records(
            &dir.join("state.redb"),
            &[(crate::store::Table::Vms, "vm-0123456789ab".into(), good.clone())],
        )
        .expect("a state file");
        let file = std::fs::read(dir.join("state.redb")).expect("its bytes");
        let tables = crate::store::ALL.len() as u64;
        for round in 0..60 {
            let mut input = vec![(round % 2) as u8];
            if round % 2 == 1 {
                // The file itself, with bytes changed or cut short.
                let mut bytes = file.clone();
                for _ in 0..1 + next() % 8 {
                    let at = (next() % bytes.len() as u64) as usize;
                    bytes[at] = (next() & 0xff) as u8;
                }
                if next() % 4 == 0 {
                    bytes.truncate((next() % bytes.len() as u64) as usize);
                }
                input.extend_from_slice(&bytes);
            } else {
                // Records of every table: good ones with a byte changed, and garbage.
                for _ in 0..1 + next() % 4 {
                    let mut value = if next() % 2 == 0 {
                        good.clone()
                    } else {
                        vec![(next() & 0xff) as u8; 5]
                    };
                    let at = (next() % value.len() as u64) as usize;
                    value[at] = b"{}[]\":,0a\\"[(next() % 10) as usize];
                    let key = b"vm-0123456789ab";
                    input.push((next() % tables) as u8);
                    input.push(key.len() as u8);
                    input.extend_from_slice(key);
                    input.extend_from_slice(&(value.len() as u16).to_le_bytes());
                    input.extend_from_slice(&value);
                }
            }
            open_state(&input);
        }
    }
}
