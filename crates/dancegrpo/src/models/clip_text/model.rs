//! `CLIPTextModel`: token + position embeddings, pre-LN causal transformer
//! layers, the final LayerNorm and the end-of-text pooling.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::{ClipActivation, ClipTextConfig};
use crate::error::{Error, Result};
use crate::models::t5::layers::gelu_new;
use crate::models::t5::model::{check_ids, check_kind, finfo_min};
use crate::nn::{LayerNorm, Linear};
use crate::weights::{Checkpoint, Init, ParamStore, Source, VarBuilder};

/// Outputs of the CLIP text model.
pub struct ClipTextOutput {
    /// `last_hidden_state (b, L, hidden)`, after the final LayerNorm.
    pub last_hidden_state: Tensor,
    /// `pooler_output (b, hidden)`: the final state at the end-of-text position.
    pub pooled: Tensor,
}

/// `CLIPAttention` (transformers' SDPA variant): scale `1/sqrt(head_dim)`.
pub(crate) struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
    head_dim: i64,
}

impl ClipAttention {
    fn new(vb: &VarBuilder, d: i64, heads: i64) -> Result<Self> {
        Ok(ClipAttention {
            k_proj: Linear::new(&vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(&vb.pp("v_proj"), d, d, true)?,
            q_proj: Linear::new(&vb.pp("q_proj"), d, d, true)?,
            out_proj: Linear::new(&vb.pp("out_proj"), d, d, true)?,
            heads,
            head_dim: d / heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, l, d) = x.size3().expect("(b, L, d) hidden states");
        let split = |t: Tensor| t.view([b, -1, self.heads, self.head_dim]).transpose(1, 2);
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        let scale = (self.head_dim as f64).powf(-0.5);
        let out =
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, Some(scale), false);
        self.out_proj
            .forward(&out.transpose(1, 2).reshape([b, l, d]))
    }
}

/// One `CLIPEncoderLayer`: pre-LN attention and pre-LN MLP, each residual
/// (shared by the text tower and the vision tower of `models::clip`).
pub(crate) struct ClipLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: ClipActivation,
}

impl ClipLayer {
    /// A layer of width `d`, MLP width `ff`, `heads` heads and LayerNorm `eps`.
    pub(crate) fn new(
        vb: &VarBuilder,
        (d, ff, heads, eps): (i64, i64, i64, f64),
        act: ClipActivation,
    ) -> Result<Self> {
        Ok(ClipLayer {
            self_attn: ClipAttention::new(&vb.pp("self_attn"), d, heads)?,
            layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), d, eps)?,
            fc1: Linear::new(&vb.pp("mlp").pp("fc1"), d, ff, true)?,
            fc2: Linear::new(&vb.pp("mlp").pp("fc2"), ff, d, true)?,
            layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), d, eps)?,
            act,
        })
    }

    /// Applies the layer to `x (b, L, d)` with an optional additive mask.
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let h = x + self.self_attn.forward(&self.layer_norm1.forward(x), mask);
        let m = self.fc1.forward(&self.layer_norm2.forward(&h));
        &h + self.fc2.forward(&clip_activation(self.act, &m))
    }
}

/// Applies a CLIP MLP activation with the same tensor operations as transformers.
pub fn clip_activation(act: ClipActivation, x: &Tensor) -> Tensor {
    match act {
        ClipActivation::QuickGelu => x * (x * 1.702).sigmoid(),
        ClipActivation::Gelu => x.gelu("none"),
        ClipActivation::GeluNew => gelu_new(x),
    }
}

/// The CLIP text transformer (`CLIPTextModel` semantics, eval mode).
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    params: ParamStore,
}

impl ClipTextModel {
    /// Builds the model with parameters from `source`, of `kind` (float32 or
    /// bfloat16) on `device`. Tensors of a full `CLIPModel` checkpoint that the
    /// text tower does not use (vision tower, projections, `position_ids`
    /// buffers) are ignored.
    pub fn new(config: ClipTextConfig, source: Source, kind: Kind, device: Device) -> Result<Self> {
        check_kind(kind)?;
        config.validate(Path::new("CLIP text config"))?;
        let act = config.activation().expect("validated activation");
        let params = ParamStore::new();
        let vb = VarBuilder::new(source, &params, kind, device).pp("text_model");
        let emb = vb.pp("embeddings");
        let d = config.hidden_size;
        let token_embedding =
            emb.pp("token_embedding")
                .get("weight", &[config.vocab_size, d], Init::Normal(0.02))?;
        let position_embedding = emb.pp("position_embedding").get(
            "weight",
            &[config.max_position_embeddings, d],
            Init::Normal(0.02),
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let dims = (
                    d,
                    config.intermediate_size,
                    config.num_attention_heads,
                    config.layer_norm_eps,
                );
                ClipLayer::new(&vb.pp("encoder").pp("layers").pp(i), dims, act)
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            LayerNorm::new(&vb.pp("final_layer_norm"), d, config.layer_norm_eps)?;
        if let Source::Checkpoint(ck) = source {
            params.check_all_used_except(ck, |name| {
                name.ends_with("position_ids")
                    || name.starts_with("vision_model.")
                    || name.starts_with("text_projection.")
                    || name.starts_with("visual_projection.")
                    || name == "logit_scale"
            })?;
        }
        Ok(ClipTextModel {
            config,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            params,
        })
    }

    /// Loads a transformers model directory (`config.json` + `model.safetensors`
    /// or the shards of `model.safetensors.index.json`), converting the stored
    /// dtype to `kind`.
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open_dir(dir, "model")?;
        Self::new(config, Source::Checkpoint(&ck), kind, device)
    }

