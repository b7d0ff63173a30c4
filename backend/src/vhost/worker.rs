//! `QueueRun`: the worker thread that runs one started vring.
//!
//! It takes requests from the available ring and starts them on the
//! device; reads, writes and flushes go to the queue's disk engine
//! ([`AsyncDisk`]), up to its depth at once, and each is published on the
//! used ring when it completes, in whatever order that is (virtio-blk
//! allows it). What is in flight is tracked in the connection's inflight
//! region when there is one. A ring the driver corrupted, or that guest RAM
//! no longer holds, stops the queue (it is reported on the ring's error
//! eventfd and in `query-device`) instead of being retried in a loop.
//! Stopping the worker (GET_VRING_BASE, a pause, a disconnect) lets every
//! request in flight complete first, so a stopped ring has none.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use super::chain::DescChain;
use super::inflight::InflightQueue;
use super::vring::WorkerContext;
use crate::blk::aio::{AsyncDisk, Completion};
use crate::blk::{Outcome, RequestError, Started, Transfer};
use crate::memory::{AccessError, GuestBuf, GuestRam, RamAccess, RangeRefs};

/// Where a stopped worker left its ring.
#[derive(Debug, Clone, Copy)]
pub struct QueueEnd {
    /// Next available entry to take.
    pub next_avail: u16,
    /// Next used entry to write.
    pub next_used: u16,
}

/// A request whose disk operation is in flight.
#[derive(Debug)]
struct InFlight {
    head: u16,
    transfer: Transfer,
}

/// The requests in flight, by tag (their slot).
#[derive(Debug, Default)]
pub(super) struct InFlightTable {
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    count: usize,
}

impl InFlightTable {
    fn insert(&mut self, entry: InFlight) -> usize {
        self.count += 1;
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(entry);
                slot
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, slot: usize) -> Option<InFlight> {
        let entry = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.count -= 1;
        Some(entry)
    }
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
    /// The queue's disk engine.
    pub disk: Box<dyn AsyncDisk>,
    /// Requests whose disk operation is in flight.
    pub in_flight: InFlightTable,
    /// Completions taken from the engine, reused between batches.
    pub completions: Vec<Completion>,
    /// References on guest RAM that keep what the worker touches shared.
    pub refs: Rc<RangeRefs>,
    /// How long the next poll lasts: up to `--poll-us`, adapted to how long
    /// the queue goes without work (see `adapt_poll`).
    pub poll_window: std::time::Duration,
}

