//! One virtqueue as a connection configures it, and the lifecycle of the
//! worker that runs it (`worker.rs`).
//!
//! The worker owns its `Queue` outright: no lock is held while it touches
//! guest RAM, so a worker blocked on a page (a postcopy fault, a slow disk)
//! never stalls the vhost-user message loop, the control socket or another
//! queue. The connection gets the ring's position back when it stops the
//! worker (GET_VRING_BASE, a new kick fd, a pause, disconnect).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

use super::inflight::{InflightError, InflightRegion};
use super::worker::{QueueEnd, QueueRun};
use crate::blk::BlkDevice;
use crate::memory::GuestRam;
use crate::migration::Tracking;
use crate::record::{RingAddrs, VringRecord};

/// Largest queue a frontend may configure.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Why a vring could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VringError {
    /// Size, addresses or memory table missing.
    #[error("vring {0} is not fully configured (size, addresses, a kick fd and a memory table are needed)")]
    Unconfigured(u16),
    /// The rings do not lie in guest RAM or are misaligned.
    #[error("vring {0}: ring addresses are misaligned or outside guest RAM")]
    Invalid(u16),
    /// Another connection kept running this queue for all of the patience.
    #[error("vring {index} is still run by frontend {owner} after {}s; it must stop the ring (GET_VRING_BASE) or disconnect first", patience.as_secs())]
    Busy { index: u16, owner: u64, patience: Duration },
    /// The inflight region does not fit the ring.
    #[error("vring {index}: {source}")]
    Inflight { index: u16, source: InflightError },
    /// Creating an eventfd or the thread failed.
    #[error("vring {index}: {source}")]
    Os { index: u16, source: std::io::Error },
}

/// What a worker needs from its surroundings.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// The device executing requests.
    pub device: Arc<BlkDevice>,
    /// The connection's current guest RAM.
    pub ram: GuestMemoryAtomic<GuestRam>,
    /// Connection id, for queue ownership.
    pub owner: u64,
    /// The connection's dirty log and the daemon's migration figures.
    pub tracking: Tracking,
    /// The connection's inflight region, if the frontend set one.
    pub inflight: Option<Arc<InflightRegion>>,
    /// How long a start waits for another connection to let go of the queue.
    pub claim_patience: Duration,
    /// How long the worker polls its ring and engine before it sleeps.
    pub poll: Duration,
}

/// One vring's configuration and, when started, its worker.
#[derive(Debug)]
pub struct Vring {
    index: u16,
    size: u16,
    addrs: Option<RingAddrs>,
    /// Where the next start resumes, when no inflight region says better.
    next_avail: u16,
    next_used: u16,
    kick: Option<EventFd>,
    call: Arc<Mutex<Option<EventFd>>>,
    err: Arc<Mutex<Option<EventFd>>>,
    enabled: Arc<AtomicBool>,
    event_idx: bool,
    worker: Option<Worker>,
}

#[derive(Debug)]
struct Worker {
    /// Ends with where it left the ring, or why it could not run it.
    thread: JoinHandle<std::io::Result<QueueEnd>>,
    wake: EventFd,
    stop: Arc<AtomicBool>,
}

impl Vring {
    /// A fresh, unconfigured and disabled vring.
    pub fn new(index: u16) -> Self {
        Vring {
            index,
            size: 0,
            addrs: None,
            next_avail: 0,
            next_used: 0,
            kick: None,
            call: Arc::default(),
            err: Arc::default(),
            enabled: Arc::default(),
            event_idx: false,
            worker: None,
        }
    }

    /// SET_VRING_NUM.
    pub fn set_size(&mut self, size: u16) {
        self.size = size;
    }

    /// SET_VRING_ADDR, already translated to guest-physical addresses.
    pub fn set_addrs(&mut self, addrs: RingAddrs) {
        self.addrs = Some(addrs);
    }

    /// SET_VRING_BASE: where the next run starts in the available ring
    /// (and, every request before it being done, in the used ring).
    pub fn set_base(&mut self, base: u16) {
        self.next_avail = base;
        self.next_used = base;
    }

    /// SET_VRING_CALL: takes effect at once, also for a running worker.
    pub fn set_call(&mut self, call: Option<EventFd>) {
        *self.call.lock().unwrap_or_else(|p| p.into_inner()) = call;
    }

