//! Low-rank adapters as the linear layers hold them: the adapter, the slot a
//! layer keeps for one (shared with the model's parameter registry in
//! [`crate::weights`]) and the model-wide switch that turns them all off.
//!
//! Its own module so that [`crate::nn`] (the layers) and [`crate::weights`]
//! (the registry) both depend on it instead of on each other.

use std::cell::{Cell, OnceCell};
use std::rc::Rc;

use tch::Tensor;

/// A low-rank adapter on a linear layer: `y += (x A^T) B^T * scale`.
pub struct Lora {
    /// Down projection `[rank, in]`.
    pub a: Tensor,
    /// Up projection `[out, rank]` (zero at initialisation).
    pub b: Tensor,
    /// `alpha / rank`.
    pub scale: f64,
    /// The model-wide switch that turns every adapter off at once.
    pub switch: AdapterSwitch,
}

/// Turns all the adapters of a model off and on together: with them off the
/// model computes its base weights' function, which is the reference policy
/// of a KL term under LoRA (no second copy of the model in memory).
#[derive(Debug, Clone, Default)]
pub struct AdapterSwitch(Rc<Cell<bool>>);

impl AdapterSwitch {
    /// Whether the adapters apply.
    pub fn on(&self) -> bool {
        !self.0.get()
    }

    /// Turns the adapters off until the returned guard is dropped.
    pub fn off(&self) -> AdaptersOff<'_> {
        let was = self.0.replace(true);
        AdaptersOff { switch: self, was }
    }
}

/// Adapters are off while this lives (see [`AdapterSwitch::off`]).
pub struct AdaptersOff<'a> {
    switch: &'a AdapterSwitch,
    was: bool,
}

impl Drop for AdaptersOff<'_> {
    fn drop(&mut self) {
        self.switch.0.set(self.was);
    }
}

/// Where a layer's adapter goes once attached (shared with the model's registry).
pub type LoraSlot = Rc<OnceCell<Lora>>;
