//! `vae/config.json` of a diffusers `AutoencoderKL`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::json::read_json;

/// Hyper-parameters of an `AutoencoderKL` (diffusers names).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct VaeConfig {
    /// Image channels read by the encoder.
    #[serde(default = "three")]
    pub in_channels: i64,
    /// Image channels produced by the decoder.
    #[serde(default = "three")]
    pub out_channels: i64,
    /// Channels per resolution level, from the highest resolution.
    pub block_out_channels: Vec<i64>,
    /// Resnets per encoder block (the decoder uses one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Latent channels (16 for FLUX).
    #[serde(default = "four")]
    pub latent_channels: i64,
    /// Groups of every GroupNorm.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: i64,
    /// Latent scaling: `latents = (z - shift) * scale` for the diffusion model.
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    /// Latent shift (FLUX: 0.1159; absent for SD VAEs).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether a 1x1 `quant_conv` follows the encoder (diffusers' default; FLUX: no).
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether a 1x1 `post_quant_conv` precedes the decoder.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid block has its attention layer.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Activation (only `silu` is supported).
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Down block types (only `DownEncoderBlock2D`).
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Up block types (only `UpDecoderBlock2D`).
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

fn three() -> i64 {
    3
}
fn one() -> usize {
    1
}
fn four() -> i64 {
    4
}
fn thirty_two() -> i64 {
    32
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}

/// Every entry of `types` (when given) is `want`, one per resolution level.
fn check_block_types(
    path: &Path,
    field: &str,
    types: &[String],
    want: &str,
    levels: usize,
) -> Result<()> {
    if let Some(t) = types.iter().find(|t| *t != want) {
        return Err(Error::config(path, field, format!("`{t}` is unsupported")));
    }
    if !types.is_empty() && types.len() != levels {
        return Err(Error::config(
            path,
            field,
            "length differs from block_out_channels",
        ));
    }
    Ok(())
}

impl VaeConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: VaeConfig = read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the values this implementation supports.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.block_out_channels.is_empty() {
            return Err(Error::config(
                path,
                "block_out_channels",
                "must not be empty",
            ));
        }
        if self.act_fn != "silu" {
            return Err(Error::config(
                path,
                "act_fn",
                format!("`{}` is unsupported (only silu)", self.act_fn),
            ));
        }
        check_block_types(
            path,
            "down_block_types",
            &self.down_block_types,
            "DownEncoderBlock2D",
            self.block_out_channels.len(),
        )?;
        check_block_types(
            path,
            "up_block_types",
            &self.up_block_types,
            "UpDecoderBlock2D",
            self.block_out_channels.len(),
        )?;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c % self.norm_num_groups != 0)
        {
            return Err(Error::config(
                path,
                "norm_num_groups",
                format!("{} does not divide {c}", self.norm_num_groups),
            ));
        }
        Ok(())
    }

    /// Spatial down-sampling factor between image and latent (8 for 4 levels).
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }

    /// FLUX.1's VAE.
    pub fn flux1() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
            act_fn: silu(),
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        }
    }

    /// A tiny FLUX-layout VAE for tests and the CPU demo.
    pub fn tiny() -> Self {
        VaeConfig {
            block_out_channels: vec![8, 8, 16, 16],
            layers_per_block: 1,
            norm_num_groups: 4,
            ..Self::flux1()
        }
    }
}
