//! A model trained fully sharded: the wrapped model computes, its units
//! gathered just in time by the [`FullShard`] residency; what is trained (and
//! checkpointed) are this process's shards.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use tch::{Kind, Tensor};

use super::{FullShard, Split};
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::models::{FlowInputs, PolicyModel, Residency, Shardable, TextWidths, VelocityModel};
use crate::precision::ReduceDtype;

/// The file stem of the sharded weights in a checkpoint.
pub const WEIGHTS: &str = "transformer";

/// `M` with its parameter units split among the processes of a collective.
pub struct ShardedModel<M: Shardable> {
    inner: M,
    state: Rc<FullShard>,
}

impl<M: Shardable> ShardedModel<M> {
    /// Shards `inner` (every process holding the same weights) over `c` as
    /// `split` says: units gathered in `compute`, gradients reduce-scattered in
    /// `reduce`.
    pub fn new(
        mut inner: M,
        c: Rc<dyn Collective>,
        compute: Kind,
        reduce: ReduceDtype,
        split: Split,
    ) -> Result<Self> {
        let state = Rc::new(FullShard::new(inner.units(), c, compute, reduce, split)?);
        if split == Split::Everything {
            let residency: Rc<dyn Residency> = state.clone();
            inner.set_residency(Some(residency));
        }
        Ok(ShardedModel { inner, state })
    }

    /// The sharded state.
    pub fn state(&self) -> &Rc<FullShard> {
        &self.state
    }

    /// The wrapped model (its parameters are empty between uses).
    pub fn inner(&self) -> &M {
        &self.inner
    }
}

impl<M: Shardable> VelocityModel for ShardedModel<M> {
    fn velocity(&self, inputs: &FlowInputs) -> Result<Tensor> {
        self.inner.velocity(inputs)
    }

    fn layout(&self) -> &dyn crate::models::TokenLayout {
        self.inner.layout()
    }

    fn velocity_backward(
        &self,
        inputs: &FlowInputs,
        loss_fn: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.inner.velocity_backward(inputs, loss_fn)
    }

    fn reference_velocity(&self, inputs: &FlowInputs) -> Result<Option<Tensor>> {
        self.inner.reference_velocity(inputs)
    }

    /// No: the backward pass reduce-scatters each unit's gradients as the
    /// unit is gathered again.
    fn plain_backward(&self) -> bool {
        false
    }

    fn cacheable_blocks(&self) -> usize {
        self.inner.cacheable_blocks()
    }

    fn velocity_blocks(
        &self,
        inputs: &FlowInputs,
        span: std::ops::Range<usize>,
        reuse: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.inner.velocity_blocks(inputs, span, reuse)
    }

    fn velocity_sequence_parallel(
        &self,
        inputs: &FlowInputs,
        c: &dyn Collective,
    ) -> Result<Tensor> {
        self.inner.velocity_sequence_parallel(inputs, c)
    }

    fn check_sequence_split(&self, image_tokens: i64, world: i64) -> Result<()> {
        self.inner.check_sequence_split(image_tokens, world)
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.state.shards()
    }

    fn reduce_gradients(&self, _c: &dyn Collective, _reduce: ReduceDtype) -> Result<()> {
        match self.state.split() {
            // reduce-scattered unit by unit as the backward pass made them
            Split::Everything => Ok(()),
            // the whole gradients, summed into this process's parts
            Split::Optimizer => {
                (0..self.state.units.len()).try_for_each(|u| self.state.gradients_ready(u))
            }
        }
    }

    fn clip_gradients(&self, _c: &dyn Collective, max_norm: f64) -> Result<Tensor> {
        self.state.clip(max_norm)
    }

    fn parameters_changed(&self) -> Result<()> {
        match self.state.split() {
            Split::Everything => {
                self.state.invalidate();
                Ok(())
            }
            Split::Optimizer => self.state.write_back(),
        }
    }
}

impl<M: Shardable> PolicyModel for ShardedModel<M> {
    fn text_widths(&self) -> TextWidths {
        self.inner.text_widths()
    }

    fn guidance_embeds(&self) -> bool {
        self.inner.guidance_embeds()
    }

    fn save_trained(&self, dir: &Path) -> Result<()> {
        let shards: Vec<Tensor> = self.state.shards().into_iter().map(|(_, t)| t).collect();
        let meta = BTreeMap::from([("config".to_string(), self.inner.config_json())]);
        self.state.save_parts(dir, WEIGHTS, &shards, &meta)?;
        // under ZeRO-1 every process holds the whole model: process 0 also
        // writes it in its usual layout (LoRA's peft files, diffusers' transformer/)
        match (self.state.split(), self.state.c.rank()) {
            (Split::Optimizer, 0) => self.inner.save_trained(dir),
            _ => Ok(()),
        }
    }

    fn load_trained(&self, dir: &Path) -> Result<()> {
        let (parts, _) = self.state.load_parts(dir, WEIGHTS)?;
        let _guard = tch::no_grad_guard();
        for ((name, shard), part) in self.state.shards().iter().zip(parts) {
            if shard.size() != part.size() {
                return Err(Error::Input(format!(
                    "checkpoint {}: {name} has shape {:?}, this process's {:?}",
                    dir.display(),
                    part.size(),
                    shard.size()
                )));
            }
            shard.shallow_clone().copy_(&part);
        }
        self.parameters_changed()
    }

    fn sharded_state(&self) -> Option<&FullShard> {
        Some(&self.state)
    }
}
