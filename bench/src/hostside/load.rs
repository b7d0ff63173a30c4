//! The closed-loop load generator both clients share: each queue keeps
//! `depth` requests in flight until the deadline and records every
//! request's completion latency. The queue behind it is either libblkio's
//! (a vhost-user backend) or a raw io_uring on the image.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::error::{HostBenchError, Result};
use super::plan::{Case, Op, Pattern, CLIENT_CPU};
use super::sys;

/// Memory that requests read into and write from, cut into slots, one per
/// request in flight. It is shared with whoever does the I/O (the backend
/// through a memfd, or the kernel), which is why it is a pointer and not a
/// slice: a slot is written behind Rust's back while its request is in
/// flight.
#[derive(Debug)]
pub struct SlotMemory {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the memory is plain bytes owned by a mapping that outlives every
// queue using it (see the constructors' callers); queues on other threads
// use disjoint parts of it.
unsafe impl Send for SlotMemory {}

impl SlotMemory {
    /// # Safety
    /// `base..base+len` must stay mapped, readable and writable, and be
    /// used by no one else, for as long as the `SlotMemory` lives.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> SlotMemory {
        SlotMemory { base, len }
    }

    /// The address of byte `offset`, checked against the length.
    pub fn at(&self, offset: usize, len: usize) -> Result<*mut u8> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(HostBenchError::Request {
                op: "buffer",
                offset: offset as u64,
                len,
                message: format!("outside the {} bytes of request memory", self.len),
            });
        }
        // SAFETY: offset + len <= self.len, inside the mapping.
        Ok(unsafe { self.base.as_ptr().add(offset) })
    }

    /// Bytes `offset..offset+len`, to fill before a write or check after a
    /// read; only while no request on them is in flight.
    pub fn bytes(&mut self, offset: usize, len: usize) -> Result<&mut [u8]> {
        let ptr = self.at(offset, len)?;
        // SAFETY: inside the mapping (checked by `at`); `&mut self` and the
        // caller's promise that no request uses these bytes now make the
        // borrow exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    }
}

/// A queue that runs requests on the memory it owns.
pub trait IoQueue: Send {
    /// Queues a request of `len` bytes at image `offset`, using its memory
    /// from `mem_offset`; `tag` comes back when it completes.
    fn enqueue(&mut self, op: Op, offset: u64, mem_offset: usize, len: usize, tag: usize) -> Result<()>;

    /// Submits what is queued and waits until at least `min` requests have
    /// completed; appends their tags to `done`. A failed request is an error.
    fn reap(&mut self, min: usize, done: &mut Vec<usize>) -> Result<()>;

    /// The queue's request memory.
    fn memory(&mut self) -> &mut SlotMemory;
}

/// Runs one request and waits for it (for the correctness check).
pub fn one(queue: &mut dyn IoQueue, op: Op, offset: u64, len: usize) -> Result<()> {
    let mut done = Vec::with_capacity(1);
    queue.enqueue(op, offset, 0, len, 0)?;
    queue.reap(1, &mut done)
}

/// SplitMix64: a small, fast generator; the benchmark needs well-spread
/// offsets and reproducible data, not cryptographic quality.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where one queue's requests go.
#[derive(Debug, Clone)]
pub struct Offsets {
    pattern: Pattern,
    block: u64,
    /// First block of this queue's slice and the number of blocks in it.
    first: u64,
    blocks: u64,
    next: u64,
    rng: u64,
}

impl Offsets {
    /// Offsets for queue `queue` of `queues` on an image of `image_bytes`:
    /// random over the whole image, or sequential within the queue's own
    /// equal slice of it (so that queues do not read each other's blocks).
    pub fn new(pattern: Pattern, block: usize, image_bytes: u64, queue: u16, queues: u16, seed: u64) -> Offsets {
        let block = block as u64;
        let total = (image_bytes / block).max(1);
        let (first, blocks) = match pattern {
            Pattern::Random => (0, total),
            Pattern::Sequential => {
                let per = (total / u64::from(queues.max(1))).max(1);
                ((u64::from(queue) * per).min(total - 1), per)
            }
        };
        Offsets { pattern, block, first, blocks, next: 0, rng: seed ^ (u64::from(queue) << 32) }
    }

