//! `RamAccess`: the one path through which the device data path touches
//! guest RAM.
//!
//! Every request buffer is checked against the current memory table before
//! the request runs and resolved to host iovecs held in a [`HeldBufs`]
//! guard, which keeps the memory table's mappings alive until the disk
//! operation on them has completed; the disk moves the data straight
//! between the image and guest RAM (no bounce buffer). Every byte is counted,
//! so `query-device` can tell what the device did to guest memory. Migration
//! hooks live here too: every write is marked in the dirty log, and during
//! postcopy every page is faulted in (and timed) before the transfer. Ring
//! bookkeeping (descriptors, avail, used) goes through virtio-queue on the
//! same `GuestRam`, whose views bound every access; the worker reports its
//! used-ring writes through [`RamAccess::ring_written`].

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gmem_attributes::{Denied, RangeRef, RefShard, RegionAttributes};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::GuestRam;
use crate::migration::{MissingPage, Tracking};

/// How many bytes moved between the device and guest RAM.
#[derive(Debug, Default)]
pub struct AccessCounters {
    to_guest: AtomicU64,
    from_guest: AtomicU64,
}

impl AccessCounters {
    /// Bytes the device wrote into guest RAM.
    pub fn bytes_to_guest(&self) -> u64 {
        self.to_guest.load(Ordering::Relaxed)
    }

    /// Bytes the device read from guest RAM.
    pub fn bytes_from_guest(&self) -> u64 {
        self.from_guest.load(Ordering::Relaxed)
    }

    /// Goes on from the figures of a previous program (exec upgrade).
    pub fn carry_on(&self, to_guest: u64, from_guest: u64) {
        self.to_guest.fetch_add(to_guest, Ordering::Relaxed);
        self.from_guest.fetch_add(from_guest, Ordering::Relaxed);
    }
}

/// A guest buffer named by a descriptor: guest-physical address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuf {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Why an access to guest RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Part of the range is not in the frontend's memory table.
    #[error("guest range {addr:#x}+{len:#x} is not guest RAM")]
    NotRam { addr: u64, len: u64 },
    /// A postcopy page the request needs will not arrive.
    #[error(transparent)]
    Missing(#[from] MissingPage),
    /// The queue was stopped while the request waited for a page; nothing
    /// was moved.
    #[error("the queue was stopped while the request waited for a guest page")]
    Cancelled,
    /// Part of the range is private guest memory: the device may not touch it.
    #[error("guest range {addr:#x}+{len:#x} is private memory")]
    Private { addr: u64, len: u64 },
    /// Part of the range was still being converted to private after waiting.
    #[error("guest range {addr:#x}+{len:#x} is being converted to private")]
    Converting { addr: u64, len: u64 },
    /// More references than the worker's shard holds: more buffers in
    /// flight than the queue can have.
    #[error("more than {0} guest buffers referenced at once")]
    TooManyReferences(usize),
}

/// How long a request waits for a conversion of one of its buffers to end
/// (a conversion with `wait-ms` holds new references off while it waits).
const CONVERSION_WAIT: Duration = Duration::from_secs(1);

/// One queue worker's references on guest RAM (see `gmem_attributes`): a
/// shard per own region it touches, made when first needed. Taking a
/// reference before touching a range, and checking the range is shared, is
/// what keeps the device out of private memory.
#[derive(Debug)]
pub struct RangeRefs {
    slots: usize,
    shards: RefCell<Vec<RefShard>>,
}

impl RangeRefs {
    /// References for a worker that has at most `slots` buffers in use at once.
    pub fn new(slots: usize) -> Self {
        RangeRefs { slots, shards: RefCell::default() }
    }

    fn acquire(&self, attributes: &RegionAttributes, offset: u64, len: u64) -> Result<RangeRef, Denied> {
        let mut shards = self.shards.borrow_mut();
        let index = match shards.iter().position(|s| s.region().is(attributes)) {
            Some(index) => index,
            None => {
                shards.push(attributes.shard(self.slots));
                shards.len() - 1
            }
        };
        shards[index].acquire_wait(offset, len, CONVERSION_WAIT)
    }
}

