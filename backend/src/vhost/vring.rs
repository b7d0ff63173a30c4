//! One virtqueue as a connection configures it, and the worker thread that
//! runs it.
//!
//! The worker owns its `Queue` outright: no lock is held while it touches
//! guest RAM, so a worker blocked on a page (a postcopy fault, a slow disk)
//! never stalls the vhost-user message loop, the control socket or another
//! queue. The connection gets the queue back, with its position, when it
//! stops the worker (GET_VRING_BASE, a new kick fd, disconnect).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::BlkDevice;
use crate::memory::{GuestRam, RamAccess};
use crate::migration::Tracking;

/// Largest queue a frontend may configure.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// How long a start waits for the queue's previous connection to stop it.
/// A departing connection stops between requests, so this only runs out
/// when two live frontends drive the same queue, or when a worker was left
/// behind on a postcopy page that will never arrive.
const CLAIM_PATIENCE: Duration = Duration::from_secs(5);

/// Why a vring could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VringError {
    /// Size, addresses or memory table missing.
    #[error("vring {0} is not fully configured (size, addresses and a memory table are needed)")]
    Unconfigured(u16),
    /// The rings do not lie in guest RAM or are misaligned.
    #[error("vring {0}: ring addresses are misaligned or outside guest RAM")]
    Invalid(u16),
    /// Another connection kept running this queue for all of `CLAIM_PATIENCE`.
    #[error("vring {index} is still run by frontend {owner} after {}s; it must stop the ring (GET_VRING_BASE) or disconnect first", CLAIM_PATIENCE.as_secs())]
    Busy { index: u16, owner: u64 },
    /// Creating an eventfd or the thread failed.
    #[error("vring {index}: {source}")]
    Os { index: u16, source: std::io::Error },
}

/// Guest-physical addresses of a split ring's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
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
}

/// One vring's configuration and, when started, its worker.
#[derive(Debug)]
pub struct Vring {
    index: u16,
    size: u16,
    addrs: Option<RingAddrs>,
    base: u16,
    kick: Option<EventFd>,
    call: Arc<Mutex<Option<EventFd>>>,
    enabled: Arc<AtomicBool>,
    event_idx: bool,
    worker: Option<Worker>,
}

#[derive(Debug)]
struct Worker {
    thread: JoinHandle<Queue>,
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
            base: 0,
            kick: None,
            call: Arc::default(),
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

    /// SET_VRING_BASE: where the next run starts in the available ring.
    pub fn set_base(&mut self, base: u16) {
        self.base = base;
    }

    /// SET_VRING_CALL: takes effect at once, also for a running worker.
    pub fn set_call(&mut self, call: Option<EventFd>) {
        *self.call.lock().unwrap_or_else(|p| p.into_inner()) = call;
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
    pub fn start(&mut self, ctx: WorkerContext) -> Result<(), VringError> {
        let index = self.index;
        let os = |source| VringError::Os { index, source };
        let (Some(addrs), Some(kick)) = (self.addrs, self.kick.as_ref()) else {
            return Err(VringError::Unconfigured(index));
        };
        let ram = ctx.ram.memory();
        if self.size == 0 || vm_memory::GuestMemoryBackend::num_regions(&*ram) == 0 {
            return Err(VringError::Unconfigured(index));
        }
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(|_| VringError::Invalid(index))?;
        queue.try_set_size(self.size).map_err(|_| VringError::Invalid(index))?;
        queue.try_set_desc_table_address(GuestAddress(addrs.desc)).map_err(|_| VringError::Invalid(index))?;
        queue.try_set_avail_ring_address(GuestAddress(addrs.avail)).map_err(|_| VringError::Invalid(index))?;
        queue.try_set_used_ring_address(GuestAddress(addrs.used)).map_err(|_| VringError::Invalid(index))?;
        queue.set_next_avail(self.base);
        queue.set_next_used(self.base);
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        if !queue.is_valid(&*ram) {
            return Err(VringError::Invalid(index));
        }
        let stats = ctx.device.queues().get(usize::from(index)).ok_or(VringError::Invalid(index))?;
        stats.claim(ctx.owner, CLAIM_PATIENCE).map_err(|owner| VringError::Busy { index, owner })?;
        let started = (|| {
            let kick = kick.try_clone()?;
            let wake = EventFd::new(EFD_NONBLOCK)?;
            let stop = Arc::new(AtomicBool::new(false));
            let run = QueueRun {
                queue,
                kick,
                wake: wake.try_clone()?,
                stop: Arc::clone(&stop),
                enabled: Arc::clone(&self.enabled),
                call: Arc::clone(&self.call),
                ctx: ctx.clone(),
                index,
                used_ring: (GuestAddress(addrs.used), used_ring_len(self.size)),
                broken: false,
            };
            let thread = std::thread::Builder::new().name(format!("vring-{index}")).spawn(move || run.run())?;
            Ok(Worker { thread, wake, stop })
        })();
        match started {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err(source) => {
                ctx.device.queues()[usize::from(index)].release(ctx.owner);
                Err(os(source))
            }
        }
    }

    /// Asks the worker to stop without waiting for it: for a worker that may
    /// wait forever on a postcopy page whose frontend went away. The queue
    /// stays claimed, so no other connection runs it beside that worker.
    pub fn abandon(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop.store(true, Ordering::Release);
            let _ = worker.wake.write(1);
            log::warn!("vring {}: worker left behind, waiting on a page that will not arrive", self.index);
        }
    }

