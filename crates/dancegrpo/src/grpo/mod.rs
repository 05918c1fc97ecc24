//! GRPO maths and the update: group-relative advantages, the clipped
//! policy-ratio loss, gradient clipping with AdamW, learning-rate schedules and
//! the per-iteration update loop.

pub mod advantage;
mod batches;
pub mod guard;
pub mod iteration;
pub mod loss;
pub mod lr;
mod observer;
pub mod optim;
pub mod settings;
mod tree_rows;
pub mod update;

pub use advantage::{advantages, mixed_advantages, Advantages, Grouping, RewardMixing};
pub use guard::Guard;
pub use iteration::{run_iteration, Iteration, IterationConfig, IterationInputs, IterationReport};
pub use loss::{clipped_policy_loss, PolicyLoss};
pub use lr::LrSchedule;
pub use optim::{clip_grad_norm, AdamW, AdamWConfig};
pub use update::{
    grpo_update, FirstWindow, NoObserver, Trainable, UpdateBatching, UpdateConfig, UpdateInputs,
    UpdateObserver, UpdateStats,
};
