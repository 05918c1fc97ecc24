//! T5 encoder building blocks with transformers `modeling_t5.py` semantics: the
//! RMS layer norm, relative-position buckets, self-attention without score
//! scaling, and the (gated) feed-forward layer.

use tch::{Device, Kind, Tensor};

use super::config::{T5Activation, T5Config};
use crate::error::Result;
use crate::nn::{upcast_kind, Linear};
use crate::weights::{Init, VarBuilder};

/// transformers' `T5LayerNorm`: `weight * (x * rsqrt(mean(x^2) + eps))`, the
/// variance taken in float32, the normalised value cast to the weight's dtype
/// when that is half or bfloat16. No mean subtraction, no bias.
pub struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    /// Builds `weight [dim]` under `vb`.
    pub fn new(vb: &VarBuilder, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self::from_weight(
            vb.get("weight", &[dim], Init::OnePlusNormal(0.1))?,
            eps,
        ))
    }

    /// A norm with the given scale.
    pub fn from_weight(weight: Tensor, eps: f64) -> Self {
        T5LayerNorm { weight, eps }
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let variance = x
            .to_kind(upcast_kind(x.kind()))
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, None);
        let mut h = x * (variance + self.eps).rsqrt();
        if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) {
            h = h.to_kind(self.weight.kind());
        }
        &self.weight * h
    }
}

/// transformers' `T5Attention._relative_position_bucket` on an int64 tensor of
/// relative positions (`key - query`). Computed with the same tensor operations
/// (float32 log, truncating conversion) so bucket boundaries agree exactly.
pub fn relative_position_bucket(
    relative_position: &Tensor,
    bidirectional: bool,
    num_buckets: i64,
    max_distance: i64,
) -> Tensor {
    let mut num_buckets = num_buckets;
    let mut buckets = relative_position.zeros_like();
    let rel = if bidirectional {
        num_buckets /= 2;
        buckets += relative_position.gt(0).to_kind(Kind::Int64) * num_buckets;
        relative_position.abs()
    } else {
        -relative_position.clamp_max(0)
    };
    let max_exact = num_buckets / 2;
    let is_small = rel.lt(max_exact);
    let scale = (max_distance as f64 / max_exact as f64).ln();
    let large = ((rel.to_kind(Kind::Float) / max_exact).log() / scale * (num_buckets - max_exact))
        .to_kind(Kind::Int64)
        + max_exact;
    let large = large.clamp_max(num_buckets - 1);
    buckets + rel.where_self(&is_small, &large)
}

/// The relative-position buckets `(q_len, k_len)` of a bidirectional encoder, on the CPU.
pub fn encoder_buckets(q_len: i64, k_len: i64, num_buckets: i64, max_distance: i64) -> Tensor {
    let opts = (Kind::Int64, Device::Cpu);
    let context = Tensor::arange(q_len, opts).unsqueeze(1);
    let memory = Tensor::arange(k_len, opts).unsqueeze(0);
    relative_position_bucket(&(memory - context), true, num_buckets, max_distance)
}

fn linear_no_bias(vb: &VarBuilder, in_dim: i64, out_dim: i64, std: f64) -> Result<Linear> {
    let weight = vb.get("weight", &[out_dim, in_dim], Init::Normal(std))?;
    Ok(Linear::from_parts(vb, weight, None))
}

/// `T5Attention` of an encoder (`layer.0.SelfAttention`): projections without
/// bias, scores `q k^T` **without** `1/sqrt(d)` scaling plus the position bias,
/// softmax in float32.
pub struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    relative_attention_bias: Option<Tensor>,
    heads: i64,
    d_kv: i64,
    num_buckets: i64,
    max_distance: i64,
}

