//! How `gmemctl migrate` shows a migration: a progress line on stderr
//! while it runs, a summary at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use gmem_protocol::MigrationInfo;
use gmem_qemu::{MigrationReport, MigrationStatus, Progress};

use crate::tables::{bytes, fields};

/// How often a progress line is printed when stderr is not a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 20;

/// The progress line: redrawn in place (`\r`) on a terminal, otherwise
/// printed every [`LOG_INTERVAL`] and whenever the status changes.
#[derive(Debug)]
pub struct ProgressDisplay {
    terminal: bool,
    drawn: bool,
    last_printed: Option<(Instant, MigrationStatus)>,
}

impl ProgressDisplay {
    pub fn new() -> Self {
        ProgressDisplay { terminal: std::io::stderr().is_terminal(), drawn: false, last_printed: None }
    }

    pub fn show(&mut self, progress: &Progress) {
        let line = progress_line(progress);
        if self.terminal {
            // \x1b[K clears what a longer previous line left behind.
            eprint!("\r{line}\x1b[K");
            self.drawn = true;
            return;
        }
        let due = match self.last_printed {
            Some((at, status)) => status != progress.status || at.elapsed() >= LOG_INTERVAL,
            None => true,
        };
        if due {
            eprintln!("{line}");
            self.last_printed = Some((Instant::now(), progress.status));
        }
    }

    /// Ends the line drawn in place, so that what follows starts afresh.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// `active  45% [#########-----------] 70.3 MiB left, dirty 1.2 MiB/s, 41.9 MiB/s, 12.3 s`,
/// with the destination gmemd's device faults in postcopy.
fn progress_line(progress: &Progress) -> String {
    let ram = &progress.ram;
    let fraction = ram.fraction_sent();
    let filled = ((fraction * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
    let mut line = format!(
        "{:<15} {:>3.0}% [{}{}] {} left, dirty {}/s, {}/s",
        progress.status.as_str(),
        fraction * 100.0,
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        bytes(ram.remaining),
        bytes(ram.dirty_bytes_per_second()),
        bytes(ram.bytes_per_second() as u64),
    );
    if let Some(gmemd) = &progress.destination_gmemd {
        if progress.status.is_postcopy() || gmemd.postcopy.device_faults > 0 {
            line += &format!(", {} device faults", gmemd.postcopy.device_faults);
        }
    }
    line += &format!(", {:.1} s", progress.elapsed.as_secs_f64());
    line
}

/// The human-readable end report.
pub fn summary(report: &MigrationReport) -> String {
    let mut mode = match report.postcopy_switch_ms {
        Some(ms) if report.postcopy => format!("postcopy (switched at {:.1} s)", seconds(ms)),
        _ if report.postcopy => "postcopy".to_string(),
        _ => "precopy".to_string(),
    };
    if report.recoveries > 0 {
        mode += &format!(", {} recover{}", report.recoveries, plural(report.recoveries, "y", "ies"));
    }
    let ram = &report.ram;
    let mut lines = vec![
        ("migration", format!("completed, {mode}")),
        (
            "elapsed",
            format!(
                "{:.2} s (QEMU total-time {} ms, setup {} ms)",
                seconds(report.elapsed_ms),
                report.total_time_ms,
                report.setup_time_ms
            ),
        ),
        ("downtime", format!("{} ms", report.downtime_ms)),
        (
            "transferred",
            format!(
                "{} of {} RAM (precopy {}, at switchover {}, postcopy {})",
                bytes(ram.transferred),
                bytes(ram.total),
                bytes(ram.precopy_bytes),
                bytes(ram.downtime_bytes),
                bytes(ram.postcopy_bytes)
            ),
        ),
    ];
    if report.postcopy {
        let preempt = if report.postcopy_preempt {
            "on: requested pages had a connection of their own"
        } else {
            "off: requested pages queued behind the background stream"
        };
        lines.push(("postcopy-preempt", preempt.to_string()));
        lines.push(("postcopy requests", ram.postcopy_requests.to_string()));
    }
    if let Some(total) = report.postcopy_blocktime_ms {
        let per_vcpu =
            report.postcopy_vcpu_blocktime_ms.iter().flatten().map(u64::to_string).collect::<Vec<_>>().join(", ");
        lines.push(("vCPU blocktime", format!("{total} ms (per vCPU: {per_vcpu})")));
    }
    lines.push(("destination", report.destination_run_state.clone()));
    if let Some(gap) = report.device_io_gap_us {
        lines.push(("device I/O gap", format!("{:.1} ms", gap as f64 / 1000.0)));
    }
    if let Some(gmemd) = &report.source_gmemd {
        lines.push(("source gmemd", source_gmemd(gmemd)));
    }
    if let Some(gmemd) = &report.destination_gmemd {
        lines.push(("destination gmemd", destination_gmemd(gmemd)));
    }
    fields(&lines)
}

fn source_gmemd(info: &MigrationInfo) -> String {
    format!("{} dirty page marks, device wrote {}", info.dirty_log.pages_marked, bytes(info.device_bytes_written))
}

fn destination_gmemd(info: &MigrationInfo) -> String {
    let faults = &info.postcopy;
    let latency = &faults.fault_latency;
    let mut text = format!("{} device faults", faults.device_faults);
    if latency.count > 0 {
        text +=
            &format!(", fault to wake p50 {} us, p99 {} us, max {} us", latency.p50_us, latency.p99_us, latency.max_us);
    }
    text
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn plural<'a>(n: u32, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}
