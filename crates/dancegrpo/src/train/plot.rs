//! Charts of a run (the reward curve, the pretraining losses) drawn with
//! `plotters` into RGB pixels: a title, axis titles with tick labels, light
//! grid lines, a legend, and any number of line and point series.
//!
//! Text is set in DejaVu Sans (from the `dejavu` crate), registered once with
//! plotters' own font registry, a process-wide table that plotters keeps; the
//! guard here only makes the registration happen once.

use std::ops::Range;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use tch::Tensor;

use crate::error::{Error, Result};

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    /// Connected points; a non-finite point is a gap.
    Line {
        /// Stroke width in pixels.
        width: u32,
    },
    /// Filled circles.
    Points {
        /// Radius in pixels.
        radius: u32,
    },
}

/// One named series of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its legend entry.
    pub name: String,
    /// `(x, y)` points (non-finite ones are left out).
    pub points: Vec<(f64, f64)>,
    /// RGB colour.
    pub colour: [u8; 3],
    /// Line or points.
    pub style: Style,
}

/// The y axis's scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear.
    Linear,
    /// Logarithmic (non-positive values are left out).
    Log,
}

/// Where a chart's legend goes (where its data is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corner {
    /// Top right (a falling curve: losses).
    UpperRight,
    /// Bottom right (a rising curve: rewards).
    LowerRight,
}

/// One chart: titles, the y scale and its series.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_title: String,
    /// Beside the y axis.
    pub y_title: String,
    /// The y axis's scale.
    pub y_scale: Scale,
    /// What is drawn, in order (later on top).
    pub series: Vec<Series>,
    /// Where the legend goes.
    pub legend: Corner,
}

static FONT: Once = Once::new();

