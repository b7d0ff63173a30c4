//! The client side of a vhost-user backend: libblkio's
//! `virtio-blk-vhost-user` driver, the library behind QEMU's own
//! virtio-blk-vhost-user block driver.

use std::mem::MaybeUninit;
use std::path::Path;
use std::ptr::NonNull;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use super::error::{HostBenchError, Result};
use super::load::{IoQueue, SlotMemory};
use super::plan::Op;

/// The virtqueue size asked for: each request takes three descriptors
/// (header, data, status) and no indirect descriptors are used, so 512 keeps
/// the deepest case (128 in flight) inside the ring rather than in
/// libblkio's backlog. gmemd accepts up to 1024, as does libvhost-user.
const QUEUE_SIZE: i32 = 512;

/// One libblkio queue and its part of the request memory.
pub struct BlkioQueue {
    queue: Blkioq,
    memory: SlotMemory,
    completions: Vec<MaybeUninit<Completion>>,
}

impl std::fmt::Debug for BlkioQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkioQueue").field("memory", &self.memory).finish_non_exhaustive()
    }
}

impl IoQueue for BlkioQueue {
    fn enqueue(&mut self, op: Op, offset: u64, mem_offset: usize, len: usize, tag: usize) -> Result<()> {
        let buf = self.memory.at(mem_offset, len)?;
        match op {
            Op::Read => self.queue.read(offset, buf, len, tag, ReqFlags::empty()),
            Op::Write => self.queue.write(offset, buf, len, tag, ReqFlags::empty()),
        }
        Ok(())
    }

    fn reap(&mut self, min: usize, done: &mut Vec<usize>) -> Result<()> {
        let n =
            self.queue.do_io(&mut self.completions, min, None, None).map_err(|e| HostBenchError::blkio("do_io", e))?;
        for slot in &self.completions[..n] {
            // SAFETY: do_io initialized the first n completions.
            let completion = unsafe { slot.assume_init_ref() };
            if completion.ret != 0 {
                let message = if completion.error_msg.is_null() {
                    format!("errno {}", -completion.ret)
                } else {
                    // SAFETY: libblkio's error messages are static C strings.
                    unsafe { std::ffi::CStr::from_ptr(completion.error_msg) }.to_string_lossy().into_owned()
                };
                return Err(HostBenchError::Request {
                    op: "request",
                    offset: 0,
                    len: 0,
                    message: format!("request {} failed: {message} (ret {})", completion.user_data, completion.ret),
                });
            }
            done.push(completion.user_data);
        }
        Ok(())
    }

    fn memory(&mut self) -> &mut SlotMemory {
        &mut self.memory
    }
}

/// A started libblkio instance on a vhost-user socket.
pub struct BlkioClient {
    // Declared before `blkio`: the queues use the driver's rings and must
    // be dropped first.
    pub queues: Vec<BlkioQueue>,
    /// The disk size the device reports.
    pub capacity: u64,
    _region: MemoryRegion,
    _blkio: Blkio,
}

impl std::fmt::Debug for BlkioClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkioClient")
            .field("queues", &self.queues.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl BlkioClient {
    /// Connects to `socket`, starts `queues` queues and maps one memfd of
    /// `bytes_per_queue` per queue (libblkio allocates it and sends it to the
    /// backend; it is not guest RAM, hence gmemd's --allow-foreign-memory).
    pub fn connect(socket: &Path, queues: u16, bytes_per_queue: usize) -> Result<BlkioClient> {
        let path = socket.to_str().ok_or_else(|| HostBenchError::Request {
            op: "connect",
            offset: 0,
            len: 0,
            message: format!("socket path {} is not UTF-8", socket.display()),
        })?;
        let mut blkio =
            Blkio::new("virtio-blk-vhost-user").map_err(|e| HostBenchError::blkio("creating the driver", e))?;
        blkio.set_str("path", path).map_err(|e| HostBenchError::blkio("setting path", e))?;
        blkio.connect().map_err(|e| HostBenchError::blkio(format!("connecting to {path}"), e))?;
        blkio.set_i32("num-queues", i32::from(queues)).map_err(|e| HostBenchError::blkio("setting num-queues", e))?;
        blkio.set_i32("queue-size", QUEUE_SIZE).map_err(|e| HostBenchError::blkio("setting queue-size", e))?;
        let capacity = blkio.get_u64("capacity").map_err(|e| HostBenchError::blkio("reading capacity", e))?;
        let started = blkio.start().map_err(|e| HostBenchError::blkio("starting", e))?;
        let total = bytes_per_queue * usize::from(queues);
        let region =
            blkio.alloc_mem_region(total).map_err(|e| HostBenchError::blkio(format!("allocating {total} bytes"), e))?;
        blkio.map_mem_region(&region).map_err(|e| HostBenchError::blkio("mapping the request memory", e))?;
        let base = NonNull::new(region.addr as *mut u8)
            .ok_or_else(|| HostBenchError::last_os("libblkio returned a NULL region"))?;
        let queues = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, queue)| {
                // SAFETY: the region is `total` bytes and stays mapped while
                // `_blkio` (a field of the same client) lives; each queue
                // gets its own disjoint `bytes_per_queue` of it.
                let memory = unsafe { SlotMemory::new(base.add(i * bytes_per_queue), bytes_per_queue) };
                BlkioQueue {
                    queue,
                    memory,
                    completions: std::iter::repeat_with(MaybeUninit::uninit).take(QUEUE_SIZE as usize).collect(),
                }
            })
            .collect();
        Ok(BlkioClient { queues, capacity, _region: region, _blkio: blkio })
    }
}
