//! Full sharding (ZeRO-3, FSDP's `FULL_SHARD`) of a model's parameter units
//! over c10d.
//!
//! Each unit (an embedding stage, a block, the output head) is one flat
//! float32 vector, zero-padded to a multiple of the process count `N`; process
//! `r` keeps part `r` of it: its master weights (an autograd leaf, so AdamW and
//! clipping work on it unchanged) and the gradient of that part. The model's
//! own parameters hold nothing between uses. As a [`Residency`]:
//!
//! * `acquire` all-gathers the unit in the compute dtype and points the
//!   model's parameters at views of it;
//! * `release` empties them again;
//! * `gradients_ready` flattens the unit's gradients, reduce-scatters their sum
//!   over the processes (in float32, or bfloat16 with `reduce = "bf16"`), adds
//!   this process's part to the shard's gradient and drops the full ones.
//!
//! While [`FullShard::pinned`] (a training iteration: GRPO makes hundreds of
//! gradient-free forwards per iteration) acquired units stay resident.

mod files;
mod model;

pub use files::{export, shard_path, ShardManifest, UnitLayout};
pub use model::{ShardedModel, WEIGHTS};

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use tch::{Kind, Tensor};

use super::Collective;
use crate::autograd::{accumulate_grad, reset_grad};
use crate::error::{Error, Result};
use crate::models::{ParamUnit, Residency};
use crate::precision::ReduceDtype;

/// One unit's flat layout and this process's part of it.
pub(super) struct FlatUnit {
    pub(super) name: String,
    /// The model's parameters (names, tensors, shapes).
    pub(super) params: Vec<(String, Tensor, Vec<i64>)>,
    /// Elements of the unit.
    pub(super) numel: i64,
    /// Elements of each process's part (`ceil(numel / N)`).
    pub(super) part: i64,
    /// This process's part of the float32 master weights `(part,)`.
    pub(super) shard: Tensor,
}

/// The fully sharded training state of one process.
pub struct FullShard {
    pub(super) c: Rc<dyn Collective>,
    pub(super) units: Vec<FlatUnit>,
    compute: Kind,
    reduce: ReduceDtype,
    resident: RefCell<Vec<bool>>,
    pinned: Cell<bool>,
    /// What stays whole in every process.
    split: Split,
}

/// What a [`FullShard`] splits among the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Weights, gradients and optimizer state (ZeRO-3): units are gathered
    /// for each use ([`Residency`]) and gradients reduce-scattered after each
    /// unit's backward.
    Everything,
    /// The optimizer state and its step (ZeRO-1): every process keeps the
    /// whole model; the gradients are reduce-scattered before the step and the
    /// stepped parts all-gathered back into the model after it
    /// ([`FullShard::write_back`]).
    Optimizer,
}

impl FullShard {
    /// Splits `units` (every process holding the same values) among the
    /// processes of `c`: this process keeps its float32 part of each; with
    /// [`Split::Everything`] the model's parameters are emptied. `compute`: the
    /// dtype units are gathered in.
    pub fn new(
        units: Vec<ParamUnit>,
        c: Rc<dyn Collective>,
        compute: Kind,
        reduce: ReduceDtype,
        split: Split,
    ) -> Result<Self> {
        let (world, rank) = (c.world_size(), c.rank());
        let _guard = tch::no_grad_guard();
        let mut flat_units = Vec::with_capacity(units.len());
        for unit in units {
            let flat = flatten(
                &unit
                    .params
                    .iter()
                    .map(|(_, p)| p.shallow_clone())
                    .collect::<Vec<_>>(),
                Kind::Float,
            )?;
            let numel = flat.numel() as i64;
            let part = (numel + world - 1) / world;
            let padded = pad(&flat, part * world);
            let shard = padded
                .narrow(0, rank * part, part)
                .copy()
                .set_requires_grad(true);
            let params = unit
                .params
                .into_iter()
                .map(|(n, p)| {
                    let shape = p.size();
                    (n, p, shape)
                })
                .collect();
            flat_units.push(FlatUnit {
                name: unit.name,
                params,
                numel,
                part,
                shard,
            });
        }
        let state = FullShard {
            resident: RefCell::new(vec![true; flat_units.len()]),
            units: flat_units,
            c,
            compute,
            reduce,
            pinned: Cell::new(false),
            split,
        };
        for u in 0..state.units.len() {
            state.evict(u);
        }
        Ok(state)
    }

    /// This process's shards, as `(<unit>.shard, tensor)`: what is trained.
    pub fn shards(&self) -> Vec<(String, Tensor)> {
        self.units
            .iter()
            .map(|u| (format!("{}.shard", u.name), u.shard.shallow_clone()))
            .collect()
    }

