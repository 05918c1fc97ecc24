//! File formats and safe writing.

pub mod atomic;
pub mod json;
pub mod safetensors;
