//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for split
//! rings, laid out and driven as QEMU's docs/interop/vhost-user.rst,
//! "Inflight I/O tracking", describes.
//!
//! The region is a memfd gmemd creates (GET_INFLIGHT_FD) and the frontend
//! keeps; a frontend that reconnects to a restarted gmemd sends it back
//! (SET_INFLIGHT_FD), and the requests it records as in flight are run
//! again, in the order they were fetched. Per queue:
//!
//! ```text
//!  offset 0   u64 features   (0)
//!         8   u16 version    (1; 0 = not yet initialised)
//!        10   u16 desc_num   (descriptors covered: the queue size)
//!        12   u16 last_batch_head
//!        14   u16 used_idx   (the used ring's idx once the last batch is done)
//!        16   desc[desc_num] of 16 bytes: u8 inflight, 5 pad, u16 next, u64 counter
//! ```
//!
//! The header is 16 bytes and the descriptor array starts right after it,
//! as the spec's flexible array member does (the vhost crate's
//! `QueueRegionSplit` puts an 8-byte field there instead: rust-vmm/vhost
//! #356). Each queue's part is rounded up to 64 bytes.
//!
//! gmemd publishes used entries one at a time, so a batch is one
//! descriptor: `last_batch_head` names it between the used-ring update and
//! the clearing of its flag, which is all a restart needs to repair.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::mmap::{MmapRegion, MmapRegionError};
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 16;
const QUEUE_ALIGN: usize = 64;
const VERSION: u16 = 1;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_NEXT: usize = 6;
const DESC_OFF_COUNTER: usize = 8;

/// Errors creating or using an inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Zero queues or descriptors, or sizes that overflow.
    #[error("an inflight region of {num_queues} queues of {queue_size} descriptors cannot be made")]
    BadShape { num_queues: u16, queue_size: u16 },
    /// The region the frontend sent is smaller than its shape needs.
    #[error("the inflight region holds {got} bytes; {num_queues} queues of {queue_size} need {want}")]
    TooSmall { got: u64, want: u64, num_queues: u16, queue_size: u16 },
    /// Its file is too short or could shrink under gmemd.
    #[error("the inflight region's fd: {0}")]
    File(#[from] crate::sys::SharedFileError),
    /// memfd_create, ftruncate or sealing failed.
    #[error("creating the inflight region: {0}")]
    Create(#[from] std::io::Error),
    /// mmap failed.
    #[error("mapping the inflight region: {0}")]
    Map(#[from] MmapRegionError),
    /// A queue the region does not cover.
    #[error(
        "the inflight region covers {num_queues} queues of {queue_size} descriptors, not queue {index} of {ring_size}"
    )]
    NotCovered { index: u16, ring_size: u16, num_queues: u16, queue_size: u16 },
}

