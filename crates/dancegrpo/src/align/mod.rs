//! Stage-by-stage alignment with the reference fixtures (`shared/fixtures/FORMAT.md`).
//!
//! Each stage is fed the fixture's own stored inputs (teacher forcing) so errors
//! do not compound; every compared tensor contributes a relative error
//! `||ours - ref||_2 / ||ref||_2` and a max absolute error, and the stage reports
//! its worst tensor.

mod advantages;
mod case;
mod decode;
mod end_to_end;
mod grads;
mod grpo;
mod optimizer;
mod reward;
mod sampling;
mod schedule;
mod text_encoding;
mod train;
mod transformer;

use std::path::Path;

use serde::Serialize;
use tch::{Kind, Tensor};

pub use case::Case;
pub use grpo::GrpoCase;

use crate::error::Result;

/// The stages of one GRPO iteration that can be compared with the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Prompt encoding (T5 and CLIP).
    TextEncoding,
    /// Sigma schedule and quantised timesteps.
    Schedule,
    /// Every stored sampling call of the transformer and the first call's activations.
    Transformer,
    /// SDE sampling steps.
    Sampling,
    /// VAE decoding of the final predicted x0.
    Decode,
    /// Reward model scores.
    Reward,
    /// Group-relative advantages.
    Advantages,
    /// Per-transition GRPO losses.
    Train,
    /// Accumulated gradients of the first window.
    Grads,
    /// Gradient clipping and AdamW.
    Optimizer,
    /// The whole iteration free-running.
    EndToEnd,
}

impl Stage {
    /// All stages, in pipeline order.
    pub const ALL: [Stage; 11] = [
        Stage::TextEncoding,
        Stage::Schedule,
        Stage::Transformer,
        Stage::Sampling,
        Stage::Decode,
        Stage::Reward,
        Stage::Advantages,
        Stage::Train,
        Stage::Grads,
        Stage::Optimizer,
        Stage::EndToEnd,
    ];

    /// The stage's name as printed and accepted on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Stage::TextEncoding => "text_encoding",
            Stage::Schedule => "schedule",
            Stage::Transformer => "transformer",
            Stage::Sampling => "sampling",
            Stage::Decode => "decode",
            Stage::Reward => "reward",
            Stage::Advantages => "advantages",
            Stage::Train => "train",
            Stage::Grads => "grads",
            Stage::Optimizer => "optimizer",
            Stage::EndToEnd => "end_to_end",
        }
    }

    /// Parses a stage name.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether this build implements the stage.
    pub fn implemented(self) -> bool {
        matches!(
            self,
            Stage::TextEncoding
                | Stage::Schedule
                | Stage::Transformer
                | Stage::Sampling
                | Stage::Decode
                | Stage::Reward
                | Stage::Advantages
                | Stage::Train
                | Stage::Grads
                | Stage::Optimizer
                | Stage::EndToEnd
        )
    }
}

/// One compared tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorCheck {
    /// Tensor name (fixture key, with indices).
    pub name: String,
    /// Relative L2 error.
    pub rel_err: f64,
    /// Max absolute error.
    pub abs_err: f64,
    /// Whether the tensor is within its tolerance.
    pub pass: bool,
}

/// The result of one stage: its worst tensor.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// The tensor with the largest error relative to its tolerance.
    pub worst: String,
    /// Its relative error.
    pub rel_err: f64,
    /// Its max absolute error.
    pub abs_err: f64,
    /// The stage's relative tolerance.
    pub tol: f64,
    /// Whether every tensor of the stage passed.
    pub pass: bool,
    /// Every compared tensor (omitted from JSON unless requested).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tensors: Vec<TensorCheck>,
}

/// The result of a whole case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Case name.
    pub case: String,
    /// Whether every stage passed.
    pub pass: bool,
    /// Per-stage results, in pipeline order.
    pub stages: Vec<StageReport>,
}

/// Relative L2 and max absolute error of `ours` against `reference` (any dtype/device).
pub fn errors(ours: &Tensor, reference: &Tensor) -> (f64, f64) {
    if !ours.defined() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let a = ours.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let b = reference.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    if a.size() != b.size() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let diff = &a - &b;
    let dn = diff.norm().double_value(&[]);
    let rn = b.norm().double_value(&[]);
    let abs = if diff.numel() == 0 {
        0.0
    } else {
        diff.abs().max().double_value(&[])
    };
    let rel = if rn > 0.0 { dn / rn } else { dn };
    (if rel.is_nan() { f64::INFINITY } else { rel }, abs)
}