impl T5Attention {
    /// Builds the projections (and the bias table when `has_relative_attention_bias`).
    /// Seeded initialisation follows transformers' `T5PreTrainedModel._init_weights`.
    pub fn new(vb: &VarBuilder, cfg: &T5Config, has_relative_attention_bias: bool) -> Result<Self> {
        let (d, inner) = (cfg.d_model, cfg.inner_dim());
        let q = linear_no_bias(&vb.pp("q"), d, inner, ((d * cfg.d_kv) as f64).powf(-0.5))?;
        let k = linear_no_bias(&vb.pp("k"), d, inner, (d as f64).powf(-0.5))?;
        let v = linear_no_bias(&vb.pp("v"), d, inner, (d as f64).powf(-0.5))?;
        let o = linear_no_bias(&vb.pp("o"), inner, d, (inner as f64).powf(-0.5))?;
        let relative_attention_bias = if has_relative_attention_bias {
            Some(vb.pp("relative_attention_bias").get(
                "weight",
                &[cfg.relative_attention_num_buckets, cfg.num_heads],
                Init::Normal((d as f64).powf(-0.5)),
            )?)
        } else {
            None
        };
        Ok(T5Attention {
            q,
            k,
            v,
            o,
            relative_attention_bias,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// The position bias `(1, heads, q_len, k_len)` of `compute_bias`, in the table's
    /// dtype and on its device. Panics on a layer without the table.
    pub fn compute_bias(&self, q_len: i64, k_len: i64) -> Tensor {
        let table = self
            .relative_attention_bias
            .as_ref()
            .expect("only the first T5 layer holds the relative attention bias");
        let buckets = encoder_buckets(q_len, k_len, self.num_buckets, self.max_distance)
            .to_device(table.device());
        Tensor::embedding(table, &buckets, -1, false, false)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }

    /// Self-attention of `x (b, L, d)` with the additive `position_bias`
    /// (broadcastable to `(b, heads, L, L)`, mask included).
    pub fn forward(&self, x: &Tensor, position_bias: &Tensor) -> Tensor {
        let (b, l) = (x.size()[0], x.size()[1]);
        let split = |t: Tensor| t.view([b, -1, self.heads, self.d_kv]).transpose(1, 2);
        let q = split(self.q.forward(x));
        let k = split(self.k.forward(x));
        let v = split(self.v.forward(x));
        let mut scores = q.matmul(&k.transpose(3, 2));
        scores += position_bias;
        let weights = scores
            .to_kind(upcast_kind(scores.kind()))
            .softmax(-1, None::<Kind>)
            .to_kind(scores.kind());
        let out =
            weights
                .matmul(&v)
                .transpose(1, 2)
                .contiguous()
                .view([b, l, self.heads * self.d_kv]);
        self.o.forward(&out)
    }
}

/// `T5DenseActDense` / `T5DenseGatedActDense` (`layer.1.DenseReluDense`).
pub struct T5FeedForward {
    wi_0: Linear,
    /// The linear branch of the gated variant.
    wi_1: Option<Linear>,
    wo: Linear,
    act: T5Activation,
}

impl T5FeedForward {
    /// Builds `wi` (or `wi_0`, `wi_1` when gated) and `wo` under `vb`.
    pub fn new(vb: &VarBuilder, cfg: &T5Config, act: T5Activation, gated: bool) -> Result<Self> {
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        let in_std = (d as f64).powf(-0.5);
        let (wi_0, wi_1) = if gated {
            (
                linear_no_bias(&vb.pp("wi_0"), d, ff, in_std)?,
                Some(linear_no_bias(&vb.pp("wi_1"), d, ff, in_std)?),
            )
        } else {
            (linear_no_bias(&vb.pp("wi"), d, ff, in_std)?, None)
        };
        let wo = linear_no_bias(&vb.pp("wo"), ff, d, (ff as f64).powf(-0.5))?;
        Ok(T5FeedForward {
            wi_0,
            wi_1,
            wo,
            act,
        })
    }

    /// Applies the layer to `x (…, d)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let act = activation(self.act, &self.wi_0.forward(x));
        // out of place: the activation's output may be saved for backward
        let mut h = match &self.wi_1 {
            Some(wi_1) => act * wi_1.forward(x),
            None => act,
        };
        if h.kind() != self.wo.weight.kind() {
            h = h.to_kind(self.wo.weight.kind());
        }
        self.wo.forward(&h)
    }
}

/// Applies a transformers activation with the same tensor operations as `ACT2FN`.
pub fn activation(act: T5Activation, x: &Tensor) -> Tensor {
    match act {
        T5Activation::Relu => x.relu(),
        T5Activation::Gelu => x.gelu("none"),
        T5Activation::Silu => x.silu(),
        T5Activation::GeluNew => gelu_new(x),
    }
}

/// transformers' `NewGELUActivation`:
/// `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`, op by op.
pub fn gelu_new(x: &Tensor) -> Tensor {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x + x.pow_tensor_scalar(3.0) * 0.044715) * c;
    (x * 0.5) * (inner.tanh() + 1.0)
}

/// One encoder block: pre-norm self-attention and pre-norm feed-forward, each residual.
pub struct T5Block {
    attn_norm: T5LayerNorm,
    attention: T5Attention,
    ff_norm: T5LayerNorm,
    ff: T5FeedForward,
}

impl T5Block {
    /// Builds `block.{i}` under `vb` (the position-bias table only in block 0).
    pub fn new(vb: &VarBuilder, cfg: &T5Config, first: bool) -> Result<Self> {
        let (act, gated) = cfg
            .activation()
            .map_err(|msg| crate::error::Error::config("T5 config", "feed_forward_proj", msg))?;
        let l0 = vb.pp("layer").pp(0);
        let l1 = vb.pp("layer").pp(1);
        let attention = T5Attention::new(&l0.pp("SelfAttention"), cfg, first)?;
        let attn_norm =
            T5LayerNorm::new(&l0.pp("layer_norm"), cfg.d_model, cfg.layer_norm_epsilon)?;
        let ff = T5FeedForward::new(&l1.pp("DenseReluDense"), cfg, act, gated)?;
        let ff_norm = T5LayerNorm::new(&l1.pp("layer_norm"), cfg.d_model, cfg.layer_norm_epsilon)?;
        Ok(T5Block {
            attn_norm,
            attention,
            ff_norm,
            ff,
        })
    }

