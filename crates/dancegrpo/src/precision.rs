//! The numeric precision of a run (`[precision]`).
//!
//! * `fp32` (the default, and the alignment mode): everything in float32, as
//!   the reference fixtures were made.
//! * `bf16`: mixed precision, the GPU mode. The transformer's forward and
//!   backward compute in bfloat16 (each layer casts its float32 weights to
//!   bfloat16 as it uses them, as `torch.autocast` does); the trained weights
//!   stay float32 (master weights), so do their gradients and the AdamW
//!   moments; the SDE step, log-probabilities, ratios, advantages and the loss
//!   are float32 (the velocity is cast to float32 at the model's output); the
//!   frozen models (VAE, reward models, a LoRA base) are stored in bfloat16,
//!   loaded tensor by tensor from memory-mapped files so that no float32 copy
//!   of a whole model ever exists.
//!
//! The recomputation of the rollout's log-probabilities runs the same bfloat16
//! ops in the same batches on the same weights, so the first ratios stay
//! exactly 1 in bf16 too.

use serde::{Deserialize, Serialize};
use tch::Kind;

/// Arithmetic of the trained model's forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeMode {
    /// Float32 everywhere (alignment, the fixtures).
    #[default]
    Fp32,
    /// BFloat16 compute with float32 master weights, gradients and optimizer state.
    Bf16,
}

/// Storage dtype of the frozen models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrozenDtype {
    /// The compute mode's dtype (bfloat16 in `bf16` mode).
    #[default]
    Auto,
    /// Float32.
    Fp32,
    /// BFloat16.
    Bf16,
}

/// Dtype gradients are summed across processes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceDtype {
    /// Float32 (exact sums of the float32 gradients' order aside).
    #[default]
    Fp32,
    /// BFloat16: half the bytes on the wire, bfloat16 rounding of every sum.
    Bf16,
}

/// `[precision]`: how a run computes and stores its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionConfig {
    /// Transformer forward/backward arithmetic.
    pub mode: ComputeMode,
    /// Storage of the frozen models (VAE, rewards, a LoRA base).
    pub frozen: FrozenDtype,
    /// Dtype of the cross-process gradient sums.
    pub reduce: ReduceDtype,
    /// Let CUDA float32 matmuls and convolutions use TF32 (no effect on the
    /// CPU; `align` never does).
    pub tf32: bool,
}

impl PrecisionConfig {
    /// The `bf16` mixed-precision mode with its defaults.
    pub fn bf16() -> Self {
        PrecisionConfig {
            mode: ComputeMode::Bf16,
            ..Default::default()
        }
    }

    /// The dtype the transformer computes in.
    pub fn compute_kind(&self) -> Kind {
        match self.mode {
            ComputeMode::Fp32 => Kind::Float,
            ComputeMode::Bf16 => Kind::BFloat16,
        }
    }

    /// The dtype of trained (master) weights, their gradients and the optimizer
    /// state: always float32.
    pub fn master_kind(&self) -> Kind {
        Kind::Float
    }

    /// The storage dtype of frozen models.
    pub fn frozen_kind(&self) -> Kind {
        match self.frozen {
            FrozenDtype::Auto => self.compute_kind(),
            FrozenDtype::Fp32 => Kind::Float,
            FrozenDtype::Bf16 => Kind::BFloat16,
        }
    }

    /// The dtype gradients are all-reduced in.
    pub fn reduce_kind(&self) -> Kind {
        match self.reduce {
            ReduceDtype::Fp32 => Kind::Float,
            ReduceDtype::Bf16 => Kind::BFloat16,
        }
    }
}

extern "C" {
    fn dg_set_tf32(allow: std::os::raw::c_int);
    fn dg_tf32() -> std::os::raw::c_int;
}

/// Lets CUDA float32 matmuls and convolutions use TF32 (`allow`), or forbids it,
/// for the whole process (ATen's global context: `torch.backends.cuda.matmul.
/// allow_tf32` and `torch.backends.cudnn.allow_tf32`). No effect on CPU work.
pub fn set_tf32(allow: bool) {
    // SAFETY: a setter of libtorch's process-wide context, no pointers involved
    unsafe { dg_set_tf32(allow as std::os::raw::c_int) }
}

/// Whether CUDA float32 matmuls may use TF32.
pub fn tf32() -> bool {
    // SAFETY: a getter of libtorch's process-wide context
    unsafe { dg_tf32() != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_of_each_mode() {
        let fp32 = PrecisionConfig::default();
        assert_eq!(
            (fp32.compute_kind(), fp32.frozen_kind(), fp32.reduce_kind()),
            (Kind::Float, Kind::Float, Kind::Float)
        );
        let bf16 = PrecisionConfig::bf16();
        assert_eq!(bf16.compute_kind(), Kind::BFloat16);
        assert_eq!(bf16.master_kind(), Kind::Float);
        assert_eq!(bf16.frozen_kind(), Kind::BFloat16);
        let mixed = PrecisionConfig {
            frozen: FrozenDtype::Fp32,
            reduce: ReduceDtype::Bf16,
            ..bf16
        };
        assert_eq!(mixed.frozen_kind(), Kind::Float);
        assert_eq!(mixed.reduce_kind(), Kind::BFloat16);
        let parsed: PrecisionConfig = toml::from_str("mode = \"bf16\"\ntf32 = true").unwrap();
        assert_eq!(parsed.mode, ComputeMode::Bf16);
        assert!(parsed.tf32);
        assert!(toml::from_str::<PrecisionConfig>("mode = \"fp16\"").is_err());
    }

    #[test]
    fn tf32_switch_reaches_libtorch() {
        set_tf32(true);
        assert!(tf32());
        set_tf32(false);
        assert!(!tf32());
    }
}
