//! `gmem-bench cpr`: the downtime of a QEMU live update (cpr-transfer,
//! cpr-exec), with the guest's RAM and disk in gmemd and, side by side,
//! with QEMU-owned RAM and qemu-storage-daemon.

pub mod guest;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use gmem_qemu::quote::shell_join;
use gmem_qemu::{CprMode, HopReport};
use gmem_tests::seqio::{BLOCK_BYTES, PROGRESS_KEY};
use gmem_tests::{qemu_next, ProgressClock, ProgressTimeline};
use serde::Serialize;

use crate::backends::{chosen, BackendArgs, GmemdBuild, QEMU};
use crate::host::{self, HostInfo};
use crate::{results, TCG_NOTE};
use guest::{GmemdGuest, Guest, QsdGuest};

/// Live update downtime: cpr-transfer and cpr-exec, gmemd against
/// QEMU-owned RAM with qemu-storage-daemon.
///
/// Each run boots the test guest under TCG with the `seqio` agent (a 4 KiB
/// O_DIRECT write and read-back per block, a progress line every
/// --progress-every blocks), waits until it has written 1024 blocks, then
/// moves it --hops times to a new QEMU while it keeps writing (hop k once
/// it has written 1024 + (k-1) * --blocks-between blocks, or right after
/// the previous hop if it got there meanwhile), and checks at the end that
/// the guest and the image lost nothing.
///
/// Scenarios (each run --runs times, in rounds through all of them, so
/// that slow drift on the host hits every scenario alike):
///   transfer-gmemd  cpr-transfer, QEMU 10.0 (the system's), RAM and disk
///       in gmemd: the new QEMU maps gmemd's memfd again and connects to
///       the same gmemd while the old one still runs the guest
///   transfer-qsd    cpr-transfer, QEMU 10.0, memory-backend-memfd (its fd
///       passes over the cpr channel), qemu-storage-daemon; a second daemon
///       on the same image takes over the socket for the new QEMU, since
///       one daemon serves one client at a time
///   exec-gmemd      cpr-exec, QEMU 11 (scripts/qemu-next), gmemd
///   exec-qsd        cpr-exec, QEMU 11, memfd, qemu-storage-daemon
///
/// Figures per hop: the host's handover (migrate sent until the new QEMU
/// reports the guest running), the guest's pause between the old QEMU's
/// STOP and the new QEMU's RESUME event (QMP timestamps), QEMU's downtime
/// from its vmstate_downtime_checkpoint trace, and the guest-visible stall:
/// the longest gap between the guest's progress lines during the hop, as a
/// host thread reading the console every millisecond timestamps them.
/// The summary gives each figure's p50, p90 and max per scenario (p99 from
/// 100 hops on); the JSON result has every hop.
///
/// Needs qemu-system-x86_64 10.0 or later and, unless --gmemd-only,
/// qemu-storage-daemon; QEMU 11 comes from scripts/qemu-next.
#[derive(Debug, ClapArgs)]
#[command(verbatim_doc_comment, after_help = EXAMPLES)]
pub struct Args {
    /// Runs per scenario, each with a fresh guest.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,

    /// Scenarios to run, comma-separated or repeated [default: all]
    #[arg(long = "scenario", value_enum, value_delimiter = ',', value_name = "NAME")]
    scenarios: Vec<Scenario>,

    /// The QEMU with cpr-exec [default: what scripts/qemu-next provides]
    #[arg(long, value_name = "PATH")]
    qemu_next: Option<PathBuf>,

    #[command(flatten)]
    settings: Settings,

    #[command(flatten)]
    pub backends: BackendArgs,
}

const EXAMPLES: &str = "Examples:
  cargo run --release -p gmem-bench -- cpr
  cargo run --release -p gmem-bench -- cpr --runs 5 --hops 20
  cargo run --release -p gmem-bench -- cpr --scenario exec-gmemd,exec-qsd --runs 1";

/// The workload, the same for every scenario.
#[derive(Debug, Clone, ClapArgs, Serialize)]
pub struct Settings {
    /// Live update hops per run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub hops: u32,

    /// Blocks the guest writes between two hops (at full speed about
    /// 0.4 s; a hop itself takes longer, so hops mostly follow each other
    /// at once, the guest writing throughout).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub blocks_between: u64,

    /// Blocks between two progress lines of the guest
    /// (agent.progress_every); sets the resolution of the stall.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_every: u64,

    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512, value_parser = clap::value_parser!(u64).range(128..))]
    pub memory_mib: u64,

    /// Limit for booting, a hop, and the guest's finish, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 180)]
    pub timeout_secs: u64,
}

/// The blocks written before the first hop.
const START_AT: u64 = 1024;
/// Blocks written after the last hop is due, so that the guest is still
/// writing when it lands.
const TAIL: u64 = 4096;

