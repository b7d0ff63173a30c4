//! `Daemon`: the state every thread shares — the RAM regions, the device,
//! the frontends connected now, the event bus, and the two daemon-wide
//! procedures every thread takes part in: quitting, and pausing for an
//! exec upgrade ([`Quiesce`]). Connection state (what a frontend
//! negotiated, its memory table, its vrings) is kept apart, in
//! `vhost::FrontendConnection`, so frontends can come, go and overlap while
//! RAM and device carry on.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use gmem_attributes::guest_memfd::GuestMemfdSupport;
use gmem_protocol::{EventKind, FrontendInfo};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::BlkDevice;
use crate::events::EventBus;
use crate::memory::RegionSet;
use crate::migration::{MigrationStats, PostcopySession, Userfault};
use crate::peers::PeerPolicy;
use crate::pins::{Pins, PinsError};
use crate::record::ConnectionRecord;
use crate::state_file::StateFile;

/// Daemon-wide switches.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The vhost-user socket frontends connect to.
    pub vhost_socket: PathBuf,
    /// Accept memory tables with memory gmemd does not own.
    pub allow_foreign_memory: bool,
    /// Who may connect to the vhost-user socket.
    pub frontend_policy: PeerPolicy,
    /// Frontend connections served at once; more are refused at accept.
    pub max_frontends: usize,
    /// How long a frontend's postcopy registration outlives the frontend
    /// before gmemd drops it.
    pub postcopy_orphan_timeout: Duration,
    /// How long a vring start waits for another connection to let go of
    /// the queue.
    pub queue_claim_patience: Duration,
    /// How long a queue worker polls for new requests and completions
    /// before it sleeps (`--poll-us`).
    pub ring_poll: Duration,
    /// Test-only: keep dirty logging from marking anything, so a test can
    /// prove its verification catches a precopy that loses device writes.
    pub skip_dirty_log_marks: bool,
}

/// What `query-status` shows of one connected frontend; updated by its
/// connection thread.
#[derive(Debug)]
pub struct FrontendStatus {
    id: u64,
    pid: Option<i32>,
    /// Ids of the own regions its memory table maps.
    mapped: Mutex<Vec<String>>,
    /// Queues it has started.
    pub started_queues: AtomicU32,
    /// A handle to shut the connection down on quit.
    socket: UnixStream,
}

impl FrontendStatus {
    /// The status of connection `id` from `pid` over `socket`.
    pub fn new(id: u64, pid: Option<i32>, socket: UnixStream) -> Self {
        FrontendStatus { id, pid, mapped: Mutex::default(), started_queues: AtomicU32::new(0), socket }
    }

    /// The connection id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The peer's pid from SO_PEERCRED.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Records which own regions the memory table maps now.
    pub fn set_mapped(&self, mut region_ids: Vec<String>) {
        region_ids.sort();
        region_ids.dedup();
        *self.mapped.lock().unwrap_or_else(|p| p.into_inner()) = region_ids;
    }

    /// Whether the memory table maps region `id`.
    pub fn maps(&self, id: &str) -> bool {
        self.mapped.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|r| r == id)
    }

    fn info(&self) -> FrontendInfo {
        FrontendInfo {
            id: self.id,
            pid: self.pid,
            mapped_regions: u32::try_from(self.mapped.lock().unwrap_or_else(|p| p.into_inner()).len())
                .unwrap_or(u32::MAX),
            started_queues: self.started_queues.load(Ordering::Relaxed),
        }
    }
}

/// A postcopy registration whose frontend disconnected: guest RAM still
/// has pages nobody will place. It is kept until [`Daemon::abort_postcopy`]
/// or its deadline, then dropped, which wakes any worker waiting on it.
#[derive(Debug)]
struct OrphanedPostcopy {
    session: PostcopySession,
    frontend: u64,
    deadline: Instant,
}

/// Pausing every thread that talks to a peer between two messages, for an
/// exec upgrade: connection threads deposit their [`ConnectionRecord`] and
/// wait; listeners stop accepting and wait. [`Quiesce::end`] lets them go
/// on (the exec failed or was refused); a successful exec never returns.
#[derive(Debug)]
pub struct Quiesce {
    state: Mutex<QuiesceState>,
    changed: Condvar,
    /// Readable while a pause is requested; threads poll it beside their socket.
    event: EventFd,
}

