//! The `AutoencoderKL` encoder: conv_in, down blocks of resnets each followed
//! (but the last) by a stride-2 convolution, a mid block (resnet, attention,
//! resnet) and the output head producing the moments `(mean, logvar)`.

use tch::Tensor;

use super::blocks::{MidBlock, ResnetBlock, EPS};
use super::config::VaeConfig;
use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::VarBuilder;

/// `Downsample2D` with a convolution and `padding=0`: zero padding of one
/// column on the right and one row at the bottom (`F.pad(x, (0, 1, 0, 1))`),
/// then a 3x3 convolution of stride 2 without padding.
pub(super) struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    /// Builds the convolution on `c` channels under `vb` (`downsamplers.0`).
    pub(super) fn new(vb: &VarBuilder, c: i64) -> Result<Self> {
        Ok(Downsample {
            conv: Conv2d::strided(&vb.pp("conv"), c, c, 3, 2, 0)?,
        })
    }

    /// (b, c, h, w) -> (b, c, h/2, w/2) for even `h`, `w` (`floor(h/2)` in general).
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        let padded = x.constant_pad_nd([0, 1, 0, 1]); // (b, c, h + 1, w + 1)
        self.conv.forward(&padded)
    }
}

/// `DownEncoderBlock2D`: resnets, then an optional downsample.
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    fn new(vb: &VarBuilder, cfg: &VaeConfig, in_c: i64, out_c: i64, last: bool) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let resnets = (0..cfg.layers_per_block)
            .map(|j| {
                let c = if j == 0 { in_c } else { out_c };
                ResnetBlock::new(&vb.pp("resnets").pp(j), c, out_c, g)
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample = if last {
            None
        } else {
            Some(Downsample::new(&vb.pp("downsamplers").pp(0), out_c)?)
        };
        Ok(DownBlock {
            resnets,
            downsample,
        })
    }

    /// (b, in, h, w) -> (b, out, h/2, w/2), or (b, out, h, w) for the last block.
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h);
        }
        match &self.downsample {
            Some(d) => d.forward(&h),
            None => h,
        }
    }
}

