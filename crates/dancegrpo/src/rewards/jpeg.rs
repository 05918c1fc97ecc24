//! JPEG compressibility and incompressibility: a model-free reward, the encoded
//! size of the image at a fixed JPEG quality (as DDPO and Flow-GRPO define it:
//! `len` of `Image.save(buffer, format="JPEG", quality=q)` in Pillow, / 1000).
//!
//! The size is the reward, so the encoder must be the reference's byte for
//! byte: Pillow's wheels encode with libjpeg-turbo (baseline, standard Huffman
//! tables, islow DCT, 4:2:0 chroma subsampling by default). We link
//! libjpeg-turbo's code through `mozjpeg-sys` in its libjpeg-turbo-compatible
//! profile (`JCP_FASTEST`: no trellis quantisation, no progressive scans, no
//! Huffman optimisation; the private module `rewards::libjpeg`), which writes
//! the same bytes as Pillow 11.3 and 13.0 (`tests/pil_jpeg.rs`, data from
//! `tools/jpeg_reference.py`). A pure-Rust encoder (`jpeg-encoder`, used
//! before) differs: its files were 4:4:4 and 70-80% larger, and not
//! byte-equal even at 4:2:0.

use tch::{Device, Kind, Tensor};

use super::{Reward, RewardBatch, Score};
use crate::error::{Error, Result};

/// Which direction is rewarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JpegObjective {
    /// Smaller files score higher: `-size_kb`.
    Compressibility,
    /// Larger files score higher: `+size_kb`.
    Incompressibility,
}

/// Chroma subsampling of the encoded file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JpegSubsampling {
    /// 4:2:0, chroma at half resolution both ways: Pillow's default, the reference.
    #[default]
    #[serde(rename = "4:2:0")]
    S420,
    /// 4:4:4, full-resolution chroma (Pillow's `subsampling=0`).
    #[serde(rename = "4:4:4")]
    S444,
}

fn check_quality(quality: u8) -> Result<()> {
    match quality {
        1..=100 => Ok(()),
        _ => Err(Error::Input(format!(
            "JPEG quality must be in 1..=100, got {quality}"
        ))),
    }
}

/// Encodes `rgb` (`height` rows of `width` RGB pixels, row-major) as a
/// baseline JPEG at `quality`, byte for byte what Pillow writes for
/// `Image.save(f, format="JPEG", quality=quality)` (with `subsampling=0` for
/// [`JpegSubsampling::S444`]).
pub fn encode_rgb(
    rgb: &[u8],
    width: usize,
    height: usize,
    quality: u8,
    subsampling: JpegSubsampling,
) -> Result<Vec<u8>> {
    if width == 0 || height == 0 || width > 65_500 || height > 65_500 {
        return Err(Error::Input(format!(
            "JPEG images have sides in 1..=65500, got {height}x{width}"
        )));
    }
    check_quality(quality)?;
    if rgb.len() != width * height * 3 {
        return Err(Error::Input(format!(
            "JPEG encoding: {} bytes for a {height}x{width} RGB image (wants {})",
            rgb.len(),
            width * height * 3
        )));
    }
    let sampling = match subsampling {
        JpegSubsampling::S420 => [(2, 2), (1, 1), (1, 1)],
        JpegSubsampling::S444 => [(1, 1), (1, 1), (1, 1)],
    };
    super::libjpeg::encode(rgb, width as u32, height as u32, quality, sampling).map_err(|e| {
        Error::Input(format!(
            "JPEG encoding of a {height}x{width} image at quality {quality}: {e}"
        ))
    })
}

