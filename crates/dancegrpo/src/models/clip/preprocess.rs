//! `CLIPImageProcessor` (transformers 4.46) on uint8 tensors:
//!
//! ```text
//! resize   shortest side to S, the other to int(S * long / short)   (bicubic; or to (height, width))
//! crop     center crop to (ch, cw): top = (h - ch) // 2, left = (w - cw) // 2 (zero padding if smaller)
//! rescale  x * rescale_factor   (in float64, then float32, as numpy)
//! normalise (x - mean) / std    (float32)
//! ```
//!
//! Resizing: transformers resizes with `PIL.Image.resize` on uint8 pixels (the
//! config's `resample`, bicubic by default); [`crate::imaging::pil`] does the
//! same byte for byte (libtorch's antialiased bicubic, used before, differed by
//! one level on 0.2-0.9% of pixels, enough for 1e-3 relative in CLIP score).
//! Images already at the target size are not resized (PIL returns a copy).

use std::path::Path;

use serde_json::Value;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::imaging::pil::{resize_rgb, Filter};
use crate::io::json::read_json;
use crate::rewards::hps::{CLIP_MEAN, CLIP_STD};

/// How images are resized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resize {
    /// No resizing.
    None,
    /// The shortest side to this length, keeping the aspect ratio (truncated).
    ShortestEdge(i64),
    /// To exactly `(height, width)`.
    Exact(i64, i64),
}

/// The settings of a `CLIPImageProcessor`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Resizing.
    pub resize: Resize,
    /// PIL's filter for resizing (`resample`; bicubic by default).
    pub filter: Filter,
    /// Center crop `(height, width)`, if any.
    pub crop: Option<(i64, i64)>,
    /// Pixel scale (`1/255`), if rescaling.
    pub rescale_factor: Option<f64>,
    /// Mean and standard deviation per channel, if normalising.
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

