//! `transformer/config.json` of a diffusers `FluxTransformer2DModel`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::json::read_json;

/// Architecture hyper-parameters of a FLUX.1 transformer (diffusers names).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct FluxConfig {
    /// Must be 1 (FLUX packs 2x2 latent patches outside the model).
    #[serde(default = "one")]
    pub patch_size: i64,
    /// Channels of a packed latent token (64 for FLUX.1).
    #[serde(default = "sixty_four")]
    pub in_channels: i64,
    /// Output channels (defaults to `in_channels`).
    #[serde(default)]
    pub out_channels: Option<i64>,
    /// Number of double-stream (joint attention) blocks.
    #[serde(default = "nineteen")]
    pub num_layers: usize,
    /// Number of single-stream blocks.
    #[serde(default = "thirty_eight")]
    pub num_single_layers: usize,
    /// Width of one attention head.
    #[serde(default = "one_twenty_eight")]
    pub attention_head_dim: i64,
    /// Number of attention heads.
    #[serde(default = "twenty_four")]
    pub num_attention_heads: i64,
    /// Width of the T5 text embeddings.
    #[serde(default = "four_k")]
    pub joint_attention_dim: i64,
    /// Width of the pooled CLIP embedding.
    #[serde(default = "seven_six_eight")]
    pub pooled_projection_dim: i64,
    /// Whether a guidance embedding exists (FLUX.1-dev: yes, schnell: no).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Rotary dimensions per position axis; they sum to `attention_head_dim`.
    #[serde(default = "rope_dims")]
    pub axes_dims_rope: Vec<i64>,
}

fn one() -> i64 {
    1
}
fn sixty_four() -> i64 {
    64
}
fn nineteen() -> usize {
    19
}
fn thirty_eight() -> usize {
    38
}
fn one_twenty_eight() -> i64 {
    128
}
fn twenty_four() -> i64 {
    24
}
fn four_k() -> i64 {
    4096
}
fn seven_six_eight() -> i64 {
    768
}
fn rope_dims() -> Vec<i64> {
    vec![16, 56, 56]
}

impl FluxConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        if let Some(class) = value.get("_class_name").and_then(|c| c.as_str()) {
            if class != "FluxTransformer2DModel" {
                return Err(Error::config(
                    path,
                    "_class_name",
                    format!("`{class}` is not FluxTransformer2DModel"),
                ));
            }
        }
        let cfg: FluxConfig = crate::io::json::from_value(value, path, "")?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks values this implementation supports; `path` names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.patch_size != 1 {
            return Err(Error::config(
                path,
                "patch_size",
                format!("{} is unsupported (only 1)", self.patch_size),
            ));
        }
        if self.axes_dims_rope.iter().sum::<i64>() != self.attention_head_dim {
            return Err(Error::config(
                path,
                "axes_dims_rope",
                format!(
                    "{:?} must sum to attention_head_dim {}",
                    self.axes_dims_rope, self.attention_head_dim
                ),
            ));
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 != 0 || *d <= 0) {
            return Err(Error::config(
                path,
                "axes_dims_rope",
                "every entry must be positive and even",
            ));
        }
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ] {
            if v <= 0 {
                return Err(Error::config(path, field, format!("{v} must be positive")));
            }
        }
        Ok(())
    }

    /// Width of the residual stream: `heads * head_dim`.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels per token.
    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// FLUX.1-dev: 19 double and 38 single blocks, width 3072, guidance embedding.
    pub fn flux1_dev() -> Self {
        FluxConfig {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: rope_dims(),
        }
    }

    /// FLUX.1-schnell: as dev, without the guidance embedding.
    pub fn flux1_schnell() -> Self {
        FluxConfig {
            guidance_embeds: false,
            ..Self::flux1_dev()
        }
    }

    /// A tiny configuration for tests and the CPU demo.
    pub fn tiny() -> Self {
        FluxConfig {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 1,
            num_single_layers: 2,
            attention_head_dim: 16,
            num_attention_heads: 2,
            joint_attention_dim: 32,
            pooled_projection_dim: 4,
            guidance_embeds: true,
            axes_dims_rope: vec![4, 6, 6],
        }
    }
}
