//! `FrontendConnection`: what one vhost-user frontend negotiated — features,
//! memory table, vrings, inflight region, dirty log — and what each of its
//! messages does to that state. `dispatch.rs` decodes the messages and
//! replies; a failure here is a [`Refusal`]: a nack the connection
//! survives, or the end of the connection when no honest reply exists.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vm_memory::GuestMemoryAtomic;

use super::inflight::InflightRegion;
use super::vring::{Vring, VringError, WorkerContext, MAX_QUEUE_SIZE};
use crate::daemon::{Daemon, FrontendStatus};
use crate::memory::{GuestRam, MemRegionDesc, MemoryTable, TableError, MAX_MEM_SLOTS};
use crate::migration::{PostcopySession, Tracking};
use crate::record::{ConnectionRecord, InflightRecord, Negotiated, RingAddrs, TableEntryRecord};

mod migration;

/// Why a message was not carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Nacked (when the frontend asked for an ack); the connection goes on.
    Nack(String),
    /// No reply could be honest: the connection is closed.
    Close(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Nack(why) | Refusal::Close(why) => f.write_str(why),
        }
    }
}

fn nack(message: impl std::fmt::Display) -> Refusal {
    Refusal::Nack(message.to_string())
}

/// One frontend's connection state.
#[derive(Debug)]
pub struct FrontendConnection {
    daemon: Arc<Daemon>,
    status: Arc<FrontendStatus>,
    negotiated: Negotiated,
    table: MemoryTable,
    ram: GuestMemoryAtomic<GuestRam>,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightRegion>>,
    /// Dirty log (precopy source) and migration figures.
    tracking: Tracking,
    /// Postcopy on this side (destination), from ADVISE to END.
    postcopy: Option<PostcopySession>,
}

impl FrontendConnection {
    /// State for a new connection described by `status`.
    pub fn new(daemon: Arc<Daemon>, status: Arc<FrontendStatus>) -> Self {
        let queues = daemon.device.config().num_queues;
        let tracking = Tracking::new(Arc::clone(&daemon.migration), daemon.options.skip_dirty_log_marks);
        FrontendConnection {
            vrings: (0..queues).map(Vring::new).collect(),
            tracking,
            postcopy: None,
            daemon,
            status,
            negotiated: Negotiated::default(),
            table: MemoryTable::default(),
            ram: GuestMemoryAtomic::new(GuestRam::default()),
            inflight: None,
        }
    }

    /// The connection id.
    pub fn id(&self) -> u64 {
        self.status.id()
    }

