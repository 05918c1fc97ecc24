//! `dancegrpo plan`: the memory one training process needs, before anything is
//! loaded.
//!
//! The models are built shapes-only ([`Source::Shapes`]: every parameter a
//! broadcast zero, no storage) from the same configuration the trainer runs, so
//! parameter counts are exact for any `config.json`, FLUX.1-dev's included,
//! without its weights. What the process holds is then counted the way the
//! trainer holds it ([`crate::precision`], [`crate::dist::sharding`]): trained
//! weights, gradients and AdamW moments in float32, split `1/N` as the sharding
//! mode says; frozen models in their storage dtype; the bfloat16 weight copies
//! a backward pass keeps; activations, which are estimates
//! ([`activations`]).

pub mod activations;
pub mod check;
pub mod flops;

use std::path::Path;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::dist::Sharding;
use crate::error::{Error, Result};
use crate::models::flux::{FluxConfig, FluxTransformer};
use crate::models::lora::targeted;
use crate::models::vae::{Vae, VaeConfig};
use crate::models::ActivationCheckpointing;
use crate::rewards::spec::RewardSpec;
use crate::train::config::{DataSource, ModelSource, TrainConfig};
use crate::weights::Source;

/// One GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// What the plan assumes beyond the configuration.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Processes (GPUs).
    pub world: i64,
    /// Memory of one device, bytes.
    pub memory: u64,
    /// Text tokens per prompt (T5 length) when the data does not say.
    pub text_len: Option<i64>,
    /// Memory kept back for the CUDA context and allocator slack, bytes.
    pub reserve: u64,
}

/// One line of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanLine {
    /// A stable key: `trained`, `gradients`, `moments`, `ema`, `frozen:<model>`,
    /// `gathered_block`, `cast_copies`, `activations`, `reserve`.
    pub key: String,
    /// What is held.
    pub what: String,
    /// Bytes per process.
    pub bytes: u64,
    /// How it was counted.
    pub detail: String,
    /// The configuration field(s) that size it (what to change when it is too big).
    pub field: &'static str,
}

/// The memory of one process.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    /// Processes.
    pub world: i64,
    /// The sharding mode.
    pub sharding: &'static str,
    /// Trained parameters (all processes).
    pub trained_params: i64,
    /// Frozen parameters (per process).
    pub frozen_params: i64,
    /// Per-process lines.
    pub lines: Vec<PlanLine>,
    /// Their sum.
    pub total: u64,
    /// Device memory.
    pub memory: u64,
    /// Whether `total <= memory`.
    pub fits: bool,
    /// The smallest process count (at most 1024) for which it fits in this
    /// sharding mode, if any.
    pub smallest_world: Option<i64>,
    /// The same with `sharding = "full"`.
    pub smallest_world_full: Option<i64>,
    /// Transformer TFLOP of one iteration over all processes ([`flops`]).
    pub tflop: IterationTflop,
}

/// Transformer TFLOP of one iteration over all processes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct IterationTflop {
    /// The rollout's forwards.
    pub rollout: f64,
    /// The update's forwards and backwards (model FLOPs; without the forwards
    /// of first-window transitions whose graphs the rollout keeps).
    pub update: f64,
    /// The forwards per-block checkpointing recomputes.
    pub recompute: f64,
}

/// The parameter counts a plan is made of (shapes only).
#[derive(Debug, Clone)]
pub struct ModelCounts {
    /// Parameters of the transformer.
    pub transformer: i64,
    /// Parameters trained: the transformer, or its LoRA adapters.
    pub trained: i64,
    /// Parameters of the largest block (one gathered unit under full sharding).
    pub largest_block: i64,
    /// Frozen models: (name, parameters, storage dtype).
    pub frozen: Vec<(String, i64, Kind)>,
    /// The transformer's architecture.
    pub flux: FluxConfig,
    /// The VAE's architecture.
    pub vae: VaeConfig,
}

