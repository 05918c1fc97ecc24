//! The GRPO update over one iteration's rollouts: per sample, a random subset of
//! its transitions is re-evaluated with gradients, the clipped policy-ratio loss
//! is back-propagated at once (one graph alive at a time), and every
//! `grad_accum` samples the gradients are clipped and AdamW steps.
//!
//! Transitions are recomputed in exactly the model batches the rollout used
//! (same samples, same rows), so in the first accumulation window the new
//! log-probabilities equal the rollout's bit for bit and every ratio is exactly 1.

use tch::{Kind, Tensor};

use super::guard::{normalized_log_ratio, row_weights, step_weights};
use super::loss::{clipped_loss_of_log_ratio, clipped_mask, step_kl, PolicyLoss};
use super::optim::AdamW;
use crate::dist::Shard;
use crate::error::{Error, Result};
use crate::models::VelocityModel;
use crate::sampler::sde::{At, Next};
use crate::sampler::tree::Tree;
use crate::sampler::{Conditioning, Draws, Rollout, SampleConditioning, Schedule};

pub use super::batches::{first_window_plan, rollout_windows};
use super::batches::{flat_transitions, ks_chunks, trained_steps, update_chunks, Rows, Windows};
pub use super::observer::{NoObserver, TransitionBatch, UpdateObserver};
use super::tree_rows::{check_tree_layout, tree_batches};

pub use super::settings::{FirstWindow, Trainable, UpdateBatching, UpdateConfig};

/// What an update did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UpdateStats {
    /// Sum of the per-transition losses in the reference's order (its `total_loss`).
    pub total_loss: f64,
    /// Per-transition losses `[b][k]` (float32 values, exact, in a float32 run).
    pub losses: Vec<Vec<f64>>,
    /// Gradient norm before clipping, per optimizer step (non-finite: skipped).
    pub grad_norms: Vec<f64>,
    /// Optimizer steps skipped because their gradient norm was not finite
    /// (the weights left as they were, the gradients dropped).
    pub skipped_steps: usize,
    /// Learning rate of each optimizer step.
    pub lrs: Vec<f64>,
    /// Mean, min and max policy ratio over trained transitions.
    pub ratio_mean: f64,
    /// See `ratio_mean`.
    pub ratio_min: f64,
    /// See `ratio_mean`.
    pub ratio_max: f64,
    /// Share of trained transitions with `|ratio - 1| > clip_range`.
    pub clip_fraction: f64,
    /// Mean KL to the reference policy over trained transitions (0 without a KL term).
    pub kl_mean: f64,
    /// Trained transitions (of the leaves, in a tree).
    pub transitions: usize,
    /// Rows this process's model evaluated (with gradients, and the
    /// reference's without): one per trained transition in a plain rollout.
    pub local_model_rows: u64,
    /// Samples after the last full accumulation window: trained but never stepped
    /// (the reference's behaviour when `B % grad_accum != 0`).
    pub unstepped_samples: i64,
}

/// Everything the update reads.
pub struct UpdateInputs<'a> {
    /// The rollouts (trajectories, log-probs, model batches), one row per local sample.
    pub rollout: &'a Rollout,
    /// Which samples of the iteration the rows are (all of them in one process).
    pub shard: &'a Shard<'a>,
    /// Clamped advantages `(B,)` of the local samples.
    pub advantages: &'a Tensor,
    /// The conditioning the rollout used.
    pub cond: &'a Conditioning,
    /// The rollout's schedule.
    pub schedule: &'a Schedule,
    /// The iteration's random draws (permutations).
    pub draws: &'a dyn Draws,
}