/// Renders `charts` stacked top to bottom, each `width` x `height` pixels,
/// into a uint8 `(n * height, width, 3)` image.
pub fn render(charts: &[Chart], width: u32, height: u32) -> Result<Tensor> {
    FONT.call_once(|| {
        // a font that does not parse would make every chart fail below, naming it
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    let rows = charts.len().max(1) as u32;
    let mut pixels = vec![0u8; (width * height * rows * 3) as usize];
    {
        let root =
            BitMapBackend::with_buffer(&mut pixels, (width, height * rows)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        for (area, chart) in root.split_evenly((rows as usize, 1)).iter().zip(charts) {
            draw(area, chart)?;
        }
        root.present().map_err(plot_error)?;
    }
    let image = Tensor::from_slice(&pixels).view([(height * rows) as i64, width as i64, 3]); // (H, W, 3)
    Ok(image)
}

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::Input(format!("drawing a chart: {e}"))
}

/// The runs of consecutive drawable points of a line (a non-drawable point
/// breaks it: not finite, or not positive on a log scale).
pub fn runs(points: &[(f64, f64)], scale: Scale) -> Vec<Vec<(f64, f64)>> {
    points
        .split(|p| !drawable(*p, scale))
        .filter(|r| !r.is_empty())
        .map(<[(f64, f64)]>::to_vec)
        .collect()
}

/// Consecutive points of a line, in axis coordinates.
type Run = Vec<(f64, f64)>;

fn drawable((x, y): (f64, f64), scale: Scale) -> bool {
    x.is_finite() && y.is_finite() && (scale == Scale::Linear || y > 0.0)
}

/// `y` where the axis puts it: itself, or its `log10` on a log scale (drawn
/// on a linear axis whose labels show `10^v`: a log axis of plotters labels
/// only powers of ten, often none at all for a loss curve).
fn axis_y(y: f64, scale: Scale) -> f64 {
    match scale {
        Scale::Linear => y,
        Scale::Log => y.log10(),
    }
}

/// The extent of `values` with a margin (5% of the span; a single value gets
/// one around it; no value gives `0..1`).
pub fn extent(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = match hi - lo {
        0.0 => lo.abs().max(1.0) * 0.5,
        span => span * 0.05,
    };
    lo - pad..hi + pad
}

/// The grid, tick labels and axis titles of `chart`.
fn draw_mesh<DB: DrawingBackend>(ctx: &mut Ctx<'_, DB>, chart: &Chart) -> Result<()> {
    let scale = chart.y_scale;
    let y_label = |v: &f64| match scale {
        Scale::Linear => label(*v),
        Scale::Log => label(10f64.powf(*v)),
    };
    ctx.configure_mesh()
        .x_desc(chart.x_title.as_str())
        .y_desc(chart.y_title.as_str())
        .label_style(("sans-serif", 11))
        .axis_desc_style(("sans-serif", 12))
        .light_line_style(RGBColor(242, 242, 242))
        .bold_line_style(RGBColor(225, 225, 225))
        .x_labels(6)
        .x_label_formatter(&|x| label(*x))
        .y_labels(5)
        .y_label_formatter(&y_label)
        .draw()
        .map_err(plot_error)
}

/// A chart's drawing context on linear `f64` axes.
type Ctx<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A tick label: integers as integers, else 4 significant digits.
fn label(v: f64) -> String {
    match v.fract() == 0.0 && v.abs() < 1e6 {
        true => format!("{v:.0}"),
        false => format!("{}", format!("{v:.3e}").parse::<f64>().unwrap_or(v)),
    }
}

fn draw<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, chart: &Chart) -> Result<()> {
    let scale = chart.y_scale;
    let shown = |s: &Series| -> Vec<Vec<(f64, f64)>> {
        let on_axis =
            |r: Vec<(f64, f64)>| r.into_iter().map(|(x, y)| (x, axis_y(y, scale))).collect();
        runs(&s.points, scale).into_iter().map(on_axis).collect()
    };
    let series: Vec<(&Series, Vec<Run>)> = chart.series.iter().map(|s| (s, shown(s))).collect();
    let all = || series.iter().flat_map(|(_, runs)| runs.iter().flatten());
    let xs = extent(all().map(|p| p.0));
    let ys = extent(all().map(|p| p.1));
    let mut ctx = ChartBuilder::on(area)
        .caption(&chart.title, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(56)
        .build_cartesian_2d(xs, ys)
        .map_err(plot_error)?;
    draw_mesh(&mut ctx, chart)?;
    for (s, runs) in series {
        let [r, g, b] = s.colour;
        let colour = RGBColor(r, g, b);
        let anno = match s.style {
            Style::Line { width } => {
                let stroke = colour.stroke_width(width);
                for run in runs {
                    ctx.draw_series(LineSeries::new(run, stroke))
                        .map_err(plot_error)?;
                }
                let legend = move |(x, y): (i32, i32)| {
                    EmptyElement::at((x, y)) + PathElement::new(vec![(0, 0), (16, 0)], stroke)
                };
                let anno = ctx.draw_series(std::iter::empty::<Circle<(f64, f64), u32>>());
                anno.map_err(plot_error)?.legend(legend)
            }
            Style::Points { radius } => {
                let dots = runs
                    .into_iter()
                    .flatten()
                    .map(|p| Circle::new(p, radius, colour.filled()));
                let legend =
                    move |(x, y): (i32, i32)| Circle::new((x + 8, y), radius, colour.filled());
                ctx.draw_series(dots).map_err(plot_error)?.legend(legend)
            }
        };
        anno.label(s.name.as_str());
    }
    ctx.configure_series_labels()
        .position(match chart.legend {
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
        })
        .label_font(("sans-serif", 11))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(plot_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(image: &Tensor, rgb: [u8; 3]) -> i64 {
        let want = Tensor::from_slice(&rgb).view([1, 1, 3]);
        image
            .eq_tensor(&want)
            .all_dim(2, false)
            .sum(tch::Kind::Int64)
            .int64_value(&[])
    }

    #[test]
    fn lines_points_and_text_are_drawn() {
        let chart = Chart {
            title: "reward".into(),
            x_title: "iteration".into(),
            y_title: "mean reward".into(),
            y_scale: Scale::Linear,
            legend: Corner::LowerRight,
            series: vec![
                Series {
                    name: "per iteration".into(),
                    points: vec![(1.0, -6.0), (2.0, f64::NAN), (3.0, -5.0), (4.0, -4.0)],
                    colour: [20, 60, 200],
                    style: Style::Line { width: 2 },
                },
                Series {
                    name: "eval".into(),
                    points: vec![(0.0, -6.5), (4.0, -3.9)],
                    colour: [230, 120, 20],
                    style: Style::Points { radius: 3 },
                },
            ],
        };
        let image = render(&[chart.clone(), chart], 320, 200).unwrap();
        assert_eq!(image.size(), [400, 320, 3]);
        assert!(count(&image, [20, 60, 200]) > 50, "the line");
        assert!(count(&image, [230, 120, 20]) > 20, "the points");
        // dark anti-aliased text: the title, tick labels, axis titles, legend
        let dark = image
            .lt(80)
            .all_dim(2, false)
            .sum(tch::Kind::Int64)
            .int64_value(&[]);
        assert!(dark > 300, "{dark} dark pixels");
    }

    #[test]
    fn gaps_extents_and_an_empty_chart() {
        let pts = [
            (1.0, 1.0),
            (2.0, f64::NAN),
            (3.0, 2.0),
            (4.0, 3.0),
            (5.0, -1.0),
        ];
        assert_eq!(
            runs(&pts, Scale::Linear),
            vec![vec![(1.0, 1.0)], vec![(3.0, 2.0), (4.0, 3.0), (5.0, -1.0)]]
        );
        assert_eq!(runs(&pts, Scale::Log).len(), 2);
        assert_eq!(extent([1.0, 3.0].into_iter()), 0.9..3.1);
        assert_eq!(extent([2.0].into_iter()), 1.0..3.0);
        assert_eq!(extent(std::iter::empty()), 0.0..1.0);
        assert_eq!(
            (label(50.0), label(0.123456), label(-4.5)),
            ("50".into(), "0.1235".into(), "-4.5".into())
        );
        assert_eq!(axis_y(100.0, Scale::Log), 2.0);
        let empty = Chart {
            title: "nothing yet".into(),
            x_title: "step".into(),
            y_title: "loss".into(),
            y_scale: Scale::Log,
            series: vec![],
            legend: Corner::UpperRight,
        };
        assert_eq!(render(&[empty], 200, 100).unwrap().size(), [100, 200, 3]);
    }
}
