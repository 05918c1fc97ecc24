//! The raster the plot is drawn on: pixels, lines and bitmap-font text.

use tch::{Kind, Tensor};

use super::font;

/// A label placed in the image: its text and the top-left pixel of its box.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Label {
    pub(super) text: String,
    pub(super) left: i64,
    pub(super) top: i64,
}

/// An RGB image being drawn: `width * height * 3` bytes, row-major, starting
/// white.
pub(super) struct Canvas {
    px: Vec<u8>,
    width: usize,
    height: usize,
}

impl Canvas {
    pub(super) fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            px: vec![255; width * height * 3],
            width,
            height,
        }
    }

    /// Sets the pixel nearest to `(u, v)`; outside the image (or non-finite)
    /// it is ignored.
    pub(super) fn put(&mut self, u: f64, v: f64, c: [u8; 3]) {
        if !(u.is_finite() && v.is_finite()) {
            return;
        }
        let (u, v) = (u.round(), v.round());
        if u >= 0.0 && v >= 0.0 && u < self.width as f64 && v < self.height as f64 {
            let i = (v as usize * self.width + u as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Draws the straight line from `a` to `b` (pixel coordinates), one pixel
    /// per step along its longer side.
    pub(super) fn line(&mut self, a: (f64, f64), b: (f64, f64), c: [u8; 3]) {
        let ((ua, va), (ub, vb)) = (a, b);
        if ![ua, va, ub, vb].iter().all(|z| z.is_finite()) {
            return;
        }
        let longest = (ub - ua).abs().max((vb - va).abs()).ceil();
        let n = (longest.min((4 * (self.width + self.height)) as f64) as usize).max(1);
        for k in 0..=n {
            let t = k as f64 / n as f64;
            self.put(ua + t * (ub - ua), va + t * (vb - va), c);
        }
    }

    /// Draws `label` in the font at `scale`, clipped to the image.
    pub(super) fn text(&mut self, label: &Label, scale: usize, c: [u8; 3]) {
        for (x, y) in font::text_pixels(&label.text, scale) {
            let (u, v) = (label.left + x as i64, label.top + y as i64);
            self.put(u as f64, v as f64, c);
        }
    }

    /// The image as a `(height, width, 3)` uint8 tensor.
    pub(super) fn into_tensor(self) -> Tensor {
        Tensor::from_slice(&self.px)
            .reshape([self.height as i64, self.width as i64, 3]) // (h, w, 3)
            .to_kind(Kind::Uint8)
    }
}
