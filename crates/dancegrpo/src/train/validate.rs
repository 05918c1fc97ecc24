//! Validation of a [`TrainConfig`]: every rule names the field it checks.

use std::path::Path;

use super::config::{AdvantageGrouping, DataSource, EvalParallel, ModelSource, TrainConfig};
use crate::data::format::INFO_FILE;
use crate::data::reference::INDEX_FILE;
use crate::dist::Sharding;
use crate::error::{Error, Result};
use crate::grpo::{FirstWindow, UpdateBatching};
use crate::models::ActivationCheckpointing;
use crate::sampler::tree::Tree;
use crate::sampler::{CachePolicy, PostWindow};

type Rule<'a> = (&'a str, bool, String);

/// The largest image side accepted (FLUX is trained up to 2 megapixels; this
/// only keeps absurd sizes from reaching an allocation).
const MAX_SIDE: i64 = 16384;

/// The most samples an iteration may have (the reference trains 12-48 per GPU).
const MAX_SAMPLES: i64 = 1 << 20;

impl TrainConfig {
    /// Checks every field; the error names the first offending one (`origin` is the file).
    pub fn validate(&self, origin: &Path) -> Result<()> {
        for (field, ok, msg) in self.field_rules() {
            if !ok {
                return Err(Error::config(origin, field, msg));
            }
        }
        self.check_options(origin)?;
        check_model(&self.model, origin)?;
        check_data(&self.data, "data", origin)?;
        if let Some(eval) = &self.eval.data {
            check_data(eval, "eval.data", origin)?;
        }
        for (i, spec) in self.rewards.iter().enumerate() {
            if let Some((field, msg)) = spec.check() {
                return Err(Error::config(origin, &format!("rewards[{i}].{field}"), msg));
            }
        }
        self.check_sampler_options(origin)?;
        self.check_eval_cache(origin)?;
        // the update's own count (the fields it also checks were checked above)
        if let Err(Error::Input(msg)) = self.iteration_config().update.trained(self.sampler.steps) {
            return Err(Error::config(origin, "grpo.timestep_fraction", msg));
        }
        Ok(())
    }

