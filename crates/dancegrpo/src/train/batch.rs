//! One iteration's batch: the prompts at the data stream's next positions,
//! their conditioning (one row per prompt, or per local sample when the
//! samples are split among processes) and the seeded random draws.

use tch::Device;

use super::config::TrainConfig;
use super::data::DataOrder;
use super::health;
use crate::data::{stack, PromptSet};
use crate::dist::Shard;
use crate::error::Result;
use crate::models::{LatentDecoder, PolicyModel};
use crate::sampler::{Conditioning, Seeded};

/// Where an iteration's prompts come from.
pub struct BatchSource<'a> {
    /// The training prompts.
    pub prompts: &'a dyn PromptSet,
    /// The data order over them.
    pub order: &'a mut DataOrder,
    /// The stream position of the iteration's first prompt.
    pub position: u64,
    /// Completed iterations (the draws' key).
    pub iteration: u64,
}

/// An iteration's conditioning, captions and draws.
pub struct Batch {
    /// The conditioning rows.
    pub cond: Conditioning,
    /// One caption per conditioning row.
    pub captions: Vec<String>,
    /// The seeded draws of the whole batch.
    pub seeded: Seeded,
    /// Whether `cond` holds one row per local sample (the draws then are the
    /// shard's subset) rather than one per prompt.
    pub per_sample: bool,
    /// The latent shape `(c, h, w)` of one image.
    pub latent: [i64; 3],
}

impl Batch {
    /// The batch of `cfg.run.prompts_per_iteration` prompts from `source` for
    /// this process's `shard`, conditioned for `model` and `decoder` on `device`.
    pub fn new(
        cfg: &TrainConfig,
        source: BatchSource,
        (model, decoder): (&dyn PolicyModel, &dyn LatentDecoder),
        shard: &Shard,
        device: Device,
    ) -> Result<Self> {
        let p = cfg.run.prompts_per_iteration as u64;
        let g = cfg.sampler.group_size;
        let positions: Vec<u64> = (source.position..source.position + p).collect();
        // one conditioning row per prompt (groups of G), or per local sample
        let per_sample = shard.samples().len() as i64 != shard.total();
        let (rows, group): (Vec<usize>, i64) = match per_sample {
            false => ((0..p as usize).collect(), g),
            true => (
                shard.samples().iter().map(|&s| (s / g) as usize).collect(),
                1,
            ),
        };
        let entries = (rows.iter())
            .map(|&i| health::checked_prompt(source.prompts, source.order.index(positions[i])))
            .collect::<Result<Vec<_>>>()?;
        let (text, pooled) = stack(&entries); // (rows, Lt, d), (rows, p)
        let latent = decoder.latent_shape(cfg.sampler.height, cfg.sampler.width);
        let layout = model.layout();
        let cond = Conditioning::new(
            text.to_device(device),
            pooled.to_device(device),
            layout.text_ids(text.size()[1], device),
            layout.image_ids(latent, device),
            model.guidance_embeds().then_some(cfg.sampler.guidance),
            group,
        )?;
        let seeded = Seeded {
            seed: cfg.run.seed,
            iteration: source.iteration,
            prompt_ids: positions,
            group: g,
            init: cfg.sampler.init_noise,
            precision: cfg.sampler.noise_precision,
        };
        Ok(Batch {
            cond,
            captions: entries.iter().map(|e| e.caption.clone()).collect(),
            seeded,
            per_sample,
            latent,
        })
    }
}
