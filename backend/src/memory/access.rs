//! `RamAccess`: the one path through which the device data path touches
//! guest RAM.
//!
//! Every request buffer is checked against the current memory table before
//! the request runs and is then moved with `preadv`/`pwritev` straight
//! between the disk and guest RAM (no bounce buffer). Every byte is counted,
//! so `query-device` can tell what the device did to guest memory. Migration
//! hooks live here too: every write is marked in the dirty log, and during
//! postcopy every page is faulted in (and timed) before the transfer. Ring
//! bookkeeping (descriptors, avail, used) goes through virtio-queue on the
//! same `GuestRam`, whose views bound every access; the worker reports its
//! used-ring writes through [`RamAccess::ring_written`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// The disk I/O failed.
    #[error("disk I/O: {0}")]
    Io(#[from] io::Error),
    /// The disk ended before the transfer did (the image shrank under us).
    #[error("disk I/O stopped after {done} of {wanted} bytes")]
    Short { done: u64, wanted: u64 },
    /// A postcopy page the request needs will not arrive.
    #[error(transparent)]
    Missing(#[from] MissingPage),
    /// The queue was stopped while the request waited for a page; nothing
    /// was moved.
    #[error("the queue was stopped while the request waited for a guest page")]
    Cancelled,
}

/// Checked, counted access to one `GuestRam` snapshot.
#[derive(Debug)]
pub struct RamAccess<'a> {
    ram: &'a GuestRam,
    counters: &'a AccessCounters,
    tracking: &'a Tracking,
    /// Set when the queue is stopped: a request that waited on a postcopy
    /// page moves no data once it wakes.
    stopped: Option<&'a AtomicBool>,
}

/// Linux's IOV_MAX: the most iovecs one preadv/pwritev takes.
const IOV_MAX: usize = 1024;