impl ImageProcessor {
    /// transformers' defaults at resolution `size`: shortest side to `size`,
    /// center crop `size x size`, `1/255`, OpenAI CLIP mean/std (`size` = 224
    /// for every released CLIP).
    pub fn clip_default(size: i64) -> Self {
        ImageProcessor {
            resize: Resize::ShortestEdge(size),
            filter: Filter::Bicubic,
            crop: Some((size, size)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }

    /// Reads `preprocessor_config.json` (missing keys take the defaults of
    /// [`ImageProcessor::clip_default`] at `default_size`). Every PIL filter but
    /// `NEAREST` (`resample = 0`) is supported.
    pub fn from_file(path: &Path, default_size: i64) -> Result<Self> {
        let v: Value = read_json(path)?;
        let err = |field: &str, msg: String| Error::config(path, field, msg);
        let flag = |key: &str| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(true),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(err(key, format!("expected true or false, found {x}"))),
            }
        };
        let int = |key: &str, x: &Value| -> Result<i64> {
            x.as_i64()
                .filter(|&n| n > 0)
                .ok_or_else(|| err(key, format!("expected a positive integer, found {x}")))
        };
        let mut p = Self::clip_default(default_size);
        if let Some(r) = v.get("resample").filter(|r| !r.is_null()) {
            p.filter = r.as_i64().and_then(Filter::from_pil).ok_or_else(|| {
                err(
                    "resample",
                    format!(
                        "{r} is unsupported (1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"
                    ),
                )
            })?;
        }
        p.resize = if !flag("do_resize")? {
            Resize::None
        } else {
            match v.get("size") {
                None | Some(Value::Null) => p.resize,
                Some(Value::Object(o)) => {
                    if let Some(s) = o.get("shortest_edge") {
                        Resize::ShortestEdge(int("size.shortest_edge", s)?)
                    } else {
                        let h = o.get("height").ok_or_else(|| {
                            err(
                                "size",
                                "needs `shortest_edge` or `height` and `width`".into(),
                            )
                        })?;
                        let w = o.get("width").ok_or_else(|| {
                            err(
                                "size",
                                "needs `shortest_edge` or `height` and `width`".into(),
                            )
                        })?;
                        Resize::Exact(int("size.height", h)?, int("size.width", w)?)
                    }
                }
                Some(s) => Resize::ShortestEdge(int("size", s)?),
            }
        };
        p.crop = if !flag("do_center_crop")? {
            None
        } else {
            match v.get("crop_size") {
                None | Some(Value::Null) => p.crop,
                Some(Value::Object(o)) => {
                    let get = |k: &str| {
                        o.get(k)
                            .ok_or_else(|| err("crop_size", format!("missing `{k}`")))
                            .and_then(|x| int(&format!("crop_size.{k}"), x))
                    };
                    Some((get("height")?, get("width")?))
                }
                Some(s) => {
                    let n = int("crop_size", s)?;
                    Some((n, n))
                }
            }
        };
        p.rescale_factor = if !flag("do_rescale")? {
            None
        } else {
            match v.get("rescale_factor") {
                None | Some(Value::Null) => p.rescale_factor,
                Some(x) => Some(x.as_f64().ok_or_else(|| {
                    err("rescale_factor", format!("expected a number, found {x}"))
                })?),
            }
        };
        let triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => {
                    let a: Vec<f64> = x
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_f64).collect())
                        .unwrap_or_default();
                    <[f64; 3]>::try_from(a)
                        .map_err(|_| err(key, format!("expected 3 numbers, found {x}")))
                }
            }
        };
        p.normalize = if !flag("do_normalize")? {
            None
        } else {
            Some((
                triple("image_mean", CLIP_MEAN)?,
                triple("image_std", CLIP_STD)?,
            ))
        };
        Ok(p)
    }

    /// `dir/preprocessor_config.json` if present, else [`ImageProcessor::clip_default`].
    pub fn from_dir(dir: &Path, default_size: i64) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if path.is_file() {
            Self::from_file(&path, default_size)
        } else {
            Ok(Self::clip_default(default_size))
        }
    }

    /// The output `(height, width)` for an input of `(h, w)`.
    pub fn output_size(&self, h: i64, w: i64) -> (i64, i64) {
        self.crop.unwrap_or_else(|| self.resized_size(h, w))
    }

    fn resized_size(&self, h: i64, w: i64) -> (i64, i64) {
        match self.resize {
            Resize::None => (h, w),
            Resize::Exact(rh, rw) => (rh, rw),
            Resize::ShortestEdge(s) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as f64 * long as f64 / short as f64) as i64;
                if w <= h {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// Processes uint8 images `(B, H, W, 3)` into pixels `(B, 3, h, w)` (float32,
    /// on the images' device).
    pub fn apply(&self, images_u8: &Tensor) -> Result<Tensor> {
        let s = images_u8.size();
        if s.len() != 4 || s[3] != 3 || images_u8.kind() != Kind::Uint8 || s[1] < 1 || s[2] < 1 {
            return Err(Error::Input(format!(
                "CLIP image processor: images of {:?} {s:?}, expected uint8 (B, H, W, 3) RGB",
                images_u8.kind()
            )));
        }
        let (h, w) = (s[1], s[2]);
        let device = images_u8.device();
        let (nh, nw) = self.resized_size(h, w);
        if nh < 1 || nw < 1 {
            return Err(Error::Input(format!(
                "CLIP image processor: a {h}x{w} image resizes to {nh}x{nw}"
            )));
        }
        let resized = match (nh, nw) == (h, w) {
            true => images_u8.shallow_clone(),
            false => self.pil_resize(images_u8, (nh, nw))?.to_device(device),
        };
        let mut x = resized.permute([0, 3, 1, 2]).to_kind(Kind::Float);
        if let Some((ch, cw)) = self.crop {
            x = center_crop(&x, ch, cw);
        }
        if let Some(f) = self.rescale_factor {
            x = (x.to_kind(Kind::Double) * f).to_kind(Kind::Float);
        }
        if let Some((mean, std)) = self.normalize {
            let t = |v: [f64; 3]| {
                Tensor::from_slice(&v.map(|x| x as f32))
                    .to_device(device)
                    .view([3, 1, 1])
            };
            x = (x - t(mean)) / t(std);
        }
        Ok(x)
    }
}

impl ImageProcessor {
    /// `PIL.Image.resize` of each uint8 `(H, W, 3)` image to `(nh, nw)` (on the CPU).
    fn pil_resize(&self, images_u8: &Tensor, (nh, nw): (i64, i64)) -> Result<Tensor> {
        let s = images_u8.size();
        let (h, w) = (s[1] as usize, s[2] as usize);
        let cpu = images_u8.to_device(tch::Device::Cpu).contiguous();
        let mut out = Vec::with_capacity(s[0] as usize * (nh * nw * 3) as usize);
        for b in 0..s[0] {
            let pixels = Vec::<u8>::try_from(cpu.get(b).flatten(0, -1))?;
            let size = (nh as usize, nw as usize);
            out.extend(resize_rgb(&pixels, (h, w), size, self.filter)?);
        }
        Ok(Tensor::from_slice(&out).view([s[0], nh, nw, 3]))
    }
}

/// transformers' `center_crop` of `(B, C, H, W)`: floor-centred window, zero
/// padding (ceil-centred) where the image is smaller than the crop.
fn center_crop(x: &Tensor, ch: i64, cw: i64) -> Tensor {
    let (h, w) = (x.size()[2], x.size()[3]);
    let (mut x, mut top, mut left) = (
        x.shallow_clone(),
        (h - ch).div_euclid(2),
        (w - cw).div_euclid(2),
    );
    if top < 0 || left < 0 {
        let (nh, nw) = (ch.max(h), cw.max(w));
        let (tp, lp) = ((nh - h + 1) / 2, (nw - w + 1) / 2);
        x = x.constant_pad_nd([lp, nw - w - lp, tp, nh - h - tp]);
        top += tp;
        left += lp;
    }
    x.narrow(2, top.max(0), ch).narrow(3, left.max(0), cw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn shortest_edge_sizes_truncate_like_transformers() {
        let p = ImageProcessor::clip_default(224);
        // 720x1280 -> short 224, long int(224 * 1280 / 720) = int(398.22) = 398
        assert_eq!(p.resized_size(720, 1280), (224, 398));
        assert_eq!(p.resized_size(1280, 720), (398, 224));
        assert_eq!(p.output_size(1280, 720), (224, 224));
    }

    #[test]
    fn crop_takes_the_floor_centred_window_and_pads_small_images() {
        let x = Tensor::arange(5 * 6, (Kind::Float, Device::Cpu)).view([1, 1, 5, 6]);
        let c = center_crop(&x, 2, 3);
        // top = (5-2)//2 = 1, left = (6-3)//2 = 1
        assert_eq!(
            Vec::<f32>::try_from(c.flatten(0, -1)).unwrap(),
            vec![7., 8., 9., 13., 14., 15.]
        );
        let small = Tensor::ones([1, 1, 1, 1], (Kind::Float, Device::Cpu));
        let c = center_crop(&small, 2, 2);
        // padded to 2x2 with the pixel at ceil(1/2) = 1: bottom-right
        assert_eq!(
            Vec::<f32>::try_from(c.flatten(0, -1)).unwrap(),
            vec![0., 0., 0., 1.]
        );
    }

    #[test]
    fn at_size_images_are_only_rescaled_and_normalised() {
        let img = Tensor::arange(4 * 4 * 3, (Kind::Uint8, Device::Cpu)).view([1, 4, 4, 3]);
        let x = ImageProcessor::clip_default(4).apply(&img).unwrap();
        assert_eq!(x.size(), [1, 3, 4, 4]);
        let v = 2 * 12 + 3 * 3 + 1; // (y=2, x=3, c=1)
        let want = ((v as f64 * (1.0 / 255.0)) as f32 - CLIP_MEAN[1] as f32) / CLIP_STD[1] as f32;
        assert_eq!(x.double_value(&[0, 1, 2, 3]) as f32, want);
        let rgba = Tensor::zeros([1, 4, 4, 4], (Kind::Uint8, Device::Cpu));
        assert!(ImageProcessor::clip_default(4).apply(&rgba).is_err());
    }
}
