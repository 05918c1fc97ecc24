//! open_clip CLIP models (the HPSv2 reward's backbone).

mod config;
mod model;

pub use config::{OpenClipConfig, TextConfig, VisionConfig};
pub use model::{open_weights, OpenClip};
