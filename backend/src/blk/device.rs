//! `BlkDevice`: executes parsed requests and keeps per-queue figures.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddress;

use super::aio::{AioKind, DiskOp};
use super::config::{BlkConfig, SECTOR_SIZE, WCE_OFFSET};
use super::disk::{CacheMode, Disk, DiskError};
use super::request::{self, check_range, BlkRequest, Op, RequestError, SEGMENT_LEN};
use super::transfer::Transfer;
use crate::memory::{AccessCounters, AccessError, GuestBuf, RamAccess};

/// What the device is built from (`--disk`, `--readonly`, `--queues`,
/// `--serial`, `--cache`, `--aio`).
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The raw image.
    pub disk: PathBuf,
    /// Refuse writes.
    pub readonly: bool,
    /// Number of request queues.
    pub queues: u16,
    /// The id GET_ID returns (at most 20 bytes are used).
    pub serial: String,
    /// How the image is cached.
    pub cache: CacheMode,
    /// The disk engine the queues use (io_uring falls back to sync where
    /// the kernel refuses it).
    pub aio: AioKind,
}

/// One virtqueue of the device: which connection runs it, and its figures,
/// which add up across the connections that ran it.
#[derive(Debug, Default)]
pub struct DeviceQueue {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Requests completed with an error or dropped as malformed.
    pub errors: AtomicU64,
    /// Bytes moved between the device and guest RAM.
    pub access: AccessCounters,
    /// Connection id running the queue now, 0 when none.
    owner: Mutex<u64>,
    /// Signalled when the owner releases the queue.
    released: Condvar,
    /// Error kinds already logged, one bit each, so a misbehaving guest
    /// cannot flood the log.
    logged: AtomicU32,
    /// The ring stopped being processed (corrupt, or gone from guest RAM).
    broken: AtomicBool,
}

/// A queue's counters, as one program hands them to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueCounters {
    /// Requests completed.
    pub requests: u64,
    /// Requests completed with an error or dropped as malformed.
    pub errors: u64,
    /// Bytes the device wrote into guest RAM.
    pub bytes_to_guest: u64,
    /// Bytes the device read from guest RAM.
    pub bytes_from_guest: u64,
}

impl DeviceQueue {
    /// The counters now.
    pub fn counters(&self) -> QueueCounters {
        QueueCounters {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bytes_to_guest: self.access.bytes_to_guest(),
            bytes_from_guest: self.access.bytes_from_guest(),
        }
    }

    /// Goes on from a previous program's counters (exec upgrade).
    pub fn carry_on(&self, counters: &QueueCounters) {
        self.requests.fetch_add(counters.requests, Ordering::Relaxed);
        self.errors.fetch_add(counters.errors, Ordering::Relaxed);
        self.access.carry_on(counters.bytes_to_guest, counters.bytes_from_guest);
    }

    /// Marks the queue as run by connection `owner`, waiting up to `patience`
    /// for another owner to let go of it: a connection that is going away
    /// (QEMU reconnecting, or the old QEMU of a live update stopping its
    /// rings) releases its queues moments after the new one asks for them.
    /// Returns the owner that kept the queue when the wait ran out.
    pub fn claim(&self, owner: u64, patience: Duration) -> Result<(), u64> {
        let deadline = Instant::now() + patience;
        let mut current = self.owner.lock().unwrap_or_else(|p| p.into_inner());
        while *current != 0 && *current != owner {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(*current);
            }
            current = self.released.wait_timeout(current, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        *current = owner;
        Ok(())
    }

    /// Releases the queue if `owner` holds it.
    pub fn release(&self, owner: u64) {
        let mut current = self.owner.lock().unwrap_or_else(|p| p.into_inner());
        if *current == owner {
            *current = 0;
            self.released.notify_all();
        }
    }

    /// Whether any connection runs the queue.
    pub fn started(&self) -> bool {
        *self.owner.lock().unwrap_or_else(|p| p.into_inner()) != 0
    }

    /// Marks the ring broken (its worker stopped processing it) or not.
    pub fn set_broken(&self, broken: bool) {
        self.broken.store(broken, Ordering::Relaxed);
    }

    /// Whether the ring is broken.
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    fn first_time(&self, error: &RequestError) -> bool {
        let bit = 1u32 << error.kind();
        self.logged.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
}

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Completed (successfully or not); the used length to publish.
    Completed(u32),
    /// Left undone: the queue was stopped while it waited for a guest page.
    Abandoned,
}

/// What [`BlkDevice::start`] made of a request.
#[derive(Debug)]
pub enum Started {
    /// It is over already (an error, GET_ID, DISCARD...).
    Done(Outcome),
    /// Its disk operation is to be run; [`BlkDevice::finish`] completes it.
    Transfer(Transfer),
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct BlkDevice {
    disk: Disk,
    config: BlkConfig,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    queues: Vec<DeviceQueue>,
    /// The engine the queues use, and why it is not the one asked for.
    aio: (AioKind, Option<String>),
}

impl BlkDevice {
    /// Opens the disk and sets up `options.queues` queues.
    pub fn new(options: &DeviceOptions) -> Result<Self, DiskError> {
        Ok(Self::with_disk(Disk::open(&options.disk, options.readonly, options.cache)?, options))
    }

