//! The methods a comparison runs: training configurations with a name, either
//! a TOML file or one of the built-in members of the flow-GRPO family on the
//! demo's tiny model.

use std::path::Path;

use crate::error::{Error, Result};
use crate::sampler::Schedule;
use crate::train::config::DataSource;
use crate::train::TrainConfig;

/// One configuration of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Method {
    /// Its name in the report (a file's stem, or the built-in name).
    pub name: String,
    /// The training configuration (its seed and iteration count are replaced per run).
    pub config: TrainConfig,
}

/// The built-in methods: `(name, what it is, overrides of the tiny demo)`.
pub const BUILT_IN: [(&str, &str, &[&str]); 8] = [
    (
        "dancegrpo",
        "DanceGRPO: Dance-SDE on every step, a random 60% of them trained",
        &[],
    ),
    (
        "mixgrpo",
        "MixGRPO: a 4-step SDE window sliding 1 step every 25 iterations, ODE elsewhere",
        &["sampler.window={size=4,schedule=\"progressive\",shift_interval=25,stride=1}"],
    ),
    (
        "mixgrpo-flash",
        "MixGRPO-Flash: MixGRPO's window, then DPM-Solver++ 2M on 40% of the remaining steps",
        &["sampler.window={size=4,schedule=\"progressive\",shift_interval=25,stride=1,post={solver=\"dpm_solver_2m\",compress=0.4}}"],
    ),
    (
        "flow-grpo-fast",
        "Flow-GRPO-Fast: Flow-GRPO's SDE (noise 0.7) on 2 random consecutive steps, ODE elsewhere",
        &[
            "sampler.sde=\"flow_grpo\"",
            "sampler.eta=0.7",
            "sampler.window={size=2,schedule=\"random\"}",
        ],
    ),
    (
        "flow-grpo",
        "Flow-GRPO: its SDE (noise 0.7) on every step",
        &["sampler.sde=\"flow_grpo\"", "sampler.eta=0.7"],
    ),
    (
        "grpo-guard",
        "GRPO-Guard: Flow-GRPO's SDE (noise 0.7) with ratio normalisation and gradient re-weighting",
        &["sampler.sde=\"flow_grpo\"", "sampler.eta=0.7", "grpo.guard=\"full\""],
    ),
    (
        "cps",
        "coefficients-preserving sampling (noise 0.7) on every step",
        &["sampler.sde=\"cps\"", "sampler.eta=0.7"],
    ),
    (
        "branch-grpo",
        "tree rollouts (BranchGRPO-style): each group one root splitting in 2 before steps 1, 3 and 5",
        &["sampler.tree={branches=2,at=[1,3,5]}"],
    ),
];

/// The prompts the built-in methods evaluate on: seeded apart from the
/// training prompts (held out).
fn held_out(train: &DataSource) -> Option<DataSource> {
    match train {
        DataSource::Synthetic {
            prompts,
            seed,
            text_len,
        } => Some(DataSource::Synthetic {
            prompts: (*prompts).min(8),
            seed: seed.wrapping_add(1_000_003),
            text_len: *text_len,
        }),
        _ => None,
    }
}

impl Method {
    /// `spec` as a method: a TOML file (named by its stem), or a built-in name
    /// (the tiny demo with that method's settings). `overrides` apply to both,
    /// after the method's own settings.
    pub fn resolve(spec: &str, overrides: &[String]) -> Result<Method> {
        let path = Path::new(spec);
        if path.is_file() {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.to_string());
            let config = TrainConfig::load(path, overrides)?;
            return Ok(Method { name, config });
        }
        let Some((name, _, own)) = BUILT_IN.iter().find(|(n, _, _)| *n == spec) else {
            let names: Vec<&str> = BUILT_IN.iter().map(|(n, _, _)| *n).collect();
            return Err(Error::Input(format!(
                "`{spec}` is neither a config file nor a built-in method ({})",
                names.join(", ")
            )));
        };
        let mut base = TrainConfig::tiny_demo();
        base.eval.data = held_out(&base.data);
        let sets: Vec<String> = (own.iter().map(|s| s.to_string()))
            .chain(overrides.iter().cloned())
            .collect();
        let origin = format!("(built-in method {name})");
        let config = base.with_overrides(&sets, Path::new(&origin))?;
        Ok(Method {
            name: name.to_string(),
            config,
        })
    }

    /// The configuration of run `seed` of `iterations` iterations: only the
    /// last checkpoint is written, no TensorBoard events and no sample images
    /// (a comparison keeps its runs' logs, not their snapshots).
    pub fn run_config(&self, seed: u64, iterations: u64) -> TrainConfig {
        let mut cfg = self.config.clone();
        cfg.run.seed = seed;
        cfg.run.iterations = iterations;
        cfg.run.checkpoint_every = iterations;
        cfg.run.image_every = 0;
        cfg.run.keep_checkpoints = 1;
        cfg.run.tensorboard = false;
        cfg
    }
}

