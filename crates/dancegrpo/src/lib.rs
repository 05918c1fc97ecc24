//! dancegrpo: GRPO post-training of flow-matching image generators (DanceGRPO)
//! on libtorch.
//!
//! The crate is organised by concept: [`models`] (FLUX.1 transformer, VAE and the
//! [`models::VelocityModel`] trait), [`weights`] (checkpoint loading and parameter
//! stores), [`io`] (file formats, atomic writes), [`align`] (stage-by-stage
//! comparison with the reference fixtures), [`pretrain`] (a tiny base model
//! trained from scratch on procedural images) and [`rng`] (counter-based random
//! numbers).

#![deny(missing_docs)]

pub mod adapter;
pub mod align;
pub mod allocator;
pub mod autograd;
pub mod bench;
pub mod compare;
pub mod data;
pub mod dist;
pub mod error;
pub mod grpo;
pub mod imaging;
pub mod io;
pub mod models;
pub mod nn;
pub mod plan;
pub mod precision;
pub mod pretrain;
pub mod process;
pub mod rewards;
pub mod rng;
pub mod sampler;
pub mod serve;
pub mod text;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
