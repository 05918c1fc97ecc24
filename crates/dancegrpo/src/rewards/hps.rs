//! The HPSv2 reward: an open_clip CLIP model scoring (image, prompt) pairs by the
//! cosine similarity of their normalised features (no logit scale), with the
//! HPSv2 validation transform (`shared/fixtures/FORMAT.md` section 9):
//!
//! ```text
//! x = uint8 (3,H,W) / 255                      float32
//! scale = R / max(H, W)
//! if scale != 1: resize to (round(H*scale), round(W*scale)) (bicubic, antialiased, on float)
//!                zero-pad to (R, R): left = (R-nw)//2, top = (R-nh)//2
//! x = (x - mean) / std                         OpenAI CLIP mean/std
//! ```

use tch::{Kind, Tensor};

use super::{Reward, RewardBatch, Score};
use crate::error::{Error, Result};
use crate::models::open_clip::OpenClip;
use crate::nn::upcast_kind;

/// Turns a prompt into `context_length` token ids (`open_clip.tokenize` semantics).
pub type TokenizeFn = Box<dyn Fn(&str) -> Result<Vec<i64>>>;

/// A stand-in tokenizer for models without tokenizer files (benchmarks, tiny
/// seeded models): the start id 49406, the prompt's bytes, the end id 49407,
/// then `pad`; `len` ids in all.
pub fn byte_stand_in(len: usize, pad: i64) -> TokenizeFn {
    Box::new(move |text: &str| {
        let mut ids = vec![49406i64];
        ids.extend(text.bytes().take(len.saturating_sub(2)).map(i64::from));
        ids.push(49407);
        ids.resize(len, pad);
        Ok(ids)
    })
}

/// OpenAI CLIP normalisation mean (RGB), as the Python floats of the reference
/// (rounded to float32 when applied, like `torch.as_tensor(mean, dtype=float32)`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP normalisation standard deviation (RGB), as Python floats.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Checks that `images` is a uint8 `(B, H, W, 3)` tensor and returns `(B, H, W)`.
fn image_dims(images: &Tensor) -> Result<(i64, i64, i64)> {
    let s = images.size();
    if s.len() != 4 || s[3] != 3 {
        return Err(Error::Input(format!(
            "reward images of shape {s:?}, expected uint8 (B, H, W, 3) RGB"
        )));
    }
    if images.kind() != Kind::Uint8 {
        return Err(Error::Input(format!(
            "reward images of dtype {:?}, expected uint8 (B, H, W, 3)",
            images.kind()
        )));
    }
    if s[1] <= 0 || s[2] <= 0 {
        return Err(Error::Input(format!(
            "reward images of shape {s:?} are empty"
        )));
    }
    Ok((s[0], s[1], s[2]))
}

/// The HPSv2 validation transform of uint8 images `(B, H, W, 3)` to normalised
/// pixels `(B, 3, size, size)` (float32, on the images' device).
pub fn preprocess(images_u8: &Tensor, size: i64, kind: Kind) -> Result<Tensor> {
    let (_, h, w) = image_dims(images_u8)?;
    if size <= 0 {
        return Err(Error::Input(format!(
            "reward image size {size} must be positive"
        )));
    }
    let device = images_u8.device();
    let mut x = images_u8.permute([0, 3, 1, 2]).to_kind(kind) / 255.0;
    let scale = size as f64 / h.max(w) as f64;
    if scale != 1.0 {
        let nh = (h as f64 * scale).round_ties_even() as i64;
        let nw = (w as f64 * scale).round_ties_even() as i64;
        if nh < 1 || nw < 1 {
            return Err(Error::Input(format!(
                "reward image of {h}x{w} resized to {size} along its longest side has an empty side"
            )));
        }
        x = x.internal_upsample_bicubic2d_aa([nh, nw], false, None::<f64>, None::<f64>);
        let (pw, ph) = (size - nw, size - nh);
        x = x.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2]);
    }
    // Python floats as a tensor of the pixels' dtype (rounded to float32 there)
    let constants = |v: [f64; 3]| {
        Tensor::from_slice(&v)
            .to_kind(kind)
            .to_device(device)
            .view([3, 1, 1])
    };
    let (mean, std) = (constants(CLIP_MEAN), constants(CLIP_STD));
    Ok((x - mean) / std)
}

