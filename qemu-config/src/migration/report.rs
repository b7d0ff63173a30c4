//! What [`Migration::wait`](super::Migration::wait) hands out: a
//! [`Progress`] every poll and a [`MigrationReport`] at the end.

use std::time::Duration;

use gmem_protocol::MigrationInfo;
use serde::Serialize;

use super::{MigrationStatus, RamStats};

/// One look at a running migration.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Time since [`Migration::start`](super::Migration::start).
    pub elapsed: Duration,
    /// The source's status.
    pub status: MigrationStatus,
    /// The source's RAM figures (zeros before QEMU has any).
    pub ram: RamStats,
    /// QEMU's estimate of the downtime if it switched over now, ms.
    pub expected_downtime_ms: Option<u64>,
    /// The source gmemd's side (dirty logging), when its control socket was given.
    pub source_gmemd: Option<MigrationInfo>,
    /// The destination gmemd's side (postcopy faults), when its control
    /// socket was given.
    pub destination_gmemd: Option<MigrationInfo>,
}

/// A completed migration, as both QEMUs and gmemds report it; or one that
/// will not complete, as they reported it when that became clear
/// ([`MigrationError::PostcopyPreemptStuck`](super::MigrationError::PostcopyPreemptStuck)).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationReport {
    /// Wall-clock time from `migrate` to the destination's guest running, ms.
    pub elapsed_ms: u64,
    /// The source's `total-time`, ms (of a migration that will not
    /// complete: so far).
    pub total_time_ms: u64,
    /// The source's `downtime` (guest stopped at switchover), ms. For
    /// postcopy, the value QEMU first reported in postcopy: QEMU 10.0
    /// takes a downtime of 0 ms for "not measured yet" and overwrites it at
    /// completion with the time since the switchover.
    pub downtime_ms: u64,
    /// The source's `setup-time`, ms.
    pub setup_time_ms: u64,
    /// Whether the guest went through postcopy (ran on the destination
    /// before all of its RAM had arrived).
    pub postcopy: bool,
    /// When `migrate-start-postcopy` was sent, ms after `migrate`.
    pub postcopy_switch_ms: Option<u64>,
    /// Whether the migration ran with `postcopy-preempt`: in postcopy, the
    /// source sent the pages the destination asked for on a connection of
    /// their own.
    pub postcopy_preempt: bool,
    /// Postcopy recoveries (`migrate` with `resume`) along the way.
    pub recoveries: u32,
    /// The source's final RAM figures.
    pub ram: RamStats,
    /// The destination's `postcopy-blocktime`: total time its vCPUs waited
    /// for missing pages, ms (postcopy with the `postcopy-blocktime`
    /// capability, which [`prepare_destination`](super::prepare_destination) sets).
    pub postcopy_blocktime_ms: Option<u64>,
    /// The destination's `postcopy-vcpu-blocktime`, ms per vCPU.
    pub postcopy_vcpu_blocktime_ms: Option<Vec<u64>>,
    /// The destination's run state afterwards: `running`, or `paused` if
    /// it was started with `-S` (of a migration that will not complete:
    /// whatever it was, e.g. `shutdown`).
    pub destination_run_state: String,
    /// From the source gmemd's last device request completion to the
    /// destination gmemd's first, µs: how long the guest's disk I/O stalled
    /// at switchover, if it did I/O throughout (needs both gmemds).
    pub device_io_gap_us: Option<u64>,
    /// The source gmemd's `query-migration` afterwards (dirty log marks).
    pub source_gmemd: Option<MigrationInfo>,
    /// The destination gmemd's `query-migration` afterwards (device faults
    /// and their fault-to-wake latency).
    pub destination_gmemd: Option<MigrationInfo>,
}
