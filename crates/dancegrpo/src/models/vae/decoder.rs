//! The `AutoencoderKL` decoder: conv_in, a mid block (resnet, attention, resnet),
//! up blocks of resnets with nearest-neighbour upsampling, and the output head.

use tch::Tensor;

use super::config::VaeConfig;
use crate::error::Result;
use crate::models::flux::Trace;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::weights::VarBuilder;

const EPS: f64 = 1e-6;

/// `ResnetBlock2D` without time embedding.
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: &VarBuilder, in_c: i64, out_c: i64, groups: i64) -> Result<Self> {
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
    fn forward(&self, x: &Tensor) -> Tensor {
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

/// `UpDecoderBlock2D`: resnets then an optional 2x nearest upsample + conv.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample_conv: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h);
        }
        if let Some(conv) = &self.upsample_conv {
            h = conv.forward(&h.upsample_nearest2d_vec(None::<&[i64]>, &[2.0, 2.0][..]));
        }
        h
    }
}

/// The decoder of an `AutoencoderKL` (keys under `decoder.`).
pub struct Decoder {
    conv_in: Conv2d,
    mid_resnets: Vec<ResnetBlock>,
    mid_attention: Option<SpatialAttention>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Builds the decoder described by `cfg` under `vb` (`decoder`).
    pub fn new(vb: &VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let chans = &cfg.block_out_channels;
        let (g, top) = (
            cfg.norm_num_groups,
            *chans.last().expect("validated non-empty"),
        );
        let conv_in = Conv2d::new(&vb.pp("conv_in"), cfg.latent_channels, top, 3, 1)?;
        let mid = vb.pp("mid_block");
        let up_blocks_vb = vb.pp("up_blocks");
        // diffusers registers up_blocks before mid_block; keep its parameter order.
        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &out) in chans.iter().rev().enumerate() {
            let bvb = up_blocks_vb.pp(i);
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        &bvb.pp("resnets").pp(j),
                        if j == 0 { prev } else { out },
                        out,
                        g,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let last = i + 1 == chans.len();
            let upsample_conv = if last {
                None
            } else {
                Some(Conv2d::new(
                    &bvb.pp("upsamplers").pp(0).pp("conv"),
                    out,
                    out,
                    3,
                    1,
                )?)
            };
            up_blocks.push(UpBlock {
                resnets,
                upsample_conv,
            });
            prev = out;
        }
        let mid_resnets = (0..2)
            .map(|j| ResnetBlock::new(&mid.pp("resnets").pp(j), top, top, g))
            .collect::<Result<_>>()?;
        let mid_attention = if cfg.mid_block_add_attention {
            Some(SpatialAttention::new(&mid.pp("attentions").pp(0), top, g)?)
        } else {
            None
        };
        let conv_norm_out = GroupNorm::new(&vb.pp("conv_norm_out"), g, chans[0], EPS)?;
        let conv_out = Conv2d::new(&vb.pp("conv_out"), chans[0], cfg.out_channels, 3, 1)?;
        Ok(Decoder {
            conv_in,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Latents (b, latent_channels, h, w) -> image (b, out_channels, 8h, 8w) in about [-1, 1].
    pub fn forward(&self, z: &Tensor, mut trace: Option<&mut Trace>) -> Tensor {
        let mut rec = |name: String, t: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.insert(name, t.detach().copy());
            }
        };
        let mut h = self.conv_in.forward(z);
        rec("decoder.conv_in".into(), &h);
        h = self.mid_resnets[0].forward(&h);
        if let Some(attn) = &self.mid_attention {
            h = attn.forward(&h);
        }
        h = self.mid_resnets[1].forward(&h);
        rec("decoder.mid_block".into(), &h);
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = block.forward(&h);
            rec(format!("decoder.up_blocks.{i}"), &h);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}
