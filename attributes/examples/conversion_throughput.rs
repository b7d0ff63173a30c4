//! Conversion throughput against raw `FALLOC_FL_PUNCH_HOLE` on the same
//! memfd: shared→private (with 4 queue shards registered, as the daemon
//! would have) followed by the hole punch, against the punch alone, over
//! every chunk of a populated 256 MiB memfd. Prints conversions per second
//! and the ratio, median of interleaved rounds.
//!
//! `nice cargo run --release -p gmem-attributes --example conversion_throughput`

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Instant;

use gmem_attributes::{punch_hole, RegionAttributes, DEFAULT_SHARD_SLOTS};

const SIZE: u64 = 256 << 20;
const ROUNDS: usize = 5;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    // SAFETY: a NUL-terminated name; memfd_create keeps no pointer.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd nothing else owns.
    let ram = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    ram.set_len(SIZE).expect("size");
    let fill = vec![0xa5u8; 1 << 20];
    let populate = || {
        for mib in 0..SIZE >> 20 {
            ram.write_all_at(&fill, mib << 20).expect("populate");
        }
    };
    let region = RegionAttributes::new(SIZE, 4096).expect("region");
    let _queues: Vec<_> = (0..4).map(|_| region.shard(DEFAULT_SHARD_SLOTS)).collect();

    println!("256 MiB memfd, every chunk populated, then discarded; median of {ROUNDS} rounds:");
    println!("  chunk     raw punch/s   convert+punch/s   ratio");
    for chunk in [4u64 << 10, 64 << 10, 2 << 20] {
        let chunks = SIZE / chunk;
        let (mut raw, mut converted) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            populate();
            let start = Instant::now();
            for i in 0..chunks {
                punch_hole(&ram, i * chunk, chunk).expect("punch");
            }
            raw.push(chunks as f64 / start.elapsed().as_secs_f64());

            populate();
            let start = Instant::now();
            for i in 0..chunks {
                region.to_private(i * chunk, chunk, None).expect("convert");
                punch_hole(&ram, i * chunk, chunk).expect("punch");
            }
            converted.push(chunks as f64 / start.elapsed().as_secs_f64());
            region.to_shared(0, SIZE).expect("shared");
        }
        let (raw, converted) = (median(raw), median(converted));
        println!("  {:>5} KiB {raw:>12.0} {converted:>17.0}   {:.2}x", chunk >> 10, converted / raw);
    }
}
