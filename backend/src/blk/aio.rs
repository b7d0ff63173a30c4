//! Asynchronous disk I/O for a queue worker: many requests in flight at
//! once, completed in whatever order the disk finishes them.
//!
//! [`AsyncDisk`] is the one interface the worker uses, after
//! cloud-hypervisor's `AsyncIo`: queue operations with a tag, submit them,
//! take completions. [`UringDisk`] is an io_uring per worker; [`SyncDisk`]
//! runs each operation at once with `preadv`/`pwritev`/`fdatasync`, for a
//! kernel where io_uring is unavailable (`kernel.io_uring_disabled`, a
//! seccomp policy). Both report what they did the same way, so the worker
//! has one path.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

/// Which engine the device's queues use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AioKind {
    /// io_uring, one ring per queue.
    #[value(name = "io_uring")]
    IoUring,
    /// One synchronous system call per operation, in the queue's worker.
    Sync,
}

impl std::fmt::Display for AioKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AioKind::IoUring => "io_uring",
            AioKind::Sync => "sync",
        })
    }
}

/// One disk operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// Read into the iovecs.
    Read,
    /// Write the iovecs; `dsync` makes the write durable before it
    /// completes (RWF_DSYNC: writethrough).
    Write { dsync: bool },
    /// Make completed writes durable (fdatasync).
    Flush,
}

/// What became of one operation.
#[derive(Debug)]
pub struct Completion {
    /// The tag it was queued with.
    pub tag: u64,
    /// Bytes moved (0 for a flush), or the error.
    pub result: io::Result<usize>,
}

/// A disk that runs several operations at once.
pub trait AsyncDisk: Send + std::fmt::Debug {
    /// Queues `op` on `fd` at `offset`, to be known by `tag`.
    ///
    /// # Safety
    ///
    /// `iovecs` and the memory they describe must stay valid and unmoved
    /// until `complete` has returned the completion for `tag`.
    unsafe fn push(&mut self, op: DiskOp, fd: RawFd, iovecs: &[libc::iovec], offset: u64, tag: u64) -> io::Result<()>;

    /// Hands what was queued to the kernel.
    fn submit(&mut self) -> io::Result<()>;

    /// Appends completions to `out`, waiting until there are at least
    /// `wait_for` (0: only those ready now).
    fn complete(&mut self, wait_for: usize, out: &mut Vec<Completion>) -> io::Result<()>;

    /// Readable when completions may be ready, for the worker's poll.
    fn notifier(&self) -> &EventFd;

    /// Whether completions are ready now, without a system call.
    fn ready(&mut self) -> bool;

    /// How many operations it holds at once.
    fn depth(&self) -> usize;
}

/// An io_uring with an eventfd that signals its completions.
pub struct UringDisk {
    ring: IoUring,
    notifier: EventFd,
    depth: usize,
}

impl std::fmt::Debug for UringDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDisk").field("fd", &self.ring.as_raw_fd()).field("depth", &self.depth).finish()
    }
}

impl UringDisk {
    /// A ring for `depth` operations in flight.
    pub fn new(depth: u16) -> io::Result<Self> {
        let entries = u32::from(depth.max(1)).next_power_of_two();
        let ring = IoUring::builder().setup_single_issuer().build(entries)?;
        let notifier = crate::sys::eventfd()?;
        ring.submitter().register_eventfd(notifier.as_raw_fd())?;
        Ok(UringDisk { ring, notifier, depth: entries as usize })
    }

    /// Whether this kernel lets gmemd use io_uring; the reason when not.
    pub fn probe() -> Result<(), String> {
        UringDisk::new(1).map(drop).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => format!("{e} (kernel.io_uring_disabled, or a seccomp policy)"),
            _ => e.to_string(),
        })
    }
}

