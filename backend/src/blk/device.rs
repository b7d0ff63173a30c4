//! `BlkDevice`: executes parsed requests and keeps per-queue figures.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK};
use virtio_queue::desc::split::Descriptor;

use super::config::{BlkConfig, SECTOR_SIZE};
use super::disk::{Disk, DiskError};
use super::request::{self, check_range, BlkRequest, Op, RequestError, SEGMENT_LEN};
use crate::memory::{AccessCounters, AccessError, GuestBuf, RamAccess};

/// What the device is built from (`--disk`, `--readonly`, `--queues`, `--serial`).
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

/// The virtio-blk device.
#[derive(Debug)]
pub struct BlkDevice {
    disk: Disk,
    config: BlkConfig,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    queues: Vec<DeviceQueue>,
}

impl BlkDevice {
    /// Opens the disk and sets up `options.queues` queues.
    pub fn new(options: &DeviceOptions) -> Result<Self, DiskError> {
        Ok(Self::with_disk(Disk::open(&options.disk, options.readonly)?, options))
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
        BlkDevice { disk, config, id, queues }
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

    /// Parses and executes one request from `chain` on queue `queue` and
    /// writes its status. Whatever the guest put in the chain, the request
    /// is completed, with an error status if need be; it is only left
    /// undone when the queue was stopped while it waited for a guest page.
    pub fn handle(&self, chain: impl Iterator<Item = Descriptor>, access: &RamAccess, queue: &DeviceQueue) -> Outcome {
        let capacity = self.disk.capacity_bytes() / SECTOR_SIZE;
        let (status_addr, outcome) = match request::parse(chain, access, capacity, self.disk.readonly()) {
            Ok(request) => (Some(request.status), self.execute(&request, access)),
            Err(rejected) => (rejected.status, Err(rejected.error)),
        };
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

    /// Executes a valid request; returns the data bytes written to the guest.
    fn execute(&self, request: &BlkRequest, access: &RamAccess) -> Result<u64, RequestError> {
        let file = self.disk.file();
        match request.op {
            Op::Read { sector } => Ok(access.disk_to_guest(&request.data, file, sector * SECTOR_SIZE)?),
            Op::Write { sector } => {
                access.guest_to_disk(&request.data, file, sector * SECTOR_SIZE)?;
                Ok(0)
            }
            Op::Flush => {
                self.disk.flush()?;
                Ok(0)
            }
            Op::GetId => Ok(access.write_into(&request.data, &self.id)?),
            Op::Discard | Op::WriteZeroes => {
                self.discard_or_zero(request, access)?;
                Ok(0)
            }
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
