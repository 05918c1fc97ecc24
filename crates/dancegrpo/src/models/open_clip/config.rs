//! open_clip model configs: `model_config.json` (`{embed_dim, vision_cfg, text_cfg,
//! quick_gelu}`) or the hub's `open_clip_config.json` (the same under `model_cfg`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::json::read_json;

/// The ViT image tower.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct VisionConfig {
    /// Input resolution `R` (square).
    #[serde(default = "d224")]
    pub image_size: i64,
    /// Number of residual blocks.
    #[serde(default = "d12")]
    pub layers: usize,
    /// Residual stream width.
    #[serde(default = "d768")]
    pub width: i64,
    /// Width of one attention head (`heads = width / head_width`).
    #[serde(default = "d64")]
    pub head_width: i64,
    /// Patch size (square, stride = kernel).
    #[serde(default = "d16")]
    pub patch_size: i64,
    /// MLP hidden width = `width * mlp_ratio`.
    #[serde(default = "d4")]
    pub mlp_ratio: f64,
    /// Layer-scale initial value; when set, blocks have `ls_1.gamma`, `ls_2.gamma`.
    #[serde(default)]
    pub ls_init_value: Option<f64>,
}

/// The causal text tower.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct TextConfig {
    /// Token positions (77).
    #[serde(default = "d77")]
    pub context_length: i64,
    /// Vocabulary size (49408).
    #[serde(default = "d49408")]
    pub vocab_size: i64,
    /// Residual stream width.
    #[serde(default = "d512")]
    pub width: i64,
    /// Attention heads.
    #[serde(default = "d8")]
    pub heads: i64,
    /// Number of residual blocks.
    #[serde(default = "d12")]
    pub layers: usize,
    /// MLP hidden width = `width * mlp_ratio`.
    #[serde(default = "d4")]
    pub mlp_ratio: f64,
    /// Layer-scale initial value; when set, blocks have `ls_1.gamma`, `ls_2.gamma`.
    #[serde(default)]
    pub ls_init_value: Option<f64>,
}

/// An open_clip `CLIP` model.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct OpenClipConfig {
    /// Width of the joint embedding space `E`.
    pub embed_dim: i64,
    /// Image tower.
    pub vision_cfg: VisionConfig,
    /// Text tower.
    pub text_cfg: TextConfig,
    /// `QuickGELU` (`x * sigmoid(1.702 x)`) instead of `nn.GELU` (erf).
    #[serde(default)]
    pub quick_gelu: bool,
}

fn d4() -> f64 {
    4.0
}
fn d8() -> i64 {
    8
}
fn d12() -> usize {
    12
}
fn d16() -> i64 {
    16
}
fn d64() -> i64 {
    64
}
fn d77() -> i64 {
    77
}
fn d224() -> i64 {
    224
}
fn d512() -> i64 {
    512
}
fn d768() -> i64 {
    768
}
fn d49408() -> i64 {
    49408
}

/// Options of open_clip towers this implementation does not have: present with
/// a value other than its default (`false`/`null`/the given string), they are rejected.
const UNSUPPORTED_VISION: &[(&str, Option<&str>)] = &[
    ("timm_model_name", None),
    ("hf_model_name", None),
    ("global_average_pool", None),
    ("attentional_pool", None),
    ("no_ln_pre", None),
    ("final_ln_after_pool", None),
    ("patch_dropout", None),
    ("input_patchnorm", None),
    ("pool_type", Some("tok")),
    ("act_kwargs", None),
    ("norm_kwargs", None),
];
const UNSUPPORTED_TEXT: &[(&str, Option<&str>)] = &[
    ("hf_model_name", None),
    ("embed_cls", None),
    ("no_causal_mask", None),
    ("proj_bias", None),
    ("pool_type", Some("argmax")),
    ("act_kwargs", None),
    ("norm_kwargs", None),
];
const UNSUPPORTED_TOP: &[(&str, Option<&str>)] = &[("cast_dtype", None), ("custom_text", None)];

fn reject_unsupported(
    path: &Path,
    prefix: &str,
    obj: Option<&serde_json::Value>,
    keys: &[(&str, Option<&str>)],
) -> Result<()> {
    let Some(obj) = obj.and_then(|o| o.as_object()) else {
        return Ok(());
    };
    for (key, default) in keys {
        let Some(v) = obj.get(*key) else { continue };
        let is_default = match v {
            serde_json::Value::Null => true,
            serde_json::Value::Bool(b) => !b,
            serde_json::Value::Number(n) => n.as_f64() == Some(0.0),
            serde_json::Value::String(s) => Some(s.as_str()) == *default,
            serde_json::Value::Object(o) => o.is_empty(),
            serde_json::Value::Array(a) => a.is_empty(),
        };
        if !is_default {
            return Err(Error::config(
                path,
                &format!("{prefix}{key}"),
                format!("{v} is not supported by this open_clip implementation"),
            ));
        }
    }
    Ok(())
}

