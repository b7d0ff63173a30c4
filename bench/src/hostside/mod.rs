//! `gmem-bench host`: gmemd and qemu-storage-daemon driven from the host
//! through libblkio's virtio-blk-vhost-user driver (no guest, no TCG), next
//! to the raw ceiling of the same I/O issued with O_DIRECT and io_uring on
//! the image file itself.

mod blkio_client;
mod daemons;
mod error;
mod image;
mod load;
mod plan;
mod plot;
mod stats;
mod sys;
mod uring;
mod verify;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::Args as ClapArgs;
use gmem_qemu::quote::shell_join;
use serde::Serialize;

use crate::backends::{BackendArgs, GmemdBuild, QEMU};
use crate::host::{self, HostInfo};
use crate::qsd::ScratchDir;
use crate::results;
use blkio_client::BlkioClient;
use daemons::{Daemon, DaemonSetup};
use load::{IoQueue, Offsets, QueueResult};
use plan::{Backend, Case, ImageKind, Pinning, BACKEND_CPU};
use stats::{CaseSummary, Measurement};
use uring::UringQueue;
use verify::Verified;

/// Host-side block I/O through gmemd and qemu-storage-daemon, and the raw ceiling.
///
/// No guest: the benchmark itself is the vhost-user frontend, through
/// libblkio's virtio-blk-vhost-user driver (the library behind QEMU's own
/// virtio-blk-vhost-user block driver), so the figures are the backends'
/// own cost per request, not a TCG guest's.
///
/// Backends, each started fresh for every run on the same raw image:
///   gmemd         --allow-foreign-memory (libblkio's buffers are its own
///                 memfd, not RAM gmemd owns) --queues N, plus --gmemd-arg
///   qsd-buffered  qemu-storage-daemon, file driver aio=io_uring,
///                 cache.direct=off, the export in an --object iothread,
///                 num-queues=N, writable=on
///   qsd-direct    the same with cache.direct=on (uncached cases only; the
///                 table shows the better qsd per case and says which)
///   raw           no backend: io_uring on the image opened with O_DIRECT,
///                 same requests, same depth per queue
///
/// Cases (4 KiB = 4k, 1 MiB = 1m; qN = queues, one client thread each; dN =
/// requests in flight per queue):
///   randread-4k-q1-d1, randread-4k-q1-d32, randread-4k-q2-d32,
///   randwrite-4k-q1-d32, seqread-1m-q1-d8, seqwrite-1m-q1-d8 on the
///   cached image (--image-mib, written just before, in the page cache);
///   randread-4k-q1-d32-uncached on the large image (--uncached-image-mib),
///   evicted with posix_fadvise(DONTNEED) before timing and checked with
///   mincore (fincore-style) to be under 1% resident;
///   randread-4k-q1-d{2,4,8,16,64,128}: the depth sweep (with d1 and d32).
/// Pinned: backend on CPU 0, client on CPU 1; every headline case runs
/// again "-unpinned".
///
/// Every run: start the backend, connect, pin, check correctness (write a
/// pattern through the backend, read it back through every queue, compare
/// with the image file on the host; compare reads of other blocks with the
/// file), --warmup of load, evict (uncached), then --duration of timed load.
/// Runs go repetition by repetition, case by case, the backends of a case
/// back to back in an order rotated each repetition; host sync(1) before
/// each run.
///
/// Figures per run: IOPS, MiB/s, p50/p99 completion latency (every request,
/// submission to completion as the client sees it), and CPU per I/O: the
/// backend process's utime+stime (/proc/<pid>/stat, all threads) over the
/// timed phase divided by the I/Os; for raw, the benchmark's own CPU. The
/// summary gives medians over --reps; the JSON has every run, the exact
/// backend command lines, host load and gmemd's device counters.
#[derive(Debug, ClapArgs)]
#[command(verbatim_doc_comment, after_help = EXAMPLES)]
pub struct Args {
    /// Timed load per run: 10s, 500ms, 1.5 [default: 5s; 300ms with --quick]
    #[arg(long, value_parser = plan::parse_duration)]
    duration: Option<Duration>,

    /// Untimed load per run before the timed phase [default: 1s; 100ms with --quick]
    #[arg(long, value_parser = plan::parse_duration)]
    warmup: Option<Duration>,

    /// Repetitions of every case and backend [default: 3; 1 with --quick]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    reps: Option<u32>,