/// Counts the parameters `cfg` builds, without building them.
pub fn count(cfg: &TrainConfig) -> Result<ModelCounts> {
    let (flux, vae) = match &cfg.model {
        ModelSource::Tiny { .. } => (FluxConfig::tiny(), VaeConfig::tiny()),
        ModelSource::Dir { path } | ModelSource::Random { path, .. } => (
            FluxConfig::from_file(&path.join("transformer").join("config.json"))?,
            VaeConfig::from_file(&path.join("vae").join("config.json"))?,
        ),
    };
    let p = &cfg.precision;
    let model = FluxTransformer::new(flux.clone(), Source::Shapes, Kind::Float, Device::Cpu)?;
    let base = model.base_parameters();
    let numel = |ts: &[(String, Tensor)]| ts.iter().map(|(_, t)| t.numel() as i64).sum::<i64>();
    let transformer = numel(&base);
    let mut frozen = Vec::new();
    let trained = match &cfg.optim.lora {
        None => transformer,
        Some(lora) => {
            frozen.push((
                "transformer (LoRA base)".into(),
                transformer,
                p.frozen_kind(),
            ));
            let shapes: std::collections::BTreeMap<&str, &Tensor> =
                base.iter().map(|(n, t)| (n.as_str(), t)).collect();
            model
                .linear_names()
                .iter()
                .filter(|name| targeted(name, &lora.target_modules))
                .filter_map(|name| shapes.get(format!("{name}.weight").as_str()))
                .map(|w| lora.rank * (w.size()[0] + w.size()[1]))
                .sum()
        }
    };
    let vae_model = Vae::new(vae.clone(), Source::Shapes, Kind::Float, Device::Cpu)?;
    frozen.push((
        "VAE".into(),
        numel(&vae_model.parameters()),
        p.frozen_kind(),
    ));
    for (i, spec) in cfg.rewards.iter().enumerate() {
        if let Some(n) = reward_params(spec)? {
            frozen.push((format!("rewards[{i}]"), n, p.frozen_kind()));
        }
    }
    Ok(ModelCounts {
        transformer,
        trained,
        largest_block: largest_block(&base),
        frozen,
        flux,
        vae,
    })
}

/// Parameters of a reward's model (`None`: no model in this process).
fn reward_params(spec: &RewardSpec) -> Result<Option<i64>> {
    let sum = |ts: Vec<(String, Tensor)>| ts.iter().map(|(_, t)| t.numel() as i64).sum();
    Ok(match spec {
        RewardSpec::Hpsv2 { path, .. } => {
            let config = crate::models::open_clip::OpenClipConfig::from_dir(path)?;
            let m = crate::models::open_clip::OpenClip::new(
                config,
                Source::Shapes,
                Kind::Float,
                Device::Cpu,
            )?;
            Some(sum(m.parameters()))
        }
        RewardSpec::ClipScore { path, .. } | RewardSpec::Pickscore { path, .. } => {
            let config = crate::models::clip::ClipConfig::from_file(&path.join("config.json"))?;
            let m = crate::models::clip::ClipModel::new(
                config,
                Source::Shapes,
                Kind::Float,
                Device::Cpu,
            )?;
            Some(sum(m.parameters()))
        }
        RewardSpec::Jpeg { .. } | RewardSpec::Remote { .. } => None,
    })
}

/// Parameters of the largest `transformer_blocks.i` / `single_transformer_blocks.i`.
fn largest_block(params: &[(String, Tensor)]) -> i64 {
    let mut blocks: std::collections::BTreeMap<String, i64> = Default::default();
    for (name, t) in params {
        let parts: Vec<&str> = name.splitn(3, '.').collect();
        if let [head @ ("transformer_blocks" | "single_transformer_blocks"), i, _] = parts[..] {
            *blocks.entry(format!("{head}.{i}")).or_default() += t.numel() as i64;
        }
    }
    blocks.into_values().max().unwrap_or(0)
}

/// Bytes of one element of `kind`.
pub fn kind_bytes(kind: Kind) -> u64 {
    match kind {
        Kind::Double | Kind::Int64 => 8,
        Kind::Float | Kind::Int => 4,
        Kind::BFloat16 | Kind::Half => 2,
        _ => 1,
    }
}

