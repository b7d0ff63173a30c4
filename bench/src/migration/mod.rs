//! `gmem-bench migration`: live migration between two simulated hosts, with
//! gmemd and with qemu-storage-daemon, measured from QEMU, gmemd and the
//! guest's console.

mod figures;
mod nodelay;
mod qsd_pair;
mod qsd_postcopy;
mod run;
mod scenario;
mod settings;
mod summary;
mod testbed;
mod trace;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use gmem_protocol::MigrationInfo;
use gmem_qemu::quote::shell_join;
use gmem_tests::{DelayRelay, GmemdOptions, GuestImage, MigrationOptions, MigrationPair, VmOptions};
use serde::Serialize;

use crate::backends::{chosen, BackendArgs, GmemdBuild, QEMU};
use crate::host::{self, HostInfo};
use crate::{results, TCG_NOTE};
use figures::{GapRecord, RunFigures};
use qsd_pair::QsdPair;
use qsd_postcopy::QsdPostcopy;
use scenario::{Backend, Scenario, PORT};
pub use settings::Settings;
use summary::ScenarioSummary;
use testbed::Testbed;
use trace::FaultTrace;

/// Live migration between two hosts, through gmemd and qemu-storage-daemon.
///
/// Each run sets up two network namespaces joined by a veth ("hosts"), a
/// backend on each serving the same raw image (shared storage) and QEMU on
/// each (the destination with -incoming defer), boots the test guest on the
/// source under TCG with the `seqio` agent (4 KiB O_DIRECT write + read-back
/// into a guest RAM slot per block, slots --stride apart), waits until it
/// has written --start-at blocks, and migrates it with gmem_qemu's QMP flows
/// while it keeps writing.
///
/// Scenarios (each run --runs times, in rounds through all of them):
///   precopy-{gmemd,qsd}-{direct,delayed}  QEMU's defaults: max-bandwidth
///       128 MiB/s, downtime-limit 300 ms
///   postcopy-gmemd-{direct,delayed}  precopy capped at
///       --postcopy-precopy-mib-s, migrate-start-postcopy after
///       --switch-after-ms, max-postcopy-bandwidth unlimited (or
///       --postcopy-mib-s)
///   postcopy-preempt-gmemd-{direct,delayed}  the same with QEMU's
///       postcopy-preempt: requested pages on a connection of their own.
///       QEMU (10.0.2, 11.1.3) never completes these once gmemd's device
///       faulted; the run is measured up to 10 s after the source sent
///       all RAM (see docs/migration.md)
///   postcopy-qsd  run once and described: qemu-storage-daemon's
///       libvhost-user cannot be a postcopy destination
/// "delayed": the stream goes through a TCP relay in the source namespace
/// that delays each direction by --delay-ms; --link-rate caps the veth too.
///
/// Figures per run: QEMU's total-time and downtime; host time from migrate
/// to the guest's first progress line on the destination; the guest-visible
/// stall, i.e. the largest gap between the guest's progress lines (printed
/// every --progress-every blocks, timestamped by a host thread reading both
/// consoles every 1 ms) from migrate until the first line after completion;
/// gmemd's device I/O gap at switchover; in postcopy, the destination
/// gmemd's device faults and fault-to-wake latency (p50/p99/max), and QEMU's
/// postcopy-blocktime and postcopy-requests from the same run (QEMU 10.0 has
/// no per-request latency distribution). --trace-faults follows each page
/// request through both QEMUs' trace events instead.
///
/// The summary gives, per scenario, each figure's median and min-max; the
/// JSON result has every run with QEMU's and gmemd's full reports.
///
/// Needs root (network namespaces, tc), qemu-system-x86_64 and (unless
/// --gmemd-only) qemu-storage-daemon.
#[derive(Debug, ClapArgs)]
#[command(verbatim_doc_comment, after_help = EXAMPLES)]
pub struct Args {
    /// Runs per measured scenario.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,

    /// Scenarios to run, comma-separated or repeated [default: all]
    #[arg(long = "scenario", value_enum, value_delimiter = ',', value_name = "NAME")]
    scenarios: Vec<Scenario>,

    #[command(flatten)]
    settings: Settings,

    #[command(flatten)]
    pub backends: BackendArgs,
}

const EXAMPLES: &str = "Examples:
  cargo run --release -p gmem-bench -- migration
  cargo run --release -p gmem-bench -- migration --runs 1 --trace-faults --scenario postcopy-preempt-gmemd-direct
  cargo run --release -p gmem-bench -- migration --runs 1 --scenario postcopy-gmemd-direct,postcopy-gmemd-delayed
  cargo run --release -p gmem-bench -- migration --gmemd-only --link-rate 1gbit";

