//! `bench generate`: the ODE sampler's speed with each feature-cache setting
//! ([`crate::sampler::cache`]) and its quality against the uncached sampling
//! on the same seeds: PSNR and SSIM of the decoded images, relative L2 of the
//! final latents. The settings are timed in alternation, round after round,
//! and each reports its median; the first setting is always the uncached one.
//!
//! With sequence parallelism (the processes of a collective, launched by
//! torchrun) the uncached baseline runs on process 0 alone, the others
//! waiting, and every other setting (an uncached one first) is shared by all
//! processes: the speed-up is over one process.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::data::stack;
use crate::dist::{barrier, Collective};
use crate::error::{Error, Result};
use crate::imaging::quality::{psnr, ssim};
use crate::io::image::to_uint8;
use crate::models::sequence::SequenceParallel;
use crate::models::{LatentDecoder, PolicyModel, VelocityModel};
use crate::rng::Philox;
use crate::sampler::cache::CacheSetting;
use crate::sampler::cache::CacheStats;
use crate::sampler::generate::{sample_ode, OdeSettings};
use crate::sampler::CachePolicy;
use crate::train::build::{build_models_for, build_prompts, ModelUse};
use crate::train::TrainConfig;

/// What to sample: the model, prompts and image size of `cfg`.
pub struct GenerateCase<'a> {
    /// The model (`model`), prompts (`data`), size, shift and guidance (`sampler`).
    pub cfg: &'a TrainConfig,
    /// ODE steps.
    pub steps: i64,
    /// Images per sampling (prompts `0..` of the prompt set, cycled), one batch.
    pub images: i64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Timed rounds (every setting once per round, after one untimed round).
    pub rounds: u32,
    /// Where it runs.
    pub device: Device,
    /// The processes sharing each forward pass of the settings after the
    /// baseline (sequence parallelism), if any: every process calls
    /// [`bench_generate`]; process 0 gets the figures.
    pub parallel: Option<&'a dyn Collective>,
}

/// The figures of one cache setting.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateFigures {
    /// The setting's name (`none` for the uncached baseline).
    pub label: String,
    /// The policy (absent: none).
    pub cache: Option<CachePolicy>,
    /// Processes sharing each forward pass (1: one process).
    pub processes: i64,
    /// Median seconds of a sampling (decoding excluded), per image.
    pub seconds_per_image: f64,
    /// Median seconds per ODE step of the batch.
    pub seconds_per_step: f64,
    /// The uncached median over this one.
    pub speedup: f64,
    /// Steps computed fully, with a span of blocks skipped, and skipped.
    pub full_steps: i64,
    /// See `full_steps`.
    pub block_steps: i64,
    /// See `full_steps`.
    pub skipped_steps: i64,
    /// Transformer blocks run, as a share of the uncached sampling's.
    pub blocks_run: f64,
    /// PSNR (dB) of the decoded images against the uncached ones.
    pub psnr: f64,
    /// Mean SSIM against the uncached images.
    pub ssim: f64,
    /// `|x - x_ref| / |x_ref|` of the final latents.
    pub latent_rel_l2: f64,
}

/// One measured setting.
struct Row {
    label: String,
    cache: Option<CachePolicy>,
    /// Run by every process of the collective (else by process 0 alone).
    shared: bool,
}

/// The baseline, then (under sequence parallelism) the uncached shared
/// sampling, then every setting of `settings`.
fn rows(
    case: &GenerateCase,
    settings: &[(String, CacheSetting)],
    blocks: usize,
) -> Result<Vec<Row>> {
    let shared = case.parallel.is_some_and(|c| c.world_size() > 1);
    let mut rows = vec![Row {
        label: "none".into(),
        cache: None,
        shared: false,
    }];
    if shared {
        let n = case.parallel.map_or(1, |c| c.world_size());
        rows.push(Row {
            label: format!("sequence-parallel {n}"),
            cache: None,
            shared,
        });
    }
    for (label, setting) in settings {
        let cache = setting.resolve(case.steps, blocks);
        if shared && matches!(cache, CachePolicy::Blocks(_)) {
            return Err(Error::Input(format!(
                "cache setting {label}: a block cache cannot run with sequence parallelism (a `steps` cache can)"
            )));
        }
        rows.push(Row {
            label: label.clone(),
            cache: Some(cache),
            shared,
        });
    }
    Ok(rows)
}

