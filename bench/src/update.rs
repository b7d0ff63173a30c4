//! `gmem-bench update`: what replacing the storage backend under a running
//! guest costs it: gmemd's exec upgrade, gmemd killed and restarted, and
//! qemu-storage-daemon stopped and started again (its only way to a new
//! program).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use gmem_qemu::quote::shell_join;
use serde::Serialize;

use crate::backends::{chosen, BackendArgs, GmemdBuild, QEMU};
use crate::cpr::guest::{GmemdGuest, Guest, QsdGuest};
use crate::cpr::{measure, Distribution, Measured, Settings};
use crate::host::{self, HostInfo};
use crate::{results, TCG_NOTE};

/// Backend replacement under a running guest: gmemd's exec upgrade,
/// gmemd killed (SIGKILL) and started again, qemu-storage-daemon stopped
/// (SIGTERM) and started again.
///
/// Each run boots the test guest under TCG with the `seqio` agent (as
/// `gmem-bench cpr` does), waits until it has written 1024 blocks, then
/// replaces the backend --hops times while it keeps writing, and checks at
/// the end that the guest and the image lost nothing.
///
/// Scenarios (each run --runs times, in rounds through all of them):
///   upgrade-gmemd   `upgrade` on the control socket: gmemd execs its own
///       program; QEMU stays connected
///   restart-gmemd   gmemd SIGKILLed and started again with the same
///       arguments: it takes the RAM back from QEMU, which reconnects
///   restart-qsd     qemu-storage-daemon (QEMU-owned RAM) stopped and
///       started again on the same image and socket; QEMU reconnects
///
/// Figures per replacement: the host's time for the operation (the
/// `upgrade` request until its reply; kill or stop until the new daemon
/// answers or listens), gmemd's own measure of the device's pause (the
/// upgrade reply's `paused_us`), and the guest-visible stall: the longest
/// gap between the guest's progress lines, timestamped by a host thread
/// reading the console every millisecond. QEMU's `reconnect-ms` is 1000
/// for both backends.
#[derive(Debug, ClapArgs)]
#[command(verbatim_doc_comment, after_help = EXAMPLES)]
pub struct Args {
    /// Runs per scenario, each with a fresh guest.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
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
  cargo run --release -p gmem-bench -- update
  cargo run --release -p gmem-bench -- update --runs 2 --hops 10
  cargo run --release -p gmem-bench -- update --scenario upgrade-gmemd --runs 1";

/// One way of replacing the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// gmemd's exec upgrade.
    UpgradeGmemd,
    /// gmemd SIGKILLed and started again.
    RestartGmemd,
    /// qemu-storage-daemon stopped and started again.
    RestartQsd,
}

impl Scenario {
    const ALL: [Scenario; 3] = [Scenario::UpgradeGmemd, Scenario::RestartGmemd, Scenario::RestartQsd];

    fn name(self) -> &'static str {
        match self {
            Scenario::UpgradeGmemd => "upgrade-gmemd",
            Scenario::RestartGmemd => "restart-gmemd",
            Scenario::RestartQsd => "restart-qsd",
        }
    }
}

