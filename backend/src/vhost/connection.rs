//! `FrontendConnection`: what one vhost-user frontend negotiated — features,
//! memory table, vrings — and the handler for its messages.
//!
//! Errors from the handler come in two kinds, because the vhost crate replies
//! differently: for messages that are acked, an error is sent back as a nack
//! and the connection carries on (`ReqHandlerError`); for messages that expect
//! a value, no reply can be sent, so the error ends the connection
//! (`InvalidOperation`/`InvalidParam`) rather than leave the frontend waiting.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::*;
use vhost::vhost_user::{
    Backend, Error as VhostError, GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::EventFd;

use super::vring::{RingAddrs, Vring, WorkerContext, MAX_QUEUE_SIZE};
use crate::daemon::{Daemon, FrontendStatus};
use crate::memory::{GuestRam, MemRegionDesc, MemoryTable, TableError, MAX_MEM_SLOTS};
use crate::migration::{PostcopySession, Tracking};

mod migration;

/// A failure reported to the frontend as a nack; the connection goes on.
fn nack(message: impl std::fmt::Display) -> VhostError {
    VhostError::ReqHandlerError(io::Error::other(message.to_string()))
}

/// One frontend's connection state.
#[derive(Debug)]
pub struct FrontendConnection {
    daemon: Arc<Daemon>,
    status: Arc<FrontendStatus>,
    acked_features: u64,
    table: MemoryTable,
    ram: GuestMemoryAtomic<GuestRam>,
    vrings: Vec<Vring>,
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
            acked_features: 0,
            table: MemoryTable::default(),
            ram: GuestMemoryAtomic::new(GuestRam::default()),
        }
    }

    fn id(&self) -> u64 {
        self.status.id()
    }

    fn vring(&mut self, index: u32) -> VhostResult<&mut Vring> {
        self.vrings.get_mut(index as usize).ok_or(VhostError::InvalidParam)
    }

    /// Publishes the table to the workers and the status.
    fn publish_table(&mut self) {
        self.status.set_mapped(self.table.views().iter().filter_map(|v| v.owner().map(str::to_string)).collect());
        // Workers load the new table on their next batch; the old one stays
        // mapped until the last batch using it is done.
        match self.ram.lock() {
            Ok(guard) => guard.replace(self.table.guest_ram()),
            Err(_) => log::error!("frontend {}: guest RAM lock poisoned", self.id()),
        }
    }

    fn table_error(&self, error: TableError) -> VhostError {
        log::error!("frontend {}: memory table refused: {error}", self.id());
        nack(error)
    }

    fn stop_all(&mut self) {
        for vring in &mut self.vrings {
            vring.stop(&self.daemon.device, self.status.id());
        }
        self.status.started_queues.store(0, Ordering::Relaxed);
    }

    fn count_started(&self) {
        let started = self.vrings.iter().filter(|v| v.started()).count();
        self.status.started_queues.store(u32::try_from(started).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    fn event_idx(&self) -> bool {
        self.acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0
    }
}

impl Drop for FrontendConnection {
    fn drop(&mut self) {
        self.end_migration_on_disconnect();
        self.stop_all();
    }
}

impl VhostUserBackendReqHandlerMut for FrontendConnection {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.reset_device()
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.stop_all();
        self.vrings = (0..self.daemon.device.config().num_queues).map(Vring::new).collect();
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.daemon.device.config().features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = self.get_features()?;
        if features & !offered != 0 {
            return Err(nack(format!("features {:#x} were not offered", features & !offered)));
        }
        self.acked_features = features;
        self.set_logging(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
        let event_idx = self.event_idx();
        for vring in &mut self.vrings {
            vring.set_event_idx(event_idx);
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        let mut offered = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE;
        if self.daemon.postcopy_unavailable().is_none() {
            offered |= VhostUserProtocolFeatures::PAGEFAULT;
        }
        Ok(offered)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        // The vhost crate answers REPLY_ACK itself and adds it to the offer.
        let offered = self.get_protocol_features()? | VhostUserProtocolFeatures::REPLY_ACK;
        let unoffered = VhostUserProtocolFeatures::from_bits_retain(features) - offered;
        if !unoffered.is_empty() {
            let why =
                match (unoffered.contains(VhostUserProtocolFeatures::PAGEFAULT), self.daemon.postcopy_unavailable()) {
                    (true, Some(why)) => format!(" (postcopy: {why})"),
                    _ => String::new(),
                };
            return Err(nack(format!("protocol features {unoffered:?} were not offered{why}")));
        }
        // The vhost crate keeps the acked set and checks it per message.
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let entries = ctx.iter().map(desc_of).zip(files).collect();
        let mut table = self.table.clone();
        table
            .set(&self.daemon.regions, entries, self.daemon.options.allow_foreign_memory)
            .map_err(|e| self.table_error(e))?;
        self.table = table;
        self.publish_table();
        if postcopy_listening == Some(true) && self.postcopy_listening() {
            return ctx.iter().map(|r| self.backend_base(r.guest_phys_addr)).collect::<VhostResult<_>>().map(Some);
        }
        Ok(None)
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        let allow_foreign = self.daemon.options.allow_foreign_memory;
        let result = self.table.add(&self.daemon.regions, desc_of(region), fd, allow_foreign);
        result.map_err(|e| self.table_error(e))?;
        self.publish_table();
        if postcopy_listening == Some(true) && self.postcopy_listening() {
            return self.backend_base(region.guest_phys_addr).map(Some);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        let result = self.table.remove(&desc_of(region));
        result.map_err(|e| self.table_error(e))?;
        self.publish_table();
        Ok(())
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let size = u16::try_from(num).ok().filter(|n| n.is_power_of_two() && *n <= MAX_QUEUE_SIZE);
        let size = size
            .ok_or_else(|| nack(format!("vring {index}: size {num} is not a power of two up to {MAX_QUEUE_SIZE}")))?;
        self.vring(index).map_err(|_| nack(format!("no vring {index}")))?.set_size(size);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        // Ring addresses come in the frontend's virtual address space.
        let translate = |va: u64| {
            self.table
                .frontend_to_gpa(va)
                .ok_or_else(|| nack(format!("vring {index}: address {va:#x} is not in the memory table")))
        };
        let addrs = RingAddrs { desc: translate(descriptor)?, avail: translate(available)?, used: translate(used)? };
        self.vring(index).map_err(|_| nack(format!("no vring {index}")))?.set_addrs(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let base = u16::try_from(base).map_err(|_| nack(format!("vring {index}: base {base} out of range")))?;
        self.vring(index).map_err(|_| nack(format!("no vring {index}")))?.set_base(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let (device, owner) = (Arc::clone(&self.daemon.device), self.id());
        let base = self.vring(index)?.stop(&device, owner);
        self.count_started();
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.device_may_start(index)?;
        let context = WorkerContext {
            device: Arc::clone(&self.daemon.device),
            ram: self.ram.clone(),
            owner: self.id(),
            tracking: self.tracking.clone(),
        };
        let (device, owner) = (Arc::clone(&self.daemon.device), self.id());
        let vring = self.vring(u32::from(index)).map_err(|_| nack(format!("no vring {index}")))?;
        vring.stop(&device, owner);
        // No fd means the frontend wants the ring polled, which gmemd does not do.
        let kick = fd.ok_or_else(|| nack(format!("vring {index}: polling without a kick fd is not supported")))?;
        vring.set_kick(Some(eventfd_of(kick)));
        let started = vring.start(context);
        self.count_started();
        started.map_err(|e| {
            log::error!("frontend {}: {e}", self.id());
            nack(e)
        })
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let vring = self.vring(u32::from(index)).map_err(|_| nack(format!("no vring {index}")))?;
        vring.set_call(fd.map(eventfd_of));
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        // gmemd reports ring errors in its log and query-device, not on an err fd.
        self.vring(u32::from(index)).map_err(|_| nack(format!("no vring {index}")))?;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.daemon.device.config().num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.vring(index).map_err(|_| nack(format!("no vring {index}")))?.set_enabled(enable);
        Ok(())
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VhostResult<Vec<u8>> {
        // An empty reply tells the frontend the window was refused.
        Ok(self.daemon.device.config().read(offset, size).unwrap_or_default())
    }

    fn set_config(&mut self, offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VhostResult<()> {
        Err(nack(format!("config space is read-only (write at offset {offset})")))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        Err(nack("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(VhostError::InvalidOperation("shared objects are not supported"))
    }

    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> VhostResult<(VhostUserInflight, File)> {
        Err(VhostError::InvalidOperation("inflight tracking is not offered"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VhostResult<()> {
        Err(nack("inflight tracking is not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(VhostError::InvalidOperation("device state transfer is not offered"))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(nack("device state transfer is not offered"))
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(VhostError::InvalidOperation("no shared memory regions"))
    }

    fn postcopy_advice(&mut self) -> VhostResult<File> {
        self.advise_postcopy()
    }

    fn postcopy_listen(&mut self) -> VhostResult<()> {
        self.listen_postcopy()
    }

    fn postcopy_end(&mut self) -> VhostResult<()> {
        self.end_postcopy()
    }

    fn postcopy_ack_mem_regions(&mut self) -> VhostResult<()> {
        self.register_postcopy_table()
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostResult<()> {
        self.map_dirty_log(log, file)
    }
}

fn desc_of(region: &VhostUserMemoryRegion) -> MemRegionDesc {
    MemRegionDesc {
        gpa: region.guest_phys_addr,
        size: region.memory_size,
        frontend_addr: region.user_addr,
        mmap_offset: region.mmap_offset,
    }
}

fn eventfd_of(file: File) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the frontend sent this fd as an eventfd; we take sole ownership
    // of it. If it is some other kind of fd, reads and writes on it fail and
    // the ring simply gets no kicks.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}
