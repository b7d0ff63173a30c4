//! `LatencyHistogram`: a lock-free log-linear histogram, so a device worker
//! can record a fault's latency without taking a lock that `query-migration`
//! (or anything else) might hold.

use std::sync::atomic::{AtomicU64, Ordering};

use gmem_protocol::LatencySummary;

/// Sub-buckets per power of two: 2^3 = 8, so a reported percentile is within
/// 1/8 of the true value.
const SUB_BITS: u32 = 3;
const SUB_BUCKETS: u64 = 1 << SUB_BITS;
/// Enough buckets for every u64.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) << SUB_BITS;

/// Nanosecond samples in log-linear buckets.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// Adds one sample.
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Forgets every sample (a new migration begins).
    pub fn reset(&self) {
        for bucket in self.buckets.iter() {
            bucket.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
        self.max_ns.store(0, Ordering::Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Count, p50, p99 and max, in microseconds (rounded up, so a non-zero
    /// latency never reads as 0).
    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let max_ns = self.max_ns.load(Ordering::Relaxed);
        let percentile = |p: u64| {
            // The smallest bucket at which at least p% of the samples lie.
            let wanted = (total * p).div_ceil(100).max(1);
            let mut seen = 0;
            for (index, count) in counts.iter().enumerate() {
                seen += count;
                if seen >= wanted {
                    return bucket_upper(index).min(max_ns);
                }
            }
            max_ns
        };
        let us = |ns: u64| ns.div_ceil(1000);
        if total == 0 {
            return LatencySummary::default();
        }
        LatencySummary { count: total, p50_us: us(percentile(50)), p99_us: us(percentile(99)), max_us: us(max_ns) }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB_BUCKETS {
        return ns as usize;
    }
    let exponent = 63 - ns.leading_zeros();
    let mantissa = (ns >> (exponent - SUB_BITS)) & (SUB_BUCKETS - 1);
    (((u64::from(exponent - SUB_BITS) + 1) << SUB_BITS) | mantissa) as usize
}

/// The largest value that falls in bucket `index`.
fn bucket_upper(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB_BUCKETS {
        return index;
    }
    let exponent = (index >> SUB_BITS) + u64::from(SUB_BITS) - 1;
    let lower = (1u64 << exponent) | ((index & (SUB_BUCKETS - 1)) << (exponent - u64::from(SUB_BITS)));
    lower + ((1u64 << (exponent - u64::from(SUB_BITS))) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut previous = 0;
        for ns in (0..5000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let index = bucket_of(ns);
            assert!(index < BUCKETS);
            assert!(index >= previous, "{ns}");
            assert!(bucket_upper(index) >= ns, "{ns} above its bucket");
            previous = index;
        }
    }

    #[test]
    fn percentiles_are_within_an_eighth() {
        let histogram = LatencyHistogram::default();
        assert_eq!(histogram.summary(), LatencySummary::default());
        // 1..=1000 µs, one sample each.
        for us in 1..=1000u64 {
            histogram.record(us * 1000);
        }
        let summary = histogram.summary();
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.max_us, 1000);
        assert!((500..=563).contains(&summary.p50_us), "{summary:?}");
        assert!((990..=1000).contains(&summary.p99_us), "{summary:?}");
        histogram.reset();
        assert_eq!(histogram.count(), 0);
    }
}
