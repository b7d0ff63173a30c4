//! One run's figures (IOPS, MiB/s, latency percentiles, CPU per I/O) and
//! their summary over the repetitions: medians per case and backend, the
//! better qsd configuration per case, and the tables printed and recorded.

use serde::Serialize;

use super::load::QueueResult;
use super::plan::{Backend, Case};
use super::sys::ProcessMemory;
use crate::figures::{percentile, Stats};

/// What one timed run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// Completed requests, all queues.
    pub ios: u64,
    /// The longest queue's first submission to last completion.
    pub seconds: f64,
    pub iops: f64,
    pub mib_per_s: f64,
    /// Completion latency (submission to completion as the client sees
    /// it), percentiles over every request of the run, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// utime+stime of the backend process over the timed phase; `None` for
    /// the raw ceiling, which has no backend.
    pub backend_cpu_seconds: Option<f64>,
    /// utime+stime of the benchmark process (the client) over the same.
    pub client_cpu_seconds: f64,
    /// CPU per I/O charged to the I/O path: the backend's, or for the raw
    /// ceiling the client's own (it does the I/O itself), microseconds.
    pub cpu_us_per_io: f64,
    /// The client's CPU per I/O, microseconds.
    pub client_cpu_us_per_io: f64,
    /// CPU seconds the rest of the host (neither the backend nor the
    /// client) used during the timed phase: how loaded the shared machine
    /// was while this run was measured.
    pub others_cpu_seconds: f64,
    /// The backend's memory right after the timed phase, its queues still
    /// running; `None` for the raw ceiling.
    pub backend_memory: Option<ProcessMemory>,
}

impl Measurement {
    /// Combines the queues' results of one run.
    pub fn new(
        queues: Vec<QueueResult>,
        block: usize,
        backend_cpu_seconds: Option<f64>,
        client_cpu_seconds: f64,
        host_busy_seconds: f64,
    ) -> Measurement {
        let ios: u64 = queues.iter().map(|q| q.ios).sum();
        let seconds = queues.iter().map(|q| q.elapsed.as_secs_f64()).fold(0.0, f64::max);
        let mut latencies: Vec<u64> = queues.into_iter().flat_map(|q| q.latencies_ns).collect();
        latencies.sort_unstable();
        let us = |q: f64| percentile(&latencies, q).map_or(0.0, |ns| ns as f64 / 1000.0);
        let per_io = |cpu: f64| {
            if ios == 0 {
                0.0
            } else {
                cpu * 1e6 / ios as f64
            }
        };
        let rate = |x: f64| if seconds > 0.0 { x / seconds } else { 0.0 };
        Measurement {
            ios,
            seconds,
            iops: rate(ios as f64),
            mib_per_s: rate(ios as f64 * block as f64 / f64::from(1u32 << 20)),
            p50_us: us(0.50),
            p99_us: us(0.99),
            max_us: us(1.0),
            backend_cpu_seconds,
            client_cpu_seconds,
            cpu_us_per_io: per_io(backend_cpu_seconds.unwrap_or(client_cpu_seconds)),
            client_cpu_us_per_io: per_io(client_cpu_seconds),
            others_cpu_seconds: (host_busy_seconds - client_cpu_seconds - backend_cpu_seconds.unwrap_or(0.0)).max(0.0),
            backend_memory: None,
        }
    }
}

/// One backend's figures for one case over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct BackendSummary {
    pub backend: Backend,
    pub iops: Stats,
    pub mib_per_s: Stats,
    pub p50_us: Stats,
    pub p99_us: Stats,
    pub cpu_us_per_io: Stats,
    pub client_cpu_us_per_io: Stats,
    /// The backend's anonymous memory (heap and stacks, not guest RAM or
    /// request buffers), MiB.
    pub rss_anon_mib: Option<Stats>,
}

impl BackendSummary {
    fn of(backend: Backend, runs: &[&Measurement]) -> Option<BackendSummary> {
        let stats = |get: fn(&Measurement) -> f64| Stats::of(runs.iter().map(|m| get(m)).collect());
        Some(BackendSummary {
            backend,
            iops: stats(|m| m.iops)?,
            mib_per_s: stats(|m| m.mib_per_s)?,
            p50_us: stats(|m| m.p50_us)?,
            p99_us: stats(|m| m.p99_us)?,
            cpu_us_per_io: stats(|m| m.cpu_us_per_io)?,
            client_cpu_us_per_io: stats(|m| m.client_cpu_us_per_io)?,
            rss_anon_mib: Stats::of(
                runs.iter().filter_map(|m| m.backend_memory).map(|b| b.rss_anon_kib as f64 / 1024.0).collect(),
            ),
        })
    }
}