/// The plan of one process of `cfg` run on `opts.world` processes.
pub fn plan(cfg: &TrainConfig, opts: &PlanOptions) -> Result<MemoryPlan> {
    cfg.check_world(opts.world)?;
    let counts = count(cfg)?;
    let text_len = text_len(cfg, opts)?;
    let total_for = |cfg: &TrainConfig, n: i64| -> u64 {
        let lines = plan_lines(cfg, &counts, n, text_len, opts.reserve);
        lines.iter().map(|l| l.bytes).sum()
    };
    let smallest = |cfg: &TrainConfig| {
        (1..=1024).find(|&n| cfg.check_world(n).is_ok() && total_for(cfg, n) <= opts.memory)
    };
    let per_process = plan_lines(cfg, &counts, opts.world, text_len, opts.reserve);
    let total = per_process.iter().map(|l| l.bytes).sum();
    let mut full = cfg.clone();
    full.parallel.sharding = Sharding::Full;
    let (rollout, update, recompute) = flops::iteration(cfg, &counts.flux, text_len);
    Ok(MemoryPlan {
        world: opts.world,
        sharding: cfg.parallel.sharding.name(),
        trained_params: counts.trained,
        frozen_params: counts.frozen.iter().map(|f| f.1).sum(),
        lines: per_process,
        total,
        memory: opts.memory,
        fits: total <= opts.memory,
        smallest_world: smallest(cfg),
        smallest_world_full: smallest(&full),
        tflop: IterationTflop {
            rollout: rollout / 1e12,
            update: update / 1e12,
            recompute: recompute / 1e12,
        },
    })
}

/// T5 tokens per prompt: the dataset's, else the option, else 512 for a model
/// directory (FLUX.1's) and 32 for the tiny model's synthetic prompts.
fn text_len(cfg: &TrainConfig, opts: &PlanOptions) -> Result<i64> {
    if let DataSource::Synthetic { text_len, .. } = &cfg.data {
        return Ok(*text_len);
    }
    if let DataSource::Dataset { path } = &cfg.data {
        if path.join("manifest.json").is_file() {
            let data = crate::data::EmbeddingDataset::open(path)?;
            return Ok(data.info().text_len);
        }
    }
    Ok(opts.text_len.unwrap_or(match cfg.model {
        ModelSource::Tiny { .. } => 32,
        ModelSource::Dir { .. } | ModelSource::Random { .. } => 512,
    }))
}

/// The per-process lines for `world` processes.
fn plan_lines(
    cfg: &TrainConfig,
    c: &ModelCounts,
    world: i64,
    text_len: i64,
    reserve: u64,
) -> Vec<PlanLine> {
    let mut out = trained_state_lines(cfg, c, world);
    for (name, count, kind) in &c.frozen {
        let what = format!("{name} (frozen, {kind:?})");
        let bytes = kind_bytes(*kind) * *count as u64;
        out.push(line(
            &format!("frozen:{name}"),
            &what,
            bytes,
            format!("{count} parameters"),
        ));
    }
    out.extend(compute_copies(cfg, c));
    let act = activations::peak(cfg, c, text_len, world);
    out.push(PlanLine {
        field: act.field,
        ..line(
            "activations",
            "activations (estimate)",
            act.bytes,
            act.detail,
        )
    });
    let what = "CUDA context and allocator slack (estimate)";
    out.push(line("reserve", what, reserve, "fixed".into()));
    out
}

/// The trained weights, their gradients, AdamW moments and EMA, each divided
/// among the `world` processes as `parallel.sharding` says.
fn trained_state_lines(cfg: &TrainConfig, c: &ModelCounts, world: i64) -> Vec<PlanLine> {
    let n = world.max(1) as u64;
    let (weights_div, grads_div, moments_div) = match (cfg.parallel.sharding, &cfg.optim.lora) {
        (Sharding::None, _) => (1, 1, 1),
        // LoRA's adapters stay whole; only their optimizer state is split
        (Sharding::Optimizer, _) | (Sharding::Full, Some(_)) => (1, 1, n),
        (Sharding::Full, None) => (n, n, n),
    };
    let master = kind_bytes(cfg.precision.master_kind()) * c.trained as u64;
    let of = |div: u64| format!("{} parameters / {div}", c.trained);
    let mut out = vec![
        line(
            "trained",
            "trained weights (float32 master)",
            master / weights_div,
            of(weights_div),
        ),
        line(
            "gradients",
            "gradients (float32)",
            master / grads_div,
            of(grads_div),
        ),
        line(
            "moments",
            "AdamW moments (2 x float32)",
            2 * master / moments_div,
            of(moments_div),
        ),
    ];
    if cfg.optim.ema.is_some() {
        let what = "EMA of the trained weights (float32)";
        out.push(line("ema", what, master / weights_div, of(weights_div)));
    }
    out
}