/// Bytes of one queue's part of the region.
pub fn queue_region_len(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// One connection's inflight region.
#[derive(Debug)]
pub struct InflightRegion {
    /// The mapping also holds the region's fd (its `FileOffset`).
    mapping: MmapRegion,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a new, zeroed region in a memfd sealed against
    /// resizing, as QEMU's and libvhost-user's are.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        let len = Self::len_for(num_queues, queue_size)?;
        let file = crate::sys::memfd("gmemd-inflight", libc::MFD_ALLOW_SEALING)?;
        file.set_len(len as u64)?;
        crate::sys::add_seals(&file, libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL)?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, 0), len)?;
        Ok(InflightRegion { mapping, num_queues, queue_size })
    }

    /// SET_INFLIGHT_FD: maps the region the frontend kept, after checking
    /// that it covers `num_queues` of `queue_size` and cannot shrink.
    pub fn map(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let want = Self::len_for(num_queues, queue_size)?;
        let len = usize::try_from(mmap_size).map_err(|_| InflightError::BadShape { num_queues, queue_size })?;
        if len < want {
            return Err(InflightError::TooSmall { got: mmap_size, want: want as u64, num_queues, queue_size });
        }
        let end = mmap_offset.checked_add(mmap_size).ok_or(InflightError::BadShape { num_queues, queue_size })?;
        crate::sys::require_sealed_size(&file, end)?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, mmap_offset), len)?;
        Ok(InflightRegion { mapping, num_queues, queue_size })
    }

    fn len_for(num_queues: u16, queue_size: u16) -> Result<usize, InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::BadShape { num_queues, queue_size });
        }
        Ok(queue_region_len(queue_size) * usize::from(num_queues))
    }

    /// The fd, its mapped size and offset, and the shape: what GET_INFLIGHT_FD
    /// replies and a handover record keeps.
    pub fn describe(&self) -> (std::os::fd::RawFd, u64, u64, u16, u16) {
        use std::os::fd::AsRawFd;
        let (fd, offset) = self.mapping.file_offset().map_or((-1, 0), |f| (f.file().as_raw_fd(), f.start()));
        (fd, self.mapping.size() as u64, offset, self.num_queues, self.queue_size)
    }

    /// The part of the region for queue `index`, whose ring has `ring_size`
    /// descriptors.
    pub fn queue(self: &Arc<Self>, index: u16, ring_size: u16) -> Result<InflightQueue, InflightError> {
        if index >= self.num_queues || ring_size > self.queue_size {
            let (num_queues, queue_size) = (self.num_queues, self.queue_size);
            return Err(InflightError::NotCovered { index, ring_size, num_queues, queue_size });
        }
        let offset = queue_region_len(self.queue_size) * usize::from(index);
        Ok(InflightQueue { region: Arc::clone(self), offset, ring_size, counter: 0 })
    }
}

/// One queue's inflight state, owned by the queue's worker.
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    offset: usize,
    ring_size: u16,
    /// The order in which descriptors were fetched.
    counter: u64,
}