/// Linux's IOV_MAX: the most iovecs one readv/writev takes.
pub const IOV_MAX: usize = 1024;

/// Guest buffers resolved to host iovecs, and the memory table snapshot
/// that maps them: while this lives, the iovecs point into mapped guest
/// RAM, whatever table the frontend sets meanwhile. A transfer that moved
/// only part of them goes on from where it stopped ([`HeldBufs::advance`]).
#[derive(Debug)]
pub struct HeldBufs {
    iovecs: Vec<libc::iovec>,
    /// The first iovec not wholly moved yet.
    first: usize,
    /// References on the ranges: none of them turns private meanwhile.
    _refs: Vec<RangeRef>,
    _ram: Arc<GuestRam>,
}

// SAFETY: the iovecs point into mappings that `_ram` keeps alive; guest RAM
// is shared memory that any thread may access, and nothing else aliases
// these raw pointers as Rust references.
unsafe impl Send for HeldBufs {}

impl HeldBufs {
    /// The iovecs still to move, at most [`IOV_MAX`] of them.
    pub fn pending(&self) -> &[libc::iovec] {
        &self.iovecs[self.first..self.iovecs.len().min(self.first + IOV_MAX)]
    }

    /// The bytes still to move.
    pub fn len(&self) -> u64 {
        self.iovecs[self.first..].iter().map(|iov| iov.iov_len as u64).sum()
    }

    /// Whether every byte has moved.
    pub fn is_empty(&self) -> bool {
        self.first == self.iovecs.len()
    }

    /// `n` more bytes moved, at most what [`pending`](Self::pending) holds.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.first < self.iovecs.len() {
            let iov = &mut self.iovecs[self.first];
            let step = n.min(iov.iov_len);
            // SAFETY: `step` is within the iovec, so the new base stays
            // inside the same checked guest range.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(step).cast() };
            iov.iov_len -= step;
            n -= step;
            if iov.iov_len == 0 {
                self.first += 1;
            }
        }
    }
}

/// Checked, counted access to one `GuestRam` snapshot.
#[derive(Debug)]
pub struct RamAccess<'a> {
    ram: &'a Arc<GuestRam>,
    counters: &'a AccessCounters,
    tracking: &'a Tracking,
    /// Set when the queue is stopped: a request that waited on a postcopy
    /// page moves no data once it wakes.
    stopped: Option<&'a AtomicBool>,
    /// The worker's references; without them, private memory is not
    /// checked for (tests of the access path alone).
    refs: Option<&'a RangeRefs>,
}

impl<'a> RamAccess<'a> {
    /// Access to `ram`, counted in `counters`, with migration `tracking`.
    pub fn new(ram: &'a Arc<GuestRam>, counters: &'a AccessCounters, tracking: &'a Tracking) -> Self {
        RamAccess { ram, counters, tracking, stopped: None, refs: None }
    }

    /// The same access, taking a reference on every own-region range before
    /// touching it and refusing private ones.
    pub fn referenced_by(self, refs: &'a RangeRefs) -> Self {
        RamAccess { refs: Some(refs), ..self }
    }

    /// References the own-region ranges of `bufs`, each checked to be
    /// shared; foreign memory has no attributes.
    pub fn reference(&self, bufs: &[GuestBuf]) -> Result<Vec<RangeRef>, AccessError> {
        let Some(refs) = self.refs else { return Ok(Vec::new()) };
        let mut taken = Vec::with_capacity(bufs.len());
        for buf in bufs {
            let not_ram = || AccessError::NotRam { addr: buf.addr.0, len: u64::from(buf.len) };
            let end = buf.addr.0.checked_add(u64::from(buf.len)).ok_or_else(not_ram)?;
            let mut addr = buf.addr.0;
            while addr < end {
                let view = self.ram.find_region(GuestAddress(addr)).ok_or_else(not_ram)?;
                let view_end = view.desc().gpa + vm_memory::GuestMemoryRegion::len(view);
                let part = end.min(view_end) - addr;
                if let Some((attributes, start)) = view.attributes() {
                    let offset = start + (addr - view.desc().gpa);
                    let reference = refs.acquire(attributes, offset, part).map_err(|denied| match denied {
                        Denied::Private { offset: at } => {
                            AccessError::Private { addr: addr + (at - offset), len: end - addr - (at - offset) }
                        }
                        Denied::Converting => AccessError::Converting { addr, len: part },
                        Denied::Full(slots) => AccessError::TooManyReferences(slots),
                        Denied::OutOfRange { .. } => not_ram(),
                    })?;
                    taken.push(reference);
                }
                addr += part;
            }
        }
        Ok(taken)
    }

