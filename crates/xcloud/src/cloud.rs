//! The tenant's commands: `xcloud vm|image|tenant|type|host|usage|events|whoami`, clients of
//! xcloudd's REST API (docs/cloud-api.md) over its Unix socket.
// The doc comments here are the commands' --help; the plumbing (flattened endpoints,
// subcommand fields, positional names that say what they are) needs none.
#![allow(missing_docs)]

use crate::cli_config;
use crate::exit::{self, ApiError};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use xcloud_control::client::{Answer, Client};

/// Where the daemon is and which key to call it with: flags, else XCLOUD_URL, XCLOUD_TOKEN
/// and XCLOUD_SERVER_CERT, else the profile (`xcloud config`), else the local daemon.
#[derive(Args, Clone, Debug)]
pub struct Endpoint {
    /// xcloudd's URL: its socket's path (or unix://PATH), or https://HOST:PORT with
    /// --server-cert [env: XCLOUD_URL] [default: the profile's, else
    /// /var/lib/xcloud/xcloudd.sock].
    #[arg(long, visible_alias = "endpoint", global = true)]
    url: Option<String>,
    /// The certificate (DER) the server at an https URL must present: its identity's
    /// cert.der [env: XCLOUD_SERVER_CERT].
    #[arg(long, global = true)]
    server_cert: Option<PathBuf>,
    /// The API key [env: XCLOUD_TOKEN] [default: the profile's, else the admin key beside
    /// the local socket when this user can read it].
    #[arg(long, visible_alias = "key", global = true)]
    token: Option<String>,
    /// The profile of the config file to use [env: XCLOUD_PROFILE] [default: its
    /// default_profile].
    #[arg(long, global = true)]
    profile: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[arg(skip)]
    resolved: std::sync::OnceLock<Box<cli_config::Resolved>>,
}

impl Endpoint {
    /// Where the flags, the environment and the config file say the daemon is (worked out
    /// once per command; its warnings go to stderr then).
    fn resolved(&self) -> anyhow::Result<&cli_config::Resolved> {
        if let Some(r) = self.resolved.get() {
            return Ok(r);
        }
        let flags = cli_config::Flags {
            url: self.url.clone(),
            token: self.token.clone(),
            server_cert: self.server_cert.clone(),
            profile: self.profile.clone(),
        };
        let r = cli_config::resolve(&flags, &|var| std::env::var(var).ok())?;
        for warning in &r.warnings {
            eprintln!("xcloud: warning: {warning}");
        }
        Ok(self.resolved.get_or_init(|| Box::new(r)))
    }
}

