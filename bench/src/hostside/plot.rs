//! The queue-depth plot: median IOPS against depth (4 KiB random read, one
//! queue, pinned) for gmemd, qsd and the raw ceiling, as SVG.

use std::path::Path;

use plotters::prelude::*;

use super::error::{HostBenchError, Result};

/// One line of the plot.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    /// (queue depth, IOPS)
    pub points: Vec<(u32, f64)>,
}

fn plot_error(e: impl std::fmt::Display) -> HostBenchError {
    HostBenchError::io("drawing the plot", std::io::Error::other(e.to_string()))
}

/// Draws `series` into an SVG file at `path`; `subtitle` goes under the
/// title (date, commit, load).
pub fn draw(path: &Path, series: &[Series], subtitle: &str) -> Result<()> {
    let max_iops = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(1.0, f64::max);
    let max_depth = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).max().unwrap_or(128).max(2);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (title, body) = root.split_vertically(60);
    title
        .draw_text(
            "4 KiB random read, 1 queue: IOPS against queue depth (medians)",
            &("sans-serif", 20).into_text_style(&title),
            (60, 8),
        )
        .map_err(plot_error)?;
    title.draw_text(subtitle, &("sans-serif", 13).into_text_style(&title), (60, 36)).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&body)
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        // Depths double from point to point: plot them at log2(depth), evenly
        // spaced, and label the axis with the depths themselves.
        .build_cartesian_2d(0f64..f64::from(max_depth).log2(), 0f64..max_iops * 1.1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(f64::from(max_depth).log2() as usize + 1)
        .x_desc("queue depth (requests in flight, log scale)")
        .y_desc("IOPS")
        .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(plot_error)?;
    let colors = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(90, 90, 90)];
    for (i, s) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let points: Vec<(f64, f64)> = s.points.iter().map(|&(d, y)| (f64::from(d).log2(), y)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}