impl InflightQueue {
    fn mem(&self) -> VolatileSlice<'_> {
        self.region.mapping.as_volatile_slice()
    }

    // Every offset below is inside the queue's part, which the region was
    // checked to hold, so the accesses cannot fail; they are atomic
    // because the frontend shares the memory.
    fn load<T: vm_memory::AtomicAccess + Default>(&self, at: usize) -> T {
        self.mem().load(self.offset + at, Ordering::Acquire).unwrap_or_default()
    }

    fn store<T: vm_memory::AtomicAccess>(&self, at: usize, value: T) {
        let _ = self.mem().store(value, self.offset + at, Ordering::Release);
    }

    fn desc(head: u16) -> usize {
        HEADER_LEN + DESC_LEN * usize::from(head)
    }

    /// Brings the region in step with the used ring, whose idx is
    /// `used_idx` now, and returns the descriptor heads still in flight,
    /// in the order they were fetched: they run again before anything
    /// else. A region never used before is initialised instead.
    pub fn recover(&mut self, used_idx: u16) -> Vec<u16> {
        if self.load::<u16>(OFF_VERSION) != VERSION {
            let len = queue_region_len(self.region.queue_size);
            let _ = self.mem().get_slice(self.offset, len).map(|s| s.write_slice(&vec![0u8; len], 0));
            self.store(OFF_DESC_NUM, self.region.queue_size);
            self.store(OFF_USED_IDX, used_idx);
            self.store(OFF_VERSION, VERSION);
            return Vec::new();
        }
        if self.load::<u16>(OFF_USED_IDX) != used_idx {
            // The last entry reached the used ring but its flag was not
            // cleared yet: it is done, not in flight.
            let head = self.load::<u16>(OFF_LAST_BATCH_HEAD);
            if head < self.region.queue_size {
                self.store(Self::desc(head) + DESC_OFF_INFLIGHT, 0u8);
            }
            self.store(OFF_USED_IDX, used_idx);
        }
        let mut in_flight: Vec<(u64, u16)> = (0..self.ring_size)
            .filter(|head| self.load::<u8>(Self::desc(*head) + DESC_OFF_INFLIGHT) == 1)
            .map(|head| (self.load::<u64>(Self::desc(head) + DESC_OFF_COUNTER), head))
            .collect();
        in_flight.sort_unstable();
        self.counter = in_flight.last().map_or(0, |(counter, _)| counter + 1);
        in_flight.into_iter().map(|(_, head)| head).collect()
    }

    /// A descriptor chain headed by `head` was fetched and will run.
    pub fn fetched(&mut self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        self.store(Self::desc(head) + DESC_OFF_COUNTER, self.counter);
        self.counter += 1;
        self.store(Self::desc(head) + DESC_OFF_INFLIGHT, 1u8);
    }

    /// `head`'s used entry is about to be published.
    pub fn publishing(&self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        self.store(Self::desc(head) + DESC_OFF_NEXT, self.load::<u16>(OFF_LAST_BATCH_HEAD));
        self.store(OFF_LAST_BATCH_HEAD, head);
    }

    /// `head`'s used entry is published and the used ring's idx is `used_idx`.
    pub fn published(&self, head: u16, used_idx: u16) {
        if head < self.ring_size {
            self.store(Self::desc(head) + DESC_OFF_INFLIGHT, 0u8);
        }
        self.store(OFF_USED_IDX, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// What the frontend does with the fd it was given: opens it again.
    fn open(fd: std::os::fd::RawFd) -> File {
        std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/self/fd/{fd}")).expect("open")
    }

    fn reopen(region: &InflightRegion) -> Arc<InflightRegion> {
        let (fd, size, offset, queues, queue_size) = region.describe();
        let file = open(fd);
        Arc::new(InflightRegion::map(file, size, offset, queues, queue_size).expect("map"))
    }

    #[test]
    fn the_layout_is_the_specs() {
        assert_eq!(queue_region_len(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_region_len(3), 64);
        let region = Arc::new(InflightRegion::create(2, 4).expect("create"));
        let mut queue = region.queue(1, 4).expect("queue 1");
        assert!(queue.recover(7).is_empty(), "a fresh region has nothing in flight");
        queue.fetched(2);
        let (fd, _, _, _, _) = region.describe();
        let file = open(fd);
        let mut bytes = [0u8; 128];
        file.read_exact_at(&mut bytes, queue_region_len(4) as u64).expect("read queue 1");
        assert_eq!(u16::from_ne_bytes([bytes[8], bytes[9]]), 1, "version");
        assert_eq!(u16::from_ne_bytes([bytes[10], bytes[11]]), 4, "desc_num");
        assert_eq!(u16::from_ne_bytes([bytes[14], bytes[15]]), 7, "used_idx");
        assert_eq!(bytes[16 + 2 * 16], 1, "desc[2].inflight, right after the 16-byte header");
    }

    #[test]
    fn a_restart_runs_again_exactly_what_was_in_flight_in_fetch_order() {
        let region = Arc::new(InflightRegion::create(1, 8).expect("create"));
        let mut queue = region.queue(0, 8).expect("queue");
        queue.recover(0);
        for head in [5, 1, 6, 3] {
            queue.fetched(head);
        }
        // 1 completes out of order.
        queue.publishing(1);
        queue.published(1, 1);
        // 6 reaches the used ring (idx 2) and then gmemd dies before its
        // flag is cleared.
        queue.publishing(6);
        drop(queue);
        let again = reopen(&region);
        let mut queue = again.queue(0, 8).expect("queue");
        assert_eq!(queue.recover(2), [5, 3], "1 and 6 are done; 5 then 3 run again");
        queue.fetched(7);
        assert_eq!(queue.recover(2), [5, 3, 7], "fetched later, so after them");
    }

    #[test]
    fn regions_too_small_or_not_covering_the_queue_are_refused() {
        let region = InflightRegion::create(1, 8).expect("create");
        let (fd, size, _, _, _) = region.describe();
        let file = || open(fd);
        assert!(matches!(InflightRegion::map(file(), size, 0, 2, 8), Err(InflightError::TooSmall { .. })));
        assert!(matches!(InflightRegion::map(file(), size, 0, 0, 8), Err(InflightError::BadShape { .. })));
        let tmp = tempfile::tempfile().expect("tmp");
        tmp.set_len(size).expect("size");
        assert!(matches!(InflightRegion::map(tmp, size, 0, 1, 8), Err(InflightError::File(_))), "could shrink");
        let region = Arc::new(region);
        assert!(region.queue(1, 8).is_err());
        assert!(region.queue(0, 16).is_err());
    }
}