    /// The same access, for a queue whose stop flag is `stopped`.
    pub fn stopped_by(self, stopped: &'a AtomicBool) -> Self {
        RamAccess { stopped: Some(stopped), ..self }
    }

    /// The worker wrote `len` bytes of ring bookkeeping at `addr` (the used
    /// ring): logged like any other device write.
    pub fn ring_written(&self, addr: GuestAddress, len: u64) {
        self.tracking.log.mark(addr.0, len);
    }

    /// During postcopy, faults in the pages of `bufs` that have not arrived.
    pub fn fault_in(&self, bufs: &[GuestBuf]) -> Result<(), AccessError> {
        if !self.tracking.stats.faults_possible() {
            return Ok(());
        }
        self.await_pages(&self.iovecs(bufs)?)
    }

    /// Faults in the pages of `iovecs` that have not arrived; then, if the
    /// queue was stopped meanwhile, gives up.
    fn await_pages(&self, iovecs: &[libc::iovec]) -> Result<(), AccessError> {
        self.tracking.before_access(iovecs)?;
        if self.stopped.is_some_and(|s| s.load(Ordering::Acquire)) {
            return Err(AccessError::Cancelled);
        }
        Ok(())
    }

    fn wrote(&self, bufs: &[GuestBuf], mut bytes: u64) {
        self.counters.to_guest.fetch_add(bytes, Ordering::Relaxed);
        for buf in bufs {
            let len = bytes.min(u64::from(buf.len));
            if len == 0 {
                break;
            }
            self.tracking.device_wrote(buf.addr.0, len);
            bytes -= len;
        }
    }

    /// Checks that the whole of `buf` is guest RAM.
    pub fn check(&self, buf: GuestBuf) -> Result<(), AccessError> {
        self.iovecs(&[buf]).map(drop)
    }