impl Settings {
    /// Blocks the guest writes in all.
    pub fn blocks(&self) -> u64 {
        START_AT + u64::from(self.hops) * self.blocks_between + TAIL
    }

    /// The image: room for every block, in whole MiB.
    pub fn disk_bytes(&self) -> u64 {
        (self.blocks() * BLOCK_BYTES as u64).next_multiple_of(1 << 20)
    }

    /// The seqio agent's parameters.
    pub fn agent_params(&self, seed: u64) -> [(&'static str, String); 3] {
        [
            ("blocks", self.blocks().to_string()),
            ("seed", seed.to_string()),
            ("progress_every", self.progress_every.to_string()),
        ]
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// One live update setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// cpr-transfer, gmemd.
    TransferGmemd,
    /// cpr-transfer, QEMU-owned RAM, qemu-storage-daemon.
    TransferQsd,
    /// cpr-exec, gmemd.
    ExecGmemd,
    /// cpr-exec, QEMU-owned RAM, qemu-storage-daemon.
    ExecQsd,
}

impl Scenario {
    /// Every scenario, in the order a round runs them.
    const ALL: [Scenario; 4] = [Scenario::TransferGmemd, Scenario::TransferQsd, Scenario::ExecGmemd, Scenario::ExecQsd];

    fn name(self) -> &'static str {
        match self {
            Scenario::TransferGmemd => "transfer-gmemd",
            Scenario::TransferQsd => "transfer-qsd",
            Scenario::ExecGmemd => "exec-gmemd",
            Scenario::ExecQsd => "exec-qsd",
        }
    }

    fn mode(self) -> CprMode {
        match self {
            Scenario::TransferGmemd | Scenario::TransferQsd => CprMode::CprTransfer,
            Scenario::ExecGmemd | Scenario::ExecQsd => CprMode::CprExec,
        }
    }

    fn gmemd(self) -> bool {
        matches!(self, Scenario::TransferGmemd | Scenario::ExecGmemd)
    }
}

/// One hop, measured: what the hop reported, and what the guest saw.
#[derive(Debug, Clone, Serialize)]
pub struct Measured<R> {
    pub report: R,
    /// The longest gap between the guest's progress lines during the hop, ms.
    pub stall_ms: Option<f64>,
    /// The typical gap between progress lines before the hop (the stall's
    /// resolution), ms.
    pub line_interval_ms: Option<f64>,
}

type HopRecord = Measured<HopReport>;

/// One run: a fresh guest moved `--hops` times.
#[derive(Debug, Serialize)]
struct RunRecord {
    scenario: Scenario,
    round: u32,
    hops: Vec<HopRecord>,
}

/// A figure's distribution over a scenario's hops.
#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    /// Only with 100 hops or more.
    pub p99: Option<f64>,
    pub max: f64,
    pub min: f64,
}

impl Distribution {
    /// Nearest-rank percentiles of `values`; `None` when there are none.
    pub fn of(mut values: Vec<f64>) -> Option<Distribution> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let rank = |p: f64| values[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Distribution {
            n,
            p50: rank(0.5),
            p90: rank(0.9),
            p99: (n >= 100).then(|| rank(0.99)),
            max: values[n - 1],
            min: values[0],
        })
    }
}

/// A figure of a hop, for the summary.
struct Figure {
    name: &'static str,
    get: fn(&HopRecord) -> Option<f64>,
}

const FIGURES: [Figure; 4] = [
    Figure { name: "handover: migrate → guest running (host)", get: |h| Some(h.report.handover_ms) },
    Figure { name: "guest paused: STOP → RESUME (QMP events)", get: |h| h.report.paused_ms },
    Figure { name: "QEMU downtime (trace)", get: |h| h.report.qemu_downtime_ms },
    Figure { name: "guest-visible stall (console)", get: |h| h.stall_ms },
];

/// One figure over one scenario's hops.
#[derive(Debug, Serialize)]
struct FigureSummary {
    figure: &'static str,
    unit: &'static str,
    distribution: Option<Distribution>,
}

#[derive(Debug, Serialize)]
struct ScenarioSummary {
    scenario: Scenario,
    /// Hops measured in all; a figure may have fewer values (see
    /// `HopReport::paused_ms`).
    hops: usize,
    figures: Vec<FigureSummary>,
}

#[derive(Debug, Serialize)]
struct Report {
    tool: &'static str,
    mode: &'static str,
    timestamp: String,
    command_line: String,
    note: &'static str,
    host: HostInfo,
    /// `--version` of the QEMU the cpr-exec scenarios run.
    qemu_next_version: Option<String>,
    settings: Settings,
    gmemd_build: GmemdBuild,
    order: &'static str,
    /// The backend and QEMU command lines of each scenario's first run.
    commands: Vec<(Scenario, Vec<String>)>,
    runs: Vec<RunRecord>,
    summary: Vec<ScenarioSummary>,
}

