//! FLUX as a [`PolicyModel`]: what a training checkpoint holds of it.
//!
//! ```text
//! full fine-tune   transformer/config.json, diffusion_pytorch_model.safetensors  (diffusers layout)
//! LoRA             lora.safetensors                   our parameter names (for resuming)
//!                  pytorch_lora_weights.safetensors   diffusers/peft names, alpha/rank folded into B
//!                  adapter_model.safetensors          peft's layout (`PeftModel.from_pretrained`)
//!                  adapter_config.json                 with its `LoraConfig`
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

use super::model::FluxTransformer;
use crate::error::{Error, Result};
use crate::io::safetensors::{write_safetensors, SafetensorsFile};
use crate::models::{PolicyModel, TextWidths, VelocityModel};

impl PolicyModel for FluxTransformer {
    fn text_widths(&self) -> TextWidths {
        TextWidths {
            text: self.config().joint_attention_dim,
            pooled: self.config().pooled_projection_dim,
        }
    }

    fn guidance_embeds(&self) -> bool {
        self.config().guidance_embeds
    }

    fn save_trained(&self, dir: &Path) -> Result<()> {
        let Some((adapters, cfg)) = self.lora() else {
            return self.save_dir(&dir.join("transformer"));
        };
        let tensors: Vec<(String, Tensor)> = adapters
            .named()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        let meta = BTreeMap::from([(
            "lora".to_string(),
            serde_json::to_string(cfg).expect("json"),
        )]);
        write_safetensors(dir.join("lora.safetensors"), &tensors, &meta)?;
        crate::models::lora::save_diffusers(
            &dir.join("pytorch_lora_weights.safetensors"),
            adapters,
            cfg,
        )?;
        crate::models::lora::save_peft(dir, adapters, cfg, None)
    }

    fn load_trained(&self, dir: &Path) -> Result<()> {
        let saved: Vec<(String, Tensor)> = if self.lora().is_some() {
            let file = SafetensorsFile::open(dir.join("lora.safetensors"))?;
            self.parameters()
                .iter()
                .map(|(n, _)| Ok((n.clone(), file.tensor(n)?)))
                .collect::<Result<_>>()?
        } else {
            let stored = dir.join("transformer");
            FluxTransformer::from_dir(&stored, Kind::Float, tch::Device::Cpu)?.parameters()
        };
        copy_into(dir, &self.parameters(), &saved)
    }
}

impl FluxTransformer {
    /// Writes the transformer with its LoRA adapters folded in (`W + alpha/rank *
    /// B A`, computed in float32, stored in the base weights' dtype) as a
    /// diffusers directory, as `fuse_lora` then `save_pretrained` would; without
    /// adapters, the weights as they are.
    pub fn save_merged(&self, dir: &Path) -> Result<()> {
        let Some((adapters, cfg)) = self.lora() else {
            return self.save_dir(dir);
        };
        let _guard = tch::no_grad_guard();
        let scale = cfg.alpha / cfg.rank as f64;
        let lora: BTreeMap<String, Tensor> = adapters.named().into_iter().collect();
        let merged: Vec<(String, Tensor)> = (self.base_parameters().into_iter())
            .map(|(name, w)| {
                let module = name.strip_suffix(".weight").unwrap_or(&name);
                let pair = (lora.get(&format!("{module}.lora_A.weight")))
                    .zip(lora.get(&format!("{module}.lora_B.weight")));
                let w = match pair {
                    Some((a, b)) => {
                        let delta = b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)); // (out, in)
                        (w.to_kind(Kind::Float) + delta * scale).to_kind(w.kind())
                    }
                    None => w.detach(),
                };
                (name, w.to_device(tch::Device::Cpu))
            })
            .collect();
        self.write_dir(dir, &merged)
    }
}

impl crate::models::Shardable for FluxTransformer {
    fn units(&self) -> Vec<crate::models::ParamUnit> {
        self.trained_units()
    }

    fn set_residency(&mut self, residency: Option<std::rc::Rc<dyn crate::models::Residency>>) {
        FluxTransformer::set_residency(self, residency)
    }

    fn config_json(&self) -> String {
        FluxTransformer::config_json(self)
    }
}

/// Copies `saved` into `params` (same names, same order), checking shapes.
fn copy_into(dir: &Path, params: &[(String, Tensor)], saved: &[(String, Tensor)]) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for ((name, p), (_, s)) in params.iter().zip(saved) {
        if p.size() != s.size() {
            return Err(Error::Input(format!(
                "checkpoint {}: {name} has shape {:?}, the model {:?}",
                dir.display(),
                s.size(),
                p.size()
            )));
        }
        p.shallow_clone()
            .copy_(&s.to_kind(p.kind()).to_device(p.device()));
    }
    Ok(())
}
