//! What a [`TrainConfig`] names, built: the models, the training and
//! evaluation prompt sets, the trained and the gold rewards. Errors name the
//! configuration field (`data.path`, `eval.data.path`, `rewards[1].path`).

use std::path::Path;
use std::rc::Rc;

use tch::{Device, Kind};

use super::config::{DataSource, ModelSource, TrainConfig};
use crate::data::{EmbeddingDataset, ReferenceSet};
use crate::data::{PromptSet, SyntheticPrompts};
use crate::dist::fsdp::{FullShard, ShardedModel, Split};
use crate::dist::{Collective, Sharding};
use crate::error::{Error, Result};
use crate::models::flux::{FluxConfig, FluxTransformer};
use crate::models::vae::{Vae, VaeConfig};
use crate::models::ActivationCheckpointing;
use crate::models::PolicyModel;
use crate::rewards::combine::WeightedSum;
use crate::rewards::spec::RewardSpec;
use crate::rewards::Reward;

/// The transformer and VAE a configuration names (base weights), on `device`,
/// in `[precision]`'s dtypes: the transformer stored in float32 (its master
/// weights) when it is trained whole, in the frozen dtype under LoRA (whose
/// adapters are float32), computing in the compute dtype; the VAE in the frozen
/// dtype. Each is read tensor by tensor from memory-mapped files straight into
/// its dtype.
pub fn build_models(cfg: &TrainConfig, device: Device) -> Result<(FluxTransformer, Vae)> {
    build_models_for(cfg, device, ModelUse::Training)
}

/// What a model is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelUse {
    /// Training: a whole transformer in its master dtype.
    Training,
    /// Sampling only (`generate`, `bench generate`, `serve`): the transformer
    /// stored in the frozen dtype (bfloat16 under `precision.mode = "bf16"`,
    /// half the memory and no cast per call; the same bits as casting per call).
    Inference,
}

/// [`build_models`] for `use_`.
pub fn build_models_for(
    cfg: &TrainConfig,
    device: Device,
    use_: ModelUse,
) -> Result<(FluxTransformer, Vae)> {
    let p = &cfg.precision;
    let storage = match (use_, &cfg.optim.lora) {
        (ModelUse::Inference, _) | (_, Some(_)) => p.frozen_kind(),
        (ModelUse::Training, None) => p.master_kind(),
    };
    let (mut model, vae) = match &cfg.model {
        ModelSource::Tiny { seed } => (
            FluxTransformer::new(
                FluxConfig::tiny(),
                crate::weights::Source::Seeded(*seed),
                storage,
                device,
            )?,
            Vae::new(
                VaeConfig::tiny(),
                crate::weights::Source::Seeded(seed + 1),
                p.frozen_kind(),
                device,
            )?,
        ),
        ModelSource::Dir { path } => (
            FluxTransformer::from_dir(&path.join("transformer"), storage, device)?,
            Vae::from_dir(&path.join("vae"), p.frozen_kind(), device)?,
        ),
        ModelSource::Random { path, seed } => {
            let flux = FluxConfig::from_file(&path.join("transformer").join("config.json"))?;
            let vae = VaeConfig::from_file(&path.join("vae").join("config.json"))?;
            let random = crate::weights::Source::Random(*seed);
            (
                FluxTransformer::new(flux, random, storage, device)?,
                Vae::new(vae, random, p.frozen_kind(), device)?,
            )
        }
    };
    model.set_compute_kind(p.compute_kind());
    model.set_checkpointing(cfg.optim.activation_checkpointing);
    if let Some(lora) = &cfg.optim.lora {
        model.attach_lora(lora, cfg.run.seed)?;
    }
    Ok((model, vae))
}

/// A LoRA run on the built-in tiny base (`model.kind = "tiny"`) writes that
/// base once as a diffusers transformer, `<run>/base/transformer/`, so the
/// adapters of its checkpoints can be loaded onto it (diffusers, peft). A
/// random stand-in (`"random"`) is not written: it is a timing model, rebuilt
/// from its config and seed where needed, and a FLUX.1-dev-sized one would
/// write 24 GB per run.
pub fn save_built_in_base(cfg: &TrainConfig, model: &FluxTransformer, dir: &Path) -> Result<()> {
    let built_in = matches!(cfg.model, ModelSource::Tiny { .. });
    let base = dir.join("base").join("transformer");
    if cfg.optim.lora.is_none() || !built_in || base.join("config.json").is_file() {
        return Ok(());
    }
    model.save_dir(&base)
}

/// A model as trained, and its sharded state when it is sharded.
pub type TrainedModel = (Box<dyn PolicyModel>, Option<Rc<FullShard>>);

