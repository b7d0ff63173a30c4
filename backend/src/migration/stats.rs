//! `MigrationStats`: the daemon-wide migration state and figures that
//! `query-migration` reports. Everything is atomic: device workers update it
//! from the data path, possibly while blocked on a postcopy fault, and the
//! control socket reads it without waiting for them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::SystemTime;

use gmem_protocol::{DeviceIoWindow, DirtyLogInfo, MigrationInfo, MigrationState, PostcopyInfo};

use super::latency::LatencyHistogram;

/// Shared migration state and figures.
#[derive(Debug, Default)]
pub struct MigrationStats {
    state: AtomicU8,
    device_bytes_written: AtomicU64,
    log_active: AtomicBool,
    log_bytes: AtomicU64,
    pages_marked: AtomicU64,
    /// Guest RAM registered for missing-page faults now; while it is not 0
    /// the data path probes for missing pages.
    registered_bytes: AtomicU64,
    /// The registration's frontend disconnected: no missing page will arrive.
    orphaned: AtomicBool,
    fault_latency: LatencyHistogram,
    first_completion_us: AtomicU64,
    last_completion_us: AtomicU64,
}

const STATES: [MigrationState; 7] = [
    MigrationState::None,
    MigrationState::DirtyLogging,
    MigrationState::PostcopyAdvised,
    MigrationState::PostcopyListening,
    MigrationState::PostcopyRunning,
    MigrationState::PostcopyEnded,
    MigrationState::PostcopyAborted,
];

impl MigrationStats {
    /// The current state.
    pub fn state(&self) -> MigrationState {
        STATES.get(usize::from(self.state.load(Ordering::Acquire))).copied().unwrap_or(MigrationState::None)
    }

    /// Moves to `state`. Entering dirty logging or POSTCOPY_ADVISE starts a
    /// new migration: its figures start from zero.
    pub fn set_state(&self, state: MigrationState) {
        let index = STATES.iter().position(|s| *s == state).unwrap_or(0);
        let previous = self.state.swap(index as u8, Ordering::AcqRel);
        let starting = matches!(state, MigrationState::DirtyLogging | MigrationState::PostcopyAdvised);
        if starting && usize::from(previous) != index {
            self.device_bytes_written.store(0, Ordering::Relaxed);
            self.pages_marked.store(0, Ordering::Relaxed);
            self.fault_latency.reset();
        }
    }

    /// The device wrote `bytes` into guest RAM.
    pub fn device_wrote(&self, bytes: u64) {
        // Bytes count as written "during the migration" from its start to its end.
        if !matches!(
            self.state(),
            MigrationState::None | MigrationState::PostcopyEnded | MigrationState::PostcopyAborted
        ) {
            self.device_bytes_written.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// A dirty log of `bytes` is mapped (0: none) and logging is `active`.
    pub fn set_log(&self, active: bool, bytes: u64) {
        self.log_active.store(active, Ordering::Release);
        self.log_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The device marked `pages` pages in the dirty log.
    pub fn pages_marked(&self, pages: u64) {
        self.pages_marked.fetch_add(pages, Ordering::Relaxed);
    }

    /// Guest RAM is registered with userfaultfd (`bytes`), or no longer (0).
    pub fn set_registered(&self, bytes: u64) {
        self.registered_bytes.store(bytes, Ordering::Release);
    }

    /// Whether the device may meet missing pages now.
    pub fn faults_possible(&self) -> bool {
        self.registered_bytes.load(Ordering::Acquire) > 0
    }

    /// The registration's frontend is gone (true) or the registration was
    /// dropped (false).
    pub fn set_orphaned(&self, orphaned: bool) {
        self.orphaned.store(orphaned, Ordering::Release);
    }

    /// Whether missing pages can no longer arrive.
    pub fn orphaned(&self) -> bool {
        self.orphaned.load(Ordering::Acquire)
    }

    /// The device waited `ns` for a missing page.
    pub fn fault_resolved(&self, ns: u64) {
        self.fault_latency.record(ns);
    }

    /// The device completed a request now.
    pub fn request_completed(&self) {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let _ = self.first_completion_us.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.last_completion_us.store(now, Ordering::Relaxed);
    }

    /// The `query-migration` answer.
    pub fn info(&self) -> MigrationInfo {
        let fault_latency = self.fault_latency.summary();
        MigrationInfo {
            state: self.state(),
            device_bytes_written: self.device_bytes_written.load(Ordering::Relaxed),
            dirty_log: DirtyLogInfo {
                active: self.log_active.load(Ordering::Acquire),
                log_bytes: self.log_bytes.load(Ordering::Relaxed),
                pages_marked: self.pages_marked.load(Ordering::Relaxed),
            },
            postcopy: PostcopyInfo {
                registered_bytes: self.registered_bytes.load(Ordering::Relaxed),
                device_faults: fault_latency.count,
                fault_latency,
                unavailable: None,
            },
            device_io: DeviceIoWindow {
                first_completion_us: self.first_completion_us.load(Ordering::Relaxed),
                last_completion_us: self.last_completion_us.load(Ordering::Relaxed),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_migration_starts_its_figures_from_zero() {
        let stats = MigrationStats::default();
        stats.device_wrote(100);
        assert_eq!(stats.info().device_bytes_written, 0, "not counted outside a migration");
        stats.set_state(MigrationState::DirtyLogging);
        stats.device_wrote(100);
        stats.pages_marked(3);
        stats.set_state(MigrationState::None);
        stats.device_wrote(100);
        let info = stats.info();
        assert_eq!(
            (info.state, info.device_bytes_written, info.dirty_log.pages_marked),
            (MigrationState::None, 100, 3)
        );
        stats.set_state(MigrationState::PostcopyAdvised);
        stats.fault_resolved(12_000);
        stats.set_state(MigrationState::PostcopyListening);
        let info = stats.info();
        assert_eq!((info.device_bytes_written, info.dirty_log.pages_marked, info.postcopy.device_faults), (0, 0, 1));
        assert_eq!(info.postcopy.fault_latency.p50_us, 12);
    }
}
