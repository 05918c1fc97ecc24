//! Layers shared by the `AutoencoderKL` encoder and decoder: the resnet block
//! without time embedding and the mid block (resnet, single-head spatial
//! attention over the channels with group norm and residual, resnet).

use tch::Tensor;

use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::weights::VarBuilder;

pub(super) const EPS: f64 = 1e-6;

/// `ResnetBlock2D` without time embedding.
pub(super) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub(super) fn new(vb: &VarBuilder, in_c: i64, out_c: i64, groups: i64) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: GroupNorm::new(&vb.pp("norm1"), groups, in_c, EPS)?,
            conv1: Conv2d::new(&vb.pp("conv1"), in_c, out_c, 3, 1)?,
            norm2: GroupNorm::new(&vb.pp("norm2"), groups, out_c, EPS)?,
            conv2: Conv2d::new(&vb.pp("conv2"), out_c, out_c, 3, 1)?,
            conv_shortcut: if in_c != out_c {
                Some(Conv2d::new(&vb.pp("conv_shortcut"), in_c, out_c, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// (b, in, h, w) -> (b, out, h, w)
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        (skip + h) / 1.0 // output_scale_factor
    }
}

/// Single-head spatial self-attention with group norm and residual (`Attention` of the mid block).
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn new(vb: &VarBuilder, c: i64, groups: i64) -> Result<Self> {
        Ok(SpatialAttention {
            group_norm: GroupNorm::new(&vb.pp("group_norm"), groups, c, EPS)?,
            to_q: Linear::new(&vb.pp("to_q"), c, c, true)?,
            to_k: Linear::new(&vb.pp("to_k"), c, c, true)?,
            to_v: Linear::new(&vb.pp("to_v"), c, c, true)?,
            to_out: Linear::new(&vb.pp("to_out").pp(0), c, c, true)?,
        })
    }

    /// (b, c, h, w) -> (b, c, h, w)
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("4-d VAE activation");
        let seq = x.view([b, c, h * w]).transpose(1, 2); // (b, hw, c)
        let normed = self
            .group_norm
            .forward(&seq.transpose(1, 2))
            .transpose(1, 2);
        let heads = |t: Tensor| t.view([b, -1, 1, c]).transpose(1, 2); // (b, 1, hw, c)
        let q = heads(self.to_q.forward(&normed));
        let k = heads(self.to_k.forward(&normed));
        let v = heads(self.to_v.forward(&normed));
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let a = a.transpose(1, 2).reshape([b, -1, c]).to_kind(q.kind());
        let out = self
            .to_out
            .forward(&a)
            .transpose(-1, -2)
            .reshape([b, c, h, w]);
        (out + x) / 1.0 // residual_connection, rescale_output_factor
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, optional attention, resnet.
pub(super) struct MidBlock {
    attention: Option<SpatialAttention>,
    resnets: [ResnetBlock; 2],
}

impl MidBlock {
    /// Builds the block on `c` channels under `vb` (`mid_block`); diffusers
    /// registers `attentions` before `resnets`, and so do we.
    pub(super) fn new(vb: &VarBuilder, c: i64, groups: i64, add_attention: bool) -> Result<Self> {
        let attention = if add_attention {
            Some(SpatialAttention::new(
                &vb.pp("attentions").pp(0),
                c,
                groups,
            )?)
        } else {
            None
        };
        let resnet = |j: usize| ResnetBlock::new(&vb.pp("resnets").pp(j), c, c, groups);
        Ok(MidBlock {
            attention,
            resnets: [resnet(0)?, resnet(1)?],
        })
    }

    /// (b, c, h, w) -> (b, c, h, w)
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x);
        if let Some(attn) = &self.attention {
            h = attn.forward(&h);
        }
        self.resnets[1].forward(&h)
    }
}
