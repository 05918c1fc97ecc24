//! The tiny model, conditioning, draws and update settings the GRPO tests share.

use dancegrpo::dist::Shard;
use dancegrpo::grpo::iteration::StageReport;
use dancegrpo::grpo::update::{TransitionBatch, UpdateStats};
use dancegrpo::grpo::{
    advantages, grpo_update, AdamW, AdamWConfig, Grouping, Guard, IterationConfig, IterationInputs,
    LrSchedule, RewardMixing, Trainable, UpdateBatching, UpdateConfig, UpdateInputs,
    UpdateObserver,
};
use dancegrpo::models::flux::packing;
use dancegrpo::models::flux::{FluxConfig, FluxTransformer};
use dancegrpo::models::vae::{Vae, VaeConfig};
use dancegrpo::models::{ActivationCheckpointing, VelocityModel};
use dancegrpo::precision::ReduceDtype;
use dancegrpo::rng::Philox;
use dancegrpo::sampler::draws::{InitNoise, NoisePrecision};
use dancegrpo::sampler::rollout::{rollout, Rollout, RolloutSettings, StepMeans};
use dancegrpo::sampler::{
    Conditioning, PostWindow, Schedule, SdeForm, Seeded, StepWindow, WindowTraining,
};
use dancegrpo::weights::Source;
use tch::{Device, Kind, Tensor};

pub const G: i64 = 4;
pub const PROMPTS: i64 = 2;
pub const STEPS: i64 = 6;

pub fn model(mode: ActivationCheckpointing) -> FluxTransformer {
    model_in(mode, Kind::Float)
}

