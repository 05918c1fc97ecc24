//! LoRA adapters on the linear layers of a model: configuration, attachment by
//! module name, and the diffusers/peft file layout.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::adapter::{AdapterSwitch, Lora};
use crate::error::{Error, Result};
use crate::weights::{init_tensor, Init, ParamStore};

/// Which layers get adapters and how large they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Adapter rank.
    pub rank: i64,
    /// Scale numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f64,
    /// Module names (or dotted suffixes of names) to adapt, peft-style.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// Rank 32, alpha 64, every attention projection and feed-forward layer of
    /// the FLUX blocks (Flow-GRPO's FLUX choice).
    fn default() -> Self {
        let t = [
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
            "ff.net.0.proj",
            "ff.net.2",
            "ff_context.net.0.proj",
            "ff_context.net.2",
            "proj_mlp",
        ];
        LoraConfig {
            rank: 32,
            alpha: 64.0,
            target_modules: t.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Whether module `name` is targeted: equal to a target or ending in `.target`.
pub fn targeted(name: &str, targets: &[String]) -> bool {
    targets
        .iter()
        .any(|t| name == t || name.ends_with(&format!(".{t}")))
}

/// Attaches adapters to every targeted linear layer registered in `model`
/// (A seeded from `seed`, B zero), adding their parameters to `adapters`
/// (`<module>.lora_A.weight`, `<module>.lora_B.weight`), all turned off and
/// on by `switch`. Returns how many layers.
pub fn attach(
    model: &ParamStore,
    adapters: &ParamStore,
    cfg: &LoraConfig,
    seed: u64,
    switch: &AdapterSwitch,
) -> Result<usize> {
    if cfg.rank < 1 || cfg.alpha.is_nan() || cfg.alpha <= 0.0 {
        return Err(Error::Input(format!(
            "LoRA needs rank >= 1 and alpha > 0, got rank {} alpha {}",
            cfg.rank, cfg.alpha
        )));
    }
    let mut n = 0;
    for (name, slot) in model.linears() {
        if !targeted(&name, &cfg.target_modules) || slot.get().is_some() {
            continue;
        }
        let w = model
            .get(&format!("{name}.weight"))
            .ok_or_else(|| Error::Input(format!("linear layer {name} has no weight")))?;
        let (out, inp) = (w.size()[0], w.size()[1]);
        // adapters are trained: float32 master weights over a bfloat16 (or float32) base
        let (kind, device) = (crate::nn::upcast_kind(w.kind()), w.device());
        let make = |suffix: &str, shape: [i64; 2], init: Init| {
            let full = format!("{name}.{suffix}");
            let t = init_tensor(seed, &full, &shape, init)
                .to_kind(kind)
                .to_device(device)
                .set_requires_grad(true);
            adapters.insert(full, &t);
            t
        };
        let a = make("lora_A.weight", [cfg.rank, inp], Init::FanIn);
        let b = make("lora_B.weight", [out, cfg.rank], Init::Zeros);
        let _ = slot.set(Lora {
            a,
            b,
            scale: cfg.alpha / cfg.rank as f64,
            switch: switch.clone(),
        });
        n += 1;
    }
    if n == 0 {
        return Err(Error::Input(format!(
            "no linear layer matches the LoRA target_modules {:?}",
            cfg.target_modules
        )));
    }
    Ok(n)
}

/// Writes the adapters in the diffusers layout (`pytorch_lora_weights.safetensors`:
/// `transformer.<module>.lora_A.weight` / `lora_B.weight`, with `alpha / rank`
/// folded into B so loaders that assume `alpha = rank` apply the right scale).
pub fn save_diffusers(path: &Path, adapters: &ParamStore, cfg: &LoraConfig) -> Result<()> {
    let scale = cfg.alpha / cfg.rank as f64;
    let tensors: Vec<(String, Tensor)> = adapters
        .named()
        .into_iter()
        .map(|(n, t)| {
            let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float);
            let t = if n.ends_with("lora_B.weight") {
                t * scale
            } else {
                t
            };
            (format!("transformer.{n}"), t)
        })
        .collect();
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lora_rank".to_string(), cfg.rank.to_string()),
        (
            "lora_alpha_folded_into_B".to_string(),
            cfg.alpha.to_string(),
        ),
    ]);
    crate::io::safetensors::write_safetensors(path, &tensors, &meta)
}

/// Writes the adapters as peft's `PeftModel.save_pretrained` does, so
/// `PeftModel.from_pretrained(base_transformer, dir)` loads them:
/// `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` /
/// `lora_B.weight`, B not scaled: peft applies `lora_alpha / r` itself) and
/// `adapter_config.json` (the fields peft 0.13.2 writes for a diffusers
/// `FluxTransformer2DModel`; `base` as `base_model_name_or_path` when known).
pub fn save_peft(
    dir: &Path,
    adapters: &ParamStore,
    cfg: &LoraConfig,
    base: Option<&str>,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = adapters
        .named()
        .into_iter()
        .map(|(n, t)| {
            let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float);
            (format!("base_model.model.{n}"), t)
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    crate::io::safetensors::write_safetensors(
        dir.join("adapter_model.safetensors"),
        &tensors,
        &meta,
    )?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": base,
        "revision": null,
        "inference_mode": true,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "auto_mapping": {
            "base_model_class": "FluxTransformer2DModel",
            "parent_library": "diffusers.models.transformers.transformer_flux",
        },
        "layer_replication": null,
        "loftq_config": {},
        "megatron_config": null,
        "megatron_core": "megatron.core",
    });
    let text = serde_json::to_string_pretty(&config).expect("json");
    crate::io::atomic::write_bytes_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_style_target_matching() {
        let t: Vec<String> = vec!["to_q".into(), "ff.net.2".into()];
        assert!(targeted("transformer_blocks.0.attn.to_q", &t));
        assert!(targeted("transformer_blocks.3.ff.net.2", &t));
        assert!(!targeted("transformer_blocks.3.ff_context.net.2", &t));
        assert!(!targeted("single_transformer_blocks.0.attn.to_qx", &t));
        assert!(!targeted("transformer_blocks.0.ff.net.0.proj", &t));
    }
}
