//! Stage 2: the FLUX transformer with the rectified-flow objective on the
//! normalised, packed VAE latents: `x_t = (1 - t) x0 + t eps`, the model
//! predicts the velocity `eps - x0` (what the sampler's Euler step expects),
//! conditioned on the synthetic prompt of the image's class.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::config::{PretrainConfig, TimestepSampling};
use super::images::ProceduralImages;
use super::optimise::StageOptimiser;
use super::{Stage, StepProgress};
use crate::data::{PromptSet, SyntheticPrompts};
use crate::error::Result;
use crate::models::flux::packing;
use crate::models::flux::FluxTransformer;
use crate::models::vae::Vae;
use crate::models::{FlowInputs, VelocityModel};
use crate::rng::Philox;

/// First image index of the flow stage (disjoint from the VAE stage's images).
const FLOW_IMAGES: u64 = 1 << 32;

/// The synthetic prompt of every class, stacked.
pub(super) struct ClassPrompts {
    /// Text embeddings `(classes, Lt, d)`.
    pub text: Tensor,
    /// Pooled embeddings `(classes, p)`.
    pub pooled: Tensor,
}

impl ClassPrompts {
    /// Prompts `0..classes` of the trainer's synthetic prompt set (seed
    /// `prompt_seed`, 32 tokens, the model's widths), on `device`.
    pub(super) fn new(
        cfg: &PretrainConfig,
        model: &FluxTransformer,
        device: Device,
    ) -> Result<Self> {
        let set = SyntheticPrompts {
            count: cfg.classes,
            seed: cfg.prompt_seed,
            text_len: 32,
            text_dim: model.config().joint_attention_dim,
            pooled_dim: model.config().pooled_projection_dim,
        };
        let entries = (0..cfg.classes)
            .map(|i| set.get(i))
            .collect::<Result<Vec<_>>>()?;
        let (text, pooled) = crate::data::stack(&entries);
        Ok(ClassPrompts {
            text: text.to_device(device),
            pooled: pooled.to_device(device),
        })
    }

    /// The rows of `classes`: text `(b, Lt, d)` and pooled `(b, p)`.
    pub(super) fn select(&self, classes: &[u64]) -> (Tensor, Tensor) {
        let idx: Vec<i64> = classes.iter().map(|&c| c as i64).collect();
        let idx = Tensor::from_slice(&idx).to_device(self.text.device());
        (
            self.text.index_select(0, &idx),
            self.pooled.index_select(0, &idx),
        )
    }
}

/// Trains `model` for `cfg.flow.steps` steps on latents of `vae`; returns the loss of every step.
pub(super) fn train_flow(
    model: &FluxTransformer,
    vae: &Vae,
    images: &ProceduralImages,
    cfg: &PretrainConfig,
    progress: &mut dyn FnMut(&StepProgress),
) -> Result<Vec<f64>> {
    let params: Vec<Tensor> = model.parameters().into_iter().map(|(_, p)| p).collect();
    let device = params[0].device();
    let prompts = ClassPrompts::new(cfg, model, device)?;
    let mut opt = StageOptimiser::new(params, &cfg.flow, cfg.weight_decay, cfg.max_grad_norm);
    let b = cfg.flow.batch as u64;
    let start = Instant::now();
    let mut losses = Vec::with_capacity(cfg.flow.steps as usize);
    for step in 0..cfg.flow.steps {
        let indices: Vec<u64> = (FLOW_IMAGES + step * b..FLOW_IMAGES + (step + 1) * b).collect();
        let (x, classes) = images.batch(&indices);
        let x0 = tch::no_grad(|| vae.encode_mean(&x.to_device(device)))?; // (b, 16, h, w)
        let (text, pooled) = prompts.select(&classes);
        let loss = flow_loss(model, &x0, &text, &pooled, cfg, step)?;
        losses.push(opt.step(&loss));
        progress(&StepProgress {
            stage: Stage::Flow,
            step: step + 1,
            total: cfg.flow.steps,
            loss: losses[step as usize],
            seconds_per_step: start.elapsed().as_secs_f64() / (step + 1) as f64,
        });
    }
    Ok(losses)
}

/// The rectified-flow loss `mean((v(x_t, t) - (eps - x0))^2)` of one batch of
/// latents `x0` (b, 16, h, w); `t` and `eps` come from the stream `pretrain/flow/{step}`.
fn flow_loss(
    model: &FluxTransformer,
    x0: &Tensor,
    text: &Tensor,
    pooled: &Tensor,
    cfg: &PretrainConfig,
    step: u64,
) -> Result<Tensor> {
    let (b, _, h, w) = x0.size4()?;
    let device = x0.device();
    let x0 = packing::pack(x0)?; // (b, L, 64)
    let mut rng = Philox::for_stream(cfg.seed, &format!("pretrain/flow/{step}"));
    let t = draw_times(&mut rng, cfg.timesteps, b).to_device(device); // (b,)
    let eps = rng.normal_tensor(&x0.size()).to_device(device); // (b, L, 64)
    let tb = t.view([b, 1, 1]);
    let xt = &x0 * (1.0 - &tb) + &eps * &tb;
    let guidance = model
        .config()
        .guidance_embeds
        .then(|| Tensor::full([b], cfg.guidance, (Kind::Float, device)));
    let inputs = FlowInputs {
        latents: &xt,
        timestep: &t,
        text,
        pooled,
        text_ids: &packing::text_ids(text.size()[1], device),
        image_ids: &packing::image_ids(h, w, device),
        guidance: guidance.as_ref(),
    };
    let v = model.velocity(&inputs)?; // (b, L, 64)
    Ok((v - (eps - x0)).square().mean(Kind::Float))
}

/// `b` training times in (0, 1), float32 `(b,)`.
pub(super) fn draw_times(rng: &mut Philox, sampling: TimestepSampling, b: i64) -> Tensor {
    let t: Vec<f32> = (0..b)
        .map(|_| match sampling {
            TimestepSampling::Uniform => rng.uniform() as f32,
            TimestepSampling::LogitNormal { mean, std } => {
                let logit = mean + std * rng.normal();
                (1.0 / (1.0 + (-logit).exp())) as f32
            }
        })
        .collect();
    Tensor::from_slice(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logit_normal_times_are_centred_and_inside_the_interval() {
        let mut rng = Philox::new(1, 2);
        let sampling = TimestepSampling::LogitNormal {
            mean: 0.0,
            std: 1.0,
        };
        let t: Vec<f32> = Vec::try_from(draw_times(&mut rng, sampling, 4000)).unwrap();
        assert!(t.iter().all(|&x| x > 0.0 && x < 1.0));
        let mean = t.iter().sum::<f32>() / t.len() as f32;
        let mid = t.iter().filter(|&&x| (0.27..0.73).contains(&x)).count() as f32 / 4000.0;
        // sigmoid(N(0, 1)): median 0.5, P(|logit| < 1) = 0.683
        assert!(
            (mean - 0.5).abs() < 0.02 && (mid - 0.683).abs() < 0.03,
            "{mean} {mid}"
        );
        let u: Vec<f32> =
            Vec::try_from(draw_times(&mut rng, TimestepSampling::Uniform, 4000)).unwrap();
        let low = u.iter().filter(|&&x| x < 0.27).count() as f32 / 4000.0;
        assert!((low - 0.27).abs() < 0.03, "{low}");
    }
}
