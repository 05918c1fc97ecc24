//! The trainer: configuration, what it names built, data order, checkpoints
//! with exact resume, metrics, plots and TensorBoard event files, evaluation,
//! and the training loop.

pub mod batch;
pub mod build;
pub mod changes;
pub mod checkpoint;
pub mod config;
pub mod curve;
pub mod data;
pub mod ema;
mod engine;
pub mod evaluate;
pub mod export;
pub mod generate;
pub mod health;
pub mod images;
pub mod lock;
pub mod metrics;
pub mod plot;
pub mod tensorboard;
pub mod trainer;
mod validate;

pub use changes::ConfigChange;
pub use config::TrainConfig;
pub use trainer::{Progress, Resume, Trainer};