    /// Whether REPLY_ACK was negotiated.
    pub fn reply_ack(&self) -> bool {
        self.negotiated.protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// The acked virtio features.
    pub fn features(&self) -> u64 {
        self.negotiated.features
    }

    /// Whether `feature` was negotiated.
    pub fn has_protocol_feature(&self, feature: VhostUserProtocolFeatures) -> bool {
        self.negotiated.protocol_features & feature.bits() != 0
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring, Refusal> {
        self.vrings.get_mut(index as usize).ok_or_else(|| nack(format!("no vring {index}")))
    }

    /// Publishes the table to the workers and the status.
    fn publish_table(&mut self) {
        self.status.set_mapped(self.table.views().iter().filter_map(|v| v.owner().map(str::to_string)).collect());
        if self.daemon.pins.has_pending() {
            // A table can bring back a region a crashed gmemd had locked.
            if let Err(error) = self.daemon.establish_pins() {
                log::error!("frontend {}: {error}", self.id());
            }
        }
        // Workers load the new table on their next batch; the old one stays
        // mapped until the last batch using it is done.
        match self.ram.lock() {
            Ok(guard) => guard.replace(self.table.guest_ram()),
            Err(_) => log::error!("frontend {}: guest RAM lock poisoned", self.id()),
        }
    }

    fn table_error(&self, error: TableError) -> Refusal {
        log::error!("frontend {}: memory table refused: {error}", self.id());
        nack(error)
    }

    fn stop_all(&mut self) {
        for vring in &mut self.vrings {
            vring.stop();
        }
        self.status.started_queues.store(0, Ordering::Relaxed);
    }

    fn count_started(&self) {
        let started = self.vrings.iter().filter(|v| v.started()).count();
        self.status.started_queues.store(u32::try_from(started).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    fn event_idx(&self) -> bool {
        self.negotiated.features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0
    }

    fn worker_context(&self) -> WorkerContext {
        WorkerContext {
            device: Arc::clone(&self.daemon.device),
            ram: self.ram.clone(),
            owner: self.id(),
            tracking: self.tracking.clone(),
            inflight: self.inflight.clone(),
            claim_patience: self.daemon.options.queue_claim_patience,
            poll: self.daemon.options.ring_poll,
        }
    }

    fn start_vring(&mut self, index: u16) -> Result<(), VringError> {
        let context = self.worker_context();
        let started = self.vrings[usize::from(index)].start(context);
        self.count_started();
        started
    }

    /// SET_OWNER.
    pub fn set_owner(&mut self) {
        self.negotiated.owner = true;
    }

    /// RESET_DEVICE (and the deprecated RESET_OWNER): every ring of this
    /// connection stops and forgets its configuration, and the features
    /// are to be negotiated again. Other connections are not touched.
    pub fn reset_device(&mut self) {
        self.stop_all();
        self.vrings = (0..self.daemon.device.config().num_queues).map(Vring::new).collect();
        self.negotiated.features = 0;
        self.inflight = None;
    }

    /// GET_FEATURES.
    pub fn features_offered(&self) -> u64 {
        self.daemon.device.config().features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    /// SET_FEATURES.
    pub fn set_features(&mut self, features: u64) -> Result<(), Refusal> {
        let offered = self.features_offered();
        if features & !offered != 0 {
            return Err(nack(format!("features {:#x} were not offered", features & !offered)));
        }
        self.negotiated.features = features;
        self.set_logging(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
        let event_idx = self.event_idx();
        for vring in &mut self.vrings {
            vring.set_event_idx(event_idx);
        }
        Ok(())
    }

    /// GET_PROTOCOL_FEATURES.
    pub fn protocol_features_offered(&self) -> VhostUserProtocolFeatures {
        let mut offered = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE;
        if self.daemon.postcopy_unavailable().is_none() {
            offered |= VhostUserProtocolFeatures::PAGEFAULT;
        }
        offered
    }

    /// SET_PROTOCOL_FEATURES.
    pub fn set_protocol_features(&mut self, features: u64) -> Result<(), Refusal> {
        let unoffered = VhostUserProtocolFeatures::from_bits_retain(features) - self.protocol_features_offered();
        if !unoffered.is_empty() {
            let why =
                match (unoffered.contains(VhostUserProtocolFeatures::PAGEFAULT), self.daemon.postcopy_unavailable()) {
                    (true, Some(why)) => format!(" (postcopy: {why})"),
                    _ => String::new(),
                };
            return Err(nack(format!("protocol features {unoffered:?} were not offered{why}")));
        }
        self.negotiated.protocol_features = features;
        Ok(())
    }

    /// SET_MEM_TABLE. All or nothing: on error the old table stays. In
    /// postcopy listening mode, returns gmemd's own base of each range.
    pub fn set_mem_table(&mut self, entries: Vec<(MemRegionDesc, File)>) -> Result<Option<Vec<u64>>, Refusal> {
        let gpas: Vec<u64> = entries.iter().map(|(desc, _)| desc.gpa).collect();
        let mut table = self.table.clone();
        let allow_foreign = self.daemon.options.allow_foreign_memory;
        table.set(&self.daemon.regions, entries, allow_foreign).map_err(|e| self.table_error(e))?;
        self.table = table;
        self.publish_table();
        if self.postcopy_listening() {
            return gpas.into_iter().map(|gpa| self.backend_base(gpa)).collect::<Result<_, _>>().map(Some);
        }
        Ok(None)
    }

    /// ADD_MEM_REG; in postcopy listening mode, returns gmemd's own base.
    pub fn add_mem_region(&mut self, desc: MemRegionDesc, file: File) -> Result<Option<u64>, Refusal> {
        let allow_foreign = self.daemon.options.allow_foreign_memory;
        let result = self.table.add(&self.daemon.regions, desc, file, allow_foreign);
        result.map_err(|e| self.table_error(e))?;
        self.publish_table();
        if self.postcopy_listening() {
            return self.backend_base(desc.gpa).map(Some);
        }
        Ok(None)
    }

    /// REM_MEM_REG.
    pub fn remove_mem_region(&mut self, desc: MemRegionDesc) -> Result<(), Refusal> {
        let result = self.table.remove(&desc);
        result.map_err(|e| self.table_error(e))?;
        self.publish_table();
        Ok(())
    }

    /// GET_MAX_MEM_SLOTS.
    pub fn max_mem_slots(&self) -> u64 {
        MAX_MEM_SLOTS as u64
    }

    /// SET_VRING_NUM.
    pub fn set_vring_num(&mut self, index: u32, num: u32) -> Result<(), Refusal> {
        let size = u16::try_from(num).ok().filter(|n| n.is_power_of_two() && *n <= MAX_QUEUE_SIZE);
        let size = size
            .ok_or_else(|| nack(format!("vring {index}: size {num} is not a power of two up to {MAX_QUEUE_SIZE}")))?;
        self.vring(index)?.set_size(size);
        Ok(())
    }

    /// SET_VRING_ADDR: ring addresses come in the frontend's virtual
    /// address space and are kept as guest-physical ones.
    pub fn set_vring_addr(&mut self, index: u32, desc: u64, used: u64, avail: u64) -> Result<(), Refusal> {
        let translate = |va: u64| {
            self.table
                .frontend_to_gpa(va)
                .ok_or_else(|| nack(format!("vring {index}: address {va:#x} is not in the memory table")))
        };
        let addrs = RingAddrs { desc: translate(desc)?, avail: translate(avail)?, used: translate(used)? };
        self.vring(index)?.set_addrs(addrs);
        Ok(())
    }

    /// SET_VRING_BASE.
    pub fn set_vring_base(&mut self, index: u32, base: u32) -> Result<(), Refusal> {
        let base = u16::try_from(base).map_err(|_| nack(format!("vring {index}: base {base} out of range")))?;
        self.vring(index)?.set_base(base);
        Ok(())
    }

    /// GET_VRING_BASE: stops the ring, between two requests, and returns
    /// where it stopped.
    pub fn get_vring_base(&mut self, index: u32) -> Result<u32, Refusal> {
        let vring = self.vrings.get_mut(index as usize).ok_or_else(|| Refusal::Close(format!("no vring {index}")))?;
        let base = vring.stop();
        self.count_started();
        Ok(u32::from(base))
    }

    /// SET_VRING_KICK: (re)starts the ring with this kick fd.
    pub fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<(), Refusal> {
        self.device_may_start(index)?;
        let id = self.id();
        let vring = self.vring(u32::from(index))?;
        vring.stop();
        // No fd means the frontend wants the ring polled, which gmemd does not do.
        let kick = fd.ok_or_else(|| nack(format!("vring {index}: polling without a kick fd is not supported")))?;
        let kick = crate::sys::checked_eventfd(kick).map_err(|e| nack(format!("vring {index}: the kick fd is {e}")))?;
        vring.set_kick(Some(kick));
        self.start_vring(u16::from(index)).map_err(|e| {
            log::error!("frontend {id}: {e}");
            nack(e)
        })
    }

    /// SET_VRING_CALL.
    pub fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<(), Refusal> {
        let call = fd.map(crate::sys::checked_eventfd).transpose();
        let call = call.map_err(|e| nack(format!("vring {index}: the call fd is {e}")))?;
        self.vring(u32::from(index))?.set_call(call);
        Ok(())
    }

    /// SET_VRING_ERR.
    pub fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<(), Refusal> {
        let err = fd.map(crate::sys::checked_eventfd).transpose();
        let err = err.map_err(|e| nack(format!("vring {index}: the error fd is {e}")))?;
        self.vring(u32::from(index))?.set_err(err);
        Ok(())
    }

    /// GET_QUEUE_NUM.
    pub fn queue_num(&self) -> u64 {
        u64::from(self.daemon.device.config().num_queues)
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<(), Refusal> {
        self.vring(index)?.set_enabled(enable);
        Ok(())
    }

    /// GET_CONFIG: `None` when the window is outside the config space.
    pub fn get_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        self.daemon.device.read_config(offset, size)
    }

    /// SET_CONFIG: the driver toggling the write cache (WCE); any other
    /// write is refused.
    pub fn set_config(&self, offset: u32, bytes: &[u8]) -> Result<(), Refusal> {
        self.daemon.device.write_config(offset, bytes).map_err(nack)
    }

    /// GET_INFLIGHT_FD: a new, empty inflight region for `num_queues` of
    /// `queue_size`, which the frontend keeps and sends back after a
    /// restart; returns its description and an fd for the frontend.
    pub fn get_inflight_fd(&mut self, num_queues: u16, queue_size: u16) -> Result<(VhostUserInflight, File), String> {
        let region = InflightRegion::create(num_queues, queue_size).map_err(|e| e.to_string())?;
        let (fd, mmap_size, mmap_offset, num_queues, queue_size) = region.describe();
        // SAFETY: `fd` is the region's own open fd, borrowed for the dup.
        let for_frontend =
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().map_err(|e| e.to_string())?;
        self.inflight = Some(Arc::new(region));
        Ok((VhostUserInflight::new(mmap_size, mmap_offset, num_queues, queue_size), File::from(for_frontend)))
    }

    /// SET_INFLIGHT_FD.
    pub fn set_inflight_fd(&mut self, message: &VhostUserInflight, file: File) -> Result<(), Refusal> {
        let region =
            InflightRegion::map(file, message.mmap_size, message.mmap_offset, message.num_queues, message.queue_size)
                .map_err(|e| nack(format!("inflight region refused: {e}")))?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    /// Stops every ring, between two requests, and describes the
    /// connection: to carry it into a new gmemd image (its fds stay open
    /// here until then), or to go on with [`resume`](Self::resume).
    pub fn suspend(&mut self, socket: std::os::fd::RawFd) -> Result<ConnectionRecord, String> {
        if let Some(session) = &self.postcopy {
            return Err(format!(
                "frontend {} is in postcopy ({:?}): userfaultfd registrations do not survive an exec",
                self.id(),
                session.phase()
            ));
        }
        let started: Vec<bool> = self.vrings.iter().map(Vring::started).collect();
        self.stop_all();
        let table = self
            .table
            .views()
            .iter()
            .map(|v| match (v.owner(), v.foreign_fd()) {
                (Some(region), _) => TableEntryRecord::Own { desc: *v.desc(), region: region.to_string() },
                (None, fd) => TableEntryRecord::Foreign { desc: *v.desc(), fd: fd.unwrap_or(-1) },
            })
            .collect();
        let inflight = self.inflight.as_ref().map(|region| {
            let (fd, mmap_size, mmap_offset, num_queues, queue_size) = region.describe();
            InflightRecord { fd, mmap_size, mmap_offset, num_queues, queue_size }
        });
        let dirty_log =
            self.tracking.log.mapped().map(|(fd, size, offset)| crate::record::DirtyLogRecord { fd, size, offset });
        Ok(ConnectionRecord {
            id: self.id(),
            pid: self.status.pid(),
            socket,
            negotiated: self.negotiated,
            table,
            vrings: self.vrings.iter().zip(started).map(|(v, started)| v.record(started)).collect(),
            inflight,
            dirty_log,
        })
    }

    /// Restarts the rings [`suspend`](Self::suspend) stopped.
    pub fn resume(&mut self, record: &ConnectionRecord) {
        for vring in record.vrings.iter().filter(|v| v.started) {
            if let Err(error) = self.start_vring(vring.index) {
                log::error!("frontend {}: vring {} not restarted: {error}", self.id(), vring.index);
            }
        }
    }

    /// A connection as a previous gmemd image recorded it, with its rings
    /// not yet started ([`resume`](Self::resume) starts them).
    ///
    /// # Safety
    ///
    /// Every fd the record names, but its socket, must be open, owned by
    /// nothing else, and of the kind the record says (the previous image
    /// made sure of that when it took them from the frontend).
    pub unsafe fn from_record(
        daemon: Arc<Daemon>,
        status: Arc<FrontendStatus>,
        record: &ConnectionRecord,
    ) -> Result<Self, String> {
        let mut connection = FrontendConnection::new(daemon, status);
        connection.negotiated = record.negotiated;
        for entry in &record.table {
            let added = match entry {
                TableEntryRecord::Own { desc, region } => {
                    let region = connection.daemon.regions.get(region).ok_or_else(|| format!("no region {region}"))?;
                    connection.table.add_own(region, *desc)
                }
                TableEntryRecord::Foreign { desc, fd } => {
                    // SAFETY: the caller hands over sole ownership of the fd.
                    let file = unsafe { File::from_raw_fd(*fd) };
                    connection.table.add(&connection.daemon.regions, *desc, file, true)
                }
            };
            added.map_err(|e| e.to_string())?;
        }
        connection.publish_table();
        if let Some(inflight) = record.inflight {
            // SAFETY: as above.
            let file = unsafe { File::from_raw_fd(inflight.fd) };
            let region = InflightRegion::map(
                file,
                inflight.mmap_size,
                inflight.mmap_offset,
                inflight.num_queues,
                inflight.queue_size,
            );
            connection.inflight = Some(Arc::new(region.map_err(|e| e.to_string())?));
        }
        if let Some(log) = record.dirty_log {
            // SAFETY: as above.
            let file = unsafe { File::from_raw_fd(log.fd) };
            connection.tracking.log.set_base(file, log.size, log.offset).map_err(|e| e.to_string())?;
        }
        connection.set_logging(record.negotiated.features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
        let event_idx = connection.event_idx();
        connection.vrings = record
            .vrings
            .iter()
            // SAFETY: as above.
            .map(|v| unsafe { Vring::from_record(v, event_idx) })
            .collect();
        if connection.vrings.len() != usize::from(connection.daemon.device.config().num_queues) {
            return Err(format!("{} vrings recorded for a device of {}", record.vrings.len(), connection.vrings.len()));
        }
        Ok(connection)
    }

    /// The fd of the socket a handed-over connection keeps: checked to be a
    /// unix stream socket.
    pub fn check_socket(fd: std::os::fd::RawFd) -> Result<std::os::unix::net::UnixStream, String> {
        // SAFETY: the record's socket fd was the connection's, kept open
        // across the exec; ownership moves to the stream.
        let socket = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        socket.peer_addr().map_err(|e| format!("fd {} is not a connected unix socket: {e}", socket.as_raw_fd()))?;
        Ok(socket)
    }
}

impl Drop for FrontendConnection {
    fn drop(&mut self) {
        self.end_migration_on_disconnect();
        self.stop_all();
    }
}
