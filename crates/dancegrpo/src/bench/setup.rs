//! What a benchmark iteration runs on, from either case layout (see the module
//! [`super`]), and the loop that times iterations.

use tch::{Device, Kind, Tensor};

use super::flops::{ForwardFlops, IterationFlops};
use crate::align::{train_config, Case};
use crate::dist::Shard;
use crate::error::{Error, Result};
use crate::grpo::iteration::StageSeconds;
use crate::grpo::update::first_window_plan;
use crate::grpo::{run_iteration, AdamW, IterationInputs, NoObserver};
use crate::models::flux::{FluxConfig, FluxTransformer};
use crate::models::open_clip::{OpenClip, OpenClipConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::models::{LatentDecoder, VelocityModel};
use crate::nn::upcast_kind;
use crate::precision::PrecisionConfig;
use crate::rewards::hps::{byte_stand_in, HpsReward};
use crate::sampler::draws::{InitNoise, NoisePrecision};
use crate::sampler::{Conditioning, Schedule, Seeded};
use crate::text::{ClipTokenizer, Padding};
use crate::train::TrainConfig;
use crate::weights::Source;

/// The sampler seed when `case.json` names none (the reference's).
const SAMPLER_SEED: u64 = 1_223_627;

/// Where a case's models come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Weights in the case (a fixture).
    Fixture,
    /// Configs only: seeded weights (a benchmark case).
    Benchmark,
}

/// The models, conditioning and settings of one benchmark case.
pub struct BenchSetup {
    /// Where the models came from.
    pub layout: Layout,
    /// The trained transformer.
    pub model: FluxTransformer,
    /// The VAE (its decoder decodes the rollouts).
    pub vae: Vae,
    /// The HPSv2-style reward.
    pub reward: HpsReward,
    /// The iteration's prompt conditioning (one row per prompt).
    pub cond: Conditioning,
    /// The sampling schedule.
    pub schedule: Schedule,
    /// The iteration's captions (for the reward).
    pub captions: Vec<String>,
    /// The latent `[c, h, w]` of one sample.
    pub latent: [i64; 3],
    /// The case's hyper-parameters as a trainer configuration.
    pub train: TrainConfig,
    /// Seed of every random draw.
    pub sampler_seed: u64,
    /// The transformer work of one iteration.
    pub flops: IterationFlops,
}

impl BenchSetup {
    /// Loads (fixture) or builds (benchmark) the case's models on `device` as
    /// `precision` says (the transformer's master weights in float32, computing
    /// in the compute dtype; the VAE and the reward in the frozen dtype); the
    /// conditioning and the SDE run in float32.
    pub fn load(case: &Case, precision: &PrecisionConfig, device: Device) -> Result<Self> {
        let kinds = (precision.master_kind(), precision.frozen_kind());
        let layout = match case.is_benchmark() {
            true => Layout::Benchmark,
            false => Layout::Fixture,
        };
        let (model, vae, reward) = match layout {
            Layout::Fixture => load_models(case, kinds, device)?,
            Layout::Benchmark => seeded_models(case, kinds, device)?,
        };
        let mut model = model;
        model.set_compute_kind(precision.compute_kind());
        let state = upcast_kind(precision.master_kind());
        let latent = vae.latent_shape(case.hyper_i64("h")?, case.hyper_i64("w")?);
        let (cond, captions) = match layout {
            Layout::Fixture => (
                case.conditioning_on(model.config().guidance_embeds, state, device)?,
                case.strings(
                    "batch_captions (order used by the trainer, before repeat_interleave)",
                )?,
            ),
            Layout::Benchmark => bench_conditioning(case, &model, latent, state, device)?,
        };
        let mut train = train_config(case)?;
        train.precision = *precision;
        let steps = case.hyper_i64("sampling_steps")?;
        let schedule = Schedule::shifted_in(steps, case.hyper_f64("shift")?, state);
        let flops = iteration_flops(&model, &cond, latent, steps, &train);
        let sampler_seed = seed(case, "sampler_seed").unwrap_or(SAMPLER_SEED);
        Ok(BenchSetup {
            layout,
            model,
            vae,
            reward,
            cond,
            schedule,
            captions,
            latent,
            train,
            sampler_seed,
            flops,
        })
    }

    /// Runs `count` iterations (numbered from `first`), calling `each` with
    /// every iteration's number and stage times.
    pub fn run(
        &mut self,
        optimizer: &mut AdamW,
        first: u64,
        count: u64,
        each: &mut dyn FnMut(u64, &StageSeconds),
    ) -> Result<()> {
        let icfg = self.train.iteration_config();
        let shard = Shard::whole(self.cond.samples());
        for it in first..first + count {
            let draws = self.draws(it);
            let inputs = IterationInputs {
                cond: &self.cond,
                prompts: &self.captions,
                draws: &draws,
                shard: &shard,
                schedule: &self.schedule,
                latent: self.latent,
                report: None,
            };
            let model: &dyn VelocityModel = &self.model;
            let r = run_iteration(
                model,
                &self.vae,
                &mut self.reward,
                optimizer,
                &inputs,
                &icfg,
                &mut NoObserver,
            )?;
            each(it, &r.report.seconds);
        }
        Ok(())
    }

    /// A fresh AdamW over the transformer's parameters, as the case sets it.
    pub fn optimizer(&self) -> AdamW {
        let params: Vec<Tensor> = VelocityModel::parameters(&self.model)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        AdamW::new(self.train.adam(), &params)
    }