    /// Keeps acquired units resident until the guard is dropped (then every
    /// resident unit is freed).
    pub fn pinned(&self) -> Pinned<'_> {
        self.pinned.set(true);
        Pinned(self)
    }

    /// Frees every resident unit: their gathered copies are stale once the
    /// shards have changed (after an optimizer step, a load).
    pub fn invalidate(&self) {
        for u in 0..self.units.len() {
            if self.resident.borrow()[u] {
                self.evict(u);
            }
        }
    }

    /// The whole of unit `u`'s float32 master weights as the model's
    /// `(name, tensor)` pairs (a collective: every process calls it).
    pub fn gather_unit(&self, u: usize) -> Result<Vec<(String, Tensor)>> {
        let unit = &self.units[u];
        let device = unit.shard.device();
        let full = Tensor::zeros([unit.part * self.c.world_size()], (Kind::Float, device));
        self.c.all_gather_into(&full, &unit.shard.detach())?;
        let views = views(&full, &unit.params);
        Ok(unit
            .params
            .iter()
            .zip(views)
            .map(|((n, _, _), v)| (n.clone(), v.copy()))
            .collect())
    }

    /// The clipping of `clip_grad_norm_` over every process's shards: the total
    /// norm is `sqrt` of the all-reduced sum of this process's squared shard
    /// norms (the same value as the norm of per-parameter norms, summed in
    /// another order), every shard's gradient scaled by `min(1, max / (norm + 1e-6))`.
    pub fn clip(&self, max_norm: f64) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .units
            .iter()
            .map(|u| u.shard.grad())
            .filter(|g| g.defined())
            .collect();
        let device = self
            .units
            .first()
            .map_or(tch::Device::Cpu, |u| u.shard.device());
        let local = grads
            .iter()
            .map(|g| g.pow_tensor_scalar(2).sum(Kind::Float))
            .fold(Tensor::zeros([1], (Kind::Float, device)), |a, b| a + b);
        self.c.all_reduce_sum(&local)?;
        let total = local.sqrt().reshape([]);
        let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
        for g in &grads {
            let _ = g.shallow_clone().g_mul_(&coef);
        }
        Ok(total)
    }

    /// All-gathers every unit's stepped parts into the model's own (float32)
    /// parameters ([`Split::Optimizer`], after an optimizer step or a load).
    pub fn write_back(&self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for unit in &self.units {
            let device = unit.shard.device();
            let full = Tensor::zeros([unit.part * self.c.world_size()], (Kind::Float, device));
            self.c.all_gather_into(&full, &unit.shard.detach())?;
            for ((_, p, _), view) in unit.params.iter().zip(views(&full, &unit.params)) {
                p.shallow_clone().copy_(&view);
            }
        }
        Ok(())
    }

    /// What this state splits.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Empties unit `u`'s parameters (never under [`Split::Optimizer`]: the
    /// model stays whole).
    fn evict(&self, u: usize) {
        if self.split == Split::Optimizer {
            return;
        }
        let _guard = tch::no_grad_guard();
        for (_, p, _) in &self.units[u].params {
            let empty = Tensor::zeros([0], (self.compute, p.device()));
            p.shallow_clone().set_data(&empty);
        }
        self.resident.borrow_mut()[u] = false;
    }
}

/// While alive, acquired units stay resident ([`FullShard::pinned`]).
pub struct Pinned<'a>(&'a FullShard);

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.0.pinned.set(false);
        self.0.invalidate();
    }
}

impl Residency for FullShard {
    fn acquire(&self, u: usize) -> Result<()> {
        if self.resident.borrow()[u] || self.split == Split::Optimizer {
            return Ok(());
        }
        let unit = &self.units[u];
        let _guard = tch::no_grad_guard();
        let full = Tensor::empty(
            [unit.part * self.c.world_size()],
            (self.compute, unit.shard.device()),
        );
        self.c
            .all_gather_into(&full, &unit.shard.detach().to_kind(self.compute))?;
        for ((_, p, _), view) in unit.params.iter().zip(views(&full, &unit.params)) {
            p.shallow_clone().set_data(&view);
        }
        self.resident.borrow_mut()[u] = true;
        Ok(())
    }

    fn release(&self, u: usize) -> Result<()> {
        if !self.pinned.get() {
            self.evict(u);
        }
        Ok(())
    }

    fn gradients_ready(&self, u: usize) -> Result<()> {
        let unit = &self.units[u];
        let kind = match self.reduce {
            ReduceDtype::Fp32 => Kind::Float,
            ReduceDtype::Bf16 => Kind::BFloat16,
        };
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = unit
            .params
            .iter()
            .map(|(_, p, shape)| {
                let g = p.grad();
                match g.defined() {
                    true => g,
                    false => Tensor::zeros(shape.as_slice(), (kind, p.device())),
                }
            })
            .collect();
        let flat = pad(&flatten(&grads, kind)?, unit.part * self.c.world_size());
        let mine = Tensor::empty([unit.part], (kind, unit.shard.device()));
        self.c.reduce_scatter_sum(&mine, &flat)?;
        accumulate_grad(&unit.shard, &mine.to_kind(Kind::Float));
        for (_, p, _) in &unit.params {
            reset_grad(p);
        }
        Ok(())
    }
}

/// The elements of `ts` one after another, in `kind`.
fn flatten(ts: &[Tensor], kind: Kind) -> Result<Tensor> {
    if ts.is_empty() {
        return Err(Error::Input("a parameter unit without parameters".into()));
    }
    let flat: Vec<Tensor> = ts
        .iter()
        .map(|t| t.detach().to_kind(kind).reshape([-1]))
        .collect();
    Ok(Tensor::cat(&flat, 0))
}

/// `flat` zero-padded to `len` elements.
pub(super) fn pad(flat: &Tensor, len: i64) -> Tensor {
    let extra = len - flat.numel() as i64;
    match extra {
        0 => flat.shallow_clone(),
        _ => {
            let zeros = Tensor::zeros([extra], (flat.kind(), flat.device()));
            Tensor::cat(&[flat.shallow_clone(), zeros], 0)
        }
    }
}

/// Views of `full` shaped as `params`, in order.
pub(super) fn views(full: &Tensor, params: &[(String, Tensor, Vec<i64>)]) -> Vec<Tensor> {
    let mut at = 0;
    params
        .iter()
        .map(|(_, _, shape)| {
            let n: i64 = shape.iter().product();
            let v = full.narrow(0, at, n).view(shape.as_slice());
            at += n;
            v
        })
        .collect()
}