#[derive(Debug, Default)]
struct QuiesceState {
    pausing: bool,
    generation: u64,
    /// Each paused connection's record, or why it cannot be recorded.
    parked: BTreeMap<u64, Result<ConnectionRecord, String>>,
    listeners: u32,
}

/// Why not every thread paused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuiesceError {
    /// Connections still busy with a message when the patience ran out.
    #[error("frontend connections {ids:?} did not pause within {patience:?}")]
    Busy { ids: Vec<u64>, patience: Duration },
    /// A listener did not stop accepting in time.
    #[error("a listener did not stop accepting within {0:?}")]
    Listeners(Duration),
    /// A connection's state cannot be carried over.
    #[error("{0}")]
    Refused(String),
}

impl Quiesce {
    fn new() -> std::io::Result<Self> {
        Ok(Quiesce { state: Mutex::default(), changed: Condvar::new(), event: crate::sys::eventfd()? })
    }

    fn lock(&self) -> MutexGuard<'_, QuiesceState> {
        // Every critical section leaves the state whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The eventfd that is readable while a pause is requested.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Whether a pause is requested.
    pub fn pausing(&self) -> bool {
        self.lock().pausing
    }

    /// Asks every thread to pause; false if a pause is already under way.
    pub fn begin(&self) -> bool {
        let mut state = self.lock();
        if state.pausing {
            return false;
        }
        state.pausing = true;
        state.parked.clear();
        state.listeners = 0;
        let _ = self.event.write(1);
        true
    }

