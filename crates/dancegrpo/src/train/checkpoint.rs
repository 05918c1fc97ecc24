//! Training checkpoints: the trained weights (in the model's own layout, see
//! [`PolicyModel::save_trained`]), the optimizer state and the trainer state,
//! written into a temporary directory and renamed into place, so a crash
//! mid-write leaves the previous checkpoint intact.
//!
//! ```text
//! <run>/checkpoints/iter-000040/
//!     transformer/config.json, diffusion_pytorch_model.safetensors   (FLUX, full fine-tune;
//!     or lora.safetensors + pytorch_lora_weights.safetensors)         LoRA: the adapters only)
//!     optimizer.safetensors      exp_avg.<param>, exp_avg_sq.<param>
//!     ema.safetensors            the moving average (when enabled)
//!     state.json                 written last: marks the checkpoint complete
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::dist::fsdp::FullShard;
use crate::dist::{barrier, Collective};
use crate::error::{Error, Result};
use crate::grpo::AdamW;
use crate::io::atomic::write_bytes_atomic;
use crate::io::safetensors::{write_safetensors, SafetensorsFile};
use crate::models::PolicyModel;

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Completed iterations.
    pub iteration: u64,
    /// Optimizer steps taken.
    pub optimizer_steps: u64,
    /// Next position in the data stream.
    pub data_position: u64,
    /// The first iteration's mean reward (for progress reports).
    pub first_reward: Option<f64>,
    /// Optimizer steps skipped in a row (non-finite gradients) up to here.
    #[serde(default)]
    pub skipped_steps_in_a_row: u32,
}

/// The directory name of the checkpoint after `iteration`.
pub fn checkpoint_name(iteration: u64) -> String {
    format!("iter-{iteration:06}")
}

/// Writes a checkpoint of `model`, `optimizer`, `ema` and `state` under `root`.
pub fn save(
    root: &Path,
    model: &dyn PolicyModel,
    optimizer: &AdamW,
    ema: Option<&super::ema::Ema>,
    state: &TrainState,
) -> Result<PathBuf> {
    let (tmp, done) = start(root, state)?;
    model.save_trained(&tmp)?;
    let names: Vec<String> = model.parameters().into_iter().map(|(n, _)| n).collect();
    let (m, v) = optimizer.moments();
    let mut tensors = Vec::with_capacity(2 * names.len());
    for (n, (m, v)) in names.iter().zip(m.iter().zip(v)) {
        tensors.push((format!("exp_avg.{n}"), m.shallow_clone()));
        tensors.push((format!("exp_avg_sq.{n}"), v.shallow_clone()));
    }
    let meta = BTreeMap::from([("step".to_string(), optimizer.steps().to_string())]);
    write_safetensors(tmp.join("optimizer.safetensors"), &tensors, &meta)?;
    if let Some(ema) = ema {
        ema.save(&tmp.join("ema.safetensors"))?;
    }
    finish(root, &tmp, &done, state)?;
    Ok(done)
}

/// A fresh temporary directory for the checkpoint of `state` under `root`,
/// and the name it will have when complete.
fn start(root: &Path, state: &TrainState) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let name = checkpoint_name(state.iteration);
    let (tmp, done) = (root.join(format!(".{name}.tmp")), root.join(&name));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    Ok((tmp, done))
}

/// Writes `state.json` (which marks the checkpoint complete) last and renames
/// `tmp` into place.
fn finish(root: &Path, tmp: &Path, done: &Path, state: &TrainState) -> Result<()> {
    let json = serde_json::to_string_pretty(state).expect("serialisable state");
    write_bytes_atomic(&tmp.join("state.json"), json.as_bytes())?;
    if done.exists() {
        std::fs::remove_dir_all(done).map_err(|e| Error::io(done, e))?;
    }
    std::fs::rename(tmp, done).map_err(|e| Error::io(done, e))?;
    sync_dir(root);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The newest complete checkpoint under `root` (one with a `state.json`), if any.
pub fn latest(root: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("iter-"))
                && p.join("state.json").is_file()
        })
        .max()
}

/// Removes all but the newest `keep` complete checkpoints (0 keeps all).
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("iter-"))
        })
        .collect();
    all.sort();
    let n = all.len().saturating_sub(keep);
    for old in &all[..n] {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(())
}

/// Reads the trainer state of checkpoint `dir`.
pub fn load_state(dir: &Path) -> Result<TrainState> {
    crate::io::json::read_json(&dir.join("state.json"))
}