    /// Copies guest bytes from `bufs`, in order, into `out` (a request
    /// header, discard segments). `bufs` must hold exactly `out.len()` bytes.
    pub fn read_into(&self, bufs: &[GuestBuf], out: &mut [u8]) -> Result<(), AccessError> {
        let _refs = self.reference(bufs)?;
        self.fault_in(bufs)?;
        let mut done = 0usize;
        for buf in bufs {
            let len = buf.len as usize;
            let chunk =
                out.get_mut(done..done + len).ok_or(AccessError::NotRam { addr: buf.addr.0, len: len as u64 })?;
            self.ram
                .read_slice(chunk, buf.addr)
                .map_err(|_| AccessError::NotRam { addr: buf.addr.0, len: len as u64 })?;
            done += len;
        }
        self.counters.from_guest.fetch_add(done as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Copies `bytes` into the guest buffers, in order, up to the shorter of
    /// the two (a status byte, a device id). Returns the bytes written.
    pub fn write_into(&self, bufs: &[GuestBuf], bytes: &[u8]) -> Result<u64, AccessError> {
        let _refs = self.reference(bufs)?;
        self.fault_in(bufs)?;
        let mut done = 0usize;
        let mut result = Ok(());
        for buf in bufs {
            let len = (buf.len as usize).min(bytes.len() - done);
            if len == 0 {
                break;
            }
            if self.ram.write_slice(&bytes[done..done + len], buf.addr).is_err() {
                // vm-memory may have written the part before a hole.
                self.tracking.log.mark(buf.addr.0, len as u64);
                result = Err(AccessError::NotRam { addr: buf.addr.0, len: len as u64 });
                break;
            }
            done += len;
        }
        // Also when a later buffer failed: what was written must be logged.
        self.wrote(bufs, done as u64);
        result.map(|()| done as u64)
    }

    /// Resolves `bufs` for a disk transfer, faulting in (during postcopy)
    /// pages that have not arrived; the guard keeps them mapped until the
    /// transfer is over.
    pub fn hold(&self, bufs: &[GuestBuf]) -> Result<HeldBufs, AccessError> {
        let refs = self.reference(bufs)?;
        let iovecs = self.iovecs(bufs)?;
        if self.tracking.stats.faults_possible() {
            self.await_pages(&iovecs)?;
        }
        let first = iovecs.iter().position(|iov| iov.iov_len > 0).unwrap_or(iovecs.len());
        Ok(HeldBufs { iovecs, first, _refs: refs, _ram: Arc::clone(self.ram) })
    }

    /// The disk wrote `bytes` into `bufs` (a read request): counted, and
    /// marked in the dirty log. A failed read may have written part of the
    /// buffers, so the caller passes their whole length then.
    pub fn disk_wrote(&self, bufs: &[GuestBuf], bytes: u64) {
        self.wrote(bufs, bytes);
    }

    /// The disk read `bytes` from guest buffers (a write request).
    pub fn disk_read(&self, bytes: u64) {
        self.counters.from_guest.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Resolves guest buffers to host iovecs, refusing any byte that is not
    /// guest RAM. A buffer that spans two adjacent views yields two iovecs.
    fn iovecs(&self, bufs: &[GuestBuf]) -> Result<Vec<libc::iovec>, AccessError> {
        let mut iovecs = Vec::with_capacity(bufs.len());
        for buf in bufs {
            let not_ram = || AccessError::NotRam { addr: buf.addr.0, len: u64::from(buf.len) };
            let mut covered = 0usize;
            for slice in self.ram.get_slices(buf.addr, buf.len as usize) {
                let slice = slice.map_err(|_| not_ram())?;
                iovecs.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
                covered += slice.len();
            }
            if covered != buf.len as usize {
                return Err(not_ram());
            }
        }
        Ok(iovecs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    use crate::memory::{MemRegionDesc, MemoryTable, RegionSet, RegionSpec};

    /// Guest RAM with two views that touch at 1 MiB, and a hole at 2 MiB.
    fn ram() -> (RegionSet, GuestRam) {
        let regions = RegionSet::create(vec![RegionSpec::memfd("r", 4 << 20)]).expect("regions");
        let region = regions.iter().next().expect("region");
        let open = || std::fs::OpenOptions::new().read(true).write(true).open(region.fd_path()).expect("open");
        let mut table = MemoryTable::default();
        let d = |gpa, off| MemRegionDesc { gpa, size: 1 << 20, frontend_addr: gpa, mmap_offset: off };
        table.add(&regions, d(0, 3 << 20), open(), false).expect("a");
        table.add(&regions, d(1 << 20, 0), open(), false).expect("b");
        let ram = table.guest_ram();
        (regions, ram)
    }

    #[test]
    fn held_buffers_span_views_and_outlive_the_table() {
        let (_regions, ram) = ram();
        let ram = Arc::new(ram);
        let counters = AccessCounters::default();
        let tracking = Tracking::new(Arc::default(), false);
        let disk = tempfile::tempfile().expect("disk");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        disk.write_all_at(&data, 0).expect("fill");
        // One buffer straddling the views' boundary, one small one elsewhere.
        let bufs = [
            GuestBuf { addr: GuestAddress((1 << 20) - 4096), len: 6144 },
            GuestBuf { addr: GuestAddress(0x2000), len: 2048 },
        ];
        let mut held = RamAccess::new(&ram, &counters, &tracking).hold(&bufs).expect("hold");
        assert_eq!((held.pending().len(), held.len()), (3, 8192), "the straddling buffer is two iovecs");
        // The guard alone keeps the mappings: the table snapshot is gone here.
        drop(ram);
        let iovecs = held.pending().to_vec();
        // SAFETY: the iovecs point into guest RAM that `held` keeps mapped.
        let n = unsafe { libc::preadv(disk.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as i32, 0) };
        assert_eq!(n, 8192);
        let first = iovecs[0];
        // SAFETY: as above; the first iovec is at least one byte long.
        assert_eq!(unsafe { *first.iov_base.cast::<u8>() }, data[0]);
        // Moving part of the second iovec leaves the rest of it pending.
        held.advance(4096 + 100);
        assert_eq!((held.pending().len(), held.len()), (2, 8192 - 4196));
        assert_eq!(held.pending()[0].iov_base as usize, iovecs[1].iov_base as usize + 100);
        held.advance(8192);
        assert!(held.is_empty() && held.pending().is_empty());
    }

    #[test]
    fn what_the_disk_moved_is_counted() {
        let (_regions, ram) = ram();
        let ram = Arc::new(ram);
        let counters = AccessCounters::default();
        let tracking = Tracking::new(Arc::default(), false);
        let access = RamAccess::new(&ram, &counters, &tracking);
        access.disk_wrote(&[GuestBuf { addr: GuestAddress(0), len: 4096 }], 4096);
        access.disk_read(512);
        assert_eq!((counters.bytes_to_guest(), counters.bytes_from_guest()), (4096, 512));
    }

    #[test]
    fn every_device_write_is_marked_in_the_dirty_log() {
        let (_regions, ram) = ram();
        let counters = AccessCounters::default();
        let tracking = Tracking::new(Arc::default(), false);
        let log_file = crate::sys::memfd("log", libc::MFD_ALLOW_SEALING).expect("memfd");
        log_file.set_len(128).expect("size");
        tracking.log.set_base(log_file.try_clone().expect("dup"), 128, 0).expect("map");
        tracking.log.set_enabled(true);
        let ram = Arc::new(ram);
        let access = RamAccess::new(&ram, &counters, &tracking);
        let page = |n: u64| GuestAddress(n * 4096);
        // Disk reads into pages 3-4 and 9; a status byte into page 20; a
        // write to disk (the device only reads RAM) from page 30.
        let read = [GuestBuf { addr: GuestAddress(3 * 4096 + 100), len: 4096 }, GuestBuf { addr: page(9), len: 512 }];
        access.disk_wrote(&read, 4096 + 512);
        access.write_into(&[GuestBuf { addr: page(20), len: 1 }], &[0]).expect("status");
        access.disk_read(4096);
        access.ring_written(page(40), 6);
        let mut bitmap = [0u8; 8];
        log_file.read_exact_at(&mut bitmap, 0).expect("read log");
        let marked: Vec<u64> = (0..64).filter(|p| bitmap[(p / 8) as usize] & (1 << (p % 8)) != 0).collect();
        assert_eq!(marked, [3, 4, 9, 20, 40]);
    }

    #[test]
    fn ranges_outside_ram_are_refused_before_any_io() {
        let (_regions, ram) = ram();
        let counters = AccessCounters::default();
        let tracking = Tracking::new(Arc::default(), false);
        let ram = Arc::new(ram);
        let access = RamAccess::new(&ram, &counters, &tracking);
        for buf in [
            GuestBuf { addr: GuestAddress((2 << 20) - 10), len: 20 },
            GuestBuf { addr: GuestAddress(u64::MAX - 5), len: 100 },
            GuestBuf { addr: GuestAddress(5 << 20), len: 1 },
        ] {
            assert!(matches!(access.check(buf), Err(AccessError::NotRam { .. })));
            let good = GuestBuf { addr: GuestAddress(0), len: 512 };
            assert!(access.hold(&[good, buf]).is_err());
        }
        let hole = GuestBuf { addr: GuestAddress(2 << 20), len: 1 };
        assert!(access.write_into(&[hole], &[1]).is_err());
        let mut byte = [0u8];
        assert!(access.read_into(&[hole], &mut byte).is_err());
    }
}
