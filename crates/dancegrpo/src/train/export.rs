//! What `dancegrpo export` makes of a LoRA checkpoint: the merged transformer
//! (adapters folded into the run's base) or the adapters alone, for loaders
//! that want one or the other.

use std::path::Path;

use super::build::build_models;
use super::checkpoint;
use super::config::TrainConfig;
use crate::error::{Error, Result};

/// The files of a LoRA checkpoint that hold the adapters (peft's and
/// diffusers' layouts).
pub const ADAPTER_FILES: [&str; 3] = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "pytorch_lora_weights.safetensors",
];

/// Writes the transformer of run `cfg` with checkpoint `ckpt`'s adapters folded
/// in as a diffusers directory `out` (on the CPU).
pub fn export_merged(cfg: &TrainConfig, ckpt: &Path, out: &Path) -> Result<()> {
    if cfg.optim.lora.is_none() {
        return Err(Error::Input(format!(
            "{}: the run trains no LoRA adapters (its checkpoints hold the whole transformer)",
            ckpt.display()
        )));
    }
    let (model, _) = build_models(cfg, tch::Device::Cpu)?;
    checkpoint::load_weights_whole(ckpt, &model)?;
    model.save_merged(out)
}

/// Copies the adapters of LoRA checkpoint `ckpt` into `out` (created).
pub fn export_adapters(ckpt: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for name in ADAPTER_FILES {
        let from = ckpt.join(name);
        if !from.is_file() {
            return Err(Error::not_found(
                from,
                "not a LoRA checkpoint written by this version",
            ));
        }
        std::fs::copy(&from, out.join(name)).map_err(|e| Error::io(&from, e))?;
    }
    Ok(())
}
