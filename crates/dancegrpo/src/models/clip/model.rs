//! `CLIPModel` in the transformers layout (eval mode):
//!
//! ```text
//! vision_model.embeddings.{patch_embedding.weight (conv, no bias), class_embedding, position_embedding.weight}
//! vision_model.pre_layrnorm, vision_model.encoder.layers.N.*, vision_model.post_layernorm
//! text_model.*                      (the CLIPTextModel of models::clip_text)
//! visual_projection.weight, text_projection.weight   (no bias)
//! logit_scale
//! ```
//!
//! `get_image_features = visual_projection(post_layernorm(encoder(pre_layrnorm(emb))[:, 0]))`,
//! `get_text_features = text_projection(pooler_output)`, as transformers 4.46.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::{ClipConfig, ClipVisionConfig};
use crate::error::{Error, Result};
use crate::models::clip_text::model::ClipLayer;
use crate::models::clip_text::ClipTextModel;
use crate::nn::{LayerNorm, Linear};
use crate::weights::{Checkpoint, Init, ParamStore, Source, VarBuilder};

/// The ViT vision tower (`CLIPVisionTransformer`).
struct Vision {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    post_layernorm: LayerNorm,
    patch: i64,
}

/// A transformers `CLIPModel` (both towers, projections, `logit_scale`).
pub struct ClipModel {
    config: ClipConfig,
    text: ClipTextModel,
    vision: Vision,
    visual_projection: Linear,
    text_projection: Linear,
    logit_scale: Tensor,
    params: ParamStore,
    device: Device,
}

impl Vision {
    /// The vision tower under `vm` (`vision_model.`).
    fn new(vm: &VarBuilder, vc: &ClipVisionConfig) -> Result<Self> {
        let act = vc.activation().expect("validated activation");
        let d = vc.hidden_size;
        let emb = vm.pp("embeddings");
        let dims = (
            d,
            vc.intermediate_size,
            vc.num_attention_heads,
            vc.layer_norm_eps,
        );
        Ok(Vision {
            class_embedding: emb.get("class_embedding", &[d], Init::Normal(0.02))?,
            patch_embedding: emb.pp("patch_embedding").get(
                "weight",
                &[d, vc.num_channels, vc.patch_size, vc.patch_size],
                Init::FanIn,
            )?,
            position_embedding: emb.pp("position_embedding").get(
                "weight",
                &[vc.grid() * vc.grid() + 1, d],
                Init::Normal(0.02),
            )?,
            pre_layrnorm: LayerNorm::new(&vm.pp("pre_layrnorm"), d, vc.layer_norm_eps)?,
            layers: (0..vc.num_hidden_layers)
                .map(|i| ClipLayer::new(&vm.pp("encoder").pp("layers").pp(i), dims, act))
                .collect::<Result<Vec<_>>>()?,
            post_layernorm: LayerNorm::new(&vm.pp("post_layernorm"), d, vc.layer_norm_eps)?,
            patch: vc.patch_size,
        })
    }
}

impl ClipModel {
    /// Builds the model with parameters from `source` (a checkpoint in the
    /// transformers key layout, or a seed), of `kind` on `device`. Tensors the
    /// model does not have are an error, except the `position_ids` buffers.
    pub fn new(config: ClipConfig, source: Source, kind: Kind, device: Device) -> Result<Self> {
        config.validate(Path::new("CLIP config"))?;
        if let Source::Checkpoint(ck) = source {
            check_towers(ck)?;
        }
        let text = ClipTextModel::new(config.text_config.clone(), source, kind, device)?;
        let params = ParamStore::new();
        let vb = VarBuilder::new(source, &params, kind, device);
        let vision = Vision::new(&vb.pp("vision_model"), &config.vision_config)?;
        let d = config.vision_config.hidden_size;
        let e = config.projection_dim;
        let visual_projection = Linear::new(&vb.pp("visual_projection"), d, e, false)?;
        let text_projection = Linear::new(
            &vb.pp("text_projection"),
            config.text_config.hidden_size,
            e,
            false,
        )?;
        let logit_scale = vb.get("logit_scale", &[], Init::Zeros)?;
        if let Source::Seeded(_) = source {
            tch::no_grad(|| {
                let _ = logit_scale
                    .shallow_clone()
                    .fill_(config.logit_scale_init_value);
            });
        }
        if let Source::Checkpoint(ck) = source {
            params.check_all_used_except(ck, |name| {
                name.starts_with("text_model.") || name.ends_with("position_ids")
            })?;
        }
        for (_, p) in text.parameters().iter().chain(params.named().iter()) {
            let _ = p.shallow_clone().set_requires_grad(false);
        }
        Ok(ClipModel {
            config,
            text,
            vision,
            visual_projection,
            text_projection,
            logit_scale,
            params,
            device,
        })
    }