/// One replacement, as the host and the backend saw it.
#[derive(Debug, Clone, Serialize)]
struct Replacement {
    /// The operation, host clock, ms.
    host_ms: f64,
    /// gmemd's pause of the device (upgrade only), ms.
    device_paused_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct RunRecord {
    scenario: Scenario,
    round: u32,
    replacements: Vec<Measured<Replacement>>,
}

#[derive(Debug, Serialize)]
struct ScenarioSummary {
    scenario: Scenario,
    replacements: usize,
    host_ms: Option<Distribution>,
    device_paused_ms: Option<Distribution>,
    stall_ms: Option<Distribution>,
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
    runs: Vec<RunRecord>,
    summary: Vec<ScenarioSummary>,
}

/// Runs the scenarios as `args` say, prints the table and writes the JSON
/// result.
pub fn run(args: Args) -> Result<()> {
    let settings = args.settings;
    let mut scenarios = chosen(&Scenario::ALL, &args.scenarios);
    if args.backends.gmemd_only {
        scenarios.retain(|s| *s != Scenario::RestartQsd);
    }
    let uses_qsd = scenarios.contains(&Scenario::RestartQsd);
    let timestamp = host::utc_timestamp(false);
    let host = HostInfo::gather(Path::new(QEMU), uses_qsd.then_some(args.backends.qsd.as_path()))?;
    println!(
        "gmem-bench update {timestamp}: {} run(s) × {} replacements of {}",
        args.runs,
        settings.hops,
        scenarios.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    );
    let image = crate::backends::prepare(&host, &args.backends)?;
    let mut runs = Vec::new();
    for round in 1..=args.runs {
        for &scenario in &scenarios {
            host::sync_host()?;
            let seed = u64::from(round);
            let replacements = match scenario {
                Scenario::UpgradeGmemd | Scenario::RestartGmemd => {
                    let mut guest = GmemdGuest::start(&settings, Path::new(QEMU), seed)?;
                    let measured = measure(guest.serial(), &settings, || match scenario {
                        Scenario::UpgradeGmemd => {
                            let began = Instant::now();
                            let info = guest.upgrade()?;
                            Ok(Replacement {
                                host_ms: ms(began.elapsed()),
                                device_paused_ms: Some(info.paused_us as f64 / 1000.0),
                            })
                        }
                        _ => Ok(Replacement { host_ms: ms(guest.crash_and_restart()?), device_paused_ms: None }),
                    });
                    measured.and_then(|m| guest.finish(&settings, seed).map(|()| m))
                }
                Scenario::RestartQsd => {
                    let mut guest = QsdGuest::start(&settings, &image, Path::new(QEMU), &args.backends.qsd, seed)?;
                    let measured = measure(guest.serial(), &settings, || {
                        Ok(Replacement { host_ms: ms(guest.restart_daemon()?), device_paused_ms: None })
                    });
                    measured.and_then(|m| guest.finish(&settings, seed).map(|()| m))
                }
            }
            .with_context(|| format!("{} run {round} of {}", scenario.name(), args.runs))?;
            let stalls = Distribution::of(replacements.iter().filter_map(|r| r.stall_ms).collect());
            println!(
                "[{} {round}/{}] stall p50 {:.1} ms, max {:.1} ms",
                scenario.name(),
                args.runs,
                stalls.as_ref().map_or(f64::NAN, |d| d.p50),
                stalls.as_ref().map_or(f64::NAN, |d| d.max)
            );
            runs.push(RunRecord { scenario, round, replacements });
        }
    }
    let summary: Vec<ScenarioSummary> = scenarios.iter().map(|&s| summarize(s, &runs)).collect();
    println!("\n{}", table(&summary));
    println!("p50 / p90 / max over every replacement of each scenario. {TCG_NOTE}");
    let report = Report {
        tool: "gmem-bench",
        mode: "update",
        timestamp,
        command_line: shell_join(std::env::args()),
        note: TCG_NOTE,
        host,
        settings,
        gmemd_build: args.backends.gmemd_build,
        runs,
        summary,
    };
    let path = results::write_json(args.backends.json_out, "-update", &report)?;
    println!("JSON result: {}", path.display());
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn summarize(scenario: Scenario, runs: &[RunRecord]) -> ScenarioSummary {
    let all: Vec<&Measured<Replacement>> =
        runs.iter().filter(|r| r.scenario == scenario).flat_map(|r| &r.replacements).collect();
    ScenarioSummary {
        scenario,
        replacements: all.len(),
        host_ms: Distribution::of(all.iter().map(|m| m.report.host_ms).collect()),
        device_paused_ms: Distribution::of(all.iter().filter_map(|m| m.report.device_paused_ms).collect()),
        stall_ms: Distribution::of(all.iter().filter_map(|m| m.stall_ms).collect()),
    }
}

/// A Markdown table: one row per scenario, each cell `p50 / p90 / max`.
fn table(summary: &[ScenarioSummary]) -> String {
    let cell = |d: &Option<Distribution>| {
        d.as_ref().map_or("–".to_string(), |d| format!("{:.1} / {:.1} / {:.1}", d.p50, d.p90, d.max))
    };
    let mut out = "| scenario | n | operation, host (ms) | device paused, gmemd (ms) | guest-visible stall (ms) |\n\
                   |---|---:|---:|---:|---:|\n"
        .to_string();
    for s in summary {
        out += &format!(
            "| {} | {} | {} | {} | {} |\n",
            s.scenario.name(),
            s.replacements,
            cell(&s.host_ms),
            cell(&s.device_paused_ms),
            cell(&s.stall_ms)
        );
    }
    out
}