/// Loads the optimizer moments of checkpoint `dir` into `optimizer` (parameter
/// names from `model`; this process's parts for a sharded model).
pub fn load_optimizer(dir: &Path, model: &dyn PolicyModel, optimizer: &mut AdamW) -> Result<()> {
    if let Some(parts) = model.sharded_state() {
        let (m, meta) = parts.load_parts(dir, "optimizer.exp_avg")?;
        let (v, _) = parts.load_parts(dir, "optimizer.exp_avg_sq")?;
        let step = meta
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Error::Input(format!(
                    "{}: the optimizer parts lack their `step`",
                    dir.display()
                ))
            })?;
        return optimizer.restore(m, v, step);
    }
    let path = dir.join("optimizer.safetensors");
    let file = SafetensorsFile::open(&path)?;
    let step: u64 = file
        .metadata()
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Safetensors {
            path: path.clone(),
            msg: "metadata lacks the optimizer `step`".into(),
        })?;
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (name, p) in model.parameters() {
        let kind = p.kind();
        m.push(
            file.tensor(&format!("exp_avg.{name}"))?
                .to_kind(kind)
                .to_device(p.device()),
        );
        v.push(
            file.tensor(&format!("exp_avg_sq.{name}"))?
                .to_kind(kind)
                .to_device(p.device()),
        );
    }
    optimizer.restore(m, v, step)
}

/// [`save`] for a sharded model: every process of `c` calls it and writes its
/// part of the weights (through the model), of the AdamW moments and of the
/// EMA into the temporary directory; process 0 then writes `state.json` and
/// renames the directory into place.
pub fn save_sharded(
    root: &Path,
    model: &dyn PolicyModel,
    parts: &FullShard,
    optimizer: &AdamW,
    ema: Option<&super::ema::Ema>,
    state: &TrainState,
    c: &dyn Collective,
) -> Result<()> {
    let name = checkpoint_name(state.iteration);
    let (tmp, done) = (root.join(format!(".{name}.tmp")), root.join(&name));
    if c.rank() == 0 {
        start(root, state)?;
    }
    barrier(c)?;
    model.save_trained(&tmp)?;
    let (m, v) = optimizer.moments();
    let meta = BTreeMap::from([("step".to_string(), optimizer.steps().to_string())]);
    parts.save_parts(&tmp, "optimizer.exp_avg", m, &meta)?;
    parts.save_parts(&tmp, "optimizer.exp_avg_sq", v, &meta)?;
    if let Some(ema) = ema {
        let shadow: Vec<Tensor> = ema
            .shadow()
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        parts.save_parts(&tmp, "ema", &shadow, &BTreeMap::new())?;
    }
    barrier(c)?;
    if c.rank() == 0 {
        finish(root, &tmp, &done, state)?;
    }
    barrier(c)
}

/// Loads the moving average of checkpoint `dir` into `ema` (this process's
/// part of it for a sharded model).
pub fn load_ema(dir: &Path, model: &dyn PolicyModel, ema: &mut super::ema::Ema) -> Result<()> {
    match model.sharded_state() {
        None => ema.load(&dir.join("ema.safetensors")),
        Some(parts) => {
            let (loaded, _) = parts.load_parts(dir, "ema")?;
            ema.restore(loaded)
        }
    }
}

/// [`load_weights`] for one process reading any checkpoint: a sharded one's
/// parts are put back together (by parameter name) into `model`'s whole
/// trained parameters (`generate`, evaluation tools).
pub fn load_weights_whole(dir: &Path, model: &dyn PolicyModel) -> Result<()> {
    let stem = crate::dist::fsdp::WEIGHTS;
    if !dir.join(format!("{stem}.shards.json")).is_file() {
        return load_weights(dir, model);
    }
    let manifest = crate::dist::fsdp::ShardManifest::read(dir, stem)?;
    let wholes = manifest.read_units(dir, stem)?;
    let mut saved: BTreeMap<&str, Tensor> = BTreeMap::new();
    for (unit, whole) in manifest.units.iter().zip(&wholes) {
        let mut at = 0;
        for (name, shape) in &unit.params {
            let n: i64 = shape.iter().product();
            saved.insert(name, whole.narrow(0, at, n).view(shape.as_slice()));
            at += n;
        }
    }
    let _guard = tch::no_grad_guard();
    for (name, p) in model.parameters() {
        let t = saved.get(name.as_str()).ok_or_else(|| {
            Error::Input(format!(
                "{}: the sharded weights lack {name}",
                dir.display()
            ))
        })?;
        if t.size() != p.size() {
            return Err(Error::Input(format!(
                "{}: {name} has shape {:?}, the model {:?}",
                dir.display(),
                t.size(),
                p.size()
            )));
        }
        p.shallow_clone()
            .copy_(&t.to_kind(p.kind()).to_device(p.device()));
    }
    Ok(())
}

/// Copies the trained weights of checkpoint `dir` into `model` (same
/// architecture, same adapters).
pub fn load_weights(dir: &Path, model: &dyn PolicyModel) -> Result<()> {
    model.load_trained(dir)
}