/// The control plane's commands.
#[derive(Subcommand, Debug)]
pub enum CloudCommand {
    /// VMs: create, list, start, stop, pause, resume, snapshot, restore, remove (through xcloudd).
    Vm {
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(subcommand)]
        action: VmAction,
    },
    /// Autoscaling groups: VMs made from one template, as many as keep their CPU near a
    /// target, between a min and a max.
    Group {
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(subcommand)]
        action: GroupAction,
    },
    /// Guest images (PVH ELFs) kept by xcloudd.
    Image {
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(subcommand)]
        action: ImageAction,
    },
    /// Tenants and their API keys (admin).
    Tenant {
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(subcommand)]
        action: TenantAction,
    },
    /// Instance types: the shapes and prices of VMs.
    Type {
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(subcommand)]
        action: TypeAction,
    },
    /// The hosts of the cloud.
    Hosts {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// A host of the cluster: drain it (admin).
    Host {
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(subcommand)]
        action: HostAction,
    },
    /// A provider: move every VM off it, live (admin).
    Provider {
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(subcommand)]
        action: ProviderAction,
    },
    /// Move running VMs to hosts where their CPUs cost less, live (admin): the plan, with
    /// --dry-run only the plan. Exit status 7 if a planned move did not happen.
    Replace {
        #[command(flatten)]
        endpoint: Endpoint,
        /// Move a VM when its CPU would cost more than this share less (0.2: 20%).
        #[arg(long, default_value_t = 0.2)]
        threshold: f64,
        /// Show the plan and its saving; move nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// What the caller's VMs used and cost, from the per-second usage records.
    Usage {
        #[command(flatten)]
        endpoint: Endpoint,
        /// Add up by vm, tenant, provider, region, host, type or hour.
        #[arg(long, default_value = "vm")]
        by: String,
        /// From this time: Unix seconds, or how long ago (`90m`, `24h`, `7d`).
        #[arg(long)]
        since: Option<String>,
        /// Until this time (same forms; default: now).
        #[arg(long)]
        until: Option<String>,
    },
    /// Follow what happens to the caller's resources.
    Events {
        #[command(flatten)]
        endpoint: Endpoint,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Who the API key belongs to.
    Whoami {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// The CLI's own settings: profiles, each a daemon and a key, in the config file
    /// ($XCLOUD_CONFIG, else ~/.config/xcloud/config.toml). Calls no daemon.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// `xcloud config ...`.
#[derive(Subcommand, Debug)]
pub enum ConfigAction {
    /// Which daemon the other commands would call with which key, and where each came from.
    Show {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// The profiles.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a profile or change some of its settings (the first profile becomes the default).
    Set {
        profile: String,
        /// xcloudd's URL: a socket path, unix://PATH or https://HOST:PORT.
        #[arg(long)]
        url: Option<String>,
        /// Read the API key from stdin (one line), so it stays out of the shell's history.
        #[arg(long, conflicts_with = "token_file")]
        token_stdin: bool,
        /// A file holding the API key (read at each command).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The certificate (DER) the server at an https URL must present.
        #[arg(long)]
        server_cert: Option<PathBuf>,
        /// Make it the default profile.
        #[arg(long)]
        default: bool,
    },
    /// Make PROFILE the default.
    Use { profile: String },
    /// Remove PROFILE.
    Rm { profile: String },
}

/// `xcloud group ...`.
#[derive(Subcommand, Debug)]
pub enum GroupAction {
    /// Make a group; its VMs (NAME-1, NAME-2, ...) are spread over the hosts, apart from each
    /// other, and come at the autoscaler's next look.
    Create {
        name: String,
        /// An image id or name.
        #[arg(long)]
        image: String,
        /// Its VMs' instance type.
        #[arg(long = "type", default_value = "x1.nano")]
        instance_type: String,
        /// The fewest VMs.
        #[arg(long, default_value_t = 1)]
        min: u32,
        /// The most VMs.
        #[arg(long)]
        max: u32,
        /// Follow CPU: what its running VMs should use on average, in percent of their vCPUs.
        #[arg(long, required_unless_present = "target_load", conflicts_with = "target_load")]
        target_cpu: Option<f64>,
        /// Follow the load its guests report: the figure each should report on average.
        #[arg(long)]
        target_load: Option<f64>,
        /// Seconds after a change before the metric may change the group again.
        #[arg(long, default_value_t = 60)]
        cooldown: u64,
        /// Cap each VM at this many percent of one CPU.
        #[arg(long)]
        cpu_cap: Option<u32>,
        /// What happens when a VM's host is lost.
        #[arg(long, value_parser = ["never", "on_host_loss"], default_value = "never")]
        restart: String,
        /// The guest's arguments.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The groups.
    Ls,
    /// One group and its VMs.
    Show { group: String },
    /// Change a group's bounds, target or cooldown.
    Set {
        group: String,
        #[arg(long)]
        min: Option<u32>,
        #[arg(long)]
        max: Option<u32>,
        /// Follow CPU, with this target in percent.
        #[arg(long, conflicts_with = "target_load")]
        target_cpu: Option<f64>,
        /// Follow the guests' reported load, with this target.
        #[arg(long)]
        target_load: Option<f64>,
        #[arg(long)]
        cooldown: Option<u64>,
    },
    /// Remove a group and its VMs.
    Rm { group: String },
}

/// `xcloud host ...`.
#[derive(Subcommand, Debug)]
pub enum HostAction {
    /// The hosts (as `xcloud hosts`).
    Ls,
    /// Place no more VMs on HOST and live-migrate every VM running there to other hosts
    /// (exit status 7 if some could not move: they run on where they were).
    Drain {
        host: String,
        /// How many VMs move at once.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
    },
    /// Place VMs on a drained host again.
    Undrain { host: String },
    /// Set a host's price per hour (a provider's price change).
    Price { host: String, price_per_hour: f64 },
}

/// `xcloud provider ...`.
#[derive(Subcommand, Debug)]
pub enum ProviderAction {
    /// Drain every host of PROVIDER, live-migrating each VM to a host of another provider
    /// (exit status 7 if some could not move: they run on where they were).
    Evacuate {
        provider: String,
        /// How many VMs move at once.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
    },
}

/// `xcloud vm ...`.
#[derive(Subcommand, Debug)]
pub enum VmAction {
    /// List VMs.
    Ls,
    /// Make a VM and boot it.
    Create {
        /// Its name.
        name: String,
        /// An image id or name (`xcloud image ls`).
        #[arg(long)]
        image: String,
        /// Its instance type (`xcloud type ls`).
        #[arg(long = "type", default_value = "x1.nano")]
        instance_type: String,
        /// Define it only.
        #[arg(long)]
        no_start: bool,
        /// In a cluster: how to choose among the hosts it fits on.
        #[arg(long, value_parser = ["cheapest", "pack", "spread"], default_value = "cheapest")]
        strategy: String,
        /// Only hosts of this provider (repeat for several).
        #[arg(long)]
        provider: Vec<String>,
        /// Only hosts in this region (repeat for several).
        #[arg(long)]
        region: Vec<String>,
        /// No two of the tenant's VMs of this group on one host.
        #[arg(long)]
        anti_affinity: Option<String>,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// What happens when its host is lost: stay lost (`never`), or start again elsewhere.
        #[arg(long, value_parser = ["never", "on_host_loss"], default_value = "never")]
        restart: String,
        /// The guest's arguments.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Show one VM.
    Show { vm: String },
    /// Boot a stopped VM.
    Start { vm: String },
    /// Stop a VM's VMM.
    Stop { vm: String },
    /// Pause a running VM.
    Pause { vm: String },
    /// Resume a paused VM.
    Resume { vm: String },
    /// Remove a VM (stopped first), its files and its snapshots.
    Rm { vm: String },
    /// Live-migrate a running VM to another host of the cluster.
    Migrate {
        vm: String,
        /// To this host.
        #[arg(long)]
        host: Option<String>,
        /// To a host of this provider.
        #[arg(long)]
        provider: Option<String>,
    },
    /// Print the end of a VM's console output.
    Console {
        vm: String,
        /// Bytes from the end.
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    /// A VM's CPU time, memory and running time.
    Metrics { vm: String },
    /// Take a snapshot of a VM.
    Snapshot { vm: String },
    /// List a VM's snapshots and the hosts that hold them.
    Snapshots { vm: String },
    /// Delete one of a VM's snapshots (and, within minutes, its copies on other hosts).
    SnapshotRm { vm: String, snapshot: String },
    /// Run a VM from one of its snapshots.
    Restore { vm: String, snapshot: String },
    /// List the extension modules in a VM's VMM (docs/extensions.md).
    Extensions { vm: String },
    /// Install an extension module (WebAssembly or its text form) into a running VM.
    ExtAdd {
        vm: String,
        /// The module's file.
        file: PathBuf,
        /// Its name in the VM.
        #[arg(long)]
        name: String,
        /// Its version.
        #[arg(long)]
        version: Option<String>,
        /// The ports it serves, FIRST+COUNT in the extension window (e.g. 0x5000+16).
        #[arg(long)]
        ports: Option<String>,
    },
    /// Remove an extension module from a running VM.
    ExtRm { vm: String, name: String },
}

/// `xcloud image ...`.
#[derive(Subcommand, Debug)]
pub enum ImageAction {
    /// List images.
    Ls,
    /// Upload a PVH ELF (a path, or the name of a built-in guest).
    Push {
        /// The ELF file or built-in guest.
        source: String,
        /// The image's name (default: the source's file name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove an image.
    Rm { image: String },
}

/// `xcloud tenant ...`.
#[derive(Subcommand, Debug)]
pub enum TenantAction {
    /// List tenants.
    Ls,
    /// Make a tenant and print its first API key.
    Create {
        name: String,
        /// vCPU quota.
        #[arg(long, default_value_t = 8)]
        vcpus: u32,
        /// Memory quota in MiB.
        #[arg(long, default_value_t = 8192)]
        mem_mib: u64,
        /// VM quota.
        #[arg(long, default_value_t = 16)]
        vms: u32,
    },
    /// Another API key for a tenant.
    Key { name: String },
    /// Remove a tenant that holds nothing.
    Rm { name: String },
}

/// `xcloud type ...`.
#[derive(Subcommand, Debug)]
pub enum TypeAction {
    /// List instance types.
    Ls,
    /// Add or change an instance type (admin).
    Add {
        name: String,
        #[arg(long)]
        vcpus: u32,
        #[arg(long)]
        mem_mib: u64,
        #[arg(long)]
        price_per_hour: f64,
    },
}

fn client(e: &Endpoint) -> anyhow::Result<Client> {
    let r = e.resolved()?;
    Ok(Client::at(r.endpoint.clone(), r.token.clone()))
}

/// Calls the API and returns the JSON of a successful answer; an error answer is an error.
fn call(e: &Endpoint, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let body = body.map(|b| (b.to_string().into_bytes(), "application/json"));
    let answer = client(e)?.call(method, path, body)?;
    json_of(answer)
}

/// The answer, or an [`ApiError`] if it is an error answer.
fn success(answer: Answer) -> Result<Answer, ApiError> {
    if (200..300).contains(&answer.status) {
        Ok(answer)
    } else {
        Err(ApiError {
            status: answer.status,
            message: answer.error_text(),
        })
    }
}

fn json_of(answer: Answer) -> anyhow::Result<Value> {
    let answer = success(answer)?;
    if answer.body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&answer.body).context("xcloudd's answer is not JSON")
}

fn s(v: &Value, field: &str) -> String {
    match &v[field] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Number(n) if n.is_f64() => format!("{:.6}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

/// Prints `rows` as a table of `fields`, or their JSON.
/// A module as `xcloud vm extensions` shows it: its state and figures in one column each.
fn extension_row(m: &Value) -> Value {
    let mut row = m.clone();
    row["ports"] = Value::String(m["ports"].as_str().unwrap_or("-").to_string());
    row["state"] = Value::String(match m["disabled"].as_str() {
        Some(why) => format!("disabled: {why}"),
        None => "enabled".into(),
    });
    let figures: Vec<String> = m["metrics"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    row["figures"] = Value::String(figures.join(" "));
    row
}

fn table(e: &Endpoint, rows: &Value, fields: &[&str]) {
    if e.json {
        println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default());
        return;
    }
    let rows: Vec<Vec<String>> = rows
        .as_array()
        .map(|a| a.iter().map(|r| fields.iter().map(|f| s(r, f)).collect()).collect())
        .unwrap_or_default();
    let widths: Vec<usize> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| rows.iter().map(|r| r[i].len()).chain([f.len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(fields.iter().map(|f| f.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}

const USAGE_FIELDS: &[&str] = &[
    "key",
    "hours",
    "vcpu_hours",
    "gib_hours",
    "cpu_hours",
    "migrated",
    "cost",
    "provider_cost",
];

/// A usage line in the units people read: hours, GiB-hours, MiB.
fn usage_row(line: &Value) -> Value {
    let f = |k: &str| line[k].as_f64().unwrap_or(0.0);
    let hours = |x: f64| Value::String(format!("{:.4}", x / 3600.0));
    serde_json::json!({
        "key": line["key"],
        "hours": hours(f("run_seconds")),
        "vcpu_hours": hours(f("vcpu_seconds")),
        "gib_hours": hours(f("mem_mib_seconds") / 1024.0),
        "cpu_hours": hours(f("cpu_seconds")),
        "migrated": format!("{:.1} MiB", f("migrated_bytes") / 1048576.0),
        "cost": format!("{:.6}", f("cost")),
        "provider_cost": format!("{:.6}", f("provider_cost")),
    })
}

/// Unix seconds from `at`: Unix seconds, or a time ago such as `90s`, `30m`, `24h`, `7d`.
fn unix_time(at: &str) -> anyhow::Result<u64> {
    if let Ok(secs) = at.parse::<u64>() {
        return Ok(secs);
    }
    let split = at.len().saturating_sub(1);
    let (n, unit) = at.split_at(split);
    let n: u64 = n
        .parse()
        .with_context(|| format!("{at:?} is neither Unix seconds nor a time ago such as 30m, 24h, 7d"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("{at:?}: the unit of a time ago is s, m, h or d"),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(now.saturating_sub(n.saturating_mul(unit)))
}

fn show(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

const HOST_FIELDS: &[&str] = &[
    "name",
    "provider",
    "region",
    "cpus",
    "mem_mib",
    "vms",
    "vcpus_used",
    "price_per_hour",
    "state",
    "scheduler",
];

const VM_FIELDS: &[&str] = &[
    "id",
    "name",
    "state",
    "host",
    "instance_type",
    "vcpus",
    "mem_mib",
    "image",
];

/// Runs one of the control plane's commands.
pub fn run(command: CloudCommand) -> anyhow::Result<i32> {
    match command {
        CloudCommand::Vm { endpoint: e, action } => vm(&e, action)?,
        CloudCommand::Group { endpoint: e, action } => group(&e, action)?,
        CloudCommand::Image { endpoint: e, action } => match action {
            ImageAction::Ls => table(
                &e,
                &call(&e, "GET", "/v1/images", None)?,
                &["id", "name", "size", "tenant"],
            ),
            ImageAction::Push { source, name } => {
                let (bytes, default_name) = match crate::guests::builtin(&source) {
                    Some(image) => (image.to_vec(), source.clone()),
                    None => {
                        let bytes = std::fs::read(&source).with_context(|| format!("reading {source}"))?;
                        let stem = std::path::Path::new(&source)
                            .file_name()
                            .map(|n| n.to_string_lossy().to_lowercase())
                            .unwrap_or_else(|| "image".into());
                        (bytes, stem)
                    }
                };
                let name = name.unwrap_or(default_name);
                let path = format!("/v1/images?name={}", escape(&name));
                let answer = client(&e)?.call("POST", &path, Some((bytes, "application/octet-stream")))?;
                let image = json_of(answer)?;
                if e.json {
                    show(&image);
                } else {
                    println!("{} {}", s(&image, "id"), s(&image, "name"));
                }
            }
            ImageAction::Rm { image } => {
                call(&e, "DELETE", &format!("/v1/images/{}", escape(&image)), None)?;
            }
        },
        CloudCommand::Tenant { endpoint: e, action } => match action {
            TenantAction::Ls => table(&e, &call(&e, "GET", "/v1/tenants", None)?, &["name", "role", "quota"]),
            TenantAction::Create {
                name,
                vcpus,
                mem_mib,
                vms,
            } => {
                let body = serde_json::json!({"name": name, "quota": {"vcpus": vcpus, "mem_mib": mem_mib, "vms": vms}});
                print_key(&e, &call(&e, "POST", "/v1/tenants", Some(body))?);
            }
            TenantAction::Key { name } => print_key(
                &e,
                &call(&e, "POST", &format!("/v1/tenants/{}/keys", escape(&name)), None)?,
            ),
            TenantAction::Rm { name } => {
                call(&e, "DELETE", &format!("/v1/tenants/{}", escape(&name)), None)?;
            }
        },
        CloudCommand::Type { endpoint: e, action } => match action {
            TypeAction::Ls => table(
                &e,
                &call(&e, "GET", "/v1/instance-types", None)?,
                &["name", "vcpus", "mem_mib", "price_per_hour"],
            ),
            TypeAction::Add {
                name,
                vcpus,
                mem_mib,
                price_per_hour,
            } => show(&call(
                &e,
                "POST",
                "/v1/instance-types",
                Some(
                    serde_json::json!({"name": name, "vcpus": vcpus, "mem_mib": mem_mib, "price_per_hour": price_per_hour}),
                ),
            )?),
        },
        CloudCommand::Hosts { endpoint: e }
        | CloudCommand::Host {
            endpoint: e,
            action: HostAction::Ls,
        } => table(&e, &call(&e, "GET", "/v1/hosts", None)?, HOST_FIELDS),
        CloudCommand::Host {
            endpoint: e,
            action: HostAction::Drain { host, parallel },
        } => return drain(&e, &[host], None, parallel),
        CloudCommand::Host {
            endpoint: e,
            action: HostAction::Undrain { host },
        } => {
            call(&e, "POST", &format!("/v1/hosts/{}/undrain", escape(&host)), None)?;
        }
        CloudCommand::Host {
            endpoint: e,
            action: HostAction::Price { host, price_per_hour },
        } => {
            let body = serde_json::json!({ "price_per_hour": price_per_hour });
            call(&e, "POST", &format!("/v1/hosts/{}/price", escape(&host)), Some(body))?;
        }
        CloudCommand::Replace {
            endpoint: e,
            threshold,
            dry_run,
        } => {
            let method = if dry_run { "GET" } else { "POST" };
            let plan = call(&e, method, &format!("/v1/replacement?threshold={threshold}"), None)?;
            if e.json {
                show(&plan);
            } else {
                let mut rows = plan["moves"].clone();
                if let (Some(moves), Some(results)) = (rows.as_array_mut(), plan["results"].as_array()) {
                    for (m, r) in moves.iter_mut().zip(results) {
                        m["result"] = r.clone();
                    }
                }
                let mut fields = vec![
                    "name",
                    "tenant",
                    "from",
                    "to",
                    "from_cpu_price",
                    "to_cpu_price",
                    "saving_per_hour",
                ];
                if !dry_run {
                    fields.push("result");
                }
                table(&e, &rows, &fields);
                println!(
                    "{} moves{}, saving {:.6} an hour",
                    rows.as_array().map(|a| a.len()).unwrap_or(0),
                    if dry_run {
                        " planned (dry run: nothing moved)"
                    } else {
                        ""
                    },
                    plan["saving_per_hour"].as_f64().unwrap_or(0.0)
                );
            }
            let failed = plan["results"].as_array().into_iter().flatten().any(|r| r != "moved");
            return Ok(if failed { exit::PARTIAL } else { 0 });
        }
        CloudCommand::Provider {
            endpoint: e,
            action: ProviderAction::Evacuate { provider, parallel },
        } => {
            let hosts: Vec<String> = call(&e, "GET", "/v1/hosts", None)?
                .as_array()
                .into_iter()
                .flatten()
                .filter(|h| h["provider"] == provider.as_str() && h["state"] != "lost")
                .filter_map(|h| h["name"].as_str().map(String::from))
                .collect();
            if hosts.is_empty() {
                bail!("no host of provider {provider} is up");
            }
            return drain(&e, &hosts, Some(&provider), parallel);
        }
        CloudCommand::Usage {
            endpoint: e,
            by,
            since,
            until,
        } => {
            let mut path = format!("/v1/usage?by={by}");
            for (name, at) in [("since", since), ("until", until)] {
                if let Some(at) = at {
                    path.push_str(&format!("&{name}={}", unix_time(&at)?));
                }
            }
            let usage = call(&e, "GET", &path, None)?;
            if e.json {
                show(&usage);
                return Ok(0);
            }
            let mut rows = usage["lines"].as_array().cloned().unwrap_or_default();
            rows.push(usage["total"].clone());
            let rows: Vec<Value> = rows.iter().map(usage_row).collect();
            table(&e, &Value::Array(rows), USAGE_FIELDS);
        }
        CloudCommand::Events { endpoint: e, count } => events(&e, count)?,
        CloudCommand::Config { action } => config(action)?,
        CloudCommand::Whoami { endpoint: e } => show(&call(&e, "GET", "/v1/whoami", None)?),
    }
    Ok(0)
}

impl crate::evacuate::Api for Endpoint {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        call(self, method, path, body)
    }

    fn json(&self) -> bool {
        self.json
    }
}

/// Drains `hosts`, then moves their running VMs off (`xcloud host drain`, `provider evacuate`).
fn drain(e: &Endpoint, hosts: &[String], avoid_provider: Option<&str>, parallel: usize) -> anyhow::Result<i32> {
    for host in hosts {
        call(e, "POST", &format!("/v1/hosts/{}/drain", escape(host)), None)?;
    }
    crate::evacuate::move_off(e, hosts, avoid_provider, parallel)
}

fn print_key(e: &Endpoint, answer: &Value) {
    if e.json {
        show(answer);
    } else {
        println!("{}", s(answer, "key"));
    }
}

fn vm(e: &Endpoint, action: VmAction) -> anyhow::Result<()> {
    let at = |vm: &str, what: &str| format!("/v1/vms/{}{what}", escape(vm));
    let one = |v: Value| {
        if e.json {
            show(&v)
        } else {
            let exit = if v["exit"].is_string() {
                format!(" ({})", s(&v, "exit"))
            } else {
                String::new()
            };
            println!("{} {} {}{exit}", s(&v, "id"), s(&v, "name"), s(&v, "state"));
        }
    };
    match action {
        VmAction::Ls => table(e, &call(e, "GET", "/v1/vms", None)?, VM_FIELDS),
        VmAction::Create {
            name,
            image,
            instance_type,
            no_start,
            strategy,
            provider,
            region,
            anti_affinity,
            host,
            restart,
            args,
        } => {
            let placement = serde_json::json!({
                "strategy": strategy, "providers": provider, "regions": region,
                "anti_affinity": anti_affinity, "host": host,
            });
            one(call(
                e,
                "POST",
                "/v1/vms",
                Some(serde_json::json!({
                    "name": name, "image": image, "instance_type": instance_type, "args": args,
                    "start": !no_start, "placement": placement, "restart": restart,
                })),
            )?)
        }
        VmAction::Show { vm } => show(&call(e, "GET", &at(&vm, ""), None)?),
        VmAction::Start { vm } => one(call(e, "POST", &at(&vm, "/start"), None)?),
        VmAction::Stop { vm } => one(call(e, "POST", &at(&vm, "/stop"), None)?),
        VmAction::Pause { vm } => one(call(e, "POST", &at(&vm, "/pause"), None)?),
        VmAction::Resume { vm } => one(call(e, "POST", &at(&vm, "/resume"), None)?),
        VmAction::Rm { vm } => {
            call(e, "DELETE", &at(&vm, ""), None)?;
        }
        VmAction::Migrate { vm, host, provider } => {
            let report = call(
                e,
                "POST",
                &at(&vm, "/migrate"),
                Some(serde_json::json!({"host": host, "provider": provider})),
            )?;
            if e.json {
                show(&report);
            } else {
                println!(
                    "{} moved {} -> {} in {:.0} ms, stalled {:.1} ms, {:.1} MiB sent",
                    s(&report, "vm"),
                    s(&report, "from"),
                    s(&report, "to"),
                    report["total_ms"].as_f64().unwrap_or(0.0),
                    report["downtime_ms"].as_f64().unwrap_or(0.0),
                    report["bytes_sent"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64
                );
            }
        }
        VmAction::Console { vm, bytes } => {
            let answer = success(client(e)?.call("GET", &at(&vm, &format!("/console?bytes={bytes}")), None)?)?;
            use std::io::Write;
            std::io::stdout().write_all(&answer.body)?;
        }
        VmAction::Metrics { vm } => show(&call(e, "GET", &at(&vm, "/metrics"), None)?),
        VmAction::Snapshot { vm } => {
            let snap = call(e, "POST", &at(&vm, "/snapshots"), None)?;
            if e.json {
                show(&snap)
            } else {
                println!("{} {} bytes", s(&snap, "id"), s(&snap, "bytes"));
            }
        }
        VmAction::Snapshots { vm } => {
            let snaps = call(e, "GET", &at(&vm, "/snapshots"), None)?;
            let rows: Vec<Value> = snaps
                .as_array()
                .map(|a| a.iter().map(snapshot_row).collect())
                .unwrap_or_default();
            if e.json {
                show(&snaps)
            } else {
                table(e, &Value::Array(rows), &["id", "bytes", "created", "held_by"])
            }
        }
        VmAction::SnapshotRm { vm, snapshot } => {
            call(
                e,
                "DELETE",
                &at(&vm, &format!("/snapshots/{}", escape(&snapshot))),
                None,
            )?;
        }
        VmAction::Extensions { vm } => {
            let modules = call(e, "GET", &at(&vm, "/extensions"), None)?;
            if e.json {
                show(&modules)
            } else {
                let rows: Vec<Value> = modules
                    .as_array()
                    .map(|a| a.iter().map(extension_row).collect())
                    .unwrap_or_default();
                table(
                    e,
                    &Value::Array(rows),
                    &[
                        "name", "version", "origin", "ports", "calls", "failures", "state", "figures",
                    ],
                )
            }
        }
        VmAction::ExtAdd {
            vm,
            file,
            name,
            version,
            ports,
        } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut path = at(&vm, &format!("/extensions?name={}", escape(&name)));
            if let Some(v) = &version {
                path.push_str(&format!("&version={}", escape(v)));
            }
            if let Some(p) = &ports {
                path.push_str(&format!("&ports={}", escape(p)));
            }
            let added = json_of(client(e)?.call("POST", &path, Some((bytes, "application/wasm")))?)?;
            if e.json {
                show(&added)
            } else {
                println!("{} {} {}", s(&added, "name"), s(&added, "version"), s(&added, "digest"));
            }
        }
        VmAction::ExtRm { vm, name } => {
            call(e, "DELETE", &at(&vm, &format!("/extensions/{}", escape(&name))), None)?;
        }
        VmAction::Restore { vm, snapshot } => one(call(
            e,
            "POST",
            &at(&vm, "/restore"),
            Some(serde_json::json!({ "snapshot": snapshot })),
        )?),
    }
    Ok(())
}

/// A snapshot as people read it: the hosts that hold it in one column.
fn snapshot_row(snap: &Value) -> Value {
    let holders: Vec<&str> = std::iter::once(&snap["host"])
        .chain(snap["copies"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    serde_json::json!({
        "id": snap["id"],
        "bytes": snap["bytes"],
        "created": snap["created"],
        "held_by": holders.join(","),
    })
}

const GROUP_FIELDS: &[&str] = &[
    "name", "metric", "min", "max", "desired", "vms", "reading", "target", "cooldown", "error",
];

/// The metric a group follows and its target, from `--target-cpu` or `--target-load`.
fn metric_and_target(cpu: Option<f64>, load: Option<f64>) -> (Option<&'static str>, Option<f64>) {
    match (cpu, load) {
        (_, Some(load)) => (Some("guest_load"), Some(load)),
        (Some(cpu), None) => (Some("cpu"), Some(cpu)),
        (None, None) => (None, None),
    }
}

/// A group as people read it: how many VMs it has, percentages, the error if any.
fn group_row(g: &Value) -> Value {
    let cpu = g["metric"] == "cpu";
    let figure = |k: &str| {
        g[k].as_f64()
            .map(|x| if cpu { format!("{x:.0}%") } else { format!("{x:.1}") })
    };
    serde_json::json!({
        "name": g["name"],
        "metric": g["metric"],
        "min": g["min"],
        "max": g["max"],
        "desired": g["desired"],
        "vms": g["vms"].as_array().map_or(0, Vec::len),
        "reading": figure("reading"),
        "target": figure("target"),
        "cooldown": g["cooldown_seconds"].as_u64().map(|s| format!("{s} s")),
        "error": g["last_error"],
    })
}

/// Prints groups as a table, or their JSON as the API gave it.
fn group_table(e: &Endpoint, groups: &Value) {
    if e.json {
        show(groups);
        return;
    }
    let rows = groups
        .as_array()
        .map(|a| a.iter().map(group_row).collect())
        .unwrap_or_default();
    table(e, &Value::Array(rows), GROUP_FIELDS);
}

fn group(e: &Endpoint, action: GroupAction) -> anyhow::Result<()> {
    let at = |name: &str| format!("/v1/groups/{}", escape(name));
    let show_one = |g: Value| {
        if e.json {
            show(&g);
        } else {
            group_table(e, &Value::Array(vec![g]));
        }
    };
    match action {
        GroupAction::Create {
            name,
            image,
            instance_type,
            min,
            max,
            target_cpu,
            target_load,
            cooldown,
            cpu_cap,
            restart,
            args,
        } => {
            let (metric, target) = metric_and_target(target_cpu, target_load);
            show_one(call(
                e,
                "POST",
                "/v1/groups",
                Some(serde_json::json!({
                    "name": name, "image": image, "instance_type": instance_type, "min": min, "max": max,
                    "metric": metric, "target": target, "cooldown_seconds": cooldown,
                    "cpu_cap_percent": cpu_cap, "restart": restart, "args": args,
                })),
            )?)
        }
        GroupAction::Ls => group_table(e, &call(e, "GET", "/v1/groups", None)?),
        GroupAction::Show { group } => show(&call(e, "GET", &at(&group), None)?),
        GroupAction::Set {
            group,
            min,
            max,
            target_cpu,
            target_load,
            cooldown,
        } => {
            let (metric, target) = metric_and_target(target_cpu, target_load);
            let mut change = serde_json::Map::new();
            for (field, value) in [
                ("min", min.map(Value::from)),
                ("max", max.map(Value::from)),
                ("metric", metric.map(Value::from)),
                ("target", target.map(Value::from)),
                ("cooldown_seconds", cooldown.map(Value::from)),
            ] {
                if let Some(value) = value {
                    change.insert(field.into(), value);
                }
            }
            show_one(call(e, "PATCH", &at(&group), Some(Value::Object(change)))?)
        }
        GroupAction::Rm { group } => {
            call(e, "DELETE", &at(&group), None)?;
        }
    }
    Ok(())
}

/// `xcloud config ...`: reads and writes the config file only.
fn config(action: ConfigAction) -> anyhow::Result<()> {
    let env = |var: &str| std::env::var(var).ok();
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let written = |path: PathBuf| println!("{} written", path.display());
    match action {
        ConfigAction::Show { endpoint: e } => {
            let r = e.resolved()?;
            let (target, server_cert) = match &r.endpoint {
                xcloud_control::client::Endpoint::Tls { addr, server_cert } => {
                    (format!("https://{addr}"), Some(server_cert.display().to_string()))
                }
                other => (other.to_string(), None),
            };
            let view = serde_json::json!({
                "config_file": r.config_file.as_ref().map(|p| p.display().to_string()),
                "profile": r.profile,
                "url": target,
                "url_from": r.url_from.to_string(),
                "server_cert": server_cert,
                "token": r.token.as_deref().map(cli_config::token_hint),
                "token_from": r.token_from.to_string(),
            });
            if e.json {
                show(&view);
            } else {
                for (label, field, from) in [
                    ("config file", "config_file", None),
                    ("profile", "profile", None),
                    ("url", "url", Some("url_from")),
                    ("server cert", "server_cert", None),
                    ("token", "token", Some("token_from")),
                ] {
                    let value = view[field].as_str().unwrap_or("-");
                    match from {
                        Some(from) => println!("{label:<12} {value}  ({})", s(&view, from)),
                        None => println!("{label:<12} {value}"),
                    }
                }
            }
        }
        ConfigAction::Ls { json } => {
            let Some((path, explicit)) = cli_config::config_path(&env) else {
                bail!(cli_config::ConfigError::NoPlace);
            };
            let file = cli_config::load(&path, explicit)?.unwrap_or_default();
            let rows: Vec<Value> = file
                .profiles
                .iter()
                .map(|(name, p)| {
                    serde_json::json!({
                        "name": name,
                        "default": file.default_profile.as_deref() == Some(name.as_str()),
                        "url": p.url,
                        "token": if p.token.is_some() { "in the file" } else if p.token_file.is_some() { "token_file" } else { "none" },
                        "server_cert": p.server_cert.as_ref().map(|c| c.display().to_string()),
                    })
                })
                .collect();
            if json {
                show(&Value::Array(rows));
            } else {
                println!("{}:", path.display());
                for row in &rows {
                    let mark = if row["default"] == true { "*" } else { " " };
                    println!(
                        "{mark} {:<16} {:<40} token: {}",
                        s(row, "name"),
                        s(row, "url"),
                        s(row, "token")
                    );
                }
            }
        }
        ConfigAction::Set {
            profile,
            url,
            token_stdin,
            token_file,
            server_cert,
            default,
        } => {
            let token = if token_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("reading the key from stdin")?;
                let key = line.trim().to_string();
                if key.is_empty() {
                    bail!("no key on stdin");
                }
                Some(key)
            } else {
                None
            };
            let change = cli_config::Profile {
                url: url.as_deref().map(cli_config::profile_url).transpose()?,
                token,
                token_file: token_file.map(absolute),
                server_cert: server_cert.map(absolute),
            };
            written(cli_config::edit(&env, |c, _| {
                cli_config::set_profile(c, &profile, change, default)
            })?);
        }
        ConfigAction::Use { profile } => {
            written(cli_config::edit(&env, |c, p| cli_config::use_profile(c, &profile, p))?);
        }
        ConfigAction::Rm { profile } => {
            written(cli_config::edit(&env, |c, p| {
                cli_config::remove_profile(c, &profile, p)
            })?);
        }
    }
    Ok(())
}

/// Prints events as they arrive: one JSON object per line.
fn events(e: &Endpoint, count: Option<usize>) -> anyhow::Result<()> {
    let mut seen = 0usize;
    let mut pending = String::new();
    let mut failed = Vec::new();
    let status = client(e)?.call_streaming("GET", "/v1/events", None, |chunk| {
        pending.push_str(&String::from_utf8_lossy(chunk));
        // Kept for an error answer's text; a stream that goes on for hours keeps only its start.
        if failed.len() < 64 << 10 {
            failed.extend_from_slice(chunk);
        }
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                println!("{}", data.trim_start());
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    return false;
                }
            }
        }
        true
    })?;
    success(Answer { status, body: failed })?;
    Ok(())
}

/// Percent-encodes everything but unreserved characters (for a path segment or a query value).
fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
