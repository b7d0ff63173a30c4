//! The data path's cost of the attribute check: 4 KiB random reads from a
//! disk image in the page cache (the cheapest I/O gmemd does, so the
//! largest relative cost) into guest RAM, bare, with the check against an
//! all-shared map, and with the check against a map fragmented into 10,000
//! private extents (reads land between them). Prints ns per read, median of
//! interleaved rounds.
//!
//! `nice cargo run --release -p gmem-attributes --example datapath_cost`

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Instant;

use gmem_attributes::{RefShard, RegionAttributes, DEFAULT_SHARD_SLOTS};
use rand::{Rng, SeedableRng};

const PAGE: u64 = 4096;
const RAM_PAGES: u64 = 65536; // 256 MiB
const DISK_PAGES: u64 = 16384; // 64 MiB
const PRIVATE_EXTENTS: u64 = 10_000;
const OPS: usize = 200_000;
const ROUNDS: usize = 9;

fn memfd(name: &std::ffi::CStr) -> File {
    // SAFETY: a NUL-terminated name; memfd_create keeps no pointer.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd nothing else owns.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let disk = memfd(c"disk");
    let chunk = vec![0x5au8; 1 << 20];
    for mib in 0..(DISK_PAGES * PAGE) >> 20 {
        disk.write_all_at(&chunk, mib << 20).expect("fill disk");
    }
    let mut ram = vec![1u8; (RAM_PAGES * PAGE) as usize];

    let shared = RegionAttributes::new(RAM_PAGES * PAGE, PAGE).expect("region");
    let fragmented = RegionAttributes::new(RAM_PAGES * PAGE, PAGE).expect("region");
    for i in 0..PRIVATE_EXTENTS {
        fragmented.to_private(i * 6 * PAGE, PAGE, None).expect("private");
    }
    let extents = fragmented.extents();
    println!(
        "fragmented map: {} extents ({} private)",
        extents.len(),
        extents.iter().filter(|extent| extent.private).count()
    );
    let shards = [shared.shard(DEFAULT_SHARD_SLOTS), fragmented.shard(DEFAULT_SHARD_SLOTS)];

    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // Shared pages of the fragmented map (not a multiple of 6 below 60,000).
    let targets: Vec<(u64, u64)> = (0..OPS)
        .map(|_| loop {
            let page = rng.gen_range(0..RAM_PAGES);
            if page % 6 != 0 || page >= PRIVATE_EXTENTS * 6 {
                break (page * PAGE, rng.gen_range(0..DISK_PAGES) * PAGE);
            }
        })
        .collect();

    let read = |ram: &mut [u8], (offset, position): (u64, u64)| {
        let page = &mut ram[offset as usize..(offset + PAGE) as usize];
        disk.read_exact_at(page, position).expect("read");
    };
    let run = |ram: &mut Vec<u8>, shard: Option<&RefShard>, io: bool| {
        let start = Instant::now();
        for &(offset, position) in &targets {
            let reference = shard.map(|shard| shard.acquire(offset, PAGE).expect("shared"));
            if io {
                read(ram, (offset, position));
            }
            drop(reference);
        }
        start.elapsed().as_nanos() as f64 / OPS as f64
    };

    let mut figures: [Vec<f64>; 5] = Default::default();
    for _ in 0..ROUNDS {
        figures[0].push(run(&mut ram, None, true));
        figures[1].push(run(&mut ram, Some(&shards[0]), true));
        figures[2].push(run(&mut ram, Some(&shards[1]), true));
        figures[3].push(run(&mut ram, Some(&shards[0]), false));
        figures[4].push(run(&mut ram, Some(&shards[1]), false));
    }
    let [bare, shared_read, fragmented_read, shared_check, fragmented_check] = figures.map(median);
    println!("4 KiB random read, page-cache disk -> guest RAM, median of {ROUNDS} rounds of {OPS}:");
    println!("  bare read:                         {bare:8.0} ns");
    println!(
        "  read + check, all-shared map:      {shared_read:8.0} ns  ({:+.1}%)",
        (shared_read / bare - 1.0) * 100.0
    );
    println!(
        "  read + check, 10,000-extent map:   {fragmented_read:8.0} ns  ({:+.1}%)",
        (fragmented_read / bare - 1.0) * 100.0
    );
    println!("  check alone, all-shared map:       {shared_check:8.1} ns");
    println!("  check alone, 10,000-extent map:    {fragmented_check:8.1} ns");
    println!(
        "  check alone / bare read:           {:.1}% (all-shared), {:.1}% (10,000 extents)",
        shared_check / bare * 100.0,
        fragmented_check / bare * 100.0
    );
}
