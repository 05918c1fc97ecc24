//! `config.json` of a transformers `CLIPTextModel` (FLUX.1 `text_encoder`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::json::read_json;

/// The MLP activation (transformers `hidden_act` names this implementation supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluNew,
}

impl ClipActivation {
    /// Parses a transformers activation name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(ClipActivation::QuickGelu),
            "gelu" => Some(ClipActivation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(ClipActivation::GeluNew),
            _ => None,
        }
    }
}

/// Architecture hyper-parameters of a CLIP text transformer (transformers names).
/// Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: i64,
    /// Width of the residual stream.
    #[serde(default = "default_hidden")]
    pub hidden_size: i64,
    /// Hidden width of the MLP.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: i64,
    /// Number of encoder layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    #[serde(default = "default_heads")]
    pub num_attention_heads: i64,
    /// Number of position embeddings (the longest input).
    #[serde(default = "default_positions")]
    pub max_position_embeddings: i64,
    /// MLP activation name.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// End-of-text id; `2` selects the legacy pooling at `argmax(input_ids)`.
    /// Absent from the file: 49407, as transformers 4.46 (`CLIPTextConfig`).
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

fn default_vocab() -> i64 {
    49408
}
fn default_hidden() -> i64 {
    512
}
fn default_intermediate() -> i64 {
    2048
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> i64 {
    8
}
fn default_positions() -> i64 {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    49407
}

impl ClipTextConfig {
    /// Reads and validates `config.json`: a `CLIPTextModel` config, or the
    /// `text_config` of a full `CLIPModel` config.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut value: serde_json::Value = read_json(path)?;
        match value.get("model_type").and_then(|c| c.as_str()) {
            None | Some("clip_text_model") => {}
            Some("clip") => {
                value = value.get("text_config").cloned().ok_or_else(|| {
                    Error::config(path, "text_config", "missing in a `clip` config")
                })?
            }
            Some(other) => {
                return Err(Error::config(
                    path,
                    "model_type",
                    format!("`{other}` is not a CLIP text model"),
                ))
            }
        }
        let cfg: ClipTextConfig = crate::io::json::from_value(value, path, "")?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The MLP activation.
    pub fn activation(&self) -> Option<ClipActivation> {
        ClipActivation::from_name(&self.hidden_act)
    }

    /// Checks values this implementation supports; `path` names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.activation().is_none() {
            return Err(Error::config(
                path,
                "hidden_act",
                format!(
                    "`{}` is unsupported (quick_gelu, gelu, gelu_new)",
                    self.hidden_act
                ),
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v <= 0 {
                return Err(Error::config(path, field, format!("{v} must be positive")));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::config(
                path,
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::config(
                path,
                "layer_norm_eps",
                format!("{} must be positive", self.layer_norm_eps),
            ));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// `openai/clip-vit-large-patch14` text tower (FLUX.1 `text_encoder`).
    pub fn clip_vit_large_patch14() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }

    /// The tiny text tower of the public fixtures (width 4, 2 layers, 2 heads).
    pub fn tiny() -> Self {
        ClipTextConfig {
            hidden_size: 4,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            ..Self::clip_vit_large_patch14()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `config.json` without the key pools at the first 49407, as transformers
    /// 4.46's `CLIPTextConfig` default; an explicit 2 keeps the legacy argmax.
    #[test]
    fn eos_token_id_defaults_as_transformers() {
        let absent: ClipTextConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(absent.eos_token_id, 49407);
        let legacy: ClipTextConfig = serde_json::from_str(r#"{"eos_token_id": 2}"#).unwrap();
        assert_eq!(legacy.eos_token_id, 2);
    }
}
