//! `xcloud bench ext`: what a tenant's WebAssembly module costs beside the same logic written
//! as a native Rust module, in the same run (docs/extensions.md):
//!
//! 1. a hook call through the VM's registry (port write and read of the kv store; a frame
//!    judged by the packet filter), in nanoseconds per call;
//! 2. a port-I/O round trip from a real guest (`kvclient`: each access a VM exit served by
//!    the module), the Wasm kv against the native kv on the same ports;
//! 3. TCP receive throughput into a guest (`netrecv` behind a TAP) without a filter and with
//!    the Wasm packet filter taking every frame each way (snap 78 bytes).
//!
//! The native modules are the examples' logic, line for line: the baseline a provider's
//! built-in would be.

use crate::bench_net::{stream_to, NsGuest, GUEST_IP};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xcloud_devices::bus::PortDevice;
use xcloud_vmm::extension::{
    Extension, ExtensionPorts, Extensions, HookError, ModuleSpec, Origin, PacketDirection, PacketHook, PacketVerdict,
};
use xcloud_vmm::{CaptureBuffer, Console, Vm, VmConfig};

/// What to measure.
pub struct ExtBench {
    /// Hook calls per measurement.
    pub calls: u64,
    /// Rounds of 4096 keys the guest stores and reads back.
    pub rounds: u32,
    /// Bytes per TCP connection.
    pub bytes: u64,
    /// Runs of each side.
    pub runs: usize,
}

const KV: &[u8] = include_bytes!("../../../extensions/kv.wat");
const FILTER: &[u8] = include_bytes!("../../../extensions/packet-filter.wat");
const PORT: u16 = 5001;
/// Where the guest looks for the kv store: the first 16 ports of the extension window.
const KV_PORTS: (u16, u16) = (xcloud_vmm::extension::EXT_PORT_BASE, 16);

/// extensions/kv.wat in Rust.
struct NativeKv {
    key: AtomicU32,
    stores: AtomicU32,
    values: Mutex<Vec<Option<u32>>>,
}

impl NativeKv {
    fn new() -> Self {
        Self {
            key: AtomicU32::new(0),
            stores: AtomicU32::new(0),
            values: Mutex::new(vec![None; 4096]),
        }
    }
}

impl Extension for NativeKv {
    fn port_read(&self, offset: u16, _size: u8) -> Result<u32, HookError> {
        Ok(match offset {
            0 => 0x6b76_0001,
            12 => self.stores.load(Ordering::Relaxed),
            8 => {
                let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
                let key = self.key.load(Ordering::Relaxed) as usize;
                values.get(key).copied().flatten().unwrap_or(u32::MAX)
            }
            _ => u32::MAX,
        })
    }

