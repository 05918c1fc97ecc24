//! Shared set-up of the GRPO stages (`train`, `grads`, `optimizer`,
//! `end_to_end`): the case's model, conditioning, schedule, recorded draws and
//! update settings, and an observer that records what the update did.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::{Case, Precision};
use crate::error::{Error, Result};
use crate::grpo::update::TransitionBatch;
use crate::grpo::{
    AdamW, AdamWConfig, Grouping, LrSchedule, RewardMixing, Trainable, UpdateBatching,
    UpdateConfig, UpdateObserver,
};
use crate::models::flux::FluxTransformer;
use crate::nn::upcast_kind;
use crate::precision::ReduceDtype;
use crate::sampler::{Conditioning, Recorded, Rollout, Schedule};
use crate::train::config::{AdvantageGrouping, TrainConfig};

/// Everything a GRPO iteration needs from a case (the align stages and `bench train`).
pub struct GrpoCase {
    /// The case's transformer (f32, CPU).
    pub model: FluxTransformer,
    /// The batch's prompt conditioning.
    pub cond: Conditioning,
    /// The sampling schedule.
    pub schedule: Schedule,
    /// The recorded random draws.
    pub draws: Recorded,
    /// The update settings from `case.json`.
    pub cfg: UpdateConfig,
    /// AdamW settings from `case.json`.
    pub adam: AdamWConfig,
}

impl GrpoCase {
    /// Loads the case's model, conditioning, schedule, draws and settings (f32, CPU).
    pub fn load(case: &Case) -> Result<Self> {
        Self::load_on(case, Kind::Float, case.device())
    }

    /// [`Self::load`] with the model stored and computing as `precision` says.
    pub fn load_in(case: &Case, precision: Precision) -> Result<Self> {
        let mut g = Self::load_on(case, precision.model_kind(), case.device())?;
        g.model.set_compute_kind(precision.compute_kind());
        Ok(g)
    }

    /// [`Self::load`] with the model in `kind` and model and conditioning on
    /// `device`; the conditioning and the SDE run in float32 (float64 for a
    /// float64 model).
    pub fn load_on(case: &Case, kind: Kind, device: Device) -> Result<Self> {
        let model = FluxTransformer::from_dir(&case.dir().join("transformer"), kind, device)?;
        let state_kind = upcast_kind(kind);
        let cond = case.conditioning_on(model.config().guidance_embeds, state_kind, device)?;
        let schedule = Schedule::shifted_in(
            case.hyper_i64("sampling_steps")?,
            case.hyper_f64("shift")?,
            state_kind,
        );
        let draws = Recorded::new(
            case.input("init_noise")?,
            case.input("sde_noise")?,
            case.input("perms")?,
        )?;
        let train = train_config(case)?;
        let cfg = train.iteration_config().update;
        let adam = train.adam();
        Ok(GrpoCase {
            model,
            cond,
            schedule,
            draws,
            cfg,
            adam,
        })
    }

    /// A fresh optimizer over the model's parameters.
    pub fn optimizer(&self) -> AdamW {
        let params: Vec<Tensor> = crate::models::VelocityModel::parameters(&self.model)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        AdamW::new(self.adam, &params)
    }
}

/// The case's hyperparameters as a trainer configuration, so that a fixture and
/// a user's run reach the engine through the same mapping
/// ([`TrainConfig::iteration_config`], [`TrainConfig::adam`]). Fields the case
/// does not set keep the tiny default's values.
pub fn train_config(case: &Case) -> Result<TrainConfig> {
    let file = case.dir().join("case.json");
    let scheduler = case.hyper("lr_scheduler")?.as_str().unwrap_or_default();
    if scheduler != "constant_with_warmup" {
        return Err(Error::config(
            &file,
            "hyperparameters.lr_scheduler",
            format!("`{scheduler}` is not supported (constant_with_warmup is)"),
        ));
    }
    let betas = case
        .hyper("adam_betas")?
        .as_array()
        .cloned()
        .unwrap_or_default();
    let beta = |i: usize| betas.get(i).and_then(|b| b.as_f64());
    let (Some(b1), Some(b2)) = (beta(0), beta(1)) else {
        return Err(Error::config(
            &file,
            "hyperparameters.adam_betas",
            "want two numbers",
        ));
    };
    let mut t = TrainConfig::tiny_demo();
    t.sampler.eta = case.hyper_f64("eta")?;
    t.sampler.group_size = case.group_size()?;
    t.grpo.grouping = match case.grouping()? {
        Grouping::Global => AdvantageGrouping::Global,
        Grouping::PerPrompt { .. } => AdvantageGrouping::PerPrompt,
    };
    t.grpo.clip_range = case.hyper_f64("clip_range")?;
    t.grpo.timestep_fraction = case.hyper_f64("timestep_fraction")?;
    t.grpo.adv_clip_max = case.hyper_f64("adv_clip_max")?;
    t.grpo.trainable = Trainable::AllButLast;
    t.grpo.reward_mixing = RewardMixing::Reward;
    let o = &mut t.optim;
    o.gradient_accumulation = case.hyper_i64("gradient_accumulation_steps")?;
    o.max_grad_norm = case.hyper_f64("max_grad_norm")?;
    o.learning_rate = case.hyper_f64("learning_rate")?;
    o.lr_schedule = LrSchedule::ConstantWithWarmup {
        warmup_steps: case.hyper_i64("lr_warmup_steps")? as u64,
    };
    o.update_batching = UpdateBatching::PerSample;
    o.betas = (b1, b2);
    o.eps = case.hyper_f64("adam_eps")?;
    o.weight_decay = case.hyper_f64("weight_decay")?;
    t.precision.reduce = ReduceDtype::Fp32;
    t.health.max_failed_reward_share = 1.0;
    Ok(t)
}

