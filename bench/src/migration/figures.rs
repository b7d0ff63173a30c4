//! The figures of one measured migration, and their summary per scenario.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use gmem_qemu::migration::MigrationReport;
use serde::Serialize;

use super::run::{Migrated, RESUME_TIMEOUT};

/// What one migration measured. Times from QEMU and gmemd are theirs; the
/// progress-line times are the host's (see `gmem_tests::console`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RunFigures {
    /// Whether QEMU completed the migration (postcopy-preempt with gmemd:
    /// never; see docs/migration.md).
    pub completed: bool,
    /// The source QEMU's `total-time`, ms, when it completed.
    pub total_time_ms: Option<f64>,
    /// Host time from `migrate` to the guest's first progress line on the
    /// destination, ms: when the guest demonstrably ran (and did I/O) there.
    pub to_destination_ms: f64,
    /// The source QEMU's `downtime`, ms.
    pub downtime_ms: f64,
    /// The largest gap between consecutive progress lines overlapping the
    /// migration (from `migrate` to the first line after completion), ms.
    pub stall_ms: f64,
    /// When that gap began, ms after `migrate`.
    pub stall_start_ms: f64,
    /// The median gap between progress lines before the migration, ms: the
    /// resolution of `stall_ms`.
    pub line_interval_ms: f64,
    /// From the source gmemd's last completed request to the destination
    /// gmemd's first, ms (gmemd only; see `Migrated::gmemd_after`).
    pub device_io_gap_ms: Option<f64>,
    /// Pages the destination gmemd's device faulted on (postcopy, gmemd).
    pub device_faults: Option<f64>,
    /// The device's fault-to-wake latency, median, µs.
    pub fault_p50_us: Option<f64>,
    /// Its 99th percentile, µs.
    pub fault_p99_us: Option<f64>,
    /// Its maximum, µs.
    pub fault_max_us: Option<f64>,
    /// The destination QEMU's `postcopy-blocktime`: vCPU time spent waiting
    /// for pages, ms (postcopy).
    pub blocktime_ms: Option<f64>,
    /// The source QEMU's `postcopy-requests`: page requests from the
    /// destination, for the vCPUs and the device alike (postcopy).
    pub postcopy_requests: Option<f64>,
    /// `blocktime_ms / postcopy_requests`: QEMU's mean wait per request, ms.
    pub blocktime_per_request_ms: Option<f64>,
    /// `blocktime_ms / (postcopy_requests - device_faults)`: the same per
    /// request not made for the device, i.e. roughly per vCPU request, ms
    /// (a device fault on a page already on its way makes no request).
    pub blocktime_per_vcpu_request_ms: Option<f64>,
    /// RAM QEMU sent in all, MiB.
    pub transferred_mib: f64,
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// `total / requests`, when there were requests.
fn per_request(total: Option<f64>, requests: Option<f64>) -> Option<f64> {
    total.zip(requests).filter(|(_, n)| *n > 0.0).map(|(t, n)| t / n)
}