    /// The architecture.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// All parameters with their checkpoint names.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params.named()
    }

    /// Parameter dtype.
    pub fn kind(&self) -> Kind {
        self.token_embedding.kind()
    }

    /// Parameter device.
    pub fn device(&self) -> Device {
        self.token_embedding.device()
    }

    /// Encodes `input_ids (b, L)` (int64, `L <= max_position_embeddings`) with the
    /// causal mask, and the optional padding `attention_mask (b, L)` of 1/0
    /// (FLUX passes none).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<ClipTextOutput> {
        let size = input_ids.size();
        if size.len() != 2 || !matches!(input_ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(Error::Input(format!(
                "CLIP input_ids must be an integer tensor (batch, length), got {:?} {size:?}",
                input_ids.kind()
            )));
        }
        let (b, l) = (size[0], size[1]);
        if l > self.config.max_position_embeddings || l == 0 {
            return Err(Error::Input(format!(
                "CLIP input length {l} is outside [1, {}] (max_position_embeddings)",
                self.config.max_position_embeddings
            )));
        }
        if let Some(m) = attention_mask {
            if m.size() != [b, l] {
                return Err(Error::Input(format!(
                    "CLIP attention_mask has shape {:?}, input_ids {size:?}",
                    m.size()
                )));
            }
        }
        check_ids(input_ids, self.config.vocab_size, "CLIP")?;
        let (kind, device) = (self.kind(), self.device());
        let ids = input_ids.to_kind(Kind::Int64).to_device(device);
        let tokens = Tensor::embedding(&self.token_embedding, &ids, -1, false, false);
        let positions = self.position_embedding.narrow(0, 0, l).unsqueeze(0);
        let mut h = tokens + positions;
        let mut mask = causal_mask(b, l, kind, device);
        if let Some(m) = attention_mask {
            mask = padding_mask(m, l, kind).to_device(device) + mask;
        }
        for layer in &self.layers {
            h = layer.forward(&h, Some(&mask));
        }
        let last_hidden_state = self.final_layer_norm.forward(&h);
        let positions = self.pool_positions(&ids);
        let rows = Tensor::arange(b, (Kind::Int64, device));
        let pooled = last_hidden_state.index(&[Some(rows), Some(positions)]);
        Ok(ClipTextOutput {
            last_hidden_state,
            pooled,
        })
    }

    /// The pooled position of each row (transformers 4.46): with the legacy
    /// `eos_token_id == 2`, `argmax(input_ids)` (the first occurrence of the
    /// largest id, i.e. the first `<|endoftext|>` of the standard vocabulary);
    /// otherwise the first position holding `eos_token_id` (0 when there is none).
    pub fn pool_positions(&self, input_ids: &Tensor) -> Tensor {
        let ids = input_ids.to_kind(Kind::Int);
        if self.config.eos_token_id == 2 {
            ids.argmax(-1, false)
        } else {
            ids.eq(self.config.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        }
    }
}

/// `_create_4d_causal_attention_mask`: `(b, 1, L, L)`, 0 on and below the diagonal,
/// `finfo(kind).min` above.
pub fn causal_mask(b: i64, l: i64, kind: Kind, device: Device) -> Tensor {
    let full = Tensor::full([l, l], finfo_min(kind), (kind, device));
    let upper = Tensor::ones([l, l], (Kind::Bool, device)).triu(1);
    let zeros = full.zeros_like();
    full.where_self(&upper, &zeros)
        .view([1, 1, l, l])
        .expand([b, 1, l, l], false)
}

/// `_prepare_4d_attention_mask`: `(b, 1, L, L)`, `finfo(kind).min` at masked keys, else 0.
fn padding_mask(mask: &Tensor, l: i64, kind: Kind) -> Tensor {
    let b = mask.size()[0];
    let expanded = mask
        .view([b, 1, 1, l])
        .expand([b, 1, l, l], false)
        .to_kind(kind);
    let inverted = expanded.ones_like() - expanded;
    inverted.masked_fill(&inverted.to_kind(Kind::Bool), finfo_min(kind))
}
