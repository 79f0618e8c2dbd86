//! Builds the guest workspace (freestanding, see guest/.cargo/config.toml) and embeds each
//! built-in workload in the xcloud binary, so `xcloud run hello` needs no file.

use std::path::PathBuf;
use std::process::Command;

const WORKLOADS: &[&str] = &[
    "hello",
    "heartbeat",
    "dirty",
    "micro",
    "diskwrite",
    "diskread",
    "netrecv",
    "httpd",
    "gauge",
    "kvclient",
    "marker",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let root = manifest.join("../..");
    let guest = root.join("guest");
    for watched in [
        "guest/sdk",
        "guest/workloads",
        "guest/Cargo.toml",
        "guest/Cargo.lock",
        "guest/.cargo",
        "crates/abi",
        "crates/bench-kernels",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let target_dir = out.join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    // The guest build has flags of its own; none of the host build's may leak into it.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static");
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PROFILE_RELEASE_PANIC",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("cannot run cargo to build the guest workspace");
    assert!(
        status.success(),
        "building the guest workspace failed (see the errors above)"
    );
    let bin_dir = target_dir.join("x86_64-unknown-linux-gnu/release");
    let mut table =
        String::from("/// Built-in guests: name and PVH ELF image.\npub const BUILTIN: &[(&str, &[u8])] = &[\n");
    for name in WORKLOADS {
        let path = bin_dir.join(name);
        table.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("guests.rs"), table).expect("cannot write guests.rs");
}
