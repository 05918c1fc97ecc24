//! The pretraining configuration (written into `pretrain.json`), validated
//! with errors that name the field.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the flow stage draws training times `t` in (0, 1) (`t = 1` is pure noise).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TimestepSampling {
    /// Uniform on (0, 1).
    Uniform,
    /// `t = sigmoid(mean + std * n)` with `n` standard normal (SD3's logit-normal).
    LogitNormal {
        /// Mean of the logit.
        mean: f64,
        /// Standard deviation of the logit.
        std: f64,
    },
}

/// One optimisation stage: steps, batch size, AdamW learning rate (linear
/// warm-up over the first 5% of the steps, then a half cosine down to 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Images per step.
    pub batch: i64,
    /// Peak learning rate.
    pub learning_rate: f64,
}

/// What `dancegrpo pretrain` trains and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// Seed of the initial weights, the images and every random draw.
    pub seed: u64,
    /// Image height and width in pixels (a multiple of 16).
    pub image_size: i64,
    /// Image classes; class `c` is conditioned on synthetic prompt `c`.
    pub classes: u64,
    /// Seed of the synthetic prompt embeddings (the trainer's `data.seed`).
    pub prompt_seed: u64,
    /// The VAE stage (encoder and decoder).
    pub vae: StageConfig,
    /// The VAE trains on random crops of this size (a multiple of 8 up to
    /// `image_size`, at offsets that are multiples of 8): the same content at
    /// the same scale for a fraction of the cost.
    pub vae_crop: i64,
    /// Weight of the KL term (per latent element) against the per-pixel MSE.
    pub kl_weight: f64,
    /// Images whose latent means set `shift_factor` and `scaling_factor`.
    pub latent_stats_images: u64,
    /// The flow stage (the transformer).
    pub flow: StageConfig,
    /// Distribution of the training times.
    pub timesteps: TimestepSampling,
    /// Guidance value fed to the guidance embedding (the trainer's `sampler.guidance`).
    pub guidance: f64,
    /// Euler steps of the ODE samples in `samples.png` (the tiny default's `sampler.steps`).
    pub sample_steps: i64,
    /// Schedule shift of those samples (the trainer's `sampler.shift`).
    pub sample_shift: f64,
    /// Adam weight decay (both stages).
    pub weight_decay: f64,
    /// Gradient-norm bound (both stages).
    pub max_grad_norm: f64,
}

impl Default for PretrainConfig {
    /// The defaults `dancegrpo pretrain` runs: the built-in tiny default's sizes,
    /// 64x64 images, 16 classes matching its 16 synthetic prompts.
    fn default() -> Self {
        PretrainConfig {
            seed: 0,
            image_size: 64,
            classes: 16,
            prompt_seed: 0,
            vae: StageConfig {
                steps: 1000,
                batch: 16,
                learning_rate: 4e-3,
            },
            vae_crop: 32,
            kl_weight: 0.1,
            latent_stats_images: 256,
            flow: StageConfig {
                steps: 2500,
                batch: 16,
                learning_rate: 4e-3,
            },
            timesteps: TimestepSampling::LogitNormal {
                mean: 0.0,
                std: 1.0,
            },
            guidance: 3.5,
            sample_steps: 8,
            sample_shift: 3.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

impl StageConfig {
    /// The rules on a stage named `name`: `(field, holds, message)`.
    fn rules(&self, name: &str) -> Vec<(String, bool, String)> {
        vec![
            (
                format!("{name}.steps"),
                self.steps >= 1,
                format!("must be >= 1, got {}", self.steps),
            ),
            (
                format!("{name}.batch"),
                self.batch >= 1,
                format!("must be >= 1, got {}", self.batch),
            ),
            (
                format!("{name}.learning_rate"),
                self.learning_rate > 0.0 && self.learning_rate.is_finite(),
                format!("must be > 0, got {}", self.learning_rate),
            ),
        ]
    }
}

impl PretrainConfig {
    /// Checks every field; the error names the first offending one.
    pub fn validate(&self) -> Result<()> {
        let mut rules = vec![
            (
                "image_size".to_string(),
                self.image_size >= 16 && self.image_size % 16 == 0,
                format!("must be a positive multiple of 16, got {}", self.image_size),
            ),
            ("classes".into(), self.classes >= 1, "must be >= 1".into()),
            (
                "vae_crop".into(),
                self.vae_crop >= 8 && self.vae_crop % 8 == 0 && self.vae_crop <= self.image_size,
                format!(
                    "must be a multiple of 8 in [8, image_size = {}], got {}",
                    self.image_size, self.vae_crop
                ),
            ),
            (
                "kl_weight".into(),
                self.kl_weight >= 0.0,
                format!("must be >= 0, got {}", self.kl_weight),
            ),
            (
                "latent_stats_images".into(),
                self.latent_stats_images >= 2,
                "must be >= 2".into(),
            ),
            (
                "guidance".into(),
                self.guidance.is_finite(),
                "must be finite".into(),
            ),
            (
                "sample_steps".into(),
                self.sample_steps >= 1,
                format!("must be >= 1, got {}", self.sample_steps),
            ),
            (
                "sample_shift".into(),
                self.sample_shift > 0.0,
                format!("must be > 0, got {}", self.sample_shift),
            ),
            (
                "max_grad_norm".into(),
                self.max_grad_norm > 0.0,
                format!("must be > 0, got {}", self.max_grad_norm),
            ),
        ];
        rules.extend(self.vae.rules("vae"));
        rules.extend(self.flow.rules("flow"));
        if let TimestepSampling::LogitNormal { std, .. } = self.timesteps {
            rules.push((
                "timesteps.std".into(),
                std > 0.0,
                format!("must be > 0, got {std}"),
            ));
        }
        match rules.into_iter().find(|(_, ok, _)| !ok) {
            Some((field, _, msg)) => Err(Error::config("pretrain", &field, msg)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_errors_name_the_field() {
        PretrainConfig::default().validate().unwrap();
        let mut cfg = PretrainConfig::default();
        cfg.flow.batch = 0;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("flow.batch") && err.contains("got 0"), "{err}");
        let cfg = PretrainConfig {
            image_size: 40,
            ..PretrainConfig::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("image_size"));
    }
}
