//! The `AutoencoderKL` decoder: conv_in, a mid block (resnet, attention, resnet),
//! up blocks of resnets with nearest-neighbour upsampling, and the output head.

use tch::Tensor;

use super::blocks::{MidBlock, ResnetBlock, EPS};
use super::config::VaeConfig;
use crate::error::Result;
use crate::models::flux::Trace;
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::VarBuilder;

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
    mid_block: MidBlock,
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
        let mid_block = MidBlock::new(&mid, top, g, cfg.mid_block_add_attention)?;
        let conv_norm_out = GroupNorm::new(&vb.pp("conv_norm_out"), g, chans[0], EPS)?;
        let conv_out = Conv2d::new(&vb.pp("conv_out"), chans[0], cfg.out_channels, 3, 1)?;
        Ok(Decoder {
            conv_in,
            mid_block,
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
        h = self.mid_block.forward(&h);
        rec("decoder.mid_block".into(), &h);
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = block.forward(&h);
            rec(format!("decoder.up_blocks.{i}"), &h);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}