    /// Prove the harness in a few seconds: four small cases on small images,
    /// one short repetition. Figures are meaningless.
    #[arg(long)]
    quick: bool,

    /// Size of the cached image, MiB [default: 1024; 64 with --quick]
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(2..))]
    image_mib: Option<u64>,

    /// Size of the uncached image, MiB; make it larger than what the runs
    /// can pull into the page cache [default: 4096; 256 with --quick]
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(2..))]
    uncached_image_mib: Option<u64>,

    /// Only the cases whose name contains one of these (comma-separated or
    /// repeated), e.g. --only randread-4k-q1 --only uncached
    #[arg(long, value_name = "TEXT", value_delimiter = ',')]
    only: Vec<String>,

    /// The gmemd binary to measure [default: the workspace's, built as --gmemd-build says]
    #[arg(long, value_name = "PATH")]
    gmemd: Option<PathBuf>,

    /// An extra argument for gmemd, passed through as is (repeat for several),
    /// e.g. --gmemd-arg=--cache --gmemd-arg=none; a gmemd that does not know
    /// it fails to start, and the run says so.
    #[arg(long = "gmemd-arg", value_name = "ARG", allow_hyphen_values = true)]
    gmemd_args: Vec<String>,

    /// Size of the guest-RAM region gmemd creates (its `--memory`): the
    /// requests use libblkio's buffers, not this RAM, but gmemd's own
    /// memory must not grow with it, e.g. --gmemd-memory 64G
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    gmemd_memory: String,

    /// Where to write the queue-depth plot (SVG) [default: bench/results/<UTC timestamp>-host-qd.svg]
    #[arg(long, value_name = "PATH")]
    plot_out: Option<PathBuf>,

    #[command(flatten)]
    pub backends: BackendArgs,
}

const EXAMPLES: &str = "Examples:
  cargo run --release -p gmem-bench -- host --quick
  cargo run --release -p gmem-bench -- host --duration 5s --reps 3 --plot-out docs/img/host-qd-sweep.svg
  cargo run --release -p gmem-bench -- host --only randread-4k-q1 --gmemd target/release/gmemd --gmemd-arg=--poll-us --gmemd-arg=50
  cargo run --release -p gmem-bench -- host --gmemd-only --only uncached

Needs qemu-storage-daemon (unless --gmemd-only), 2 CPUs for the pinned
cases, and room in the temp dir for both images.";

/// The limit on the uncached image's page-cache residency before timing.
const RESIDENT_LIMIT: f64 = 0.01;

/// Every setting of the invocation, as recorded.
#[derive(Debug, Serialize)]
struct Settings {
    duration_secs: f64,
    warmup_secs: f64,
    reps: u32,
    quick: bool,
    image_mib: u64,
    uncached_image_mib: u64,
    only: Vec<String>,
    gmemd: String,
    gmemd_version: String,
    gmemd_args: Vec<String>,
    gmemd_memory: String,
    gmemd_build: GmemdBuild,
    gmemd_only: bool,
    qsd: String,
    source_commit: String,
    order: &'static str,
    client: &'static str,
}

/// One timed run.
#[derive(Debug, Serialize)]
struct RunRecord {
    rep: u32,
    case: String,
    backend: Backend,
    measurement: Measurement,
    verified: Verified,
    /// 1-minute load average when the run started (the host is shared).
    load_average: Option<f64>,
    /// Backend threads pinned to the backend CPU (pinned cases).
    backend_threads_pinned: Option<usize>,
    /// Page-cache residency of the uncached image right before timing, and
    /// after the run.
    resident_before: Option<f64>,
    resident_after: Option<f64>,
    /// The backend's command line.
    command: Option<String>,
    /// gmemd's query-device after the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct Report {
    tool: &'static str,
    mode: &'static str,
    timestamp: String,
    command_line: String,
    host: HostInfo,
    settings: Settings,
    cases: Vec<Case>,
    runs: Vec<RunRecord>,
    summary: Vec<CaseSummary>,
    table: String,
}

/// The two images and their sizes.
#[derive(Debug)]
struct Images {
    cached: PathBuf,
    cached_bytes: u64,
    uncached: Option<(PathBuf, u64)>,
}

impl Images {
    fn of(&self, kind: ImageKind) -> Result<(&Path, u64)> {
        match (kind, &self.uncached) {
            (ImageKind::Cached, _) => Ok((&self.cached, self.cached_bytes)),
            (ImageKind::Uncached, Some((path, bytes))) => Ok((path, *bytes)),
            (ImageKind::Uncached, None) => bail!("no uncached image was made"),
        }
    }
}