impl AsyncDisk for UringDisk {
    unsafe fn push(&mut self, op: DiskOp, fd: RawFd, iovecs: &[libc::iovec], offset: u64, tag: u64) -> io::Result<()> {
        let fd = types::Fd(fd);
        let count = u32::try_from(iovecs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let entry = match op {
            DiskOp::Read => opcode::Readv::new(fd, iovecs.as_ptr(), count).offset(offset).build(),
            DiskOp::Write { dsync } => opcode::Writev::new(fd, iovecs.as_ptr(), count)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            DiskOp::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        };
        // SAFETY: the caller keeps the iovecs and their memory valid until
        // this tag completes; the entry names nothing else.
        unsafe { self.ring.submission().push(&entry.user_data(tag)) }
            .map_err(|_| io::Error::new(io::ErrorKind::WouldBlock, "the submission queue is full"))
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other.map(drop),
            }
        }
    }

    fn complete(&mut self, wait_for: usize, out: &mut Vec<Completion>) -> io::Result<()> {
        // Cleared first: a completion after this read signals it again.
        let _ = self.notifier.read();
        let start = out.len();
        loop {
            out.extend(self.ring.completion().map(|cqe| Completion {
                tag: cqe.user_data(),
                result: usize::try_from(cqe.result()).map_err(|_| io::Error::from_raw_os_error(-cqe.result())),
            }));
            if out.len() - start >= wait_for {
                return Ok(());
            }
            match self.ring.submit_and_wait(wait_for - (out.len() - start)) {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                _ => {}
            }
        }
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn ready(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    fn depth(&self) -> usize {
        self.depth
    }
}

/// Runs each operation when it is queued.
#[derive(Debug)]
pub struct SyncDisk {
    done: VecDeque<Completion>,
    /// Never signalled: completions are ready when `push` returns.
    notifier: EventFd,
}

impl SyncDisk {
    /// A synchronous engine.
    pub fn new() -> io::Result<Self> {
        Ok(SyncDisk { done: VecDeque::new(), notifier: crate::sys::eventfd()? })
    }
}

impl AsyncDisk for SyncDisk {
    unsafe fn push(&mut self, op: DiskOp, fd: RawFd, iovecs: &[libc::iovec], offset: u64, tag: u64) -> io::Result<()> {
        let position = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let count = libc::c_int::try_from(iovecs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = match op {
            DiskOp::Write { dsync: true } => libc::RWF_DSYNC,
            _ => 0,
        };
        let result = loop {
            // SAFETY: the caller guarantees the iovecs describe valid memory
            // for the duration of the operation, which ends in this call.
            let n = unsafe {
                match op {
                    DiskOp::Read => libc::preadv2(fd, iovecs.as_ptr(), count, position, 0),
                    DiskOp::Write { .. } => libc::pwritev2(fd, iovecs.as_ptr(), count, position, flags),
                    DiskOp::Flush => libc::fdatasync(fd) as isize,
                }
            };
            match usize::try_from(n) {
                Ok(n) => break Ok(n),
                Err(_) => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        break Err(error);
                    }
                }
            }
        };
        self.done.push_back(Completion { tag, result });
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn complete(&mut self, _wait_for: usize, out: &mut Vec<Completion>) -> io::Result<()> {
        out.extend(self.done.drain(..));
        Ok(())
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn ready(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn depth(&self) -> usize {
        1
    }
}

/// The engine of kind `kind` for a queue of `depth` entries.
pub fn engine(kind: AioKind, depth: u16) -> io::Result<Box<dyn AsyncDisk>> {
    Ok(match kind {
        AioKind::IoUring => Box::new(UringDisk::new(depth)?),
        AioKind::Sync => Box::new(SyncDisk::new()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn round_trip(mut disk: Box<dyn AsyncDisk>) {
        let file = tempfile::tempfile().expect("file");
        let mut data: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; 4096]).collect();
        let iovecs: Vec<Vec<libc::iovec>> =
            data.iter_mut().map(|d| vec![libc::iovec { iov_base: d.as_mut_ptr().cast(), iov_len: d.len() }]).collect();
        for (tag, iov) in iovecs.iter().enumerate() {
            // SAFETY: `data` outlives the completions taken below.
            unsafe {
                disk.push(DiskOp::Write { dsync: tag == 0 }, file.as_raw_fd(), iov, tag as u64 * 4096, tag as u64)
            }
            .expect("push");
        }
        disk.submit().expect("submit");
        let mut done = Vec::new();
        disk.complete(8, &mut done).expect("complete");
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..8).collect::<Vec<_>>());
        assert!(done.iter().all(|c| matches!(c.result, Ok(4096))), "{done:?}");
        let mut back = vec![0u8; 4096];
        file.read_exact_at(&mut back, 5 * 4096).expect("read back");
        assert_eq!(back, vec![6; 4096]);
        // SAFETY: no iovecs.
        unsafe { disk.push(DiskOp::Flush, file.as_raw_fd(), &[], 0, 99) }.expect("flush");
        disk.submit().expect("submit");
        done.clear();
        disk.complete(1, &mut done).expect("complete");
        assert!(matches!(done[..], [Completion { tag: 99, result: Ok(0) }]), "{done:?}");
    }

    #[test]
    fn both_engines_write_and_flush() {
        round_trip(Box::new(SyncDisk::new().expect("sync")));
        round_trip(Box::new(UringDisk::new(8).expect("io_uring on this kernel")));
    }

    #[test]
    fn errors_come_back_as_completions() {
        let mut disk = UringDisk::new(4).expect("io_uring");
        let mut byte = [0u8];
        let iov = [libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 }];
        // SAFETY: `byte` outlives the completion.
        unsafe { disk.push(DiskOp::Read, -1, &iov, 0, 5) }.expect("push");
        disk.submit().expect("submit");
        let mut done = Vec::new();
        disk.complete(1, &mut done).expect("complete");
        assert_eq!(done[0].tag, 5);
        assert_eq!(done[0].result.as_ref().map_err(io::Error::raw_os_error).expect_err("EBADF"), Some(libc::EBADF));
    }
}
