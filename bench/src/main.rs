//! `gmem-bench`: gmemd against qemu-storage-daemon on the same guest workload.

mod backends;
mod figures;
mod host;
mod qsd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};
use gmem_qemu::quote::shell_join;
use gmem_tests::GuestImage;
use serde::Serialize;

use backends::{Workload, QEMU};
use figures::{Figures, Row};
use host::HostInfo;

const TCG_NOTE: &str =
    "The guest runs under TCG (-accel tcg -cpu max, no KVM): emulating the guest's \
CPU costs far more than either backend, so these figures compare backends under the same guest; \
they are not the backends' or the disk's physical limits.";

/// Benchmarks gmemd against qemu-storage-daemon on the same guest workload.
///
/// Each run boots the test guest (scripts/guest-image) under QEMU with TCG and
/// runs its `bench` agent on a fresh sparse raw image: sequential 1 MiB
/// O_DIRECT writes (fdatasync included) and reads of --mib MiB, then
/// --randreads random 4 KiB O_DIRECT reads at queue depth 1 within that range.
/// The guest measures each phase itself.
///
/// The two backends:
///   gmemd  gmemd owns the guest RAM (memfd); QEMU maps it through
///          /proc/<gmemd>/fd/N. Started via the test harness.
///   qsd    qemu-storage-daemon --export type=vhost-user-blk over a file
///          blockdev with cache.direct=off; QEMU owns its RAM as
///          memory-backend-memfd,share=on.
///
/// Runs alternate (gmemd, qsd, gmemd, ...), each after a host sync(1). The summary gives each figure's
/// median per backend and the ratio gmemd/qsd (above 1: gmemd faster); the
/// JSON result has every run, host facts and the command lines used.
///
/// The guest is TCG-bound: the figures compare backends under the same
/// emulated guest, not the physical limits of the host or the backends.
///
/// Mind the cache modes when reading seq-write: qsd's export tells the guest
/// its cache is write-through (CONFIG_WCE, wce=0), so the guest never sends it
/// a FLUSH, while gmemd receives one FLUSH per seq-write and runs fdatasync.
/// See docs/benchmarks.md.
#[derive(Debug, Parser)]
#[command(verbatim_doc_comment, after_help = EXAMPLES)]
struct Args {
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

    /// Benchmark gmemd only; qemu-storage-daemon is then not needed.
    #[arg(long)]
    gmemd_only: bool,

    /// The qemu-storage-daemon binary (from QEMU's qemu-utils package).
    #[arg(long, value_name = "PATH", default_value = "qemu-storage-daemon")]
    qsd: PathBuf,

    /// How the harness builds gmemd: `release` (optimized, in target/gmem-bench)
    /// or `debug` (the harness's default debug build, as the tests use).
    #[arg(long, value_enum, default_value_t = GmemdBuild::Release)]
    gmemd_build: GmemdBuild,

    /// Where to write the JSON result [default: bench/results/<UTC timestamp>.json]
    #[arg(long, value_name = "PATH")]
    json_out: Option<PathBuf>,
}

const EXAMPLES: &str = "Examples:
  cargo run --release -p gmem-bench -- --runs 3
  cargo run --release -p gmem-bench -- --gmemd-only --runs 1 --mib 32 --randreads 1000

Needs qemu-system-x86_64 and (unless --gmemd-only) qemu-storage-daemon on PATH;
the first run builds the guest image and gmemd, which takes a while.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum GmemdBuild {
    Release,
    Debug,
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

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.disk_mib >= args.mib,
        "--disk-mib ({}) must be at least --mib ({})",
        args.disk_mib,
        args.mib
    );
    if args.gmemd_build == GmemdBuild::Release {
        // Before any thread exists: this sets environment variables.
        backends::optimize_harness_gmemd();
    }
    let command_line = shell_join(std::env::args());
    let timestamp = host::utc_timestamp(false);
    let host = HostInfo::gather(
        Path::new(QEMU),
        (!args.gmemd_only).then_some(args.qsd.as_path()),
    )?;
    let work = Workload {
        mib: args.mib,
        randreads: args.randreads,
        memory_mib: args.memory_mib,
        disk_mib: args.disk_mib,
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout),
    };

    println!(
        "gmem-bench {timestamp}: {} run(s) per backend, guest append: {}",
        args.runs,
        work.append()
    );
    println!(
        "host: {} CPU(s), {}, {}",
        host.nproc,
        host.qemu_version,
        host.qsd_version.as_deref().unwrap_or("qsd not used")
    );
    println!("note: {TCG_NOTE}\n");
    eprintln!(
        "preparing the guest image and gmemd ({:?} build)...",
        args.gmemd_build
    );
    let image = GuestImage::ensure()?;
    let gmemd_dir = gmem_tests::binaries()?;
    eprintln!("gmemd: {}", gmemd_dir.join("gmemd").display());

    let mut runs = Vec::new();
    let mut commands: Vec<(&'static str, Vec<String>)> = Vec::new();
    let backends: &[&'static str] = if args.gmemd_only {
        &["gmemd"]
    } else {
        &["gmemd", "qsd"]
    };
    for round in 1..=args.runs {
        for &backend in backends {
            host::sync_host()?;
            let run = match backend {
                "gmemd" => backends::run_gmemd(&work, &image),
                _ => qsd::run_qsd(&work, &image, &args.qsd),
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
            runs.push(RunRecord {
                backend,
                round,
                figures: run.figures,
                device: run.device,
            });
        }
    }

    let of = |name: &str| -> Vec<Figures> {
        runs.iter()
            .filter(|r| r.backend == name)
            .map(|r| r.figures)
            .collect()
    };
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
            gmemd_only: args.gmemd_only,
            gmemd_build: args.gmemd_build,
            accel: "tcg",
            order: "alternating per round: gmemd then qsd; host sync(1) before every run",
        },
        commands,
        runs,
        summary,
    };
    let path = args.json_out.unwrap_or_else(|| {
        gmem_tests::guest::repo_root()
            .join(format!("bench/results/{}.json", host::utc_timestamp(true)))
    });
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("JSON result: {}", path.display());
    Ok(())
}