/// Runs the scenarios as `args` say, prints the table and writes the JSON
/// result.
pub fn run(args: Args) -> Result<()> {
    let settings = args.settings;
    anyhow::ensure!(
        settings.disk_bytes() <= (settings.memory_mib << 20) / 2,
        "{} blocks need {} MiB of RAM slots: more than half of --memory-mib",
        settings.blocks(),
        settings.disk_bytes() >> 20
    );
    let mut scenarios = chosen(&Scenario::ALL, &args.scenarios);
    if args.backends.gmemd_only {
        scenarios.retain(|s| s.gmemd());
    }
    let uses_qsd = scenarios.iter().any(|s| !s.gmemd());
    let command_line = shell_join(std::env::args());
    let timestamp = host::utc_timestamp(false);
    let host = HostInfo::gather(Path::new(QEMU), uses_qsd.then_some(args.backends.qsd.as_path()))?;
    let exec = scenarios.iter().any(|s| s.mode() == CprMode::CprExec);
    let qemu_next = match (&args.qemu_next, exec) {
        (Some(path), _) => Some(path.clone()),
        (None, true) => Some(qemu_next().context("QEMU 11 for cpr-exec (scripts/qemu-next)")?),
        (None, false) => None,
    };
    let qemu_next_version =
        qemu_next.as_deref().map(|q| host::tool_version(q, "QEMU >= 10.2", "run scripts/qemu-next")).transpose()?;
    println!(
        "gmem-bench cpr {timestamp}: {} run(s) × {} hops of {}",
        args.runs,
        settings.hops,
        scenarios.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    );
    if let Some(version) = &qemu_next_version {
        println!("cpr-exec QEMU: {version}");
    }
    let image = crate::backends::prepare(&host, &args.backends)?;

    let mut runs = Vec::new();
    let mut commands = Vec::new();
    for round in 1..=args.runs {
        for &scenario in &scenarios {
            host::sync_host()?;
            let qemu = match scenario.mode() {
                CprMode::CprTransfer => Path::new(QEMU),
                CprMode::CprExec => qemu_next.as_deref().unwrap_or(Path::new(QEMU)),
            };
            let seed = u64::from(round);
            let mut guest: Box<dyn Guest> = if scenario.gmemd() {
                Box::new(GmemdGuest::start(&settings, qemu, seed)?)
            } else {
                Box::new(QsdGuest::start(&settings, &image, qemu, &args.backends.qsd, seed)?)
            };
            if !commands.iter().any(|(s, _)| *s == scenario) {
                commands.push((scenario, guest.commands()?));
            }
            let serial = guest.serial();
            let hops = measure(serial, &settings, || guest.hop(scenario.mode()))
                .and_then(|hops| guest.finish(&settings, seed).map(|()| hops))
                .with_context(|| format!("{} run {round} of {}", scenario.name(), args.runs))?;
            println!("[{} {round}/{}] {}", scenario.name(), args.runs, one_line(&hops));
            runs.push(RunRecord { scenario, round, hops });
        }
    }

    let summary: Vec<ScenarioSummary> = scenarios.iter().map(|&scenario| summarize(scenario, &runs)).collect();
    println!("\n{}", table(&summary));
    println!("over every hop of each scenario; p99 from 100 values. {TCG_NOTE}");
    let report = Report {
        tool: "gmem-bench",
        mode: "cpr",
        timestamp,
        command_line,
        note: TCG_NOTE,
        host,
        qemu_next_version,
        settings,
        gmemd_build: args.backends.gmemd_build,
        order: "rounds through every scenario; host sync(1) before every run",
        commands,
        runs,
        summary,
    };
    let path = results::write_json(args.backends.json_out, "-cpr", &report)?;
    println!("JSON result: {}", path.display());
    Ok(())
}

/// Waits for the guest (console `serial`) to be writing, then runs `hop`
/// `settings.hops` times, hop k due at block 1024 + (k-1) *
/// `blocks_between`, timing the console throughout.
pub fn measure<R>(
    serial: PathBuf,
    settings: &Settings,
    mut hop: impl FnMut() -> Result<R>,
) -> Result<Vec<Measured<R>>> {
    let clock = ProgressClock::start(vec![serial], PROGRESS_KEY, Duration::from_millis(1))?;
    let mut windows = Vec::new();
    let mut reports = Vec::new();
    // Hop k is due at a fixed block; a hop that takes longer than the
    // guest needs for --blocks-between makes the next one follow at once.
    for (number, due) in (1..=settings.hops).zip((START_AT..).step_by(settings.blocks_between as usize)) {
        let reached = clock
            .wait_for(settings.timeout(), |stamp| stamp.count >= due)
            .with_context(|| format!("the guest did not reach block {due} before hop {number}"))?;
        anyhow::ensure!(
            reached.count + TAIL / 2 < settings.blocks(),
            "the guest is at block {} of {} at hop {number}: the hops outran the workload; raise --blocks-between",
            reached.count,
            settings.blocks()
        );
        let began = Instant::now();
        reports.push(hop().with_context(|| format!("hop {number}"))?);
        windows.push((began, Instant::now()));
    }
    // A line after the last hop closes its gap.
    let last = windows.last().map_or_else(Instant::now, |&(_, ended)| ended);
    clock.wait_for(settings.timeout(), |stamp| stamp.at > last).context("the guest's progress after the last hop")?;
    let timeline = clock.stop()?;
    Ok(reports
        .into_iter()
        .zip(windows)
        .map(|(report, (began, ended))| hop_record(report, &timeline, began, ended))
        .collect())
}