/// Samples with every setting of `settings` (`(label, policy)`) after the
/// uncached baseline, alternating them round by round, and compares each
/// setting's images with the baseline's (on process 0; the other processes
/// of `case.parallel` return no figures).
pub fn bench_generate(
    case: &GenerateCase,
    settings: &[(String, CacheSetting)],
) -> Result<Vec<GenerateFigures>> {
    crate::precision::set_tf32(case.cfg.precision.tf32);
    let (model, vae) = build_models_for(case.cfg, case.device, ModelUse::Inference)?;
    let rows = rows(case, settings, model.cacheable_blocks())?;
    let (text, pooled, noise) = inputs(case, &model, &vae)?;
    let s = &case.cfg.sampler;
    let base = OdeSettings {
        steps: case.steps,
        shift: s.shift,
        guidance: model.guidance_embeds().then_some(s.guidance),
        cache: None,
    };
    let (lead, processes) = match case.parallel {
        Some(c) => (c.rank() == 0, c.world_size()),
        None => (true, 1),
    };
    let mut seconds = vec![Vec::new(); rows.len()];
    let mut outputs: Vec<Option<(Tensor, CacheStats)>> = rows.iter().map(|_| None).collect();
    for round in 0..=case.rounds {
        for (i, row) in rows.iter().enumerate() {
            if !row.shared && !lead {
                barrier_of(case)?; // process 0 samples alone
                continue;
            }
            let parallel = case.parallel.map(|c| SequenceParallel {
                model: &model,
                collective: c,
            });
            let velocity: &dyn VelocityModel = match (&parallel, row.shared) {
                (Some(p), true) => p,
                _ => &model,
            };
            let settings = OdeSettings {
                cache: row.cache.clone(),
                ..base.clone()
            };
            let start = Instant::now();
            let out = sample_ode(velocity, (&text, &pooled), &noise, &settings)?;
            let _ = out.0.sum(Kind::Float).double_value(&[]); // wait for the device
            if round > 0 {
                seconds[i].push(start.elapsed().as_secs_f64());
            }
            outputs[i] = Some(out);
            if !row.shared {
                barrier_of(case)?;
            }
        }
    }
    if !lead {
        return Ok(Vec::new());
    }
    let latents: Vec<(Tensor, CacheStats)> = outputs.into_iter().flatten().collect();
    let shares = |row: &Row| if row.shared { processes } else { 1 };
    let measured = rows
        .iter()
        .map(|r| (r.label.clone(), r.cache.clone(), shares(r)));
    figures(case, &vae, measured.collect(), &latents, &seconds)
}

/// Waits for the other processes of `case.parallel`, if any.
fn barrier_of(case: &GenerateCase) -> Result<()> {
    case.parallel.map_or(Ok(()), barrier)
}

/// The figures of each row `(label, cache, processes)` from its final latents
/// and timings (the first row is the baseline).
fn figures(
    case: &GenerateCase,
    vae: &dyn LatentDecoder,
    rows: Vec<(String, Option<CachePolicy>, i64)>,
    latents: &[(Tensor, CacheStats)],
    seconds: &[Vec<f64>],
) -> Result<Vec<GenerateFigures>> {
    let decode = |x: &Tensor| {
        let _guard = tch::no_grad_guard();
        to_uint8(&vae.decode_latents(x))
    };
    let (reference, _) = &latents[0];
    let reference_images = decode(reference);
    let base_median = median(&seconds[0]);
    let mut figures = Vec::new();
    for (i, ((label, cache, processes), (x, stats))) in rows.into_iter().zip(latents).enumerate() {
        let images = decode(x);
        let t = median(&seconds[i]);
        figures.push(GenerateFigures {
            label,
            cache,
            processes,
            seconds_per_image: t / case.images as f64,
            seconds_per_step: t / case.steps as f64,
            speedup: base_median / t,
            full_steps: stats.full_steps,
            block_steps: stats.block_steps,
            skipped_steps: stats.skipped_steps,
            blocks_run: stats.blocks_run as f64 / stats.blocks_full.max(1) as f64,
            psnr: psnr(&images, &reference_images)?,
            ssim: ssim(&images, &reference_images)?,
            latent_rel_l2: rel_l2(x, reference),
        });
    }
    Ok(figures)
}

/// The prompts' embeddings and the initial noise of `case`.
fn inputs(
    case: &GenerateCase,
    model: &dyn PolicyModel,
    vae: &dyn LatentDecoder,
) -> Result<(Tensor, Tensor, Tensor)> {
    if case.images < 1 || case.steps < 1 || case.rounds < 1 {
        return Err(Error::Input(format!(
            "images ({}), steps ({}) and rounds ({}) must be >= 1",
            case.images, case.steps, case.rounds
        )));
    }
    let prompts = build_prompts(case.cfg, model)?;
    let entries = (0..case.images as u64)
        .map(|i| prompts.get(i % prompts.len()))
        .collect::<Result<Vec<_>>>()?;
    let (text, pooled) = stack(&entries); // (n, Lt, d), (n, p)
    let s = &case.cfg.sampler;
    let [c, h, w] = vae.latent_shape(s.height, s.width);
    let noise =
        Philox::for_stream(case.seed, "generate/noise").normal_tensor(&[case.images, c, h, w]);
    let on = |t: Tensor| t.to_device(case.device);
    Ok((on(text), on(pooled), on(noise)))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn rel_l2(x: &Tensor, reference: &Tensor) -> f64 {
    let d = (x - reference)
        .to_kind(Kind::Double)
        .norm()
        .double_value(&[]);
    d / reference
        .to_kind(Kind::Double)
        .norm()
        .double_value(&[])
        .max(1e-30)
}

/// The figures as a Markdown table.
pub fn markdown(figures: &[GenerateFigures], case: &GenerateCase) -> String {
    let mut out = format!(
        "{} images, {} steps, median of {} alternated rounds\n\n\
         | cache | processes | s / image | s / step | speed-up | full / block / skipped steps | blocks run | PSNR (dB) | SSIM | latent rel. L2 |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        case.images, case.steps, case.rounds
    );
    for f in figures {
        out.push_str(&format!(
            "| {} | {} | {:.4} | {:.4} | {:.2}x | {} / {} / {} | {:.0}% | {:.1} | {:.4} | {:.4} |\n",
            f.label,
            f.processes,
            f.seconds_per_image,
            f.seconds_per_step,
            f.speedup,
            f.full_steps,
            f.block_steps,
            f.skipped_steps,
            100.0 * f.blocks_run,
            f.psnr,
            f.ssim,
            f.latent_rel_l2
        ));
    }
    out
}
