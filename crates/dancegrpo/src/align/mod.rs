//! Stage-by-stage alignment with the reference fixtures (`shared/fixtures/FORMAT.md`).
//!
//! Each stage is fed the fixture's own stored inputs (teacher forcing) so errors
//! do not compound; every compared tensor is judged against the case's float64
//! truth, relative to the reference's own float32 error ([`judge`]), and the
//! stage reports the tensor closest to its bound. The engine runs in float32, as
//! the reference, or wholly in float64 ([`Precision`]).

mod advantages;
mod case;
mod decode;
mod end_to_end;
mod grads;
mod grpo;
pub mod judge;
mod optimizer;
mod reward;
mod sampling;
mod schedule;
mod text_encoding;
mod train;
mod transformer;

use std::path::Path;

use serde::Serialize;
use tch::Kind;

pub use case::Case;
pub use grpo::{train_config, GrpoCase};
pub use judge::{errors, Reference, StageAcc, TensorCheck};

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

/// The arithmetic the engine runs in while it is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Float32, as the reference: judged against the float64 truth relative to
    /// the reference's own float32 error (see [`judge`]).
    #[default]
    F32,
    /// Float64 everywhere (models, sampler, rewards, update): judged against the
    /// float64 truth at [`judge::F64_TOL`].
    F64,
    /// Training's bf16 mixed precision (`[precision] mode = "bf16"`): the
    /// transformer computes in bfloat16 over float32 weights, the frozen models
    /// are stored in bfloat16, the SDE and the update's maths stay float32. Its
    /// errors against the truth are reported as figures, not judged (only a
    /// non-finite value fails).
    Bf16,
}

impl Precision {
    /// Every precision.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F64, Precision::Bf16];

    /// The dtype the transformer's (trained) weights are stored in.
    pub fn model_kind(self) -> Kind {
        match self {
            Precision::F32 | Precision::Bf16 => Kind::Float,
            Precision::F64 => Kind::Double,
        }
    }

    /// The dtype the transformer computes in.
    pub fn compute_kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::F64 => Kind::Double,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// The dtype of the frozen models (VAE, reward, text encoders).
    pub fn frozen_kind(self) -> Kind {
        self.compute_kind()
    }

    /// The dtype of the sampler's state, the inputs and the update's maths.
    pub fn state_kind(self) -> Kind {
        crate::nn::upcast_kind(self.compute_kind())
    }

    /// The name printed and accepted on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
            Precision::Bf16 => "bf16",
        }
    }

    /// Parses a precision name.
    pub fn from_name(name: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// The result of one stage: its worst tensor (the closest to its bound).
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// The precision the stage ran in.
    pub precision: Precision,
    /// The tensor closest to (or furthest past) its bound.
    pub worst: String,
    /// Its relative error against the reference's float32 value.
    pub rel_err: f64,
    /// Its max absolute error against the reference's float32 value.
    pub abs_err: f64,
    /// Its relative error against the float64 truth (`err_ours`).
    pub truth_err: Option<f64>,
    /// The reference's own relative error against the truth (`err_ref`).
    pub ref_err: Option<f64>,
    /// The bound its judged error is held to.
    pub bound: f64,
    /// Whether every tensor of the stage passed.
    pub pass: bool,
    /// Every compared tensor (omitted from JSON unless requested).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tensors: Vec<TensorCheck>,
}

impl StageReport {
    /// The largest `rel_err`, `truth_err` and `ref_err` over the stage's tensors.
    pub fn max_errors(&self) -> (f64, Option<f64>, Option<f64>) {
        let max = |f: &dyn Fn(&TensorCheck) -> Option<f64>| {
            self.tensors
                .iter()
                .filter_map(f)
                .filter(|e| e.is_finite())
                .reduce(f64::max)
        };
        (
            max(&|t| Some(t.rel_err)).unwrap_or(0.0),
            max(&|t| t.truth_err),
            max(&|t| t.ref_err),
        )
    }
}

/// The result of a whole case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Case name.
    pub case: String,
    /// The precision of the run.
    pub precision: Precision,
    /// Whether every stage passed.
    pub pass: bool,
    /// Per-stage results, in pipeline order.
    pub stages: Vec<StageReport>,
}

/// Runs the requested `stages` (all implemented ones when empty) on the case in
/// `dir`, with the engine in `precision`.
pub fn run_case(dir: &Path, stages: &[Stage], precision: Precision) -> Result<CaseReport> {
    run_case_on(dir, stages, precision, tch::Device::Cpu)
}

/// [`run_case`] with the stages computing on `device`.
pub fn run_case_on(
    dir: &Path,
    stages: &[Stage],
    precision: Precision,
    device: tch::Device,
) -> Result<CaseReport> {
    let case = Case::open_on(dir, device)?;
    let wanted: Vec<Stage> = if stages.is_empty() {
        Stage::ALL.into_iter().filter(|s| s.implemented()).collect()
    } else {
        stages.to_vec()
    };
    // train, grads and optimizer read one teacher-forced update
    let mut forced = None;
    let mut reports = Vec::new();
    for stage in wanted {
        let p = precision;
        let report = match stage {
            Stage::TextEncoding => text_encoding::run(&case, p)?,
            Stage::Schedule => schedule::run(&case, p)?,
            Stage::Transformer => transformer::run(&case, p)?,
            Stage::Sampling => sampling::run(&case, p)?,
            Stage::Decode => decode::run(&case, p)?,
            Stage::Reward => reward::run(&case, p)?,
            Stage::Advantages => advantages::run(&case, p)?,
            Stage::Train | Stage::Grads | Stage::Optimizer => {
                if forced.is_none() {
                    forced = Some(train::teacher_forced(&case, p)?);
                }
                let f = forced.as_ref().expect("just computed");
                match stage {
                    Stage::Train => train::run(&case, f)?,
                    Stage::Grads => grads::run(&case, f)?,
                    _ => optimizer::run(&case, f)?,
                }
            }
            Stage::EndToEnd => end_to_end::run(&case, p)?,
        };
        reports.push(report);
    }
    let pass = reports.iter().all(|r| r.pass);
    Ok(CaseReport {
        case: case.name().to_string(),
        precision,
        pass,
        stages: reports,
    })
}