/// The JPEG size reward.
///
/// Scoring images (any [`Reward`] is called the same way):
///
/// ```
/// use dancegrpo::rewards::jpeg::{JpegObjective, JpegReward};
/// use dancegrpo::rewards::{Reward, RewardBatch, Score};
///
/// let mut reward = JpegReward::new(JpegObjective::Compressibility, 95)?;
/// let flat = tch::Tensor::full([1, 64, 64, 3], 128, (tch::Kind::Uint8, tch::Device::Cpu));
/// let noisy = tch::Tensor::randint(256, [1, 64, 64, 3], (tch::Kind::Uint8, tch::Device::Cpu));
/// let images = tch::Tensor::cat(&[flat, noisy], 0); // (2, H, W, 3)
/// let prompts = vec!["a grey square".to_string(), "noise".to_string()];
/// let scores = reward.score(&RewardBatch { images: &images, prompts: &prompts })?;
/// let [Score::Value(flat), Score::Value(noisy)] = scores[..] else { panic!("{scores:?}") };
/// assert!(flat > noisy); // -kB: the flat image compresses better
/// # Ok::<(), dancegrpo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct JpegReward {
    objective: JpegObjective,
    quality: u8,
    subsampling: JpegSubsampling,
}

impl JpegReward {
    /// A reward with `objective` at JPEG `quality` (1..=100; DDPO uses 95),
    /// 4:2:0 as Pillow encodes by default.
    pub fn new(objective: JpegObjective, quality: u8) -> Result<Self> {
        check_quality(quality)?;
        Ok(JpegReward {
            objective,
            quality,
            subsampling: JpegSubsampling::default(),
        })
    }

    /// The same reward with another chroma subsampling.
    pub fn with_subsampling(mut self, subsampling: JpegSubsampling) -> Self {
        self.subsampling = subsampling;
        self
    }

    /// The JPEG size in bytes of one uint8 image `(H, W, 3)`.
    pub fn encoded_size(&self, image: &Tensor) -> Result<usize> {
        let s = image.size();
        if s.len() != 3 || s[2] != 3 || image.kind() != Kind::Uint8 {
            return Err(Error::Input(format!(
                "JPEG reward wants uint8 (H, W, 3) images, got {:?} {:?}",
                image.kind(),
                s
            )));
        }
        let pixels = image.to_device(Device::Cpu).contiguous();
        let n = pixels.numel();
        let mut data = vec![0u8; n];
        pixels.copy_data_u8(&mut data, n);
        let (h, w) = (s[0] as usize, s[1] as usize);
        Ok(encode_rgb(&data, w, h, self.quality, self.subsampling)?.len())
    }
}

impl Reward for JpegReward {
    fn name(&self) -> &str {
        match self.objective {
            JpegObjective::Compressibility => "jpeg_compressibility",
            JpegObjective::Incompressibility => "jpeg_incompressibility",
        }
    }

    fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Score>> {
        let n = batch.images.size().first().copied().unwrap_or(0);
        (0..n)
            .map(|b| {
                let kb = self.encoded_size(&batch.images.get(b))? as f32 / 1000.0;
                Ok(Score::Value(match self.objective {
                    JpegObjective::Compressibility => -kb,
                    JpegObjective::Incompressibility => kb,
                }))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Philox;

    #[test]
    fn flat_images_are_more_compressible_than_noise() {
        let flat = Tensor::full([32, 48, 3], 128, (Kind::Uint8, Device::Cpu));
        let noise = (Philox::new(1, 0).normal_tensor(&[32, 48, 3]) * 60.0 + 128.0)
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8);
        let images = Tensor::stack(&[flat, noise], 0);
        let prompts = vec![String::new(), String::new()];
        let batch = RewardBatch {
            images: &images,
            prompts: &prompts,
        };
        let mut r = JpegReward::new(JpegObjective::Compressibility, 95).unwrap();
        let s = r.score(&batch).unwrap();
        let (Score::Value(flat), Score::Value(noisy)) = (&s[0], &s[1]) else {
            panic!("{s:?}")
        };
        assert!(flat > noisy && *flat < 0.0, "{flat} vs {noisy}");
        let mut inc = JpegReward::new(JpegObjective::Incompressibility, 95).unwrap();
        assert_eq!(inc.score(&batch).unwrap()[0], Score::Value(-flat));
        let rgba = Tensor::zeros([1, 8, 8, 4], (Kind::Uint8, Device::Cpu));
        let err = r
            .score(&RewardBatch {
                images: &rgba,
                prompts: &prompts[..1],
            })
            .unwrap_err();
        assert!(err.to_string().contains("(H, W, 3)"), "{err}");
        assert!(JpegReward::new(JpegObjective::Compressibility, 0).is_err());
    }
}