    /// The transformer work of one iteration as configured: with
    /// `first_window = "rollout_graphs"` without the update's forward passes
    /// of the transitions the rollout keeps (the rollout's own plan counts them).
    pub fn configured_flops(&self) -> Result<IterationFlops> {
        let update = self.train.iteration_config().update;
        let shard = Shard::whole(self.cond.samples());
        let batch = self.train.sampler.rollout_batch;
        let plan = first_window_plan(&update, &self.schedule, &self.draws(0), &shard, batch)?;
        let kept: usize = plan.groups().iter().map(Vec::len).sum();
        Ok(self.flops.without_forwards(kept as i64))
    }

    /// The random draws of iteration `it`.
    fn draws(&self, it: u64) -> Seeded {
        Seeded {
            seed: self.sampler_seed,
            iteration: it,
            prompt_ids: (0..self.captions.len() as u64).collect(),
            group: self.cond.group(),
            init: InitNoise::SharedPerIteration,
            precision: NoisePrecision::Bf16,
        }
    }
}

/// `case.json["seeds"][name]`.
fn seed(case: &Case, name: &str) -> Option<u64> {
    case.json().get("seeds")?.get(name)?.as_u64()
}

/// The fixture's weights.
fn load_models(case: &Case, (master, frozen): Kinds, device: Device) -> Result<Models> {
    let dir = case.dir();
    Ok((
        FluxTransformer::from_dir(&dir.join("transformer"), master, device)?,
        Vae::from_dir(&dir.join("vae"), frozen, device)?,
        HpsReward::from_dir(&dir.join("reward"), frozen, device)?,
    ))
}

/// `(transformer, frozen models)` storage dtypes.
type Kinds = (Kind, Kind);

/// The transformer, the VAE and the reward.
type Models = (FluxTransformer, Vae, HpsReward);

/// Seeded weights from the configs; the reward's tokenizer from its files when
/// the case has them, else a byte-level stand-in (the timing is the same).
fn seeded_models(case: &Case, (master, frozen): Kinds, device: Device) -> Result<Models> {
    let dir = case.dir();
    let base = seed(case, "model_init_seed_base").ok_or_else(|| {
        Error::config(
            dir.join("case.json"),
            "seeds.model_init_seed_base",
            "missing",
        )
    })?;
    let flux = FluxConfig::from_file(&dir.join("transformer/config.json"))?;
    let vae = VaeConfig::from_file(&dir.join("vae/config.json"))?;
    let clip = OpenClipConfig::from_dir(&dir.join("reward"))?;
    let context = clip.text_cfg.context_length as usize;
    let open_clip = OpenClip::new(clip, Source::Seeded(base + 2), frozen, device)?;
    let reward_dir = dir.join("reward");
    let tokenize = match ClipTokenizer::from_dir(&reward_dir) {
        Ok(tok) => Box::new(move |text: &str| Ok(tok.encode(text, context, Padding::Zero)?.ids))
            as crate::rewards::hps::TokenizeFn,
        Err(_) => byte_stand_in(context, 0),
    };
    Ok((
        FluxTransformer::new(flux, Source::Seeded(base), master, device)?,
        Vae::new(vae, Source::Seeded(base + 1), frozen, device)?,
        HpsReward::new(open_clip, tokenize),
    ))
}

/// The first `train_batch_size` prompts of `inputs.safetensors`.
fn bench_conditioning(
    case: &Case,
    model: &FluxTransformer,
    latent: [i64; 3],
    kind: Kind,
    device: Device,
) -> Result<(Conditioning, Vec<String>)> {
    let n = case.hyper_i64("train_batch_size (prompts per iteration)")?;
    let prompts = case.strings("prompts (dataset order)")?;
    let rows = |name: &str| -> Result<Tensor> {
        let t = case.input(name)?;
        if t.size()[0] < n || prompts.len() < n as usize {
            return Err(Error::config(
                case.dir().join("inputs.safetensors"),
                name,
                format!("fewer than {n} prompts"),
            ));
        }
        Ok(t.narrow(0, 0, n).to_kind(kind).to_device(device))
    };
    let (text, pooled) = (rows("prompt_embeds")?, rows("pooled_prompt_embeds")?); // (n, Lt, d), (n, p)
    let layout = crate::models::VelocityModel::layout(model);
    let guidance = model.config().guidance_embeds;
    let cond = Conditioning::new(
        text.shallow_clone(),
        pooled,
        layout.text_ids(text.size()[1], device),
        layout.image_ids(latent, device),
        guidance.then(|| case.hyper_f64("guidance")).transpose()?,
        case.group_size()?,
    )?;
    Ok((cond, prompts[..n as usize].to_vec()))
}

/// The transformer work of one iteration of this case: every sample's
/// `steps` rollout calls and `int((steps - 1) * timestep_fraction)` trained calls.
fn iteration_flops(
    model: &FluxTransformer,
    cond: &Conditioning,
    latent: [i64; 3],
    steps: i64,
    train: &TrainConfig,
) -> IterationFlops {
    let layout = VelocityModel::layout(model);
    let image_tokens = layout.image_ids(latent, Device::Cpu).size()[0];
    let text_tokens = cond.text_len();
    let call = ForwardFlops::of(model.config(), image_tokens, text_tokens);
    let trained = ((steps - 1) as f64 * train.grpo.timestep_fraction) as i64;
    IterationFlops::of(call, cond.samples(), steps, trained)
}
