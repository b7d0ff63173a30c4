//! Conversions in a loop while 4 "queues" take references and write into a
//! canaried buffer: no write may land in a range after its conversion to
//! private returned.
//!
//! Each writer writes its tag into every word of its range, yielding half
//! way, so a write in flight spans a long window. The converter, as soon as
//! a conversion returns, fills the range with a canary (as the daemon would
//! discard it), lets the writers run, and checks that the canary is whole
//! before turning the range shared again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem_attributes::{ConvertError, Denied, RegionAttributes};
use rand::{Rng, SeedableRng};

const PAGE: u64 = 4096;
const PAGES: u64 = 64;
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;
const CANARY: u64 = 0xdead_beef_cafe_f00d;

#[test]
fn no_write_lands_after_conversion() {
    let region = RegionAttributes::new(PAGES * PAGE, PAGE).expect("region");
    let memory: Arc<Vec<AtomicU64>> =
        Arc::new((0..PAGES as usize * WORDS_PER_PAGE).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_millis(1500);

    let writers: Vec<_> = (0..4u64)
        .map(|queue| {
            let shard = region.shard(16);
            let (memory, stop, writes) = (Arc::clone(&memory), Arc::clone(&stop), Arc::clone(&writes));
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(queue);
                let tag = (queue + 1) << 56;
                while !stop.load(Ordering::Relaxed) {
                    let first = rng.gen_range(0..PAGES);
                    let pages = rng.gen_range(1..=4).min(PAGES - first);
                    // Not page-aligned: the reference covers the pages it touches.
                    let offset = first * PAGE + rng.gen_range(0..64) * 8;
                    let len = pages * PAGE - (offset - first * PAGE);
                    match shard.acquire_wait(offset, len, Duration::from_millis(100)) {
                        Ok(reference) => {
                            let words = (offset / 8) as usize..((offset + len) / 8) as usize;
                            let middle = words.start + words.len() / 2;
                            for word in words.clone() {
                                memory[word].store(tag | word as u64, Ordering::Relaxed);
                                if word == middle {
                                    std::thread::yield_now();
                                }
                            }
                            writes.fetch_add(1, Ordering::Relaxed);
                            drop(reference);
                        }
                        Err(Denied::Private { .. } | Denied::Converting) => std::thread::yield_now(),
                        Err(other) => panic!("queue {queue}: {other}"),
                    }
                }
            })
        })
        .collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let (mut converted, mut busy, mut violations) = (0u64, 0u64, 0u64);
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < run_for {
        let first = rng.gen_range(0..PAGES);
        let pages = rng.gen_range(1..=8).min(PAGES - first);
        let wait = rng.gen_bool(0.5).then_some(Duration::from_millis(2));
        let began = Instant::now();
        match region.to_private(first * PAGE, pages * PAGE, wait) {
            Ok(()) => {
                latencies.push(began.elapsed());
                converted += 1;
                let words = (first as usize * WORDS_PER_PAGE)..((first + pages) as usize * WORDS_PER_PAGE);
                for word in words.clone() {
                    memory[word].store(CANARY, Ordering::Relaxed);
                }
                // Let the writers have a go at it.
                std::thread::sleep(Duration::from_micros(200));
                for word in words {
                    let value = memory[word].load(Ordering::Relaxed);
                    if value != CANARY {
                        violations += 1;
                        eprintln!("word {word} of a private range was written: {value:#x}");
                    }
                }
                region.to_shared(first * PAGE, pages * PAGE).expect("shared");
            }
            Err(ConvertError::Busy { error_offset, .. }) => {
                assert!(error_offset >= first * PAGE && error_offset < (first + pages) * PAGE);
                assert!(region.is_shared(first * PAGE, pages * PAGE), "a failed conversion was not rolled back");
                busy += 1;
            }
            Err(other) => panic!("conversion: {other}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("writer");
    }
    latencies.sort();
    let percentile = |p: usize| latencies.get(latencies.len().saturating_sub(1) * p / 100).copied().unwrap_or_default();
    eprintln!(
        "stress: {converted} conversions, {busy} EAGAIN, {} writes by 4 queues, {violations} canary violations; \
         successful conversion latency p50 {:?} p99 {:?}",
        writes.load(Ordering::Relaxed),
        percentile(50),
        percentile(99)
    );
    assert_eq!(violations, 0, "a device write landed in a range after its conversion returned");
    assert!(converted > 50, "too few conversions succeeded ({converted}) to say anything");
    assert!(busy > 0, "no conversion ever met a reference: the test did not race");
    assert!(writes.load(Ordering::Relaxed) > 1000);
}