    /// The rules on single fields and simple combinations: `(field, holds, message)`.
    fn field_rules(&self) -> Vec<Rule<'static>> {
        let (s, g, o, r) = (&self.sampler, &self.grpo, &self.optim, &self.run);
        let samples = r.prompts_per_iteration.saturating_mul(s.group_size);
        vec![
            ("rewards", !self.rewards.is_empty(), "at least one reward is needed".into()),
            ("sampler.height", s.height > 0 && s.height % 16 == 0, format!("must be a positive multiple of 16, got {}", s.height)),
            ("sampler.width", s.width > 0 && s.width % 16 == 0, format!("must be a positive multiple of 16, got {}", s.width)),
            ("sampler.steps", (2..=10_000).contains(&s.steps), format!("must be in 2..=10000, got {}", s.steps)),
            ("sampler.height", s.height <= MAX_SIDE, format!("must be at most {MAX_SIDE} pixels, got {}", s.height)),
            ("sampler.width", s.width <= MAX_SIDE, format!("must be at most {MAX_SIDE} pixels, got {}", s.width)),
            ("sampler.eta", s.eta > 0.0 && s.eta.is_finite(), format!("must be finite and > 0 (0 takes deterministic steps: nothing to train), got {}", s.eta)),
            ("sampler.sde", s.sde.is_stochastic(), "\"ode\" takes deterministic steps with no log-probabilities: there is nothing to train (use \"dance\", \"flow_grpo\" or \"cps\")".to_string()),
            ("sampler.shift", positive(s.shift), format!("must be finite and > 0, got {}", s.shift)),
            ("sampler.guidance", s.guidance.is_finite(), format!("must be finite, got {}", s.guidance)),
            ("sampler.group_size", s.group_size >= 2 || g.grouping == AdvantageGrouping::Global, format!("per-prompt advantages need >= 2 samples per prompt, got {}", s.group_size)),
            ("sampler.rollout_batch", s.rollout_batch >= 1, format!("must be >= 1, got {}", s.rollout_batch)),
            ("sampler.decode_batch", s.decode_batch >= 1, format!("must be >= 1, got {}", s.decode_batch)),
            ("grpo.timestep_fraction", g.timestep_fraction > 0.0 && g.timestep_fraction <= 1.0, format!("must be in (0, 1], got {}", g.timestep_fraction)),
            ("grpo.clip_range", positive(g.clip_range), format!("must be finite and > 0, got {}", g.clip_range)),
            ("grpo.kl_beta", g.kl_beta >= 0.0 && g.kl_beta.is_finite(), format!("must be finite and >= 0, got {}", g.kl_beta)),
            ("grpo.kl_beta", g.kl_beta == 0.0 || o.lora.is_some(),
                "a KL term needs a reference policy: the base model, which dancegrpo keeps as the model with its LoRA adapters off; set [optim.lora] (full fine-tuning would need a second copy of the model, which is not held)".into()),
            ("grpo.adv_clip_max", positive(g.adv_clip_max), format!("must be finite and > 0, got {}", g.adv_clip_max)),
            ("optim.learning_rate", o.learning_rate > 0.0 && o.learning_rate <= 1.0, format!("must be in (0, 1], got {}", o.learning_rate)),
            ("optim.weight_decay", o.weight_decay >= 0.0 && o.weight_decay.is_finite(), format!("must be finite and >= 0, got {}", o.weight_decay)),
            ("optim.betas", (0.0..1.0).contains(&o.betas.0) && (0.0..1.0).contains(&o.betas.1), format!("must be in [0, 1), got {:?}", o.betas)),
            ("optim.eps", positive(o.eps), format!("must be finite and > 0, got {}", o.eps)),
            ("optim.max_grad_norm", positive(o.max_grad_norm), format!("must be finite and > 0, got {}", o.max_grad_norm)),
            ("optim.gradient_accumulation", o.gradient_accumulation >= 1 && samples % o.gradient_accumulation.max(1) == 0,
                format!("must divide the {samples} samples of an iteration (prompts_per_iteration x group_size), got {}", o.gradient_accumulation)),
            ("optim.first_window", o.first_window == FirstWindow::Recompute || o.activation_checkpointing == ActivationCheckpointing::Off,
                "\"rollout_graphs\" back-propagates the rollout's own graphs: it needs optim.activation_checkpointing = \"off\"".into()),
            ("optim.first_window", o.first_window == FirstWindow::Recompute || self.parallel.sharding == Sharding::None,
                format!("\"rollout_graphs\" needs whole weights in every process: parallel.sharding = \"none\", got \"{}\"", self.parallel.sharding.name())),
            ("optim.first_window", o.first_window == FirstWindow::Recompute || s.tree.is_none(),
                "\"rollout_graphs\" cannot keep a tree's nodes: use \"recompute\" with [sampler.tree]".into()),
            ("run.iterations", r.iterations >= 1, "must be >= 1".into()),
            ("run.prompts_per_iteration", r.prompts_per_iteration >= 1, format!("must be >= 1, got {}", r.prompts_per_iteration)),
            ("run.prompts_per_iteration", samples <= MAX_SAMPLES, format!("x sampler.group_size = {samples} samples per iteration, more than {MAX_SAMPLES}")),
            ("run.checkpoint_every", r.checkpoint_every >= 1, "must be >= 1".into()),
        ]
    }

    /// The sampler's window, tree and cache.
    fn check_sampler_options(&self, origin: &Path) -> Result<()> {
        let s = &self.sampler;
        let n = self.grpo.trainable.transitions(s.steps);
        if let Some((field, msg)) = s.window.as_ref().and_then(|w| w.check(n)) {
            return Err(Error::config(
                origin,
                &format!("sampler.window.{field}"),
                msg,
            ));
        }
        if let Some(tree) = &s.tree {
            self.check_tree(tree, origin)?;
        }
        if s.cache.is_some() {
            let msg = "feature caching changes the model's velocities, and rollouts must record the model's own log-probabilities: cache the evaluation (eval.cache) or generation (generate --cache) instead";
            return Err(Error::config(origin, "sampler.cache", msg.to_string()));
        }
        Ok(())
    }

    /// The evaluation's feature cache, and how it goes with the evaluation's parallelism.
    fn check_eval_cache(&self, origin: &Path) -> Result<()> {
        if let Some((field, msg)) =
            (self.eval.cache.as_ref()).and_then(|c| c.check(self.sampler.steps, usize::MAX))
        {
            return Err(Error::config(origin, &format!("eval.cache.{field}"), msg));
        }
        if let (EvalParallel::Sequence, Some(CachePolicy::Blocks(_))) =
            (self.eval.parallel, &self.eval.cache)
        {
            let msg = "a block cache cannot run with sequence parallelism: use eval.cache of kind \"steps\", or eval.parallel = \"writer\"";
            return Err(Error::config(origin, "eval.parallel", msg.to_string()));
        }
        if let (EvalParallel::Prompts, Some(CachePolicy::Steps(_))) =
            (self.eval.parallel, &self.eval.cache)
        {
            // its skip decision is one statistic over the whole batch: shares
            // would decide apart (and a sharded model's forwards fall out of step)
            let msg = "a whole-step cache decides from all the prompts' latents at once and cannot run on shares of them: use eval.cache of kind \"blocks\", or eval.parallel = \"sequence\" or \"writer\"";
            return Err(Error::config(origin, "eval.parallel", msg.to_string()));
        }
        Ok(())
    }
}