impl RunFigures {
    /// The figures of a completed migration: `report` and the timeline of
    /// `migrated`. Fails if the guest's progress does not span the whole
    /// migration (no line on the destination afterwards, or the workload
    /// ran out of its `blocks`).
    pub fn new(report: &MigrationReport, migrated: &Migrated, blocks: u64) -> Result<RunFigures> {
        let timeline = &migrated.timeline;
        let resumed = migrated.resumed().with_context(|| {
            format!("the guest printed no progress on the destination within {RESUME_TIMEOUT:?} after the migration")
        })?;
        ensure!(
            resumed.count < blocks,
            "the guest's workload ended ({} of {blocks} blocks) before the measurement did; raise --blocks",
            resumed.count
        );
        let first_there = timeline.first_from(1).context("no progress line from the destination")?;
        let gap = *migrated.gaps().first().context("no progress lines during the migration")?;
        let interval =
            timeline.typical_interval(migrated.started).context("too few progress lines before the migration")?;
        let postcopy = report.postcopy.then_some(report);
        let faults = postcopy.and_then(|r| r.destination_gmemd.as_ref()).map(|d| d.postcopy.clone());
        let latency = faults.as_ref().filter(|f| f.device_faults > 0).map(|f| f.fault_latency);
        let requests = postcopy.map(|r| r.ram.postcopy_requests as f64);
        let blocktime = postcopy.and_then(|r| r.postcopy_blocktime_ms).map(|b| b as f64);
        Ok(RunFigures {
            completed: migrated.completed,
            total_time_ms: migrated.completed.then_some(report.total_time_ms as f64),
            to_destination_ms: ms(first_there.at.saturating_duration_since(migrated.started)),
            downtime_ms: report.downtime_ms as f64,
            stall_ms: ms(gap.duration()),
            stall_start_ms: ms(gap.before.at.saturating_duration_since(migrated.started)),
            line_interval_ms: ms(interval),
            device_io_gap_ms: migrated.device_io_gap_us().map(|us| us as f64 / 1e3),
            device_faults: faults.as_ref().map(|f| f.device_faults as f64),
            fault_p50_us: latency.map(|l| l.p50_us as f64),
            fault_p99_us: latency.map(|l| l.p99_us as f64),
            fault_max_us: latency.map(|l| l.max_us as f64),
            blocktime_ms: blocktime,
            postcopy_requests: requests,
            blocktime_per_request_ms: per_request(blocktime, requests),
            blocktime_per_vcpu_request_ms: per_request(
                blocktime,
                requests.map(|n| n - faults.as_ref().map_or(0, |f| f.device_faults) as f64),
            ),
            transferred_mib: report.ram.transferred as f64 / f64::from(1 << 20),
        })
    }

    /// The headline figures on one line.
    pub fn one_line(&self) -> String {
        let total = match self.total_time_ms {
            Some(ms) => format!("total {ms:.0} ms"),
            None => "QEMU never completed".to_string(),
        };
        let mut line = format!(
            "{total}, to destination {:.0} ms, downtime {:.0} ms, stall {:.1} ms (lines every {:.2} ms)",
            self.to_destination_ms, self.downtime_ms, self.stall_ms, self.line_interval_ms
        );
        if let Some(gap) = self.device_io_gap_ms {
            line.push_str(&format!(", device I/O gap {gap:.1} ms"));
        }
        if let (Some(faults), Some(p50), Some(p99)) = (self.device_faults, self.fault_p50_us, self.fault_p99_us) {
            line.push_str(&format!(", {faults:.0} device faults p50 {p50:.0} µs p99 {p99:.0} µs"));
        }
        if let (Some(blocktime), Some(requests)) = (self.blocktime_ms, self.postcopy_requests) {
            line.push_str(&format!(", QEMU blocktime {blocktime:.0} ms / {requests:.0} requests"));
        }
        line
    }
}

/// A gap between the guest's progress lines, for the JSON record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GapRecord {
    /// When it began, ms after `migrate`.
    pub start_ms: f64,
    /// How long it lasted, ms.
    pub ms: f64,
    /// The counts on the lines before and after it.
    pub counts: (u64, u64),
    /// Which console printed them: `source` or `destination`.
    pub consoles: (&'static str, &'static str),
}

/// The `n` longest gaps of `migrated` (see `Migrated::gaps`).
pub fn longest_gaps(migrated: &Migrated, n: usize) -> Vec<GapRecord> {
    let side = |file: usize| if file == 0 { "source" } else { "destination" };
    migrated
        .gaps()
        .iter()
        .take(n)
        .map(|gap| GapRecord {
            start_ms: ms(gap.before.at.saturating_duration_since(migrated.started)),
            ms: ms(gap.duration()),
            counts: (gap.before.count, gap.after.count),
            consoles: (side(gap.before.file), side(gap.after.file)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_divide_only_when_there_are_some() {
        assert_eq!(per_request(Some(30.0), Some(10.0)), Some(3.0));
        assert_eq!(per_request(Some(30.0), Some(0.0)), None);
        assert_eq!(per_request(None, Some(10.0)), None);
    }
}
