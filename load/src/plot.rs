//! The PNG plot of p99 latency against offered rate, one line per server.
//!
//! Drawn with plotters' bitmap backend and a font embedded in the binary (DejaVu Sans, through
//! `ab_glyph`), so it needs no system fonts and no fontconfig.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One line of the plot: (offered events/s, p99 ms) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // The embedded font is valid TrueType; if it were not, text would be missing from the
        // plot, not the plot itself.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Draws `series` into a PNG at `path`.
pub fn p99_vs_rate(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    register_font();
    let points = series.iter().flat_map(|s| s.points.iter());
    let x_max = points.clone().map(|p| p.0).fold(0.0, f64::max).max(1.0) * 1.05;
    let y_max = points.clone().map(|p| p.1).fold(0.0, f64::max).max(0.1) * 1.5;
    let y_min = points
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.01, 1.0)
        / 1.5;

    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("offered fanout rate (events/s delivered if nothing is lost)")
        .y_desc("p99 publish→receive latency (ms, log scale)")
        .x_label_formatter(&|x| crate::report::fmt_num(*x))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, s) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let mut pts = s.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = std::env::temp_dir().join(format!("confab-load-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p99.png");
        p99_vs_rate(
            &path,
            "test",
            &[
                Series {
                    label: "reference".into(),
                    points: vec![(1000.0, 0.5), (5000.0, 0.8), (10000.0, 3.0)],
                },
                Series {
                    label: "confab".into(),
                    points: vec![(1000.0, 0.9), (5000.0, 2.0)],
                },
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(
            bytes.len() > 5_000,
            "a plot with text and lines, not an empty image"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
