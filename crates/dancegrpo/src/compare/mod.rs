//! `dancegrpo compare`: several training configurations (methods) run on the
//! same prompts and seeds, one after another in this process, and a
//! side-by-side report of their reward against iterations, training seconds
//! and transformer calls ([`report`]).
//!
//! Every run is an ordinary run directory (`<out>/<method>/seed<k>/`) read back
//! from its `metrics.jsonl` and `eval.jsonl`: a comparison that stopped part
//! way keeps its finished runs, and running it again with the same methods,
//! seeds and iteration count reuses them instead of training them again.

pub mod methods;
pub mod report;

use std::path::{Path, PathBuf};

use tch::Device;

pub use methods::{transformer_calls, Method, BUILT_IN};
pub use report::{MethodSummary, Report};

use crate::error::{Error, Result};
use crate::train::{Progress, Resume, Trainer};

/// What one run of a method left: its per-iteration record.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunTrace {
    /// The run's seed.
    pub seed: u64,
    /// Mean training reward of each iteration.
    pub rewards: Vec<f64>,
    /// Seconds of each iteration's rollout, decode, reward and update stages.
    pub seconds: Vec<f64>,
    /// Transformer calls (rows evaluated) of each iteration, as the run counted them.
    pub calls: Vec<u64>,
    /// Share of each iteration's groups whose rewards were all equal.
    pub zero_std_share: Vec<f64>,
    /// Held-out evaluation reward before training.
    pub eval_before: Option<f64>,
    /// Held-out evaluation reward after the last iteration.
    pub eval_after: Option<f64>,
}

/// The settings of a comparison.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Iterations of every run.
    pub iterations: u64,
    /// Seeds `first_seed .. first_seed + seeds` of every method.
    pub seeds: u64,
    /// See `seeds`.
    pub first_seed: u64,
    /// Where the runs and the report go.
    pub out: PathBuf,
    /// Where the runs train.
    pub device: Device,
}

/// Runs every method with every seed (or reuses a finished run) and returns
/// their traces, method by method. `on_run` hears `(method, seed, trace)` after
/// each run; `on_iteration` hears every iteration's progress.
pub fn run_all(
    methods: &[Method],
    settings: &Settings,
    on_iteration: &mut dyn FnMut(&str, u64, &Progress),
    on_run: &mut dyn FnMut(&str, u64, &RunTrace, bool),
) -> Result<Vec<Vec<RunTrace>>> {
    check_names(methods)?;
    let last = (settings.first_seed.checked_add(settings.seeds)).ok_or_else(|| {
        Error::Input(format!(
            "seeds {} + {} overflow",
            settings.first_seed, settings.seeds
        ))
    })?;
    let stamp = stamp(settings);
    let mut all = Vec::with_capacity(methods.len());
    for m in methods {
        let mut traces = Vec::new();
        for seed in settings.first_seed..last {
            let dir = settings.out.join(&m.name).join(format!("seed{seed}"));
            let cfg = m.run_config(seed, settings.iterations);
            let (trace, reused) = match finished(&dir, &cfg, &stamp)? {
                Some(trace) => (trace, true),
                None => {
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                    }
                    let mut trainer =
                        Trainer::new(cfg.clone(), &dir, Resume::Fresh, settings.device)?;
                    trainer.run(&mut |p| on_iteration(&m.name, seed, p))?;
                    let path = dir.join(STAMP);
                    crate::io::atomic::write_bytes_atomic(&path, stamp.as_bytes())?;
                    (read_trace(&dir, &cfg)?, false)
                }
            };
            on_run(&m.name, seed, &trace, reused);
            traces.push(trace);
        }
        all.push(traces);
    }
    Ok(all)
}

/// Names must differ and be usable as directory names.
fn check_names(methods: &[Method]) -> Result<()> {
    if methods.is_empty() {
        return Err(Error::Input(
            "nothing to compare: name at least one method".into(),
        ));
    }
    for (i, m) in methods.iter().enumerate() {
        let bad = |c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c));
        if m.name.is_empty() || m.name.starts_with('.') || m.name.chars().any(bad) {
            return Err(Error::Input(format!(
                "method name `{}`: use letters, digits, `-`, `_` and `.` (it names a directory)",
                m.name
            )));
        }
        if methods[..i].iter().any(|o| o.name == m.name) {
            return Err(Error::Input(format!(
                "two methods are named `{}`: rename one of the config files",
                m.name
            )));
        }
    }
    Ok(())
}

/// The file beside a finished run that says what ran it ([`stamp`]).
const STAMP: &str = "compare-stamp.txt";

/// What else a reused run must share besides its configuration: the build
/// and the device and threads its seconds were measured with. (The model
/// directory's files are not compared: a comparison over changed weights
/// needs a new `--out`.)
fn stamp(settings: &Settings) -> String {
    format!(
        "dancegrpo {}\ndevice {:?}\nthreads {}\n",
        env!("CARGO_PKG_VERSION"),
        settings.device,
        tch::get_num_threads()
    )
}

/// The trace of a run in `dir` that finished with exactly `cfg` under
/// `stamp`, if there is one.
fn finished(dir: &Path, cfg: &crate::train::TrainConfig, stamp: &str) -> Result<Option<RunTrace>> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let same = read("config.toml").is_ok_and(|t| t == cfg.to_toml())
        && read(STAMP).is_ok_and(|t| t == stamp);
    if !same {
        return Ok(None);
    }
    match read_trace(dir, cfg) {
        Ok(t) if t.rewards.len() as u64 == cfg.run.iterations && t.eval_after.is_some() => {
            Ok(Some(t))
        }
        _ => Ok(None),
    }
}

/// Reads a run's `metrics.jsonl` and `eval.jsonl`.
pub fn read_trace(dir: &Path, cfg: &crate::train::TrainConfig) -> Result<RunTrace> {
    let lines = |name: &str| -> Result<Vec<serde_json::Value>> {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        text.lines()
            .map(|l| {
                serde_json::from_str(l).map_err(|e| {
                    Error::Input(format!("{}: a line that is not JSON: {e}", path.display()))
                })
            })
            .collect()
    };
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let metrics = lines("metrics.jsonl")?;
    let mut trace = RunTrace {
        seed: cfg.run.seed,
        rewards: metrics.iter().map(|m| num(&m["reward_mean"])).collect(),
        seconds: (metrics.iter())
            .map(|m| {
                ["rollout", "decode", "reward", "update"]
                    .iter()
                    .map(|s| num(&m["seconds"][s]))
                    .sum()
            })
            .collect(),
        calls: Vec::new(),
        zero_std_share: metrics
            .iter()
            .map(|m| num(&m["zero_variance_group_share"]))
            .collect(),
        eval_before: None,
        eval_after: None,
    };
    // the rows the run counted; the count from its configuration for runs
    // written before metrics held it
    trace.calls = (metrics.iter().zip(0..))
        .map(|(m, i)| match m["transformer_rows"].as_u64() {
            Some(rows) => Ok(rows),
            None => transformer_calls(cfg, i),
        })
        .collect::<Result<_>>()?;
    for e in lines("eval.jsonl")? {
        match e["iteration"].as_u64() {
            Some(0) => trace.eval_before = e["reward_mean"].as_f64(),
            Some(i) if i == metrics.len() as u64 => trace.eval_after = e["reward_mean"].as_f64(),
            _ => {}
        }
    }
    Ok(trace)
}
