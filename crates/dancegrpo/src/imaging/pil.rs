//! `PIL.Image.resize` on 8-bit RGB images, bit for bit (Pillow's separable
//! convolution resampler; the reference's `CLIPProcessor` resizes with it).
//!
//! How Pillow resamples (its `Resample.c`, read as reference; written here in
//! our own words):
//! * Per axis, each output position `o` has a centre `(o + 0.5) * scale` in the
//!   input (`scale = in / out`); the filter is stretched by
//!   `max(scale, 1)` (a downscale widens it) and its taps cover the input
//!   positions `int(centre - support + 0.5) .. int(centre + support + 0.5)`,
//!   clipped to the image. Tap weights `filter((x - centre + 0.5) / stretch)`
//!   are normalised to sum 1 in float64, then made fixed-point integers with
//!   22 fraction bits (rounded half away from zero).
//! * The horizontal pass runs first, over only the input rows the vertical
//!   pass will read; each output value is `(sum + 2^21) >> 22` clamped to
//!   0..=255, so the intermediate image is 8-bit; then the vertical pass.
//!   An axis whose size does not change is not resampled at all.
//!
//! Why hand-written: no crate reproduces Pillow's arithmetic (`image` and
//! `fast_image_resize` use other kernels and rounding), and exactness to the
//! reference is the point. The unit tests and `tests/pil_resize.rs` compare
//! with outputs Pillow 11.3 produced (`tools/pil_reference.py`). Pillow 13.0
//! (2026-10) resamples differently in some cases (34 of those 197); the stacks
//! of the transformers 4.46 era run Pillow 12 or earlier.

use crate::error::{Error, Result};

/// Fraction bits of the fixed-point weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling filters (`Image.Resampling`), `NEAREST` excepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `BOX` (4): the mean over each output pixel's footprint.
    Box,
    /// `BILINEAR` (2): the triangle filter.
    Bilinear,
    /// `HAMMING` (5): a Hamming-windowed sinc of support 1.
    Hamming,
    /// `BICUBIC` (3): Keys' cubic with `a = -0.5`.
    Bicubic,
    /// `LANCZOS` (1): a 3-lobe Lanczos-windowed sinc.
    Lanczos,
}

impl Filter {
    /// The filter of Pillow's resample code `code` (`NEAREST` = 0 is refused).
    pub fn from_pil(code: i64) -> Option<Filter> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        }
    }

    /// Half-width of the unstretched filter.
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// The filter's value at `x` (Pillow's expressions, in its evaluation order).
    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => f64::from(u8::from(x > -0.5 && x <= 0.5)),
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// The taps of one axis: for each output position, its first input position
/// and fixed-point weights.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

impl Taps {
    /// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for `input ->
    /// output` positions.
    fn new(input: usize, output: usize, filter: Filter) -> Taps {
        let scale = input as f64 / output as f64;
        let stretch = scale.max(1.0);
        let support = filter.support() * stretch;
        let (mut first, mut weights) = (Vec::with_capacity(output), Vec::with_capacity(output));
        for o in 0..output {
            let centre = (o as f64 + 0.5) * scale;
            // C's (int) truncates toward zero
            let lo = ((centre - support + 0.5) as i64).max(0) as usize;
            let hi = ((centre + support + 0.5) as i64).min(input as i64) as usize;
            let raw: Vec<f64> = (lo..hi.max(lo))
                .map(|x| filter.weight((x as f64 - centre + 0.5) / stretch))
                .collect();
            let sum: f64 = raw.iter().sum();
            let fixed = raw
                .iter()
                .map(|&w| {
                    let w = if sum != 0.0 { w / sum } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    (if w < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
                })
                .collect();
            first.push(lo);
            weights.push(fixed);
        }
        Taps { first, weights }
    }

    /// The input positions the taps read, `first..last`.
    fn span(&self) -> (usize, usize) {
        let last = (self.first.iter().zip(&self.weights))
            .map(|(&f, w)| f + w.len())
            .max()
            .unwrap_or(0);
        (self.first.first().copied().unwrap_or(0), last)
    }
}

/// A fixed-point sum as Pillow's `clip8`: rounded (the `2^21` start), shifted
/// and clamped to 0..=255.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image `(h, w, 3)` (row-major bytes) to `(out_h, out_w)` as
/// `PIL.Image.resize((out_w, out_h), filter)` does.
pub fn resize_rgb(
    pixels: &[u8],
    (h, w): (usize, usize),
    (out_h, out_w): (usize, usize),
    filter: Filter,
) -> Result<Vec<u8>> {
    if pixels.len() != h * w * 3 || h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(Error::Input(format!(
            "resize of a {h}x{w} RGB image ({} bytes) to {out_h}x{out_w}",
            pixels.len()
        )));
    }
    let rows = Taps::new(h, out_h, filter);
    let (mut image, mut width) = (pixels.to_vec(), w);
    let mut rows_first = 0;
    if out_w != w {
        let (lo, hi) = match out_h != h {
            true => rows.span(),
            false => (0, h),
        };
        image = horizontal(&image[lo * w * 3..hi * w * 3], w, out_w, filter);
        width = out_w;
        rows_first = lo;
    }
    if out_h != h {
        image = vertical(&image, width, &rows, rows_first);
    }
    Ok(image)
}

