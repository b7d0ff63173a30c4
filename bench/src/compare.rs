//! The default mode: the `bench` disk workload on gmemd and on
//! qemu-storage-daemon, alternating, with medians and ratios.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Args as ClapArgs;
use gmem_qemu::quote::shell_join;
use serde::Serialize;

use crate::backends::{self, BackendArgs, GmemdBuild, Workload, QEMU};
use crate::figures::{self, Figures, Row};
use crate::host::{self, HostInfo};
use crate::{qsd, results, TCG_NOTE};

/// Options of the default mode (no subcommand).
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Runs per backend, alternating between the backends.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,

    /// MiB written then read sequentially by the guest (agent.mib).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    mib: u64,

    /// Random 4 KiB reads by the guest (agent.randreads).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    randreads: u64,

    /// Guest RAM in MiB (the same for both backends).
    #[arg(long, value_name = "MIB", default_value_t = 512, value_parser = clap::value_parser!(u64).range(64..))]
    memory_mib: u64,

    /// Size of the fresh sparse disk image in MiB; at least --mib.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    disk_mib: u64,

    /// Guest vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,

    /// Limit for one run (boot + workload + power-off), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,

    #[command(flatten)]
    pub backends: BackendArgs,
}

#[derive(Debug, Serialize)]
struct RunRecord {
    backend: &'static str,
    round: u32,
    figures: Figures,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct Settings {
    runs: u32,
    mib: u64,
    randreads: u64,
    memory_mib: u64,
    disk_mib: u64,
    cpus: u32,
    timeout_secs: u64,
    gmemd_only: bool,
    gmemd_build: GmemdBuild,
    accel: &'static str,
    order: &'static str,
}

#[derive(Debug, Serialize)]
struct Report {
    tool: &'static str,
    timestamp: String,
    command_line: String,
    note: &'static str,
    host: HostInfo,
    settings: Settings,
    /// Command lines of each backend's first run (temporary paths differ per run).
    commands: Vec<(&'static str, Vec<String>)>,
    runs: Vec<RunRecord>,
    summary: Vec<Row>,
}

/// Runs the comparison as `args` say, prints the summary and writes the
/// JSON result.
pub fn run(args: Args) -> Result<()> {
    ensure!(args.disk_mib >= args.mib, "--disk-mib ({}) must be at least --mib ({})", args.disk_mib, args.mib);
    let command_line = shell_join(std::env::args());
    let timestamp = host::utc_timestamp(false);
    let host = HostInfo::gather(Path::new(QEMU), (!args.backends.gmemd_only).then_some(args.backends.qsd.as_path()))?;
    let work = Workload {
        mib: args.mib,
        randreads: args.randreads,
        memory_mib: args.memory_mib,
        disk_mib: args.disk_mib,
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout),
    };

    println!("gmem-bench {timestamp}: {} run(s) per backend, guest append: {}", args.runs, work.append());
    let image = backends::prepare(&host, &args.backends)?;

    let mut runs = Vec::new();
    let mut commands: Vec<(&'static str, Vec<String>)> = Vec::new();
    let backends: &[&'static str] = if args.backends.gmemd_only { &["gmemd"] } else { &["gmemd", "qsd"] };
    for round in 1..=args.runs {
        for &backend in backends {
            host::sync_host()?;
            let run = match backend {
                "gmemd" => backends::run_gmemd(&work, &image),
                _ => qsd::run_qsd(&work, &image, &args.backends.qsd),
            }
            .with_context(|| format!("{backend} run {round} of {}", args.runs))?;
            let f = &run.figures;
            println!(
                "[{backend:<5} {round}/{}] seq-write {:8.1} MiB/s  seq-read {:8.1} MiB/s  rand-read {:7.0} IOPS  (boot {}, wall {:.1} s)",
                args.runs,
                f.seq_write_mib_per_s,
                f.seq_read_mib_per_s,
                f.rand_read_iops,
                f.boot_seconds.map_or("?".into(), |s| format!("{s:.1} s")),
                f.wall_seconds
            );
            if !commands.iter().any(|(b, _)| *b == backend) {
                commands.push((backend, run.commands));
            }
            runs.push(RunRecord { backend, round, figures: run.figures, device: run.device });
        }
    }

    let of = |name: &str| -> Vec<Figures> { runs.iter().filter(|r| r.backend == name).map(|r| r.figures).collect() };
    let summary = figures::summarize(&of("gmemd"), &of("qsd"));
    println!("\n{}", figures::table(&summary));
    println!("{TCG_NOTE}");

    let report = Report {
        tool: "gmem-bench",
        timestamp,
        command_line,
        note: TCG_NOTE,
        host,
        settings: Settings {
            runs: args.runs,
            mib: args.mib,
            randreads: args.randreads,
            memory_mib: args.memory_mib,
            disk_mib: args.disk_mib,
            cpus: args.cpus,
            timeout_secs: args.timeout,
            gmemd_only: args.backends.gmemd_only,
            gmemd_build: args.backends.gmemd_build,
            accel: "tcg",
            order: "alternating per round: gmemd then qsd; host sync(1) before every run",
        },
        commands,
        runs,
        summary,
    };
    results::save(args.backends.json_out, "", &report)
}
