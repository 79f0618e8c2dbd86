//! The API as a fuzz target: a real daemon on a scratch data directory (no VMM binary, so
//! nothing boots; no cgroups, no jail), its real router, called with any method, path and
//! body by a caller that holds the admin key, a tenant's key or a broken one. Nothing may
//! panic; every answer must be a status with, for an error, a JSON error body.

use crate::daemon::{Config, Daemon};
use axum::body::Body;
use http_body_util::BodyExt;
use std::sync::Arc;
use tower::ServiceExt;

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
        let data_dir = std::env::temp_dir().join(format!(
            "xcloud-fuzz-api-{}-{}",
            std::process::id(),
            crate::auth::hex(&crate::auth::random_bytes::<4>().unwrap_or_default())
        ));
        let config = Config {
            data_dir: data_dir.clone(),
            vmm_binary: data_dir.join("no-vmm-here"),
            host_name: "fuzz".into(),
            provider: "local".into(),
            region: "local".into(),
            price_per_hour: 0.0,
            jail: false,
            meter_period: std::time::Duration::from_secs(10),
            usage_days: 1,
            autoscale_period: std::time::Duration::from_secs(5),
        };
        let daemon: Arc<Daemon> = runtime
            .block_on(Daemon::open_without_cgroups(config))
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
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(body.to_vec()));
        let Ok(request) = request else {
            return (0, Vec::new());
        };
        self.runtime.block_on(async {
            let Ok(response) = self.router.clone().oneshot(request).await;
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
        if status >= 400 {
            let v: Result<serde_json::Value, _> = serde_json::from_slice(&answer);
            assert!(
                v.as_ref().is_ok_and(|v| v["error"].is_string()),
                "{method} {path}: {status} without a JSON error: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        assert!(
            status != 500,
            "{method} {path}: 500: {}",
            String::from_utf8_lossy(&answer)
        );
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

    #[test]
    fn hostile_requests_get_clear_answers() {
        let h = Harness::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
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
}