/// One measured run.
#[derive(Debug, Serialize)]
struct RunRecord {
    scenario: Scenario,
    round: u32,
    figures: RunFigures,
    /// The longest gaps between the guest's progress lines.
    longest_gaps: Vec<GapRecord>,
    /// Everything QEMU and gmemd reported (`Migration::wait`'s report).
    report: gmem_qemu::MigrationReport,
    /// Both gmemds' `query-migration` once the guest ran on the destination.
    gmemd_after: Option<(MigrationInfo, MigrationInfo)>,
    /// With --trace-faults: where the page requests' time went.
    fault_trace: Option<FaultTrace>,
    /// With --qemu-nodelay: on how many of the source's and destination's
    /// QEMU migration connections TCP_NODELAY was set.
    nodelay_sockets: Option<(usize, usize)>,
}

#[derive(Debug, Serialize)]
struct Report {
    tool: &'static str,
    mode: &'static str,
    timestamp: String,
    command_line: String,
    note: &'static str,
    host: HostInfo,
    settings: Settings,
    gmemd_build: GmemdBuild,
    console_poll_us: u128,
    order: &'static str,
    /// The source side's qemu-storage-daemon and QEMU command lines of the
    /// first qsd run (temporary paths differ per run).
    qsd_commands: Vec<String>,
    runs: Vec<RunRecord>,
    summary: Vec<ScenarioSummary>,
    qsd_postcopy: Option<QsdPostcopy>,
}

/// Runs the scenarios as `args` say, prints the tables and writes the JSON
/// result.
pub fn run(args: Args) -> Result<()> {
    let settings = args.settings;
    settings.check()?;
    let mut scenarios = chosen(&Scenario::ALL, &args.scenarios);
    if args.backends.gmemd_only {
        scenarios.retain(|s| s.backend() == Backend::Gmemd);
    }
    let uses_qsd = scenarios.iter().any(|s| s.backend() == Backend::Qsd);
    let command_line = shell_join(std::env::args());
    let timestamp = host::utc_timestamp(false);
    let host = HostInfo::gather(Path::new(QEMU), uses_qsd.then_some(args.backends.qsd.as_path()))?;
    println!(
        "gmem-bench migration {timestamp}: {} run(s) of {}",
        args.runs,
        scenarios.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    );
    let image = crate::backends::prepare(&host, &args.backends)?;

    let mut runs: Vec<RunRecord> = Vec::new();
    let mut qsd_commands = Vec::new();
    for round in 1..=args.runs {
        for &scenario in scenarios.iter().filter(|s| s.measured()) {
            host::sync_host()?;
            let (record, commands) = measure(scenario, &settings, &image, &args.backends.qsd, round)
                .with_context(|| format!("{} run {round} of {}", scenario.name(), args.runs))?;
            println!("[{} {round}/{}] {}", scenario.name(), args.runs, record.figures.one_line());
            if let Some(trace) = &record.fault_trace {
                println!("{}", trace.describe());
            }
            if qsd_commands.is_empty() {
                qsd_commands = commands;
            }
            runs.push(record);
        }
    }
    let qsd_postcopy = if scenarios.contains(&Scenario::PostcopyQsd) {
        host::sync_host()?;
        let outcome = qsd_postcopy(&settings, &image, &args.backends.qsd).context("postcopy-qsd")?;
        println!("{}", outcome.describe());
        Some(outcome)
    } else {
        None
    };

    let summary: Vec<ScenarioSummary> = scenarios
        .iter()
        .filter(|s| s.measured())
        .map(|&scenario| {
            let figures: Vec<RunFigures> = runs.iter().filter(|r| r.scenario == scenario).map(|r| r.figures).collect();
            summary::summarize(scenario, &figures)
        })
        .collect();
    for postcopy in [false, true] {
        let columns: Vec<&ScenarioSummary> = summary.iter().filter(|s| s.scenario.postcopy() == postcopy).collect();
        if !columns.is_empty() {
            println!("\n{}", summary::table(&columns));
        }
    }
    println!("median (min–max) of each scenario's runs. {TCG_NOTE}");
    if runs.iter().any(|r| !r.figures.completed) {
        println!(
            "QEMU did not complete every postcopy-preempt run: it waits forever for the page requests of gmemd's \
             device (docs/migration.md); those runs were measured until 10 s after the source had sent all RAM, \
             and have no total-time."
        );
    }

    let report = Report {
        tool: "gmem-bench",
        mode: "migration",
        timestamp,
        command_line,
        note: TCG_NOTE,
        host,
        settings,
        gmemd_build: args.backends.gmemd_build,
        console_poll_us: run::CONSOLE_POLL.as_micros(),
        order: "rounds through every measured scenario; host sync(1) before every run; postcopy-qsd once at the end",
        qsd_commands,
        runs,
        summary,
        qsd_postcopy,
    };
    results::save(args.backends.json_out, "-migration", &report)
}

