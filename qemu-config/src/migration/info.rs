//! `query-migrate`'s reply as types: [`QemuMigrationInfo`], [`RamStats`],
//! [`MigrationStatus`].
//!
//! Field names and optionality follow QEMU 10.0's QAPI `MigrationInfo` and
//! `MigrationStats` (`query-qmp-schema`); only the fields gmem uses are
//! kept, unknown ones are ignored.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a migration stands, on either side (QAPI `MigrationStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has been started.
    None,
    /// Connecting, setting up.
    Setup,
    /// `migrate_cancel` is being processed.
    Cancelling,
    /// Cancelled; the source keeps running the guest.
    Cancelled,
    /// Precopy: RAM is being copied while the guest runs on the source.
    Active,
    /// Postcopy: the guest runs on the destination, which fetches the
    /// pages it misses from the source.
    PostcopyActive,
    /// The switch to postcopy, while the destination still loads the
    /// device state and does not run the guest yet; a failure now resumes
    /// the guest on the source (QEMU 10.2 and later; 11.1.3 reports it).
    PostcopyDevice,
    /// Postcopy with the connection lost or `migrate-pause`d: the guest
    /// runs on the destination but waits for every page still missing.
    PostcopyPaused,
    /// Postcopy recovery is setting up (source side, after `migrate` with
    /// `resume`).
    PostcopyRecoverSetup,
    /// Postcopy recovery: the two sides are resynchronising.
    PostcopyRecover,
    /// Done; on the destination the guest can run.
    Completed,
    /// Failed; see [`QemuMigrationInfo::error_desc`].
    Failed,
    /// COLO fault tolerance (not used by gmem).
    Colo,
    /// Paused before switchover (capability `pause-before-switchover`).
    PreSwitchover,
    /// Device state is being sent with the guest stopped (switchover).
    Device,
    /// Waiting for a failover device to be unplugged.
    WaitUnplug,
    /// A status this crate does not know (newer QEMU).
    #[serde(other)]
    Unknown,
}

impl MigrationStatus {
    /// QEMU's name for the status, e.g. `"postcopy-active"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyDevice => "postcopy-device",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecoverSetup => "postcopy-recover-setup",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
            MigrationStatus::Unknown => "unknown",
        }
    }

    /// Whether the guest already runs on the destination (any postcopy state).
    pub fn is_postcopy(self) -> bool {
        matches!(
            self,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::PostcopyRecover
        )
    }

    /// Whether the migration has ended, one way or the other.
    pub fn is_finished(self) -> bool {
        matches!(self, MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `query-migrate`'s reply (QAPI `MigrationInfo`). Everything is optional:
/// before any migration QEMU returns `{}`; a destination reports little
/// more than `status`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QemuMigrationInfo {
    /// Absent until a migration (outgoing, or incoming after
    /// `migrate-incoming`) has started.
    pub status: Option<MigrationStatus>,
    /// RAM figures; source side only.
    pub ram: Option<RamStats>,
    /// Milliseconds since `migrate` (the final figure once completed).
    pub total_time: Option<u64>,
    /// QEMU's estimate of the downtime if it switched over now, ms.
    pub expected_downtime: Option<u64>,
    /// The guest's downtime at switchover, ms (once switched over).
    pub downtime: Option<u64>,
    /// Milliseconds `setup` took.
    pub setup_time: Option<u64>,
    /// Why it failed or paused.
    pub error_desc: Option<String>,
    /// Destination, once completed, with the `postcopy-blocktime`
    /// capability: total time vCPUs waited for missing pages, ms.
    pub postcopy_blocktime: Option<u64>,
    /// Like [`postcopy_blocktime`](Self::postcopy_blocktime), per vCPU.
    pub postcopy_vcpu_blocktime: Option<Vec<u64>>,
}

impl QemuMigrationInfo {
    /// [`status`](Self::status), [`MigrationStatus::None`] when absent.
    pub fn status(&self) -> MigrationStatus {
        self.status.unwrap_or(MigrationStatus::None)
    }
}

/// RAM transfer figures (QAPI `MigrationStats`), bytes unless noted.
///
/// Read from QEMU's kebab-case names; written (e.g. in a JSON report) in
/// snake_case like the rest of gmem's JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all(deserialize = "kebab-case"))]
pub struct RamStats {
    /// Guest RAM in all.
    pub total: u64,
    /// Sent so far, all phases.
    pub transferred: u64,
    /// Still to send in the current pass (dirty or never sent).
    pub remaining: u64,
    /// Sent while precopy ran.
    pub precopy_bytes: u64,
    /// Sent with the guest stopped, at switchover.
    pub downtime_bytes: u64,
    /// Sent in postcopy, on request or in the background.
    pub postcopy_bytes: u64,
    /// Pages the guest dirties per second, as last measured.
    pub dirty_pages_rate: u64,
    /// Times the dirty bitmap was synced: 1 during the first pass, 2 once
    /// every page has been sent once.
    pub dirty_sync_count: u64,
    /// Pages the destination asked for because something touched them.
    pub postcopy_requests: u64,
    /// Throughput in megabits (10^6 bits) per second.
    pub mbps: f64,
    /// Target page size.
    pub page_size: u64,
}

impl RamStats {
    /// Share of guest RAM no longer waiting to be sent, 0.0–1.0.
    pub fn fraction_sent(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.total.saturating_sub(self.remaining) as f64 / self.total as f64
    }

    /// [`dirty_pages_rate`](Self::dirty_pages_rate) in bytes per second.
    pub fn dirty_bytes_per_second(&self) -> u64 {
        self.dirty_pages_rate.saturating_mul(self.page_size)
    }

    /// [`mbps`](Self::mbps) in bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        self.mbps * 1e6 / 8.0
    }
}
