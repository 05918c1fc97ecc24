//! open_clip `CLIP`: a ViT image tower (CLS pooling, `ln_post`, `proj`) and a
//! causal text tower (pooled at `argmax(ids)`, `text_projection`), with the
//! parameter names of open_clip state dicts.
//!
//! Attention follows `nn.MultiheadAttention` (batch_first=False, as open_clip
//! uses it): one packed in-projection, `scaled_dot_product_attention` over
//! `(B, heads, L, head_dim)` with an additive float mask, then the out-projection.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::OpenClipConfig;
use crate::error::{Error, Result};
use crate::nn::{LayerNorm, Linear};
use crate::weights::{Checkpoint, Init, ParamStore, Source, VarBuilder};

/// LayerNorm epsilon of every open_clip norm.
const LN_EPS: f64 = 1e-5;

/// One `ResidualAttentionBlock`: `x + ls_1(attn(ln_1(x)))`, `x + ls_2(mlp(ln_2(x)))`.
struct ResBlock {
    ln_1: LayerNorm,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    ls_1: Option<Tensor>,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    ls_2: Option<Tensor>,
    heads: i64,
    quick_gelu: bool,
}

impl ResBlock {
    fn new(
        vb: &VarBuilder,
        width: i64,
        heads: i64,
        mlp_ratio: f64,
        layer_scale: bool,
        quick_gelu: bool,
    ) -> Result<Self> {
        let hidden = (width as f64 * mlp_ratio) as i64;
        let ln_1 = LayerNorm::new(&vb.pp("ln_1"), width, LN_EPS)?;
        let attn = vb.pp("attn");
        let in_proj_weight = attn.get("in_proj_weight", &[3 * width, width], Init::FanIn)?;
        let in_proj_bias = attn.get("in_proj_bias", &[3 * width], Init::Normal(0.02))?;
        let out_proj = Linear::new(&attn.pp("out_proj"), width, width, true)?;
        let ls_1 = layer_scale
            .then(|| {
                vb.pp("ls_1")
                    .get("gamma", &[width], Init::OnePlusNormal(0.1))
            })
            .transpose()?;
        let ln_2 = LayerNorm::new(&vb.pp("ln_2"), width, LN_EPS)?;
        let c_fc = Linear::new(&vb.pp("mlp").pp("c_fc"), width, hidden, true)?;
        let c_proj = Linear::new(&vb.pp("mlp").pp("c_proj"), hidden, width, true)?;
        let ls_2 = layer_scale
            .then(|| {
                vb.pp("ls_2")
                    .get("gamma", &[width], Init::OnePlusNormal(0.1))
            })
            .transpose()?;
        Ok(ResBlock {
            ln_1,
            in_proj_weight,
            in_proj_bias,
            out_proj,
            ls_1,
            ln_2,
            c_fc,
            c_proj,
            ls_2,
            heads,
            quick_gelu,
        })
    }

    /// Self-attention of `x (B, L, D)` with an optional additive mask `(L, L)`.
    fn attention(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, l, d) = x.size3().expect("(B, L, D)");
        let hd = d / self.heads;
        let qkv = x
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .view([b, l, 3, self.heads, hd])
            .permute([2, 0, 3, 1, 4]); // (3, B, H, L, hd)
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let mask = mask.map(|m| m.view([1, 1, l, l]));
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            0.0,
            false,
            None::<f64>,
            false,
        );
        let o = o.permute([0, 2, 1, 3]).contiguous().view([b, l, d]);
        self.out_proj.forward(&o)
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let mut a = self.attention(&self.ln_1.forward(x), mask);
        if let Some(g) = &self.ls_1 {
            a *= g;
        }
        let x = x + a;
        let h = self.c_fc.forward(&self.ln_2.forward(&x));
        let h = if self.quick_gelu {
            &h * (&h * 1.702).sigmoid()
        } else {
            h.gelu("none")
        };
        let mut m = self.c_proj.forward(&h);
        if let Some(g) = &self.ls_2 {
            m *= g;
        }
        x + m
    }
}

fn blocks(
    vb: &VarBuilder,
    n: usize,
    width: i64,
    heads: i64,
    mlp_ratio: f64,
    layer_scale: bool,
    quick_gelu: bool,
) -> Result<Vec<ResBlock>> {
    let vb = vb.pp("transformer").pp("resblocks");
    (0..n)
        .map(|i| ResBlock::new(&vb.pp(i), width, heads, mlp_ratio, layer_scale, quick_gelu))
        .collect()
}

/// The ViT image tower (`visual.*`).
struct Vision {
    conv1: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<ResBlock>,
    ln_post: LayerNorm,
    proj: Tensor,
    patch: i64,
}