    /// The block's self-attention (block 0 computes the shared position bias).
    pub fn attention(&self) -> &T5Attention {
        &self.attention
    }

    /// Applies the block to `x (b, L, d)`.
    pub fn forward(&self, x: &Tensor, position_bias: &Tensor) -> Tensor {
        let h = x + self
            .attention
            .forward(&self.attn_norm.forward(x), position_bias);
        &h + self.ff.forward(&self.ff_norm.forward(&h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(rel: &[i64], bidirectional: bool) -> Vec<i64> {
        let t = relative_position_bucket(&Tensor::from_slice(rel), bidirectional, 32, 128);
        Vec::<i64>::try_from(t).unwrap()
    }

    #[test]
    fn t5_bidirectional_buckets_match_hand_computed_values() {
        // 16 buckets per direction, 8 exact; beyond 8: 8 + int(ln(n/8)/ln(16)*8), capped at 15;
        // keys after the query (positive) add 16.
        let rel = [
            0, 1, -1, 7, -7, 8, -8, -15, -16, 16, -31, -32, -64, 63, -100, -128, 128, -1000, 1000,
        ];
        let want = [
            0, 17, 1, 23, 7, 24, 8, 9, 10, 26, 11, 12, 14, 29, 15, 15, 31, 15, 31,
        ];
        assert_eq!(buckets(&rel, true), want);
    }

    #[test]
    fn t5_unidirectional_buckets_match_hand_computed_values() {
        // only keys before the query count: 32 buckets, 16 exact, then ln(n/16)/ln(8)*16.
        let rel = [0, 5, -1, -15, -16, -31, -64, -100, -128, -1000];
        let want = [0, 0, 1, 15, 16, 21, 26, 30, 31, 31];
        assert_eq!(buckets(&rel, false), want);
    }

    #[test]
    fn t5_encoder_bucket_matrix_is_key_minus_query() {
        let b = encoder_buckets(3, 4, 32, 128);
        let want = Tensor::from_slice(&[0i64, 17, 18, 19, 1, 0, 17, 18, 2, 1, 0, 17]).view([3, 4]);
        assert!(b.equal(&want));
    }

    #[test]
    fn t5_layer_norm_is_rms_without_mean_subtraction() {
        // x = [3, 4] (mean of squares 12.5), eps 0, weight [1, 2] -> [3, 8] / sqrt(12.5)
        let norm = T5LayerNorm::from_weight(Tensor::from_slice(&[1.0f32, 2.0]), 0.0);
        let y = norm.forward(&Tensor::from_slice(&[3.0f32, 4.0]).view([1, 2]));
        let s = 12.5f64.sqrt();
        let want = Tensor::from_slice(&[(3.0 / s) as f32, (8.0 / s) as f32]).view([1, 2]);
        assert!(y.allclose(&want, 1e-6, 1e-7, false), "{y}");
        // eps enters under the root: x = [0, 0] gives 0, x = [1, 1] with eps 3 gives 1/2
        let norm = T5LayerNorm::from_weight(Tensor::from_slice(&[1.0f32, 1.0]), 3.0);
        let y = norm.forward(&Tensor::from_slice(&[1.0f32, 1.0, 0.0, 0.0]).view([2, 2]));
        let want = Tensor::from_slice(&[0.5f32, 0.5, 0.0, 0.0]).view([2, 2]);
        assert!(y.allclose(&want, 1e-6, 1e-7, false), "{y}");
    }

    #[test]
    fn t5_layer_norm_in_bf16_keeps_the_weight_dtype() {
        let norm = T5LayerNorm::from_weight(Tensor::ones([4], (Kind::BFloat16, Device::Cpu)), 1e-6);
        let x = Tensor::from_slice(&[1.0f32, -2.0, 3.0, 0.5]).to_kind(Kind::BFloat16);
        assert_eq!(norm.forward(&x).kind(), Kind::BFloat16);
    }

    #[test]
    fn t5_gelu_new_is_the_tanh_approximation() {
        let x = Tensor::from_slice(&[-3.0f32, -1.0, 0.0, 0.5, 2.0]);
        let ours = gelu_new(&x);
        let torch_tanh = x.gelu("tanh");
        assert!(ours.allclose(&torch_tanh, 1e-6, 1e-6, false));
        // gelu_new(2) / 2 = 0.5 * (1 + tanh(sqrt(2/pi) * (2 + 0.044715 * 8)))
        let g1 = 0.5 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * 2.35772).tanh());
        assert!((ours.double_value(&[4]) / 2.0 - g1).abs() < 1e-6);
    }
}