    /// Stops the worker, if any, and returns the ring's position: the next
    /// available index, which is also the base a later start resumes from.
    pub fn stop(&mut self, device: &BlkDevice, owner: u64) -> u16 {
        if let Some(worker) = self.worker.take() {
            worker.stop.store(true, Ordering::Release);
            let _ = worker.wake.write(1);
            match worker.thread.join() {
                Ok(queue) => self.base = queue.next_avail(),
                Err(_) => log::error!("vring {}: worker thread panicked; keeping base {}", self.index, self.base),
            }
            if let Some(stats) = device.queues().get(usize::from(self.index)) {
                stats.release(owner);
            }
        }
        self.base
    }
}

/// Bytes of a split used ring of `size` entries: flags, idx, the elements
/// and avail_event.
fn used_ring_len(size: u16) -> u64 {
    4 + 8 * u64::from(size) + 2
}

/// A running queue, owned by its worker thread.
struct QueueRun {
    queue: Queue,
    kick: EventFd,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    enabled: Arc<AtomicBool>,
    call: Arc<Mutex<Option<EventFd>>>,
    ctx: WorkerContext,
    index: u16,
    /// Where the used ring lies and its length, for the dirty log.
    used_ring: (GuestAddress, u64),
    /// Set when the driver corrupted the ring; nothing more is processed
    /// until the frontend restarts the ring.
    broken: bool,
}

impl QueueRun {
    fn run(mut self) -> Queue {
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if self.enabled.load(Ordering::Acquire) && !self.broken {
                self.process();
            }
            if !self.wait() {
                break;
            }
        }
        self.queue
    }

    /// Waits for a kick or a wake-up; false when polling itself failed.
    fn wait(&self) -> bool {
        match crate::sys::poll_readable([&self.kick, &self.wake]) {
            Ok([kicked, woken]) => {
                if kicked {
                    let _ = self.kick.read();
                }
                if woken {
                    let _ = self.wake.read();
                }
                true
            }
            Err(error) => {
                log::error!("vring {}: poll failed: {error}", self.index);
                false
            }
        }
    }

    /// Runs every available request, then signals the driver if it asked.
    fn process(&mut self) {
        let ram = self.ctx.ram.memory();
        let stats = &self.ctx.device.queues()[usize::from(self.index)];
        let access = RamAccess::new(&ram, &stats.access, &self.ctx.tracking);
        let mut used_any = false;
        loop {
            if self.queue.event_idx_enabled() {
                let _ = self.queue.disable_notification(&*ram);
            }
            loop {
                // Stop between requests, not after draining the ring: a busy
                // guest must not hold up GET_VRING_BASE or a disable.
                if self.stop.load(Ordering::Acquire) || !self.enabled.load(Ordering::Acquire) {
                    break;
                }
                let chain = match self.queue.iter(&*ram) {
                    Ok(mut available) => available.next(),
                    Err(error) => {
                        log::error!(
                            "vring {}: the driver corrupted the ring ({error}); stopping the queue until it is reset",
                            self.index
                        );
                        self.broken = true;
                        None
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let len = self.ctx.device.handle(chain, &access, stats);
                if let Err(error) = self.queue.add_used(&*ram, head, len) {
                    log::warn!("vring {}: cannot return descriptor {head}: {error}", self.index);
                }
                self.ctx.tracking.stats.request_completed();
                used_any = true;
            }
            if self.broken || self.stop.load(Ordering::Acquire) || !self.queue.event_idx_enabled() {
                break;
            }
            // Re-enabling notifications races with the driver adding more
            // requests; loop while it did.
            match self.queue.enable_notification(&*ram) {
                Ok(true) => continue,
                _ => break,
            }
        }
        // Used elements, the used index and (EVENT_IDX) avail_event were
        // written above; the ring is a few pages at most, so log all of it.
        let (used_addr, used_len) = self.used_ring;
        access.ring_written(used_addr, used_len);
        if used_any && self.queue.needs_notification(&*ram).unwrap_or(true) {
            if let Some(call) = self.call.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                let _ = call.write(1);
            }
        }
    }
}
