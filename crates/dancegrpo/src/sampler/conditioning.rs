//! Per-prompt text conditioning of an iteration, handed out per sample:
//! sample `b` uses prompt `b / G` (the reference's `repeat_interleave`).

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::models::FlowInputs;

/// The prompts of one iteration as the transformer consumes them.
pub struct Conditioning {
    text: Tensor,   // (P, Lt, d)
    pooled: Tensor, // (P, p)
    text_ids: Tensor,
    image_ids: Tensor,
    guidance: Option<f64>,
    group: i64,
}

/// The conditioning of a run of samples, batched `(n, ..)`.
pub struct SampleConditioning {
    text: Tensor,             // (n, Lt, d)
    pooled: Tensor,           // (n, p)
    guidance: Option<Tensor>, // (n,)
}

impl Conditioning {
    /// `text` `(P, Lt, d)` and `pooled` `(P, p)` embeddings of `P` prompts, each
    /// repeated for a group of `group` samples; position ids `text_ids` `(Lt, 3)`
    /// and `image_ids` `(L, 3)`; `guidance` for guidance-distilled models.
    pub fn new(
        text: Tensor,
        pooled: Tensor,
        text_ids: Tensor,
        image_ids: Tensor,
        guidance: Option<f64>,
        group: i64,
    ) -> Result<Self> {
        let (ts, ps) = (text.size(), pooled.size());
        if ts.len() != 3 || ps.len() != 2 || ts[0] != ps[0] || group < 1 {
            return Err(Error::Input(format!(
                "conditioning: text {ts:?} and pooled {ps:?} must be (P, Lt, d) and (P, p) with the same P; group {group}"
            )));
        }
        if text_ids.size() != [ts[1], 3] {
            return Err(Error::Input(format!(
                "conditioning: text_ids {:?} must be ({}, 3)",
                text_ids.size(),
                ts[1]
            )));
        }
        Ok(Conditioning {
            text,
            pooled,
            text_ids,
            image_ids,
            guidance,
            group,
        })
    }

    /// Number of samples `P * G`.
    pub fn samples(&self) -> i64 {
        self.text.size()[0] * self.group
    }

    /// Number of text tokens `Lt`.
    pub fn text_len(&self) -> i64 {
        self.text.size()[1]
    }

    /// Group size `G`.
    pub fn group(&self) -> i64 {
        self.group
    }

    /// The device the embeddings live on.
    pub fn device(&self) -> Device {
        self.text.device()
    }

    /// The conditioning of samples `samples` (in this order).
    pub fn for_samples(&self, samples: &[i64]) -> SampleConditioning {
        let device = self.device();
        let prompts: Vec<i64> = samples.iter().map(|b| b / self.group).collect();
        let idx = Tensor::from_slice(&prompts).to_device(device);
        let n = samples.len() as i64;
        SampleConditioning {
            text: self.text.index_select(0, &idx),
            pooled: self.pooled.index_select(0, &idx),
            guidance: self
                .guidance
                .map(|g| Tensor::full([n], g, (Kind::Float, device))),
        }
    }

    /// Model inputs for `samples` (their conditioning from [`Self::for_samples`])
    /// at latents `z` `(n, L, c)` and timesteps `t` `(n,)`.
    pub fn inputs<'a>(
        &'a self,
        samples: &'a SampleConditioning,
        z: &'a Tensor,
        t: &'a Tensor,
    ) -> FlowInputs<'a> {
        FlowInputs {
            latents: z,
            timestep: t,
            text: &samples.text,
            pooled: &samples.pooled,
            text_ids: &self.text_ids,
            image_ids: &self.image_ids,
            guidance: samples.guidance.as_ref(),
        }
    }
}