/// Runs the GRPO update of one iteration on `model` with `optimizer`.
pub fn grpo_update(
    model: &dyn VelocityModel,
    optimizer: &mut AdamW,
    inputs: &UpdateInputs,
    cfg: &UpdateConfig,
    observer: &mut dyn UpdateObserver,
) -> Result<UpdateStats> {
    let (n, t) = cfg.trained(inputs.schedule.steps())?;
    let b_local = check_inputs(inputs, cfg)?;
    let tree = inputs.rollout.tree.as_ref();
    let perms = trained_steps(inputs.draws, tree, cfg, (n, t), b_local)?;
    let named = model.parameters();
    let params: Vec<Tensor> = named.iter().map(|(_, p)| p.shallow_clone()).collect();
    zero_grads(&params);
    let mut run = Run {
        model,
        inputs,
        cfg,
        perms,
        t,
        weights: guard_weights(cfg, inputs.schedule, n)?,
        stats: UpdateStats {
            unstepped_samples: inputs.shard.total() % cfg.grad_accum,
            ..Default::default()
        },
        terms: vec![std::array::from_fn(|_| vec![0.0; t as usize]); b_local as usize],
    };
    let windows = Windows::new(inputs.shard, cfg.grad_accum);
    let window = |row: i64| windows.of(row);
    for samples in &update_chunks(cfg.batching, &inputs.rollout.batches, b_local, window) {
        let mut ids: Vec<i64> = samples.iter().map(|&r| window(r)).collect();
        ids.dedup();
        for w in ids {
            let active: Vec<i64> = (0..samples.len() as i64)
                .filter(|&r| window(samples[r as usize]) == w)
                .collect();
            for rows in run.batches(samples, &active, tree)? {
                run.evaluate(&rows, observer)?;
            }
            if windows.steps_after(w, samples) {
                run.optimizer_step(optimizer, &named, &params, observer)?;
            }
        }
    }
    check_kept_used(inputs.rollout)?;
    run.finish()
}

/// Checks that the advantages, the shard and a tree agree with the rollout;
/// the number of local samples.
fn check_inputs(inputs: &UpdateInputs, cfg: &UpdateConfig) -> Result<i64> {
    let b_local = inputs.rollout.latents.size()[0];
    if inputs.advantages.size() != [b_local] {
        return Err(Error::Input(format!(
            "{} advantages for {b_local} samples",
            inputs.advantages.size().first().copied().unwrap_or(0)
        )));
    }
    if inputs.shard.samples().len() as i64 != b_local {
        return Err(Error::Input(format!(
            "a shard of {} samples for {b_local} rollout samples",
            inputs.shard.samples().len()
        )));
    }
    if let Some(tree) = inputs.rollout.tree.as_ref() {
        check_tree_layout(tree, (inputs.rollout, inputs.shard), cfg)?;
    }
    if cfg.guard.ratio_norm() && inputs.rollout.means.is_none() {
        return Err(Error::Input(
            "GRPO-Guard's ratio normalisation needs the rollout's step means (RolloutSettings::means = Keep)".into(),
        ));
    }
    Ok(b_local)
}

/// GRPO-Guard's weight of each transition of the schedule, when it
/// re-weights gradients (`n` trained transitions without a window).
fn guard_weights(cfg: &UpdateConfig, schedule: &Schedule, n: i64) -> Result<Option<Vec<f64>>> {
    if !cfg.guard.grad_reweight() {
        return Ok(None);
    }
    let sigmas: Vec<f64> = Vec::try_from(schedule.sigmas.to_kind(Kind::Double))?;
    let trained: Vec<i64> = match cfg.window {
        Some(w) => w.steps(),
        None => (0..n).collect(),
    };
    Ok(Some(step_weights(cfg.sde, &sigmas, cfg.eta, &trained)))
}

/// An error when the rollout kept velocities for the first window that the
/// update did not train (they are dropped either way).
fn check_kept_used(rollout: &Rollout) -> Result<()> {
    let unused = rollout.kept.len();
    if unused == 0 {
        return Ok(());
    }
    rollout.kept.clear();
    Err(Error::Input(format!(
        "{unused} velocity groups the rollout kept for the first window were not trained: \
         the rollout's capture plan and the update's configuration disagree"
    )))
}

fn zero_grads(params: &[Tensor]) {
    for p in params {
        if p.grad().defined() {
            p.shallow_clone().zero_grad();
        }
    }
}

