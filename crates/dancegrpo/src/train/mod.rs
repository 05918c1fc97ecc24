//! The trainer: configuration, data order, checkpoints with exact resume,
//! metrics and plots, and the training loop.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod ema;
pub mod metrics;
pub mod plot;
pub mod tensorboard;
pub mod trainer;
mod validate;

pub use config::TrainConfig;
pub use trainer::{Progress, Resume, Trainer};