/// Everything a run needs besides its case and backend.
#[derive(Debug)]
struct RunContext<'a> {
    images: &'a Images,
    setup: &'a DaemonSetup,
    duration: Duration,
    warmup: Duration,
    can_pin: bool,
}

/// `git describe` of the source tree, for the record.
fn source_commit() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(gmem_tests::guest::repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Runs the mode as `args` say, prints the tables and writes the JSON and
/// the plot.
pub fn run(args: Args) -> Result<()> {
    let quick = args.quick;
    let duration = args.duration.unwrap_or(Duration::from_millis(if quick { 300 } else { 5000 }));
    let warmup = args.warmup.unwrap_or(Duration::from_millis(if quick { 100 } else { 1000 }));
    let reps = args.reps.unwrap_or(if quick { 1 } else { 3 });
    let image_mib = args.image_mib.unwrap_or(if quick { 64 } else { 1024 });
    let uncached_mib = args.uncached_image_mib.unwrap_or(if quick { 256 } else { 4096 });
    let mut cases = if quick { plan::quick_plan() } else { plan::full_plan() };
    if !args.only.is_empty() {
        cases.retain(|c| args.only.iter().any(|o| c.name.contains(o.as_str())));
        ensure!(!cases.is_empty(), "--only {:?} matches no case", args.only);
    }
    let gmemd_only = args.backends.gmemd_only;
    let command_line = shell_join(std::env::args());
    let timestamp = host::utc_timestamp(false);
    // Before the runs: the tree may change while they go on.
    let source_commit = source_commit();
    let host = HostInfo::gather(Path::new(QEMU), (!gmemd_only).then_some(args.backends.qsd.as_path()))?;
    let can_pin = host.nproc >= 2;
    if !can_pin {
        eprintln!("warning: fewer than 2 CPUs: the pinned cases run unpinned");
    }
    let gmemd = match &args.gmemd {
        Some(path) => path.clone(),
        None => {
            eprintln!("building gmemd ({:?} build)...", args.backends.gmemd_build);
            gmem_tests::binaries()?.join("gmemd")
        }
    };
    let gmemd_version = host::tool_version(&gmemd, "gmemd", "pass --gmemd PATH or build the workspace")?;
    let setup = DaemonSetup {
        gmemd: gmemd.clone(),
        gmemd_args: args.gmemd_args.clone(),
        gmemd_memory: args.gmemd_memory.clone(),
        qsd: args.backends.qsd.clone(),
    };
    let slots = plan::order(&cases, reps, gmemd_only);
    println!(
        "gmem-bench host {timestamp}: {} case(s) x {reps} rep(s), {} runs of {:?} (+{:?} warm-up); gmemd {}; load average {}",
        cases.len(),
        slots.len(),
        duration,
        warmup,
        gmemd.display(),
        sys::load_average().map_or("?".into(), |l| format!("{l:.2}"))
    );

    let dir = ScratchDir::new("gmem-bench-host")?;
    let cached = dir.join("cached.raw");
    eprintln!("writing the {image_mib} MiB image...");
    image::create(&cached, image_mib << 20, 1).context("creating the cached image")?;
    let uncached = if cases.iter().any(|c| c.image == ImageKind::Uncached) {
        let path = dir.join("uncached.raw");
        eprintln!("writing the {uncached_mib} MiB uncached image...");
        image::create(&path, uncached_mib << 20, 2).context("creating the uncached image")?;
        Some((path, uncached_mib << 20))
    } else {
        None
    };
    let images = Images { cached, cached_bytes: image_mib << 20, uncached };
    let context = RunContext { images: &images, setup: &setup, duration, warmup, can_pin };

    let mut runs = Vec::with_capacity(slots.len());
    for (n, slot) in slots.iter().enumerate() {
        let case = &cases[slot.case];
        host::sync_host()?;
        let record = run_one(&context, case, slot.backend, slot.rep, n as u64)
            .with_context(|| format!("{} on {} (repetition {})", case.name, slot.backend.name(), slot.rep))?;
        let m = &record.measurement;
        println!(
            "[{:>3}/{}] {:<36} {:<12} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>7.1} p99 {:>7.1} us  CPU {:>5.1} us/IO  (others {:.1} CPU-s, load {})",
            n + 1,
            slots.len(),
            case.name,
            slot.backend.name(),
            m.iops,
            m.mib_per_s,
            m.p50_us,
            m.p99_us,
            m.cpu_us_per_io,
            m.others_cpu_seconds,
            record.load_average.map_or("?".into(), |l| format!("{l:.2}"))
        );
        runs.push(record);
    }

    let indexed: Vec<(usize, Backend, &Measurement)> =
        slots.iter().zip(&runs).map(|(slot, record)| (slot.case, slot.backend, &record.measurement)).collect();
    let summary = stats::summarize(&cases, &indexed);
    let table = stats::tables(&summary);
    println!("\n{table}");
    println!(
        "qsd columns: the better of cache.direct=off/on where both ran, marked (buffered)/(direct).\n\
         CPU per I/O: backend utime+stime / I/Os; raw: the benchmark's own.\n\
         others' CPU-s: min-max over the case's runs of the CPU seconds the rest of the host used during\n\
         a timed phase (at most {} CPUs x {:.1} s); high values mean the figures were disturbed.\n\
         Load average at the end: {}",
        std::thread::available_parallelism().map_or(1, usize::from),
        duration.as_secs_f64(),
        sys::load_average().map_or("?".into(), |l| format!("{l:.2}"))
    );

    let plot_path = args.plot_out.clone().unwrap_or_else(|| {
        gmem_tests::guest::repo_root().join(format!("bench/results/{}-host-qd.svg", host::utc_timestamp(true)))
    });
    let series = [
        ("gmemd", Backend::Gmemd),
        ("qemu-storage-daemon (buffered, io_uring, iothread)", Backend::QsdBuffered),
        ("raw: io_uring + O_DIRECT on the image", Backend::Raw),
    ]
    .into_iter()
    .map(|(label, backend)| plot::Series {
        label: label.into(),
        points: stats::sweep_points(&summary, |s| s.get(backend)),
    })
    .filter(|s| !s.points.is_empty())
    .collect::<Vec<_>>();
    if series.iter().any(|s| s.points.len() > 1) {
        if let Some(parent) = plot_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let subtitle = format!(
            "gmem-bench host, {timestamp}, {source_commit}, {reps} rep(s) x {duration:?}, backend pinned to CPU 0, client to CPU 1"
        );
        plot::draw(&plot_path, &series, &subtitle).context("drawing the queue-depth plot")?;
        println!("plot: {}", plot_path.display());
    }

    let report = Report {
        tool: "gmem-bench",
        mode: "host",
        timestamp,
        command_line,
        host,
        settings: Settings {
            duration_secs: duration.as_secs_f64(),
            warmup_secs: warmup.as_secs_f64(),
            reps,
            quick,
            image_mib,
            uncached_image_mib: uncached_mib,
            only: args.only.clone(),
            gmemd: gmemd.display().to_string(),
            gmemd_version,
            gmemd_args: args.gmemd_args.clone(),
            gmemd_memory: args.gmemd_memory.clone(),
            gmemd_build: args.backends.gmemd_build,
            gmemd_only,
            qsd: args.backends.qsd.display().to_string(),
            source_commit,
            order: "repetitions, then cases, then the case's backends back to back, rotated by one per repetition; host sync(1) before each run",
            client: "libblkio 0.5 virtio-blk-vhost-user, queue-size 512, one thread per queue, completion fd (no polling)",
        },
        cases,
        runs,
        summary,
        table,
    };
    results::save(args.backends.json_out, "-host", &report)
}

/// One run: the backend (or none), the client, the check, warm-up, timing.
fn run_one(ctx: &RunContext<'_>, case: &Case, backend: Backend, rep: u32, seed: u64) -> Result<RunRecord> {
    let (image, image_bytes) = ctx.images.of(case.image)?;
    let pinned = ctx.can_pin && case.pinning == Pinning::Pinned;
    let load_average = sys::load_average();
    let bytes = case.buffer_per_queue();

    let daemon: Option<Daemon>;
    let mut blkio: Option<BlkioClient> = None;
    let mut raw: Vec<UringQueue> = Vec::new();
    if backend == Backend::Raw {
        daemon = None;
        for _ in 0..case.queues {
            raw.push(UringQueue::open(image, case.depth, bytes)?);
        }
    } else {
        let started = daemons::start(backend, ctx.setup, image, case.queues)?;
        let client = BlkioClient::connect(&started.socket, case.queues, bytes)
            .with_context(|| format!("connecting libblkio to {}; its log:\n{}", backend.name(), started.log()))?;
        ensure!(
            client.capacity == image_bytes,
            "{} reports a capacity of {} bytes, the image has {image_bytes}",
            backend.name(),
            client.capacity
        );
        daemon = Some(started);
        blkio = Some(client);
    }
    let mut queues: Vec<&mut dyn IoQueue> = match blkio.as_mut() {
        Some(client) => client.queues.iter_mut().map(|q| q as &mut dyn IoQueue).collect(),
        None => raw.iter_mut().map(|q| q as &mut dyn IoQueue).collect(),
    };
    let pin_backend = || -> Result<Option<usize>> {
        match (&daemon, pinned) {
            (Some(d), true) => Ok(Some(sys::pin_process(d.pid, BACKEND_CPU)?)),
            _ => Ok(None),
        }
    };
    pin_backend()?;

    let verified = verify::check(&mut queues, image, image_bytes, seed ^ 0x5EED)
        .with_context(|| format!("correctness check through {}", backend.name()))?;
    phase(&mut queues, case, image_bytes, ctx.warmup, pinned, seed.wrapping_add(1 << 40)).context("warm-up")?;
    // Threads the backend started since (lazily, per queue) get pinned too.
    let backend_threads_pinned = pin_backend()?;

    let mut resident_before = None;
    let host_file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    if case.image == ImageKind::Uncached {
        sys::evict(&host_file, image)?;
        let mut resident = sys::resident_fraction(&host_file, image)?;
        if resident > RESIDENT_LIMIT {
            // Pages under writeback when DONTNEED ran stay; once more after it ends.
            std::thread::sleep(Duration::from_millis(200));
            sys::evict(&host_file, image)?;
            resident = sys::resident_fraction(&host_file, image)?;
        }
        if resident > RESIDENT_LIMIT {
            return Err(error::HostBenchError::StillCached {
                path: image.to_path_buf(),
                resident,
                limit: RESIDENT_LIMIT,
            }
            .into());
        }
        resident_before = Some(resident);
    }

    let me = std::process::id();
    let backend_cpu = |d: &Option<Daemon>| d.as_ref().map(|d| sys::cpu_seconds(d.pid)).transpose();
    let (backend_before, client_before, host_before) =
        (backend_cpu(&daemon)?, sys::cpu_seconds(me)?, sys::host_busy_seconds()?);
    let results = phase(&mut queues, case, image_bytes, ctx.duration, pinned, seed)?;
    let (backend_after, client_after, host_after) =
        (backend_cpu(&daemon)?, sys::cpu_seconds(me)?, sys::host_busy_seconds()?);
    let backend_memory = daemon.as_ref().map(|d| sys::memory(d.pid)).transpose()?;
    let backend_cpu = match (backend_before, backend_after) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let mut measurement =
        Measurement::new(results, case.block, backend_cpu, client_after - client_before, host_after - host_before);
    measurement.backend_memory = backend_memory;
    let resident_after = match case.image {
        ImageKind::Uncached => Some(sys::resident_fraction(&host_file, image)?),
        ImageKind::Cached => None,
    };
    drop(queues);
    let device = daemon.as_ref().and_then(Daemon::device_counters);
    // The client disconnects before the backend stops.
    drop(blkio);
    Ok(RunRecord {
        rep,
        case: case.name.clone(),
        backend,
        measurement,
        verified,
        load_average,
        backend_threads_pinned,
        resident_before,
        resident_after,
        command: daemon.as_ref().map(|d| d.command.clone()),
        device,
    })
}

/// Drives every queue on a thread of its own for `duration`.
fn phase(
    queues: &mut [&mut dyn IoQueue],
    case: &Case,
    image_bytes: u64,
    duration: Duration,
    pinned: bool,
    seed: u64,
) -> Result<Vec<QueueResult>> {
    let outcomes: Vec<std::result::Result<QueueResult, error::HostBenchError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = queues
            .iter_mut()
            .enumerate()
            .map(|(i, queue)| {
                let index = u16::try_from(i).unwrap_or(u16::MAX);
                let mut offsets = Offsets::new(case.pattern, case.block, image_bytes, index, case.queues, seed);
                scope.spawn(move || load::drive(&mut **queue, case, &mut offsets, duration, pinned))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(error::HostBenchError::last_os("a client thread panicked"))))
            .collect()
    });
    Ok(outcomes.into_iter().collect::<std::result::Result<Vec<_>, _>>()?)
}
