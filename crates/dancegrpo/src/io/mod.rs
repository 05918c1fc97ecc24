//! File formats and safe writing.

pub mod atomic;
pub mod image;
pub mod json;
pub mod pickle;
pub mod safetensors;
pub mod torch_pt;