impl TrainConfig {
    /// What a run over `world` processes should be told about its rollout
    /// batches: with `optim.update_batching = "rollout"` they end where each
    /// process's accumulation window ends, so `sampler.rollout_batch` may run
    /// as smaller batches (`None` when it runs as configured).
    pub fn rollout_batch_notice(&self, world: i64) -> Option<String> {
        use crate::sampler::rollout::batches;
        let (rb, ga) = (self.sampler.rollout_batch, self.optim.gradient_accumulation);
        let derived = self.derived(world);
        let (local, window) = (
            derived.samples_per_process,
            derived.accumulation_per_process,
        );
        let cut = batches(local, rb, Some(window)) != batches(local, rb, None);
        if self.optim.update_batching != UpdateBatching::Rollout || !cut {
            return None;
        }
        let sizes: Vec<String> = batches(window.min(local), rb, None)
            .iter()
            .map(|b| b.len().to_string())
            .collect();
        Some(format!(
            "sampler.rollout_batch = {rb} runs as model batches of {} per accumulation window: each process accumulates {window} samples per optimizer step (optim.gradient_accumulation = {ga} over {world} process(es)), and with optim.update_batching = \"rollout\" the update recomputes in the rollout's batches, which therefore end with a window",
            sizes.join(" + ")
        ))
    }

    /// `[sampler.tree]`: it must make the groups, and model batches and
    /// accumulation windows must hold whole roots (each node is trained once).
    fn check_tree(&self, tree: &Tree, origin: &Path) -> Result<()> {
        let (s, o) = (&self.sampler, &self.optim);
        if let Some((field, msg)) = tree.check(s.group_size, s.steps) {
            return Err(Error::config(origin, &format!("sampler.tree.{field}"), msg));
        }
        if let Some((_, msg)) = tree.check_batch(s.rollout_batch) {
            return Err(Error::config(origin, "sampler.rollout_batch", msg));
        }
        let root = tree.root_size();
        if o.gradient_accumulation % root != 0 {
            let msg = format!(
                "must be a multiple of the tree's {root} leaves per root (a root's nodes are trained in one window), got {}",
                o.gradient_accumulation
            );
            return Err(Error::config(origin, "optim.gradient_accumulation", msg));
        }
        if s.window
            .as_ref()
            .is_some_and(|w| w.post != PostWindow::Euler)
        {
            let msg =
                "DPM-Solver steps after the window do not branch: a tree needs solver = \"euler\"";
            return Err(Error::config(
                origin,
                "sampler.window.post",
                msg.to_string(),
            ));
        }
        if o.update_batching != UpdateBatching::Rollout {
            let msg =
                "a tree's nodes are recomputed in the rollout's model batches: use \"rollout\"";
            return Err(Error::config(
                origin,
                "optim.update_batching",
                msg.to_string(),
            ));
        }
        Ok(())
    }