/// The model as `[parallel] sharding` trains it: whole (`none`), or split
/// among the processes of `c` (`full`: ZeRO-3, with its sharded state).
/// Full sharding needs per-block activation checkpointing (units are gathered
/// and freed block by block in the backward pass) and trains the whole model.
pub fn shard(
    model: FluxTransformer,
    cfg: &TrainConfig,
    c: Rc<dyn Collective>,
) -> Result<TrainedModel> {
    let field = "parallel.sharding";
    match cfg.parallel.sharding {
        Sharding::None => Ok((Box::new(model), None)),
        Sharding::Optimizer | Sharding::Full => {
            let full = cfg.parallel.sharding == Sharding::Full;
            let lora = cfg.optim.lora.is_some();
            let per_block = cfg.optim.activation_checkpointing == ActivationCheckpointing::PerBlock;
            if full && !lora && !per_block {
                let msg = "`full` needs optim.activation_checkpointing = \"per_block\"";
                return Err(Error::config("config", field, msg));
            }
            // LoRA: the frozen base stays whole in every process (bf16); the
            // adapters' optimizer state is what is split, whichever mode
            let split = match full && !lora {
                true => Split::Everything,
                false => Split::Optimizer,
            };
            let p = &cfg.precision;
            let sharded = ShardedModel::new(model, c, p.compute_kind(), p.reduce, split)?;
            let state = sharded.state().clone();
            Ok((Box::new(sharded), Some(state)))
        }
    }
}

/// The training prompt set (`[data]`).
pub fn build_prompts(cfg: &TrainConfig, model: &dyn PolicyModel) -> Result<Box<dyn PromptSet>> {
    build_prompt_set(&cfg.data, "data", model)
}

/// The held-out evaluation prompt set (`[eval.data]`), if the configuration has one.
pub fn build_eval_prompts(
    cfg: &TrainConfig,
    model: &dyn PolicyModel,
) -> Result<Option<Box<dyn PromptSet>>> {
    cfg.eval
        .data
        .as_ref()
        .map(|source| build_prompt_set(source, "eval.data", model))
        .transpose()
}

/// The prompt set `source` names, checked against `model`'s embedding widths;
/// errors name `<section>.prompts` or `<section>.path`.
pub fn build_prompt_set(
    source: &DataSource,
    section: &str,
    model: &dyn PolicyModel,
) -> Result<Box<dyn PromptSet>> {
    let field = format!("{section}.path");
    let bad = |e: Error| Error::config("config", &field, e.to_string());
    match source {
        DataSource::Synthetic {
            prompts,
            seed,
            text_len,
        } => {
            if *prompts == 0 {
                let field = format!("{section}.prompts");
                return Err(Error::config("config", &field, "must be >= 1"));
            }
            Ok(Box::new(SyntheticPrompts {
                count: *prompts,
                seed: *seed,
                text_len: *text_len,
                text_dim: model.text_widths().text,
                pooled_dim: model.text_widths().pooled,
            }))
        }
        DataSource::Dataset { path } => {
            let data = EmbeddingDataset::open(path).map_err(bad)?;
            let widths = (data.info().text_dim, data.info().pooled_dim);
            check_widths(&field, path, widths, model)?;
            Ok(Box::new(data))
        }
        DataSource::Reference { path } => {
            let data = ReferenceSet::open(path).map_err(bad)?;
            let (_, text_dim, pooled_dim) = data.dims();
            check_widths(&field, path, (text_dim, pooled_dim), model)?;
            Ok(Box::new(data))
        }
    }
}

/// Fails, naming `field`, when embeddings of `(text, pooled)` widths do not fit `model`.
fn check_widths(
    field: &str,
    path: &Path,
    (text_dim, pooled_dim): (i64, i64),
    model: &dyn PolicyModel,
) -> Result<()> {
    let want = model.text_widths();
    if text_dim == want.text && pooled_dim == want.pooled {
        return Ok(());
    }
    Err(Error::config(
        "config",
        field,
        format!(
            "{}: embeddings of width {text_dim} (text) and {pooled_dim} (pooled) do not fit the model's joint_attention_dim {} and pooled_projection_dim {}",
            path.display(),
            want.text,
            want.pooled
        ),
    ))
}

/// The weighted rewards a configuration names, their models on `device`. A
/// reward that cannot be built is an error naming its field (`rewards[i].path`).
pub fn build_rewards(cfg: &TrainConfig, device: Device) -> Result<WeightedSum> {
    let kind = cfg.precision.frozen_kind();
    Ok(WeightedSum::new(build_specs(
        &cfg.rewards,
        "rewards",
        kind,
        device,
    )?))
}

/// The evaluation-only rewards of a configuration.
pub fn build_gold_rewards(cfg: &TrainConfig, device: Device) -> Result<Vec<Box<dyn Reward>>> {
    let kind = cfg.precision.frozen_kind();
    let built = build_specs(&cfg.eval.gold_rewards, "eval.gold_rewards", kind, device)?;
    Ok(built.into_iter().map(|(reward, _)| reward).collect())
}

/// Builds each spec of `specs` with its weight; errors name `<field>[i].<source field>`.
fn build_specs(
    specs: &[RewardSpec],
    field: &str,
    kind: Kind,
    device: Device,
) -> Result<Vec<(Box<dyn Reward>, f64)>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let reward = spec.build_in(kind, device).map_err(|e| {
                let name = format!("{field}[{i}].{}", spec.source_field());
                Error::config(field, &name, e.to_string())
            })?;
            Ok((reward, spec.weight()))
        })
        .collect()
}
