//! `QueueRun`: the worker thread that runs one started vring.
//!
//! It takes requests from the available ring, executes them on the device
//! and publishes each used entry, tracking what is in flight in the
//! connection's inflight region when there is one. A ring the driver
//! corrupted, or that guest RAM no longer holds, stops the queue (it is
//! reported on the ring's error eventfd and in `query-device`) instead of
//! being retried in a loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use super::chain::DescChain;
use super::inflight::InflightQueue;
use super::vring::WorkerContext;
use crate::blk::Outcome;
use crate::memory::{GuestRam, RamAccess};

/// Where a stopped worker left its ring.
#[derive(Debug, Clone, Copy)]
pub struct QueueEnd {
    /// Next available entry to take.
    pub next_avail: u16,
    /// Next used entry to write.
    pub next_used: u16,
}

/// A running queue, owned by its worker thread.
pub(super) struct QueueRun {
    pub queue: Queue,
    /// Descriptor heads in flight when the ring started, run before anything else.
    pub resubmit: Vec<u16>,
    pub inflight: Option<InflightQueue>,
    pub kick: EventFd,
    pub wake: EventFd,
    pub stop: Arc<AtomicBool>,
    pub enabled: Arc<AtomicBool>,
    pub call: Arc<Mutex<Option<EventFd>>>,
    pub err: Arc<Mutex<Option<EventFd>>>,
    pub ctx: WorkerContext,
    pub index: u16,
    /// Where the used ring lies and its length, for the dirty log.
    pub used_ring: (GuestAddress, u64),
    /// Set when the ring cannot be processed; nothing more is until the
    /// frontend restarts it.
    pub broken: bool,
    /// Guest-RAM pages lost to truncation that this worker reported.
    pub pages_replaced: u64,
}

/// What became of one request.
#[derive(Debug, PartialEq, Eq)]
enum Executed {
    /// Done, and its used entry published.
    Published,
    /// Not completed: the queue was stopped while it waited for a guest page.
    Abandoned,
    /// Done, but the used ring could not be written: the ring stops.
    RingFailed,
}

/// Why a ring stopped being processed.
#[derive(Debug, thiserror::Error)]
enum RingFault {
    #[error("the driver corrupted the ring: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("the available ring's entries are not in guest RAM")]
    AvailUnreadable,
}

