//! The guest side of the tests: guest RAM mapped in the test process, and a
//! minimal split-virtqueue driver that writes descriptors and the available
//! ring by hand (so tests can also write malformed ones).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// A memfd of `size` bytes sealed against resizing, as QEMU makes its
/// memory-backend-memfd RAM and its dirty log.
pub fn sealed_memfd(name: &std::ffi::CStr, size: u64) -> File {
    // SAFETY: a valid NUL-terminated name; the fd returned is new and ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh memfd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("size the memfd");
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on our own fd with an integer argument.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0, "seal the memfd");
    file
}

/// A file of guest RAM mapped shared at guest-physical address 0, as QEMU
/// would map it.
pub struct GuestMem {
    mem: GuestMemoryMmap,
    file: File,
    size: u64,
}

impl GuestMem {
    /// Maps all of `file`.
    pub fn map(file: File) -> Self {
        let size = file.metadata().expect("stat guest RAM").len();
        let offset = FileOffset::new(file.try_clone().expect("dup"), 0);
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size as usize, Some(offset))])
            .expect("mmap guest RAM");
        GuestMem { mem, file, size }
    }

    /// Opens and maps a gmemd region through its `/proc/<pid>/fd/<n>` path.
    pub fn open(fd_path: &str) -> Self {
        let file = OpenOptions::new().read(true).write(true).open(fd_path).expect("open the region's fd path");
        Self::map(file)
    }

    /// A memfd the test creates itself: memory gmemd does not own.
    pub fn foreign(size: u64) -> Self {
        Self::map(sealed_memfd(c"gmemd-test-foreign", size))
    }

    /// The file the memory is mapped from.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The test process's virtual address of `gpa`.
    pub fn va(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).expect("gpa in guest RAM") as u64
    }

    /// A memory-table entry for `size` bytes at `gpa` (file offset = gpa).
    pub fn range(&self, gpa: u64, size: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.va(gpa),
            mmap_offset: gpa,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// A memory-table entry for the whole mapping.
    pub fn whole(&self) -> VhostUserMemoryRegionInfo {
        self.range(0, self.size)
    }

    /// Whether the page at `gpa` has a page in the region's page cache
    /// (mincore through this mapping: it never faults anything in).
    pub fn resident(&self, gpa: u64) -> bool {
        let page = self.va(gpa & !0xfff);
        let mut vec = [0u8; 1];
        // SAFETY: one page of a live mapping; mincore writes one byte into `vec`.
        let ret = unsafe { libc::mincore(page as *mut libc::c_void, 4096, vec.as_mut_ptr()) };
        assert_eq!(ret, 0, "mincore: {}", std::io::Error::last_os_error());
        vec[0] & 1 != 0
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(gpa)).expect("write guest RAM");
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(gpa)).expect("read guest RAM");
        out
    }

    pub fn put<T: vm_memory::ByteValued>(&self, gpa: u64, value: T) {
        self.mem.write_obj(value, GuestAddress(gpa)).expect("write guest RAM");
    }

    pub fn get<T: vm_memory::ByteValued>(&self, gpa: u64) -> T {
        self.mem.read_obj(GuestAddress(gpa)).expect("read guest RAM")
    }
}

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One buffer of a request: guest address, length, device-writable or not.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Desc {
    /// A buffer the device reads.
    pub fn r(addr: u64, len: u32) -> Self {
        Desc { addr, len, write: false }
    }

    /// A buffer the device writes.
    pub fn w(addr: u64, len: u32) -> Self {
        Desc { addr, len, write: true }
    }
}

/// The driver side of one split virtqueue living in guest RAM at `base`.
#[derive(Debug)]
pub struct Ring {
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_idx: u16,
}

impl Ring {
    /// A fresh, zeroed ring.
    pub fn create(mem: &GuestMem, base: u64, size: u16) -> Self {
        let ring = Ring { base, size, next_desc: 0, avail_idx: 0, used_idx: 0 };
        mem.write(base, &vec![0u8; (ring.used() + 8 + 8 * u64::from(size) - base) as usize]);
        ring
    }

    /// Takes over a ring some earlier driver left in RAM: continues after
    /// the last entry the device used.
    pub fn resume(mem: &GuestMem, base: u64, size: u16) -> Self {
        let mut ring = Ring { base, size, next_desc: 0, avail_idx: 0, used_idx: 0 };
        ring.avail_idx = mem.get(ring.avail() + 2);
        ring.used_idx = mem.get(ring.used() + 2);
        ring
    }

    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }

    fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(self.size)).next_multiple_of(4096)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Requests made available so far (the avail ring's idx).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used ring's idx as the device last wrote it.
    pub fn used_idx_in_ram(&self, mem: &GuestMem) -> u16 {
        mem.get(self.used() + 2)
    }

    /// SET_VRING_ADDR data, in the test process's address space.
    pub fn config(&self, mem: &GuestMem) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: mem.va(self.base),
            used_ring_addr: mem.va(self.used()),
            avail_ring_addr: mem.va(self.avail()),
            log_addr: None,
        }
    }

    /// Writes descriptor `index` of the table at `table` (the ring's own or an indirect one).
    pub fn write_desc(mem: &GuestMem, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * u64::from(index);
        mem.put(at, addr.to_le());
        mem.put(at + 8, len.to_le());
        mem.put(at + 12, flags.to_le());
        mem.put(at + 14, next.to_le());
    }

    /// Makes the chain headed by `head` available, asking (for EVENT_IDX)
    /// to be notified as soon as the device uses anything new.
    pub fn publish(&mut self, mem: &GuestMem, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.put(self.avail() + 4 + 2 * slot, head.to_le());
        mem.put(self.avail() + 4 + 2 * u64::from(self.size), self.used_idx.to_le());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.put(self.avail() + 2, self.avail_idx.to_le());
        fence(Ordering::SeqCst);
    }

    /// Writes `descs` as one chain into the next free descriptors and makes
    /// it available; returns the head index.
    pub fn push(&mut self, mem: &GuestMem, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, desc) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let flags = if last { 0 } else { F_NEXT } | if desc.write { F_WRITE } else { 0 };
            Self::write_desc(mem, self.base, index, desc.addr, desc.len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// A descriptor index no pending chain uses, for hand-built chains.
    pub fn take_desc(&mut self) -> u16 {
        let index = self.next_desc;
        self.next_desc = (index + 1) % self.size;
        index
    }

    /// The descriptor table's guest address.
    pub fn table(&self) -> u64 {
        self.base
    }

    /// Waits up to `timeout` for the device to signal the call eventfd and
    /// to have used the next entry; returns (head id, used length). A used
    /// entry without a signal does not count: the device must notify.
    pub fn wait_used(&mut self, mem: &GuestMem, call: &EventFd, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if !wait_readable(call, left) {
                return None;
            }
            let _ = call.read();
            if self.used_idx_in_ram(mem) != self.used_idx {
                fence(Ordering::SeqCst);
                let slot = u64::from(self.used_idx % self.size);
                let id = u32::from_le(mem.get(self.used() + 4 + 8 * slot));
                let len = u32::from_le(mem.get(self.used() + 8 + 8 * slot));
                self.used_idx = self.used_idx.wrapping_add(1);
                return Some((id, len));
            }
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd that outlives the call.
    let rc = unsafe { libc::poll(&mut pollfd, 1, ms) };
    rc > 0
}
