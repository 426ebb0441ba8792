//! The figure of an experiment: its plots as panels of one SVG (plotters), one row per device.

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::{Corner, Plot, Section};
use crate::Error;

const PANEL: (u32, u32) = (600, 420);

/// Colours that stay apart on white.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
];

/// Every plot of every section, a row of panels per section, as SVG text.
pub fn figure(sections: &[Section]) -> Result<String, Error> {
    let cols = sections
        .iter()
        .map(|s| s.plots.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let rows = sections.len().max(1);
    let mut svg = String::new();
    {
        let size = (PANEL.0 * cols as u32, PANEL.1 * rows as u32);
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let areas = root.split_evenly((rows, cols));
        for (r, section) in sections.iter().enumerate() {
            let device = if section.device == "cuda" {
                "GPU"
            } else {
                "CPU"
            };
            for (c, plot) in section.plots.iter().enumerate() {
                panel(
                    &areas[r * cols + c],
                    plot,
                    &format!("{device}: {}", plot.title),
                )?;
            }
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn draw_error(e: impl std::fmt::Display) -> Error {
    format!("drawing the plot: {e}").into()
}

/// (low, high) of the values, padded; positive for a log axis.
fn span(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let lo = if lo >= 0.0 { 0.0 } else { lo * 1.1 };
        (lo, if hi > lo { hi * 1.1 } else { lo + 1.0 })
    }
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    plot: &Plot,
    title: &str,
) -> Result<(), Error> {
    let points = || plot.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = span(points().map(|p| p.0), plot.log_x);
    let (y0, y1) = span(points().map(|p| p.1), plot.log_y);
    match (plot.log_x, plot.log_y) {
        (true, true) => lines(
            area,
            plot,
            title,
            (x0..x1).log_scale(),
            (y0..y1).log_scale(),
        ),
        (true, false) => lines(area, plot, title, (x0..x1).log_scale(), y0..y1),
        (false, true) => lines(area, plot, title, x0..x1, (y0..y1).log_scale()),
        (false, false) => lines(area, plot, title, x0..x1, y0..y1),
    }
}

fn lines<DB: DrawingBackend, X, Y>(
    area: &DrawingArea<DB, Shift>,
    plot: &Plot,
    title: &str,
    x: X,
    y: Y,
) -> Result<(), Error>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(draw_error)?;
    let (log_x, log_y) = (plot.log_x, plot.log_y);
    chart
        .configure_mesh()
        .x_label_formatter(&|v| tick(*v, log_x))
        .y_label_formatter(&|v| tick(*v, log_y))
        .x_desc(plot.x_label.as_str())
        .y_desc(plot.y_label.as_str())
        .draw()
        .map_err(draw_error)?;
    for (i, series) in plot.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let style = ShapeStyle::from(&colour).stroke_width(2);
        let points = series.points.clone();
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(draw_error)?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, colour.filled())),
            )
            .map_err(draw_error)?;
    }
    chart
        .configure_series_labels()
        .position(match plot.legend {
            Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
        })
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    Ok(())
}

/// A tick label: on a log axis only at 1, 2, 3 and 5 × 10^k (the others stay blank, or the
/// labels run into each other); numbers short, thousands as K.
fn tick(v: f64, log: bool) -> String {
    if log {
        let mantissa = v / 10f64.powf(v.log10().floor());
        if ![1.0, 2.0, 3.0, 5.0]
            .iter()
            .any(|m| (mantissa - m).abs() < 1e-6)
        {
            return String::new();
        }
    }
    let trim = |x: f64| {
        let text = format!("{x:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    match v.abs() {
        a if a >= 1e6 => format!("{}M", trim(v / 1e6)),
        a if a >= 1e4 => format!("{}K", trim(v / 1e3)),
        a if a >= 1.0 || a == 0.0 => trim(v),
        _ => format!("{}", (v * 1e6).round() / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::tick;

    #[test]
    fn ticks_are_short_and_sparse_on_log_axes() {
        assert_eq!(tick(10000.0, true), "10K");
        assert_eq!(tick(20000.0, true), "20K");
        assert_eq!(tick(30000.0, true), "30K");
        assert_eq!(tick(40000.0, true), "");
        assert_eq!(tick(0.01, true), "0.01");
        assert_eq!(tick(5.0, false), "5");
        assert_eq!(tick(2.5, false), "2.5");
        assert_eq!(tick(131072.0, false), "131.072K");
        assert_eq!(tick(2_000_000.0, true), "2M");
    }
}
