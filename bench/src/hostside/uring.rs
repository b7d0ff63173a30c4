//! The raw ceiling: the same requests issued straight on the image file
//! with O_DIRECT through io_uring, no backend in between.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use io_uring::{opcode, types, IoUring};

use super::error::{HostBenchError, Result};
use super::load::{IoQueue, SlotMemory};
use super::plan::Op;
use super::sys::AnonMemory;

/// One io_uring on the image, with its own aligned request memory.
pub struct UringQueue {
    ring: IoUring,
    file: File,
    // Declared before `_owner`, which owns the mapping it points into.
    memory: SlotMemory,
    _owner: AnonMemory,
    /// Length of each request in flight by tag, to catch short transfers.
    lengths: Vec<usize>,
}

impl std::fmt::Debug for UringQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringQueue").field("file", &self.file).finish_non_exhaustive()
    }
}

impl UringQueue {
    /// Opens `image` with O_DIRECT and sets up a ring for `depth` requests
    /// and `bytes` of request memory.
    pub fn open(image: &Path, depth: u32, bytes: usize) -> Result<UringQueue> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(image)
            .map_err(|e| HostBenchError::io(format!("opening {} with O_DIRECT", image.display()), e))?;
        let ring = IoUring::new(depth.next_power_of_two())
            .map_err(|e| HostBenchError::io(format!("io_uring_setup({depth})"), e))?;
        let owner = AnonMemory::new(bytes)?;
        // SAFETY: `owner` is kept in the same struct, dropped after `memory`.
        let memory = unsafe { SlotMemory::new(owner.base(), owner.len()) };
        Ok(UringQueue { ring, file, memory, _owner: owner, lengths: vec![0; depth as usize] })
    }
}

impl IoQueue for UringQueue {
    fn enqueue(&mut self, op: Op, offset: u64, mem_offset: usize, len: usize, tag: usize) -> Result<()> {
        let buf = self.memory.at(mem_offset, len)?;
        let fd = types::Fd(self.file.as_raw_fd());
        let length = u32::try_from(len).map_err(|_| HostBenchError::Request {
            op: op.name(),
            offset,
            len,
            message: "request too large for io_uring".into(),
        })?;
        let entry = match op {
            Op::Read => opcode::Read::new(fd, buf, length).offset(offset).build(),
            Op::Write => opcode::Write::new(fd, buf, length).offset(offset).build(),
        }
        .user_data(tag as u64);
        if let Some(slot) = self.lengths.get_mut(tag) {
            *slot = len;
        }
        // SAFETY: the buffer stays valid until the completion is reaped (it
        // is the queue's own memory, and a slot is reused only after its
        // request completed).
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| HostBenchError::Request {
            op: op.name(),
            offset,
            len,
            message: "the submission queue is full (more requests than the depth)".into(),
        })
    }

    fn reap(&mut self, min: usize, done: &mut Vec<usize>) -> Result<()> {
        self.ring.submit_and_wait(min).map_err(|e| HostBenchError::io("io_uring_enter", e))?;
        for cqe in self.ring.completion() {
            let tag = cqe.user_data() as usize;
            let expected = self.lengths.get(tag).copied().unwrap_or(0);
            let result = cqe.result();
            if result < 0 || result as usize != expected {
                let message = if result < 0 {
                    std::io::Error::from_raw_os_error(-result).to_string()
                } else {
                    format!("short transfer: {result} of {expected} bytes")
                };
                return Err(HostBenchError::Request { op: "io_uring request", offset: 0, len: expected, message });
            }
            done.push(tag);
        }
        Ok(())
    }

    fn memory(&mut self) -> &mut SlotMemory {
        &mut self.memory
    }
}
