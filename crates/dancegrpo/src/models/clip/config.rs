//! `config.json` of a transformers `CLIPModel`: `text_config`, `vision_config`,
//! `projection_dim`. Missing values take transformers' defaults; unknown fields
//! are ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::json::read_json;
use crate::models::clip_text::{ClipActivation, ClipTextConfig};

/// The vision tower (`CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ClipVisionConfig {
    /// Width of the residual stream.
    #[serde(default = "d768")]
    pub hidden_size: i64,
    /// Hidden width of the MLP.
    #[serde(default = "d3072")]
    pub intermediate_size: i64,
    /// Number of encoder layers.
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    #[serde(default = "d12i")]
    pub num_attention_heads: i64,
    /// Input channels (3).
    #[serde(default = "d3")]
    pub num_channels: i64,
    /// Input resolution (square).
    #[serde(default = "d224")]
    pub image_size: i64,
    /// Patch size (square, stride = kernel).
    #[serde(default = "d32")]
    pub patch_size: i64,
    /// MLP activation name.
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn d3() -> i64 {
    3
}
fn d12() -> usize {
    12
}
fn d12i() -> i64 {
    12
}
fn d32() -> i64 {
    32
}
fn d224() -> i64 {
    224
}
fn d768() -> i64 {
    768
}
fn d3072() -> i64 {
    3072
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}
fn logit_scale_init() -> f64 {
    2.6592
}

impl ClipVisionConfig {
    /// The MLP activation.
    pub fn activation(&self) -> Option<ClipActivation> {
        ClipActivation::from_name(&self.hidden_act)
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Checks the values this implementation supports (`path` names errors).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let f = |field: &str| format!("vision_config.{field}");
        if self.activation().is_none() {
            return Err(Error::config(
                path,
                &f("hidden_act"),
                format!(
                    "`{}` is unsupported (quick_gelu, gelu, gelu_new)",
                    self.hidden_act
                ),
            ));
        }
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ] {
            if v <= 0 {
                return Err(Error::config(
                    path,
                    &f(field),
                    format!("{v} must be positive"),
                ));
            }
        }
        if self.num_channels != 3 {
            return Err(Error::config(
                path,
                &f("num_channels"),
                format!("{} is unsupported (RGB images: 3)", self.num_channels),
            ));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::config(
                path,
                &f("num_attention_heads"),
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.image_size % self.patch_size != 0 {
            return Err(Error::config(
                path,
                &f("patch_size"),
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::config(
                path,
                &f("layer_norm_eps"),
                format!("{} must be positive", self.layer_norm_eps),
            ));
        }
        Ok(())
    }
}

/// A whole `CLIPModel`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClipConfig {
    /// The text tower.
    pub text_config: ClipTextConfig,
    /// The vision tower.
    pub vision_config: ClipVisionConfig,
    /// Width of the joint embedding space.
    pub projection_dim: i64,
    /// Initial `logit_scale` of a seeded model (the loaded value wins).
    pub logit_scale_init_value: f64,
}

impl ClipConfig {
    /// Reads and validates `config.json` (`model_type` must be `clip` when given).
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        match value.get("model_type").and_then(|c| c.as_str()) {
            None | Some("clip") => {}
            Some(other) => {
                return Err(Error::config(
                    path,
                    "model_type",
                    format!("`{other}` is not a CLIP model (expected `clip`)"),
                ))
            }
        }
        let sub = |key: &str| -> Result<serde_json::Value> {
            match value.get(key) {
                None | Some(serde_json::Value::Null) => Ok(serde_json::json!({})),
                Some(v) if v.is_object() => Ok(v.clone()),
                Some(v) => Err(Error::config(
                    path,
                    key,
                    format!("expected an object, found {v}"),
                )),
            }
        };
        use crate::io::json::from_value;
        let text_config: ClipTextConfig = from_value(sub("text_config")?, path, "text_config")?;
        let vision_config: ClipVisionConfig =
            from_value(sub("vision_config")?, path, "vision_config")?;
        let num = |key: &str| value.get(key).and_then(|v| v.as_f64());
        let cfg = ClipConfig {
            text_config,
            vision_config,
            projection_dim: num("projection_dim").map_or(512, |v| v as i64),
            logit_scale_init_value: num("logit_scale_init_value").unwrap_or(logit_scale_init()),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks both towers and the projection width.
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.text_config.validate(path)?;
        self.vision_config.validate(path)?;
        if self.projection_dim <= 0 {
            return Err(Error::config(
                path,
                "projection_dim",
                format!("{} must be positive", self.projection_dim),
            ));
        }
        Ok(())
    }

    /// The `config.json` of this configuration (what [`ClipConfig::from_file`] reads).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": self.text_config,
            "vision_config": self.vision_config,
        })
    }

    /// A tiny model for tests and benchmarks: the fixtures' tiny text tower
    /// (width 4), a 2-layer ViT of width 32 on 32x32 inputs in 8x8 patches,
    /// projection width 16.
    pub fn tiny() -> Self {
        ClipConfig {
            text_config: ClipTextConfig::tiny(),
            vision_config: ClipVisionConfig {
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                num_channels: 3,
                image_size: 32,
                patch_size: 8,
                hidden_act: quick_gelu(),
                layer_norm_eps: eps(),
            },
            projection_dim: 16,
            logit_scale_init_value: logit_scale_init(),
        }
    }
}
