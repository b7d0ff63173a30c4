//! The host's side of the `seqio` guest agent (`scripts/guest/agents/seqio.sh`,
//! `gmem-io seqio` in `scripts/guest/gmem-io.c`): the blocks it writes, the
//! checksum it keeps, its result line, and a check of the disk image.
//!
//! [`block`] and [`Fnv1a`] mirror the C code word for word; change both sides
//! together. `tests/tests/seqio.rs` runs the C tool on the host against an
//! image file and checks it with this module.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::guest::AgentResults;

/// Bytes per seqio block (one page).
pub const BLOCK_BYTES: usize = 4096;
/// Progress key: `GMEMD-PROGRESS seqio=<blocks done>` (see
/// [`AgentResults::progress`]), printed every 256 blocks unless the agent's
/// `progress_every` parameter says otherwise.
pub const PROGRESS_KEY: &str = "seqio";

/// Golden-ratio stride that spreads block indices over the xorshift state.
const STRIDE: u64 = 0x9E37_79B9_7F4A_7C15;
/// The state used instead of 0, xorshift's fixed point.
const ZERO_STATE: u64 = 0x853C_49E6_748F_EA9B;
/// xorshift64*'s output multiplier.
const XORSHIFT64STAR_MUL: u64 = 0x2545_F491_4F6C_DD1D;
const FNV1A_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV1A_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Block `index` of seed `seed`: 512 little-endian u64 words of xorshift64*
/// started at `seed ^ (index * 0x9E3779B97F4A7C15)` (or at
/// `0x853C49E6748FEA9B` where that is 0), as `seqio_pattern` in gmem-io.c.
pub fn block(seed: u64, index: u64) -> [u8; BLOCK_BYTES] {
    let mut x = seed ^ index.wrapping_mul(STRIDE);
    if x == 0 {
        x = ZERO_STATE;
    }
    let mut out = [0u8; BLOCK_BYTES];
    for word in out.chunks_exact_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        word.copy_from_slice(&x.wrapping_mul(XORSHIFT64STAR_MUL).to_le_bytes());
    }
    out
}

/// A running 64-bit FNV-1a checksum, as `fnv1a` in gmem-io.c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a(u64);

impl Fnv1a {
    /// The checksum of no bytes (the FNV offset basis).
    pub const fn new() -> Fnv1a {
        Fnv1a(FNV1A_OFFSET)
    }

    /// Folds `bytes` in, in order.
    pub fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(FNV1A_PRIME);
        }
    }

    /// The checksum so far.
    pub const fn value(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a::new()
    }
}

/// The checksum of blocks `0..blocks` of `seed`: what the agent's
/// `seqio_sum` must be after a complete run.
pub fn expected_sum(blocks: u64, seed: u64) -> u64 {
    let mut sum = Fnv1a::new();
    for index in 0..blocks {
        sum.update(&block(seed, index));
    }
    sum.value()
}

/// Reads blocks `0..blocks` of the raw image at `path` and checks each
/// against [`block`]. Returns the FNV-1a of all of them (compare it with the
/// agent's `seqio_sum`), or an error naming how many blocks differ and the
/// first one.
pub fn verify_disk(path: &Path, blocks: u64, seed: u64) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut data = [0u8; BLOCK_BYTES];
    let mut sum = Fnv1a::new();
    let (mut bad, mut first_bad) = (0u64, None);
    for index in 0..blocks {
        reader.read_exact(&mut data).with_context(|| format!("reading block {index} of {}", path.display()))?;
        sum.update(&data);
        if data != block(seed, index) {
            bad += 1;
            first_bad.get_or_insert(index);
        }
    }
    if let Some(first) = first_bad {
        bail!(
            "{bad} of {blocks} blocks in {} differ from seqio's pattern (seed {seed}); the first is {first}",
            path.display()
        );
    }
    Ok(sum.value())
}

/// The agent's result line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqioReport {
    /// Blocks written and read back.
    pub blocks: u64,
    /// Slots whose RAM content was not their block at the end.
    pub bad_slots: u64,
    /// The first of them.
    pub first_bad_slot: Option<u64>,
    /// The running FNV-1a of everything written, as kept in guest RAM.
    pub sum: u64,
    /// The FNV-1a of the range read back from the disk at the end.
    pub disk_sum: u64,
    /// The slowest pwrite + pread of one block, in microseconds.
    pub max_op_us: u64,
}

impl SeqioReport {
    /// Takes the `seqio_*` keys out of `results`.
    pub fn from_results(results: &AgentResults) -> Result<SeqioReport> {
        let value = |key: &str| results.get(key).with_context(|| format!("the guest reported no {key}"));
        let number = |key: &str| -> Result<u64> {
            let text = value(key)?;
            text.parse().with_context(|| format!("{key}={text} is not a number"))
        };
        let hex = |key: &str| -> Result<u64> {
            let text = value(key)?;
            u64::from_str_radix(text, 16).with_context(|| format!("{key}={text} is not hex"))
        };
        let first_bad_slot = match value("seqio_first_bad_slot")? {
            "none" => None,
            _ => Some(number("seqio_first_bad_slot")?),
        };
        Ok(SeqioReport {
            blocks: number("seqio_blocks")?,
            bad_slots: number("seqio_bad_slots")?,
            first_bad_slot,
            sum: hex("seqio_sum")?,
            disk_sum: hex("seqio_disk_sum")?,
            max_op_us: number("seqio_max_op_us")?,
        })
    }

    /// Whether the guest saw a complete, consistent run: no stale slot and
    /// the disk's checksum equal to the running one.
    pub fn is_clean(&self) -> bool {
        self.bad_slots == 0 && self.first_bad_slot.is_none() && self.sum == self.disk_sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_known_values() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(Fnv1a::new().value(), 0xcbf2_9ce4_8422_2325);
        let mut sum = Fnv1a::default();
        sum.update(b"a");
        assert_eq!(sum.value(), 0xaf63_dc4c_8601_ec8c);
        let mut sum = Fnv1a::new();
        sum.update(b"foobar");
        assert_eq!(sum.value(), 0x8594_4171_f739_67e8);
    }

    fn word(block: &[u8; BLOCK_BYTES], k: usize) -> u64 {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&block[k * 8..k * 8 + 8]);
        u64::from_le_bytes(bytes)
    }

    #[test]
    fn first_and_last_words() {
        // From a C transcription of seqio_pattern; tests/tests/seqio.rs
        // compares whole runs against gmem-io.c itself.
        for (seed, index, first, last) in [
            (1, 0, 0x47e4_ce4b_896c_dd1d, 0x886a_3c2d_3ee5_29bc),
            (1, 1, 0x102a_ceb9_af8e_2597, 0x969c_3bc1_54a6_fe21),
            (0, 0, 0xf672_ec45_de11_653d, 0xe2e1_1355_7793_b809),
            (0xdead_beef, 12345, 0xf12c_b713_d86d_dcde, 0x55aa_35a5_1eae_df5f),
        ] {
            let data = block(seed, index);
            assert_eq!(word(&data, 0), first, "seed {seed} block {index}");
            assert_eq!(word(&data, BLOCK_BYTES / 8 - 1), last, "seed {seed} block {index}");
        }
    }

    #[test]
    fn blocks_differ_and_avoid_the_zero_state() {
        assert_ne!(block(1, 0), block(1, 1));
        assert_ne!(block(1, 0), block(2, 0));
        // seed 0, block 0 would start xorshift at 0 and give all zeros.
        assert!(block(0, 0).iter().any(|&b| b != 0));
        assert_eq!(block(0, 0), block(ZERO_STATE, 0));
    }
}