impl OpenClipConfig {
    /// Reads and validates `model_config.json` or `open_clip_config.json` (whose
    /// model config sits under `model_cfg`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut value: serde_json::Value = read_json(path)?;
        if let Some(inner) = value.get("model_cfg") {
            value = inner.clone();
        }
        reject_unsupported(path, "", Some(&value), UNSUPPORTED_TOP)?;
        reject_unsupported(
            path,
            "vision_cfg.",
            value.get("vision_cfg"),
            UNSUPPORTED_VISION,
        )?;
        reject_unsupported(path, "text_cfg.", value.get("text_cfg"), UNSUPPORTED_TEXT)?;
        let cfg: OpenClipConfig = crate::io::json::from_value(value, path, "")?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads the config of an open_clip model directory: `model_config.json`, else
    /// `open_clip_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let a = dir.join("model_config.json");
        let b = dir.join("open_clip_config.json");
        if a.is_file() {
            Self::from_file(&a)
        } else if b.is_file() {
            Self::from_file(&b)
        } else {
            Err(Error::not_found(
                dir,
                "neither model_config.json nor open_clip_config.json",
            ))
        }
    }

    /// Checks the values this implementation supports; `path` names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        for (field, x) in [
            ("embed_dim", self.embed_dim),
            ("vision_cfg.image_size", v.image_size),
            ("vision_cfg.width", v.width),
            ("vision_cfg.head_width", v.head_width),
            ("vision_cfg.patch_size", v.patch_size),
            ("text_cfg.context_length", t.context_length),
            ("text_cfg.vocab_size", t.vocab_size),
            ("text_cfg.width", t.width),
            ("text_cfg.heads", t.heads),
        ] {
            if x <= 0 {
                return Err(Error::config(path, field, format!("{x} must be positive")));
            }
        }
        if v.width % v.head_width != 0 {
            return Err(Error::config(
                path,
                "vision_cfg.head_width",
                format!("{} does not divide width {}", v.head_width, v.width),
            ));
        }
        if t.width % t.heads != 0 {
            return Err(Error::config(
                path,
                "text_cfg.heads",
                format!("{} does not divide width {}", t.heads, t.width),
            ));
        }
        if v.image_size % v.patch_size != 0 {
            return Err(Error::config(
                path,
                "vision_cfg.patch_size",
                format!(
                    "{} does not divide image_size {}",
                    v.patch_size, v.image_size
                ),
            ));
        }
        for (field, r, w) in [
            ("vision_cfg.mlp_ratio", v.mlp_ratio, v.width),
            ("text_cfg.mlp_ratio", t.mlp_ratio, t.width),
        ] {
            let hidden = w as f64 * r;
            if !(hidden >= 1.0 && hidden.fract() == 0.0) {
                return Err(Error::config(
                    path,
                    field,
                    format!("{r} gives a non-integral MLP width {hidden}"),
                ));
            }
        }
        Ok(())
    }

    /// The reference stand-in of the public fixtures (tiny ViT, `E = 16`, `R = 56`).
    pub fn tiny() -> Self {
        OpenClipConfig {
            embed_dim: 16,
            vision_cfg: VisionConfig {
                image_size: 56,
                layers: 2,
                width: 32,
                head_width: 16,
                patch_size: 14,
                mlp_ratio: 4.0,
                ls_init_value: None,
            },
            text_cfg: TextConfig {
                context_length: 77,
                vocab_size: 49408,
                width: 4,
                heads: 2,
                layers: 2,
                mlp_ratio: 4.0,
                ls_init_value: None,
            },
            quick_gelu: false,
        }
    }

    /// open_clip `ViT-H-14` (the architecture of HPSv2.1).
    pub fn vit_h_14() -> Self {
        OpenClipConfig {
            embed_dim: 1024,
            vision_cfg: VisionConfig {
                image_size: 224,
                layers: 32,
                width: 1280,
                head_width: 80,
                patch_size: 14,
                mlp_ratio: 4.0,
                ls_init_value: None,
            },
            text_cfg: TextConfig {
                context_length: 77,
                vocab_size: 49408,
                width: 1024,
                heads: 16,
                layers: 24,
                mlp_ratio: 4.0,
                ls_init_value: None,
            },
            quick_gelu: false,
        }
    }
}
