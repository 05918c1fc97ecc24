//! The transformer's parameter units and the residency calls around them
//! (sharded training gathers a unit before it computes and frees it after).

use std::rc::Rc;

use super::FluxTransformer;
use crate::error::Result;
use crate::models::{ParamUnit, Residency};

impl FluxTransformer {
    /// The parameter units, in model order: `embed` (time/text embedding,
    /// context and image embedders), each `transformer_blocks.i`, each
    /// `single_transformer_blocks.i`, then `head` (`norm_out`, `proj_out`).
    /// Every base parameter is in exactly one unit.
    pub fn units(&self) -> Vec<ParamUnit> {
        group(self.params.named())
    }

    /// The units of what is trained: [`Self::units`], or under LoRA the
    /// adapters grouped by the block they adapt.
    pub fn trained_units(&self) -> Vec<ParamUnit> {
        match self.lora() {
            Some((adapters, _)) => group(adapters.named()),
            None => self.units(),
        }
    }

    /// Calls `residency` around every unit from now on (`None`: parameters stay put).
    pub fn set_residency(&mut self, residency: Option<Rc<dyn Residency>>) {
        self.residency = residency;
    }

    /// Unit indices of [`Self::units`]: embed, double block `i`, single block `i`, head.
    pub(in crate::models::flux) fn unit_embed(&self) -> usize {
        0
    }
    pub(in crate::models::flux) fn unit_double(&self, i: usize) -> usize {
        1 + i
    }
    pub(in crate::models::flux) fn unit_single(&self, i: usize) -> usize {
        1 + self.transformer_blocks.len() + i
    }
    pub(in crate::models::flux) fn unit_head(&self) -> usize {
        1 + self.transformer_blocks.len() + self.single_transformer_blocks.len()
    }

    /// Unit `u` is about to compute.
    pub(in crate::models::flux) fn acquire(&self, u: usize) -> Result<()> {
        self.residency.as_ref().map_or(Ok(()), |r| r.acquire(u))
    }

    /// Unit `u` is done with, for a pass whose graph does not need it.
    pub(in crate::models::flux) fn release(&self, u: usize) -> Result<()> {
        self.residency.as_ref().map_or(Ok(()), |r| r.release(u))
    }

    /// Unit `u`'s gradients are complete.
    pub(in crate::models::flux) fn gradients_ready(&self, u: usize) -> Result<()> {
        self.residency
            .as_ref()
            .map_or(Ok(()), |r| r.gradients_ready(u))
    }

    /// Releases unit `u` after a forward use, unless a graph (a backward pass
    /// to come) still needs its parameters.
    pub(super) fn done_with(&self, u: usize) -> Result<()> {
        match crate::autograd::grad_enabled() {
            true => Ok(()),
            false => self.release(u),
        }
    }
}

/// The unit a parameter belongs to (see [`FluxTransformer::units`]).
fn unit_of(name: &str) -> String {
    let parts: Vec<&str> = name.splitn(3, '.').collect();
    match parts[..] {
        [head @ ("transformer_blocks" | "single_transformer_blocks"), i, _] => {
            format!("{head}.{i}")
        }
        [first, ..] if first == "norm_out" || first == "proj_out" => "head".into(),
        _ => "embed".into(),
    }
}

/// Consecutive parameters of the same unit ([`unit_of`]) grouped, in order.
fn group(params: Vec<(String, tch::Tensor)>) -> Vec<ParamUnit> {
    let mut units: Vec<ParamUnit> = Vec::new();
    for (name, t) in params {
        let unit = unit_of(&name);
        match units.last_mut() {
            Some(u) if u.name == unit => u.params.push((name, t)),
            _ => units.push(ParamUnit {
                name: unit,
                params: vec![(name, t)],
            }),
        }
    }
    units
}
