//! A small line plot rendered to RGB pixels (the reward and loss curves), no
//! dependencies: a frame, tick labels (built-in bitmap font) at the y axis's
//! minimum, middle and maximum and at the first and last x, light grid lines
//! at the labelled y values, a zero line when zero is in range, and the series
//! as connected lines.

use tch::Tensor;

mod canvas;
pub mod font;

use canvas::{Canvas, Label};

/// One plotted line: its points and RGB colour.
pub type Series = (Vec<(f64, f64)>, [u8; 3]);

const FRAME: [u8; 3] = [160, 160, 160];
const GRID: [u8; 3] = [235, 235, 235];
const ZERO: [u8; 3] = [210, 210, 210];
const INK: [u8; 3] = [60, 60, 60];
/// Pixels between the image edge and the frame where no labels go.
const EDGE: usize = 8;
/// Tick mark length, in font pixels (times the font scale).
const TICK: usize = 3;
/// Space between a tick mark and its label, in font pixels.
const GAP: usize = 2;
/// Pixels kept free between a label and the image edge.
const BORDER: usize = 2;

/// Renders `series` (each a list of `(x, y)` and an RGB colour) into a
/// `(height, width, 3)` uint8 image: a frame with tick labels, light grid lines
/// at the labelled y values, a zero line if zero is in range, and the lines.
/// A point with a non-finite coordinate is a gap in its line; with no finite point the
/// image is an unlabelled frame over the unit square.
pub fn line_plot(series: &[Series], width: usize, height: usize) -> Tensor {
    let plan = Plan::new(series, width, height);
    let mut canvas = Canvas::new(width, height);
    draw_axes(&mut canvas, &plan);
    for label in plan.labels() {
        canvas.text(&label, plan.layout.scale, INK);
    }
    for (points, colour) in series {
        // a non-finite point (an iteration without a reward) is a gap in its line
        let finite = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
        for w in points.windows(2).filter(|w| finite(&w[0]) && finite(&w[1])) {
            let a = plan.to_px(w[0].0, w[0].1);
            let b = plan.to_px(w[1].0, w[1].1);
            canvas.line(a, b, *colour);
        }
    }
    canvas.into_tensor()
}

/// The compact tick label of `v`: integral values below 10^6 in magnitude as
/// integers (step numbers stay exact), magnitudes below 1e-3 or from 1e5 on in
/// scientific notation (`1.2e-5`), everything else with 4 significant digits;
/// trailing zeros dropped. Non-finite values give an empty label.
pub fn format_tick(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    if v == 0.0 {
        return "0".into();
    }
    if v.fract() == 0.0 && v.abs() < 1e6 {
        return format!("{}", v as i64);
    }
    if v.abs() < 1e-3 || v.abs() >= 1e5 {
        let s = format!("{v:.3e}");
        let (mantissa, exponent) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{exponent}", trim_zeros(mantissa));
    }
    let decimals = (3 - v.abs().log10().floor() as i64).clamp(0, 7) as usize;
    trim_zeros(&format!("{v:.decimals$}")).into()
}

/// `s` without the trailing zeros of its fraction (and without a bare `.`).
fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// An extent in data units: x from `x0` to `x1`, y from `y0` to `y1`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Range {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Range {
    /// The extent of the finite points of `series`, `None` without any.
    fn of(series: &[Series]) -> Option<Range> {
        let points = series.iter().flat_map(|(s, _)| s.iter());
        let finite = points.filter(|(x, y)| x.is_finite() && y.is_finite());
        finite.fold(None, |r: Option<Range>, &(x, y)| {
            Some(match r {
                None => Range {
                    x0: x,
                    x1: x,
                    y0: y,
                    y1: y,
                },
                Some(r) => Range {
                    x0: r.x0.min(x),
                    x1: r.x1.max(x),
                    y0: r.y0.min(y),
                    y1: r.y1.max(y),
                },
            })
        })
    }

    /// The axes for this data: y padded by 5% of its range (at least 1e-9)
    /// on both sides, x widened to unit length when it is a single value.
    fn axes(self) -> Range {
        let pad = ((self.y1 - self.y0) * 0.05).max(1e-9);
        let x1 = if self.x1 > self.x0 {
            self.x1
        } else {
            self.x0 + 1.0
        };
        Range {
            x0: self.x0,
            x1,
            y0: self.y0 - pad,
            y1: self.y1 + pad,
        }
    }
}

