//! `config.json` of a transformers `T5EncoderModel` (T5 v1.1 / T5-XXL as used by FLUX.1).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::json::read_json;

/// The feed-forward activation (transformers' `ACT2FN` names this implementation supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Activation {
    /// `relu`.
    Relu,
    /// `gelu_new`: the tanh approximation, written out as transformers' `NewGELUActivation`.
    GeluNew,
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `silu` / `swish`.
    Silu,
}

impl T5Activation {
    /// Parses a transformers activation name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "relu" => Some(T5Activation::Relu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(T5Activation::GeluNew),
            "gelu" => Some(T5Activation::Gelu),
            "silu" | "swish" => Some(T5Activation::Silu),
            _ => None,
        }
    }
}

/// Architecture hyper-parameters of a T5 encoder (transformers names).
/// Unknown fields of `config.json` (decoder settings, dropout, token ids) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct T5Config {
    /// Vocabulary size (rows of `shared.weight`).
    #[serde(default = "default_vocab")]
    pub vocab_size: i64,
    /// Width of the residual stream.
    #[serde(default = "default_d_model")]
    pub d_model: i64,
    /// Width of one attention head.
    #[serde(default = "default_d_kv")]
    pub d_kv: i64,
    /// Hidden width of the feed-forward layer.
    #[serde(default = "default_d_ff")]
    pub d_ff: i64,
    /// Number of encoder blocks.
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    /// Number of attention heads.
    #[serde(default = "default_heads")]
    pub num_heads: i64,
    /// Relative-position buckets.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: i64,
    /// Distance beyond which relative positions share the last bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: i64,
    /// Epsilon of the RMS layer norms.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `"relu"`, `"gated-gelu"` or `"[gated-]ACT"`.
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
    /// Overrides the activation derived from `feed_forward_proj` (transformers lets
    /// a stored value win over the derived one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense_act_fn: Option<String>,
    /// Overrides the gating derived from `feed_forward_proj`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_gated_act: Option<bool>,
}

fn default_vocab() -> i64 {
    32128
}
fn default_d_model() -> i64 {
    512
}
fn default_d_kv() -> i64 {
    64
}
fn default_d_ff() -> i64 {
    2048
}
fn default_layers() -> usize {
    6
}
fn default_heads() -> i64 {
    8
}
fn default_buckets() -> i64 {
    32
}
fn default_max_distance() -> i64 {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "relu".into()
}

impl T5Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        if let Some(mt) = value.get("model_type").and_then(|c| c.as_str()) {
            if mt != "t5" && mt != "umt5" {
                return Err(Error::config(
                    path,
                    "model_type",
                    format!("`{mt}` is not a T5 model"),
                ));
            }
        }
        let cfg: T5Config = crate::io::json::from_value(value, path, "")?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The feed-forward activation and whether the layer is gated, as transformers'
    /// `T5Config` derives them (`"gated-gelu"` means `gelu_new`, gated).
    pub fn activation(&self) -> std::result::Result<(T5Activation, bool), String> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (derived_act, derived_gated) = match parts.as_slice() {
            [act] => (*act, false),
            ["gated", act] => (*act, true),
            _ => {
                return Err(format!(
                    "`{}` is not of the form `ACT` or `gated-ACT`",
                    self.feed_forward_proj
                ))
            }
        };
        let derived_act = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            derived_act
        };
        let name = self.dense_act_fn.as_deref().unwrap_or(derived_act);
        let act = T5Activation::from_name(name)
            .ok_or_else(|| format!("activation `{name}` is unsupported"))?;
        Ok((act, self.is_gated_act.unwrap_or(derived_gated)))
    }

    /// Checks values this implementation supports; `path` names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if let Err(msg) = self.activation() {
            let field = if self.dense_act_fn.is_some() {
                "dense_act_fn"
            } else {
                "feed_forward_proj"
            };
            return Err(Error::config(path, field, msg));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_heads", self.num_heads),
            (
                "relative_attention_max_distance",
                self.relative_attention_max_distance,
            ),
        ] {
            if v <= 0 {
                return Err(Error::config(path, field, format!("{v} must be positive")));
            }
        }
        if self.relative_attention_num_buckets < 4 {
            return Err(Error::config(
                path,
                "relative_attention_num_buckets",
                format!(
                    "{} is too small (at least 4 for bidirectional buckets)",
                    self.relative_attention_num_buckets
                ),
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(Error::config(
                path,
                "layer_norm_epsilon",
                format!("{} must be positive", self.layer_norm_epsilon),
            ));
        }
        Ok(())
    }

    /// Width of all heads together: `num_heads * d_kv`.
    pub fn inner_dim(&self) -> i64 {
        self.num_heads * self.d_kv
    }

    /// `google/t5-v1_1-xxl` encoder (FLUX.1 `text_encoder_2`).
    pub fn t5_v1_1_xxl() -> Self {
        T5Config {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            dense_act_fn: None,
            is_gated_act: None,
        }
    }

    /// A mid-size encoder (`t5-v1_1-large` shape) for benchmarks.
    pub fn t5_v1_1_large() -> Self {
        T5Config {
            d_model: 1024,
            d_ff: 2816,
            num_layers: 24,
            num_heads: 16,
            ..Self::t5_v1_1_xxl()
        }
    }

    /// The tiny encoder of the public fixtures (width 32, 2 layers, 2 heads).
    pub fn tiny() -> Self {
        T5Config {
            vocab_size: 265,
            d_model: 32,
            d_kv: 16,
            d_ff: 64,
            num_layers: 2,
            num_heads: 2,
            ..Self::t5_v1_1_xxl()
        }
    }
}