/// A case's summary: every backend's medians, and which qsd configuration
/// did better (by median IOPS) where two were run.
#[derive(Debug, Clone, Serialize)]
pub struct CaseSummary {
    pub case: Case,
    pub backends: Vec<BackendSummary>,
    /// The qsd configuration the table shows: the one with the higher
    /// median IOPS.
    pub qsd_best: Option<Backend>,
    /// gmemd median IOPS / best qsd median IOPS (above 1: gmemd faster).
    pub ratio_gmemd_over_qsd: Option<f64>,
    /// gmemd median IOPS / raw median IOPS.
    pub ratio_gmemd_over_raw: Option<f64>,
    /// CPU seconds the rest of the host used per timed phase, over all of
    /// the case's runs: the noise the case was measured under.
    pub others_cpu_seconds: Option<Stats>,
}

impl CaseSummary {
    pub fn get(&self, backend: Backend) -> Option<&BackendSummary> {
        self.backends.iter().find(|b| b.backend == backend)
    }

    /// The qsd configuration shown.
    pub fn qsd(&self) -> Option<&BackendSummary> {
        self.qsd_best.and_then(|b| self.get(b))
    }
}

/// Summarizes `runs` (case index, backend, measurement) per case.
pub fn summarize(cases: &[Case], runs: &[(usize, Backend, &Measurement)]) -> Vec<CaseSummary> {
    let all = [Backend::Gmemd, Backend::QsdBuffered, Backend::QsdDirect, Backend::Raw];
    cases
        .iter()
        .enumerate()
        .map(|(index, case)| {
            let backends: Vec<BackendSummary> = all
                .iter()
                .filter_map(|&backend| {
                    let of: Vec<&Measurement> =
                        runs.iter().filter(|(c, b, _)| *c == index && *b == backend).map(|(_, _, m)| *m).collect();
                    BackendSummary::of(backend, &of)
                })
                .collect();
            let qsd_best = backends
                .iter()
                .filter(|b| b.backend.is_qsd())
                .max_by(|a, b| a.iops.median.total_cmp(&b.iops.median))
                .map(|b| b.backend);
            let iops =
                |b: Option<Backend>| b.and_then(|b| backends.iter().find(|s| s.backend == b)).map(|s| s.iops.median);
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let others =
                Stats::of(runs.iter().filter(|(c, _, _)| *c == index).map(|(_, _, m)| m.others_cpu_seconds).collect());
            CaseSummary {
                case: case.clone(),
                others_cpu_seconds: others,
                ratio_gmemd_over_qsd: ratio(iops(Some(Backend::Gmemd)), iops(qsd_best)),
                ratio_gmemd_over_raw: ratio(iops(Some(Backend::Gmemd)), iops(Some(Backend::Raw))),
                qsd_best,
                backends,
            }
        })
        .collect()
}

fn cell(s: Option<&BackendSummary>, get: fn(&BackendSummary) -> f64, precision: usize) -> String {
    s.map_or("-".into(), |s| format!("{:.*}", precision, get(s)))
}

/// The qsd column's label for a case: which configuration it shows.
fn qsd_label(summary: &CaseSummary) -> &'static str {
    match summary.qsd_best {
        Some(Backend::QsdDirect) => " (direct)",
        Some(Backend::QsdBuffered) if summary.get(Backend::QsdDirect).is_some() => " (buffered)",
        _ => "",
    }
}

/// The summary as two Markdown tables (throughput; latency and CPU), ready
/// to paste into docs/benchmarks.md.
pub fn tables(summaries: &[CaseSummary]) -> String {
    let mut out = String::from(
        "| case | gmemd IOPS | qsd IOPS | raw IOPS | gmemd/qsd | gmemd/raw | gmemd MiB/s | qsd MiB/s | raw MiB/s | others' CPU-s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in summaries {
        let (g, q, r) = (s.get(Backend::Gmemd), s.qsd(), s.get(Backend::Raw));
        let ratio = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
        out.push_str(&format!(
            "| {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.case.name,
            cell(g, |b| b.iops.median, 0),
            cell(q, |b| b.iops.median, 0),
            qsd_label(s),
            cell(r, |b| b.iops.median, 0),
            ratio(s.ratio_gmemd_over_qsd),
            ratio(s.ratio_gmemd_over_raw),
            cell(g, |b| b.mib_per_s.median, 1),
            cell(q, |b| b.mib_per_s.median, 1),
            cell(r, |b| b.mib_per_s.median, 1),
            s.others_cpu_seconds.as_ref().map_or("-".into(), |o| format!("{:.1}–{:.1}", o.min, o.max)),
        ));
    }
    out.push_str(
        "\n| case | gmemd p50/p99 µs | qsd p50/p99 µs | raw p50/p99 µs | gmemd CPU µs/IO | qsd CPU µs/IO | raw CPU µs/IO (client) | client CPU µs/IO gmemd/qsd | RssAnon MiB gmemd/qsd |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let rss = |s: Option<&BackendSummary>| {
        s.and_then(|s| s.rss_anon_mib.as_ref()).map_or("-".into(), |m| format!("{:.1}", m.median))
    };
    let lat =
        |s: Option<&BackendSummary>| s.map_or("-".into(), |s| format!("{:.0}/{:.0}", s.p50_us.median, s.p99_us.median));
    for s in summaries {
        let (g, q, r) = (s.get(Backend::Gmemd), s.qsd(), s.get(Backend::Raw));
        out.push_str(&format!(
            "| {} | {} | {}{} | {} | {} | {} | {} | {}/{} | {}/{} |\n",
            s.case.name,
            lat(g),
            lat(q),
            qsd_label(s),
            lat(r),
            cell(g, |b| b.cpu_us_per_io.median, 1),
            cell(q, |b| b.cpu_us_per_io.median, 1),
            cell(r, |b| b.cpu_us_per_io.median, 1),
            cell(g, |b| b.client_cpu_us_per_io.median, 1),
            cell(q, |b| b.client_cpu_us_per_io.median, 1),
            rss(g),
            rss(q),
        ));
    }
    out
}