fn hop_record<R>(report: R, timeline: &ProgressTimeline, began: Instant, ended: Instant) -> Measured<R> {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Measured {
        report,
        stall_ms: timeline.gaps_overlapping(began, ended).first().map(|gap| ms(gap.duration())),
        line_interval_ms: timeline.typical_interval(began).map(ms),
    }
}

fn summarize(scenario: Scenario, runs: &[RunRecord]) -> ScenarioSummary {
    let hops: Vec<&HopRecord> = runs.iter().filter(|r| r.scenario == scenario).flat_map(|r| &r.hops).collect();
    ScenarioSummary {
        scenario,
        hops: hops.len(),
        figures: FIGURES
            .iter()
            .map(|figure| FigureSummary {
                figure: figure.name,
                unit: "ms",
                distribution: Distribution::of(hops.iter().filter_map(|h| (figure.get)(h)).collect()),
            })
            .collect(),
    }
}

/// `handover p50 72.1 ms, paused p50 61.0 ms, ...` for a run's hops.
fn one_line(hops: &[HopRecord]) -> String {
    FIGURES
        .iter()
        .map(|figure| {
            let values: Vec<f64> = hops.iter().filter_map(|h| (figure.get)(h)).collect();
            let short = figure.name.split(':').next().unwrap_or(figure.name);
            match Distribution::of(values) {
                Some(d) => format!("{short} p50 {:.1} max {:.1}", d.p50, d.max),
                None => format!("{short} -"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A Markdown table: one row per figure, one column per scenario, each
/// cell `p50 / p90 / p99 / max` (p99 from 100 values, and the count when a
/// figure has fewer values than the scenario has hops).
fn table(summary: &[ScenarioSummary]) -> String {
    let mut out = format!(
        "| figure (ms): p50 / p90 / p99 / max | {} |\n|---|{}\n",
        summary.iter().map(|s| format!("{} ({} hops)", s.scenario.name(), s.hops)).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(summary.len())
    );
    for (row, figure) in FIGURES.iter().enumerate() {
        let cells: Vec<String> = summary
            .iter()
            .map(|s| match &s.figures[row].distribution {
                Some(d) => {
                    let p99 = d.p99.map_or("–".to_string(), |p99| format!("{p99:.1}"));
                    let n = match d.n == s.hops {
                        true => String::new(),
                        false => format!(" (n={})", d.n),
                    };
                    format!("{:.1} / {:.1} / {p99} / {:.1}{n}", d.p50, d.p90, d.max)
                }
                None => "–".to_string(),
            })
            .collect();
        out += &format!("| {} | {} |\n", figure.name, cells.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_when_a_figure_has_fewer_values() {
        let figures = FIGURES
            .iter()
            .enumerate()
            .map(|(row, figure)| FigureSummary {
                figure: figure.name,
                unit: "ms",
                distribution: Distribution::of((0..100 - row).map(|v| v as f64).collect()),
            })
            .collect();
        let summary = ScenarioSummary { scenario: Scenario::ExecGmemd, hops: 100, figures };
        let table = table(&[summary]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "| figure (ms): p50 / p90 / p99 / max | exec-gmemd (100 hops) |");
        assert!(lines[2].ends_with("| 49.0 / 89.0 / 98.0 / 99.0 |"), "{table}");
        assert!(lines[3].ends_with("| 49.0 / 89.0 / – / 98.0 (n=99) |"), "{table}");
    }

    #[test]
    fn nearest_rank_percentiles() {
        let d = Distribution::of((1..=10).map(f64::from).collect()).expect("values");
        assert_eq!((d.n, d.p50, d.p90, d.p99, d.max, d.min), (10, 5.0, 9.0, None, 10.0, 1.0));
        let d = Distribution::of((1..=200).rev().map(f64::from).collect()).expect("values");
        assert_eq!((d.p50, d.p90, d.p99), (100.0, 180.0, Some(198.0)));
        assert!(Distribution::of(Vec::new()).is_none());
    }
}