/// The label font's integer scale for a `width x height` image: 1 until the
/// image reaches 800x400, then growing with its smaller side ratio (2 at
/// 800x400, 3 at 1200x600).
fn font_scale(width: usize, height: usize) -> usize {
    (width / 400).min(height / 200).max(1)
}

/// Where the frame lies in the image (pixel coordinates of its left, right,
/// top and bottom lines) and the integer scale of the label font.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Layout {
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    scale: usize,
}

impl Layout {
    /// The frame of a `width x height` image whose y labels are at most
    /// `label_w` pixels wide; `labelled: false` leaves no room for labels.
    fn new(width: usize, height: usize, label_w: usize, labelled: bool) -> Layout {
        let scale = font_scale(width, height);
        let (left, bottom) = if labelled {
            let left = label_w + (TICK + GAP) * scale + BORDER;
            let bottom = (TICK + GAP + font::GLYPH_H) * scale + BORDER;
            (left.max(EDGE), bottom.max(EDGE))
        } else {
            (EDGE, EDGE)
        };
        Layout {
            left: left as f64,
            right: width as f64 - EDGE as f64,
            top: EDGE as f64,
            bottom: height as f64 - bottom as f64,
            scale,
        }
    }

    /// Whether the pixel `(u, v)` lies in the frame (its lines included).
    #[cfg(test)]
    fn contains(&self, u: usize, v: usize) -> bool {
        let (u, v) = (u as f64, v as f64);
        u >= self.left && u <= self.right && v >= self.top && v <= self.bottom
    }
}

/// A labelled value on an axis.
#[derive(Clone, Debug, PartialEq)]
struct Tick {
    value: f64,
    text: String,
}

impl Tick {
    fn at(value: f64) -> Tick {
        Tick {
            value,
            text: format_tick(value),
        }
    }
}

/// Everything decided before drawing: the axes, the frame and the ticks.
#[derive(Debug)]
struct Plan {
    axes: Range,
    layout: Layout,
    y_ticks: Vec<Tick>,
    x_ticks: Vec<Tick>,
    width: usize,
    height: usize,
}

impl Plan {
    /// Plans the plot of `series` in a `width x height` image: y ticks at
    /// the data's minimum, middle and maximum (fewer when they would overlap
    /// or read the same), x ticks at its first and last x.
    fn new(series: &[Series], width: usize, height: usize) -> Plan {
        let data = Range::of(series);
        let axes = data
            .unwrap_or(Range {
                x0: 0.0,
                x1: 1.0,
                y0: 0.0,
                y1: 1.0,
            })
            .axes();
        let candidates = data.map_or(vec![], |d| {
            vec![
                Tick::at(d.y0),
                Tick::at((d.y0 + d.y1) / 2.0),
                Tick::at(d.y1),
            ]
        });
        let scale = font_scale(width, height);
        let label_w = candidates.iter().map(|t| font::text_size(&t.text, scale).0);
        let layout = Layout::new(width, height, label_w.max().unwrap_or(0), data.is_some());
        let mut plan = Plan {
            axes,
            layout,
            y_ticks: vec![],
            x_ticks: vec![],
            width,
            height,
        };
        if let Some(d) = data {
            plan.y_ticks = plan.pick_y_ticks(candidates);
            plan.x_ticks = plan.pick_x_ticks(Tick::at(d.x0), Tick::at(d.x1));
        }
        plan
    }

