//! The latent-space seam: what the sampler, GRPO and the trainer know of a
//! model family's latents, so that none of them names a concrete model.
//!
//! A family provides two halves. The velocity model's [`TokenLayout`] turns
//! latents `(b, c, h, w)` into the tokens it reads and gives their position
//! ids (FLUX: 2x2 patches into 64 channels, 3-axis ids, see
//! [`super::flux::FluxPacking`]). The frozen [`LatentDecoder`] says which
//! latent an image size has and turns latents into images (FLUX: the
//! `AutoencoderKL` decoder, see [`super::vae::Vae`]). A new family implements
//! both in `models/` and is named in `train::build`, nothing else.

use tch::{Device, Tensor};

use crate::error::Result;

/// How a velocity model reads latents: their packing into tokens and the
/// tokens' position ids.
pub trait TokenLayout {
    /// Latents `(b, c, h, w)` as tokens `(b, L, d)`.
    fn pack(&self, latents: &Tensor) -> Result<Tensor>;
    /// Tokens `(b, L, d)` back to latents `(b, c, h, w)` of shape `latent = [c, h, w]`.
    fn unpack(&self, tokens: &Tensor, latent: [i64; 3]) -> Result<Tensor>;
    /// Position ids `(L, n_axes)` of the tokens of one latent `[c, h, w]`.
    fn image_ids(&self, latent: [i64; 3], device: Device) -> Tensor;
    /// Position ids `(len, n_axes)` of `len` text tokens.
    fn text_ids(&self, len: i64, device: Device) -> Tensor;
}

/// The frozen decoder of a latent space.
pub trait LatentDecoder {
    /// The latent `[c, h, w]` of a `height x width` image.
    fn latent_shape(&self, height: i64, width: i64) -> [i64; 3];
    /// Images `(b, 3, H, W)` in [-1, 1] (unclamped, the decoder's dtype) from
    /// latents `(b, c, h, w)` as the sampler makes them (before the VAE's scaling).
    fn decode_latents(&self, latents: &Tensor) -> Tensor;
    /// The decoder's weights with their checkpoint names.
    fn decoder_parameters(&self) -> Vec<(String, Tensor)>;
}