/// Median IOPS per depth of the sweep cases for `backend` (for the plot).
pub fn sweep_points(
    summaries: &[CaseSummary],
    pick: impl Fn(&CaseSummary) -> Option<&BackendSummary>,
) -> Vec<(u32, f64)> {
    let mut points: Vec<(u32, f64)> = summaries
        .iter()
        .filter(|s| s.case.sweep)
        .filter_map(|s| pick(s).map(|b| (s.case.depth, b.iops.median)))
        .collect();
    points.sort_by_key(|p| p.0);
    points
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::hostside::plan::quick_plan;

    fn queue(ios: u64, ms: u64, latency_us: u64) -> QueueResult {
        QueueResult {
            ios,
            elapsed: Duration::from_millis(ms),
            latencies_ns: (0..ios).map(|i| (latency_us + i % 3) * 1000).collect(),
        }
    }

    #[test]
    fn measurement_from_queues() {
        let m = Measurement::new(vec![queue(1000, 500, 10), queue(1000, 1000, 20)], 4096, Some(0.02), 0.01, 0.5);
        assert_eq!(m.ios, 2000);
        assert!((m.seconds - 1.0).abs() < 1e-9);
        assert!((m.iops - 2000.0).abs() < 1e-6);
        assert!((m.mib_per_s - 2000.0 * 4096.0 / 1048576.0).abs() < 1e-9);
        assert!((m.cpu_us_per_io - 10.0).abs() < 1e-9, "backend CPU per I/O");
        assert!((m.client_cpu_us_per_io - 5.0).abs() < 1e-9);
        assert!(m.p50_us >= 10.0 && m.p50_us <= 12.0, "{}", m.p50_us);
        assert!(m.p99_us >= 20.0, "{}", m.p99_us);
        assert!((m.others_cpu_seconds - 0.47).abs() < 1e-9);
        let raw = Measurement::new(vec![queue(100, 100, 5)], 4096, None, 0.001, 0.0);
        assert!((raw.cpu_us_per_io - 10.0).abs() < 1e-9, "raw: the client's CPU");
    }

    #[test]
    fn summary_picks_the_better_qsd() {
        let cases = quick_plan();
        let uncached = cases.len() - 1;
        let m = |iops: f64| Measurement::new(vec![queue(iops as u64, 1000, 10)], 4096, Some(0.1), 0.1, 0.3);
        let (g, qb, qd, r) = (m(300.0), m(100.0), m(200.0), m(400.0));
        let runs = vec![
            (uncached, Backend::Gmemd, &g),
            (uncached, Backend::QsdBuffered, &qb),
            (uncached, Backend::QsdDirect, &qd),
            (uncached, Backend::Raw, &r),
            (0, Backend::Gmemd, &g),
            (0, Backend::QsdBuffered, &qb),
        ];
        let summary = summarize(&cases, &runs);
        let s = &summary[uncached];
        assert_eq!(s.qsd_best, Some(Backend::QsdDirect));
        assert_eq!(s.ratio_gmemd_over_qsd, Some(1.5));
        assert_eq!(s.ratio_gmemd_over_raw, Some(0.75));
        assert_eq!(summary[0].qsd_best, Some(Backend::QsdBuffered));
        assert_eq!(summary[0].ratio_gmemd_over_raw, None);
        let text = tables(&summary);
        assert!(text.contains("| 200 (direct) |"), "{text}");
        assert!(text.contains("| randread-4k-q1-d1 | 300 | 100 | - | 3.00 |"), "{text}");
        let points = sweep_points(&summary, |s| s.get(Backend::Gmemd));
        assert_eq!(points, [(1, 300.0)]);
    }
}