/// The encoder of an `AutoencoderKL` (keys under `encoder.`).
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Builds the encoder described by `cfg` under `vb` (`encoder`), in
    /// diffusers' registration order.
    pub fn new(vb: &VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let chans = &cfg.block_out_channels;
        let (g, top) = (
            cfg.norm_num_groups,
            *chans.last().expect("validated non-empty"),
        );
        let conv_in = Conv2d::new(&vb.pp("conv_in"), cfg.in_channels, chans[0], 3, 1)?;
        let mut down_blocks = Vec::with_capacity(chans.len());
        let mut prev = chans[0];
        for (i, &out) in chans.iter().enumerate() {
            let last = i + 1 == chans.len();
            down_blocks.push(DownBlock::new(
                &vb.pp("down_blocks").pp(i),
                cfg,
                prev,
                out,
                last,
            )?);
            prev = out;
        }
        let mid_block = MidBlock::new(&vb.pp("mid_block"), top, g, cfg.mid_block_add_attention)?;
        let conv_norm_out = GroupNorm::new(&vb.pp("conv_norm_out"), g, top, EPS)?;
        let conv_out = Conv2d::new(&vb.pp("conv_out"), top, 2 * cfg.latent_channels, 3, 1)?;
        Ok(Encoder {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
        })
    }

    /// Image (b, in_channels, H, W) in [-1, 1] -> moments (b, 2 * latent_channels, H/f, W/f)
    /// for the down-sampling factor `f` (8 with four levels): mean channels first, then logvar.
    pub fn forward(&self, image: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(image); // (b, c0, H, W)
        for block in &self.down_blocks {
            h = block.forward(&h);
        }
        h = self.mid_block.forward(&h); // (b, top, H/f, W/f)
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// diffusers' `DiagonalGaussianDistribution` over the latents.
pub struct LatentDistribution {
    /// Mean (b, c, h, w).
    pub mean: Tensor,
    /// Log-variance (b, c, h, w), clamped to [-30, 20].
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// Splits moments (b, 2c, h, w) into mean and log-variance along the channels.
    pub fn from_moments(moments: &Tensor) -> Self {
        let parts = moments.chunk(2, 1);
        LatentDistribution {
            mean: parts[0].shallow_clone(),
            logvar: parts[1].clamp(-30.0, 20.0),
        }
    }

    /// `mean + exp(logvar / 2) * noise` (reparameterised: differentiable in the moments).
    pub fn sample(&self, noise: &Tensor) -> Tensor {
        &self.mean + (&self.logvar * 0.5).exp() * noise
    }

    /// KL divergence to the standard normal per sample, summed over `(c, h, w)`:
    /// `0.5 * sum(mean^2 + var - 1 - logvar)`, shape `(b,)`.
    pub fn kl(&self) -> Tensor {
        let terms = self.mean.square() + self.logvar.exp() - 1.0 - &self.logvar;
        terms.sum_dim_intlist([1, 2, 3].as_slice(), false, None::<tch::Kind>) * 0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{Checkpoint, ParamStore, Source};
    use tch::{Device, Kind};

    /// A 1-channel downsample whose kernel is 1 at tap `(ky, kx)`, 0 elsewhere, no bias.
    fn one_tap_downsample(ky: i64, kx: i64) -> Downsample {
        let w = Tensor::zeros([1, 1, 3, 3], (Kind::Float, Device::Cpu));
        let _ = w.get(0).get(0).get(ky).get(kx).fill_(1.0);
        let b = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let ck = Checkpoint::from_tensors(
            "test".into(),
            vec![("conv.weight".into(), w), ("conv.bias".into(), b)],
        )
        .unwrap();
        let store = ParamStore::new();
        let vb = VarBuilder::new(Source::Checkpoint(&ck), &store, Kind::Float, Device::Cpu);
        Downsample::new(&vb, 1).unwrap()
    }

    #[test]
    fn downsample_pads_right_and_bottom_only() {
        // x[r, c] = 4r + c + 1 on a 4x4 grid; output (i, j) with tap (ky, kx)
        // reads the padded input at (2i + ky, 2j + kx).
        let x = Tensor::arange(16, (Kind::Float, Device::Cpu)).view([1, 1, 4, 4]) + 1.0;
        let run = |ky, kx| -> Vec<f32> {
            let y = tch::no_grad(|| one_tap_downsample(ky, kx).forward(&x));
            assert_eq!(y.size(), [1, 1, 2, 2]);
            Vec::try_from(y.flatten(0, -1)).unwrap()
        };
        // top-left tap: (0,0) (0,2) (2,0) (2,2), no padding involved
        assert_eq!(run(0, 0), [1.0, 3.0, 9.0, 11.0]);
        // bottom-right tap: (2,2)=11, then row/column 4 is the zero padding
        assert_eq!(run(2, 2), [11.0, 0.0, 0.0, 0.0]);
        // middle-right tap: (1,2)=7, (1,4)=pad, (3,2)=15, (3,4)=pad
        assert_eq!(run(1, 2), [7.0, 0.0, 15.0, 0.0]);
        // nothing is padded on the left or top: tap (0,0) never reads a zero
        let odd = Tensor::ones([1, 1, 5, 5], (Kind::Float, Device::Cpu));
        let y = tch::no_grad(|| one_tap_downsample(0, 0).forward(&odd));
        assert_eq!(y.size(), [1, 1, 2, 2]);
        assert_eq!(y.sum(Kind::Float).double_value(&[]), 4.0);
    }

    #[test]
    fn encoder_output_shapes_and_names() {
        let cfg = VaeConfig::tiny();
        let store = ParamStore::new();
        let vb = VarBuilder::new(Source::Seeded(1), &store, Kind::Float, Device::Cpu);
        let enc = Encoder::new(&vb.pp("encoder"), &cfg).unwrap();
        let x = crate::rng::Philox::new(2, 0).normal_tensor(&[2, 3, 32, 48]);
        let m = tch::no_grad(|| enc.forward(&x));
        assert_eq!(m.size(), [2, 32, 4, 6]);
        let names: Vec<String> = store.named().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "encoder.conv_in.weight");
        assert!(names.contains(&"encoder.down_blocks.0.downsamplers.0.conv.weight".into()));
        assert!(!names
            .iter()
            .any(|n| n.starts_with("encoder.down_blocks.3.downsamplers")));
        assert!(names.contains(&"encoder.down_blocks.2.resnets.0.conv_shortcut.weight".into()));
        assert!(names.contains(&"encoder.mid_block.attentions.0.to_out.0.weight".into()));
        assert_eq!(names.last().unwrap(), "encoder.conv_out.bias");
    }

    #[test]
    fn kl_is_zero_at_the_prior_and_sampling_reparameterises() {
        let zeros = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let d = LatentDistribution::from_moments(&zeros);
        assert_eq!(d.kl().double_value(&[0]), 0.0);
        let moments = Tensor::cat(
            &[zeros.ones_like() * 2.0, zeros.ones_like() * 2f64.ln() * 2.0],
            1,
        );
        let d = LatentDistribution::from_moments(&moments);
        // mean 2, var 4: 0.5 * (4 + 4 - 1 - ln 4) for each of the 4x2x2 elements
        let want = 0.5 * (4.0 + 4.0 - 1.0 - 4f64.ln()) * 16.0;
        assert!((d.kl().double_value(&[0]) - want).abs() < 1e-4);
        let s = d.sample(&zeros.ones_like());
        assert!((s.double_value(&[0, 0, 0, 0]) - 4.0).abs() < 1e-6); // 2 + sqrt(4) * 1
    }
}