    /// The next request's byte offset.
    pub fn next_offset(&mut self) -> u64 {
        let index = match self.pattern {
            Pattern::Random => splitmix64(&mut self.rng) % self.blocks,
            Pattern::Sequential => {
                let index = self.next;
                self.next = (self.next + 1) % self.blocks;
                index
            }
        };
        (self.first + index) * self.block
    }
}

/// What one queue did in a phase.
#[derive(Debug, Default)]
pub struct QueueResult {
    /// Completed requests.
    pub ios: u64,
    /// From the first submission to the last completion.
    pub elapsed: Duration,
    /// Each completed request's latency, submission to completion, ns.
    pub latencies_ns: Vec<u64>,
}

/// Keeps `case.depth` requests in flight on `queue` until `duration` has
/// passed, then lets the ones in flight complete. Pins the calling thread
/// to the client CPU first when `pin`.
pub fn drive(
    queue: &mut dyn IoQueue,
    case: &Case,
    offsets: &mut Offsets,
    duration: Duration,
    pin: bool,
) -> Result<QueueResult> {
    if pin {
        sys::pin_thread(0, CLIENT_CPU)?;
    }
    let depth = case.depth as usize;
    let block = case.block;
    let mut submitted_at = vec![Instant::now(); depth];
    let mut latencies_ns = Vec::with_capacity(1 << 16);
    let mut done = Vec::with_capacity(depth);
    let start = Instant::now();
    let deadline = start + duration;
    for (tag, at) in submitted_at.iter_mut().enumerate() {
        *at = Instant::now();
        queue.enqueue(case.op, offsets.next_offset(), tag * block, block, tag)?;
    }
    let mut in_flight = depth;
    let mut last = start;
    while in_flight > 0 {
        done.clear();
        queue.reap(1, &mut done)?;
        let now = Instant::now();
        last = now;
        let more = now < deadline;
        for &tag in &done {
            let Some(at) = submitted_at.get_mut(tag) else {
                return Err(HostBenchError::Request {
                    op: case.op.name(),
                    offset: 0,
                    len: block,
                    message: format!("completion for unknown request {tag}"),
                });
            };
            latencies_ns.push(u64::try_from(now.duration_since(*at).as_nanos()).unwrap_or(u64::MAX));
            if more {
                *at = Instant::now();
                queue.enqueue(case.op, offsets.next_offset(), tag * block, block, tag)?;
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok(QueueResult { ios: latencies_ns.len() as u64, elapsed: last.duration_since(start), latencies_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_are_aligned_and_inside() {
        let mut offsets = Offsets::new(Pattern::Random, 4096, 1 << 30, 0, 1, 7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let o = offsets.next_offset();
            assert_eq!(o % 4096, 0);
            assert!(o + 4096 <= 1 << 30);
            seen.insert(o);
        }
        // 10,000 uniform draws from 262,144 blocks repeat ~190 times
        // (birthday bound n²/2N); far more would mean a poor spread.
        assert!(seen.len() > 9_700, "offsets repeat too often: {}", seen.len());
    }

    #[test]
    fn sequential_offsets_stay_in_their_slice_and_wrap() {
        let mib = 1 << 20;
        let mut q1 = Offsets::new(Pattern::Sequential, mib, 8 * mib as u64, 1, 2, 0);
        let got: Vec<u64> = (0..5).map(|_| q1.next_offset() / mib as u64).collect();
        assert_eq!(got, [4, 5, 6, 7, 4]);
        let mut q0 = Offsets::new(Pattern::Sequential, mib, 8 * mib as u64, 0, 2, 0);
        assert_eq!(q0.next_offset(), 0);
    }

    #[test]
    fn splitmix_is_reproducible() {
        let (mut a, mut b) = (1, 1);
        assert_eq!(splitmix64(&mut a), splitmix64(&mut b));
        let (x, y) = (splitmix64(&mut a), splitmix64(&mut a));
        assert_ne!(x, y);
        assert_eq!(splitmix64(&mut b), x);
    }
}
