//! The FLUX VAE (`AutoencoderKL`: decoder, and the encoder when asked for) and
//! the latent layout FLUX uses: 2x2 patch packing to 64-channel tokens and the
//! position ids.

mod blocks;
pub mod config;
mod decoder;
mod encoder;

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

/// Moved to [`crate::io::image::to_uint8`] (a pixel conversion, not the VAE's).
pub use crate::io::image::to_uint8;
pub use config::VaeConfig;
pub use decoder::Decoder;
pub use encoder::{Encoder, LatentDistribution};

use crate::error::{Error, Result};
use crate::models::flux::Trace;
use crate::nn::{cast, upcast_kind, Conv2d};
use crate::weights::{Checkpoint, ParamStore, Source, VarBuilder};

/// Which halves of the autoencoder are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeParts {
    /// Only the decoder side (sampling, training with rewards); encoder weights are ignored.
    Decoder,
    /// Encoder and decoder (pretraining, encoding images); every weight must be used.
    EncoderDecoder,
}

/// The encoder side: the encoder and the optional 1x1 `quant_conv`.
struct EncoderSide {
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
}

/// An `AutoencoderKL`: decodes latents into images and, when built with its
/// encoder, encodes images into latent distributions.
pub struct Vae {
    config: VaeConfig,
    encoder: Option<EncoderSide>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    params: ParamStore,
    kind: Kind,
}

impl Vae {
    /// Builds the decoder side with parameters from `source`.
    pub fn new(config: VaeConfig, source: Source, kind: Kind, device: Device) -> Result<Self> {
        Self::with_parts(config, VaeParts::Decoder, source, kind, device)
    }

    /// Builds `parts` with parameters from `source`, in diffusers' registration
    /// order (encoder, decoder, quant_conv, post_quant_conv). With
    /// [`VaeParts::EncoderDecoder`] a checkpoint must hold nothing else.
    pub fn with_parts(
        config: VaeConfig,
        parts: VaeParts,
        source: Source,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let params = ParamStore::new();
        let vb = VarBuilder::new(source, &params, kind, device);
        let encoder = match parts {
            VaeParts::Decoder => None,
            VaeParts::EncoderDecoder => Some(Encoder::new(&vb.pp("encoder"), &config)?),
        };
        let decoder = Decoder::new(&vb.pp("decoder"), &config)?;
        let c = config.latent_channels;
        let quant_conv = match &encoder {
            Some(_) if config.use_quant_conv => {
                Some(Conv2d::new(&vb.pp("quant_conv"), 2 * c, 2 * c, 1, 0)?)
            }
            _ => None,
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::new(&vb.pp("post_quant_conv"), c, c, 1, 0)?)
        } else {
            None
        };
        if let (VaeParts::EncoderDecoder, Source::Checkpoint(ck)) = (parts, source) {
            params.check_all_used(ck)?;
        }
        Ok(Vae {
            config,
            encoder: encoder.map(|encoder| EncoderSide {
                encoder,
                quant_conv,
            }),
            post_quant_conv,
            decoder,
            params,
            kind,
        })
    }

    /// Loads a diffusers `vae/` directory (the encoder weights are ignored).
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        Self::from_dir_with(dir, VaeParts::Decoder, kind, device)
    }

    /// Loads `parts` of a diffusers `vae/` directory.
    pub fn from_dir_with(dir: &Path, parts: VaeParts, kind: Kind, device: Device) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open_dir(dir, "diffusion_pytorch_model")?;
        Self::with_parts(config, parts, Source::Checkpoint(&ck), kind, device)
    }

    /// Writes a diffusers `vae/` directory (`config.json` and
    /// `diffusion_pytorch_model.safetensors` with every parameter built), each file atomically.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut cfg = serde_json::to_value(&self.config).expect("serialisable config");
        cfg["_class_name"] = "AutoencoderKL".into();
        cfg["_diffusers_version"] = "0.32.0".into();
        let text = serde_json::to_string_pretty(&cfg).expect("json");
        crate::io::atomic::write_bytes_atomic(&dir.join("config.json"), text.as_bytes())?;
        let params: Vec<(String, Tensor)> = self
            .params
            .named()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        crate::io::safetensors::write_safetensors(
            dir.join("diffusion_pytorch_model.safetensors"),
            &params,
            &meta,
        )
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
    ///
    /// The latents are cast to the VAE's dtype; the image comes out in float32
    /// (float64 for a float64 VAE), whatever that dtype is.
    pub fn decode(&self, z: &Tensor, trace: Option<&mut Trace>) -> Tensor {
        let z = cast(z, self.kind);
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&z),
            None => z,
        };
        let image = self.decoder.forward(&z, trace);
        cast(&image, upcast_kind(self.kind))
    }

    /// The parameters' dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Image (b, 3, H, W) in [-1, 1] -> the latent distribution (b, c, H/8, W/8)
    /// (moments of the encoder, through `quant_conv` when the model has one).
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let side = self.encoder.as_ref().ok_or_else(|| {
            Error::Input("this VAE was built without its encoder (VaeParts::Decoder)".into())
        })?;
        let moments = side.encoder.forward(image); // (b, 2c, h, w)
        let moments = match &side.quant_conv {
            Some(conv) => conv.forward(&moments),
            None => moments,
        };
        Ok(LatentDistribution::from_moments(&moments))
    }

    /// Image (b, 3, H, W) in [-1, 1] -> diffusion-space latents: the mean of the
    /// latent distribution, normalised ([`Vae::normalize`]).
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        Ok(self.normalize(&self.encode(image)?.mean))
    }

    /// VAE latents -> diffusion-space latents: `(z - shift_factor) * scaling_factor`
    /// (the inverse of [`Vae::denormalize`]).
    pub fn normalize(&self, z: &Tensor) -> Tensor {
        (z - self.config.shift_factor.unwrap_or(0.0)) * self.config.scaling_factor
    }

    /// Sets the latent normalisation (`shift_factor`, `scaling_factor`), e.g.
    /// from the statistics of a freshly trained VAE's latents.
    pub fn set_latent_scaling(&mut self, shift_factor: f64, scaling_factor: f64) {
        self.config.shift_factor = Some(shift_factor);
        self.config.scaling_factor = scaling_factor;
    }

    /// Diffusion-space latents -> VAE latents: `z / scaling_factor + shift_factor`.
    pub fn denormalize(&self, latents: &Tensor) -> Tensor {
        latents / self.config.scaling_factor + self.config.shift_factor.unwrap_or(0.0)
    }
}

impl crate::models::LatentDecoder for Vae {
    fn latent_shape(&self, height: i64, width: i64) -> [i64; 3] {
        let factor = 1 << (self.config.block_out_channels.len() - 1); // 8 for FLUX's
        [self.config.latent_channels, height / factor, width / factor]
    }

    fn decode_latents(&self, latents: &Tensor) -> Tensor {
        self.decode(&self.denormalize(latents), None)
    }

    fn decoder_parameters(&self) -> Vec<(String, Tensor)> {
        self.parameters()
    }
}