/// Resamples every row of `image` (`width` pixels each) to `out_w` pixels.
fn horizontal(image: &[u8], width: usize, out_w: usize, filter: Filter) -> Vec<u8> {
    let taps = Taps::new(width, out_w, filter);
    let n_rows = image.len() / (width * 3);
    let mut out = vec![0u8; n_rows * out_w * 3];
    for r in 0..n_rows {
        let row = &image[r * width * 3..(r + 1) * width * 3];
        for (o, (&lo, ws)) in taps.first.iter().zip(&taps.weights).enumerate() {
            for c in 0..3 {
                let mut sum = 1i64 << (PRECISION_BITS - 1);
                for (i, &k) in ws.iter().enumerate() {
                    sum += i64::from(row[(lo + i) * 3 + c]) * i64::from(k);
                }
                out[(r * out_w + o) * 3 + c] = clip8(sum);
            }
        }
    }
    out
}

/// Resamples the columns of `image` (rows `rows_first..` of the input,
/// `width` pixels each) to the output rows of `taps`.
fn vertical(image: &[u8], width: usize, taps: &Taps, rows_first: usize) -> Vec<u8> {
    let out_h = taps.first.len();
    let mut out = vec![0u8; out_h * width * 3];
    for (o, (&lo, ws)) in taps.first.iter().zip(&taps.weights).enumerate() {
        let lo = lo - rows_first;
        for x in 0..width * 3 {
            let mut sum = 1i64 << (PRECISION_BITS - 1);
            for (i, &k) in ws.iter().enumerate() {
                sum += i64::from(image[(lo + i) * width * 3 + x]) * i64::from(k);
            }
            out[o * width * 3 + x] = clip8(sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_size_is_a_copy_and_a_flat_image_stays_flat() {
        let px: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(
            resize_rgb(&px, (5, 4), (5, 4), Filter::Bicubic).unwrap(),
            px
        );
        let flat = vec![77u8; 9 * 13 * 3];
        for f in [
            Filter::Bicubic,
            Filter::Lanczos,
            Filter::Bilinear,
            Filter::Box,
        ] {
            let out = resize_rgb(&flat, (9, 13), (4, 20), f).unwrap();
            assert!(out.iter().all(|&v| v == 77), "{f:?}");
        }
        assert!(resize_rgb(&px, (5, 4), (0, 4), Filter::Bicubic).is_err());
        assert!(resize_rgb(&px[1..], (5, 4), (2, 2), Filter::Bicubic).is_err());
    }

    /// Values Pillow gives (11.3 and 13.0 alike) (`Image.frombytes("RGB", (4, 1), bytes(row)).resize((2, 1), f)`
    /// and the 1x4 -> 1x7 upscale): a downscale widens the filter, an upscale does not.
    #[test]
    fn known_pillow_values() {
        let row: Vec<u8> = [0u8, 255, 40, 200]
            .iter()
            .flat_map(|&v| [v, v, v])
            .collect();
        let down = |f| resize_rgb(&row, (1, 4), (1, 2), f).unwrap();
        assert_eq!(down(Filter::Bicubic)[..6], [114, 114, 114, 141, 141, 141]);
        assert_eq!(down(Filter::Bilinear)[..6], [115, 115, 115, 139, 139, 139]);
        let up = resize_rgb(&row, (1, 4), (1, 7), Filter::Bicubic).unwrap();
        let got: Vec<u8> = up.iter().step_by(3).copied().collect();
        assert_eq!(got, [0, 85, 250, 153, 41, 143, 213]);
    }
}