    /// The optional sections: `[optim.lora]`, `[optim.ema]` and `[health]`.
    fn check_options(&self, origin: &Path) -> Result<()> {
        if let Some(l) = &self.optim.lora {
            if l.rank < 1 {
                let msg = format!("must be >= 1, got {}", l.rank);
                return Err(Error::config(origin, "optim.lora.rank", msg));
            }
            if !positive(l.alpha) {
                let msg = format!("must be finite and > 0, got {}", l.alpha);
                return Err(Error::config(origin, "optim.lora.alpha", msg));
            }
        }
        if let Some(e) = &self.optim.ema {
            if !(0.0..1.0).contains(&e.decay) {
                let msg = format!("must be in [0, 1), got {}", e.decay);
                return Err(Error::config(origin, "optim.ema.decay", msg));
            }
        }
        if let Some((field, msg)) = self.health.check() {
            return Err(Error::config(origin, &format!("health.{field}"), msg));
        }
        Ok(())
    }
}

/// Finite and above zero (NaN and infinities are not).
fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

/// A model directory must hold the two configs it is built from.
fn check_model(model: &ModelSource, origin: &Path) -> Result<()> {
    let path = match model {
        ModelSource::Tiny { .. } => return Ok(()),
        ModelSource::Dir { path } | ModelSource::Random { path, .. } => path,
    };
    let missing = ["transformer/config.json", "vae/config.json"]
        .into_iter()
        .find(|f| !path.join(f).is_file());
    let msg = match missing {
        None => return Ok(()),
        Some(_) if !path.is_dir() => format!("{}: no such directory", path.display()),
        Some(f) => format!(
            "{}: {f} is missing (not a FLUX model directory in the diffusers layout)",
            path.display()
        ),
    };
    Err(Error::config(origin, "model.path", msg))
}

/// Checks a prompt source (`[data]` or `[eval.data]`, named by `section`):
/// a positive count, or a directory holding the file its kind needs.
fn check_data(source: &DataSource, section: &str, origin: &Path) -> Result<()> {
    let (path, marker, what) = match source {
        DataSource::Synthetic {
            prompts, text_len, ..
        } => {
            if !(1..=1 << 24).contains(prompts) {
                let field = format!("{section}.prompts");
                let msg = format!("must be in 1..={}, got {prompts}", 1 << 24);
                return Err(Error::config(origin, &field, msg));
            }
            if !(1..=4096).contains(text_len) {
                let field = format!("{section}.text_len");
                let msg = format!("must be in 1..=4096, got {text_len}");
                return Err(Error::config(origin, &field, msg));
            }
            return Ok(());
        }
        DataSource::Dataset { path } => (
            path,
            INFO_FILE,
            "a dataset written by `dancegrpo preprocess`",
        ),
        DataSource::Reference { path } => (
            path,
            INDEX_FILE,
            "a directory written by the reference's preprocess_flux_embedding.py",
        ),
    };
    let field = format!("{section}.path");
    let msg = if !path.is_dir() {
        format!(
            "{}: no such directory (expected {what}, with {marker})",
            path.display()
        )
    } else if !path.join(marker).is_file() {
        format!("{}: {marker} is missing (not {what})", path.display())
    } else {
        return Ok(());
    };
    Err(Error::config(origin, &field, msg))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::TrainConfig;

    fn demo(sets: &[&str]) -> TrainConfig {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::tiny_demo()
            .with_overrides(&sets, Path::new("test"))
            .unwrap()
    }

    #[test]
    fn a_run_is_told_when_its_rollout_batches_end_with_a_window() {
        // the demo: 16 samples per step, batches of 8; over 8 processes each
        // has only 2 samples, one batch either way
        for world in [1, 2, 8] {
            assert_eq!(demo(&[]).rollout_batch_notice(world), None);
        }
        // 64 samples: 8 per process, in windows of 2
        let eight = demo(&["run.prompts_per_iteration=8"]);
        let eight = eight.rollout_batch_notice(8).unwrap();
        assert!(
            eight.contains("batches of 2 per accumulation window"),
            "{eight}"
        );
        assert!(eight.contains("16 over 8 process(es)"), "{eight}");
        // one window of 16: batches of 6 + 6 + 4 either way
        assert_eq!(
            demo(&["sampler.rollout_batch=6"]).rollout_batch_notice(1),
            None
        );
        let six = demo(&["sampler.rollout_batch=6", "optim.gradient_accumulation=8"]);
        let six = six.rollout_batch_notice(1).unwrap();
        assert!(six.contains("batches of 6 + 2 per"), "{six}");
        let window = demo(&["optim.update_batching=\"window\""]);
        assert_eq!(window.rollout_batch_notice(8), None);
    }
}
