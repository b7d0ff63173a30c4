//! The correctness check every run makes before it is timed: data written
//! through the backend reads back the same through every queue, is what the
//! image file on the host holds, and reads of data the backend did not just
//! write match the file too. A backend that answers fast with the wrong
//! bytes fails here instead of winning.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use super::error::{HostBenchError, Result};
use super::image::{fill_pattern, pattern_mismatch};
use super::load::{one, splitmix64, IoQueue};
use super::plan::{Op, VERIFY_SPAN};

/// 4 KiB blocks written and read back (plus one 1 MiB span).
const BLOCKS: usize = 32;
/// 4 KiB blocks only read, and compared with the file.
const READ_ONLY_BLOCKS: usize = 32;
const BLOCK: usize = 4096;

/// What the check did.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    /// Requests written through the backend.
    pub writes: usize,
    /// Requests read through the backend and compared.
    pub reads: usize,
    /// Bytes compared with the image file on the host.
    pub host_bytes_compared: usize,
}

/// The offsets the check uses: `BLOCKS` written 4 KiB blocks, one 1 MiB
/// span, and `READ_ONLY_BLOCKS` blocks that are only read; all distinct.
pub fn offsets(image_bytes: u64, seed: u64) -> (Vec<u64>, u64, Vec<u64>) {
    let blocks = image_bytes / BLOCK as u64;
    let span_blocks = (VERIFY_SPAN / BLOCK) as u64;
    let mut rng = seed;
    let span = (splitmix64(&mut rng) % (blocks - span_blocks)) / span_blocks * span_blocks;
    let mut taken = std::collections::HashSet::new();
    let mut pick = |count: usize| -> Vec<u64> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let block = splitmix64(&mut rng) % blocks;
            let in_span = (span..span + span_blocks).contains(&block);
            if !in_span && taken.insert(block) {
                out.push(block * BLOCK as u64);
            }
        }
        out
    };
    let written = pick(BLOCKS);
    let read_only = pick(READ_ONLY_BLOCKS);
    (written, span * BLOCK as u64, read_only)
}

fn mismatch(offset: u64, len: usize, what: String) -> HostBenchError {
    HostBenchError::Mismatch { offset, len, what }
}

/// Reads `len` bytes at `offset` through `queue` into its memory, after
/// poisoning that memory so that a request which returns nothing is seen.
fn read_back(queue: &mut dyn IoQueue, offset: u64, len: usize) -> Result<&[u8]> {
    queue.memory().bytes(0, len)?.fill(0xEE);
    one(queue, Op::Read, offset, len)?;
    Ok(queue.memory().bytes(0, len)?)
}

fn host_read(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| HostBenchError::io(format!("reading {} at {offset}", path.display()), e))?;
    Ok(buf)
}

/// Writes the pattern under `seed` through the first queue, reads it back
/// through every queue and from `image` on the host, and compares reads of
/// other blocks through the backend with the file.
pub fn check(queues: &mut [&mut dyn IoQueue], image: &Path, image_bytes: u64, seed: u64) -> Result<Verified> {
    let host = File::open(image).map_err(|e| HostBenchError::io(format!("opening {}", image.display()), e))?;
    let (blocks, span, read_only) = offsets(image_bytes, seed);
    let writes: Vec<(u64, usize)> =
        blocks.iter().map(|&o| (o, BLOCK)).chain(std::iter::once((span, VERIFY_SPAN))).collect();
    let mut verified = Verified { writes: 0, reads: 0, host_bytes_compared: 0 };
    let Some((first, _)) = queues.split_first_mut() else {
        return Ok(verified);
    };
    for &(offset, len) in &writes {
        fill_pattern(first.memory().bytes(0, len)?, seed, offset);
        one(&mut **first, Op::Write, offset, len)?;
        verified.writes += 1;
    }
    for (index, queue) in queues.iter_mut().enumerate() {
        for &(offset, len) in &writes {
            let got = read_back(&mut **queue, offset, len)?;
            if let Some(at) = pattern_mismatch(got, seed, offset) {
                return Err(mismatch(
                    offset,
                    len,
                    format!("read back through queue {index}: first wrong byte at +{at}"),
                ));
            }
            verified.reads += 1;
        }
    }
    for &(offset, len) in &writes {
        let on_host = host_read(&host, image, offset, len)?;
        if let Some(at) = pattern_mismatch(&on_host, seed, offset) {
            return Err(mismatch(
                offset,
                len,
                format!("the image file on the host does not hold what was written (first wrong byte at +{at})"),
            ));
        }
        verified.host_bytes_compared += len;
    }
    for (i, &offset) in read_only.iter().enumerate() {
        let queue = &mut *queues[i % queues.len()];
        let got = read_back(queue, offset, BLOCK)?.to_vec();
        let on_host = host_read(&host, image, offset, BLOCK)?;
        if got != on_host {
            let at = got.iter().zip(&on_host).position(|(a, b)| a != b).unwrap_or(0);
            return Err(mismatch(
                offset,
                BLOCK,
                format!("a read through the backend differs from the file (first wrong byte at +{at})"),
            ));
        }
        verified.reads += 1;
        verified.host_bytes_compared += BLOCK;
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_distinct_aligned_and_inside() {
        let size = 64 << 20;
        let (blocks, span, read_only) = offsets(size, 42);
        assert_eq!(blocks.len(), BLOCKS);
        assert_eq!(read_only.len(), READ_ONLY_BLOCKS);
        assert_eq!(span % VERIFY_SPAN as u64, 0);
        assert!(span + VERIFY_SPAN as u64 <= size);
        let mut all: Vec<u64> = blocks.iter().chain(&read_only).copied().collect();
        assert!(all.iter().all(|o| o % BLOCK as u64 == 0 && o + BLOCK as u64 <= size));
        assert!(all.iter().all(|o| !(span..span + VERIFY_SPAN as u64).contains(o)));
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), BLOCKS + READ_ONLY_BLOCKS);
        assert_ne!(offsets(size, 43).0, blocks, "another seed, other blocks");
    }
}