    /// A connection thread paused: deposits its record (or, keyed by its
    /// id, why there is none) and waits until the pause ends. Returns at
    /// once if no pause is under way.
    pub fn park_connection(&self, record: Result<ConnectionRecord, (u64, String)>) {
        let mut state = self.lock();
        if !state.pausing {
            return;
        }
        let generation = state.generation;
        match record {
            Ok(record) => state.parked.insert(record.id, Ok(record)),
            Err((id, why)) => state.parked.insert(id, Err(why)),
        };
        self.changed.notify_all();
        while state.generation == generation {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A listener stopped accepting: waits until the pause ends.
    pub fn park_listener(&self) {
        let mut state = self.lock();
        if !state.pausing {
            return;
        }
        let generation = state.generation;
        state.listeners += 1;
        self.changed.notify_all();
        while state.generation == generation {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until `listeners` listeners and every connection `connected()`
    /// names have parked, for up to `patience`; returns the records.
    pub fn wait_parked(
        &self,
        listeners: u32,
        connected: impl Fn() -> Vec<u64>,
        patience: Duration,
    ) -> Result<Vec<ConnectionRecord>, QuiesceError> {
        let deadline = Instant::now() + patience;
        let mut state = self.lock();
        loop {
            let ids = connected();
            let missing: Vec<u64> = ids.iter().copied().filter(|id| !state.parked.contains_key(id)).collect();
            if missing.is_empty() && state.listeners >= listeners {
                return ids
                    .iter()
                    .filter_map(|id| state.parked.get(id).cloned())
                    .collect::<Result<_, _>>()
                    .map_err(QuiesceError::Refused);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(if missing.is_empty() {
                    QuiesceError::Listeners(patience)
                } else {
                    QuiesceError::Busy { ids: missing, patience }
                });
            }
            // Connections that close while pausing never park: look again soon.
            let wait = left.min(Duration::from_millis(20));
            state = self.changed.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Ends the pause: every parked thread goes on.
    pub fn end(&self) {
        let mut state = self.lock();
        state.pausing = false;
        state.generation += 1;
        state.parked.clear();
        state.listeners = 0;
        let _ = self.event.read();
        self.changed.notify_all();
    }
}

/// Shared daemon state.
#[derive(Debug)]
pub struct Daemon {
    /// Guest RAM, owned for the daemon's lifetime.
    pub regions: RegionSet,
    /// The virtio-blk device.
    pub device: Arc<BlkDevice>,
    /// Switches.
    pub options: DaemonOptions,
    /// Control clients and the events they get.
    pub events: EventBus,
    /// Migration state and figures (`query-migration`).
    pub migration: Arc<MigrationStats>,
    /// Pausing for an exec upgrade.
    pub quiesce: Quiesce,
    /// The connection in postcopy, 0 for none: guest RAM is mapped once and
    /// registered by one userfaultfd, so one postcopy at a time.
    postcopy_owner: AtomicU64,
    orphaned_postcopy: Mutex<Option<OrphanedPostcopy>>,
    orphan_changed: Condvar,
    /// Why this gmemd cannot serve postcopy, found at start-up; `None` when
    /// it can.
    postcopy_unavailable: Option<String>,
    /// What the kernel offers of guest_memfd, probed when first asked: the
    /// probe creates a VM, which must not lengthen an upgrade's pause.
    guest_memfd: OnceLock<GuestMemfdSupport>,
    started: Instant,
    next_frontend: AtomicU64,
    frontends: Mutex<BTreeMap<u64, Arc<FrontendStatus>>>,
    quitting: AtomicBool,
    quit_event: EventFd,
    /// Serialises writes of the state file.
    state_file: Mutex<Option<StateFile>>,
    /// Locked regions and the pin ledger.
    pub pins: Pins,
}

impl Daemon {
    /// Shared state over already-created regions and device.
    /// `state_file` is where it records its regions and frontends for a
    /// restart after a crash, if anywhere; `pins` the ledger its locked
    /// regions are charged in.
    pub fn new(
        regions: RegionSet,
        device: BlkDevice,
        options: DaemonOptions,
        state_file: Option<StateFile>,
        pins: Pins,
    ) -> std::io::Result<Self> {
        let postcopy_unavailable = Self::probe_postcopy(&regions);
        Ok(Daemon {
            postcopy_unavailable,
            guest_memfd: OnceLock::new(),
            regions,
            device: Arc::new(device),
            options,
            events: EventBus::new()?,
            migration: Arc::default(),
            quiesce: Quiesce::new()?,
            postcopy_owner: AtomicU64::new(0),
            orphaned_postcopy: Mutex::default(),
            orphan_changed: Condvar::new(),
            started: Instant::now(),
            next_frontend: AtomicU64::new(1),
            frontends: Mutex::default(),
            quitting: AtomicBool::new(false),
            quit_event: crate::sys::eventfd()?,
            state_file: Mutex::new(state_file),
            pins,
        })
    }

    /// Writes the state file: the regions and the frontends connected now.
    pub fn record_state(&self) {
        let mut state = self.state_file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = state.as_mut() {
            if let Err(error) = state.write(self.regions.records(), &self.frontend_pids(), self.pins.snapshot()) {
                log::warn!("{error}; a gmemd restarted after a crash could not take this RAM back");
            }
        }
    }

    /// Locks the regions that ask for it and are not locked yet (at start,
    /// and when a region came back with a frontend's memory table), and
    /// records the ledger for a restart.
    pub fn establish_pins(&self) -> Result<(), PinsError> {
        let established = self.pins.establish(&self.regions);
        if self.regions.slots().all(|(_, live)| live.is_some()) {
            // Every region is back: a pin of the previous image that none
            // took back is for a region that no longer asks for it.
            self.pins.abandon_pending();
        }
        self.record_state();
        established
    }

    /// Why postcopy cannot be served, if it cannot: then PAGEFAULT is not
    /// offered, and QEMU refuses the postcopy-ram capability up front
    /// ("vhost-user backend not capable of postcopy") instead of failing
    /// the migration at ADVISE.
    pub fn postcopy_unavailable(&self) -> Option<&str> {
        self.postcopy_unavailable.as_deref()
    }

    /// Creates (and drops) a userfaultfd of the kind ADVISE would create.
    fn probe_postcopy(regions: &RegionSet) -> Option<String> {
        let error = Userfault::open(regions.hugetlb()).err()?.to_string();
        log::warn!("postcopy migration unavailable, so not offered to QEMU: {error}");
        Some(error)
    }

    /// What the kernel offers of guest_memfd.
    pub fn guest_memfd(&self) -> &GuestMemfdSupport {
        self.guest_memfd.get_or_init(gmem_attributes::guest_memfd::probe)
    }

    /// Milliseconds since start.
    pub fn uptime_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A new connection id (never 0, never reused).
    pub fn next_frontend_id(&self) -> u64 {
        self.next_frontend.fetch_add(1, Ordering::Relaxed)
    }

    /// The id the next connection will get, for a new image to go on from.
    pub fn peek_next_frontend_id(&self) -> u64 {
        self.next_frontend.load(Ordering::Relaxed)
    }

    /// Goes on numbering connections from `next` (a restored image).
    pub fn continue_frontend_ids(&self, next: u64) {
        self.next_frontend.fetch_max(next, Ordering::Relaxed);
    }

    fn frontends(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<FrontendStatus>>> {
        // The map is only inserted into and removed from; a panic elsewhere
        // cannot leave it half-updated.
        self.frontends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a connected frontend and announces it; `None` when
    /// `max_frontends` are connected already.
    pub fn frontend_connected(&self, status: Arc<FrontendStatus>) -> Option<Arc<FrontendStatus>> {
        let data = serde_json::json!({ "id": status.id, "pid": status.pid });
        {
            let mut frontends = self.frontends();
            if frontends.len() >= self.options.max_frontends {
                return None;
            }
            frontends.insert(status.id, Arc::clone(&status));
        }
        self.record_state();
        self.events.emit(EventKind::FrontendConnected, data);
        Some(status)
    }

    /// Forgets a frontend and announces it.
    pub fn frontend_disconnected(&self, id: u64) {
        self.frontends().remove(&id);
        self.record_state();
        self.events.emit(EventKind::FrontendDisconnected, serde_json::json!({ "id": id }));
    }

    /// The ids of the frontends connected now.
    pub fn frontend_ids(&self) -> Vec<u64> {
        self.frontends().keys().copied().collect()
    }

    /// The frontends connected now.
    pub fn frontend_infos(&self) -> Vec<FrontendInfo> {
        self.frontends().values().map(|f| f.info()).collect()
    }

    /// The pids of the frontends connected now.
    pub fn frontend_pids(&self) -> Vec<i32> {
        self.frontends().values().filter_map(|f| f.pid).collect()
    }

    /// How many connected frontends map region `id`.
    pub fn frontends_mapping(&self, id: &str) -> u32 {
        u32::try_from(self.frontends().values().filter(|f| f.maps(id)).count()).unwrap_or(u32::MAX)
    }

    /// Makes connection `id` the one in postcopy. Refused while another
    /// connection is, or while an orphaned registration is kept.
    pub fn claim_postcopy(&self, id: u64) -> Result<(), String> {
        if let Some(orphan) = self.orphan().as_ref() {
            let left = orphan.deadline.saturating_duration_since(Instant::now());
            return Err(format!(
                "guest RAM is still registered for the postcopy of frontend {}, which disconnected; it is dropped in \
                 {}s, or now with `gmemctl postcopy-abort`",
                orphan.frontend,
                left.as_secs()
            ));
        }
        match self.postcopy_owner.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(()),
            Err(owner) if owner == id => Ok(()),
            Err(owner) => Err(format!("frontend {owner} is in postcopy on the same guest RAM")),
        }
    }

    /// Ends connection `id`'s claim on postcopy.
    pub fn release_postcopy(&self, id: u64) {
        let _ = self.postcopy_owner.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The connection in postcopy, if any.
    pub fn postcopy_owner(&self) -> Option<u64> {
        Some(self.postcopy_owner.load(Ordering::Acquire)).filter(|id| *id != 0)
    }

    fn orphan(&self) -> MutexGuard<'_, Option<OrphanedPostcopy>> {
        self.orphaned_postcopy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frontend `frontend` disconnected with guest RAM registered: keeps
    /// the registration for `postcopy_orphan_timeout` (a request faulting
    /// on a missing page meanwhile fails at once instead of waiting), then
    /// drops it.
    pub fn orphan_postcopy(self: &Arc<Self>, frontend: u64, session: PostcopySession) {
        let timeout = self.options.postcopy_orphan_timeout;
        if self.quitting() || timeout.is_zero() {
            self.drop_postcopy(session, frontend, "gmemd is quitting or keeps no orphaned registration");
            return;
        }
        self.migration.set_orphaned(true);
        *self.orphan() = Some(OrphanedPostcopy { session, frontend, deadline: Instant::now() + timeout });
        log::error!(
            "frontend {frontend} disconnected during postcopy: guest RAM is incomplete; its registration is dropped \
             in {}s (or now: gmemctl postcopy-abort)",
            timeout.as_secs()
        );
        let daemon = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("postcopy-orphan".into()).spawn(move || {
            let mut orphan = daemon.orphan();
            while let Some(deadline) = orphan.as_ref().map(|o| o.deadline) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    drop(orphan);
                    daemon.abort_postcopy("its timeout ran out");
                    return;
                }
                orphan = daemon.orphan_changed.wait_timeout(orphan, left).unwrap_or_else(|p| p.into_inner()).0;
            }
        });
        if let Err(error) = spawned {
            log::error!("cannot start the orphaned-postcopy timer ({error}); dropping the registration now");
            self.abort_postcopy("no timer could be started");
        }
    }

    /// Drops an orphaned postcopy registration; false when there was none.
    pub fn abort_postcopy(&self, why: &str) -> bool {
        let Some(orphan) = self.orphan().take() else { return false };
        self.orphan_changed.notify_all();
        self.drop_postcopy(orphan.session, orphan.frontend, why);
        true
    }

    fn drop_postcopy(&self, mut session: PostcopySession, frontend: u64, why: &str) {
        // Unregistering wakes every worker waiting on a missing page; each
        // sees it was stopped and fails its request without touching the
        // disk, so no page of zeros is ever written out.
        if let Err(error) = session.abort() {
            log::error!("dropping frontend {frontend}'s postcopy registration: {error}");
        }
        self.migration.set_orphaned(false);
        self.release_postcopy(frontend);
        log::warn!("frontend {frontend}'s postcopy registration dropped: {why}; guest RAM it left incomplete stays so");
    }

    /// Asks every thread to wind down: listeners stop accepting, frontend
    /// connections are shut, workers stop (an orphaned postcopy
    /// registration is dropped first, so no worker waits on it).
    pub fn quit(&self) {
        if self.quitting.swap(true, Ordering::AcqRel) {
            return;
        }
        self.abort_postcopy("gmemd is quitting");
        self.events.emit(EventKind::Shutdown, serde_json::Value::Null);
        let _ = self.quit_event.write(1);
        for frontend in self.frontends().values() {
            let _ = frontend.socket.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether `quit` was called.
    pub fn quitting(&self) -> bool {
        self.quitting.load(Ordering::Acquire)
    }

    /// Readable once `quit` was called: listeners poll it beside their socket.
    pub fn quit_event(&self) -> &EventFd {
        &self.quit_event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> ConnectionRecord {
        ConnectionRecord {
            id,
            pid: None,
            socket: -1,
            negotiated: Default::default(),
            table: Vec::new(),
            vrings: Vec::new(),
            inflight: None,
            dirty_log: None,
        }
    }

    #[test]
    fn a_pause_collects_every_record_and_lets_the_threads_go_on() {
        let quiesce = Arc::new(Quiesce::new().expect("quiesce"));
        assert!(quiesce.begin());
        assert!(!quiesce.begin(), "one pause at a time");
        let threads: Vec<_> = (1..=3)
            .map(|id| {
                let quiesce = Arc::clone(&quiesce);
                std::thread::spawn(move || quiesce.park_connection(Ok(record(id))))
            })
            .collect();
        let listener = {
            let quiesce = Arc::clone(&quiesce);
            std::thread::spawn(move || quiesce.park_listener())
        };
        let records = quiesce.wait_parked(1, || vec![1, 2, 3], Duration::from_secs(5)).expect("all parked");
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3]);
        let busy = quiesce.wait_parked(1, || vec![1, 2, 3, 4], Duration::from_millis(50)).expect_err("4 never parks");
        assert!(matches!(busy, QuiesceError::Busy { ref ids, .. } if ids == &[4]), "{busy}");
        let refusing = {
            let quiesce = Arc::clone(&quiesce);
            std::thread::spawn(move || quiesce.park_connection(Err((4, "in postcopy".into()))))
        };
        let refused = quiesce.wait_parked(1, || vec![1, 2, 3, 4], Duration::from_secs(5)).expect_err("4 refuses");
        assert_eq!(refused, QuiesceError::Refused("in postcopy".into()));
        quiesce.end();
        for thread in threads.into_iter().chain([refusing, listener]) {
            thread.join().expect("resumed");
        }
        assert!(!quiesce.pausing());
    }
}