/// Collects the checks of one stage.
pub struct StageAcc {
    stage: Stage,
    tol: f64,
    checks: Vec<TensorCheck>,
}

impl StageAcc {
    /// An empty stage with relative tolerance `tol`.
    pub fn new(stage: Stage, tol: f64) -> Self {
        StageAcc {
            stage,
            tol,
            checks: Vec::new(),
        }
    }

    /// Compares `ours` with `reference` at the stage tolerance.
    pub fn compare(&mut self, name: impl Into<String>, ours: &Tensor, reference: &Tensor) {
        let (rel_err, abs_err) = errors(ours, reference);
        self.checks.push(TensorCheck {
            name: name.into(),
            rel_err,
            abs_err,
            pass: rel_err <= self.tol,
        });
    }

    /// Compares `ours` with `reference` judging the error's norm against the
    /// norm of `terms` instead of the reference's own: for a difference or a
    /// cancelling sum of float32-rounded terms, whose own size says nothing
    /// about how precisely it can be computed (`train/log_ratio = new - old`,
    /// `train/total_loss = sum of train/loss`). Listed as `name (error / |terms_name|)`.
    pub fn compare_to_terms(
        &mut self,
        name: &str,
        ours: &Tensor,
        reference: &Tensor,
        (terms_name, terms): (&str, &Tensor),
    ) {
        // `errors` is infinite for an undefined tensor or a shape mismatch
        let (_, abs_err) = errors(ours, reference);
        let norm = |t: &Tensor| t.to_kind(Kind::Double).norm().double_value(&[]);
        let rel_err = match abs_err.is_finite() {
            true => {
                norm(&(ours.to_kind(Kind::Double) - reference.to_kind(Kind::Double))) / norm(terms)
            }
            false => f64::INFINITY,
        };
        self.checks.push(TensorCheck {
            name: format!("{name} (error / |{terms_name}|)"),
            rel_err,
            abs_err,
            pass: rel_err <= self.tol,
        });
    }

    /// Records a check judged by its own rule.
    pub fn push(&mut self, check: TensorCheck) {
        self.checks.push(check);
    }

    /// The stage report: the worst tensor (a failing one first, else the largest relative error).
    pub fn finish(self) -> StageReport {
        let worst = self.checks.iter().max_by(|a, b| {
            (!a.pass, a.rel_err)
                .partial_cmp(&(!b.pass, b.rel_err))
                .expect("no NaN")
        });
        match worst {
            Some(w) => StageReport {
                name: self.stage.name().into(),
                worst: w.name.clone(),
                rel_err: w.rel_err,
                abs_err: w.abs_err,
                tol: self.tol,
                pass: self.checks.iter().all(|c| c.pass),
                tensors: self.checks.clone(),
            },
            None => StageReport {
                name: self.stage.name().into(),
                worst: "(nothing compared)".into(),
                rel_err: 0.0,
                abs_err: 0.0,
                tol: self.tol,
                pass: false,
                tensors: Vec::new(),
            },
        }
    }
}

/// Runs the requested `stages` (all implemented ones when empty) on the case in `dir`.
pub fn run_case(dir: &Path, stages: &[Stage]) -> Result<CaseReport> {
    let case = Case::open(dir)?;
    let wanted: Vec<Stage> = if stages.is_empty() {
        Stage::ALL.into_iter().filter(|s| s.implemented()).collect()
    } else {
        stages.to_vec()
    };
    let mut reports = Vec::new();
    for stage in wanted {
        let report = match stage {
            Stage::TextEncoding => text_encoding::run(&case)?,
            Stage::Schedule => schedule::run(&case)?,
            Stage::Transformer => transformer::run(&case)?,
            Stage::Sampling => sampling::run(&case)?,
            Stage::Decode => decode::run(&case)?,
            Stage::Reward => reward::run(&case)?,
            Stage::Advantages => advantages::run(&case)?,
            Stage::Train => train::run(&case)?,
            Stage::Grads => grads::run(&case)?,
            Stage::Optimizer => optimizer::run(&case)?,
            Stage::EndToEnd => end_to_end::run(&case)?,
        };
        reports.push(report);
    }
    let pass = reports.iter().all(|r| r.pass);
    Ok(CaseReport {
        case: case.name().to_string(),
        pass,
        stages: reports,
    })
}
