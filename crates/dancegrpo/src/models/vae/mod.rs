//! The FLUX VAE (`AutoencoderKL` decoder) and the latent layout FLUX uses:
//! 2x2 patch packing to 64-channel tokens and the position ids.

pub mod config;
mod decoder;
pub mod packing;

use std::path::Path;

use tch::{Device, Kind, Tensor};

pub use config::VaeConfig;
pub use decoder::Decoder;

use crate::error::Result;
use crate::models::flux::Trace;
use crate::nn::Conv2d;
use crate::weights::{Checkpoint, ParamStore, Source, VarBuilder};

/// An `AutoencoderKL` used for decoding latents into images.
pub struct Vae {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    params: ParamStore,
}

impl Vae {
    /// Builds the decoder side with parameters from `source`.
    pub fn new(config: VaeConfig, source: Source, kind: Kind, device: Device) -> Result<Self> {
        let params = ParamStore::new();
        let vb = VarBuilder::new(source, &params, kind, device);
        let decoder = Decoder::new(&vb.pp("decoder"), &config)?;
        let c = config.latent_channels;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::new(&vb.pp("post_quant_conv"), c, c, 1, 0)?)
        } else {
            None
        };
        Ok(Vae {
            config,
            post_quant_conv,
            decoder,
            params,
        })
    }

    /// Loads a diffusers `vae/` directory (the encoder weights are ignored).
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open_dir(dir, "diffusion_pytorch_model")?;
        Self::new(config, Source::Checkpoint(&ck), kind, device)
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Parameters with their checkpoint names.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params.named()
    }

    /// VAE latents (b, c, h, w) -> image (b, 3, 8h, 8w) in about [-1, 1].
    pub fn decode(&self, z: &Tensor, trace: Option<&mut Trace>) -> Tensor {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z.shallow_clone(),
        };
        self.decoder.forward(&z, trace)
    }

    /// Diffusion-space latents -> VAE latents: `z / scaling_factor + shift_factor`.
    pub fn denormalize(&self, latents: &Tensor) -> Tensor {
        latents / self.config.scaling_factor + self.config.shift_factor.unwrap_or(0.0)
    }
}

/// Image in [-1, 1] (b, 3, H, W) -> uint8 (b, H, W, 3): `clamp(x/2 + 0.5, 0, 1) * 255`,
/// rounded half to even (as numpy's `round`).
pub fn to_uint8(image: &Tensor) -> Tensor {
    let x = (image * 0.5 + 0.5)
        .clamp(0.0, 1.0)
        .permute([0, 2, 3, 1])
        .to_kind(Kind::Float);
    (x * 255.0).round().to_kind(Kind::Uint8)
}
