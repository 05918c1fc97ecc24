//! transformers `CLIPModel` (the Hugging Face layout): a ViT vision tower, the
//! [`ClipTextModel`](crate::models::clip_text::ClipTextModel) text tower, the two
//! bias-free projections and `logit_scale`; and `CLIPImageProcessor`'s
//! preprocessing. The backbone of the CLIP-score and PickScore rewards.

pub mod config;
pub mod model;
pub mod preprocess;

pub use config::{ClipConfig, ClipVisionConfig};
pub use model::ClipModel;
pub use preprocess::ImageProcessor;