/// The text tower (top-level keys).
struct Text {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    blocks: Vec<ResBlock>,
    ln_final: LayerNorm,
    text_projection: Tensor,
    causal_mask: Tensor,
}

/// An open_clip `CLIP` model (image and text towers, `logit_scale`).
pub struct OpenClip {
    config: OpenClipConfig,
    vision: Vision,
    text: Text,
    logit_scale: Tensor,
    params: ParamStore,
    device: Device,
}

impl Vision {
    /// The image tower under `vv` (`visual.`).
    fn new(vv: &VarBuilder, config: &OpenClipConfig) -> Result<Self> {
        let vc = &config.vision_cfg;
        let grid = vc.image_size / vc.patch_size;
        let (w, e) = (vc.width, config.embed_dim);
        Ok(Vision {
            class_embedding: vv.get("class_embedding", &[w], Init::Normal(0.02))?,
            positional_embedding: vv.get(
                "positional_embedding",
                &[grid * grid + 1, w],
                Init::Normal(0.02),
            )?,
            proj: vv.get("proj", &[w, e], Init::FanIn)?,
            conv1: vv.pp("conv1").get(
                "weight",
                &[w, 3, vc.patch_size, vc.patch_size],
                Init::FanIn,
            )?,
            ln_pre: LayerNorm::new(&vv.pp("ln_pre"), w, LN_EPS)?,
            blocks: blocks(
                vv,
                vc.layers,
                w,
                w / vc.head_width,
                vc.mlp_ratio,
                vc.ls_init_value.is_some(),
                config.quick_gelu,
            )?,
            ln_post: LayerNorm::new(&vv.pp("ln_post"), w, LN_EPS)?,
            patch: vc.patch_size,
        })
    }
}

impl Text {
    /// The text tower at the checkpoint's root, its causal mask `(l, l)` of `kind` on `device`.
    fn new(vb: &VarBuilder, config: &OpenClipConfig, kind: Kind, device: Device) -> Result<Self> {
        let tc = &config.text_cfg;
        let l = tc.context_length;
        Ok(Text {
            positional_embedding: vb.get(
                "positional_embedding",
                &[l, tc.width],
                Init::Normal(0.01),
            )?,
            text_projection: vb.get(
                "text_projection",
                &[tc.width, config.embed_dim],
                Init::FanIn,
            )?,
            token_embedding: vb.pp("token_embedding").get(
                "weight",
                &[tc.vocab_size, tc.width],
                Init::Normal(0.02),
            )?,
            blocks: blocks(
                vb,
                tc.layers,
                tc.width,
                tc.heads,
                tc.mlp_ratio,
                tc.ls_init_value.is_some(),
                config.quick_gelu,
            )?,
            ln_final: LayerNorm::new(&vb.pp("ln_final"), tc.width, LN_EPS)?,
            causal_mask: Tensor::full([l, l], f64::NEG_INFINITY, (kind, device)).triu(1),
        })
    }
}

impl OpenClip {
    /// Builds the model with parameters from `source`, of `kind` on `device`. A
    /// checkpoint lacking a whole tower is reported as such before any tensor.
    pub fn new(config: OpenClipConfig, source: Source, kind: Kind, device: Device) -> Result<Self> {
        if let Source::Checkpoint(ck) = source {
            check_towers(ck)?;
        }
        let params = ParamStore::new();
        let vb = VarBuilder::new(source, &params, kind, device);
        // built in the checkpoint's order: seeded weights are drawn in it
        let vision = Vision::new(&vb.pp("visual"), &config)?;
        let text = Text::new(&vb, &config, kind, device)?;
        let logit_scale = vb.get("logit_scale", &[], Init::Zeros)?;
        if let Source::Checkpoint(ck) = source {
            params.check_all_used(ck)?;
        }
        for (_, p) in params.named() {
            let _ = p.set_requires_grad(false);
        }
        Ok(OpenClip {
            config,
            vision,
            text,
            logit_scale,
            params,
            device,
        })
    }

    /// Loads a model from `weights`: a `.safetensors` file, or a PyTorch `.pt`
    /// checkpoint (read without executing its pickle).
    pub fn load(
        config: OpenClipConfig,
        weights: &Path,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let ck = open_weights(weights)?;
        Self::new(config, Source::Checkpoint(&ck), kind, device)
    }

