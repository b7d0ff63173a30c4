//! The figures one guest run reports, and their summary over several runs.

use anyhow::{ensure, Context, Result};
use gmem_tests::AgentResults;
use serde::Serialize;

/// What the `bench` agent reported for one run, plus host-side timing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figures {
    /// Sequential 1 MiB O_DIRECT writes, fdatasync included.
    pub seq_write_mib_per_s: f64,
    /// Sequential 1 MiB O_DIRECT reads.
    pub seq_read_mib_per_s: f64,
    /// Random 4 KiB O_DIRECT reads, one at a time (queue depth 1).
    pub rand_read_iops: f64,
    /// Guest-measured duration of each phase, in seconds.
    pub seq_write_seconds: f64,
    /// See `seq_write_seconds`.
    pub seq_read_seconds: f64,
    /// See `seq_write_seconds`.
    pub rand_read_seconds: f64,
    /// Guest uptime when the agent started (kernel boot + init).
    pub boot_seconds: Option<f64>,
    /// Host wall time of the whole run: backend start to guest power-off.
    pub wall_seconds: f64,
}

/// The three operations the agent runs, in the order it prints them.
const OPS: [&str; 3] = ["seq-write", "seq-read", "rand-read"];

fn numbers(results: &AgentResults, key: &str) -> Result<Vec<f64>> {
    results
        .all(key)
        .into_iter()
        .map(|v| v.parse::<f64>().with_context(|| format!("{key}={v:?} is not a number")))
        .collect()
}

impl Figures {
    /// Reads the agent's three result lines.
    pub fn from_results(results: &AgentResults, wall_seconds: f64) -> Result<Figures> {
        let ops = results.all("op");
        ensure!(ops == OPS, "the bench agent reported operations {ops:?}, expected {OPS:?}");
        let seconds = numbers(results, "seconds")?;
        let mib_per_s = numbers(results, "mib_per_s")?;
        let iops = numbers(results, "iops")?;
        ensure!(
            seconds.len() == 3 && mib_per_s.len() == 2 && iops.len() == 1,
            "incomplete bench results: seconds={seconds:?} mib_per_s={mib_per_s:?} iops={iops:?}"
        );
        Ok(Figures {
            seq_write_mib_per_s: mib_per_s[0],
            seq_read_mib_per_s: mib_per_s[1],
            rand_read_iops: iops[0],
            seq_write_seconds: seconds[0],
            seq_read_seconds: seconds[1],
            rand_read_seconds: seconds[2],
            boot_seconds: results.boot_seconds(),
            wall_seconds,
        })
    }
}

/// One headline figure: its name, unit and where it is in [`Figures`].
#[derive(Debug, Clone, Copy)]
pub struct Figure {
    pub name: &'static str,
    pub unit: &'static str,
    pub get: fn(&Figures) -> f64,
}

/// The figures the summary table compares.
pub const HEADLINE: [Figure; 3] = [
    Figure { name: "seq-write", unit: "MiB/s", get: |f| f.seq_write_mib_per_s },
    Figure { name: "seq-read", unit: "MiB/s", get: |f| f.seq_read_mib_per_s },
    Figure { name: "rand-read 4K QD1", unit: "IOPS", get: |f| f.rand_read_iops },
];

/// Median of `values` (mean of the middle two for an even count); `None`
/// when there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank; `None` when
/// there are none.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Statistics of one figure over one backend's runs.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub values: Vec<f64>,
}

impl Stats {
    /// The statistics of `values`; `None` when there are none.
    pub fn of(values: Vec<f64>) -> Option<Stats> {
        let median = median(&values)?;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Stats { median, min, max, values })
    }
}

/// One row of the summary: a figure for both backends and their ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub figure: &'static str,
    pub unit: &'static str,
    pub gmemd: Option<Stats>,
    pub qsd: Option<Stats>,
    /// gmemd median / qsd median: above 1 means gmemd did better.
    pub ratio_gmemd_over_qsd: Option<f64>,
}

/// The summary rows for the runs of both backends.
pub fn summarize(gmemd: &[Figures], qsd: &[Figures]) -> Vec<Row> {
    HEADLINE
        .iter()
        .map(|fig| {
            let g = Stats::of(gmemd.iter().map(fig.get).collect());
            let q = Stats::of(qsd.iter().map(fig.get).collect());
            let ratio = match (&g, &q) {
                (Some(g), Some(q)) if q.median > 0.0 => Some(g.median / q.median),
                _ => None,
            };
            Row { figure: fig.name, unit: fig.unit, gmemd: g, qsd: q, ratio_gmemd_over_qsd: ratio }
        })
        .collect()
}

/// The summary as a plain-text table.
pub fn table(rows: &[Row]) -> String {
    let cell = |s: &Option<Stats>| s.as_ref().map_or("-".to_string(), |s| format!("{:.1}", s.median));
    let range = |s: &Option<Stats>| s.as_ref().map_or("-".to_string(), |s| format!("{:.1}-{:.1}", s.min, s.max));
    let mut out = format!(
        "{:<24} {:>13} {:>13} {:>11}   {:>17} {:>17}\n",
        "figure", "gmemd median", "qsd median", "gmemd/qsd", "gmemd min-max", "qsd min-max"
    );
    for row in rows {
        let name = format!("{} ({})", row.figure, row.unit);
        let ratio = row.ratio_gmemd_over_qsd.map_or("-".to_string(), |r| format!("{r:.2}"));
        out.push_str(&format!(
            "{name:<24} {:>13} {:>13} {ratio:>11}   {:>17} {:>17}\n",
            cell(&row.gmemd),
            cell(&row.qsd),
            range(&row.gmemd),
            range(&row.qsd)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn parses_agent_output() -> Result<()> {
        let serial = "GMEMD-AGENT-START bench uptime=5.50\n\
            GMEMD-RESULT op=seq-write mib=128 seconds=0.5 mib_per_s=256.00\n\
            GMEMD-RESULT op=seq-read mib=128 seconds=0.25 mib_per_s=512.00\n\
            GMEMD-RESULT op=rand-read count=8192 seconds=2.0 iops=4096\n";
        let f = Figures::from_results(&AgentResults::parse(serial), 9.0)?;
        assert_eq!((f.seq_write_mib_per_s, f.seq_read_mib_per_s, f.rand_read_iops), (256.0, 512.0, 4096.0));
        assert_eq!((f.seq_write_seconds, f.rand_read_seconds, f.boot_seconds), (0.5, 2.0, Some(5.5)));
        assert!(Figures::from_results(&AgentResults::parse("GMEMD-RESULT op=seq-write\n"), 1.0).is_err());
        Ok(())
    }
}