/// `F.normalize(x, dim=-1)`: `x / max(||x||_2, 1e-12)`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x
        .norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)
        .clamp_min(1e-12);
    x / n
}

/// The HPSv2 reward model.
pub struct HpsReward {
    model: OpenClip,
    tokenize: TokenizeFn,
    batch_size: usize,
}

impl HpsReward {
    /// A reward from a loaded model and a tokenizer returning `context_length` ids
    /// per prompt. Model calls are made on batches of one item (as the reference).
    pub fn new(model: OpenClip, tokenize: TokenizeFn) -> Self {
        HpsReward {
            model,
            tokenize,
            batch_size: 1,
        }
    }

    /// Loads an HPSv2 directory: the open_clip config (`model_config.json` or
    /// `open_clip_config.json`), the weights (`open_clip_model.safetensors`, else
    /// `HPS_v2.1_compressed.pt`, else `open_clip_pytorch_model.bin`, `.pt`/`.bin`
    /// read without executing pickle) and the tokenizer (`tokenizer.json`,
    /// `vocab.json` + `merges.txt` or `bpe_simple_vocab_16e6.txt.gz`; ids padded
    /// with 0 as `open_clip.tokenize`).
    pub fn from_dir(dir: &std::path::Path, kind: Kind, device: tch::Device) -> Result<Self> {
        let config = crate::models::open_clip::OpenClipConfig::from_dir(dir)?;
        let candidates = [
            "open_clip_model.safetensors",
            "HPS_v2.1_compressed.pt",
            "open_clip_pytorch_model.bin",
        ];
        let weights = candidates
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::not_found(
                    dir,
                    format!("no HPSv2 weights (one of {})", candidates.join(", ")),
                )
            })?;
        let context = config.text_cfg.context_length as usize;
        let model = OpenClip::load(config, &weights, kind, device)?;
        let tokenizer = crate::text::ClipTokenizer::from_dir(dir)?;
        let tokenize: TokenizeFn = Box::new(move |text: &str| {
            Ok(tokenizer
                .encode(text, context, crate::text::Padding::Zero)?
                .ids)
        });
        Ok(Self::new(model, tokenize))
    }

    /// Sets how many items go through the model per call (at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The CLIP model.
    pub fn model(&self) -> &OpenClip {
        &self.model
    }

    /// The HPSv2 transform at the model's resolution (see [`preprocess`]).
    pub fn preprocess(&self, images_u8: &Tensor) -> Result<Tensor> {
        preprocess(
            images_u8,
            self.model.image_size(),
            upcast_kind(self.model.kind()),
        )
    }

    /// Token ids `(B, context_length)` of `prompts`.
    pub fn tokenize(&self, prompts: &[String]) -> Result<Tensor> {
        let l = self.model.context_length();
        let mut all = Vec::with_capacity(prompts.len() * l as usize);
        for p in prompts {
            let ids = (self.tokenize)(p)?;
            if ids.len() as i64 != l {
                return Err(Error::Input(format!(
                    "tokenizer returned {} ids for prompt {p:?}, the reward model needs {l}",
                    ids.len()
                )));
            }
            all.extend(ids);
        }
        Ok(Tensor::from_slice(&all).view([prompts.len() as i64, l]))
    }

    fn batched(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let n = x.size()[0];
        let chunks = (0..n)
            .step_by(self.batch_size)
            .map(|s| f(&x.narrow(0, s, (n - s).min(self.batch_size as i64))))
            .collect::<Result<Vec<_>>>()?;
        if chunks.is_empty() {
            return Err(Error::Input("reward: empty batch".into()));
        }
        Ok(Tensor::cat(&chunks, 0))
    }

    /// L2-normalised image features `(B, E)` of preprocessed pixels `(B, 3, R, R)`.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.batched(pixels, |p| Ok(l2_normalize(&self.model.encode_image(p)?)))
    }

    /// L2-normalised text features `(B, E)` of token ids `(B, context_length)`.
    pub fn text_features(&self, ids: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.batched(ids, |i| Ok(l2_normalize(&self.model.encode_text(i)?)))
    }

    /// Rewards `(B,)` (float32, on the model's device) of uint8 images
    /// `(B, H, W, 3)` and token ids `(B, context_length)`.
    pub fn score_ids(&self, images_u8: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, _, _) = image_dims(images_u8)?;
        if ids.dim() != 2 || ids.size()[0] != b {
            return Err(Error::Input(format!(
                "reward: {b} images but token ids of shape {:?}",
                ids.size()
            )));
        }
        let pixels = self.preprocess(&images_u8.to_device(self.model.device()))?;
        let img = self.image_features(&pixels)?;
        let txt = self.text_features(ids)?;
        Ok(cosine(&img, &txt))
    }
}