/// The values recorded per trained transition (see [`Run::terms`]).
const TERMS: usize = 4;

/// State of one update while it runs.
struct Run<'a> {
    model: &'a dyn VelocityModel,
    inputs: &'a UpdateInputs<'a>,
    cfg: &'a UpdateConfig,
    perms: Vec<Vec<i64>>,
    t: i64,
    /// GRPO-Guard's weight of each transition of the schedule, when re-weighting.
    weights: Option<Vec<f64>>,
    stats: UpdateStats,
    /// Per local sample: loss, ratio, clipped (0/1) and KL of each trained position.
    terms: Vec<[Vec<f64>; TERMS]>,
}

/// The rollout's tensors of one model batch's transitions (`n` rows).
struct Picked {
    /// The model rows' states `(m, L, c)` and timesteps `(m,)`.
    z_model: Tensor,
    /// See `z_model`.
    ts: Tensor,
    /// The model rows' conditioning.
    cond: SampleConditioning,
    /// `z_j` and `z_{j+1}` of each transition `(n, L, c)`.
    z: Tensor,
    /// See `z`.
    z_next: Tensor,
    /// The rollout's step means `(n, L, c)`, for GRPO-Guard's normalised ratio.
    mean_old: Option<Tensor>,
    /// The rollout's log-probabilities `(n,)`.
    old_lp: Tensor,
    /// Each row's weight in the loss `(n,)`, if not 1.
    weights: Option<Tensor>,
    /// The active rows `(a,)`, and whether that is every row.
    active: Tensor,
    /// See `active`.
    all_active: bool,
    /// Each transition's model row `(n,)` (`None`: the model rows themselves).
    expand: Option<Tensor>,
}

impl Picked {
    /// A model-row tensor `(m, ..)` spread to the transitions `(n, ..)`.
    fn expand(&self, t: &Tensor) -> Tensor {
        spread(self.expand.as_ref(), t)
    }
}

/// `t` `(m, ..)` at the model rows `expand` `(n,)` (`None`: `t` itself).
fn spread(expand: Option<&Tensor>, t: &Tensor) -> Tensor {
    match expand {
        None => t.shallow_clone(),
        Some(e) => t.index_select(0, e),
    }
}

/// What one model batch's loss was computed from (detached).
struct Evaluated {
    /// The velocity of each transition `(n, L, c)`.
    velocity: Tensor,
    /// The recomputed log-probabilities `(n,)`.
    log_prob: Tensor,
    /// The loss terms `(n,)`.
    terms: PolicyLoss,
    /// The KL to the reference policy `(n,)`, with a KL term.
    kl: Option<Tensor>,
}

