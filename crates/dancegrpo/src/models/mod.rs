//! Models and the velocity-model trait the sampler and trainer are written against.

pub mod clip;
pub mod clip_text;
pub mod flux;
pub mod latent;
pub mod lora;
pub mod open_clip;
pub mod sequence;
pub mod t5;
pub mod vae;

use tch::Tensor;

pub use latent::{LatentDecoder, TokenLayout};

use crate::dist::Collective;
use crate::error::Result;
use crate::precision::ReduceDtype;

/// Inputs of one velocity evaluation of a text-conditioned flow model.
pub struct FlowInputs<'a> {
    /// Packed latent tokens `(b, L, c)`.
    pub latents: &'a Tensor,
    /// Timesteps in [0, 1] `(b,)` (the model scales them as it needs).
    pub timestep: &'a Tensor,
    /// Text token embeddings `(b, Lt, d_text)`.
    pub text: &'a Tensor,
    /// Pooled text embedding `(b, d_pooled)`.
    pub pooled: &'a Tensor,
    /// Position ids of the text tokens `(Lt, 3)`.
    pub text_ids: &'a Tensor,
    /// Position ids of the latent tokens `(L, 3)`.
    pub image_ids: &'a Tensor,
    /// Guidance scale `(b,)` for guidance-distilled models.
    pub guidance: Option<&'a Tensor>,
}

/// Whether a model recomputes activations block by block in its backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationCheckpointing {
    /// Keep every activation (fastest, most memory).
    #[default]
    Off,
    /// Keep only block inputs; recompute each block during backward.
    PerBlock,
}

/// A model predicting the flow velocity `v(x_t, t, c)`: all the sampler and the
/// GRPO update need to know about a generator.
pub trait VelocityModel {
    /// The velocity for `inputs`, same shape as `inputs.latents`.
    fn velocity(&self, inputs: &FlowInputs) -> Result<Tensor>;

    /// Computes `loss_fn(velocity(inputs))` and back-propagates it into the
    /// parameters' gradients (accumulating). Returns the loss.
    fn velocity_backward(
        &self,
        inputs: &FlowInputs,
        loss_fn: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let loss = loss_fn(&self.velocity(inputs)?)?;
        loss.backward();
        Ok(loss)
    }

    /// Whether [`Self::velocity_backward`] is `loss_fn(velocity)` followed by
    /// an ordinary backward pass (the default), so that a velocity computed
    /// with gradients beforehand (the rollout's, under
    /// [`crate::grpo::FirstWindow::RolloutGraphs`]) can be back-propagated in
    /// its place. A model that recomputes activations or gathers sharded
    /// weights in its backward pass says no.
    fn plain_backward(&self) -> bool {
        true
    }

    /// The velocity of the reference policy of a KL term for `inputs`,
    /// without gradients: the base model the training started from. `None`
    /// when the model holds no reference (the default; under LoRA the model
    /// is its own reference with its adapters turned off).
    fn reference_velocity(&self, _inputs: &FlowInputs) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Blocks a sampler's cache may skip ([`crate::sampler::cache`]): the
    /// model's transformer blocks in forward order (0: none, the default).
    fn cacheable_blocks(&self) -> usize {
        0
    }

    /// The velocity for `inputs` with the blocks `span` (forward order)
    /// either run, returning the residual they added to the hidden state, or,
    /// given `reuse` (such a residual), skipped with `reuse` added in their
    /// place. Models without cacheable blocks refuse.
    fn velocity_blocks(
        &self,
        _inputs: &FlowInputs,
        span: std::ops::Range<usize>,
        _reuse: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        Err(crate::error::Error::Input(format!(
            "this model cannot cache blocks {}..{}",
            span.start, span.end
        )))
    }

    /// The velocity for `inputs`, computed by the processes of `c` together
    /// (Ulysses sequence parallelism, [`sequence`]): every process calls it
    /// with the same whole inputs and gets the whole velocity. Models that
    /// cannot split their sequence refuse (the default).
    fn velocity_sequence_parallel(
        &self,
        _inputs: &FlowInputs,
        c: &dyn Collective,
    ) -> Result<Tensor> {
        Err(crate::error::Error::Input(format!(
            "this model cannot split its sequence over {} processes",
            c.world_size()
        )))
    }

    /// Whether [`Self::velocity_sequence_parallel`] can split `image_tokens`
    /// tokens over `world` processes (checked before a run starts). Models
    /// that cannot split their sequence refuse (the default).
    fn check_sequence_split(&self, _image_tokens: i64, world: i64) -> Result<()> {
        Err(crate::error::Error::Input(format!(
            "this model cannot split its sequence over {world} processes"
        )))
    }