    /// Loads an open_clip directory: the config from `model_config.json` (or
    /// `open_clip_config.json`) and the weights from `open_clip_model.safetensors`.
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let config = OpenClipConfig::from_dir(dir)?;
        Self::load(
            config,
            &dir.join("open_clip_model.safetensors"),
            kind,
            device,
        )
    }

    /// The architecture.
    pub fn config(&self) -> &OpenClipConfig {
        &self.config
    }

    /// The device of the parameters.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The parameters' dtype.
    pub fn kind(&self) -> Kind {
        self.logit_scale.kind()
    }

    /// The input resolution `R`.
    pub fn image_size(&self) -> i64 {
        self.config.vision_cfg.image_size
    }

    /// The text context length (77).
    pub fn context_length(&self) -> i64 {
        self.config.text_cfg.context_length
    }

    /// `logit_scale` (a log temperature; HPSv2 scores do not use it).
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// All parameters with their open_clip names, in creation order.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params.named()
    }

    /// Image features `(B, E)` (not normalised) of normalised pixels `(B, 3, R, R)`.
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        let r = self.image_size();
        let size = pixels.size();
        if size.len() != 4 || size[1] != 3 || size[2] != r || size[3] != r {
            return Err(Error::Input(format!(
                "open_clip encode_image: pixels of shape {size:?}, expected (B, 3, {r}, {r})"
            )));
        }
        let v = &self.vision;
        let x = pixels
            .to_device(self.device)
            .to_kind(v.conv1.kind())
            .conv2d(
                &v.conv1,
                None::<Tensor>,
                [v.patch, v.patch],
                [0, 0],
                [1, 1],
                1,
            );
        let (b, w) = (x.size()[0], x.size()[1]);
        let x = x.reshape([b, w, -1]).permute([0, 2, 1]);
        let cls = &v.class_embedding + Tensor::zeros([b, 1, w], (x.kind(), x.device()));
        let mut x = Tensor::cat(&[cls, x], 1) + &v.positional_embedding;
        x = v.ln_pre.forward(&x);
        for blk in &v.blocks {
            x = blk.forward(&x, None);
        }
        let pooled = v.ln_post.forward(&x.select(1, 0));
        Ok(pooled.matmul(&v.proj))
    }

    /// Text features `(B, E)` (not normalised) of token ids `(B, context_length)`,
    /// pooled at the first position of the largest id (`<|endoftext|>`).
    pub fn encode_text(&self, ids: &Tensor) -> Result<Tensor> {
        let tc = &self.config.text_cfg;
        let size = ids.size();
        if size.len() != 2 || size[1] != tc.context_length {
            return Err(Error::Input(format!(
                "open_clip encode_text: ids of shape {size:?}, expected (B, {})",
                tc.context_length
            )));
        }
        if !matches!(ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(Error::Input(format!(
                "open_clip encode_text: ids of dtype {:?}, expected int64",
                ids.kind()
            )));
        }
        // checked where the ids are (the tokenizer's: the CPU), before the move
        if ids.numel() > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= tc.vocab_size {
                return Err(Error::Input(format!(
                    "open_clip encode_text: token id {} outside the vocabulary [0, {})",
                    if lo < 0 { lo } else { hi },
                    tc.vocab_size
                )));
            }
        }
        let ids = ids.to_device(self.device).to_kind(Kind::Int64);
        let t = &self.text;
        let mut x =
            Tensor::embedding(&t.token_embedding, &ids, -1, false, false) + &t.positional_embedding;
        for blk in &t.blocks {
            x = blk.forward(&x, Some(&t.causal_mask));
        }
        x = t.ln_final.forward(&x);
        let b = size[0];
        let rows = Tensor::arange(b, (Kind::Int64, self.device));
        let eot = ids.argmax(-1, false);
        let pooled = x.index(&[Some(rows), Some(eot)]);
        Ok(pooled.matmul(&t.text_projection))
    }
}

/// Opens a weights file by its format: safetensors, or a torch zip checkpoint.
pub fn open_weights(path: &Path) -> Result<Checkpoint> {
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors {
        Checkpoint::from_files(path.display().to_string(), vec![path.to_path_buf()])
    } else {
        Checkpoint::open_torch_pt(path)
    }
}

/// Errors when a whole tower is absent (rather than reporting its first tensor).
fn check_towers(ck: &Checkpoint) -> Result<()> {
    let has_vision = ck.names().any(|n| n.starts_with("visual."));
    let has_text = ck
        .names()
        .any(|n| n == "token_embedding.weight" || n.starts_with("transformer."));
    let missing = match (has_vision, has_text) {
        (true, true) => return Ok(()),
        (false, true) => "the image tower (no `visual.*` tensors)",
        (true, false) => "the text tower (no `token_embedding.weight` / `transformer.*` tensors)",
        (false, false) => "both towers: no open_clip CLIP tensors at all",
    };
    Err(Error::IncompleteCheckpoint {
        source_desc: ck.describe().to_string(),
        msg: format!("not an open_clip CLIP checkpoint: it lacks {missing}"),
    })
}