    /// The pixel `(u, v)` of the data point `(x, y)`.
    fn to_px(&self, x: f64, y: f64) -> (f64, f64) {
        let (a, l) = (&self.axes, &self.layout);
        let u = l.left + (x - a.x0) / (a.x1 - a.x0) * (l.right - l.left);
        let v = l.bottom - (y - a.y0) / (a.y1 - a.y0) * (l.bottom - l.top);
        (u, v)
    }

    /// Keeps `[low, middle, high]` where there is room: the middle only when
    /// all three fit without overlapping, the low one only when it does not
    /// overlap the high one; ticks reading the same as a kept one are dropped.
    fn pick_y_ticks(&self, candidates: Vec<Tick>) -> Vec<Tick> {
        let [low, middle, high] = <[Tick; 3]>::try_from(candidates).expect("three candidates");
        let line = ((font::GLYPH_H + GAP) * self.layout.scale) as f64;
        let span = self.to_px(0.0, low.value).1 - self.to_px(0.0, high.value).1;
        if low.text == high.text || span < line {
            return vec![high];
        }
        if span < 2.0 * line || middle.text == low.text || middle.text == high.text {
            return vec![low, high];
        }
        vec![low, middle, high]
    }

    /// Keeps `first` and, when it reads differently and the two labels do not
    /// collide, `last`.
    fn pick_x_ticks(&self, first: Tick, last: Tick) -> Vec<Tick> {
        let scale = self.layout.scale;
        let half = |t: &Tick| font::text_size(&t.text, scale).0 as f64 / 2.0;
        let room = half(&first) + half(&last) + (font::ADVANCE * scale) as f64;
        let span = self.to_px(last.value, 0.0).0 - self.to_px(first.value, 0.0).0;
        if first.text == last.text || span < room {
            return vec![first];
        }
        vec![first, last]
    }

    /// Every label with its place: y labels right-aligned left of their tick
    /// marks and centred on them, x labels below theirs, centred; all kept
    /// inside the image where it is large enough.
    fn labels(&self) -> Vec<Label> {
        let scale = self.layout.scale;
        let offset = ((TICK + GAP) * scale) as f64;
        let clamp = |at: f64, size: usize, extent: usize| {
            (at.round() as i64).min(extent as i64 - size as i64).max(0)
        };
        let y = self.y_ticks.iter().map(|t| {
            let (w, h) = font::text_size(&t.text, scale);
            let v = self.to_px(self.axes.x0, t.value).1;
            let left = (self.layout.left - offset).round() as i64 - w as i64;
            let top = clamp(v - h as f64 / 2.0, h, self.height);
            Label {
                text: t.text.clone(),
                left,
                top,
            }
        });
        let x = self.x_ticks.iter().map(|t| {
            let w = font::text_size(&t.text, scale).0;
            let u = self.to_px(t.value, self.axes.y0).0;
            let top = (self.layout.bottom + offset).round() as i64;
            let left = clamp(u - w as f64 / 2.0, w, self.width);
            Label {
                text: t.text.clone(),
                left,
                top,
            }
        });
        y.chain(x).collect()
    }
}

