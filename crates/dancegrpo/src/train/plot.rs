//! A small line plot rendered to RGB pixels (the reward curve), no dependencies.

use tch::{Kind, Tensor};

/// One plotted line: its points and RGB colour.
pub type Series = (Vec<(f64, f64)>, [u8; 3]);

/// Renders `series` (each a list of `(x, y)` and an RGB colour) into a
/// `(height, width, 3)` uint8 image with a frame and zero line if in range.
pub fn line_plot(series: &[Series], width: usize, height: usize) -> Tensor {
    let mut px = vec![255u8; width * height * 3];
    let pts = series.iter().flat_map(|(s, _)| s.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let m = 8.0;
    let to_px = |x: f64, y: f64| {
        let u = m + (x - x0) / (x1 - x0) * (width as f64 - 2.0 * m);
        let v = (height as f64 - m) - (y - y0) / (y1 - y0) * (height as f64 - 2.0 * m);
        (u, v)
    };
    let mut put = |u: f64, v: f64, c: [u8; 3]| {
        let (u, v) = (u.round() as i64, v.round() as i64);
        if u >= 0 && v >= 0 && (u as usize) < width && (v as usize) < height {
            let i = (v as usize * width + u as usize) * 3;
            px[i..i + 3].copy_from_slice(&c);
        }
    };
    let frame = [160, 160, 160];
    for i in 0..width {
        put(i as f64, m, frame);
        put(i as f64, height as f64 - m, frame);
    }
    for j in 0..height {
        put(m, j as f64, frame);
        put(width as f64 - m, j as f64, frame);
    }
    if y0 < 0.0 && y1 > 0.0 {
        for i in 0..width {
            put(i as f64, to_px(x0, 0.0).1, [210, 210, 210]);
        }
    }
    for (s, colour) in series {
        for w in s.windows(2) {
            let ((ua, va), (ub, vb)) = (to_px(w[0].0, w[0].1), to_px(w[1].0, w[1].1));
            let n = ((ub - ua).abs().max((vb - va).abs()).ceil() as usize).max(1);
            for k in 0..=n {
                let t = k as f64 / n as f64;
                put(ua + t * (ub - ua), va + t * (vb - va), *colour);
            }
        }
    }
    Tensor::from_slice(&px)
        .reshape([height as i64, width as i64, 3])
        .to_kind(Kind::Uint8)
}
