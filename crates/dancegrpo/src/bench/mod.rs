//! Timing whole GRPO iterations on the reference's benchmark cases, and the
//! ODE sampler with its feature caches ([`generate`]).
//!
//! Two case layouts run as they are:
//! * the **fixture layout** (`../shared/fixtures/`): weights, recorded inputs,
//!   the trainer's captions; the models are loaded;
//! * the **benchmark layout** (`../shared/bench/`, shipped here as [`Preset`]s):
//!   `case.json` (its `kind` says "benchmark case"), the model configs and
//!   `inputs.safetensors` with stand-in prompt embeddings; the models are built
//!   from the configs with seeded weights (`seeds.model_init_seed_base`: the
//!   transformer, the VAE and the reward take that seed plus 0, 1, 2), and the
//!   first `train_batch_size` prompts are each iteration's prompts.
//!
//! Either way the random draws come from `seeds.sampler_seed` (the fixture
//! layout's recorded draws are not used), and [`flops`] counts the
//! transformer's work so the timings can be read as GFLOP/s.

pub mod flops;
pub mod generate;
mod presets;
pub mod profile;
mod setup;

pub use presets::Preset;
pub use setup::{BenchSetup, Layout};