    fn port_write(&self, offset: u16, _size: u8, value: u32) -> Result<(), HookError> {
        match offset {
            4 => self.key.store(value, Ordering::Relaxed),
            8 => {
                let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
                let key = self.key.load(Ordering::Relaxed) as usize;
                if let Some(slot) = values.get_mut(key) {
                    *slot = Some(value);
                    self.stores.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// extensions/packet-filter.wat in Rust.
#[derive(Default)]
struct NativeFilter {
    dropped: AtomicU64,
    passed: AtomicU64,
}

impl NativeFilter {
    const BLOCKED: [u16; 3] = [23, 5001, 6379];

    fn blocked(head: &[u8], len: usize) -> bool {
        if len < 34 || head.len() < 34 || head[12..14] != [0x08, 0x00] {
            return false;
        }
        let ihl = usize::from(head[14] & 15) * 4;
        let proto = head[23];
        if ihl < 20 || (proto != 6 && proto != 17) || (head[20] & 0x1f != 0 || head[21] != 0) {
            return false;
        }
        let at = 14 + ihl + 2;
        if len < at + 2 || head.len() < at + 2 {
            return false;
        }
        Self::BLOCKED.contains(&u16::from_be_bytes([head[at], head[at + 1]]))
    }
}

impl Extension for NativeFilter {
    fn packet_snap(&self) -> usize {
        78
    }

    fn packet(
        &self,
        _nic: u32,
        direction: PacketDirection,
        head: &mut [u8],
        len: usize,
    ) -> Result<PacketVerdict, HookError> {
        if direction == PacketDirection::ToGuest && Self::blocked(head, len) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(PacketVerdict::Drop);
        }
        self.passed.fetch_add(1, Ordering::Relaxed);
        Ok(PacketVerdict::Pass)
    }
}

fn spec(name: &str, ports: Option<(u16, u16)>) -> ModuleSpec {
    ModuleSpec {
        name: name.into(),
        version: "bench".into(),
        digest: "bench".into(),
        origin: Origin::Tenant,
        ports,
        call_budget: Duration::from_secs(1),
        code: None,
    }
}

fn wasm(bytes: &[u8]) -> Result<Arc<dyn Extension>> {
    Ok(Arc::new(
        xcloud_extensions::WasmModule::load(bytes, &xcloud_extensions::Policy::default())
            .context("an example module does not load")?,
    ))
}

/// One registry holding `module` at the kv ports.
fn registry(name: &str, module: Arc<dyn Extension>, ports: Option<(u16, u16)>) -> Result<Arc<Extensions>> {
    let ext = Arc::new(Extensions::new());
    ext.add(spec(name, ports), module)?;
    Ok(ext)
}

/// Nanoseconds per port access (a put and a get: three writes and a read per key).
fn port_call_ns(ext: &Arc<Extensions>, calls: u64) -> f64 {
    let ports = ExtensionPorts::new(ext.clone());
    let start = Instant::now();
    let mut word = [0u8; 4];
    for i in 0..calls / 4 {
        let key = (i % 4096) as u32;
        ports.write(4, &key.to_le_bytes());
        ports.write(8, &(key ^ 0x5a5a).to_le_bytes());
        ports.write(4, &key.to_le_bytes());
        ports.read(8, &mut word);
    }
    start.elapsed().as_nanos() as f64 / (calls / 4 * 4).max(1) as f64
}

/// Nanoseconds per frame judged: a TCP segment to port 80 (passed) and one to 5001 (dropped).
fn packet_call_ns(ext: &Arc<Extensions>, calls: u64) -> f64 {
    let mut frames = [[0u8; 78]; 2];
    for (frame, port) in frames.iter_mut().zip([80u16, PORT]) {
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[23] = 6;
        frame[36..38].copy_from_slice(&port.to_be_bytes());
    }
    let start = Instant::now();
    for i in 0..calls {
        let mut head = frames[(i % 2) as usize];
        let _ = ext.packet(0, PacketDirection::ToGuest, &mut head, 1514);
    }
    start.elapsed().as_nanos() as f64 / calls.max(1) as f64
}

/// `kvclient 4096 ROUNDS` against `module` on the kv ports: its nanoseconds per access.
fn guest_round_trip_ns(module: Arc<dyn Extension>, rounds: u32) -> Result<f64> {
    let capture = CaptureBuffer::default();
    let config = VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        cmdline: format!("4096 {rounds}"),
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let image = crate::guests::builtin("kvclient").context("no kvclient guest")?;
    let mut vm = Vm::new(&config, image, Console::new(Box::new(capture.clone())))?;
    let handle = vm.handle();
    handle.extensions().add(spec("kv", Some(KV_PORTS)), module)?;
    vm.start()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let line = loop {
        let text = capture.text();
        if let Some(line) = text.lines().find(|l| l.contains("ns per port access")) {
            break line.to_string();
        }
        if let Some(line) = text.lines().find(|l| l.starts_with("kvclient: key")) {
            bail!("the guest read a wrong value: {line}");
        }
        if Instant::now() > deadline {
            bail!("kvclient did not finish: {text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    handle.extensions().remove("kv", Origin::Tenant)?;
    let _ = vm.wait();
    line.rsplit(", ")
        .next()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("no figure in {line:?}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// The filter's hook calls and microseconds in them so far.
fn filter_busy(socket: &std::path::Path) -> Result<(u64, u64)> {
    let answer = xcloud_api::client::call(socket, xcloud_api::protocol::Command::ExtList)?;
    answer
        .extensions
        .unwrap_or_default()
        .into_iter()
        .find(|m| m.name == "firewall")
        .map(|m| (m.calls, m.busy_us))
        .context("the filter is not listed")
}

/// Installs or removes the Wasm filter in the guest's VMM.
fn filter(socket: &std::path::Path, file: &std::path::Path, on: bool) -> Result<()> {
    use xcloud_api::protocol::Command;
    let command = if on {
        Command::ExtAdd {
            file: file.to_path_buf(),
            name: "firewall".into(),
            version: None,
            port_base: None,
            port_count: None,
        }
    } else {
        Command::ExtRemove {
            name: "firewall".into(),
        }
    };
    let answer = xcloud_api::client::call(socket, command)?;
    if !answer.ok {
        bail!("the VMM refused the filter: {}", answer.error.unwrap_or_default());
    }
    Ok(())
}

/// Runs the benchmark and prints its tables.
pub fn ext(b: &ExtBench) -> Result<()> {
    let runs = b.runs.max(1);
    let bar = ProgressBar::new(runs as u64 * 4).with_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    // 1. Hook calls.
    bar.set_message("hook calls");
    let native_kv = registry("kv", Arc::new(NativeKv::new()), Some(KV_PORTS))?;
    let wasm_kv = registry("kv", wasm(KV)?, Some(KV_PORTS))?;
    let native_filter = registry("firewall", Arc::new(NativeFilter::default()), None)?;
    let wasm_filter = registry("firewall", wasm(FILTER)?, None)?;
    let mut calls = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for run in 0..runs {
        // Warm both, then alternate which goes first.
        for pass in 0..2 {
            let first = (run + pass) % 2 == 0;
            for wasm_side in [!first, first] {
                let (kv, filter) = if wasm_side {
                    (&wasm_kv, &wasm_filter)
                } else {
                    (&native_kv, &native_filter)
                };
                let port = port_call_ns(kv, b.calls);
                let packet = packet_call_ns(filter, b.calls);
                if pass == 1 {
                    let side = usize::from(wasm_side);
                    calls[side].push(port);
                    calls[2 + side].push(packet);
                }
            }
        }
        bar.inc(1);
    }

    // 2. Guest round trips.
    let mut trips = [Vec::new(), Vec::new()];
    for run in 0..runs {
        bar.set_message(format!("run {}: kvclient", run + 1));
        for wasm_side in [run % 2 == 1, run % 2 == 0] {
            let module: Arc<dyn Extension> = if wasm_side {
                wasm(KV)?
            } else {
                Arc::new(NativeKv::new())
            };
            trips[usize::from(wasm_side)].push(guest_round_trip_ns(module, b.rounds)?);
        }
        bar.inc(1);
    }

    // 3. Throughput with and without the filter.
    let dir = std::env::temp_dir().join(format!("xcloud-bench-ext-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("api.sock");
    let filter_file = dir.join("packet-filter.wat");
    std::fs::write(&filter_file, FILTER)?;
    let mut guest = NsGuest::start(
        "ext",
        &[
            "--api".into(),
            socket.display().to_string(),
            "netrecv".into(),
            "--".into(),
            format!("{GUEST_IP}/24"),
            (PORT + 1).to_string(),
            // Connections without end: the benchmark ends the guest.
            "0".into(),
        ],
        "netrecv: listening",
    )?;
    let mut rates = [Vec::new(), Vec::new()];
    // Per filtered connection: the filter's calls, and its share of the connection's time.
    let mut filter_load = Vec::new();
    let measured = (|| -> Result<()> {
        let mut connection = 0;
        for run in 0..runs {
            for filtered in [run % 2 == 1, run % 2 == 0] {
                bar.set_message(format!(
                    "run {}: TCP {}",
                    run + 1,
                    if filtered { "through the filter" } else { "unfiltered" }
                ));
                if filtered {
                    filter(&socket, &filter_file, true)?;
                }
                let (ns, bytes) = (guest.ns().to_string(), b.bytes);
                let addr = format!("{GUEST_IP}:{}", PORT + 1);
                let seconds = crate::netlab::Hosts::in_ns(&ns, move || stream_to(&addr, bytes))
                    .join()
                    .map_err(|_| anyhow::anyhow!("the client panicked"))??;
                connection += 1;
                let line = guest.next(&format!("netrecv: connection {connection}:"))?;
                if !line.contains(&format!(": {bytes} bytes")) {
                    bail!("the guest did not get every byte: {line}");
                }
                rates[usize::from(filtered)].push(bytes as f64 / 1e6 / seconds);
                if filtered {
                    let (calls, busy_us) = filter_busy(&socket)?;
                    filter_load.push((calls, busy_us as f64 / (seconds * 1e6)));
                    filter(&socket, &filter_file, false)?;
                }
            }
            bar.inc(2);
        }
        Ok(())
    })();
    if let Err(e) = measured {
        return Err(e.context(format!("the guest's console: {}", guest.unread())));
    }
    drop(guest);
    let _ = std::fs::remove_dir_all(&dir);
    bar.finish_and_clear();

    println!(
        "Hook calls through the VM's registry, {} calls each, median of {runs} runs (native: the same logic in Rust)",
        b.calls
    );
    println!(
        "{:<28} {:>12} {:>12} {:>10}",
        "hook", "native ns", "Wasm ns", "Wasm/native"
    );
    for (what, native, wasm) in [
        (
            "port I/O (kv store)",
            median(calls[0].clone()),
            median(calls[1].clone()),
        ),
        (
            "packet (filter, 78 B)",
            median(calls[2].clone()),
            median(calls[3].clone()),
        ),
    ] {
        println!("{what:<28} {native:>12.0} {wasm:>12.0} {:>9.2}x", wasm / native);
    }
    let (native, wasm_trip) = (median(trips[0].clone()), median(trips[1].clone()));
    println!();
    println!(
        "Port-I/O round trip from the guest (kvclient, 4096 keys x {} rounds, each access a VM exit)",
        b.rounds
    );
    println!(
        "{:>4} {:>12} {:>12} {:>10}",
        "run", "native ns", "Wasm ns", "Wasm/native"
    );
    for (i, (n, w)) in trips[0].iter().zip(&trips[1]).enumerate() {
        println!("{:>4} {n:>12.0} {w:>12.0} {:>9.2}x", i + 1, w / n);
    }
    let trip_ratio = wasm_trip / native;
    println!(
        "median {:.2}x, target <= 1.10x: {}",
        trip_ratio,
        verdict(trip_ratio <= 1.10)
    );
    println!();
    println!(
        "TCP receive into the guest, {} MiB per connection: without a filter and through the Wasm packet filter (every frame, both ways)",
        b.bytes >> 20
    );
    println!(
        "{:>4} {:>14} {:>14} {:>10} {:>13} {:>13}",
        "run", "plain MB/s", "filtered MB/s", "cost", "filter calls", "filter busy"
    );
    for (i, ((plain, filtered), (calls, busy))) in rates[0].iter().zip(&rates[1]).zip(&filter_load).enumerate() {
        println!(
            "{:>4} {plain:>14.1} {filtered:>14.1} {:>9.1}% {calls:>13} {:>12.2}%",
            i + 1,
            100.0 * (1.0 - filtered / plain),
            100.0 * busy
        );
    }
    let cost = 1.0 - median(rates[1].clone()) / median(rates[0].clone());
    println!(
        "median cost {:.1}% of throughput, target <= 10%: {}; the filter's own time: median {:.2}% of the connection's (the part of the cost that is the filter, not the noise)",
        100.0 * cost,
        verdict(cost <= 0.10),
        100.0 * median(filter_load.iter().map(|l| l.1).collect())
    );
    Ok(())
}
