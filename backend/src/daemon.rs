//! `Daemon`: the state every thread shares — the RAM regions, the device,
//! the frontends connected now, and the event bus. Connection state (what a
//! frontend negotiated, its memory table, its vrings) is kept apart, in
//! `vhost::FrontendConnection`, so frontends can come, go and overlap while
//! RAM and device carry on.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use gmem_protocol::{EventKind, FrontendInfo};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::BlkDevice;
use crate::control::EventBus;
use crate::memory::RegionSet;
use crate::migration::{MigrationStats, Userfault};

/// Daemon-wide switches.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The vhost-user socket frontends connect to.
    pub vhost_socket: PathBuf,
    /// Accept memory tables with memory gmemd does not own.
    pub allow_foreign_memory: bool,
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

/// Shared daemon state.
#[derive(Debug)]
pub struct Daemon {
    /// Guest RAM, owned for the daemon's lifetime.
    pub regions: RegionSet,
    /// The virtio-blk device.
    pub device: Arc<BlkDevice>,
    /// Switches.
    pub options: DaemonOptions,
    /// Control-socket event subscribers.
    pub events: EventBus,
    /// Migration state and figures (`query-migration`).
    pub migration: Arc<MigrationStats>,
    /// The connection in postcopy, 0 for none: guest RAM is mapped once and
    /// registered by one userfaultfd, so one postcopy at a time.
    postcopy_owner: AtomicU64,
    /// Why this gmemd cannot serve postcopy, found at start-up; `None` when
    /// it can.
    postcopy_unavailable: Option<String>,
    started: Instant,
    next_frontend: AtomicU64,
    frontends: Mutex<BTreeMap<u64, Arc<FrontendStatus>>>,
    quitting: AtomicBool,
    quit_event: EventFd,
}

impl Daemon {
    /// Shared state over already-created regions and device.
    pub fn new(regions: RegionSet, device: BlkDevice, options: DaemonOptions) -> std::io::Result<Self> {
        let postcopy_unavailable = Self::probe_postcopy(&regions);
        Ok(Daemon {
            postcopy_unavailable,
            regions,
            device: Arc::new(device),
            options,
            events: EventBus::new()?,
            migration: Arc::default(),
            postcopy_owner: AtomicU64::new(0),
            started: Instant::now(),
            next_frontend: AtomicU64::new(1),
            frontends: Mutex::default(),
            quitting: AtomicBool::new(false),
            quit_event: EventFd::new(EFD_NONBLOCK)?,
        })
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

    /// Milliseconds since start.
    pub fn uptime_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A new connection id (never 0, never reused).
    pub fn next_frontend_id(&self) -> u64 {
        self.next_frontend.fetch_add(1, Ordering::Relaxed)
    }

    fn frontends(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<FrontendStatus>>> {
        // The map is only inserted into and removed from; a panic elsewhere
        // cannot leave it half-updated.
        self.frontends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a connected frontend and announces it.
    pub fn frontend_connected(&self, status: Arc<FrontendStatus>) {
        let data = serde_json::json!({ "id": status.id, "pid": status.pid });
        self.frontends().insert(status.id, status);
        self.events.emit(EventKind::FrontendConnected, data);
    }

    /// Forgets a frontend and announces it.
    pub fn frontend_disconnected(&self, id: u64) {
        self.frontends().remove(&id);
        self.events.emit(EventKind::FrontendDisconnected, serde_json::json!({ "id": id }));
    }

    /// The frontends connected now.
    pub fn frontend_infos(&self) -> Vec<FrontendInfo> {
        self.frontends().values().map(|f| f.info()).collect()
    }

    /// How many connected frontends map region `id`.
    pub fn frontends_mapping(&self, id: &str) -> u32 {
        u32::try_from(self.frontends().values().filter(|f| f.maps(id)).count()).unwrap_or(u32::MAX)
    }

    /// Makes connection `id` the one in postcopy; `Err(owner)` if another is.
    pub fn claim_postcopy(&self, id: u64) -> Result<(), u64> {
        match self.postcopy_owner.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(()),
            Err(owner) if owner == id => Ok(()),
            Err(owner) => Err(owner),
        }
    }

    /// Ends connection `id`'s claim on postcopy.
    pub fn release_postcopy(&self, id: u64) {
        let _ = self.postcopy_owner.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Asks every thread to wind down: listeners stop accepting, frontend
    /// connections are shut, workers stop.
    pub fn quit(&self) {
        if self.quitting.swap(true, Ordering::AcqRel) {
            return;
        }
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
