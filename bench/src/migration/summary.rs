//! The summary of a `gmem-bench migration` run: each figure's statistics
//! per scenario, and the Markdown tables printed at the end.

use serde::Serialize;

use super::figures::RunFigures;
use super::scenario::Scenario;
use crate::figures::Stats;

/// A row of the summary tables: a name, a unit, the figure, decimals shown.
#[derive(Debug, Clone, Copy)]
pub struct Figure {
    pub name: &'static str,
    pub unit: &'static str,
    pub get: fn(&RunFigures) -> Option<f64>,
    pub decimals: usize,
}

impl Figure {
    const fn new(
        name: &'static str,
        unit: &'static str,
        get: fn(&RunFigures) -> Option<f64>,
        decimals: usize,
    ) -> Figure {
        Figure { name, unit, get, decimals }
    }
}

/// Every figure, in table order.
pub const FIGURES: [Figure; 15] = [
    Figure::new("QEMU total-time", "ms", |f| f.total_time_ms, 0),
    Figure::new("migrate → guest I/O on destination", "ms", |f| Some(f.to_destination_ms), 0),
    Figure::new("QEMU downtime", "ms", |f| Some(f.downtime_ms), 0),
    Figure::new("guest-visible stall", "ms", |f| Some(f.stall_ms), 1),
    Figure::new("progress line interval", "ms", |f| Some(f.line_interval_ms), 2),
    Figure::new("device I/O gap (gmemd)", "ms", |f| f.device_io_gap_ms, 1),
    Figure::new("RAM sent", "MiB", |f| Some(f.transferred_mib), 0),
    Figure::new("device postcopy faults", "pages", |f| f.device_faults, 0),
    Figure::new("device fault-to-wake p50", "µs", |f| f.fault_p50_us, 0),
    Figure::new("device fault-to-wake p99", "µs", |f| f.fault_p99_us, 0),
    Figure::new("device fault-to-wake max", "µs", |f| f.fault_max_us, 0),
    Figure::new("QEMU postcopy-blocktime", "ms", |f| f.blocktime_ms, 0),
    Figure::new("QEMU postcopy-requests", "pages", |f| f.postcopy_requests, 0),
    Figure::new("QEMU blocktime / request", "ms", |f| f.blocktime_per_request_ms, 2),
    Figure::new("QEMU blocktime / non-device request", "ms", |f| f.blocktime_per_vcpu_request_ms, 1),
];

/// One figure over a scenario's runs.
#[derive(Debug, Clone, Serialize)]
pub struct FigureStats {
    pub figure: &'static str,
    pub unit: &'static str,
    /// `None` when the figure does not apply to the scenario.
    pub stats: Option<Stats>,
}

/// Every figure of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioSummary {
    pub scenario: Scenario,
    pub runs: usize,
    pub figures: Vec<FigureStats>,
}

/// The summary of `scenario`'s runs.
pub fn summarize(scenario: Scenario, runs: &[RunFigures]) -> ScenarioSummary {
    let figures = FIGURES
        .iter()
        .map(|figure| FigureStats {
            figure: figure.name,
            unit: figure.unit,
            stats: Stats::of(runs.iter().filter_map(figure.get).collect()),
        })
        .collect();
    ScenarioSummary { scenario, runs: runs.len(), figures }
}

/// A Markdown table: one row per figure that applies to any of `columns`,
/// one column per scenario, each cell `median (min–max)`.
pub fn table(columns: &[&ScenarioSummary]) -> String {
    let mut rows = vec![std::iter::once("figure".to_string())
        .chain(columns.iter().map(|c| format!("{} (n={})", c.scenario.name(), c.runs)))
        .collect::<Vec<_>>()];
    for (i, figure) in FIGURES.iter().enumerate() {
        let cells: Vec<Option<&Stats>> = columns.iter().map(|c| c.figures[i].stats.as_ref()).collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        let d = figure.decimals;
        let mut row = vec![format!("{} ({})", figure.name, figure.unit)];
        row.extend(cells.iter().map(|cell| match cell {
            None => "–".to_string(),
            Some(s) if s.values.len() == 1 => format!("{:.d$}", s.median),
            Some(s) => format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max),
        }));
        rows.push(row);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|col| rows.iter().map(|r| r[col].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(col, (cell, &w))| {
                let pad = w - cell.chars().count();
                if col == 0 {
                    format!("{cell}{}", " ".repeat(pad))
                } else {
                    format!("{}{cell}", " ".repeat(pad))
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
        if n == 0 {
            // Dashes over each cell and its two spaces; figures align right.
            let rule: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(col, &w)| match col {
                    0 => "-".repeat(w + 2),
                    _ => format!("{}:", "-".repeat(w + 1)),
                })
                .collect();
            out.push_str(&format!("|{}|\n", rule.join("|")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(total: f64, faults: Option<f64>) -> RunFigures {
        RunFigures {
            completed: true,
            total_time_ms: Some(total),
            to_destination_ms: total,
            downtime_ms: 10.0,
            stall_ms: 50.0,
            stall_start_ms: 900.0,
            line_interval_ms: 1.0,
            device_io_gap_ms: None,
            device_faults: faults,
            fault_p50_us: None,
            fault_p99_us: None,
            fault_max_us: None,
            blocktime_ms: None,
            postcopy_requests: None,
            blocktime_per_request_ms: None,
            blocktime_per_vcpu_request_ms: None,
            transferred_mib: 100.0,
        }
    }

    #[test]
    fn table_rows_columns_and_ranges() {
        let a = summarize(
            Scenario::PostcopyGmemdDirect,
            &[run(1000.0, Some(3.0)), run(3000.0, Some(5.0)), run(2000.0, Some(4.0))],
        );
        let b = summarize(Scenario::PrecopyQsdDirect, &[run(1500.0, None)]);
        let text = table(&[&a, &b]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("| figure "), "{text}");
        assert!(lines[0].contains("postcopy-gmemd-direct (n=3)"), "{text}");
        assert!(lines[1].starts_with("|---") && lines[1].ends_with(":|"), "{text}");
        let total = lines.iter().find(|l| l.contains("QEMU total-time")).expect("a total row");
        assert!(total.contains(" 2000 (1000–3000) | ") && total.ends_with(" 1500 |"), "{text}");
        let faults = lines.iter().find(|l| l.contains("device postcopy faults")).expect("a faults row");
        assert!(faults.contains("4 (3–5)") && faults.trim_end().ends_with("– |"), "{text}");
        // No run has a fault latency: no row.
        assert!(!text.contains("fault-to-wake"), "{text}");
        // Every line is as wide as the first.
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{text}");
    }
}
