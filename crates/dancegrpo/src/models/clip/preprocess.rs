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
        let f = Fields { v: &v, path };
        let d = Self::clip_default(default_size);
        let filter = match v.get("resample").filter(|r| !r.is_null()) {
            None => d.filter,
            Some(r) => r.as_i64().and_then(Filter::from_pil).ok_or_else(|| {
                let msg = "is unsupported (1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)";
                f.err("resample", format!("{r} {msg}"))
            })?,
        };
        Ok(ImageProcessor {
            resize: match f.flag("do_resize")? {
                true => f.resize(d.resize)?,
                false => Resize::None,
            },
            filter,
            crop: match f.flag("do_center_crop")? {
                true => f.crop(d.crop)?,
                false => None,
            },
            rescale_factor: match f.flag("do_rescale")? {
                true => f.number("rescale_factor")?.or(d.rescale_factor),
                false => None,
            },
            normalize: match f.flag("do_normalize")? {
                true => Some((
                    f.triple("image_mean", CLIP_MEAN)?,
                    f.triple("image_std", CLIP_STD)?,
                )),
                false => None,
            },
        })
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

/// The keys of a `preprocessor_config.json`, read with errors that name the
/// file and the key.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: String) -> Error {
        Error::config(self.path, field, msg)
    }

    /// A `do_*` switch (absent or null: on).
    fn flag(&self, key: &str) -> Result<bool> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(true),
            Some(Value::Bool(b)) => Ok(*b),
            Some(x) => Err(self.err(key, format!("expected true or false, found {x}"))),
        }
    }

    fn positive(&self, key: &str, x: &Value) -> Result<i64> {
        (x.as_i64().filter(|&n| n > 0))
            .ok_or_else(|| self.err(key, format!("expected a positive integer, found {x}")))
    }

    /// `size`: `{shortest_edge}`, `{height, width}` or one number (a shortest edge).
    fn resize(&self, default: Resize) -> Result<Resize> {
        let o = match self.v.get("size") {
            None | Some(Value::Null) => return Ok(default),
            Some(Value::Object(o)) => o,
            Some(s) => return Ok(Resize::ShortestEdge(self.positive("size", s)?)),
        };
        if let Some(s) = o.get("shortest_edge") {
            return Ok(Resize::ShortestEdge(
                self.positive("size.shortest_edge", s)?,
            ));
        }
        match (o.get("height"), o.get("width")) {
            (Some(h), Some(w)) => Ok(Resize::Exact(
                self.positive("size.height", h)?,
                self.positive("size.width", w)?,
            )),
            _ => Err(self.err(
                "size",
                "needs `shortest_edge` or `height` and `width`".into(),
            )),
        }
    }

    /// `crop_size`: `{height, width}` or one number (a square).
    fn crop(&self, default: Option<(i64, i64)>) -> Result<Option<(i64, i64)>> {
        match self.v.get("crop_size") {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Object(o)) => {
                let get = |k: &str| {
                    (o.get(k))
                        .ok_or_else(|| self.err("crop_size", format!("missing `{k}`")))
                        .and_then(|x| self.positive(&format!("crop_size.{k}"), x))
                };
                Ok(Some((get("height")?, get("width")?)))
            }
            Some(s) => {
                let n = self.positive("crop_size", s)?;
                Ok(Some((n, n)))
            }
        }
    }

    /// A number, if present and not null.
    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => (x.as_f64().map(Some))
                .ok_or_else(|| self.err(key, format!("expected a number, found {x}"))),
        }
    }

    /// Three numbers (per channel), `default` if absent or null.
    fn triple(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
        let Some(x) = self.v.get(key).filter(|x| !x.is_null()) else {
            return Ok(default);
        };
        let a: Vec<f64> = (x.as_array())
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        <[f64; 3]>::try_from(a).map_err(|_| self.err(key, format!("expected 3 numbers, found {x}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn read(name: &str, json: &str) -> Result<ImageProcessor> {
        let dir = std::env::temp_dir().join(format!("dg-clip-pre-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, json).unwrap();
        ImageProcessor::from_file(&path, 224)
    }

    #[test]
    fn configs_are_read_with_defaults_and_errors_naming_the_key() {
        assert_eq!(
            read("empty", "{}").unwrap(),
            ImageProcessor::clip_default(224)
        );
        let p = read(
            "full",
            r#"{"resample": 2, "size": {"height": 336, "width": 300}, "crop_size": 256,
                "rescale_factor": 0.5, "image_mean": [0.5, 0.5, 0.5], "do_normalize": true}"#,
        )
        .unwrap();
        assert_eq!(p.resize, Resize::Exact(336, 300));
        assert_eq!(p.filter, Filter::Bilinear);
        assert_eq!(p.crop, Some((256, 256)));
        assert_eq!(p.rescale_factor, Some(0.5));
        assert_eq!(p.normalize, Some(([0.5; 3], CLIP_STD)));
        let off = r#"{"do_resize": false, "do_center_crop": false, "do_rescale": false,
                      "do_normalize": false, "size": {"shortest_edge": 7}}"#;
        let p = read("off", off).unwrap();
        assert_eq!(
            (p.resize, p.crop, p.rescale_factor),
            (Resize::None, None, None)
        );
        assert_eq!(p.normalize, None);
        let p = read(
            "edge",
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 3, "width": 4}}"#,
        );
        let p = p.unwrap();
        assert_eq!(
            (p.resize, p.crop),
            (Resize::ShortestEdge(336), Some((3, 4)))
        );
        for (json, key) in [
            (r#"{"resample": 0}"#, "resample"),
            (r#"{"do_resize": 1}"#, "do_resize"),
            (r#"{"size": {"height": 3}}"#, "size"),
            (r#"{"size": {"shortest_edge": -3}}"#, "size.shortest_edge"),
            (r#"{"crop_size": {"height": 3}}"#, "crop_size"),
            (
                r#"{"crop_size": {"height": 3, "width": 0}}"#,
                "crop_size.width",
            ),
            (r#"{"rescale_factor": "x"}"#, "rescale_factor"),
            (r#"{"image_std": [1, 2]}"#, "image_std"),
        ] {
            match read("bad", json) {
                Err(Error::Config { path, field, .. }) => {
                    assert_eq!(field, key, "{json}");
                    assert!(path.ends_with("bad.json"));
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }

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