/// Transformer calls of iteration `iteration` (0-based) under `cfg`: one per
/// sample and step in the rollout, one per trained transition in the update
/// (its forward and backward pass counted once), and one more per trained
/// transition for the reference policy's forward with a KL term. Runs record
/// the rows they evaluated (`transformer_rows`); this count stands in for runs
/// written before they did, which had no tree rollouts (a tree's update count
/// depends on its draws: an error here).
pub fn transformer_calls(cfg: &TrainConfig, iteration: u64) -> Result<u64> {
    if cfg.sampler.tree.is_some() {
        return Err(Error::Input(
            "a tree rollout's transformer calls depend on its draws: read the run's transformer_rows".into(),
        ));
    }
    let samples = cfg.run.prompts_per_iteration * cfg.sampler.group_size;
    let steps = cfg.sampler.steps;
    let it = cfg.iteration_config_at(iteration);
    let (_, trained) = it.update.trained(steps)?;
    // DPM-Solver steps after the window: the window's last step, then its schedule
    let schedule = Schedule::shifted(steps, cfg.sampler.shift);
    let rollout = (it.rollout.window.filter(|w| !w.is_empty()))
        .and_then(|w| {
            Some(w.end + it.rollout.post.sigmas_after(&schedule, w.end - 1)?.len() as i64 - 1)
        })
        .unwrap_or(steps);
    let per_sample = rollout + trained * if cfg.grpo.kl_beta > 0.0 { 2 } else { 1 };
    Ok((samples * per_sample) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_methods_resolve_and_count_their_calls() {
        let calls = |name: &str| {
            let m = Method::resolve(name, &[]).unwrap();
            assert_eq!(m.name, name);
            transformer_calls(&m.run_config(0, 10), 0).unwrap()
        };
        // 2 prompts x 8 samples, 8 steps; trained: int(7 * 0.6) = 4, a window of 4, a window of 2
        assert_eq!(calls("dancegrpo"), 16 * (8 + 4));
        assert_eq!(calls("mixgrpo"), 16 * (8 + 4));
        // window 0..4, then int((8 - 3) * 0.4) = 2 sigmas: 1 DPM step
        assert_eq!(calls("mixgrpo-flash"), 16 * (4 + 1 + 4));
        assert_eq!(calls("flow-grpo-fast"), 16 * (8 + 2));
        assert_eq!(calls("cps"), 16 * (8 + 4));
        let m = Method::resolve(
            "mixgrpo",
            &[
                "grpo.kl_beta=0.1".into(),
                "optim.lora={rank=4,alpha=4.0}".into(),
            ],
        );
        let m = m.unwrap();
        assert_eq!(transformer_calls(&m.config, 0).unwrap(), 16 * (8 + 4 + 4));
        // held-out evaluation prompts
        assert_ne!(m.config.eval.data, Some(m.config.data.clone()));
        assert!(m.config.eval.data.is_some());
        let err = Method::resolve("grpo-zero", &[]).unwrap_err().to_string();
        assert!(
            err.contains("grpo-zero") && err.contains("mixgrpo"),
            "{err}"
        );
        let err = Method::resolve("mixgrpo", &["sampler.window={size=99}".into()]);
        assert!(err.unwrap_err().to_string().contains("sampler.window.size"));
    }
}
