//! The CLIP text encoder of FLUX.1 (`text_encoder`, transformers `CLIPTextModel`
//! semantics), module tree mirroring the transformers checkpoint keys.

pub mod config;
pub mod model;

pub use config::{ClipActivation, ClipTextConfig};
pub use model::{ClipTextModel, ClipTextOutput};