impl Run<'_> {
    /// The model batches training the `active` rows of the model batch
    /// `samples` (one per trained position, or fewer with [`UpdateBatching::Window`]).
    fn batches(&self, samples: &[i64], active: &[i64], tree: Option<&Tree>) -> Result<Vec<Rows>> {
        let advantages = self.inputs.advantages;
        if let Some(tree) = tree {
            let window: Vec<i64> = active.iter().map(|&r| samples[r as usize]).collect();
            return tree_batches(tree, samples, &window, &self.perms, advantages);
        }
        let ks = ks_chunks(self.cfg, self.t, samples.len() as i64);
        Ok(ks
            .iter()
            .map(|ks| self.flat_rows(samples, active, ks))
            .collect())
    }

    /// Transitions `ks` (k-major: for each `k`, every sample of `samples`)
    /// in one model batch, the `active` rows of each `k` trained.
    fn flat_rows(&self, samples: &[i64], active: &[i64], ks: &[i64]) -> Rows {
        let n = samples.len() as i64;
        let (rows, steps) = flat_transitions(&self.perms, samples, ks);
        let idx = Tensor::from_slice(&rows).to_device(self.inputs.advantages.device());
        Rows {
            model_samples: rows.clone(),
            model_steps: steps.clone(),
            expand: None,
            positions: ks
                .iter()
                .flat_map(|&k| samples.iter().map(move |_| k))
                .collect(),
            adv: self.inputs.advantages.index_select(0, &idx), // (n * |ks|,)
            samples: rows,
            steps,
            leaves: None,
            active: (0..ks.len() as i64)
                .flat_map(|i| active.iter().map(move |&r| i * n + r))
                .collect(),
        }
    }

    /// Re-evaluates the model rows of `rows`, computes the loss of its
    /// transitions and back-propagates that of the active ones.
    fn evaluate(&mut self, rows: &Rows, observer: &mut dyn UpdateObserver) -> Result<()> {
        let inp = self.inputs;
        let picked = self.pick(rows);
        let flow_inputs = inp.cond.inputs(&picked.cond, &picked.z_model, &picked.ts);
        let v_ref = (self.reference_velocity(&flow_inputs)?).map(|v| picked.expand(&v));
        // the rollout's velocity of exactly these transitions, with its graph
        let kept_v = match (&rows.expand, &rows.leaves) {
            (None, None) => {
                let key: Vec<(i64, i64)> = (rows.samples.iter().copied())
                    .zip(rows.steps.iter().copied())
                    .collect();
                inp.rollout.kept.take(&key)
            }
            _ => None,
        };
        let evaluated = rows.model_samples.len() as u64;
        let forward = if kept_v.is_some() { 0 } else { evaluated };
        self.stats.local_model_rows += forward + if v_ref.is_some() { evaluated } else { 0 };
        let mut kept: Option<Evaluated> = None;
        let mut loss_fn = |v: &Tensor| -> Result<Tensor> {
            let (loss, evaluated) = self.loss(rows, &picked, v_ref.as_ref(), v);
            kept = Some(evaluated);
            Ok(loss)
        };
        match kept_v {
            Some(v) => loss_fn(&v)?.backward(),
            None => drop(self.model.velocity_backward(&flow_inputs, &mut loss_fn)?),
        }
        let e = kept.expect("the loss function ran");
        let ones = vec![1; rows.samples.len()];
        let leaves = rows.leaves.as_deref().unwrap_or(&ones);
        self.record(rows, leaves, &e.terms, e.kl.as_ref())?;
        observer.transitions(&TransitionBatch {
            samples: &rows.samples,
            active: &rows.active,
            positions: &rows.positions,
            steps: &rows.steps,
            leaves,
            timestep_input: &picked.expand(&picked.ts),
            latents: &picked.z,
            next_latents: &picked.z_next,
            model_output: &e.velocity,
            old_log_probs: &picked.old_lp,
            new_log_probs: &e.log_prob,
            terms: &e.terms,
            kl: e.kl.as_ref(),
        })
    }

    /// The rollout's tensors of the transitions of `rows`.
    fn pick(&self, rows: &Rows) -> Picked {
        let inp = self.inputs;
        let device = inp.rollout.latents.device();
        let pick = |t: &Tensor, samples: &[i64], steps: &[i64], offset: i64| {
            let picked: Vec<Tensor> = (samples.iter().zip(steps))
                .map(|(&b, &j)| t.get(b).get(j + offset))
                .collect();
            Tensor::stack(&picked, 0) // (n, ...)
        };
        let (samples, steps) = (&rows.samples, &rows.steps);
        let latents = &inp.rollout.latents;
        let z_model = pick(latents, &rows.model_samples, &rows.model_steps, 0);
        let expand = (rows.expand.as_ref()).map(|e| Tensor::from_slice(e).to_device(device));
        let s = inp.rollout.log_probs.size()[1];
        let flat: Vec<i64> = (samples.iter().zip(steps))
            .map(|(&b, &j)| b * s + j)
            .collect();
        let flat = Tensor::from_slice(&flat).to_device(device);
        Picked {
            z: spread(expand.as_ref(), &z_model), // (n, L, c)
            z_model,
            z_next: pick(latents, samples, steps, 1),
            // the rollout's step means (n, L, c), for the normalised ratio
            mean_old: (inp.rollout.means.as_ref())
                .filter(|_| self.cfg.guard.ratio_norm())
                .map(|m| pick(m, samples, steps, 0)),
            old_lp: inp.rollout.log_probs.reshape([-1]).index_select(0, &flat), // (n,)
            ts: (inp.schedule.model_timesteps(&rows.model_steps)).to_device(device),
            cond: inp.cond.for_samples(&rows.model_samples),
            weights: self.row_weights(rows).map(|w| w.to_device(device)),
            active: Tensor::from_slice(&rows.active).to_device(device),
            all_active: rows.active.len() == samples.len(),
            expand,
        }
    }

    /// The loss of the transitions of `rows` whose velocities are `v` (the
    /// model rows'), summed over the active rows and scaled as the
    /// reference's per-transition `backward`, and what it was made of.
    fn loss(
        &self,
        rows: &Rows,
        p: &Picked,
        v_ref: Option<&Tensor>,
        v: &Tensor,
    ) -> (Tensor, Evaluated) {
        let (sde, eta) = (self.cfg.sde, self.cfg.eta);
        let scale = (self.cfg.grad_accum * self.t) as f64;
        let v = p.expand(v); // (n, L, c)
        let at = At::Rows(&rows.steps);
        let sigmas = &self.inputs.schedule.sigmas;
        let step = sde.step(&v, &p.z, sigmas, at, eta, Next::Given(&p.z_next));
        let log_ratio = match &p.mean_old {
            Some(old) => normalized_log_ratio(&step, old),
            None => &step.log_prob - &p.old_lp,
        };
        let terms = clipped_loss_of_log_ratio(&log_ratio, &rows.adv, self.cfg.clip_range, scale);
        // beta * KL joins each transition's loss, scaled as the policy term
        let kl = v_ref.map(|vr| {
            step_kl(
                &step,
                &sde.step(vr, &p.z, sigmas, at, eta, Next::Given(&p.z_next)),
            )
        });
        let per_row = match &kl {
            Some(kl) => &terms.loss + kl * (self.cfg.kl_beta / scale),
            None => terms.loss.shallow_clone(),
        };
        let per_row = match &p.weights {
            Some(w) => &per_row * w.to_kind(per_row.kind()),
            None => per_row,
        };
        let loss = match p.all_active {
            true => per_row.sum(per_row.kind()),
            false => (per_row.index_select(0, &p.active)).sum(per_row.kind()),
        };
        let evaluated = Evaluated {
            velocity: v.detach(),
            log_prob: step.log_prob.detach(),
            terms,
            kl: kl.map(|k| k.detach()),
        };
        (loss, evaluated)
    }

    /// Each row's weight in the loss: GRPO-Guard's step weight times the
    /// leaves it stands for (`None`: 1 each).
    fn row_weights(&self, rows: &Rows) -> Option<Tensor> {
        let guard = (self.weights.as_ref()).map(|w| row_weights(w, &rows.steps));
        let leaves = (rows.leaves.as_ref()).map(|l| {
            let l: Vec<f32> = l.iter().map(|&x| x as f32).collect();
            Tensor::from_slice(&l)
        });
        match (guard, leaves) {
            (Some(g), Some(l)) => Some(g * l),
            (g, l) => g.or(l),
        }
    }

    /// The reference policy's velocity when the loss has a KL term (an
    /// error when the model holds no reference).
    fn reference_velocity(&self, inputs: &crate::models::FlowInputs) -> Result<Option<Tensor>> {
        if self.cfg.kl_beta == 0.0 {
            return Ok(None);
        }
        match self.model.reference_velocity(inputs)? {
            Some(v) => Ok(Some(v)),
            None => Err(Error::Input(format!(
                "a KL term (beta {}) needs a reference policy and this model holds none: \
                 train LoRA adapters (the reference is then the model with them off)",
                self.cfg.kl_beta
            ))),
        }
    }

    /// Adds the active rows' losses, ratios and KL terms to the statistics
    /// of every leaf they stand for (a node of `size` leaves back-propagates
    /// `size` times its loss: each leaf records it once).
    fn record(
        &mut self,
        rows: &Rows,
        leaves: &[i64],
        terms: &PolicyLoss,
        kl: Option<&Tensor>,
    ) -> Result<()> {
        let values = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(Vec::try_from(
                &t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Double),
            )?)
        };
        let (loss, ratio) = (values(&terms.loss)?, values(&terms.ratio)?);
        let kl = match kl {
            Some(kl) => values(kl)?,
            None => vec![0.0; loss.len()],
        };
        let clipped: Vec<bool> = Vec::try_from(
            &clipped_mask(&terms.ratio.detach(), self.cfg.clip_range).to_device(tch::Device::Cpu),
        )?;
        for &r in &rows.active {
            let r = r as usize;
            let (b, k, size) = (rows.samples[r], rows.positions[r] as usize, leaves[r]);
            for leaf in b..b + size {
                let [l, q, c, d] = &mut self.terms[leaf as usize];
                l[k] = loss[r];
                q[k] = ratio[r];
                c[k] = clipped[r] as u8 as f64;
                d[k] = kl[r];
            }
        }
        Ok(())
    }

    /// Clips, steps AdamW at the scheduled learning rate and zeroes the
    /// gradients; with a non-finite gradient norm (the same in every process)
    /// only drops the gradients and counts the step as skipped.
    fn optimizer_step(
        &mut self,
        optimizer: &mut AdamW,
        named: &[(String, Tensor)],
        params: &[Tensor],
        observer: &mut dyn UpdateObserver,
    ) -> Result<()> {
        let step = optimizer.steps() + 1;
        let c = self.inputs.shard.collective();
        self.model.reduce_gradients(c, self.cfg.grad_reduce)?;
        observer.before_step(step, named)?;
        let norm = self.model.clip_gradients(c, self.cfg.max_grad_norm)?;
        let norm = norm.double_value(&[]);
        let lr = self
            .cfg
            .lr_schedule
            .lr(self.cfg.learning_rate, optimizer.steps());
        self.stats.grad_norms.push(norm);
        self.stats.lrs.push(lr);
        if !norm.is_finite() {
            zero_grads(params);
            self.stats.skipped_steps += 1;
            return Ok(());
        }
        optimizer.step(params, lr);
        self.model.parameters_changed()?;
        zero_grads(params);
        observer.after_step(step, named)
    }

    /// The statistics over every sample of the iteration (all processes).
    fn finish(mut self) -> Result<UpdateStats> {
        let t = self.t as usize;
        let local: Vec<f64> = self.terms.iter().flat_map(|x| x.concat()).collect();
        let local = Tensor::from_slice(&local).view([-1, TERMS as i64, self.t]); // (n, 4, T)
        let all: Vec<f64> = Vec::try_from(&self.inputs.shard.gather(&local)?.reshape([-1]))?;
        let per_sample: Vec<&[f64]> = all.chunks(TERMS * t).collect();
        let term = |i: usize| per_sample.iter().flat_map(move |x| &x[i * t..(i + 1) * t]);
        self.stats.losses = per_sample.iter().map(|x| x[..t].to_vec()).collect();
        let ratios: Vec<f64> = term(1).copied().collect();
        let clipped: f64 = term(2).sum();
        let kl: f64 = term(3).sum();
        // the reference sums `loss.item()` sample by sample, transition by transition
        self.stats.total_loss = self.stats.losses.iter().flatten().sum();
        let n = ratios.len().max(1) as f64;
        self.stats.transitions = ratios.len();
        self.stats.ratio_mean = ratios.iter().sum::<f64>() / n;
        self.stats.ratio_min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        self.stats.ratio_max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        self.stats.clip_fraction = clipped / n;
        self.stats.kl_mean = kl / n;
        Ok(self.stats)
    }
}
