//! Sequence parallelism as a velocity model: [`SequenceParallel`] wraps any
//! model whose forward pass can be split over the processes of a collective
//! ([`VelocityModel::velocity_sequence_parallel`]; FLUX's is Ulysses, in
//! `flux::model::ulysses`), so the samplers run it like one model. Every
//! process runs the same sampling with the same inputs; each forward pass is
//! shared and every process ends each step with the whole velocity.

use tch::Tensor;

use super::{FlowInputs, TokenLayout, VelocityModel};
use crate::dist::Collective;
use crate::error::{Error, Result};

/// A model run by the processes of a collective together. Inference only:
/// no block cache (a whole-step cache works), no gradients.
pub struct SequenceParallel<'a> {
    /// The model (every process holds it whole, or its sharded units gathered in turn).
    pub model: &'a dyn VelocityModel,
    /// The processes sharing each forward pass.
    pub collective: &'a dyn Collective,
}

impl VelocityModel for SequenceParallel<'_> {
    fn velocity(&self, inputs: &FlowInputs) -> Result<Tensor> {
        self.model
            .velocity_sequence_parallel(inputs, self.collective)
    }

    fn velocity_blocks(
        &self,
        _inputs: &FlowInputs,
        span: std::ops::Range<usize>,
        _reuse: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        Err(Error::Input(format!(
            "a block cache (blocks {}..{}) cannot run with sequence parallelism; a whole-step cache (kind = \"steps\") can",
            span.start, span.end
        )))
    }

    /// No: inference only.
    fn plain_backward(&self) -> bool {
        false
    }

    fn cacheable_blocks(&self) -> usize {
        self.model.cacheable_blocks()
    }

    fn check_sequence_split(&self, image_tokens: i64, world: i64) -> Result<()> {
        self.model.check_sequence_split(image_tokens, world)
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.model.parameters()
    }

    fn layout(&self) -> &dyn TokenLayout {
        self.model.layout()
    }
}