/// The weights a pass uses in the compute dtype beyond the stored ones: under
/// full sharding the gathered block; else, in bf16 over float32 master weights,
/// the bfloat16 copies autograd keeps for backward (one block with per-block
/// checkpointing, the whole model without).
fn compute_copies(cfg: &TrainConfig, c: &ModelCounts) -> Option<PlanLine> {
    let p = &cfg.precision;
    let compute = kind_bytes(p.compute_kind());
    let full_ft = cfg.optim.lora.is_none();
    let block = compute * c.largest_block as u64;
    let detail = format!("largest block, {} parameters", c.largest_block);
    if cfg.parallel.sharding == Sharding::Full && full_ft {
        return Some(match cfg.parallel.gather {
            crate::dist::Gather::PerBlock => line(
                "gathered_block",
                "gathered block (compute dtype)",
                block,
                detail,
            ),
            crate::dist::Gather::Iteration => {
                let what = "gathered model, once per iteration (compute dtype)";
                let bytes = compute * c.transformer as u64;
                line(
                    "gathered_block",
                    what,
                    bytes,
                    "gather = \"iteration\"".into(),
                )
            }
        });
    }
    if p.compute_kind() == p.master_kind() || !full_ft {
        return None;
    }
    let what = "bfloat16 weight copies kept for backward";
    Some(match cfg.optim.activation_checkpointing {
        ActivationCheckpointing::PerBlock => line("cast_copies", what, block, detail),
        ActivationCheckpointing::Off => {
            let bytes = compute * c.transformer as u64;
            line("cast_copies", what, bytes, "the whole model".into())
        }
    })
}

fn line(key: &str, what: &str, bytes: u64, detail: String) -> PlanLine {
    let field = match key {
        k if k.starts_with("frozen:rewards") => "rewards",
        k if k.starts_with("frozen:") => "model",
        _ => "parallel.sharding",
    };
    PlanLine {
        key: key.into(),
        what: what.into(),
        bytes,
        detail,
        field,
    }
}

/// Parses a memory size: `80GiB`, `80GB` (decimal), `512MiB`, `24G`; a bare
/// number is GiB. Errors name the text.
pub fn parse_memory(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        Error::Input(format!(
            "memory size `{text}`: want a number and a unit such as 80GiB"
        ))
    })?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "g" | "gib" => GIB,
        "gb" => 1e9,
        "m" | "mib" => (1u64 << 20) as f64,
        "mb" => 1e6,
        "t" | "tib" => GIB * 1024.0,
        "tb" => 1e12,
        other => {
            return Err(Error::Input(format!(
                "memory size `{text}`: unknown unit `{other}` (GiB, GB, MiB, MB, TiB, TB)"
            )))
        }
    };
    if !value.is_finite() {
        return Err(Error::Input(format!(
            "memory size `{text}` is not a number"
        )));
    }
    Ok((value * scale) as u64)
}

/// Whether `path` holds a configuration `plan` can read without weights.
pub fn has_configs(path: &Path) -> bool {
    path.join("transformer/config.json").is_file() && path.join("vae/config.json").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("80GiB").unwrap(), 80 << 30);
        assert_eq!(parse_memory("80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_memory("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_memory("24").unwrap(), 24 << 30);
        assert!(parse_memory("80XB")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_memory("lots").is_err());
        assert_eq!(parse_memory("0MiB").unwrap(), 0);
        assert!(parse_memory("-1GiB").is_err());
    }
}