/// Draws the grid lines, the zero line, the frame and the tick marks.
fn draw_axes(canvas: &mut Canvas, plan: &Plan) {
    let l = plan.layout;
    let tick = (TICK * l.scale) as f64;
    for t in &plan.y_ticks {
        canvas.line(
            (l.left, plan.to_px(0.0, t.value).1),
            (l.right, plan.to_px(0.0, t.value).1),
            GRID,
        );
    }
    if plan.axes.y0 < 0.0 && plan.axes.y1 > 0.0 {
        let v = plan.to_px(0.0, 0.0).1;
        canvas.line((l.left, v), (l.right, v), ZERO);
    }
    let corners = [
        (l.left, l.top),
        (l.right, l.top),
        (l.right, l.bottom),
        (l.left, l.bottom),
    ];
    for (i, &a) in corners.iter().enumerate() {
        canvas.line(a, corners[(i + 1) % 4], FRAME);
    }
    for t in &plan.y_ticks {
        let v = plan.to_px(0.0, t.value).1;
        canvas.line((l.left - tick, v), (l.left, v), FRAME);
    }
    for t in &plan.x_ticks {
        let u = plan.to_px(t.value, 0.0).0;
        canvas.line((u, l.bottom), (u, l.bottom + tick), FRAME);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The image as rows of RGB pixels, `img[v][u]`.
    fn pixels(img: &Tensor) -> Vec<Vec<[u8; 3]>> {
        let (h, w, _) = img.size3().unwrap(); // (h, w, 3)
        let flat: Vec<u8> = Vec::try_from(img.contiguous().flatten(0, -1)).unwrap();
        let rows = flat
            .chunks(3)
            .map(|p| [p[0], p[1], p[2]])
            .collect::<Vec<_>>();
        let rows: Vec<Vec<[u8; 3]>> = rows.chunks(w as usize).map(|r| r.to_vec()).collect();
        assert_eq!(rows.len(), h as usize);
        rows
    }

    fn dark(p: [u8; 3]) -> bool {
        p.iter().all(|&c| c < 100)
    }

    fn straight_line() -> Vec<Series> {
        vec![(vec![(1.0, 0.0), (10.0, 1.0)], [255, 0, 0])]
    }

    #[test]
    fn format_tick_is_compact() {
        let cases = [
            (0.0, "0"),
            (-0.0, "0"),
            (42.0, "42"),
            (-7.0, "-7"),
            (1000.0, "1000"),
            (250000.0, "250000"),
            (0.5, "0.5"),
            (-0.25, "-0.25"),
            (4.56789, "4.568"),
            (123.456, "123.5"),
            (9.99996, "10"),
            (0.001, "0.001"),
            (0.0123456, "0.01235"),
            (1.2e-5, "1.2e-5"),
            (-0.000125, "-1.25e-4"),
            (123456.7, "1.235e5"),
            (1e6, "1e6"),
            (-2.5e7, "-2.5e7"),
            (f64::NAN, ""),
            (f64::INFINITY, ""),
        ];
        for (v, want) in cases {
            assert_eq!(format_tick(v), want, "format_tick({v})");
        }
    }

    #[test]
    fn labels_read_min_middle_max_and_first_last_x() {
        let plan = Plan::new(&straight_line(), 480, 240);
        let texts = |t: &[Tick]| t.iter().map(|t| t.text.clone()).collect::<Vec<_>>();
        assert_eq!(texts(&plan.y_ticks), ["0", "0.5", "1"]);
        assert_eq!(texts(&plan.x_ticks), ["1", "10"]);
        // a flat series has one y label, a single point one x label
        let flat = Plan::new(&[(vec![(3.0, 0.5)], [0, 0, 0])], 480, 240);
        assert_eq!(texts(&flat.y_ticks), ["0.5"]);
        assert_eq!(texts(&flat.x_ticks), ["3"]);
        // too short for three y labels: only the ends
        let short = Plan::new(&straight_line(), 480, 40);
        assert_eq!(texts(&short.y_ticks), ["0", "1"]);
    }

    #[test]
    fn labels_sit_beside_their_ticks_in_the_margin() {
        let plan = Plan::new(&straight_line(), 480, 240);
        let l = plan.layout;
        assert_eq!(l.scale, 1);
        let labels = plan.labels();
        for (label, y) in labels.iter().zip([0.0, 0.5, 1.0]) {
            let (w, h) = font::text_size(&label.text, 1);
            assert_eq!(label.left + w as i64, (l.left as usize - TICK - GAP) as i64);
            let centre = label.top as f64 + h as f64 / 2.0;
            let v = l.bottom - (y + 0.05) / 1.1 * (l.bottom - l.top);
            assert!(
                (centre - v).abs() <= 1.0,
                "{label:?} centred at {centre}, tick at {v}"
            );
        }
        for (label, u) in labels[3..].iter().zip([l.left, l.right]) {
            let w = font::text_size(&label.text, 1).0 as i64;
            assert_eq!(label.top, (l.bottom as usize + TICK + GAP) as i64);
            assert!(
                (label.left + w / 2 - u as i64).abs() <= 1,
                "{label:?} under {u}"
            );
        }
    }

    #[test]
    fn margin_is_dark_exactly_where_the_label_glyphs_are() {
        let (width, height) = (480, 240);
        let plan = Plan::new(&straight_line(), width, height);
        let mut expected = HashSet::new();
        for label in plan.labels() {
            for (x, y) in font::text_pixels(&label.text, plan.layout.scale) {
                expected.insert((label.left as usize + x, label.top as usize + y));
            }
        }
        assert!(expected.len() > 40);
        let img = pixels(&line_plot(&straight_line(), width, height));
        for (v, row) in img.iter().enumerate() {
            for (u, &p) in row.iter().enumerate() {
                if plan.layout.contains(u, v) {
                    continue;
                }
                assert_eq!(
                    dark(p),
                    expected.contains(&(u, v)),
                    "pixel ({u}, {v}) is {p:?}"
                );
            }
        }
        // the labels lie wholly in the margin, left of and below the frame
        assert!(expected.iter().all(|&(u, v)| !plan.layout.contains(u, v)));
    }

    #[test]
    fn curve_pixels_land_on_the_line() {
        let (width, height) = (480, 240);
        let l = Plan::new(&straight_line(), width, height).layout;
        let img = pixels(&line_plot(&straight_line(), width, height));
        // data x spans the frame; y from 0 to 1 is padded by 5% each side
        let at = |x: f64, y: f64| {
            let u = l.left + (x - 1.0) / 9.0 * (l.right - l.left);
            (u, l.bottom - (y + 0.05) / 1.1 * (l.bottom - l.top))
        };
        let red = [255, 0, 0];
        for (x, y) in [(1.0, 0.0), (5.5, 0.5), (10.0, 1.0)] {
            let (u, v) = at(x, y);
            assert_eq!(
                img[v.round() as usize][u.round() as usize],
                red,
                "({x}, {y})"
            );
        }
        let (a, b) = (at(1.0, 0.0), at(10.0, 1.0));
        let mut count = 0;
        for (v, row) in img.iter().enumerate() {
            for (u, _) in row.iter().enumerate().filter(|(_, &p)| p == red) {
                let t = (u as f64 - a.0) / (b.0 - a.0);
                let on_line = a.1 + t * (b.1 - a.1);
                assert!((-0.01..=1.01).contains(&t) && (v as f64 - on_line).abs() <= 1.0);
                count += 1;
            }
        }
        assert!(count as f64 >= b.0 - a.0, "{count} red pixels");
    }

    #[test]
    fn empty_nan_and_tiny_inputs_render() {
        let nan: Vec<Series> = vec![(vec![(f64::NAN, 1.0), (2.0, f64::INFINITY)], [0, 0, 0])];
        for series in [vec![], nan] {
            let plan = Plan::new(&series, 100, 60);
            assert!(plan.labels().is_empty());
            let img = pixels(&line_plot(&series, 100, 60));
            assert!(
                img.iter().flatten().all(|&p| !dark(p)),
                "no labels, no black pixels"
            );
            // the frame and the zero line of the default unit axes are there
            assert_eq!(img[EDGE][50], FRAME);
            assert_eq!(img[60 - EDGE][50], FRAME);
            assert!(img.iter().any(|r| r[50] == ZERO));
        }
        // a NaN point between finite ones only breaks the line
        let gap: Vec<Series> = vec![(vec![(0.0, 0.0), (1.0, f64::NAN), (2.0, 1.0)], [0, 0, 255])];
        let img = pixels(&line_plot(&gap, 100, 60));
        assert_eq!(img[0][0], [255, 255, 255]);
        assert!(
            img.iter().flatten().all(|&p| p != [0, 0, 255]),
            "no segment drawn"
        );
        for (w, h) in [(0, 0), (1, 1), (5, 5), (30, 12)] {
            assert_eq!(
                line_plot(&straight_line(), w, h).size(),
                [h as i64, w as i64, 3]
            );
        }
    }
}