/// Builds `scenario`'s testbed: the hosts, the backends, the guest.
/// Returns it with the qsd command lines (empty for gmemd).
fn testbed(
    scenario: Scenario,
    settings: &Settings,
    image: &GuestImage,
    qsd: &Path,
    seed: u64,
) -> Result<(Box<dyn Testbed>, Vec<String>)> {
    Ok(match scenario.backend() {
        Backend::Gmemd => {
            let params = settings.agent_params(seed);
            let mut vm = VmOptions::new("migration", "seqio");
            for (key, value) in params {
                vm = vm.param(key, value);
            }
            if settings.trace_faults && scenario.postcopy() {
                vm.qemu_args = trace::qemu_args();
            }
            let options = MigrationOptions {
                gmemd: GmemdOptions {
                    memory: format!("{}M", settings.memory_mib),
                    disk_bytes: settings.disk_bytes(),
                    ..GmemdOptions::default()
                },
                vm,
            };
            (Box::new(MigrationPair::start(&options)?), Vec::new())
        }
        Backend::Qsd => {
            let pair = QsdPair::start(settings, image, qsd, seed)?;
            let commands = pair.commands().to_vec();
            (Box::new(pair), commands)
        }
    })
}

/// Caps the link if asked to, and starts the delaying relay for a delayed
/// scenario.
fn link(bed: &dyn Testbed, scenario: Scenario, settings: &Settings) -> Result<Option<DelayRelay>> {
    if let Some(rate) = &settings.link_rate {
        bed.hosts().limit_bandwidth(rate)?;
    }
    scenario.delayed().then(|| bed.hosts().delay_relay(PORT, Duration::from_millis(settings.delay_ms))).transpose()
}

/// One measured run of `scenario`.
fn measure(
    scenario: Scenario,
    settings: &Settings,
    image: &GuestImage,
    qsd: &Path,
    round: u32,
) -> Result<(RunRecord, Vec<String>)> {
    let (mut bed, commands) = testbed(scenario, settings, image, qsd, u64::from(round))?;
    let relay = link(bed.as_ref(), scenario, settings)?;
    let plan = scenario.plan(settings, bed.hosts().dst_addr(), relay.as_ref());
    let migrated = run::migrate(bed.as_mut(), &plan, settings.start_at, Duration::ZERO, settings.qemu_nodelay)?;
    let report = match &migrated.report {
        Ok(report) => report.clone(),
        Err(e) => anyhow::bail!("the migration failed: {e:#}; {}", bed.diagnostics()),
    };
    let figures = RunFigures::new(&report, &migrated, settings.blocks).with_context(|| bed.diagnostics())?;
    let fault_trace = (settings.trace_faults && scenario.postcopy()).then(|| {
        let (source_log, destination_log) = bed.qemu_logs();
        FaultTrace::from_logs(&source_log, &destination_log)
    });
    let record = RunRecord {
        scenario,
        round,
        figures,
        longest_gaps: figures::longest_gaps(&migrated, 5),
        report,
        gmemd_after: migrated.gmemd_after,
        fault_trace,
        nodelay_sockets: migrated.nodelay_sockets,
    };
    Ok((record, commands))
}

/// How long the postcopy run with qemu-storage-daemon watches the guest
/// after the migration completed.
const QSD_POSTCOPY_WATCH: Duration = Duration::from_secs(5);

/// The postcopy run with qemu-storage-daemon, described.
fn qsd_postcopy(settings: &Settings, image: &GuestImage, qsd: &Path) -> Result<QsdPostcopy> {
    let scenario = Scenario::PostcopyQsd;
    let mut pair = QsdPair::start(settings, image, qsd, 1)?;
    let relay = link(&pair, scenario, settings)?;
    let plan = scenario.plan(settings, pair.hosts().dst_addr(), relay.as_ref());
    let migrated = run::migrate(&mut pair, &plan, settings.start_at, QSD_POSTCOPY_WATCH, false)?;
    Ok(QsdPostcopy::record(&mut pair, &migrated))
}