    /// The device on an image already open (`options.disk` only names it).
    pub fn with_disk(disk: Disk, options: &DeviceOptions) -> Self {
        let config =
            BlkConfig { capacity_bytes: disk.capacity_bytes(), num_queues: options.queues, readonly: options.readonly };
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let serial = options.serial.as_bytes();
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial[..n]);
        let queues = (0..options.queues).map(|_| DeviceQueue::default()).collect();
        let aio = match options.aio {
            AioKind::IoUring => match super::aio::UringDisk::probe() {
                Ok(()) => (AioKind::IoUring, None),
                Err(why) => {
                    log::warn!("io_uring unavailable ({why}); the queues do one synchronous I/O at a time");
                    (AioKind::Sync, Some(format!("io_uring unavailable: {why}")))
                }
            },
            AioKind::Sync => (AioKind::Sync, None),
        };
        BlkDevice { disk, config, id, queues, aio }
    }

    /// The disk engine the queues use, and why it is not the one asked
    /// for, if it is not.
    pub fn aio(&self) -> (AioKind, Option<&str>) {
        (self.aio.0, self.aio.1.as_deref())
    }

    /// `size` bytes of the config space from `offset`, or `None` outside it.
    pub fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        self.config.read(offset, size, self.disk.write_cache())
    }

    /// A write to the config space: only the WCE byte is writable.
    pub fn write_config(&self, offset: u32, bytes: &[u8]) -> Result<(), String> {
        match (offset, bytes) {
            (WCE_OFFSET, [wce]) => {
                self.disk.set_write_cache(*wce != 0);
                log::info!("the guest turned the write cache {}", if *wce != 0 { "on" } else { "off" });
                Ok(())
            }
            _ => Err(format!(
                "only the write cache byte (offset {WCE_OFFSET}, 1 byte) is writable, not {} bytes at offset {offset}",
                bytes.len()
            )),
        }
    }

    /// Config space and feature bits.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The queues.
    pub fn queues(&self) -> &[DeviceQueue] {
        &self.queues
    }

    /// Parses one request from `chain` on queue `queue`. A read, write or
    /// flush comes back as the [`Transfer`] the queue's engine is to run;
    /// anything else is executed and completed here. Whatever the guest put
    /// in the chain, the request is completed, with an error status if need
    /// be; it is only left undone when the queue was stopped while it
    /// waited for a guest page.
    pub fn start(&self, chain: impl Iterator<Item = Descriptor>, access: &RamAccess, queue: &DeviceQueue) -> Started {
        let capacity = self.disk.capacity_bytes() / SECTOR_SIZE;
        let request = match request::parse(chain, access, capacity, self.disk.readonly()) {
            Ok(request) => request,
            Err(rejected) => return Started::Done(self.complete(rejected.status, Err(rejected.error), access, queue)),
        };
        let status = Some(request.status);
        // The status byte is written when the transfer completes: fault it
        // in now (postcopy), so that completing never waits.
        if let Err(error) = access.fault_in(&[GuestBuf { addr: request.status, len: 1 }]) {
            return Started::Done(self.complete(status, Err(error.into()), access, queue));
        }
        let (op, sector) = match request.op {
            Op::Read { sector } => (DiskOp::Read, sector),
            Op::Write { sector } => (DiskOp::Write { dsync: !self.disk.write_cache() }, sector),
            Op::Flush => return Started::Transfer(Transfer::flush(self.disk.file().as_raw_fd(), request.status)),
            Op::GetId => {
                let written = access.write_into(&request.data, &self.id).map_err(RequestError::from);
                return Started::Done(self.complete(status, written, access, queue));
            }
            Op::Discard | Op::WriteZeroes => {
                let done = self.discard_or_zero(&request, access).map(|()| 0);
                return Started::Done(self.complete(status, done, access, queue));
            }
        };
        match access.hold(&request.data) {
            Ok(held) => {
                let offset = sector * SECTOR_SIZE;
                let fd = self.disk.fd_for(held.pending(), offset);
                Started::Transfer(Transfer::data(op, fd, offset, held, request.data, request.status))
            }
            Err(error) => Started::Done(self.complete(status, Err(error.into()), access, queue)),
        }
    }

