//! FLUX.1 transformer (`FluxTransformer2DModel` semantics), module tree mirroring
//! the diffusers checkpoint keys.

mod blocks;
pub mod config;
pub mod embeddings;
pub mod model;
pub mod packing;
mod policy;

pub use config::FluxConfig;
pub use model::{FluxTransformer, Trace};
pub use packing::FluxPacking;