impl<'a> RamAccess<'a> {
    /// Access to `ram`, counted in `counters`, with migration `tracking`.
    pub fn new(ram: &'a GuestRam, counters: &'a AccessCounters, tracking: &'a Tracking) -> Self {
        RamAccess { ram, counters, tracking, stopped: None }
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
    fn fault_in(&self, bufs: &[GuestBuf]) -> Result<(), AccessError> {
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

    /// Reads the disk at `offset` into the guest buffers, in order.
    pub fn disk_to_guest(&self, bufs: &[GuestBuf], disk: &File, offset: u64) -> Result<u64, AccessError> {
        let done = self.transfer(bufs, disk, offset, Direction::DiskToGuest);
        match &done {
            Ok(done) => self.wrote(bufs, *done),
            // A failed read may still have written part of the buffers.
            Err(_) => bufs.iter().for_each(|b| self.tracking.log.mark(b.addr.0, u64::from(b.len))),
        }
        done
    }

    /// Writes the guest buffers, in order, to the disk at `offset`.
    pub fn guest_to_disk(&self, bufs: &[GuestBuf], disk: &File, offset: u64) -> Result<u64, AccessError> {
        let done = self.transfer(bufs, disk, offset, Direction::GuestToDisk)?;
        self.counters.from_guest.fetch_add(done, Ordering::Relaxed);
        Ok(done)
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

    fn transfer(&self, bufs: &[GuestBuf], disk: &File, offset: u64, direction: Direction) -> Result<u64, AccessError> {
        let mut iovecs = self.iovecs(bufs)?;
        if self.tracking.stats.faults_possible() {
            self.await_pages(&iovecs)?;
        }
        let wanted: u64 = iovecs.iter().map(|iov| iov.iov_len as u64).sum();
        let mut done = 0u64;
        let mut first = 0usize;
        while first < iovecs.len() {
            let batch = &iovecs[first..iovecs.len().min(first + IOV_MAX)];
            let position = libc::off_t::try_from(offset + done)
                .map_err(|_| AccessError::Io(io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
            // The batch is at most IOV_MAX long.
            let count = libc::c_int::try_from(batch.len())
                .map_err(|_| AccessError::Io(io::Error::from_raw_os_error(libc::EINVAL)))?;
            // SAFETY: every iovec points into a live mapping of guest RAM held
            // by `self.ram` for the duration of the call, and lies within the
            // bounds `get_slices` checked. The kernel reads or writes only
            // those ranges; guest RAM is shared memory that any content may
            // occupy, so no Rust invariant depends on it.
            let n = unsafe {
                match direction {
                    Direction::DiskToGuest => libc::preadv(disk.as_raw_fd(), batch.as_ptr(), count, position),
                    Direction::GuestToDisk => libc::pwritev(disk.as_raw_fd(), batch.as_ptr(), count, position),
                }
            };
            if n < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error.into());
            }
            if n == 0 {
                return Err(AccessError::Short { done, wanted });
            }
            // n > 0 and at most the batch's length, so it fits a usize.
            let mut advanced = n as usize;
            done += advanced as u64;
            while advanced > 0 {
                let iov = &mut iovecs[first];
                let step = advanced.min(iov.iov_len);
                // SAFETY: `step` is within the iovec, so the new base stays
                // inside the same checked guest range.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(step).cast() };
                iov.iov_len -= step;
                advanced -= step;
                if iov.iov_len == 0 {
                    first += 1;
                }
            }
        }
        Ok(done)
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    DiskToGuest,
    GuestToDisk,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use crate::memory::{Backing, MemRegionDesc, MemoryTable, RegionSet, RegionSpec};

    /// Guest RAM with two views that touch at 1 MiB, and a hole at 2 MiB.
    fn ram() -> (RegionSet, GuestRam) {
        let regions = RegionSet::create(vec![RegionSpec { id: "r".into(), size: 4 << 20, backing: Backing::Memfd }])
            .expect("regions");
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
    fn transfers_span_views_and_are_counted() {
        let (_regions, ram) = ram();
        let counters = AccessCounters::default();
        let tracking = Tracking::new(Arc::default(), false);
        let access = RamAccess::new(&ram, &counters, &tracking);
        let disk = tempfile::tempfile().expect("disk");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        disk.write_all_at(&data, 0).expect("fill");
        // One buffer straddling the views' boundary, one small one elsewhere.
        let bufs = [
            GuestBuf { addr: GuestAddress((1 << 20) - 4096), len: 6144 },
            GuestBuf { addr: GuestAddress(0x2000), len: 2048 },
        ];
        assert_eq!(access.disk_to_guest(&bufs, &disk, 0).expect("read"), 8192);
        assert_eq!(counters.bytes_to_guest(), 8192);
        let out = tempfile::tempfile().expect("out");
        assert_eq!(access.guest_to_disk(&bufs, &out, 4096).expect("write"), 8192);
        assert_eq!(counters.bytes_from_guest(), 8192);
        let mut back = vec![0u8; 8192];
        out.read_exact_at(&mut back, 4096).expect("readback");
        assert_eq!(back, data);
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
        let access = RamAccess::new(&ram, &counters, &tracking);
        let disk = tempfile::tempfile().expect("disk");
        disk.set_len(1 << 20).expect("size");
        let page = |n: u64| GuestAddress(n * 4096);
        // Disk reads into pages 3-4 and 9; a status byte into page 20; a
        // write to disk (the device only reads RAM) from page 30.
        let read = [GuestBuf { addr: GuestAddress(3 * 4096 + 100), len: 4096 }, GuestBuf { addr: page(9), len: 512 }];
        access.disk_to_guest(&read, &disk, 0).expect("read");
        access.write_into(&[GuestBuf { addr: page(20), len: 1 }], &[0]).expect("status");
        access.guest_to_disk(&[GuestBuf { addr: page(30), len: 4096 }], &disk, 0).expect("write");
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
        let access = RamAccess::new(&ram, &counters, &tracking);
        let disk = tempfile::tempfile().expect("disk");
        disk.set_len(1 << 20).expect("size");
        for buf in [
            GuestBuf { addr: GuestAddress((2 << 20) - 10), len: 20 },
            GuestBuf { addr: GuestAddress(u64::MAX - 5), len: 100 },
            GuestBuf { addr: GuestAddress(5 << 20), len: 1 },
        ] {
            assert!(matches!(access.check(buf), Err(AccessError::NotRam { .. })));
            let good = GuestBuf { addr: GuestAddress(0), len: 512 };
            assert!(access.disk_to_guest(&[good, buf], &disk, 0).is_err());
        }
        assert_eq!(counters.bytes_to_guest(), 0);
        let hole = GuestBuf { addr: GuestAddress(2 << 20), len: 1 };
        assert!(access.write_into(&[hole], &[1]).is_err());
        let mut byte = [0u8];
        assert!(access.read_into(&[hole], &mut byte).is_err());
    }

    #[test]
    fn reads_past_the_end_of_the_disk_are_short() {
        let (_regions, ram) = ram();
        let counters = AccessCounters::default();
        let tracking = Tracking::new(Arc::default(), false);
        let access = RamAccess::new(&ram, &counters, &tracking);
        let disk = tempfile::tempfile().expect("disk");
        disk.set_len(1024).expect("size");
        let buf = GuestBuf { addr: GuestAddress(0), len: 4096 };
        assert!(matches!(access.disk_to_guest(&[buf], &disk, 0), Err(AccessError::Short { done: 1024, .. })));
    }
}