/// The stored rollout (`sample/latents`, `sample/log_probs`) in `kind`, one
/// sample per model batch as the reference.
pub(super) fn stored_rollout(case: &Case, kind: Kind) -> Result<Rollout> {
    let on = |name: &str| -> Result<Tensor> {
        Ok(case.expected(name)?.to_kind(kind).to_device(case.device()))
    };
    let (latents, log_probs, pred_x0) = (
        on("sample/latents")?,
        on("sample/log_probs")?,
        on("sample/pred_x0")?,
    );
    let b = latents.size()[0];
    let last = pred_x0.size()[1] - 1;
    Ok(Rollout {
        latents,
        log_probs,
        pred_x0: pred_x0.select(1, last),
        means: None,
        batches: (0..b).map(|s| vec![s]).collect(),
        tree: None,
        model_rows: 0,
        kept: Default::default(),
    })
}

/// Records every trained transition, the first window's gradients and the
/// parameters after each optimizer step; optionally replaces the parameters
/// after each step (teacher forcing of later windows).
#[derive(Default)]
pub(super) struct Recorder {
    /// `name -> (b, k) -> tensor` for the `train/*` tensors.
    pub train: BTreeMap<String, BTreeMap<(i64, i64), Tensor>>,
    /// Accumulated gradients before the first optimizer step.
    pub grads0: Vec<(String, Tensor)>,
    /// Parameters after each step.
    pub params_after: Vec<Vec<(String, Tensor)>>,
    /// Parameters to load after step `s` (`force_after[s - 1]`), where given.
    pub force_after: Vec<Vec<Tensor>>,
}

impl Recorder {
    /// The recorded `train/<name>` as a `(B, T, ..)` tensor.
    pub fn stacked(&self, name: &str) -> Tensor {
        let Some(rows) = self.train.get(name) else {
            return Tensor::new();
        };
        let b_max = rows.keys().map(|(b, _)| *b).max().unwrap_or(0);
        let per_b: Vec<Tensor> = (0..=b_max)
            .map(|b| {
                let ks: Vec<Tensor> = rows
                    .range((b, i64::MIN)..(b + 1, i64::MIN))
                    .map(|(_, t)| t.shallow_clone())
                    .collect();
                Tensor::stack(&ks, 0)
            })
            .collect();
        Tensor::stack(&per_b, 0)
    }

    fn put(&mut self, name: &str, b: i64, k: i64, t: Tensor) {
        self.train
            .entry(name.to_string())
            .or_default()
            .insert((b, k), t);
    }
}

fn copy_named(params: &[(String, Tensor)], grad: bool) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, p)| {
            (
                n.clone(),
                if grad {
                    p.grad().copy()
                } else {
                    p.detach().copy()
                },
            )
        })
        .collect()
}

impl UpdateObserver for Recorder {
    fn transitions(&mut self, x: &TransitionBatch) -> Result<()> {
        for &r in x.active {
            let (b, k) = (x.samples[r as usize], x.positions[r as usize]);
            let row = |t: &Tensor| t.get(r).detach().copy();
            let j = x.steps[r as usize];
            self.put("sigma_index", b, k, Tensor::from(j));
            self.put("timestep_input", b, k, row(x.timestep_input));
            self.put("latents", b, k, row(x.latents));
            self.put("next_latents", b, k, row(x.next_latents));
            self.put("model_output", b, k, row(x.model_output));
            self.put("old_log_probs", b, k, row(x.old_log_probs));
            self.put("new_log_probs", b, k, row(x.new_log_probs));
            self.put("log_ratio", b, k, row(&(x.new_log_probs - x.old_log_probs)));
            self.put("ratio", b, k, row(&x.terms.ratio));
            self.put("ratio_clamped", b, k, row(&x.terms.ratio_clamped));
            self.put("unclipped_loss", b, k, row(&x.terms.unclipped));
            self.put("clipped_loss", b, k, row(&x.terms.clipped));
            self.put("loss", b, k, row(&x.terms.loss));
        }
        Ok(())
    }

    fn before_step(&mut self, step: u64, params: &[(String, Tensor)]) -> Result<()> {
        if step == 1 {
            self.grads0 = copy_named(params, true);
        }
        Ok(())
    }

    fn after_step(&mut self, step: u64, params: &[(String, Tensor)]) -> Result<()> {
        self.params_after.push(copy_named(params, false));
        if let Some(forced) = self.force_after.get(step as usize - 1) {
            let _guard = tch::no_grad_guard();
            for ((_, p), f) in params.iter().zip(forced) {
                p.shallow_clone().copy_(f);
            }
        }
        Ok(())
    }
}

/// The case's `<prefix>/<name>` for every parameter, in model order.
pub(super) fn stored_params(
    case: &Case,
    prefix: &str,
    names: &[(String, Tensor)],
) -> Result<Vec<Tensor>> {
    names
        .iter()
        .map(|(n, _)| case.expected(&format!("{prefix}/{n}")))
        .collect()
}