    /// All parameters with their checkpoint names, in a stable order.
    fn parameters(&self) -> Vec<(String, Tensor)>;

    /// How the model reads latents (packing and position ids).
    fn layout(&self) -> &dyn TokenLayout;

    /// Sums the gradients of [`Self::parameters`] over the processes of `c`
    /// before an optimizer step (data parallelism: one all-reduce per bucket).
    /// A sharded model, whose gradients are reduced as they are made, does nothing.
    fn reduce_gradients(&self, c: &dyn Collective, reduce: ReduceDtype) -> Result<()> {
        let params: Vec<Tensor> = self.parameters().into_iter().map(|(_, p)| p).collect();
        crate::dist::all_reduce_grads(c, &params, crate::dist::GRAD_BUCKET, reduce)
    }

    /// Clips the gradients of [`Self::parameters`] to total norm `max_norm` the
    /// way `torch.nn.utils.clip_grad_norm_` does and returns the norm before
    /// clipping (0-d). A sharded model takes the norm over every process's shards.
    fn clip_gradients(&self, _c: &dyn Collective, max_norm: f64) -> Result<Tensor> {
        let params: Vec<Tensor> = self.parameters().into_iter().map(|(_, p)| p).collect();
        Ok(crate::grpo::clip_grad_norm(&params, max_norm))
    }

    /// The optimizer has just changed [`Self::parameters`] in place (a sharded
    /// model drops its gathered copies, or gathers the stepped parts back).
    fn parameters_changed(&self) -> Result<()> {
        Ok(())
    }
}

/// Where a model's parameter units live while it computes: sharded training
/// gathers a unit (an embedding stage, a block, the output head) just before it
/// runs and frees it after, and collects its gradients as soon as they are
/// complete. A model calls these around every unit; without a residency its
/// parameters simply stay where they are.
pub trait Residency {
    /// Unit `unit` is about to compute (a forward, or its recompute in backward).
    fn acquire(&self, unit: usize) -> Result<()>;
    /// Unit `unit` is done for now (never while a graph still needs it).
    fn release(&self, unit: usize) -> Result<()>;
    /// Unit `unit`'s gradients from the current backward pass are complete.
    fn gradients_ready(&self, unit: usize) -> Result<()>;
}

/// A named group of parameters acquired and released together.
pub struct ParamUnit {
    /// `embed`, `transformer_blocks.3`, `head`...
    pub name: String,
    /// Its parameters with their checkpoint names, in model order.
    pub params: Vec<(String, Tensor)>,
}

/// The widths of the text conditioning a model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextWidths {
    /// Width of each text token embedding (`joint_attention_dim` in FLUX).
    pub text: i64,
    /// Width of the pooled text embedding (`pooled_projection_dim` in FLUX).
    pub pooled: i64,
}

/// A velocity model the trainer can fine-tune and checkpoint: all the trainer,
/// its checkpoints and `generate` need beyond [`VelocityModel`].
///
/// [`VelocityModel::parameters`] lists what is trained (the whole model, or
/// only adapters); `save_trained` and `load_trained` write and read exactly
/// those into a checkpoint directory, in whatever layout the model's users expect.
pub trait PolicyModel: VelocityModel {
    /// The text conditioning widths the model accepts.
    fn text_widths(&self) -> TextWidths;

    /// Whether the model takes a guidance-scale input (guidance-distilled).
    fn guidance_embeds(&self) -> bool;

    /// Writes the trained weights into checkpoint directory `dir` (which exists).
    fn save_trained(&self, dir: &std::path::Path) -> Result<()>;

    /// Copies the trained weights of checkpoint directory `dir` into the model.
    /// A missing file or tensor, or a shape that differs, is an error naming it.
    fn load_trained(&self, dir: &std::path::Path) -> Result<()>;

    /// The sharded training state, when [`VelocityModel::parameters`] are this
    /// process's shards (every process then writes and reads its own part of a
    /// checkpoint); `None` for a model every process holds whole.
    fn sharded_state(&self) -> Option<&crate::dist::fsdp::FullShard> {
        None
    }
}

/// A policy model whose parameters can be split by unit among processes.
pub trait Shardable: PolicyModel {
    /// The units of the trained parameters (see [`ParamUnit`]), in model
    /// order: the units the model calls its residency around when the whole
    /// model is trained; the adapters grouped by block under LoRA.
    fn units(&self) -> Vec<ParamUnit>;
    /// Calls `residency` around every unit from now on.
    fn set_residency(&mut self, residency: Option<std::rc::Rc<dyn Residency>>);
    /// The architecture as its library's `config.json` (for exported weights).
    fn config_json(&self) -> String;
}