/// What became of a request the worker took.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// Done, and its used entry published.
    Published,
    /// Handed to the disk engine.
    Submitted,
    /// Not started: the queue was stopped while it waited for a guest page.
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
    #[error("the ring is in memory the device may not touch: {0}")]
    Unreachable(AccessError),
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
            let idle_since = std::time::Instant::now();
            if self.poll() {
                pending = true;
                continue;
            }
            match self.wait() {
                Some(ready) => pending = ready,
                None => break,
            }
            self.adapt_poll(idle_since.elapsed());
        }
        self.drain();
        device_queue.release(self.ctx.owner);
        QueueEnd { next_avail: self.queue.next_avail(), next_used: self.queue.next_used() }
    }

    /// The ring's three parts, as guest buffers.
    fn ring_bufs(&self) -> [GuestBuf; 3] {
        let size = u32::from(self.queue.size());
        [
            GuestBuf { addr: GuestAddress(self.queue.desc_table()), len: 16 * size },
            GuestBuf { addr: GuestAddress(self.queue.avail_ring()), len: 6 + 2 * size },
            GuestBuf { addr: GuestAddress(self.queue.used_ring()), len: 6 + 8 * size },
        ]
    }

    /// Polls for up to the poll window for the driver to add a request or
    /// the engine to complete one; true when it did.
    fn poll(&mut self) -> bool {
        if self.poll_window.is_zero() || !self.running() || self.broken {
            return false;
        }
        let ram = self.ctx.ram.memory().into_inner();
        let tracking = self.ctx.tracking.clone();
        let counters = &self.ctx.device.queues()[usize::from(self.index)].access;
        let access = RamAccess::new(&ram, counters, &tracking).referenced_by(&self.refs);
        // Polling reads the available ring: it must stay shared meanwhile.
        let Ok(_ring) = access.reference(&self.ring_bufs()) else { return false };
        let deadline = std::time::Instant::now() + self.poll_window;
        while std::time::Instant::now() < deadline && self.running() {
            let added = self
                .queue
                .avail_idx(&*ram, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != self.queue.next_avail() && self.in_flight.count < self.disk.depth());
            if added || self.disk.ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Adapts the poll window to `idle`, how long the worker went without
    /// work (polling and sleeping), by the rules of QEMU's iothreads
    /// (`adjust_polling_time`): work that came within the window needs no
    /// change; work that came later than the longest window would have
    /// been worth no poll, so the window halves; work that came sooner
    /// would have been caught by a longer poll, so it doubles, from 4 µs.
    fn adapt_poll(&mut self, idle: std::time::Duration) {
        let longest = self.ctx.poll;
        if idle > longest {
            self.poll_window /= 2;
            if self.poll_window < std::time::Duration::from_micros(1) {
                self.poll_window = std::time::Duration::ZERO;
            }
        } else if idle > self.poll_window {
            let grown = (self.poll_window * 2).max(std::time::Duration::from_micros(4));
            self.poll_window = grown.min(longest);
        }
    }

    /// Waits for a kick, a completion or a wake-up; `Some(true)` when there
    /// may be work, `None` when polling itself failed.
    fn wait(&self) -> Option<bool> {
        match crate::sys::poll_readable([&self.kick, &self.wake, self.disk.notifier()]) {
            Ok([kicked, woken, completed]) => {
                // The kick fd is a non-blocking counter eventfd (checked when
                // the frontend sent it): one read clears it.
                if kicked {
                    let _ = self.kick.read();
                }
                if woken {
                    let _ = self.wake.read();
                }
                Some(kicked || woken || completed)
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

    /// Publishes what completed, starts every available request the engine
    /// has room for, then signals the driver if it asked.
    fn process(&mut self) {
        let ram = self.ctx.ram.memory().into_inner();
        let (device, tracking, stop, refs) =
            (Arc::clone(&self.ctx.device), self.ctx.tracking.clone(), Arc::clone(&self.stop), Rc::clone(&self.refs));
        let access = RamAccess::new(&ram, &device.queues()[usize::from(self.index)].access, &tracking)
            .stopped_by(&stop)
            .referenced_by(&refs);
        // The ring stays shared while this batch uses it.
        let _ring = match access.reference(&self.ring_bufs()) {
            Ok(references) => references,
            Err(error) => return self.fail(RingFault::Unreachable(error)),
        };
        let mut used_any = self.reap_ready(&access, &ram);
        // Requests found in flight at start, in the order they were taken.
        // One that does not start stays in flight in the region.
        for head in std::mem::take(&mut self.resubmit) {
            used_any |= self.take(head, &access, &ram) == Taken::Published;
        }
        loop {
            // Stop between requests, not after draining the ring: a busy
            // guest must not hold up GET_VRING_BASE, a disable or a pause.
            while self.running() && !self.broken && self.in_flight.count < self.disk.depth() {
                match self.next_head(&ram) {
                    Ok(Some(head)) => {
                        if let Some(inflight) = &mut self.inflight {
                            inflight.fetched(head);
                        }
                        match self.take(head, &access, &ram) {
                            Taken::Published => used_any = true,
                            Taken::Abandoned => {
                                // It stays available, for whoever runs the ring next.
                                self.queue.go_to_previous_position();
                                break;
                            }
                            Taken::Submitted | Taken::RingFailed => {}
                        }
                    }
                    Ok(None) => break,
                    Err(fault) => self.fail(fault),
                }
            }
            self.submit();
            // Completions are signalled as they come, not after the whole
            // ring was taken: the driver can go on meanwhile.
            if self.reap_ready(&access, &ram) {
                self.notify(&access, &ram, true);
            }
            let full = self.in_flight.count >= self.disk.depth();
            if full || self.broken || !self.running() || !self.queue.event_idx_enabled() {
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
        self.report_truncation();
        self.notify(&access, &ram, used_any);
    }

    /// Waits for every request in flight to complete and publishes them:
    /// a stopped ring has none in flight.
    fn drain(&mut self) {
        if self.in_flight.count == 0 {
            return;
        }
        let ram = self.ctx.ram.memory().into_inner();
        let (device, tracking, refs) = (Arc::clone(&self.ctx.device), self.ctx.tracking.clone(), Rc::clone(&self.refs));
        let access =
            RamAccess::new(&ram, &device.queues()[usize::from(self.index)].access, &tracking).referenced_by(&refs);
        // A ring gone private takes no more used entries; the requests still
        // complete (their buffers are held), unpublished.
        let _ring = match access.reference(&self.ring_bufs()) {
            Ok(references) => Some(references),
            Err(error) => {
                self.fail(RingFault::Unreachable(error));
                None
            }
        };
        let mut used_any = false;
        while self.in_flight.count > 0 {
            self.submit();
            match self.reap(&access, &ram, 1) {
                Ok(used) => used_any |= used,
                Err(error) => {
                    log::error!(
                        "vring {}: {} requests left in flight: taking disk completions failed: {error}",
                        self.index,
                        self.in_flight.count
                    );
                    break;
                }
            }
        }
        self.notify(&access, &ram, used_any);
    }

    fn report_truncation(&mut self) {
        let replaced = crate::memory::truncation::pages_replaced();
        if replaced != self.pages_replaced {
            self.pages_replaced = replaced;
            log::error!(
                "guest RAM was truncated under gmemd: {replaced} pages of a path= region were gone and now read as \
                 zeros; the guest's data there is lost"
            );
        }
    }

    /// Logs the used ring's writes and signals the driver if it asked.
    fn notify(&mut self, access: &RamAccess, ram: &GuestRam, used_any: bool) {
        // Used elements, the used index and (EVENT_IDX) avail_event were
        // written; the ring is a few pages at most, so log all of it.
        let (used_addr, used_len) = self.used_ring;
        access.ring_written(used_addr, used_len);
        if used_any && self.queue.needs_notification(ram).unwrap_or(true) {
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

    /// Starts the chain headed by `head`: completes it at once, or hands
    /// its disk operation to the engine.
    fn take(&mut self, head: u16, access: &RamAccess, ram: &GuestRam) -> Taken {
        let device = Arc::clone(&self.ctx.device);
        let device_queue = &device.queues()[usize::from(self.index)];
        let chain = DescChain::new(ram, GuestAddress(self.queue.desc_table()), self.queue.size(), head);
        match device.start(chain, access, device_queue) {
            Started::Done(Outcome::Completed(len)) => self.publish(head, len, ram),
            Started::Done(Outcome::Abandoned) => Taken::Abandoned,
            Started::Transfer(transfer) => {
                let slot = self.in_flight.insert(InFlight { head, transfer });
                self.push(slot, access, ram)
            }
        }
    }

    /// Hands the next part of the transfer in `slot` to the engine; if the
    /// engine refuses it, the request completes with that error.
    fn push(&mut self, slot: usize, access: &RamAccess, ram: &GuestRam) -> Taken {
        let Some(entry) = self.in_flight.slots[slot].as_ref() else { return Taken::Submitted };
        let transfer = &entry.transfer;
        // SAFETY: the transfer holds its guest buffers (`HeldBufs`: the
        // iovecs and the memory table snapshot mapping them) in its slot
        // until its completion is taken in `reap`; the iovec array is not
        // changed meanwhile, and moving the slot does not move it.
        let pushed = unsafe {
            self.disk.push(transfer.op(), transfer.fd(), transfer.pending(), transfer.position(), slot as u64)
        };
        match pushed {
            Ok(()) => Taken::Submitted,
            Err(error) => self.finish(slot, Err(error.into()), access, ram),
        }
    }

    fn submit(&mut self) {
        if let Err(error) = self.disk.submit() {
            // The operations stay queued; the next submit hands them over.
            log::warn!("vring {}: disk submission failed: {error}", self.index);
        }
    }

    /// [`reap`](Self::reap)s the completions ready now.
    fn reap_ready(&mut self, access: &RamAccess, ram: &GuestRam) -> bool {
        self.reap(access, ram, 0).unwrap_or_else(|error| {
            // They stay in the engine, for the next time.
            log::error!("vring {}: taking disk completions failed: {error}", self.index);
            false
        })
    }

    /// Takes completions (waiting for at least `wait_for`), publishes the
    /// requests they end and hands over the next part of those that moved
    /// only part of their data. Returns whether anything was published.
    fn reap(&mut self, access: &RamAccess, ram: &GuestRam, wait_for: usize) -> std::io::Result<bool> {
        if self.in_flight.count == 0 {
            return Ok(false);
        }
        let mut completions = std::mem::take(&mut self.completions);
        let taken = self.disk.complete(wait_for, &mut completions);
        let mut used_any = false;
        for Completion { tag, result } in completions.drain(..) {
            let slot = usize::try_from(tag).unwrap_or(usize::MAX);
            let Some(entry) = self.in_flight.slots.get_mut(slot).and_then(Option::as_mut) else {
                log::error!("vring {}: the disk completed an operation it was not given (tag {tag})", self.index);
                continue;
            };
            let outcome = match result {
                Ok(n) => entry.transfer.advance(n),
                Err(error) if matches!(error.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => Ok(false),
                Err(error) => Err(RequestError::Disk(error)),
            };
            let taken = match outcome {
                Ok(false) => self.push(slot, access, ram),
                Ok(true) => self.finish(slot, Ok(()), access, ram),
                Err(error) => self.finish(slot, Err(error), access, ram),
            };
            used_any |= taken == Taken::Published;
        }
        self.completions = completions;
        taken.map(|()| used_any)
    }

    /// Completes the request in `slot` with `result` and publishes it.
    fn finish(&mut self, slot: usize, result: Result<(), RequestError>, access: &RamAccess, ram: &GuestRam) -> Taken {
        let Some(InFlight { head, transfer }) = self.in_flight.remove(slot) else { return Taken::RingFailed };
        let device = Arc::clone(&self.ctx.device);
        match device.finish(transfer, result, access, &device.queues()[usize::from(self.index)]) {
            Outcome::Completed(len) => self.publish(head, len, ram),
            // The data has moved; only the status byte could not be
            // written (its page was faulted in when the request started).
            Outcome::Abandoned => self.publish(head, 0, ram),
        }
    }

    /// Publishes `head`'s used entry of `len` bytes.
    fn publish(&mut self, head: u16, len: u32, ram: &GuestRam) -> Taken {
        if let Some(inflight) = &self.inflight {
            inflight.publishing(head);
        }
        if let Err(error) = self.queue.add_used(ram, head, len) {
            self.fail(error.into());
            return Taken::RingFailed;
        }
        if let Some(inflight) = &self.inflight {
            inflight.published(head, self.queue.next_used());
        }
        self.ctx.tracking.stats.request_completed();
        Taken::Published
    }
}