/// `diag(img @ txt.T)` computed one row at a time (`(1, E) @ (E, 1)`, as the
/// reference scores one item per call): `(B, E), (B, E) -> (B,)`.
pub fn cosine(img: &Tensor, txt: &Tensor) -> Tensor {
    let rows: Vec<Tensor> = (0..img.size()[0])
        .map(|i| img.narrow(0, i, 1).mm(&txt.narrow(0, i, 1).tr()).view([1]))
        .collect();
    if rows.is_empty() {
        return Tensor::zeros([0], (img.kind(), img.device()));
    }
    Tensor::cat(&rows, 0)
}

impl Reward for HpsReward {
    fn name(&self) -> &str {
        "hpsv2"
    }

    fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Score>> {
        let (b, _, _) = image_dims(batch.images)?;
        if batch.prompts.len() as i64 != b {
            return Err(Error::Input(format!(
                "reward: {b} images but {} prompts",
                batch.prompts.len()
            )));
        }
        let ids = self.tokenize(batch.prompts)?;
        let scores = self
            .score_ids(batch.images, &ids)?
            .to_device(tch::Device::Cpu);
        let scores = Vec::<f32>::try_from(&scores.to_kind(Kind::Float))?;
        let scores = scores
            .into_iter()
            .map(|s| {
                if s.is_finite() {
                    Score::Value(s)
                } else {
                    Score::Failed(format!("non-finite HPSv2 score {s}"))
                }
            })
            .collect();
        Ok(super::fail_empty_prompts(batch.prompts, scores))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(v: f32, c: usize) -> f32 {
        (v / 255.0 - CLIP_MEAN[c] as f32) / CLIP_STD[c] as f32
    }

    #[test]
    fn no_resize_no_pad_at_model_size() {
        let img = Tensor::arange(2 * 4 * 4 * 3, (Kind::Uint8, tch::Device::Cpu)).view([2, 4, 4, 3]);
        let x = preprocess(&img, 4, Kind::Float).unwrap();
        assert_eq!(x.size(), [2, 3, 4, 4]);
        // pixel (b=1, y=2, x=3, c=1) = value 48*1 + 12*2 + 3*3 + 1 = 82
        let got = x.double_value(&[1, 1, 2, 3]) as f32;
        assert_eq!(got, normalized(82.0, 1));
    }

    #[test]
    fn wide_image_gets_zero_bands() {
        // 2:1 image (H=4, W=8) to R=4: resized to 2x4, one zero row above and below.
        let img = Tensor::full([1, 4, 8, 3], 200, (Kind::Uint8, tch::Device::Cpu));
        let x = preprocess(&img, 4, Kind::Float).unwrap();
        assert_eq!(x.size(), [1, 3, 4, 4]);
        for c in 0..3 {
            let band = (0.0 - CLIP_MEAN[c] as f32) / CLIP_STD[c] as f32;
            let inside = normalized(200.0, c);
            for col in 0..4 {
                assert_eq!(x.double_value(&[0, c as i64, 0, col]) as f32, band);
                assert_eq!(x.double_value(&[0, c as i64, 3, col]) as f32, band);
                // a constant image stays constant under the (normalised) bicubic kernel
                let v = x.double_value(&[0, c as i64, 1, col]) as f32;
                assert!((v - inside).abs() < 1e-5, "{v} vs {inside}");
            }
        }
    }

    #[test]
    fn rejects_bad_images() {
        let rgba = Tensor::zeros([1, 4, 4, 4], (Kind::Uint8, tch::Device::Cpu));
        let e = preprocess(&rgba, 4, Kind::Float).unwrap_err().to_string();
        assert!(e.contains("(B, H, W, 3)"), "{e}");
        let float = Tensor::zeros([1, 4, 4, 3], (Kind::Float, tch::Device::Cpu));
        let e = preprocess(&float, 4, Kind::Float).unwrap_err().to_string();
        assert!(e.contains("uint8"), "{e}");
    }
}
