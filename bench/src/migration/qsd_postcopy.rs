//! Postcopy with qemu-storage-daemon, run once to record what happens.
//!
//! libvhost-user, which qemu-storage-daemon's vhost-user-blk export is built
//! on, rejects QEMU's fd-less `ADD_MEM_REG` postcopy acknowledgement (it
//! checks for exactly one fd first) and drops the device; the destination
//! QEMU fails to start it, and the migration either completes with a guest
//! that has no disk or pauses because a page was filled before QEMU placed
//! it. There is nothing to measure; this records the evidence.

use std::time::Instant;

use serde::Serialize;

use super::qsd_pair::QsdPair;
use super::run::Migrated;
use crate::qsd::read;

/// Output lines kept from each log.
const LOG_LINES: usize = 12;

/// What happened in the postcopy run with qemu-storage-daemon.
#[derive(Debug, Clone, Serialize)]
pub struct QsdPostcopy {
    /// `Migration::wait`'s outcome: `completed`, or its error.
    pub migration: String,
    /// The destination's run state afterwards, when it completed.
    pub destination_run_state: Option<String>,
    /// When the migration ended, ms after `migrate`.
    pub ended_ms: f64,
    /// Progress lines the guest printed on the destination.
    pub destination_progress_lines: usize,
    /// When the last of them began, ms after `migrate`.
    pub last_progress_ms: Option<f64>,
    /// Until when the host watched the consoles, ms after `migrate`.
    pub watched_ms: f64,
    /// The destination qemu-storage-daemon's exit status, `None` if it
    /// still ran.
    pub destination_qsd_exit: Option<String>,
    /// The destination daemon's output (last lines).
    pub destination_qsd_log: Vec<String>,
    /// The destination QEMU's output (distinct lines, first ones).
    pub destination_qemu_log: Vec<String>,
}

impl QsdPostcopy {
    /// Collects the evidence of `migrated` on `pair`.
    pub fn record(pair: &mut QsdPair, migrated: &Migrated) -> QsdPostcopy {
        let since = |at: Instant| at.saturating_duration_since(migrated.started).as_secs_f64() * 1e3;
        let (migration, destination_run_state) = match &migrated.report {
            Ok(report) => ("completed".into(), Some(report.destination_run_state.clone())),
            Err(e) => (format!("{e:#}"), None),
        };
        let on_destination: Vec<_> = migrated.timeline.0.iter().filter(|s| s.file == 1).collect();
        let destination_qsd_exit = match pair.dest.daemon.try_wait() {
            Ok(status) => status.map(|s| s.to_string()),
            Err(e) => Some(format!("unknown: {e:#}")),
        };
        let qsd_log = read(&pair.dest.daemon_log);
        let qsd_lines: Vec<&str> = qsd_log.lines().collect();
        let mut qemu_lines: Vec<String> = Vec::new();
        for line in read(&pair.dest.qemu_log).lines() {
            if qemu_lines.len() < LOG_LINES && !qemu_lines.iter().any(|l| l == line) {
                qemu_lines.push(line.to_string());
            }
        }
        QsdPostcopy {
            migration,
            destination_run_state,
            ended_ms: since(migrated.finished),
            destination_progress_lines: on_destination.len(),
            last_progress_ms: on_destination.last().map(|s| since(s.at)),
            watched_ms: since(migrated.watched_until),
            destination_qsd_exit,
            destination_qsd_log: qsd_lines[qsd_lines.len().saturating_sub(LOG_LINES)..]
                .iter()
                .map(|l| l.to_string())
                .collect(),
            destination_qemu_log: qemu_lines,
        }
    }

    /// One paragraph for the console.
    pub fn describe(&self) -> String {
        let last = self.last_progress_ms.map_or(String::new(), |ms| format!(", the last at {ms:.0} ms"));
        format!(
            "postcopy-qsd (once): migration {} at {:.0} ms (destination {}); the guest printed {} \
             progress line(s) on the destination{last}, none from then until {:.0} ms; destination \
             qemu-storage-daemon {}.\n  its output: {}\n  destination QEMU: {}",
            self.migration,
            self.ended_ms,
            self.destination_run_state.as_deref().unwrap_or("not running"),
            self.destination_progress_lines,
            self.watched_ms,
            self.destination_qsd_exit.as_deref().map_or("still running".to_string(), |s| format!("exited ({s})")),
            self.destination_qsd_log.join("\n    "),
            self.destination_qemu_log.join("\n    ")
        )
    }
}
