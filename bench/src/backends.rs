//! What a run is, and one guest run of the `bench` agent on gmemd (through
//! the test harness); the qemu-storage-daemon side is in `qsd.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::ValueEnum;
use gmem_qemu::quote::shell_join;
use gmem_qemu::{QemuCommand, SerialSink};
use gmem_tests::{agent_append, Gmemd, GmemdOptions, GuestImage, Vm};
use serde::Serialize;

use crate::figures::Figures;
use crate::host::HostInfo;
use crate::TCG_NOTE;

/// The QEMU binary; the harness finds the same name on PATH.
pub const QEMU: &str = "qemu-system-x86_64";

/// What every run does, whichever backend serves the disk.
#[derive(Debug, Clone)]
pub struct Workload {
    pub mib: u64,
    pub randreads: u64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub cpus: u32,
    pub timeout: Duration,
}

impl Workload {
    fn params(&self) -> [(&'static str, String); 2] {
        [("mib", self.mib.to_string()), ("randreads", self.randreads.to_string())]
    }

    /// The guest kernel command line: agent `bench` with its parameters.
    pub fn append(&self) -> String {
        agent_command_line("bench", &self.params())
    }
}

/// The guest kernel command line that runs `agent` with `params`.
pub fn agent_command_line(agent: &str, params: &[(&str, String)]) -> String {
    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    agent_append(agent, &refs)
}

/// The scenarios asked for, in `all`'s order; all of them when none were.
pub fn chosen<S: Copy + PartialEq>(all: &[S], asked: &[S]) -> Vec<S> {
    all.iter().copied().filter(|s| asked.is_empty() || asked.contains(s)).collect()
}

/// One run's figures and the command lines that produced them.
#[derive(Debug)]
pub struct Run {
    pub figures: Figures,
    pub commands: Vec<String>,
    /// The backend's own view of the run, when it has one (gmemd's
    /// `query-device`: requests, errors, bytes per queue).
    pub device: Option<serde_json::Value>,
}

/// How the harness builds the gmemd a mode measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GmemdBuild {
    /// Optimized, built in target/gmem-bench.
    Release,
    /// The harness's plain debug build, as the tests use.
    Debug,
}

/// The flags both modes share: which backends run, how gmemd is built, and
/// where the JSON result goes.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// Benchmark gmemd only; qemu-storage-daemon is then not needed.
    #[arg(long)]
    pub gmemd_only: bool,

    /// The qemu-storage-daemon binary (from QEMU's qemu-utils package).
    #[arg(long, value_name = "PATH", default_value = "qemu-storage-daemon")]
    pub qsd: std::path::PathBuf,

    /// How the harness builds gmemd: `release` (optimized, in target/gmem-bench)
    /// or `debug` (the harness's default debug build, as the tests use).
    #[arg(long, value_enum, default_value_t = GmemdBuild::Release)]
    pub gmemd_build: GmemdBuild,

    /// Where to write the JSON result [default: bench/results/<UTC timestamp>[-migration|-host].json]
    #[arg(long, value_name = "PATH")]
    pub json_out: Option<std::path::PathBuf>,
}

/// Prints the host line and the TCG note, then builds the guest image and
/// the harness's gmemd: what every mode does before its first run.
pub fn prepare(host: &HostInfo, args: &BackendArgs) -> Result<GuestImage> {
    println!(
        "host: {} CPU(s), {}, {}",
        host.nproc,
        host.qemu_version,
        host.qsd_version.as_deref().unwrap_or("qsd not used")
    );
    println!("note: {TCG_NOTE}\n");
    eprintln!("preparing the guest image and gmemd ({:?} build)...", args.gmemd_build);
    let image = GuestImage::ensure()?;
    eprintln!("gmemd: {}", gmem_tests::binaries()?.join("gmemd").display());
    Ok(image)
}

/// Makes the harness build gmemd with release settings. The harness always
/// runs `cargo build` (dev profile) and takes `<target>/debug/gmemd`; the
/// profile overrides below make that build optimized, and the separate target
/// directory keeps it from invalidating everyone's ordinary debug build.
/// Call before anything else starts threads (it sets environment variables).
pub fn optimize_harness_gmemd() {
    let target = gmem_tests::guest::repo_root().join("target/gmem-bench");
    std::env::set_var("CARGO_TARGET_DIR", target);
    for (key, value) in [
        ("CARGO_PROFILE_DEV_OPT_LEVEL", "3"),
        ("CARGO_PROFILE_DEV_DEBUG", "false"),
        ("CARGO_PROFILE_DEV_DEBUG_ASSERTIONS", "false"),
        ("CARGO_PROFILE_DEV_OVERFLOW_CHECKS", "false"),
        ("CARGO_PROFILE_DEV_INCREMENTAL", "false"),
        ("CARGO_PROFILE_DEV_CODEGEN_UNITS", "16"),
    ] {
        std::env::set_var(key, value);
    }
}

/// The command line `Gmemd::start` ran for `options` (with `binary`),
/// rebuilt for the record.
pub fn gmemd_command(binary: &Path, gmemd: &Gmemd, options: &GmemdOptions) -> String {
    shell_join(
        [
            binary.display().to_string(),
            "--socket".into(),
            gmemd.socket.display().to_string(),
            "--control".into(),
            gmemd.control.display().to_string(),
            "--disk".into(),
            gmemd.disk.display().to_string(),
            "--memory".into(),
            options.memory.clone(),
            "--queues".into(),
            options.queues.to_string(),
        ]
        .into_iter()
        .chain(options.extra.iter().cloned()),
    )
}

/// gmemd: `Gmemd::start` on a fresh sparse image, `Vm::boot` on it.
pub fn run_gmemd(work: &Workload, image: &GuestImage) -> Result<Run> {
    let started = Instant::now();
    let options = GmemdOptions {
        memory: format!("{}M", work.memory_mib),
        queues: 1,
        disk_bytes: work.disk_mib << 20,
        ..GmemdOptions::default()
    };
    let gmemd = Gmemd::start(&options)?;
    // The command line Vm::boot builds, rebuilt here for the record.
    let qemu = QemuCommand::for_daemon(&mut gmemd.client()?)?
        .kernel(&image.kernel)
        .initrd(&image.initrd)
        .append(work.append())
        .cpus(std::num::NonZeroU32::new(work.cpus).context("--cpus must be at least 1")?)
        .serial(SerialSink::File(gmemd.dir.path().join("bench.serial")));
    let daemon = gmemd_command(&gmem_tests::binaries()?.join("gmemd"), &gmemd, &options);
    let params = work.params();
    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut vm = Vm::boot(&gmemd, "bench", work.cpus, "bench", &refs)?;
    let results = vm.wait_exit(work.timeout)?;
    let figures = Figures::from_results(&results, started.elapsed().as_secs_f64())?;
    let device = serde_json::to_value(gmemd.client()?.query_device()?)?;
    Ok(Run { figures, commands: vec![daemon, qemu.to_string()], device: Some(device) })
}
