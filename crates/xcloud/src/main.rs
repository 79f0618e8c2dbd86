//! `xcloud`: run guests, check the host, measure.

use xcloud::{bench, doctor, guests, run};

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "xcloud", version, about = "The tenant's own hypervisor layer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (a built-in name or a PVH ELF path) with its console on stdout.
    Run {
        /// Guest RAM, e.g. 64M or 1G.
        #[arg(long, default_value = "64M", value_parser = run::parse_size)]
        mem: u64,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// Built-in guest name (hello, heartbeat, dirty, micro) or path to a PVH ELF.
        guest: String,
        /// Arguments passed to the guest on its command line.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// List the built-in guests.
    Guests,
    /// Report what virtualization this host offers and what guests can run here, with measured costs.
    Doctor,
    /// Benchmarks that print their figures as a table, with targets.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Basic operations native vs in a guest, start time, VMM memory overhead.
    Micro {
        /// Multiplies the iteration counts (longer, steadier runs).
        #[arg(long, default_value_t = 1)]
        scale: u64,
        /// How many times to measure the start time.
        #[arg(long, default_value_t = 10)]
        startup_runs: usize,
    },
}

fn main() -> ExitCode {
    // A plain level (not an EnvFilter with its regex engine): the VMM's resident memory is a
    // measured target, and the log is per process anyway.
    let level = std::env::var("XCLOUD_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            mem,
            vcpus,
            guest,
            args,
        } => run::run(mem, vcpus, &guest, &args),
        Command::Bench(BenchCommand::Micro {
            scale,
            startup_runs,
        }) => bench::micro(scale, startup_runs).map(|_| 0),
        Command::Doctor => doctor::doctor(),
        Command::Guests => {
            for name in guests::names() {
                println!("{name}");
            }
            Ok(0)
        }
    };
    match result {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("xcloud: {e:#}");
            ExitCode::from(1)
        }
    }
}