    /// Loads a transformers model directory: `config.json`, and the weights from
    /// `model.safetensors`, the shards of `model.safetensors.index.json`, or a
    /// zip-format `pytorch_model.bin` (read without executing its pickle).
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let ck = open_hf_weights(dir)?;
        Self::new(config, Source::Checkpoint(&ck), kind, device)
    }

    /// The architecture.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The device of the parameters.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The vision tower's input resolution.
    pub fn image_size(&self) -> i64 {
        self.config.vision_config.image_size
    }

    /// The longest text input (77).
    pub fn context_length(&self) -> i64 {
        self.config.text_config.max_position_embeddings
    }

    /// `logit_scale` (a log temperature).
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// The text tower.
    pub fn text_model(&self) -> &ClipTextModel {
        &self.text
    }

    /// All parameters with their transformers names: the text tower's, then the
    /// vision tower's, the projections and `logit_scale`.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut all = self.text.parameters();
        all.extend(self.params.named());
        all
    }

    /// The vision tower's pooled output `(B, hidden)`: `post_layernorm` of the
    /// CLS token, from normalised pixels `(B, 3, R, R)`.
    pub fn vision_pooled(&self, pixels: &Tensor) -> Result<Tensor> {
        let r = self.image_size();
        let size = pixels.size();
        if size.len() != 4 || size[1] != 3 || size[2] != r || size[3] != r {
            return Err(Error::Input(format!(
                "CLIP vision model: pixels of shape {size:?}, expected (B, 3, {r}, {r})"
            )));
        }
        let v = &self.vision;
        let x = pixels
            .to_device(self.device)
            .to_kind(v.patch_embedding.kind())
            .conv2d(
                &v.patch_embedding,
                None::<Tensor>,
                [v.patch, v.patch],
                [0, 0],
                [1, 1],
                1,
            );
        let (b, d) = (x.size()[0], x.size()[1]);
        let patches = x.flatten(2, -1).transpose(1, 2);
        let cls = v.class_embedding.view([1, 1, d]).expand([b, 1, d], false);
        let mut h = Tensor::cat(&[cls, patches], 1) + v.position_embedding.unsqueeze(0);
        h = v.pre_layrnorm.forward(&h);
        for layer in &v.layers {
            h = layer.forward(&h, None);
        }
        Ok(v.post_layernorm.forward(&h.select(1, 0)))
    }

    /// `get_image_features`: projected image embeddings `(B, E)` (not normalised).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.visual_projection.forward(&self.vision_pooled(pixels)?))
    }

    /// `get_text_features`: projected text embeddings `(B, E)` (not normalised)
    /// of token ids `(B, L)`, `L <= context_length`.
    pub fn text_features(&self, ids: &Tensor) -> Result<Tensor> {
        let out = self.text.forward(ids, None)?;
        Ok(self.text_projection.forward(&out.pooled))
    }
}

/// Opens the weights of a transformers model directory: `model.safetensors`,
/// the shards of `model.safetensors.index.json`, or a zip `pytorch_model.bin`.
pub fn open_hf_weights(dir: &Path) -> Result<Checkpoint> {
    let bin = dir.join("pytorch_model.bin");
    let st = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if !st.is_file() && !index.is_file() && bin.is_file() {
        Checkpoint::open_torch_pt(&bin)
    } else {
        Checkpoint::open_dir(dir, "model")
    }
}

/// Errors when a whole tower is absent (rather than reporting its first tensor).
fn check_towers(ck: &Checkpoint) -> Result<()> {
    let has_vision = ck.names().any(|n| n.starts_with("vision_model."));
    let has_text = ck.names().any(|n| n.starts_with("text_model."));
    let missing = match (has_vision, has_text) {
        (true, true) => return Ok(()),
        (false, true) => "the vision tower (no `vision_model.*` tensors)",
        (true, false) => "the text tower (no `text_model.*` tensors)",
        (false, false) => "both towers: no transformers CLIPModel tensors at all",
    };
    Err(Error::IncompleteCheckpoint {
        source_desc: ck.describe().to_string(),
        msg: format!("not a transformers CLIPModel checkpoint: it lacks {missing}"),
    })
}