    /// Completes a transfer the engine ran, with its `result`: counts what
    /// moved (and marks it in the dirty log), writes the status.
    pub fn finish(
        &self,
        transfer: Transfer,
        result: Result<(), RequestError>,
        access: &RamAccess,
        queue: &DeviceQueue,
    ) -> Outcome {
        let written = match transfer.op() {
            DiskOp::Read => {
                // A failed read may have written any part of the buffers.
                let moved = match &result {
                    Ok(()) => transfer.done(),
                    Err(_) => transfer.bufs().iter().map(|b| u64::from(b.len)).sum(),
                };
                access.disk_wrote(transfer.bufs(), moved);
                transfer.done()
            }
            DiskOp::Write { .. } => {
                access.disk_read(transfer.done());
                0
            }
            DiskOp::Flush => 0,
        };
        self.complete(Some(transfer.status()), result.map(|()| written), access, queue)
    }

    /// Counts the request, logs its error (once per kind), writes its status.
    fn complete(
        &self,
        status_addr: Option<GuestAddress>,
        outcome: Result<u64, RequestError>,
        access: &RamAccess,
        queue: &DeviceQueue,
    ) -> Outcome {
        if matches!(outcome, Err(RequestError::Access(AccessError::Cancelled))) {
            return Outcome::Abandoned;
        }
        queue.requests.fetch_add(1, Ordering::Relaxed);
        let (status, written) = match outcome {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(error) => {
                queue.errors.fetch_add(1, Ordering::Relaxed);
                if queue.first_time(&error) {
                    log::warn!(
                        "virtio-blk request failed: {error} (further errors of this kind are logged at debug level)"
                    );
                } else {
                    log::debug!("virtio-blk request failed: {error}");
                }
                (error.status(), 0)
            }
        };
        let Some(status_addr) = status_addr else { return Outcome::Completed(0) };
        match access.write_into(&[GuestBuf { addr: status_addr, len: 1 }], &[status]) {
            // The used length is at most the chain's length, itself < 2^32.
            Ok(_) => Outcome::Completed(u32::try_from(written + 1).unwrap_or(u32::MAX)),
            Err(AccessError::Cancelled) => Outcome::Abandoned,
            Err(_) => Outcome::Completed(0),
        }
    }

    fn discard_or_zero(&self, request: &BlkRequest, access: &RamAccess) -> Result<(), RequestError> {
        // data_len was checked to be at most MAX_DISCARD_SEG segments.
        let mut segments = vec![0u8; request.data_len as usize];
        access.read_into(&request.data, &mut segments)?;
        let capacity = self.disk.capacity_bytes() / SECTOR_SIZE;
        let parsed: Vec<(u64, u64, u32)> = segments
            .chunks_exact(SEGMENT_LEN)
            .map(|s| {
                let le64 = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
                let sectors = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
                let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
                (le64, u64::from(sectors), flags)
            })
            .collect();
        // Validate every segment before touching the disk: all or nothing.
        const UNMAP: u32 = 1;
        for &(sector, sectors, flags) in &parsed {
            let allowed = if request.op == Op::WriteZeroes { UNMAP } else { 0 };
            if flags & !allowed != 0 {
                return Err(RequestError::UnsupportedFlags(flags));
            }
            check_range(sector, sectors, capacity)?;
        }
        for (sector, sectors, flags) in parsed {
            let (offset, len) = (sector * SECTOR_SIZE, sectors * SECTOR_SIZE);
            match request.op {
                Op::Discard => self.disk.discard(offset, len)?,
                _ => self.disk.write_zeroes(offset, len, flags & UNMAP != 0)?,
            }
        }
        Ok(())
    }
}