/// The seeded tiny FLUX with float32 weights computing in `compute`.
pub fn model_in(mode: ActivationCheckpointing, compute: Kind) -> FluxTransformer {
    let mut m = FluxTransformer::new(
        FluxConfig::tiny(),
        Source::Seeded(5),
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    m.set_checkpointing(mode);
    m.set_compute_kind(compute);
    m
}

pub fn conditioning() -> Conditioning {
    let mut rng = Philox::new(9, 0);
    Conditioning::new(
        rng.normal_tensor(&[PROMPTS, 32, 32]),
        rng.normal_tensor(&[PROMPTS, 4]),
        packing::text_ids(32, Device::Cpu),
        packing::image_ids(8, 8, Device::Cpu),
        Some(3.5),
        G,
    )
    .unwrap()
}

pub fn draws() -> Seeded {
    Seeded {
        seed: 11,
        iteration: 0,
        prompt_ids: vec![0, 1],
        group: G,
        init: InitNoise::PerSample,
        precision: NoisePrecision::Bf16,
    }
}

pub fn config(grad_accum: i64) -> UpdateConfig {
    UpdateConfig {
        sde: SdeForm::Dance,
        eta: 0.3,
        window: None,
        clip_range: 1e-4,
        kl_beta: 0.0,
        guard: Guard::None,
        timestep_fraction: 0.6,
        trainable: Trainable::AllButLast,
        grad_accum,
        max_grad_norm: 1.0,
        learning_rate: 1e-3,
        lr_schedule: LrSchedule::default(),
        batching: UpdateBatching::Rollout,
        max_rows: None,
        first_window: dancegrpo::grpo::settings::FirstWindow::Recompute,
        grad_reduce: ReduceDtype::Fp32,
    }
}

/// Ratios seen before the first optimizer step.
#[derive(Default)]
pub struct FirstWindow {
    pub stepped: bool,
    pub ratios: Vec<f32>,
    pub later: Vec<f32>,
    /// `(sample, step)` of every re-evaluated active row.
    pub trained: Vec<(i64, i64)>,
}

impl UpdateObserver for FirstWindow {
    fn transitions(&mut self, x: &TransitionBatch) -> dancegrpo::Result<()> {
        let all: Vec<f32> = Vec::try_from(&x.terms.ratio).unwrap();
        let picked = x.active.iter().map(|&r| all[r as usize]);
        let rows = x
            .active
            .iter()
            .map(|&r| (x.samples[r as usize], x.steps[r as usize]));
        self.trained.extend(rows);
        if self.stepped {
            self.later.extend(picked);
        } else {
            self.ratios.extend(picked);
        }
        Ok(())
    }
    fn after_step(&mut self, _: u64, _: &[(String, Tensor)]) -> dancegrpo::Result<()> {
        self.stepped = true;
        Ok(())
    }
}

pub fn iteration(
    batch: i64,
    grad_accum: i64,
    mode: ActivationCheckpointing,
) -> (Rollout, FirstWindow) {
    iteration_in(batch, grad_accum, mode, Kind::Float)
}

pub fn iteration_in(
    batch: i64,
    grad_accum: i64,
    mode: ActivationCheckpointing,
    compute: Kind,
) -> (Rollout, FirstWindow) {
    let rollout = (UpdateBatching::Rollout, None);
    let (ro, obs, _) = iteration_batched(batch, grad_accum, mode, compute, rollout);
    (ro, obs)
}

pub fn iteration_capped(
    batch: i64,
    grad_accum: i64,
    mode: ActivationCheckpointing,
    batching: UpdateBatching,
    max_rows: Option<i64>,
) -> (Rollout, FirstWindow, UpdateStats) {
    iteration_batched(batch, grad_accum, mode, Kind::Float, (batching, max_rows))
}

pub fn iteration_batched(
    batch: i64,
    grad_accum: i64,
    mode: ActivationCheckpointing,
    compute: Kind,
    batching: (UpdateBatching, Option<i64>),
) -> (Rollout, FirstWindow, UpdateStats) {
    let dance = (SdeForm::Dance, 0.3, None);
    iteration_sde(batch, grad_accum, mode, compute, batching, dance)
}

/// [`iteration_batched`] with the stochastic step `sde` at noise level `eta`
/// on the steps of `window` (`None`: all).
pub fn iteration_sde(
    batch: i64,
    grad_accum: i64,
    mode: ActivationCheckpointing,
    compute: Kind,
    (batching, max_rows): (UpdateBatching, Option<i64>),
    (sde, eta, window): (SdeForm, f64, Option<StepWindow>),
) -> (Rollout, FirstWindow, UpdateStats) {
    let m = model_in(mode, compute);
    let mut obs = FirstWindow::default();
    let cfg = UpdateConfig {
        batching,
        max_rows,
        sde,
        eta,
        window,
        ..config(grad_accum)
    };
    let (ro, stats) = update_after_rollout(&m, batch, &cfg, &mut obs);
    let stats = stats.unwrap();
    assert_eq!(stats.grad_norms.len() as i64, PROMPTS * G / grad_accum);
    let t = match window {
        Some(w) if w.train == WindowTraining::All => w.len(),
        Some(w) => (w.len() as f64 * 0.6) as i64,
        None => 3,
    };
    assert_eq!(stats.transitions, (PROMPTS * G * t) as usize);
    (ro, obs, stats)
}

/// The rollout of the test prompts by `m` (`batch` samples per call), with the
/// conditioning, schedule and draws it used.
pub fn seeded_rollout(
    m: &dyn VelocityModel,
    batch: i64,
) -> (Conditioning, Schedule, Seeded, Rollout) {
    seeded_rollout_with(m, batch, (SdeForm::Dance, 0.3, None))
}

/// [`seeded_rollout`] with the stochastic step `sde` at noise level `eta` on
/// the steps of `window` (`None`: all).
pub fn seeded_rollout_with(
    m: &dyn VelocityModel,
    batch: i64,
    form: (SdeForm, f64, Option<StepWindow>),
) -> (Conditioning, Schedule, Seeded, Rollout) {
    seeded_rollout_post(m, batch, form, PostWindow::Euler)
}

/// [`seeded_rollout_with`] with the steps after the window taken by `post`.
pub fn seeded_rollout_post(
    m: &dyn VelocityModel,
    batch: i64,
    (sde, eta, window): (SdeForm, f64, Option<StepWindow>),
    post: PostWindow,
) -> (Conditioning, Schedule, Seeded, Rollout) {
    let cond = conditioning();
    let schedule = Schedule::shifted(STEPS, 3.0);
    let draws = draws();
    let settings = RolloutSettings {
        sde,
        eta,
        window,
        batch,
        window_samples: None,
        means: StepMeans::Keep, // for GRPO-Guard's ratio normalisation
        tree: None,
        post,
    };
    let ro = rollout(
        m,
        &cond,
        &draws,
        &schedule,
        [16, 8, 8],
        &settings,
        Device::Cpu,
    )
    .unwrap();
    (cond, schedule, draws, ro)
}

/// One update of `m` with `cfg` after its seeded rollout (`batch` samples per
/// call, with `cfg`'s step form, noise level and window), on the advantages
/// of the test rewards, with a fresh AdamW.
pub fn update_after_rollout(
    m: &dyn VelocityModel,
    batch: i64,
    cfg: &UpdateConfig,
    observer: &mut dyn UpdateObserver,
) -> (Rollout, dancegrpo::Result<UpdateStats>) {
    let (_, _, draws, ro) = seeded_rollout_with(m, batch, (cfg.sde, cfg.eta, cfg.window));
    let stats = update_on(m, &ro, &draws, cfg, observer);
    (ro, stats)
}

/// One update of `m` with `cfg` on the rollout `ro` of the test prompts and
/// schedule (drawn with `draws`), on the advantages of the test rewards, with
/// a fresh AdamW.
pub fn update_on(
    m: &dyn VelocityModel,
    ro: &Rollout,
    draws: &dyn dancegrpo::sampler::Draws,
    cfg: &UpdateConfig,
    observer: &mut dyn UpdateObserver,
) -> dancegrpo::Result<UpdateStats> {
    let (cond, schedule) = (conditioning(), Schedule::shifted(STEPS, 3.0));
    let rewards = Philox::new(3, 0).normal_tensor(&[PROMPTS * G]);
    let adv = advantages(&rewards, Grouping::PerPrompt { size: G }, 5.0).unwrap();
    let params: Vec<Tensor> = m.parameters().into_iter().map(|(_, p)| p).collect();
    let mut opt = AdamW::new(AdamWConfig::default(), &params);
    let shard = dancegrpo::dist::Shard::whole(ro.latents.size()[0]);
    let inputs = UpdateInputs {
        rollout: ro,
        shard: &shard,
        advantages: &adv.clamped,
        cond: &cond,
        schedule: &schedule,
        draws,
    };
    grpo_update(m, &mut opt, &inputs, cfg, observer)
}

/// A reward for tests: mean brightness, failing on samples listed in `fail`.
pub struct Brightness {
    /// The samples whose reward fails.
    pub fail: Vec<usize>,
}

impl dancegrpo::rewards::Reward for Brightness {
    fn name(&self) -> &str {
        "brightness"
    }
    fn score(
        &mut self,
        batch: &dancegrpo::rewards::RewardBatch,
    ) -> dancegrpo::Result<Vec<dancegrpo::rewards::Score>> {
        use dancegrpo::rewards::Score;
        assert_eq!(batch.prompts.len() as i64, batch.images.size()[0]);
        Ok((0..batch.images.size()[0])
            .map(|b| {
                if self.fail.contains(&(b as usize)) {
                    Score::Failed("test failure".into())
                } else {
                    let m = batch.images.get(b).to_kind(Kind::Float).mean(Kind::Float);
                    Score::Value(m.double_value(&[]) as f32 / 255.0)
                }
            })
            .collect())
    }
}

/// The tests' rollout: Dance-SDE at noise level 0.3 on every step, `batch`
/// samples per model call, the steps' means not kept.
pub fn rollout_settings(batch: i64) -> RolloutSettings {
    RolloutSettings {
        sde: SdeForm::Dance,
        eta: 0.3,
        window: None,
        batch,
        window_samples: None,
        means: StepMeans::Drop,
        tree: None,
        post: Default::default(),
    }
}

/// A whole iteration's settings: [`rollout_settings`] with `batch`, decodes of
/// `decode_batch`, per-prompt advantages of the test groups and `update`.
pub fn iteration_settings(batch: i64, decode_batch: i64, update: UpdateConfig) -> IterationConfig {
    IterationConfig {
        rollout: rollout_settings(batch),
        decode_batch,
        grouping: Grouping::PerPrompt { size: G },
        adv_clip_max: 5.0,
        mixing: RewardMixing::Reward,
        max_failed_reward_share: 1.0,
        update,
    }
}

/// The seeded tiny VAE.
pub fn vae() -> Vae {
    Vae::new(
        VaeConfig::tiny(),
        Source::Seeded(6),
        Kind::Float,
        Device::Cpu,
    )
    .unwrap()
}

/// What a whole iteration of the test prompts reads, in one process.
pub struct IterationData {
    pub cond: Conditioning,
    pub schedule: Schedule,
    pub draws: Seeded,
    pub prompts: Vec<String>,
    pub shard: Shard<'static>,
}

impl IterationData {
    /// The test prompts' conditioning, schedule and draws.
    pub fn new() -> Self {
        let cond = conditioning();
        let shard = Shard::whole(cond.samples());
        IterationData {
            cond,
            schedule: Schedule::shifted(STEPS, 3.0),
            draws: draws(),
            prompts: vec!["a".to_string(), "b".to_string()],
            shard,
        }
    }

    /// The iteration's inputs, its stages reported to `report`.
    pub fn inputs<'a>(&'a self, report: Option<StageReport<'a>>) -> IterationInputs<'a> {
        IterationInputs {
            cond: &self.cond,
            prompts: &self.prompts,
            draws: &self.draws,
            shard: &self.shard,
            schedule: &self.schedule,
            latent: [16, 8, 8],
            report,
        }
    }
}
