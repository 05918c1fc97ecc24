//! Deterministic text-to-image generation with the flow ODE (Euler), with an
//! optional feature cache ([`super::cache`]): `generate`, the held-out
//! evaluation and the sample grids.

use tch::{Kind, Tensor};

use super::cache::{CachePolicy, CacheStats, Cached};
use super::{euler_step, Schedule};
use crate::error::Result;
use crate::io::image::to_uint8;
use crate::models::{FlowInputs, LatentDecoder, VelocityModel};

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct OdeSettings {
    /// Denoising steps.
    pub steps: i64,
    /// Schedule shift.
    pub shift: f64,
    /// Guidance value for guidance-distilled models.
    pub guidance: Option<f64>,
    /// Feature caching (`None`: every step computes every block).
    pub cache: Option<CachePolicy>,
}

/// Generates one image per row of `text` (b, Lt, d) / `pooled` (b, p) from the
/// initial noise `noise` (b, c, h, w), decoding the last predicted x0 as the
/// reference does. Returns uint8 images (b, H, W, 3).
pub fn generate(
    model: &dyn VelocityModel,
    decoder: &dyn LatentDecoder,
    text: &Tensor,
    pooled: &Tensor,
    noise: &Tensor,
    settings: &OdeSettings,
) -> Result<Tensor> {
    let (latents, _) = sample_ode(model, (text, pooled), noise, settings)?;
    let _guard = tch::no_grad_guard();
    Ok(to_uint8(&decoder.decode_latents(&latents)))
}

/// The last step's predicted x0 (b, c, h, w) of the ODE from `noise`
/// (b, c, h, w) for prompts `(text (b, Lt, d), pooled (b, p))`, and what the
/// cache did.
pub fn sample_ode(
    model: &dyn VelocityModel,
    (text, pooled): (&Tensor, &Tensor),
    noise: &Tensor,
    settings: &OdeSettings,
) -> Result<(Tensor, CacheStats)> {
    let _guard = tch::no_grad_guard();
    let (b, c, h, w) = noise.size4()?;
    let latent = [c, h, w];
    let device = noise.device();
    let schedule = Schedule::shifted(settings.steps, settings.shift);
    let layout = model.layout();
    let txt_ids = layout.text_ids(text.size()[1], device);
    let img_ids = layout.image_ids(latent, device);
    let guidance = settings
        .guidance
        .map(|g| Tensor::full([b], g, (Kind::Float, device)));
    let mut cache = Cached::new(settings.cache.as_ref(), model, settings.steps)?;
    let mut z = layout.pack(noise)?; // (b, L, d)
    let mut x0 = z.shallow_clone();
    for i in 0..schedule.steps() {
        let t = schedule.model_timestep(i, b).to_device(device);
        let inputs = FlowInputs {
            latents: &z,
            timestep: &t,
            text,
            pooled,
            text_ids: &txt_ids,
            image_ids: &img_ids,
            guidance: guidance.as_ref(),
        };
        let v = cache.velocity(model, &inputs, i, schedule.steps())?;
        (z, x0) = euler_step(&z, &v, schedule.sigma(i), schedule.sigma(i + 1));
    }
    Ok((layout.unpack(&x0, latent)?, cache.stats)) // (b, c, h, w)
}