    /// SET_VRING_ERR: takes effect at once, also for a running worker.
    pub fn set_err(&mut self, err: Option<EventFd>) {
        *self.err.lock().unwrap_or_else(|p| p.into_inner()) = err;
    }

    /// SET_VRING_KICK: replaces the kick fd; the caller restarts the ring.
    pub fn set_kick(&mut self, kick: Option<EventFd>) {
        self.kick = kick;
    }

    /// VIRTIO_RING_F_EVENT_IDX negotiated or not; applies from the next start.
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// SET_VRING_ENABLE: a running worker picks up pending requests at once.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
        if let Some(worker) = &self.worker {
            let _ = worker.wake.write(1);
        }
    }

    /// Whether a worker runs the ring.
    pub fn started(&self) -> bool {
        self.worker.is_some()
    }

    /// Starts a worker if the ring is fully configured and has a kick fd.
    ///
    /// With an inflight region the position comes from guest RAM and the
    /// region (a restarted gmemd does not know it otherwise): the used
    /// ring's idx, plus the requests still in flight, which run first.
    pub fn start(&mut self, ctx: WorkerContext) -> Result<(), VringError> {
        let index = self.index;
        let invalid = |_| VringError::Invalid(index);
        let (Some(addrs), Some(kick)) = (self.addrs, self.kick.as_ref()) else {
            return Err(VringError::Unconfigured(index));
        };
        let ram = ctx.ram.memory();
        if self.size == 0 || vm_memory::GuestMemoryBackend::num_regions(&*ram) == 0 {
            return Err(VringError::Unconfigured(index));
        }
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(invalid)?;
        queue.try_set_size(self.size).map_err(invalid)?;
        queue.try_set_desc_table_address(GuestAddress(addrs.desc)).map_err(invalid)?;
        queue.try_set_avail_ring_address(GuestAddress(addrs.avail)).map_err(invalid)?;
        queue.try_set_used_ring_address(GuestAddress(addrs.used)).map_err(invalid)?;
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        if !queue.is_valid(&*ram) {
            return Err(VringError::Invalid(index));
        }
        let device_queue = ctx.device.queues().get(usize::from(index)).ok_or(VringError::Invalid(index))?;
        let patience = ctx.claim_patience;
        device_queue.claim(ctx.owner, patience).map_err(|owner| VringError::Busy { index, owner, patience })?;
        // Claimed: nobody else moves the ring now, so its state can be read.
        let positioned = (|| {
            let Some(region) = &ctx.inflight else {
                return Ok((self.next_avail, self.next_used, Vec::new(), None));
            };
            let mut inflight =
                region.queue(index, self.size).map_err(|source| VringError::Inflight { index, source })?;
            let used = queue.used_idx(&*ram, std::sync::atomic::Ordering::Acquire).map_err(invalid)?.0;
            let resubmit = inflight.recover(used);
            let avail = used.wrapping_add(u16::try_from(resubmit.len()).unwrap_or(u16::MAX));
            Ok((avail, used, resubmit, Some(inflight)))
        })();
        let started = positioned.and_then(|(avail, used, resubmit, inflight)| {
            queue.set_next_avail(avail);
            queue.set_next_used(used);
            if !resubmit.is_empty() {
                log::info!("vring {index}: {} requests were in flight; running them again", resubmit.len());
            }
            let os = |source| VringError::Os { index, source };
            let wake = crate::sys::eventfd().map_err(os)?;
            let stop = Arc::new(AtomicBool::new(false));
            let (kick, worker_wake) = (kick.try_clone().map_err(os)?, wake.try_clone().map_err(os)?);
            let (enabled, call, err, ctx, size) =
                (Arc::clone(&self.enabled), Arc::clone(&self.call), Arc::clone(&self.err), ctx.clone(), self.size);
            let worker_stop = Arc::clone(&stop);
            let used_ring = (GuestAddress(addrs.used), used_ring_len(self.size));
            let body = move || {
                // Made on the thread that submits to it (a single-issuer ring).
                let disk = match crate::blk::aio::engine(ctx.device.aio().0, size) {
                    Ok(disk) => disk,
                    Err(error) => {
                        log::warn!("vring {index}: no io_uring ({error}); this queue does one I/O at a time");
                        match crate::blk::aio::engine(crate::blk::aio::AioKind::Sync, size) {
                            Ok(disk) => disk,
                            Err(error) => {
                                ctx.device.queues()[usize::from(index)].release(ctx.owner);
                                return Err(error);
                            }
                        }
                    }
                };
                let poll_window = ctx.poll;
                let run = QueueRun {
                    queue,
                    resubmit,
                    inflight,
                    kick,
                    wake: worker_wake,
                    stop: worker_stop,
                    enabled,
                    call,
                    err,
                    ctx,
                    index,
                    used_ring,
                    broken: false,
                    pages_replaced: crate::memory::truncation::pages_replaced(),
                    disk,
                    in_flight: Default::default(),
                    completions: Vec::new(),
                    // Each request in flight holds a reference per data
                    // buffer; a ring's descriptors bound how many.
                    refs: std::rc::Rc::new(crate::memory::RangeRefs::new(usize::from(size).max(256) * 4)),
                    poll_window,
                };
                Ok(run.run())
            };
            let thread = std::thread::Builder::new().name(format!("vring-{index}")).spawn(body).map_err(os)?;
            Ok(Worker { thread, wake, stop })
        });
        match started {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err(error) => {
                device_queue.release(ctx.owner);
                Err(error)
            }
        }
    }

    /// Asks the worker to stop without waiting for it: for a worker that may
    /// wait on a postcopy page whose frontend went away. The worker keeps
    /// the queue claimed until it ends, so no other connection runs it
    /// beside that worker.
    pub fn abandon(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop.store(true, Ordering::Release);
            let _ = worker.wake.write(1);
            log::warn!("vring {}: worker left behind, waiting on a page that will not arrive", self.index);
        }
    }

    /// Stops the worker, if any, and returns the ring's position: the next
    /// available index, which is also the base a later start resumes from.
    /// Requests run to completion first, so no request is half done.
    pub fn stop(&mut self) -> u16 {
        if let Some(worker) = self.worker.take() {
            worker.stop.store(true, Ordering::Release);
            let _ = worker.wake.write(1);
            match worker.thread.join() {
                Ok(Ok(end)) => (self.next_avail, self.next_used) = (end.next_avail, end.next_used),
                Ok(Err(error)) => log::error!("vring {}: the worker could not start: {error}", self.index),
                Err(_) => log::error!("vring {}: worker thread panicked; keeping base {}", self.index, self.next_avail),
            }
        }
        self.next_avail
    }

    /// The ring's configuration and position; stop it first.
    pub fn record(&self, started: bool) -> VringRecord {
        use std::os::fd::AsRawFd;
        let fd_of =
            |fd: &Mutex<Option<EventFd>>| fd.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|e| e.as_raw_fd());
        VringRecord {
            index: self.index,
            size: self.size,
            addrs: self.addrs,
            next_avail: self.next_avail,
            next_used: self.next_used,
            enabled: self.enabled.load(Ordering::Acquire),
            started,
            kick: self.kick.as_ref().map(AsRawFd::as_raw_fd),
            call: fd_of(&self.call),
            err: fd_of(&self.err),
        }
    }

    /// A stopped vring as `record` describes it; its fds become the vring's.
    ///
    /// # Safety
    ///
    /// The fds the record names must be open eventfds that nothing else
    /// owns, each named once.
    pub unsafe fn from_record(record: &VringRecord, event_idx: bool) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: the caller hands over sole ownership of each fd.
        let take = |fd: Option<i32>| fd.map(|fd| unsafe { EventFd::from_raw_fd(fd) });
        Vring {
            index: record.index,
            size: record.size,
            addrs: record.addrs,
            next_avail: record.next_avail,
            next_used: record.next_used,
            kick: take(record.kick),
            call: Arc::new(Mutex::new(take(record.call))),
            err: Arc::new(Mutex::new(take(record.err))),
            enabled: Arc::new(AtomicBool::new(record.enabled)),
            event_idx,
            worker: None,
        }
    }
}

/// Bytes of a split used ring of `size` entries: flags, idx, the elements
/// and avail_event.
fn used_ring_len(size: u16) -> u64 {
    4 + 8 * u64::from(size) + 2
}