impl QueueRun {
    pub(super) fn run(mut self) -> QueueEnd {
        let device = Arc::clone(&self.ctx.device);
        let device_queue = &device.queues()[usize::from(self.index)];
        device_queue.set_broken(false);
        // A restart, or a kick that came while no worker ran: look at the
        // ring once before waiting for the next kick.
        let mut pending = true;
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if pending && self.enabled.load(Ordering::Acquire) && !self.broken {
                self.process();
            }
            match self.wait() {
                Some(kicked) => pending = kicked,
                None => break,
            }
        }
        device_queue.release(self.ctx.owner);
        QueueEnd { next_avail: self.queue.next_avail(), next_used: self.queue.next_used() }
    }

    /// Waits for a kick or a wake-up; `Some(true)` when the ring may have
    /// work, `None` when polling itself failed.
    fn wait(&self) -> Option<bool> {
        match crate::sys::poll_readable([&self.kick, &self.wake]) {
            Ok([kicked, woken]) => {
                // The kick fd is a non-blocking counter eventfd (checked when
                // the frontend sent it): one read clears it.
                if kicked {
                    let _ = self.kick.read();
                }
                if woken {
                    let _ = self.wake.read();
                }
                Some(true)
            }
            Err(error) => {
                log::error!("vring {}: poll failed: {error}", self.index);
                None
            }
        }
    }

    /// The ring can no longer be processed: stop, and tell the frontend.
    fn fail(&mut self, fault: RingFault) {
        log::error!("vring {}: {fault}; the queue stops until the frontend restarts it", self.index);
        self.broken = true;
        self.ctx.device.queues()[usize::from(self.index)].set_broken(true);
        if let Some(err) = self.err.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = err.write(1);
        }
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Acquire) && self.enabled.load(Ordering::Acquire)
    }

    /// Runs every available request, then signals the driver if it asked.
    fn process(&mut self) {
        let ram = self.ctx.ram.memory();
        let (device, tracking, stop) =
            (Arc::clone(&self.ctx.device), self.ctx.tracking.clone(), Arc::clone(&self.stop));
        let access =
            RamAccess::new(&ram, &device.queues()[usize::from(self.index)].access, &tracking).stopped_by(&stop);
        let mut used_any = false;
        // Requests found in flight at start, in the order they were taken.
        // One that does not complete stays in flight in the region.
        for head in std::mem::take(&mut self.resubmit) {
            used_any |= self.execute(head, &access, &ram) == Executed::Published;
        }
        loop {
            // Stop between requests, not after draining the ring: a busy
            // guest must not hold up GET_VRING_BASE, a disable or a pause.
            while self.running() && !self.broken {
                match self.next_head(&ram) {
                    Ok(Some(head)) => {
                        if let Some(inflight) = &mut self.inflight {
                            inflight.fetched(head);
                        }
                        match self.execute(head, &access, &ram) {
                            Executed::Published => used_any = true,
                            Executed::Abandoned => {
                                // It stays available, for whoever runs the ring next.
                                self.queue.go_to_previous_position();
                                break;
                            }
                            Executed::RingFailed => {}
                        }
                    }
                    Ok(None) => break,
                    Err(fault) => self.fail(fault),
                }
            }
            if self.broken || !self.running() || !self.queue.event_idx_enabled() {
                break;
            }
            // Re-enabling notifications races with the driver adding more
            // requests; loop while it did.
            match self.queue.enable_notification(&*ram) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(error) => self.fail(error.into()),
            }
        }
        let replaced = crate::memory::truncation::pages_replaced();
        if replaced != self.pages_replaced {
            self.pages_replaced = replaced;
            log::error!(
                "guest RAM was truncated under gmemd: {replaced} pages of a path= region were gone and now read as \
                 zeros; the guest's data there is lost"
            );
        }
        // Used elements, the used index and (EVENT_IDX) avail_event were
        // written above; the ring is a few pages at most, so log all of it.
        let (used_addr, used_len) = self.used_ring;
        access.ring_written(used_addr, used_len);
        if used_any && self.queue.needs_notification(&*ram).unwrap_or(true) {
            if let Some(call) = self.call.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                // Non-blocking: a call fd at its maximum count already
                // wakes its reader, and a write never holds this thread.
                let _ = call.write(1);
            }
        }
    }

    /// The head of the next available chain, `None` when the ring is empty.
    fn next_head(&mut self, ram: &GuestRam) -> Result<Option<u16>, RingFault> {
        let next_avail = self.queue.next_avail();
        if self.queue.avail_idx(ram, Ordering::Acquire)?.0 == next_avail {
            return Ok(None);
        }
        // The index said there is an entry (and the driver only moves it
        // forward), so an iteration that yields none could not read it:
        // virtio-queue ends the iteration quietly then.
        match self.queue.iter(ram)?.next() {
            Some(chain) => Ok(Some(chain.head_index())),
            None => Err(RingFault::AvailUnreadable),
        }
    }

    /// Executes the chain headed by `head` and publishes its used entry.
    fn execute(&mut self, head: u16, access: &RamAccess, ram: &GuestRam) -> Executed {
        let device = Arc::clone(&self.ctx.device);
        let device_queue = &device.queues()[usize::from(self.index)];
        let chain = DescChain::new(ram, GuestAddress(self.queue.desc_table()), self.queue.size(), head);
        let len = match device.handle(chain, access, device_queue) {
            Outcome::Completed(len) => len,
            Outcome::Abandoned => return Executed::Abandoned,
        };
        if let Some(inflight) = &self.inflight {
            inflight.publishing(head);
        }
        if let Err(error) = self.queue.add_used(ram, head, len) {
            self.fail(error.into());
            return Executed::RingFailed;
        }
        if let Some(inflight) = &self.inflight {
            inflight.published(head, self.queue.next_used());
        }
        self.ctx.tracking.stats.request_completed();
        Executed::Published
    }
}
