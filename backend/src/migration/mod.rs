//! gmemd's side of live migration.
//!
//! - Precopy, source side: QEMU shares a dirty log and turns logging on;
//!   every page the device writes is marked in it ([`DirtyLog`]).
//! - Postcopy, destination side: gmemd owns the RAM the guest runs on before
//!   all of it has arrived. It registers its mapping with a userfaultfd that
//!   QEMU services ([`PostcopySession`]); a device worker that touches a
//!   missing page blocks until QEMU has placed it.
//!
//! [`MigrationStats`] is what `query-migration` reports. See
//! docs/migration.md for the flows and the hazards they avoid.

mod dirty_log;
mod latency;
mod postcopy;
mod stats;
mod userfault;

use std::sync::Arc;

pub use dirty_log::{DirtyLog, LogError, LOG_PAGE};
pub use latency::LatencyHistogram;
pub use postcopy::{fault_in, HostRange, MissingPage, PostcopyError, PostcopyPhase, PostcopySession};
pub use stats::MigrationStats;
pub use userfault::{Userfault, UserfaultError};

/// What the data path consults on every access to guest RAM: the
/// connection's dirty log and the daemon's migration figures.
#[derive(Debug, Clone)]
pub struct Tracking {
    /// The frontend's dirty log (precopy).
    pub log: Arc<DirtyLog>,
    /// Daemon-wide migration state (postcopy faults, bytes written).
    pub stats: Arc<MigrationStats>,
}

impl Tracking {
    /// Tracking for one connection: a fresh dirty log over the daemon's
    /// `stats`. `skip_marks` is the test-only switch of [`DirtyLog::new`].
    pub fn new(stats: Arc<MigrationStats>, skip_marks: bool) -> Self {
        Tracking { log: Arc::new(DirtyLog::new(Arc::clone(&stats), skip_marks)), stats }
    }

    /// The device wrote `[gpa, gpa + len)`: mark it for precopy and count it.
    pub fn device_wrote(&self, gpa: u64, len: u64) {
        self.log.mark(gpa, len);
        self.stats.device_wrote(len);
    }

    /// The device is about to touch these host ranges of guest RAM while
    /// faults are possible (postcopy): fault in and time the pages that
    /// have not arrived.
    pub fn before_access(&self, iovecs: &[libc::iovec]) -> Result<(), MissingPage> {
        fault_in(iovecs, &self.stats)
    }
}
