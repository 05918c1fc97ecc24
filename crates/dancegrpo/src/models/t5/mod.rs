//! The T5 encoder of FLUX.1 (`text_encoder_2`, transformers `T5EncoderModel`
//! semantics), module tree mirroring the transformers checkpoint keys.

pub mod config;
pub mod layers;
pub mod model;

pub use config::{T5Activation, T5Config};
pub use model::T5Encoder;
